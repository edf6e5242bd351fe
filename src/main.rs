//! The `edgegate` command: `edgegate run`, `edgegate check-config` and
//! `edgegate config-reference`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgegate::config::Config;

/// mimalloc, unless built with `--features system-alloc` (glibc malloc, so
/// that heaptrack sees every allocation: `scripts/heap-idle.sh`,
/// docs/bench-notes.md, "What an idle connection holds").
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// edgegate: an edge connection gateway for chat and IM systems.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the embedded default config when --config is absent).
    Run {
        /// TOML config file; EDGEGATE_SECTION__KEY variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Load and validate the config, print the effective settings, exit.
    CheckConfig {
        /// TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the configuration reference (Markdown, docs/config.md): every
    /// key with its type, default, allowed values and environment variable.
    ConfigReference,
}

/// `mi_option_arena_eager_commit` in mimalloc.h.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Runs before `main` (and before the runtime's first allocations reserve
/// mimalloc's first arena): mimalloc would otherwise commit its arenas
/// eagerly, about 20 MB of RSS an idle node does not need (docs/bench-notes.md, "Gateway core").
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still wins.
extern "C" fn lazy_arena_commit() {
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
        // SAFETY: sets a process-wide allocator option; no pointers involved.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static LAZY_ARENA_COMMIT: extern "C" fn() = lazy_arena_commit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, run) = match &cli.cmd {
        Cmd::Run { config } => (config.as_deref(), true),
        Cmd::CheckConfig { config } => (config.as_deref(), false),
        Cmd::ConfigReference => {
            return match edgegate::config_ref::render() {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgegate: {e}");
                    ExitCode::from(2)
                }
            };
        }
    };
    let cfg = match Config::from_env_and_file(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgegate: {e}");
            return ExitCode::from(2);
        }
    };
    if !run {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.log.level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match edgegate::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate: {e}");
            ExitCode::from(2)
        }
    }
}
