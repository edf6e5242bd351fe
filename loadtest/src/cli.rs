//! Command-line interface. Every scenario is a subcommand sharing [`Common`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{Encoding, Transport};

/// edgegate load-test harness.
#[derive(Parser, Debug)]
#[command(name = "loadtest", version, about)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Scenarios. Each is bounded in count and time and stops by itself.
#[derive(Subcommand, Debug)]
// Parsed once at start: the size of the largest options struct does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Scenario {
    /// Open many idle connections at a given rate, hold them, measure the
    /// gateway's memory per connection and CPU while idle.
    Idle(IdleArgs),
    /// Direct messages between random pairs of users: latency, loss, duplicates, order.
    Pubsub(PubsubArgs),
    /// One room, K subscribers, P publishers: deliveries per second and latency.
    Fanout(FanoutArgs),
    /// Reconnect storm: N reconnecting clients; the gateway is drained (SIGTERM)
    /// or killed, then restarted; time until all are back, peak accept rate,
    /// reconnect failures.
    Storm(StormArgs),
    /// Idle connections plus pubsub traffic for a duration: gateway RSS and
    /// latency sampled over time, drift reported.
    Soak(SoakArgs),
    /// Reconnecting clients in rooms and direct messages, publishers that
    /// retry until `ok`, and faults on a schedule (cut connections, slow
    /// consumers, drain and kill of the gateway): lost, duplicated and
    /// reordered messages, recovery outcomes and times.
    Chaos(ChaosArgs),
    /// A herd of clients cut off while messages are published, then back at
    /// once: time until every client has recovered everything, gateway peak RSS.
    Herd(HerdArgs),
    /// A chat product's traffic: users in rooms with presence, messages,
    /// typing indicators (ephemeral) and users coming and going: latency,
    /// CPU per delivery, members events, memory per present (room, user).
    Chat(ChatArgs),
    /// Fill the history: publishers write M messages to each of R rooms,
    /// round after round of new rooms; the gateway's RSS above its start
    /// against the history budget and what the history says it holds.
    Fill(FillArgs),
    /// Internal: a worker process of `idle` (reports JSON lines on stdout).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Internal: a worker process of `storm` (reports JSON lines on stdout).
    #[command(hide = true)]
    StormWorker(StormWorkerArgs),
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Transport: ws, tcp, quic or sse (SSE on the WebSocket listener:
    /// JSON; `fanout` publishes over WebSocket and measures SSE subscribers).
    #[arg(long, default_value = "ws")]
    pub transport: Transport,
    /// TLS: wss:// for ws, TLS over TCP for tcp (quic is always encrypted). Needs --ca.
    #[arg(long)]
    pub tls: bool,
    /// PEM CA certificate to trust for --tls and quic.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name to verify the gateway's certificate against (SNI).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Envelope encoding: json or bin (tcp and quic are always bin).
    #[arg(long, default_value = "json")]
    pub encoding: Encoding,
    /// Gateway address (host:port); several, comma-separated, spread the connections over nodes (round robin). Default: 127.0.0.1:8080 for ws, 127.0.0.1:7000 for tcp, 127.0.0.1:7443 for quic.
    #[arg(long)]
    pub target: Option<String>,
    /// Gateway admin address, for /metrics (optional).
    #[arg(long)]
    pub admin: Option<String>,
    /// Gateway pid, for RSS and CPU from /proc. Default: the only process named `edgegate`, if any.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Source addresses to bind, e.g. 127.0.0.2-127.0.0.50 (spreads the ephemeral-port use).
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Write the JSON report here ("-" = stdout, after the table).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw latency-over-time and connections-over-time (and the scenario's
    /// other curves) to this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Tokio worker threads in this process (default: 1; for `fanout`, one
    /// per CPU this process may run on, so that a harness given more cores
    /// than one uses them).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Per-connection connect + handshake + welcome timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl Common {
    /// With `--target a,b,...` (several gateway nodes, e.g. joined by a
    /// NATS backbone): the address for connection `i`, round robin.
    pub fn target_for(&self, i: usize) -> Option<String> {
        let t = self.target.as_deref()?;
        if !t.contains(',') {
            return None;
        }
        let all: Vec<&str> = t
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        (!all.is_empty()).then(|| all[i % all.len()].to_owned())
    }

    /// The target address, defaulting per transport.
    pub fn target(&self) -> String {
        self.target.clone().unwrap_or_else(|| match self.transport {
            Transport::Tcp => "127.0.0.1:7000".into(),
            Transport::Quic => "127.0.0.1:7443".into(),
            _ => "127.0.0.1:8080".into(),
        })
    }

    /// The transport as shown in reports: `ws`, `wss`, `tcp`, `tcp+tls`, `quic`.
    pub fn transport_label(&self) -> &'static str {
        match (self.transport, self.tls) {
            (Transport::Ws, true) => "wss",
            (Transport::Tcp, true) => "tcp+tls",
            (Transport::Sse, true) => "sse+tls",
            (t, _) => t.name(),
        }
    }

    /// Worker threads: `--threads`, else `default`.
    pub fn threads_or(&self, default: usize) -> usize {
        self.threads.unwrap_or(default).max(1)
    }

    /// The effective encoding (tcp and quic force bin, sse json).
    pub fn encoding(&self) -> Encoding {
        if self.transport == Transport::Sse {
            Encoding::Json
        } else if self.transport.is_framed() {
            Encoding::Binary
        } else {
            self.encoding
        }
    }
}

