//! The repository lock: one lease object, `locks/repository.lock`, taken
//! with conditional writes and renewed while its holder works.
//!
//! Backup, prune and restore hold it, so two of them never write (or delete)
//! in one repository at once. The design follows Litestream's S3 leaser:
//!
//! - **acquire**: a create-only put of a JSON [`LeaseRecord`] (holder id,
//!   host, pid, purpose, acquired / renewed / expiry times). If the object is
//!   there and still live, the caller either refuses at once or polls until
//!   its wait runs out ([`LockOptions::wait`]);
//! - **renew**: a background task rewrites the record every TTL/3 with an
//!   if-match put against the version it wrote last. A conflict means someone
//!   broke or took the lease: the holder learns it has *lost* the lock
//!   ([`RepositoryLock::lost`], [`RepositoryLock::check`]) and stops;
//! - **expire**: a holder that is killed stops renewing, and its lease is
//!   free once `expires_at` has passed. The next process takes it over with an
//!   if-match put against the version it read, so of two processes that find
//!   the same expired lease only one wins;
//! - **release**: an if-match put of the record marked `released`. The object
//!   stays (deleting it could remove a lease someone took over a moment
//!   later: object stores have no conditional delete); a released lease is as
//!   free as a missing one.
//!
//! Time: the record's times come from the holder's clock and are compared with
//! the reader's. The holder treats its lease as lost TTL/6 *before* the expiry
//! it wrote (measured on its monotonic clock from the start of its last
//! successful write), so clocks that agree within TTL/6 (20 s with the default
//! two-minute TTL) never let two processes hold it. A waiter that watches the
//! same, unchanged record for a whole TTL also treats it as expired, which
//! covers a dead holder whose clock ran far ahead.
//!
//! **Shared (reader) leases.** `verify` only reads, so verifies may run side
//! by side, but never beside a prune (or a backup or restore, which hold the
//! exclusive lease). A reader writes its own lease object under
//! `locks/readers/` ([`RepositoryLock::acquire_shared`]), renewed like the
//! exclusive one and deleted on release. Each side writes its lease first
//! and then looks for the other: a reader re-reads the exclusive lease after
//! writing its own, and an exclusive holder lists the readers after winning
//! its lease. On a store with read-after-write consistency at least one of
//! two racing processes sees the other and backs off, so a reader and an
//! exclusive holder never both proceed.
//!
//! Stores without conditional updates (the local filesystem: `file://`
//! repositories) get the same protocol with two fallbacks: renewal reads the
//! record and overwrites it only if it is still ours, and taking over an
//! expired lease first wins a create-only *claim* object named after the
//! expired record, so two processes never both replace the same lease. These
//! fallbacks have a read-then-write gap of a few microseconds on one machine;
//! conditional puts on S3, GCS and Azure have none.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::keys::{READER_LEASES, REPOSITORY_LOCK};
use super::{MAX_CONTROL_BYTES, ObjectMeta, ObjectVersion, Repository, StoreError};

/// Format version of [`LeaseRecord`].
pub const LEASE_FORMAT_VERSION: u32 = 1;

/// How long a lease lasts without renewal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);

/// The shortest TTL accepted (tests use a few seconds).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Prefix of the claim objects used to take over an expired lease on stores
/// without conditional updates.
const TAKEOVER_PREFIX: &str = "locks/takeover-";

/// The lease object, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub format_version: u32,
    /// Random id of this acquisition (a new one every time).
    pub holder: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder on `host`.
    pub pid: u32,
    /// What the holder is doing: `backup`, `prune`, `restore`, `agent backup`, ...
    pub purpose: String,
    pub spirekeep_version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub acquired_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub renewed_at: OffsetDateTime,
    /// The lease is free from this time on (holder's clock), unless renewed.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub ttl_seconds: u64,
    /// The holder released it (or it was broken by hand): free now.
    #[serde(default)]
    pub released: bool,
    /// Who broke the lease, when `spirekeep lock break` did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_by: Option<String>,
}

impl LeaseRecord {
    fn new(purpose: &str, ttl: Duration, now: OffsetDateTime) -> Self {
        let id: [u8; 8] = rand::random();
        Self {
            format_version: LEASE_FORMAT_VERSION,
            holder: id.iter().map(|b| format!("{b:02x}")).collect(),
            host: host_name(),
            pid: std::process::id(),
            purpose: purpose.to_owned(),
            spirekeep_version: env!("CARGO_PKG_VERSION").to_owned(),
            acquired_at: now,
            renewed_at: now,
            expires_at: now + ttl,
            ttl_seconds: ttl.as_secs().max(1),
            released: false,
            broken_by: None,
        }
    }

    /// Stands in for a lease object that does not parse (written at `at`).
    fn unknown(purpose: &str, at: OffsetDateTime) -> Self {
        let mut r = Self::new(purpose, DEFAULT_TTL, at);
        r.holder = "unknown".into();
        r
    }

    fn to_bytes(&self) -> Bytes {
        let mut s = serde_json::to_string_pretty(self).expect("a lease always serializes");
        s.push('\n');
        Bytes::from(s)
    }

    fn parse(bytes: &[u8]) -> Option<Self> {
        let record: Self = serde_json::from_slice(bytes).ok()?;
        (record.format_version <= LEASE_FORMAT_VERSION).then_some(record)
    }

    /// `backup by host/pid 1234 (holder 0a1b…)`: who holds it, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "{} by {} pid {} (holder {}, spirekeep {})",
            self.purpose, self.host, self.pid, self.holder, self.spirekeep_version
        )
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_seconds.max(1))
    }
}

/// Whether a lease found in the repository is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Held and not expired.
    Held,
    /// Its holder stopped renewing it and it expired.
    Expired,
    /// Released by its holder (or broken by hand).
    Released,
}

/// What `spirekeep lock show` reports.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    pub state: LeaseState,
    /// The record, if it could be parsed.
    pub record: Option<LeaseRecord>,
    /// When the object was last written (the store's clock).
    #[serde(with = "time::serde::rfc3339")]
    pub last_modified: OffsetDateTime,
    /// Whether the holder runs on this host and its process is gone (only
    /// knowable for a holder on this machine; `None` elsewhere).
    pub holder_process_gone: Option<bool>,
}

