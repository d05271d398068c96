//! `restore`: a snapshot back into a datastore (the same engine or another),
//! all or nothing, and checked afterwards.
//!
//! Plan, show, then execute:
//!
//! 1. [`plan`] touches nothing. It checks every object's hashes first (a full
//!    read when the rows are needed anyway, otherwise the stored bytes' size
//!    and SHA-256), looks at the target (empty, or what it holds), runs the
//!    preflight when the target engine may not hold every value unchanged
//!    (across engines, and always into MySQL: [`super::adapt`]), and, when the
//!    target is a live datastore, works out what replacing it changes
//!    ([`super::impact`]: agents that must attest again, entries and bundles
//!    created or deleted since), and who else is using the target
//!    ([`Datastore::other_sessions`]). It lists why the restore would be
//!    refused: a damaged snapshot, a non-empty target without `replace`, a
//!    target other clients (SPIRE servers) still use without `force`, changes
//!    without `accept_changes`, rows the target cannot hold at all.
//! 2. [`execute`] runs a plan that has no refusals: one
//!    [`Datastore::begin_restore`] session, the tables created with
//!    [`ddl::create_statements`] (exact DDL on the same engine, SPIRE's GORM
//!    types on another), rows streamed object by object in batches (never a
//!    table in memory), adapted exactly as the preflight listed (checked by
//!    count and digest before commit), then [`RestoreWrite::commit`]. A
//!    failure or a kill before the commit leaves the target as it was.
//!    The snapshot is read once: each object's size, SHA-256, row count and
//!    content hash are checked as its rows stream into staging, and the
//!    commit is refused if any of them disagrees.
//! 3. After the commit the auto-increment sequences are checked to continue
//!    past the restored ids (the largest ids are taken from the rows as they
//!    went in). With [`RestoreOptions::read_back`] (verify's restore drill,
//!    `restore --read-back`) every table is also read back from the target in
//!    one consistent read and its row count and content hash compared with
//!    what was loaded. A record of the restore (target, changes applied) is
//!    written to the repository under `restores/`.
//!
//! [`restore`] does all three (stopping after the plan for a dry run).
//!
//! ```no_run
//! # async fn demo(repo: &spirekeep::store::Repository, manifest: &spirekeep::snapshot::Manifest,
//! #               target: &dyn spirekeep::datastore::Datastore) -> spirekeep::Result<()> {
//! use spirekeep::snapshot::restore::{Quiet, RestoreOptions, restore};
//! let options = RestoreOptions { replace: true, ..RestoreOptions::default() };
//! let report = restore(repo, manifest, target, &options, &Quiet).await?;
//! println!("{} rows restored", report.rows);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use super::SnapshotError;
use super::adapt::{Adapter, Change, ChangeKind};
use super::codec::{ContentHash, ContentHasher, TableReader};
use super::impact::{
    AgentImpact, EntryChanges, KeyDiff, SideDigests, TokenImpact, agent_impact, entry_changes,
    keyed_diff, token_impact,
};
use super::live_rules::{LiveFacts, RowRules, RuleOptions, RulesReport};
use super::manifest::{MANIFEST_FORMAT_VERSION, Manifest, RowAccess, SPIREKEEP_VERSION};
use super::verify::{check_every_stored_object, read_every_object, read_table_objects};
use crate::datastore::{
    Column, ColumnKind, Datastore, Engine, LiveSession, NextId, RestoreWrite, RowBatch,
    SnapshotRead, Table, Value, ddl, is_staging_table,
};
use crate::error::{Error, Result};
use crate::store::Repository;
use crate::store::keys::{self, SnapshotId};
use crate::store::lock::{CommitFence, Unfenced};

/// At most this many changes are listed one by one (in the plan, the output
/// and the record); beyond it they are counted per table, column and kind,
/// and covered by the digest.
pub const MAX_LISTED_CHANGES: usize = 10_000;

/// How a restore may proceed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Replace a target that already holds tables (otherwise it is refused).
    /// Every table the target holds is dropped, also ones not in the snapshot.
    pub replace: bool,
    /// Apply the preflight's changes (values the target engine cannot hold
    /// unchanged) instead of refusing. Rows the target cannot hold at all
    /// (unique collisions, integers out of range) are refused regardless.
    pub accept_changes: bool,
    /// Stop after the plan: nothing is written anywhere.
    pub dry_run: bool,
    /// Replace a target even while other clients use it (`--force`). Off by
    /// default, so every caller (the CLI, the upgrade's rollback) refuses to
    /// replace a datastore a SPIRE server still uses: it would keep writing
    /// agent renewals and events into what is being replaced, and with the
    /// events-based cache it never sees the restored rows.
    pub force: bool,
    /// What the restore never brings back and what it carries over from the
    /// live datastore ([`super::live_rules`]); the defaults are the safe ones.
    pub rules: RuleOptions,
    /// After the commit, read every restored table back from the target and
    /// compare its rows with what was loaded (a second pass over the data:
    /// proof that the engine stored exactly what was sent). Off by default:
    /// the load itself checks every hash before the commit.
    pub read_back: bool,
}

/// Progress callbacks (a terminal display, logs). Every method has a
/// do-nothing default.
pub trait RestoreObserver: Send + Sync {
    /// A new stage begins (`checking the snapshot`, `loading`, ...).
    fn stage(&self, _stage: &str) {}
    /// Loading `table` (`rows` in the snapshot) begins.
    fn table_started(&self, _table: &str, _rows: u64) {}
    /// Rows of `table` loaded so far (called once per batch).
    fn rows(&self, _table: &str, _loaded: u64) {}
    /// `table` is loaded (not yet committed).
    fn table_done(&self, _table: &str, _rows: u64) {}
}

/// An observer that does nothing.
#[derive(Debug, Default)]
pub struct Quiet;
impl RestoreObserver for Quiet {}

/// Why a restore would not go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// An object failed its hash check (damaged, truncated, missing).
    Damaged,
    /// The target holds tables and `replace` was not given.
    NotEmpty,
    /// Values need changing for the target engine and `accept_changes` was not given.
    NeedsConsent,
    /// Rows the target engine cannot hold at all.
    CannotHold,
    /// Other clients (SPIRE servers) use the target and `force` was not given.
    InUse,
}

/// One reason the restore would not go ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
}

/// Changes counted per table, column and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeCount {
    pub table: String,
    pub column: String,
    pub kind: ChangeKind,
    pub count: u64,
}

/// What the target engine cannot hold unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Preflight {
    /// Whether the rows were checked against the target engine (across
    /// engines, and always into MySQL; SQLite holds every value as given).
    pub ran: bool,
    /// Every change (and every row that cannot go in).
    pub total: u64,
    /// Changes that need `accept_changes`.
    pub needs_consent: u64,
    /// Rows that cannot go in at all.
    pub blocking: u64,
    /// Changes per table, column and kind.
    pub counts: Vec<ChangeCount>,
    /// The changes one by one, in snapshot order (at most [`MAX_LISTED_CHANGES`]).
    pub changes: Vec<Change>,
    /// More changes than [`MAX_LISTED_CHANGES`] were found.
    pub truncated: bool,
    /// SHA-256 over every change in order: the restore applies exactly these.
    pub digest: String,
}