/// `idle` options.
#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Connections to open in all.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Connection attempts per second, all workers together.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds to hold the connections after the ramp.
    #[arg(long, default_value_t = 10.0)]
    pub hold_secs: f64,
    /// Worker processes (default: one per 5 000 connections).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Give up on the ramp after this many seconds (default: 2 × connections / rate + 15).
    #[arg(long)]
    pub max_ramp_secs: Option<f64>,
    /// Settle time between the ramp's end and the start of the hold measurement.
    #[arg(long, default_value_t = 1.0)]
    pub settle_secs: f64,
    /// Rooms each connection joins once connected (pipelined `sub`s, each
    /// answered `ok` before the connection counts as ramped): what a chat
    /// user costs, not only a bare connection.
    #[arg(long, default_value_t = 0)]
    pub rooms: u64,
    /// Members of each room when `--rooms` is set: connections × rooms ÷
    /// members rooms, connection c's r-th room is (c × rooms + r) mod that.
    #[arg(long, default_value_t = 10)]
    pub members: u64,
}

/// `pubsub` options.
#[derive(Args, Debug, Clone)]
pub struct PubsubArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Pairs of users (2 × pairs connections); each message goes one way within a random pair.
    #[arg(long, default_value_t = 100)]
    pub pairs: u64,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Padding bytes added to each payload.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// Connections opened per second during setup.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Random seed for pair selection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `fanout` options.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Subscribers of the room.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Publishers (not subscribed).
    #[arg(long, default_value_t = 1)]
    pub publishers: u64,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Padding bytes added to each payload.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// Connections opened per second during setup.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Room id (default: a fresh one per run).
    /// Also report the latency of what was delivered after the first this
    /// many seconds of publishing (`latency_steady`): the harness's own
    /// start (thousands of publisher tasks' first sends) out of the figure.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_secs: f64,
    /// The app on a Pusher server (`--dialect pusher`): `id:key:secret`.
    #[arg(long, default_value = "app-id:app-key:app-secret")]
    pub pusher_app: String,
    /// Rooms (default one): subscriber s is in `--rooms-per-subscriber`
    /// of them, the r-th being (s × rooms-per-subscriber + r) mod rooms, so
    /// each room has subscribers × rooms-per-subscriber ÷ rooms members
    /// (which must divide); publisher p publishes to room p mod rooms. The
    /// shape of chat traffic: many small rooms. Lean receivers, on every
    /// dialect.
    #[arg(long, default_value_t = 1)]
    pub rooms: u64,
    /// Rooms each subscriber joins (with `--rooms`).
    #[arg(long, default_value_t = 1)]
    pub rooms_per_subscriber: u64,
    #[arg(long)]
    pub room: Option<String>,
    /// How subscribers read: `lean` (own socket, deliveries counted in
    /// place; ws and tcp, plain or over TLS, QUIC, plain sse) or `client`
    /// (the client library, as an application would). SSE over TLS always
    /// uses `client`.
    #[arg(long, default_value = "lean")]
    pub receiver: Receiver,
    /// Lean WebSocket subscribers ask for permessage-deflate (no context
    /// takeover) and inflate what comes compressed.
    #[arg(long)]
    pub deflate: bool,
    /// The server's protocol: `edgegate`, or `nats` to run the same
    /// scenario against nats-server's WebSocket listener (`--target` its
    /// `websocket` port; subject = room with `:` as `.`).
    #[arg(long, default_value = "edgegate")]
    pub dialect: Dialect,
}

