//! Object-store faults: a fault-injecting store (tests/repo_backends/faults.rs)
//! around each real backend (memory, a local directory, and the S3, GCS and
//! Azure emulators when `scripts/test-services.sh` started them), and an S3
//! server killed in the middle of an upload.
//!
//! What must hold: a transient failure is retried with growing waits and the
//! operation succeeds; a persistent one ends in one clear error; a failed
//! upload is aborted; no partial snapshot is ever listed; and a restore never
//! touches its target when an object cannot be read whole.

mod common;
mod repo_backends;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use repo_backends::faults::{Fault, FaultStore, Op, quick_retries};
use repo_backends::{
    azure_settings, azure_store, gcs_settings, gcs_store, noise, s3_settings, s3_store,
};
use sha2::{Digest, Sha256};
use spirekeep::datastore::testkit::{
    Population, TestDatabase, create_spire_datastore, services_required,
};
use spirekeep::datastore::{self, Datastore, Engine, OpenMode, dsn};
use spirekeep::snapshot::backup::{self, BackupOptions};
use spirekeep::snapshot::manifest::list_snapshots;
use spirekeep::snapshot::restore::{self, RestoreOptions};
use spirekeep::store::{Repository, StoreError};

/// A raw store of each kind available here, rooted at a fresh prefix.
fn raw_stores(
    test: &str,
) -> Vec<(
    &'static str,
    Arc<dyn ObjectStore>,
    Option<tempfile::TempDir>,
)> {
    let prefix = format!(
        "spirekeep-tests/faults-{test}-{:08x}",
        rand::random::<u32>()
    );
    let prefixed = |s: Arc<dyn ObjectStore>| -> Arc<dyn ObjectStore> {
        Arc::new(PrefixStore::new(s, prefix.as_str()))
    };
    let dir = tempfile::tempdir().unwrap();
    let local = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let mut out: Vec<(
        &'static str,
        Arc<dyn ObjectStore>,
        Option<tempfile::TempDir>,
    )> = vec![
        ("memory", Arc::new(InMemory::new()), None),
        ("local", Arc::new(local), Some(dir)),
    ];
    if let Some((endpoint, bucket)) = s3_settings() {
        out.push(("s3", prefixed(s3_store(&endpoint, &bucket)), None));
    }
    if let Some((_, bucket, account)) = gcs_settings() {
        out.push(("gcs", prefixed(gcs_store(&bucket, &account)), None));
    }
    if let Some((endpoint, container, account, key)) = azure_settings() {
        out.push((
            "azure",
            prefixed(azure_store(&endpoint, &container, &account, &key)),
            None,
        ));
    }
    out
}

async fn cleanup(repo: &Repository) {
    for m in repo.list("").await.unwrap() {
        repo.delete(&m.key).await.unwrap();
    }
}

