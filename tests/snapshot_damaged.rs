//! Damaged repositories (issue 14): a damaged manifest never hides or
//! endangers a good snapshot; objects and control files too large to be
//! ours are refused before they are held in memory; a manifest write whose
//! outcome is unknown is read back before anything is deleted; a run that
//! lost its lease stops before it commits.

mod common;
mod repo_backends;

use std::time::Duration;

use common::{
    SpireFixture, assert_one_line_error, file_repo, ok_json, run_json, spirekeep, stderr,
};
use serde_json::Value as Json;
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{ColumnKind, Engine, Value};
use spirekeep::snapshot::backup::{BackupObserver, BackupOptions, Quiet, backup, backup_fenced};
use spirekeep::snapshot::format::{
    ColumnSpec, Header, MAX_ROW_LEN, RowEncoder, encode_trailer, encode_values,
};
use spirekeep::snapshot::listing::summaries;
use spirekeep::snapshot::restore::{RestoreObserver, RestoreOptions, execute_fenced, plan};
use spirekeep::snapshot::{Manifest, TableReader};
use spirekeep::store::keys::{self, SnapshotId};
use spirekeep::store::lock::{LockOptions, RepositoryLock, break_lease};
use spirekeep::store::{MAX_MANIFEST_BYTES, Repository};

fn population(entries: usize) -> Population {
    Population {
        seed: 5,
        ..Population::new(entries)
    }
}

/// Two snapshots of one SQLite datastore (a second apart, so their ids sort
/// by time); returns (older, newer).
async fn two_snapshots(fx: &SpireFixture, repo: &[String]) -> (String, String) {
    let first = ok_json(&["backup", "--datastore", &fx.url()], repo);
    std::thread::sleep(Duration::from_millis(1100));
    let second = ok_json(&["backup", "--datastore", &fx.url()], repo);
    let (a, b) = (
        first["id"].as_str().unwrap().to_string(),
        second["id"].as_str().unwrap().to_string(),
    );
    assert!(a < b);
    (a, b)
}

/// The scenario, exactly: two snapshots, the newest one's manifest
/// damaged. `list` shows both and marks the damaged one, `restore latest`
/// restores the older (restorable) one, `prune --keep-last 1 --dry-run`
/// keeps it, and the manifest error does not repeat itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_newest_manifest_hides_and_endangers_nothing() {
    let fx = SpireFixture::create(Engine::Sqlite, "damaged-newest", &population(10))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let (good, bad) = two_snapshots(&fx, &repo).await;
    let manifest = dir
        .path()
        .join("repo/snapshots")
        .join(&bad)
        .join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();

    // list: every snapshot, the damaged one marked.
    let (code, listed, err) = run_json(&["list"], &repo);
    assert_eq!(code, 0, "{err}");
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], good.as_str());
    assert!(listed[0].get("damaged").is_none(), "{}", listed[0]);
    assert_eq!(listed[1]["id"], bad.as_str());
    assert_eq!(listed[1]["restorable"], false);
    assert!(
        listed[1]["damaged"]
            .as_str()
            .unwrap()
            .contains("manifest.json"),
        "{}",
        listed[1]
    );
    let mut args = vec!["list"];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = common::stdout(&out);
    assert!(text.contains(&good), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&bad) && l.contains("DAMAGED")),
        "{text}"
    );

    // restore latest: the newest restorable snapshot.
    let target = dir.path().join("restored.sqlite3");
    let report = ok_json(
        &["restore", "latest", "--datastore", target.to_str().unwrap()],
        &repo,
    );
    assert_eq!(report["plan"]["snapshot_id"], good.as_str(), "{report}");
    assert_eq!(report["ok"], true);

    // prune --keep-last 1 --dry-run: keeps the only restorable snapshot.
    let (code, plan, err) = run_json(&["prune", "--keep-last", "1", "--dry-run"], &repo);
    assert_eq!(code, 0, "{err}");
    let ids = |list: &Json| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        ids(&plan["plan"]["keep"]).contains(&good),
        "the restorable snapshot is kept: {plan}"
    );
    assert!(ids(&plan["plan"]["delete"]).is_empty(), "{plan}");
    // And a real prune deletes nothing either.
    let (code, _, err) = run_json(&["prune", "--keep-last", "1"], &repo);
    assert_eq!(code, 0, "{err}");
    let (_, listed, _) = run_json(&["list"], &repo);
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // The manifest error says what is wrong once.
    let mut args = vec!["show", bad.as_str()];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_one_line_error(&out, 1, "manifest.json");
    let line = stderr(&out);
    let line = line.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert_eq!(
        line.matches("not a valid spirekeep manifest").count(),
        1,
        "{line}"
    );

    // The metrics report the restorable snapshot as the newest backup.
    let store = Repository::open(
        dir.path().join("repo").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let facts = spirekeep::metrics::repo_facts(&store).await.unwrap();
    assert_eq!(facts.last.unwrap().id.as_str(), good.as_str());

    // With every manifest damaged, `latest` says so.
    let manifest = dir
        .path()
        .join("repo/snapshots")
        .join(&good)
        .join("manifest.json");
    std::fs::write(&manifest, b"{").unwrap();
    let target = dir.path().join("none.sqlite3");
    let mut args = vec!["restore", "latest", "--datastore", target.to_str().unwrap()];
    args.extend(repo.iter().map(String::as_str));
    assert_one_line_error(&spirekeep(&args, &[]), 1, "no restorable snapshot");
    fx.cleanup().await;
}

