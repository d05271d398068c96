//! Creates a populated SPIRE datastore for trying spirekeep out, tests and
//! benchmarks.
//!
//! ```text
//! cargo run --release --example generate -- --datastore ./spire.sqlite3 --entries 10000
//! cargo run --release --example generate -- \
//!     --datastore 'postgres://spirekeep:spirekeep@127.0.0.1:5432/bench?sslmode=prefer' \
//!     --entries 1000000 --schema 25 --code-version 1.15.3 --seed 1
//! cargo run --release --example generate -- --datastore 'mysql://u:p@127.0.0.1:3306/spire' --entries 500 --hostile
//! ```
//!
//! `--datastore` takes any connection string spirekeep accepts (a SQLite
//! path, a lib/pq string, a go-sql-driver DSN, a URL). A SQLite file is
//! created and must not exist yet; a PostgreSQL or MySQL database must exist
//! and be empty. The schema is exactly what SPIRE's `initDB` creates; see
//! `spirekeep::datastore::testkit` for what the rows look like.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use spirekeep::datastore::testkit::{Population, create_spire_datastore};
use spirekeep::datastore::{self, ConnectionSpec, Engine, OpenMode, dsn};

/// Create a populated SPIRE datastore.
#[derive(Debug, Parser)]
struct Args {
    /// Where: a SQLite path, or a PostgreSQL / MySQL connection string.
    #[arg(long)]
    datastore: String,
    /// SPIRE's database_type (sqlite3, postgres, mysql) when the string does not make it clear.
    #[arg(long)]
    database_type: Option<String>,
    /// Registration entries; agents, selectors and the rest scale with it.
    #[arg(long, default_value_t = 1_000)]
    entries: usize,
    /// SPIRE schema version (23, 24 or 25).
    #[arg(long, default_value_t = 25)]
    schema: u32,
    /// migrations.code_version.
    #[arg(long, default_value = "1.15.3")]
    code_version: String,
    /// Seed: the same seed gives the same rows.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Put awkward but valid values in some rows.
    #[arg(long)]
    hostile: bool,
    /// Allow 4-byte UTF-8 in hostile text (default: yes, except on MySQL).
    #[arg(long)]
    four_byte_utf8: Option<bool>,
    /// No Go zero times (for MySQL servers with NO_ZERO_DATE).
    #[arg(long)]
    no_zero_times: bool,
    /// Whole-second timestamps only.
    #[arg(long)]
    whole_seconds: bool,
    /// Entries per generated block.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Create the indexes after the rows (default: on PostgreSQL and MySQL,
    /// and on SQLite from 50,000 entries).
    #[arg(long)]
    defer_indexes: Option<bool>,
    /// SQLite only: leave the file in WAL mode, as a running SPIRE server does
    /// (default: rollback-journal mode, a single self-contained file).
    #[arg(long)]
    sqlite_wal: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> spirekeep::Result<()> {
    let engine = args
        .database_type
        .as_deref()
        .map(Engine::from_database_type)
        .transpose()?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| Path::new(".").to_path_buf());
    let spec = dsn::parse(&args.datastore, engine, &cwd)?;
    if let ConnectionSpec::Sqlite(s) = &spec
        && s.path.exists()
    {
        return Err(spirekeep::Error::Unsupported(format!(
            "{} already exists; the generator only creates new datastores",
            s.path.display()
        )));
    }
    let pop = Population {
        entries: args.entries,
        seed: args.seed,
        code_version: args.code_version.clone(),
        schema: args.schema,
        hostile: args.hostile,
        four_byte_utf8: args.four_byte_utf8,
        go_zero_times: !args.no_zero_times,
        subsecond: !args.whole_seconds,
        batch_entries: args.batch,
        defer_indexes: args.defer_indexes,
    };
    pop.validate()?;
    let ds = datastore::open(&spec, OpenMode::Create).await?;
    eprintln!(
        "generating {} entries (schema {}, code_version {}, seed {}{}) into {}",
        pop.entries,
        pop.schema,
        pop.code_version,
        pop.seed,
        if pop.hostile { ", hostile" } else { "" },
        spec.redacted()
    );
    let start = Instant::now();
    let counts = create_spire_datastore(ds.as_ref(), &pop).await?;
    let elapsed = start.elapsed();
    if spec.engine() == Engine::Sqlite {
        let mode = if args.sqlite_wal { "WAL" } else { "DELETE" };
        ds.execute_script(&format!("PRAGMA journal_mode={mode};"))
            .await?;
    }
    ds.close().await;
    println!("{counts}");
    let secs = elapsed.as_secs_f64();
    let total = f64::from(u32::try_from(counts.total()).unwrap_or(u32::MAX));
    println!(
        "{:<32} {secs:>10.2} s ({:.0} rows/s)",
        "time",
        total / secs.max(1e-9)
    );
    Ok(())
}
