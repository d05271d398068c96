//! The snapshot pipeline end to end on every backend: rows → TableWriter →
//! repository → manifest (create-only, last) → TableReader → rows, with every
//! hash checked; and every way it can break, named precisely.

mod repo_backends;

use bytes::Bytes;
use repo_backends::{FaultyStore, backends, entries_table, entry_row, hostile_table};
use spirekeep::ErrorKind;
use spirekeep::datastore::{Catalogue, Engine, MigrationsRow, Table, Value};
use spirekeep::snapshot::codec::{self, CodecOptions, ContentHasher, TableReader, TableWriter};
use spirekeep::snapshot::manifest::{
    self, DataFormat, DataObject, MANIFEST_FORMAT_VERSION, Manifest, SPIREKEEP_VERSION, TableData,
};
use spirekeep::snapshot::{ManifestError, SnapshotError};
use spirekeep::store::keys::{self, SnapshotId};
use spirekeep::store::{Repository, StoreError};
use time::OffsetDateTime;

async fn write_table(
    repo: &Repository,
    id: &SnapshotId,
    table: &Table,
    rows: &[Vec<Value>],
) -> DataObject {
    let mut w = TableWriter::for_table(repo, id, table, 0, CodecOptions::default()).unwrap();
    // Mix both ways of feeding rows.
    let (first, rest) = rows.split_at(rows.len() / 3);
    for r in first {
        w.write_row(r).await.unwrap();
    }
    for chunk in rest.chunks(700) {
        w.write_batch(chunk).await.unwrap();
    }
    w.finish().await.unwrap()
}

async fn read_table(
    repo: &Repository,
    table: &Table,
    object: &DataObject,
) -> Result<Vec<Vec<Value>>, SnapshotError> {
    let mut r = TableReader::open(repo, table, object).await?;
    let mut rows = Vec::new();
    while let Some(row) = r.next_row().await? {
        rows.push(row);
    }
    Ok(rows)
}

