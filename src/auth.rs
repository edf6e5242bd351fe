//! JWT authentication (`[auth] mode = "jwt"`).
//!
//! A [`Verifier`] is built once at start from `[auth]`: the key (an HS256
//! secret, or a PEM public key read from a file) and the one algorithm the
//! node accepts. The token's own `alg` header never chooses: a token signed
//! with anything else, `none` included, is refused before its signature is
//! looked at (`none` is not even an algorithm `jsonwebtoken` can name, so it
//! fails to parse). Time claims are checked here rather than by the library,
//! in milliseconds with `leeway_ms`, because the session needs `exp` to arm
//! the expiry check (4008) anyway.
//!
//! What a connection keeps is a small [`Claims`]: the user id, `exp`, and
//! the room grants; the token itself is dropped once verified.
//!
//! Errors ([`AuthError`]) carry fixed, short reasons: they go to the client
//! in `bye` 4001 and must say which rule failed without echoing the token,
//! the key, or the library's message.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgegate_proto::channel;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{Auth, JwtAlgorithm};
use crate::jwks::{JwksKeys, JwksSettings, JwksStats};

/// Why a token was refused; [`AuthError::reason`] is safe to send to the
/// client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token where one was required.
    Missing,
    /// Not a JWT, or claims of the wrong shape.
    Malformed,
    /// Signed with another algorithm than the configured one (`none` too).
    Algorithm,
    /// The signature does not verify with the configured key.
    Signature,
    /// `exp` is past (beyond the leeway), or missing.
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// `aud` is not the configured audience.
    Audience,
    /// `iss` is not the configured issuer.
    Issuer,
    /// `sub` is missing or not a valid channel id.
    Subject,
    /// The token's `kid` names no key of the JWKS (`auth.jwks_url`); a
    /// refresh of the set has been asked for.
    UnknownKey,
}

impl AuthError {
    /// The reason sent in `bye` 4001 / `err unauthorized`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "a token is required",
            AuthError::Malformed => "token is malformed",
            AuthError::Algorithm => "token algorithm not accepted",
            AuthError::Signature => "token signature is invalid",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::Audience => "token audience not accepted",
            AuthError::Issuer => "token issuer not accepted",
            AuthError::Subject => "token sub is missing or not a valid user id",
            AuthError::UnknownKey => "token key (kid) is not in the key set",
        }
    }

    /// Label value for the `edgegate_auth_failures_total` counter.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Audience => "audience",
            AuthError::Issuer => "issuer",
            AuthError::Subject => "subject",
            AuthError::UnknownKey => "unknown_key",
        }
    }

    /// Every variant, in label order (for metrics).
    pub const ALL: [AuthError; 10] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Algorithm,
        AuthError::Signature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::Audience,
        AuthError::Issuer,
        AuthError::Subject,
        AuthError::UnknownKey,
    ];

    /// Index into [`AuthError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One entry of the `rooms` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoomGrant {
    /// This room id.
    Exact(Box<str>),
    /// Any room id starting with this (the claim's `prefix*`; `*` = any).
    Prefix(Box<str>),
}

/// What a connection keeps of its verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the user id.
    pub sub: Box<str>,
    /// `exp` in Unix milliseconds (the leeway not added).
    pub exp_unix_ms: u64,
    rooms: Box<[RoomGrant]>,
}

impl Claims {
    /// Whether the `rooms` claim allows room `id`.
    pub fn allows_room(&self, id: &str) -> bool {
        self.rooms.iter().any(|g| match g {
            RoomGrant::Exact(r) => **r == *id,
            RoomGrant::Prefix(p) => id.starts_with(&**p),
        })
    }
}

/// The claims read from a token; only these are looked at.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    // NumericDate may be fractional (RFC 7519 §2).
    exp: Option<f64>,
    nbf: Option<f64>,
    #[serde(default)]
    rooms: Vec<String>,
    /// A channel token's channel (docs/api.md, "Channel tokens").
    ch: Option<String>,
}

