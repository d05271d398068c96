//! Snapshots: the data-object format, the streaming codec, the manifest, and
//! the operations over them (backup, list, verify, restore).
//!
//! The operations drive the pure pieces with rows from [`crate::datastore`]
//! and store them through [`crate::store::Repository`]. The byte-level format is documented in
//! docs/format.md.
//!
//! - [`format`]: SPKD, the engine-neutral, length-prefixed row encoding;
//! - [`codec`]: zstd + SHA-256 streaming ([`codec::TableWriter`],
//!   [`codec::TableReader`]) and the order-independent content hash;
//! - [`manifest`]: the versioned manifest written last with a create-only put,
//!   and verification records;
//! - [`backup`]: one consistent read streamed into data objects, manifest last;
//! - [`listing`]: `latest` or an id, and the summaries `list` and `show` print;
//! - [`adapt`]: what a target engine cannot hold unchanged (restore preflight);
//! - [`impact`]: what replacing a live datastore changes (agents, entries, bundles);
//! - [`live_rules`]: what a restore never brings back (used join tokens, an old own bundle, stale
//!   revisions) and the live agents it can carry over;
//! - [`retention`]: which snapshots a retention policy keeps, and why;
//! - [`prune`]: a retention plan over a real repository (pins, leftovers) and its execution;
//! - [`pins`]: explicit holds on a snapshot that prune respects;
//! - [`verify`]: every object re-read and every hash checked; a deep verify is a restore drill;
//! - [`restore`]: plan (hash check, preflight, impact), all-or-nothing load, read-back check;
//! - [`server_files`]: SPIRE's keys file and data dir stored beside the data objects.

pub mod adapt;
pub mod backup;
pub mod codec;
mod error;
pub mod format;
mod hash_runs;
pub mod impact;
pub mod listing;
pub mod live_rules;
pub mod manifest;
pub mod pins;
pub mod prune;
pub mod restore;
pub mod retention;
pub mod server_files;
pub mod verify;

pub use codec::{CodecOptions, ContentHash, ContentHasher, TableReader, TableWriter};
pub use error::{ManifestError, SnapshotError};
pub use manifest::{DataObject, Manifest, TableData, VerificationRecord};
