//! Turning sqlx errors into spirekeep errors that say what to do next.

use crate::error::Error;

/// Classifies a driver error. `location` is already redacted.
pub(crate) fn classify(err: &sqlx::Error, location: &str) -> Error {
    let detail = one_line(&err.to_string());
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => {
            Error::Unreachable {
                location: location.to_string(),
                detail,
            }
        }
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            match code.as_str() {
                // PostgreSQL invalid_password / invalid_authorization_specification;
                // MySQL ER_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR (1698), ER_DBACCESS_DENIED_ERROR.
                "28P01" | "28000" | "1045" | "1698" | "1044" => Error::AuthFailed {
                    location: location.to_string(),
                    detail,
                },
                // PostgreSQL invalid_catalog_name; MySQL ER_BAD_DB_ERROR.
                "3D000" | "1049" => Error::NotSpire {
                    location: location.to_string(),
                    why: format!("{detail}; check the database name"),
                },
                // SQLite SQLITE_NOTADB.
                "26" => Error::NotSpire {
                    location: location.to_string(),
                    why: "the file is not a SQLite database".into(),
                },
                _ => Error::Database {
                    location: location.to_string(),
                    detail,
                },
            }
        }
        _ => Error::Database {
            location: location.to_string(),
            detail,
        },
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Largest number of bound values per statement we use on any engine
/// (PostgreSQL and MySQL allow 65535, SQLite 32766 since 3.32).
pub(crate) const MAX_BINDS: usize = 30_000;

/// How many rows of `width` columns fit in one multi-row INSERT.
pub(crate) fn rows_per_statement(width: usize) -> usize {
    (MAX_BINDS / width.max(1)).clamp(1, 5_000)
}
