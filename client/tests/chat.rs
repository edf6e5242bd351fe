//! The client library's chat features (docs/protocol.md §8) against the
//! real gateway: the own stream's position from the first `welcome` (no
//! recovery asked), presence subscriptions with `Present` and `Members`,
//! presence queries, ephemeral publishes, history pages.

use std::time::Duration;

use edgegate_client::{
    Client, ClientConfig, Encoding, Event, HistoryPage, Payload, PresencePage, Transport, Type,
};

mod common;
use common::{next, start_gateway_with};

fn client(tcp: u16, user: &str) -> Client {
    let mut cfg = ClientConfig::new(format!("127.0.0.1:{tcp}"), Transport::Tcp, user);
    cfg.encoding = Encoding::Binary;
    cfg.seed = Some(7);
    Client::start(cfg)
}

/// The `reply` to request `id`.
async fn reply(c: &mut Client, id: u64) -> edgegate_client::Envelope {
    match next(
        c,
        "a reply",
        |e| matches!(e, Event::Message(m) if m.t == Type::Reply && m.id == Some(id)),
    )
    .await
    {
        Event::Message(m) => m,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn presence_ephemeral_and_history_pages() {
    let Some(gw) = start_gateway_with(&[("EDGEGATE_PRESENCE__FLUSH_MS", "100")]) else {
        eprintln!("skipped: the gateway binary is not built");
        return;
    };
    let suffix = fastrand::u32(..);
    let room = format!("room:c{suffix}");
    let (an, bn) = (format!("ann{suffix}"), format!("ben{suffix}"));

    let mut a = client(gw.tcp, &an);
    let w = match next(&mut a, "welcome", |e| matches!(e, Event::Connected(_))).await {
        Event::Connected(w) => w,
        _ => unreachable!(),
    };
    let st = w
        .stream
        .expect("every welcome carries the stream's position");
    assert_eq!((st.seq, st.recovered), (0, None), "no recovery was asked");
    assert!(!st.epoch.is_empty());

    a.subscribe_presence(&room);
    let present = next(&mut a, "the present count", |e| {
        matches!(e, Event::Present { .. })
    })
    .await;
    assert_eq!(
        present,
        Event::Present {
            ch: room.clone(),
            present: 1
        }
    );

    let mut b = client(gw.tcp, &bn);
    b.subscribe(&room);
    next(&mut b, "subscribed", |e| matches!(e, Event::Subscribed(_))).await;
    let m = next(&mut a, "members", |e| matches!(e, Event::Members { .. })).await;
    assert_eq!(
        m,
        Event::Members {
            ch: room.clone(),
            present: 2,
            join: Some(vec![bn.clone()]),
            leave: Some(vec![])
        }
    );
    let id = b.handle().query_presence(&room, Some(1), None);
    let p1 = PresencePage::parse(&reply(&mut b, id).await).expect("a presence page");
    assert_eq!((p1.total, p1.users.len()), (2, 1));
    let id = b.handle().query_presence(&room, None, p1.next.as_deref());
    let p2 = PresencePage::parse(&reply(&mut b, id).await).expect("a presence page");
    let mut all = [p1.users, p2.users].concat();
    all.sort();
    let mut want = vec![an.clone(), bn.clone()];
    want.sort();
    assert_eq!(all, want);
    assert_eq!(p2.next, None);

    // Ephemeral: delivered without a seq, never stored.
    b.handle()
        .publish_ephemeral(&room, Payload::Json(r#"{"typing":true}"#.into()));
    let e = next(
        &mut a,
        "the ephemeral message",
        |e| matches!(e, Event::Message(m) if m.t == Type::Msg),
    )
    .await;
    let Event::Message(e) = e else { unreachable!() };
    assert_eq!(
        (e.seq, e.meta.as_deref()),
        (None, Some(r#"{"ephemeral":true}"#))
    );
    for i in 0..5 {
        b.publish(&room, Payload::Json(format!(r#"{{"n":{i}}}"#).into()));
    }
    for _ in 0..5 {
        next(
            &mut a,
            "a stored message",
            |e| matches!(e, Event::Message(m) if m.t == Type::Msg && m.seq.is_some()),
        )
        .await;
    }
    let id = a.handle().history(&room, Some(3), None);
    let h = HistoryPage::parse(&reply(&mut a, id).await).expect("a history page");
    assert_eq!(h.top, 5, "the ephemeral message took no seq");
    assert!(h.more);
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(h.messages[0].d, Some(serde_json::json!({"n": 2})));
    assert_eq!(h.messages[0].from.as_deref(), Some(bn.as_str()));
    let id = a.handle().history(&room, None, Some(3));
    let h = HistoryPage::parse(&reply(&mut a, id).await).expect("a history page");
    assert_eq!((h.messages.len(), h.more), (2, false));

    // Ben leaves: Ann sees it.
    b.close();
    let m = next(
        &mut a,
        "a leave",
        |e| matches!(e, Event::Members { leave: Some(l), .. } if !l.is_empty()),
    )
    .await;
    assert_eq!(
        m,
        Event::Members {
            ch: room.clone(),
            present: 1,
            join: Some(vec![]),
            leave: Some(vec![bn.clone()])
        }
    );
    a.close();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
