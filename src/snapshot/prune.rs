//! `prune`: apply a retention policy to a repository, plan first.
//!
//! [`plan`] reads the repository (snapshots, verification records, pins,
//! objects without a manifest) and returns a [`PrunePlan`] that names every
//! snapshot kept (with each reason) or deleted, and every leftover object
//! group deleted or left alone (with why). `prune --dry-run` prints it;
//! [`execute`] deletes exactly what it names, under the repository lock.
//!
//! What is never deleted, whatever the policy:
//! - a pinned snapshot ([`super::pins`]), or one carrying a label given with
//!   `--pin-label`;
//! - the newest snapshot whose newest verification succeeded;
//! - objects of a snapshot that has no manifest yet but were written less than
//!   the grace period ago: that may be a backup in progress. Backups also hold
//!   the repository lock, which prune holds for its whole run, so the grace
//!   period is a second line of defence (against a backup by a process that
//!   lost its lease, or by a tool that does not take the lock);
//! - anything under `snapshots/` that is not named like a snapshot.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use time::{Duration, OffsetDateTime};

use super::backup::delete_snapshot;
use super::listing::{ManifestRead, read_manifest};
use super::manifest::VerificationRecord;
use super::pins::{Pin, list_pins, pins_of};
use super::retention::{RetentionPolicy, SnapshotFacts, plan_prune};
use crate::error::{Error, Result};
use crate::store::keys::{self, SnapshotId};
use crate::store::lock::RepositoryLock;
use crate::store::{ObjectMeta, Repository, StoreError};

/// Default grace period for objects without a manifest.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::hours(24);

/// How to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub policy: RetentionPolicy,
    /// Snapshots carrying any of these labels are kept.
    pub pin_labels: Vec<String>,
    /// Objects of a snapshot without a manifest are deleted only once the
    /// newest of them is at least this old.
    pub orphan_grace: Duration,
    /// The time the plan is made for (now, except in tests).
    pub now: OffsetDateTime,
}

impl PruneOptions {
    /// `policy` with the default grace period, no pin labels, now.
    #[must_use]
    pub fn new(policy: RetentionPolicy) -> Self {
        Self {
            policy,
            pin_labels: Vec::new(),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            now: OffsetDateTime::now_utc(),
        }
    }
}

/// One snapshot's fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotDecision {
    pub id: SnapshotId,
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    /// Why it is kept (empty for a deleted snapshot).
    pub reasons: Vec<String>,
    /// Objects it owns: manifest, data objects and verification records.
    pub objects: u64,
    /// Their stored bytes.
    pub bytes: u64,
}

/// What a group of leftover objects is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftoverKind {
    /// Data objects under `snapshots/<id>/` without a manifest (a backup that
    /// never finished, or one in progress).
    SnapshotWithoutManifest,
    /// Verification records of a snapshot that no longer exists.
    VerificationsWithoutSnapshot,
    /// A file:// upload's staging file (`<key>#<n>`) a killed write left:
    /// in no listing, so nothing else would ever remove it.
    UploadStaging,
}

/// One group of leftover objects and what happens to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeftoverDecision {
    pub kind: LeftoverKind,
    /// The folder, e.g. `snapshots/<id>/`.
    pub prefix: String,
    pub objects: u64,
    pub bytes: u64,
    /// When the newest of its objects was written (or the snapshot id's
    /// time, if later).
    #[serde(with = "time::serde::rfc3339")]
    pub newest: OffsetDateTime,
    pub delete: bool,
    pub reason: String,
    #[serde(skip)]
    keys: Vec<String>,
}

/// Everything a prune would do, computed before anything is deleted.
#[derive(Debug, Clone, Serialize)]
pub struct PrunePlan {
    pub repository: String,
    pub policy: RetentionPolicy,
    pub pin_labels: Vec<String>,
    pub orphan_grace_seconds: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub planned_at: OffsetDateTime,
    /// Kept snapshots, newest first.
    pub keep: Vec<SnapshotDecision>,
    /// Snapshots to delete, newest first.
    pub delete: Vec<SnapshotDecision>,
    /// Leftover object groups (deleted or left alone).
    pub leftovers: Vec<LeftoverDecision>,
    /// Folders under `snapshots/` not named like a snapshot: never touched.
    pub foreign: Vec<String>,
    /// Pins on snapshots that do not exist (left for their holders).
    pub dangling_pins: Vec<Pin>,
}

