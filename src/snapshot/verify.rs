//! `verify`: re-read every object of a snapshot and check every hash; a deep
//! verification also restores the snapshot into a scratch datastore and
//! compares what the database gives back with the manifest (a restore drill).
//!
//! Every problem is collected (a damaged object does not hide the next one),
//! each naming its table and object key. The outcome is recorded in the
//! repository as a [`VerificationRecord`], also when it failed, so the
//! freshness of the last *verified* snapshot is known (`list`, metrics).
//!
//! An encrypted snapshot read through a repository handle without a matching
//! identity can only be checked as stored: every object's existence, size
//! and SHA-256 of its ciphertext. The report (and the record) then lists
//! what was not checked, and the run is recorded as shallow.
//!
//! ```no_run
//! # async fn demo(repo: &spirekeep::store::Repository, id: &spirekeep::store::keys::SnapshotId)
//! #     -> spirekeep::Result<()> {
//! use spirekeep::snapshot::verify::{VerifyMode, verify_snapshot};
//! let report = verify_snapshot(repo, id, VerifyMode::Deep).await?;
//! if !report.ok {
//!     for p in &report.problems {
//!         eprintln!("{p}");
//!     }
//! }
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use time::OffsetDateTime;

use super::SnapshotError;
use super::codec::{TableReader, check_stored_bytes};
use super::manifest::{Manifest, RowAccess, VerificationRecord};
use super::restore::{self, RestoreObserver, RestoreOptions};
use super::server_files;
use crate::ca_keys;
use crate::datastore::{self, Datastore, OpenMode, Table, Value, dsn, quote_ident};
use crate::error::{Error, ErrorKind, Result};
use crate::store::keys::{SnapshotId, VerifyKind};
use crate::store::{Repository, StoreError};

/// What a verification does.
#[derive(Clone, Copy)]
pub enum VerifyMode<'a> {
    /// Re-read every object and check every size and hash (stored bytes,
    /// decompressed stream, row count, content hash).
    Shallow,
    /// Shallow, then restore into a temporary SQLite file (deleted afterwards)
    /// and compare row counts and content hashes read back from it.
    Deep,
    /// Shallow, then restore into this datastore, which must be empty; the
    /// restored tables are dropped again afterwards.
    DeepInto(&'a dyn Datastore),
}

impl VerifyMode<'_> {
    /// The kind recorded for this mode.
    #[must_use]
    pub fn kind(&self) -> VerifyKind {
        match self {
            Self::Shallow => VerifyKind::Shallow,
            Self::Deep | Self::DeepInto(_) => VerifyKind::Deep,
        }
    }
}

impl std::fmt::Debug for VerifyMode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shallow => f.write_str("Shallow"),
            Self::Deep => f.write_str("Deep"),
            Self::DeepInto(ds) => write!(f, "DeepInto({})", ds.location()),
        }
    }
}

/// One table's part of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct TableCheck {
    pub table: String,
    pub objects: usize,
    /// Rows the manifest records.
    pub rows: u64,
    /// Rows read from the table's objects.
    pub rows_read: u64,
    /// Every object of the table read cleanly and matched the manifest.
    pub ok: bool,
    /// Deep only: rows counted in the scratch datastore after the restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_rows: Option<u64>,
    /// Deep only: whether the content hash recomputed from the scratch
    /// datastore matched (the manifest's, or that of the adapted rows when the
    /// scratch engine needed changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_hash_ok: Option<bool>,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub snapshot_id: SnapshotId,
    pub kind: VerifyKind,
    /// True exactly when `problems` is empty.
    pub ok: bool,
    /// Every problem, each naming its table and object (or the manifest).
    pub problems: Vec<String>,
    /// Remarks that are not problems (values a scratch engine had to adapt).
    pub notes: Vec<String>,
    /// What an operator should look at without the snapshot being damaged:
    /// the CA journal naming keys the snapshot's keys file does not hold, or
    /// the reverse.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Whether the snapshot's data objects are encrypted.
    pub encrypted: bool,
    /// What could not be checked (an encrypted snapshot verified without
    /// its identity); empty when everything was.
    pub unchecked: Vec<String>,
    pub objects: u64,
    /// Stored (compressed) bytes read.
    pub stored_bytes: u64,
    /// Rows read from the objects.
    pub rows: u64,
    pub tables: Vec<TableCheck>,
    /// Deep only: where the drill restored to (without any password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub verified_at: OffsetDateTime,
    pub seconds: f64,
    /// Where the verification record was written.
    pub record_key: Option<String>,
}

