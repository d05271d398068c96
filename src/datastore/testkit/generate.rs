//! The population generator behind [`create_spire_datastore`].
//!
//! Every row is a pure function of `(seed, table, row index)`: each entity
//! draws from its own `StdRng`, seeded from those three numbers, so the output
//! does not depend on the batch size, and the engine only changes how a value
//! is written (see `render.rs`), never which value is drawn. Rows are
//! generated and inserted in blocks, so memory stays flat however many
//! entries are asked for; on PostgreSQL and MySQL the tables of one block are
//! inserted concurrently, and the next block is generated while the current
//! one is being written.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use futures::TryStreamExt as _;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::render::{Stamp, text};
use super::schema::{SUPPORTED_SCHEMAS, TableSpec, spire_tables};
use super::spire_ddl;
use crate::datastore::{ColumnKind, Datastore, Engine, Value, quote_ident};
use crate::error::{Error, Result};

/// What [`create_spire_datastore`] puts in a datastore.
///
/// Build it with struct update syntax:
/// `Population { entries: 10_000, hostile: true, ..Population::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Population {
    /// Registration entries (`registered_entries` rows). The other tables
    /// scale with it: about 3.3 selectors per entry, DNS names on about 15% of
    /// entries, federation on about 10%, one agent per 10 entries (at least 3).
    pub entries: usize,
    /// Seed of every random choice: the same seed gives the same rows.
    pub seed: u64,
    /// `migrations.code_version`, e.g. `1.15.3` or `1.16.0-dev-abc1234`.
    /// Agents never report a newer `agent_version` than this.
    pub code_version: String,
    /// SPIRE schema version: 23, 24 or 25.
    pub schema: u32,
    /// Put awkward but valid values in some rows: non-ASCII text (é, CJK,
    /// emoji), quotes, backslashes, tabs, newlines, control characters, empty
    /// strings, a 255-character multibyte string, NULLs where SPIRE allows
    /// them, blobs holding every byte value, `i64::MIN`/`i64::MAX` in
    /// `expiry` and `revision_number`, `i32` extremes in the TTLs,
    /// nanosecond and whole-second timestamps, SQLite datetimes in several
    /// local offsets, and Go zero times in `new_expires_at`. Never NUL in
    /// text (PostgreSQL cannot hold it).
    pub hostile: bool,
    /// Whether hostile text may hold 4-byte UTF-8 (emoji, U+1D11E). `None`
    /// means the engine's default: yes on SQLite and PostgreSQL, no on MySQL,
    /// whose SPIRE tables are utf8mb3 and reject it; there each such
    /// character becomes U+FFFD instead.
    pub four_byte_utf8: Option<bool>,
    /// Hostile populations store Go's zero time in some `new_expires_at`
    /// (`0000-00-00 00:00:00` on MySQL). Turn off for a MySQL whose
    /// `sql_mode` has `NO_ZERO_DATE` (MySQL 8's default).
    pub go_zero_times: bool,
    /// Sub-second timestamps, as SPIRE writes them. `false` gives whole
    /// seconds everywhere, which survive a trip through MySQL unchanged.
    pub subsecond: bool,
    /// Registration entries generated and inserted per block (each table of
    /// a block goes in by `insert_rows` calls of at most 5,000 rows).
    pub batch_entries: usize,
    /// Create the 17 indexes after loading the rows instead of in `initDB`'s
    /// order. The catalogue ends up the same, and loading is much faster
    /// (1M entries on SQLite: 64 s instead of 210 s); only SQLite shows the
    /// difference, in the order of `sqlite_master`. `None`: on PostgreSQL
    /// and MySQL always, on SQLite from [`Population::SQLITE_DEFER_FROM`]
    /// entries up, so small SQLite datastores match SPIRE's to the last byte
    /// of the schema.
    pub defer_indexes: Option<bool>,
}

impl Default for Population {
    fn default() -> Self {
        Self {
            entries: 200,
            seed: 1,
            code_version: "1.15.3".to_string(),
            schema: 25,
            hostile: false,
            four_byte_utf8: None,
            go_zero_times: true,
            subsecond: true,
            batch_entries: 2_000,
            defer_indexes: None,
        }
    }
}

impl Population {
    /// `entries` registration entries, everything else default.
    #[must_use]
    pub fn new(entries: usize) -> Self {
        Self {
            entries,
            ..Self::default()
        }
    }

    /// Entries from which SQLite datastores get their indexes after the rows
    /// (see [`Population::defer_indexes`]).
    pub const SQLITE_DEFER_FROM: usize = 50_000;

    /// Whether the indexes are created after the rows on `engine`.
    #[must_use]
    pub fn defers_indexes(&self, engine: Engine) -> bool {
        self.defer_indexes.unwrap_or(match engine {
            Engine::Postgres | Engine::Mysql => true,
            Engine::Sqlite => self.entries >= Self::SQLITE_DEFER_FROM,
        })
    }

    /// Checks the population before anything is created.
    ///
    /// # Errors
    /// A schema version other than 23, 24 or 25.
    pub fn validate(&self) -> Result<()> {
        if SUPPORTED_SCHEMAS.contains(&self.schema) {
            Ok(())
        } else {
            Err(unsupported_schema(self.schema))
        }
    }
}

/// Rows written per table, for comparing with `count_rows`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GeneratedCounts {
    rows: BTreeMap<String, u64>,
}

impl GeneratedCounts {
    /// Rows written to `table` (0 for a table the generator does not know).
    #[must_use]
    pub fn rows(&self, table: &str) -> u64 {
        self.rows.get(table).copied().unwrap_or(0)
    }

    /// Every table with its row count, sorted by table name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.rows.iter().map(|(t, n)| (t.as_str(), *n))
    }

    /// Rows written in all.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.rows.values().sum()
    }

    fn add(&mut self, table: &str, n: usize) {
        *self.rows.entry(table.to_string()).or_default() += u64::try_from(n).unwrap_or(u64::MAX);
    }
}

impl fmt::Display for GeneratedCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (t, n) in &self.rows {
            writeln!(f, "{t:<32} {n:>10}")?;
        }
        write!(f, "{:<32} {:>10}", "total", self.total())
    }
}

/// Creates SPIRE's schema (`pop.schema`) in the empty datastore `ds` and fills
/// it with `pop`'s rows, including the one `migrations` row
/// `(1, pop.schema, pop.code_version)`. Rows carry explicit ids `1..=n`; on
/// PostgreSQL the `id` sequences are then moved past them (MySQL and SQLite
/// follow on their own), so SPIRE itself could go on writing to the result.
///
/// See [`Population::defer_indexes`] for when the 17 indexes are created.
///
/// # Errors
/// An unsupported schema version, a datastore that already has SPIRE's tables,
/// or any error from the datastore. A failure part way leaves a partly filled
/// datastore behind: use a fresh one.
pub async fn create_spire_datastore(
    ds: &dyn Datastore,
    pop: &Population,
) -> Result<GeneratedCounts> {
    let engine = ds.engine();
    let plan = Plan::new(pop, engine)?;
    let ddl = spire_ddl(engine, pop.schema).ok_or_else(|| unsupported_schema(pop.schema))?;
    let (tables_ddl, index_ddl) = match engine {
        _ if pop.defers_indexes(engine) => split_indexes(ddl),
        _ => (ddl.to_string(), Vec::new()),
    };
    ds.execute_script(&tables_ddl).await?;

    let writer = Writer::new(ds, pop.schema)?;
    let mut counts = GeneratedCounts::default();
    for t in super::SPIRE_TABLES {
        counts.add(t, 0);
    }

    writer.write(&plan.fixed_tables(), &mut counts).await?;
    let mut ids = Ids::default();
    let block = u64::try_from(pop.batch_entries.max(1)).unwrap_or(u64::MAX);
    let node_block = (block / 4).max(1);
    let plan = Arc::new(plan);
    let (nodes, entries) = (plan.nodes, plan.entries);
    writer
        .stream(
            &plan,
            Blocks::Nodes,
            nodes,
            node_block,
            &mut ids,
            &mut counts,
        )
        .await?;
    writer
        .stream(
            &plan,
            Blocks::Entries,
            entries,
            block,
            &mut ids,
            &mut counts,
        )
        .await?;
    writer
        .write(&plan.trailing_tables(&mut ids), &mut counts)
        .await?;

    futures::stream::iter(index_ddl.iter().map(Ok))
        .try_for_each_concurrent(writer.in_flight, |stmt| ds.execute_script(stmt))
        .await?;
    if engine == Engine::Postgres {
        ds.execute_script(&postgres_setval_script()).await?;
    }
    Ok(counts)
}

