//! The snapshot manifest and verification records (JSON, versioned).
//!
//! A snapshot is its manifest plus the data objects the manifest lists. The
//! manifest is written last, with a create-only put ([`Manifest::store`]):
//! a snapshot exists exactly when its manifest does, so an interrupted backup
//! never leaves something that looks whole.
//!
//! Both documents carry `format_version`. A manifest is written at the
//! lowest version that describes it: [`MANIFEST_FORMAT_VERSION`] (1) for a
//! plaintext snapshot, [`ENCRYPTED_MANIFEST_FORMAT_VERSION`] (2) for one
//! whose data objects are age-encrypted, so a spirekeep that predates
//! encryption refuses such a snapshot ("upgrade spirekeep") instead of
//! reading ciphertext as zstd. Readers accept every version from
//! [`OLDEST_MANIFEST_FORMAT_VERSION`] to [`NEWEST_MANIFEST_FORMAT_VERSION`]
//! (version 1 is version 2 without encryption, so it needs no conversion); a
//! newer version is refused with a request to upgrade spirekeep, before any
//! other field is looked at. Unknown fields are ignored, so a later release
//! may add optional fields without a version bump.
//!
//! The manifest stays plaintext even for an encrypted snapshot (list, show,
//! prune and metrics need no key). It holds no row values, but it does hold
//! hashes of the plaintext (`raw_sha256`, `content_hash`): they confirm a
//! guessed table content, which matters only for low-entropy tables; see
//! docs/format.md.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::SnapshotError;
use super::codec::{CodecOptions, ContentHash};
use super::error::ManifestError;
use super::format;
use super::server_files::ServerFile;
use crate::datastore::{Catalogue, Engine, MigrationsRow};
use crate::error::Error;
use crate::store::crypt::Identities;
use crate::store::keys::{self, SnapshotId, VerifyKind};
use crate::store::{MAX_MANIFEST_BYTES, MAX_RECORD_BYTES, Repository, StoreError};

/// The format of a plaintext snapshot's manifest, and of verification and
/// restore records.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// The format of a manifest whose data objects are encrypted (version 1 plus
/// the `encryption` fields).
pub const ENCRYPTED_MANIFEST_FORMAT_VERSION: u32 = 2;
/// The newest format this spirekeep reads.
pub const NEWEST_MANIFEST_FORMAT_VERSION: u32 = ENCRYPTED_MANIFEST_FORMAT_VERSION;
/// The oldest format this spirekeep reads.
pub const OLDEST_MANIFEST_FORMAT_VERSION: u32 = 1;
/// The largest decompressed size a data object may record: backups start a
/// new object every 512 MiB of rows, so anything near this is not one of ours
/// (and decoding is bounded by it).
pub const MAX_OBJECT_RAW_BYTES: u64 = 4 << 30;
/// This spirekeep's version, as recorded in what it writes.
pub const SPIREKEEP_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything needed to trust and restore one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT_VERSION`] when written by this spirekeep.
    pub format_version: u32,
    pub snapshot_id: SnapshotId,
    /// The spirekeep release that took the snapshot.
    pub spirekeep_version: String,
    pub engine: Engine,
    /// The database server's version (`15.18`, `10.11.19-MariaDB`, `3.51.3`).
    pub server_version: String,
    /// Where the datastore was, without any password.
    pub source: String,
    /// SPIRE's `migrations` row: schema version and the code version that wrote it.
    pub spire: MigrationsRow,
    /// When the snapshot transaction began (the instant the data is from).
    #[serde(with = "rfc3339")]
    pub started_at: OffsetDateTime,
    /// When the last data object was complete.
    #[serde(with = "rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Free-form labels (`pre-upgrade`, `scheduled`, ...).
    pub labels: Vec<String>,
    /// How the data objects are encoded.
    pub data_format: DataFormat,
    /// The live catalogue at snapshot time: tables, columns (declared types,
    /// kinds, nullability), primary keys, indexes and the engine's DDL text,
    /// so a same-engine restore is exact.
    pub catalogue: Catalogue,
    /// The data of every catalogue table, in catalogue order.
    pub tables: Vec<TableData>,
    /// How the data objects are encrypted; absent for a plaintext snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// The SPIRE server's keys file and data dir files stored with the
    /// snapshot (see [`super::server_files`]); absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_files: Vec<ServerFile>,
}

/// Whether a snapshot's rows can be read (see [`Manifest::row_access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAccess {
    /// The data objects are not encrypted.
    Plaintext,
    /// Encrypted, and one of the identities is a recipient.
    Decrypt,
    /// Encrypted, and no identity was given: only the stored bytes can be checked.
    NoIdentity,
}