/// What replacing the live datastore changes for the SPIRE deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Impact {
    /// Agents that will have to attest again (join-token agents cannot on their own).
    pub agents: AgentImpact,
    /// Registration entries (by entry id) created, deleted or changed since the snapshot.
    pub entries: KeyDiff,
    /// What changed in the entries changed since, aspect by aspect.
    pub entry_changes: EntryChanges,
    /// Trust bundles (by trust domain) created, deleted or changed since the snapshot.
    pub bundles: KeyDiff,
    /// Join tokens used and issued since the snapshot (counts only).
    pub join_tokens: TokenImpact,
    /// Federation relationships (by trust domain).
    pub federation: KeyDiff,
    /// CA journal entries (by active X.509 authority).
    pub ca_journal: KeyDiff,
}

/// One table to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedTable {
    pub name: String,
    pub rows: u64,
    pub objects: usize,
    /// Stored (compressed) bytes.
    pub size: u64,
}

/// How the snapshot was checked before anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HashCheck {
    /// `full` (every object decompressed and every hash checked),
    /// `stored-bytes` (each object's size and SHA-256; the load checks the
    /// rest before it commits), `while-loading` (nothing read before the
    /// load, which checks every hash as the rows stream into staging and
    /// refuses the commit on any mismatch), or `verified` (the caller had
    /// just verified).
    pub mode: &'static str,
    pub objects: u64,
    pub stored_bytes: u64,
}

/// Everything a restore would do, worked out without touching anything.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    pub snapshot_id: SnapshotId,
    /// The instant the snapshot's data is from.
    #[serde(with = "time::serde::rfc3339")]
    pub snapshot_time: OffsetDateTime,
    pub source_engine: Engine,
    pub target_engine: Engine,
    /// The target, without any password.
    pub target: String,
    /// The tables the target holds now (all dropped by the restore).
    pub existing_tables: Vec<String>,
    /// The tables restored, in order.
    pub tables: Vec<PlannedTable>,
    pub rows: u64,
    pub hash_check: HashCheck,
    /// Integrity problems the hash check found, each naming table and object.
    pub problems: Vec<String>,
    pub preflight: Preflight,
    /// Present when the target is not empty.
    pub impact: Option<Impact>,
    /// Other clients using the target when it was planned (never this
    /// process's own connections): SPIRE servers that must be stopped.
    pub other_sessions: Vec<LiveSession>,
    /// Whether the plan replaces the target even while others use it.
    pub force: bool,
    /// What the restore will not bring back, and what it carries over from
    /// the live datastore (counted when the plan read every object; the
    /// report of the restore has the figures of the load).
    pub rules: RulesReport,
    /// The rule options the plan was made with (the load applies the same).
    #[serde(skip)]
    pub rule_options: RuleOptions,
    /// Whether the restored tables are read back after the commit.
    pub read_back: bool,
    /// Why the restore would not go ahead; empty when it would.
    pub refusals: Vec<Refusal>,
}

impl RestorePlan {
    /// Whether [`execute`] would go ahead.
    #[must_use]
    pub fn can_proceed(&self) -> bool {
        self.refusals.is_empty()
    }

    /// The error [`execute`] returns for this plan's refusals, if any: a
    /// non-empty target or one in use is a usage error (the operator decides:
    /// a flag, or stopping the servers); the rest are failed checks
    /// ([`crate::ErrorKind::Integrity`]). The kind is the first refusal's.
    #[must_use]
    pub fn refusal_error(&self) -> Option<Error> {
        let first = self.refusals.first()?;
        let all: Vec<&str> = self.refusals.iter().map(|r| r.message.as_str()).collect();
        let message = format!(
            "restore of snapshot {} into {} refused: {}",
            self.snapshot_id,
            self.target,
            all.join("; ")
        );
        Some(match first.reason {
            RefusalReason::NotEmpty | RefusalReason::InUse => Error::Unsupported(message),
            RefusalReason::Damaged | RefusalReason::NeedsConsent | RefusalReason::CannotHold => {
                Error::Integrity(message)
            }
        })
    }
}

/// One restored table: what was loaded, and (with a read-back) what the
/// target holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredTable {
    pub name: String,
    /// Rows read back, or without a read-back the rows loaded.
    pub rows: u64,
    /// Content hash recomputed from the rows read back, or without a
    /// read-back from the rows as they were loaded.
    pub content_hash: String,
    /// Rows and hash of what was loaded: the manifest's, or the adapted rows'.
    pub expected_rows: u64,
    pub expected_hash: String,
    /// Whether what was loaded is the snapshot unchanged (no value adapted).
    pub matches_manifest: bool,
    /// Values the preflight changed in this table.
    pub adapted_values: u64,
    /// Rows and content hash read back equal what was loaded (always true
    /// without a read-back: a mismatch in the load refuses the commit).
    pub ok: bool,
    /// Whether `rows` and `content_hash` were read back from the target.
    pub read_back: bool,
}

/// Whether an auto-increment column continues past the restored ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequenceCheck {
    pub table: String,
    pub column: String,
    /// The largest restored id (none for an empty table).
    pub max_id: Option<i64>,
    /// The id the engine will hand out next, where it could be read.
    pub next_id: Option<i64>,
    /// `None` when it could not be checked (see `note`).
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The outcome of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub plan: RestorePlan,
    /// False for a dry run: nothing was written.
    pub restored: bool,
    pub rows: u64,
    pub tables: Vec<RestoredTable>,
    pub sequences: Vec<SequenceCheck>,
    /// Values changed on the way in (exactly the plan's preflight changes).
    pub changes_applied: u64,
    /// What the rules kept out and carried over, as the load applied them.
    pub rules: RulesReport,
    /// Mismatches found after the commit; empty when the restore is proven.
    pub problems: Vec<String>,
    pub ok: bool,
    pub seconds: f64,
    /// The record of this restore in the repository.
    pub record_key: Option<String>,
    /// Why the record could not be written (the restore itself stands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_error: Option<String>,
    /// What went wrong after the restore became visible (the restore stands),
    /// e.g. replaced tables that could not be dropped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `restores/<snapshot-id>/<time>.json`: who got what from which snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreRecord {
    pub format_version: u32,
    pub snapshot_id: SnapshotId,
    #[serde(with = "time::serde::rfc3339")]
    pub restored_at: OffsetDateTime,
    pub spirekeep_version: String,
    pub source_engine: Engine,
    pub target_engine: Engine,
    pub target: String,
    pub replaced_tables: Vec<String>,
    pub rows: u64,
    pub ok: bool,
    pub problems: Vec<String>,
    pub changes_total: u64,
    pub change_counts: Vec<ChangeCount>,
    pub changes: Vec<Change>,
    pub changes_truncated: bool,
    pub changes_digest: String,
}

