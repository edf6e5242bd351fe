//! History in a JetStream stream (`[backbone.nats] history = "jetstream"`):
//! the stream, and reading it back (docs/protocol.md §7, "With JetStream").
//!
//! One stream captures `P.user.>` and `P.room.>`, and republishes every
//! stored message to `P.live.<kind>.<id>` with `Nats-Sequence` (its `seq`)
//! and `Nats-Last-Sequence` (the previous `seq` on the same subject). The
//! gateways subscribe to the live subjects; [`super::nats`] keeps, per
//! subject, the stream position up to which it has delivered, and fills
//! from here whatever it finds it missed.
//!
//! Everything read here comes from the stream's leader
//! (`$JS.API.STREAM.MSG.GET` and `STREAM.INFO`), never from a follower's
//! direct get, which may lag behind what the leader acknowledged: a replay
//! that missed the newest message would be a silent loss.
//!
//! **Is a replay complete?** Seqs are stream-wide, so a channel's messages
//! are not numbered 1, 2, 3: a client at position `S` may be owed messages
//! that the stream has since deleted, and nothing in what is left says so.
//! JetStream deletes only from the front: per subject (`max_msgs_per_subject`)
//! the subject's oldest, and by age (`max_age`) the stream's oldest. So the
//! channel's messages after `S` are all still there when the channel still
//! holds a message at or before `S`, or when nothing after `S` can have
//! been deleted: the stream's first seq is at most `S + 1` (no age deletion
//! past `S`) and the channel holds fewer than `max_msgs_per_subject` (no
//! per-subject deletion ever reached past `S`). [`judge`] decides it,
//! without I/O; it is tested below.

use std::time::Duration;

use async_nats::HeaderMap;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::history::Unrecovered;
use crate::config::Nats as NatsConfig;

/// The stream this node uses, from `[backbone.nats]`.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// `P.user.>`, `P.room.>`.
    pub subjects: [String; 2],
    /// RePublish source (`P.>`) and destination (`P.live.>`).
    pub republish: (String, String),
    /// `file` or `memory`.
    pub storage: &'static str,
    /// Replicas.
    pub replicas: usize,
    /// Messages kept per subject.
    pub max_msgs_per_subject: u64,
    /// Age bound, nanoseconds.
    pub max_age_ns: u64,
    /// Deduplication window, nanoseconds.
    pub duplicate_window_ns: u64,
}

impl StreamSpec {
    /// The stream `cfg` asks for, for subject prefix `prefix`.
    pub fn new(cfg: &NatsConfig, prefix: &str) -> Self {
        StreamSpec {
            name: cfg.stream.clone(),
            subjects: [format!("{prefix}.user.>"), format!("{prefix}.room.>")],
            republish: (format!("{prefix}.>"), live_prefix(prefix) + ">"),
            storage: cfg.storage.name(),
            replicas: cfg.replicas,
            max_msgs_per_subject: cfg.max_msgs_per_subject,
            max_age_ns: cfg.max_age_ms.saturating_mul(1_000_000),
            duplicate_window_ns: cfg.duplicate_window_ms.saturating_mul(1_000_000),
        }
    }

    /// The epoch of the stream created at `created` (its name and creation
    /// time: a stream deleted and made again is another history).
    pub fn epoch(&self, created: &str) -> String {
        let mut e = format!("{}@{created}", self.name);
        e.truncate(64);
        e
    }
}

/// `P.live.`: where the stream republishes.
pub fn live_prefix(prefix: &str) -> String {
    format!("{prefix}.live.")
}

/// The live subject of a stored one: `P.room.x` → `P.live.room.x`.
pub fn live_subject(prefix: &str, stored: &str) -> String {
    let rest = stored.split_once('.').map_or("", |(_, rest)| rest);
    format!("{}{rest}", live_prefix(prefix))
}

/// Why a JetStream call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsError {
    /// Nobody answers `$JS.API`: JetStream is not enabled.
    NoResponders,
    /// No answer in time (no quorum, a leader election, NATS down).
    Timeout,
    /// JetStream answered with an error.
    Api {
        /// HTTP-like code (404, 503, …).
        code: u16,
        /// JetStream's error code (10059: stream not found, …).
        err_code: u32,
        /// Its description.
        description: String,
    },
    /// Anything else (the connection, a malformed answer).
    Other(String),
}

