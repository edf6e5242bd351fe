//! JWT keys from a JWKS endpoint (`[auth] jwks_url`).
//!
//! Identity providers publish their signing keys as a JSON Web Key Set
//! (RFC 7517) and rotate them: a new key appears in the set before tokens
//! are signed with it, and the old one stays until its tokens have expired.
//! A token names its key with the `kid` header.
//!
//! **Where the work happens.** Tokens are verified on the shards (the
//! sans-IO session calls [`crate::auth::Verifier`]), which must never wait
//! on the network. So the set is fetched by a thread of its own (`jwks`,
//! blocking HTTP/1.1 through `ureq` over rustls and ring), and handed to
//! the shards through an [`ArcSwap`]: a verification is one atomic load and
//! a short scan of the keys. A token whose `kid` is not in the set is
//! refused (`AuthError::UnknownKey`, so 4001) and asks the thread for a
//! refresh through a one-slot channel (`try_send`: a flood of unknown kids
//! costs the shards nothing and coalesces into one request).
//!
//! **Bounds.** The thread fetches at start, then every `jwks_refresh_ms`,
//! and sooner when asked, but never twice within `jwks_min_refresh_ms`:
//! an unknown-kid flood cannot hammer the identity provider. A fetch that
//! fails (connection, TLS, status, a body over 1 MiB, JSON, or a set with
//! no usable key) keeps the last good set and is tried again after
//! `jwks_min_refresh_ms`. At most [`MAX_KEYS`] keys are kept.
//!
//! **Start.** A node whose JWKS cannot be reached at start has no key: it
//! starts (the listeners, the admin endpoint, the backbone), but `/readyz`
//! answers 503 until the first set arrives, as it does while the NATS
//! backbone is down, and the thread keeps trying every
//! `jwks_min_refresh_ms`. A start error would turn an identity provider's
//! outage into a fleet that cannot restart; readiness keeps the load
//! balancer's traffic away meanwhile and recovers by itself. A bad
//! configuration (URL syntax, an unreadable CA file) is a start error.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Most keys kept from one set; a set is a handful in practice.
pub const MAX_KEYS: usize = 64;

/// Largest JWKS body read.
const MAX_BODY: u64 = 1 << 20;

/// Checks a `jwks_url`: `http` or `https`, with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// What the fetcher needs, from `[auth]`.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// `auth.jwks_url`.
    pub url: String,
    /// `auth.jwks_ca_file`.
    pub ca_file: Option<std::path::PathBuf>,
    /// The one algorithm accepted: keys for others are left out.
    pub algorithm: Algorithm,
    /// `auth.jwks_refresh_ms`.
    pub refresh: Duration,
    /// `auth.jwks_min_refresh_ms`.
    pub min_refresh: Duration,
    /// `auth.jwks_timeout_ms`.
    pub timeout: Duration,
}

/// Counters of the fetcher, for `/metrics` and `/readyz`.
#[derive(Default, Debug)]
pub struct JwksStats {
    /// A JWKS is configured.
    pub enabled: AtomicBool,
    /// Fetches that replaced the set.
    pub refresh_ok: AtomicU64,
    /// Fetches that failed (the last good set kept).
    pub refresh_failed: AtomicU64,
    /// Keys in the current set.
    pub keys: AtomicU64,
    /// Unix time (seconds) of the last fetch that replaced the set.
    pub last_ok_unix: AtomicU64,
}

impl JwksStats {
    /// False while a JWKS is configured and no set has arrived yet.
    pub fn ready(&self) -> bool {
        !self.enabled.load(Relaxed) || self.refresh_ok.load(Relaxed) > 0
    }
}

/// One usable key of a set.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// The current key set.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// The key a token names: by `kid`; a token without `kid` only when the
    /// set has exactly one key (providers with one key often omit it).
    pub fn find(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key),
            None if self.keys.len() == 1 => self.keys.first().map(|k| &k.key),
            None => None,
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The shards' side: the current set, and the way to ask for a refresh.
pub struct JwksKeys {
    current: ArcSwap<KeySet>,
    refresh: Sender<()>,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKeys")
            .field("keys", &self.current.load().len())
            .finish()
    }
}

