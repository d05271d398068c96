//! The `spirekeep` binary: parse arguments, set up logging, run, exit.

use std::process::ExitCode;

use clap::Parser;
use spirekeep::cli::logging::LogFormat;
use spirekeep::cli::{Cli, run};

fn main() -> ExitCode {
    // Before any thread starts.
    let _ = bound_resident_memory();
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

/// Fixes glibc's trim threshold, and with it the mmap threshold, which glibc
/// otherwise raises each time a large block is freed (up to 32 MiB). Once the
/// first multi-MiB buffer (an upload part, a `COPY` chunk) was freed, every
/// buffer below that size came from the per-thread heap arenas, where what
/// the pipeline freed stayed resident: a 1,000,000-entry PostgreSQL backup
/// peaked at 60-68 MiB, and at about 50 MiB with this, in the same time.
///
/// Here, not in the library: a library must not change its host's allocator.
/// Returns whether the allocator took the setting (`false` on other C
/// libraries, where it does nothing).
fn bound_resident_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Free heap above this much at the top of an arena goes back to the system.
        const TRIM_THRESHOLD: libc::c_int = 1 << 20;
        // SAFETY: mallopt only changes allocator parameters, takes plain
        // integers, and may be called at any time (it takes the arena lock).
        #[allow(unsafe_code)]
        let accepted = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
        accepted == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_trim_threshold() {
        assert!(super::bound_resident_memory());
    }
}