/// A manifest far larger than any spirekeep writes is refused before it is
/// read into memory; the snapshot is listed as damaged.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_manifest_is_refused_before_it_is_read() {
    let fx = SpireFixture::create(Engine::Sqlite, "oversized", &population(5))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo_args = file_repo(&dir);
    let (_, big) = two_snapshots(&fx, &repo_args).await;
    let path = dir
        .path()
        .join("repo/snapshots")
        .join(&big)
        .join("manifest.json");
    // Valid JSON that only grows: whitespace after the real manifest.
    let mut text = std::fs::read(&path).unwrap();
    text.resize(usize::try_from(MAX_MANIFEST_BYTES).unwrap() + 1, b' ');
    std::fs::write(&path, &text).unwrap();
    let repo = Repository::open(
        dir.path().join("repo").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let id = SnapshotId::parse(&big).unwrap();
    let err = Manifest::load(&repo, &id).await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    let listed = summaries(&repo).await.unwrap();
    assert_eq!(listed.len(), 2);
    let (_, json, _) = run_json(&["list"], &repo_args);
    assert!(
        json[1]["damaged"].as_str().unwrap().contains("larger than"),
        "{json}"
    );
    fx.cleanup().await;
}

// ------------------------------------------------------------ crafted data objects

fn bytes_header() -> Header {
    Header {
        table: "t".into(),
        columns: vec![
            ColumnSpec {
                name: "a".into(),
                kind: ColumnKind::Bytes,
            },
            ColumnSpec {
                name: "b".into(),
                kind: ColumnKind::Bytes,
            },
        ],
    }
}

fn table_of(header: &Header) -> spirekeep::datastore::Table {
    spirekeep::datastore::Table {
        name: header.table.clone(),
        columns: header
            .columns
            .iter()
            .map(|c| spirekeep::datastore::Column {
                name: c.name.clone(),
                declared_type: "blob".into(),
                kind: c.kind,
                nullable: true,
                auto_increment: false,
            })
            .collect(),
        primary_key: Vec::new(),
        indexes: Vec::new(),
        create_sql: None,
    }
}

/// Stores `raw` (an SPKD stream) zstd-compressed and returns the manifest
/// entry for it, with the true sizes and hashes.
async fn store_crafted(
    repo: &Repository,
    raw: &[u8],
    rows: u64,
) -> spirekeep::snapshot::DataObject {
    use sha2::{Digest, Sha256};
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let compressed = zstd::encode_all(raw, 1).unwrap();
    let id = SnapshotId::new(time::OffsetDateTime::now_utc());
    let key = keys::data_object(&id, "t", 0);
    repo.put_create(&key, compressed.clone().into())
        .await
        .unwrap();
    spirekeep::snapshot::DataObject {
        key,
        size: compressed.len() as u64,
        sha256: hex(&Sha256::digest(&compressed)),
        raw_size: raw.len() as u64,
        raw_sha256: hex(&Sha256::digest(raw)),
        rows,
        content_hash: "0".repeat(64),
        encryption: None,
    }
}