/// Splits DDL (one statement per line) into the table statements and the
/// index statements.
fn split_indexes(ddl: &str) -> (String, Vec<String>) {
    let mut tables = String::new();
    let mut indexes = Vec::new();
    for line in ddl.lines() {
        if line.starts_with("CREATE INDEX ") || line.starts_with("CREATE UNIQUE INDEX ") {
            indexes.push(line.to_string());
        } else {
            tables.push_str(line);
            tables.push('\n');
        }
    }
    (tables, indexes)
}

fn unsupported_schema(schema: u32) -> Error {
    Error::Unsupported(format!(
        "the testkit creates SPIRE schemas {}..={}, not {schema}",
        SUPPORTED_SCHEMAS.start(),
        SUPPORTED_SCHEMAS.end()
    ))
}

/// Moves every `serial` sequence past the largest id (PostgreSQL does not do
/// this when ids are inserted explicitly; spire-reference §10).
fn postgres_setval_script() -> String {
    let mut sql = String::new();
    for t in super::SPIRE_TABLES
        .iter()
        .filter(|t| **t != "federated_registration_entries")
    {
        let q = quote_ident(Engine::Postgres, t);
        let _ = writeln!(
            sql,
            "SELECT setval(pg_get_serial_sequence('{q}', 'id'), coalesce(max(\"id\"), 0) + 1, false) FROM {q};"
        );
    }
    sql
}

// ------------------------------------------------------------------ writing

/// A block of generated rows: `(table, rows)` pairs.
type Batch = Vec<(&'static str, Vec<Vec<Value>>)>;

/// Largest `insert_rows` call (one transaction each).
const MAX_ROWS_PER_CALL: usize = 5_000;

struct Writer<'a> {
    ds: &'a dyn Datastore,
    columns: BTreeMap<&'static str, Vec<(String, ColumnKind)>>,
    /// Datastore calls in flight at once: PostgreSQL and MySQL take
    /// concurrent writers, SQLite has one writer at a time.
    in_flight: usize,
}

/// Concurrent calls on PostgreSQL and MySQL. The drivers' pools hold 4
/// connections and give up after waiting 15 s for one; a call that is not
/// started does not wait for a connection, so staying below the pool size
/// keeps a long `CREATE INDEX` from timing out the calls queued behind it.
const SERVER_IN_FLIGHT: usize = 3;

impl<'a> Writer<'a> {
    fn new(ds: &'a dyn Datastore, schema: u32) -> Result<Self> {
        let specs = spire_tables(schema).ok_or_else(|| unsupported_schema(schema))?;
        Ok(Self {
            ds,
            columns: specs.iter().map(|s| (s.name, s.insert_columns())).collect(),
            in_flight: if ds.engine() == Engine::Sqlite {
                1
            } else {
                SERVER_IN_FLIGHT
            },
        })
    }

    async fn write(&self, batch: &Batch, counts: &mut GeneratedCounts) -> Result<()> {
        let calls = batch
            .iter()
            .flat_map(|(t, rows)| rows.chunks(MAX_ROWS_PER_CALL).map(move |c| (*t, c)))
            .filter(|(_, c)| !c.is_empty());
        futures::stream::iter(calls.map(Ok))
            .try_for_each_concurrent(self.in_flight, |(t, c)| {
                self.ds.insert_rows(t, &self.columns[t], c)
            })
            .await?;
        for (t, rows) in batch {
            counts.add(t, rows.len());
        }
        Ok(())
    }

    /// Generates `0..total` in blocks of `block` on a blocking thread,
    /// writing each block while the next one is generated. (Generating on
    /// this task instead would stall the inserts in flight: sqlx drives a
    /// connection's I/O only while its query future is polled.)
    async fn stream(
        &self,
        plan: &Arc<Plan>,
        kind: Blocks,
        total: u64,
        block: u64,
        ids: &mut Ids,
        counts: &mut GeneratedCounts,
    ) -> Result<()> {
        if total == 0 {
            return Ok(());
        }
        let generate = |range: Range<u64>, mut ids: Ids| {
            let plan = Arc::clone(plan);
            tokio::task::spawn_blocking(move || {
                let batch = match kind {
                    Blocks::Nodes => plan.nodes_block(range, &mut ids),
                    Blocks::Entries => plan.entries_block(range, &mut ids),
                };
                (batch, ids)
            })
        };
        let mut current = joined(generate(0..block.min(total), std::mem::take(ids)).await);
        let mut next_start = block.min(total);
        loop {
            let range = next_start..next_start.saturating_add(block).min(total);
            let next = (!range.is_empty())
                .then(|| generate(range.clone(), std::mem::take(&mut current.1)));
            let next = async {
                match next {
                    Some(handle) => Some(joined(handle.await)),
                    None => None,
                }
            };
            let (written, next) = futures::join!(self.write(&current.0, counts), next);
            written?;
            match next {
                Some(b) => {
                    current = b;
                    next_start = range.end;
                }
                None => {
                    *ids = std::mem::take(&mut current.1);
                    return Ok(());
                }
            }
        }
    }
}

/// The result of a generator thread; its panic, if it panicked.
fn joined<T>(r: std::result::Result<T, tokio::task::JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Which rows [`Writer::stream`] generates.
#[derive(Debug, Clone, Copy)]
enum Blocks {
    Nodes,
    Entries,
}

// ------------------------------------------------------------------ the plan

const TRUST_DOMAIN: &str = "example.org";
const SERVER_ID: &str = "spiffe://example.org/spire/server";
/// Where the datastore's history starts.
const T0: OffsetDateTime = datetime!(2026-05-01 00:00:00 UTC);
/// Rows are created over this many days after `T0`.
const SPAN_DAYS: i64 = 80;
/// "Now" as the datastore sees it: the last write.
const NOW: OffsetDateTime = datetime!(2026-07-30 00:00:00 UTC);

/// Local offsets (minutes) hostile SQLite datetimes are written in.
const OFFSETS: [i16; 7] = [-180, 330, -420, 545, 60, 840, -570];

/// Agent versions, oldest first; those newer than `code_version` are dropped.
const AGENT_VERSIONS: [&str; 3] = ["1.14.3", "1.14.7", "1.15.3"];

const APPS: [&str; 20] = [
    "api",
    "web",
    "billing",
    "checkout",
    "search",
    "cart",
    "auth",
    "gateway",
    "worker",
    "scheduler",
    "ledger",
    "notifier",
    "reports",
    "frontend",
    "backend",
    "db-proxy",
    "cache",
    "queue",
    "metrics",
    "ingest",
];
const NAMESPACES: [&str; 10] = [
    "default",
    "payments",
    "checkout",
    "inventory",
    "identity",
    "monitoring",
    "platform",
    "data",
    "ml",
    "edge",
];
const CLUSTER_NAMES: [&str; 8] = [
    "prod-eu-1",
    "prod-us-1",
    "prod-ap-1",
    "staging",
    "dev",
    "prod-eu-2",
    "prod-us-2",
    "batch",
];
const REGIONS: [&str; 5] = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-2",
];