impl PrunePlan {
    /// Objects and bytes the plan deletes.
    #[must_use]
    pub fn deleted_totals(&self) -> (u64, u64) {
        let snaps = self.delete.iter().map(|d| (d.objects, d.bytes));
        let left = self
            .leftovers
            .iter()
            .filter(|l| l.delete)
            .map(|l| (l.objects, l.bytes));
        snaps
            .chain(left)
            .fold((0, 0), |(o, b), (o2, b2)| (o + o2, b + b2))
    }
}

/// What a prune run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneOutcome {
    pub snapshots_deleted: Vec<SnapshotId>,
    pub leftovers_deleted: Vec<String>,
    pub objects_deleted: u64,
    pub bytes_deleted: u64,
    /// Snapshots the plan would have deleted but that were pinned meanwhile.
    pub skipped: Vec<String>,
}

#[derive(Default)]
struct Folder {
    manifest: bool,
    objects: Vec<ObjectMeta>,
}

/// Refuses a policy without any rule: it would delete every snapshot.
///
/// # Errors
/// [`Error::Unsupported`] for an empty policy.
pub fn check_policy(policy: &RetentionPolicy) -> Result<()> {
    if policy.is_empty() {
        return Err(Error::Unsupported(
            "no retention rule given: set at least one of --keep-last, --keep-hourly, --keep-daily, \
             --keep-weekly, --keep-monthly above 0 (a policy without rules would delete every snapshot)"
                .into(),
        ));
    }
    Ok(())
}

