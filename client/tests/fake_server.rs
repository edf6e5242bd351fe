//! Client behaviour against a scripted in-process TCP server speaking the
//! protocol's TCP framing (no gateway binary needed): what happens on each
//! close code at the socket level, re-subscription, token refresh, pongs.

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgegate_client::{
    Backoff, Client, ClientConfig, Connection, Encoding, Event, StopReason, TokenRefresh,
    Transport, Type,
};
use edgegate_proto::{Envelope, binary, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    /// (connection number, channel) of every `sub`.
    subs: Vec<(u32, String)>,
    /// hello.meta of each connection.
    hellos: Vec<String>,
    /// Pong ids received.
    pongs: Vec<Option<u64>>,
}

struct Fake {
    addr: String,
    accepted: Arc<AtomicU32>,
    seen: Arc<Mutex<Seen>>,
}

/// Script per connection number: after the first `sub` is answered (or right
/// after `welcome` when `ping_first`), send `bye` with this code and retry_ms, then FIN.
#[derive(Clone, Copy)]
struct Step {
    bye: Option<(u16, Option<u64>)>,
    ping_first: bool,
}

async fn fake(script: Vec<Step>) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (a2, s2) = (accepted.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let n = a2.fetch_add(1, SeqCst);
            let step = script.get(n as usize).copied().unwrap_or(Step {
                bye: None,
                ping_first: false,
            });
            tokio::spawn(serve(sock, n, step, s2.clone()));
        }
    });
    Fake {
        addr,
        accepted,
        seen,
    }
}

async fn write(sock: &mut TcpStream, e: &Envelope) {
    let mut out = Vec::new();
    frame::encode_frame(e, &mut out);
    let _ = sock.write_all(&out).await;
}

async fn serve(mut sock: TcpStream, n: u32, step: Step, seen: Arc<Mutex<Seen>>) {
    let mut pre = [0u8; 4];
    if sock.read_exact(&mut pre).await.is_err() || pre != frame::PREFACE {
        return;
    }
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        while let Ok(Some(len)) = frame::peek_frame(&buf, 1 << 20) {
            let env = binary::decode(&buf[4..4 + len]).unwrap();
            buf.drain(..4 + len);
            match env.t {
                Type::Hello => {
                    seen.lock()
                        .unwrap()
                        .hellos
                        .push(env.meta.clone().unwrap_or_default());
                    let mut w = Envelope::new(Type::Welcome);
                    w.id = env.id;
                    w.meta = Some(format!(
                        r#"{{"conn":"fake-0-{n}","user":"u","node":"fake","shard":0,"hb_ms":25000,"max_frame":65536}}"#
                    ));
                    write(&mut sock, &w).await;
                    if step.ping_first {
                        write(&mut sock, &Envelope::ping(Some(9))).await;
                    }
                }
                Type::Sub => {
                    seen.lock()
                        .unwrap()
                        .subs
                        .push((n, env.ch.clone().unwrap_or_default()));
                    write(&mut sock, &Envelope::ok(env.id)).await;
                    if let Some((code, retry)) = step.bye {
                        write(&mut sock, &Envelope::bye(code, "scripted", retry)).await;
                        let _ = sock.shutdown().await;
                        return;
                    }
                }
                Type::Pong => seen.lock().unwrap().pongs.push(env.id),
                Type::Ping => write(&mut sock, &Envelope::pong(env.id)).await,
                _ => write(&mut sock, &Envelope::ok(env.id)).await,
            }
        }
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(k) => buf.extend_from_slice(&tmp[..k]),
        }
    }
}

fn cfg(f: &Fake) -> ClientConfig {
    let mut c = ClientConfig::new(f.addr.clone(), Transport::Tcp, "u");
    c.encoding = Encoding::Binary;
    c.backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(100),
        max_attempts: Some(20),
    };
    c.seed = Some(1);
    c.connect_timeout = Duration::from_secs(2);
    c
}

async fn next(c: &mut Client) -> Event {
    tokio::time::timeout(Duration::from_secs(5), c.next_event())
        .await
        .expect("event in time")
        .expect("event")
}

fn step(bye: Option<(u16, Option<u64>)>) -> Step {
    Step {
        bye,
        ping_first: false,
    }
}

