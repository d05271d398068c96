//! `spirekeep restore` with the real binary against real servers: round trips
//! on every engine pair through file:// and S3 repositories, the MySQL
//! preflight (spire-reference §10), non-empty targets, the impact preview,
//! sequences, damaged snapshots, and restores killed part way.
//!
//! Each restore here is compared with its snapshot row for row, so it passes
//! `--keep-join-tokens` (the generated datastores hold unexpired tokens,
//! which a restore leaves out by default); `tests/restore_rules.rs` tests
//! the rules themselves.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    SpireFixture, assert_one_line_error, file_repo, ok_json, repositories, run_json, spirekeep,
    stderr, stdout,
};
use serde_json::Value as Json;
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{ColumnKind, Datastore, Engine, Value};
use spirekeep::snapshot::codec::content_hash;
use time::OffsetDateTime;

// ------------------------------------------------------------ helpers

/// Takes a snapshot and returns its id.
fn backup(url: &str, repo: &[String]) -> String {
    let s = ok_json(&["backup", "--datastore", url], repo);
    s["id"].as_str().unwrap().to_string()
}

/// Per table (sorted by name): row count and content hash of every row,
/// read in `order`'s column order when given (another engine's table), with
/// timestamps cut to `precision_ns` (1000 for PostgreSQL, 1e9 for MySQL).
async fn contents(
    ds: &dyn Datastore,
    order: Option<&BTreeMap<String, Vec<String>>>,
    precision_ns: u32,
) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    for mut table in ds.catalogue().await.unwrap().tables {
        if table.name.starts_with("_spirekeep_") {
            continue;
        }
        if let Some(cols) = order.and_then(|o| o.get(&table.name)) {
            table.columns = cols
                .iter()
                .map(|c| table.column(c).expect("same columns").clone())
                .collect();
        }
        let mut rows = ds.read_table(&table).await.unwrap();
        for row in &mut rows {
            for v in row.iter_mut() {
                if let Value::Timestamp(t) = v {
                    let n = t.nanosecond() / precision_ns * precision_ns;
                    *t = t.replace_nanosecond(n).unwrap();
                }
            }
        }
        let h = content_hash(&rows);
        out.insert(table.name.clone(), (h.rows(), h.hex()));
    }
    out
}

/// [`contents`] through a datastore opened and closed again: the test holds
/// no session on the target while spirekeep restores into it (a restore
/// refuses a target other clients use, issue 12).
async fn contents_of(fx: &SpireFixture) -> BTreeMap<String, (u64, String)> {
    let ds = fx.open().await;
    let out = contents(ds.as_ref(), None, 1).await;
    ds.close().await;
    out
}

async fn column_order(ds: &dyn Datastore) -> BTreeMap<String, Vec<String>> {
    ds.catalogue()
        .await
        .unwrap()
        .tables
        .into_iter()
        .map(|t| (t.name, t.columns.into_iter().map(|c| c.name).collect()))
        .collect()
}

fn precision(engine: Engine) -> u32 {
    match engine {
        Engine::Sqlite => 1,
        Engine::Postgres => 1_000,
        Engine::Mysql => 1_000_000_000,
    }
}

/// A population every engine holds exactly, hostile otherwise: into MySQL
/// no four-byte UTF-8 and whole seconds (what MySQL cannot hold is the
/// preflight's business, tested separately).
fn population(target: Engine, entries: usize) -> Population {
    Population {
        seed: 11,
        hostile: true,
        four_byte_utf8: (target == Engine::Mysql).then_some(false),
        subsecond: target != Engine::Mysql,
        ..Population::new(entries)
    }
}

/// Inserts a registered entry without an id and returns (its id, the largest id before).
async fn insert_entry_and_get_ids(ds: &dyn Datastore) -> (i64, i64) {
    let ids = |rows: Vec<Vec<Value>>| -> Vec<i64> {
        rows.into_iter()
            .map(|r| match r[0] {
                Value::Int(i) => i,
                ref v => panic!("id {v:?}"),
            })
            .collect()
    };
    let cat = ds.catalogue().await.unwrap();
    let mut t = cat.table("registered_entries").unwrap().clone();
    t.columns.retain(|c| c.name == "id" || c.name == "entry_id");
    let before = ids(ds.read_table(&t).await.unwrap());
    ds.insert_rows(
        "registered_entries",
        &[("entry_id".into(), ColumnKind::Text)],
        &[vec![Value::Text("inserted-after-restore".into())]],
    )
    .await
    .unwrap();
    let rows = ds.read_table(&t).await.unwrap();
    let new = rows
        .iter()
        .find(|r| r[1] == Value::Text("inserted-after-restore".into()))
        .map(|r| match r[0] {
            Value::Int(i) => i,
            ref v => panic!("id {v:?}"),
        })
        .unwrap();
    (new, before.into_iter().max().unwrap_or(0))
}

// ------------------------------------------------------------ round trips

