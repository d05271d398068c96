//! The repository lock on the command line: the flags every writing command
//! shares ([`LockArgs`], [`Held`]) and `spirekeep lock show|break`.

use std::future::Future;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::sync::watch;

use super::exit;
use super::output::print_json;
use super::repo::RepoArgs;
use crate::agent::shutdown;
use crate::error::Error;
use crate::snapshot::listing::rfc3339;
use crate::store::Repository;
use crate::store::lease_run::LeaseRun;
use crate::store::lock::{
    LeaseState, LeaseStatus, LockError, LockOptions, RepositoryLock, break_lease, inspect, readers,
};

/// How to take the repository lock.
#[derive(Debug, Args, Clone)]
pub struct LockArgs {
    /// How long to wait when another run holds the repository lock (0 refuses at once). A lease left
    /// by a killed process expires after its TTL, so a wait longer than the TTL always gets through.
    #[arg(long, value_name = "DURATION", default_value = "5m", env = "SPIREKEEP_LOCK_WAIT", value_parser = humantime::parse_duration)]
    pub lock_wait: Duration,

    /// Lifetime of the repository lease without renewal (renewed every third of it while the
    /// command runs); how long a killed run blocks the next one at most.
    #[arg(long, value_name = "DURATION", default_value = "2m", env = "SPIREKEEP_LOCK_TTL", value_parser = humantime::parse_duration)]
    pub lock_ttl: Duration,
}

impl LockArgs {
    pub(crate) fn options(&self, purpose: &str) -> LockOptions {
        LockOptions {
            purpose: purpose.to_owned(),
            ttl: self.lock_ttl,
            wait: self.lock_wait,
        }
    }
}

/// The lock held by a one-shot command, with SIGTERM/SIGINT handling: a
/// signal stops the guarded work (dropping it, which leaves no manifest for a
/// backup and rolls back a restore) and the lease is released.
pub(crate) struct Held {
    lock: RepositoryLock,
    signals: watch::Receiver<u32>,
}

impl Held {
    /// Takes the lock for `purpose`, waiting as `args` says.
    pub(crate) async fn acquire(
        repo: &Repository,
        args: &LockArgs,
        purpose: &str,
    ) -> anyhow::Result<Self> {
        Self::acquire_as(repo, args, purpose, false).await
    }

    /// Takes a shared lease for `purpose` (a reader: `verify`), waiting as
    /// `args` says for an exclusive holder (prune, backup, restore).
    pub(crate) async fn acquire_shared(
        repo: &Repository,
        args: &LockArgs,
        purpose: &str,
    ) -> anyhow::Result<Self> {
        Self::acquire_as(repo, args, purpose, true).await
    }

    async fn acquire_as(
        repo: &Repository,
        args: &LockArgs,
        purpose: &str,
        shared: bool,
    ) -> anyhow::Result<Self> {
        let signals = shutdown::listen()?;
        let options = args.options(purpose);
        // A signal ends the wait, but never a lease write half way (which
        // would leave a lease nobody releases until its TTL runs out).
        let taken = if shared {
            RepositoryLock::acquire_shared_unless_stopped(repo, &options, signals.clone()).await
        } else {
            RepositoryLock::acquire_unless_stopped(repo, &options, signals.clone()).await
        };
        let lock = match taken {
            Ok(lock) => lock,
            Err(LockError::Stopped) => {
                return Err(Error::Aborted(
                    "interrupted while waiting for the repository lock".into(),
                )
                .into());
            }
            Err(e) => return Err(Error::from(e).into()),
        };
        Ok(Self { lock, signals })
    }

    /// The lock, for steps that check it (prune).
    pub(crate) fn lock(&self) -> &RepositoryLock {
        &self.lock
    }

    /// Runs `work` while the lease is held; stops it if the lease is lost or
    /// a signal arrives.
    pub(crate) async fn guard<T>(
        &self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        LeaseRun::new(&self.lock)
            .with_signals(
                self.signals.clone(),
                1,
                "interrupted by a signal; nothing was left half done (a partial snapshot has no manifest)",
            )
            .run(work)
            .await
    }

