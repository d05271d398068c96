//! `spire-standin`: a stand-in for `spire-server` and `spire-agent`, as far as
//! spirekeep can observe them, for end-to-end tests of staged upgrades
//! against real datastores. See `tests/standin/README.md`.
//!
//! ```text
//! spire-standin version     --state-dir D
//! spire-standin server      --state-dir D --datastore DSN --listen 127.0.0.1:PORT [--trust-domain TD] [--disable-migration]
//! spire-standin agent       --state-dir D --server http://127.0.0.1:PORT --spiffe-id ID --listen 127.0.0.1:PORT
//! spire-standin healthcheck --url http://127.0.0.1:PORT [--agent] [--verbose]
//! ```
//!
//! (The file is not called `main.rs`: Cargo would also build `tests/*/main.rs`
//! as an integration-test target of its own.)

mod agent;
mod http;
mod log;
mod metrics;
mod migrate;
mod server;
mod sql;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "spire-standin",
    about = "Behaves like spire-server / spire-agent as far as spirekeep can see (test tool)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the installed version, like `spire-server --version` (on stderr, as mitchellh/cli does).
    Version {
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Run a SPIRE server stand-in.
    Server(server::ServerArgs),
    /// Run a SPIRE agent stand-in.
    Agent(agent::AgentArgs),
    /// Check a stand-in's health like `spire-server healthcheck`.
    Healthcheck {
        /// The member's base URL (its `--listen` address); `/ready` is checked
        /// unless the URL names another path.
        #[arg(long)]
        url: String,
        /// Word the result like `spire-agent healthcheck`.
        #[arg(long)]
        agent: bool,
        /// Print what is checked.
        #[arg(long)]
        verbose: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spire-standin: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Version { state_dir } => version(&state_dir),
            Command::Server(args) => server::run(args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Healthcheck {
                url,
                agent,
                verbose,
            } => healthcheck(&url, agent, verbose).await,
        }
    });
    // Background tasks (HTTP connections, the rotation loop) must not keep
    // the process alive after the command is done.
    runtime.shutdown_timeout(Duration::from_millis(200));
    ExitCode::from(code)
}

fn version(state_dir: &std::path::Path) -> u8 {
    let result = state::StateDir::open(state_dir).and_then(|s| {
        let faults = s.faults()?;
        s.reported_version(&faults)
    });
    match result {
        Ok(v) => {
            // mitchellh/cli writes `--version` to its HelpWriter, os.Stderr.
            eprintln!("{v}");
            0
        }
        Err(e) => {
            eprintln!("spire-standin: {e:#}");
            1
        }
    }
}

async fn healthcheck(url: &str, agent: bool, verbose: bool) -> u8 {
    let (healthy, unhealthy) = if agent {
        ("Agent is healthy.", "Agent is unhealthy")
    } else {
        ("Server is healthy.", "server is unhealthy")
    };
    let mut target = match http::Url::parse(url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("{unhealthy}: {e}");
            return 1;
        }
    };
    if target.path.is_empty() || target.path == "/" {
        target = target.with_path("/ready");
    }
    if verbose {
        println!("Checking {target}...");
    }
    match http::get(&target, Duration::from_secs(5)).await {
        Ok((200, _)) => {
            println!("{healthy}");
            0
        }
        Ok((status, body)) => {
            eprintln!("{unhealthy}: {target} answered {status}: {}", body.trim());
            1
        }
        Err(e) => {
            eprintln!("{unhealthy}: {e}");
            1
        }
    }
}

/// Waits for SIGTERM or SIGINT (SPIRE shuts down cleanly on both).
pub async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // No signal handling: run until killed.
            std::future::pending::<()>().await;
        }
    }
}