/// What a verified channel token grants: `sub` may use `ch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelClaims {
    /// `sub`: the user it is for.
    pub sub: String,
    /// `ch`: the channel it is for.
    pub ch: String,
}

/// Where the verifying key comes from.
enum Keys {
    /// `auth.secret` or `auth.public_key`, read at start.
    Static(DecodingKey),
    /// `auth.jwks_url`: the fetcher's current set, by `kid`.
    Jwks(Arc<JwksKeys>),
}

/// Verifies tokens with the configured key and rules. Shared read-only by
/// every shard.
pub struct Verifier {
    keys: Keys,
    validation: Validation,
    leeway_ms: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway_ms", &self.leeway_ms)
            .finish_non_exhaustive()
    }
}

/// Unix time now, in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Verifier {
    /// Builds the verifier from `[auth]`, reading the public key file. The
    /// error names the key or file and what is wrong with it.
    pub fn from_config(auth: &Auth) -> Result<Verifier, String> {
        Verifier::start(auth, Arc::default())
    }

    /// [`Verifier::from_config`], with the JWKS fetcher (`auth.jwks_url`)
    /// started and counting into `jwks_stats`.
    pub fn start(auth: &Auth, jwks_stats: Arc<JwksStats>) -> Result<Verifier, String> {
        let (alg, keys) = match (auth.algorithm, &auth.jwks_url) {
            (JwtAlgorithm::HS256, _) => {
                let secret = auth
                    .secret
                    .as_deref()
                    .ok_or("auth.secret is required for HS256")?;
                (
                    Algorithm::HS256,
                    Keys::Static(DecodingKey::from_secret(secret.as_bytes())),
                )
            }
            (other, Some(url)) => {
                let settings = JwksSettings {
                    url: url.clone(),
                    ca_file: auth.jwks_ca_file.clone(),
                    algorithm: algorithm(other),
                    refresh: Duration::from_millis(auth.jwks_refresh_ms),
                    min_refresh: Duration::from_millis(auth.jwks_min_refresh_ms),
                    timeout: Duration::from_millis(auth.jwks_timeout_ms),
                };
                (
                    algorithm(other),
                    Keys::Jwks(crate::jwks::start(settings, jwks_stats)?),
                )
            }
            (other, None) => {
                let path = auth
                    .public_key
                    .as_deref()
                    .ok_or("auth.public_key is required for this algorithm")?;
                (
                    algorithm(other),
                    Keys::Static(read_public_key(other, path)?),
                )
            }
        };
        let mut validation = Validation::new(alg);
        // exp and nbf: checked in `verify`, in milliseconds.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        match &auth.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // No audience configured: a token's `aud` is not ours to judge.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &auth.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Verifier {
            keys,
            validation,
            leeway_ms: auth.leeway_ms,
        })
    }

    /// The configured clock-skew allowance.
    pub fn leeway_ms(&self) -> u64 {
        self.leeway_ms
    }

    /// Checks signature, algorithm, audience, issuer and time of `token`
    /// at Unix time `now_ms`; its claims, `exp` in milliseconds.
    fn check(&self, token: &str, now_ms: u64) -> Result<(RawClaims, u64), AuthError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let refused = |e: jsonwebtoken::errors::Error| match e.kind() {
            K::InvalidSignature => AuthError::Signature,
            K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName => {
                AuthError::Algorithm
            }
            K::InvalidAudience => AuthError::Audience,
            K::InvalidIssuer => AuthError::Issuer,
            K::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
            K::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
            // An unknown `alg` ("none" among them) fails in the header.
            K::Json(_) if alg_is_unknown(token) => AuthError::Algorithm,
            _ => AuthError::Malformed,
        };
        let jwks_set;
        let key = match &self.keys {
            Keys::Static(key) => key,
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token.trim()).map_err(refused)?;
                jwks_set = jwks.current();
                match jwks_set.find(header.kid.as_deref()) {
                    Some(key) => key,
                    None => {
                        // Rotated in since the last fetch, or forged: the
                        // fetcher decides (at most one fetch per
                        // jwks_min_refresh_ms), this shard does not wait.
                        jwks.request_refresh();
                        return Err(AuthError::UnknownKey);
                    }
                }
            }
        };
        let data = jsonwebtoken::decode::<RawClaims>(token.trim(), key, &self.validation)
            .map_err(refused)?;
        let c = data.claims;
        let leeway = self.leeway_ms as f64;
        let now = now_ms as f64;
        let exp = match c.exp {
            Some(e) if e.is_finite() && e >= 0.0 => e * 1000.0,
            // A token that never expires cannot be revoked by time: refused.
            _ => return Err(AuthError::Expired),
        };
        if exp + leeway <= now {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = c.nbf
            && (!nbf.is_finite() || nbf * 1000.0 - leeway > now)
        {
            return Err(AuthError::NotYetValid);
        }
        Ok((c, exp.min(u64::MAX as f64) as u64))
    }

    /// Verifies a channel token (`sub.meta.token`) at `now_ms`: the same
    /// key, algorithm and rules as a connection's token, with a `ch`
    /// claim.
    pub fn verify_channel(&self, token: &str, now_ms: u64) -> Result<ChannelClaims, AuthError> {
        let (c, _) = self.check(token, now_ms)?;
        match (c.sub, c.ch) {
            (Some(sub), Some(ch)) => Ok(ChannelClaims { sub, ch }),
            (None, _) => Err(AuthError::Subject),
            (_, None) => Err(AuthError::Malformed),
        }
    }

    /// Verifies `token` at Unix time `now_ms`.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, AuthError> {
        let (c, exp_ms) = self.check(token, now_ms)?;
        // A channel token grants one channel, not a connection.
        if c.ch.is_some() {
            return Err(AuthError::Malformed);
        }
        let sub = match c.sub {
            Some(s) if channel::valid_id(&s) => s.into_boxed_str(),
            _ => return Err(AuthError::Subject),
        };
        let rooms = c
            .rooms
            .into_iter()
            .filter_map(|r| match r.strip_suffix('*') {
                Some(p) => Some(RoomGrant::Prefix(p.into())),
                // An entry that is not an id could never match a room.
                None if channel::valid_id(&r) => Some(RoomGrant::Exact(r.into_boxed_str())),
                None => None,
            })
            .collect();
        Ok(Claims {
            sub,
            exp_unix_ms: exp_ms,
            rooms,
        })
    }
}

