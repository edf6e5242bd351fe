//! `loadtest` — see the crate docs of `edgegate_loadtest`.

use anyhow::Result;
use clap::Parser;
use edgegate_loadtest::cli::{Cli, Scenario};
use edgegate_loadtest::{scenario, storm_worker, worker};

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.scenario {
        Scenario::Idle(a) => a.common.threads_or(1),
        Scenario::Pubsub(a) => a.common.threads_or(1),
        Scenario::Fanout(a) => scenario::fanout::fanout_threads(&a.common),
        Scenario::Worker(a) => a.common.threads_or(1),
        Scenario::StormWorker(a) => a.common.threads_or(1),
        Scenario::Storm(a) => a.common.threads_or(1),
        Scenario::Soak(a) => a.common.threads_or(1),
        Scenario::Chaos(a) => a.common.threads_or(1),
        Scenario::Herd(a) => a.common.threads_or(1),
        Scenario::Chat(a) => a.common.threads_or(1),
        Scenario::Fill(a) => a.common.threads_or(1),
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    edgegate_loadtest::peer::now_ns();
    rt.block_on(async move {
        let out = |c: &edgegate_loadtest::cli::Common| (c.json.clone(), c.svg.clone());
        let (report, (json, svg)) = match cli.scenario {
            Scenario::Worker(a) => return worker::run(a).await,
            Scenario::StormWorker(a) => return storm_worker::run(a).await,
            Scenario::Idle(a) => {
                let o = out(&a.common);
                (scenario::idle::run(a).await?, o)
            }
            Scenario::Pubsub(a) => {
                let o = out(&a.common);
                (scenario::pubsub::run(a).await?, o)
            }
            Scenario::Fanout(a) => {
                let o = out(&a.common);
                (scenario::fanout::run(a).await?, o)
            }
            Scenario::Storm(a) => {
                let o = out(&a.common);
                (scenario::storm::run(a).await?, o)
            }
            Scenario::Soak(a) => {
                let o = out(&a.common);
                (scenario::soak::run(a).await?, o)
            }
            Scenario::Chaos(a) => {
                let o = out(&a.common);
                (scenario::chaos::run(a).await?, o)
            }
            Scenario::Herd(a) => {
                let o = out(&a.common);
                (scenario::herd::run(a).await?, o)
            }
            Scenario::Chat(a) => {
                let o = out(&a.common);
                (scenario::chat::run(a).await?, o)
            }
            Scenario::Fill(a) => {
                let o = out(&a.common);
                (scenario::fill::run(a).await?, o)
            }
        };
        report.emit(json.as_deref(), svg.as_deref())
    })
}