impl std::fmt::Display for JsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsError::NoResponders => f.write_str("no responders (JetStream is not enabled)"),
            JsError::Timeout => f.write_str("timed out"),
            JsError::Api {
                code,
                err_code,
                description,
            } => write!(f, "{description} (code {code}, error {err_code})"),
            JsError::Other(e) => f.write_str(e),
        }
    }
}

/// Why the stream could not be made ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnsureError {
    /// A stream there conflicts, or JetStream refused ours: a start error.
    Conflict(String),
    /// Nobody answers `$JS.API`.
    NoJetStream(String),
    /// NATS or JetStream cannot answer yet (no quorum, an election).
    Retry(String),
}

/// JetStream's "stream not found".
const STREAM_NOT_FOUND: u32 = 10059;
/// JetStream's "no suitable peers for placement".
const NO_SUITABLE_PEERS: u32 = 10005;
/// JetStream's "no message found".
const NO_MESSAGE_FOUND: u32 = 10037;

/// A JetStream API client: plain requests on one NATS connection.
#[derive(Clone)]
pub struct Js {
    client: async_nats::Client,
    timeout: Duration,
    /// The stream.
    pub spec: StreamSpec,
}

/// What the stream's leader says of it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// Creation time (the epoch).
    pub created: String,
    /// First seq still kept (stream-wide).
    pub first_seq: u64,
    /// Last seq stored (stream-wide).
    pub last_seq: u64,
    /// Messages kept on the subject asked about (0 without one).
    pub subject_msgs: u64,
}

/// One message read back from the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// Its headers (the publisher's `Eg-*`).
    pub headers: HeaderMap,
    /// Body.
    pub data: Bytes,
}

#[derive(Deserialize)]
struct ApiError {
    code: u16,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

impl Js {
    /// A client for `spec` on `client`; each request waits at most `timeout`.
    pub fn new(client: async_nats::Client, timeout: Duration, spec: StreamSpec) -> Self {
        Js {
            client,
            timeout,
            spec,
        }
    }