/// How to take the lock.
#[derive(Debug, Clone)]
pub struct LockOptions {
    /// Recorded in the lease: what the holder does.
    pub purpose: String,
    /// Lease lifetime without renewal; renewed every TTL/3.
    pub ttl: Duration,
    /// How long to wait for a lease someone else holds. Zero refuses at once.
    pub wait: Duration,
}

impl LockOptions {
    /// Default TTL, no waiting.
    #[must_use]
    pub fn new(purpose: impl Into<String>) -> Self {
        Self {
            purpose: purpose.into(),
            ttl: DEFAULT_TTL,
            wait: Duration::ZERO,
        }
    }
}

/// Everything that can go wrong with the lock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds the lease.
    #[error("{message}")]
    Held {
        message: String,
        record: Box<LeaseRecord>,
    },

    #[error(
        "{repo}: the repository lock was lost ({why}); the operation stopped; a partly written snapshot has no \
         manifest and is removed by a later prune"
    )]
    Lost { repo: String, why: String },

    #[error(
        "{repo}: the lock object {key} is unreadable ({why}); inspect it with `spirekeep lock show` and remove it with `spirekeep lock break --force`"
    )]
    Unreadable {
        repo: String,
        key: String,
        why: String,
    },

    #[error("invalid lock settings: {0}")]
    Invalid(String),

    /// A stop signal ended the wait; no lease of ours is left behind.
    #[error("stopped while waiting for the repository lock; nothing was started")]
    Stopped,

    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stop-signal count a waiter for the lock watches (none: wait on).
struct StopSignal(Option<watch::Receiver<u32>>);

impl StopSignal {
    fn check(&self) -> Result<(), LockError> {
        match &self.0 {
            Some(rx) if *rx.borrow() > 0 => Err(LockError::Stopped),
            _ => Ok(()),
        }
    }

    /// Sleeps `for_`, or ends at once with [`LockError::Stopped`] on a signal.
    async fn pause(&mut self, for_: Duration) -> Result<(), LockError> {
        let Some(rx) = &mut self.0 else {
            tokio::time::sleep(for_).await;
            return Ok(());
        };
        tokio::select! {
            () = tokio::time::sleep(for_) => Ok(()),
            () = super::lease_run::wait_for(rx, 1) => Err(LockError::Stopped),
        }
    }
}

impl LockError {
    fn held(repo: &Repository, record: LeaseRecord, note: &str) -> Self {
        Self::Held {
            message: format!(
                "{} is locked: {}, renewed {}, expires {}{note}; wait for that run to finish, or if that \
                 process is gone, let the lease expire (the next run then proceeds) or run \
                 `spirekeep lock break --repo ...`",
                repo.location(),
                record.describe(),
                crate_rfc3339(record.renewed_at),
                crate_rfc3339(record.expires_at),
            ),
            record: Box::new(record),
        }
    }

    /// Whether another process holds the lock (as opposed to a storage failure).
    #[must_use]
    pub fn is_held_by_another(&self) -> bool {
        matches!(self, Self::Held { .. })
    }
}

/// Asked right before work under the lease commits (a manifest put, a
/// restore's swap): a run that lost its lease must stop there.
#[async_trait::async_trait]
pub trait CommitFence: Send + Sync {
    /// `Ok` when the work may commit now.
    ///
    /// # Errors
    /// [`LockError::Lost`] when the lease is no longer surely ours.
    async fn confirm(&self) -> Result<(), LockError>;
}

/// No lease: commit whenever the work is done (tests, callers without a lock).
#[derive(Debug, Default, Clone, Copy)]
pub struct Unfenced;

#[async_trait::async_trait]
impl CommitFence for Unfenced {
    async fn confirm(&self) -> Result<(), LockError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl CommitFence for RepositoryLock {
    async fn confirm(&self) -> Result<(), LockError> {
        RepositoryLock::confirm(self).await
    }
}

/// The state the renewal task and the handle share.
struct Shared {
    /// The lease object: [`REPOSITORY_LOCK`], or a reader's own under [`READER_LEASES`].
    key: String,
    /// The version we last wrote and the record in it.
    current: Mutex<(ObjectVersion, LeaseRecord)>,
    /// Until when (monotonic) the lease is surely ours.
    held_until: Mutex<Instant>,
    /// `Some(why)` once the lease is lost.
    lost: watch::Sender<Option<String>>,
    /// Whether the store has conditional updates (false: local filesystem).
    conditional: Mutex<bool>,
    /// One renewal at a time (the background task, or [`RepositoryLock::confirm`]).
    renewing: tokio::sync::Mutex<()>,
}

impl Shared {
    fn mark_lost(&self, why: String) {
        self.lost.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(why);
                true
            } else {
                false
            }
        });
    }
}

/// A held repository lock. Renewed in the background until
/// [`Self::release`]; dropping it stops the renewal and leaves the lease to
/// expire (use `release`).
pub struct RepositoryLock {
    repo: Repository,
    /// A shared (reader) lease rather than the exclusive one.
    reader: bool,
    shared: Arc<Shared>,
    lost_rx: watch::Receiver<Option<String>>,
    renewer: JoinHandle<()>,
    ttl: Duration,
}

impl fmt::Debug for RepositoryLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RepositoryLock")
            .field("repo", &self.repo.location())
            .field("record", &self.record())
            .finish_non_exhaustive()
    }
}

impl Drop for RepositoryLock {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl RepositoryLock {
    /// Takes the repository lock, waiting up to `options.wait` for a lease
    /// someone else holds.
    ///
    /// # Errors
    /// [`LockError::Held`] when another process still holds it after the
    /// wait, [`LockError::Invalid`] for a TTL under [`MIN_TTL`], or a storage
    /// failure.
    pub async fn acquire(repo: &Repository, options: &LockOptions) -> Result<Self, LockError> {
        Self::acquire_until(repo, options, None).await
    }