/// Plans, then (unless `options.dry_run`) executes, the restore of
/// `manifest`'s snapshot into `target`. See the module docs.
///
/// # Errors
/// A refusal ([`RestorePlan::refusal_error`]: a damaged snapshot, a
/// non-empty target without `replace`, changes without `accept_changes`);
/// database or storage failures (the target is then as it was); or, after the
/// commit, restored data that does not match ([`Error::Integrity`], naming the
/// tables).
pub async fn restore(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    options: &RestoreOptions,
    observer: &dyn RestoreObserver,
) -> Result<RestoreReport> {
    let plan = plan(repo, manifest, target, options, observer).await?;
    if let Some(e) = plan.refusal_error() {
        return Err(e);
    }
    if options.dry_run {
        return Ok(RestoreReport {
            rules: plan.rules.clone(),
            plan,
            restored: false,
            rows: 0,
            tables: Vec::new(),
            sequences: Vec::new(),
            changes_applied: 0,
            problems: Vec::new(),
            ok: true,
            seconds: 0.0,
            record_key: None,
            record_error: None,
            warnings: Vec::new(),
        });
    }
    execute(repo, manifest, target, &plan, observer).await
}

/// Works out what restoring `manifest`'s snapshot into `target` would do,
/// writing nothing. Check [`RestorePlan::refusals`] before [`execute`].
///
/// # Errors
/// Storage or database failures (not problems in the snapshot: those are in
/// the plan).
pub async fn plan(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    options: &RestoreOptions,
    observer: &dyn RestoreObserver,
) -> Result<RestorePlan> {
    plan_inner(repo, manifest, target, options, observer, true).await
}

/// [`plan`] for a caller that has just read and checked every object (verify).
pub(crate) async fn plan_after_verify(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    options: &RestoreOptions,
) -> Result<RestorePlan> {
    plan_inner(repo, manifest, target, options, &Quiet, false).await
}

async fn plan_inner(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    options: &RestoreOptions,
    observer: &dyn RestoreObserver,
    check_hashes: bool,
) -> Result<RestorePlan> {
    // Refused before the target is even looked at: without a matching
    // identity no row can be read.
    if manifest.row_access(repo.identities())? == RowAccess::NoIdentity {
        return Err(manifest.needs_identity("restoring it"));
    }
    // A snapshot taken before staging tables were left out may carry them:
    // they are never restored, so they are not read or checked either.
    let restorable = without_staging_tables(manifest);
    let manifest = &restorable;
    let source_engine = manifest.engine;
    let target_engine = target.engine();
    let existing = user_tables(target).await?;
    // Who else uses the target (SPIRE servers that should be stopped).
    let other_sessions = settled_other_sessions(target).await?;
    let adapting = target_engine.needs_preflight_from(source_engine);
    let want_impact = !existing.is_empty();
    let facts = if want_impact {
        LiveFacts::read(target, &options.rules).await?
    } else {
        LiveFacts::default()
    };
    let mut rules = RowRules::new(
        facts,
        &options.rules,
        OffsetDateTime::now_utc().unix_timestamp(),
    );

    let mut tally = ChangeTally::default();
    let mut snapshot_side = SideDigests::default();
    let (problems, hash_check) = if adapting || want_impact {
        observer.stage("reading every object: hashes, preflight, impact");
        let shapes: HashMap<&str, Table> = if adapting {
            manifest
                .catalogue
                .tables
                .iter()
                .filter(|t| !is_staging_table(&t.name))
                .map(|t| {
                    (
                        t.name.as_str(),
                        ddl::target_shape(source_engine, target_engine, t),
                    )
                })
                .collect()
        } else {
            HashMap::new()
        };
        // Tables are read one after another: one adapter (and its unique-key
        // memory) at a time. A table whose folded unique keys repeat keeps
        // its adapter for a second read that names the colliding rows.
        let rows_of: HashMap<&str, u64> = manifest
            .tables
            .iter()
            .map(|t| (t.name.as_str(), t.rows))
            .collect();
        let mut current: Option<(String, Adapter)> = None;
        let mut to_locate: Vec<(String, Adapter)> = Vec::new();
        let mut unique_check_failed: Option<String> = None;
        let mut end_table = |done: Option<(String, Adapter)>, to_locate: &mut Vec<_>| {
            if let Some((name, mut adapter)) = done {
                match adapter.end_first_read() {
                    Ok(true) => to_locate.push((name, adapter)),
                    Ok(false) => {}
                    Err(e) => {
                        unique_check_failed.get_or_insert(format!(
                            "checking the unique keys of {name} for collisions: its temporary files in {} \
                             failed ({e}); free space there or set TMPDIR",
                            std::env::temp_dir().display()
                        ));
                    }
                }
            }
        };
        let read = read_every_object(repo, manifest, |table, batch| {
            if want_impact {
                snapshot_side.collect(table, batch);
            }
            if let Some(shape) = shapes.get(table.name.as_str()) {
                if current.as_ref().is_none_or(|(name, _)| *name != table.name) {
                    let rows = rows_of.get(table.name.as_str()).copied().unwrap_or(0);
                    let next = (
                        table.name.clone(),
                        Adapter::with_rows(target_engine, table, shape, rows),
                    );
                    end_table(current.replace(next), &mut to_locate);
                }
                let (_, adapter) = current.as_mut().expect("set above");
                for row in batch.iter_mut() {
                    for change in adapter.adapt(row, true) {
                        tally.add(change);
                    }
                }
            }
            // Counted on a copy (the rows are not loaded here), and only
            // for the tables the rules look at: no copy of the rest.
            if RowRules::looks_at(&table.name) {
                rules.apply(table, &mut batch.to_vec());
            }
        })
        .await?;
        end_table(current.take(), &mut to_locate);
        if let Some(why) = unique_check_failed {
            return Err(Error::Aborted(why));
        }
        // A damaged snapshot is refused for that; no second read of it.
        if !read.problems.is_empty() {
            to_locate.clear();
        }
        for (name, mut adapter) in to_locate {
            read_table_objects(repo, manifest, &name, |_, batch| {
                for row in batch.iter_mut() {
                    for change in adapter.locate(row) {
                        tally.add(change);
                    }
                }
            })
            .await?;
        }
        for table in rules.load_order(&manifest.catalogue.tables) {
            rules.extra_rows(&table)?;
        }
        (
            read.problems,
            HashCheck {
                mode: "full",
                objects: read.objects,
                stored_bytes: read.stored_bytes,
            },
        )
    } else if check_hashes && options.dry_run {
        // Only a dry run reads the snapshot here: a restore checks every
        // hash as the rows stream into staging and refuses the commit on any
        // mismatch, so a pass of its own would read the snapshot twice.
        observer.stage("checking every object's hash");
        let read = check_every_stored_object(repo, manifest).await?;
        count_rules_on_tokens(repo, manifest, &mut rules).await?;
        (
            read.problems,
            HashCheck {
                mode: "stored-bytes",
                objects: read.objects,
                stored_bytes: read.stored_bytes,
            },
        )
    } else {
        count_rules_on_tokens(repo, manifest, &mut rules).await?;
        (
            Vec::new(),
            HashCheck {
                mode: if check_hashes {
                    "while-loading"
                } else {
                    "verified"
                },
                objects: 0,
                stored_bytes: 0,
            },
        )
    };

    let impact = if want_impact && problems.is_empty() {
        observer.stage("reading the live datastore");
        let live = read_live_side(target).await?;
        let (snap, now) = (&snapshot_side, &live);
        Some(Impact {
            entries: keyed_diff(&snap.entry_digests(), &now.entry_digests()),
            entry_changes: entry_changes(snap, now),
            bundles: keyed_diff(&snap.bundles, &now.bundles),
            join_tokens: token_impact(snap, now),
            federation: keyed_diff(&snap.federation, &now.federation),
            ca_journal: keyed_diff(&snap.ca_journals, &now.ca_journals),
            agents: agent_impact(snapshot_side.agents, live.agents),
        })
    } else {
        None
    };

    let preflight = tally.finish(adapting);
    let mut refusals = Vec::new();
    // The DDL is generated from the catalogue; names and types outside what
    // spirekeep renders are refused before anything is touched.
    let unrestorable: Vec<String> = manifest
        .catalogue
        .tables
        .iter()
        .filter(|t| !is_staging_table(&t.name))
        .flat_map(|t| ddl::table_problems(source_engine, t))
        .collect();
    if !unrestorable.is_empty() {
        refusals.push(Refusal {
            reason: RefusalReason::Damaged,
            message: format!(
                "the snapshot's catalogue in {} cannot be restored: {}; the target was not touched (the \
                 manifest may have been altered): restore from another snapshot",
                manifest.key(),
                unrestorable.join("; ")
            ),
        });
    }
    if !problems.is_empty() {
        refusals.push(Refusal {
            reason: RefusalReason::Damaged,
            message: format!(
                "the snapshot failed its hash check ({} problem(s): {}); the target was not touched: \
                 restore from another snapshot (`spirekeep list`)",
                problems.len(),
                problems.join("; ")
            ),
        });
    }
    if !existing.is_empty() && !options.replace {
        refusals.push(Refusal {
            reason: RefusalReason::NotEmpty,
            message: format!(
                "the target is not empty ({} table(s): {}); pass --replace to replace it \
                 (--dry-run shows what that changes)",
                existing.len(),
                name_list(&existing)
            ),
        });
    }
    if let Some(message) =
        in_use_refusal(&existing, &other_sessions, options.replace, options.force)
    {
        refusals.push(Refusal {
            reason: RefusalReason::InUse,
            message,
        });
    }
    if preflight.blocking > 0 {
        refusals.push(Refusal {
            reason: RefusalReason::CannotHold,
            message: format!(
                "{} row(s) cannot go into {target_engine} at all (values that collide in a unique index \
                 under MySQL's case-, accent- and trailing-space-insensitive collation, or integers out \
                 of the column's range; listed above); no flag changes that: restore into another engine \
                 or fix the rows at the source",
                preflight.blocking
            ),
        });
    }
    let consent = preflight.needs_consent.saturating_sub(preflight.blocking);
    if consent > 0 && !options.accept_changes {
        refusals.push(Refusal {
            reason: RefusalReason::NeedsConsent,
            message: format!(
                "{consent} value(s) cannot go into {target_engine} unchanged (listed above); pass \
                 --accept-changes to apply exactly those changes (they are recorded in the repository), \
                 or restore into another engine"
            ),
        });
    }

    // A restore's staging tables are never the user's: a snapshot taken
    // before spirekeep left them out may carry some, and they are not restored.
    let tables: Vec<PlannedTable> = manifest
        .tables
        .iter()
        .filter(|t| !is_staging_table(&t.name))
        .map(|t| PlannedTable {
            name: t.name.clone(),
            rows: t.rows,
            objects: t.objects.len(),
            size: t.objects.iter().map(|o| o.size).sum(),
        })
        .collect();
    Ok(RestorePlan {
        snapshot_id: manifest.snapshot_id.clone(),
        snapshot_time: manifest.started_at,
        source_engine,
        target_engine,
        target: target.location().to_string(),
        existing_tables: existing,
        rows: tables.iter().map(|t| t.rows).sum(),
        tables,
        hash_check,
        problems,
        preflight,
        impact,
        other_sessions,
        force: options.force,
        rules: rules.report(),
        rule_options: options.rules.clone(),
        read_back: options.read_back,
        refusals,
    })
}

