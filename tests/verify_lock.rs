//! `verify` reads a snapshot under the repository lock, so a prune (which
//! deletes under that lock) can never remove objects while they are read.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use spirekeep::datastore::testkit::{Population, create_spire_datastore};
use spirekeep::datastore::{self, Engine, OpenMode, dsn};
use spirekeep::snapshot::backup::{BackupOptions, Quiet, backup};
use spirekeep::store::lock::{LockOptions, RepositoryLock};
use spirekeep::store::{RepoOptions, Repository};

const SPIREKEEP: &str = env!("CARGO_BIN_EXE_spirekeep");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_waits_for_the_repository_lock() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("datastore.sqlite3");
    let spec = dsn::parse(db.to_str().unwrap(), Some(Engine::Sqlite), Path::new("/")).unwrap();
    let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
    let pop = Population {
        entries: 5,
        schema: 24,
        code_version: "1.14.7".into(),
        ..Population::default()
    };
    create_spire_datastore(ds.as_ref(), &pop).await.unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let repo = Repository::open(&url, &RepoOptions::default()).unwrap();
    backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
        .await
        .unwrap();
    ds.close().await;

    // a prune (or any other holder) has the lock: verify does not read
    let held = RepositoryLock::acquire(
        &repo,
        &LockOptions {
            ttl: Duration::from_secs(30),
            ..LockOptions::new("prune")
        },
    )
    .await
    .unwrap();
    let verify = || {
        Command::new(SPIREKEEP)
            .args(["verify", "latest", "--repo", &url, "--lock-wait", "0s"])
            .env_remove("SPIREKEEP_LOCK_WAIT")
            .output()
            .unwrap()
    };
    let out = verify();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("prune"), "names the holder: {stderr}");
    assert!(
        repo.list("verifications/").await.unwrap().is_empty(),
        "nothing was verified while the lock was held"
    );

    held.release().await.unwrap();
    let out = verify();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!repo.list("verifications/").await.unwrap().is_empty());
}

/// Issue 14: the lock verify takes is shared with other readers and
/// exclusive against prune: a verify runs while another one reads, and a
/// prune waits for every reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_share_the_lock_and_prune_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("datastore.sqlite3");
    let spec = dsn::parse(db.to_str().unwrap(), Some(Engine::Sqlite), Path::new("/")).unwrap();
    let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
    create_spire_datastore(ds.as_ref(), &Population::new(5))
        .await
        .unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let repo = Repository::open(&url, &RepoOptions::default()).unwrap();
    for _ in 0..2 {
        backup(ds.as_ref(), &repo, &BackupOptions::default(), &Quiet)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    ds.close().await;

    // another verify is reading
    let reader = RepositoryLock::acquire_shared(
        &repo,
        &LockOptions {
            ttl: Duration::from_secs(30),
            ..LockOptions::new("verify")
        },
    )
    .await
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(SPIREKEEP)
            .args(args)
            .args(["--repo", &url, "--lock-wait", "0s"])
            .env_remove("SPIREKEEP_LOCK_WAIT")
            .output()
            .unwrap()
    };
    let out = run(&["verify", "latest"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a second verify reads beside the first: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prune = || run(&["prune", "--keep-last", "1"]);
    let out = prune();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("verify by "), "names the reader: {stderr}");
    assert_eq!(
        spirekeep::snapshot::manifest::list_snapshots(&repo)
            .await
            .unwrap()
            .len(),
        2,
        "nothing was pruned while a verify read"
    );

    reader.release().await.unwrap();
    let out = prune();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
