//! TLS for the stream listeners (WSS and TCP+TLS): the certificate, its
//! checks at start-up, and live reload.
//!
//! One [`CertStore`] per node holds the current certificate chain and key
//! behind an [`ArcSwap`]; it is rustls' certificate resolver, so each new
//! handshake reads it once (one atomic load) and established connections
//! never touch it again. A reload (SIGHUP) reads and checks the files, then
//! swaps the key in: new handshakes get the new certificate, open
//! connections keep theirs, and a bad file leaves the old one in place.
//!
//! [`TlsAcceptorHandle`] is what the shards hold: the rustls server config
//! of one listener kind (ALPN `http/1.1` for WSS, none for raw TCP) over
//! the shared store. Other TLS users (QUIC) can build their own
//! `ServerConfig` over the same store with [`CertStore::resolver`], and so
//! follow reloads too.
//!
//! [`TlsStream`] is the connection: rustls' *unbuffered* API under an
//! `AsyncRead + AsyncWrite`, so the WebSocket and TCP wires run over it
//! unchanged, and an idle connection holds no TLS buffer (rustls' buffered
//! `ServerConnection` keeps a 4 KiB read buffer per connection for good;
//! see `docs/bench-notes.md`, "TLS (issue 4)").
//!
//! Only TLS 1.2 and 1.3, with rustls' ring provider.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use futures_lite::{AsyncRead, AsyncWrite};
use rustls::ServerConfig;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// ALPN protocol WSS offers (the WebSocket upgrade is HTTP/1.1).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A certificate or key that cannot be used; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The PEM files of `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// Certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// Private key of the leaf.
    pub key: PathBuf,
}

impl CertPaths {
    /// The paths from `[tls]`, when both are set.
    pub fn from_config(tls: &crate::config::Tls) -> Option<CertPaths> {
        Some(CertPaths {
            cert_chain: tls.cert_chain.clone()?,
            key: tls.key.clone()?,
        })
    }
}

fn read(kind: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| {
        TlsError(format!(
            "tls.{kind} = {}: cannot read the file: {e}",
            path.display()
        ))
    })
}

/// Reads and checks the chain and key: PEM that parses, at least one
/// certificate, a leaf that has not expired, a key rustls can sign with,
/// and a key that matches the leaf. `now` is seconds since the Unix epoch.
pub fn load_certified_key(paths: &CertPaths, now: u64) -> Result<CertifiedKey, TlsError> {
    let chain_file = paths.cert_chain.display();
    let key_file = paths.key.display();
    let pem = read("cert_chain", &paths.cert_chain)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "tls.cert_chain = {chain_file}: not a valid PEM certificate chain: {e}"
            ))
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError(format!(
            "tls.cert_chain = {chain_file}: no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks, leaf first)"
        )));
    };
    let Some((not_before, not_after)) = validity(leaf) else {
        return Err(TlsError(format!(
            "tls.cert_chain = {chain_file}: the first certificate is not a valid X.509 certificate"
        )));
    };
    if now > not_after {
        return Err(TlsError(format!(
            "tls.cert_chain = {chain_file}: the certificate expired {} (unix time {not_after}); renew it",
            ago(now - not_after)
        )));
    }
    if now < not_before {
        tracing::warn!(
            file = %chain_file,
            not_before,
            "the certificate is not valid yet (clock skew?); serving it anyway"
        );
    }
    let key_pem = read("key", &paths.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsError(format!(
            "tls.key = {key_file}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1) in the file: {e}"
        ))
    })?;
    let signer = provider::sign::any_supported_type(&key).map_err(|e| {
        TlsError(format!(
            "tls.key = {key_file}: unsupported private key: {e}"
        ))
    })?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        TlsError(format!(
            "tls.key = {key_file} does not match the certificate in tls.cert_chain = {chain_file}: {e}"
        ))
    })?;
    Ok(ck)
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 2 * 3600 => format!("{} min ago", s / 60),
        s if s < 2 * 86400 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86400),
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The node's certificate: current key, and where it came from.
pub struct CertStore {
    paths: CertPaths,
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the certificate (a start-up error names the bad file).
    pub fn load(paths: CertPaths) -> Result<Arc<CertStore>, TlsError> {
        let ck = load_certified_key(&paths, unix_now())?;
        Ok(Arc::new(CertStore {
            paths,
            current: ArcSwap::from_pointee(ck),
        }))
    }