/// Counts what the rules do to the snapshot's join tokens, for a plan that
/// reads no other rows (a small table, read whole).
async fn count_rules_on_tokens(
    repo: &Repository,
    manifest: &Manifest,
    rules: &mut RowRules,
) -> Result<()> {
    let (Some(table), Some(data)) = (
        manifest.catalogue.table("join_tokens"),
        manifest.table("join_tokens"),
    ) else {
        return Ok(());
    };
    for object in &data.objects {
        let mut reader = TableReader::open(repo, table, object).await?;
        while let Some(mut batch) = reader.next_batch().await? {
            rules.apply(table, &mut batch);
        }
    }
    Ok(())
}

/// `manifest` without the restore staging tables an old snapshot may carry.
fn without_staging_tables(manifest: &Manifest) -> Manifest {
    let mut m = manifest.clone();
    m.tables.retain(|t| !is_staging_table(&t.name));
    m.catalogue.tables.retain(|t| !is_staging_table(&t.name));
    m
}

/// How long a client seen on the target may take to go away before it
/// counts: a server stopped a moment ago (by `apply`'s rollback, or a stop
/// script that returns when the process exits) can leave its session in the
/// engine's list for a few hundred milliseconds while the engine tears it down.
const SESSION_SETTLE: Duration = Duration::from_secs(3);

