//! Work under the repository lease: the one helper `cli`, the agent and
//! `plan` use to run an operation (a backup, a restore, a prune, the
//! pre-upgrade snapshot, the rollback's restore) while they hold the
//! repository lock.
//!
//! The operation is a future. It runs until it finishes, or until the lease
//! is lost (renewal failed, or someone broke it) or enough stop signals
//! arrived, whichever comes first. In the last two cases the future is
//! dropped where it stands: every operation run here commits last (a
//! snapshot's manifest is written last, a restore commits its one
//! transaction or its one `RENAME` last), so dropping it before that point
//! leaves nothing half done. An operation can also ask [`LeaseRun::check`]
//! right before its commit, which closes the gap between the lease expiring
//! and the watcher noticing.

use std::future::Future;

use tokio::sync::watch;

use super::lock::{LockError, RepositoryLock};
use crate::error::Error;

/// Runs operations under a held lease.
#[derive(Debug)]
pub struct LeaseRun<'a> {
    lock: &'a RepositoryLock,
    /// Counts stop signals (SIGTERM, SIGINT) received so far.
    signals: Option<watch::Receiver<u32>>,
    /// How many signals stop the operation.
    stop_at: u32,
    /// What the error says when a signal stopped it.
    on_signal: String,
}

impl<'a> LeaseRun<'a> {
    /// Watches the lease only.
    #[must_use]
    pub fn new(lock: &'a RepositoryLock) -> Self {
        Self {
            lock,
            signals: None,
            stop_at: 1,
            on_signal: String::new(),
        }
    }

    /// Also stops the operation once `signals` counts `stop_at` signals;
    /// the error then says `message`.
    #[must_use]
    pub fn with_signals(
        mut self,
        signals: watch::Receiver<u32>,
        stop_at: u32,
        message: impl Into<String>,
    ) -> Self {
        self.signals = Some(signals);
        self.stop_at = stop_at.max(1);
        self.on_signal = message.into();
        self
    }

    /// The lease is still held: for an operation to ask right before it
    /// commits.
    ///
    /// # Errors
    /// The lease was lost.
    pub fn check(&self) -> Result<(), LockError> {
        self.lock.check()
    }

    /// Runs `work`; stops it (drops it before it commits) when the lease is
    /// lost or the signals say so.
    ///
    /// # Errors
    /// `work`'s own errors; [`Error::Lock`] when the lease was lost;
    /// [`Error::Aborted`] when a signal stopped it.
    pub async fn run<T, E>(&self, work: impl Future<Output = Result<T, E>>) -> Result<T, E>
    where
        E: From<Error>,
    {
        let mut signals = self.signals.clone();
        let stopped = async {
            match signals.as_mut() {
                Some(rx) => wait_for(rx, self.stop_at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = work => r,
            e = self.lock.lost() => Err(Error::Lock(e).into()),
            () = stopped => Err(Error::Aborted(self.on_signal.clone()).into()),
        }
    }
}

/// Resolves once `rx` counts at least `n` (never, if the sender is gone).
pub async fn wait_for(rx: &mut watch::Receiver<u32>, n: u32) {
    loop {
        if *rx.borrow_and_update() >= n {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Repository;
    use crate::store::lock::{self, LockOptions};

    fn options() -> LockOptions {
        LockOptions {
            ttl: Duration::from_secs(3),
            wait: Duration::ZERO,
            ..LockOptions::new("test")
        }
    }

    /// Work that would commit after the lease was broken never gets there.
    #[tokio::test]
    async fn a_lost_lease_stops_the_work_before_it_commits() {
        let repo = Repository::in_memory();
        let held = RepositoryLock::acquire(&repo, &options()).await.unwrap();
        let committed = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            committed.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, Error>(())
        };
        let breaker = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            lock::break_lease(&repo, true).await.unwrap();
        };
        let run = LeaseRun::new(&held);
        let (r, ()) = tokio::join!(run.run(work), breaker);
        assert!(matches!(r, Err(Error::Lock(_))), "{r:?}");
        assert!(!committed.load(std::sync::atomic::Ordering::SeqCst));
        assert!(LeaseRun::new(&held).check().is_err());
    }

    /// A signal stops the work; work that finishes first is not disturbed.
    #[tokio::test]
    async fn a_signal_stops_the_work() {
        let repo = Repository::in_memory();
        let held = RepositoryLock::acquire(&repo, &options()).await.unwrap();
        let (tx, rx) = watch::channel(0u32);
        let run = LeaseRun::new(&held).with_signals(rx, 1, "stopped by a signal");
        assert_eq!(run.run(async { Ok::<_, Error>(7) }).await.unwrap(), 7);
        let work = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok::<_, Error>(())
        };
        let signal = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(1).unwrap();
        };
        let (r, ()) = tokio::join!(run.run(work), signal);
        match r {
            Err(Error::Aborted(m)) => assert_eq!(m, "stopped by a signal"),
            other => panic!("{other:?}"),
        }
        held.release().await.unwrap();
    }
}
