//! Golden files: what people and programs read must not change by accident.
//!
//! - `tests/fixtures/manifest-v1.json`: the JSON of a fixed manifest. A change
//!   in the manifest's shape shows up here in review.
//! - `tests/fixtures/repo-v1/`: a whole repository with one snapshot, written
//!   by spirekeep 0.1.0 (format version 1). Every later release must still list,
//!   verify and read it.
//!
//! To regenerate after an intended change: `SPIREKEEP_BLESS=1 cargo test --test
//! snapshot_golden`, then review the diff (a new format version gets a new
//! fixture; old fixtures stay).

mod repo_backends;

use std::path::PathBuf;

use repo_backends::{entries_table, entry_row, hostile_table};
use spirekeep::datastore::{
    Catalogue, Column, ColumnKind, Engine, Index, MigrationsRow, Table, Value,
};
use spirekeep::snapshot::codec::{self, CodecOptions, TableReader, TableWriter};
use spirekeep::snapshot::manifest::{
    self, DataFormat, DataObject, MANIFEST_FORMAT_VERSION, Manifest, TableData,
};
use spirekeep::store::Repository;
use spirekeep::store::keys::{self, SnapshotId};
use time::macros::datetime;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn bless() -> bool {
    std::env::var("SPIREKEEP_BLESS").is_ok_and(|v| v == "1")
}

fn migrations_table() -> Table {
    let col = |name: &str, declared: &str, kind| Column {
        name: name.into(),
        declared_type: declared.into(),
        kind,
        nullable: name != "id",
        auto_increment: name == "id",
    };
    Table {
        name: "migrations".into(),
        columns: vec![
            col("id", "integer", ColumnKind::Integer),
            col("created_at", "datetime", ColumnKind::Timestamp),
            col("updated_at", "datetime", ColumnKind::Timestamp),
            col("version", "integer", ColumnKind::Integer),
            col("code_version", "varchar(255)", ColumnKind::Text),
        ],
        primary_key: vec!["id".into()],
        indexes: vec![],
        create_sql: Some(
            "CREATE TABLE \"migrations\" (\"id\" integer primary key autoincrement,\"created_at\" datetime,\
             \"updated_at\" datetime,\"version\" integer,\"code_version\" varchar(255) )"
                .into(),
        ),
    }
}

fn object(id: &SnapshotId, table: &str, part: u32, rows: u64, seed: u8) -> DataObject {
    let hex = |b: u8| format!("{b:02x}").repeat(32);
    DataObject {
        key: keys::data_object(id, table, part),
        size: 1000 + u64::from(seed),
        sha256: hex(seed),
        raw_size: 3000 + u64::from(seed),
        raw_sha256: hex(seed.wrapping_add(1)),
        rows,
        content_hash: hex(seed.wrapping_add(2)),
        encryption: None,
    }
}

/// A fixed manifest with made-up (but consistent) sizes and hashes.
fn fixed_manifest() -> Manifest {
    let id = SnapshotId::parse("20261128T093000Z-0a1b2c").unwrap();
    let mut entries = entries_table("registered_entries");
    entries.indexes.push(Index {
        name: "idx_registered_entries_parent_id".into(),
        columns: vec!["parent_id".into()],
        unique: false,
    });
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        snapshot_id: id.clone(),
        spirekeep_version: "0.1.0".into(),
        engine: Engine::Postgres,
        server_version: "15.18".into(),
        source: "postgres://spire@db.example.org:5432/spire?sslmode=require".into(),
        spire: MigrationsRow {
            schema_version: 23,
            code_version: "1.13.2".into(),
        },
        started_at: datetime!(2026-11-28 09:30:00.123456 UTC),
        finished_at: datetime!(2026-11-28 09:30:07 UTC),
        labels: vec!["pre-upgrade".into(), "plan:upgrade-1.14".into()],
        // A fixed level: the golden file records this manifest, not the default.
        data_format: DataFormat::current(&CodecOptions {
            level: 3,
            workers: 0,
        }),
        catalogue: Catalogue {
            tables: vec![migrations_table(), entries],
        },
        tables: vec![
            TableData::from_objects("migrations", vec![object(&id, "migrations", 0, 1, 0x10)])
                .unwrap(),
            TableData::from_objects(
                "registered_entries",
                vec![
                    object(&id, "registered_entries", 0, 1_000_000, 0x20),
                    object(&id, "registered_entries", 1, 234_567, 0x30),
                ],
            )
            .unwrap(),
        ],
        encryption: None,
        server_files: Vec::new(),
    }
}

