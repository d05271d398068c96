//! One fresh database per test on the PostgreSQL and MySQL test servers, so
//! the suite runs in parallel without tests seeing each other's tables.
//!
//! The admin URLs come from `SPIREKEEP_TEST_PG_URL` (default
//! `postgres://spirekeep:spirekeep@127.0.0.1:5432/postgres`) and
//! `SPIREKEEP_TEST_MYSQL_URL` (default
//! `mysql://spirekeep:spirekeep@127.0.0.1:3306/`); `scripts/test-services.sh`
//! creates that user (CREATEDB on PostgreSQL, ALL PRIVILEGES on MariaDB).
//!
//! Tests call [`TestDatabase::cleanup`] at the end. Rust has no async `Drop`,
//! so a `TestDatabase` dropped without it (a failed assertion, say) is dropped
//! best-effort from a helper thread with its own runtime, bounded to a few
//! seconds; if that fails too, the database is left behind under its
//! `sk_test_` name for a later sweep.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

use super::super::driver_error::classify;
use super::super::{ConnectionSpec, Datastore, Engine, OpenMode, dsn, quote_ident};
use crate::error::{Error, ErrorKind, Result};

/// Environment variable with the PostgreSQL admin URL.
pub const PG_URL_ENV: &str = "SPIREKEEP_TEST_PG_URL";
/// Environment variable with the MySQL admin URL.
pub const MYSQL_URL_ENV: &str = "SPIREKEEP_TEST_MYSQL_URL";
const DEFAULT_PG_URL: &str = "postgres://spirekeep:spirekeep@127.0.0.1:5432/postgres";
const DEFAULT_MYSQL_URL: &str = "mysql://spirekeep:spirekeep@127.0.0.1:3306/";
/// Prefix of every database this module creates.
pub const NAME_PREFIX: &str = "sk_test_";

/// Whether a missing database service must fail a test rather than skip it
/// (`SPIREKEEP_TEST_REQUIRE_SERVICES` set to anything but empty or `0`;
/// `scripts/test-services.sh` sets it).
#[must_use]
pub fn services_required() -> bool {
    std::env::var("SPIREKEEP_TEST_REQUIRE_SERVICES").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A fresh, uniquely named database on the PostgreSQL or MySQL test server.
#[derive(Debug)]
pub struct TestDatabase {
    engine: Engine,
    name: String,
    url: String,
    admin_url: String,
    dropped: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestDatabase {
    /// Creates a new database on the PostgreSQL test server.
    ///
    /// # Errors
    /// The server is unreachable, refuses the admin credentials, or cannot
    /// create the database.
    pub async fn postgres(name_hint: &str) -> Result<Self> {
        Self::create(Engine::Postgres, name_hint).await
    }

    /// Creates a new database on the MySQL (MariaDB) test server.
    ///
    /// # Errors
    /// As for [`TestDatabase::postgres`].
    pub async fn mysql(name_hint: &str) -> Result<Self> {
        Self::create(Engine::Mysql, name_hint).await
    }

    /// Like [`TestDatabase::postgres`] or [`TestDatabase::mysql`], but `None`
    /// (after a note on stderr) when the server cannot be reached or refuses
    /// the login and [`services_required`] is false.
    ///
    /// # Errors
    /// Any failure when services are required; other failures always.
    pub async fn create_or_skip(engine: Engine, name_hint: &str) -> Result<Option<Self>> {
        match Self::create(engine, name_hint).await {
            Ok(db) => Ok(Some(db)),
            Err(e)
                if !services_required()
                    && matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Auth) =>
            {
                eprintln!(
                    "skipping: no {engine} test server ({e}); run `source scripts/test-services.sh` \
                     or set SPIREKEEP_TEST_REQUIRE_SERVICES=1 to make this a failure"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a new database on `engine`'s test server (PostgreSQL or MySQL).
    ///
    /// # Errors
    /// SQLite (use a temporary file instead), or as for [`TestDatabase::postgres`].
    pub async fn create(engine: Engine, name_hint: &str) -> Result<Self> {
        let admin_url = match engine {
            Engine::Postgres => {
                std::env::var(PG_URL_ENV).unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
            }
            Engine::Mysql => {
                std::env::var(MYSQL_URL_ENV).unwrap_or_else(|_| DEFAULT_MYSQL_URL.to_string())
            }
            Engine::Sqlite => {
                return Err(Error::Unsupported(
                    "SQLite test datastores are plain temporary files".into(),
                ));
            }
        };
        let name = unique_name(name_hint);
        let url = database_url(engine, &admin_url, &name)?;
        let create = format!("CREATE DATABASE {}", quote_ident(engine, &name));
        admin_execute(engine, &admin_url, &create).await?;
        Ok(Self {
            engine,
            name,
            url,
            admin_url,
            dropped: false,
        })
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The database's name (`sk_test_<hint>_<pid>_<n>_<time>`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for the new database (sqlx form, with the admin user's
    /// credentials), suitable for `--datastore` and [`dsn::parse`].
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The parsed connection spec of [`TestDatabase::url`].
    ///
    /// # Errors
    /// Only if the URL does not parse (a bug).
    pub fn spec(&self) -> Result<ConnectionSpec> {
        dsn::parse(&self.url, Some(self.engine), Path::new("/"))
    }

    /// Opens the new database read-write.
    ///
    /// # Errors
    /// As for [`crate::datastore::open`].
    pub async fn open(&self) -> Result<Box<dyn Datastore>> {
        super::super::open(&self.spec()?, OpenMode::ReadWrite).await
    }

    /// Drops the database (PostgreSQL: `WITH (FORCE)`, closing any
    /// connection still open to it).
    ///
    /// # Errors
    /// The admin connection or the `DROP DATABASE` failed.
    pub async fn cleanup(mut self) -> Result<()> {
        self.dropped = true;
        drop_database(self.engine, &self.admin_url, &self.name).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (engine, admin_url, name) = (self.engine, self.admin_url.clone(), self.name.clone());
        // No async Drop: drop it from a thread with a runtime of its own.
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return false;
            };
            rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    drop_database(engine, &admin_url, &name),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            })
        });
        if !worker.join().unwrap_or(false) {
            eprintln!(
                "warning: test database {} was not dropped; call TestDatabase::cleanup()",
                self.name
            );
        }
    }
}

async fn drop_database(engine: Engine, admin_url: &str, name: &str) -> Result<()> {
    let sql = match engine {
        Engine::Postgres => format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(engine, name)
        ),
        _ => format!("DROP DATABASE IF EXISTS {}", quote_ident(engine, name)),
    };
    // `WITH (FORCE)` ends the other sessions before it stops autovacuum, and
    // refuses a non-superuser the end of a backend without a role: an
    // autovacuum worker on a database just filled (seen in CI). Such a
    // worker is done a moment later, so try again briefly before giving up.
    let mut tries = 0;
    loop {
        match admin_execute(engine, admin_url, &sql).await {
            Err(_) if tries < 10 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            result => return result,
        }
    }
}