/// Whose protocol the fan-out speaks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// edgegate's (docs/protocol.md).
    Edgegate,
    /// NATS over WebSocket, for a side-by-side with nats-server.
    Nats,
    /// Pusher Channels: subscribers over its WebSocket protocol, publishers
    /// through its signed HTTP API (sockudo, soketi).
    Pusher,
}

/// How a scenario's subscribers read their deliveries.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receiver {
    /// [`crate::lean::LeanSub`]: a few hundred nanoseconds per delivery.
    Lean,
    /// [`edgegate_client::Connection`], every delivery decoded in full.
    Client,
}

/// Internal worker options (the parent passes them).
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Worker index (user ids are `lt<index>x<n>`).
    #[arg(long)]
    pub index: u32,
    /// Connections for this worker.
    #[arg(long)]
    pub connections: u64,
    /// Connection attempts per second for this worker.
    #[arg(long)]
    pub rate: f64,
    /// Ramp bound, seconds.
    #[arg(long)]
    pub max_ramp_secs: f64,
    /// Hard bound on the worker's life, seconds.
    #[arg(long)]
    pub max_life_secs: f64,
    /// Index of this worker's first connection among all workers' (its rooms
    /// follow from it).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Rooms each connection joins (`room:idle-<k>`).
    #[arg(long, default_value_t = 0)]
    pub rooms: u64,
    /// Rooms in all (`--rooms` of connection c: (c × rooms + r) mod this).
    #[arg(long, default_value_t = 1)]
    pub room_count: u64,
}

/// What the storm does to the gateway.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StormAction {
    /// SIGTERM: the gateway drains (bye 1001 + retry_ms) and exits; then it is restarted.
    Drain,
    /// SIGKILL: every socket dies at once; then the gateway is restarted.
    Kill,
}

impl StormAction {
    /// The signal name for `kill -<SIG>`.
    pub fn signal(self) -> &'static str {
        match self {
            StormAction::Drain => "TERM",
            StormAction::Kill => "KILL",
        }
    }
}