/// The waits between consecutive tries of `op` (the retry schedule as the store saw it).
fn gaps(faults: &FaultStore, op: Op) -> Vec<Duration> {
    let events = faults.events(op);
    events.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_with_growing_waits_and_succeed() {
    for (name, raw, _dir) in raw_stores("transient") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        for op in [Op::Put, Op::Get, Op::Head, Op::List, Op::Delete] {
            faults.inject(op, 1..=2, Fault::Error);
        }
        let data = Bytes::from(noise(200_000, 1));
        repo.put_create("snapshots/s/manifest.json", data.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: put: {e}"));
        assert_eq!(
            faults.count(Op::Put),
            3,
            "{name}: two failures, then success"
        );
        let waits = gaps(&faults, Op::Put);
        assert!(
            waits[0] >= Duration::from_millis(20) && waits[1] >= Duration::from_millis(40),
            "{name}: waits {waits:?} do not follow the 20 ms, 40 ms backoff"
        );
        assert_eq!(
            repo.get("snapshots/s/manifest.json").await.unwrap(),
            data,
            "{name}"
        );
        assert_eq!(faults.count(Op::Get), 3, "{name}");
        let meta = repo.head("snapshots/s/manifest.json").await.unwrap();
        assert_eq!(meta.map(|m| m.size), Some(200_000), "{name}");
        assert_eq!(faults.count(Op::Head), 3, "{name}");
        let keys: Vec<String> = repo
            .list("snapshots/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["snapshots/s/manifest.json"], "{name}");
        assert_eq!(faults.count(Op::List), 3, "{name}");
        repo.delete("snapshots/s/manifest.json").await.unwrap();
        assert_eq!(faults.count(Op::Delete), 3, "{name}");
        assert!(
            plain
                .head("snapshots/s/manifest.json")
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
        cleanup(&plain).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_whose_answer_was_lost_is_not_reported_as_a_conflict() {
    for (name, raw, _dir) in raw_stores("lost-answer") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        // The first put reaches the store, but its answer is lost; the retry
        // then finds the object: ours, so the write succeeded.
        faults.inject(Op::Put, 1..=1, Fault::LoseAnswer);
        let version = repo
            .put_create("snapshots/s/manifest.json", Bytes::from_static(b"ours"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(faults.count(Op::Put), 2, "{name}");
        let meta = repo
            .head("snapshots/s/manifest.json")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(version.e_tag, meta.e_tag, "{name}");
        // Someone else's object at the key is still a conflict.
        faults.inject(Op::Put, 3..=3, Fault::LoseAnswer);
        let err = repo
            .put_create("snapshots/s/manifest.json", Bytes::from_static(b"theirs"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::AlreadyExists { .. }),
            "{name}: {err}"
        );
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        cleanup(&plain).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_hangs_times_out_and_is_retried() {
    for (name, raw, _dir) in raw_stores("hang") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        repo.put_create("a", Bytes::from_static(b"x"))
            .await
            .unwrap();
        // The next GET and the next HEAD hang (counted from now: a backend
        // may have read or checked the object while creating it).
        let (gets, heads) = (faults.count(Op::Get), faults.count(Op::Head));
        faults.inject(Op::Get, gets + 1..=gets + 1, Fault::Hang);
        faults.inject(Op::Head, heads + 1..=heads + 1, Fault::Hang);
        let started = Instant::now();
        assert_eq!(
            repo.get("a").await.unwrap(),
            Bytes::from_static(b"x"),
            "{name}"
        );
        assert!(repo.head("a").await.unwrap().is_some(), "{name}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_secs(20),
            "{name}: two 500 ms timeouts, then answers; took {took:?}"
        );
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        cleanup(&plain).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_that_breaks_off_resumes_where_it_stopped() {
    for (name, raw, _dir) in raw_stores("resume") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        let data = noise(700_000, 9);
        repo.put_create("data/t.0.spkd.zst", Bytes::from(data.clone()))
            .await
            .unwrap();
        // Broken off with an error twice, then cut short without one.
        faults.inject(Op::Get, 1..=2, Fault::CutAfter(150_000));
        faults.inject(Op::Get, 3..=3, Fault::EndAfter(100_000));
        let chunks: Vec<Bytes> = repo
            .get_stream("data/t.0.spkd.zst")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let back = chunks.concat();
        assert_eq!(back.len(), data.len(), "{name}");
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&data),
            "{name}: content differs"
        );
        assert_eq!(
            faults.count(Op::Get),
            4,
            "{name}: one read and three resumptions"
        );

        // A whole-object read that ends short is read again too.
        faults.inject(Op::Get, 5..=5, Fault::EndAfter(10));
        assert_eq!(
            repo.get("data/t.0.spkd.zst").await.unwrap().len(),
            data.len(),
            "{name}"
        );
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        cleanup(&plain).await;
    }
}

/// One `error` line's worth: no line breaks, names the key, says how often it was tried.
fn assert_clear(err: &StoreError, key: &str, tries: u32) {
    let text = err.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains(key), "names the object: {text}");
    assert!(
        text.contains(&format!("tried {tries} times")),
        "says it retried: {text}"
    );
    assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_failure_ends_in_one_clear_error() {
    for (name, raw, _dir) in raw_stores("persistent") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        faults.always(Op::Put, Fault::Error);
        let err = repo
            .put_create("snapshots/s/manifest.json", Bytes::from_static(b"m"))
            .await
            .unwrap_err();
        assert_clear(&err, "snapshots/s/manifest.json", 4);
        assert_eq!(faults.count(Op::Put), 4, "{name}");
        faults.heal();

        repo.put_create("obj", Bytes::from(noise(100_000, 2)))
            .await
            .unwrap();
        faults.always(Op::Get, Fault::CutAfter(1_000));
        let result: Result<Vec<Bytes>, StoreError> =
            repo.get_stream("obj").await.unwrap().try_collect().await;
        assert_clear(&result.unwrap_err(), "obj", 4);
        let err = repo.get("obj").await.unwrap_err();
        assert_clear(&err, "obj", 4);
        faults.heal();
        // A missing object is not retried: it will not appear by waiting.
        let before = faults.count(Op::Get);
        assert!(matches!(
            repo.get("nothing").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(faults.count(Op::Get), before + 1, "{name}");
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        cleanup(&plain).await;
    }
}

/// A generated SPIRE datastore in SQLite plus a `bulk` table of 12 MiB of
/// random bytes, so its data object is a multipart upload of three parts.
async fn sqlite_with_bulk(
    dir: &tempfile::TempDir,
    name: &str,
    entries: usize,
) -> Box<dyn Datastore> {
    let path = dir.path().join(name);
    let spec = dsn::parse(path.to_str().unwrap(), Some(Engine::Sqlite), dir.path()).unwrap();
    let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
    create_spire_datastore(ds.as_ref(), &Population::new(entries))
        .await
        .unwrap();
    ds.execute_script(
        "CREATE TABLE bulk (id INTEGER PRIMARY KEY, b BLOB);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 12288)
         INSERT INTO bulk SELECT x, randomblob(1024) FROM c;",
    )
    .await
    .unwrap();
    ds
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_backup_aborts_its_upload_and_lists_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ds = sqlite_with_bulk(&dir, "source.sqlite3", 20).await;
    a_failed_backup_leaves_nothing(ds.as_ref(), "failed-backup").await;
    ds.close().await;
}

/// The same on PostgreSQL, whose backups copy two tables at once: the lane
/// whose upload fails stops the other, and nothing of either is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_lane_stops_the_other_and_leaves_nothing() {
    let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "failed_lane")
        .await
        .unwrap()
    else {
        return;
    };
    let ds = db.open().await.unwrap();
    create_spire_datastore(ds.as_ref(), &Population::new(20))
        .await
        .unwrap();
    // 12 MiB of random bytes: a data object of three multipart parts.
    ds.execute_script(
        "CREATE TABLE bulk (id integer PRIMARY KEY, b bytea);
         INSERT INTO bulk SELECT g, (SELECT decode(string_agg(md5(random()::text || g || i), ''), 'hex')
                                       FROM generate_series(1, 64) i)
           FROM generate_series(1, 12288) g;",
    )
    .await
    .unwrap();
    a_failed_backup_leaves_nothing(ds.as_ref(), "failed-lane").await;
    ds.close().await;
    db.cleanup().await.unwrap();
}

/// A backup of `ds` (which has a `bulk` table of three upload parts) whose
/// second part fails: one clear error, the upload aborted, nothing listed and
/// nothing left; the next backup is whole.
async fn a_failed_backup_leaves_nothing(ds: &dyn Datastore, test: &str) {
    for (name, raw, _dir) in raw_stores(test) {
        if name == "local" {
            continue; // no multipart uploads to abort on a local directory
        }
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        let plain = Repository::from_object_store(raw.clone(), "", "plain").unwrap();
        faults.inject(Op::Part, 2..=usize::MAX, Fault::Error);
        let err = backup::backup(ds, &repo, &BackupOptions::default(), &backup::Quiet)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains('\n') && text.contains("bulk"),
            "{name}: {text}"
        );
        assert!(text.contains("injected failure"), "{name}: {text}");
        assert!(
            faults.count(Op::Abort) >= 1,
            "{name}: the multipart upload was not aborted"
        );
        assert!(
            list_snapshots(&repo).await.unwrap().is_empty(),
            "{name}: a partial snapshot is listed"
        );
        assert!(
            plain.list("").await.unwrap().is_empty(),
            "{name}: objects left behind: {:?}",
            plain.list("").await.unwrap()
        );
        if name == "s3" {
            let (endpoint, bucket) = s3_settings().unwrap();
            assert_eq!(
                open_multipart_uploads(
                    &endpoint,
                    &bucket,
                    &format!("spirekeep-tests/faults-{test}")
                )
                .await,
                0
            );
        }
        // The store recovers: the next backup is whole and the only snapshot.
        faults.heal();
        let manifest = backup::backup(ds, &repo, &BackupOptions::default(), &backup::Quiet)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            list_snapshots(&repo).await.unwrap(),
            std::slice::from_ref(&manifest.snapshot_id),
            "{name}"
        );
        cleanup(&plain).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_writes_and_flaky_reads_still_give_a_whole_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ds = sqlite_with_bulk(&dir, "source.sqlite3", 50).await;
    for (name, raw, _dir) in raw_stores("slow") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        faults.always(Op::Part, Fault::Delay(Duration::from_millis(300)));
        faults.always(Op::Put, Fault::Delay(Duration::from_millis(50)));
        let manifest = backup::backup(
            ds.as_ref(),
            &repo,
            &BackupOptions::default(),
            &backup::Quiet,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        faults.heal();
        // Each object's first read breaks off part-way: verify reads it whole all the same.
        for data in &manifest.tables {
            let table = manifest.catalogue.table(&data.name).unwrap();
            for object in &data.objects {
                let next = faults.count(Op::Get) + 1;
                faults.inject(Op::Get, next..=next, Fault::CutAfter(64 * 1024));
                let rows = spirekeep::snapshot::codec::check_object(&repo, table, object)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {}: {e}", object.key));
                assert_eq!(rows, object.rows, "{name}");
            }
        }
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        cleanup(&plain).await;
    }
    ds.close().await;
}

fn file_sha(path: &std::path::Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_never_touches_the_target_when_an_object_cannot_be_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let source = sqlite_with_bulk(&dir, "source.sqlite3", 30).await;
    let target_path = dir.path().join("target.sqlite3");
    let spec = dsn::parse(
        target_path.to_str().unwrap(),
        Some(Engine::Sqlite),
        dir.path(),
    )
    .unwrap();
    {
        let t = datastore::open(&spec, OpenMode::Create).await.unwrap();
        create_spire_datastore(
            t.as_ref(),
            &Population {
                seed: 77,
                ..Population::new(7)
            },
        )
        .await
        .unwrap();
        t.close().await;
    }
    for (name, raw, _dir) in raw_stores("restore") {
        let faults = FaultStore::new(raw.clone());
        let repo = faults.repo(quick_retries());
        let manifest = backup::backup(
            source.as_ref(),
            &repo,
            &BackupOptions::default(),
            &backup::Quiet,
        )
        .await
        .unwrap();
        let before = file_sha(&target_path);
        let options = RestoreOptions {
            replace: true,
            ..RestoreOptions::default()
        };
        for fault in [Fault::EndAfter(4096), Fault::CutAfter(4096), Fault::Error] {
            faults.heal();
            faults.always(Op::Get, fault.clone());
            let target = datastore::open(&spec, OpenMode::ReadWrite).await.unwrap();
            let result =
                restore::restore(&repo, &manifest, target.as_ref(), &options, &restore::Quiet)
                    .await;
            target.close().await;
            let err = result
                .err()
                .unwrap_or_else(|| panic!("{name}: {fault:?}: the restore went ahead"));
            assert!(!err.to_string().contains('\n'), "{name}: {err}");
            assert_eq!(
                file_sha(&target_path),
                before,
                "{name}: {fault:?}: the target was changed"
            );
        }
        // Transient breaks are resumed: the same restore then goes through.
        faults.heal();
        faults.inject(Op::Get, 1..=3, Fault::CutAfter(4096));
        let target = datastore::open(&spec, OpenMode::ReadWrite).await.unwrap();
        let report = restore::restore(&repo, &manifest, target.as_ref(), &options, &restore::Quiet)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.ok, "{name}");
        assert_eq!(target.count_rows("bulk").await.unwrap(), 12_288, "{name}");
        target.close().await;
        // Put the old target back for the next backend.
        std::fs::remove_file(&target_path).unwrap();
        let t = datastore::open(&spec, OpenMode::Create).await.unwrap();
        create_spire_datastore(
            t.as_ref(),
            &Population {
                seed: 77,
                ..Population::new(7)
            },
        )
        .await
        .unwrap();
        t.close().await;
        let plain = Repository::from_object_store(raw, "", "plain").unwrap();
        cleanup(&plain).await;
    }
    source.close().await;
}

/// Multipart uploads still open under `prefix` (ListMultipartUploads; moto
/// does not check signatures).
async fn open_multipart_uploads(endpoint: &str, bucket: &str, prefix: &str) -> usize {
    let url = format!("{endpoint}/{bucket}?uploads&prefix={prefix}");
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    body.matches("<UploadId>").count()
}

/// A moto server of this test's own, on a free port, killed on drop.
struct PrivateMoto {
    child: Child,
    port: u16,
}

impl PrivateMoto {
    async fn start(bin: &str, port: u16) -> Self {
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Self { child, port };
        let url = moto.endpoint();
        for _ in 0..120 {
            if reqwest::get(&url).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let client = reqwest::Client::new();
        let created = client
            .put(format!("{url}/bucket"))
            .send()
            .await
            .expect("moto answers");
        assert!(
            created.status().is_success(),
            "create bucket: {}",
            created.status()
        );
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for PrivateMoto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn moto_bin() -> Option<String> {
    let bin = std::env::var("SPIREKEEP_TEST_MOTO_BIN")
        .ok()
        .filter(|b| !b.is_empty());
    if bin.is_none() {
        assert!(
            !services_required(),
            "SPIREKEEP_TEST_MOTO_BIN is not set (source scripts/test-services.sh)"
        );
    }
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An S3 client with few, quick HTTP retries, so a dead server is noticed in seconds.
fn impatient_s3(endpoint: &str) -> Arc<dyn ObjectStore> {
    let retry = object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(5),
    };
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name("bucket")
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_retry(retry)
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(Duration::from_secs(5))
                    .with_allow_http(true),
            )
            .build()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_s3_server_killed_mid_upload() {
    let Some(bin) = moto_bin() else {
        eprintln!("skipped: SPIREKEEP_TEST_MOTO_BIN is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds: Arc<dyn Datastore> = Arc::from(sqlite_with_bulk(&dir, "source.sqlite3", 20).await);
    let port = free_port();
    let mut moto = PrivateMoto::start(&bin, port).await;
    let faults = FaultStore::new(impatient_s3(&moto.endpoint()));
    // Slow parts, so the upload is surely in flight when the server dies.
    faults.always(Op::Part, Fault::Delay(Duration::from_millis(400)));
    let repo = faults.repo(quick_retries());
    let mut running = {
        let (ds, repo) = (ds.clone(), repo.clone());
        tokio::spawn(async move {
            backup::backup(
                ds.as_ref(),
                &repo,
                &BackupOptions::default(),
                &backup::Quiet,
            )
            .await
        })
    };
    tokio::select! {
        () = faults.part_started() => {}
        ended = &mut running => panic!("the backup ended before its first part: {:?}", ended.unwrap().err()),
        () = tokio::time::sleep(Duration::from_secs(120)) => panic!("the backup never started a multipart upload"),
    }
    moto.kill();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(180), running)
        .await
        .expect("the backup hung after the server died")
        .unwrap();
    let err = result.expect_err("a backup into a dead server cannot succeed");
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("bulk"),
        "names the object being written: {text}"
    );
    eprintln!(
        "backup failed {:?} after the kill: {text}",
        started.elapsed()
    );

    // The server comes back (empty: moto keeps everything in memory).
    let moto = PrivateMoto::start(&bin, port).await;
    faults.heal();
    assert!(list_snapshots(&repo).await.unwrap().is_empty());
    let manifest = backup::backup(
        ds.as_ref(),
        &repo,
        &BackupOptions::default(),
        &backup::Quiet,
    )
    .await
    .unwrap();
    assert_eq!(list_snapshots(&repo).await.unwrap(), [manifest.snapshot_id]);
    assert_eq!(
        open_multipart_uploads(&moto.endpoint(), "bucket", "").await,
        0
    );
    drop(moto);
    ds.close().await;
}

/// Through the CLI: a repository whose S3 server is not there fails `backup`
/// with exactly one error line, promptly, and no panic.
#[test]
fn backup_to_a_dead_s3_endpoint_prints_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spire.sqlite3");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spec = dsn::parse(path.to_str().unwrap(), Some(Engine::Sqlite), dir.path()).unwrap();
        let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
        create_spire_datastore(ds.as_ref(), &Population::new(5))
            .await
            .unwrap();
        ds.close().await;
    });
    let port = free_port(); // nothing listens there now
    let started = Instant::now();
    let out = common::spirekeep(
        &[
            "backup",
            "--datastore",
            path.to_str().unwrap(),
            "--repo",
            "s3://bucket/p",
            "--s3-endpoint",
            &format!("http://127.0.0.1:{port}"),
            "--s3-allow-http",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    common::assert_one_line_error(&out, 5, "tried 4 times");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?} to give up",
        started.elapsed()
    );
}

/// Regression: a failed part used to leave the abort to a task spawned on
/// drop, which a process about to exit never ran. The abort now happens
/// before the error is returned (a current-thread runtime, so a spawned task
/// could not have run yet).
#[tokio::test]
async fn a_failed_part_is_aborted_before_the_error_is_returned() {
    let faults = FaultStore::new(Arc::new(InMemory::new()));
    faults.inject(Op::Part, 2..=usize::MAX, Fault::Error);
    let repo = faults.repo(quick_retries());
    let mut upload = repo.upload("data/t.0.spkd.zst").unwrap();
    let piece = Bytes::from(noise(1024 * 1024, 4));
    let mut failed = None;
    for _ in 0..64 {
        if let Err(e) = upload.write(piece.clone()).await {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("the failing part surfaces as a write error");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(
        faults.count(Op::Abort),
        1,
        "aborted before the error was returned"
    );
    drop(upload);
}

/// Regression (CI, `agent_sigterm_lets_the_running_backup_finish`): a first
/// SIGTERM that reached the agent while its lease was being written dropped
/// the lock request half way, so the job that had the lock never ran (and a
/// lease could be left that nobody released). A signal now only ends a
/// *wait* for the lock: here the lease write is slow, the signal arrives
/// during it, and the backup still runs to its end and releases the lease.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_signal_during_the_lease_write_lets_the_backup_run() {
    use spirekeep::agent::{Agent, AgentConfig, Schedule};
    use spirekeep::config::{DatastoreSource, resolve_datastore};
    use spirekeep::snapshot::CodecOptions;
    use spirekeep::store::lock::{LeaseState, inspect};

    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.sqlite3");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/spire-datastore.sqlite3"
        ),
        &ds,
    )
    .unwrap();
    let datastore = resolve_datastore(
        &DatastoreSource::Connection {
            value: ds.display().to_string(),
            database_type: None,
        },
        None,
    )
    .unwrap();
    let faults = FaultStore::new(Arc::new(InMemory::new()));
    // The first put is the lease's create-only put (slow, under the 500 ms
    // attempt timeout of quick_retries).
    faults.inject(Op::Put, 1..=1, Fault::Delay(Duration::from_millis(400)));
    let repo = faults.repo(quick_retries());
    let agent = Agent::new(AgentConfig {
        datastore,
        repo: repo.clone(),
        schedule: Schedule::parse("* * * * * *").unwrap(),
        verify_schedule: None,
        deep_verify: false,
        retention: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        lock_ttl: Duration::from_secs(10),
        lock_wait: Duration::from_secs(5),
        labels: Vec::new(),
        codec: CodecOptions::default(),
        refresh_every: Duration::from_secs(60),
    });
    let (signals, listening) = tokio::sync::watch::channel(0u32);
    let running = tokio::spawn(async move { agent.run(listening).await });
    let started = Instant::now();
    while faults.count(Op::Put) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no backup started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_put = &faults.events(Op::Put)[0];
    assert!(first_put.path.contains("lock"), "{}", first_put.path);
    signals.send(1).unwrap();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the agent stops after the running job")
        .unwrap()
        .unwrap();

    let snapshots = list_snapshots(&repo).await.unwrap();
    assert_eq!(snapshots.len(), 1, "the backup that held the lock ran");
    let lease = inspect(&repo).await.unwrap().expect("a lease record");
    assert_eq!(lease.state, LeaseState::Released, "and released the lease");
}
