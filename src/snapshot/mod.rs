//! Snapshots: the data-object format, the streaming codec, and the manifest.
//!
//! Pure pieces, no database access: the backup, verify and restore commands
//! drive them with rows from [`crate::datastore`] and store them through
//! [`crate::store::Repository`]. The byte-level format is documented in
//! docs/format.md.
//!
//! - [`format`]: SPKD, the engine-neutral, length-prefixed row encoding;
//! - [`codec`]: zstd + SHA-256 streaming ([`codec::TableWriter`],
//!   [`codec::TableReader`]) and the order-independent content hash;
//! - [`manifest`]: the versioned manifest written last with a create-only put,
//!   and verification records;
//! - [`adapt`]: what a target engine cannot hold unchanged (restore preflight);
//! - [`impact`]: what replacing a live datastore changes (agents, entries, bundles);
//! - [`retention`]: which snapshots a retention policy keeps, and why.

pub mod adapt;
pub mod codec;
mod error;
pub mod format;
pub mod impact;
pub mod manifest;
pub mod retention;

pub use codec::{CodecOptions, ContentHash, ContentHasher, TableReader, TableWriter};
pub use error::{ManifestError, SnapshotError};
pub use manifest::{DataObject, Manifest, TableData, VerificationRecord};