/// Verifies the snapshot `manifest` describes and records the outcome in
/// `repo` (a [`VerificationRecord`]), whether it passed or not.
///
/// Problems found in the snapshot (a damaged, truncated or missing object, a
/// restore drill whose rows do not match) are not errors: they are in the
/// report, which has `ok == false`.
///
/// # Errors
/// Failures that say nothing about the snapshot: the repository cannot be
/// reached, the scratch datastore cannot be created or is not empty, or the
/// record cannot be written (the message then says what the outcome was).
pub async fn verify(
    repo: &Repository,
    manifest: &Manifest,
    mode: VerifyMode<'_>,
) -> Result<VerifyReport> {
    verify_observed(repo, manifest, mode, &restore::Quiet).await
}

/// [`verify`], telling `observer` the stages and the rows read per table
/// (and, for a deep verify, the restore drill's own progress).
///
/// # Errors
/// As [`verify`].
pub async fn verify_observed(
    repo: &Repository,
    manifest: &Manifest,
    mode: VerifyMode<'_>,
    observer: &dyn RestoreObserver,
) -> Result<VerifyReport> {
    let clock = Instant::now();
    if manifest.row_access(repo.identities())? == RowAccess::NoIdentity {
        return verify_stored_bytes(repo, manifest, mode, observer, clock).await;
    }
    let kind = mode.kind();
    tracing::info!(event = "verify_started", snapshot_id = %manifest.snapshot_id, kind = kind.as_str(), "verifying every object");
    observer.stage(&format!(
        "snapshot {}: reading every object of {} tables",
        manifest.snapshot_id,
        manifest.tables.len()
    ));
    let mut current: Option<(String, u64)> = None;
    let mut journal_rows: Vec<Vec<Value>> = Vec::new();
    let read = read_every_object(repo, manifest, |table, batch| {
        if table.name == "ca_journals" {
            journal_rows.extend(batch.iter().cloned());
        }
        if current.as_ref().is_none_or(|(name, _)| *name != table.name) {
            if let Some((name, rows)) = current.take() {
                observer.table_done(&name, rows);
            }
            let expected = manifest
                .tables
                .iter()
                .find(|t| t.name == table.name)
                .map_or(0, |t| t.rows);
            observer.table_started(&table.name, expected);
            current = Some((table.name.clone(), 0));
        }
        if let Some((name, rows)) = current.as_mut() {
            *rows += batch.len() as u64;
            observer.rows(name, *rows);
        }
    })
    .await?;
    if let Some((name, rows)) = current.take() {
        observer.table_done(&name, rows);
    }
    let mut report = VerifyReport {
        snapshot_id: manifest.snapshot_id.clone(),
        kind,
        ok: false,
        problems: read.problems,
        notes: Vec::new(),
        warnings: Vec::new(),
        encrypted: manifest.is_encrypted(),
        unchecked: Vec::new(),
        objects: read.objects,
        stored_bytes: read.stored_bytes,
        rows: read.tables.iter().map(|t| t.rows_read).sum(),
        tables: read.tables,
        scratch: None,
        verified_at: OffsetDateTime::now_utc(),
        seconds: 0.0,
        record_key: None,
    };
    check_server_files(repo, manifest, Some(&journal_rows), &mut report).await;
    if kind == VerifyKind::Deep {
        if report.problems.is_empty() {
            observer.stage("restore drill: restoring into a scratch datastore and comparing");
            match mode {
                VerifyMode::DeepInto(ds) => {
                    drill_into(repo, manifest, ds, &mut report, observer).await?;
                }
                _ => drill_in_temporary_file(repo, manifest, &mut report, observer).await?,
            }
        } else {
            report.notes.push(
                "the restore drill was not attempted: the snapshot's objects are damaged".into(),
            );
        }
    }
    report.seconds = clock.elapsed().as_secs_f64();
    record(repo, &mut report).await?;
    Ok(report)
}