impl JwksKeys {
    /// The current set (one atomic load).
    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// Asks the fetcher for a refresh (a token named a key the set does
    /// not have). Never blocks; requests coalesce.
    pub fn request_refresh(&self) {
        let _ = self.refresh.try_send(());
    }
}

/// Parses a JWKS body into the keys usable with `alg`; keys of other
/// types, algorithms or uses, and keys that do not parse, are left out
/// (a provider may publish encryption keys and newer key types beside
/// ours). An empty result is an error: it would lock every client out.
pub fn parse_set(body: &[u8], alg: Algorithm) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        keys: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(body)
        .map_err(|e| format!("not a JWKS (JSON with \"keys\"): {e}"))?;
    let mut keys = Vec::new();
    for value in raw.keys {
        // One key at a time: a key of a type this library cannot name must
        // not make the whole set unreadable.
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if !usable(&jwk, alg) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        if keys.len() == MAX_KEYS {
            break;
        }
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!("the set has no {alg:?} signature key"));
    }
    Ok(KeySet { keys })
}

/// Whether `jwk` is a signature key for `alg`.
fn usable(jwk: &Jwk, alg: Algorithm) -> bool {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return false;
    }
    let named = match jwk.common.key_algorithm {
        None => true,
        Some(a) => matches!(
            (a, alg),
            (KeyAlgorithm::RS256, Algorithm::RS256)
                | (KeyAlgorithm::ES256, Algorithm::ES256)
                | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
        ),
    };
    let typed = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    };
    named && typed
}

/// Reads the CA file, or the system's roots.
fn root_certs(
    ca_file: Option<&std::path::Path>,
) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ders: Vec<CertificateDer<'static>> = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.jwks_ca_file = {}: cannot read: {e}", path.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!(
                        "auth.jwks_ca_file = {}: not PEM certificates: {e}",
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "auth.jwks_ca_file = {}: no certificate in the file",
                    path.display()
                ));
            }
            certs
        }
        // A machine without a CA bundle only matters for https URLs, where
        // every fetch then fails with the TLS error: logged, counted.
        None => rustls_native_certs::load_native_certs().certs,
    };
    Ok(ders
        .iter()
        .map(|d| ureq::tls::Certificate::from_der(d.as_ref()).to_owned())
        .collect())
}