    /// Releases the lease (a failure only means it expires on its own).
    pub(crate) async fn release(self) {
        if let Err(e) = self.lock.release().await {
            tracing::warn!(error = %e, "could not release the repository lock; it expires on its own");
        }
    }
}

#[derive(Debug, Args)]
pub struct LockCommandArgs {
    #[command(subcommand)]
    pub action: LockAction,
}

#[derive(Debug, Subcommand)]
pub enum LockAction {
    /// Show who holds the repository lock, since when, and when the lease expires.
    Show {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Break a stuck lease so the next run proceeds. Without --force only an expired lease, or one
    /// whose holder process is gone from this machine, is broken.
    Break {
        #[command(flatten)]
        repo: RepoArgs,
        /// Break a lease that is still being renewed (its holder then stops at its next renewal).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Serialize)]
struct ShowJson<'a> {
    repository: &'a str,
    lease: Option<&'a LeaseStatus>,
    /// Shared leases of running verifies (live or expired, not yet removed).
    readers: &'a [LeaseStatus],
}

pub(crate) async fn run(args: &LockCommandArgs, json: bool) -> anyhow::Result<u8> {
    match &args.action {
        LockAction::Show { repo } => {
            let repo = repo.open()?;
            let status = inspect(&repo).await.map_err(Error::from)?;
            let readers = readers(&repo).await.map_err(Error::from)?;
            if json {
                print_json(&ShowJson {
                    repository: repo.location(),
                    lease: status.as_ref(),
                    readers: &readers,
                })?;
            } else {
                println!("{}", describe(&repo, status.as_ref()));
                for reader in &readers {
                    if let (LeaseState::Held, Some(r)) = (reader.state, &reader.record) {
                        println!(
                            "  shared lease: {}, expires {}",
                            r.describe(),
                            rfc3339(r.expires_at)
                        );
                    }
                }
            }
            Ok(exit::OK)
        }
        LockAction::Break { repo, force } => {
            let repo = repo.open()?;
            let outcome = break_lease(&repo, *force).await.map_err(Error::from)?;
            if json {
                print_json(&outcome)?;
            } else if let Some(before) = &outcome.before {
                println!(
                    "broke the repository lock; it was: {}",
                    describe(&repo, Some(before))
                );
            } else {
                println!("{}: no lock object, nothing to break", repo.location());
            }
            if !json && outcome.readers_removed > 0 {
                println!(
                    "removed {} shared (verify) lease(s)",
                    outcome.readers_removed
                );
            }
            Ok(exit::OK)
        }
    }
}

fn describe(repo: &Repository, status: Option<&LeaseStatus>) -> String {
    let Some(status) = status else {
        return format!("{}: free (no lock object)", repo.location());
    };
    let Some(r) = &status.record else {
        return format!(
            "{}: unreadable lock object {} (written {}); `spirekeep lock break --force` removes it",
            repo.location(),
            crate::store::keys::REPOSITORY_LOCK,
            rfc3339(status.last_modified)
        );
    };
    let gone = match status.holder_process_gone {
        Some(true) => " (that process is gone)",
        Some(false) => " (that process is running on this host)",
        None => "",
    };
    match status.state {
        LeaseState::Held => format!(
            "{}: HELD for {}{gone}\n  acquired {}, renewed {}, expires {} (TTL {} s)",
            repo.location(),
            r.describe(),
            rfc3339(r.acquired_at),
            rfc3339(r.renewed_at),
            rfc3339(r.expires_at),
            r.ttl_seconds
        ),
        LeaseState::Expired => format!(
            "{}: free: the lease of {} expired at {}{gone}; the next run takes it over",
            repo.location(),
            r.describe(),
            rfc3339(r.expires_at)
        ),
        LeaseState::Released => format!(
            "{}: free (last held for {}, {} at {})",
            repo.location(),
            r.describe(),
            r.broken_by
                .as_ref()
                .map_or_else(|| "released".to_owned(), |b| format!("broken by {b}")),
            rfc3339(r.renewed_at.max(r.expires_at))
        ),
    }
}
