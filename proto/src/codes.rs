//! Close codes (`bye`) and error codes (`err`), docs/protocol.md §5.
//!
//! A [`CloseCode`] is an open set: any `u16` can travel in a `bye`, the
//! constants name the ones the protocol fixes. An [`ErrCode`] is a closed
//! set: it is written as its *name* in JSON mode and as its *number* in
//! binary mode.

use std::fmt;

/// The close code of a `bye` envelope (and of the WebSocket close frame or
/// QUIC `CONNECTION_CLOSE` that follows it).
///
/// The protocol fixes the constants below; other values may be received and
/// are reported by [`CloseCode::name`] as `"unknown"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the server is draining or restarting; reconnect after `retry_ms`, jittered.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 4000: the client broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(4000);
    /// 4001: no valid `hello` (bad token, or none within the hello timeout).
    pub const UNAUTHORIZED: CloseCode = CloseCode(4001);
    /// 4002: nothing received for the idle timeout.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4002);
    /// 4003: the client did not read fast enough; its outbound queue overflowed.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4003);
    /// 4004: the client sent too much; reconnect after `retry_ms`.
    pub const RATE_LIMITED: CloseCode = CloseCode(4004);
    /// 4005: a core service kicked the user; do not reconnect.
    pub const KICKED: CloseCode = CloseCode(4005);
    /// 4006: a frame over the connection's `max_frame`.
    pub const FRAME_TOO_LARGE: CloseCode = CloseCode(4006);
    /// 4007: connection or accept limit reached; reconnect after `retry_ms`, jittered.
    pub const OVERLOADED: CloseCode = CloseCode(4007);
    /// 4008: the token expired; refresh it and reconnect.
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4008);
    /// 4009: the gateway found a gap it could not fill on a live
    /// subscription; reconnect at once and re-subscribe with `since`.
    pub const INSUFFICIENT_STATE: CloseCode = CloseCode(4009);

    /// The protocol's name for this code (`"going_away"`, `"kicked"`, …),
    /// or `"unknown"` for a code the protocol does not fix.
    pub const fn name(self) -> &'static str {
        match self.0 {
            1000 => "normal",
            1001 => "going_away",
            4000 => "protocol_error",
            4001 => "unauthorized",
            4002 => "heartbeat_timeout",
            4003 => "slow_consumer",
            4004 => "rate_limited",
            4005 => "kicked",
            4006 => "frame_too_large",
            4007 => "overloaded",
            4008 => "token_expired",
            4009 => "insufficient_state",
            _ => "unknown",
        }
    }

    /// The code as a number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl From<u16> for CloseCode {
    fn from(v: u16) -> Self {
        CloseCode(v)
    }
}

impl From<CloseCode> for u16 {
    fn from(c: CloseCode) -> Self {
        c.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

/// The `code` of an `err` envelope: a name in JSON mode, a number in binary
/// mode (docs/protocol.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum ErrCode {
    /// 1 `bad_request`: malformed or not allowed in this state (e.g. `pub` to `svc:*`).
    BadRequest = 1,
    /// 2 `unauthorized`.
    Unauthorized = 2,
    /// 3 `forbidden`: the user may not use that channel.
    Forbidden = 3,
    /// 4 `bad_channel`: malformed channel, unknown prefix, or `req` outside `svc:*`.
    BadChannel = 4,
    /// 5 `no_service`: nobody answers that `svc:<name>`.
    NoService = 5,
    /// 6 `timeout`: the service did not answer in time.
    Timeout = 6,
    /// 7 `rate_limited`.
    RateLimited = 7,
    /// 8 `too_large`: payload over the limit.
    TooLarge = 8,
    /// 9 `not_subscribed`: `unsub` of a channel not subscribed.
    NotSubscribed = 9,
    /// 10 `backbone_unavailable`: the NATS backbone cannot be reached.
    BackboneUnavailable = 10,
    /// 11 `internal`.
    Internal = 11,
}

impl ErrCode {
    /// Every code, in number order.
    pub const ALL: [ErrCode; 11] = [
        ErrCode::BadRequest,
        ErrCode::Unauthorized,
        ErrCode::Forbidden,
        ErrCode::BadChannel,
        ErrCode::NoService,
        ErrCode::Timeout,
        ErrCode::RateLimited,
        ErrCode::TooLarge,
        ErrCode::NotSubscribed,
        ErrCode::BackboneUnavailable,
        ErrCode::Internal,
    ];

