//! WebSocket (RFC 6455) through tungstenite, on glommio's `TcpStream`.
//!
//! tungstenite's buffers are sized for an idle-heavy workload: a small read
//! buffer (a frame larger than it is read in several calls) and no write
//! buffering beyond the message in flight, instead of the 128 KiB each that
//! tungstenite defaults to. The same adapter serves the conformance echo
//! endpoint, so Autobahn tests the code that carries real traffic.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use edgegate_proto::{Envelope, binary, frame, json};
use futures_util::{Sink, SinkExt, StreamExt};
use glommio::net::TcpStream;
use tungstenite::Message;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::{LINGER, Wire, WireError};
use crate::conn::Framing;
use crate::shard::ShardConfig;

/// Subprotocol for JSON envelopes.
pub const SUBPROTOCOL_JSON: &str = "edgegate.v1.json";
/// Subprotocol for binary envelopes.
pub const SUBPROTOCOL_BIN: &str = "edgegate.v1.bin";
/// tungstenite's read buffer per connection (its default is 128 KiB).
pub const READ_BUFFER: usize = 256;
/// Largest message the echo endpoint takes (Autobahn sends up to 16 MiB).
const ECHO_MAX: usize = 16 << 20;

/// What the upgrade request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The edgegate protocol, in this framing.
    Session(Framing),
    /// The conformance echo endpoint.
    Echo,
}

fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message.saturating_mul(2).max(super::BATCH_BYTES * 4))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Performs the upgrade: checks the path, negotiates the subprotocol.
pub async fn accept(
    stream: TcpStream,
    cfg: &ShardConfig,
) -> Result<(WebSocketStream<TcpStream>, Route), tungstenite::Error> {
    let route = Rc::new(Cell::new(None));
    let chosen = route.clone();
    let ws_path = cfg.ws_path.clone();
    let echo_path = cfg.echo_path.clone();
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let path = req.uri().path();
        if echo_path.as_deref() == Some(path) {
            chosen.set(Some(Route::Echo));
            return Ok(resp);
        }
        if path != ws_path {
            let mut e = ErrorResponse::new(Some(format!("no WebSocket endpoint at {path}\n")));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        // The first of our subprotocols the client offers; none: JSON, unnamed.
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| *p == SUBPROTOCOL_JSON || *p == SUBPROTOCOL_BIN);
        let framing = match offered {
            Some(p) => {
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_static(if p == SUBPROTOCOL_BIN {
                        SUBPROTOCOL_BIN
                    } else {
                        SUBPROTOCOL_JSON
                    }),
                );
                if p == SUBPROTOCOL_BIN {
                    Framing::WsBinary
                } else {
                    Framing::WsJson
                }
            }
            None => Framing::WsJson,
        };
        chosen.set(Some(Route::Session(framing)));
        Ok(resp)
    };
    // The echo endpoint needs Autobahn's large messages; sessions get max_frame.
    let max = if cfg.echo_path.is_some() {
        cfg.max_frame.max(ECHO_MAX)
    } else {
        cfg.max_frame
    };
    let ws =
        async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config(max)))
            .await?;
    let route = route.get().unwrap_or(Route::Session(Framing::WsJson));
    Ok((ws, route))
}

/// A WebSocket session connection.
pub struct WsWire {
    ws: WebSocketStream<TcpStream>,
    json: bool,
    max_frame: usize,
}

impl WsWire {
    /// Wraps an upgraded stream.
    pub fn new(ws: WebSocketStream<TcpStream>, framing: Framing, max_frame: usize) -> Self {
        WsWire {
            ws,
            json: framing == Framing::WsJson,
            max_frame,
        }
    }
}

fn ws_error(e: tungstenite::Error) -> WireError {
    use tungstenite::Error as E;
    match e {
        E::ConnectionClosed | E::AlreadyClosed => WireError::Closed,
        E::Io(e) => WireError::from(e),
        E::Capacity(_) => WireError::TooLarge,
        E::Utf8(_) => WireError::Protocol("text message is not valid UTF-8".into()),
        E::Protocol(p) => WireError::Protocol(format!("WebSocket protocol error: {p}")),
        other => WireError::Protocol(other.to_string()),
    }
}

impl Wire for WsWire {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &crate::shard::Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>> {
        let msg = match ready!(self.ws.poll_next_unpin(cx)) {
            None => return Poll::Ready(Err(WireError::Closed)),
            Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            Some(Ok(m)) => m,
        };
        let add = |n: usize| {
            shard
                .metrics
                .bytes_in
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed)
        };
        match msg {
            Message::Text(t) => {
                add(t.len());
                if t.len() > self.max_frame {
                    return Poll::Ready(Err(WireError::TooLarge));
                }
                for env in json::decode_batch(t.as_bytes()) {
                    match env {
                        Ok(env) => inbox.push(env),
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                }
            }
            Message::Binary(b) => {
                add(b.len());
                if b.len() > self.max_frame {
                    return Poll::Ready(Err(WireError::TooLarge));
                }
                for part in frame::split_ws_binary(&b) {
                    match part.and_then(binary::decode) {
                        Ok(env) => inbox.push(env),
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                }
            }
            // tungstenite answers pings itself; any frame is a sign of life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Close(_) => return Poll::Ready(Err(WireError::Closed)),
        }
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_error)
    }

    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError> {
        let msg = if self.json {
            Message::Text(
                tungstenite::Utf8Bytes::try_from(batch)
                    .map_err(|_| WireError::Protocol("internal: JSON batch not UTF-8".into()))?,
            )
        } else {
            Message::Binary(Bytes::from(batch))
        };
        Pin::new(&mut self.ws).start_send(msg).map_err(ws_error)
    }

    fn send_ping(&mut self) -> Result<bool, WireError> {
        Pin::new(&mut self.ws)
            .start_send(Message::Ping(Bytes::new()))
            .map_err(ws_error)?;
        Ok(true)
    }

    async fn close(&mut self, last: Vec<u8>, code: u16, reason: &str) {
        if self.send(last).is_err() {
            return;
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.chars().take(120).collect::<String>().into(),
        };
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Wait briefly for the client's close reply, then drop the socket.
        let _ = glommio::timer::timeout(LINGER, async {
            while let Some(Ok(_)) = self.ws.next().await {}
            Ok(())
        })
        .await;
    }

    async fn finish(&mut self) {
        // Flush the close reply tungstenite queued on the peer's close frame.
        let _ = self.ws.flush().await;
    }
}

/// The conformance endpoint: echoes every data message back, unchanged.
pub async fn echo(mut ws: WebSocketStream<TcpStream>) {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(m).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
