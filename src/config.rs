//! Turning raw flags and environment into validated settings, before any I/O.

use std::path::{Path, PathBuf};

use crate::datastore::dsn::{self, ConnectionSpec, Engine};
use crate::datastore::spire_conf;
use crate::error::{Error, Result};

/// Where the datastore settings come from.
#[derive(Debug, Clone)]
pub enum DatastoreSource {
    /// A connection string or URL (`--datastore`).
    Connection {
        value: String,
        database_type: Option<String>,
    },
    /// SPIRE's own `server.conf` (`--spire-config`).
    SpireConfig { path: PathBuf, expand_env: bool },
}

/// A datastore ready to open, with the SPIRE settings that matter to its rules.
#[derive(Debug, Clone)]
pub struct ResolvedDatastore {
    pub spec: ConnectionSpec,
    /// `disable_migration` from server.conf (false for a bare connection string).
    pub disable_migration: bool,
    /// Where the server keeps its data dir and keys (only from server.conf).
    pub server: Option<spire_conf::ServerLayout>,
}

/// Resolves a datastore source. Relative SQLite paths resolve against `workdir`
/// (SPIRE's working directory; default: the current directory).
///
/// # Errors
/// Unreadable or invalid config files and connection strings.
pub fn resolve_datastore(
    source: &DatastoreSource,
    workdir: Option<&Path>,
) -> Result<ResolvedDatastore> {
    let cwd;
    let workdir = match workdir {
        Some(w) => w,
        None => {
            cwd = std::env::current_dir().map_err(|e| {
                Error::Unsupported(format!("cannot read the current directory: {e}"))
            })?;
            &cwd
        }
    };
    match source {
        DatastoreSource::Connection {
            value,
            database_type,
        } => {
            let engine = database_type
                .as_deref()
                .map(Engine::from_database_type)
                .transpose()?;
            Ok(ResolvedDatastore {
                spec: dsn::parse(value, engine, workdir)?,
                disable_migration: false,
                server: None,
            })
        }
        DatastoreSource::SpireConfig { path, expand_env } => {
            let conf = spire_conf::load(path, *expand_env)?;
            let spec = conf.connection(workdir).map_err(|e| match e {
                Error::ConnectionString(m) => Error::SpireConfig {
                    path: path.clone(),
                    message: format!("connection_string: {m}"),
                },
                other => other,
            })?;
            Ok(ResolvedDatastore {
                spec,
                disable_migration: conf.disable_migration,
                server: Some(conf.server_layout(workdir)),
            })
        }
    }
}
