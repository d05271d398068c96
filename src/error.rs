//! The library's error type. Every variant says what went wrong and, where
//! there is one, what to do next; none of them ever carries a password.

use std::path::PathBuf;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad classes of failure, used for exit codes and retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user's input (flags, connection string, config file) is wrong.
    Usage,
    /// A server could not be reached; trying again later may help.
    Unreachable,
    /// The server refused the credentials.
    Auth,
    /// The target is not what spirekeep expected (not a SPIRE datastore, wrong engine).
    NotSpire,
    /// Data read back does not match what was written (hash mismatch, missing object).
    Integrity,
    /// Anything else the database or object store reported.
    Backend,
}

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid datastore connection string: {0}")]
    ConnectionString(String),

    #[error("SPIRE config {}: {message}", path.display())]
    SpireConfig { path: PathBuf, message: String },

    #[error("SQLite datastore {} does not exist; check the path (SPIRE resolves relative paths against its working directory, see --spire-workdir)", path.display())]
    MissingSqliteFile { path: PathBuf },

    #[error(
        "cannot reach the datastore at {location}: {detail}; check that the database server is running and the host and port are right"
    )]
    Unreachable { location: String, detail: String },

    #[error(
        "the datastore at {location} refused the credentials: {detail}; check the user and password in the connection string (or PGPASSWORD for PostgreSQL)"
    )]
    AuthFailed { location: String, detail: String },

    #[error("{location} is not a SPIRE datastore: {why}")]
    NotSpire { location: String, why: String },

    #[error("database error on {location}: {detail}")]
    Database { location: String, detail: String },

    #[error("{0}")]
    Unsupported(String),

    #[error("{0}")]
    Aborted(String),

    /// An object-storage failure (the message names the repository and key).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    /// A snapshot that cannot be written, read or trusted (the message names
    /// the object or table).
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),

    /// A snapshot, record or plan that does not exist or is in the wrong state.
    #[error("{0}")]
    NotFound(String),

    /// Data read back does not match what was expected.
    #[error("{0}")]
    Integrity(String),

    /// The repository lock is held by another process, or was lost.
    #[error(transparent)]
    Lock(#[from] crate::store::lock::LockError),

    /// A plan file, saved plan or journal (`plan/`).
    #[error(transparent)]
    Plan(#[from] crate::plan::error::PlanError),
}

impl Error {
    /// The class of this error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::ConnectionString(_)
            | Self::SpireConfig { .. }
            | Self::MissingSqliteFile { .. }
            | Self::Unsupported(_) => ErrorKind::Usage,
            Self::Unreachable { .. } => ErrorKind::Unreachable,
            Self::AuthFailed { .. } => ErrorKind::Auth,
            Self::NotSpire { .. } => ErrorKind::NotSpire,
            Self::Database { .. } | Self::Aborted(_) => ErrorKind::Backend,
            Self::Store(e) => e.kind(),
            Self::Snapshot(e) => e.kind(),
            Self::NotFound(_) => ErrorKind::Usage,
            Self::Integrity(_) => ErrorKind::Integrity,
            Self::Lock(crate::store::lock::LockError::Store(e)) => e.kind(),
            Self::Lock(crate::store::lock::LockError::Invalid(_)) => ErrorKind::Usage,
            Self::Lock(_) => ErrorKind::Backend,
            Self::Plan(e) => e.kind(),
        }
    }

    /// Whether the same operation may succeed if tried again later.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Unreachable)
    }
}
