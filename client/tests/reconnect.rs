//! Integration test against the real gateway binary (`target/debug/edgegate`):
//! start it on free ports, connect a reconnecting client, kill the gateway,
//! restart it, and check that the client reconnects and re-subscribes; then
//! SIGTERM it and check that `bye` 1001's `retry_ms` is honoured.
//!
//! Skipped (with a message) when the binary has not been built.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgegate_client::{
    Backoff, Client, ClientConfig, Connection, Encoding, Event, Payload, StopReason, TokenRefresh,
    Transport, Type,
};

mod common;
use common::{free_tcp_port, gateway_bin, http_status};

struct Ports {
    ws: u16,
    tcp: u16,
    admin: u16,
}

struct Gateway {
    child: Option<Child>,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway and waits for /readyz. A restart can find the
    /// listen port blocked for up to 60 s by the previous process's
    /// server-side TIME_WAIT sockets (its start-up probe binds without
    /// SO_REUSEPORT); retry while the log says "Address already in use".
    fn start(bin: &PathBuf, p: &Ports) -> Gateway {
        let t0 = Instant::now();
        loop {
            let g = Self::spawn(bin, p);
            match g.wait_ready(p.admin) {
                Ok(()) => {
                    if t0.elapsed() > Duration::from_secs(2) {
                        eprintln!(
                            "NOTE: gateway restart on the same ports took {:?} (listen port blocked: TIME_WAIT)",
                            t0.elapsed()
                        );
                    }
                    return g;
                }
                Err(log)
                    if log.contains("Address already in use")
                        && t0.elapsed() < Duration::from_secs(150) =>
                {
                    drop(g);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(log) => panic!(
                    "gateway not ready on admin port {}; its log:\n{log}",
                    p.admin
                ),
            }
        }
    }

    fn spawn(bin: &PathBuf, p: &Ports) -> Gateway {
        let log = std::env::temp_dir().join(format!("edgegate-client-test-{}.log", p.admin));
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .arg("run")
            .env("EDGEGATE_WS__LISTEN", format!("127.0.0.1:{}", p.ws))
            .env("EDGEGATE_TCP__LISTEN", format!("127.0.0.1:{}", p.tcp))
            .env("EDGEGATE_ADMIN__LISTEN", format!("127.0.0.1:{}", p.admin))
            .env("EDGEGATE_SHARDS__COUNT", "1")
            .env("EDGEGATE_LIMITS__RETRY_MS", "300")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn gateway");
        Gateway {
            child: Some(child),
            log,
        }
    }

    /// Ok once /readyz answers 200; Err(log) when the process exited or 15 s passed.
    fn wait_ready(&self, admin: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if http_status(admin, "/readyz") == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
            if std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains("cannot listen")) {
                break;
            }
        }
        Err(std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn next(client: &mut Client, what: &str) -> Event {
    match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("event stream ended waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Waits for an event matching `pred`, skipping others (returns the skipped ones).
async fn wait_for(client: &mut Client, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    loop {
        let e = next(client, what).await;
        if pred(&e) {
            return e;
        }
    }
}

fn config(p: &Ports, transport: Transport, encoding: Encoding, user: &str) -> ClientConfig {
    let port = if matches!(transport, Transport::Ws | Transport::Sse) {
        p.ws
    } else {
        p.tcp
    };
    let mut c = ClientConfig::new(format!("127.0.0.1:{port}"), transport, user);
    c.encoding = encoding;
    c.backoff = Backoff {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(400),
        max_attempts: None,
    };
    c.seed = Some(7);
    c.connect_timeout = Duration::from_secs(3);
    c
}

async fn publish_and_expect(
    p: &Ports,
    transport: Transport,
    encoding: Encoding,
    client: &mut Client,
    room: &str,
    text: &str,
) {
    let mut other = Connection::connect(&config(p, transport, encoding, "bob"))
        .await
        .expect("publisher connects");
    let body = format!("{{\"text\":\"{text}\"}}");
    other
        .publish(room, Payload::Json(body.clone().into()))
        .await
        .unwrap();
    let e = wait_for(client, "msg", |e| {
        matches!(e, Event::Message(env) if env.t == Type::Msg && env.ch.as_deref() == Some(room))
    })
    .await;
    let Event::Message(env) = e else {
        unreachable!()
    };
    assert_eq!(env.from.as_deref(), Some("bob"));
    match &env.payload {
        Payload::Json(b) => assert_eq!(&b[..], body.as_bytes()),
        other => panic!("payload {other:?}"),
    }
    other.close().await.unwrap();
}

const KINDS: [(Transport, Encoding, &str); 4] = [
    (Transport::Ws, Encoding::Json, "alice"),
    (Transport::Ws, Encoding::Binary, "carol"),
    (Transport::Tcp, Encoding::Binary, "dave"),
    (Transport::Sse, Encoding::Json, "erin"),
];

/// One gateway, four reconnecting clients (ws/json, ws/bin, tcp, sse): kill -9,
/// restart on the same ports, all reconnect and re-subscribe; then SIGTERM,
/// all get bye 1001 and wait at least its retry_ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_and_resubscribe_after_restart() {
    let Some(bin) = gateway_bin() else {
        eprintln!("SKIPPED: target/debug/edgegate not built (run `cargo build -p edgegate` first)");
        return;
    };
    let ports = Ports {
        ws: free_tcp_port(),
        tcp: free_tcp_port(),
        admin: free_tcp_port(),
    };
    let mut gw = tokio::task::block_in_place(|| Gateway::start(&bin, &ports));
    let room = "room:reconnect";
    let mut clients = Vec::new();
    for (t, e, user) in KINDS {
        let mut client = Client::start(config(&ports, t, e, user));
        client.subscribe(room);
        let first = next(&mut client, "connected").await;
        assert!(
            matches!(&first, Event::Connected(w) if w.user == user),
            "{first:?}"
        );
        let sub = wait_for(&mut client, "subscribed", |e| {
            matches!(e, Event::Subscribed(_))
        })
        .await;
        assert_eq!(sub, Event::Subscribed(room.to_string()));
        publish_and_expect(&ports, t, e, &mut client, room, "before").await;
        clients.push(client);
    }

    // Kill -9: no bye; the clients see a transport failure and retry with backoff.
    let old_pid = gw.pid();
    gw.kill();
    for client in &mut clients {
        let d = wait_for(client, "disconnected", |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .await;
        let Event::Disconnected { code, retry_in, .. } = d else {
            unreachable!()
        };
        assert_eq!(code, None, "SIGKILL sends no bye");
        assert!(retry_in.unwrap() <= Duration::from_millis(400));
    }

    // Restart on the same ports; every client reconnects and re-subscribes.
    let mut gw = tokio::task::block_in_place(|| Gateway::start(&bin, &ports));
    assert_ne!(gw.pid(), old_pid);
    for ((t, e, _), client) in KINDS.into_iter().zip(&mut clients) {
        wait_for(client, "reconnected", |e| matches!(e, Event::Connected(_))).await;
        let sub = wait_for(client, "re-subscribed", |e| {
            matches!(e, Event::Subscribed(_))
        })
        .await;
        assert_eq!(sub, Event::Subscribed(room.to_string()));
        publish_and_expect(&ports, t, e, client, room, "after").await;
    }

    // SIGTERM: bye 1001 with retry_ms; each client waits at least retry_ms.
    let code = tokio::task::block_in_place(|| gw.terminate());
    assert_eq!(code, Some(0), "gateway exits 0 on SIGTERM");
    for client in &mut clients {
        let d = wait_for(client, "drain bye", |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .await;
        let Event::Disconnected {
            code,
            retry_ms,
            retry_in,
            ..
        } = d
        else {
            unreachable!()
        };
        assert_eq!(code, Some(1001));
        let retry_ms = retry_ms.expect("bye 1001 carries retry_ms");
        assert!(retry_in.unwrap() >= Duration::from_millis(retry_ms));
        client.close();
        let s = wait_for(client, "stopped", |e| matches!(e, Event::Stopped(_))).await;
        assert_eq!(s, Event::Stopped(StopReason::Closed));
    }
}

/// An invalid user id is refused with bye 4001: the refresh hook runs before
/// each retry, and max_attempts ends it.
#[tokio::test]
async fn unauthorized_calls_refresh_hook_then_gives_up() {
    let Some(bin) = gateway_bin() else {
        eprintln!("SKIPPED: target/debug/edgegate not built (run `cargo build -p edgegate` first)");
        return;
    };
    let ports = Ports {
        ws: free_tcp_port(),
        tcp: free_tcp_port(),
        admin: free_tcp_port(),
    };
    let _gw = Gateway::start(&bin, &ports);
    let mut cfg = config(&ports, Transport::Ws, Encoding::Json, "not a valid id!");
    cfg.backoff.max_attempts = Some(2);
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c2 = calls.clone();
    let hook: TokenRefresh = std::sync::Arc::new(move |code| {
        assert_eq!(code, 4001);
        c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Some("new-token".to_string()) })
    });
    let mut client = Client::start_with(cfg, Some(hook));
    let mut codes = Vec::new();
    loop {
        match next(&mut client, "events").await {
            Event::Disconnected { code, .. } => codes.push(code),
            Event::Stopped(r) => {
                assert_eq!(r, StopReason::GaveUp { attempts: 2 });
                break;
            }
            Event::Connected(w) => panic!("should not connect: {w:?}"),
            _ => {}
        }
    }
    assert_eq!(codes, vec![Some(4001); 3]);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}