/// Client-side encryption of a snapshot's data objects. Public keys only:
/// no secret ever goes into a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// How each object is encrypted (`age`).
    pub scheme: ObjectEncryption,
    /// The recipients' public keys (`age1…`): any matching identity decrypts.
    pub recipients: Vec<String>,
}

/// How one data object is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectEncryption {
    /// An age file (X25519 recipients, STREAM payload) around the zstd frame.
    Age,
}

/// How data objects are encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFormat {
    /// Always `spkd` (see docs/format.md).
    pub encoding: String,
    /// The SPKD version ([`format::DATA_FORMAT_VERSION`]).
    pub version: u16,
    /// Always `zstd`, with a content checksum in every frame.
    pub compression: String,
    /// The zstd level used.
    pub level: i32,
}

impl DataFormat {
    /// What this spirekeep writes with `options`.
    #[must_use]
    pub fn current(options: &CodecOptions) -> Self {
        Self {
            encoding: "spkd".into(),
            version: format::DATA_FORMAT_VERSION,
            compression: "zstd".into(),
            level: options.level,
        }
    }
}

/// The stored data of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableData {
    pub name: String,
    /// Rows in the table (the sum over its objects).
    pub rows: u64,
    /// The table's content hash (the combination of its objects'), 64 hex digits.
    pub content_hash: String,
    /// The table's data objects, in order; at least one, even for an empty table.
    pub objects: Vec<DataObject>,
}

impl TableData {
    /// The entry for table `name` stored in `objects`, with the row count and
    /// content hash combined from them.
    ///
    /// # Errors
    /// An object whose content hash is not 64 lower-case hex digits.
    pub fn from_objects(
        name: impl Into<String>,
        objects: Vec<DataObject>,
    ) -> Result<Self, ManifestError> {
        let name = name.into();
        let mut total = ContentHash::EMPTY;
        for o in &objects {
            let h = ContentHash::from_hex(&o.content_hash, o.rows).ok_or_else(|| {
                ManifestError::Invalid(vec![format!(
                    "object {} has a malformed content hash",
                    o.key
                )])
            })?;
            total = total.combine(h);
        }
        Ok(Self {
            name,
            rows: total.rows(),
            content_hash: total.hex(),
            objects,
        })
    }

    /// The table's content hash, to compare with one recomputed from restored rows.
    #[must_use]
    pub fn content(&self) -> Option<ContentHash> {
        ContentHash::from_hex(&self.content_hash, self.rows)
    }
}

/// One stored data object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataObject {
    /// Repository key (under `snapshots/<id>/data/`).
    pub key: String,
    /// Stored (compressed) size in bytes.
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Size of the decompressed SPKD stream.
    pub raw_size: u64,
    /// SHA-256 of the decompressed SPKD stream, hex.
    pub raw_sha256: String,
    /// Rows in this object.
    pub rows: u64,
    /// Content hash of this object's rows, hex.
    pub content_hash: String,
    /// Set when the stored bytes are encrypted (then `size` and `sha256` are
    /// those of the ciphertext, and the other fields of the plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ObjectEncryption>,
}

impl Manifest {
    /// The manifest's key in the repository.
    #[must_use]
    pub fn key(&self) -> String {
        keys::manifest(&self.snapshot_id)
    }