/// [`Datastore::other_sessions`], read again for up to [`SESSION_SETTLE`]
/// while it finds any: a client that is really there stays; one that just
/// disconnected does not block the restore.
async fn settled_other_sessions(target: &dyn Datastore) -> Result<Vec<LiveSession>> {
    let deadline = Instant::now() + SESSION_SETTLE;
    loop {
        let sessions = target.other_sessions().await?;
        if sessions.is_empty() || Instant::now() >= deadline {
            return Ok(sessions);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The refusal of a replace while other clients use the target: a target
/// with tables replaced (`replace`) without `force`. An empty target has no
/// SPIRE server on it; a non-empty one without `replace` is refused anyway.
fn in_use_refusal(
    existing: &[String],
    sessions: &[LiveSession],
    replace: bool,
    force: bool,
) -> Option<String> {
    if sessions.is_empty() || existing.is_empty() || !replace || force {
        return None;
    }
    let listed: Vec<String> = sessions.iter().map(ToString::to_string).collect();
    Some(format!(
        "the target is in use by {} other client(s) [{}]; stop every SPIRE server using this datastore, \
         restore, then start them again (a running server keeps writing agent renewals and events into \
         what is being replaced, and with the events-based cache it never sees the restored rows), or \
         pass --force",
        sessions.iter().map(|s| s.connections).sum::<u64>(),
        listed.join("; ")
    ))
}

/// Executes `plan` (made by [`plan`] for the same snapshot and target):
/// loads everything in one all-or-nothing session, commits, checks what the
/// target gives back, and records the restore in the repository.
///
/// # Errors
/// The plan's refusals; a plan for another snapshot or target, or a target
/// whose tables changed since the plan; database or storage failures before
/// the commit (the target is then as it was); restored data that does not
/// match after the commit ([`Error::Integrity`], naming the tables).
pub async fn execute(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    plan: &RestorePlan,
    observer: &dyn RestoreObserver,
) -> Result<RestoreReport> {
    execute_fenced(repo, manifest, target, plan, observer, &Unfenced).await
}

/// [`execute`] for a caller that holds the repository lease: `fence` is
/// asked right before the commit, and a lease that was lost stops the restore
/// there, with the target as it was.
///
/// # Errors
/// As [`execute`], and [`Error::Lock`] when the lease was lost.
pub async fn execute_fenced(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    plan: &RestorePlan,
    observer: &dyn RestoreObserver,
    fence: &dyn CommitFence,
) -> Result<RestoreReport> {
    let report = execute_inner(repo, manifest, target, plan, observer, true, fence).await?;
    if report.ok {
        Ok(report)
    } else {
        Err(Error::Integrity(format!(
            "snapshot {} was restored into {} but the restored data does not match: {}{}",
            plan.snapshot_id,
            plan.target,
            report.problems.join("; "),
            report
                .record_key
                .as_ref()
                .map(|k| format!(" (recorded in {k})"))
                .unwrap_or_default()
        )))
    }
}

/// [`execute`] without a restore record, returning mismatches in the report
/// instead of as an error (the restore drill of `verify`).
pub(crate) async fn execute_unrecorded(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    plan: &RestorePlan,
    observer: &dyn RestoreObserver,
) -> Result<RestoreReport> {
    execute_inner(repo, manifest, target, plan, observer, false, &Unfenced).await
}

async fn execute_inner(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    plan: &RestorePlan,
    observer: &dyn RestoreObserver,
    write_record: bool,
    fence: &dyn CommitFence,
) -> Result<RestoreReport> {
    if let Some(e) = plan.refusal_error() {
        return Err(e);
    }
    if plan.snapshot_id != manifest.snapshot_id || plan.target != target.location() {
        return Err(Error::Unsupported(format!(
            "the restore plan is for snapshot {} into {}, not {} into {}",
            plan.snapshot_id,
            plan.target,
            manifest.snapshot_id,
            target.location()
        )));
    }
    let clock = Instant::now();
    // The target may have changed since the plan was shown.
    let existing = user_tables(target).await?;
    let same: HashSet<&String> = existing.iter().collect();
    if same != plan.existing_tables.iter().collect::<HashSet<_>>() {
        return Err(Error::Unsupported(format!(
            "the tables of {} changed since the restore was planned (now {} table(s): {}); plan it \
             again (--dry-run) before restoring",
            plan.target,
            existing.len(),
            name_list(&existing)
        )));
    }
    // A SPIRE server started since the plan (the repository lock may have
    // taken minutes) is caught before anything is written.
    if !plan.force && !existing.is_empty() {
        let now = settled_other_sessions(target).await?;
        if let Some(message) = in_use_refusal(&existing, &now, true, false) {
            return Err(Error::Unsupported(format!(
                "restore of snapshot {} into {} refused: {message}",
                plan.snapshot_id, plan.target
            )));
        }
    }
    tracing::info!(event = "restore_started", snapshot_id = %plan.snapshot_id, target = %plan.target, replace = !existing.is_empty(), "restore starts");
    observer.stage("loading");
    let loaded = load(repo, manifest, target, plan, &existing, observer, fence)
        .await
        .inspect_err(|e| {
            tracing::error!(error = %e, "restore failed before its commit; the target is as it was");
        })?;
    let (tables, max_ids, mut problems) = if plan.read_back {
        tracing::info!(event = "restore_committed", snapshot_id = %plan.snapshot_id, "restore committed; reading it back");
        observer.stage("reading the restored datastore back");
        read_back(target, manifest, &loaded).await?
    } else {
        tracing::info!(event = "restore_committed", snapshot_id = %plan.snapshot_id, "restore committed");
        observer.stage("checking the sequences");
        as_loaded(&loaded)
    };
    let sequences = check_sequences(target, manifest, &max_ids).await;
    problems.extend(sequences.iter().filter(|s| s.ok == Some(false)).map(|s| {
        format!(
            "table {}: the next {} ({}) does not continue past the largest restored id ({})",
            s.table,
            s.column,
            s.next_id.map_or_else(|| "?".into(), |n| n.to_string()),
            s.max_id.map_or_else(|| "?".into(), |n| n.to_string()),
        )
    }));
    let mut report = RestoreReport {
        plan: plan.clone(),
        restored: true,
        rows: tables.iter().map(|t| t.rows).sum(),
        tables,
        sequences,
        changes_applied: loaded.changes,
        rules: loaded.rules.clone(),
        ok: problems.is_empty(),
        problems,
        seconds: clock.elapsed().as_secs_f64(),
        record_key: None,
        record_error: None,
        warnings: loaded.warnings.clone(),
    };
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    if write_record {
        let encrypted = manifest.is_encrypted();
        let record = RestoreRecord {
            format_version: MANIFEST_FORMAT_VERSION,
            snapshot_id: plan.snapshot_id.clone(),
            restored_at: OffsetDateTime::now_utc(),
            spirekeep_version: SPIREKEEP_VERSION.into(),
            source_engine: plan.source_engine,
            target_engine: plan.target_engine,
            target: plan.target.clone(),
            replaced_tables: plan.existing_tables.clone(),
            rows: report.rows,
            ok: report.ok,
            problems: report.problems.clone(),
            changes_total: plan.preflight.total,
            change_counts: plan.preflight.counts.clone(),
            // Each change names a row by its key and may quote values: an
            // encrypted snapshot's rows stay out of the plaintext record
            // (the counts and the digest remain).
            changes: if encrypted {
                Vec::new()
            } else {
                plan.preflight.changes.clone()
            },
            changes_truncated: plan.preflight.truncated,
            changes_digest: plan.preflight.digest.clone(),
        };
        let key = keys::restore_record(&record.snapshot_id, record.restored_at);
        let mut json =
            serde_json::to_string_pretty(&record).expect("a restore record always serializes");
        json.push('\n');
        match repo.put_create(&key, json.into()).await {
            Ok(_) => report.record_key = Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "the restore is done, but its record could not be written");
                report.record_error = Some(e.to_string());
            }
        }
    }
    tracing::info!(event = "restore_finished", snapshot_id = %plan.snapshot_id, rows = report.rows, ok = report.ok, duration_seconds = report.seconds, "restore finished");
    Ok(report)
}

/// What one table's load put in.
struct LoadedTable {
    name: String,
    expected: ContentHash,
    manifest: Option<ContentHash>,
    adapted: u64,
    /// The auto-increment column and the largest id loaded into it.
    max_id: Option<(String, i64)>,
}

struct Loaded {
    tables: Vec<LoadedTable>,
    changes: u64,
    warnings: Vec<String>,
    rules: RulesReport,
}

async fn load(
    repo: &Repository,
    manifest: &Manifest,
    target: &dyn Datastore,
    plan: &RestorePlan,
    existing: &[String],
    observer: &dyn RestoreObserver,
    fence: &dyn CommitFence,
) -> Result<Loaded> {
    let source_engine = manifest.engine;
    let target_engine = target.engine();
    let adapting = target_engine.needs_preflight_from(source_engine);
    let mut restorable: Vec<Table> = manifest
        .catalogue
        .tables
        .iter()
        .filter(|t| !is_staging_table(&t.name))
        .cloned()
        .collect();
    // The largest tables first: an engine that builds a loaded table's
    // indexes while the next ones load is then left with the small tables'
    // builds at the end, not the largest one's. (The rules may still move
    // some tables after others.)
    restorable.sort_by_key(|t| std::cmp::Reverse(manifest.table(&t.name).map_or(0, |d| d.rows)));
    // Read before the restore session opens (it may hold the database).
    let facts = if existing.is_empty() {
        LiveFacts::default()
    } else {
        LiveFacts::read(target, &plan.rule_options).await?
    };
    let mut rules = RowRules::new(
        facts,
        &plan.rule_options,
        OffsetDateTime::now_utc().unix_timestamp(),
    );
    let restored = rules.load_order(&restorable);
    let mut session = target.begin_restore(existing).await?;
    let mut applied = ChangeTally::default();
    let mut tables = Vec::with_capacity(restored.len());
    // Everything up to the commit: on an error the session is abandoned
    // (the engine removes what it staged, where it can).
    let staged: Result<_> = async {
        for table in &restored {
            let data = manifest.table(&table.name).ok_or_else(|| {
                Error::Integrity(format!(
                    "manifest {}: table {} has no data",
                    manifest.key(),
                    table.name
                ))
            })?;
            tracing::info!(table = %table.name, rows = data.rows, "loading table");
            observer.table_started(&table.name, data.rows);
            let staging = session.staging_name(&table.name);
            session.create_table(source_engine, table).await?;
            let columns: Vec<(String, ColumnKind)> = table
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.kind))
                .collect();
            let shape = adapting.then(|| ddl::target_shape(source_engine, target_engine, table));
            let mut adapter = shape
                .as_ref()
                .map(|s| Adapter::new(target_engine, table, s));
            // Rows that load as the snapshot holds them have the content hash
            // their objects were checked against as they streamed: hashing them
            // a second time here would cost a tenth of a restore's client CPU.
            let checked_content = data.objects.iter().try_fold(ContentHash::EMPTY, |sum, o| {
                ContentHash::from_hex(&o.content_hash, o.rows).map(|h| sum.combine(h))
            });
            let rows_may_change = adapter.is_some() || rules.may_change(&table.name);
            let unchanged_content = checked_content.filter(|_| !rows_may_change);
            let mut hasher = ContentHasher::new();
            let mut adapted = 0u64;
            let mut rows = 0u64;
            let id_at = table.columns.iter().position(|c| c.auto_increment);
            let mut max_id: Option<i64> = None;
            let mut track_ids = |batch: &[Vec<Value>]| {
                if let Some(p) = id_at {
                    for row in batch {
                        if let Some(Value::Int(id)) = row.get(p) {
                            max_id = Some(max_id.map_or(*id, |m| m.max(*id)));
                        }
                    }
                }
            };
            // A damaged object is found here, while its rows stream into
            // staging; the error names it, and nothing is committed.
            let damaged = |e: SnapshotError| -> Error {
                if e.kind() == crate::ErrorKind::Integrity {
                    Error::Integrity(format!(
                        "the snapshot failed its hash check while loading table {} ({e}); nothing was \
                         committed and the target is as it was: restore from another snapshot \
                         (`spirekeep list`)",
                        table.name
                    ))
                } else {
                    e.into()
                }
            };
            for object in &data.objects {
                let mut reader = TableReader::open(repo, table, object)
                    .await
                    .map_err(damaged)?;
                // The end of each object (None) proves its hashes; nothing is
                // committed before every object has ended cleanly.
                while let Some(mut batch) = reader.next_batch().await.map_err(damaged)? {
                    if let Some(adapter) = adapter.as_mut() {
                        for row in &mut batch {
                            for change in adapter.adapt(row, false) {
                                adapted += 1;
                                applied.add(change);
                            }
                        }
                    }
                    let before = batch.len();
                    rules.apply(table, &mut batch);
                    if unchanged_content.is_some() {
                        // `may_change` said no; a dropped row would make the
                        // recorded hash a lie, so stop before anything commits.
                        if batch.len() != before {
                            return Err(Error::Aborted(format!(
                                "internal error: the live-datastore rules dropped rows of table {} \
                                 that they said they would leave alone; nothing was committed",
                                table.name
                            )));
                        }
                    } else {
                        for row in &batch {
                            hasher.add_row(row);
                        }
                    }
                    track_ids(&batch);
                    if !batch.is_empty() {
                        session.insert_rows(&staging, &columns, &batch).await?;
                    }
                    rows += batch.len() as u64;
                    observer.rows(&table.name, rows);
                }
            }
            // Rows carried over from the live datastore, after the snapshot's.
            let carried = rules.extra_rows(table)?;
            for batch in carried.chunks(crate::datastore::ROW_BATCH) {
                for row in batch {
                    hasher.add_row(row);
                }
                track_ids(batch);
                session.insert_rows(&staging, &columns, batch).await?;
                rows += batch.len() as u64;
                observer.rows(&table.name, rows);
            }
            observer.table_done(&table.name, rows);
            tables.push(LoadedTable {
                name: table.name.clone(),
                // Carried rows were hashed either way.
                expected: unchanged_content.map_or(hasher.current(), |c| c.combine(hasher.current())),
                manifest: data.content(),
                adapted,
                max_id: id_at
                    .zip(max_id)
                    .map(|(p, m)| (table.columns[p].name.clone(), m)),
            });
        }
        let applied = applied.finish(adapting);
        if applied.total != plan.preflight.total || applied.digest != plan.preflight.digest {
            return Err(Error::Integrity(format!(
                "the restore would change {} value(s), not the {} the preflight listed; nothing was \
                 committed and the target is as it was",
                applied.total, plan.preflight.total
            )));
        }
        // A run that lost its repository lease stops here, before anything is visible.
        fence.confirm().await?;
        Ok(applied)
    }
    .await;
    let applied = match staged {
        Ok(applied) => applied,
        Err(e) => {
            session.abandon().await;
            return Err(e);
        }
    };
    observer.stage("committing");
    crate::testpoint::pause("restore.before_commit").await;
    let outcome = commit(session, &restored).await?;
    crate::testpoint::pause("restore.after_commit").await;
    Ok(Loaded {
        tables,
        changes: applied.total,
        warnings: outcome.warnings,
        rules: rules.report(),
    })
}

