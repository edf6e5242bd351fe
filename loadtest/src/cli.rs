//! Command-line interface. Every scenario is a subcommand sharing
//! [`Common`]; `storm` and `soak` slot in as further subcommands.

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
pub enum Scenario {
    /// Open many idle connections at a given rate, hold them, measure the
    /// gateway's memory per connection and CPU while idle.
    Idle(IdleArgs),
    /// Direct messages between random pairs of users: latency, loss, duplicates, order.
    Pubsub(PubsubArgs),
    /// One room, K subscribers, P publishers: deliveries per second and latency.
    Fanout(FanoutArgs),
    /// Internal: a worker process of `idle` (reports JSON lines on stdout).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Transport: ws or tcp.
    #[arg(long, default_value = "ws")]
    pub transport: Transport,
    /// Envelope encoding: json or bin (tcp is always bin).
    #[arg(long, default_value = "json")]
    pub encoding: Encoding,
    /// Gateway address (host:port). Default: 127.0.0.1:8080 for ws, 127.0.0.1:7000 for tcp.
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
    /// Tokio worker threads in this process.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Per-connection connect + handshake + welcome timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl Common {
    /// The target address, defaulting per transport.
    pub fn target(&self) -> String {
        self.target.clone().unwrap_or_else(|| match self.transport {
            Transport::Tcp => "127.0.0.1:7000".into(),
            _ => "127.0.0.1:8080".into(),
        })
    }

    /// The effective encoding (tcp forces bin).
    pub fn encoding(&self) -> Encoding {
        if self.transport == Transport::Tcp {
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
    #[arg(long)]
    pub room: Option<String>,
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
}