/// `storm` options.
#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    /// Shared options. `--admin` is needed for the accept rate.
    #[command(flatten)]
    pub common: Common,
    /// Reconnecting clients in all.
    #[arg(long, default_value_t = 1000)]
    pub clients: u64,
    /// Initial connects per second, all workers together.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Worker processes (default: one per 5 000 clients).
    #[arg(long)]
    pub workers: Option<u32>,
    /// drain (SIGTERM) or kill (SIGKILL).
    #[arg(long, value_enum, default_value = "drain")]
    pub action: StormAction,
    /// Start and stop the gateway with this command (run as `sh -c "exec CMD"`);
    /// it inherits this process's environment plus `--gateway-env`.
    #[arg(long)]
    pub gateway_cmd: Option<String>,
    /// Extra environment for `--gateway-cmd` / `--restart-cmd`, KEY=VALUE (repeatable).
    #[arg(long = "gateway-env")]
    pub gateway_env: Vec<String>,
    /// Where the started gateway's stdout/stderr go (default: a file in /tmp).
    #[arg(long)]
    pub gateway_log: Option<PathBuf>,
    /// With `--gateway-pid` (an external gateway): the command that starts it
    /// again after the signal (`sh -c "exec CMD"`). The new gateway is left running.
    #[arg(long)]
    pub restart_cmd: Option<String>,
    /// Pause between the old gateway's exit and the restart.
    #[arg(long, default_value_t = 0.0)]
    pub restart_delay_secs: f64,
    /// Longest wait for the old gateway to exit after the signal.
    #[arg(long, default_value_t = 30.0)]
    pub exit_timeout_secs: f64,
    /// Longest wait, from the signal, for every client to be back.
    #[arg(long, default_value_t = 40.0)]
    pub recover_secs: f64,
    /// Seconds between the ramp's end and the signal.
    #[arg(long, default_value_t = 1.0)]
    pub settle_secs: f64,
    /// Seconds to keep sampling after everyone is back.
    #[arg(long, default_value_t = 1.0)]
    pub hold_secs: f64,
    /// Client backoff: bound of the first retry's full-jitter sleep, ms.
    #[arg(long, default_value_t = 100)]
    pub backoff_base_ms: u64,
    /// Client backoff: largest bound, ms.
    #[arg(long, default_value_t = 5000)]
    pub backoff_cap_ms: u64,
    /// Client backoff: give up after this many consecutive failed attempts (default: never).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Sampling period of /metrics and client counts, ms.
    #[arg(long, default_value_t = 100)]
    pub sample_ms: u64,
}

/// Internal `storm` worker options (the parent passes them).
#[derive(Args, Debug, Clone)]
pub struct StormWorkerArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Worker index (user ids are `ls<index>x<n>`).
    #[arg(long)]
    pub index: u32,
    /// Clients for this worker.
    #[arg(long)]
    pub clients: u64,
    /// Initial connects per second for this worker.
    #[arg(long)]
    pub rate: f64,
    /// Backoff base, ms.
    #[arg(long)]
    pub backoff_base_ms: u64,
    /// Backoff cap, ms.
    #[arg(long)]
    pub backoff_cap_ms: u64,
    /// Backoff attempt limit.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Progress line period, ms.
    #[arg(long, default_value_t = 100)]
    pub report_ms: u64,
    /// Hard bound on the worker's life, seconds.
    #[arg(long)]
    pub max_life_secs: f64,
}

/// `chat` options.
#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Users, one connection each (in this process: ≤ 15 000).
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Rooms each user is in.
    #[arg(long, default_value_t = 5)]
    pub rooms_per_user: usize,
    /// Members per room (rooms = users × rooms-per-user / members).
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Stored messages per second per user (each to one of its rooms).
    #[arg(long, default_value_t = 0.1)]
    pub rate: f64,
    /// Typing indicators (ephemeral messages) per second per user.
    #[arg(long, default_value_t = 0.2)]
    pub typing: f64,
    /// Users per second who go away (their connection closes) and come back.
    #[arg(long, default_value_t = 1.0)]
    pub churn: f64,
    /// How long a user who went away stays away, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub away_secs: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds over which the users join their rooms (0: all at once).
    #[arg(long, default_value_t = 5.0)]
    pub join_secs: f64,
    /// Subscribe without presence (to measure what presence costs, against a run with it).
    #[arg(long)]
    pub no_presence: bool,
    /// Connections opened per second during setup.
    #[arg(long, default_value_t = 1500.0)]
    pub connect_rate: f64,
    /// Padding bytes added to each stored message.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `fill` options.