async fn commit(
    session: Box<dyn RestoreWrite>,
    tables: &[Table],
) -> Result<crate::datastore::CommitOutcome> {
    session.commit(tables).await
}

/// Streams every row of `table` from an open snapshot into `f`, batch by batch.
pub(crate) async fn for_each_batch<F>(
    read: &mut dyn SnapshotRead,
    table: &Table,
    mut f: F,
) -> Result<u64>
where
    F: FnMut(RowBatch) + Send,
{
    // The batches are `f`'s to keep: none is handed back.
    let (tx, mut rx) = crate::datastore::row_channel(4);
    let producer = async move {
        let result = read.stream_rows(table, &tx).await;
        drop(tx);
        result
    };
    let consumer = async move {
        while let Some(batch) = rx.recv().await {
            f(batch);
        }
    };
    let (rows, ()) = tokio::join!(producer, consumer);
    rows
}

type ReadBack = (Vec<RestoredTable>, HashMap<String, i64>, Vec<String>);

/// The key of an auto-increment column in the largest-id map.
fn id_column_key(table: &str, column: &str) -> String {
    format!("{table}\0{column}")
}

/// The restored tables as the load put them in (every hash was checked
/// before the commit), without reading them back.
fn as_loaded(loaded: &Loaded) -> ReadBack {
    let tables = loaded
        .tables
        .iter()
        .map(|lt| RestoredTable {
            name: lt.name.clone(),
            rows: lt.expected.rows(),
            content_hash: lt.expected.hex(),
            expected_rows: lt.expected.rows(),
            expected_hash: lt.expected.hex(),
            matches_manifest: lt.manifest == Some(lt.expected),
            adapted_values: lt.adapted,
            ok: true,
            read_back: false,
        })
        .collect();
    let max_ids = loaded
        .tables
        .iter()
        .filter_map(|lt| {
            let (column, id) = lt.max_id.as_ref()?;
            Some((id_column_key(&lt.name, column), *id))
        })
        .collect();
    (tables, max_ids, Vec::new())
}

