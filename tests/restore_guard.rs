//! The guarded restore (issue 12): `restore --replace` refuses a target that
//! other clients (SPIRE servers) still use, naming them, and changes nothing;
//! `--dry-run` shows the same; `--force` restores anyway; once they are gone
//! the restore proceeds. Real sessions on every engine: a second PostgreSQL
//! connection named `spire-server`, a second MariaDB connection, and on
//! SQLite a `sqlite3` process holding the file and a process holding a live
//! WAL connection (also seen from another PID namespace, through its lock on
//! the `-shm` file). spirekeep's own connections never count.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::{
    SpireFixture, assert_one_line_error, file_repo, spirekeep, stderr, stdout, test_password,
};
use serde_json::Value as Json;
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::Population;
use spirekeep::snapshot::codec::content_hash;
use sqlx::Connection;

// ------------------------------------------------------------ helpers

/// Per table: row count and content hash, read through a datastore opened
/// and closed again (so the test holds no session afterwards).
async fn contents(fx: &SpireFixture) -> BTreeMap<String, (u64, String)> {
    let ds = fx.open().await;
    let mut out = BTreeMap::new();
    for table in ds.catalogue().await.unwrap().tables {
        let h = content_hash(ds.read_table(&table).await.unwrap());
        out.insert(table.name.clone(), (h.rows(), h.hex()));
    }
    ds.close().await;
    out
}

/// A snapshot of a small generated datastore, and a live target on `engine`
/// holding other data. `None` when the engine's test server is absent.
async fn setup(
    engine: Engine,
    hint: &str,
) -> Option<(SpireFixture, SpireFixture, tempfile::TempDir, String)> {
    // Values every engine holds unchanged: the preflight asks nothing.
    let population = Population {
        four_byte_utf8: Some(false),
        subsecond: false,
        ..Population::new(12)
    };
    let src = SpireFixture::create(Engine::Sqlite, &format!("{hint}-src"), &population)
        .await
        .unwrap();
    let other = Population {
        seed: 77,
        ..Population::new(6)
    };
    let dst = SpireFixture::create(engine, hint, &other).await?;
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let mut args = vec!["--json", "backup", "--datastore"];
    let url = src.url();
    args.push(&url);
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let id = serde_json::from_str::<Json>(&stdout(&out)).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    Some((src, dst, dir, id))
}

/// `spirekeep [--json] restore ID --datastore URL --replace <extra> --repo ...`.
fn restore(id: &str, url: &str, dir: &tempfile::TempDir, json: bool, extra: &[&str]) -> Output {
    let repo = file_repo(dir);
    let mut args: Vec<&str> = Vec::new();
    if json {
        args.push("--json");
    }
    args.extend(["restore", id, "--datastore", url, "--replace"]);
    args.extend_from_slice(extra);
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    let password = test_password();
    for text in [stdout(&out), stderr(&out)] {
        assert!(!text.contains(&password), "the password leaked:\n{text}");
    }
    out
}

