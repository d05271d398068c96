//! `spirekeep backup`, `list` and `show` on every engine, into file:// and S3
//! repositories: what the manifest records, consistency under concurrent
//! writes, a killed backup, secrets, and bad input.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{SpireFixture, assert_one_line_error, spirekeep, stderr, stdout, test_password};
use serde_json::Value as Json;
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{self, Engine, OpenMode, dsn};
use spirekeep::snapshot::backup::{BackupOptions, Quiet, backup};
use spirekeep::snapshot::{ContentHasher, Manifest, TableReader};
use spirekeep::store::{RepoOptions, Repository};
use sqlx::AssertSqlSafe;

const ENGINES: [Engine; 3] = [Engine::Sqlite, Engine::Postgres, Engine::Mysql];

fn population(entries: usize) -> Population {
    Population {
        seed: 7,
        ..Population::new(entries)
    }
}

/// `--repo` values to test: a local directory and, when configured, the S3 test server.
fn repositories(dir: &tempfile::TempDir, test: &str) -> Vec<(String, Vec<String>)> {
    let mut out = vec![(
        format!("file://{}", dir.path().join("repo").display()),
        vec![],
    )];
    if let Ok(endpoint) = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT") {
        let bucket =
            std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
        let n: u32 = rand::random();
        out.push((
            format!("s3://{bucket}/spirekeep-tests/{test}-{n:08x}"),
            vec!["--s3-endpoint".into(), endpoint],
        ));
    } else {
        assert!(
            !datastore::testkit::services_required(),
            "SPIREKEEP_TEST_S3_ENDPOINT is not set"
        );
    }
    out
}