/// Hostile text; `HOSTILE_KINDS` adds one more kind, a 255-character
/// multibyte string. No NUL anywhere.
const HOSTILE: [&str; 20] = [
    "café crème brûlée naïve Ångström",
    "中文 日本語 한국어 ภาษาไทย",
    "emoji 😀 🦀 𝄞 🇺🇳",
    "it's a \"quoted\" `value`",
    "C:\\path\\to\\file \\N \\0 \\x41 trailing\\",
    "tab\tseparated\tvalue\t",
    "line one\nline two\r\nline three\r",
    "",
    "   leading and trailing spaces   ",
    "50% off_under_score [brackets] ^caret$ *star? {brace}",
    "'; DROP TABLE registered_entries; --",
    "<tag attr=\"x\">&amp;&lt;</tag>",
    "control \u{1} \u{7} \u{8} \u{1b}[31mred\u{1b}[0m \u{7f} \u{9f}",
    "zero\u{200b}width\u{200d}joiner\u{feff}bom\u{2028}sep",
    "e\u{301} combining vs \u{e9} precomposed",
    "\u{202e}right-to-left override\u{202c}",
    "NULL",
    "\\N",
    "ASCII only, but ,commas; and |pipes| and #hash",
    "mixed 😀é中\t\"'\\\n end",
];
const HOSTILE_KINDS: usize = HOSTILE.len() + 1;

fn hostile_text(kind: usize) -> String {
    match HOSTILE.get(kind) {
        Some(s) => (*s).to_string(),
        // 255 characters (510 bytes): the longest text varchar(255) holds on MySQL.
        None => "é中a".chars().cycle().take(255).collect(),
    }
}

/// Hostile DNS names (`{}` is replaced by the entry's index, keeping them unique).
const HOSTILE_DNS: [&str; 5] = [
    "bücher-{}.example.org",
    "*.wild-{}.example.org",
    "UPPER-{}.Example.ORG",
    "xn--bcher-kva-{}.example",
    "dot-{}.example.org.",
];

/// Random streams, one per kind of entity.
const S_ENTRY: u64 = 1;
const S_NODE: u64 = 2;
const S_NODE_ID: u64 = 3;
const S_BUNDLE: u64 = 4;
const S_FEDERATION: u64 = 5;
const S_TOKEN: u64 = 6;
const S_JOURNAL: u64 = 7;
const S_DELETED: u64 = 8;
const S_MIGRATION: u64 = 9;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator of entity `index` of kind `stream`.
fn rng_for(seed: u64, stream: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(splitmix(
        splitmix(seed) ^ splitmix(stream.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ splitmix(index)),
    ))
}

/// The next ids of the tables whose rows are not one per entity.
#[derive(Debug, Default)]
struct Ids {
    selector: u64,
    dns: u64,
    entry_event: u64,
    node_selector: u64,
    node_event: u64,
}

fn next(counter: &mut u64) -> Value {
    *counter += 1;
    int(*counter)
}

fn int(v: u64) -> Value {
    Value::Int(i64::try_from(v).expect("generated ids fit in i64"))
}

fn i32_value(v: i32) -> Value {
    Value::Int(i64::from(v))
}

/// Sizes and switches derived from a [`Population`] for one engine.
#[derive(Debug, Clone)]
struct Plan {
    engine: Engine,
    seed: u64,
    schema: u32,
    code_version: String,
    hostile: bool,
    four_byte: bool,
    zero_times: bool,
    subsecond: bool,
    entries: u64,
    nodes: u64,
    clusters: u64,
    /// The first `aliases` entries are node aliases, one per cluster.
    aliases: u64,
    federated: u64,
    join_tokens: u64,
    recent_entry_events: u64,
    deleted_entry_events: u64,
    recent_node_events: u64,
    agent_versions: Vec<&'static str>,
    entry_width: usize,
    node_width: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    K8sPsat,
    AwsIid,
    JoinToken,
    X509Pop,
}

impl NodeKind {
    fn attestor(self) -> &'static str {
        match self {
            Self::K8sPsat => "k8s_psat",
            Self::AwsIid => "aws_iid",
            Self::JoinToken => "join_token",
            Self::X509Pop => "x509pop",
        }
    }
}

impl Plan {
    fn new(pop: &Population, engine: Engine) -> Result<Self> {
        let specs = spire_tables(pop.schema).ok_or_else(|| unsupported_schema(pop.schema))?;
        let width = |name: &str| {
            specs
                .iter()
                .find(|s| s.name == name)
                .map_or(0, |s: &TableSpec| s.columns.len())
        };
        let entries = u64::try_from(pop.entries).unwrap_or(u64::MAX);
        let nodes = (entries / 10).max(3);
        let clusters = (1 + nodes / 50).clamp(2, u64::try_from(CLUSTER_NAMES.len()).unwrap_or(8));
        let running = semver::Version::parse(pop.code_version.trim_start_matches('v')).ok();
        let agent_versions = AGENT_VERSIONS
            .iter()
            .copied()
            .filter(|v| {
                let v = semver::Version::parse(v).expect("valid version");
                // An unparsable code_version (SPIRE refuses those) keeps them all.
                running
                    .as_ref()
                    .is_none_or(|r| (v.major, v.minor, v.patch) <= (r.major, r.minor, r.patch))
            })
            .collect();
        Ok(Self {
            engine,
            seed: pop.seed,
            schema: pop.schema,
            code_version: pop.code_version.clone(),
            hostile: pop.hostile,
            four_byte: pop.four_byte_utf8.unwrap_or(engine != Engine::Mysql),
            zero_times: pop.go_zero_times,
            subsecond: pop.subsecond,
            entries,
            nodes,
            clusters,
            aliases: clusters.min(entries),
            federated: 2 + (entries / 5_000).min(18),
            join_tokens: (entries / 100).clamp(2, 5_000),
            recent_entry_events: if entries == 0 {
                0
            } else {
                (entries / 20).max(1)
            },
            deleted_entry_events: 1 + entries / 1_000,
            recent_node_events: (nodes / 10).max(1),
            agent_versions,
            entry_width: width("registered_entries"),
            node_width: width("attested_node_entries"),
        })
    }

    // -------------------------------------------------------------- values

    fn text(&self, s: &str) -> Value {
        text(s, self.four_byte)
    }

    fn ts(&self, s: Stamp) -> Value {
        s.render(self.engine)
    }

    /// The `i`-th of `n` moments spread over the datastore's history.
    fn spread(i: u64, n: u64) -> OffsetDateTime {
        let span = i128::from(SPAN_DAYS * 86_400);
        let offset = i128::from(i) * span / i128::from(n.max(1));
        T0 + Duration::seconds(i64::try_from(offset).unwrap_or(0))
    }

    /// A timestamp near `at` as SPIRE would have written it.
    fn stamp(&self, rng: &mut StdRng, at: OffsetDateTime) -> Stamp {
        // Draw everything first so the choices below never shift the stream.
        let micros: i64 = rng.random_range(0..1_000_000);
        let style: u32 = rng.random_range(0..100);
        let offset = OFFSETS[rng.random_range(0..OFFSETS.len())];
        let extra_nanos: i64 = rng.random_range(1..1_000);
        let nanos = match (self.subsecond, self.hostile, style) {
            (false, _, _) => 0,
            (true, false, _) | (true, true, 0..90) => micros * 1_000,
            // Whole seconds: go-sqlite3 writes no fraction at all.
            (true, true, 90..95) => 0,
            // Nanoseconds, as Go's clock gives on Linux.
            (true, true, _) => micros * 1_000 + extra_nanos,
        };
        let offset_minutes = if self.hostile && style.is_multiple_of(3) {
            offset
        } else {
            0
        };
        Stamp::At {
            utc: at + Duration::nanoseconds(nanos),
            offset_minutes,
        }
    }

