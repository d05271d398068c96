//! What a SPIRE server does to its datastore when it starts (`migrateDB` in
//! SPIRE's `migration.go`, spire-reference §4), carried out on a real
//! datastore.
//!
//! The decision is spirekeep's own [`compat::server_startup`]; this module
//! only executes it, the way SPIRE would:
//!
//! - fresh datastore (no `migrations` table): `initDB` creates the release's
//!   full schema (the testkit's GORM DDL for schema 23, 24 or 25) and the row
//!   (latest, running version), in one transaction where the engine allows;
//! - schema == latest: `code_version` is raised to the running version if
//!   that is higher (an `UPDATE` with no `WHERE`, as GORM's `Updates` does);
//! - schema < latest: one step at a time, each in its own transaction where
//!   the engine allows. 23→24 adds `attested_node_entries.agent_version`,
//!   24→25 adds `registered_entries.additional_attributes`, with the column
//!   type GORM v1 gives a Go `string` / `[]byte` on that engine. Like GORM's
//!   `AutoMigrate`, a step only adds a column that is missing, so a step that
//!   was interrupted after its DDL completes when run again.
//! - refusals: SPIRE's message, and the datastore is left alone.
//!
//! MySQL commits DDL implicitly, so there a step is the `ALTER TABLE`
//! followed by the `UPDATE` (the DDL first, so a failed DDL never leaves the
//! row claiming the new schema).

use spirekeep::compat::{self, MigrationRow, Refusal, Release, StartupOutcome};
use spirekeep::datastore::{Catalogue, Datastore, Engine, testkit};
use spirekeep::inspect::read_migrations;
use time::OffsetDateTime;

use crate::log;
use crate::sql;
use crate::state::HalfMigrate;

/// Why the server does not start.
pub enum StartError {
    /// SPIRE refuses to start on this datastore (exit 1, SPIRE's message).
    Refused(Refusal),
    /// The `half-migrate` fault fired: the DDL of the step to `to` is applied,
    /// the `migrations` row is not (exit 2, like a crash).
    HalfMigrated { from: i64, to: i64 },
    /// Anything else (the database failed, the stand-in cannot do this step).
    Failed(anyhow::Error),
}

impl From<spirekeep::Error> for StartError {
    fn from(e: spirekeep::Error) -> Self {
        Self::Failed(e.into())
    }
}

/// The column one migration step adds: (table, column, type on the engine).
fn step_column(engine: Engine, to: i64) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match (to, engine) {
        // v1.14.3: AttestedNode.AgentVersion string
        (24, Engine::Sqlite | Engine::Mysql) => {
            ("attested_node_entries", "agent_version", "varchar(255)")
        }
        (24, Engine::Postgres) => ("attested_node_entries", "agent_version", "text"),
        // v1.15.0: RegisteredEntry.AdditionalAttributes []byte
        (25, Engine::Sqlite) => ("registered_entries", "additional_attributes", "blob"),
        (25, Engine::Postgres) => ("registered_entries", "additional_attributes", "bytea"),
        (25, Engine::Mysql) => ("registered_entries", "additional_attributes", "longblob"),
        _ => return None,
    })
}

/// Runs SPIRE's start-up rules for `code` against `ds`.
pub async fn startup(
    ds: &dyn Datastore,
    code: &Release,
    disable_migration: bool,
    half_migrate: Option<HalfMigrate>,
) -> Result<StartupOutcome, StartError> {
    let engine = ds.engine();
    if engine == Engine::Sqlite {
        // SPIRE opens every SQLite connection with _journal_mode=WAL (§8);
        // the mode is persistent in the file.
        ds.execute_script("PRAGMA journal_mode=WAL").await?;
    }
    let catalogue = ds.catalogue().await?;
    if catalogue.table("migrations").is_none() {
        return init_db(ds, &catalogue, code, disable_migration).await;
    }
    let row = match read_migrations(ds, &catalogue).await?.0 {
        Some(r) => MigrationRow::new(r.schema_version, r.code_version),
        None => {
            // SPIRE's FirstOrCreate inserts an empty row (0, "") and goes on.
            let now = sql::timestamp(engine, OffsetDateTime::now_utc());
            ds.execute_script(&sql::insert(
                engine,
                "migrations",
                &[
                    ("created_at", now.clone()),
                    ("updated_at", now),
                    ("version", "0".into()),
                    ("code_version", sql::string(engine, "")),
                ],
            ))
            .await?;
            MigrationRow::new(0, "")
        }
    };
    log::info(
        "Opened SQL datastore",
        &[
            ("schema", &row.schema.to_string()),
            ("version_info", &row.code_version),
            ("subsystem_name", "sql"),
        ],
    );
    let outcome = compat::server_startup(code, Some(&row), disable_migration);
    match &outcome {
        StartupOutcome::Refused { refusal, .. } => {
            return Err(StartError::Refused(refusal.clone()));
        }
        StartupOutcome::Initialized { .. } => {
            return Err(StartError::Failed(anyhow::anyhow!(
                "internal error: initDB chosen for a datastore that has a migrations row"
            )));
        }
        StartupOutcome::UpToDate {
            row: after,
            code_version_bumped,
        } => {
            if *code_version_bumped {
                ds.execute_script(&update_row(engine, after)).await?;
            }
        }
        StartupOutcome::StartedWithoutMigrating { .. } => {}
        StartupOutcome::SchemaAhead { .. } => {
            if let Some(w) = outcome.warning() {
                log::warn(w, &[("subsystem_name", "sql")]);
            }
        }
        StartupOutcome::Migrated {
            from_schema,
            row: after,
        } => {
            log::info("Running migrations...", &[("subsystem_name", "sql")]);
            for from in *from_schema..after.schema {
                migrate_step(ds, from, &after.code_version, half_migrate).await?;
            }
            log::info("Done running migrations", &[("subsystem_name", "sql")]);
        }
    }
    Ok(outcome)
}

