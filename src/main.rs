//! The `spirekeep` binary: parse arguments, set up logging, run, exit.

use std::process::ExitCode;

use clap::Parser;
use spirekeep::cli::logging::LogFormat;
use spirekeep::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        // A long-running agent logs each job; JSON logs are read by machines
        // that want every event.
        0 if matches!(cli.command, spirekeep::cli::Command::Agent(_)) => "info",
        0 if cli.log_format == LogFormat::Json => "info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    spirekeep::cli::logging::init(cli.log_format, default_level);

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