/// True when the token's header names an `alg` that is not one we know
/// (`none`, `HS1`, ...): reported as a wrong algorithm, not as garbage.
fn alg_is_unknown(token: &str) -> bool {
    use base64::Engine as _;
    let Some(head) = token.trim().split('.').next() else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head) else {
        return false;
    };
    #[derive(Deserialize)]
    struct Head {
        alg: Option<String>,
    }
    serde_json::from_slice::<Head>(&bytes).is_ok_and(|h| h.alg.is_some())
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

fn read_public_key(alg: JwtAlgorithm, path: &Path) -> Result<DecodingKey, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("auth.public_key = {}: cannot read: {e}", path.display()))?;
    let key = match alg {
        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(&pem),
        JwtAlgorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
        JwtAlgorithm::HS256 => return Err("HS256 takes auth.secret, not a key file".into()),
    };
    key.map_err(|e| {
        format!(
            "auth.public_key = {}: not a PEM {alg:?} public key ({e})",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier(aud: Option<&str>) -> Verifier {
        let auth = Auth {
            secret: Some(SECRET.into()),
            audience: aud.map(Into::into),
            leeway_ms: 1000,
            ..Auth::default()
        };
        Verifier::from_config(&auth).unwrap_or_else(|e| panic!("{e}"))
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn good_token_gives_claims() {
        let t = token(serde_json::json!({"sub": "alice", "exp": NOW / 1000 + 60,
            "rooms": ["lobby", "team-*", "bad id"]}));
        let c = verifier(None)
            .verify(&t, NOW)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(&*c.sub, "alice");
        assert_eq!(c.exp_unix_ms, NOW + 60_000);
        assert!(c.allows_room("lobby") && c.allows_room("team-x"));
        assert!(!c.allows_room("lobby2") && !c.allows_room("bad id"));
    }

    #[test]
    fn time_claims_use_the_leeway() {
        let v = verifier(None);
        let exp = token(serde_json::json!({"sub": "a", "exp": NOW / 1000 - 2}));
        assert_eq!(v.verify(&exp, NOW), Err(AuthError::Expired));
        let in_leeway = token(serde_json::json!({"sub": "a", "exp": NOW / 1000}));
        assert!(v.verify(&in_leeway, NOW + 500).is_ok());
        let nbf =
            token(serde_json::json!({"sub": "a", "exp": NOW / 1000 + 60, "nbf": NOW / 1000 + 5}));
        assert_eq!(v.verify(&nbf, NOW), Err(AuthError::NotYetValid));
        let no_exp = token(serde_json::json!({"sub": "a"}));
        assert_eq!(v.verify(&no_exp, NOW), Err(AuthError::Expired));
    }

    #[test]
    fn refusals_name_the_rule() {
        let v = verifier(Some("eg"));
        let wrong_aud = token(serde_json::json!({"sub": "a", "exp": NOW / 1000 + 60, "aud": "x"}));
        assert_eq!(v.verify(&wrong_aud, NOW), Err(AuthError::Audience));
        let no_aud = token(serde_json::json!({"sub": "a", "exp": NOW / 1000 + 60}));
        assert_eq!(v.verify(&no_aud, NOW), Err(AuthError::Audience));
        let bad_sub = token(serde_json::json!({"sub": "a b", "exp": NOW / 1000 + 60, "aud": "eg"}));
        assert_eq!(v.verify(&bad_sub, NOW), Err(AuthError::Subject));
        let good = token(serde_json::json!({"sub": "a", "exp": NOW / 1000 + 60, "aud": "eg"}));
        // Change one signature character away from its end (the last one
        // may carry padding bits and fail to decode instead).
        let mut forged: Vec<char> = good.chars().collect();
        let i = forged.len() - 10;
        forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        assert_eq!(v.verify(&forged, NOW), Err(AuthError::Signature));
        // alg none: header {"alg":"none","typ":"JWT"}, no signature.
        let mut parts = good.split('.');
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            parts.nth(1).unwrap_or_default()
        );
        assert_eq!(v.verify(&none, NOW), Err(AuthError::Algorithm));
        assert_eq!(v.verify("not a token", NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn channel_tokens() {
        let v = verifier(None);
        let t = token(serde_json::json!({"sub": "alice", "ch": "room:x", "exp": NOW / 1000 + 60}));
        let c = v
            .verify_channel(&t, NOW)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((c.sub.as_str(), c.ch.as_str()), ("alice", "room:x"));
        // Not a connection token.
        assert_eq!(v.verify(&t, NOW), Err(AuthError::Malformed));
        let old =
            token(serde_json::json!({"sub": "alice", "ch": "room:x", "exp": NOW / 1000 - 60}));
        assert_eq!(v.verify_channel(&old, NOW), Err(AuthError::Expired));
        let conn = token(serde_json::json!({"sub": "alice", "exp": NOW / 1000 + 60}));
        assert_eq!(v.verify_channel(&conn, NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn missing_key_file_is_named() {
        let auth = Auth {
            algorithm: JwtAlgorithm::ES256,
            public_key: Some("/nonexistent/k.pem".into()),
            ..Auth::default()
        };
        let e = Verifier::from_config(&auth).err().unwrap_or_default();
        assert!(e.contains("/nonexistent/k.pem"), "{e}");
    }
}