    /// Rows over all tables.
    #[must_use]
    pub fn total_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }

    /// Stored bytes over all data objects.
    #[must_use]
    pub fn total_size(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|t| &t.objects)
            .map(|o| o.size)
            .sum()
    }

    /// Whether any data object is encrypted (reading rows needs an identity).
    #[must_use]
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
            || self
                .tables
                .iter()
                .flat_map(|t| &t.objects)
                .any(|o| o.encryption.is_some())
    }

    /// The public keys the data objects were encrypted to (empty if none).
    #[must_use]
    pub fn recipients(&self) -> &[String] {
        self.encryption.as_ref().map_or(&[], |e| &e.recipients)
    }

    /// Whether this snapshot's rows can be read with `identities` (the
    /// repository handle's). Decided from the recorded public keys, before
    /// any object is read.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when identities were given but none of them is
    /// a recipient of this snapshot.
    pub fn row_access(&self, identities: Option<&Identities>) -> Result<RowAccess, Error> {
        if !self.is_encrypted() {
            return Ok(RowAccess::Plaintext);
        }
        let Some(ids) = identities else {
            return Ok(RowAccess::NoIdentity);
        };
        if ids.matches_any(self.recipients()) {
            return Ok(RowAccess::Decrypt);
        }
        Err(Error::Unsupported(format!(
            "snapshot {} was encrypted to {}, and none of the keys in {} ({}) is one of them: pass the \
             identity file of one of those recipients with --identity",
            self.snapshot_id,
            self.recipients_shown(),
            ids.source().display(),
            ids.public_keys().join(", ")
        )))
    }

    /// The error for reading this encrypted snapshot's rows without an
    /// identity: it names the recipients and the way in.
    #[must_use]
    pub fn needs_identity(&self, what: &str) -> Error {
        Error::Unsupported(format!(
            "snapshot {} is encrypted to {}: {what} needs the identity of one of them: pass --identity FILE \
             (or set SPIREKEEP_AGE_IDENTITY_FILE to its path)",
            self.snapshot_id,
            self.recipients_shown()
        ))
    }

    fn recipients_shown(&self) -> String {
        if self.recipients().is_empty() {
            "unknown recipients".into()
        } else {
            self.recipients().join(", ")
        }
    }

    /// The format version this manifest must carry: the lowest that
    /// describes it.
    #[must_use]
    pub fn required_format_version(&self) -> u32 {
        if self.is_encrypted() {
            ENCRYPTED_MANIFEST_FORMAT_VERSION
        } else {
            MANIFEST_FORMAT_VERSION
        }
    }

    /// The data entry of table `name`.
    #[must_use]
    pub fn table(&self, name: &str) -> Option<&TableData> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Pretty JSON with a trailing newline (what [`Self::store`] writes).
    ///
    /// # Panics
    /// Never: every field serializes.
    #[must_use]
    pub fn to_json_pretty(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        s.push('\n');
        s
    }

    /// Parses a manifest of any readable format version (converting older
    /// ones). Does not [validate](Self::validate) it.
    ///
    /// # Errors
    /// [`ManifestError::TooNew`] for a manifest written by a newer spirekeep
    /// (checked before anything else), [`ManifestError::TooOld`], or
    /// [`ManifestError::Parse`].
    pub fn from_json(json: &[u8]) -> Result<Self, ManifestError> {
        match check_version(json)? {
            // Version 1 is version 2 without the optional encryption fields.
            1 | 2 => serde_json::from_slice(json).map_err(|e| ManifestError::Parse(e.to_string())),
            v => unreachable!("check_version accepted version {v}"),
        }
    }

    /// Everything inconsistent in the manifest, empty when it is sound:
    /// format version, times, every object key under this snapshot's data
    /// prefix, no key used twice, the catalogue and the table data naming the
    /// same tables once each, hashes well-formed, row counts and content hashes
    /// of each table equal to the combination of its objects'.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let required = self.required_format_version();
        if self.format_version != required {
            p.push(format!(
                "format_version is {}, expected {required}",
                self.format_version
            ));
        }
        p.extend(self.encryption_problems());
        p.extend(super::server_files::problems(self));
        if self.finished_at < self.started_at {
            p.push("finished_at is before started_at".into());
        }
        if self.data_format.encoding != "spkd" || self.data_format.compression != "zstd" {
            p.push(format!(
                "unknown data format {}/{}",
                self.data_format.encoding, self.data_format.compression
            ));
        }
        if !(format::OLDEST_DATA_FORMAT_VERSION..=format::DATA_FORMAT_VERSION)
            .contains(&self.data_format.version)
        {
            p.push(format!(
                "unsupported data format version {}",
                self.data_format.version
            ));
        }
        let mut catalogue_names = BTreeSet::new();
        for t in &self.catalogue.tables {
            if !catalogue_names.insert(t.name.as_str()) {
                p.push(format!("table {} appears twice in the catalogue", t.name));
            }
        }
        let mut data_names = BTreeSet::new();
        for t in &self.tables {
            if !data_names.insert(t.name.as_str()) {
                p.push(format!("table {} has two data entries", t.name));
            }
        }
        for missing in catalogue_names.difference(&data_names) {
            p.push(format!(
                "table {missing} is in the catalogue but has no data"
            ));
        }
        for extra in data_names.difference(&catalogue_names) {
            p.push(format!(
                "table {extra} has data but is not in the catalogue"
            ));
        }
        let prefix = keys::data_prefix(&self.snapshot_id);
        let mut seen = HashSet::new();
        for t in &self.tables {
            if t.objects.is_empty() {
                p.push(format!("table {} has no data objects", t.name));
            }
            let mut total = ContentHash::EMPTY;
            let mut hashes_ok = true;
            for o in &t.objects {
                if !o.key.starts_with(&prefix)
                    || o.key.len() == prefix.len()
                    || o.key[prefix.len()..].contains('/')
                {
                    p.push(format!(
                        "object {} of table {} is not under {prefix}",
                        o.key, t.name
                    ));
                }
                if o.raw_size > MAX_OBJECT_RAW_BYTES {
                    p.push(format!(
                        "object {}: raw_size {} is over the limit of {MAX_OBJECT_RAW_BYTES} bytes \
                         (backups split tables into objects of about 512 MiB)",
                        o.key, o.raw_size
                    ));
                }
                if !seen.insert(o.key.as_str()) {
                    p.push(format!("object {} is listed twice", o.key));
                }
                for (what, value) in [("sha256", &o.sha256), ("raw_sha256", &o.raw_sha256)] {
                    if !is_hex64(value) {
                        p.push(format!(
                            "object {}: {what} is not 64 lower-case hex digits",
                            o.key
                        ));
                    }
                }
                match ContentHash::from_hex(&o.content_hash, o.rows) {
                    Some(h) => total = total.combine(h),
                    None => {
                        hashes_ok = false;
                        p.push(format!(
                            "object {}: content_hash is not 64 lower-case hex digits",
                            o.key
                        ));
                    }
                }
            }
            if total.rows() != t.rows {
                p.push(format!(
                    "table {} records {} rows but its objects hold {}",
                    t.name,
                    t.rows,
                    total.rows()
                ));
            }
            if hashes_ok && total.hex() != t.content_hash {
                p.push(format!(
                    "table {}: content_hash {} is not the combination of its objects' ({})",
                    t.name,
                    t.content_hash,
                    total.hex()
                ));
            }
        }
        p
    }

    /// An encrypted snapshot names its recipients and has every object
    /// encrypted; a plaintext one has none.
    fn encryption_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let objects = self.tables.iter().flat_map(|t| &t.objects);
        match &self.encryption {
            Some(e) => {
                if e.recipients.is_empty() {
                    p.push("encryption names no recipients".into());
                }
                for r in &e.recipients {
                    if !crate::store::crypt::is_public_key(r) {
                        p.push(format!(
                            "encryption recipient {r:?} is not an age X25519 public key"
                        ));
                    }
                }
                for o in objects.filter(|o| o.encryption != Some(e.scheme)) {
                    p.push(format!(
                        "object {} is not encrypted in an encrypted snapshot",
                        o.key
                    ));
                }
            }
            None => {
                for o in objects.filter(|o| o.encryption.is_some()) {
                    p.push(format!(
                        "object {} is encrypted but the manifest has no encryption section",
                        o.key
                    ));
                }
            }
        }
        p
    }

    /// Fails with every problem [`Self::problems`] finds.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Invalid(problems))
        }
    }

    /// Validates the manifest and writes it with a create-only put: the
    /// moment the snapshot comes into existence. Call it only after every
    /// data object has been uploaded. Returns the key.
    ///
    /// # Errors
    /// An inconsistent manifest; [`StoreError::AlreadyExists`] if the
    /// snapshot already has a manifest; any store failure.
    pub async fn store(&self, repo: &Repository) -> Result<String, SnapshotError> {
        let key = self.key();
        self.validate().map_err(|problem| SnapshotError::Manifest {
            key: key.clone(),
            problem,
        })?;
        repo.put_create(&key, self.to_json_pretty().into()).await?;
        Ok(key)
    }

    /// Reads, parses and validates the manifest of snapshot `id`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no such snapshot, or any
    /// [`ManifestError`] (wrapped with the key).
    pub async fn load(repo: &Repository, id: &SnapshotId) -> Result<Self, SnapshotError> {
        let key = keys::manifest(id);
        let bytes = repo.get_capped(&key, MAX_MANIFEST_BYTES).await?;
        let wrap = |problem| SnapshotError::Manifest {
            key: key.clone(),
            problem,
        };
        let manifest = Self::from_json(&bytes).map_err(wrap)?;
        if &manifest.snapshot_id != id {
            return Err(wrap(ManifestError::Invalid(vec![format!(
                "it names snapshot {} but is stored as {id}",
                manifest.snapshot_id
            )])));
        }
        manifest.validate().map_err(wrap)?;
        Ok(manifest)
    }
}

