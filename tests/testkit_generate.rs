//! The testkit's SPIRE datastores, generated on each engine and read back
//! through the `Datastore` trait: row counts, catalogue shape, hostile values.
//!
//! PostgreSQL and MariaDB tests need the services of
//! `scripts/test-services.sh`; without them they skip, unless
//! `SPIREKEEP_TEST_REQUIRE_SERVICES=1` (set by that script) makes it a failure.

use std::collections::BTreeSet;
use std::path::Path;

use spirekeep::datastore::testkit::{
    GeneratedCounts, Population, SPIRE_INDEXES, SPIRE_TABLES, TestDatabase, create_spire_datastore,
    spire_tables,
};
use spirekeep::datastore::{
    self, Catalogue, ColumnKind, Datastore, Engine, OpenMode, Table, Value, dsn,
};
use time::OffsetDateTime;

fn hostile(entries: usize) -> Population {
    Population {
        entries,
        hostile: true,
        batch_entries: 97,
        ..Population::default()
    }
}

/// Row counts match what the generator reports, table by table.
async fn assert_counts(ds: &dyn Datastore, counts: &GeneratedCounts) {
    assert_eq!(counts.iter().count(), 13, "{counts}");
    for t in SPIRE_TABLES {
        let n = ds.count_rows(t).await.unwrap();
        assert_eq!(n, counts.rows(t), "{}: {t}", ds.engine());
    }
    assert!(counts.rows("registered_entries") > 0);
    assert!(counts.rows("selectors") > counts.rows("registered_entries") * 2);
}

/// The catalogue is SPIRE's: 13 tables, their columns in order with the
/// right kinds and nullability, `id` primary keys, the join table's
/// composite key, and exactly the 17 named indexes.
fn assert_catalogue(engine: Engine, schema: u32, cat: &Catalogue) {
    let names: BTreeSet<&str> = cat.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, SPIRE_TABLES.into_iter().collect(), "{engine}");
    for spec in spire_tables(schema).unwrap() {
        let t = cat.table(spec.name).unwrap();
        let cols: Vec<(&str, ColumnKind)> = t
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.kind))
            .collect();
        assert_eq!(cols, spec.columns, "{engine} {}", spec.name);
        if spec.name == "federated_registration_entries" {
            assert_eq!(
                t.primary_key,
                ["bundle_id", "registered_entry_id"],
                "{engine}"
            );
        } else {
            assert_eq!(t.primary_key, ["id"], "{engine} {}", spec.name);
            assert!(t.columns[0].auto_increment, "{engine} {}.id", spec.name);
        }
        for c in t
            .columns
            .iter()
            .filter(|c| !t.primary_key.contains(&c.name))
        {
            let not_null = c.name == "trust_domain";
            assert_eq!(c.nullable, !not_null, "{engine} {}.{}", spec.name, c.name);
        }
    }
    let mut found = 0;
    for t in &cat.tables {
        let want: Vec<_> = SPIRE_INDEXES.iter().filter(|i| i.table == t.name).collect();
        assert_eq!(
            t.indexes.len(),
            want.len(),
            "{engine} {}: {:?}",
            t.name,
            t.indexes
        );
        for w in want {
            let got = t
                .indexes
                .iter()
                .find(|i| i.name == w.name)
                .unwrap_or_else(|| panic!("{engine}: no index {} on {}", w.name, t.name));
            assert_eq!(got.columns, w.columns, "{engine} {}", w.name);
            assert_eq!(got.unique, w.unique, "{engine} {}", w.name);
            found += 1;
        }
    }
    assert_eq!(found, 17, "{engine}");
}

async fn read(ds: &dyn Datastore, cat: &Catalogue, table: &str) -> (Table, Vec<Vec<Value>>) {
    let t = cat.table(table).unwrap().clone();
    let rows = ds.read_table(&t).await.unwrap();
    (t, rows)
}

fn column<'a>(t: &Table, rows: &'a [Vec<Value>], name: &str) -> Vec<&'a Value> {
    let i = t.columns.iter().position(|c| c.name == name).unwrap();
    rows.iter().map(|r| &r[i]).collect()
}