fn run_json(args: &[&str]) -> Json {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = spirekeep(&all, &[]);
    assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&out)))
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_on_every_engine_are_listed_and_shown() {
    let pop = population(40);
    for engine in ENGINES {
        let Some(fx) = SpireFixture::create(engine, "backup", &pop).await else {
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        let url = fx.url();
        for (repo, extra) in repositories(&dir, "backup") {
            let mut args = vec![
                "backup",
                "--datastore",
                &url,
                "--repo",
                &repo,
                "--label",
                "pre-upgrade",
            ];
            args.extend(extra.iter().map(String::as_str));
            let summary = run_json(&args);
            assert_eq!(summary["engine"], engine.to_string());
            assert_eq!(summary["rows"], fx.counts.total(), "{engine} {repo}");
            assert_eq!(summary["schema_version"], i64::from(pop.schema));
            assert_eq!(summary["code_version"], pop.code_version.as_str());
            assert_eq!(summary["labels"], serde_json::json!(["pre-upgrade"]));
            let id = summary["id"].as_str().unwrap().to_string();

            let mut list_args = vec!["list", "--repo", &repo];
            list_args.extend(extra.iter().map(String::as_str));
            let list = run_json(&list_args);
            assert_eq!(list.as_array().unwrap().len(), 1);
            assert_eq!(list[0]["id"], id.as_str());
            assert_eq!(list[0]["last_verification"], Json::Null);

            let mut show_args = vec!["show", "latest", "--repo", &repo];
            show_args.extend(extra.iter().map(String::as_str));
            let shown = run_json(&show_args);
            let manifest = &shown["manifest"];
            assert_eq!(manifest["snapshot_id"], id.as_str());
            assert!(
                !manifest["source"]
                    .as_str()
                    .unwrap()
                    .contains(&test_password())
                    || engine == Engine::Sqlite
            );
            for t in manifest["tables"].as_array().unwrap() {
                let name = t["name"].as_str().unwrap();
                assert_eq!(t["rows"], fx.counts.rows(name), "{engine}: rows of {name}");
                assert!(!t["objects"].as_array().unwrap().is_empty());
            }
            assert_eq!(
                manifest["catalogue"]["tables"].as_array().unwrap().len(),
                13,
                "the live catalogue is recorded"
            );
            // Text output too.
            let mut text_args = vec!["show", &id, "--repo", &repo];
            text_args.extend(extra.iter().map(String::as_str));
            let out = spirekeep(&text_args, &[]);
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(stdout(&out).contains("registered_entries"));
        }
        fx.cleanup().await;
    }
}

/// Reads back every row of every table of a stored snapshot and checks the
/// manifest's content hashes (the reader itself checks every byte hash).
async fn read_back(repo: &Repository, manifest: &Manifest) {
    for table in &manifest.tables {
        let mut hasher = ContentHasher::new();
        let mut rows = 0u64;
        let schema = manifest.catalogue.table(&table.name).unwrap();
        for object in &table.objects {
            let mut reader = TableReader::open(repo, schema, object).await.unwrap();
            while let Some(row) = reader.next_row().await.unwrap() {
                hasher.add_row(&row);
                rows += 1;
            }
        }
        assert_eq!(rows, table.rows, "{}", table.name);
        assert_eq!(Some(hasher.current()), table.content(), "{}", table.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_tables_are_split_into_parts_that_read_back() {
    let fx = SpireFixture::create(Engine::Sqlite, "parts", &population(300))
        .await
        .unwrap();
    let ds = fx.open().await;
    let repo = Repository::in_memory();
    let options = BackupOptions {
        part_raw_bytes: 4096,
        ..BackupOptions::default()
    };
    let manifest = backup(ds.as_ref(), &repo, &options, &Quiet).await.unwrap();
    ds.close().await;
    let selectors = manifest.table("selectors").unwrap();
    assert!(
        selectors.objects.len() > 3,
        "selectors in {} parts",
        selectors.objects.len()
    );
    assert_eq!(selectors.rows, fx.counts.rows("selectors"));
    assert!(
        selectors.objects.iter().all(|o| o.rows > 0),
        "no empty trailing part"
    );
    read_back(&repo, &manifest).await;
    let loaded = Manifest::load(&repo, &manifest.snapshot_id).await.unwrap();
    assert_eq!(loaded, manifest, "the stored manifest is the returned one");
}

/// Inserts one bundle and one join token per transaction until stopped.
async fn write_pairs(url: String, engine: Engine, stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    let statements = |n: u64| {
        [
            format!("INSERT INTO bundles (trust_domain) VALUES ('spiffe://writer-{n}.test')"),
            format!("INSERT INTO join_tokens (token, expiry) VALUES ('writer-token-{n}', 0)"),
        ]
    };
    macro_rules! loop_on {
        ($conn:expr) => {{
            let mut conn = $conn;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
                for sql in statements(n) {
                    sqlx::query(AssertSqlSafe(sql))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                n += 1;
                written.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }};
    }
    match engine {
        Engine::Postgres => loop_on!(
            <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap()
        ),
        Engine::Mysql => loop_on!(
            <sqlx::MySqlConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap()
        ),
        Engine::Sqlite => {
            let url = format!("sqlite://{url}?mode=rw");
            loop_on!(
                <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap()
            )
        }
    }
}

/// SPIRE's SQLite datastores run in WAL mode, where readers and a writer
/// coexist (a rollback journal would keep the writer out while a backup reads).
async fn wal_mode(fx: &SpireFixture, engine: Engine) {
    if engine != Engine::Sqlite {
        return;
    }
    let url = format!("sqlite://{}?mode=rw", fx.url());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("PRAGMA journal_mode=WAL")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_is_one_consistent_read_under_concurrent_writes() {
    let pop = population(6000);
    for engine in ENGINES {
        let Some(fx) = SpireFixture::create(engine, "consistent", &pop).await else {
            continue;
        };
        wal_mode(&fx, engine).await;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_pairs(fx.url(), engine, stop.clone(), written.clone()));
        while written.load(Ordering::SeqCst) < 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let spec = dsn::parse(&fx.url(), Some(engine), std::path::Path::new(".")).unwrap();
        let ds = datastore::open(&spec, OpenMode::ReadOnly).await.unwrap();
        let repo = Repository::in_memory();
        let before = written.load(Ordering::SeqCst);
        let manifest = backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
            .await
            .unwrap();
        let after = written.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        writer.await.unwrap();
        ds.close().await;
        assert!(
            after > before,
            "{engine}: the writer made progress during the backup ({before} → {after})"
        );
        let bundles = manifest.table("bundles").unwrap().rows - fx.counts.rows("bundles");
        let tokens = manifest.table("join_tokens").unwrap().rows - fx.counts.rows("join_tokens");
        assert_eq!(
            bundles, tokens,
            "{engine}: bundles and join tokens written in one transaction are both in the snapshot or both not"
        );
        assert!(
            bundles >= before && bundles <= after,
            "{engine}: {bundles} pairs, writer at {before}..{after}"
        );
        read_back(&repo, &manifest).await;
        fx.cleanup().await;
    }
}

/// Counts `table`'s rows as `read` streams them.
async fn streamed_rows(read: &mut dyn datastore::SnapshotRead, table: &datastore::Table) -> u64 {
    let (tx, mut rx) = datastore::row_channel(4);
    let send = async move {
        let sent = read.stream_rows(table, &tx).await;
        drop(tx); // ends the count
        sent
    };
    let count = async {
        let mut received = 0u64;
        while let Some(batch) = rx.recv().await {
            received += batch.len() as u64;
        }
        received
    };
    let (sent, received) = tokio::join!(send, count);
    assert_eq!(sent.unwrap(), received);
    received
}

/// A backup streams two tables at once where the engine can share its
/// snapshot with a second connection: that reader must see exactly the first
/// reader's data, not what was committed after it began.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_reader_sees_the_snapshot_of_the_first() {
    for engine in ENGINES {
        let Some(fx) = SpireFixture::create(engine, "second-reader", &population(40)).await else {
            continue;
        };
        wal_mode(&fx, engine).await;
        let spec = dsn::parse(&fx.url(), Some(engine), std::path::Path::new(".")).unwrap();
        let ds = datastore::open(&spec, OpenMode::ReadOnly).await.unwrap();
        let mut read = ds.begin_snapshot().await.unwrap();
        let catalogue = read.catalogue().await.unwrap();
        let tokens = catalogue.table("join_tokens").unwrap();
        // Committed after the snapshot began: in neither reader's view.
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_pairs(fx.url(), engine, stop.clone(), written.clone()));
        while written.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = read.second_reader().await.unwrap();
        stop.store(true, Ordering::SeqCst);
        writer.await.unwrap();
        assert_eq!(
            second.is_some(),
            engine == Engine::Postgres,
            "{engine}: a second reader where the engine exports its snapshot"
        );
        let sizes = read.size_estimates().await.unwrap();
        if engine == Engine::Postgres {
            assert!(
                sizes["selectors"] > sizes["migrations"],
                "{engine}: sizes {sizes:?}"
            );
        }
        let expected = fx.counts.rows("join_tokens");
        if let Some(mut second) = second {
            assert_eq!(
                streamed_rows(second.as_mut(), tokens).await,
                expected,
                "{engine}: second reader"
            );
            second.finish().await.unwrap();
        }
        assert_eq!(
            streamed_rows(read.as_mut(), tokens).await,
            expected,
            "{engine}: first reader"
        );
        read.finish().await.unwrap();
        ds.close().await;
        fx.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backup_leaves_no_snapshot_and_the_next_one_works() {
    let engine = if datastore::testkit::services_required()
        || std::env::var("SPIREKEEP_TEST_PG_URL").is_ok()
    {
        Engine::Postgres
    } else {
        Engine::Sqlite
    };
    let Some(fx) = SpireFixture::create(engine, "killed", &population(20_000)).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spirekeep"))
        // A short lease: the killed run's repository lock expires quickly for the next one.
        .args([
            "backup",
            "--datastore",
            &fx.url(),
            "--repo",
            &repo,
            "--lock-ttl",
            "3s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once data is flowing into the repository.
    let data_dir_has_files = || {
        walk(&repo_dir)
            .iter()
            .any(|p| p.to_string_lossy().contains("/data/"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !data_dir_has_files() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let list = run_json(&["list", "--repo", &repo]);
    if status.success() {
        eprintln!("the backup finished before it could be killed; nothing to check");
    } else {
        assert_eq!(list, serde_json::json!([]), "no manifest, no snapshot");
        assert!(!walk(&repo_dir).iter().any(|p| p.ends_with("manifest.json")));
    }
    let summary = run_json(&["backup", "--datastore", &fx.url(), "--repo", &repo]);
    assert_eq!(summary["rows"], fx.counts.total());
    fx.cleanup().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_manifest_or_the_output() {
    let Some(fx) = SpireFixture::create(Engine::Postgres, "secret", &population(5)).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let url = fx.url();
    assert!(
        url.contains(&test_password()),
        "the test URL carries the password"
    );
    let out = spirekeep(
        &["-vv", "backup", "--datastore", &url, "--repo", &repo],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(&test_password()) && !stderr(&out).contains(&test_password()));
    for file in walk(&repo_dir) {
        let bytes = std::fs::read(&file).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&test_password()),
            "{} holds the password",
            file.display()
        );
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_one_line_and_a_documented_exit_code() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spire-datastore.sqlite3"
    );
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").display().to_string();

    let out = spirekeep(&["backup", "--datastore", example], &[]);
    assert_one_line_error(&out, 2, "no repository given");
    let out = spirekeep(
        &[
            "backup",
            "--datastore",
            example,
            "--repo",
            &repo,
            "--label",
            "no spaces",
        ],
        &[],
    );
    assert_one_line_error(&out, 2, "invalid label");
    let out = spirekeep(
        &["backup", "--datastore", example, "--repo", "ftp://host/x"],
        &[],
    );
    assert_one_line_error(&out, 2, "invalid repository location");
    let out = spirekeep(&["show", "latest", "--repo", &repo], &[]);
    assert_one_line_error(&out, 2, "holds no snapshots yet");
    let out = spirekeep(&["show", "not-an-id", "--repo", &repo], &[]);
    assert_one_line_error(&out, 2, "snapshot id");
    let out = spirekeep(&["show", "20260101T000000Z-abcdef", "--repo", &repo], &[]);
    assert_one_line_error(&out, 2, "does not exist");

    let not_spire = dir.path().join("other.sqlite3");
    let url = format!("sqlite://{}?mode=rwc", not_spire.display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (id integer primary key)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let out = spirekeep(
        &[
            "backup",
            "--datastore",
            not_spire.to_str().unwrap(),
            "--repo",
            &repo,
        ],
        &[],
    );
    assert_one_line_error(&out, 2, "is not a SPIRE datastore");
    let list = run_json(&["list", "--repo", &repo]);
    assert_eq!(
        list,
        serde_json::json!([]),
        "nothing was written for a refused backup"
    );
    assert!(
        walk(&dir.path().join("repo")).is_empty(),
        "no objects left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_repository_with_environment_credentials() {
    let Some(endpoint) = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT").ok() else {
        return;
    };
    let bucket =
        std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spire-datastore.sqlite3"
    );
    let n: u32 = rand::random();
    let repo = format!("s3://{bucket}/spirekeep-tests/env-{n:08x}");
    let env = [
        ("SPIREKEEP_REPO", repo.as_str()),
        ("SPIREKEEP_S3_ENDPOINT", endpoint.as_str()),
    ];
    let out = spirekeep(&["--json", "backup", "--datastore", example], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = spirekeep(&["--json", "list"], &env);
    let list: Json = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // The objects really are in the bucket.
    let options = RepoOptions {
        s3_endpoint: Some(endpoint),
        s3_allow_http: true,
        ..RepoOptions::default()
    };
    let repository = Repository::open(&repo, &options).unwrap();
    let keys = repository.list("").await.unwrap();
    assert!(keys.iter().any(|m| m.key.ends_with("manifest.json")));
    assert!(keys.len() > 13, "a data object per table plus the manifest");
    for m in keys {
        repository.delete(&m.key).await.unwrap();
    }
}

/// Regression (kill campaign, open finding 1): `information_schema` takes no
/// metadata lock, so a MariaDB reader listing the tables while a restore's
/// multi-table `RENAME TABLE` was halfway (here: one table moved aside, its
/// replacement not yet in) saw a datastore with tables missing, and would
/// have backed it up so. Readers now list the tables under the swap lock a
/// restore holds across its rename (named as in `datastore::mysql`), so they
/// wait for the swap and then see every table.
#[tokio::test(flavor = "multi_thread")]
async fn a_mysql_reader_never_lists_the_tables_halfway_through_a_swap() {
    use sqlx::Connection;
    let Some(fx) = SpireFixture::create(Engine::Mysql, "swap-list", &population(3)).await else {
        return;
    };
    let mut swapper = sqlx::MySqlConnection::connect(&fx.url()).await.unwrap();
    let got: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(CONCAT('spirekeep.swap.', SHA1(DATABASE())), 5)")
            .fetch_one(&mut swapper)
            .await
            .unwrap();
    assert_eq!(got, Some(1));
    sqlx::raw_sql("RENAME TABLE `bundles` TO `_spirekeep_old_bundles`")
        .execute(&mut swapper)
        .await
        .unwrap();
    let ds = fx.open().await;
    let started = std::time::Instant::now();
    let listing = async {
        let plain = ds.catalogue().await.unwrap();
        let mut snapshot = ds.begin_snapshot().await.unwrap();
        let in_snapshot = snapshot.catalogue().await.unwrap();
        snapshot.finish().await.unwrap();
        (plain, in_snapshot, started.elapsed())
    };
    let finish_swap = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        sqlx::raw_sql("RENAME TABLE `_spirekeep_old_bundles` TO `bundles`")
            .execute(&mut swapper)
            .await
            .unwrap();
        sqlx::raw_sql("DO RELEASE_LOCK(CONCAT('spirekeep.swap.', SHA1(DATABASE())))")
            .execute(&mut swapper)
            .await
            .unwrap();
    };
    let ((plain, in_snapshot, waited), ()) = tokio::join!(listing, finish_swap);
    for catalogue in [&plain, &in_snapshot] {
        let names: Vec<&str> = catalogue.tables.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"bundles"), "listed mid-swap: {names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("_spirekeep_")),
            "{names:?}"
        );
    }
    assert!(
        waited >= Duration::from_millis(700),
        "did not wait for the swap: {waited:?}"
    );
    ds.close().await;
    swapper.close().await.unwrap();
    fx.cleanup().await;
}

/// Regression (kill campaign, finding 2): object_store's local backend
/// writes an upload to `<key>#<n>` and renames it when done; a backup killed
/// mid-upload left that file, which no listing shows. Prune now finds such
/// files in a file:// repository and removes them once past the grace.
#[tokio::test(flavor = "multi_thread")]
async fn prune_removes_the_upload_staging_files_a_killed_backup_left() {
    let Some(fx) = SpireFixture::create(Engine::Sqlite, "staging", &population(3)).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = format!("file://{}", root.display());
    let backup = run_json(&["backup", "--datastore", &fx.url(), "--repo", &repo]);
    let id = backup["id"].as_str().unwrap();
    // What a kill mid-upload leaves: a staging file beside the snapshot's
    // objects, and one under a folder no manifest names.
    let beside = root.join(format!("snapshots/{id}/data/bundles.0.spkd.zst#1"));
    let orphan_dir = root.join("snapshots/20261205T000000Z-0a0b0c/data");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let orphan = orphan_dir.join("selectors.0.spkd.zst#12");
    for f in [&beside, &orphan] {
        std::fs::write(f, b"half an upload").unwrap();
    }
    // Not staging files: left alone.
    let lookalike = root.join(format!("snapshots/{id}/data/notes#v2"));
    std::fs::write(&lookalike, b"x").unwrap();

    // Within the grace (a backup may be writing it right now): kept, and said so.
    let plan = run_json(&["prune", "--keep-last", "5", "--dry-run", "--repo", &repo]);
    let staging: Vec<&Json> = plan["plan"]["leftovers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "upload_staging")
        .collect();
    assert_eq!(staging.len(), 2, "{plan:#}");
    assert!(staging.iter().all(|l| l["delete"] == false), "{plan:#}");
    run_json(&["prune", "--keep-last", "5", "--repo", &repo]);
    assert!(beside.exists() && orphan.exists());

    // Past it: removed; the snapshot and the look-alike stay.
    run_json(&[
        "prune",
        "--keep-last",
        "5",
        "--orphan-grace",
        "0s",
        "--repo",
        &repo,
    ]);
    assert!(!beside.exists() && !orphan.exists(), "staging files left");
    assert!(lookalike.exists());
    let listed = run_json(&["list", "--repo", &repo]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let out = spirekeep(&["verify", id, "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    fx.cleanup().await;
}

/// MySQL's bulk read (text protocol, columns as they are) gives exactly the
/// values of the checked read (binary protocol, every value cast), on the
/// column types that differ between the two: unsigned and wide integers,
/// booleans, fractional, zero and `TIMESTAMP` times, dates, multi-byte text,
/// bytes that are not UTF-8, nulls; and a table with a float column keeps the
/// binary protocol. An integer past `i64` is an error, not a wrapped value.
#[tokio::test(flavor = "multi_thread")]
async fn the_mysql_bulk_read_gives_the_values_of_the_checked_read() {
    let Some(fx) = SpireFixture::create_empty(Engine::Mysql, "bulkread").await else {
        eprintln!("no MySQL test server: skipped");
        return;
    };
    let ds = fx.open().await;
    ds.execute_script(
        "SET SESSION sql_mode = '';
         CREATE TABLE odd (id INT UNSIGNED NOT NULL PRIMARY KEY, big BIGINT, flag TINYINT(1),
           at DATETIME(6), stamp TIMESTAMP NULL, day DATE, name VARCHAR(64), raw BLOB);
         INSERT INTO odd VALUES
           (4294967295, -9223372036854775808, 1, '2026-12-07 00:41:02.123456', '2026-12-07 00:41:02',
            '2026-12-07', 'ünïcødé ✓', x'00ff80'),
           (1, 9223372036854775807, 0, '0000-00-00 00:00:00', NULL, NULL, '', x''),
           (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         CREATE TABLE measured (id INT NOT NULL PRIMARY KEY, x DOUBLE, f FLOAT,
           u INT UNSIGNED, m MEDIUMINT, top BIGINT UNSIGNED);
         INSERT INTO measured VALUES (1, 0.30000000000000004, 0.1, 4294967295, -8388608, 9223372036854775807),
           (2, -1.5e300, NULL, 0, 8388607, 0);
         CREATE TABLE wide (id BIGINT UNSIGNED NOT NULL PRIMARY KEY);
         INSERT INTO wide VALUES (18446744073709551615);
         CREATE TABLE wide_measured (id BIGINT UNSIGNED NOT NULL PRIMARY KEY, x DOUBLE);
         INSERT INTO wide_measured VALUES (18446744073709551615, 1.0);",
    )
    .await
    .unwrap();
    let catalogue = ds.catalogue().await.unwrap();
    let mut read = ds.begin_snapshot().await.unwrap();
    for name in ["odd", "measured"] {
        let table = catalogue.table(name).unwrap().clone();
        let expected = ds.read_table(&table).await.unwrap();
        let (tx, mut rx) = datastore::row_channel(4);
        let sent = read.stream_rows(&table, &tx).await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(batch) = rx.recv().await {
            got.extend(batch);
        }
        assert_eq!(sent, expected.len() as u64, "{name}");
        assert_eq!(got, expected, "{name}");
    }
    let odd = catalogue.table("odd").unwrap();
    assert!(
        ds.read_table(odd).await.unwrap().iter().any(|r| matches!(
            r[3],
            datastore::Value::Timestamp(t) if t.year() == 1
        )),
        "the zero date reads as Go's zero time"
    );
    // The binary protocol (a table with a float) reads unsigned and
    // medium integers at their value, not sign-extended or cast.
    let measured = ds
        .read_table(catalogue.table("measured").unwrap())
        .await
        .unwrap();
    let ints = |row: &[datastore::Value]| row[3..].to_vec();
    use datastore::Value::Int;
    assert_eq!(
        ints(&measured[0]),
        [Int(4_294_967_295), Int(-8_388_608), Int(i64::MAX)]
    );
    assert_eq!(ints(&measured[1]), [Int(0), Int(8_388_607), Int(0)]);
    // An unsigned integer past `i64` is an error naming its table and
    // column, in both protocols and in both reads; regression: the checked
    // read and the binary bulk read cast it `AS SIGNED`, which wrapped it to -1.
    for name in ["wide", "wide_measured"] {
        let table = catalogue.table(name).unwrap().clone();
        let (tx, _rx) = datastore::row_channel(4);
        let streamed = read.stream_rows(&table, &tx).await.unwrap_err();
        let checked = ds.read_table(&table).await.unwrap_err();
        for err in [streamed, checked] {
            let err = err.to_string();
            assert!(err.contains("too large"), "{name}: {err}");
            assert!(err.contains(&format!("{name}.id")), "{name}: {err}");
        }
    }
    read.finish().await.unwrap();
    ds.close().await;
    fx.cleanup().await;
}

/// The manifest's schema version is the one of the `migrations` row with the
/// lowest id, the row SPIRE reads, whatever order the engine streams rows in.
/// Regression: PostgreSQL's bulk read streams in storage order, where an
/// updated row comes after the rows inserted before the update, and the
/// backup took the first row it saw.
#[tokio::test(flavor = "multi_thread")]
async fn the_schema_version_is_the_lowest_id_row_of_migrations_in_any_storage_order() {
    let pop = population(20);
    for engine in ENGINES {
        let Some(fx) = SpireFixture::create(engine, "lowestid", &pop).await else {
            continue;
        };
        let ds = fx.open().await;
        ds.execute_script(
            "INSERT INTO migrations (id, version, code_version) VALUES (2, 999, 'not-the-first')",
        )
        .await
        .unwrap();
        // On PostgreSQL the new version of row 1 goes after row 2.
        ds.execute_script("UPDATE migrations SET code_version = code_version WHERE id = 1")
            .await
            .unwrap();
        let repo = Repository::in_memory();
        let manifest = backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
            .await
            .unwrap();
        ds.close().await;
        assert_eq!(
            manifest.spire.schema_version,
            i64::from(pop.schema),
            "{engine}"
        );
        assert_eq!(manifest.spire.code_version, pop.code_version, "{engine}");
        fx.cleanup().await;
    }
}