/// Every snapshot in the repository (those whose manifest exists), oldest first.
///
/// # Errors
/// Any store failure.
pub async fn list_snapshots(repo: &Repository) -> Result<Vec<SnapshotId>, StoreError> {
    let mut ids: Vec<SnapshotId> = repo
        .list(keys::SNAPSHOTS)
        .await?
        .iter()
        .filter_map(|m| keys::snapshot_of_manifest(&m.key))
        .collect();
    ids.sort();
    Ok(ids)
}

/// The outcome of one `verify` run, stored under `verifications/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationRecord {
    pub format_version: u32,
    pub snapshot_id: SnapshotId,
    #[serde(with = "rfc3339")]
    pub verified_at: OffsetDateTime,
    pub kind: VerifyKind,
    /// True exactly when `problems` is empty.
    pub ok: bool,
    /// Each problem found, e.g. a mismatch naming its object.
    pub problems: Vec<String>,
    pub spirekeep_version: String,
    /// What this run could not check (an encrypted snapshot verified
    /// without its identity: only the stored bytes were checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<String>,
}

impl VerificationRecord {
    /// A record of a verification of `snapshot_id` that ended at `verified_at`.
    #[must_use]
    pub fn new(
        snapshot_id: SnapshotId,
        verified_at: OffsetDateTime,
        kind: VerifyKind,
        problems: Vec<String>,
    ) -> Self {
        Self {
            format_version: MANIFEST_FORMAT_VERSION,
            snapshot_id,
            verified_at,
            kind,
            ok: problems.is_empty(),
            problems,
            spirekeep_version: SPIREKEEP_VERSION.into(),
            unchecked: Vec::new(),
        }
    }