    /// The number written in binary mode.
    pub const fn number(self) -> u32 {
        self as u32
    }

    /// The code with that number, if the protocol defines one.
    pub fn from_number(n: u32) -> Option<Self> {
        Some(match n {
            1 => ErrCode::BadRequest,
            2 => ErrCode::Unauthorized,
            3 => ErrCode::Forbidden,
            4 => ErrCode::BadChannel,
            5 => ErrCode::NoService,
            6 => ErrCode::Timeout,
            7 => ErrCode::RateLimited,
            8 => ErrCode::TooLarge,
            9 => ErrCode::NotSubscribed,
            10 => ErrCode::BackboneUnavailable,
            11 => ErrCode::Internal,
            _ => return None,
        })
    }

    /// The name written in JSON mode (`"bad_channel"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            ErrCode::BadRequest => "bad_request",
            ErrCode::Unauthorized => "unauthorized",
            ErrCode::Forbidden => "forbidden",
            ErrCode::BadChannel => "bad_channel",
            ErrCode::NoService => "no_service",
            ErrCode::Timeout => "timeout",
            ErrCode::RateLimited => "rate_limited",
            ErrCode::TooLarge => "too_large",
            ErrCode::NotSubscribed => "not_subscribed",
            ErrCode::BackboneUnavailable => "backbone_unavailable",
            ErrCode::Internal => "internal",
        }
    }

    /// The code with that name, if the protocol defines one (case-sensitive).
    pub fn from_name(s: &str) -> Option<Self> {
        ErrCode::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for ErrCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_code_table() {
        let table = [
            (1, "bad_request"),
            (2, "unauthorized"),
            (3, "forbidden"),
            (4, "bad_channel"),
            (5, "no_service"),
            (6, "timeout"),
            (7, "rate_limited"),
            (8, "too_large"),
            (9, "not_subscribed"),
            (10, "backbone_unavailable"),
            (11, "internal"),
        ];
        for (n, name) in table {
            let c = ErrCode::from_number(n).expect("defined");
            assert_eq!(c.number(), n);
            assert_eq!(c.name(), name);
            assert_eq!(ErrCode::from_name(name), Some(c));
            assert_eq!(c.to_string(), name);
        }
        assert_eq!(ErrCode::ALL.len(), table.len());
        assert_eq!(ErrCode::from_number(0), None);
        assert_eq!(ErrCode::from_number(12), None);
        assert_eq!(ErrCode::from_number(u32::MAX), None);
        assert_eq!(ErrCode::from_name("BAD_REQUEST"), None);
        assert_eq!(ErrCode::from_name(""), None);
    }

    #[test]
    fn close_code_table() {
        let table = [
            (CloseCode::NORMAL, 1000, "normal"),
            (CloseCode::GOING_AWAY, 1001, "going_away"),
            (CloseCode::PROTOCOL_ERROR, 4000, "protocol_error"),
            (CloseCode::UNAUTHORIZED, 4001, "unauthorized"),
            (CloseCode::HEARTBEAT_TIMEOUT, 4002, "heartbeat_timeout"),
            (CloseCode::SLOW_CONSUMER, 4003, "slow_consumer"),
            (CloseCode::RATE_LIMITED, 4004, "rate_limited"),
            (CloseCode::KICKED, 4005, "kicked"),
            (CloseCode::FRAME_TOO_LARGE, 4006, "frame_too_large"),
            (CloseCode::OVERLOADED, 4007, "overloaded"),
            (CloseCode::TOKEN_EXPIRED, 4008, "token_expired"),
            (CloseCode::INSUFFICIENT_STATE, 4009, "insufficient_state"),
        ];
        for (c, n, name) in table {
            assert_eq!(c.0, n);
            assert_eq!(c.get(), n);
            assert_eq!(c.name(), name);
            assert_eq!(CloseCode::from(n), c);
            assert_eq!(u16::from(c), n);
        }
        assert_eq!(CloseCode(4999).name(), "unknown");
        assert_eq!(CloseCode::KICKED.to_string(), "4005 (kicked)");
    }
}
