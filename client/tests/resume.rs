//! The client library resumes (docs/protocol.md §7) against the real
//! gateway, through a TCP proxy the test can cut: after a network cut it
//! re-subscribes with `since` and gets exactly what it missed, recovers its
//! direct messages through `hello.meta.since`, resends a publish whose `ok`
//! was lost (stored once), and reports `Unrecovered` when it comes back to a
//! gateway that does not have its streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering::SeqCst};
use std::time::Duration;

use edgegate_client::{
    Backoff, Client, ClientConfig, Connection, Encoding, Event, Payload, Transport, Type,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod common;
use common::{next, start_gateway};

/// A TCP proxy: `cut()` closes every connection it carries; `mute` drops
/// what the server sends; `upstream` says where new connections go.
struct Proxy {
    port: u16,
    upstream: Arc<AtomicU16>,
    mute: Arc<AtomicBool>,
    /// While set, new connections are closed at once (the network is down).
    down: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = l.local_addr().expect("addr").port();
        let up = Arc::new(AtomicU16::new(upstream));
        let mute = Arc::new(AtomicBool::new(false));
        let net_down = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let (u, m, c, nd) = (up.clone(), mute.clone(), cut.clone(), net_down.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                if nd.load(SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(upc) = TcpStream::connect(("127.0.0.1", u.load(SeqCst))).await else {
                    continue;
                };
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = upc.into_split();
                let mut stop1 = c.subscribe();
                let mut stop2 = c.subscribe();
                let mute = m.clone();
                tokio::spawn(async move {
                    let mut b = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            _ = stop1.changed() => break,
                            n = dr.read(&mut b) => match n {
                                Ok(0) | Err(_) => break,
                                Ok(n) => if uw.write_all(&b[..n]).await.is_err() { break },
                            },
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut b = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            _ = stop2.changed() => break,
                            n = ur.read(&mut b) => match n {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if mute.load(SeqCst) {
                                        continue;
                                    }
                                    if dw.write_all(&b[..n]).await.is_err() { break }
                                }
                            },
                        }
                    }
                });
            }
        });
        Proxy {
            port,
            upstream: up,
            mute,
            down: net_down,
            cut,
        }
    }

    /// Closes every connection through the proxy (a network cut).
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// The next `msg` on `ch`: (seq, payload text).
async fn msg(c: &mut Client, ch: &str) -> (u64, String) {
    let ch2 = ch.to_string();
    match next(c, &format!("msg on {ch}"), move |e| {
        matches!(e, Event::Message(m) if m.t == Type::Msg && m.ch.as_deref() == Some(&ch2))
    })
    .await
    {
        Event::Message(m) => (
            m.seq.unwrap_or(0),
            String::from_utf8_lossy(m.payload.bytes()).into_owned(),
        ),
        _ => unreachable!(),
    }
}

async fn publisher(tcp: u16, user: &str) -> Connection {
    let mut cfg = ClientConfig::new(format!("127.0.0.1:{tcp}"), Transport::Tcp, user);
    cfg.encoding = Encoding::Binary;
    Connection::connect(&cfg).await.expect("publisher connects")
}