    /// The same record, naming what the run could not check.
    #[must_use]
    pub fn with_unchecked(mut self, unchecked: Vec<String>) -> Self {
        self.unchecked = unchecked;
        self
    }

    /// The record's key in the repository.
    #[must_use]
    pub fn key(&self) -> String {
        keys::verification(&self.snapshot_id, self.verified_at, self.kind)
    }

    /// Pretty JSON with a trailing newline.
    ///
    /// # Panics
    /// Never: every field serializes.
    #[must_use]
    pub fn to_json_pretty(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a record always serializes");
        s.push('\n');
        s
    }

    /// Parses a record (same version rules as [`Manifest::from_json`]).
    ///
    /// # Errors
    /// As [`Manifest::from_json`], and a record whose `ok` contradicts its problems.
    pub fn from_json(json: &[u8]) -> Result<Self, ManifestError> {
        let record: Self = match check_version(json)? {
            1 | 2 => {
                serde_json::from_slice(json).map_err(|e| ManifestError::Parse(e.to_string()))?
            }
            v => unreachable!("check_version accepted version {v}"),
        };
        if record.ok != record.problems.is_empty() {
            return Err(ManifestError::Invalid(vec![
                "`ok` contradicts the list of problems".into(),
            ]));
        }
        Ok(record)
    }

