//! Scheduled backups (issue 6): retention over a synthetic history, the
//! repository lock against concurrent runs and killed processes, `lock
//! show|break`, `spirekeep agent` on a short schedule against the S3 server
//! (snapshots on time, `/metrics` across a restart, SIGTERM), and the one-shot
//! metrics (textfile checked by `promtool check metrics`, a real Pushgateway).
//!
//! Everything runs the real binary. S3 tests need `SPIREKEEP_TEST_S3_ENDPOINT`
//! (`source scripts/test-services.sh`); without it they skip, unless
//! `SPIREKEEP_TEST_REQUIRE_SERVICES=1` makes that a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{SpireFixture, assert_one_line_error, spirekeep, stderr, stdout};
use serde_json::Value as Json;
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::{Population, services_required};
use spirekeep::snapshot::manifest::list_snapshots;
use spirekeep::snapshot::{Manifest, VerificationRecord};
use spirekeep::store::keys::{self, SnapshotId, VerifyKind};
use spirekeep::store::lock::LeaseRecord;
use spirekeep::store::{RepoOptions, Repository};
use time::OffsetDateTime;

// ---------------------------------------------------------------- helpers

/// A repository as the CLI sees it (`--repo ...` arguments) and as the
/// library sees it (to look inside).
struct TestRepo {
    url: String,
    args: Vec<String>,
    repo: Repository,
    _dir: Option<tempfile::TempDir>,
}

impl TestRepo {
    fn file() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("repo").display());
        let repo = Repository::open(&url, &RepoOptions::default()).unwrap();
        Self {
            args: vec!["--repo".into(), url.clone()],
            url,
            repo,
            _dir: Some(dir),
        }
    }

    fn root(&self) -> PathBuf {
        self._dir.as_ref().unwrap().path().join("repo")
    }

    /// A fresh prefix on the S3 test server, or `None` (skip) without one.
    fn s3(test: &str) -> Option<Self> {
        let Ok(endpoint) = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT") else {
            assert!(
                !services_required(),
                "SPIREKEEP_TEST_S3_ENDPOINT is not set"
            );
            return None;
        };
        let bucket =
            std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
        let n: u32 = rand::random();
        let url = format!("s3://{bucket}/spirekeep-tests/{test}-{n:08x}");
        let options = RepoOptions {
            s3_endpoint: Some(endpoint.clone()),
            s3_allow_http: true,
            ..RepoOptions::default()
        };
        let repo = Repository::open(&url, &options).unwrap();
        Some(Self {
            args: vec![
                "--repo".into(),
                url.clone(),
                "--s3-endpoint".into(),
                endpoint,
            ],
            url,
            repo,
            _dir: None,
        })
    }

    /// `args` followed by the repository arguments.
    fn with<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(self.args.iter().map(String::as_str));
        all
    }

    async fn snapshot_ids(&self) -> Vec<SnapshotId> {
        list_snapshots(&self.repo).await.unwrap()
    }

    async fn keys(&self) -> BTreeSet<String> {
        self.repo
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect()
    }

    async fn cleanup(&self) {
        for m in self.repo.list("").await.unwrap() {
            self.repo.delete(&m.key).await.unwrap();
        }
    }
}

/// Starts the binary in the background with a clean `SPIREKEEP_*` environment.
fn spawn(args: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spirekeep"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start spirekeep")
}

fn wait_output(child: Child, limit: Duration) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for spirekeep"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("spirekeep (pid {pid}) did not finish within {limit:?}");
        }
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