/// Reads every restored table back from the target in one consistent read,
/// in the manifest's column order, and compares it with what was loaded.
async fn read_back(
    target: &dyn Datastore,
    manifest: &Manifest,
    loaded: &Loaded,
) -> Result<ReadBack> {
    let mut read = target.begin_snapshot().await?;
    let result = read_back_in(read.as_mut(), manifest, loaded).await;
    let finished = read.finish().await;
    let out = result?;
    finished?;
    Ok(out)
}

async fn read_back_in(
    read: &mut dyn SnapshotRead,
    manifest: &Manifest,
    loaded: &Loaded,
) -> Result<ReadBack> {
    let catalogue = read.catalogue().await?;
    let mut out = Vec::with_capacity(loaded.tables.len());
    let mut max_ids = HashMap::new();
    let mut problems = Vec::new();
    for lt in &loaded.tables {
        let Some(source) = manifest.catalogue.table(&lt.name) else {
            continue;
        };
        let Some(live) = catalogue.table(&lt.name) else {
            problems.push(format!("table {}: missing after the restore", lt.name));
            continue;
        };
        // The live columns, in the manifest's order (the content hash is over it).
        let mut columns: Vec<Column> = Vec::with_capacity(source.columns.len());
        for c in &source.columns {
            match live.column(&c.name) {
                Some(col) => columns.push(col.clone()),
                None => problems.push(format!(
                    "table {}: column {} missing after the restore",
                    lt.name, c.name
                )),
            }
        }
        if columns.len() != source.columns.len() {
            continue;
        }
        let shaped = Table {
            columns,
            ..live.clone()
        };
        let id_at = source.columns.iter().position(|c| c.auto_increment);
        let mut hasher = ContentHasher::new();
        let mut max_id: Option<i64> = None;
        for_each_batch(read, &shaped, |batch| {
            for row in &batch {
                hasher.add_row(row);
                if let Some(Value::Int(id)) = id_at.and_then(|p| row.get(p)) {
                    max_id = Some(max_id.map_or(*id, |m| m.max(*id)));
                }
            }
        })
        .await?;
        if let (Some(p), Some(m)) = (id_at, max_id) {
            max_ids.insert(id_column_key(&lt.name, &source.columns[p].name), m);
        }
        let got = hasher.current();
        let ok = got == lt.expected;
        if !ok {
            problems.push(format!(
                "table {}: read back {} rows with content hash {}, but {} rows with content hash {} \
                 were restored",
                lt.name,
                got.rows(),
                got.hex(),
                lt.expected.rows(),
                lt.expected.hex()
            ));
        }
        out.push(RestoredTable {
            name: lt.name.clone(),
            rows: got.rows(),
            content_hash: got.hex(),
            expected_rows: lt.expected.rows(),
            expected_hash: lt.expected.hex(),
            matches_manifest: lt.manifest == Some(lt.expected),
            adapted_values: lt.adapted,
            ok,
            read_back: true,
        });
    }
    Ok((out, max_ids, problems))
}

/// Checks that each auto-increment column's next id lies past the largest
/// restored one, as far as the engine lets it be read ([`Datastore::next_id`]).
async fn check_sequences(
    target: &dyn Datastore,
    manifest: &Manifest,
    max_ids: &HashMap<String, i64>,
) -> Vec<SequenceCheck> {
    let mut out = Vec::new();
    for table in manifest
        .catalogue
        .tables
        .iter()
        .filter(|t| !is_staging_table(&t.name))
    {
        for c in table.columns.iter().filter(|c| c.auto_increment) {
            let max_id = max_ids.get(&id_column_key(&table.name, &c.name)).copied();
            let mut check = SequenceCheck {
                table: table.name.clone(),
                column: c.name.clone(),
                max_id,
                next_id: None,
                ok: None,
                note: None,
            };
            match target.next_id(&table.name, &c.name).await {
                Ok(NextId::Known(next)) => {
                    check.next_id = Some(next);
                    check.ok = Some(max_id.is_none_or(|m| next > m));
                }
                Ok(NextId::Unknown(why)) => check.note = Some(why),
                Err(e) => check.note = Some(format!("could not be read: {e}")),
            }
            out.push(check);
        }
    }
    out
}

