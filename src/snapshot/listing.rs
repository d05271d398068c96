//! Finding snapshots: `latest` or an id, and the summaries `list` and `show` print.

use serde::Serialize;
use time::OffsetDateTime;

use super::SnapshotError;
use super::manifest::{Manifest, VerificationRecord, list_snapshots};
use crate::datastore::Engine;
use crate::error::{Error, Result};
use crate::store::keys::{SnapshotId, VerifyKind};
use crate::store::{Repository, StoreError};

/// What reading a snapshot's manifest gave.
#[derive(Debug, Clone)]
pub enum ManifestRead {
    /// It reads and is consistent: the snapshot can be restored.
    Readable(Box<Manifest>),
    /// It cannot be read or trusted (the message says why): the snapshot
    /// cannot be restored.
    Damaged(String),
    /// It disappeared since the listing (a prune deleted the snapshot).
    Gone,
}

/// Reads the manifest of `id`, telling a damaged manifest (which leaves the
/// snapshot unrestorable, but must not hide the others) from a storage failure.
///
/// # Errors
/// Storage failures other than the manifest's absence or size.
pub async fn read_manifest(repo: &Repository, id: &SnapshotId) -> Result<ManifestRead> {
    match Manifest::load(repo, id).await {
        Ok(m) => Ok(ManifestRead::Readable(Box::new(m))),
        Err(SnapshotError::Store(StoreError::NotFound { .. })) => Ok(ManifestRead::Gone),
        Err(
            e
            @ (SnapshotError::Manifest { .. } | SnapshotError::Store(StoreError::TooLarge { .. })),
        ) => Ok(ManifestRead::Damaged(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Resolves `latest` (the newest snapshot that can be restored: its manifest
/// exists and reads; newer damaged ones are named in a warning) or a snapshot id.
///
/// # Errors
/// A malformed id, a snapshot that does not exist, or a repository without a
/// restorable snapshot.
pub async fn resolve(repo: &Repository, reference: &str) -> Result<SnapshotId> {
    let ids = list_snapshots(repo).await?;
    if reference == "latest" {
        let mut damaged = Vec::new();
        for id in ids.iter().rev() {
            match read_manifest(repo, id).await? {
                ManifestRead::Readable(_) => {
                    if !damaged.is_empty() {
                        tracing::warn!(
                            "`latest` is snapshot {id}: the newer snapshot(s) {} have a damaged manifest \
                             and cannot be restored (see `spirekeep list`)",
                            damaged.join(", ")
                        );
                    }
                    return Ok(id.clone());
                }
                ManifestRead::Damaged(_) => damaged.push(id.to_string()),
                ManifestRead::Gone => {}
            }
        }
        return Err(if damaged.is_empty() {
            Error::NotFound(format!(
                "{repo} holds no snapshots yet; take one with `spirekeep backup`"
            ))
        } else {
            Error::Integrity(format!(
                "{repo} holds no restorable snapshot: the manifest of each of its {} snapshot(s) is \
                 damaged (see `spirekeep list`)",
                damaged.len()
            ))
        });
    }
    let id = SnapshotId::parse(reference).map_err(|e| {
        Error::Unsupported(format!(
            "{e}; give a snapshot id from `spirekeep list`, or `latest`"
        ))
    })?;
    if ids.contains(&id) {
        Ok(id)
    } else {
        Err(Error::NotFound(format!(
            "snapshot {id} does not exist in {repo} (no manifest); see `spirekeep list`"
        )))
    }
}

/// The most recent verification of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerificationState {
    pub kind: VerifyKind,
    pub ok: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub problems: Vec<String>,
}

impl VerificationState {
    fn of(record: &VerificationRecord) -> Self {
        Self {
            kind: record.kind,
            ok: record.ok,
            at: record.verified_at,
            problems: record.problems.clone(),
        }
    }
}

/// One line of `spirekeep list`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub id: SnapshotId,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    pub engine: Engine,
    pub server_version: String,
    pub schema_version: i64,
    pub code_version: String,
    /// Stored (compressed) bytes.
    pub size: u64,
    pub rows: u64,
    pub labels: Vec<String>,
    /// The newest verification, if any.
    pub last_verification: Option<VerificationState>,
    /// The newest successful verification, if any.
    pub last_verified_ok: Option<VerificationState>,
    /// The newest successful deep verification (restore drill), if any.
    pub last_deep_ok: Option<VerificationState>,
    /// The public keys (`age1…`) the data objects are encrypted to; empty
    /// for a plaintext snapshot.
    pub encrypted_to: Vec<String>,
}

impl SnapshotSummary {
    /// The summary of one manifest and its verification records.
    #[must_use]
    pub fn new(manifest: &Manifest, records: &[VerificationRecord]) -> Self {
        let newest = |pred: &dyn Fn(&VerificationRecord) -> bool| {
            records
                .iter()
                .filter(|r| pred(r))
                .max_by_key(|r| r.verified_at)
                .map(VerificationState::of)
        };
        Self {
            id: manifest.snapshot_id.clone(),
            started_at: manifest.started_at,
            finished_at: manifest.finished_at,
            engine: manifest.engine,
            server_version: manifest.server_version.clone(),
            schema_version: manifest.spire.schema_version,
            code_version: manifest.spire.code_version.clone(),
            encrypted_to: manifest.recipients().to_vec(),
            size: manifest.total_size(),
            rows: manifest.total_rows(),
            labels: manifest.labels.clone(),
            last_verification: newest(&|_| true),
            last_verified_ok: newest(&|r| r.ok),
            last_deep_ok: newest(&|r| r.ok && r.kind == VerifyKind::Deep),
        }
    }

    /// `verified (deep) 2026-…`, `FAILED …`, or `unverified`.
    #[must_use]
    pub fn verification_text(&self) -> String {
        match &self.last_verification {
            None => "unverified".into(),
            Some(v) if v.ok => format!("ok ({}, {})", v.kind.as_str(), rfc3339(v.at)),
            Some(v) => format!("FAILED ({}, {})", v.kind.as_str(), rfc3339(v.at)),
        }
    }
}

/// A snapshot whose manifest cannot be read: listed, never hidden, but it
/// cannot be restored.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedSnapshot {
    pub id: SnapshotId,
    /// When it was taken, from its id.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// Why its manifest cannot be read.
    pub damaged: String,
    /// Always false.
    pub restorable: bool,
}

/// One line of `spirekeep list`: a readable snapshot or a damaged one.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ListedSnapshot {
    Readable(Box<SnapshotSummary>),
    Damaged(DamagedSnapshot),
}

impl ListedSnapshot {
    /// The snapshot's id.
    #[must_use]
    pub fn id(&self) -> &SnapshotId {
        match self {
            Self::Readable(s) => &s.id,
            Self::Damaged(d) => &d.id,
        }
    }
}

/// Every snapshot, oldest first. A snapshot whose manifest cannot be read is
/// listed as damaged (it must be noticed, and must not hide the others).
///
/// # Errors
/// Storage failures.
pub async fn summaries(repo: &Repository) -> Result<Vec<ListedSnapshot>> {
    let mut out = Vec::new();
    for id in list_snapshots(repo).await? {
        let manifest = match read_manifest(repo, &id).await? {
            ManifestRead::Readable(m) => m,
            ManifestRead::Damaged(why) => {
                out.push(ListedSnapshot::Damaged(DamagedSnapshot {
                    started_at: id.time(),
                    id,
                    damaged: why,
                    restorable: false,
                }));
                continue;
            }
            ManifestRead::Gone => continue,
        };
        // A damaged verification record must not hide the snapshot either.
        let records = match VerificationRecord::load_all(repo, &id).await {
            Ok(r) => r,
            Err(SnapshotError::Store(e)) if !matches!(e, StoreError::TooLarge { .. }) => {
                return Err(SnapshotError::Store(e).into());
            }
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "a verification record cannot be read");
                Vec::new()
            }
        };
        out.push(ListedSnapshot::Readable(Box::new(SnapshotSummary::new(
            &manifest, &records,
        ))));
    }
    Ok(out)
}

/// RFC 3339 text of a time, to the second.
#[must_use]
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// `1.2 MiB`-style sizes for humans.
#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = u128::from(n) * 10;
    let mut unit = 0;
    while value >= 10 * 1024 && unit < UNITS.len() - 1 {
        value /= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{}.{} {}", value / 10, value % 10, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