    /// One JetStream API request; the answer's JSON, or its error.
    async fn api(&self, subject: String, body: Value) -> Result<Value, JsError> {
        use async_nats::RequestErrorKind as K;
        let req = self.client.request(subject, body.to_string().into());
        let msg = match tokio::time::timeout(self.timeout, req).await {
            Err(_) => return Err(JsError::Timeout),
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    K::NoResponders => JsError::NoResponders,
                    K::TimedOut => JsError::Timeout,
                    _ => JsError::Other(e.to_string()),
                });
            }
            Ok(Ok(m)) => m,
        };
        let v: Value = serde_json::from_slice(&msg.payload)
            .map_err(|e| JsError::Other(format!("malformed JetStream answer: {e}")))?;
        if let Some(err) = v.get("error") {
            let e: ApiError = serde_json::from_value(err.clone())
                .map_err(|e| JsError::Other(format!("malformed JetStream error: {e}")))?;
            return Err(JsError::Api {
                code: e.code,
                err_code: e.err_code,
                description: e.description,
            });
        }
        Ok(v)
    }

    /// The stream's state; with `subject`, also how many messages it keeps.
    pub async fn state(&self, subject: Option<&str>) -> Result<StreamState, JsError> {
        let body = match subject {
            Some(s) => json!({ "subjects_filter": s }),
            None => json!({}),
        };
        let v = self
            .api(format!("$JS.API.STREAM.INFO.{}", self.spec.name), body)
            .await?;
        Ok(parse_state(&v, subject))
    }

    /// The first message of `subject` with seq ≥ `from`, from the leader.
    pub async fn next(&self, subject: &str, from: u64) -> Result<Option<Stored>, JsError> {
        let body = json!({ "seq": from.max(1), "next_by_subj": subject });
        let v = match self
            .api(format!("$JS.API.STREAM.MSG.GET.{}", self.spec.name), body)
            .await
        {
            Ok(v) => v,
            Err(JsError::Api { err_code, .. }) if err_code == NO_MESSAGE_FOUND => return Ok(None),
            Err(JsError::Api { code: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        parse_stored(&v).map(Some)
    }

    /// The last message of `subject` at or below `up_to` (`None`: the
    /// latest), by a direct get: any replica answers, so a page may lag the
    /// leader by what a follower has not applied yet (a page is a view of
    /// history, not a recovery: nothing is owed by it).
    pub async fn last_up_to(
        &self,
        subject: &str,
        up_to: Option<u64>,
    ) -> Result<Option<Stored>, JsError> {
        let body = match up_to {
            Some(0) => return Ok(None),
            Some(n) => json!({ "multi_last": [subject], "up_to_seq": n }),
            None => json!({ "last_by_subj": subject }),
        };
        let req = self.client.request(
            format!("$JS.API.DIRECT.GET.{}", self.spec.name),
            body.to_string().into(),
        );
        let m = match tokio::time::timeout(self.timeout, req).await {
            Err(_) => return Err(JsError::Timeout),
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => JsError::NoResponders,
                    async_nats::RequestErrorKind::TimedOut => JsError::Timeout,
                    _ => JsError::Other(e.to_string()),
                });
            }
            Ok(Ok(m)) => m,
        };
        match m.status.map(|s| s.as_u16()) {
            Some(404) => return Ok(None),
            Some(code) if code >= 300 => {
                return Err(JsError::Api {
                    code,
                    err_code: 0,
                    description: m.description.unwrap_or_default(),
                });
            }
            _ => {}
        }
        let headers = m.headers.unwrap_or_default();
        let seq = headers
            .get("Nats-Sequence")
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or_else(|| JsError::Other("direct get: no Nats-Sequence".into()))?;
        Ok(Some(Stored {
            seq,
            headers,
            data: m.payload,
        }))
    }

    /// A page of `subject`'s history: the newest `limit` messages with seq
    /// below `before` (all when `None`), oldest first; whether older ones
    /// are kept; and the subject's latest seq. One direct get per message,
    /// walking back (JetStream has no "previous by subject" but the last
    /// message up to a seq).
    pub async fn page(
        &self,
        subject: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<(Vec<Stored>, bool, u64), JsError> {
        let top = self.last_up_to(subject, None).await?.map_or(0, |m| m.seq);
        let mut cursor = match before {
            Some(b) => b.saturating_sub(1).min(top),
            None => top,
        };
        let mut out = Vec::new();
        while out.len() < limit && cursor > 0 {
            match self.last_up_to(subject, Some(cursor)).await? {
                Some(m) => {
                    cursor = m.seq.saturating_sub(1).min(cursor.saturating_sub(1));
                    out.push(m);
                }
                None => {
                    cursor = 0;
                }
            }
        }
        let more = cursor > 0 && self.last_up_to(subject, Some(cursor)).await?.is_some();
        out.reverse();
        Ok((out, more, top))
    }

    /// At most `max` messages of `subject` with seq in `(after, upto]`, in
    /// order, one leader read each.
    async fn read(
        &self,
        subject: &str,
        after: u64,
        upto: u64,
        max: usize,
    ) -> Result<Vec<Stored>, Unrecovered> {
        let mut out = Vec::new();
        let mut from = after + 1;
        while from <= upto && out.len() < max {
            match self
                .next(subject, from)
                .await
                .map_err(unavailable(subject))?
            {
                Some(m) if m.seq <= upto => {
                    from = m.seq + 1;
                    out.push(m);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// The messages of `subject` with seq in `(after, upto]`, in order, if
    /// the stream still holds all of them and they are at most `limit`
    /// (docs at the top of this file).
    pub async fn range(
        &self,
        subject: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, Unrecovered> {
        let unavailable = unavailable(subject);
        let out = self.read(subject, after, upto, limit + 1).await?;
        // Was anything after `after` deleted? Only the front goes, so not
        // when the subject still holds a message at or before `after`.
        let first_kept = match out.first() {
            Some(m) if m.seq > after + 1 => self
                .next(subject, 1)
                .await
                .map_err(&unavailable)?
                .map(|m| m.seq),
            Some(m) => Some(m.seq),
            None if upto > after => self
                .next(subject, 1)
                .await
                .map_err(&unavailable)?
                .map(|m| m.seq),
            None => None,
        };
        let state = if first_kept.is_some_and(|f| f <= after + 1) {
            None
        } else {
            Some(self.state(Some(subject)).await.map_err(&unavailable)?)
        };
        let seqs: Vec<u64> = out.iter().map(|m| m.seq).collect();
        judge(
            after,
            upto,
            &seqs,
            first_kept,
            state.as_ref(),
            self.spec.max_msgs_per_subject,
            limit,
        )?;
        Ok(out)
    }

    /// What a node missed of `subject` in `(after, upto]` (a gap it found
    /// on the live subject, or the tail after a reconnect), in order.
    /// Those messages are recent — stored while this node was subscribed,
    /// and the node treats an outage longer than `max_age` as a loss of
    /// its own — so age cannot have deleted them; the per-subject bound
    /// can (the rule: [`judge_fill`]). `Err`: the caller closes the
    /// channel's subscribers with 4009.
    pub async fn fill(
        &self,
        subject: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, Unrecovered> {
        let unavailable = unavailable(subject);
        let out = self.read(subject, after, upto, limit + 1).await?;
        if out.len() > limit {
            return Err(Unrecovered::TooMany);
        }
        let Some(first) = out.first().map(|m| m.seq).filter(|&f| f > after + 1) else {
            return Ok(out);
        };
        let first_kept = self
            .next(subject, 1)
            .await
            .map_err(&unavailable)?
            .map(|m| m.seq);
        if first_kept.is_some_and(|k| k <= after + 1) {
            return Ok(out);
        }
        let st = self.state(Some(subject)).await.map_err(&unavailable)?;
        judge_fill(
            after,
            first,
            first_kept,
            st.subject_msgs,
            self.spec.max_msgs_per_subject,
        )?;
        Ok(out)
    }

    /// Creates the stream, or checks the one there and brings its limits
    /// to `spec`.
    pub async fn ensure(&self) -> Result<StreamState, EnsureError> {
        let name = &self.spec.name;
        let info = self
            .api(format!("$JS.API.STREAM.INFO.{name}"), json!({}))
            .await;
        let info = match info {
            Ok(v) => v,
            Err(JsError::Api { err_code, .. }) if err_code == STREAM_NOT_FOUND => {
                let v = self
                    .api(format!("$JS.API.STREAM.CREATE.{name}"), self.create_body())
                    .await
                    .map_err(|e| self.ensure_error("cannot create the stream", e))?;
                tracing::info!(stream = %name, "backbone: JetStream stream created");
                return Ok(parse_state(&v, None));
            }
            Err(e) => return Err(self.ensure_error("cannot read the stream", e)),
        };
        let cfg = info.get("config").cloned().unwrap_or(Value::Null);
        check_conflict(&self.spec, &cfg).map_err(EnsureError::Conflict)?;
        if let Some(update) = limits_update(&self.spec, &cfg) {
            let v = self
                .api(format!("$JS.API.STREAM.UPDATE.{name}"), update)
                .await
                .map_err(|e| self.ensure_error("cannot update the stream's limits", e))?;
            tracing::info!(stream = %name, "backbone: JetStream stream limits updated");
            return Ok(parse_state(&v, None));
        }
        Ok(parse_state(&info, None))
    }

    fn ensure_error(&self, what: &str, e: JsError) -> EnsureError {
        let name = &self.spec.name;
        match e {
            JsError::NoResponders => EnsureError::NoJetStream(
                "backbone.nats.history = \"jetstream\": JetStream is not enabled on the NATS \
                 servers (no responders on $JS.API); start nats-server with -js (and a \
                 jetstream block on every cluster node), or set backbone.nats.history = \"off\""
                    .to_owned(),
            ),
            // "No suitable peers for placement": a cluster still forming
            // (or short of nodes for the replicas: then it is logged on
            // every try).
            JsError::Api {
                err_code: NO_SUITABLE_PEERS,
                ..
            } => EnsureError::Retry(format!("backbone.nats.stream = {name:?}: {what}: {e}")),
            JsError::Api {
                code: 400..=499, ..
            } => EnsureError::Conflict(format!("backbone.nats.stream = {name:?}: {what}: {e}")),
            e => EnsureError::Retry(format!("backbone.nats.stream = {name:?}: {what}: {e}")),
        }
    }

    fn create_body(&self) -> Value {
        let s = &self.spec;
        json!({
            "name": s.name,
            "subjects": s.subjects,
            "retention": "limits",
            "discard": "old",
            "storage": s.storage,
            "num_replicas": s.replicas,
            "max_msgs_per_subject": s.max_msgs_per_subject,
            "max_age": s.max_age_ns,
            "duplicate_window": s.duplicate_window_ns,
            "allow_direct": true,
            "republish": { "src": s.republish.0, "dest": s.republish.1 },
        })
    }
}

/// A read of the stream that failed: the recovery (or fill) is
/// `unavailable`.
fn unavailable(subject: &str) -> impl Fn(JsError) -> Unrecovered + '_ {
    move |e| {
        tracing::debug!(error = %e, subject, "backbone: reading the stream failed");
        Unrecovered::Unavailable
    }
}

fn parse_state(v: &Value, subject: Option<&str>) -> StreamState {
    let st = &v["state"];
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    StreamState {
        created: v["created"].as_str().unwrap_or_default().to_owned(),
        first_seq: u(&st["first_seq"]),
        last_seq: u(&st["last_seq"]),
        subject_msgs: subject.map_or(0, |s| u(&st["subjects"][s])),
    }
}

fn parse_stored(v: &Value) -> Result<Stored, JsError> {
    let m = &v["message"];
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |field: &str| -> Result<Vec<u8>, JsError> {
        match m[field].as_str() {
            None | Some("") => Ok(Vec::new()),
            Some(s) => b64
                .decode(s)
                .map_err(|e| JsError::Other(format!("stream message {field}: {e}"))),
        }
    };
    let seq = m["seq"]
        .as_u64()
        .ok_or_else(|| JsError::Other("stream message without seq".into()))?;
    Ok(Stored {
        seq,
        headers: parse_headers(&decode("hdrs")?),
        data: Bytes::from(decode("data")?),
    })
}

/// Headers in NATS's wire form (`NATS/1.0\r\nName: value\r\n…`).
pub fn parse_headers(raw: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    let text = String::from_utf8_lossy(raw);
    for line in text.split("\r\n").skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()) {
                h.insert(k, v);
            }
        }
    }
    h
}

/// A conflicting existing stream: why, naming the setting.
fn check_conflict(spec: &StreamSpec, cfg: &Value) -> Result<(), String> {
    let name = &spec.name;
    let mut have: Vec<&str> = cfg["subjects"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    have.sort_unstable();
    let mut want: Vec<&str> = spec.subjects.iter().map(String::as_str).collect();
    want.sort_unstable();
    if have != want {
        return Err(format!(
            "backbone.nats.stream = {name:?}: the existing stream captures {have:?}, not \
             {want:?}; delete it, or name another stream in backbone.nats.stream"
        ));
    }
    let rp = &cfg["republish"];
    let (src, dest) = (rp["src"].as_str().unwrap_or(">"), rp["dest"].as_str());
    if dest != Some(spec.republish.1.as_str())
        || src != spec.republish.0
        || rp["headers_only"].as_bool() == Some(true)
    {
        return Err(format!(
            "backbone.nats.stream = {name:?}: the existing stream republishes {} (src {src:?}, \
             dest {dest:?}), not {:?} → {:?} with whole messages; delete it, or name another \
             stream in backbone.nats.stream",
            if rp.is_null() { "nothing" } else { "elsewhere" },
            spec.republish.0,
            spec.republish.1
        ));
    }
    let storage = cfg["storage"].as_str().unwrap_or("file");
    if storage != spec.storage {
        return Err(format!(
            "backbone.nats.storage = {:?}: the existing stream {name:?} keeps its messages in \
             {storage:?} (JetStream cannot change it); set backbone.nats.storage = {storage:?}, \
             or delete the stream",
            spec.storage
        ));
    }
    Ok(())
}

/// The existing stream's config with our limits, when any differs.
fn limits_update(spec: &StreamSpec, cfg: &Value) -> Option<Value> {
    let mut next = cfg.clone();
    let obj = next.as_object_mut()?;
    let mut changed = false;
    for (key, want) in [
        ("max_msgs_per_subject", json!(spec.max_msgs_per_subject)),
        ("max_age", json!(spec.max_age_ns)),
        ("duplicate_window", json!(spec.duplicate_window_ns)),
        ("num_replicas", json!(spec.replicas)),
        ("allow_direct", json!(true)),
    ] {
        if obj.get(key) != Some(&want) {
            obj.insert(key.to_owned(), want);
            changed = true;
        }
    }
    changed.then_some(next)
}

/// Whether a read of `subject`'s messages in `(after, upto]` that found
/// `seqs` is the whole of them (module docs): `first_kept` is the
/// subject's oldest kept message, `state` the stream's state read after
/// the messages (needed only when `first_kept` does not settle it).
pub fn judge(
    after: u64,
    upto: u64,
    seqs: &[u64],
    first_kept: Option<u64>,
    state: Option<&StreamState>,
    max_msgs_per_subject: u64,
    limit: usize,
) -> Result<(), Unrecovered> {
    let front_kept = first_kept.is_some_and(|f| f <= after + 1)
        || state.is_some_and(|s| s.first_seq <= after + 1 && s.subject_msgs < max_msgs_per_subject);
    if !front_kept {
        let oldest = first_kept.unwrap_or(upto + 1);
        return Err(Unrecovered::Expired { oldest });
    }
    if seqs.len() > limit {
        return Err(Unrecovered::TooMany);
    }
    Ok(())
}

/// Whether a fill of `(after, …]` whose first message is `first` can have
/// lost messages to the per-subject bound (the only deletion that reaches
/// recent messages). Seqs are stream-wide, so `first > after + 1` says
/// nothing by itself: other subjects' messages sit in between. The bound
/// deletes a subject's oldest first, so nothing after `after` went while
/// the subject keeps a message at or before `after + 1` (`first_kept`),
/// nor while it is under the bound. (A rule that looked only at the bound
/// closed every gap of a busy room with 4009 "expired" once the room held
/// `max_msgs_per_subject`: the cluster chaos run.)
pub fn judge_fill(
    after: u64,
    first: u64,
    first_kept: Option<u64>,
    subject_msgs: u64,
    max_msgs_per_subject: u64,
) -> Result<(), Unrecovered> {
    if first <= after + 1
        || first_kept.is_some_and(|k| k <= after + 1)
        || subject_msgs < max_msgs_per_subject
    {
        return Ok(());
    }
    Err(Unrecovered::Expired {
        oldest: first_kept.unwrap_or(first),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(first_seq: u64, subject_msgs: u64) -> StreamState {
        StreamState {
            created: String::new(),
            first_seq,
            last_seq: 1_000,
            subject_msgs,
        }
    }

    #[test]
    fn a_fill_is_whole_unless_the_bound_may_have_reached_past_the_position() {
        // The next message right after the position: nothing between.
        assert_eq!(judge_fill(40, 41, Some(30), 5, 5), Ok(()));
        // Other subjects' seqs in between; the room at its bound still
        // keeps what was delivered last (40) or older: whole.
        assert_eq!(judge_fill(40, 55, Some(40), 5, 5), Ok(()));
        assert_eq!(judge_fill(40, 55, Some(12), 5, 5), Ok(()));
        // Under the bound nothing was deleted, however the seqs skip.
        assert_eq!(judge_fill(40, 55, Some(55), 4, 5), Ok(()));
        // At the bound with its oldest past the position: some may be gone.
        assert_eq!(
            judge_fill(40, 55, Some(55), 5, 5),
            Err(Unrecovered::Expired { oldest: 55 })
        );
    }

    #[test]
    fn a_channel_that_still_holds_the_position_is_complete() {
        // The client had seq 40, the channel still keeps 40: whatever came
        // after it is there, however old the stream's front.
        assert_eq!(judge(40, 90, &[55, 90], Some(12), None, 5, 10), Ok(()));
        assert_eq!(judge(40, 90, &[41, 90], Some(41), None, 5, 10), Ok(()));
    }

    #[test]
    fn a_position_before_the_front_needs_the_stream_state() {
        // Nothing of the channel at or before 40 is kept any more.
        let seqs = [55, 90];
        // The stream's front is past 41: something after 40 may be gone.
        assert_eq!(
            judge(40, 90, &seqs, Some(55), Some(&state(50, 2)), 5, 10),
            Err(Unrecovered::Expired { oldest: 55 })
        );
        // The channel is at its per-subject bound: it may have lost some.
        assert_eq!(
            judge(40, 90, &seqs, Some(55), Some(&state(10, 5)), 5, 10),
            Err(Unrecovered::Expired { oldest: 55 })
        );
        // Neither: every message after 40 is there (a channel that was
        // empty when the client took its position, for instance).
        assert_eq!(
            judge(40, 90, &seqs, Some(55), Some(&state(10, 2)), 5, 10),
            Ok(())
        );
        assert_eq!(
            judge(0, 90, &seqs, Some(55), Some(&state(1, 2)), 5, 10),
            Ok(())
        );
    }

    #[test]
    fn an_empty_channel_past_its_front_is_expired_at_upto_plus_one() {
        assert_eq!(
            judge(40, 90, &[], None, Some(&state(60, 0)), 5, 10),
            Err(Unrecovered::Expired { oldest: 91 })
        );
        assert_eq!(judge(40, 90, &[], None, Some(&state(30, 0)), 5, 10), Ok(()));
    }

    #[test]
    fn more_than_the_limit_is_too_many() {
        let seqs: Vec<u64> = (41..=52).collect();
        assert_eq!(
            judge(40, 90, &seqs, Some(41), None, 1_000, 10),
            Err(Unrecovered::TooMany)
        );
    }

    #[test]
    fn headers_are_read_from_the_wire_form() {
        let h = parse_headers(b"NATS/1.0\r\nEg-From: alice\r\nNats-Msg-Id: a:b:1\r\n\r\n");
        assert_eq!(h.get("Eg-From").map(|v| v.as_str()), Some("alice"));
        assert_eq!(h.get("Nats-Msg-Id").map(|v| v.as_str()), Some("a:b:1"));
        assert!(parse_headers(b"garbage").get("x").is_none());
    }

    #[test]
    fn a_conflicting_stream_is_named() {
        let cfg = crate::config::Nats::default();
        let spec = StreamSpec::new(&cfg, "eg");
        let ok = json!({
            "subjects": ["eg.room.>", "eg.user.>"],
            "republish": {"src": "eg.>", "dest": "eg.live.>"},
            "storage": "file",
        });
        assert_eq!(check_conflict(&spec, &ok), Ok(()));
        let other = json!({"subjects": ["orders.>"], "storage": "file"});
        let e = check_conflict(&spec, &other).expect_err("other subjects");
        assert!(
            e.contains("orders.>") && e.contains("backbone.nats.stream"),
            "{e}"
        );
        let no_rp = json!({"subjects": ["eg.room.>", "eg.user.>"], "storage": "file"});
        let e = check_conflict(&spec, &no_rp).expect_err("no republish");
        assert!(e.contains("republishes nothing"), "{e}");
        let mem = json!({
            "subjects": ["eg.room.>", "eg.user.>"],
            "republish": {"src": "eg.>", "dest": "eg.live.>"},
            "storage": "memory",
        });
        let e = check_conflict(&spec, &mem).expect_err("storage");
        assert!(e.contains("backbone.nats.storage"), "{e}");
        // Limits differ: an update, not a conflict.
        let mut cfg = ok.clone();
        cfg["max_msgs_per_subject"] = json!(7);
        let up = limits_update(&spec, &cfg).expect("update");
        assert_eq!(up["max_msgs_per_subject"], json!(1_000));
        assert_eq!(
            up["republish"]["dest"],
            json!("eg.live.>"),
            "the rest is kept"
        );
    }
}
