//! spirekeep: snapshots, verified restores and staged upgrades for SPIRE
//! server datastores.
//!
//! The library holds all the logic; the `spirekeep` binary is a thin shell
//! over [`cli::run`]. Layers, top to bottom (see docs/ARCHITECTURE.md):
//!
//! - [`cli`]: argument parsing and output, one file per command;
//! - [`inspect`], `compat`, `snapshot`, `plan`: what spirekeep does;
//! - [`datastore`] (the only module that talks SQL) and `store` (the only one that talks to object storage).
//!
//! ```no_run
//! # async fn demo() -> spirekeep::Result<()> {
//! use spirekeep::datastore::{self, dsn, OpenMode};
//! let spec = dsn::parse("dbname=spire user=spire host=db", None, std::path::Path::new("."))?;
//! let ds = datastore::open(&spec, OpenMode::ReadOnly).await?;
//! let report = spirekeep::inspect::inspect(ds.as_ref()).await?;
//! println!("schema {:?}", report.schema_version);
//! # Ok(()) }
//! ```

// No unsafe code in the library, and no `allow` can let any in.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca_keys;
pub mod cli;
pub mod compat;
pub mod config;
pub mod datastore;
pub mod error;
pub mod inspect;
pub mod metrics;
pub mod plan;
pub mod redact;
pub mod rehearse;
pub mod snapshot;
pub mod store;
pub mod testpoint;

pub use error::{Error, ErrorKind, Result};