    /// Which hostile text (if any) row `w` gets: the first rows take every
    /// kind once, so even a small population has them all; then about 3%.
    fn hostile_kind(&self, rng: &mut StdRng, w: u64) -> Option<usize> {
        let roll: u32 = rng.random_range(0..1_000);
        let pick = rng.random_range(0..HOSTILE_KINDS);
        if !self.hostile {
            return None;
        }
        if let Ok(k) = usize::try_from(w)
            && k < HOSTILE_KINDS
        {
            return Some(k);
        }
        (roll < 30).then_some(pick)
    }

    fn cluster_name(c: u64) -> String {
        let names = u64::try_from(CLUSTER_NAMES.len()).unwrap_or(1);
        let i = usize::try_from(c % names).unwrap_or(0);
        if c < names {
            CLUSTER_NAMES[i].to_string()
        } else {
            format!("{}-{}", CLUSTER_NAMES[i], c / names)
        }
    }

    fn cluster_alias(c: u64) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/k8s-cluster/{}",
            Self::cluster_name(c)
        )
    }

    fn federated_td(&self, k: u64) -> String {
        if self.hostile && k == self.federated {
            // An IDN trust domain, in its ASCII (punycode) form as SPIFFE requires.
            format!("xn--bcher-kva.partner-{k}.example")
        } else {
            format!("partner-{k}.example.com")
        }
    }

    // -------------------------------------------------------------- nodes

    /// A node's kind, cluster and SPIFFE ID: a function of its index alone,
    /// so entries can name their parent agent without the node's other rows.
    fn node_identity(&self, j: u64) -> (NodeKind, u64, String) {
        let mut rng = rng_for(self.seed, S_NODE_ID, j);
        let kind = match rng.random_range(0..100u32) {
            0..70 => NodeKind::K8sPsat,
            70..85 => NodeKind::AwsIid,
            85..95 => NodeKind::JoinToken,
            _ => NodeKind::X509Pop,
        };
        let cluster = j % self.clusters;
        let id = match kind {
            NodeKind::K8sPsat => format!(
                "spiffe://{TRUST_DOMAIN}/spire/agent/k8s_psat/{}/{}",
                Self::cluster_name(cluster),
                uuid(&mut rng)
            ),
            NodeKind::AwsIid => format!(
                "spiffe://{TRUST_DOMAIN}/spire/agent/aws_iid/{}/{}/i-{}",
                digits(&mut rng, 12),
                REGIONS.choose(&mut rng).expect("regions"),
                hex(&mut rng, 17)
            ),
            NodeKind::JoinToken => format!(
                "spiffe://{TRUST_DOMAIN}/spire/agent/join_token/{}",
                uuid(&mut rng)
            ),
            NodeKind::X509Pop => format!(
                "spiffe://{TRUST_DOMAIN}/spire/agent/x509pop/{}",
                hex(&mut rng, 40)
            ),
        };
        (kind, cluster, id)
    }

    fn nodes_block(&self, range: Range<u64>, ids: &mut Ids) -> Batch {
        let mut nodes = Vec::new();
        let mut selectors = Vec::new();
        let mut events = Vec::new();
        for j in range {
            let (kind, cluster, spiffe_id) = self.node_identity(j);
            let mut rng = rng_for(self.seed, S_NODE, j);
            let created = self.stamp(&mut rng, Self::spread(j, self.nodes));
            let updated_at = NOW - Duration::seconds(rng.random_range(0..3_600));
            let updated = self.stamp(&mut rng, updated_at);
            let serial_no = serial(&mut rng);
            let banned = rng.random_bool(0.02);
            let ttl_left = Duration::seconds(rng.random_range(-7_200..3_600));
            let expires = self.stamp(&mut rng, NOW + ttl_left);
            let rotating = rng.random_bool(0.1);
            let new_serial = serial(&mut rng);
            let zero_roll = rng.random_bool(0.05);
            let version_roll: u32 = rng.random_range(0..100);
            let version_pick = rng.random_range(0..AGENT_VERSIONS.len());
            let hostile = self.hostile_kind(&mut rng, j);

            // Go's zero time where a pending SVID was cleared (hostile only).
            let zero = self.hostile && self.zero_times && (j == 1 || zero_roll);
            let rotating = rotating && !zero;
            let new_expires = if rotating {
                Some(Stamp::At {
                    utc: expires.utc() + Duration::hours(1),
                    offset_minutes: 0,
                })
            } else if zero {
                Some(Stamp::GoZero)
            } else {
                None
            };
            let mut row = Vec::with_capacity(self.node_width);
            row.push(int(j + 1));
            row.push(self.ts(created));
            row.push(self.ts(updated));
            row.push(Value::Text(spiffe_id.clone()));
            row.push(Value::Text(kind.attestor().to_string()));
            // An empty serial number marks a banned agent.
            row.push(Value::Text(if banned { String::new() } else { serial_no }));
            row.push(self.ts(expires));
            row.push(Value::Text(if rotating {
                new_serial
            } else {
                String::new()
            }));
            row.push(new_expires.map_or(Value::Null, |s| self.ts(s)));
            row.push(Value::Bool(matches!(
                kind,
                NodeKind::K8sPsat | NodeKind::AwsIid
            )));
            if self.schema >= 24 {
                // Agents before 1.14.3 do not report a version. The first
                // nodes take each possible value once.
                let known = self.agent_versions.len();
                let v = match usize::try_from(j) {
                    Ok(0) => "",
                    Ok(k) if k <= known => self.agent_versions[k - 1],
                    _ if version_roll < 15 || known == 0 => "",
                    _ => self.agent_versions[version_pick % known],
                };
                row.push(Value::Text(v.to_string()));
            }
            debug_assert_eq!(row.len(), self.node_width);
            nodes.push(row);

            let attestor = kind.attestor();
            let mut values: Vec<String> = match kind {
                NodeKind::K8sPsat => vec![
                    format!("cluster:{}", Self::cluster_name(cluster)),
                    "agent_ns:spire".to_string(),
                    "agent_sa:spire-agent".to_string(),
                    format!("agent_node_name:node-{j}"),
                    format!("agent_pod_name:spire-agent-{}", hex(&mut rng, 5)),
                ],
                NodeKind::AwsIid => vec![
                    format!("az:{}a", REGIONS[usize::try_from(j % 5).unwrap_or(0)]),
                    format!("image:id:ami-{}", hex(&mut rng, 17)),
                    format!("tag:Name:worker-{j}"),
                    "sg:name:spire-agents".to_string(),
                ],
                NodeKind::X509Pop => vec![
                    format!("subject:cn:agent-{j}.{TRUST_DOMAIN}"),
                    format!("ca:fingerprint:{}", hex(&mut rng, 40)),
                ],
                NodeKind::JoinToken => Vec::new(),
            };
            if let Some(k) = hostile {
                values.push(format!("tag:note:{}", fit(&hostile_text(k), 255 - 9)));
            }
            for v in values {
                selectors.push(vec![
                    next(&mut ids.node_selector),
                    self.ts(updated),
                    self.ts(updated),
                    Value::Text(spiffe_id.clone()),
                    Value::Text(attestor.to_string()),
                    self.text(&v),
                ]);
            }
            if j >= self.nodes - self.recent_node_events {
                events.push(vec![
                    next(&mut ids.node_event),
                    self.ts(updated),
                    self.ts(updated),
                    Value::Text(spiffe_id),
                ]);
            }
        }
        vec![
            ("attested_node_entries", nodes),
            ("node_resolver_map_entries", selectors),
            ("attested_node_entries_events", events),
        ]
    }

    // -------------------------------------------------------------- entries

    #[allow(clippy::too_many_lines)]
    fn entries_block(&self, range: Range<u64>, ids: &mut Ids) -> Batch {
        let mut entries = Vec::new();
        let mut selectors = Vec::new();
        let mut dns = Vec::new();
        let mut federation = Vec::new();
        let mut events = Vec::new();
        for i in range {
            let mut rng = rng_for(self.seed, S_ENTRY, i);
            let id = i + 1;
            let base = Self::spread(i, self.entries);
            let created = self.stamp(&mut rng, base);
            let touched = rng.random_bool(0.3);
            let later = (base + Duration::seconds(rng.random_range(60..30 * 86_400))).min(NOW);
            let later = self.stamp(&mut rng, later);
            let updated = if touched { later } else { created };
            let mut entry_id = uuid(&mut rng);
            let mut ttl: i32 = *[0, 0, 0, 3_600, 3_600, 86_400, 300]
                .choose(&mut rng)
                .expect("ttls");
            let mut jwt_ttl: i32 = *[0, 0, 0, 300, 3_600].choose(&mut rng).expect("ttls");
            let admin = rng.random_bool(0.01);
            let downstream = rng.random_bool(0.005);
            let expiring = rng.random_bool(0.05);
            let mut expiry: i64 = if expiring {
                NOW.unix_timestamp() + rng.random_range(86_400..365 * 86_400)
            } else {
                0
            };
            let mut revision: i64 = if touched { rng.random_range(1..6) } else { 0 };
            let store_svid = rng.random_bool(0.02);
            let mut hint = match rng.random_range(0..100u32) {
                0..4 => "internal",
                4..7 => "external",
                7 => "legacy",
                _ => "",
            }
            .to_string();
            let with_attrs = rng.random_bool(0.15);
            let attrs = small_attributes(&mut rng);
            let style: u32 = rng.random_range(0..100);
            let app = *APPS.choose(&mut rng).expect("apps");
            let ns = *NAMESPACES.choose(&mut rng).expect("namespaces");
            let to_alias = rng.random_bool(0.8);
            let cluster = rng.random_range(0..self.clusters);
            let node = rng.random_range(0..self.nodes);
            let extra_selector = rng.random_bool(0.3);
            let with_dns = rng.random_bool(0.2);
            let dns_count = rng.random_range(1..=3usize);
            let federates = rng.random_bool(0.1);
            let fed_count = rng.random_range(1..=3u64).min(self.federated);
            let fed_pick = rand::seq::index::sample(
                &mut rng,
                usize::try_from(self.federated).unwrap_or(1),
                usize::try_from(fed_count).unwrap_or(1),
            );
            let image = hex(&mut rng, 64);

            let (spiffe_id, parent_id, sel_type, sel_values, dns_names) = if i < self.aliases {
                // A node alias: every agent of one cluster.
                let alias = Self::cluster_alias(i);
                let sels = vec![format!("cluster:{}", Self::cluster_name(i))];
                (alias, SERVER_ID.to_string(), "k8s_psat", sels, Vec::new())
            } else {
                let w = i - self.aliases;
                let hostile = self.hostile_kind(&mut rng, w);
                if self.hostile {
                    match w {
                        0 => expiry = i64::MAX,
                        1 => expiry = i64::MIN,
                        2 => revision = i64::MAX,
                        3 => revision = i64::MIN,
                        4 => {
                            ttl = i32::MAX;
                            jwt_ttl = i32::MIN;
                        }
                        5 => expiry = -1,
                        // SPIRE accepts caller-chosen entry IDs of printable ASCII.
                        8 => entry_id = format!("custom/entry:{w}_id.1"),
                        _ => {}
                    }
                }
                let agent = || self.node_identity(node).2;
                let (spiffe_id, parent, sel_type, mut sels, mut names) = if downstream {
                    let sels = vec![format!("ns:{ns}"), format!("sa:{app}-downstream-{w}")];
                    (
                        format!("spiffe://{TRUST_DOMAIN}/downstream/{app}-{w}"),
                        SERVER_ID.to_string(),
                        "k8s",
                        sels,
                        vec![],
                    )
                } else if style < 75 {
                    let parent = if to_alias {
                        Self::cluster_alias(cluster)
                    } else {
                        agent()
                    };
                    let mut sels = vec![
                        format!("ns:{ns}"),
                        format!("sa:{app}-{w}"),
                        format!("pod-label:app:{app}"),
                    ];
                    if extra_selector {
                        sels.push(format!("container-name:{app}"));
                    }
                    let names: Vec<String> = [
                        format!("{app}-{w}.{ns}.svc.cluster.local"),
                        format!("{app}-{w}.{ns}.svc"),
                        format!("{app}-{w}.{TRUST_DOMAIN}"),
                    ]
                    .into_iter()
                    .take(if with_dns { dns_count } else { 0 })
                    .collect();
                    (
                        format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{app}-{w}"),
                        parent,
                        "k8s",
                        sels,
                        names,
                    )
                } else if style < 90 {
                    let mut sels = vec![
                        format!("uid:{}", 1_000 + w % 5_000),
                        format!("user:{app}"),
                        format!("path:/usr/local/bin/{app}"),
                    ];
                    if extra_selector {
                        sels.push(format!("gid:{}", 1_000 + w % 300));
                    }
                    (
                        format!("spiffe://{TRUST_DOMAIN}/host/vm-{node}/{app}-{w}"),
                        agent(),
                        "unix",
                        sels,
                        vec![],
                    )
                } else {
                    let mut sels = vec![
                        format!("label:com.example.app:{app}"),
                        format!("image_id:sha256:{image}"),
                    ];
                    if extra_selector {
                        sels.push("env:DEPLOY_ENV=production".to_string());
                    }
                    (
                        format!("spiffe://{TRUST_DOMAIN}/docker/{app}-{w}"),
                        agent(),
                        "docker",
                        sels,
                        vec![],
                    )
                };
                if let Some(k) = hostile {
                    let t = hostile_text(k);
                    hint = fit(&t, 255);
                    sels.push(format!("note:{}", fit(&t, 255 - 5)));
                    names.push(HOSTILE_DNS[k % HOSTILE_DNS.len()].replace("{}", &w.to_string()));
                }
                (spiffe_id, parent, sel_type, sels, names)
            };

            let mut row = Vec::with_capacity(self.entry_width);
            row.push(int(id));
            row.push(self.ts(created));
            row.push(self.ts(updated));
            row.push(Value::Text(entry_id.clone()));
            row.push(Value::Text(spiffe_id));
            row.push(Value::Text(parent_id));
            row.push(i32_value(ttl));
            row.push(Value::Bool(admin && i >= self.aliases));
            row.push(Value::Bool(downstream && i >= self.aliases));
            row.push(Value::Int(expiry));
            row.push(Value::Int(revision));
            row.push(Value::Bool(store_svid));
            row.push(self.text(&hint));
            row.push(i32_value(jwt_ttl));
            if self.schema >= 25 {
                let w = i.checked_sub(self.aliases);
                let v = match w {
                    Some(6) if self.hostile => Value::Bytes(proto_bytes_field(1, &all_bytes())),
                    Some(7) if self.hostile => Value::Bytes(Vec::new()),
                    _ if with_attrs => Value::Bytes(attrs),
                    // Entries written before schema 25 (and most since) have none.
                    _ => Value::Null,
                };
                row.push(v);
            }
            debug_assert_eq!(row.len(), self.entry_width);
            entries.push(row);

            for v in sel_values {
                selectors.push(vec![
                    next(&mut ids.selector),
                    self.ts(updated),
                    self.ts(updated),
                    int(id),
                    Value::Text(sel_type.to_string()),
                    self.text(&v),
                ]);
            }
            for name in dns_names {
                dns.push(vec![
                    next(&mut ids.dns),
                    self.ts(updated),
                    self.ts(updated),
                    int(id),
                    self.text(&name),
                ]);
            }
            if federates && i >= self.aliases {
                let mut bundles: Vec<u64> = fed_pick
                    .iter()
                    .map(|k| 2 + u64::try_from(k).unwrap_or(0))
                    .collect();
                bundles.sort_unstable();
                for b in bundles {
                    federation.push(vec![int(b), int(id)]);
                }
            }
            if i >= self.entries - self.recent_entry_events {
                events.push(vec![
                    next(&mut ids.entry_event),
                    self.ts(updated),
                    self.ts(updated),
                    Value::Text(entry_id),
                ]);
            }
        }
        vec![
            ("registered_entries", entries),
            ("selectors", selectors),
            ("dns_names", dns),
            ("federated_registration_entries", federation),
            ("registered_entries_events", events),
        ]
    }

    // -------------------------------------------------------------- the rest

    /// The migrations row, bundles, federation relationships and the CA journal.
    fn fixed_tables(&self) -> Batch {
        let mut rng = rng_for(self.seed, S_MIGRATION, 0);
        let created = self.stamp(&mut rng, T0);
        let updated = self.stamp(&mut rng, NOW);
        let migrations = vec![vec![
            int(1),
            self.ts(created),
            self.ts(updated),
            Value::Int(i64::from(self.schema)),
            Value::Text(self.code_version.clone()),
        ]];

        let mut bundles = Vec::new();
        let mut federations = Vec::new();
        for k in 0..=self.federated {
            let mut rng = rng_for(self.seed, S_BUNDLE, k);
            let created = self.stamp(
                &mut rng,
                T0 + Duration::hours(i64::try_from(k).unwrap_or(0)),
            );
            let age = Duration::seconds(rng.random_range(0..3_600));
            let updated = self.stamp(&mut rng, NOW - age);
            let roots = rng.random_range(1..=3);
            let td = if k == 0 {
                TRUST_DOMAIN.to_string()
            } else {
                self.federated_td(k)
            };
            let mut data = bundle_proto(&mut rng, &format!("spiffe://{td}"), roots, 2);
            if self.hostile && k == self.federated {
                // A root "certificate" holding every byte value: still valid protobuf.
                data.extend(proto_bytes_field(2, &proto_bytes_field(1, &all_bytes())));
            }
            bundles.push(vec![
                int(k + 1),
                self.ts(created),
                self.ts(updated),
                Value::Text(format!("spiffe://{td}")),
                Value::Bytes(data),
            ]);
            if k == 0 {
                continue;
            }
            let mut rng = rng_for(self.seed, S_FEDERATION, k);
            let created = self.stamp(
                &mut rng,
                T0 + Duration::hours(i64::try_from(k).unwrap_or(0)),
            );
            let spiffe_profile = k % 2 == 0;
            let url = if self.hostile && k == 1 {
                format!("https://{td}:8443/bundle?name='x'&q=\"y\"&path=a\\b&emoji=😀&é=1")
            } else if spiffe_profile {
                format!("https://spire.{td}:8443")
            } else {
                format!("https://{td}/.well-known/spiffe-bundle")
            };
            federations.push(vec![
                int(k),
                self.ts(created),
                self.ts(created),
                Value::Text(td.clone()),
                self.text(&url),
                Value::Text(
                    if spiffe_profile {
                        "https_spiffe"
                    } else {
                        "https_web"
                    }
                    .to_string(),
                ),
                Value::Text(if spiffe_profile {
                    format!("spiffe://{td}/spire/server")
                } else {
                    String::new()
                }),
                Value::Bool(false),
            ]);
        }

        let mut rng = rng_for(self.seed, S_JOURNAL, 0);
        let created = self.stamp(&mut rng, T0);
        let updated = self.stamp(&mut rng, NOW - Duration::hours(6));
        let mut journal = journal_proto(&mut rng);
        if self.hostile {
            journal.extend(proto_bytes_field(15, &all_bytes()));
        }
        let x509_id = hex(&mut rng, 40);
        let jwt_id = alnum(&mut rng, 32);
        let journals = vec![vec![
            int(1),
            self.ts(created),
            self.ts(updated),
            Value::Bytes(journal),
            Value::Text(x509_id),
            Value::Text(jwt_id),
        ]];

        vec![
            ("migrations", migrations),
            ("bundles", bundles),
            ("federated_trust_domains", federations),
            ("ca_journals", journals),
        ]
    }

    /// Join tokens and the events of deleted entries.
    fn trailing_tables(&self, ids: &mut Ids) -> Batch {
        let mut tokens = Vec::new();
        for t in 0..self.join_tokens {
            let mut rng = rng_for(self.seed, S_TOKEN, t);
            let at = NOW - Duration::seconds(rng.random_range(0..86_400));
            let created = self.stamp(&mut rng, at);
            let mut expiry = at.unix_timestamp() + 600 + rng.random_range(0..86_400);
            if self.hostile {
                match t {
                    0 => expiry = i64::MAX,
                    1 => expiry = 0,
                    _ => {}
                }
            }
            tokens.push(vec![
                int(t + 1),
                self.ts(created),
                self.ts(created),
                Value::Text(uuid(&mut rng)),
                Value::Int(expiry),
            ]);
        }
        let mut events = Vec::new();
        for d in 0..self.deleted_entry_events {
            let mut rng = rng_for(self.seed, S_DELETED, d);
            let age = Duration::seconds(rng.random_range(0..3_600));
            let at = self.stamp(&mut rng, NOW - age);
            events.push(vec![
                next(&mut ids.entry_event),
                self.ts(at),
                self.ts(at),
                Value::Text(uuid(&mut rng)),
            ]);
        }
        vec![
            ("join_tokens", tokens),
            ("registered_entries_events", events),
        ]
    }
}