/// Regression (issue 14): a small, highly compressed object could make the
/// reader hold 1024 rows of up to 64 MiB each. A row over the per-row limit
/// is refused, naming the object; rows within it come in batches whose size
/// is bounded, not 1024 at a time.
#[tokio::test(flavor = "multi_thread")]
async fn a_highly_compressed_object_is_decoded_within_bounds() {
    let repo = Repository::in_memory();
    let header = bytes_header();
    let table = table_of(&header);

    // One row of two 40 MiB values: over the 64 MiB row limit.
    let mut raw = Vec::new();
    let mut enc = RowEncoder::new(&header, &mut raw).unwrap();
    let half = vec![0u8; 40 << 20];
    let row = vec![Value::Bytes(half.clone()), Value::Bytes(half)];
    assert!(
        enc.encode_row(&mut raw, &row).is_err(),
        "the encoder refuses such a row too"
    );
    raw.push(0x01);
    encode_values(&mut raw, &row);
    encode_trailer(&mut raw, 1);
    assert!(raw.len() > MAX_ROW_LEN);
    let object = store_crafted(&repo, &raw, 1).await;
    assert!(object.size < 4 << 20, "{} bytes stored", object.size);
    let mut reader = TableReader::open(&repo, &table, &object).await.unwrap();
    let err = reader.next_batch().await.unwrap_err().to_string();
    assert!(err.contains("per row"), "{err}");
    assert!(err.contains(&object.key), "{err}");

    // 1024 rows of 64 KiB each (64 MiB decompressed, a few KiB stored).
    let mut raw = Vec::new();
    let mut enc = RowEncoder::new(&header, &mut raw).unwrap();
    let value = vec![7u8; 64 << 10];
    for _ in 0..1024 {
        enc.encode_row(&mut raw, &[Value::Bytes(value.clone()), Value::Null])
            .unwrap();
    }
    encode_trailer(&mut raw, 1024);
    let object = store_crafted(&repo, &raw, 1024).await;
    let mut reader = TableReader::open(&repo, &table, &object).await.unwrap();
    let mut largest = 0;
    let mut rows = 0;
    // The content hash in the crafted entry is wrong: the end of the object fails.
    while let Ok(Some(batch)) = reader.next_batch().await {
        largest = largest.max(batch.len());
        rows += batch.len();
    }
    assert_eq!(rows, 1024);
    // 8 MiB of rows per batch, not 1024 rows whatever their size.
    assert!(largest <= 130, "a batch of {largest} rows of 64 KiB");

    // The manifest's raw size is the object's limit.
    let mut lying = object.clone();
    lying.raw_size = 1 << 20;
    let mut reader = TableReader::open(&repo, &table, &lying).await.unwrap();
    let err = loop {
        match reader.next_batch().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("read past the recorded size"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains("decompresses to more than"), "{err}");
}

// ------------------------------------------------------------ manifest put outcome

/// Regression (issue 14): when the create-only manifest put reported an
/// error although it had succeeded (a 5xx whose retry got 412, a timeout),
/// the backup deleted the data objects of a snapshot whose manifest exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_put_that_failed_after_succeeding_keeps_the_snapshot() {
    let fx = SpireFixture::create(Engine::Sqlite, "put-unknown", &population(10))
        .await
        .unwrap();
    let ds = fx.open().await;
    let (inner, repo) = repo_backends::PutThenFailStore::in_memory("manifest.json");
    let manifest = backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
        .await
        .expect("the manifest is stored, so the backup stands");
    let plain = Repository::from_object_store(inner, "", "memory://").unwrap();
    let stored = Manifest::load(&plain, &manifest.snapshot_id).await.unwrap();
    assert_eq!(stored, manifest);
    for t in &stored.tables {
        for o in &t.objects {
            assert!(
                plain.head(&o.key).await.unwrap().is_some(),
                "{} kept",
                o.key
            );
        }
    }
    // A put that truly failed still cleans up.
    let (inner, repo) = repo_backends::PutThenFailStore::failing("manifest.json");
    let err = backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    let plain = Repository::from_object_store(inner, "", "memory://").unwrap();
    assert!(plain.list("").await.unwrap().is_empty(), "objects removed");
    ds.close().await;
    fx.cleanup().await;
}

// ------------------------------------------------------------ lease lost

/// Breaks the repository lease when the backup starts copying.
struct BreakLeaseAtStart {
    repo: Repository,
    runtime: tokio::runtime::Handle,
}

impl BackupObserver for BreakLeaseAtStart {
    fn started(&self, _id: &SnapshotId, _tables: &[spirekeep::datastore::Table]) {
        let repo = self.repo.clone();
        let handle = self.runtime.clone();
        // The observer is synchronous; break the lease on another thread and wait.
        std::thread::spawn(move || handle.block_on(break_lease(&repo, true)))
            .join()
            .unwrap()
            .unwrap();
    }
}