    /// [`Self::acquire`], but a stop signal (the count in `stop` reaching 1)
    /// ends the wait with [`LockError::Stopped`]. The signal is only looked
    /// at between attempts: once a lease write has started it runs to its
    /// end, so a caller never leaves a lease behind that nobody releases
    /// (dropping an `acquire` future can).
    ///
    /// # Errors
    /// As [`Self::acquire`], and [`LockError::Stopped`].
    pub async fn acquire_unless_stopped(
        repo: &Repository,
        options: &LockOptions,
        stop: watch::Receiver<u32>,
    ) -> Result<Self, LockError> {
        Self::acquire_until(repo, options, Some(stop)).await
    }

    async fn acquire_until(
        repo: &Repository,
        options: &LockOptions,
        stop: Option<watch::Receiver<u32>>,
    ) -> Result<Self, LockError> {
        let mut stop = StopSignal(stop);
        check_ttl(options.ttl)?;
        let started = Instant::now();
        let poll = poll_interval(options.ttl);
        loop {
            let wait = options.wait.saturating_sub(started.elapsed());
            let held = Self::acquire_exclusive_lease(
                repo,
                &LockOptions {
                    wait,
                    ..options.clone()
                },
                &mut stop,
            )
            .await?;
            // Readers (verify) write their lease before they look at ours:
            // one that is live now either saw no holder or is backing off.
            let reader = match live_readers(repo).await {
                Ok(readers) => readers.into_iter().next(),
                Err(e) => {
                    let _ = held.release().await;
                    return Err(e);
                }
            };
            let Some(reader) = reader else {
                return Ok(held);
            };
            let _ = held.release().await;
            if started.elapsed() >= options.wait {
                return Err(LockError::held(
                    repo,
                    reader,
                    &waited_note(options, started),
                ));
            }
            tracing::info!(holder = %reader.describe(), "repository read by another run; waiting");
            stop.pause(poll.min(options.wait.saturating_sub(started.elapsed())))
                .await?;
        }
    }

    /// Takes a shared (reader) lease: any number of readers hold one at once,
    /// but none while the exclusive lease is held (a prune, a backup, a
    /// restore), and no exclusive holder proceeds while a reader holds one.
    /// Waits up to `options.wait` for an exclusive holder.
    ///
    /// # Errors
    /// [`LockError::Held`] when an exclusive holder still holds the lease
    /// after the wait, [`LockError::Invalid`] for a TTL under [`MIN_TTL`], or
    /// a storage failure.
    pub async fn acquire_shared(
        repo: &Repository,
        options: &LockOptions,
    ) -> Result<Self, LockError> {
        Self::acquire_shared_until(repo, options, None).await
    }

    /// [`Self::acquire_shared`], ended by a stop signal as
    /// [`Self::acquire_unless_stopped`] is.
    ///
    /// # Errors
    /// As [`Self::acquire_shared`], and [`LockError::Stopped`].
    pub async fn acquire_shared_unless_stopped(
        repo: &Repository,
        options: &LockOptions,
        stop: watch::Receiver<u32>,
    ) -> Result<Self, LockError> {
        Self::acquire_shared_until(repo, options, Some(stop)).await
    }

    async fn acquire_shared_until(
        repo: &Repository,
        options: &LockOptions,
        stop: Option<watch::Receiver<u32>>,
    ) -> Result<Self, LockError> {
        let mut stop = StopSignal(stop);
        check_ttl(options.ttl)?;
        let started = Instant::now();
        let poll = poll_interval(options.ttl);
        let mut ours = LeaseRecord::new(&options.purpose, options.ttl, OffsetDateTime::now_utc());
        let key = format!("{READER_LEASES}{}.lock", ours.holder);
        loop {
            stop.check()?;
            let holder = match live_exclusive(repo).await? {
                Some(holder) => Some(holder),
                None => {
                    let now = OffsetDateTime::now_utc();
                    ours.acquired_at = now;
                    ours.renewed_at = now;
                    ours.expires_at = now + options.ttl;
                    let write_started = Instant::now();
                    let version = repo.put_overwrite(&key, ours.to_bytes()).await?;
                    // Written first, then looked: an exclusive holder that
                    // won its lease meanwhile lists the readers after it.
                    match live_exclusive(repo).await {
                        Ok(None) => {
                            return Ok(Self::start_at(
                                repo,
                                key,
                                true,
                                version,
                                ours,
                                write_started,
                                true,
                            ));
                        }
                        Ok(Some(holder)) => {
                            repo.delete(&key).await?;
                            Some(holder)
                        }
                        Err(e) => {
                            let _ = repo.delete(&key).await;
                            return Err(e);
                        }
                    }
                }
            };
            if let Some(holder) = holder {
                if started.elapsed() >= options.wait {
                    return Err(LockError::held(
                        repo,
                        holder,
                        &waited_note(options, started),
                    ));
                }
                tracing::info!(holder = %holder.describe(), "repository locked; waiting");
                stop.pause(poll.min(options.wait.saturating_sub(started.elapsed())))
                    .await?;
            }
        }
    }

    /// Whether this is a shared (reader) lease.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.reader
    }

