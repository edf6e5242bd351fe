//! Integration test against the real gateway binary (`target/debug/edgegate`)
//! with TLS on its WebSocket and TCP listeners and a QUIC listener: a CA and
//! a leaf for `localhost`/127.0.0.1 are made with the `openssl` command, and
//! over QUIC, TCP+TLS and wss two connections each get `welcome` and
//! exchange a message through a room.
//!
//! Skipped (with a message) when the binary has not been built or `openssl`
//! is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgegate_client::{ClientConfig, Connection, Error, Payload, Transport, Type};

mod common;
use common::{free_tcp_port, free_udp_port, gateway_bin, http_status};

fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CA (`ca.pem`) and leaf (`leaf.pem`, `leaf.key`) for localhost / 127.0.0.1 in `dir`.
fn make_certs(dir: &Path) -> bool {
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=edgegate test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    let sign = [
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ];
    openssl(dir, &ca) && openssl(dir, &csr) && openssl(dir, &sign)
}

struct Ports {
    ws: u16,
    tcp: u16,
    quic: u16,
    admin: u16,
}

struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(bin: &Path, dir: &Path, p: &Ports) -> Gateway {
    let log = dir.join("gateway.log");
    let logf = std::fs::File::create(&log).expect("log file");
    let child = Command::new(bin)
        .arg("run")
        .env("EDGEGATE_TLS__CERT_CHAIN", dir.join("leaf.pem"))
        .env("EDGEGATE_TLS__KEY", dir.join("leaf.key"))
        .env("EDGEGATE_WS__TLS", "true")
        .env("EDGEGATE_TCP__TLS", "true")
        .env("EDGEGATE_WS__LISTEN", format!("127.0.0.1:{}", p.ws))
        .env("EDGEGATE_TCP__LISTEN", format!("127.0.0.1:{}", p.tcp))
        .env("EDGEGATE_QUIC__LISTEN", format!("127.0.0.1:{}", p.quic))
        .env("EDGEGATE_ADMIN__LISTEN", format!("127.0.0.1:{}", p.admin))
        .env("EDGEGATE_SHARDS__COUNT", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn gateway");
    let gw = Gateway { child, log };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if http_status(p.admin, "/readyz") == Some(200) {
            return gw;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "gateway not ready; its log:\n{}",
        std::fs::read_to_string(&gw.log).unwrap_or_default()
    );
}

fn config(p: &Ports, transport: Transport, ca: &Path, user: &str) -> ClientConfig {
    let port = match transport {
        Transport::Ws => p.ws,
        Transport::Tcp => p.tcp,
        _ => p.quic,
    };
    let mut c = ClientConfig::new(format!("127.0.0.1:{port}"), transport, user);
    c.tls = true;
    c.ca_file = Some(ca.to_path_buf());
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn recv_until(conn: &mut Connection, what: &str, t: Type) -> edgegate_client::Envelope {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, conn.recv()).await {
            Ok(Ok(e)) if e.t == t => return e,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Two sessions over `transport`: both get welcome, one subscribes, the other publishes.
async fn exchange(p: &Ports, transport: Transport, ca: &Path) {
    let name = transport.name();
    let (a, b) = (format!("alice-{name}"), format!("bob-{name}"));
    let mut alice = Connection::connect(&config(p, transport, ca, &a))
        .await
        .unwrap_or_else(|e| panic!("{name}: alice connects: {e}"));
    assert_eq!(alice.welcome().user, a);
    let mut bob = Connection::connect(&config(p, transport, ca, &b))
        .await
        .unwrap_or_else(|e| panic!("{name}: bob connects: {e}"));
    assert_eq!(bob.welcome().user, b);
    let room = format!("room:secure-{name}");
    let sub_id = alice.subscribe(&room).await.unwrap();
    let ok = recv_until(&mut alice, "sub ok", Type::Ok).await;
    assert_eq!(ok.id, Some(sub_id));
    let body = format!("{{\"text\":\"hi over {name}\"}}");
    bob.publish(&room, Payload::Json(body.clone().into()))
        .await
        .unwrap();
    let msg = recv_until(&mut alice, "msg", Type::Msg).await;
    assert_eq!(msg.ch.as_deref(), Some(room.as_str()));
    assert_eq!(msg.from.as_deref(), Some(b.as_str()));
    match &msg.payload {
        Payload::Json(x) => assert_eq!(&x[..], body.as_bytes()),
        Payload::Binary(x) => assert_eq!(&x[..], body.as_bytes()),
        other => panic!("{name}: payload {other:?}"),
    }
    alice.close().await.unwrap();
    bob.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_and_tls_sessions_get_welcome_and_exchange_messages() {
    let Some(bin) = gateway_bin() else {
        eprintln!("SKIPPED: target/debug/edgegate not built (run `cargo build -p edgegate` first)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("edgegate-client-secure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if !make_certs(&dir) {
        eprintln!("SKIPPED: could not make test certificates with the openssl command");
        return;
    }
    let ports = Ports {
        ws: free_tcp_port(),
        tcp: free_tcp_port(),
        quic: free_udp_port(),
        admin: free_tcp_port(),
    };
    let _gw = tokio::task::block_in_place(|| start_gateway(&bin, &dir, &ports));
    let ca = dir.join("ca.pem");
    for t in [Transport::Quic, Transport::Tcp, Transport::Ws] {
        exchange(&ports, t, &ca).await;
    }

    // A TLS session without a CA to trust is refused before connecting.
    let mut no_ca = config(&ports, Transport::Quic, &ca, "eve");
    no_ca.ca_file = None;
    match Connection::connect(&no_ca).await {
        Err(Error::Config(_)) => {}
        other => panic!("expected a config error, got {other:?}"),
    }
    // A CA that did not sign the gateway's certificate fails the handshake.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    if make_certs(&other) {
        for t in [Transport::Quic, Transport::Tcp] {
            let c = config(&ports, t, &other.join("ca.pem"), "mallory");
            assert!(
                Connection::connect(&c).await.is_err(),
                "{} accepted an untrusted certificate",
                t.name()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