fn json_of(out: &std::process::Output) -> Json {
    assert!(
        out.status.success(),
        "failed ({:?}): {}",
        out.status.code(),
        stderr(out)
    );
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

fn unix(rfc3339: &str) -> i64 {
    OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lease(repo: &Repository) -> Option<LeaseRecord> {
    let bytes = repo.get(keys::REPOSITORY_LOCK).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A lease held right now by a live holder (not released, not expired).
async fn held_lease(repo: &Repository) -> Option<LeaseRecord> {
    lease(repo)
        .await
        .filter(|l| !l.released && l.expires_at > OffsetDateTime::now_utc())
}

/// A SQLite datastore big enough that a backup takes a few seconds.
async fn big_sqlite(hint: &str) -> SpireFixture {
    SpireFixture::create(Engine::Sqlite, hint, &Population::new(20_000))
        .await
        .expect("sqlite fixture")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The value of the first sample of `metric` in an exposition.
fn sample(text: &str, metric: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn promtool_check_metrics(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(!services_required(), "promtool is not installed");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- retention

/// One synthetic snapshot and what the test knows about it.
struct Synthetic {
    id: SnapshotId,
    pinned: bool,
    label_pinned: bool,
    verified: Option<bool>,
}

/// What the rules say, computed independently of `snapshot::retention`.
fn expected_keep(
    snaps: &[Synthetic],
    last: usize,
    daily: usize,
    weekly: usize,
    monthly: usize,
) -> BTreeSet<SnapshotId> {
    let mut newest_first: Vec<&Synthetic> = snaps.iter().collect();
    newest_first.sort_by(|a, b| b.id.cmp(&a.id));
    let mut keep = BTreeSet::new();
    keep.extend(newest_first.iter().take(last).map(|s| s.id.clone()));
    type Bucket = fn(OffsetDateTime) -> String;
    let rules: [(usize, Bucket); 3] = [
        (daily, |t| t.date().to_string()),
        (weekly, |t| {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y}-{w}")
        }),
        (monthly, |t| format!("{}-{}", t.year(), u8::from(t.month()))),
    ];
    for (count, bucket) in rules {
        let mut seen = BTreeSet::new();
        for s in &newest_first {
            if seen.len() == count {
                break;
            }
            if seen.insert(bucket(s.id.time())) {
                keep.insert(s.id.clone());
            }
        }
    }
    for s in snaps.iter().filter(|s| s.pinned || s.label_pinned) {
        keep.insert(s.id.clone());
    }
    if let Some(s) = newest_first.iter().find(|s| s.verified == Some(true)) {
        keep.insert(s.id.clone());
    }
    keep
}

fn set_mtime(path: &Path, at: OffsetDateTime) {
    let t =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.unix_timestamp()).unwrap());
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_exactly_what_the_rules_say_and_dry_run_matches() {
    let t = TestRepo::file();
    let repo = &t.repo;
    let template = Manifest::from_json(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/manifest-v1.json"
        ))
        .unwrap(),
    )
    .unwrap();
    // Four months of snapshots every 6 hours, the newest an hour ago.
    let now = OffsetDateTime::now_utc();
    let newest = now
        .replace_minute(0)
        .unwrap()
        .replace_second(0)
        .unwrap()
        .replace_nanosecond(0)
        .unwrap()
        - time::Duration::hours(1);
    let count = 4 * 30 * 4;
    let mut snaps = Vec::new();
    for i in 0..count {
        let at = newest - time::Duration::hours(6 * i64::from(i));
        let id = SnapshotId::with_suffix(
            at,
            [
                0xab,
                u8::try_from(i % 256).unwrap(),
                u8::try_from(i / 256).unwrap(),
            ],
        );
        snaps.push(Synthetic {
            id,
            pinned: false,
            label_pinned: false,
            verified: None,
        });
    }
    // Specials, chosen so that the rules alone would delete them. Which
    // snapshots the rules keep depends on the hour and weekday the test runs
    // (regression: at 01:00 UTC on a Monday, snapshot 57 was the newest of
    // its ISO week and kept by --keep-weekly), so each special is the first
    // snapshot from a nominal position on that the rules alone delete.
    let kept_by_rules = expected_keep(&snaps, 4, 7, 4, 3);
    let deleted_from = |nominal: usize| {
        (nominal..snaps.len())
            .find(|i| !kept_by_rules.contains(&snaps[*i].id))
            .expect("the rules delete most snapshots")
    };
    let [failed, verified, label_pinned, pinned, older_verified] =
        [57, 150, 203, 301, 420].map(deleted_from);
    // an explicitly pinned snapshot (an unfinished upgrade's pre-upgrade snapshot),
    snaps[pinned].pinned = true;
    // one carrying the label given with --pin-label,
    snaps[label_pinned].label_pinned = true;
    // the newest snapshot whose newest verification passed (older ones passed too),
    snaps[verified].verified = Some(true);
    snaps[older_verified].verified = Some(true);
    // and a newer one whose latest verification failed (after an earlier pass): not "verified".
    snaps[failed].verified = Some(false);
    for s in &snaps {
        let mut m = template.clone();
        let old_prefix = keys::data_prefix(&m.snapshot_id);
        m.snapshot_id = s.id.clone();
        m.started_at = s.id.time();
        m.finished_at = s.id.time() + time::Duration::seconds(7);
        m.labels = if s.label_pinned {
            vec!["pre-upgrade".into()]
        } else {
            vec!["scheduled".into()]
        };
        for table in &mut m.tables {
            for o in &mut table.objects {
                o.key = o.key.replace(&old_prefix, &keys::data_prefix(&s.id));
                repo.put_create(&o.key, Bytes::from_static(b"data"))
                    .await
                    .unwrap();
            }
        }
        m.store(repo).await.unwrap();
        if let Some(ok) = s.verified {
            let at = s.id.time() + time::Duration::minutes(5);
            VerificationRecord::new(s.id.clone(), at, VerifyKind::Shallow, vec![])
                .store(repo)
                .await
                .unwrap();
            if !ok {
                VerificationRecord::new(
                    s.id.clone(),
                    at + time::Duration::hours(1),
                    VerifyKind::Shallow,
                    vec!["object x: sha256 mismatch".into()],
                )
                .store(repo)
                .await
                .unwrap();
            }
        }
    }
    spirekeep::snapshot::pins::pin(
        repo,
        &snaps[pinned].id,
        "upgrade-1.14",
        "pre-upgrade snapshot of plan upgrade-1.14",
    )
    .await
    .unwrap();
    // A killed backup ten days ago, one in progress now, verification records
    // of a long-deleted snapshot, something foreign, and a pin of a snapshot
    // that does not exist.
    let killed = SnapshotId::with_suffix(now - time::Duration::days(10), [1, 2, 3]);
    let running = SnapshotId::with_suffix(now - time::Duration::seconds(30), [4, 5, 6]);
    let gone = SnapshotId::with_suffix(now - time::Duration::days(200), [7, 8, 9]);
    for (key, age) in [
        (
            keys::data_object(&killed, "bundles", 0),
            time::Duration::days(10),
        ),
        (
            keys::data_object(&killed, "registered_entries", 0),
            time::Duration::days(10),
        ),
        (
            keys::data_object(&running, "bundles", 0),
            time::Duration::ZERO,
        ),
        (
            keys::verification(&gone, now - time::Duration::days(3), VerifyKind::Deep),
            time::Duration::days(3),
        ),
        (
            "snapshots/junk/readme.txt".to_owned(),
            time::Duration::days(50),
        ),
    ] {
        repo.put_create(&key, Bytes::from_static(b"x"))
            .await
            .unwrap();
        set_mtime(&t.root().join(&key), now - age);
    }
    let dangling = keys::pin(&gone, "operator").unwrap();
    repo.put_create(&dangling, Bytes::from_static(b"{}"))
        .await
        .unwrap();

    let policy = [
        "--keep-last",
        "4",
        "--keep-hourly",
        "0",
        "--keep-daily",
        "7",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "3",
        "--pin-label",
        "pre-upgrade",
    ];
    let expected = expected_keep(&snaps, 4, 7, 4, 3);
    assert!(
        expected.len() < 30,
        "the policy keeps a few: {}",
        expected.len()
    );
    for special in [pinned, label_pinned, verified] {
        assert!(expected.contains(&snaps[special].id));
    }
    assert!(!expected.contains(&snaps[failed].id) && !expected.contains(&snaps[older_verified].id));

    // The dry run: every snapshot named once, with its reasons.
    let mut args = vec!["prune", "--dry-run"];
    args.extend(policy);
    let out = spirekeep(&t.with(&args), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    for s in &snaps {
        let line = lines
            .iter()
            .find(|l| l.contains(s.id.as_str()))
            .unwrap_or_else(|| panic!("{} missing from the dry run:\n{text}", s.id));
        let verb = if expected.contains(&s.id) {
            "keep "
        } else {
            "delete "
        };
        assert!(line.starts_with(verb), "{line}");
    }
    let find = |i: usize| {
        lines
            .iter()
            .find(|l| l.contains(snaps[i].id.as_str()))
            .unwrap()
            .to_string()
    };
    assert!(
        find(301).contains("pinned by upgrade-1.14: pre-upgrade snapshot of plan upgrade-1.14"),
        "{}",
        find(301)
    );
    assert!(
        find(203).contains("label pre-upgrade (--pin-label)"),
        "{}",
        find(203)
    );
    assert!(
        find(150).contains("newest verified snapshot"),
        "{}",
        find(150)
    );
    assert!(
        find(0).contains("last 4") && find(0).contains("daily"),
        "{}",
        find(0)
    );
    assert!(
        text.contains(&format!(
            "delete  leftover {}",
            keys::snapshot_prefix(&killed)
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "keep    leftover {}",
            keys::snapshot_prefix(&running)
        )),
        "{text}"
    );
    assert!(text.contains("a backup in progress"), "{text}");
    assert!(
        text.contains(&format!(
            "delete  records {}",
            keys::verifications_prefix(&gone)
        )),
        "{text}"
    );
    assert!(text.contains("ignore  snapshots/junk/"), "{text}");
    assert!(
        text.contains(&format!(
            "pin of {gone} by operator refers to a snapshot that does not exist"
        )),
        "{text}"
    );
    assert!(text.contains("(dry run: nothing deleted)"), "{text}");

    let mut args = vec!["--json", "prune", "--dry-run"];
    args.extend(policy);
    let dry = json_of(&spirekeep(&t.with(&args), &[]));
    let planned_delete: BTreeSet<String> = dry["plan"]["delete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    let planned_leftovers: BTreeSet<String> = dry["plan"]["leftovers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["delete"].as_bool().unwrap())
        .map(|l| l["prefix"].as_str().unwrap().to_owned())
        .collect();
    let keys_before = t.keys().await;
    assert_eq!(
        keys_before.len(),
        t.keys().await.len(),
        "a dry run deletes nothing"
    );

    // The real run deletes exactly what the dry run named, and nothing else.
    let mut args = vec!["--json", "prune"];
    args.extend(policy);
    let real = json_of(&spirekeep(&t.with(&args), &[]));
    let after: BTreeSet<SnapshotId> = t.snapshot_ids().await.into_iter().collect();
    assert_eq!(after, expected, "kept exactly what the rules say");
    let deleted: BTreeSet<String> = snaps
        .iter()
        .map(|s| s.id.to_string())
        .filter(|id| !after.iter().any(|a| a.as_str() == id))
        .collect();
    assert_eq!(
        deleted, planned_delete,
        "the dry run named exactly what went"
    );
    assert_eq!(
        real["outcome"]["snapshots_deleted"]
            .as_array()
            .unwrap()
            .len(),
        planned_delete.len()
    );
    let keys_after = t.keys().await;
    let gone_keys: BTreeSet<&String> = keys_before.difference(&keys_after).collect();
    for key in &gone_keys {
        let owner_deleted = planned_delete.iter().any(|id| {
            key.starts_with(&format!("snapshots/{id}/"))
                || key.starts_with(&format!("verifications/{id}/"))
        });
        let leftover = planned_leftovers
            .iter()
            .any(|p| key.starts_with(p.as_str()));
        assert!(
            owner_deleted || leftover,
            "{key} was deleted but not planned"
        );
    }
    assert_eq!(
        planned_leftovers,
        BTreeSet::from([
            keys::snapshot_prefix(&killed),
            keys::verifications_prefix(&gone)
        ])
    );
    for key in [
        keys::data_object(&running, "bundles", 0),
        "snapshots/junk/readme.txt".to_owned(),
        dangling,
        keys::pin(&snaps[pinned].id, "upgrade-1.14").unwrap(),
    ] {
        assert!(keys_after.contains(&key), "{key} must stay");
    }
    // Every kept snapshot still has all its objects and records.
    for id in &expected {
        let m = Manifest::load(repo, id).await.unwrap();
        for o in m.tables.iter().flat_map(|t| &t.objects) {
            assert!(keys_after.contains(&o.key), "{} lost", o.key);
        }
    }
    assert!(
        !keys_after
            .iter()
            .any(|k| k.starts_with("verifications/")
                && deleted.iter().any(|d| k.contains(d.as_str()))),
        "records of deleted snapshots go with them"
    );
    // The repository lock was taken and released (the local filesystem
    // fallback deletes the lease object on release).
    assert!(lease(repo).await.is_none());

    // A second run finds nothing more to delete.
    let mut args = vec!["--json", "prune"];
    args.extend(policy);
    let again = json_of(&spirekeep(&t.with(&args), &[]));
    assert!(again["plan"]["delete"].as_array().unwrap().is_empty());

    // Unpinning releases the snapshot at the next run; a policy without rules is refused.
    spirekeep::snapshot::pins::unpin(repo, &snaps[pinned].id, "upgrade-1.14")
        .await
        .unwrap();
    let mut args = vec!["--json", "prune"];
    args.extend(policy);
    json_of(&spirekeep(&t.with(&args), &[]));
    assert!(!t.snapshot_ids().await.contains(&snaps[pinned].id));
    let out = spirekeep(&t.with(&["prune", "--keep-hourly", "0"]), &[]);
    assert_one_line_error(&out, 2, "no retention rule given");
}

// ---------------------------------------------------------------- the lock

#[tokio::test(flavor = "multi_thread")]
async fn two_backups_at_once_one_waits_or_refuses_and_nothing_is_lost() {
    let Some(t) = TestRepo::s3("two-backups") else {
        return;
    };
    let Some(fx) =
        SpireFixture::create(Engine::Postgres, "two_backups", &Population::new(20_000)).await
    else {
        return;
    };
    let url = fx.url();

    // Refuse: the second run, started while the first holds the lock, stops at once.
    let first = spawn(&t.with(&["--json", "backup", "--datastore", &url, "--label", "first"]));
    wait_until(
        Duration::from_secs(60),
        "the first backup's lease",
        || async { held_lease(&t.repo).await.is_some() },
    )
    .await;
    let second = spirekeep(
        &t.with(&[
            "backup",
            "--datastore",
            &url,
            "--label",
            "second",
            "--lock-wait",
            "0",
        ]),
        &[],
    );
    assert_one_line_error(&second, 5, "is locked: backup by");
    assert!(
        stderr(&second).contains("lock break"),
        "{}",
        stderr(&second)
    );
    let first = json_of(&wait_output(first, Duration::from_secs(120)));
    let ids = t.snapshot_ids().await;
    assert_eq!(ids.len(), 1, "exactly the first snapshot");
    assert_eq!(first["id"].as_str().unwrap(), ids[0].as_str());
    // The refused run wrote nothing at all: every object belongs to the first snapshot.
    let m = Manifest::load(&t.repo, &ids[0]).await.unwrap();
    let data: BTreeSet<String> = t
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with(keys::SNAPSHOTS))
        .collect();
    let mut expected: BTreeSet<String> = m
        .tables
        .iter()
        .flat_map(|t| &t.objects)
        .map(|o| o.key.clone())
        .collect();
    expected.insert(keys::manifest(&ids[0]));
    assert_eq!(data, expected);

    // Wait: two runs started together both complete, one after the other.
    let started = Instant::now();
    let a = spawn(&t.with(&[
        "--json",
        "backup",
        "--datastore",
        &url,
        "--label",
        "a",
        "--lock-wait",
        "2m",
    ]));
    let b = spawn(&t.with(&[
        "--json",
        "backup",
        "--datastore",
        &url,
        "--label",
        "b",
        "--lock-wait",
        "2m",
    ]));
    let a = json_of(&wait_output(a, Duration::from_secs(180)));
    let b = json_of(&wait_output(b, Duration::from_secs(180)));
    let elapsed = started.elapsed();
    let ids = t.snapshot_ids().await;
    assert_eq!(ids.len(), 3, "nothing lost: {ids:?}");
    let (ma, mb) = (
        Manifest::load(
            &t.repo,
            &SnapshotId::parse(a["id"].as_str().unwrap()).unwrap(),
        )
        .await
        .unwrap(),
        Manifest::load(
            &t.repo,
            &SnapshotId::parse(b["id"].as_str().unwrap()).unwrap(),
        )
        .await
        .unwrap(),
    );
    // They did not overlap: one started reading after the other had finished.
    assert!(
        ma.finished_at <= mb.started_at || mb.finished_at <= ma.started_at,
        "overlapping backups: {}..{} and {}..{}",
        ma.started_at,
        ma.finished_at,
        mb.started_at,
        mb.finished_at
    );
    for m in [&ma, &mb] {
        assert_eq!(m.total_rows(), fx.counts.total());
        for o in m.tables.iter().flat_map(|t| &t.objects) {
            assert_eq!(t.repo.head(&o.key).await.unwrap().unwrap().size, o.size);
        }
    }
    eprintln!(
        "two serialized backups of {} rows took {elapsed:?}",
        fx.counts.total()
    );
    assert!(
        held_lease(&t.repo).await.is_none(),
        "the lock is free again"
    );
    t.cleanup().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_during_a_backup_never_deletes_its_objects() {
    let Some(t) = TestRepo::s3("prune-during-backup") else {
        return;
    };
    let fx = big_sqlite("prune_during").await;
    let url = fx.url();
    // An older snapshot that keep-last 1 will drop once the new one exists.
    json_of(&spirekeep(
        &t.with(&["--json", "backup", "--datastore", &url]),
        &[],
    ));
    let old = t.snapshot_ids().await;
    assert_eq!(old.len(), 1);

    let backup = spawn(&t.with(&["--json", "backup", "--datastore", &url]));
    wait_until(
        Duration::from_secs(60),
        "data objects of the running backup",
        || async {
            held_lease(&t.repo).await.is_some()
                && t.keys()
                    .await
                    .iter()
                    .filter(|k| k.starts_with(keys::SNAPSHOTS) && !k.contains(old[0].as_str()))
                    .count()
                    > 0
        },
    )
    .await;
    // With no grace at all, only the lock protects the running backup's objects:
    // a prune that does not wait refuses...
    let refused = spirekeep(
        &t.with(&[
            "prune",
            "--keep-last",
            "1",
            "--orphan-grace",
            "0s",
            "--lock-wait",
            "0",
        ]),
        &[],
    );
    assert_one_line_error(&refused, 5, "is locked: backup by");
    // ...a dry run (no lock) shows them as a leftover but deletes nothing...
    let dry = json_of(&spirekeep(
        &t.with(&[
            "--json",
            "prune",
            "--keep-last",
            "1",
            "--orphan-grace",
            "24h",
            "--dry-run",
        ]),
        &[],
    ));
    for l in dry["plan"]["leftovers"].as_array().unwrap() {
        assert!(
            !l["delete"].as_bool().unwrap(),
            "young leftovers are kept: {l}"
        );
        assert!(
            l["reason"]
                .as_str()
                .unwrap()
                .contains("a backup in progress")
        );
    }
    // ...and one that waits runs after the backup, when its snapshot is whole.
    let waiting = spawn(&t.with(&[
        "--json",
        "prune",
        "--keep-last",
        "1",
        "--orphan-grace",
        "0s",
        "--lock-wait",
        "2m",
    ]));
    let backup_out = json_of(&wait_output(backup, Duration::from_secs(120)));
    let pruned = json_of(&wait_output(waiting, Duration::from_secs(120)));
    let new_id = SnapshotId::parse(backup_out["id"].as_str().unwrap()).unwrap();
    assert_eq!(t.snapshot_ids().await, vec![new_id.clone()]);
    assert_eq!(
        pruned["outcome"]["snapshots_deleted"].as_array().unwrap(),
        &vec![Json::String(old[0].to_string())]
    );
    assert!(
        pruned["plan"]["leftovers"].as_array().unwrap().is_empty(),
        "{pruned}"
    );
    let m = Manifest::load(&t.repo, &new_id).await.unwrap();
    for o in m.tables.iter().flat_map(|t| &t.objects) {
        assert_eq!(
            t.repo.head(&o.key).await.unwrap().unwrap().size,
            o.size,
            "{}",
            o.key
        );
    }
    t.cleanup().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_runs_lease_expires_and_the_next_run_proceeds() {
    let Some(t) = TestRepo::s3("killed-lease") else {
        return;
    };
    let fx = big_sqlite("killed_lease").await;
    let url = fx.url();

    // A lease left by a process killed on another machine, expired long ago:
    // the next run takes it over at once.
    let now = OffsetDateTime::now_utc();
    let stale = LeaseRecord {
        format_version: 1,
        holder: "0123456789abcdef".into(),
        host: "cron-node-7".into(),
        pid: 4242,
        purpose: "backup".into(),
        spirekeep_version: "0.1.0".into(),
        acquired_at: now - time::Duration::hours(5),
        renewed_at: now - time::Duration::hours(5),
        expires_at: now - time::Duration::hours(5) + time::Duration::minutes(2),
        ttl_seconds: 120,
        released: false,
        broken_by: None,
    };
    t.repo
        .put_create(
            keys::REPOSITORY_LOCK,
            serde_json::to_vec(&stale).unwrap().into(),
        )
        .await
        .unwrap();
    let out = spirekeep(&t.with(&["lock", "show"]), &[]);
    assert!(
        stdout(&out).contains("free: the lease of backup by cron-node-7 pid 4242"),
        "{}",
        stdout(&out)
    );
    let out = spirekeep(
        &t.with(&["backup", "--datastore", &url, "--lock-wait", "0"]),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(t.snapshot_ids().await.len(), 1);

    // A real run killed (SIGKILL) in the middle of its backup: no manifest, and
    // its lease (3 s TTL here) stops the next run only until it expires.
    let victim = spawn(&t.with(&["backup", "--datastore", &url, "--lock-ttl", "3s"]));
    wait_until(
        Duration::from_secs(60),
        "the victim's lease and first objects",
        || async {
            held_lease(&t.repo)
                .await
                .is_some_and(|l| l.ttl_seconds == 3)
                && t.keys()
                    .await
                    .iter()
                    .filter(|k| k.starts_with(keys::SNAPSHOTS))
                    .count()
                    > 14
        },
    )
    .await;
    let mut victim = victim;
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed_at = Instant::now();
    let refused = spirekeep(
        &t.with(&["backup", "--datastore", &url, "--lock-wait", "0"]),
        &[],
    );
    assert_one_line_error(&refused, 5, "is locked");
    let out = spirekeep(
        &t.with(&[
            "--json",
            "backup",
            "--datastore",
            &url,
            "--lock-wait",
            "30s",
        ]),
        &[],
    );
    let next = json_of(&out);
    let waited = killed_at.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "the lease expired within its TTL: {waited:?}"
    );
    let ids = t.snapshot_ids().await;
    assert_eq!(ids.len(), 2, "the killed run left no snapshot");
    assert_eq!(ids[1].as_str(), next["id"].as_str().unwrap());
    // What the killed run wrote is a leftover that prune removes after the grace period.
    let dry = json_of(&spirekeep(
        &t.with(&[
            "--json",
            "prune",
            "--keep-last",
            "5",
            "--dry-run",
            "--orphan-grace",
            "1s",
        ]),
        &[],
    ));
    let leftovers = dry["plan"]["leftovers"].as_array().unwrap();
    assert_eq!(leftovers.len(), 1, "{dry}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pruned = json_of(&spirekeep(
        &t.with(&[
            "--json",
            "prune",
            "--keep-last",
            "5",
            "--orphan-grace",
            "1s",
        ]),
        &[],
    ));
    assert_eq!(
        pruned["outcome"]["leftovers_deleted"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let left: Vec<String> = t
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with(keys::SNAPSHOTS))
        .filter(|k| !ids.iter().any(|id| k.contains(id.as_str())))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    eprintln!("next run proceeded {waited:?} after the kill (lease TTL 3 s)");
    t.cleanup().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_show_and_break() {
    let t = TestRepo::s3("lock-break").unwrap_or_else(TestRepo::file);
    let out = spirekeep(&t.with(&["lock", "show"]), &[]);
    assert!(
        stdout(&out).contains("free (no lock object)"),
        "{}",
        stdout(&out)
    );
    let out = spirekeep(&t.with(&["lock", "break"]), &[]);
    assert!(
        stdout(&out).contains("nothing to break"),
        "{}",
        stdout(&out)
    );

    // A live lease of a process elsewhere (renewed a moment ago, expiring in 10 minutes).
    let now = OffsetDateTime::now_utc();
    let live = LeaseRecord {
        format_version: 1,
        holder: "feedfacefeedface".into(),
        host: "other-host".into(),
        pid: 77,
        purpose: "prune".into(),
        spirekeep_version: "0.1.0".into(),
        acquired_at: now,
        renewed_at: now,
        expires_at: now + time::Duration::minutes(10),
        ttl_seconds: 600,
        released: false,
        broken_by: None,
    };
    t.repo
        .put_overwrite(
            keys::REPOSITORY_LOCK,
            serde_json::to_vec(&live).unwrap().into(),
        )
        .await
        .unwrap();
    let out = spirekeep(&t.with(&["lock", "show"]), &[]);
    assert!(
        stdout(&out).contains("HELD for prune by other-host pid 77"),
        "{}",
        stdout(&out)
    );
    let shown = json_of(&spirekeep(&t.with(&["--json", "lock", "show"]), &[]));
    assert_eq!(shown["lease"]["state"], "held");
    assert_eq!(shown["lease"]["record"]["holder"], "feedfacefeedface");
    let out = spirekeep(
        &t.with(&["prune", "--keep-last", "1", "--lock-wait", "0"]),
        &[],
    );
    assert_one_line_error(&out, 5, "is locked: prune by other-host pid 77");
    let out = spirekeep(&t.with(&["lock", "break"]), &[]);
    assert_one_line_error(&out, 5, "--force");
    let out = spirekeep(&t.with(&["lock", "break", "--force"]), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("broke the repository lock"),
        "{}",
        stdout(&out)
    );
    let out = spirekeep(&t.with(&["lock", "show"]), &[]);
    assert!(stdout(&out).contains("free"), "{}", stdout(&out));
    let out = spirekeep(
        &t.with(&["prune", "--keep-last", "1", "--lock-wait", "0"]),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    t.cleanup().await;
}

// ---------------------------------------------------------------- the agent

struct RunningAgent {
    child: Option<Child>,
    addr: String,
}

impl RunningAgent {
    fn start(t: &TestRepo, datastore: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec!["agent", "--datastore", datastore, "--listen", &addr];
        args.extend_from_slice(extra);
        let child = spawn(&t.with(&args));
        let agent = Self {
            child: Some(child),
            addr,
        };
        let start = Instant::now();
        while http_get(&agent.addr, "/healthz").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.addr, path).unwrap_or_else(|| panic!("GET {path} failed"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and returns the output once it exits.
    fn stop(mut self, signals: u32) -> std::process::Output {
        let child = self.child.take().unwrap();
        for _ in 0..signals {
            signal(child.id(), "TERM");
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_output(child, Duration::from_secs(60))
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (last success, last verified success) as `list --json` shows them: the
/// newest snapshot's finish, and that of the newest one whose newest
/// verification passed (0: none).
fn freshness(list: &[Json]) -> (i64, i64) {
    let success = list
        .last()
        .map_or(0, |s| unix(s["finished_at"].as_str().unwrap()));
    let verified = list
        .iter()
        .rev()
        .find(|s| s["last_verification"]["ok"] == Json::Bool(true))
        .map_or(0, |s| unix(s["finished_at"].as_str().unwrap()));
    (success, verified)
}

fn snapshots_listed(t: &TestRepo) -> Vec<Json> {
    let out = spirekeep(&t.with(&["--json", "list"]), &[]);
    json_of(&out).as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_backs_up_on_schedule_and_metrics_survive_a_restart() {
    let Some(t) = TestRepo::s3("agent") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("datastore.sqlite3");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/spire-datastore.sqlite3"
        ),
        &ds,
    )
    .unwrap();
    let ds = ds.display().to_string();

    // A backup every 3 seconds, keep the last 2, a deep verification every 5 seconds.
    let agent = RunningAgent::start(
        &t,
        &ds,
        &[
            "--schedule",
            "*/3 * * * * *",
            "--keep-last",
            "2",
            "--verify-schedule",
            "*/5 * * * * *",
        ],
    );
    let (status, health) = agent.get("/healthz");
    assert_eq!(status, 200, "{health}");
    assert!(health.starts_with("ok\n"), "{health}");
    let mut seen: BTreeMap<String, Json> = BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        for s in snapshots_listed(&t) {
            seen.insert(s["id"].as_str().unwrap().to_owned(), s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        seen.len() >= 3,
        "a backup every 3 s for 14 s: {:?}",
        seen.keys()
    );
    for s in seen.values() {
        // On time: each started within 1.5 s after its 3-second slot.
        let at = OffsetDateTime::parse(
            s["started_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let id = SnapshotId::parse(s["id"].as_str().unwrap()).unwrap();
        let slot = id.time().unix_timestamp() / 3 * 3;
        let late = id.time().unix_timestamp() - slot;
        assert!(
            late <= 1,
            "snapshot {id} started {late} s after its slot ({at})"
        );
        assert_eq!(s["labels"], serde_json::json!(["scheduled"]));
    }
    // Retention ran after each backup.
    let now_listed = snapshots_listed(&t);
    assert!(
        now_listed.len() <= 4,
        "keep-last 2 (plus one being written and the newest verified): {}",
        now_listed.len()
    );

    // /metrics matches the repository (retry: a backup may finish in between).
    let mut matched = false;
    for _ in 0..20 {
        let (status, text) = agent.get("/metrics");
        assert_eq!(status, 200);
        let list = snapshots_listed(&t);
        let (want, want_verified) = freshness(&list);
        if sample(&text, "spirekeep_backup_last_success_timestamp_seconds") == Some(want as f64)
            && sample(&text, "spirekeep_snapshots") == Some(list.len() as f64)
            && sample(
                &text,
                "spirekeep_backup_last_verified_success_timestamp_seconds",
            ) == Some(want_verified as f64)
        {
            assert!(want_verified > 0, "the agent verified a snapshot");
            assert_eq!(sample(&text, "spirekeep_verify_last_result"), Some(1.0));
            assert!(
                !text
                    .lines()
                    .any(|l| l.contains("failures_total{") && !l.ends_with(" 0")),
                "no failures: {text}"
            );
            assert_eq!(
                sample(&text, "spirekeep_backup_expected_interval_seconds"),
                Some(3.0)
            );
            assert!(
                text.contains(&format!("repository=\"{}\"", t.url)),
                "{text}"
            );
            promtool_check_metrics(&text);
            matched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(matched, "/metrics never matched the repository");
    let out = agent.stop(1);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("spirekeep agent stopped"),
        "{}",
        stderr(&out)
    );
    assert!(held_lease(&t.repo).await.is_none(), "the lock is released");

    // What the repository says now.
    let list = snapshots_listed(&t);
    let (want_success, want_verified) = freshness(&list);
    assert!(want_verified > 0);

    // Restarted (with a schedule that does not fire during the test), it
    // reports the same freshness from the repository: nothing was reset.
    let agent = RunningAgent::start(&t, &ds, &["--schedule", "0 0 1 1 *", "--keep-last", "2"]);
    let mut text = String::new();
    for _ in 0..100 {
        text = agent.get("/metrics").1;
        if text.contains("spirekeep_backup_last_success_timestamp_seconds") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sample(&text, "spirekeep_backup_last_success_timestamp_seconds"),
        Some(want_success as f64),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "spirekeep_backup_last_verified_success_timestamp_seconds"
        ),
        Some(want_verified as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "spirekeep_verify_last_result"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "spirekeep_snapshots"),
        Some(list.len() as f64),
        "{text}"
    );
    assert!(text.contains("spirekeep_backup_failures_total{"), "{text}");
    let (_, health) = agent.get("/healthz");
    assert!(health.contains("next backup: "), "{health}");
    assert_eq!(agent.get("/nope").0, 404);
    let out = agent.stop(1);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_sigterm_lets_the_running_backup_finish() {
    let Some(t) = TestRepo::s3("agent-sigterm") else {
        return;
    };
    let fx = big_sqlite("agent_sigterm").await;
    let url = fx.url();

    // One SIGTERM while a backup runs: the backup completes, then exit 0.
    let agent = RunningAgent::start(&t, &url, &["--schedule", "*/2 * * * * *"]);
    let start = Instant::now();
    loop {
        if agent.get("/healthz").1.contains("job: backup") && held_lease(&t.repo).await.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no backup started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = agent.pid();
    let out = agent.stop(1);
    assert_eq!(out.status.code(), Some(0), "pid {pid}: {}", stderr(&out));
    let ids = t.snapshot_ids().await;
    assert_eq!(
        ids.len(),
        1,
        "the running backup completed: {}",
        stderr(&out)
    );
    assert_eq!(
        Manifest::load(&t.repo, &ids[0]).await.unwrap().total_rows(),
        fx.counts.total()
    );
    assert!(held_lease(&t.repo).await.is_none(), "and released the lock");

    // Two signals: the running backup is dropped, leaving no manifest (so no
    // snapshot), the lock is released, and the agent still exits 0.
    let agent = RunningAgent::start(&t, &url, &["--schedule", "*/2 * * * * *"]);
    let start = Instant::now();
    loop {
        let writing = t
            .keys()
            .await
            .iter()
            .any(|k| k.starts_with(keys::SNAPSHOTS) && !k.contains(ids[0].as_str()));
        if writing && held_lease(&t.repo).await.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no backup started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = agent.stop(2);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("second signal"), "{}", stderr(&out));
    assert_eq!(t.snapshot_ids().await, ids, "no new snapshot");
    assert!(held_lease(&t.repo).await.is_none(), "the lock is released");
    t.cleanup().await;
    fx.cleanup().await;
}

// ---------------------------------------------------------------- one-shot metrics

#[tokio::test(flavor = "multi_thread")]
async fn one_shot_metrics_textfile_parses_and_the_pushgateway_takes_them() {
    let t = TestRepo::file();
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("spirekeep.prom");
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spire-datastore.sqlite3"
    );
    let ds = dir.path().join("ds.sqlite3");
    std::fs::copy(example, &ds).unwrap();
    let ds = ds.display().to_string();
    let prom_arg = prom.display().to_string();

    let out = spirekeep(
        &t.with(&[
            "--json",
            "backup",
            "--datastore",
            &ds,
            "--metrics-textfile",
            &prom_arg,
            "--expected-interval",
            "4h",
        ]),
        &[],
    );
    let backup = json_of(&out);
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_check_metrics(&text);
    assert_eq!(
        sample(&text, "spirekeep_backup_last_success_timestamp_seconds"),
        Some(unix(backup["finished_at"].as_str().unwrap()) as f64)
    );
    assert_eq!(
        sample(&text, "spirekeep_backup_expected_interval_seconds"),
        Some(14_400.0)
    );
    assert_eq!(
        sample(&text, "spirekeep_backup_last_rows"),
        Some(backup["rows"].as_f64().unwrap())
    );
    assert_eq!(
        sample(&text, "spirekeep_backup_last_size_bytes"),
        Some(backup["size"].as_f64().unwrap())
    );
    assert_eq!(sample(&text, "spirekeep_snapshots"), Some(1.0));
    assert!(
        text.contains(&format!(
            "spirekeep_backup_failures_total{{repository=\"{}\",kind=\"datastore\"}} 0",
            t.url
        )),
        "{text}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "the temporary file was renamed");

    // A failed run still reports: its failure by kind, and the repository's freshness.
    let out = spirekeep(
        &t.with(&[
            "backup",
            "--datastore",
            "/nonexistent/datastore.sqlite3",
            "--metrics-textfile",
            &prom_arg,
        ]),
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_check_metrics(&text);
    assert!(text.contains("kind=\"datastore\"} 1"), "{text}");
    assert_eq!(
        sample(&text, "spirekeep_backup_last_success_timestamp_seconds"),
        Some(unix(backup["finished_at"].as_str().unwrap()) as f64)
    );
    // A destination that cannot work is refused before anything runs.
    let out = spirekeep(
        &t.with(&[
            "backup",
            "--datastore",
            &ds,
            "--metrics-textfile",
            "/nonexistent/dir/x.prom",
        ]),
        &[],
    );
    assert_one_line_error(&out, 2, "does not exist");
    let out = spirekeep(
        &t.with(&["backup", "--datastore", &ds, "--pushgateway", "ftp://x"]),
        &[],
    );
    assert_one_line_error(&out, 2, "--pushgateway");
    assert_eq!(t.snapshot_ids().await.len(), 1);

    // A real Pushgateway.
    let Ok(pushgateway) = which("prometheus-pushgateway") else {
        assert!(
            !services_required(),
            "prometheus-pushgateway is not installed"
        );
        return;
    };
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _gateway = KillOnDrop(
        Command::new(pushgateway)
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while http_get(&addr, "/-/ready").is_none_or(|(s, _)| s != 200) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the Pushgateway did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://{addr}");
    let out = spirekeep(
        &t.with(&[
            "--json",
            "backup",
            "--datastore",
            &ds,
            "--pushgateway",
            &url,
            "--label",
            "cronjob",
        ]),
        &[],
    );
    let second = json_of(&out);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    let (status, text) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let line = text
        .lines()
        .find(|l| l.starts_with("spirekeep_backup_last_success_timestamp_seconds{"))
        .unwrap_or_else(|| panic!("not pushed:\n{text}"));
    assert!(line.contains("job=\"spirekeep\""), "{line}");
    assert!(
        line.contains(&format!("repository=\"{}\"", t.url)),
        "{line}"
    );
    let pushed: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        pushed,
        unix(second["finished_at"].as_str().unwrap()) as f64,
        "{line}"
    );
    // A failed run replaces the group too: failure counted, freshness kept.
    let out = spirekeep(
        &t.with(&[
            "backup",
            "--datastore",
            "/nonexistent/x.sqlite3",
            "--pushgateway",
            &url,
        ]),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let text = http_get(&addr, "/metrics").unwrap().1;
    assert!(
        text.lines()
            .any(|l| l.starts_with("spirekeep_backup_failures_total{")
                && l.contains("kind=\"datastore\"")
                && l.ends_with(" 1")),
        "{text}"
    );
    assert!(
        text.contains("spirekeep_backup_last_success_timestamp_seconds{"),
        "{text}"
    );
}

/// A child process that is killed when the test ends, even when it fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

// ---------------------------------------------------------------- the CLI contract

/// Every flag the deployment examples use (tests/deploy_promtool.rs checks
/// the examples against the same contract) exists on the real binary.
#[test]
fn the_deployment_examples_flags_exist() {
    let contract: [(&str, &[&str]); 6] = [
        (
            "backup",
            &[
                "--spire-config",
                "--datastore",
                "--repo",
                "--label",
                "--s3-endpoint",
                "--metrics-textfile",
                "--pushgateway",
                "--expected-interval",
                "--lock-wait",
            ],
        ),
        (
            "prune",
            &[
                "--repo",
                "--keep-last",
                "--keep-hourly",
                "--keep-daily",
                "--keep-weekly",
                "--keep-monthly",
                "--dry-run",
                "--pin-label",
                "--orphan-grace",
            ],
        ),
        (
            "agent",
            &[
                "--spire-config",
                "--repo",
                "--schedule",
                "--verify-schedule",
                "--keep-last",
                "--keep-daily",
                "--keep-weekly",
                "--keep-monthly",
                "--listen",
            ],
        ),
        ("lock", &["show", "break"]),
        ("pin", &["add", "remove", "list"]),
        ("list", &["--repo"]),
    ];
    for (command, flags) in contract {
        let out = spirekeep(&[command, "--help"], &[]);
        assert!(out.status.success(), "{command} --help: {}", stderr(&out));
        let help = stdout(&out);
        for flag in flags {
            assert!(
                help.contains(flag),
                "`spirekeep {command}` lacks {flag}:\n{help}"
            );
        }
    }
    let out = spirekeep(&["lock", "break", "--help"], &[]);
    assert!(stdout(&out).contains("--force"));
    assert!(
        stdout(&spirekeep(&["--help"], &[])).contains("SPIREKEEP_REPO")
            || stdout(&spirekeep(&["backup", "--help"], &[])).contains("SPIREKEEP_REPO")
    );
    let out = spirekeep(
        &[
            "agent",
            "--schedule",
            "every day",
            "--datastore",
            "x.sqlite3",
            "--repo",
            "/tmp/x",
        ],
        &[],
    );
    assert_one_line_error(&out, 2, "invalid cron schedule");
}

/// Lists every spirekeep invocation in the Kubernetes manifests and the
/// compose file as JSON `[[where, [args...]], ...]`; exit 3 without PyYAML.
const EXTRACT_INVOCATIONS: &str = r#"
import json, sys
try:
    import yaml
except ImportError:
    sys.exit(3)
out = []
def containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    for d in docs:
        if path.endswith("docker-compose.yml"):
            for name, svc in d.get("services", {}).items():
                if str(svc.get("image", "")).startswith("spirekeep"):
                    out.append([f"{path} {name}", [str(a) for a in svc["command"]]])
        else:
            for c in containers(d):
                if "spirekeep" in str(c.get("image", "")):
                    out.append([f"{path} {c.get('name')}", [str(a) for a in c["args"]]])
print(json.dumps(out))
"#;

/// The examples do not only use known flags (tests/deploy_promtool.rs checks
/// that): every invocation parses with the real command line, and its values
/// pass the checks spirekeep makes before running (labels, cron schedules,
/// retention rules).
#[test]
fn every_invocation_in_the_deployment_examples_is_accepted() {
    use clap::Parser as _;
    use spirekeep::cli::{Cli, Command as Sub};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = [
        root.join("docker-compose.yml"),
        root.join("deploy/kubernetes/spirekeep-agent.yaml"),
        root.join("deploy/kubernetes/spirekeep-cronjob.yaml"),
    ];
    let out = Command::new("python3")
        .arg("-c")
        .arg(EXTRACT_INVOCATIONS)
        .args(&files)
        .output();
    let out = match out {
        Ok(o) if o.status.code() == Some(3) || !o.status.success() && o.stdout.is_empty() => {
            assert!(
                !services_required(),
                "python3 with PyYAML is needed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Ok(o) => o,
        Err(e) => {
            assert!(!services_required(), "python3: {e}");
            return;
        }
    };
    let invocations: Vec<(String, Vec<String>)> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(invocations.len() >= 5, "{invocations:?}");
    let mut commands = BTreeSet::new();
    for (place, args) in invocations {
        let mut argv = vec!["spirekeep".to_owned()];
        argv.extend(args);
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{place}: {argv:?}: {e}"));
        let labels = |labels: &[String]| {
            for l in labels {
                spirekeep::snapshot::backup::validate_label(l)
                    .unwrap_or_else(|e| panic!("{place}: {e}"));
            }
        };
        match &cli.command {
            Sub::Backup(a) => {
                commands.insert("backup");
                labels(&a.labels);
            }
            Sub::Agent(a) => {
                commands.insert("agent");
                labels(&a.labels);
                spirekeep::agent::Schedule::parse(&a.schedule)
                    .unwrap_or_else(|e| panic!("{place}: {e}"));
                let verify = a.verify_schedule.as_deref().expect("the examples verify");
                spirekeep::agent::Schedule::parse(verify)
                    .unwrap_or_else(|e| panic!("{place}: {e}"));
                assert!(a.retention.keep_last > 0, "{place}: the examples prune");
            }
            Sub::Prune(a) => {
                commands.insert("prune");
                assert!(!a.dry_run, "{place}");
                assert!(a.retention.keep_last > 0, "{place}");
            }
            Sub::Verify(_) => {
                commands.insert("verify");
            }
            other => panic!("{place}: unexpected command {other:?}"),
        }
    }
    assert_eq!(
        commands,
        BTreeSet::from(["agent", "backup", "prune", "verify"])
    );
}
