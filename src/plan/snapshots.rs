//! Glue to the snapshot operations a plan uses: the pre-upgrade backup
//! (taken under the repository lock), its verification, the pin that keeps
//! it through prune until the plan finishes, and the restore on failure.
//! Nothing here reimplements them; it only chooses their options.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::datastore::OpenMode;
use crate::error::{Error, Result};
use crate::snapshot::Manifest;
use crate::snapshot::backup::{BackupOptions, Quiet, backup};
use crate::snapshot::codec::sha256_hex;
use crate::snapshot::live_rules::RuleOptions;
use crate::snapshot::manifest::list_snapshots;
use crate::snapshot::pins;
use crate::snapshot::restore::{self, RestoreOptions};
use crate::snapshot::verify::{self, VerifyMode};
use crate::store::Repository;
use crate::store::keys::SnapshotId;
use crate::store::lease_run::LeaseRun;
use crate::store::lock::{self, LockOptions, RepositoryLock};

use super::facts::open_datastore;
use super::file::Plan;
use super::model::PRE_UPGRADE_LABEL;

/// How long `apply` waits for a repository lock held by a backup or prune.
const LOCK_WAIT: Duration = Duration::from_secs(300);

/// The longest label a snapshot may carry (`backup::validate_label`).
const MAX_LABEL: usize = 64;

/// The label that ties a snapshot to its plan: `plan-<plan id>`. A plan id
/// too long for a label (a long plan name) keeps its time stamp and gains a
/// hash of the whole id, so two runs of one plan name never share a label
/// (a resume must never pick up another run's snapshot).
#[must_use]
pub fn plan_label(plan_id: &str) -> String {
    let label = format!("plan-{plan_id}");
    if label.len() <= MAX_LABEL {
        return label;
    }
    let (name, stamp) = plan_id.rsplit_once('-').unwrap_or((plan_id, ""));
    let hash = sha256_hex(plan_id.as_bytes());
    let hash = &hash[..12];
    // plan-<name prefix>-<hash>-<stamp>
    let room = MAX_LABEL.saturating_sub(5 + 1 + hash.len() + 1 + stamp.len());
    let prefix: String = name.chars().take(room).collect();
    let prefix = prefix.trim_end_matches(['-', '.', '_']);
    format!("plan-{prefix}-{hash}-{stamp}")
}

/// The work under `lock`, stopped before it commits when the lease is lost
/// or a stop signal arrives.
fn lease_run(lock: &RepositoryLock, signals: Option<watch::Receiver<u32>>) -> LeaseRun<'_> {
    let run = LeaseRun::new(lock);
    match signals {
        Some(s) => run.with_signals(
            s,
            1,
            "interrupted by a signal before it committed; nothing was changed: `spirekeep apply --resume` continues",
        ),
        None => run,
    }
}

/// Takes the repository lock, waiting for another holder. A lease left by
/// an earlier run of the same plan whose process is gone (an `apply` killed
/// on this host) is broken at once instead of waiting for it to expire.
async fn acquire(repo: &Repository, plan_id: &str, purpose: String) -> Result<RepositoryLock> {
    if let Ok(Some(status)) = lock::inspect(repo).await {
        let ours = status
            .record
            .as_ref()
            .is_some_and(|r| r.purpose.contains(plan_id) && !r.released);
        if ours && status.holder_process_gone == Some(true) {
            tracing::info!("breaking the repository lease an interrupted run of {plan_id} left");
            let _ = lock::break_lease(repo, false).await;
        }
    }
    let purpose = format!("{purpose} [{plan_id}]");
    Ok(RepositoryLock::acquire(
        repo,
        &LockOptions {
            wait: LOCK_WAIT,
            ..LockOptions::new(purpose)
        },
    )
    .await?)
}