async fn pub_ok(c: &mut Connection, ch: &str, text: &str) -> u64 {
    let id = c
        .publish(ch, Payload::Json(format!("\"{text}\"").into()))
        .await
        .expect("publish");
    let wait = async {
        loop {
            let e = c.recv().await.expect("publisher recv");
            if e.t == Type::Ok && e.id == Some(id) {
                return e.seq.expect("ok carries seq");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("ok to pub")
}

#[tokio::test]
async fn client_resumes_across_network_cuts_and_reports_what_it_cannot() {
    let Some(gw) = start_gateway() else {
        eprintln!("SKIP: target/debug/edgegate not built");
        return;
    };
    let proxy = Proxy::start(gw.tcp).await;
    let mut cfg = ClientConfig::new(format!("127.0.0.1:{}", proxy.port), Transport::Tcp, "rita");
    cfg.encoding = Encoding::Binary;
    cfg.backoff = Backoff {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(200),
        max_attempts: None,
    };
    let mut r = Client::start(cfg);
    next(&mut r, "connected", |e| matches!(e, Event::Connected(_))).await;
    r.subscribe("room:resume");
    next(&mut r, "subscribed", |e| matches!(e, Event::Subscribed(_))).await;

    let mut p = publisher(gw.tcp, "paul").await;
    // A watcher in the room sees what the gateway stored.
    let mut w = publisher(gw.tcp, "wanda").await;
    let sid = w.subscribe("room:resume").await.expect("watcher sub");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = w.recv().await.expect("watcher recv");
            if e.t == Type::Ok && e.id == Some(sid) {
                return;
            }
        }
    })
    .await
    .expect("watcher subscribed");
    for i in 1..=3 {
        assert_eq!(pub_ok(&mut p, "room:resume", &format!("m{i}")).await, i);
    }
    for i in 1..=3 {
        assert_eq!(msg(&mut r, "room:resume").await, (i, format!("\"m{i}\"")));
    }
    // A direct message before the cut: the user stream's position.
    pub_ok(&mut p, "user:rita", "dm1").await;
    assert_eq!(msg(&mut r, "user:rita").await.0, 1);

    // Cut 1: what is published while the network is down comes after the
    // reconnect (by recovery), once.
    proxy.down.store(true, SeqCst);
    proxy.cut();
    next(&mut r, "disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    for i in 4..=6 {
        pub_ok(&mut p, "room:resume", &format!("m{i}")).await;
    }
    pub_ok(&mut p, "user:rita", "dm2").await;
    proxy.down.store(false, SeqCst);
    next(&mut r, "reconnected", |e| matches!(e, Event::Connected(_))).await;
    // The missed direct message comes right after welcome (hello.since),
    // the room's after its sub's ok: in any order between the two.
    let (mut room, mut dms) = (Vec::new(), Vec::new());
    while room.len() < 3 || dms.is_empty() {
        match next(
            &mut r,
            "recovered messages",
            |e| matches!(e, Event::Message(m) if m.t == Type::Msg),
        )
        .await
        {
            Event::Message(m) if m.ch.as_deref() == Some("room:resume") => {
                room.push(m.seq.unwrap_or(0))
            }
            Event::Message(m) => dms.push((
                m.seq.unwrap_or(0),
                String::from_utf8_lossy(m.payload.bytes()).into_owned(),
            )),
            _ => unreachable!(),
        }
    }
    assert_eq!(room, vec![4, 5, 6], "exactly what was missed, in order");
    assert_eq!(
        dms,
        vec![(2, "\"dm2\"".to_string())],
        "offline DM via hello.since"
    );

    // Cut 2, with the server's answers lost: the publish reached the
    // gateway, its ok did not reach the client; the client resends it after
    // the reconnect with the same id and instance, and it is stored once.
    proxy.mute.store(true, SeqCst);
    let id = r.publish("room:resume", Payload::Json("\"once\"".into()));
    let seq = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = w.recv().await.expect("watcher recv");
            if e.t == Type::Msg && e.id == Some(id) {
                return e.seq.expect("seq");
            }
        }
    })
    .await
    .expect("the watcher sees the publish that reached the gateway");
    // The network goes down with the ok unread; it comes back later.
    proxy.down.store(true, SeqCst);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.mute.store(false, SeqCst);
    proxy.down.store(false, SeqCst);
    // Collect until the resent publish is answered and the next message
    // arrives: every room message on the way counts.
    let mut seen = Vec::new();
    let mut answered = false;
    let mut after = None;
    let wait = async {
        loop {
            match r.next_event().await {
                Some(Event::Message(m)) if m.t == Type::Ok && m.id == Some(id) => {
                    assert_eq!(m.seq, Some(seq), "the duplicate's ok has the original seq");
                    answered = true;
                    after = Some(pub_ok(&mut p, "room:resume", "after").await);
                }
                Some(Event::Message(m))
                    if m.t == Type::Msg && m.ch.as_deref() == Some("room:resume") =>
                {
                    seen.push(m.seq.unwrap_or(0));
                    if answered && after.is_some_and(|a| seen.contains(&a)) {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!("client stopped"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out: seen {seen:?}"));
    let after = after.expect("published after");
    assert_eq!(after, seq + 1, "the resent publish was not stored twice");
    assert_eq!(
        seen,
        vec![seq, after],
        "the client saw its own message once, then the next"
    );
    assert!(
        r.stats().publishes_resent.load(SeqCst) >= 1,
        "the unanswered publish was sent again"
    );

    // Cut 3, to another gateway process: it has none of these streams, and
    // the client says so instead of pretending.
    let gw2 = start_gateway().expect("second gateway");
    proxy.upstream.store(gw2.tcp, SeqCst);
    proxy.cut();
    let mut unrecovered = Vec::new();
    for _ in 0..2 {
        match next(&mut r, "unrecovered", |e| {
            matches!(e, Event::Unrecovered { .. })
        })
        .await
        {
            Event::Unrecovered { ch, reason, .. } => unrecovered.push((ch, reason)),
            _ => unreachable!(),
        }
    }
    unrecovered.sort();
    assert_eq!(
        unrecovered,
        vec![
            ("room:resume".to_string(), "epoch_changed".to_string()),
            ("user:rita".to_string(), "epoch_changed".to_string()),
        ]
    );
    r.close();
    drop(gw);
}