fn manifest_for(
    id: &SnapshotId,
    tables: Vec<(Table, DataObject)>,
    started_at: OffsetDateTime,
) -> Manifest {
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        snapshot_id: id.clone(),
        spirekeep_version: SPIREKEEP_VERSION.into(),
        engine: Engine::Sqlite,
        server_version: "3.51.3".into(),
        source: "/var/lib/spire/datastore.sqlite3".into(),
        spire: MigrationsRow {
            schema_version: 23,
            code_version: "1.13.2".into(),
        },
        started_at,
        finished_at: OffsetDateTime::now_utc(),
        labels: vec!["test".into()],
        data_format: DataFormat::current(&CodecOptions::default()),
        catalogue: Catalogue {
            tables: tables.iter().map(|(t, _)| t.clone()).collect(),
        },
        tables: tables
            .into_iter()
            .map(|(t, o)| TableData::from_objects(t.name, vec![o]).unwrap())
            .collect(),
        encryption: None,
        server_files: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_round_trip_on_every_backend() {
    for b in backends("pipeline") {
        let repo = &b.repo;
        let started = OffsetDateTime::now_utc();
        let id = SnapshotId::new(started);

        // Large enough for several multipart parts: the blobs do not compress.
        let entries = entries_table("registered_entries");
        let entry_rows: Vec<Vec<Value>> = (0..12_000).map(|i| entry_row(i, 1000)).collect();
        let empty = entries_table("join_tokens");
        let (odd, odd_rows) = hostile_table();

        let o1 = write_table(repo, &id, &entries, &entry_rows).await;
        let o2 = write_table(repo, &id, &empty, &[]).await;
        let o3 = write_table(repo, &id, &odd, &odd_rows).await;
        assert!(
            o1.size > 2 * 5 * 1024 * 1024_u64,
            "{}: {} bytes is too small to test multipart",
            b.name,
            o1.size
        );
        assert_eq!((o1.rows, o2.rows, o3.rows), (12_000, 0, 4));
        assert_eq!(o1.key, keys::data_object(&id, "registered_entries", 0));
        assert_eq!(o3.key, keys::data_object(&id, "odd table/é", 0));
        assert!(!o3.key[keys::data_prefix(&id).len()..].contains('/'));

        // No manifest yet: no snapshot.
        assert!(
            manifest::list_snapshots(repo).await.unwrap().is_empty(),
            "{}",
            b.name
        );
        let m = manifest_for(
            &id,
            vec![
                (entries.clone(), o1.clone()),
                (empty.clone(), o2.clone()),
                (odd.clone(), o3.clone()),
            ],
            started,
        );
        let key = m.store(repo).await.unwrap();
        assert_eq!(key, keys::manifest(&id));
        let err = m.store(repo).await.unwrap_err();
        assert!(
            matches!(err, SnapshotError::Store(StoreError::AlreadyExists { .. })),
            "{}: {err}",
            b.name
        );
        assert_eq!(
            manifest::list_snapshots(repo).await.unwrap(),
            vec![id.clone()]
        );
        let loaded = Manifest::load(repo, &id).await.unwrap();
        assert_eq!(loaded, m);

        for (table, object, rows) in [
            (&entries, &o1, &entry_rows),
            (&empty, &o2, &Vec::new()),
            (&odd, &o3, &odd_rows),
        ] {
            let back = read_table(repo, table, object)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", b.name));
            assert_eq!(&back, rows, "{}: {}", b.name, table.name);
            codec::check_stored_bytes(repo, object).await.unwrap();
            assert_eq!(
                codec::check_object(repo, table, object).await.unwrap(),
                object.rows
            );
            // The content hash recomputed from rows in any order matches the manifest.
            let mut h = ContentHasher::new();
            for r in rows.iter().rev() {
                h.add_row(r);
            }
            let entry = loaded.table(&table.name).unwrap();
            assert_eq!(Some(h.current()), entry.content(), "{}", table.name);
        }
        b.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_objects_are_named() {
    for b in backends("damage") {
        let repo = &b.repo;
        let id = SnapshotId::new(OffsetDateTime::now_utc());
        let table = entries_table("registered_entries");
        let rows: Vec<Vec<Value>> = (0..3000).map(|i| entry_row(i, 0)).collect();
        let object = write_table(repo, &id, &table, &rows).await;
        let good = repo.get(&object.key).await.unwrap();

        // One bit flipped in the stored bytes.
        let mut flipped = good.to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x04;
        repo.put_overwrite(&object.key, Bytes::from(flipped))
            .await
            .unwrap();
        let err = codec::check_stored_bytes(repo, &object).await.unwrap_err();
        assert!(
            matches!(err, SnapshotError::Mismatch { what: "sha256", .. }),
            "{}: {err}",
            b.name
        );
        assert!(err.to_string().contains(&object.key), "{err}");
        let err = read_table(repo, &table, &object).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{}: {err}", b.name);
        assert!(err.to_string().contains(&object.key), "{err}");

        // Truncated.
        repo.put_overwrite(&object.key, good.slice(..good.len() - 100))
            .await
            .unwrap();
        let err = codec::check_stored_bytes(repo, &object).await.unwrap_err();
        assert!(
            matches!(err, SnapshotError::Mismatch { what: "size", .. }),
            "{err}"
        );
        let err = read_table(repo, &table, &object).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(err.to_string().contains(&object.key), "{err}");

        // Intact bytes, but the manifest's record disagrees (e.g. an object
        // swapped for another good one): caught at the end of the object.
        repo.put_overwrite(&object.key, good.clone()).await.unwrap();
        let mut wrong = object.clone();
        wrong.content_hash = "0".repeat(64);
        wrong.sha256.clone_from(&object.sha256);
        let err = read_table(repo, &table, &wrong).await.unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Mismatch {
                    what: "content hash",
                    ..
                }
            ),
            "{err}"
        );
        let mut wrong = object.clone();
        wrong.rows += 1;
        let err = read_table(repo, &table, &wrong).await.unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Mismatch {
                    what: "row count",
                    ..
                }
            ),
            "{err}"
        );

        // An object holding another table's rows.
        let other = entries_table("attested_node_entries");
        let err = TableReader::open(repo, &other, &object).await.unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Mismatch {
                    what: "table header",
                    ..
                }
            ),
            "{err}"
        );

        // Missing.
        repo.delete(&object.key).await.unwrap();
        let err = read_table(repo, &table, &object).await.unwrap_err();
        assert!(
            matches!(err, SnapshotError::Store(StoreError::NotFound { .. })),
            "{err}"
        );
        assert!(err.to_string().contains(&object.key), "{err}");
        b.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_manifests_are_refused() {
    let repo = Repository::in_memory();
    let id = SnapshotId::new(OffsetDateTime::now_utc());
    let table = entries_table("bundles");
    let object = write_table(&repo, &id, &table, &[entry_row(1, 10)]).await;
    let mut m = manifest_for(&id, vec![(table, object)], OffsetDateTime::now_utc());
    m.tables[0].rows = 2;
    let err = m.store(&repo).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("records 2 rows but its objects hold 1"),
        "{err}"
    );
    assert!(
        repo.head(&keys::manifest(&id)).await.unwrap().is_none(),
        "an invalid manifest is never written"
    );

    // A newer spirekeep's manifest.
    let newer = serde_json::json!({"format_version": 99, "snapshot_id": id.as_str()});
    repo.put_create(&keys::manifest(&id), Bytes::from(newer.to_string()))
        .await
        .unwrap();
    let err = Manifest::load(&repo, &id).await.unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::Manifest {
                problem: ManifestError::TooNew { found: 99, .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade spirekeep"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Usage);

    // A manifest stored under another snapshot's key.
    let other = SnapshotId::new(OffsetDateTime::now_utc() + time::Duration::hours(1));
    m.tables[0].rows = 1;
    repo.put_create(&keys::manifest(&other), Bytes::from(m.to_json_pretty()))
        .await
        .unwrap();
    let err = Manifest::load(&repo, &other).await.unwrap_err();
    assert!(err.to_string().contains("but is stored as"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_row_is_refused_at_once_and_nothing_is_written() {
    let repo = Repository::in_memory();
    let id = SnapshotId::new(OffsetDateTime::now_utc());
    let table = entries_table("registered_entries");
    let mut w = TableWriter::for_table(&repo, &id, &table, 0, CodecOptions::default()).unwrap();
    let key = w.key().to_owned();
    for i in 0..5000 {
        w.write_row(&entry_row(i, 2000)).await.unwrap();
    }
    let err = w.write_row(&[Value::Int(1)]).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Encode { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("row 5001 has 1 values for 15 columns"),
        "{err}"
    );
    let mut too_long = entry_row(5000, 0);
    too_long[4] = Value::Text("x".repeat(64 * 1024 * 1024 + 1));
    let err = w.write_row(&too_long).await.unwrap_err();
    assert!(
        err.to_string().contains("row 5001, column spiffe_id"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("over the format's limit of 64 MiB"),
        "{err}"
    );
    assert_eq!(w.rows(), 5000, "refused rows are not written");
    w.abort().await.unwrap();
    assert!(repo.head(&key).await.unwrap().is_none());

    // The writer stays usable after a refused row: the object holds exactly
    // the accepted rows.
    let mut w = TableWriter::for_table(&repo, &id, &table, 1, CodecOptions::default()).unwrap();
    let rows: Vec<Vec<Value>> = (0..10).map(|i| entry_row(i, 0)).collect();
    w.write_batch(&rows[..5]).await.unwrap();
    assert!(w.write_batch(&[vec![Value::Null]]).await.is_err());
    w.write_batch(&rows[5..]).await.unwrap();
    let raw_size = w.raw_size();
    let object = w.finish().await.unwrap();
    assert_eq!(
        object.raw_size,
        raw_size + 2,
        "all but the trailer (0x00 and the count 10)"
    );
    assert_eq!(read_table(&repo, &table, &object).await.unwrap(), rows);
}

#[tokio::test(flavor = "multi_thread")]
async fn aborted_or_dropped_writers_leave_nothing() {
    let repo = Repository::in_memory();
    let id = SnapshotId::new(OffsetDateTime::now_utc());
    let table = entries_table("registered_entries");
    let mut w = TableWriter::for_table(&repo, &id, &table, 0, CodecOptions::default()).unwrap();
    for i in 0..8000 {
        w.write_row(&entry_row(i, 1000)).await.unwrap();
    }
    w.abort().await.unwrap();
    let mut w = TableWriter::for_table(&repo, &id, &table, 1, CodecOptions::default()).unwrap();
    for i in 0..8000 {
        w.write_row(&entry_row(i, 1000)).await.unwrap();
    }
    drop(w);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(repo.list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_upload_is_reported_and_leaves_nothing() {
    let (inner, repo) = FaultyStore::in_memory(Some(2), None);
    let id = SnapshotId::new(OffsetDateTime::now_utc());
    let table = entries_table("registered_entries");
    let mut w = TableWriter::for_table(&repo, &id, &table, 0, CodecOptions::default()).unwrap();
    let mut result = Ok(());
    for i in 0..20_000 {
        result = w.write_row(&entry_row(i, 1000)).await;
        if result.is_err() {
            break;
        }
    }
    let err = match result {
        Err(e) => e,
        Ok(()) => w.finish().await.unwrap_err(),
    };
    assert!(
        matches!(err, SnapshotError::Store(StoreError::Backend { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("injected failure: part 2"),
        "{err}"
    );
    assert!(
        err.to_string().contains("registered_entries.0.spkd.zst"),
        "{err}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let plain = Repository::from_object_store(inner, "", "memory://").unwrap();
    assert!(plain.list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_while_reading_is_reported() {
    let (inner, faulty) = FaultyStore::in_memory(None, Some(10_000));
    let plain = Repository::from_object_store(inner, "", "memory://").unwrap();
    let id = SnapshotId::new(OffsetDateTime::now_utc());
    let table = entries_table("registered_entries");
    let rows: Vec<Vec<Value>> = (0..2000).map(|i| entry_row(i, 100)).collect();
    let object = write_table(&plain, &id, &table, &rows).await;
    assert!(object.size > 10_000);
    let err = read_table(&faulty, &table, &object).await.unwrap_err();
    assert!(
        matches!(err, SnapshotError::Store(StoreError::Backend { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("connection dropped") && err.to_string().contains(&object.key),
        "{err}"
    );
    let err = codec::check_stored_bytes(&faulty, &object)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("connection dropped"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn verification_records_are_stored_and_listed() {
    use spirekeep::snapshot::VerificationRecord;
    use spirekeep::store::keys::VerifyKind;
    let repo = Repository::in_memory();
    let id = SnapshotId::new(OffsetDateTime::now_utc());
    let t0 = OffsetDateTime::now_utc();
    let deep = VerificationRecord::new(
        id.clone(),
        t0 + time::Duration::minutes(5),
        VerifyKind::Deep,
        vec![],
    );
    let shallow = VerificationRecord::new(
        id.clone(),
        t0,
        VerifyKind::Shallow,
        vec!["object x: sha256 mismatch".into()],
    );
    deep.store(&repo).await.unwrap();
    shallow.store(&repo).await.unwrap();
    assert!(matches!(
        deep.store(&repo).await.unwrap_err(),
        SnapshotError::Store(StoreError::AlreadyExists { .. })
    ));
    let all = VerificationRecord::load_all(&repo, &id).await.unwrap();
    assert_eq!(all, vec![shallow, deep]);
}