    /// The exclusive lease alone (no look at the readers).
    async fn acquire_exclusive_lease(
        repo: &Repository,
        options: &LockOptions,
        stop: &mut StopSignal,
    ) -> Result<Self, LockError> {
        let started = Instant::now();
        let deadline = started + options.wait;
        let poll = poll_interval(options.ttl);
        // The record we saw and since when, to notice a lease nobody renews.
        let mut watched: Option<(Bytes, Instant)> = None;
        // One holder id for every attempt, so a create-only put that
        // succeeded but whose answer was lost is recognised as ours.
        let mut ours = LeaseRecord::new(&options.purpose, options.ttl, OffsetDateTime::now_utc());
        loop {
            stop.check()?;
            let now = OffsetDateTime::now_utc();
            ours.acquired_at = now;
            ours.renewed_at = now;
            ours.expires_at = now + options.ttl;
            let write_started = Instant::now();
            let existing = match repo
                .get_with_meta_capped(REPOSITORY_LOCK, MAX_CONTROL_BYTES)
                .await
            {
                Ok(found) => Some(found),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let Some((bytes, meta)) = existing else {
                match repo.put_create(REPOSITORY_LOCK, ours.to_bytes()).await {
                    Ok(version) => {
                        return Ok(Self::start(repo, version, ours, write_started, true));
                    }
                    // Someone else created it first (or our own retried
                    // request did: the next read tells).
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let record = LeaseRecord::parse(&bytes);
            if let Some(r) = &record
                && r.holder == ours.holder
            {
                // Our own create-only put, retried after a lost response.
                return Ok(Self::start(
                    repo,
                    meta.object_version(),
                    ours,
                    write_started,
                    true,
                ));
            }
            let unchanged_for = match &watched {
                Some((seen, since)) if *seen == bytes => since.elapsed(),
                _ => {
                    watched = Some((bytes.clone(), Instant::now()));
                    Duration::ZERO
                }
            };
            let free = match &record {
                Some(r) => {
                    r.released
                        || now >= r.expires_at
                        // Nobody renewed it for a whole TTL: dead, whatever its clock said.
                        || unchanged_for > r.ttl() + poll
                }
                // An unreadable lease counts as free once it is a TTL old.
                None => now >= meta.last_modified + DEFAULT_TTL || unchanged_for > DEFAULT_TTL,
            };
            if free {
                if let Some(r) = &record
                    && !r.released
                {
                    tracing::warn!(
                        holder = %r.describe(),
                        expired = %crate_rfc3339(r.expires_at),
                        "taking over an expired repository lease"
                    );
                }
                ours.acquired_at = OffsetDateTime::now_utc();
                ours.renewed_at = ours.acquired_at;
                ours.expires_at = ours.acquired_at + options.ttl;
                let write_started = Instant::now();
                match repo
                    .put_if_match(REPOSITORY_LOCK, ours.to_bytes(), &meta.object_version())
                    .await
                {
                    Ok(version) => {
                        return Ok(Self::start(repo, version, ours, write_started, true));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(StoreError::NotSupported { .. }) => {
                        match takeover_without_conditional_put(repo, &bytes, &ours).await? {
                            Some(version) => {
                                return Ok(Self::start(repo, version, ours, write_started, false));
                            }
                            None => {
                                stop.pause(poll.min(Duration::from_millis(200))).await?;
                                continue;
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(r) = record else {
                return Err(LockError::Unreadable {
                    repo: repo.location().to_owned(),
                    key: REPOSITORY_LOCK.to_owned(),
                    why: "not a spirekeep lease record".into(),
                });
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LockError::held(repo, r, &waited_note(options, started)));
            }
            tracing::info!(holder = %r.describe(), "repository locked; waiting");
            stop.pause(poll.min(left)).await?;
        }
    }

    fn start(
        repo: &Repository,
        version: ObjectVersion,
        record: LeaseRecord,
        write_started: Instant,
        conditional: bool,
    ) -> Self {
        Self::start_at(
            repo,
            REPOSITORY_LOCK.to_owned(),
            false,
            version,
            record,
            write_started,
            conditional,
        )
    }

    fn start_at(
        repo: &Repository,
        key: String,
        reader: bool,
        version: ObjectVersion,
        record: LeaseRecord,
        write_started: Instant,
        conditional: bool,
    ) -> Self {
        let ttl = record.ttl();
        let (lost, lost_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            key,
            current: Mutex::new((version, record)),
            held_until: Mutex::new(write_started + ttl - ttl / 6),
            lost,
            conditional: Mutex::new(conditional),
            renewing: tokio::sync::Mutex::new(()),
        });
        let renewer = tokio::spawn(renew_loop(repo.clone(), Arc::clone(&shared), ttl));
        Self {
            repo: repo.clone(),
            reader,
            shared,
            lost_rx,
            renewer,
            ttl,
        }
    }

    /// The record as last written.
    #[must_use]
    pub fn record(&self) -> LeaseRecord {
        lock_unpoisoned(&self.shared.current).1.clone()
    }

    /// The lease's TTL.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the lease is still surely ours. Call it before every
    /// destructive step.
    ///
    /// # Errors
    /// [`LockError::Lost`] once renewal failed, the lease was taken or broken,
    /// or the last successful renewal is too old.
    pub fn check(&self) -> Result<(), LockError> {
        if let Some(why) = self.lost_rx.borrow().clone() {
            return Err(self.lost_error(why));
        }
        if Instant::now() >= *lock_unpoisoned(&self.shared.held_until) {
            let why = "it could not be renewed in time".to_owned();
            self.shared.mark_lost(why.clone());
            return Err(self.lost_error(why));
        }
        Ok(())
    }

    /// Proves the lease is still ours right now, by renewing it (bounded by
    /// the time it is surely held). Call it right before committing work done
    /// under the lease: a lease broken or taken over meanwhile is noticed here
    /// even if the background renewal has not run since.
    ///
    /// # Errors
    /// [`LockError::Lost`] when the lease was broken, taken or could not be
    /// renewed before it was due to lapse.
    pub async fn confirm(&self) -> Result<(), LockError> {
        self.check()?;
        match renew_bounded(&self.repo, &self.shared, self.ttl).await {
            Ok(()) => Ok(()),
            Err(Renewal::Lost(why)) => {
                self.shared.mark_lost(why.clone());
                Err(self.lost_error(why))
            }
            // A transient failure: the last renewal still holds it for a while.
            Err(Renewal::Retry(why)) => {
                tracing::warn!(repo = %self.repo.location(), why, "could not renew the repository lease before committing");
                self.check()
            }
        }
    }

    /// Resolves when the lease is lost (never, while it is held).
    pub async fn lost(&self) -> LockError {
        let mut rx = self.lost_rx.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return self.lost_error(why);
            }
            if rx.changed().await.is_err() {
                // The renewal task is gone and the sender with it: keep waiting forever.
                std::future::pending::<()>().await;
            }
        }
    }

    fn lost_error(&self, why: String) -> LockError {
        LockError::Lost {
            repo: self.repo.location().to_owned(),
            why,
        }
    }

    /// Stops renewing and releases the lease (if it is still ours), so the
    /// next run need not wait for it to expire.
    ///
    /// # Errors
    /// A storage failure (the lease then expires on its own).
    pub async fn release(self) -> Result<(), LockError> {
        self.renewer.abort();
        if self.lost_rx.borrow().is_some() {
            return Ok(());
        }
        if self.reader {
            // A reader's lease is its own object: nobody takes it over.
            return match self.repo.delete(&self.shared.key).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let (version, mut record) = lock_unpoisoned(&self.shared.current).clone();
        record.released = true;
        record.renewed_at = OffsetDateTime::now_utc();
        record.expires_at = record.renewed_at;
        let conditional = *lock_unpoisoned(&self.shared.conditional);
        if conditional {
            match self
                .repo
                .put_if_match(REPOSITORY_LOCK, record.to_bytes(), &version)
                .await
            {
                Ok(_) | Err(StoreError::Conflict { .. }) => return Ok(()),
                Err(StoreError::NotSupported { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // No conditional writes: delete it if the record is still ours.
        match self
            .repo
            .get_capped(REPOSITORY_LOCK, MAX_CONTROL_BYTES)
            .await
        {
            Ok(bytes) => {
                if LeaseRecord::parse(&bytes).is_some_and(|r| r.holder == record.holder) {
                    self.repo.delete(REPOSITORY_LOCK).await?;
                }
                Ok(())
            }
            Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn check_ttl(ttl: Duration) -> Result<(), LockError> {
    if ttl < MIN_TTL {
        return Err(LockError::Invalid(format!(
            "the lease TTL must be at least {} s",
            MIN_TTL.as_secs()
        )));
    }
    Ok(())
}

fn poll_interval(ttl: Duration) -> Duration {
    (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

fn waited_note(options: &LockOptions, started: Instant) -> String {
    if options.wait.is_zero() {
        String::new()
    } else {
        format!(" (waited {} s)", started.elapsed().as_secs())
    }
}

/// The exclusive lease's record while someone holds it (`None`: free).
async fn live_exclusive(repo: &Repository) -> Result<Option<LeaseRecord>, LockError> {
    let Some(status) = inspect(repo).await? else {
        return Ok(None);
    };
    if status.state != LeaseState::Held {
        return Ok(None);
    }
    Ok(Some(status.record.unwrap_or_else(|| {
        LeaseRecord::unknown("unknown (unreadable lease)", status.last_modified)
    })))
}

/// The shared (reader) leases, each with its state.
///
/// # Errors
/// A storage failure.
pub async fn readers(repo: &Repository) -> Result<Vec<LeaseStatus>, LockError> {
    let mut out = Vec::new();
    for object in repo.list(READER_LEASES).await? {
        match repo
            .get_with_meta_capped(&object.key, MAX_CONTROL_BYTES)
            .await
        {
            Ok((bytes, meta)) => out.push(status_of(&bytes, &meta)),
            // Released between the list and the read.
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The records of the readers that hold a live shared lease.
async fn live_readers(repo: &Repository) -> Result<Vec<LeaseRecord>, LockError> {
    Ok(readers(repo)
        .await?
        .into_iter()
        .filter(|r| r.state == LeaseState::Held)
        .filter_map(|r| r.record)
        .collect())
}

async fn renew_loop(repo: Repository, shared: Arc<Shared>, ttl: Duration) {
    // This loop retries by itself and must see the lease running out between
    // tries: one try per request, never waiting longer than a third of the TTL.
    let repo = repo.with_retry(super::RetryPolicy {
        attempts: 1,
        attempt_timeout: ttl / 3,
        ..super::RetryPolicy::default()
    });
    let every = ttl / 3;
    let retry = (ttl / 12).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let held_until = *lock_unpoisoned(&shared.held_until);
        if Instant::now() >= held_until {
            shared.mark_lost("it could not be renewed in time".into());
            return;
        }
        match renew_bounded(&repo, &shared, ttl).await {
            Ok(()) => wait = every,
            Err(Renewal::Lost(why)) => {
                tracing::error!(repo = %repo.location(), why, "lost the repository lock");
                shared.mark_lost(why);
                return;
            }
            Err(Renewal::Retry(why)) => {
                tracing::warn!(repo = %repo.location(), why, "could not renew the repository lease; retrying");
                wait = retry.min(held_until.saturating_duration_since(Instant::now()));
            }
        }
    }
}

enum Renewal {
    Lost(String),
    Retry(String),
}

/// One renewal, given up when the lease is due to lapse: object_store retries
/// a failing request for minutes, longer than the lease lasts, and a holder
/// waiting that long would go on working without a lease.
async fn renew_bounded(repo: &Repository, shared: &Shared, ttl: Duration) -> Result<(), Renewal> {
    let _one = shared.renewing.lock().await;
    let held_until = *lock_unpoisoned(&shared.held_until);
    let left = held_until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Renewal::Lost("it could not be renewed in time".into()));
    }
    match tokio::time::timeout(left, renew_once(repo, shared, ttl)).await {
        Ok(result) => result,
        Err(_) => Err(Renewal::Lost(format!(
            "renewing it took longer than the {} s it was still held",
            left.as_secs()
        ))),
    }
}

async fn renew_once(repo: &Repository, shared: &Shared, ttl: Duration) -> Result<(), Renewal> {
    let (version, mut record) = lock_unpoisoned(&shared.current).clone();
    record.renewed_at = OffsetDateTime::now_utc();
    record.expires_at = record.renewed_at + ttl;
    let write_started = Instant::now();
    let conditional = *lock_unpoisoned(&shared.conditional);
    let written = if conditional {
        match repo
            .put_if_match(&shared.key, record.to_bytes(), &version)
            .await
        {
            Ok(v) => Ok(v),
            Err(StoreError::Conflict { .. }) => {
                // Either someone else wrote it, or our own retried request
                // already succeeded: read it to know which.
                match repo
                    .get_with_meta_capped(&shared.key, MAX_CONTROL_BYTES)
                    .await
                {
                    Ok((bytes, meta)) => match LeaseRecord::parse(&bytes) {
                        Some(r) if r == record => Ok(meta.object_version()),
                        Some(r) if r.holder == record.holder && r.released => {
                            return Err(Renewal::Lost(format!(
                                "the lease was broken by {}",
                                r.broken_by.as_deref().unwrap_or("someone")
                            )));
                        }
                        Some(r) => {
                            return Err(Renewal::Lost(format!(
                                "it is now held by {}",
                                r.describe()
                            )));
                        }
                        None => return Err(Renewal::Lost("the lock object was replaced".into())),
                    },
                    Err(StoreError::NotFound { .. }) => {
                        return Err(Renewal::Lost("the lock object was deleted".into()));
                    }
                    Err(e) => return Err(Renewal::Retry(e.to_string())),
                }
            }
            Err(StoreError::NotSupported { .. }) => {
                *lock_unpoisoned(&shared.conditional) = false;
                renew_by_overwrite(repo, &shared.key, &record).await
            }
            Err(e) => Err(Renewal::Retry(e.to_string())),
        }
    } else {
        renew_by_overwrite(repo, &shared.key, &record).await
    }?;
    *lock_unpoisoned(&shared.current) = (written, record);
    *lock_unpoisoned(&shared.held_until) = write_started + ttl - ttl / 6;
    Ok(())
}

/// Renewal on a store without conditional updates: overwrite only a record
/// that is still ours.
async fn renew_by_overwrite(
    repo: &Repository,
    key: &str,
    record: &LeaseRecord,
) -> Result<ObjectVersion, Renewal> {
    match repo.get_capped(key, MAX_CONTROL_BYTES).await {
        Ok(bytes) => match LeaseRecord::parse(&bytes) {
            Some(r) if r.holder == record.holder && !r.released => {}
            Some(r) if r.holder == record.holder => {
                return Err(Renewal::Lost("the lease was broken".into()));
            }
            Some(r) => return Err(Renewal::Lost(format!("it is now held by {}", r.describe()))),
            None => return Err(Renewal::Lost("the lock object was replaced".into())),
        },
        Err(StoreError::NotFound { .. }) => {
            return Err(Renewal::Lost("the lock object was deleted".into()));
        }
        Err(e) => return Err(Renewal::Retry(e.to_string())),
    }
    repo.put_overwrite(key, record.to_bytes())
        .await
        .map_err(|e| Renewal::Retry(e.to_string()))
}

/// Takes over the expired lease `expired` on a store without conditional
/// updates. Returns `None` when another process got there first (or is
/// taking it over right now).
async fn takeover_without_conditional_put(
    repo: &Repository,
    expired: &Bytes,
    ours: &LeaseRecord,
) -> Result<Option<ObjectVersion>, LockError> {
    let digest = Sha256::digest(expired);
    let claim: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let claim_key = format!("{TAKEOVER_PREFIX}{claim}");
    match repo.put_create(&claim_key, ours.to_bytes()).await {
        Ok(_) => {}
        Err(StoreError::AlreadyExists { .. }) => {
            // Someone is taking it over now; a claim whose taker died is
            // cleared once it is a TTL old.
            if let Some(claim_meta) = repo.head(&claim_key).await?
                && OffsetDateTime::now_utc() >= claim_meta.last_modified + DEFAULT_TTL
            {
                repo.delete(&claim_key).await?;
            }
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    let result = async {
        // Still the lease we judged expired?
        match repo.get_capped(REPOSITORY_LOCK, MAX_CONTROL_BYTES).await {
            Ok(now) if now == *expired => {}
            Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(LockError::from(e)),
        }
        repo.delete(REPOSITORY_LOCK).await?;
        match repo.put_create(REPOSITORY_LOCK, ours.to_bytes()).await {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    .await;
    repo.delete(&claim_key).await?;
    result
}

/// The lease as it is in the repository, or `None` when there is none.
///
/// # Errors
/// A storage failure.
pub async fn inspect(repo: &Repository) -> Result<Option<LeaseStatus>, LockError> {
    let (bytes, meta) = match repo
        .get_with_meta_capped(REPOSITORY_LOCK, MAX_CONTROL_BYTES)
        .await
    {
        Ok(found) => found,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(Some(status_of(&bytes, &meta)))
}

fn status_of(bytes: &[u8], meta: &ObjectMeta) -> LeaseStatus {
    let record = LeaseRecord::parse(bytes);
    let now = OffsetDateTime::now_utc();
    let state = match &record {
        Some(r) if r.released => LeaseState::Released,
        Some(r) if now >= r.expires_at => LeaseState::Expired,
        Some(_) => LeaseState::Held,
        None if now >= meta.last_modified + DEFAULT_TTL => LeaseState::Expired,
        None => LeaseState::Held,
    };
    let holder_process_gone = record.as_ref().and_then(holder_process_gone);
    LeaseStatus {
        state,
        record,
        last_modified: meta.last_modified,
        holder_process_gone,
    }
}

/// For a holder on this host: whether its process no longer exists.
fn holder_process_gone(record: &LeaseRecord) -> Option<bool> {
    if record.host != host_name() {
        return None;
    }
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    Some(!proc.join(record.pid.to_string()).exists())
}

/// What `lock break` did.
#[derive(Debug, Clone, Serialize)]
pub struct BreakOutcome {
    /// The lease before it was broken (`None`: there was none).
    pub before: Option<LeaseStatus>,
    /// Whether a live lease was broken (needs `force`).
    pub broke_live_lease: bool,
    /// Reader (verify) leases removed: expired ones always, live ones with `force`.
    pub readers_removed: usize,
}

/// Removes reader leases: expired ones always, live ones only with `force`
/// (their holders notice at their next renewal and stop).
async fn break_readers(repo: &Repository, force: bool) -> Result<usize, LockError> {
    let mut removed = 0;
    for object in repo.list(READER_LEASES).await? {
        let live = match repo
            .get_with_meta_capped(&object.key, MAX_CONTROL_BYTES)
            .await
        {
            Ok((bytes, meta)) => status_of(&bytes, &meta).state == LeaseState::Held,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if force || !live {
            match repo.delete(&object.key).await {
                Ok(()) => removed += 1,
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(removed)
}

/// Breaks the lease: marks it released so the next run proceeds. A lease that
/// is still held (not expired, holder not known to be gone) is broken only
/// with `force`; its holder notices at its next renewal and stops.
///
/// # Errors
/// [`LockError::Held`] for a live lease without `force`; storage failures.
pub async fn break_lease(repo: &Repository, force: bool) -> Result<BreakOutcome, LockError> {
    for _ in 0..5 {
        let (bytes, meta) = match repo
            .get_with_meta_capped(REPOSITORY_LOCK, MAX_CONTROL_BYTES)
            .await
        {
            Ok(found) => found,
            Err(StoreError::NotFound { .. }) => {
                return Ok(BreakOutcome {
                    before: None,
                    broke_live_lease: false,
                    readers_removed: break_readers(repo, force).await?,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let status = status_of(&bytes, &meta);
        let live = status.state == LeaseState::Held && status.holder_process_gone != Some(true);
        if live && !force {
            let r = status.record.clone().unwrap_or_else(|| {
                LeaseRecord::unknown("unknown (unreadable lease)", meta.last_modified)
            });
            return Err(LockError::Held {
                message: format!(
                    "{} is locked: {}, renewed {}, expires {}, and it is still being renewed; make sure \
                     that process is gone (or stopped), then run `spirekeep lock break --force`",
                    repo.location(),
                    r.describe(),
                    crate_rfc3339(r.renewed_at),
                    crate_rfc3339(r.expires_at)
                ),
                record: Box::new(r),
            });
        }
        let breaker = format!(
            "{} pid {} at {}",
            host_name(),
            std::process::id(),
            crate_rfc3339(OffsetDateTime::now_utc())
        );
        let mut record = status
            .record
            .clone()
            .unwrap_or_else(|| LeaseRecord::unknown("unknown", meta.last_modified));
        record.released = true;
        record.expires_at = OffsetDateTime::now_utc();
        record.broken_by = Some(breaker);
        match repo
            .put_if_match(REPOSITORY_LOCK, record.to_bytes(), &meta.object_version())
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => continue,
            Err(StoreError::NotSupported { .. }) => repo.delete(REPOSITORY_LOCK).await?,
            Err(e) => return Err(e.into()),
        }
        // Stale takeover claims go too.
        for claim in repo.list("locks/").await? {
            if claim.key.starts_with(TAKEOVER_PREFIX) {
                repo.delete(&claim.key).await?;
            }
        }
        return Ok(BreakOutcome {
            before: Some(status),
            broke_live_lease: live,
            readers_removed: break_readers(repo, force).await?,
        });
    }
    Err(LockError::Store(StoreError::Conflict {
        repo: repo.location().to_owned(),
        key: REPOSITORY_LOCK.to_owned(),
    }))
}

/// This machine's host name (best effort, no libc call).
#[must_use]
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".to_owned())
}

fn crate_rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn lock_unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(wait_ms: u64) -> LockOptions {
        LockOptions {
            purpose: "test".into(),
            ttl: Duration::from_secs(3),
            wait: Duration::from_millis(wait_ms),
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_release_frees_it() {
        let repo = Repository::in_memory();
        let a = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        let err = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap_err();
        assert!(err.is_held_by_another(), "{err}");
        assert!(err.to_string().contains("lock break"), "{err}");
        a.check().unwrap();
        a.release().await.unwrap();
        let status = inspect(&repo).await.unwrap().unwrap();
        assert_eq!(status.state, LeaseState::Released);
        let b = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        b.release().await.unwrap();
    }

    /// A stop signal ends a wait for a held lease at once (not at the end
    /// of the wait), for writers and readers alike, and takes nothing.
    #[tokio::test]
    async fn a_stop_signal_ends_the_wait_and_takes_nothing() {
        let repo = Repository::in_memory();
        let holder = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        let (signals, stop) = watch::channel(0u32);
        let started = Instant::now();
        let waiting = tokio::spawn({
            let repo = repo.clone();
            let stop = stop.clone();
            async move { RepositoryLock::acquire_unless_stopped(&repo, &opts(60_000), stop).await }
        });
        let reading = tokio::spawn({
            let repo = repo.clone();
            async move {
                RepositoryLock::acquire_shared_unless_stopped(&repo, &reading(60_000), stop).await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        signals.send(1).unwrap();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(matches!(err, LockError::Stopped), "{err}");
        let err = reading.await.unwrap().unwrap_err();
        assert!(matches!(err, LockError::Stopped), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        holder.check().unwrap();
        assert_eq!(
            readers(&repo).await.unwrap().len(),
            0,
            "no reader lease left"
        );
        holder.release().await.unwrap();
    }

    fn reading(wait_ms: u64) -> LockOptions {
        LockOptions {
            purpose: "verify".into(),
            ..opts(wait_ms)
        }
    }

    /// Issue 14: verify takes the lock shared with other readers and
    /// exclusive against prune (and every other exclusive holder).
    #[tokio::test]
    async fn readers_share_the_lock_and_exclude_an_exclusive_holder() {
        for repo in [Repository::in_memory(), {
            let dir = tempfile::tempdir().unwrap().keep();
            Repository::open(
                &format!("file://{}", dir.display()),
                &crate::store::RepoOptions::default(),
            )
            .unwrap()
        }] {
            let one = RepositoryLock::acquire_shared(&repo, &reading(0))
                .await
                .unwrap();
            let two = RepositoryLock::acquire_shared(&repo, &reading(0))
                .await
                .unwrap();
            assert!(one.is_shared() && two.is_shared());
            // a prune waits for both readers, then gives up naming one
            let err = RepositoryLock::acquire(
                &repo,
                &LockOptions {
                    purpose: "prune".into(),
                    ..opts(300)
                },
            )
            .await
            .unwrap_err();
            assert!(err.is_held_by_another(), "{err}");
            assert!(err.to_string().contains("verify by "), "{err}");
            // and left no exclusive lease behind
            assert_ne!(
                inspect(&repo).await.unwrap().map(|s| s.state),
                Some(LeaseState::Held)
            );
            one.release().await.unwrap();
            assert!(RepositoryLock::acquire(&repo, &opts(0)).await.is_err());
            two.release().await.unwrap();
            assert!(readers(&repo).await.unwrap().is_empty());
            let prune = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
            // a reader does not read while the prune holds it
            let err = RepositoryLock::acquire_shared(&repo, &reading(300))
                .await
                .unwrap_err();
            assert!(err.is_held_by_another(), "{err}");
            assert!(
                readers(&repo).await.unwrap().is_empty(),
                "no reader lease left"
            );
            // a waiting reader gets in once the prune is done
            let repo2 = repo.clone();
            let waiter = tokio::spawn(async move {
                RepositoryLock::acquire_shared(&repo2, &reading(5_000)).await
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            prune.release().await.unwrap();
            waiter.await.unwrap().unwrap().release().await.unwrap();
        }
    }

    /// A reader killed mid-verify blocks a prune only until its lease
    /// expires; `lock break --force` removes a live one, and its holder
    /// learns it lost the lease.
    #[tokio::test]
    async fn a_dead_reader_expires_and_a_live_one_can_be_broken() {
        let repo = Repository::in_memory();
        let dead = RepositoryLock::acquire_shared(&repo, &reading(0))
            .await
            .unwrap();
        drop(dead); // stops renewing, like a killed process
        assert!(RepositoryLock::acquire(&repo, &opts(0)).await.is_err());
        let late = RepositoryLock::acquire(&repo, &opts(6_000)).await.unwrap();
        late.release().await.unwrap();

        let live = RepositoryLock::acquire_shared(&repo, &reading(0))
            .await
            .unwrap();
        let outcome = break_lease(&repo, true).await.unwrap();
        assert_eq!(
            outcome.readers_removed, 2,
            "the expired reader and the live one"
        );
        let err = live.confirm().await.unwrap_err();
        assert!(matches!(err, LockError::Lost { .. }), "{err}");
        RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_it_is_released() {
        let repo = Repository::in_memory();
        let a = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        let repo2 = repo.clone();
        let waiter =
            tokio::spawn(async move { RepositoryLock::acquire(&repo2, &opts(5_000)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.release().await.unwrap();
        let b = waiter.await.unwrap().unwrap();
        b.release().await.unwrap();
    }

    #[tokio::test]
    async fn renewal_keeps_it_and_an_abandoned_lease_expires() {
        let repo = Repository::in_memory();
        let a = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        let first = a.record();
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        a.check().unwrap();
        assert!(a.record().expires_at > first.expires_at, "renewed");
        assert!(RepositoryLock::acquire(&repo, &opts(0)).await.is_err());
        drop(a); // killed: no release, no renewal
        let b = RepositoryLock::acquire(&repo, &opts(6_000)).await.unwrap();
        assert_ne!(b.record().holder, first.holder);
        b.release().await.unwrap();
    }

    #[tokio::test]
    async fn a_broken_lease_is_noticed_by_its_holder() {
        let repo = Repository::in_memory();
        let a = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        let err = break_lease(&repo, false).await.unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let out = break_lease(&repo, true).await.unwrap();
        assert!(out.broke_live_lease);
        let lost = tokio::time::timeout(Duration::from_secs(3), a.lost())
            .await
            .expect("the holder notices within a renewal period");
        assert!(lost.to_string().contains("broken"), "{lost}");
        assert!(a.check().is_err());
        let b = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        b.release().await.unwrap();
    }

    #[tokio::test]
    async fn local_filesystem_fallbacks() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(
            dir.path().to_str().unwrap(),
            &super::super::RepoOptions::default(),
        )
        .unwrap();
        let a = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        a.check().unwrap();
        assert!(
            a.record().renewed_at > a.record().acquired_at,
            "renewed by overwrite"
        );
        assert!(RepositoryLock::acquire(&repo, &opts(0)).await.is_err());
        drop(a);
        // Two processes find the same expired lease: exactly one takes it.
        tokio::time::sleep(Duration::from_millis(3_200)).await;
        let now = opts(0);
        let (x, y) = tokio::join!(
            RepositoryLock::acquire(&repo, &now),
            RepositoryLock::acquire(&repo, &now)
        );
        assert!(x.is_ok() != y.is_ok(), "exactly one wins: {x:?} / {y:?}");
        let winner = x.or(y).unwrap();
        winner.release().await.unwrap();
        assert!(
            inspect(&repo).await.unwrap().is_none(),
            "released by deletion"
        );
    }

    /// A store whose puts hang forever once `hang` is set (object_store
    /// retrying a failing request for minutes looks like this to the caller).
    #[derive(Debug)]
    struct HangingStore {
        inner: object_store::memory::InMemory,
        hang: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for HangingStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("HangingStore")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for HangingStore {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// Regression (issue 14): a renewal that hung (object_store retries for
    /// minutes) was waited for without a limit, so the holder never learnt
    /// that its lease had lapsed. It gives up when the lease is due to lapse.
    #[tokio::test]
    async fn a_hanging_renewal_loses_the_lease_in_time() {
        let store = Arc::new(HangingStore {
            inner: object_store::memory::InMemory::new(),
            hang: std::sync::atomic::AtomicBool::new(false),
        });
        let repo = Repository::from_object_store(store.clone(), "", "hanging://").unwrap();
        let a = RepositoryLock::acquire(&repo, &opts(0)).await.unwrap();
        store.hang.store(true, std::sync::atomic::Ordering::SeqCst);
        let lost = tokio::time::timeout(Duration::from_secs(4), a.lost())
            .await
            .expect("lost within the TTL, not after the hung request");
        assert!(lost.to_string().contains("lock was lost"), "{lost}");
        // And a commit fence says so at once.
        let err = tokio::time::timeout(Duration::from_secs(1), a.confirm())
            .await
            .expect("confirm does not hang")
            .unwrap_err();
        assert!(err.to_string().contains("lock was lost"), "{err}");
    }

    /// A fence confirms a live lease (renewing it) and refuses a broken one
    /// at once, before the background renewal notices.
    #[tokio::test]
    async fn confirm_renews_a_live_lease_and_refuses_a_broken_one() {
        let repo = Repository::in_memory();
        let mut long = opts(0);
        long.ttl = Duration::from_secs(600);
        let a = RepositoryLock::acquire(&repo, &long).await.unwrap();
        let before = a.record().renewed_at;
        a.confirm().await.unwrap();
        assert!(a.record().renewed_at >= before);
        break_lease(&repo, true).await.unwrap();
        a.check().unwrap(); // the background renewal has not run yet
        let err = a.confirm().await.unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
        assert!(a.check().is_err());
    }
}