#[test]
fn manifest_v1_json_shape_is_stable() {
    let m = fixed_manifest();
    m.validate().unwrap();
    let json = m.to_json_pretty();
    let path = fixtures().join("manifest-v1.json");
    if bless() {
        std::fs::create_dir_all(fixtures()).unwrap();
        std::fs::write(&path, &json).unwrap();
    }
    let golden = std::fs::read_to_string(&path)
        .expect("tests/fixtures/manifest-v1.json (SPIREKEEP_BLESS=1 creates it)");
    assert!(
        json == golden,
        "the manifest's JSON changed. If that is intended, it is a format change: decide whether it needs \
         a new format_version, then rerun with SPIREKEEP_BLESS=1 and review the diff.\n--- now:\n{json}"
    );
    assert_eq!(Manifest::from_json(golden.as_bytes()).unwrap(), m);
}

const GOLDEN_ID: &str = "20261128T093000Z-5b1e55";

fn golden_tables() -> Vec<(Table, Vec<Vec<Value>>)> {
    let (odd, mut odd_rows) = hostile_table();
    odd_rows.truncate(3); // keep the fixture small
    vec![
        (
            entries_table("registered_entries"),
            (0..300).map(|i| entry_row(i, 0)).collect(),
        ),
        (entries_table("join_tokens"), Vec::new()),
        (odd, odd_rows),
    ]
}

async fn write_golden_repo(repo: &Repository) {
    let id = SnapshotId::parse(GOLDEN_ID).unwrap();
    let mut tables = Vec::new();
    for (table, rows) in golden_tables() {
        let mut w = TableWriter::for_table(repo, &id, &table, 0, CodecOptions::default()).unwrap();
        w.write_batch(&rows).await.unwrap();
        let object = w.finish().await.unwrap();
        tables.push((table, object));
    }
    let m = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        snapshot_id: id,
        spirekeep_version: manifest::SPIREKEEP_VERSION.into(),
        engine: Engine::Sqlite,
        server_version: "3.51.3".into(),
        source: "/var/lib/spire/data/datastore.sqlite3".into(),
        spire: MigrationsRow {
            schema_version: 23,
            code_version: "1.13.2".into(),
        },
        started_at: datetime!(2026-11-28 09:30:00 UTC),
        finished_at: datetime!(2026-11-28 09:30:01 UTC),
        labels: vec!["golden".into()],
        // A fixed level: the golden file records this manifest, not the default.
        data_format: DataFormat::current(&CodecOptions {
            level: 3,
            workers: 0,
        }),
        catalogue: Catalogue {
            tables: tables.iter().map(|(t, _)| t.clone()).collect(),
        },
        tables: tables
            .into_iter()
            .map(|(t, o)| TableData::from_objects(t.name, vec![o]).unwrap())
            .collect(),
        encryption: None,
        server_files: Vec::new(),
    };
    m.store(repo).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_repository_v1_still_reads_and_verifies() {
    let dir = fixtures().join("repo-v1");
    if bless() {
        let _ = std::fs::remove_dir_all(&dir);
        let repo = Repository::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        write_golden_repo(&repo).await;
    }
    assert!(
        dir.is_dir(),
        "tests/fixtures/repo-v1 is missing (SPIREKEEP_BLESS=1 creates it)"
    );
    let repo = Repository::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let id = SnapshotId::parse(GOLDEN_ID).unwrap();
    assert_eq!(
        manifest::list_snapshots(&repo).await.unwrap(),
        vec![id.clone()]
    );
    let m = Manifest::load(&repo, &id).await.unwrap();
    assert_eq!(m.format_version, 1);
    assert_eq!(m.tables.len(), 3);
    for (table, rows) in golden_tables() {
        let entry = m.table(&table.name).unwrap();
        assert_eq!(m.catalogue.table(&table.name), Some(&table));
        assert_eq!(entry.rows, rows.len() as u64);
        assert_eq!(Some(codec::content_hash(&rows)), entry.content());
        for object in &entry.objects {
            codec::check_stored_bytes(&repo, object).await.unwrap();
            let mut r = TableReader::open(&repo, &table, object).await.unwrap();
            let mut back = Vec::new();
            while let Some(row) = r.next_row().await.unwrap() {
                back.push(row);
            }
            assert_eq!(back, rows, "{}", table.name);
        }
    }
}