/// What a verification without the identity leaves unchecked.
pub const UNCHECKED_WITHOUT_IDENTITY: [&str; 3] = [
    "decrypting and decoding every object's rows (decompressed size and SHA-256, row count)",
    "the per-table row counts and content hashes",
    "the restore drill",
];

/// An encrypted snapshot without its identity: every object's existence,
/// size and SHA-256 of the stored (encrypted) bytes are checked, and the
/// report says what was not. Recorded as a shallow verification (what was
/// done), with the unchecked parts in the record.
async fn verify_stored_bytes(
    repo: &Repository,
    manifest: &Manifest,
    mode: VerifyMode<'_>,
    observer: &dyn RestoreObserver,
    clock: Instant,
) -> Result<VerifyReport> {
    tracing::info!(event = "verify_started", snapshot_id = %manifest.snapshot_id, kind = "shallow", "verifying the encrypted objects without an identity");
    observer.stage(&format!(
        "snapshot {}: encrypted, no identity: checking every object's stored bytes",
        manifest.snapshot_id
    ));
    let read = check_every_stored_object(repo, manifest).await?;
    let mut unchecked: Vec<String> = UNCHECKED_WITHOUT_IDENTITY[..2]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if mode.kind() == VerifyKind::Deep {
        unchecked.push(UNCHECKED_WITHOUT_IDENTITY[2].to_owned());
    }
    let mut report = VerifyReport {
        snapshot_id: manifest.snapshot_id.clone(),
        kind: VerifyKind::Shallow,
        ok: false,
        problems: read.problems,
        warnings: Vec::new(),
        notes: vec![format!(
            "the snapshot is encrypted to {}; without an identity only the stored (encrypted) bytes were \
             checked: pass --identity FILE (or set SPIREKEEP_AGE_IDENTITY_FILE) to check the rest",
            manifest.recipients().join(", ")
        )],
        encrypted: true,
        unchecked,
        objects: read.objects,
        stored_bytes: read.stored_bytes,
        rows: 0,
        tables: read.tables,
        scratch: None,
        verified_at: OffsetDateTime::now_utc(),
        seconds: clock.elapsed().as_secs_f64(),
        record_key: None,
    };
    check_server_files(repo, manifest, None, &mut report).await;
    record(repo, &mut report).await?;
    Ok(report)
}

/// Loads snapshot `id`'s manifest and [`verify`]s it. A manifest that exists
/// but cannot be read or is inconsistent (edited, truncated, damaged) is a
/// failed verification: it is reported and recorded like any other problem.
///
/// # Errors
/// As [`verify`]; [`Error::NotFound`] when the snapshot has no manifest.
pub async fn verify_snapshot(
    repo: &Repository,
    id: &SnapshotId,
    mode: VerifyMode<'_>,
) -> Result<VerifyReport> {
    verify_snapshot_observed(repo, id, mode, &restore::Quiet).await
}