/// Runs one statement on a fresh admin connection.
async fn admin_execute(engine: Engine, admin_url: &str, sql: &str) -> Result<()> {
    let location = redact(admin_url);
    let err = |e: &sqlx::Error| classify(e, &location);
    match engine {
        Engine::Postgres => {
            let mut conn = PgConnection::connect(admin_url)
                .await
                .map_err(|e| err(&e))?;
            sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
                .execute(&mut conn)
                .await
                .map_err(|e| err(&e))?;
            conn.close().await.map_err(|e| err(&e))
        }
        Engine::Mysql => {
            let mut conn = MySqlConnection::connect(admin_url)
                .await
                .map_err(|e| err(&e))?;
            sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
                .execute(&mut conn)
                .await
                .map_err(|e| err(&e))?;
            conn.close().await.map_err(|e| err(&e))
        }
        Engine::Sqlite => Err(Error::Unsupported("no admin connection for SQLite".into())),
    }
}

/// `sk_test_<hint>_<pid>_<n>_<micros>`: unique across the parallel test
/// processes of one run, lower case, at most 63 bytes (PostgreSQL's limit).
fn unique_name(hint: &str) -> String {
    let hint: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(20)
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() % 1_000_000_000);
    format!("{NAME_PREFIX}{hint}_{}_{n}_{micros}", std::process::id())
}

/// The admin URL with its database replaced by `name`. PostgreSQL gets
/// `sslmode=prefer` unless the admin URL names one: spirekeep's parser
/// defaults to lib/pq's `require`, which a plain test server does not offer.
fn database_url(engine: Engine, admin_url: &str, name: &str) -> Result<String> {
    let mut url = url::Url::parse(admin_url).map_err(|e| {
        Error::ConnectionString(format!("invalid test admin URL {}: {e}", redact(admin_url)))
    })?;
    url.set_path(&format!("/{name}"));
    if engine == Engine::Postgres && !url.query_pairs().any(|(k, _)| k == "sslmode") {
        url.query_pairs_mut().append_pair("sslmode", "prefer");
    }
    Ok(url.to_string())
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => "<invalid URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_safe_and_short() {
        let a = unique_name("Round Trip: é/x");
        let b = unique_name("Round Trip: é/x");
        assert_ne!(a, b);
        assert!(a.starts_with("sk_test_round_trip___"), "{a}");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'),
            "{a}"
        );
        assert!(unique_name(&"x".repeat(200)).len() <= 63);
    }

    #[test]
    fn database_urls_swap_the_database_and_keep_credentials() {
        let pg = database_url(Engine::Postgres, DEFAULT_PG_URL, "sk_test_a").unwrap();
        assert_eq!(
            pg,
            "postgres://spirekeep:spirekeep@127.0.0.1:5432/sk_test_a?sslmode=prefer"
        );
        let pg = database_url(
            Engine::Postgres,
            "postgres://u:p@h/postgres?sslmode=disable",
            "d",
        )
        .unwrap();
        assert_eq!(pg, "postgres://u:p@h/d?sslmode=disable");
        let my = database_url(Engine::Mysql, DEFAULT_MYSQL_URL, "sk_test_b").unwrap();
        assert_eq!(my, "mysql://spirekeep:spirekeep@127.0.0.1:3306/sk_test_b");
        assert_eq!(
            redact(DEFAULT_PG_URL),
            "postgres://spirekeep@127.0.0.1:5432/postgres"
        );
    }
}
