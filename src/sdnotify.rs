//! systemd readiness notification (`Type=notify`) without libsystemd: one
//! datagram to the socket named by `NOTIFY_SOCKET`, as sd_notify(3) does.
//!
//! Sent: `READY=1` once every shard listens, `STOPPING=1` when the drain
//! begins. Without `NOTIFY_SOCKET` (not under systemd) nothing happens;
//! failures are logged, never fatal: a missed notification makes systemd
//! time the start out, which is the signal an operator needs anyway.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

/// Sends `state` (such as `"READY=1"`) to systemd, if it asked for it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract namespace socket (Linux).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        debug!(error = %e, state, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram() {
        let dir = std::env::temp_dir().join(format!("eg-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