    /// Writes the record (create-only). Returns the key.
    ///
    /// # Errors
    /// Any store failure.
    pub async fn store(&self, repo: &Repository) -> Result<String, SnapshotError> {
        let key = self.key();
        repo.put_create(&key, self.to_json_pretty().into()).await?;
        Ok(key)
    }

    /// Every record of snapshot `id`, oldest first.
    ///
    /// # Errors
    /// Any store failure or unreadable record.
    pub async fn load_all(repo: &Repository, id: &SnapshotId) -> Result<Vec<Self>, SnapshotError> {
        let mut out = Vec::new();
        for meta in repo.list(&keys::verifications_prefix(id)).await? {
            let bytes = repo.get_capped(&meta.key, MAX_RECORD_BYTES).await?;
            let record = Self::from_json(&bytes).map_err(|problem| SnapshotError::Manifest {
                key: meta.key.clone(),
                problem,
            })?;
            out.push(record);
        }
        out.sort_by_key(|r| r.verified_at);
        Ok(out)
    }
}

fn check_version(json: &[u8]) -> Result<u32, ManifestError> {
    #[derive(Deserialize)]
    struct Probe {
        format_version: Option<u32>,
    }
    let probe: Probe =
        serde_json::from_slice(json).map_err(|e| ManifestError::Parse(e.to_string()))?;
    let found = probe
        .format_version
        .ok_or_else(|| ManifestError::Parse("no format_version field".into()))?;
    if found > NEWEST_MANIFEST_FORMAT_VERSION {
        return Err(ManifestError::TooNew {
            found,
            oldest: OLDEST_MANIFEST_FORMAT_VERSION,
            current: NEWEST_MANIFEST_FORMAT_VERSION,
        });
    }
    if found < OLDEST_MANIFEST_FORMAT_VERSION {
        return Err(ManifestError::TooOld {
            found,
            oldest: OLDEST_MANIFEST_FORMAT_VERSION,
            current: NEWEST_MANIFEST_FORMAT_VERSION,
        });
    }
    Ok(found)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// RFC 3339 in UTC, e.g. `2026-11-28T09:30:00.123456789Z`.
mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer, de, ser};
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, UtcOffset};

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        let text = t
            .to_offset(UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339)
            .map(|t| t.to_offset(UtcOffset::UTC))
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{Column, ColumnKind, Table};
    use time::macros::datetime;

    fn object(id: &SnapshotId, table: &str, part: u32, rows: u64, fill: char) -> DataObject {
        DataObject {
            key: keys::data_object(id, table, part),
            size: 100,
            sha256: fill.to_string().repeat(64),
            raw_size: 300,
            raw_sha256: fill.to_string().repeat(64),
            rows,
            content_hash: format!("{:064x}", u64::from(fill) * 1000 + rows),
            encryption: None,
        }
    }

    fn table(name: &str) -> Table {
        Table {
            name: name.into(),
            columns: vec![Column {
                name: "id".into(),
                declared_type: "integer".into(),
                kind: ColumnKind::Integer,
                nullable: false,
                auto_increment: true,
            }],
            primary_key: vec!["id".into()],
            indexes: vec![],
            create_sql: None,
        }
    }

    fn manifest() -> Manifest {
        let id = SnapshotId::parse("20261128T093000Z-0a1b2c").unwrap();
        let t1 = TableData::from_objects(
            "a",
            vec![object(&id, "a", 0, 3, 'a'), object(&id, "a", 1, 2, 'b')],
        )
        .unwrap();
        let t2 = TableData::from_objects("b", vec![object(&id, "b", 0, 0, 'c')]).unwrap();
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            snapshot_id: id,
            spirekeep_version: "0.1.0".into(),
            engine: Engine::Sqlite,
            server_version: "3.51.3".into(),
            source: "/var/lib/spire/datastore.sqlite3".into(),
            spire: MigrationsRow {
                schema_version: 23,
                code_version: "1.13.0".into(),
            },
            started_at: datetime!(2026-11-28 09:30:00.5 UTC),
            finished_at: datetime!(2026-11-28 09:30:02 UTC),
            labels: vec!["pre-upgrade".into()],
            data_format: DataFormat::current(&CodecOptions::default()),
            catalogue: Catalogue {
                tables: vec![table("a"), table("b")],
            },
            tables: vec![t1, t2],
            encryption: None,
            server_files: Vec::new(),
        }
    }

    #[test]
    fn a_sound_manifest_round_trips() {
        let m = manifest();
        assert_eq!(m.problems(), Vec::<String>::new());
        assert_eq!(m.tables[0].rows, 5);
        assert_eq!(m.total_rows(), 5);
        assert_eq!(m.total_size(), 300);
        let json = m.to_json_pretty();
        assert!(
            json.contains("\"started_at\": \"2026-11-28T09:30:00.5Z\""),
            "{json}"
        );
        assert_eq!(Manifest::from_json(json.as_bytes()).unwrap(), m);
    }

    #[test]
    fn versions_are_checked_first() {
        let newer = br#"{"format_version": 3, "something": "else entirely"}"#;
        let err = Manifest::from_json(newer).unwrap_err();
        assert!(matches!(err, ManifestError::TooNew { found: 3, .. }));
        assert!(err.to_string().contains("upgrade spirekeep"), "{err}");
        let older = br#"{"format_version": 0}"#;
        assert!(matches!(
            Manifest::from_json(older),
            Err(ManifestError::TooOld { found: 0, .. })
        ));
        assert!(matches!(
            Manifest::from_json(b"{}"),
            Err(ManifestError::Parse(_))
        ));
        assert!(matches!(
            Manifest::from_json(b"[1,"),
            Err(ManifestError::Parse(_))
        ));
        // Unknown fields are ignored within a version.
        let m = manifest();
        let mut v: serde_json::Value = serde_json::from_str(&m.to_json_pretty()).unwrap();
        v["added_later"] = serde_json::json!({"x": 1});
        assert_eq!(Manifest::from_json(v.to_string().as_bytes()).unwrap(), m);
        // A bad snapshot id is refused while parsing.
        v["snapshot_id"] = serde_json::json!("../../x");
        assert!(matches!(
            Manifest::from_json(v.to_string().as_bytes()),
            Err(ManifestError::Parse(_))
        ));
    }

    #[test]
    fn inconsistencies_are_all_reported() {
        let mut m = manifest();
        let other = SnapshotId::parse("20261128T093000Z-ffffff").unwrap();
        m.tables[0].objects[1].key = keys::data_object(&other, "a", 1);
        let dup = m.tables[0].objects[0].clone();
        m.tables[0].objects.push(dup);
        m.tables[1].rows = 7;
        m.tables[1].objects[0].sha256 = "ABC".into();
        m.catalogue.tables.push(table("c"));
        m.finished_at = datetime!(2026-11-28 09:00:00 UTC);
        let problems = m.problems();
        let all = problems.join("\n");
        for needle in [
            "finished_at is before started_at",
            "table c is in the catalogue but has no data",
            "is not under snapshots/20261128T093000Z-0a1b2c/data/",
            "is listed twice",
            "table a records 5 rows but its objects hold 8",
            "table b records 7 rows but its objects hold 0",
            "sha256 is not 64 lower-case hex digits",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let mut m = manifest();
        m.tables[0].content_hash = "0".repeat(64);
        assert!(
            m.problems()[0].contains("is not the combination"),
            "{:?}",
            m.problems()
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                                cut in 0usize..8000) {
            let _ = Manifest::from_json(&junk);
            let _ = VerificationRecord::from_json(&junk);
            let json = manifest().to_json_pretty();
            let cut = cut.min(json.len());
            // A truncated manifest is an error, never a partial manifest.
            if cut < json.len() - 1 {
                proptest::prop_assert!(Manifest::from_json(&json.as_bytes()[..cut]).is_err());
            }
        }
    }

    fn encrypted(mut m: Manifest, recipient: &str) -> Manifest {
        for o in m.tables.iter_mut().flat_map(|t| &mut t.objects) {
            o.encryption = Some(ObjectEncryption::Age);
        }
        m.encryption = Some(Encryption {
            scheme: ObjectEncryption::Age,
            recipients: vec![recipient.to_owned()],
        });
        m.format_version = ENCRYPTED_MANIFEST_FORMAT_VERSION;
        m
    }

    #[test]
    fn an_encrypted_manifest_round_trips_and_records_public_keys_only() {
        let (secret, public) = crate::store::crypt::generate();
        let m = encrypted(manifest(), &public);
        assert_eq!(m.problems(), Vec::<String>::new());
        assert!(m.is_encrypted());
        assert_eq!(m.recipients(), std::slice::from_ref(&public));
        let json = m.to_json_pretty();
        assert!(json.contains("\"format_version\": 2"), "{json}");
        assert!(json.contains("\"encryption\": \"age\""), "{json}");
        assert!(json.contains(&public), "{json}");
        let secret_line = secret.lines().last().unwrap();
        assert!(!json.contains(secret_line) && !json.contains("AGE-SECRET-KEY"));
        assert_eq!(Manifest::from_json(json.as_bytes()).unwrap(), m);
        // A plaintext manifest stays at version 1, without encryption fields.
        let plain = manifest().to_json_pretty();
        assert!(plain.contains("\"format_version\": 1") && !plain.contains("encryption"));
    }

    #[test]
    fn encryption_must_be_whole_and_match_the_version() {
        let (_, public) = crate::store::crypt::generate();
        let mut half = encrypted(manifest(), &public);
        half.tables[1].objects[0].encryption = None;
        let all = half.problems().join("\n");
        assert!(
            all.contains("is not encrypted in an encrypted snapshot"),
            "{all}"
        );
        let mut v1 = encrypted(manifest(), &public);
        v1.format_version = 1;
        assert!(
            v1.problems()
                .join("\n")
                .contains("format_version is 1, expected 2")
        );
        let mut no_section = encrypted(manifest(), &public);
        no_section.encryption = None;
        assert!(
            no_section
                .problems()
                .join("\n")
                .contains("the manifest has no encryption section")
        );
        let mut bad_key = encrypted(manifest(), &public);
        bad_key.encryption.as_mut().unwrap().recipients = vec!["age1nope".into()];
        assert!(
            bad_key
                .problems()
                .join("\n")
                .contains("not an age X25519 public key")
        );
        let mut unknown = serde_json::to_value(encrypted(manifest(), &public)).unwrap();
        unknown["encryption"]["scheme"] = serde_json::json!("rot13");
        assert!(matches!(
            Manifest::from_json(unknown.to_string().as_bytes()),
            Err(ManifestError::Parse(_))
        ));
    }

    #[test]
    fn verification_records() {
        let id = SnapshotId::parse("20261128T093000Z-0a1b2c").unwrap();
        let at = datetime!(2026-11-28 10:00:00 UTC);
        let good = VerificationRecord::new(id.clone(), at, VerifyKind::Deep, vec![]);
        assert!(good.ok);
        assert_eq!(
            good.key(),
            "verifications/20261128T093000Z-0a1b2c/20261128T100000.000Z-deep.json"
        );
        let json = good.to_json_pretty();
        assert_eq!(
            VerificationRecord::from_json(json.as_bytes()).unwrap(),
            good
        );
        let bad = VerificationRecord::new(
            id,
            at,
            VerifyKind::Shallow,
            vec!["object x: sha256 mismatch".into()],
        );
        assert!(!bad.ok);
        let mut v: serde_json::Value = serde_json::from_str(&bad.to_json_pretty()).unwrap();
        v["ok"] = serde_json::json!(true);
        assert!(VerificationRecord::from_json(v.to_string().as_bytes()).is_err());
    }
}