/// Regression (issue 14): a run whose lease was broken (or taken over)
/// while it worked went on to write its manifest.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_that_lost_its_lease_writes_no_manifest() {
    let fx = SpireFixture::create(Engine::Sqlite, "lease-lost", &population(10))
        .await
        .unwrap();
    let ds = fx.open().await;
    let repo = Repository::in_memory();
    // A long TTL: the background renewal does not run during the backup.
    let mut options = LockOptions::new("backup");
    options.ttl = Duration::from_secs(600);
    let lock = RepositoryLock::acquire(&repo, &options).await.unwrap();
    let observer = BreakLeaseAtStart {
        repo: repo.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let err = backup_fenced(
        ds.as_ref(),
        &repo,
        &BackupOptions::default(),
        &observer,
        &lock,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("lock was lost"), "{err}");
    let keys: Vec<String> = repo
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert!(
        !keys.iter().any(|k| k.ends_with("manifest.json")),
        "no snapshot: {keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains("/data/")),
        "its objects were removed: {keys:?}"
    );
    // The same with a lease that is still ours: the backup goes through.
    let lock = RepositoryLock::acquire(&repo, &options).await.unwrap();
    backup_fenced(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet, &lock)
        .await
        .unwrap();
    lock.release().await.unwrap();
    ds.close().await;
    fx.cleanup().await;
}

/// Breaks the repository lease when the restore starts loading its last table.
struct BreakLeaseWhileLoading {
    repo: Repository,
    runtime: tokio::runtime::Handle,
    table: &'static str,
}

impl RestoreObserver for BreakLeaseWhileLoading {
    fn table_started(&self, table: &str, _rows: u64) {
        if table != self.table {
            return;
        }
        let repo = self.repo.clone();
        let handle = self.runtime.clone();
        std::thread::spawn(move || handle.block_on(break_lease(&repo, true)))
            .join()
            .unwrap()
            .unwrap();
    }
}

async fn rows(ds: &dyn spirekeep::datastore::Datastore) -> u64 {
    ds.count_rows("registered_entries").await.unwrap()
}

/// Regression (issue 14): a restore whose lease was lost while it loaded
/// went on to swap its tables in. It stops before the commit, and the target
/// is as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_that_lost_its_lease_stops_before_the_swap() {
    let src = SpireFixture::create(Engine::Sqlite, "lease-src", &population(20))
        .await
        .unwrap();
    let live = SpireFixture::create(Engine::Sqlite, "lease-live", &population(3))
        .await
        .unwrap();
    let repo = Repository::in_memory();
    let src_ds = src.open().await;
    let manifest = backup(src_ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
        .await
        .unwrap();
    src_ds.close().await;
    let target = live.open().await;
    let before = rows(target.as_ref()).await;
    let options = RestoreOptions {
        replace: true,
        ..RestoreOptions::default()
    };
    let planned = plan(
        &repo,
        &manifest,
        target.as_ref(),
        &options,
        &spirekeep::snapshot::restore::Quiet,
    )
    .await
    .unwrap();
    assert!(planned.can_proceed(), "{:?}", planned.refusals);
    let mut lock_options = LockOptions::new("restore");
    lock_options.ttl = Duration::from_secs(600);
    let lock = RepositoryLock::acquire(&repo, &lock_options).await.unwrap();
    let last = manifest.catalogue.tables.last().unwrap().name.clone();
    let observer = BreakLeaseWhileLoading {
        repo: repo.clone(),
        runtime: tokio::runtime::Handle::current(),
        table: Box::leak(last.into_boxed_str()),
    };
    let err = execute_fenced(
        &repo,
        &manifest,
        target.as_ref(),
        &planned,
        &observer,
        &lock,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("lock was lost"), "{err}");
    assert_eq!(
        rows(target.as_ref()).await,
        before,
        "the target is as it was"
    );
    // With the lease still held the same restore goes through.
    let lock = RepositoryLock::acquire(&repo, &lock_options).await.unwrap();
    let report = execute_fenced(
        &repo,
        &manifest,
        target.as_ref(),
        &planned,
        &spirekeep::snapshot::restore::Quiet,
        &lock,
    )
    .await
    .unwrap();
    assert!(report.ok);
    assert_eq!(
        rows(target.as_ref()).await,
        src.counts.rows("registered_entries")
    );
    lock.release().await.unwrap();
    target.close().await;
    src.cleanup().await;
    live.cleanup().await;
}