/// Reads the repository and plans a prune.
///
/// # Errors
/// A policy without any rule (it would delete everything), or a storage failure.
pub async fn plan(repo: &Repository, options: &PruneOptions) -> Result<PrunePlan> {
    check_policy(&options.policy)?;
    let mut foreign = BTreeSet::new();
    let mut folders: BTreeMap<SnapshotId, Folder> = BTreeMap::new();
    for meta in repo.list(keys::SNAPSHOTS).await? {
        let rest = &meta.key[keys::SNAPSHOTS.len()..];
        let Some((segment, file)) = rest.split_once('/') else {
            foreign.insert(meta.key.clone());
            continue;
        };
        let Ok(id) = SnapshotId::parse(segment) else {
            foreign.insert(format!("{}{segment}/", keys::SNAPSHOTS));
            continue;
        };
        let folder = folders.entry(id).or_default();
        if file == keys::MANIFEST_FILE {
            folder.manifest = true;
        }
        folder.objects.push(meta);
    }
    let mut verifications: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for meta in repo.list(keys::VERIFICATIONS).await? {
        let rest = &meta.key[keys::VERIFICATIONS.len()..];
        let segment = rest.split_once('/').map_or(rest, |(s, _)| s).to_owned();
        verifications.entry(segment).or_default().push(meta);
    }
    let pins = list_pins(repo).await?;
    let mut pins_by_id: BTreeMap<SnapshotId, Vec<&Pin>> = BTreeMap::new();
    for p in &pins {
        pins_by_id.entry(p.snapshot_id.clone()).or_default().push(p);
    }

    let mut facts = Vec::new();
    let mut sizes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, folder) in folders.iter().filter(|(_, f)| f.manifest) {
        let records = verifications.get(id.as_str());
        let mut pinned: Vec<String> = pins_by_id
            .get(id)
            .map(|ps| ps.iter().map(|p| p.describe()).collect())
            .unwrap_or_default();
        // Every manifest is read: only snapshots whose manifest reads count
        // for the rules (a damaged one is kept for inspection, never counted).
        let damaged = match read_manifest(repo, id).await? {
            ManifestRead::Readable(m) => {
                for label in m.labels.iter().filter(|l| options.pin_labels.contains(l)) {
                    pinned.push(format!("label {label} (--pin-label)"));
                }
                None
            }
            ManifestRead::Damaged(why) => Some(why),
            // Deleted since the listing: nothing left to decide.
            ManifestRead::Gone => continue,
        };
        facts.push(SnapshotFacts {
            id: id.to_string(),
            taken_at: id.time(),
            pinned_by: (!pinned.is_empty()).then(|| pinned.join("; ")),
            verified: newest_verification_ok(repo, records).await?,
            damaged,
        });
        let (mut objects, mut bytes) = (0u64, 0u64);
        for m in folder.objects.iter().chain(records.into_iter().flatten()) {
            objects += 1;
            bytes += m.size;
        }
        sizes.insert(id.to_string(), (objects, bytes));
    }
    let decided = plan_prune(&options.policy, &facts);
    let convert = |d: &super::retention::Decision| {
        let (objects, bytes) = sizes.get(&d.id).copied().unwrap_or_default();
        SnapshotDecision {
            id: SnapshotId::parse(&d.id).expect("ids come from parsed folders"),
            taken_at: d.taken_at,
            reasons: d.reasons.clone(),
            objects,
            bytes,
        }
    };
    let keep: Vec<SnapshotDecision> = decided.keep.iter().map(convert).collect();
    let delete: Vec<SnapshotDecision> = decided.delete.iter().map(convert).collect();

    let grace = options.orphan_grace;
    let mut leftovers = Vec::new();
    for (id, folder) in folders.iter().filter(|(_, f)| !f.manifest) {
        let newest = folder
            .objects
            .iter()
            .map(|m| m.last_modified)
            .max()
            .unwrap_or(id.time())
            .max(id.time());
        leftovers.push(leftover(
            LeftoverKind::SnapshotWithoutManifest,
            keys::snapshot_prefix(id),
            &folder.objects,
            newest,
            options.now,
            grace,
        ));
    }
    for (segment, records) in &verifications {
        let exists = SnapshotId::parse(segment)
            .ok()
            .and_then(|id| folders.get(&id))
            .is_some_and(|f| f.manifest);
        if exists {
            continue;
        }
        let newest = records
            .iter()
            .map(|m| m.last_modified)
            .max()
            .unwrap_or(options.now);
        leftovers.push(leftover(
            LeftoverKind::VerificationsWithoutSnapshot,
            format!("{}{segment}/", keys::VERIFICATIONS),
            records,
            newest,
            options.now,
            grace,
        ));
    }
    for staging in repo.upload_staging_files("")? {
        let newest = staging.last_modified;
        leftovers.push(leftover(
            LeftoverKind::UploadStaging,
            staging.key.clone(),
            std::slice::from_ref(&staging),
            newest,
            options.now,
            grace,
        ));
    }
    let dangling_pins = pins
        .iter()
        .filter(|p| !folders.get(&p.snapshot_id).is_some_and(|f| f.manifest))
        .cloned()
        .collect();
    Ok(PrunePlan {
        repository: repo.location().to_owned(),
        policy: options.policy,
        pin_labels: options.pin_labels.clone(),
        orphan_grace_seconds: grace.whole_seconds(),
        planned_at: options.now,
        keep,
        delete,
        leftovers,
        foreign: foreign.into_iter().collect(),
        dangling_pins,
    })
}

fn leftover(
    kind: LeftoverKind,
    prefix: String,
    objects: &[ObjectMeta],
    newest: OffsetDateTime,
    now: OffsetDateTime,
    grace: Duration,
) -> LeftoverDecision {
    let age = now - newest;
    let delete = age >= grace;
    let what = match kind {
        LeftoverKind::SnapshotWithoutManifest => "no manifest",
        LeftoverKind::VerificationsWithoutSnapshot => "verification records of a deleted snapshot",
        LeftoverKind::UploadStaging => "an unfinished upload's staging file",
    };
    let reason = if delete {
        format!(
            "{what}, last written {} ago (grace {})",
            short_duration(age),
            short_duration(grace)
        )
    } else if kind == LeftoverKind::SnapshotWithoutManifest {
        format!(
            "{what}, last written {} ago: a backup in progress or one that stopped less than {} ago",
            short_duration(age.max(Duration::ZERO)),
            short_duration(grace)
        )
    } else {
        format!(
            "{what}, last written {} ago: younger than the grace period {}",
            short_duration(age.max(Duration::ZERO)),
            short_duration(grace)
        )
    };
    LeftoverDecision {
        kind,
        prefix,
        objects: u64::try_from(objects.len()).unwrap_or(u64::MAX),
        bytes: objects.iter().map(|m| m.size).sum(),
        newest,
        delete,
        reason,
        keys: objects.iter().map(|m| m.key.clone()).collect(),
    }
}