/// `initDB`: the release's full schema and the row (latest, running).
async fn init_db(
    ds: &dyn Datastore,
    catalogue: &Catalogue,
    code: &Release,
    disable_migration: bool,
) -> Result<StartupOutcome, StartError> {
    let engine = ds.engine();
    let present: Vec<&str> = testkit::SPIRE_TABLES
        .iter()
        .copied()
        .filter(|t| catalogue.table(t).is_some())
        .collect();
    if !present.is_empty() {
        // SPIRE's AutoMigrate would add the missing tables around them; the
        // stand-in only creates whole schemas, so say so instead of guessing.
        return Err(StartError::Failed(anyhow::anyhow!(
            "the datastore has SPIRE tables ({}) but no migrations table; the stand-in only initialises empty datastores",
            present.join(", ")
        )));
    }
    let outcome = compat::server_startup(code, None, disable_migration);
    let row = match &outcome {
        StartupOutcome::Initialized { row } => row.clone(),
        StartupOutcome::Refused { refusal, .. } => {
            return Err(StartError::Refused(refusal.clone()));
        }
        other => {
            return Err(StartError::Failed(anyhow::anyhow!(
                "internal error: unexpected start-up outcome {other:?} on a fresh datastore"
            )));
        }
    };
    let ddl = u32::try_from(row.schema)
        .ok()
        .and_then(|s| testkit::spire_ddl(engine, s))
        .ok_or_else(|| {
            StartError::Failed(anyhow::anyhow!(
                "SPIRE {} creates schema {}; the stand-in can create schemas 23 to 25 only (SPIRE 1.8.0 and later)",
                code.version,
                row.schema
            ))
        })?;
    log::info("Initializing new database", &[("subsystem_name", "sql")]);
    let now = sql::timestamp(engine, OffsetDateTime::now_utc());
    let insert = sql::insert(
        engine,
        "migrations",
        &[
            ("created_at", now.clone()),
            ("updated_at", now),
            ("version", row.schema.to_string()),
            ("code_version", sql::string(engine, &row.code_version)),
        ],
    );
    match engine {
        Engine::Sqlite => {
            ds.execute_script(&format!("BEGIN IMMEDIATE;\n{ddl}\n{insert};\nCOMMIT;"))
                .await?;
        }
        Engine::Postgres => {
            ds.execute_script(&format!("BEGIN;\n{ddl}\n{insert};\nCOMMIT;"))
                .await?;
        }
        Engine::Mysql => {
            ds.execute_script(ddl).await?;
            ds.execute_script(&insert).await?;
        }
    }
    Ok(outcome)
}

/// `UPDATE migrations SET code_version, updated_at, version`: no `WHERE`,
/// exactly as GORM's `Model(&Migration{}).Updates(...)` writes it.
fn update_row(engine: Engine, row: &MigrationRow) -> String {
    format!(
        "UPDATE {} SET {} = {}, {} = {}, {} = {}",
        sql::ident(engine, "migrations"),
        sql::ident(engine, "code_version"),
        sql::string(engine, &row.code_version),
        sql::ident(engine, "updated_at"),
        sql::timestamp(engine, OffsetDateTime::now_utc()),
        sql::ident(engine, "version"),
        row.schema
    )
}

/// One migration step, `from` → `from + 1`.
async fn migrate_step(
    ds: &dyn Datastore,
    from: i64,
    code_version: &str,
    half_migrate: Option<HalfMigrate>,
) -> Result<(), StartError> {
    let engine = ds.engine();
    let to = from + 1;
    log::info(
        "Migrating version",
        &[
            ("version_info", &from.to_string()),
            ("subsystem_name", "sql"),
        ],
    );
    let (table, column, kind) = step_column(engine, to).ok_or_else(|| {
        StartError::Failed(anyhow::anyhow!(
            "the stand-in knows the migration steps 23→24 and 24→25 only, not {from}→{to}"
        ))
    })?;
    let missing = !ds.catalogue().await?.has_column(table, column);
    let ddl = missing.then(|| {
        format!(
            "ALTER TABLE {} ADD {} {kind}",
            sql::ident(engine, table),
            sql::ident(engine, column)
        )
    });
    let update = update_row(engine, &MigrationRow::new(to, code_version));
    let crash_here = match half_migrate {
        Some(HalfMigrate::FirstStep) => true,
        Some(HalfMigrate::StepTo(target)) => target == to,
        None => false,
    };
    if crash_here {
        // Outside any transaction, so the DDL persists on every engine.
        if let Some(ddl) = &ddl {
            ds.execute_script(ddl).await?;
        }
        return Err(StartError::HalfMigrated { from, to });
    }
    let ddl = ddl.map(|d| format!("{d};\n")).unwrap_or_default();
    match engine {
        Engine::Sqlite => {
            ds.execute_script(&format!("BEGIN IMMEDIATE;\n{ddl}{update};\nCOMMIT;"))
                .await?;
        }
        Engine::Postgres => {
            ds.execute_script(&format!("BEGIN;\n{ddl}{update};\nCOMMIT;"))
                .await?;
        }
        Engine::Mysql => {
            if !ddl.is_empty() {
                ds.execute_script(&ddl).await?;
            }
            ds.execute_script(&update).await?;
        }
    }
    Ok(())
}