#[derive(Args, Debug, Clone)]
pub struct FillArgs {
    /// Shared options (`--gateway-pid` and `--admin` are needed).
    #[command(flatten)]
    pub common: Common,
    /// Publishing connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Rooms written per round (new names each round).
    #[arg(long, default_value_t = 400_000)]
    pub rooms: usize,
    /// Messages per room per round.
    #[arg(long, default_value_t = 1)]
    pub messages: usize,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Padding characters in each message's JSON payload.
    #[arg(long, default_value_t = 16)]
    pub size: usize,
    /// The gateway's history budget in all, MiB (shards × `history.shard_bytes`;
    /// the default config: 2 × 64).
    #[arg(long, default_value_t = 128.0)]
    pub budget_mib: f64,
    /// Publishes in flight per connection.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Publish without ids (no deduplication key kept).
    #[arg(long)]
    pub no_ids: bool,
}

/// `soak` options.
#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Idle connections held for the whole run (in this process: ≤ 15 000).
    #[arg(long, default_value_t = 1000)]
    pub idle: u64,
    /// Pubsub pairs (2 × pairs more connections) exchanging direct messages.
    #[arg(long, default_value_t = 50)]
    pub pairs: u64,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Sampling period for RSS, CPU, connections and latency, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub sample_secs: f64,
    /// Padding bytes added to each payload.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// Connections opened per second during setup.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Random seed for pair selection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A fault `chaos` injects on a schedule.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// (a) A client's connection is cut: RST both ways, mid-stream (the fault proxy).
    Cut,
    /// (b) A subscriber stops reading for a while: the gateway closes it as a slow consumer (4003).
    Slow,
    /// (c) SIGTERM: the gateway drains and exits; then it is restarted.
    Drain,
    /// (d) SIGKILL: the gateway dies at once; then it is restarted.
    Kill,
    /// (e) SIGKILL of the NATS server a gateway is connected to
    /// (`--nats-kill-cmd`), started again `--nats-down-secs` later.
    NatsKill,
}

impl Fault {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::Slow => "slow",
            Fault::Drain => "drain",
            Fault::Kill => "kill",
            Fault::NatsKill => "nats-kill",
        }
    }
}

/// Options of the gateway the harness starts, signals and restarts itself
/// (`storm` has its own copy for its external-gateway mode).
#[derive(Args, Debug, Clone)]
pub struct GatewayProcArgs {
    /// Start (and restart) the gateway with this command (`sh -c "exec CMD"`);
    /// it inherits this process's environment plus `--gateway-env`.
    #[arg(long)]
    pub gateway_cmd: Option<String>,
    /// Extra environment for `--gateway-cmd`, KEY=VALUE (repeatable).
    #[arg(long = "gateway-env")]
    pub gateway_env: Vec<String>,
    /// Where the started gateway's stdout/stderr go (default: a file in /tmp).
    #[arg(long)]
    pub gateway_log: Option<PathBuf>,
    /// Longest wait for the gateway to exit after a signal, and to be ready after a start.
    #[arg(long, default_value_t = 30.0)]
    pub exit_timeout_secs: f64,
}

