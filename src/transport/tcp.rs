//! Raw TCP: the `EG1\n` preface, then u32 big-endian length + binary
//! envelope, both ways.
//!
//! Reads go into the shard's scratch buffer; only a frame split across
//! reads is copied into a per-connection buffer, which is freed as soon as
//! the frame completes. An idle connection holds no buffer at all.

use std::task::{Context, Poll, ready};

use edgegate_proto::{Envelope, binary, frame};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use super::{RxCarry, TxBuf, Wire, WireError, poll_read_scratch};
use crate::shard::Shard;

/// A TCP connection after accept, over a plain socket (`S` = glommio's
/// `TcpStream`) or TLS ([`crate::tls::TlsStream`]).
pub struct TcpWire<S = TcpStream> {
    stream: S,
    /// Preface bytes matched so far (4 = done).
    preface: u8,
    /// A partial frame carried over between reads (empty when idle).
    rx: RxCarry,
    /// Bytes not yet written.
    tx: TxBuf,
    max_frame: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TcpWire<S> {
    /// Wraps an accepted stream.
    pub fn new(stream: S, max_frame: usize) -> Self {
        TcpWire {
            stream,
            preface: 0,
            rx: RxCarry::default(),
            tx: TxBuf::default(),
            max_frame: u32::try_from(max_frame).unwrap_or(u32::MAX),
        }
    }

    /// Consumes the preface and whole frames from `data`; returns how many
    /// bytes were used.
    fn parse(
        preface: &mut u8,
        max_frame: u32,
        data: &[u8],
        inbox: &mut Vec<Envelope>,
    ) -> Result<usize, WireError> {
        let mut pos = 0;
        while *preface < 4 {
            let Some(&b) = data.get(pos) else {
                return Ok(pos);
            };
            if b != frame::PREFACE[*preface as usize] {
                return Err(WireError::Protocol(
                    if data.starts_with(b"GET ") || data.starts_with(b"POST") {
                        "this is the edgegate TCP port, not HTTP: send the EG1 preface".into()
                    } else {
                        "bad preface: expected EG1\\n".into()
                    },
                ));
            }
            *preface += 1;
            pos += 1;
        }
        Ok(pos + parse_frames(max_frame, &data[pos..], inbox)?)
    }

    async fn flush_all(&mut self) -> Result<(), WireError> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }
}

/// Consumes whole u32-framed binary envelopes from `data` (TCP after the
/// preface, and QUIC's session stream); returns how many bytes were used. A
/// length over `max_frame` is refused as soon as it is read.
pub fn parse_frames(
    max_frame: u32,
    data: &[u8],
    inbox: &mut Vec<Envelope>,
) -> Result<usize, WireError> {
    let mut pos = 0;
    loop {
        match frame::peek_frame(&data[pos..], max_frame) {
            Ok(Some(len)) => {
                let body = &data[pos + frame::LEN_BYTES..pos + frame::LEN_BYTES + len];
                inbox.push(binary::decode(body)?);
                pos += frame::LEN_BYTES + len;
            }
            Ok(None) => return Ok(pos),
            Err(_) => return Err(WireError::TooLarge),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for TcpWire<S> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        shard: &Shard,
        inbox: &mut Vec<Envelope>,
    ) -> Poll<Result<(), WireError>> {
        let (mut scratch, n) = ready!(poll_read_scratch(&mut self.stream, cx, shard))?;
        let (preface, max) = (&mut self.preface, self.max_frame);
        self.rx
            .feed(&mut scratch[..n], |d| Self::parse(preface, max, d, inbox))?;
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        self.tx.poll_flush_to(&mut self.stream, cx)
    }

    fn send(&mut self, batch: Vec<u8>) -> Result<(), WireError> {
        self.tx.push(batch);
        Ok(())
    }

    fn send_ping(&mut self) -> Result<bool, WireError> {
        Ok(false)
    }

    async fn close(&mut self, last: Vec<u8>, _code: edgegate_proto::CloseCode, _reason: &str) {
        let _ = self.send(last);
        if self.flush_all().await.is_err() {
            return;
        }
        super::fin_and_linger(&mut self.stream).await;
    }

    async fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(envs: &[Envelope]) -> Vec<u8> {
        let mut v = frame::PREFACE.to_vec();
        for e in envs {
            frame::encode_frame(e, &mut v);
        }
        v
    }

    #[test]
    fn parses_preface_and_frames_across_any_split() {
        let envs = vec![Envelope::ping(Some(1)), Envelope::pong(Some(2))];
        let bytes = frames(&envs);
        for split in 0..bytes.len() {
            let mut preface = 0;
            let mut inbox = Vec::new();
            let used = TcpWire::<TcpStream>::parse(&mut preface, 1024, &bytes[..split], &mut inbox)
                .unwrap();
            let mut rest = bytes[used..split].to_vec();
            rest.extend_from_slice(&bytes[split..]);
            let used2 = TcpWire::<TcpStream>::parse(&mut preface, 1024, &rest, &mut inbox).unwrap();
            assert_eq!(used2, rest.len());
            assert_eq!(inbox, envs, "split at {split}");
        }
    }

    #[test]
    fn refuses_http_and_bad_preface_and_big_frames() {
        let mut inbox = Vec::new();
        let mut p = 0;
        let e = TcpWire::<TcpStream>::parse(&mut p, 1024, b"GET / HTTP/1.1\r\n", &mut inbox)
            .unwrap_err();
        assert!(matches!(e, WireError::Protocol(r) if r.contains("HTTP")));
        let mut p = 0;
        assert!(matches!(
            TcpWire::<TcpStream>::parse(&mut p, 1024, b"EG2\n", &mut inbox),
            Err(WireError::Protocol(_))
        ));
        let mut p = 0;
        let mut big = frame::PREFACE.to_vec();
        big.extend_from_slice(&5000u32.to_be_bytes());
        assert!(matches!(
            TcpWire::<TcpStream>::parse(&mut p, 1024, &big, &mut inbox),
            Err(WireError::TooLarge)
        ));
    }
}
