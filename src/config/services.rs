//! The sections for core services (docs/api.md): `[api]`, `[services.<name>]`,
//! `[hooks]` and `[webhooks]`, and their rules.
//!
//! `[services.<name>]` is the one family of tables whose names the operator
//! chooses: the key checks of `config.rs` take their keys from
//! [`Service::default`] for every name (see [`NAMED_SECTIONS`]), so a typo
//! inside one is still an error.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{BackboneKind, Config};

/// Sections whose tables are named by the operator, with the keys every
/// one of them takes.
pub const NAMED_SECTIONS: [&str; 1] = ["services"];

/// Shortest accepted `[api] keys` entry: a bearer key guards publishing to
/// every user.
pub const MIN_API_KEY: usize = 16;

/// Largest `timeout_ms` of a service, a hook or a webhook: a call that
/// takes longer holds a client's request (or a hello) too long.
pub const MAX_CALL_MS: u64 = 60_000;

/// `[api]`: the server API (docs/api.md), `POST /api/<method>` on its own
/// listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Address to listen on; unset (the default) is off.
    pub listen: Option<SocketAddr>,
    /// Bearer keys accepted (`Authorization: Bearer <key>`), each at least
    /// 16 bytes; required when `listen` is set.
    pub keys: Vec<String>,
    /// Largest request body, in bytes (413 past it); 65 536 by default.
    pub max_body_bytes: usize,
    /// API connections open at once; more are closed at accept. 1 024 by
    /// default.
    pub max_connections: usize,
    /// How long a kept-alive connection may stay silent between requests,
    /// 30 000 ms by default.
    pub idle_timeout_ms: u64,
    /// How long a request may take to arrive (head and body) and its
    /// answer to be sent; also how long a call waits for the shards and
    /// the backbone (504 `timeout` past it). 5 000 ms by default.
    pub timeout_ms: u64,
    /// With NATS: how long `disconnect` and `info` gather the answers of
    /// the other nodes, 500 ms by default.
    pub cluster_timeout_ms: u64,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: None,
            keys: Vec::new(),
            max_body_bytes: 65_536,
            max_connections: 1024,
            idle_timeout_ms: 30_000,
            timeout_ms: 5_000,
            cluster_timeout_ms: 500,
        }
    }
}

/// `[services.<name>]`: a core service reached over HTTP; a client's `req`
/// to `svc:<name>` is POSTed to `url`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Service {
    /// `http://host:port/path` (https is not supported).
    pub url: String,
    /// How long a call may take before the client gets `err timeout`,
    /// 5 000 ms by default.
    pub timeout_ms: u64,
}

impl Default for Service {
    fn default() -> Self {
        Service {
            url: String::new(),
            timeout_ms: 5_000,
        }
    }
}

/// Value of `hooks.on_error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// `"deny"`: a hook that fails or does not answer in time refuses.
    #[default]
    Deny,
    /// `"allow"`: it lets the client through.
    Allow,
}

/// `[hooks]`: services the gateway asks before it accepts a connection, a
/// subscription or a publish (docs/api.md, "Hooks").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hooks {
    /// Service asked before `welcome`; unset = none.
    pub connect: Option<String>,
    /// Service asked before a `room:` subscription; unset = none.
    pub subscribe: Option<String>,
    /// Service asked before a client's publish; unset = none.
    pub publish: Option<String>,
    /// How long a subscribe hook's allow is remembered per user and room
    /// (0 = never); 0 by default.
    pub subscribe_cache_ms: u64,
    /// `"deny"` (the default) or `"allow"`.
    pub on_error: OnError,
    /// How long a hook may take, 2 000 ms by default; less than
    /// `heartbeat.hello_timeout_ms`.
    pub timeout_ms: u64,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            connect: None,
            subscribe: None,
            publish: None,
            subscribe_cache_ms: 0,
            on_error: OnError::Deny,
            timeout_ms: 2_000,
        }
    }
}

/// `[webhooks]`: lifecycle events POSTed to a URL (docs/api.md, "Events").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhooks {
    /// `http://host:port/path`; unset (the default) is off.
    pub url: Option<String>,
    /// HMAC-SHA256 key of the `Eg-Signature` header; required with `url`.
    pub secret: Option<String>,
    /// How long a batch is retried (with backoff) before it is dropped,
    /// 60 000 ms by default.
    pub retry_for_ms: u64,
    /// Events waiting to be sent; past it new ones are dropped (counted).
    /// 10 000 by default.
    pub queue: usize,
    /// Most events in one POST, 100 by default.
    pub batch: usize,
    /// How long one POST may take, 5 000 ms by default.
    pub timeout_ms: u64,
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            url: None,
            secret: None,
            retry_for_ms: 60_000,
            queue: 10_000,
            batch: 100,
            timeout_ms: 5_000,
        }
    }
}

/// The keys every named table of `section` takes, as `serde_json` sees
/// them (for the key checks).
pub fn named_template(section: &str) -> Option<serde_json::Value> {
    if !NAMED_SECTIONS.contains(&section) {
        return None;
    }
    match section {
        "services" => serde_json::to_value(Service::default()).ok(),
        _ => None,
    }
}