// ------------------------------------------------------------------ helpers

/// At most `max` characters of `s` (MySQL's varchar(255) counts characters).
fn fit(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(HEX[rng.random_range(0..16)]))
        .collect()
}

fn digits(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

fn alnum(rng: &mut StdRng, n: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// A random (version 4) UUID, as SPIRE's entry IDs and join tokens are.
fn uuid(rng: &mut StdRng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(byte >> 4)]));
        s.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    s
}

/// An X.509 serial number in decimal, as SPIRE stores agent SVID serials.
fn serial(rng: &mut StdRng) -> String {
    (rng.random::<u128>() >> 1).to_string()
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).unwrap_or(0));
}

/// A length-delimited protobuf field.
fn proto_bytes_field(field: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    varint(&mut out, field << 3 | 2);
    varint(&mut out, u64::try_from(payload.len()).unwrap_or(0));
    out.extend_from_slice(payload);
    out
}

fn proto_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// A DER-looking blob: a SEQUENCE header followed by random content.
fn der_like(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0x30, 0x82];
    v.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
    v.extend(random_bytes(rng, len));
    v
}

/// A `common.Bundle`: trust domain, root CAs, JWT signing keys, refresh hint
/// and sequence number.
fn bundle_proto(rng: &mut StdRng, trust_domain_id: &str, roots: usize, jwt_keys: usize) -> Vec<u8> {
    let mut out = proto_bytes_field(1, trust_domain_id.as_bytes());
    for _ in 0..roots {
        let len = rng.random_range(400..520);
        let der = der_like(rng, len);
        out.extend(proto_bytes_field(2, &proto_bytes_field(1, &der)));
    }
    for _ in 0..jwt_keys {
        let mut key = proto_bytes_field(1, &der_like(rng, 87));
        key.extend(proto_bytes_field(2, alnum(rng, 32).as_bytes()));
        proto_varint_field(
            &mut key,
            3,
            NOW.unix_timestamp().unsigned_abs() + rng.random_range(0..86_400 * 7),
        );
        out.extend(proto_bytes_field(3, &key));
    }
    proto_varint_field(&mut out, 4, 300);
    proto_varint_field(&mut out, 5, rng.random_range(1..500));
    out
}