#[tokio::test]
async fn no_reconnect_after_kick() {
    for code in [4005u16, 4000, 4006] {
        let f = fake(vec![step(Some((code, None)))]).await;
        let mut c = Client::start(cfg(&f));
        c.subscribe("room:a");
        assert!(matches!(next(&mut c).await, Event::Connected(_)));
        assert_eq!(next(&mut c).await, Event::Subscribed("room:a".into()));
        match next(&mut c).await {
            Event::Disconnected {
                code: Some(got),
                retry_in: None,
                ..
            } => assert_eq!(got, code),
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(next(&mut c).await, Event::Stopped(StopReason::Fatal(code)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(f.accepted.load(SeqCst), 1, "{code}: no second connection");
    }
}

#[tokio::test]
async fn going_away_honours_retry_ms_and_resubscribes() {
    let f = fake(vec![step(Some((1001, Some(300))))]).await;
    let mut c = Client::start(cfg(&f));
    c.subscribe("room:a");
    c.subscribe("room:b");
    assert!(matches!(next(&mut c).await, Event::Connected(_)));
    // The scripted bye follows the first sub's ok.
    assert_eq!(next(&mut c).await, Event::Subscribed("room:a".into()));
    let t_bye;
    loop {
        match next(&mut c).await {
            Event::Disconnected {
                code,
                retry_ms,
                retry_in,
                ..
            } => {
                assert_eq!(code, Some(1001));
                assert_eq!(retry_ms, Some(300));
                assert!(retry_in.unwrap() >= Duration::from_millis(300));
                t_bye = Instant::now();
                break;
            }
            Event::Subscribed(_) | Event::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(next(&mut c).await, Event::Connected(_)));
    assert!(
        t_bye.elapsed() >= Duration::from_millis(290),
        "waited retry_ms"
    );
    let mut resubbed = Vec::new();
    while resubbed.len() < 2 {
        if let Event::Subscribed(ch) = next(&mut c).await {
            resubbed.push(ch);
        }
    }
    resubbed.sort();
    assert_eq!(resubbed, ["room:a", "room:b"]);
    let subs = &f.seen.lock().unwrap().subs;
    assert!(subs.contains(&(1, "room:a".into())) && subs.contains(&(1, "room:b".into())));
    assert_eq!(f.accepted.load(SeqCst), 2);
    c.close();
}

#[tokio::test]
async fn token_expired_refreshes_token_before_reconnecting() {
    let f = fake(vec![step(Some((4008, None)))]).await;
    let mut config = cfg(&f);
    config.token = Some("old".into());
    let hook: TokenRefresh = Arc::new(|code| {
        assert_eq!(code, 4008);
        Box::pin(async { Some("fresh".to_string()) })
    });
    let mut c = Client::start_with(config, Some(hook));
    c.subscribe("room:a");
    let mut connected = 0;
    while connected < 2 {
        match next(&mut c).await {
            Event::Connected(_) => connected += 1,
            Event::Disconnected { code, retry_in, .. } => {
                assert_eq!(code, Some(4008));
                assert!(retry_in.is_some());
            }
            _ => {}
        }
    }
    let hellos = &f.seen.lock().unwrap().hellos;
    assert!(hellos[0].contains(r#""token":"old""#), "{hellos:?}");
    assert!(hellos[1].contains(r#""token":"fresh""#), "{hellos:?}");
    c.close();
}

#[tokio::test]
async fn transport_failure_backs_off_and_gives_up() {
    // A port nobody listens on: every attempt is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = ClientConfig::new(format!("127.0.0.1:{port}"), Transport::Tcp, "u");
    config.backoff = Backoff {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(20),
        max_attempts: Some(4),
    };
    config.seed = Some(3);
    let mut c = Client::start(config);
    let mut delays = Vec::new();
    loop {
        match next(&mut c).await {
            Event::Disconnected { code, retry_in, .. } => {
                assert_eq!(code, None);
                delays.push(retry_in);
            }
            Event::Stopped(r) => {
                assert_eq!(r, StopReason::GaveUp { attempts: 4 });
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(delays.len(), 5);
    assert!(
        delays[..4]
            .iter()
            .all(|d| d.unwrap() <= Duration::from_millis(20))
    );
    assert_eq!(delays[4], None);
}

#[tokio::test]
async fn connection_answers_ping_envelopes() {
    let f = fake(vec![Step {
        bye: None,
        ping_first: true,
    }])
    .await;
    let mut conn = Connection::connect(&cfg(&f)).await.unwrap();
    assert_eq!(conn.welcome().conn, "fake-0-0");
    assert_eq!(conn.welcome().hb_ms, 25000);
    let e = conn.recv().await.unwrap();
    assert_eq!(e.t, Type::Ping);
    // The pong goes out on the next recv.
    let id = conn.subscribe("room:x").await.unwrap();
    let ok = tokio::time::timeout(Duration::from_secs(2), conn.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ok.t, ok.id), (Type::Ok, Some(id)));
    let t0 = Instant::now();
    while f.seen.lock().unwrap().pongs.is_empty() && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.seen.lock().unwrap().pongs, vec![Some(9)]);
}

#[tokio::test]
async fn bye_before_welcome_is_a_close_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut pre = [0u8; 4];
        s.read_exact(&mut pre).await.unwrap();
        write(&mut s, &Envelope::bye(4007u16, "overloaded", Some(1234))).await;
        let _ = s.shutdown().await;
    });
    let config = ClientConfig::new(addr, Transport::Tcp, "u");
    let err = Connection::connect(&config).await.unwrap_err();
    let info = err.close_info();
    assert_eq!(info.code, Some(4007));
    assert_eq!(info.retry_ms, Some(1234));
}
