//! Errors of the snapshot format, codec and manifest.

use std::io;

use crate::error::ErrorKind;
use crate::store::StoreError;

/// Everything that can go wrong encoding, storing, reading or checking a
/// snapshot. Every variant names the object (repository key) or table, and
/// the integrity failures say what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(
        "data object {object} is malformed at byte {offset} of its decompressed stream: {problem}; \
         the object is damaged: restore from another snapshot"
    )]
    Malformed {
        object: String,
        offset: u64,
        problem: String,
    },

    #[error(
        "data object {object} ends early at byte {offset} of its decompressed stream (inside {what}); \
         the object is truncated (an interrupted upload or damaged storage): restore from another snapshot"
    )]
    Truncated {
        object: String,
        offset: u64,
        what: &'static str,
    },

    #[error(
        "data object {object} cannot be decompressed at byte {offset} of its decompressed stream: {detail}; \
         the stored bytes are damaged: restore from another snapshot"
    )]
    Unreadable {
        object: String,
        offset: u64,
        detail: String,
    },

    #[error(
        "data object {object}: {what} mismatch: the manifest records {expected} but the stored object has \
         {actual}; the object was damaged or replaced after the backup, so this table cannot be restored \
         from this snapshot: restore from another snapshot"
    )]
    Mismatch {
        object: String,
        what: &'static str,
        expected: String,
        actual: String,
    },

    #[error(
        "data object {object} cannot be decrypted: {detail}; the object was damaged or replaced after \
         the backup: restore from another snapshot"
    )]
    Undecryptable { object: String, detail: String },

    #[error(
        "data object {object} is encrypted and no identity was given: pass --identity FILE (or set \
         SPIREKEEP_AGE_IDENTITY_FILE) naming an age identity file with a matching key"
    )]
    NoIdentity { object: String },

    #[error("table {table} cannot be written to a snapshot: {problem}")]
    Encode { table: String, problem: String },

    #[error("writing the data object of table {table} failed: {detail}")]
    Pipeline { table: String, detail: String },

    #[error(transparent)]
    Store(#[from] StoreError),

    /// The problem is part of the message and deliberately not a `source`:
    /// printing the chain (`{:#}`) would repeat it.
    #[error("manifest {key}: {problem}")]
    Manifest { key: String, problem: ManifestError },
}

/// What is wrong with a manifest or verification record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("not a valid spirekeep manifest: {0}")]
    Parse(String),

    #[error(
        "format version {found} was written by a newer spirekeep (this one reads versions {oldest} to \
         {current}); upgrade spirekeep"
    )]
    TooNew {
        found: u32,
        oldest: u32,
        current: u32,
    },

    #[error(
        "format version {found} is older than this spirekeep reads (versions {oldest} to {current}); \
         read it with an older spirekeep release"
    )]
    TooOld {
        found: u32,
        oldest: u32,
        current: u32,
    },

    #[error("inconsistent: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl SnapshotError {
    /// The class of this error (for exit codes).
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Malformed { .. }
            | Self::Truncated { .. }
            | Self::Unreadable { .. }
            | Self::Mismatch { .. }
            | Self::Undecryptable { .. } => ErrorKind::Integrity,
            Self::NoIdentity { .. } => ErrorKind::Usage,
            Self::Manifest { problem, .. } => match problem {
                ManifestError::TooNew { .. } | ManifestError::TooOld { .. } => ErrorKind::Usage,
                ManifestError::Parse(_) | ManifestError::Invalid(_) => ErrorKind::Integrity,
            },
            Self::Encode { .. } | Self::Pipeline { .. } => ErrorKind::Backend,
            Self::Store(e) => e.kind(),
        }
    }

    /// Whether the same operation may succeed if tried again later.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// An error from a reader below the decoder: a store failure travels
    /// inside the `io::Error` and comes out as itself; anything else (zstd's
    /// own errors, a checksum failure) means the bytes cannot be decompressed.
    pub(crate) fn from_read_error(object: &str, offset: u64, e: io::Error) -> Self {
        match unwrap_io(e) {
            Ok(inner) => inner,
            Err(e) => Self::Unreadable {
                object: object.to_owned(),
                offset,
                detail: e.to_string(),
            },
        }
    }

    /// An error from the writer below the encoder (the compressor, the channel
    /// to the uploader).
    pub(crate) fn from_write_error(table: &str, e: io::Error) -> Self {
        match unwrap_io(e) {
            Ok(inner) => inner,
            Err(e) => Self::Pipeline {
                table: table.to_owned(),
                detail: e.to_string(),
            },
        }
    }
}

/// Takes a [`StoreError`] or [`SnapshotError`] back out of an `io::Error`
/// that carries one.
fn unwrap_io(e: io::Error) -> Result<SnapshotError, io::Error> {
    let carries = e
        .get_ref()
        .is_some_and(|inner| inner.is::<StoreError>() || inner.is::<SnapshotError>());
    if !carries {
        return Err(e);
    }
    let kind = e.kind();
    let inner = e.into_inner().expect("checked above");
    match inner.downcast::<StoreError>() {
        Ok(store) => Ok(SnapshotError::Store(*store)),
        Err(other) => match other.downcast::<SnapshotError>() {
            Ok(snap) => Ok(*snap),
            Err(other) => Err(io::Error::new(kind, other)),
        },
    }
}
