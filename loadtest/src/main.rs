//! `loadtest` — see the crate docs of `edgegate_loadtest`.

use anyhow::Result;
use clap::Parser;
use edgegate_loadtest::cli::{Cli, Scenario};
use edgegate_loadtest::{scenario, worker};

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.scenario {
        Scenario::Idle(a) => a.common.threads,
        Scenario::Pubsub(a) => a.common.threads,
        Scenario::Fanout(a) => a.common.threads,
        Scenario::Worker(a) => a.common.threads,
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
        let (report, json) = match cli.scenario {
            Scenario::Worker(a) => return worker::run(a).await,
            Scenario::Idle(a) => {
                let j = a.common.json.clone();
                (scenario::idle::run(a).await?, j)
            }
            Scenario::Pubsub(a) => {
                let j = a.common.json.clone();
                (scenario::pubsub::run(a).await?, j)
            }
            Scenario::Fanout(a) => {
                let j = a.common.json.clone();
                (scenario::fanout::run(a).await?, j)
            }
        };
        report.emit(json.as_deref())
    })
}