/// Backs `source` up into every repository, restores each snapshot into a
/// fresh `target`, and compares every table row for row (through content
/// hashes, timestamps cut to the target's precision); then checks that ids
/// continue past the restored ones.
async fn round_trip(source: Engine, target: Engine) {
    let name = format!("rt-{source}-{target}");
    let pop = population(target, 25);
    let Some(src) = SpireFixture::create(source, &name, &pop).await else {
        return;
    };
    let src_ds = src.open().await;
    let order = column_order(src_ds.as_ref()).await;
    let expected = contents(src_ds.as_ref(), None, precision(target)).await;
    src_ds.close().await;
    let exact = !target.needs_preflight_from(source) || source == target;
    let dir = tempfile::tempdir().unwrap();
    for repo in repositories(&dir, &name) {
        let id = backup(&src.url(), &repo);
        let Some(dst) = SpireFixture::create_empty(target, &name).await else {
            return;
        };
        let report = ok_json(
            &[
                "restore",
                "--keep-join-tokens",
                &id,
                "--datastore",
                &dst.url(),
                "--accept-changes",
            ],
            &repo,
        );
        assert_eq!(report["restored"], true);
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(report["rows"], src.counts.total(), "{source}->{target}");
        // One pass: without a preflight nothing reads the snapshot before
        // the load, and nothing reads the target back after it.
        let mode = if target.needs_preflight_from(source) {
            "full"
        } else {
            "while-loading"
        };
        assert_eq!(
            report["plan"]["hash_check"]["mode"], mode,
            "{source}->{target}"
        );
        assert_eq!(report["plan"]["read_back"], false);
        // The largest ids come from the rows as they went in.
        let entries_seq = report["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["table"] == "registered_entries")
            .unwrap();
        assert!(entries_seq["max_id"].as_i64().unwrap() > 0, "{entries_seq}");
        for t in report["tables"].as_array().unwrap() {
            assert_eq!(t["ok"], true, "{source}->{target}: {t}");
            if exact {
                assert_eq!(t["matches_manifest"], true, "{source}->{target}: {t}");
            }
        }
        assert!(
            report["record_key"]
                .as_str()
                .unwrap()
                .starts_with("restores/")
        );
        let dst_ds = dst.open().await;
        let got = contents(dst_ds.as_ref(), Some(&order), precision(target)).await;
        assert_eq!(got, expected, "{source}->{target} via {}", repo[1]);
        // Auto-increment ids continue past the restored ones.
        let (new, max_before) = insert_entry_and_get_ids(dst_ds.as_ref()).await;
        assert!(
            new > max_before,
            "{source}->{target}: new id {new} after restored max {max_before}"
        );
        for s in report["sequences"].as_array().unwrap() {
            assert_ne!(s["ok"], false, "{source}->{target}: {s}");
        }
        dst_ds.close().await;
        dst.cleanup().await;
    }
    src.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_sqlite_to_sqlite() {
    round_trip(Engine::Sqlite, Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_sqlite_to_postgres() {
    round_trip(Engine::Sqlite, Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_sqlite_to_mysql() {
    round_trip(Engine::Sqlite, Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_postgres_to_postgres() {
    round_trip(Engine::Postgres, Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_postgres_to_sqlite() {
    round_trip(Engine::Postgres, Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_postgres_to_mysql() {
    round_trip(Engine::Postgres, Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_mysql_to_mysql() {
    round_trip(Engine::Mysql, Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_mysql_to_postgres() {
    round_trip(Engine::Mysql, Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_mysql_to_sqlite() {
    round_trip(Engine::Mysql, Engine::Sqlite).await;
}

// ------------------------------------------------------------ preflight into MySQL

fn at(seconds: i64, nanos: u32) -> Value {
    Value::Timestamp(
        OffsetDateTime::from_unix_timestamp(seconds)
            .unwrap()
            .replace_nanosecond(nanos)
            .unwrap(),
    )
}

/// A SQLite datastore MySQL holds exactly, plus `extra` entries.
async fn sqlite_with_entries(hint: &str, extra: &[Vec<Value>]) -> SpireFixture {
    let pop = Population {
        seed: 3,
        four_byte_utf8: Some(false),
        subsecond: false,
        ..Population::new(10)
    };
    let fx = SpireFixture::create(Engine::Sqlite, hint, &pop)
        .await
        .unwrap();
    let ds = fx.open().await;
    let cols = [
        ("id".to_string(), ColumnKind::Integer),
        ("created_at".to_string(), ColumnKind::Timestamp),
        ("entry_id".to_string(), ColumnKind::Text),
        ("spiffe_id".to_string(), ColumnKind::Text),
    ];
    ds.insert_rows("registered_entries", &cols, extra)
        .await
        .unwrap();
    ds.close().await;
    fx
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_into_mysql_lists_every_change_and_applies_exactly_those_when_accepted() {
    let fx = sqlite_with_entries(
        "preflight",
        &[
            vec![
                Value::Int(9001),
                at(1_780_000_000, 500_000_000),
                Value::Text("entry-9001".into()),
                Value::Text("spiffe://example.org/emoji/😀".into()),
            ],
            vec![
                Value::Int(9002),
                at(1_780_000_001, 0),
                Value::Text("entry-9002".into()),
                Value::Text("spiffe://example.org/clef/𝄞/x".into()),
            ],
        ],
    )
    .await;
    let Some(dst) = SpireFixture::create_empty(Engine::Mysql, "preflight").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    let url = dst.url();

    // Refused: every affected value is listed, nothing is written.
    let (code, plan, err) = run_json(
        &["restore", "--keep-join-tokens", &id, "--datastore", &url],
        &repo,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--accept-changes"), "{err}");
    let changes: Vec<(String, String, String, String)> = plan["preflight"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["table"].as_str().unwrap().to_string(),
                c["row"].as_str().unwrap().to_string(),
                c["column"].as_str().unwrap().to_string(),
                c["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String, String)> = [
        ("id=9001", "created_at", "sub_second_timestamp"),
        ("id=9001", "spiffe_id", "four_byte_utf8"),
        ("id=9002", "spiffe_id", "four_byte_utf8"),
    ]
    .iter()
    .map(|(r, c, k)| {
        (
            "registered_entries".to_string(),
            (*r).to_string(),
            (*c).to_string(),
            (*k).to_string(),
        )
    })
    .collect();
    assert_eq!(changes, expected);
    assert_eq!(plan["refusals"][0]["reason"], "needs_consent");
    let target = dst.open().await;
    assert!(
        target.catalogue().await.unwrap().tables.is_empty(),
        "nothing written"
    );
    // Text output lists them too.
    let out = spirekeep(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            &url,
            &repo[0],
            &repo[1],
        ],
        &[],
    );
    assert_one_line_error(&out, 1, "--accept-changes");
    let text = stdout(&out);
    assert!(
        text.contains("registered_entries  id=9001  spiffe_id  four_byte_utf8"),
        "{text}"
    );

    // Accepted: exactly those changes, recorded.
    let report = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            &url,
            "--accept-changes",
            "--read-back",
        ],
        &repo,
    );
    assert_eq!(report["changes_applied"], 3);
    assert_eq!(report["plan"]["read_back"], true);
    let entries = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "registered_entries")
        .unwrap()
        .clone();
    assert_eq!(entries["adapted_values"], 3);
    assert_eq!(entries["matches_manifest"], false);
    assert_eq!(entries["ok"], true, "read back equals the adapted rows");
    assert_eq!(entries["read_back"], true);
    let record_key = report["record_key"].as_str().unwrap();
    let record: Json =
        serde_json::from_slice(&std::fs::read(dir.path().join("repo").join(record_key)).unwrap())
            .unwrap();
    assert_eq!(record["changes_total"], 3);
    assert_eq!(record["changes"], plan["preflight"]["changes"]);
    assert_eq!(record["target_engine"], "mysql");
    // What MySQL now holds.
    let cat = target.catalogue().await.unwrap();
    let mut t = cat.table("registered_entries").unwrap().clone();
    t.columns
        .retain(|c| ["id", "created_at", "spiffe_id"].contains(&c.name.as_str()));
    let rows = target.read_table(&t).await.unwrap();
    let row = rows.iter().find(|r| r[0] == Value::Int(9001)).unwrap();
    // .5 s rounds up, as SPIRE's API rounds created_at (roundedInSecondsUnix).
    assert_eq!(row[1], at(1_780_000_001, 0));
    assert_eq!(
        row[2],
        Value::Text("spiffe://example.org/emoji/\u{FFFD}".into())
    );
    target.close().await;
    dst.cleanup().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn values_that_collide_under_mysql_collation_are_refused_even_when_changes_are_accepted() {
    let fx = sqlite_with_entries(
        "collide",
        &[
            vec![
                Value::Int(9001),
                at(1_780_000_000, 0),
                Value::Text("Entry-Collide".into()),
                Value::Text("spiffe://example.org/a".into()),
            ],
            vec![
                Value::Int(9002),
                at(1_780_000_000, 0),
                Value::Text("entry-collide  ".into()),
                Value::Text("spiffe://example.org/b".into()),
            ],
        ],
    )
    .await;
    let Some(dst) = SpireFixture::create_empty(Engine::Mysql, "collide").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    for accept in [false, true] {
        let mut args = vec!["restore", "--keep-join-tokens", id.as_str(), "--datastore"];
        let url = dst.url();
        args.push(&url);
        if accept {
            args.push("--accept-changes");
        }
        let (code, plan, err) = run_json(&args, &repo);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("cannot go into mysql at all"), "{err}");
        let collisions: Vec<&Json> = plan["preflight"]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["kind"] == "unique_collision")
            .collect();
        assert_eq!(collisions.len(), 1, "{plan}");
        assert_eq!(collisions[0]["row"], "id=9002");
        assert_eq!(collisions[0]["column"], "uix_registered_entries_entry_id");
        assert!(
            collisions[0]["detail"]
                .as_str()
                .unwrap()
                .contains("id=9001")
        );
    }
    let target = dst.open().await;
    assert!(
        target.catalogue().await.unwrap().tables.is_empty(),
        "nothing written"
    );
    target.close().await;
    dst.cleanup().await;
    fx.cleanup().await;
}

// ------------------------------------------------------------ live targets

#[tokio::test(flavor = "multi_thread")]
async fn a_non_empty_target_is_refused_without_replace_and_replaced_with_it() {
    let Some(src) = SpireFixture::create(Engine::Postgres, "nonempty", &Population::new(15)).await
    else {
        return;
    };
    let other = Population {
        seed: 99,
        ..Population::new(7)
    };
    let dst = SpireFixture::create(Engine::Postgres, "nonempty", &other)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let before = contents_of(&dst).await;

    let mut args = vec![
        "restore".to_string(),
        "--keep-join-tokens".to_string(),
        id.clone(),
        "--datastore".into(),
        dst.url(),
    ];
    args.extend(repo.iter().cloned());
    let out = spirekeep(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_one_line_error(&out, 2, "--replace");
    assert_eq!(contents_of(&dst).await, before, "untouched");

    let report = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            "--keep-snapshot-bundle",
            "--keep-snapshot-revisions",
            &id,
            "--datastore",
            &dst.url(),
            "--replace",
        ],
        &repo,
    );
    assert_eq!(report["ok"], true);
    assert_eq!(
        report["plan"]["existing_tables"].as_array().unwrap().len(),
        13
    );
    let src_ds = src.open().await;
    assert_eq!(
        contents_of(&dst).await,
        contents(src_ds.as_ref(), None, 1).await
    );
    src_ds.close().await;
    dst.cleanup().await;
    src.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_shows_the_impact_and_changes_nothing() {
    let Some(fx) = SpireFixture::create(Engine::Postgres, "dryrun", &Population::new(20)).await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    // Since the snapshot: one agent attested with a join token, one entry
    // created, one bundle deleted.
    let ds = fx.open().await;
    let cols = [
        ("spiffe_id".to_string(), ColumnKind::Text),
        ("data_type".to_string(), ColumnKind::Text),
        ("serial_number".to_string(), ColumnKind::Text),
    ];
    ds.insert_rows(
        "attested_node_entries",
        &cols,
        &[vec![
            Value::Text("spiffe://example.org/spire/agent/join_token/new-since".into()),
            Value::Text("join_token".into()),
            Value::Text("12345".into()),
        ]],
    )
    .await
    .unwrap();
    ds.insert_rows(
        "registered_entries",
        &[("entry_id".into(), ColumnKind::Text)],
        &[vec![Value::Text("created-since".into())]],
    )
    .await
    .unwrap();
    ds.execute_script("DELETE FROM bundles WHERE id = (SELECT max(id) FROM bundles)")
        .await
        .unwrap();
    let before = contents(ds.as_ref(), None, 1).await;
    ds.close().await;

    let plan = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            &fx.url(),
            "--replace",
            "--dry-run",
        ],
        &repo,
    );
    assert_eq!(plan["refusals"], serde_json::json!([]));
    let impact = &plan["impact"];
    assert_eq!(impact["agents"]["attested_since"], 1, "{impact}");
    assert_eq!(impact["agents"]["join_token_agents"], 1);
    assert_eq!(
        impact["agents"]["examples"][0],
        "spiffe://example.org/spire/agent/join_token/new-since"
    );
    assert_eq!(impact["entries"]["created_since"], 1);
    assert_eq!(impact["entries"]["created_examples"][0], "created-since");
    assert_eq!(impact["bundles"]["deleted_since"], 1);
    assert_eq!(plan["other_sessions"], serde_json::json!([]), "{plan}");
    assert_eq!(contents_of(&fx).await, before, "nothing changed");

    // Text form, without --replace: the impact is shown, and the restore would be refused.
    let out = spirekeep(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            &fx.url(),
            "--dry-run",
            &repo[0],
            &repo[1],
        ],
        &[],
    );
    assert_one_line_error(&out, 2, "--replace");
    let text = stdout(&out);
    assert!(
        text.contains("agents attested since the snapshot: 1"),
        "{text}"
    );
    assert!(text.contains("join-token agents: 1"), "{text}");
    assert_eq!(contents_of(&fx).await, before, "nothing changed");
    // No restore record for a dry run.
    assert!(!dir.path().join("repo").join("restores").exists());
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_into_a_new_sqlite_file_leaves_no_file() {
    let fx = SpireFixture::create(Engine::Sqlite, "dry-new", &Population::new(5))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    let target = dir.path().join("new.sqlite3");
    let plan = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            target.to_str().unwrap(),
            "--dry-run",
        ],
        &repo,
    );
    assert_eq!(plan["existing_tables"], serde_json::json!([]));
    assert!(plan["impact"].is_null());
    assert!(!target.exists());
}

// ------------------------------------------------------------ damaged snapshots

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_snapshot_is_refused_before_the_target_is_touched() {
    let fx = SpireFixture::create(Engine::Sqlite, "damaged", &Population::new(30))
        .await
        .unwrap();
    let live = SpireFixture::create(
        Engine::Sqlite,
        "damaged-live",
        &Population {
            seed: 5,
            ..Population::new(8)
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    let object = dir
        .path()
        .join("repo/snapshots")
        .join(&id)
        .join("data/selectors.0.spkd.zst");
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&object, &bytes).unwrap();
    let live_ds = live.open().await;
    let before = contents(live_ds.as_ref(), None, 1).await;
    for extra in [vec![], vec!["--accept-changes"]] {
        let mut args = vec!["restore", "--keep-join-tokens", id.as_str(), "--datastore"];
        let url = live.url();
        args.push(&url);
        args.push("--replace");
        args.extend(extra);
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert_one_line_error(&out, 1, "failed its hash check");
        let err = stderr(&out);
        assert!(err.contains("table selectors"), "{err}");
        assert!(
            err.contains(&format!("snapshots/{id}/data/selectors.0.spkd.zst")),
            "{err}"
        );
    }
    assert_eq!(
        contents(live_ds.as_ref(), None, 1).await,
        before,
        "untouched"
    );
    // A new SQLite target is not even created.
    let fresh = dir.path().join("fresh.sqlite3");
    let out = spirekeep(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            fresh.to_str().unwrap(),
            &repo[0],
            &repo[1],
        ],
        &[],
    );
    assert_one_line_error(&out, 1, "failed its hash check");
    assert!(!fresh.exists());
    live_ds.close().await;
}

// ------------------------------------------------------------ killed restores

/// Starts `spirekeep -v restore`, waits until it logs that it is loading
/// `table`, then kills it with SIGKILL. Returns whether it was killed (false
/// if it finished first).
fn kill_restore_while_loading(args: &[String], table: &str, after: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spirekeep"))
        .arg("-v")
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let needle = format!("table={table} ");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        eprintln!("restore: {line}");
        if line.contains("loading table") && line.contains(&needle) {
            seen = true;
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
    }
    assert!(seen, "the restore never loaded {table}");
    // Let it write some rows of the table first.
    std::thread::sleep(after);
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    !status.success()
}

async fn killed_restore_leaves_the_target_as_it_was(engine: Engine) {
    let big = Population {
        seed: 21,
        ..Population::new(8_000)
    };
    let src = SpireFixture::create(Engine::Sqlite, "killed-src", &big)
        .await
        .unwrap();
    let live_pop = Population {
        seed: 22,
        ..Population::new(10)
    };
    let Some(dst) = SpireFixture::create(engine, "killed", &live_pop).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let before = contents_of(&dst).await;
    let mut args = vec![
        "restore".to_string(),
        "--keep-join-tokens".to_string(),
        id.clone(),
        "--datastore".into(),
        dst.url(),
        "--replace".into(),
        "--accept-changes".into(),
        // A killed run's repository lock expires after this, for the next run.
        "--lock-ttl".into(),
        "3s".into(),
    ];
    args.extend(repo.iter().cloned());
    // In the largest table (loaded first), and a few tables in.
    for (table, after_ms) in [("selectors", 50), ("dns_names", 150)] {
        let killed = kill_restore_while_loading(&args, table, Duration::from_millis(after_ms));
        assert!(
            killed,
            "{engine}: the restore finished before the kill at {table}"
        );
        assert_eq!(
            contents_of(&dst).await,
            before,
            "{engine}: killed while loading {table}, the target is as it was"
        );
    }
    // The next restore goes through (MySQL removes the killed one's shadow tables).
    let mut json_args: Vec<&str> = args.iter().map(String::as_str).collect();
    json_args.insert(0, "--json");
    let out = spirekeep(&json_args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Json = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["rows"], src.counts.total());
    let dst_ds = dst.open().await;
    let tables: Vec<String> = dst_ds
        .catalogue()
        .await
        .unwrap()
        .tables
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(
        tables.len(),
        13,
        "{engine}: no shadow tables left: {tables:?}"
    );
    dst_ds.close().await;
    dst.cleanup().await;
    src.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_restore_into_postgres_leaves_the_target_as_it_was() {
    killed_restore_leaves_the_target_as_it_was(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_restore_into_mysql_leaves_the_target_as_it_was() {
    killed_restore_leaves_the_target_as_it_was(Engine::Mysql).await;
}

// ------------------------------------------------------------ staging tables and restore locks (issue 14)

/// Every table in the MySQL database, staging tables included (the
/// catalogue leaves those out, so it cannot tell).
async fn mysql_tables_physically(url: &str) -> Vec<String> {
    let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    let tables = sqlx::query_scalar::<_, String>(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    tables
}

/// A PostgreSQL restore loads into a staging schema and swaps the tables in
/// at its end. Regression: it dropped the tables it replaces first, so every
/// reader of the target (a server kept running, a backup) waited on their
/// locks for the whole load. Now they stay readable until the swap; a kill
/// then leaves the target as it was (the staging schema, committed as the
/// tables loaded, stays behind), and the next restore clears the staging
/// schema and goes through, leaving none.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restore_leaves_the_replaced_tables_readable_until_its_swap() {
    let Some(src) = SpireFixture::create(Engine::Postgres, "swap-src", &Population::new(30)).await
    else {
        return;
    };
    let other = Population {
        seed: 5,
        ..Population::new(12)
    };
    let dst = SpireFixture::create(Engine::Postgres, "swap-dst", &other)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let before = contents_of(&dst).await;
    let url = dst.url();
    let mut args = vec![
        "restore",
        "--keep-join-tokens",
        "--keep-snapshot-bundle",
        "--keep-snapshot-revisions",
        id.as_str(),
        "--datastore",
        url.as_str(),
        "--replace",
        // The killed restore's repository lease expires soon.
        "--lock-ttl",
        "2s",
    ];
    args.extend(repo.iter().map(String::as_str));

    let mut child = Command::new(env!("CARGO_BIN_EXE_spirekeep"))
        .args(&args)
        .env("NO_COLOR", "1")
        .env(spirekeep::testpoint::PAUSE_AT_ENV, "restore.before_commit")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let paused = spirekeep::testpoint::announcement("restore.before_commit");
    let progress = BufReader::new(child.stderr.take().unwrap());
    let mut seen = false;
    for line in progress.lines() {
        let line = line.unwrap_or_default();
        eprintln!("restore: {line}");
        if line.contains(&paused) {
            seen = true;
            break;
        }
    }
    assert!(seen, "the restore never reached its commit");
    // Every row is loaded; the replaced tables answer at once.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("SET lock_timeout = '3s'")
        .execute(&mut conn)
        .await
        .unwrap();
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM registered_entries")
        .fetch_one(&mut conn)
        .await
        .expect("the replaced tables are readable while the restore loads");
    assert_eq!(entries, 12);
    let _ = child.kill();
    child.wait().unwrap();
    let schemas_sql = "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE '%spirekeep%'";
    let schemas: Vec<String> = sqlx::query_scalar(schemas_sql)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(schemas, ["_spirekeep_restore"], "the killed load's staging");
    sqlx::Connection::close(conn).await.unwrap();
    assert_eq!(
        contents_of(&dst).await,
        before,
        "the killed restore changed nothing"
    );

    let out = spirekeep(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let schemas: Vec<String> = sqlx::query_scalar(schemas_sql)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(schemas.is_empty(), "left behind: {schemas:?}");
    sqlx::Connection::close(conn).await.unwrap();
    let src_ds = src.open().await;
    assert_eq!(
        contents_of(&dst).await,
        contents(src_ds.as_ref(), None, 1).await
    );
    src_ds.close().await;
    dst.cleanup().await;
    src.cleanup().await;
}

/// A PostgreSQL restore whose index build fails after every row loaded (here
/// a manifest that declares an index unique over duplicated values) fails
/// with the database's error, leaves the target as it was, and removes its
/// staging schema at once rather than at the next restore.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restore_whose_index_build_fails_leaves_the_target_and_no_staging() {
    let Some(src) =
        SpireFixture::create(Engine::Postgres, "badindex-src", &Population::new(40)).await
    else {
        return;
    };
    let other = Population {
        seed: 6,
        ..Population::new(12)
    };
    let dst = SpireFixture::create(Engine::Postgres, "badindex-dst", &other)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let path = dir
        .path()
        .join("repo/snapshots")
        .join(&id)
        .join("manifest.json");
    let mut manifest: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut made_unique = 0;
    for t in manifest["catalogue"]["tables"].as_array_mut().unwrap() {
        for ix in t["indexes"].as_array_mut().unwrap() {
            if ix["name"] == "idx_registered_entries_parent_id" {
                ix["unique"] = Json::Bool(true);
                made_unique += 1;
            }
        }
    }
    assert_eq!(made_unique, 1);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let before = contents_of(&dst).await;
    let url = dst.url();
    let mut args = vec![
        "restore",
        "--keep-join-tokens",
        "--keep-snapshot-bundle",
        "--keep-snapshot-revisions",
        id.as_str(),
        "--datastore",
        url.as_str(),
        "--replace",
    ];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert!(!out.status.success(), "the duplicate keys were accepted");
    let err = stderr(&out);
    assert!(
        err.contains("idx_registered_entries_parent_id") || err.contains("duplicate key"),
        "{err}"
    );
    assert_eq!(contents_of(&dst).await, before, "the target is as it was");
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE '%spirekeep%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(schemas.is_empty(), "left behind: {schemas:?}");
    sqlx::Connection::close(conn).await.unwrap();
    dst.cleanup().await;
    src.cleanup().await;
}

/// A restore user that may not create a schema in the database (the owner
/// granted it only the `public` schema, as managed setups do) still
/// restores: into an empty target, then over it with `--replace`, with the
/// tables replaced in place inside the one transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restore_without_the_create_privilege_replaces_in_place() {
    let Some(dst) = SpireFixture::create_empty(Engine::Postgres, "nocreate").await else {
        return;
    };
    let mut owner = <sqlx::PgConnection as sqlx::Connection>::connect(&dst.url())
        .await
        .unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut owner)
        .await
        .unwrap();
    for sql in [
        format!("REVOKE CREATE ON DATABASE \"{database}\" FROM PUBLIC"),
        "GRANT ALL ON SCHEMA public TO spirekeep_auth".to_string(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut owner)
            .await
            .unwrap();
    }
    sqlx::Connection::close(owner).await.unwrap();
    // spirekeep_auth's password is really checked (scripts/test-services.sh).
    let url = format!(
        "postgres://spirekeep_auth:right-password@127.0.0.1:5432/{database}?sslmode=disable"
    );
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let mut expected = Vec::new();
    for (i, entries) in [(0, 9), (1, 17)] {
        let src = SpireFixture::create(
            Engine::Sqlite,
            &format!("nocreate-src{i}"),
            &Population {
                seed: 40 + i,
                ..Population::new(entries)
            },
        )
        .await
        .unwrap();
        let id = backup(&src.url(), &repo);
        let report = ok_json(
            &[
                "restore",
                "--keep-join-tokens",
                "--keep-snapshot-bundle",
                "--keep-snapshot-revisions",
                &id,
                "--datastore",
                &url,
                "--replace",
                "--accept-changes",
            ],
            &repo,
        );
        assert_eq!(report["ok"], true);
        let src_ds = src.open().await;
        let order = column_order(src_ds.as_ref()).await;
        expected.push(contents(src_ds.as_ref(), None, 1000).await);
        src_ds.close().await;
        // Read as the restore user, who owns the tables.
        let spec = spirekeep::datastore::dsn::parse(
            &url,
            Some(Engine::Postgres),
            std::path::Path::new("."),
        )
        .unwrap();
        let dst_ds = spirekeep::datastore::open(&spec, spirekeep::datastore::OpenMode::ReadWrite)
            .await
            .unwrap();
        assert_eq!(
            contents(dst_ds.as_ref(), Some(&order), 1000).await,
            *expected.last().unwrap(),
            "restore {i}"
        );
        dst_ds.close().await;
        src.cleanup().await;
    }
    dst.cleanup().await;
}

/// A SQLite restore loads into a staging file and copies it into the target
/// in one write transaction of the target's. So: a connection that held the
/// target open throughout (a server kept running with `--force`) reads the
/// restored tables, not an unlinked old file; the file holds no free pages of
/// the replaced tables (regression: the restore dropped and refilled them in
/// place, and the file kept the old tables' pages as free space); it is in
/// WAL mode; and the staging file, a killed restore's leftover included, is
/// gone afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_restore_copies_its_staging_file_into_the_target() {
    let src = SpireFixture::create(Engine::Sqlite, "staged-src", &Population::new(40))
        .await
        .unwrap();
    let other = Population {
        seed: 7,
        ..Population::new(120)
    };
    let dst = SpireFixture::create(Engine::Sqlite, "staged-dst", &other)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let target = dst.sqlite_path();
    let mut leftover = target.clone().into_os_string();
    leftover.push(".spirekeep-restore");
    std::fs::write(&leftover, b"a killed restore's half-written staging file").unwrap();

    // A connection that stays open on the target, in WAL mode as SPIRE's.
    let held = dst.open().await;
    held.execute_script("PRAGMA journal_mode=WAL")
        .await
        .unwrap();
    let entries = || held.count_rows("registered_entries");
    assert_eq!(entries().await.unwrap(), 120);

    let report = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            "--keep-snapshot-bundle",
            "--keep-snapshot-revisions",
            &id,
            "--datastore",
            &dst.url(),
            "--replace",
            "--force",
        ],
        &repo,
    );
    assert_eq!(report["ok"], true);
    assert_eq!(
        entries().await.unwrap(),
        40,
        "the held connection sees the restore"
    );
    let src_ds = src.open().await;
    assert_eq!(
        contents(held.as_ref(), None, 1).await,
        contents(src_ds.as_ref(), None, 1).await
    );
    src_ds.close().await;
    held.close().await;

    let conn = rusqlite::Connection::open(&target).unwrap();
    let pragma = |name: &str| -> String {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| {
            r.get::<_, rusqlite::types::Value>(0)
        })
        .map(|v| format!("{v:?}"))
        .unwrap()
    };
    assert_eq!(
        pragma("freelist_count"),
        "Integer(0)",
        "no free pages left behind"
    );
    assert_eq!(pragma("journal_mode"), "Text(\"wal\")");
    assert_eq!(pragma("integrity_check"), "Text(\"ok\")");
    drop(conn);
    let left: Vec<String> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("spirekeep-restore"))
        .collect();
    assert!(left.is_empty(), "staging files left: {left:?}");
    dst.cleanup().await;
    src.cleanup().await;
}

/// Regression: a MySQL load sent each batch in statements of up to 5,000
/// rows whatever their size, so a batch of large values went over the
/// server's `max_allowed_packet` and the load failed. Statements now carry
/// at most half of it, in a restore's staging load and in `insert_rows`.
#[tokio::test(flavor = "multi_thread")]
async fn mysql_statements_stay_under_the_servers_packet_limit() {
    let Some(fx) = SpireFixture::create_empty(Engine::Mysql, "packet").await else {
        eprintln!("no MySQL test server: skipped");
        return;
    };
    let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(&fx.url())
        .await
        .unwrap();
    let packet: u64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS UNSIGNED)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    assert!(
        packet <= 256 << 20,
        "max_allowed_packet is {packet}: too large for this test to exceed"
    );
    let value_len = 1 << 20;
    let n = usize::try_from(packet).unwrap() / value_len + 4;
    let rows: Vec<Vec<Value>> = (0..n)
        .map(|i| {
            vec![
                Value::Int(i64::try_from(i).unwrap()),
                Value::Bytes(vec![u8::try_from(i % 251).unwrap(); value_len]),
            ]
        })
        .collect();
    let columns = [
        ("id".to_string(), ColumnKind::Integer),
        ("data".to_string(), ColumnKind::Bytes),
    ];
    let ds = fx.open().await;
    ds.execute_script("CREATE TABLE blobs (id BIGINT NOT NULL PRIMARY KEY, data LONGBLOB)")
        .await
        .unwrap();
    ds.insert_rows("blobs", &columns, &rows).await.unwrap();
    let table = ds
        .catalogue()
        .await
        .unwrap()
        .table("blobs")
        .unwrap()
        .clone();
    let mut restore = ds.begin_restore(&["blobs".to_string()]).await.unwrap();
    restore.create_table(Engine::Mysql, &table).await.unwrap();
    let staging = restore.staging_name("blobs");
    restore
        .insert_rows(&staging, &columns, &rows)
        .await
        .unwrap();
    restore.commit(std::slice::from_ref(&table)).await.unwrap();
    let back = ds.read_table(&table).await.unwrap();
    assert_eq!(back, rows);
    ds.close().await;
    fx.cleanup().await;
}

/// Regression (issue 14), reproduced: a `restore --replace` into MariaDB
/// killed (SIGKILL) while loading left `_spirekeep_new_*` tables; the next
/// backup snapshotted them as user tables and restoring that snapshot made
/// them permanent. Now backups, catalogues and impact reports never see them,
/// and the next restore removes them (and `_spirekeep_old_*` tables left by
/// a kill between the swap and the drop).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_mysql_restore_leaves_nothing_a_backup_or_restore_sees() {
    let big = Population {
        seed: 31,
        ..Population::new(8_000)
    };
    let src = SpireFixture::create(Engine::Sqlite, "staging-src", &big)
        .await
        .unwrap();
    let live_pop = Population {
        seed: 32,
        ..Population::new(10)
    };
    let Some(dst) = SpireFixture::create(Engine::Mysql, "staging", &live_pop).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let mut args = vec![
        "restore".to_string(),
        "--keep-join-tokens".to_string(),
        id.clone(),
        "--datastore".into(),
        dst.url(),
        "--replace".into(),
        "--accept-changes".into(),
        "--lock-ttl".into(),
        "3s".into(),
    ];
    args.extend(repo.iter().cloned());
    assert!(kill_restore_while_loading(
        &args,
        "selectors",
        Duration::from_millis(50)
    ));
    // A kill between the swap and the drop leaves replaced tables behind.
    let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(dst.url().as_str())
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE _spirekeep_old_bundles LIKE bundles; \
         INSERT INTO _spirekeep_old_bundles SELECT * FROM bundles",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let physical = mysql_tables_physically(&dst.url()).await;
    let staging = physical
        .iter()
        .filter(|t| t.starts_with("_spirekeep_"))
        .count();
    assert!(staging >= 2, "the kill left staging tables: {physical:?}");

    // The catalogue, a backup and the impact preview see only the 13 tables.
    let before = contents_of(&dst).await;
    assert_eq!(before.len(), 13, "{:?}", before.keys());
    let snapshot = ok_json(&["backup", "--datastore", &dst.url()], &repo);
    let dst_id = snapshot["id"].as_str().unwrap().to_string();
    let shown = ok_json(&["show", &dst_id], &repo);
    let names: Vec<&str> = shown["manifest"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 13, "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("_spirekeep_")),
        "{names:?}"
    );
    assert_eq!(
        shown["summary"]["rows"].as_u64().unwrap(),
        before.values().map(|(rows, _)| rows).sum::<u64>(),
        "no half-loaded rows in the snapshot"
    );
    let dry = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            &dst.url(),
            "--replace",
            "--accept-changes",
            "--dry-run",
        ],
        &repo,
    );
    assert_eq!(
        dry["existing_tables"].as_array().unwrap().len(),
        13,
        "{dry}"
    );

    // The next restore removes every leftover and goes through.
    let mut json_args: Vec<&str> = args.iter().map(String::as_str).collect();
    json_args.insert(0, "--json");
    let out = spirekeep(&json_args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let physical = mysql_tables_physically(&dst.url()).await;
    assert_eq!(
        physical.len(),
        13,
        "nothing of spirekeep's left: {physical:?}"
    );
    // Restoring the snapshot of the damaged target gives back what it showed.
    let dst_url = dst.url();
    let mut back = vec![
        "--json",
        "restore",
        "--keep-join-tokens",
        dst_id.as_str(),
        "--datastore",
        dst_url.as_str(),
        "--replace",
        "--accept-changes",
    ];
    back.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&back, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(contents_of(&dst).await, before);
    assert_eq!(mysql_tables_physically(&dst.url()).await.len(), 13);
    dst.cleanup().await;
    src.cleanup().await;
}

/// Issue 14: a snapshot taken before backups ignored staging tables (a
/// MySQL target whose killed restore left `_spirekeep_new_*` and
/// `_spirekeep_old_*` tables) carries them as ordinary tables. Restoring it
/// brings back only SPIRE's tables, into MariaDB and into SQLite, and the
/// `--replace` of such a snapshot does not fail on the swap.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_snapshot_carrying_staging_tables_restores_without_them() {
    let src = SpireFixture::create(
        Engine::Sqlite,
        "old-staging-src",
        &population(Engine::Mysql, 20),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    // Make it what an old spirekeep wrote: the leftovers as user tables
    // (their data are copies of the tables they were made from).
    let manifest_path = dir
        .path()
        .join("repo/snapshots")
        .join(&id)
        .join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    for (copy, of) in [
        ("_spirekeep_new_join_tokens", "join_tokens"),
        ("_spirekeep_old_bundles", "bundles"),
    ] {
        for path in ["/catalogue/tables", "/tables"] {
            let list = manifest.pointer_mut(path).unwrap().as_array_mut().unwrap();
            let mut entry = list.iter().find(|t| t["name"] == of).unwrap().clone();
            entry["name"] = copy.into();
            for object in entry["objects"].as_array_mut().into_iter().flatten() {
                let key = object["key"].as_str().unwrap().to_owned();
                let moved = key.replace(&format!("/data/{of}."), &format!("/data/{copy}."));
                let on_disk = |k: &str| dir.path().join("repo").join(k);
                std::fs::copy(on_disk(&key), on_disk(&moved)).unwrap();
                object["key"] = moved.into();
            }
            list.push(entry);
        }
    }
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let shown = ok_json(&["show", &id], &repo);
    assert_eq!(shown["manifest"]["tables"].as_array().unwrap().len(), 15);

    let expected = contents(src.open().await.as_ref(), None, 1).await;
    let restore_into = |url: &str, replace: bool| {
        let mut args = vec![
            "--json",
            "restore",
            "--keep-join-tokens",
            id.as_str(),
            "--datastore",
            url,
            "--accept-changes",
        ];
        if replace {
            args.push("--replace");
        }
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    };

    // Into a new SQLite file: 13 tables, nothing of spirekeep's.
    let sqlite_target = dir.path().join("restored.sqlite3");
    restore_into(sqlite_target.to_str().unwrap(), false);
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        sqlite_target.display()
    ))
    .await
    .unwrap();
    let physical: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(physical.len(), 13, "{physical:?}");
    drop(conn);

    // Into a live MariaDB datastore, replacing it.
    let Some(dst) =
        SpireFixture::create(Engine::Mysql, "old-staging", &population(Engine::Mysql, 5)).await
    else {
        src.cleanup().await;
        return;
    };
    restore_into(&dst.url(), true);
    let physical = mysql_tables_physically(&dst.url()).await;
    assert_eq!(physical.len(), 13, "nothing of spirekeep's: {physical:?}");
    let dst_ds = dst.open().await;
    let restored = contents(dst_ds.as_ref(), None, 1).await;
    assert_eq!(
        restored.values().map(|(rows, _)| rows).sum::<u64>(),
        expected.values().map(|(rows, _)| rows).sum::<u64>()
    );
    dst_ds.close().await;
    dst.cleanup().await;
    src.cleanup().await;
}

/// Regression (issue 14): two restores into one database dropped each
/// other's staging tables. A restore holds the database's restore lock
/// (`GET_LOCK` on MySQL, an advisory lock on PostgreSQL) from its start to
/// its end; a second one waits a few seconds, then fails with one line and
/// touches nothing (the first one's staging tables survive).
async fn a_second_restore_into_one_database_is_refused(engine: Engine) {
    let src = SpireFixture::create(Engine::Sqlite, "lock-src", &Population::new(20))
        .await
        .unwrap();
    let Some(dst) = SpireFixture::create(engine, "restore-lock", &Population::new(5)).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&src.url(), &repo);
    let dst_ds = dst.open().await;
    let before = contents(dst_ds.as_ref(), None, 1).await;
    // The first restore: open, with one staging table loaded.
    let mut first = dst_ds.begin_restore(&[]).await.unwrap();
    let cat = dst_ds.catalogue().await.unwrap();
    let join_tokens = cat.table("join_tokens").unwrap().clone();
    if engine == Engine::Mysql {
        first.create_table(engine, &join_tokens).await.unwrap();
    }
    let url = dst.url();
    // The first restore is this test's own session on the target: --force
    // passes the guard against other clients (issue 12), so the restore
    // lock is what stops the second one.
    let mut args = vec![
        "restore",
        "--keep-join-tokens",
        id.as_str(),
        "--datastore",
        url.as_str(),
        "--replace",
        "--accept-changes",
        "--force",
    ];
    args.extend(repo.iter().map(String::as_str));
    let started = Instant::now();
    let out = spirekeep(&args, &[]);
    assert_one_line_error(&out, 5, "another restore into");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "it waited first"
    );
    if engine == Engine::Mysql {
        assert!(
            mysql_tables_physically(&dst.url())
                .await
                .contains(&"_spirekeep_new_join_tokens".to_string()),
            "the first restore's staging table survives"
        );
    }
    drop(first);
    // Once the first one is gone, the next restore goes through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(contents(dst_ds.as_ref(), None, 1).await, before);
    let out = spirekeep(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    dst_ds.close().await;
    dst.cleanup().await;
    src.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_restore_into_one_mysql_database_is_refused() {
    a_second_restore_into_one_database_is_refused(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_restore_into_one_postgres_database_is_refused() {
    a_second_restore_into_one_database_is_refused(Engine::Postgres).await;
}

// ------------------------------------------------------------ stored DDL (issue 14)

/// Regression (issue 14): restore (and a deep verify, which restores into a
/// temporary SQLite file) ran the DDL text stored in the manifest, several
/// statements allowed. A manifest whose stored DDL was altered restores
/// exactly as before and runs none of it; one whose names or types were
/// altered is refused before anything is touched.
#[tokio::test(flavor = "multi_thread")]
async fn sql_stored_in_a_manifest_is_never_run() {
    let fx = SpireFixture::create(Engine::Sqlite, "stored-ddl", &Population::new(15))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    let path = dir
        .path()
        .join("repo/snapshots")
        .join(&id)
        .join("manifest.json");
    let original = std::fs::read(&path).unwrap();
    let attached = dir.path().join("attached-by-the-manifest.db");
    let mut manifest: Json = serde_json::from_slice(&original).unwrap();
    for t in manifest["catalogue"]["tables"].as_array_mut().unwrap() {
        let sql = t["create_sql"].as_str().unwrap().to_string();
        t["create_sql"] = Json::from(format!(
            "{sql}; CREATE TABLE pwned (x int); ATTACH DATABASE '{}' AS pwned_db",
            attached.display()
        ));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();

    // A deep verify restores into a temporary file: nothing attached.
    let (code, report, err) = run_json(&["verify", &id, "--deep"], &repo);
    assert_eq!(code, 0, "{err} {report}");
    assert!(
        !attached.exists(),
        "the stored DDL ran during the deep verify"
    );
    // A restore: exact, and without the injected statements.
    let target = dir.path().join("target.sqlite3");
    let report = ok_json(
        &[
            "restore",
            "--keep-join-tokens",
            &id,
            "--datastore",
            target.to_str().unwrap(),
        ],
        &repo,
    );
    assert_eq!(report["ok"], true, "{report}");
    assert!(!attached.exists(), "the stored DDL ran during the restore");
    let spec = spirekeep::datastore::dsn::parse(
        target.to_str().unwrap(),
        Some(Engine::Sqlite),
        std::path::Path::new("."),
    )
    .unwrap();
    let ds = spirekeep::datastore::open(&spec, spirekeep::datastore::OpenMode::ReadOnly)
        .await
        .unwrap();
    let cat = ds.catalogue().await.unwrap();
    assert!(cat.table("pwned").is_none());
    assert_eq!(cat.tables.len(), 13);
    let src_ds = fx.open().await;
    let mut want = src_ds.catalogue().await.unwrap();
    let mut got = cat.clone();
    for t in want.tables.iter_mut().chain(got.tables.iter_mut()) {
        t.create_sql = None;
    }
    assert_eq!(
        got, want,
        "a same-engine restore keeps the catalogue exactly"
    );
    src_ds.close().await;
    ds.close().await;

    // Names and types are checked: an altered type is refused, touching nothing.
    let mut manifest: Json = serde_json::from_slice(&original).unwrap();
    manifest["catalogue"]["tables"][0]["columns"][0]["declared_type"] =
        Json::from("integer); CREATE TABLE pwned (x int); --");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let fresh = dir.path().join("fresh.sqlite3");
    let mut args = vec![
        "restore",
        "--keep-join-tokens",
        id.as_str(),
        "--datastore",
        fresh.to_str().unwrap(),
    ];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_one_line_error(&out, 1, "is not a sqlite column type spirekeep restores");
    assert!(!fresh.exists());
    fx.cleanup().await;
}