/// [`verify_snapshot`] with progress (see [`verify_observed`]).
///
/// # Errors
/// As [`verify_snapshot`].
pub async fn verify_snapshot_observed(
    repo: &Repository,
    id: &SnapshotId,
    mode: VerifyMode<'_>,
    observer: &dyn RestoreObserver,
) -> Result<VerifyReport> {
    match Manifest::load(repo, id).await {
        Ok(manifest) => verify_observed(repo, &manifest, mode, observer).await,
        Err(SnapshotError::Store(StoreError::NotFound { .. })) => Err(Error::NotFound(format!(
            "snapshot {id} does not exist in {repo} (no manifest); see `spirekeep list`"
        ))),
        Err(e) if e.kind() == ErrorKind::Integrity => {
            let mut report = VerifyReport {
                snapshot_id: id.clone(),
                kind: mode.kind(),
                ok: false,
                problems: vec![format!(
                    "{e}; the snapshot cannot be trusted or restored: restore from another snapshot"
                )],
                notes: Vec::new(),
                warnings: Vec::new(),
                encrypted: false,
                unchecked: Vec::new(),
                objects: 0,
                stored_bytes: 0,
                rows: 0,
                tables: Vec::new(),
                scratch: None,
                verified_at: OffsetDateTime::now_utc(),
                seconds: 0.0,
                record_key: None,
            };
            record(repo, &mut report).await?;
            Ok(report)
        }
        Err(e) => Err(e.into()),
    }
}

/// The server files' part of a verification: each object's stored size and
/// SHA-256, and (when `journal_rows` is given, i.e. the rows could be read)
/// the plaintext's, then the CA journal of the snapshot compared with its
/// keys file. A snapshot without server files has nothing to compare.
async fn check_server_files(
    repo: &Repository,
    manifest: &Manifest,
    journal_rows: Option<&[Vec<Value>]>,
    report: &mut VerifyReport,
) {
    if manifest.server_files.is_empty() {
        return;
    }
    let check = server_files::verify_files(repo, manifest, journal_rows.is_some()).await;
    report.objects += manifest.server_files.len() as u64;
    report.stored_bytes += check.stored_bytes;
    report.problems.extend(check.problems.iter().cloned());
    if !check.plaintext_checked {
        report.unchecked.push(
            "the server files' decrypted contents and the CA journal against the keys file".into(),
        );
    }
    let (Some(rows), Some(table)) = (journal_rows, manifest.catalogue.table("ca_journals")) else {
        return;
    };
    if !check.problems.is_empty() || (check.has_keys_file && check.key_ids.is_none()) {
        return;
    }
    let (journals, undecodable) = ca_keys::journals_from_rows(table, rows);
    report.warnings.extend(undecodable);
    let store = check
        .key_ids
        .map_or(ca_keys::KeyStore::Missing, ca_keys::KeyStore::Keys);
    let name = if check.has_keys_file {
        "the snapshot's keys file"
    } else {
        "the snapshot (it holds no keys file)"
    };
    report
        .warnings
        .extend(ca_keys::compare(&journals, &store, name));
}