/// The HTTP client: timeouts, the roots, ring, no status as error (the
/// status is reported in our words), a few redirects.
fn agent(settings: &JwksSettings) -> Result<ureq::Agent, String> {
    use ureq::tls::{RootCerts, TlsConfig};
    let roots = root_certs(settings.ca_file.as_deref())?;
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    Ok(ureq::Agent::config_builder()
        .timeout_global(Some(settings.timeout))
        .http_status_as_error(false)
        .max_redirects(3)
        .user_agent(concat!("edgegate/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .new_agent())
}

/// One fetch: the set, or why not.
fn fetch(agent: &ureq::Agent, settings: &JwksSettings) -> Result<KeySet, String> {
    let mut response = agent
        .get(&settings.url)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    parse_set(&body, settings.algorithm)
}

/// Starts the fetcher thread; the set is empty (and `/readyz` 503) until
/// its first fetch succeeds. Errors are configuration errors (the CA file,
/// the thread).
pub fn start(settings: JwksSettings, stats: Arc<JwksStats>) -> Result<Arc<JwksKeys>, String> {
    let agent = agent(&settings)?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let keys = Arc::new(JwksKeys {
        current: ArcSwap::from_pointee(KeySet::default()),
        refresh: tx,
    });
    stats.enabled.store(true, Relaxed);
    let shared = keys.clone();
    std::thread::Builder::new()
        .name("jwks".into())
        .spawn(move || run(&agent, &settings, &shared, &rx, &stats))
        .map_err(|e| format!("cannot start the JWKS thread: {e}"))?;
    Ok(keys)
}

/// The fetcher's loop: at once, then on schedule, and when asked, never
/// twice within `min_refresh`.
fn run(
    agent: &ureq::Agent,
    settings: &JwksSettings,
    keys: &JwksKeys,
    asked: &Receiver<()>,
    stats: &JwksStats,
) {
    let mut due = Instant::now();
    let mut last: Option<Instant> = None;
    let mut pending = false;
    loop {
        let now = Instant::now();
        let allowed = last.is_none_or(|t| now >= t + settings.min_refresh);
        if allowed && (pending || now >= due) {
            pending = false;
            last = Some(now);
            match fetch(agent, settings) {
                Ok(set) => {
                    tracing::info!(url = %settings.url, keys = set.len(), "JWKS fetched");
                    stats.keys.store(set.len() as u64, Relaxed);
                    let unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    stats.last_ok_unix.store(unix, Relaxed);
                    keys.current.store(Arc::new(set));
                    stats.refresh_ok.fetch_add(1, Relaxed);
                    due = now + settings.refresh;
                }
                Err(e) => {
                    stats.refresh_failed.fetch_add(1, Relaxed);
                    tracing::warn!(url = %settings.url, error = %e,
                        keys = keys.current.load().len(),
                        "JWKS fetch failed; keeping the last good key set");
                    due = now + settings.min_refresh;
                }
            }
            continue;
        }
        let wake = match (pending, last) {
            (true, Some(t)) => due.min(t + settings.min_refresh),
            _ => due,
        };
        match asked.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(()) => pending = true,
            Err(RecvTimeoutError::Timeout) => {}
            // The verifier is gone: nothing needs keys any more.
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_N: &str = "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw";

    fn set(keys: serde_json::Value) -> Vec<u8> {
        serde_json::json!({ "keys": keys }).to_string().into_bytes()
    }

    #[test]
    fn keys_of_other_algorithms_types_and_uses_are_left_out() {
        let body = set(serde_json::json!([
            {"kty": "RSA", "kid": "sig", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": RSA_N, "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "XYZ", "kid": "future", "foo": 1},
            {"kty": "RSA", "kid": "bare", "n": RSA_N, "e": "AQAB"}
        ]));
        let s = parse_set(&body, Algorithm::RS256).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.len(), 2);
        assert!(s.find(Some("sig")).is_some() && s.find(Some("bare")).is_some());
        assert!(s.find(Some("enc")).is_none() && s.find(Some("ps")).is_none());
        // Two keys: a token without kid picks none.
        assert!(s.find(None).is_none());
        // The same set holds no ES256 key.
        assert!(parse_set(&body, Algorithm::ES256).is_err());
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"[]",
            b"{}",
            b"{\"keys\": 3}",
            b"{\"keys\": []}",
            b"\xff\xfe",
        ] {
            assert!(parse_set(body, Algorithm::RS256).is_err(), "{body:?}");
        }
        let one = set(serde_json::json!([{"kty": "RSA", "n": RSA_N, "e": "AQAB"}]));
        let s = parse_set(&one, Algorithm::RS256).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            s.find(None).is_some(),
            "one key without kid serves kid-less tokens"
        );
    }

    #[test]
    fn a_huge_set_keeps_a_bounded_number_of_keys() {
        let many: Vec<_> = (0..1000)
            .map(|i| serde_json::json!({"kty": "RSA", "kid": format!("k{i}"), "n": RSA_N, "e": "AQAB"}))
            .collect();
        let s = parse_set(&set(serde_json::Value::Array(many)), Algorithm::RS256)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.len(), MAX_KEYS);
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://idp.example.com/.well-known/jwks.json").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        for bad in ["ftp://x/jwks", "not a url", "/jwks", "https://"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