    /// Re-reads the files; on success new handshakes use the new
    /// certificate. On error the old one stays and the error is returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load_certified_key(&self.paths, unix_now())?;
        self.current.store(Arc::new(ck));
        Ok(())
    }

    /// Publishes the current certificate's expiry for `/metrics`
    /// (`edgegate_tls_cert_expiry_timestamp_seconds`).
    pub fn export_expiry(&self, stats: &crate::metrics::CredentialStats) {
        let leaf = self.current.load();
        // `load_certified_key` refused any chain whose leaf has no
        // validity, so this is always Some; 0 would hide the gauge.
        let not_after = leaf
            .cert
            .first()
            .and_then(|c| validity(c))
            .map_or(0, |(_, na)| na);
        stats
            .tls_not_after
            .store(not_after, std::sync::atomic::Ordering::Relaxed);
    }

    /// The files this store reads.
    pub fn paths(&self) -> &CertPaths {
        &self.paths
    }

    /// The store as a rustls certificate resolver, for a `ServerConfig`
    /// built elsewhere (QUIC) that must follow reloads.
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(Resolver(self.clone()))
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

/// A server config for the stream listeners: TLS 1.2 and 1.3, ring, the
/// store's certificate, and `alpn` (empty: no ALPN).
pub fn server_config(store: &Arc<CertStore>, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(format!("TLS set-up failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(store.resolver());
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Session tickets would add a write to every handshake and state we do
    // not need: clients of a chat edge reconnect rarely.
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// What a shard needs to terminate TLS on one listener: the config (shared
/// by every shard, immutable; the certificate inside it swaps on reload).
#[derive(Clone)]
pub struct TlsAcceptorHandle {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsAcceptorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptorHandle")
            .field("alpn", &self.config.alpn_protocols)
            .finish()
    }
}

impl TlsAcceptorHandle {
    /// A handle over `store` offering `alpn`.
    pub fn new(store: &Arc<CertStore>, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        Ok(TlsAcceptorHandle {
            config: Arc::new(server_config(store, alpn)?),
        })
    }

    /// Runs the server handshake on `io` (the caller bounds its time).
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> std::io::Result<TlsStream<S>> {
        TlsStream::accept(self.config.clone(), io).await
    }
}

// ---- the TLS stream: rustls' unbuffered API, buffers only in flight ------

/// Backstop for the ciphertext held for one connection: rustls itself
/// refuses records over 16 KiB + overhead and handshake messages over 64
/// KiB, so this is one incomplete handshake message (64 KiB), one read
/// (the shard's 64 KiB scratch) and one incomplete record, rounded up.
const MAX_RX: usize = 160 * 1024;
/// Plaintext encrypted per write: a batch (a few records).
const MAX_WRITE: usize = 64 * 1024;

/// A server-side TLS stream over `S` built on rustls' unbuffered API, so
/// that an idle connection holds no TLS buffer at all: incoming ciphertext
/// is kept only while a record is incomplete, plaintext only until the
/// reader takes it, outgoing records only until written. (rustls' buffered
/// `ServerConnection` keeps a 4 KiB read buffer per connection for good.)
///
/// It is an `AsyncRead + AsyncWrite` like the plain socket, so the
/// transports run unchanged over it. `poll_close` sends `close_notify`,
/// then shuts the socket's sending side.
pub struct TlsStream<S> {
    conn: rustls::server::UnbufferedServerConnection,
    io: S,
    /// The buffers, boxed and only while one holds bytes: every idle TLS
    /// connection's task carries this field, and 8 bytes instead of 88 keep
    /// the WSS task in a smaller allocation class (docs/architecture.md,
    /// "Memory per idle connection").
    bufs: Option<Box<Bufs>>,
    /// The peer sent close_notify (or its EOF was seen).
    read_closed: bool,
    /// We queued close_notify.
    write_closed: bool,
}

/// A TLS stream's bytes in flight.
#[derive(Default)]
struct Bufs {
    /// Ciphertext received and not yet consumed.
    rx: Vec<u8>,
    /// Records to send, from `tx_pos`.
    tx: Vec<u8>,
    tx_pos: usize,
    /// Decrypted data not yet read, from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
}

/// Where processing the received bytes left the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The handshake needs more bytes from the peer.
    NeedData,
    /// Application data may flow (handshake done, or TLS 1.3's half-RTT).
    Open,
    /// Both sides closed.
    Closed,
}

fn tls_io_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl<S> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bufs.as_deref();
        f.debug_struct("TlsStream")
            .field("rx", &b.map_or(0, |b| b.rx.len()))
            .field("tx", &b.map_or(0, |b| b.tx.len() - b.tx_pos))
            .field("plain", &b.map_or(0, |b| b.plain.len() - b.plain_pos))
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Runs the server handshake on `io` (the caller bounds its time).
    /// On a failure, the alert rustls queued is sent before returning.
    pub async fn accept(config: Arc<ServerConfig>, io: S) -> std::io::Result<TlsStream<S>> {
        let conn = rustls::server::UnbufferedServerConnection::new(config).map_err(tls_io_error)?;
        let mut s = TlsStream {
            conn,
            io,
            bufs: None,
            read_closed: false,
            write_closed: false,
        };
        match std::future::poll_fn(|cx| s.poll_handshake(cx)).await {
            Ok(()) => Ok(s),
            Err(e) => {
                let _ = std::future::poll_fn(|cx| s.poll_send_tx(cx)).await;
                Err(e)
            }
        }
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut chunk = [0u8; 4096];
        loop {
            let phase = self.process(None)?;
            ready!(self.poll_send_tx(cx))?;
            match phase {
                Phase::Open if !self.conn.is_handshaking() => return Poll::Ready(Ok(())),
                Phase::Closed => {
                    return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()));
                }
                _ => {}
            }
            if self.read_closed {
                return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let n = ready!(Pin::new(&mut self.io).poll_read(cx, &mut chunk))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.take_in(&chunk[..n])?;
        }
    }

    /// Lets go of the buffers once none holds anything.
    fn tidy(&mut self) {
        if let Some(b) = &self.bufs
            && b.rx.is_empty()
            && b.tx.is_empty()
            && b.plain.is_empty()
        {
            self.bufs = None;
        }
    }

    fn take_in(&mut self, data: &[u8]) -> std::io::Result<()> {
        let b = self.bufs.get_or_insert_with(Box::default);
        if b.rx.len() + data.len() > MAX_RX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "TLS record or handshake flight too large",
            ));
        }
        b.rx.extend_from_slice(data);
        Ok(())
    }

    /// Runs rustls over the received bytes until it needs more, queueing
    /// what it wants sent and the plaintext it decrypted. With `write`,
    /// encrypts (a prefix of) it once application data may flow and
    /// returns how much in the `usize`; with `close`, queues close_notify.
    fn process_with(
        &mut self,
        mut write: Option<&[u8]>,
        close: bool,
    ) -> std::io::Result<(Phase, usize)> {
        use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
        let mut written = 0;
        let b = &mut **self.bufs.get_or_insert_with(Box::default);
        loop {
            let status = self.conn.process_tls_records(&mut b.rx);
            let discard = status.discard;
            let state = match status.state {
                Ok(s) => s,
                Err(e) => {
                    // Queue the alert rustls prepared, if any.
                    b.rx.drain(..discard.min(b.rx.len()));
                    let st = self.conn.process_tls_records(&mut []);
                    if let Ok(ConnectionState::EncodeTlsData(mut enc)) = st.state {
                        let mut alert = [0u8; 64];
                        if let Ok(n) = enc.encode(&mut alert) {
                            b.tx.extend_from_slice(&alert[..n]);
                        }
                    }
                    return Err(tls_io_error(e));
                }
            };
            let mut outcome = None;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(tls_io_error)?;
                        b.plain.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    let start = b.tx.len();
                    let need = match enc.encode(&mut []) {
                        Err(EncodeError::InsufficientSize(s)) => s.required_size,
                        Ok(_) => 0,
                        Err(e) => return Err(std::io::Error::other(e.to_string())),
                    };
                    b.tx.resize(start + need, 0);
                    let n = enc
                        .encode(&mut b.tx[start..])
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    b.tx.truncate(start + n);
                }
                ConnectionState::TransmitTlsData(t) => {
                    // `tx` is sent in order before anything queued later.
                    t.done();
                }
                ConnectionState::BlockedHandshake => outcome = Some(Phase::NeedData),
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    self.read_closed = true;
                    outcome = Some(Phase::Closed);
                }
                ConnectionState::WriteTraffic(mut w) => {
                    if let Some(data) = write.take() {
                        let data = &data[..data.len().min(MAX_WRITE)];
                        let start = b.tx.len();
                        let mut room = data.len() + 256;
                        loop {
                            b.tx.resize(start + room, 0);
                            match w.encrypt(data, &mut b.tx[start..]) {
                                Ok(n) => {
                                    b.tx.truncate(start + n);
                                    break;
                                }
                                Err(EncryptError::InsufficientSize(s))
                                    if s.required_size > room =>
                                {
                                    room = s.required_size;
                                }
                                Err(e) => {
                                    b.tx.truncate(start);
                                    return Err(std::io::Error::other(e.to_string()));
                                }
                            }
                        }
                        written = data.len();
                    }
                    if close && !self.write_closed {
                        let start = b.tx.len();
                        b.tx.resize(start + 256, 0);
                        match w.queue_close_notify(&mut b.tx[start..]) {
                            Ok(n) => b.tx.truncate(start + n),
                            Err(_) => b.tx.truncate(start),
                        }
                        self.write_closed = true;
                    }
                    outcome = Some(Phase::Open);
                }
                _ => {
                    return Err(std::io::Error::other("unexpected TLS state (early data?)"));
                }
            }
            b.rx.drain(..discard.min(b.rx.len()));
            if let Some(phase) = outcome {
                if b.rx.is_empty() {
                    b.rx = Vec::new(); // idle: hold nothing
                }
                self.tidy();
                return Ok((phase, written));
            }
        }
    }

    fn process(&mut self, write: Option<&[u8]>) -> std::io::Result<Phase> {
        Ok(self.process_with(write, false)?.0)
    }

    /// Writes queued records; ready once all are written.
    fn poll_send_tx(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(b) = self.bufs.as_deref_mut() {
            while b.tx_pos < b.tx.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &b.tx[b.tx_pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                b.tx_pos += n;
            }
            if !b.tx.is_empty() {
                b.tx = Vec::new();
                b.tx_pos = 0;
            }
            self.tidy();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.bufs.as_deref_mut()
                && b.plain_pos < b.plain.len()
            {
                let n = buf.len().min(b.plain.len() - b.plain_pos);
                buf[..n].copy_from_slice(&b.plain[b.plain_pos..b.plain_pos + n]);
                b.plain_pos += n;
                if b.plain_pos == b.plain.len() {
                    b.plain = Vec::new();
                    b.plain_pos = 0;
                }
                this.tidy();
                return Poll::Ready(Ok(n));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // Alerts or key updates rustls answered: best effort here.
            if let Poll::Ready(Err(e)) = this.poll_send_tx(cx) {
                return Poll::Ready(Err(e));
            }
            if this.read_closed {
                return Poll::Ready(Ok(0));
            }
            let n = ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            if n == 0 {
                this.read_closed = true;
                return Poll::Ready(Ok(0));
            }
            this.take_in(&buf[..n])?;
            this.process(None)?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send_tx(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let (phase, n) = this.process_with(Some(data), false)?;
        if phase != Phase::Open || n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
        }
        // Start sending now; poll_flush finishes.
        if let Poll::Ready(Err(e)) = this.poll_send_tx(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_tx(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            ready!(this.poll_send_tx(cx))?;
            this.process_with(None, true)?;
            this.write_closed = true;
        }
        ready!(this.poll_send_tx(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

// ---- X.509 validity, read straight from the DER -------------------------

/// Reads one DER TLV at the start of `der`: (tag, contents, rest).
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// `notBefore` and `notAfter` of a certificate, in Unix seconds.
fn validity(cert: &[u8]) -> Option<(u64, u64)> {
    let (0x30, cert, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xA0 {
        rest = r; // explicit version
    }
    // serialNumber, signature, issuer
    for want in [0x02, 0x30, 0x30] {
        let (tag, _, r) = tlv(rest)?;
        if tag != want {
            return None;
        }
        rest = r;
    }
    let (0x30, validity, _) = tlv(rest)? else {
        return None;
    };
    let (t1, nb, r) = tlv(validity)?;
    let (t2, na, _) = tlv(r)?;
    Some((asn1_time(t1, nb)?, asn1_time(t2, na)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn asn1_time(tag: u8, s: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(s).ok()?;
    let s = s.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s.get(..4)?.parse().ok()?, &s[4..]),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asn1_times_convert_to_unix_seconds() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"240229123456Z"), Some(1_709_210_096));
        assert_eq!(asn1_time(0x18, b"20500101000000Z"), Some(2_524_608_000));
        assert_eq!(asn1_time(0x17, b"241301000000Z"), None);
        assert_eq!(asn1_time(0x17, b"2401010000Z"), None);
        assert_eq!(asn1_time(0x18, b"20240101000000"), None);
    }

    #[test]
    fn garbage_der_has_no_validity() {
        assert_eq!(validity(&[]), None);
        assert_eq!(validity(&[0x30, 0x82, 0xff]), None);
        assert_eq!(validity(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }

    #[test]
    fn missing_files_are_named() {
        let p = CertPaths {
            cert_chain: "/nonexistent/chain.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let e = load_certified_key(&p, 0).unwrap_err();
        assert!(e.0.contains("/nonexistent/chain.pem"), "{e}");
    }
}

/// The unbuffered adapter against an in-memory rustls client: handshake,
/// data both ways (records split at every size the pipe hands over),
/// close_notify, and no buffer held once idle.
#[cfg(test)]
mod stream_tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll, Waker};

    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One direction of an in-memory pipe.
    #[derive(Default)]
    struct Half {
        bytes: VecDeque<u8>,
        closed: bool,
        reader: Option<Waker>,
    }

    /// The server's end of the pipe; reads at most `chunk` bytes at a time,
    /// so records arrive split.
    struct ServerEnd {
        rx: Rc<RefCell<Half>>,
        tx: Rc<RefCell<Half>>,
        chunk: usize,
    }

    impl futures_lite::AsyncRead for ServerEnd {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let mut h = self.rx.borrow_mut();
            if h.bytes.is_empty() {
                if h.closed {
                    return Poll::Ready(Ok(0));
                }
                h.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(self.chunk).min(h.bytes.len());
            for (i, b) in h.bytes.drain(..n).enumerate() {
                buf[i] = b;
            }
            Poll::Ready(Ok(n))
        }
    }

    impl futures_lite::AsyncWrite for ServerEnd {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.tx.borrow_mut().bytes.extend(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.tx.borrow_mut().closed = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Moves bytes between the rustls client and the pipe until neither
    /// side has anything to say.
    /// Plaintext the client received goes to `plain`.
    fn pump(
        client: &mut rustls::ClientConnection,
        to_server: &Rc<RefCell<Half>>,
        from_server: &Rc<RefCell<Half>>,
        plain: &mut Vec<u8>,
    ) {
        loop {
            let mut moved = false;
            let mut out = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut out).unwrap_or_else(|e| panic!("{e}"));
            }
            if !out.is_empty() {
                let mut h = to_server.borrow_mut();
                h.bytes.extend(out);
                if let Some(w) = h.reader.take() {
                    w.wake();
                }
                moved = true;
            }
            let incoming: Vec<u8> = from_server.borrow_mut().bytes.drain(..).collect();
            if !incoming.is_empty() {
                let mut rd = &incoming[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap_or_else(|e| panic!("{e}"));
                    client
                        .process_new_packets()
                        .unwrap_or_else(|e| panic!("{e}"));
                    // Ok(0) (close_notify) and WouldBlock both mean "nothing more now".
                    let _ = client.reader().read_to_end(plain);
                }
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap_or_else(|e| panic!("{e}"));
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    fn round_trip(chunk: usize) {
        let (server_cfg, client_cfg) = configs();
        let to_server = Rc::new(RefCell::new(Half::default()));
        let from_server = Rc::new(RefCell::new(Half::default()));
        let end = ServerEnd {
            rx: to_server.clone(),
            tx: from_server.clone(),
            chunk,
        };
        let name =
            rustls::pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
        let mut client =
            rustls::ClientConnection::new(client_cfg, name).unwrap_or_else(|e| panic!("{e}"));
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut plain = Vec::new();
        futures_lite::future::block_on(async {
            let server = TlsStream::accept(server_cfg, end);
            futures_lite::pin!(server);
            // Drive the handshake: poll the server, pump the client.
            let mut s = loop {
                pump(&mut client, &to_server, &from_server, &mut plain);
                if let Some(r) = futures_lite::future::poll_once(server.as_mut()).await {
                    break r.unwrap_or_else(|e| panic!("handshake: {e}"));
                }
            };
            pump(&mut client, &to_server, &from_server, &mut plain);
            assert!(!client.is_handshaking());

            // Client → server.
            client
                .writer()
                .write_all(b"hello over tls")
                .unwrap_or_else(|e| panic!("{e}"));
            pump(&mut client, &to_server, &from_server, &mut plain);
            let mut got = [0u8; 14];
            s.read_exact(&mut got)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&got, b"hello over tls");

            // Server → client, more than one record and one write.
            s.write_all(&big).await.unwrap_or_else(|e| panic!("{e}"));
            s.flush().await.unwrap_or_else(|e| panic!("{e}"));
            pump(&mut client, &to_server, &from_server, &mut plain);
            assert_eq!(plain.len(), big.len());
            assert!(plain == big, "server data arrives intact");

            // Idle: the adapter holds no buffer, nor the box for them.
            assert!(s.bufs.is_none(), "{s:?}");

            // close_notify from the client ends the server's reads.
            client.send_close_notify();
            pump(&mut client, &to_server, &from_server, &mut plain);
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(rest.is_empty());
            s.close().await.unwrap_or_else(|e| panic!("{e}"));
            pump(&mut client, &to_server, &from_server, &mut plain);
            assert!(
                from_server.borrow().closed,
                "the socket's sending side is shut"
            );
        });
    }

    #[test]
    fn unbuffered_stream_against_a_rustls_client() {
        round_trip(usize::MAX);
    }

    #[test]
    fn records_split_across_reads() {
        for chunk in [1, 7, 1000] {
            round_trip(chunk);
        }
    }
}