async fn record(repo: &Repository, report: &mut VerifyReport) -> Result<()> {
    report.ok = report.problems.is_empty();
    report.verified_at = OffsetDateTime::now_utc();
    let record = VerificationRecord::new(
        report.snapshot_id.clone(),
        report.verified_at,
        report.kind,
        report.problems.clone(),
    )
    .with_unchecked(report.unchecked.clone());
    match record.store(repo).await {
        Ok(key) => {
            report.record_key = Some(key);
            Ok(())
        }
        Err(e) => Err(Error::Aborted(format!(
            "snapshot {} {} ({} verification), but the result could not be recorded in {repo}: {e}",
            report.snapshot_id,
            if report.ok {
                "verified ok".to_string()
            } else {
                format!(
                    "FAILED verification with {} problem(s)",
                    report.problems.len()
                )
            },
            report.kind.as_str(),
        ))),
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn drill_in_temporary_file(
    repo: &Repository,
    manifest: &Manifest,
    report: &mut VerifyReport,
    observer: &dyn RestoreObserver,
) -> Result<()> {
    let suffix: u32 = rand::random();
    let dir = TempDir(std::env::temp_dir().join(format!(
        "spirekeep-verify-{}-{suffix:08x}",
        manifest.snapshot_id
    )));
    std::fs::create_dir(&dir.0).map_err(|e| {
        Error::Aborted(format!(
            "cannot create a scratch directory {} for the restore drill: {e}; set TMPDIR, or give --scratch",
            dir.0.display()
        ))
    })?;
    let spec = dsn::ConnectionSpec::scratch_file(&dir.0, "scratch");
    let ds = datastore::open(&spec, OpenMode::Create).await?;
    let outcome = drill(repo, manifest, ds.as_ref(), report, observer).await;
    ds.close().await;
    report.scratch = Some(format!("{} (temporary, deleted)", ds.location()));
    outcome
}

async fn drill_into(
    repo: &Repository,
    manifest: &Manifest,
    ds: &dyn Datastore,
    report: &mut VerifyReport,
    observer: &dyn RestoreObserver,
) -> Result<()> {
    let existing = restore::user_tables(ds).await?;
    if !existing.is_empty() {
        return Err(Error::Unsupported(format!(
            "the scratch datastore {} is not empty ({} table(s): {}); a deep verify restores into an \
             empty datastore and drops what it restored afterwards: give an empty database",
            ds.location(),
            existing.len(),
            restore::name_list(&existing)
        )));
    }
    report.scratch = Some(ds.location().to_string());
    let outcome = drill(repo, manifest, ds, report, observer).await;
    // Leave the scratch datastore empty again, for the next drill.
    for table in &manifest.catalogue.tables {
        let sql = format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(ds.engine(), &table.name)
        );
        if let Err(e) = ds.execute_script(&sql).await {
            report.notes.push(format!(
                "could not drop {} from the scratch datastore: {e}",
                table.name
            ));
        }
    }
    outcome
}

/// Restores into `ds` and compares; problems go into the report.
async fn drill(
    repo: &Repository,
    manifest: &Manifest,
    ds: &dyn Datastore,
    report: &mut VerifyReport,
    observer: &dyn RestoreObserver,
) -> Result<()> {
    tracing::info!(event = "restore_drill", snapshot_id = %manifest.snapshot_id, scratch = %ds.location(), "restore drill");
    // A scratch datastore may take whatever changes its engine needs; they are
    // noted, and the comparison is with the adapted rows.
    let options = RestoreOptions {
        accept_changes: true,
        // A scratch copy compared with the snapshot: every row comes back.
        rules: crate::snapshot::live_rules::RuleOptions {
            keep_snapshot_join_tokens: true,
            ..crate::snapshot::live_rules::RuleOptions::default()
        },
        // The drill proves what the target engine holds, not only what was sent.
        read_back: true,
        ..RestoreOptions::default()
    };
    let plan = restore::plan_after_verify(repo, manifest, ds, &options).await?;
    if !plan.refusals.is_empty() {
        for r in &plan.refusals {
            report.problems.push(format!(
                "the restore drill into {} was refused: {}",
                ds.location(),
                r.message
            ));
        }
        return Ok(());
    }
    if plan.preflight.total > 0 {
        report.notes.push(format!(
            "{} value(s) were adapted for the {} scratch datastore (see `spirekeep restore --dry-run`); \
             those tables were compared with the adapted rows",
            plan.preflight.total,
            ds.engine()
        ));
    }
    match restore::execute_unrecorded(repo, manifest, ds, &plan, observer).await {
        Ok(restored) => {
            for t in &restored.tables {
                if let Some(check) = report.tables.iter_mut().find(|c| c.table == t.name) {
                    check.restored_rows = Some(t.rows);
                    check.restored_hash_ok = Some(t.ok);
                }
            }
            report.problems.extend(restored.problems);
        }
        Err(e) => report.problems.push(format!(
            "the restore drill into {} failed: {e}",
            ds.location()
        )),
    }
    Ok(())
}

/// What reading every object of a snapshot found.
pub(crate) struct ReadAll {
    pub problems: Vec<String>,
    pub tables: Vec<TableCheck>,
    pub objects: u64,
    pub stored_bytes: u64,
}

/// Reads every object of every table through a [`TableReader`] (so every
/// size and hash is checked), handing each batch of rows to `visit`, and
/// collects every problem instead of stopping at the first. Rows of an object
/// that later turns out damaged have been visited too: only an empty
/// `problems` makes them trustworthy.
///
/// # Errors
/// Failures that say nothing about the snapshot (repository unreachable,
/// access denied).
pub(crate) async fn read_every_object<F>(
    repo: &Repository,
    manifest: &Manifest,
    mut visit: F,
) -> Result<ReadAll>
where
    F: FnMut(&Table, &mut [Vec<Value>]) + Send,
{
    let mut out = ReadAll {
        problems: Vec::new(),
        tables: Vec::with_capacity(manifest.tables.len()),
        objects: 0,
        stored_bytes: 0,
    };
    for data in &manifest.tables {
        let mut check = TableCheck {
            table: data.name.clone(),
            objects: data.objects.len(),
            rows: data.rows,
            rows_read: 0,
            ok: true,
            restored_rows: None,
            restored_hash_ok: None,
        };
        let Some(table) = manifest.catalogue.table(&data.name) else {
            // Manifest::load refuses this; a manifest built by hand may not.
            out.problems.push(format!(
                "table {}: not in the manifest's catalogue",
                data.name
            ));
            check.ok = false;
            out.tables.push(check);
            continue;
        };
        for object in &data.objects {
            out.objects += 1;
            match read_object(repo, table, object, &mut visit).await {
                Ok(rows) => {
                    check.rows_read += rows;
                    out.stored_bytes += object.size;
                }
                Err(e) if e.kind() == ErrorKind::Integrity => {
                    check.ok = false;
                    out.problems.push(format!("table {}: {e}", data.name));
                }
                Err(e) => return Err(e.into()),
            }
        }
        out.tables.push(check);
    }
    Ok(out)
}

/// Reads every object of one table as [`read_every_object`] does, for a
/// second look at a table already checked by it (its problems were reported
/// then; here one stops the read).
///
/// # Errors
/// As [`read_every_object`], and any problem with the table's objects.
pub(crate) async fn read_table_objects<F>(
    repo: &Repository,
    manifest: &Manifest,
    name: &str,
    mut visit: F,
) -> Result<()>
where
    F: FnMut(&Table, &mut [Vec<Value>]) + Send,
{
    let (Some(data), Some(table)) = (
        manifest.tables.iter().find(|t| t.name == name),
        manifest.catalogue.table(name),
    ) else {
        return Ok(());
    };
    for object in &data.objects {
        read_object(repo, table, object, &mut visit).await?;
    }
    Ok(())
}

async fn read_object<F>(
    repo: &Repository,
    table: &Table,
    object: &super::DataObject,
    visit: &mut F,
) -> Result<u64, SnapshotError>
where
    F: FnMut(&Table, &mut [Vec<Value>]) + Send,
{
    let mut reader = TableReader::open(repo, table, object).await?;
    let mut rows = 0u64;
    while let Some(mut batch) = reader.next_batch().await? {
        rows += batch.len() as u64;
        visit(table, &mut batch);
    }
    Ok(rows)
}

/// Checks the stored bytes (size and SHA-256) of every object without
/// decompressing: the fast check a restore makes before it touches the
/// target when it has no other reason to read the rows. The load itself
/// then checks every other hash before it commits.
pub(crate) async fn check_every_stored_object(
    repo: &Repository,
    manifest: &Manifest,
) -> Result<ReadAll> {
    let mut out = ReadAll {
        problems: Vec::new(),
        tables: Vec::new(),
        objects: 0,
        stored_bytes: 0,
    };
    for data in &manifest.tables {
        let mut ok = true;
        for object in &data.objects {
            out.objects += 1;
            match check_stored_bytes(repo, object).await {
                Ok(()) => out.stored_bytes += object.size,
                Err(e) if e.kind() == ErrorKind::Integrity => {
                    ok = false;
                    out.problems.push(format!("table {}: {e}", data.name));
                }
                Err(e) => return Err(e.into()),
            }
        }
        out.tables.push(TableCheck {
            table: data.name.clone(),
            objects: data.objects.len(),
            rows: data.rows,
            rows_read: 0,
            ok,
            restored_rows: None,
            restored_hash_ok: None,
        });
    }
    Ok(out)
}