/// `chaos` options.
#[derive(Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Shared options (`--transport` ws or tcp: the faults go through a TCP proxy).
    #[command(flatten)]
    pub common: Common,
    /// The gateway process, for the `drain` and `kill` faults.
    #[command(flatten)]
    pub gateway: GatewayProcArgs,
    /// Reconnecting clients (each is a subscriber, a publisher, and the
    /// recipient of direct messages).
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Rooms; client i joins rooms (i·k + j) mod R for j < k (`--rooms-per-client`).
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// Rooms each client joins.
    #[arg(long, default_value_t = 1)]
    pub rooms_per_client: usize,
    /// Room publishes per second, all clients together (a random client
    /// publishes to one of its rooms).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Direct messages per second, all clients together (to a random other client).
    #[arg(long, default_value_t = 50.0)]
    pub dm_rate: f64,
    /// Seconds of traffic (and faults).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Padding bytes added to each payload.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Faults, comma-separated: cut, slow, drain, kill.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cut,slow")]
    pub faults: Vec<Fault>,
    /// cut: connections cut per second, at random (a random connected client each time).
    #[arg(long, default_value_t = 5.0)]
    pub cut_rate: f64,
    /// slow: seconds between two slow-consumer events.
    #[arg(long, default_value_t = 5.0)]
    pub slow_every_secs: f64,
    /// slow: clients that stop reading at each event.
    #[arg(long, default_value_t = 5)]
    pub slow_clients: usize,
    /// slow: how long they stop reading, seconds.
    #[arg(long, default_value_t = 8.0)]
    pub slow_secs: f64,
    /// slow: direct messages sent to each stopped reader by other clients
    /// at once (a conversation bursting while it does not read), so that
    /// the gateway's queue and the kernel's socket buffers fill within the
    /// pause.
    #[arg(long, default_value_t = 500)]
    pub slow_burst: usize,
    /// Receive buffer of the proxy's gateway-side sockets, bytes (small, so a
    /// paused reader fills the gateway's queue soon).
    #[arg(long, default_value_t = 4096)]
    pub proxy_rcvbuf: u32,
    /// drain / kill: seconds between restarts (the first after one interval;
    /// with both faults they alternate).
    #[arg(long, default_value_t = 20.0)]
    pub restart_every_secs: f64,
    /// Client backoff: bound of the first retry's full-jitter sleep, ms.
    #[arg(long, default_value_t = 100)]
    pub backoff_base_ms: u64,
    /// Client backoff: largest bound, ms.
    #[arg(long, default_value_t = 2000)]
    pub backoff_cap_ms: u64,
    /// Connections opened per second during setup.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// Longest wait after the traffic for every client to be back and every
    /// delivery to arrive, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub settle_secs: f64,
    /// Random seed (clients, faults, publishers).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A second gateway node: the same `--gateway-cmd` with `--gateway-env`
    /// and then these KEY=VALUE (repeatable; its ports and node id). The
    /// proxy spreads clients over both, a client reconnects to either, and
    /// drain / kill / nats-kill take turns between them.
    #[arg(long = "gateway2-env")]
    pub gateway2_env: Vec<String>,
    /// The second gateway's client address (HOST:PORT).
    #[arg(long)]
    pub target2: Option<String>,
    /// The second gateway's admin address (readiness after a restart).
    #[arg(long)]
    pub admin2: Option<String>,
    /// nats-kill: the command that SIGKILLs NATS node {n} (1-based), e.g.
    /// `scripts/nats-cluster.sh kill DIR {n}`.
    #[arg(long)]
    pub nats_kill_cmd: Option<String>,
    /// nats-kill: the command that starts node {n} again.
    #[arg(long)]
    pub nats_restart_cmd: Option<String>,
    /// The NATS nodes' monitoring addresses (HOST:PORT), in node order
    /// (repeatable): the node killed is the one the gateway is connected to.
    #[arg(long = "nats-mon")]
    pub nats_mon: Vec<String>,
    /// nats-kill: seconds the node stays down.
    #[arg(long, default_value_t = 3.0)]
    pub nats_down_secs: f64,
    /// History outlives a gateway (the NATS backbone with JetStream): no
    /// `epoch_changed` is expected after a restart, and every
    /// `recovered: false` is counted as a failure.
    #[arg(long)]
    pub persistent_history: bool,
}

/// `herd` options.
#[derive(Args, Debug, Clone)]
pub struct HerdArgs {
    /// Shared options (`--transport` ws or tcp: the outage goes through a TCP proxy).
    #[command(flatten)]
    pub common: Common,
    /// Clients, all in the same rooms.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Rooms every client is in.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Messages published to each room while the clients are cut off.
    #[arg(long, default_value_t = 1000)]
    pub missed: u64,
    /// Padding bytes added to each payload.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Client backoff: bound of the first retry's full-jitter sleep, ms
    /// (the herd comes back within about this long).
    #[arg(long, default_value_t = 100)]
    pub backoff_base_ms: u64,
    /// Connections opened per second during setup.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// Longest wait for the recovery, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub recover_secs: f64,
    /// Gateway RSS sampling period, ms.
    #[arg(long, default_value_t = 20)]
    pub sample_ms: u64,
}