fn texts<'a>(values: &[&'a Value]) -> Vec<&'a str> {
    values
        .iter()
        .filter_map(|v| match v {
            Value::Text(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

/// The migrations row, and hostile values read back as they were meant.
async fn assert_values(ds: &dyn Datastore, pop: &Population, cat: &Catalogue) {
    let engine = ds.engine();
    let (t, rows) = read(ds, cat, "migrations").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(*column(&t, &rows, "id")[0], Value::Int(1));
    assert_eq!(
        *column(&t, &rows, "version")[0],
        Value::Int(i64::from(pop.schema))
    );
    assert_eq!(
        *column(&t, &rows, "code_version")[0],
        Value::Text(pop.code_version.clone())
    );

    let (t, rows) = read(ds, cat, "registered_entries").await;
    for v in [i64::MIN, i64::MAX] {
        assert!(
            column(&t, &rows, "expiry").contains(&&Value::Int(v)),
            "{engine} expiry {v}"
        );
        assert!(
            column(&t, &rows, "revision_number").contains(&&Value::Int(v)),
            "{engine}"
        );
    }
    let hints = column(&t, &rows, "hint");
    let hints = texts(&hints);
    for h in [
        "tab\tseparated\tvalue\t",
        "it's a \"quoted\" `value`",
        "line one\nline two\r\nline three\r",
        "C:\\path\\to\\file \\N \\0 \\x41 trailing\\",
        "   leading and trailing spaces   ",
        "中文 日本語 한국어 ภาษาไทย",
    ] {
        assert!(hints.contains(&h), "{engine}: hint {h:?} not read back");
    }
    let four_byte = hints.iter().any(|h| h.chars().any(|c| c.len_utf8() == 4));
    assert_eq!(four_byte, engine != Engine::Mysql, "{engine}: 4-byte UTF-8");
    assert!(
        hints
            .iter()
            .any(|h| h.chars().count() == 255 && !h.is_ascii())
    );
    if pop.schema >= 25 {
        let attrs = column(&t, &rows, "additional_attributes");
        assert!(attrs.contains(&&Value::Null));
        assert!(
            attrs.contains(&&Value::Bytes(Vec::new())),
            "{engine}: empty blob"
        );
        let every_byte = |v: &&Value| matches!(v, Value::Bytes(b) if b.windows(256).any(|w| w.iter().copied().eq(0..=255u8)));
        assert!(attrs.iter().any(every_byte), "{engine}: all-bytes blob");
        let (jt, jrows) = read(ds, cat, "ca_journals").await;
        assert!(
            column(&jt, &jrows, "data").iter().any(every_byte),
            "{engine}"
        );
    }
    // Every timestamp reads back as one (go-sqlite3 text with any offset included).
    let stamps: Vec<OffsetDateTime> = column(&t, &rows, "created_at")
        .into_iter()
        .map(|v| match v {
            Value::Timestamp(t) => *t,
            other => panic!("{engine}: created_at read back as {other:?}"),
        })
        .collect();
    let subsecond = stamps.iter().filter(|t| t.nanosecond() != 0).count();
    if engine == Engine::Mysql {
        assert_eq!(subsecond, 0, "MySQL DATETIME keeps whole seconds");
    } else {
        assert!(
            subsecond > rows.len() / 2,
            "{engine}: sub-second timestamps"
        );
    }

    let (t, rows) = read(ds, cat, "attested_node_entries").await;
    let new_expires = column(&t, &rows, "new_expires_at");
    assert!(new_expires.contains(&&Value::Null));
    let zero = spirekeep::datastore::timefmt::go_zero_time();
    assert!(
        new_expires.contains(&&Value::Timestamp(zero)),
        "{engine}: Go zero time"
    );
    if pop.schema >= 24 {
        let versions = column(&t, &rows, "agent_version");
        let versions: BTreeSet<&str> = texts(&versions).into_iter().collect();
        assert!(
            versions.contains("") && versions.contains("1.14.3"),
            "{versions:?}"
        );
    }
}

/// SPIRE can keep writing: the next `id` follows the generated ones.
async fn assert_ids_continue(ds: &dyn Datastore, cat: &Catalogue, counts: &GeneratedCounts) {
    let engine = ds.engine();
    let q = |s: &str| datastore::quote_ident(engine, s);
    ds.execute_script(&format!(
        "INSERT INTO {} ({}, {}) VALUES ('after-generation', 'spiffe://example.org/after');",
        q("registered_entries"),
        q("entry_id"),
        q("spiffe_id")
    ))
    .await
    .unwrap();
    let (t, rows) = read(ds, cat, "registered_entries").await;
    let last = rows.last().unwrap();
    let ids = column(&t, &rows, "id");
    assert_eq!(
        *ids[ids.len() - 1],
        Value::Int(i64::try_from(counts.rows("registered_entries")).unwrap() + 1),
        "{engine}"
    );
    assert_eq!(
        last[t.columns.iter().position(|c| c.name == "entry_id").unwrap()],
        Value::Text("after-generation".into())
    );
}

async fn full_check(ds: &dyn Datastore, pop: &Population) {
    let counts = create_spire_datastore(ds, pop).await.unwrap();
    assert_counts(ds, &counts).await;
    let cat = ds.catalogue().await.unwrap();
    assert_catalogue(ds.engine(), pop.schema, &cat);
    if pop.hostile {
        assert_values(ds, pop, &cat).await;
    }
    assert_ids_continue(ds, &cat, &counts).await;
    // A second run refuses: the tables exist.
    assert!(create_spire_datastore(ds, pop).await.is_err());
}

async fn sqlite(path: &Path) -> Box<dyn Datastore> {
    let spec = dsn::parse(path.to_str().unwrap(), Some(Engine::Sqlite), Path::new("/")).unwrap();
    datastore::open(&spec, OpenMode::Create).await.unwrap()
}

#[tokio::test]
async fn sqlite_hostile_datastore_every_schema() {
    for (schema, code_version) in [(25, "1.15.3"), (24, "1.14.7"), (23, "1.13.2")] {
        let dir = tempfile::tempdir().unwrap();
        let ds = sqlite(&dir.path().join("datastore.sqlite3")).await;
        let pop = Population {
            schema,
            code_version: code_version.into(),
            ..hostile(400)
        };
        full_check(ds.as_ref(), &pop).await;
        ds.close().await;
    }
}

#[tokio::test]
async fn sqlite_plain_datastore_is_ascii_and_utc() {
    let dir = tempfile::tempdir().unwrap();
    let ds = sqlite(&dir.path().join("plain.sqlite3")).await;
    let pop = Population::new(300);
    full_check(ds.as_ref(), &pop).await;
    let cat = ds.catalogue().await.unwrap();
    for table in &cat.tables {
        for row in ds.read_table(table).await.unwrap() {
            for v in row {
                if let Value::Text(s) = v {
                    assert!(s.is_ascii(), "{}: {s:?}", table.name);
                }
            }
        }
    }
    ds.close().await;
}

#[tokio::test]
async fn postgres_hostile_datastore() {
    let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "testkit_gen")
        .await
        .unwrap()
    else {
        return;
    };
    let ds = db.open().await.unwrap();
    full_check(ds.as_ref(), &hostile(500)).await;
    ds.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn postgres_schema_23_datastore() {
    let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "testkit_gen23")
        .await
        .unwrap()
    else {
        return;
    };
    let ds = db.open().await.unwrap();
    let pop = Population {
        schema: 23,
        code_version: "1.12.5".into(),
        // Indexes in initDB's order, as they come on SQLite.
        defer_indexes: Some(false),
        ..hostile(150)
    };
    full_check(ds.as_ref(), &pop).await;
    ds.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn mysql_hostile_datastore() {
    let Some(db) = TestDatabase::create_or_skip(Engine::Mysql, "testkit_gen")
        .await
        .unwrap()
    else {
        return;
    };
    let ds = db.open().await.unwrap();
    full_check(ds.as_ref(), &hostile(500)).await;
    ds.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn mysql_schema_24_datastore() {
    let Some(db) = TestDatabase::create_or_skip(Engine::Mysql, "testkit_gen24")
        .await
        .unwrap()
    else {
        return;
    };
    let ds = db.open().await.unwrap();
    let pop = Population {
        schema: 24,
        code_version: "1.14.7".into(),
        defer_indexes: Some(false),
        ..hostile(150)
    };
    full_check(ds.as_ref(), &pop).await;
    ds.close().await;
    db.cleanup().await.unwrap();
}

/// SPIRE's MySQL tables are utf8mb3: asking for 4-byte UTF-8 there fails, as
/// it would for SPIRE (spire-reference §10).
#[tokio::test]
async fn mysql_rejects_four_byte_utf8_like_spire() {
    let Some(db) = TestDatabase::create_or_skip(Engine::Mysql, "testkit_4byte")
        .await
        .unwrap()
    else {
        return;
    };
    let ds = db.open().await.unwrap();
    let pop = Population {
        four_byte_utf8: Some(true),
        ..hostile(50)
    };
    let err = create_spire_datastore(ds.as_ref(), &pop).await.unwrap_err();
    assert!(err.to_string().contains("Incorrect string value"), "{err}");
    ds.close().await;
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn test_databases_are_separate_and_dropped() {
    for engine in [Engine::Postgres, Engine::Mysql] {
        let Some(a) = TestDatabase::create_or_skip(engine, "sep").await.unwrap() else {
            continue;
        };
        let b = TestDatabase::create(engine, "sep").await.unwrap();
        assert_ne!(a.name(), b.name());
        let (da, db_) = (a.open().await.unwrap(), b.open().await.unwrap());
        da.execute_script("CREATE TABLE only_in_a (x integer);")
            .await
            .unwrap();
        assert!(da.catalogue().await.unwrap().table("only_in_a").is_some());
        assert!(db_.catalogue().await.unwrap().table("only_in_a").is_none());
        da.close().await;
        db_.close().await;
        let spec = a.spec().unwrap();
        a.cleanup().await.unwrap();
        b.cleanup().await.unwrap();
        let gone = datastore::open(&spec, OpenMode::ReadWrite).await;
        assert!(
            gone.is_err(),
            "{engine}: database still there after cleanup"
        );
    }
}

/// `examples/spire-datastore.sqlite3` is exactly what the generator makes
/// with the parameters in `examples/README.md`, and is one self-contained
/// file in rollback-journal mode.
#[tokio::test]
async fn bundled_example_matches_the_generator() {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/spire-datastore.sqlite3");
    let header = std::fs::read(&bundled).unwrap();
    assert_eq!(&header[..16], b"SQLite format 3\0");
    assert_eq!(
        (header[18], header[19]),
        (1, 1),
        "not in rollback-journal mode"
    );
    let spec = dsn::parse(
        bundled.to_str().unwrap(),
        Some(Engine::Sqlite),
        Path::new("/"),
    )
    .unwrap();
    let example = datastore::open(&spec, OpenMode::ReadOnly).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let fresh = sqlite(&dir.path().join("fresh.sqlite3")).await;
    let pop = Population {
        entries: 200,
        schema: 25,
        code_version: "1.15.3".into(),
        seed: 1,
        hostile: true,
        ..Population::default()
    };
    let counts = create_spire_datastore(fresh.as_ref(), &pop).await.unwrap();

    let (a, b) = (
        example.catalogue().await.unwrap(),
        fresh.catalogue().await.unwrap(),
    );
    assert_eq!(
        a, b,
        "catalogue differs: regenerate the example (examples/README.md)"
    );
    for table in &a.tables {
        let (x, y) = (
            example.read_table(table).await.unwrap(),
            fresh.read_table(table).await.unwrap(),
        );
        assert_eq!(u64::try_from(x.len()).unwrap(), counts.rows(&table.name));
        assert!(
            x == y,
            "{} differs: regenerate the example (examples/README.md)",
            table.name
        );
    }
    example.close().await;
    fresh.close().await;
}

/// Cuts a value down to what `engine` keeps: PostgreSQL timestamps keep
/// microseconds, MySQL DATETIME whole seconds and text no 4-byte UTF-8.
fn as_kept_by(engine: Engine, v: &Value) -> Value {
    match (engine, v) {
        (Engine::Postgres, Value::Timestamp(t)) => Value::Timestamp(
            t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
                .unwrap(),
        ),
        (Engine::Mysql, Value::Timestamp(t)) => Value::Timestamp(t.replace_nanosecond(0).unwrap()),
        (Engine::Mysql, Value::Text(s)) => Value::Text(
            s.chars()
                .map(|c| if c.len_utf8() == 4 { '\u{FFFD}' } else { c })
                .collect(),
        ),
        _ => v.clone(),
    }
}

/// The same population on SQLite, PostgreSQL and MariaDB reads back the
/// same, up to the documented engine differences (spire-reference §10).
#[tokio::test]
async fn the_same_population_reads_back_the_same_on_every_engine() {
    let Some(pg_db) = TestDatabase::create_or_skip(Engine::Postgres, "cross")
        .await
        .unwrap()
    else {
        return;
    };
    let Some(my_db) = TestDatabase::create_or_skip(Engine::Mysql, "cross")
        .await
        .unwrap()
    else {
        pg_db.cleanup().await.unwrap();
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lite = sqlite(&dir.path().join("cross.sqlite3")).await;
    let (pg, my) = (pg_db.open().await.unwrap(), my_db.open().await.unwrap());
    let pop = hostile(300);
    let mut read_back = Vec::new();
    for ds in [lite.as_ref(), pg.as_ref(), my.as_ref()] {
        create_spire_datastore(ds, &pop).await.unwrap();
        let cat = ds.catalogue().await.unwrap();
        let mut tables = Vec::new();
        for t in &cat.tables {
            tables.push((t.name.clone(), ds.read_table(t).await.unwrap()));
        }
        read_back.push(tables);
    }
    let (lite_rows, pg_rows, my_rows) = (&read_back[0], &read_back[1], &read_back[2]);
    for (((name, l), (_, p)), (_, m)) in lite_rows.iter().zip(pg_rows).zip(my_rows) {
        assert_eq!(l.len(), p.len(), "{name}");
        assert_eq!(l.len(), m.len(), "{name}");
        for ((lr, pr), mr) in l.iter().zip(p).zip(m) {
            for ((lv, pv), mv) in lr.iter().zip(pr).zip(mr) {
                assert_eq!(
                    as_kept_by(Engine::Postgres, lv),
                    *pv,
                    "{name}: SQLite vs PostgreSQL"
                );
                assert_eq!(
                    as_kept_by(Engine::Mysql, pv),
                    *mv,
                    "{name}: PostgreSQL vs MariaDB"
                );
            }
        }
    }
    for ds in [lite, pg, my] {
        ds.close().await;
    }
    pg_db.cleanup().await.unwrap();
    my_db.cleanup().await.unwrap();
}

/// Creating the indexes after the rows changes nothing but SQLite's
/// `sqlite_master` order: same catalogue, same rows.
#[tokio::test]
async fn deferred_indexes_give_the_same_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for (name, defer) in [("in_order.sqlite3", false), ("deferred.sqlite3", true)] {
        let ds = sqlite(&dir.path().join(name)).await;
        let pop = Population {
            defer_indexes: Some(defer),
            ..hostile(300)
        };
        assert_eq!(pop.defers_indexes(Engine::Sqlite), defer);
        full_check(ds.as_ref(), &pop).await;
        let cat = ds.catalogue().await.unwrap();
        let mut rows = Vec::new();
        for t in &cat.tables {
            rows.push(ds.read_table(t).await.unwrap());
        }
        seen.push((cat, rows));
        ds.close().await;
    }
    assert_eq!(seen[0].0, seen[1].0);
    assert!(seen[0].1 == seen[1].1);
    assert!(!Population::new(10).defers_indexes(Engine::Sqlite));
    assert!(Population::new(10).defers_indexes(Engine::Postgres));
    assert!(Population::new(Population::SQLITE_DEFER_FROM).defers_indexes(Engine::Sqlite));
}
