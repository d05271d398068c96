//! The `spirekeep` binary: parse arguments, set up logging, run, exit.

use std::process::ExitCode;

use clap::Parser;
use spirekeep::cli::{Cli, run};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        // A long-running agent logs each job.
        0 if matches!(cli.command, spirekeep::cli::Command::Agent(_)) => "info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter =
        EnvFilter::try_from_env("SPIREKEEP_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(spirekeep::cli::exit::FAILED);
        }
    };
    ExitCode::from(runtime.block_on(run(cli)))
}