/// Whether the newest verification record of a snapshot says ok. A record
/// that cannot be read counts as not verified.
async fn newest_verification_ok(
    repo: &Repository,
    records: Option<&Vec<ObjectMeta>>,
) -> Result<bool> {
    // Keys of one snapshot sort by time.
    let Some(newest) = records.and_then(|r| r.iter().max_by(|a, b| a.key.cmp(&b.key))) else {
        return Ok(false);
    };
    match repo
        .get_capped(&newest.key, crate::store::MAX_RECORD_BYTES)
        .await
    {
        Ok(bytes) => Ok(VerificationRecord::from_json(&bytes).is_ok_and(|r| r.ok)),
        Err(StoreError::NotFound { .. } | StoreError::TooLarge { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes what `plan` says, checking before every step that the repository
/// lock is still held and, before deleting a snapshot, that nobody pinned it
/// since the plan was made.
///
/// # Errors
/// The lock was lost (nothing more is deleted), or a storage failure.
pub async fn execute(
    repo: &Repository,
    plan: &PrunePlan,
    lock: &RepositoryLock,
) -> Result<PruneOutcome> {
    execute_observed(repo, plan, lock, &|_: &str, _: u64| {}).await
}

/// [`execute`], calling `deleted(what, bytes)` after each snapshot or
/// leftover group is gone, for progress.
///
/// # Errors
/// As [`execute`].
pub async fn execute_observed(
    repo: &Repository,
    plan: &PrunePlan,
    lock: &RepositoryLock,
    deleted: &(dyn Fn(&str, u64) + Send + Sync),
) -> Result<PruneOutcome> {
    let mut out = PruneOutcome::default();
    for d in &plan.delete {
        lock.check()?;
        let pins = pins_of(repo, &d.id).await?;
        if !pins.is_empty() {
            out.skipped
                .push(format!("{} ({})", d.id, pins[0].describe()));
            continue;
        }
        let mut objects = delete_snapshot(repo, &d.id).await?;
        for m in repo.list(&keys::verifications_prefix(&d.id)).await? {
            repo.delete(&m.key).await?;
            objects += 1;
        }
        out.objects_deleted += objects;
        out.bytes_deleted += d.bytes;
        out.snapshots_deleted.push(d.id.clone());
        deleted(&format!("snapshot {}", d.id), d.bytes);
    }
    for l in plan.leftovers.iter().filter(|l| l.delete) {
        lock.check()?;
        if l.kind == LeftoverKind::SnapshotWithoutManifest {
            // A manifest that appeared since makes it a snapshot after all.
            let manifest = format!("{}{}", l.prefix, keys::MANIFEST_FILE);
            if repo.head(&manifest).await?.is_some() {
                out.skipped
                    .push(format!("{} (its manifest appeared)", l.prefix));
                continue;
            }
        }
        for key in &l.keys {
            if l.kind == LeftoverKind::UploadStaging {
                repo.delete_upload_staging_file(key)?;
            } else {
                repo.delete(key).await?;
            }
            out.objects_deleted += 1;
        }
        out.bytes_deleted += l.bytes;
        out.leftovers_deleted.push(l.prefix.clone());
        deleted(&l.prefix, l.bytes);
    }
    Ok(out)
}

/// `3d 4h`, `25m`, `12s`: a duration for people.
#[must_use]
pub fn short_duration(d: Duration) -> String {
    let s = d.whole_seconds().max(0);
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        if hours > 0 {
            format!("{days}d {hours}h")
        } else {
            format!("{days}d")
        }
    } else if hours > 0 {
        if minutes > 0 {
            format!("{hours}h {minutes}m")
        } else {
            format!("{hours}h")
        }
    } else if minutes > 0 {
        format!("{minutes}m")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(short_duration(Duration::hours(24)), "1d");
        assert_eq!(short_duration(Duration::hours(27)), "1d 3h");
        assert_eq!(short_duration(Duration::minutes(90)), "1h 30m");
        assert_eq!(short_duration(Duration::seconds(12)), "12s");
        assert_eq!(short_duration(Duration::seconds(-5)), "0s");
    }
}