/// The restore once the sessions the test closed are gone from the server's
/// view (a closed connection's backend may linger for a moment): a refused
/// restore changes nothing, so it is simply asked again.
fn restore_when_alone(id: &str, url: &str, dir: &tempfile::TempDir) -> Json {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = restore(id, url, dir, true, &[]);
        if out.status.success() {
            return serde_json::from_str(&stdout(&out)).unwrap();
        }
        let err = stderr(&out);
        assert!(
            err.contains("in use by") && Instant::now() < deadline,
            "the restore without --force did not proceed once the session was closed: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The whole story on one target with `session` open: refused (one line,
/// exit 2, naming `needle`, the target unchanged), the dry run shows it,
/// `--force` restores; then `close` ends the session and a plain
/// `--replace` goes through.
async fn refused_while_in_use<F>(
    dst: &SpireFixture,
    dir: &tempfile::TempDir,
    id: &str,
    needle: &str,
    is_session: impl Fn(&Json) -> bool,
    close: F,
) where
    F: std::future::Future<Output = ()>,
{
    let url = dst.url();
    let before = contents(dst).await;

    let out = restore(id, &url, dir, false, &[]);
    assert_one_line_error(&out, 2, needle);
    let err = stderr(&out);
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap();
    for words in [
        "in use by",
        "stop every SPIRE server using this datastore, restore, then start them again",
        "events-based cache",
        "--force",
    ] {
        assert!(line.contains(words), "{words:?} missing from {line}");
    }
    let text = stdout(&out);
    assert!(text.contains("other clients on the target: "), "{text}");
    assert!(text.contains(needle), "{text}");
    assert_eq!(
        contents(dst).await,
        before,
        "a refused restore changed the target"
    );

    // The dry run shows the same, text and JSON.
    let out = restore(id, &url, dir, true, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let plan: Json = serde_json::from_str(&stdout(&out)).unwrap();
    let reasons: Vec<&str> = plan["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["in_use"], "{plan}");
    let sessions = plan["other_sessions"].as_array().unwrap();
    assert!(sessions.iter().any(&is_session), "{plan}");
    sessions
        .iter()
        .for_each(|s| assert!(s["connections"].as_u64().unwrap() >= 1));
    assert_eq!(plan["force"], false);
    let out = restore(id, &url, dir, false, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains(needle), "{}", stdout(&out));
    assert_eq!(contents(dst).await, before, "a dry run changed the target");

    // --force restores anyway (and says so).
    let out = restore(id, &url, dir, true, &["--force"]);
    assert!(out.status.success(), "--force: {}", stderr(&out));
    let report: Json = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["plan"]["force"], true);
    assert!(
        !report["plan"]["other_sessions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_ne!(contents(dst).await, before, "--force restored");

    // With the session gone, --replace alone proceeds.
    close.await;
    let report = restore_when_alone(id, &url, dir);
    assert_eq!(report["ok"], true, "{report}");
}

// ------------------------------------------------------------ PostgreSQL

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restore_refuses_while_a_spire_server_session_is_open() {
    let Some((src, dst, dir, id)) = setup(Engine::Postgres, "guard").await else {
        return;
    };
    // What SPIRE's lib/pq would look like with application_name set.
    let options = sqlx::postgres::PgConnectOptions::from_str(&dst.url())
        .unwrap()
        .application_name("spire-server");
    let mut spire = sqlx::PgConnection::connect_with(&options).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut spire).await.unwrap();
    refused_while_in_use(
        &dst,
        &dir,
        &id,
        "\"spire-server\"",
        |s| s["application"] == "spire-server" && s["connections"] == 1,
        async move {
            spire.close().await.unwrap();
        },
    )
    .await;
    dst.cleanup().await;
    src.cleanup().await;
}

// ------------------------------------------------------------ MySQL / MariaDB

#[tokio::test(flavor = "multi_thread")]
async fn mysql_restore_refuses_while_another_session_is_open() {
    let Some((src, dst, dir, id)) = setup(Engine::Mysql, "guard").await else {
        return;
    };
    let mut spire = sqlx::MySqlConnection::connect(&dst.url()).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut spire).await.unwrap();
    refused_while_in_use(
        &dst,
        &dir,
        &id,
        // MariaDB names a 127.0.0.1 client `localhost`.
        "a client user spirekeep from ",
        |s| s["host"].is_string() && s["user"] == "spirekeep" && s["application"].is_null(),
        async move {
            spire.close().await.unwrap();
        },
    )
    .await;
    dst.cleanup().await;
    src.cleanup().await;
}

// ------------------------------------------------------------ SQLite

/// Starts `program` with stdin piped (it stays alive until stdin closes).
fn hold(program: &str, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"))
}

/// A process holding a live WAL connection: WAL mode on, one read done (the
/// connection now holds its lock on the `-shm` file), then idle until stdin closes.
fn hold_wal_connection(path: &std::path::Path) -> Child {
    let mut child = hold(
        "python3",
        &[
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             c.execute('PRAGMA journal_mode=WAL').fetchall()\n\
             c.execute('SELECT count(*) FROM bundles').fetchall()\n\
             print('ready', flush=True)\n\
             sys.stdin.read()\n",
            path.to_str().unwrap(),
        ],
    );
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn stop(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_restore_refuses_while_a_process_holds_the_file() {
    let (src, dst, dir, id) = setup(Engine::Sqlite, "guard-file").await.unwrap();
    let path = dst.sqlite_path();
    let child = hold("sqlite3", &[path.to_str().unwrap()]);
    // The shell opens an existing file at start; wait until it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    let fd_dir = format!("/proc/{}/fd", child.id());
    while !std::fs::read_dir(&fd_dir)
        .unwrap()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path.canonicalize().unwrap()))
    {
        assert!(Instant::now() < deadline, "sqlite3 never opened the file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id();
    refused_while_in_use(
        &dst,
        &dir,
        &id,
        &format!("\"sqlite3\" (pid {pid})"),
        |s| s["pid"] == pid && s["application"] == "sqlite3",
        async move { stop(child) },
    )
    .await;
    drop(src);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_restore_refuses_while_a_wal_connection_is_live() {
    let (src, dst, dir, id) = setup(Engine::Sqlite, "guard-wal").await.unwrap();
    let path = dst.sqlite_path();
    let child = hold_wal_connection(&path);
    let pid = child.id();
    refused_while_in_use(
        &dst,
        &dir,
        &id,
        &format!("(pid {pid})"),
        |s| s["pid"] == pid,
        async move { stop(child) },
    )
    .await;
    drop(src);
}

/// A SPIRE server in another container sharing the volume is invisible in
/// this `/proc`; its lock on the `-shm` file is not. Run spirekeep in a PID
/// namespace of its own (root only) while a process outside holds a live
/// WAL connection: the restore is refused all the same.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_wal_connection_from_another_pid_namespace_is_seen_by_its_lock() {
    let in_own_namespace = |args: &[&str]| {
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                env!("CARGO_BIN_EXE_spirekeep"),
            ])
            .args(args)
            .env("NO_COLOR", "1")
            .output()
    };
    match in_own_namespace(&["--version"]) {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("skipping: unshare --pid --mount-proc needs root");
            return;
        }
    }
    let (src, dst, dir, id) = setup(Engine::Sqlite, "guard-ns").await.unwrap();
    let path = dst.sqlite_path();
    let child = hold_wal_connection(&path);
    let before = contents(&dst).await;
    let repo = file_repo(&dir);
    let url = dst.url();
    let mut args = vec![
        "restore",
        id.as_str(),
        "--datastore",
        url.as_str(),
        "--replace",
    ];
    args.extend(repo.iter().map(String::as_str));
    let out = in_own_namespace(&args).unwrap();
    assert_one_line_error(
        &out,
        2,
        "a process outside this PID namespace (another container?) holds a lock on datastore.sqlite3-shm",
    );
    assert_eq!(contents(&dst).await, before, "untouched");
    stop(child);
    let out = in_own_namespace(&args).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    drop(src);
}

// ------------------------------------------------------------ own connections

/// spirekeep's own connections are never "other clients", however many a
/// pool holds (detached snapshot sessions included) and however many
/// datastores the process opened; a foreign connection is.
async fn own_connections_are_not_reported(engine: Engine) {
    let Some(fx) = SpireFixture::create(engine, "guard-own", &Population::new(3)).await else {
        return;
    };
    let first = fx.open().await;
    let second = fx.open().await;
    // Several connections at once in each pool, and two detached ones.
    let snap_a = first.begin_snapshot().await.unwrap();
    let snap_b = second.begin_snapshot().await.unwrap();
    let (a, b, c) = tokio::join!(first.catalogue(), first.catalogue(), second.catalogue());
    a.unwrap();
    b.unwrap();
    c.unwrap();
    assert_eq!(first.other_sessions().await.unwrap(), vec![], "{engine}");
    assert_eq!(second.other_sessions().await.unwrap(), vec![], "{engine}");
    snap_a.finish().await.unwrap();
    snap_b.finish().await.unwrap();

    // A client that is not this process is reported once.
    let foreign: Box<dyn FnOnce()> = match engine {
        Engine::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&fx.url()).await.unwrap();
            sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
            let found = first.other_sessions().await.unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].connections, 1);
            assert_eq!(found[0].user.as_deref(), Some("spirekeep"));
            Box::new(move || drop(conn))
        }
        Engine::Mysql => {
            let mut conn = sqlx::MySqlConnection::connect(&fx.url()).await.unwrap();
            sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
            let found = first.other_sessions().await.unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].connections, 1);
            Box::new(move || drop(conn))
        }
        Engine::Sqlite => {
            let child = hold_wal_connection(&fx.sqlite_path());
            let found = first.other_sessions().await.unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].pid, Some(child.id()));
            Box::new(move || stop(child))
        }
    };
    foreign();
    first.close().await;
    second.close().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn own_connections_are_not_reported_postgres() {
    own_connections_are_not_reported(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn own_connections_are_not_reported_mysql() {
    own_connections_are_not_reported(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn own_connections_are_not_reported_sqlite() {
    own_connections_are_not_reported(Engine::Sqlite).await;
}

/// A server stopped a moment before the restore (the upgrade's rollback
/// stops the servers, then restores) leaves its session in the engine's
/// list while it is torn down. The guard reads again for a few seconds
/// before it counts a session, so such a one does not block the restore,
/// while one that stays is still refused (the tests above).
#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_goes_away_within_seconds_does_not_block_the_restore() {
    let Some((src, dst, dir, id)) = setup(Engine::Postgres, "guard-settle").await else {
        return;
    };
    let options = sqlx::postgres::PgConnectOptions::from_str(&dst.url())
        .unwrap()
        .application_name("spire-server");
    let mut spire = sqlx::PgConnection::connect_with(&options).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut spire).await.unwrap();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        spire.close().await.unwrap();
    });
    let url = dst.url();
    let out = tokio::task::spawn_blocking(move || restore(&id, &url, &dir, true, &[]))
        .await
        .unwrap();
    closer.await.unwrap();
    assert!(
        out.status.success(),
        "the session closed within the settle time: {}",
        stderr(&out)
    );
    dst.cleanup().await;
    src.cleanup().await;
}