/// The datastore's tables (its catalogue never lists a restore's staging tables).
pub(crate) async fn user_tables(ds: &dyn Datastore) -> Result<Vec<String>> {
    Ok(ds
        .catalogue()
        .await?
        .tables
        .into_iter()
        .map(|t| t.name)
        .collect())
}

/// `a, b, c, … (12 in all)` for messages.
pub(crate) fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … ({} in all)", names.len()));
    }
    s
}

/// Counts, lists and digests changes as they are found.
#[derive(Default)]
struct ChangeTally {
    counts: HashMap<(String, String, ChangeKind), u64>,
    listed: Vec<Change>,
    truncated: bool,
    total: u64,
    needs_consent: u64,
    blocking: u64,
    /// A sum of the changes' hashes: the same whatever order the tables are
    /// read in (the preflight and the load read them in different orders).
    digest: ContentHasher,
    scratch: Vec<u8>,
}

impl ChangeTally {
    fn add(&mut self, c: Change) {
        self.total += 1;
        if c.kind.needs_consent() {
            self.needs_consent += 1;
        }
        if c.kind.is_blocking() {
            self.blocking += 1;
        }
        self.scratch.clear();
        for part in [&c.table, &c.row, &c.column, &c.detail] {
            self.scratch.extend_from_slice(part.as_bytes());
            self.scratch.push(0);
        }
        self.scratch
            .extend_from_slice(format!("{:?}\n", c.kind).as_bytes());
        self.digest.add_canonical(&self.scratch);
        *self
            .counts
            .entry((c.table.clone(), c.column.clone(), c.kind))
            .or_default() += 1;
        if self.listed.len() < MAX_LISTED_CHANGES {
            self.listed.push(c);
        } else {
            self.truncated = true;
        }
    }

    fn finish(self, ran: bool) -> Preflight {
        let mut counts: Vec<ChangeCount> = self
            .counts
            .into_iter()
            .map(|((table, column, kind), count)| ChangeCount {
                table,
                column,
                kind,
                count,
            })
            .collect();
        counts.sort_by(|a, b| {
            (&a.table, &a.column, format!("{:?}", a.kind)).cmp(&(
                &b.table,
                &b.column,
                format!("{:?}", b.kind),
            ))
        });
        Preflight {
            ran,
            total: self.total,
            needs_consent: self.needs_consent,
            blocking: self.blocking,
            counts,
            changes: self.listed,
            truncated: self.truncated,
            digest: self.digest.current().hex(),
        }
    }
}

/// What the impact preview compares, from the live datastore, in one consistent read.
async fn read_live_side(target: &dyn Datastore) -> Result<SideDigests> {
    let mut read = target.begin_snapshot().await?;
    let mut side = SideDigests::default();
    let result = async {
        let catalogue = read.catalogue().await?;
        for name in SideDigests::TABLES {
            if let Some(table) = catalogue.table(name) {
                for_each_batch(read.as_mut(), table, |batch| side.collect(table, &batch)).await?;
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let finished = read.finish().await;
    result?;
    finished?;
    Ok(side)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> LiveSession {
        LiveSession {
            host: Some("10.0.0.7".into()),
            application: Some("spire-server".into()),
            user: Some("spire".into()),
            pid: None,
            connections: 3,
            note: None,
        }
    }

    #[test]
    fn only_a_replace_of_a_live_target_without_force_is_refused_as_in_use() {
        let tables = vec!["bundles".to_string()];
        let sessions = vec![server()];
        let message = in_use_refusal(&tables, &sessions, true, false).unwrap();
        assert!(
            message.starts_with(
                "the target is in use by 3 other client(s) [\"spire-server\" user spire from 10.0.0.7, 3 \
                 connection(s)]; stop every SPIRE server using this datastore, restore, then start them again"
            ),
            "{message}"
        );
        assert!(message.ends_with("or pass --force"), "{message}");
        assert!(!message.contains('\n'));
        assert_eq!(
            in_use_refusal(&tables, &sessions, true, true),
            None,
            "--force"
        );
        assert_eq!(
            in_use_refusal(&[], &sessions, true, false),
            None,
            "empty target"
        );
        assert_eq!(
            in_use_refusal(&tables, &[], true, false),
            None,
            "nobody there"
        );
        assert_eq!(
            in_use_refusal(&tables, &sessions, false, false),
            None,
            "refused as not empty instead"
        );
    }

    #[test]
    fn tally_counts_lists_and_digests() {
        let change = |row: &str, kind| Change {
            table: "t".into(),
            row: row.into(),
            column: "c".into(),
            kind,
            detail: "d".into(),
        };
        let mut a = ChangeTally::default();
        a.add(change("id=1", ChangeKind::FourByteUtf8));
        a.add(change("id=2", ChangeKind::SubMicrosecondTimestamp));
        a.add(change("id=3", ChangeKind::UniqueCollision));
        let p = a.finish(true);
        assert_eq!((p.total, p.needs_consent, p.blocking), (3, 2, 1));
        assert_eq!(p.counts.len(), 3);
        let mut b = ChangeTally::default();
        b.add(change("id=1", ChangeKind::FourByteUtf8));
        b.add(change("id=2", ChangeKind::SubMicrosecondTimestamp));
        b.add(change("id=4", ChangeKind::UniqueCollision));
        assert_ne!(
            b.finish(true).digest,
            p.digest,
            "a different row is a different change"
        );
        let mut c = ChangeTally::default();
        c.add(change("id=3", ChangeKind::UniqueCollision));
        c.add(change("id=1", ChangeKind::FourByteUtf8));
        c.add(change("id=2", ChangeKind::SubMicrosecondTimestamp));
        assert_eq!(
            c.finish(true).digest,
            p.digest,
            "the same changes found in another order"
        );
        assert_eq!(ChangeTally::default().finish(false).total, 0);
    }

    /// The staged-upgrade executor and the agent run these inside spawned tasks.
    #[allow(dead_code)]
    fn futures_are_send(repo: &Repository, manifest: &Manifest, target: &dyn Datastore) {
        fn send<T: Send>(_: T) {}
        send(restore(
            repo,
            manifest,
            target,
            &RestoreOptions::default(),
            &Quiet,
        ));
        send(crate::snapshot::verify::verify(
            repo,
            manifest,
            crate::snapshot::verify::VerifyMode::DeepInto(target),
        ));
        send(crate::snapshot::verify::verify_snapshot(
            repo,
            &manifest.snapshot_id,
            crate::snapshot::verify::VerifyMode::Deep,
        ));
    }

    #[test]
    fn names_are_listed_briefly() {
        let names: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
        assert_eq!(name_list(&names[..2]), "t0, t1");
        assert_eq!(name_list(&names), "t0, t1, t2, t3, t4, t5, … (8 in all)");
    }
}