/// The rules of these sections; `fail(key, message)` reports one.
pub fn check(
    c: &Config,
    fail: &dyn Fn(&str, String) -> Result<(), super::ConfigError>,
) -> Result<(), super::ConfigError> {
    // [api]
    let api = &c.api;
    if api.listen.is_some() && api.keys.is_empty() {
        return fail(
            "api.keys",
            "is empty while api.listen is set: nobody could call the API".into(),
        );
    }
    for k in &api.keys {
        if k.len() < MIN_API_KEY || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return fail(
                "api.keys",
                format!("every key needs at least {MIN_API_KEY} characters and no whitespace"),
            );
        }
    }
    if !(1024..=16 << 20).contains(&api.max_body_bytes) {
        return fail(
            "api.max_body_bytes",
            format!("{} is outside 1024..=16777216", api.max_body_bytes),
        );
    }
    if api.max_connections == 0 {
        return fail("api.max_connections", "must be more than 0".into());
    }
    for (key, ms) in [
        ("api.idle_timeout_ms", api.idle_timeout_ms),
        ("api.timeout_ms", api.timeout_ms),
        ("api.cluster_timeout_ms", api.cluster_timeout_ms),
    ] {
        if ms == 0 || ms > 600_000 {
            return fail(key, format!("{ms} is outside 1..=600000"));
        }
    }
    if api.cluster_timeout_ms >= api.timeout_ms {
        return fail(
            "api.cluster_timeout_ms",
            format!(
                "{} must be less than api.timeout_ms ({})",
                api.cluster_timeout_ms, api.timeout_ms
            ),
        );
    }
    if let Some(addr) = api.listen {
        for (other, at) in [
            ("ws.listen", c.ws.listen),
            ("tcp.listen", c.tcp.listen),
            ("admin.listen", c.admin.listen),
        ] {
            if at.is_some_and(|o| super::same_port(o, addr)) {
                return fail(
                    "api.listen",
                    format!("{addr} overlaps {other}; each TCP listener needs its own port"),
                );
            }
        }
    }

    // [services.<name>]
    for (name, s) in &c.services {
        let key = |k: &str| format!("services.{name}.{k}");
        if name.len() > 128 || !edgegate_proto::channel::valid_id(name) {
            return fail(
                &format!("services.{name}"),
                "a service name must match [A-Za-z0-9_-]{1,128}".into(),
            );
        }
        if let Err(e) = crate::http::client::Target::parse(&s.url) {
            return fail(&key("url"), e);
        }
        if s.timeout_ms == 0 || s.timeout_ms > MAX_CALL_MS {
            return fail(
                &key("timeout_ms"),
                format!("{} is outside 1..={MAX_CALL_MS}", s.timeout_ms),
            );
        }
    }

    // [hooks]
    let hooks = &c.hooks;
    for (key, name) in [
        ("hooks.connect", &hooks.connect),
        ("hooks.subscribe", &hooks.subscribe),
        ("hooks.publish", &hooks.publish),
    ] {
        let Some(name) = name else { continue };
        if !edgegate_proto::channel::valid_id(name) {
            return fail(
                key,
                format!("{name:?} is not a service name ([A-Za-z0-9_-]{{1,128}})"),
            );
        }
        if !c.services.contains_key(name) && c.backbone.kind == BackboneKind::Embedded {
            return fail(
                key,
                format!(
                    "names {name:?}, which is not a [services.{name}] table (the embedded backbone has no other services to ask)"
                ),
            );
        }
    }
    if hooks.timeout_ms == 0 || hooks.timeout_ms > MAX_CALL_MS {
        return fail(
            "hooks.timeout_ms",
            format!("{} is outside 1..={MAX_CALL_MS}", hooks.timeout_ms),
        );
    }
    if hooks.connect.is_some() && hooks.timeout_ms >= c.heartbeat.hello_timeout_ms {
        return fail(
            "hooks.timeout_ms",
            format!(
                "{} must be less than heartbeat.hello_timeout_ms ({}): the connect hook runs before welcome",
                hooks.timeout_ms, c.heartbeat.hello_timeout_ms
            ),
        );
    }
    if hooks.subscribe_cache_ms > 86_400_000 {
        return fail("hooks.subscribe_cache_ms", "is more than a day".into());
    }

    // [webhooks]
    let w = &c.webhooks;
    if let Some(url) = &w.url {
        if let Err(e) = crate::http::client::Target::parse(url) {
            return fail("webhooks.url", e);
        }
        if w.secret.as_deref().is_none_or(|s| s.len() < 16) {
            return fail(
                "webhooks.secret",
                "must be set, at least 16 characters, while webhooks.url is set".into(),
            );
        }
    }
    if w.retry_for_ms > 86_400_000 {
        return fail("webhooks.retry_for_ms", "is more than a day".into());
    }
    if w.queue == 0 || w.queue > 1_000_000 {
        return fail(
            "webhooks.queue",
            format!("{} is outside 1..=1000000", w.queue),
        );
    }
    if w.batch == 0 || w.batch > 10_000 {
        return fail(
            "webhooks.batch",
            format!("{} is outside 1..=10000", w.batch),
        );
    }
    if w.timeout_ms == 0 || w.timeout_ms > MAX_CALL_MS {
        return fail(
            "webhooks.timeout_ms",
            format!("{} is outside 1..={MAX_CALL_MS}", w.timeout_ms),
        );
    }
    Ok(())
}
