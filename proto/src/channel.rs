//! Channel names (docs/protocol.md §3): `user:<id>`, `room:<id>`, `svc:<name>`,
//! where the id or name matches `[A-Za-z0-9_-]{1,128}`.
//!
//! Who may subscribe or publish where is the session's business; this module
//! only says whether a name is well formed, and maps it to its backbone
//! subject.

use std::fmt;

/// Longest id (or service name) in a channel.
pub const MAX_ID_LEN: usize = 128;

/// A parsed channel name, borrowing the id from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel<'a> {
    /// `user:<id>`: that user's direct channel.
    User(&'a str),
    /// `room:<id>`: a room.
    Room(&'a str),
    /// `svc:<name>`: a core service, reachable by `req` only.
    Svc(&'a str),
}

impl<'a> Channel<'a> {
    /// The part after the prefix.
    pub fn id(&self) -> &'a str {
        match *self {
            Channel::User(id) | Channel::Room(id) | Channel::Svc(id) => id,
        }
    }

    /// The prefix without the colon: `"user"`, `"room"` or `"svc"`.
    pub fn prefix(&self) -> &'static str {
        match self {
            Channel::User(_) => "user",
            Channel::Room(_) => "room",
            Channel::Svc(_) => "svc",
        }
    }

    /// The backbone subject for this channel under `subject_prefix`
    /// (docs/protocol.md, "Backbone subjects"): `P.user.<id>`, `P.room.<id>`, `P.svc.<name>`.
    /// Ids never contain `.`, `*`, `>` or spaces, so the result is a valid
    /// NATS subject.
    pub fn subject(&self, subject_prefix: &str) -> String {
        format!("{subject_prefix}.{}.{}", self.prefix(), self.id())
    }
}

impl fmt::Display for Channel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.prefix(), self.id())
    }
}

/// Why a channel name is refused (answered with `err` `bad_channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadChannel {
    /// No `:` in the name.
    NoPrefix,
    /// A prefix other than `user`, `room`, `svc`.
    UnknownPrefix,
    /// Nothing after the `:`.
    EmptyId,
    /// The id is longer than 128 bytes.
    IdTooLong,
    /// The id has a character outside `[A-Za-z0-9_-]`.
    BadChar,
}

impl fmt::Display for BadChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadChannel::NoPrefix => "channel has no prefix",
            BadChannel::UnknownPrefix => "unknown channel prefix",
            BadChannel::EmptyId => "empty channel id",
            BadChannel::IdTooLong => "channel id longer than 128",
            BadChannel::BadChar => "channel id has characters outside [A-Za-z0-9_-]",
        })
    }
}

impl std::error::Error for BadChannel {}

/// Parses a channel name.
///
/// # Errors
/// [`BadChannel`] says what is wrong; the prefix is checked before the id.
pub fn parse(ch: &str) -> Result<Channel<'_>, BadChannel> {
    let (prefix, id) = ch.split_once(':').ok_or(BadChannel::NoPrefix)?;
    let make = match prefix {
        "user" => Channel::User,
        "room" => Channel::Room,
        "svc" => Channel::Svc,
        _ => return Err(BadChannel::UnknownPrefix),
    };
    check_id(id)?;
    Ok(make(id))
}

fn check_id(id: &str) -> Result<(), BadChannel> {
    if id.is_empty() {
        return Err(BadChannel::EmptyId);
    }
    if id.len() > MAX_ID_LEN {
        return Err(BadChannel::IdTooLong);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(BadChannel::BadChar);
    }
    Ok(())
}

/// True when `id` matches `[A-Za-z0-9_-]{1,128}` (a user id, room id or
/// service name).
pub fn valid_id(id: &str) -> bool {
    check_id(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names() {
        assert_eq!(parse("user:alice"), Ok(Channel::User("alice")));
        assert_eq!(parse("room:lobby"), Ok(Channel::Room("lobby")));
        assert_eq!(parse("svc:echo"), Ok(Channel::Svc("echo")));
        assert_eq!(parse("room:A-z_09"), Ok(Channel::Room("A-z_09")));
        assert_eq!(parse("room:-"), Ok(Channel::Room("-")));
        let max = "a".repeat(128);
        assert_eq!(parse(&format!("room:{max}")), Ok(Channel::Room(&max)));
    }

    #[test]
    fn bad_names() {
        assert_eq!(parse("lobby"), Err(BadChannel::NoPrefix));
        assert_eq!(parse(""), Err(BadChannel::NoPrefix));
        assert_eq!(parse("foo:x"), Err(BadChannel::UnknownPrefix));
        assert_eq!(parse("Room:x"), Err(BadChannel::UnknownPrefix));
        assert_eq!(parse(":x"), Err(BadChannel::UnknownPrefix));
        assert_eq!(parse(" room:x"), Err(BadChannel::UnknownPrefix));
        assert_eq!(parse("room:"), Err(BadChannel::EmptyId));
        assert_eq!(parse("user:"), Err(BadChannel::EmptyId));
        assert_eq!(parse("svc:"), Err(BadChannel::EmptyId));
        let long = "a".repeat(129);
        assert_eq!(parse(&format!("room:{long}")), Err(BadChannel::IdTooLong));
        for bad in [
            "room:a:b", "room:a.b", "room:a b", "room:a*", "room:>", "room:é", "room:a\n",
            "user:a/b",
        ] {
            assert_eq!(parse(bad), Err(BadChannel::BadChar), "{bad:?}");
        }
        // 128 bytes but multibyte characters: refused for the characters
        assert_eq!(
            parse(&format!("room:{}", "é".repeat(64))),
            Err(BadChannel::BadChar)
        );
        for e in [
            BadChannel::NoPrefix,
            BadChannel::UnknownPrefix,
            BadChannel::EmptyId,
            BadChannel::IdTooLong,
            BadChannel::BadChar,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn valid_ids() {
        assert!(valid_id("alice"));
        assert!(valid_id("a"));
        assert!(valid_id(&"Z".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"Z".repeat(129)));
        assert!(!valid_id("a.b"));
        assert!(!valid_id("a:b"));
        // every single ASCII byte
        for b in 0u8..128 {
            let s = (b as char).to_string();
            let want = b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
            assert_eq!(valid_id(&s), want, "{b}");
        }
    }

    #[test]
    fn accessors() {
        let c = parse("room:lobby").unwrap();
        assert_eq!(c.id(), "lobby");
        assert_eq!(c.prefix(), "room");
        assert_eq!(c.to_string(), "room:lobby");
        assert_eq!(c.subject("eg"), "eg.room.lobby");
        assert_eq!(parse("user:u1").unwrap().subject("x.y"), "x.y.user.u1");
        assert_eq!(parse("svc:echo").unwrap().subject("eg"), "eg.svc.echo");
    }
}