/// A snapshot of this plan taken since `since` that already exists (a
/// resumed `apply` that was killed after its backup finished reuses it).
///
/// # Errors
/// Storage failures.
pub async fn find_existing(
    repo: &Repository,
    plan_id: &str,
    since: OffsetDateTime,
) -> Result<Option<Manifest>> {
    let label = plan_label(plan_id);
    let ids = list_snapshots(repo).await?;
    // ids sort by start time; the plan's snapshot is not older than the plan
    let since = since - time::Duration::minutes(5);
    for id in ids.iter().rev().take_while(|id| id.time() >= since) {
        let m = Manifest::load(repo, id).await?;
        if m.labels.iter().any(|l| l == &label) {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

/// Takes (or finds) the pre-upgrade snapshot, verifies it and pins it for
/// the plan, all while holding the repository lock so a prune cannot remove
/// it between the backup and the pin.
///
/// # Errors
/// Backup, verification, lock or storage failures.
pub async fn take_pre_upgrade(
    plan: &Plan,
    repo: &Repository,
    plan_id: &str,
    reuse_since: Option<OffsetDateTime>,
    signals: Option<watch::Receiver<u32>>,
) -> Result<(Manifest, String)> {
    let lock = acquire(
        repo,
        plan_id,
        format!("pre-upgrade snapshot of plan {plan_id}"),
    )
    .await?;
    let result = lease_run(&lock, signals).run(async {
        let existing = match reuse_since {
            Some(since) => find_existing(repo, plan_id, since).await?,
            None => None,
        };
        let (manifest, reused) = match existing {
            Some(m) => (m, true),
            None => {
                let (ds, _) = open_datastore(plan, OpenMode::ReadOnly).await?;
                let options = BackupOptions {
                    labels: vec![PRE_UPGRADE_LABEL.into(), plan_label(plan_id)],
                    ..BackupOptions::default()
                };
                let m = backup(ds.as_ref(), repo, &options, &Quiet).await;
                ds.close().await;
                (m?, false)
            }
        };
        lock.check()?;
        let verified = verify(repo, &manifest).await?;
        lock.check()?;
        pins::pin(
            repo,
            &manifest.snapshot_id,
            plan_id,
            &format!("pre-upgrade snapshot of plan {plan_id}; unpinned when the plan finishes"),
        )
        .await?;
        let detail = format!(
            "snapshot {} ({} rows in {} tables, schema {}, code_version {}){}; {verified}; pinned for {plan_id}",
            manifest.snapshot_id,
            manifest.total_rows(),
            manifest.tables.len(),
            manifest.spire.schema_version,
            manifest.spire.code_version,
            if reused { ", taken by the interrupted run" } else { "" },
        );
        Ok::<_, Error>((manifest, detail))
    })
    .await;
    let _ = lock.release().await;
    result
}

/// Verifies the snapshot deeply before anything changes: every object
/// re-read with every size and hash checked, and a restore drill into a
/// scratch SQLite file whose tables are read back and compared (the outcome
/// is recorded in the repository). A snapshot that cannot be restored must
/// be found now, not in the middle of a rollback.
async fn verify(repo: &Repository, manifest: &Manifest) -> Result<String> {
    let report = verify::verify(repo, manifest, VerifyMode::Deep).await?;
    if report.ok {
        Ok(format!(
            "deep-verified ({} objects, {} rows re-read, every hash matches; restore drill into scratch: every table read back matches)",
            report.objects, report.rows
        ))
    } else {
        Err(Error::Integrity(format!(
            "the pre-upgrade snapshot {} failed verification: {}",
            manifest.snapshot_id,
            report.problems.join("; ")
        )))
    }
}

/// Releases the plan's pin.
///
/// # Errors
/// Storage failures.
pub async fn unpin(repo: &Repository, snapshot_id: &str, plan_id: &str) -> Result<bool> {
    let id = SnapshotId::parse(snapshot_id).map_err(|e| Error::Unsupported(e.to_string()))?;
    pins::unpin(repo, &id, plan_id).await
}

/// Restores the snapshot into the plan's datastore, replacing what is there,
/// under the repository lock. The restore checks every hash before it
/// touches the datastore and is all or nothing.
///
/// # Errors
/// Restore failures (the target is then left as it was).
pub async fn restore_pre_upgrade(
    plan: &Plan,
    repo: &Repository,
    plan_id: &str,
    snapshot_id: &str,
    signals: Option<watch::Receiver<u32>>,
) -> Result<Manifest> {
    let id = SnapshotId::parse(snapshot_id).map_err(|e| Error::Unsupported(e.to_string()))?;
    let manifest = Manifest::load(repo, &id).await?;
    let lock = acquire(
        repo,
        plan_id,
        format!("restore of the pre-upgrade snapshot {id} (plan rollback)"),
    )
    .await?;
    let result = restore_under_lease(plan, repo, &manifest, &lock, signals).await;
    let _ = lock.release().await;
    result.map(|()| manifest)
}

/// The rollback's restore while `lock` is held. It is watched like every
/// other operation under the lease (a lost lease or a signal stops it before
/// it commits), and the restore itself asks the lease right before its
/// commit, so a lease broken since the last renewal is noticed there too:
/// the datastore is then left as it was.
async fn restore_under_lease(
    plan: &Plan,
    repo: &Repository,
    manifest: &Manifest,
    lock: &RepositoryLock,
    signals: Option<watch::Receiver<u32>>,
) -> Result<()> {
    lease_run(lock, signals)
        .run(async {
            let (ds, _) = open_datastore(plan, OpenMode::ReadWrite).await?;
            // The live datastore is there by definition: its agents (some
            // renewed their SVID during the upgrade) are kept unless the plan
            // says otherwise; the safety rules are on.
            let options = RestoreOptions {
                replace: true,
                rules: RuleOptions {
                    keep_live_agents: plan.keep_live_agents_on_rollback,
                    ..RuleOptions::default()
                },
                ..RestoreOptions::default()
            };
            let restored = async {
                let restore_plan =
                    restore::plan(repo, manifest, ds.as_ref(), &options, &restore::Quiet).await?;
                restore::execute_fenced(
                    repo,
                    manifest,
                    ds.as_ref(),
                    &restore_plan,
                    &restore::Quiet,
                    lock,
                )
                .await
            }
            .await;
            ds.close().await;
            // A restore that does not match what it restored is an
            // integrity error naming the tables (execute_fenced says so).
            restored.map(|_| ())
        })
        .await
}

/// The plan's rehearsal before its first hop: the pre-upgrade snapshot
/// restored into a scratch datastore and `release`'s `spire-server` started
/// on it. `Ok(detail)` when that release accepts the data; `Err(why)` when it
/// refuses it (SPIRE's own error) or the rehearsal could not run: either way
/// nothing of the deployment was changed.
pub async fn rehearse_first_hop(
    plan: &Plan,
    repo: &Repository,
    snapshot_id: &SnapshotId,
    release: &str,
) -> std::result::Result<Option<String>, String> {
    use crate::rehearse::{RehearsalOptions, Scratch, rehearse};
    let Some(r) = &plan.rehearsal else {
        return Ok(None);
    };
    let scratch = match &r.scratch_env {
        None => Scratch::TemporaryFile,
        Some(var) => {
            let value = std::env::var(var).map_err(|_| {
                format!("rehearsal.scratch_env: the environment variable {var} is not set")
            })?;
            let spec = crate::datastore::dsn::parse(&value, None, &plan.spire_workdir)
                .map_err(|e| format!("rehearsal scratch ({var}): {e}"))?;
            Scratch::Given {
                connection_string: crate::datastore::dsn::spire_connection_string(&value, &spec)
                    .map_err(|e| format!("rehearsal scratch ({var}): {e}"))?,
                spec: Box::new(spec),
            }
        }
    };
    let binary = r.binary_for(release);
    let options = RehearsalOptions {
        spire_server: binary.clone(),
        scratch,
        trust_domain: None,
        timeout: r.timeout,
    };
    let report = rehearse(repo, snapshot_id, &options)
        .await
        .map_err(|e| format!("the rehearsal with {} could not run: {e}", binary.display()))?;
    let row = |s: &Option<crate::rehearse::SchemaRow>| {
        s.as_ref().map_or_else(
            || "no migrations row".to_string(),
            |s| {
                format!(
                    "(schema {}, code_version {})",
                    s.schema_version, s.code_version
                )
            },
        )
    };
    if report.accepted {
        Ok(Some(format!(
            "rehearsal: {} ({}) accepts the snapshot and leaves {}",
            binary.display(),
            report.spire_version,
            row(&report.schema_after)
        )))
    } else {
        Err(format!(
            "rehearsal: {} ({}) refuses the snapshot: {}",
            binary.display(),
            report.spire_version,
            report
                .spire_error
                .as_deref()
                .unwrap_or("it did not become healthy")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 14): the rollback's restore committed without asking
    /// the lease, so a lease broken after its last renewal (the watcher only
    /// notices at the next one, a third of the TTL later) did not stop it.
    /// Now the restore confirms the lease right before its commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rollback_restore_does_not_commit_on_a_broken_lease() {
        use crate::datastore::testkit::{Population, create_spire_datastore};
        use crate::datastore::{self, Datastore, Engine, dsn};
        use crate::snapshot::backup::BackupOptions;
        use crate::store::RepoOptions;

        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("datastore.sqlite3");
        let conn = db.display().to_string();
        let spec = dsn::parse(&conn, Some(Engine::Sqlite), std::path::Path::new("/")).unwrap();
        let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
        create_spire_datastore(ds.as_ref(), &Population::new(5))
            .await
            .unwrap();
        let repo_url = format!("file://{}", dir.path().join("repo").display());
        let repo = Repository::open(&repo_url, &RepoOptions::default()).unwrap();
        let manifest = backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
            .await
            .unwrap();
        // What the rollback must not overwrite: a change made after the snapshot.
        ds.execute_script("DELETE FROM join_tokens; INSERT INTO join_tokens (token, expiry) VALUES ('after-the-snapshot', 1)")
            .await
            .unwrap();
        async fn tokens(ds: &dyn Datastore) -> Vec<(Option<String>, u64)> {
            ds.count_by("join_tokens", "token").await.unwrap()
        }
        let before = tokens(ds.as_ref()).await;
        assert_eq!(before, vec![(Some("after-the-snapshot".into()), 1)]);
        ds.close().await;

        let toml = format!(
            r#"
format = 1
name = "t"
target = "1.15.3"
[datastore]
connection_string = "{conn}"
[repository]
url = "{repo_url}"
[executor]
kind = "command"
[executor.commands]
version = "true"
upgrade = "true"
rollback = "true"
stop = "true"
start = "true"
[servers]
members = [{{ name = "s1" }}]
"#
        );
        let mut pf = super::super::file::parse(&toml).unwrap();
        pf.absolutize(dir.path());
        let plan = pf.validate().unwrap();

        // A long TTL: the background renewal would not notice for 20 s.
        let lock = RepositoryLock::acquire(
            &repo,
            &LockOptions {
                ttl: Duration::from_secs(60),
                ..LockOptions::new("rollback test")
            },
        )
        .await
        .unwrap();
        lock::break_lease(&repo, true).await.unwrap();
        let err = restore_under_lease(&plan, &repo, &manifest, &lock, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Lock(_)), "{err}");

        let ds = datastore::open(&spec, OpenMode::ReadWrite).await.unwrap();
        assert_eq!(
            tokens(ds.as_ref()).await,
            before,
            "the datastore is as it was"
        );
        ds.close().await;
    }

    #[test]
    fn plan_labels_keep_the_time_and_stay_unique() {
        assert_eq!(
            plan_label("upgrade-20261204T101500Z"),
            "plan-upgrade-20261204T101500Z"
        );
        let name = "a".repeat(64);
        let one = plan_label(&format!("{name}-20261204T101500Z"));
        let two = plan_label(&format!("{name}-20261204T101501Z"));
        for l in [&one, &two] {
            assert!(l.len() <= MAX_LABEL, "{l}");
            crate::snapshot::backup::validate_label(l).unwrap();
        }
        assert!(one.ends_with("-20261204T101500Z"), "{one}");
        assert_ne!(one, two);
        // same name and time, different hash input: a different label
        let other = plan_label(&format!("{}b-20261204T101500Z", "a".repeat(63)));
        assert_ne!(one, other);
    }
}
