//! Pins: explicit holds on a snapshot that `prune` always respects.
//!
//! A pin is a small object `pins/<snapshot-id>/<holder>.json`, written by
//! whoever needs the snapshot to stay: a staged upgrade pins its pre-upgrade
//! snapshot (holder = the plan id) and unpins it when the plan is finished or
//! rolled back; an operator can pin a snapshot by hand. Several holders may
//! pin the same snapshot; it stays until the last pin is gone. Pins never
//! expire: a forgotten pin keeps its snapshot (and `prune --dry-run` says so),
//! which is the safe way to be wrong.
//!
//! `prune` reads the pins when it plans and again for each snapshot right
//! before deleting it, and it holds the repository lock throughout, so a pin
//! written by a process holding the lock (e.g. right after its backup) is
//! never missed.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::store::keys::{self, SnapshotId};
use crate::store::{Repository, StoreError};

/// Format version of [`Pin`].
pub const PIN_FORMAT_VERSION: u32 = 1;

/// One pin on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub format_version: u32,
    pub snapshot_id: SnapshotId,
    /// Who holds it: a plan id, `operator`, ... (`[A-Za-z0-9._-]`).
    pub holder: String,
    /// Why, for people reading `prune --dry-run`.
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub pinned_at: OffsetDateTime,
}

impl Pin {
    /// `pre-upgrade snapshot of plan p1 (pinned by p1 at …)`.
    #[must_use]
    pub fn describe(&self) -> String {
        if self.reason.is_empty() {
            format!("pinned by {}", self.holder)
        } else {
            format!("pinned by {}: {}", self.holder, self.reason)
        }
    }
}

/// Pins snapshot `id` for `holder`. Pinning again replaces the reason.
///
/// # Errors
/// An invalid holder name, a snapshot that does not exist, or a storage failure.
pub async fn pin(repo: &Repository, id: &SnapshotId, holder: &str, reason: &str) -> Result<Pin> {
    let key = keys::pin(id, holder).map_err(|e| Error::Unsupported(e.to_string()))?;
    if repo.head(&keys::manifest(id)).await?.is_none() {
        return Err(Error::NotFound(format!(
            "snapshot {id} does not exist in {repo} (no manifest); see `spirekeep list`"
        )));
    }
    let pin = Pin {
        format_version: PIN_FORMAT_VERSION,
        snapshot_id: id.clone(),
        holder: holder.to_owned(),
        reason: reason.to_owned(),
        pinned_at: OffsetDateTime::now_utc(),
    };
    let mut json = serde_json::to_string_pretty(&pin).expect("a pin always serializes");
    json.push('\n');
    repo.put_overwrite(&key, Bytes::from(json)).await?;
    Ok(pin)
}

/// Removes `holder`'s pin on `id`. Returns whether there was one.
///
/// # Errors
/// An invalid holder name or a storage failure.
pub async fn unpin(repo: &Repository, id: &SnapshotId, holder: &str) -> Result<bool> {
    let key = keys::pin(id, holder).map_err(|e| Error::Unsupported(e.to_string()))?;
    let existed = repo.head(&key).await?.is_some();
    repo.delete(&key).await?;
    Ok(existed)
}

/// Every pin in the repository, by snapshot then holder. A pin object that
/// cannot be parsed still counts as a pin (its reason says so): a damaged pin
/// must not release its snapshot.
///
/// # Errors
/// A storage failure.
pub async fn list_pins(repo: &Repository) -> Result<Vec<Pin>> {
    read_pins(repo, keys::PINS).await
}

/// The pins of one snapshot.
///
/// # Errors
/// A storage failure.
pub async fn pins_of(repo: &Repository, id: &SnapshotId) -> Result<Vec<Pin>> {
    read_pins(repo, &keys::pins_prefix(id)).await
}

async fn read_pins(repo: &Repository, prefix: &str) -> Result<Vec<Pin>> {
    let mut out = Vec::new();
    for meta in repo.list(prefix).await? {
        let Some((id, holder)) = keys::pin_of_key(&meta.key) else {
            continue;
        };
        let bytes = match repo
            .get_capped(&meta.key, crate::store::MAX_CONTROL_BYTES)
            .await
        {
            Ok(b) => b,
            // Unpinned between the listing and the read.
            Err(StoreError::NotFound { .. }) => continue,
            // Not a pin spirekeep wrote; it still holds the snapshot.
            Err(StoreError::TooLarge { .. }) => bytes::Bytes::new(),
            Err(e) => return Err(e.into()),
        };
        let pin = match serde_json::from_slice::<Pin>(&bytes) {
            Ok(p) if p.snapshot_id == id && p.holder == holder => p,
            _ => Pin {
                format_version: PIN_FORMAT_VERSION,
                snapshot_id: id,
                holder,
                reason: format!("unreadable pin object {} (kept as a pin)", meta.key),
                pinned_at: meta.last_modified,
            },
        };
        out.push(pin);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pin_unpin_round_trip() {
        let repo = Repository::in_memory();
        let id = SnapshotId::parse("20261128T093000Z-0a1b2c").unwrap();
        let err = pin(&repo, &id, "p1", "pre-upgrade").await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        repo.put_create(&keys::manifest(&id), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        pin(&repo, &id, "p1", "pre-upgrade snapshot of plan p1")
            .await
            .unwrap();
        pin(&repo, &id, "operator", "").await.unwrap();
        assert!(pin(&repo, &id, "a/b", "").await.is_err());
        let pins = list_pins(&repo).await.unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(pins_of(&repo, &id).await.unwrap().len(), 2);
        assert!(unpin(&repo, &id, "p1").await.unwrap());
        assert!(!unpin(&repo, &id, "p1").await.unwrap());
        repo.put_overwrite(
            &keys::pin(&id, "broken").unwrap(),
            Bytes::from_static(b"junk"),
        )
        .await
        .unwrap();
        let pins = list_pins(&repo).await.unwrap();
        assert_eq!(pins.len(), 2);
        assert!(pins.iter().any(|p| p.reason.contains("unreadable")));
    }
}