/// A CA journal: a few X509 CA and JWT key entries of random content.
fn journal_proto(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    for field in [1, 1, 2, 2] {
        let mut entry = Vec::new();
        proto_varint_field(&mut entry, 1, rng.random_range(1..10));
        let len = rng.random_range(300..700);
        entry.extend(proto_bytes_field(2, &random_bytes(rng, len)));
        entry.extend(proto_bytes_field(3, hex(rng, 40).as_bytes()));
        out.extend(proto_bytes_field(field, &entry));
    }
    out
}

/// Small `additional_attributes` protobuf content.
fn small_attributes(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    proto_varint_field(&mut out, 1, u64::from(rng.random_bool(0.5)));
    proto_varint_field(&mut out, 2, rng.random_range(0..4));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn generate_all(pop: &Population, engine: Engine) -> BTreeMap<&'static str, Vec<Vec<Value>>> {
        let plan = Plan::new(pop, engine).unwrap();
        let mut ids = Ids::default();
        let mut out: BTreeMap<&'static str, Vec<Vec<Value>>> = BTreeMap::new();
        let mut push = |b: Batch| {
            for (t, rows) in b {
                out.entry(t).or_default().extend(rows);
            }
        };
        push(plan.fixed_tables());
        let block = u64::try_from(pop.batch_entries).unwrap();
        let mut s = 0;
        while s < plan.nodes {
            push(plan.nodes_block(s..(s + block).min(plan.nodes), &mut ids));
            s += block;
        }
        let mut s = 0;
        while s < plan.entries {
            push(plan.entries_block(s..(s + block).min(plan.entries), &mut ids));
            s += block;
        }
        push(plan.trailing_tables(&mut ids));
        out
    }

    fn hostile(entries: usize) -> Population {
        Population {
            entries,
            hostile: true,
            ..Population::default()
        }
    }

    fn as_text(v: &Value) -> String {
        match v {
            Value::Text(s) => s.clone(),
            other => panic!("not text: {other:?}"),
        }
    }

    fn texts(rows: &BTreeMap<&'static str, Vec<Vec<Value>>>) -> Vec<String> {
        rows.values()
            .flatten()
            .flatten()
            .filter_map(|v| match v {
                Value::Text(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn same_seed_same_rows_whatever_the_batch_size() {
        let a = generate_all(
            &Population {
                batch_entries: 7,
                ..hostile(300)
            },
            Engine::Postgres,
        );
        let b = generate_all(
            &Population {
                batch_entries: 1_000,
                ..hostile(300)
            },
            Engine::Postgres,
        );
        assert_eq!(a, b);
        let c = generate_all(
            &Population {
                seed: 2,
                ..hostile(300)
            },
            Engine::Postgres,
        );
        assert_ne!(a["registered_entries"], c["registered_entries"]);
        assert_ne!(a["selectors"], c["selectors"]);
    }

    #[test]
    fn engines_get_the_same_rows_up_to_rendering() {
        let pg = generate_all(&hostile(250), Engine::Postgres);
        for engine in [Engine::Sqlite, Engine::Mysql] {
            let other = generate_all(&hostile(250), engine);
            for (table, rows) in &pg {
                assert_eq!(rows.len(), other[table].len(), "{engine} {table}");
                for (a, b) in rows.iter().zip(&other[table]) {
                    for (x, y) in a.iter().zip(b) {
                        match (x, y) {
                            (Value::Timestamp(t), Value::Text(s)) if engine == Engine::Sqlite => {
                                assert_eq!(
                                    crate::datastore::timefmt::parse_sqlite_datetime(s),
                                    Some(*t),
                                    "{s}"
                                );
                            }
                            (Value::Timestamp(t), Value::Text(s)) => {
                                assert_eq!(s, MYSQL_ZERO);
                                assert_eq!(*t, super::super::render::go_zero());
                            }
                            (Value::Text(p), Value::Text(m)) if engine == Engine::Mysql => {
                                assert_eq!(p.chars().count(), m.chars().count());
                            }
                            _ => assert_eq!(x, y, "{engine} {table}"),
                        }
                    }
                }
            }
        }
    }

    const MYSQL_ZERO: &str = super::super::MYSQL_ZERO_DATETIME;

    #[test]
    fn shapes_and_counts_scale_with_entries() {
        let rows = generate_all(&Population::new(1_000), Engine::Postgres);
        let n = |t: &str| rows.get(t).map_or(0, Vec::len);
        assert_eq!(n("registered_entries"), 1_000);
        assert_eq!(n("attested_node_entries"), 100);
        assert_eq!(n("migrations"), 1);
        assert_eq!(n("ca_journals"), 1);
        assert_eq!(n("bundles"), 3);
        assert_eq!(n("federated_trust_domains"), 2);
        assert_eq!(n("join_tokens"), 10);
        let per_entry = f64::from(u32::try_from(n("selectors")).unwrap()) / 1_000.0;
        assert!(
            (2.5..4.0).contains(&per_entry),
            "{per_entry} selectors per entry"
        );
        assert!(n("dns_names") > 50, "{}", n("dns_names"));
        assert!(n("federated_registration_entries") > 30);
        assert!(n("node_resolver_map_entries") > 150);
        assert_eq!(n("registered_entries_events"), 50 + 2);
        assert_eq!(n("attested_node_entries_events"), 10);
        let widths = spire_tables(25).unwrap();
        for spec in widths {
            for row in rows.get(spec.name).into_iter().flatten() {
                assert_eq!(row.len(), spec.columns.len(), "{}", spec.name);
            }
        }
        // No hostile values unless asked for.
        assert!(texts(&rows).iter().all(|s| s.is_ascii()));
        // Schema 23 has neither agent_version nor additional_attributes.
        let old = generate_all(
            &Population {
                schema: 23,
                code_version: "1.13.2".into(),
                ..Population::new(50)
            },
            Engine::Sqlite,
        );
        assert_eq!(old["registered_entries"][0].len(), 14);
        assert_eq!(old["attested_node_entries"][0].len(), 10);
        assert_eq!(old["migrations"][0][3], Value::Int(23));
        assert_eq!(old["migrations"][0][4], Value::Text("1.13.2".into()));
    }

    #[test]
    fn ids_are_dense_and_references_resolve() {
        let rows = generate_all(&hostile(600), Engine::Sqlite);
        for (table, rows) in &rows {
            if *table == "federated_registration_entries" {
                continue;
            }
            for (i, row) in rows.iter().enumerate() {
                assert_eq!(row[0], Value::Int(i64::try_from(i + 1).unwrap()), "{table}");
            }
        }
        let entries = i64::try_from(rows["registered_entries"].len()).unwrap();
        let bundles = i64::try_from(rows["bundles"].len()).unwrap();
        for row in rows["selectors"].iter().chain(&rows["dns_names"]) {
            let Value::Int(e) = row[3] else { panic!() };
            assert!((1..=entries).contains(&e));
        }
        let mut pairs = HashSet::new();
        for row in &rows["federated_registration_entries"] {
            let (Value::Int(b), Value::Int(e)) = (&row[0], &row[1]) else {
                panic!()
            };
            assert!((2..=bundles).contains(b) && (1..=entries).contains(e));
            assert!(pairs.insert((*b, *e)), "duplicate federation pair");
        }
        // Every parent that names an agent names one that exists.
        let agents: HashSet<String> = rows["attested_node_entries"]
            .iter()
            .map(|r| as_text(&r[3]))
            .collect();
        let mut agent_parents = 0;
        for row in &rows["registered_entries"] {
            let parent = as_text(&row[5]);
            if parent.contains("/spire/agent/") {
                assert!(agents.contains(&parent), "{parent}");
                agent_parents += 1;
            }
        }
        assert!(agent_parents > 50, "{agent_parents}");
    }

    /// MySQL's utf8_general_ci folds case, accents and trailing spaces: the
    /// unique indexes must hold under that folding too.
    #[test]
    fn unique_indexes_hold_even_under_mysql_collation() {
        fn fold(v: &Value) -> String {
            match v {
                Value::Text(s) => s.trim_end_matches(' ').to_lowercase(),
                other => format!("{other:?}"),
            }
        }
        let rows = generate_all(&hostile(3_000), Engine::Mysql);
        let checks: [(&str, &[usize]); 7] = [
            ("registered_entries", &[3]),
            ("attested_node_entries", &[3]),
            ("selectors", &[3, 4, 5]),
            ("node_resolver_map_entries", &[3, 4, 5]),
            ("dns_names", &[3, 4]),
            ("join_tokens", &[3]),
            ("bundles", &[3]),
        ];
        for (table, cols) in checks {
            let mut seen = HashSet::new();
            for row in &rows[table] {
                let key: Vec<String> = cols.iter().map(|c| fold(&row[*c])).collect();
                assert!(seen.insert(key.clone()), "{table}: duplicate {key:?}");
            }
        }
    }

    #[test]
    fn hostile_values_are_all_there_and_stay_valid() {
        let pg = generate_all(&hostile(200), Engine::Postgres);
        let all = texts(&pg);
        for k in 0..HOSTILE_KINDS {
            let t = hostile_text(k);
            assert!(
                all.iter().any(|s| s.contains(&t)),
                "hostile kind {k} missing"
            );
        }
        assert!(all.iter().all(|s| !s.contains('\0')), "NUL in text");
        assert!(all.iter().any(|s| s.chars().any(|c| c.len_utf8() == 4)));
        assert!(
            all.iter().all(|s| s.chars().count() <= 255),
            "longer than varchar(255)"
        );
        let entries = &pg["registered_entries"];
        let column = |c: usize| {
            entries
                .iter()
                .map(move |r| r[c].clone())
                .collect::<Vec<_>>()
        };
        for v in [i64::MIN, i64::MAX] {
            assert!(column(9).contains(&Value::Int(v)), "expiry {v}");
            assert!(column(10).contains(&Value::Int(v)), "revision_number {v}");
        }
        assert!(column(6).contains(&Value::Int(i64::from(i32::MAX))));
        assert!(column(13).contains(&Value::Int(i64::from(i32::MIN))));
        let attrs = column(14);
        assert!(attrs.contains(&Value::Null));
        assert!(attrs.contains(&Value::Bytes(Vec::new())));
        let has_all_bytes = |v: &Value| matches!(v, Value::Bytes(b) if b.windows(256).any(|w| w.iter().copied().eq(0..=255u8)));
        assert!(attrs.iter().any(has_all_bytes));
        assert!(pg["bundles"].iter().any(|r| has_all_bytes(&r[4])));
        assert!(has_all_bytes(&pg["ca_journals"][0][3]));
        let new_expires: Vec<&Value> = pg["attested_node_entries"].iter().map(|r| &r[8]).collect();
        assert!(new_expires.contains(&&Value::Null));
        assert!(new_expires.contains(&&Value::Timestamp(super::super::render::go_zero())));
        let versions: HashSet<String> = pg["attested_node_entries"]
            .iter()
            .map(|r| as_text(&r[10]))
            .collect();
        for v in ["", "1.14.3", "1.14.7", "1.15.3"] {
            assert!(versions.contains(v), "agent_version {v:?}");
        }
        let stamps: Vec<OffsetDateTime> = pg
            .values()
            .flatten()
            .flatten()
            .filter_map(|v| {
                if let Value::Timestamp(t) = v {
                    Some(*t)
                } else {
                    None
                }
            })
            .collect();
        assert!(
            stamps.iter().any(|t| t.nanosecond() % 1_000 != 0),
            "nanoseconds"
        );
        assert!(
            stamps
                .iter()
                .any(|t| t.nanosecond() % 1_000 == 0 && t.nanosecond() != 0),
            "microseconds"
        );

        // SQLite: local offsets in the text; MySQL: zero dates and no 4-byte UTF-8.
        let sqlite = texts(&generate_all(&hostile(200), Engine::Sqlite));
        assert!(sqlite.iter().any(|s| s.ends_with("-03:00")));
        assert!(sqlite.iter().any(|s| s.ends_with("+05:30")));
        assert!(sqlite.iter().any(|s| s.ends_with("+00:00")));
        assert!(sqlite.iter().any(|s| s == "0001-01-01 00:00:00+00:00"));
        let mysql = texts(&generate_all(&hostile(200), Engine::Mysql));
        assert!(mysql.iter().all(|s| s.chars().all(|c| c.len_utf8() <= 3)));
        assert!(mysql.iter().any(|s| s == MYSQL_ZERO));
        let mysql4 = texts(&generate_all(
            &Population {
                four_byte_utf8: Some(true),
                ..hostile(200)
            },
            Engine::Mysql,
        ));
        assert!(mysql4.iter().any(|s| s.contains('😀')));
        let no_zero = generate_all(
            &Population {
                go_zero_times: false,
                ..hostile(200)
            },
            Engine::Mysql,
        );
        assert!(!texts(&no_zero).iter().any(|s| s == MYSQL_ZERO));
    }

    #[test]
    fn agent_versions_never_exceed_the_code_version() {
        let pop = Population {
            schema: 24,
            code_version: "1.14.7".into(),
            ..Population::new(2_000)
        };
        let rows = generate_all(&pop, Engine::Postgres);
        let versions: HashSet<String> = rows["attested_node_entries"]
            .iter()
            .map(|r| as_text(&r[10]))
            .collect();
        assert!(
            versions.contains("1.14.7") && versions.contains("1.14.3") && versions.contains("")
        );
        assert!(!versions.contains("1.15.3"));
        let dev = Plan::new(
            &Population {
                code_version: "1.16.0-dev-abc1234".into(),
                ..Population::default()
            },
            Engine::Sqlite,
        )
        .unwrap();
        assert_eq!(dev.agent_versions, AGENT_VERSIONS);
    }

    #[test]
    fn non_subsecond_populations_have_whole_seconds() {
        let rows = generate_all(
            &Population {
                subsecond: false,
                ..hostile(100)
            },
            Engine::Postgres,
        );
        for v in rows.values().flatten().flatten() {
            if let Value::Timestamp(t) = v {
                assert_eq!(t.nanosecond(), 0);
            }
        }
    }

    #[test]
    fn small_and_empty_populations_work() {
        for n in [0, 1, 2, 5] {
            let rows = generate_all(&hostile(n), Engine::Sqlite);
            assert_eq!(rows.get("registered_entries").map_or(0, Vec::len), n);
            assert_eq!(rows["attested_node_entries"].len(), 3);
            assert_eq!(rows["migrations"].len(), 1);
        }
        assert!(
            Plan::new(
                &Population {
                    schema: 22,
                    ..Population::default()
                },
                Engine::Sqlite
            )
            .is_err()
        );
    }

    #[test]
    fn protobuf_helpers_encode_varints() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        assert_eq!(proto_bytes_field(1, b"ab"), [0x0a, 2, b'a', b'b']);
        assert_eq!(proto_bytes_field(15, &[0; 200])[..3], [0x7a, 0xc8, 0x01]);
        let mut rng = rng_for(1, 1, 1);
        let u = uuid(&mut rng);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }

    #[test]
    fn index_statements_split_from_table_statements() {
        for engine in [Engine::Postgres, Engine::Mysql] {
            let ddl = spire_ddl(engine, 25).unwrap();
            let (tables, indexes) = split_indexes(ddl);
            assert_eq!(indexes.len(), 17);
            assert_eq!(tables.matches("CREATE TABLE").count(), 13);
            assert!(!tables.contains(" INDEX "));
            assert_eq!(tables.lines().count() + indexes.len(), ddl.lines().count());
        }
    }

    #[test]
    fn setval_script_covers_every_model_table() {
        let s = postgres_setval_script();
        assert_eq!(s.lines().count(), 12);
        assert!(s.contains("pg_get_serial_sequence('\"registered_entries\"', 'id')"));
        assert!(!s.contains("federated_registration_entries"));
    }
}
