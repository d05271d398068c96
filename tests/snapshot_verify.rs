//! `spirekeep verify` with the real binary: every object re-read and every
//! hash checked, damaged objects and manifests named precisely (and restores
//! of them refused), deep verification as a restore drill, and the records
//! that `list` shows.

mod common;

use std::path::{Path, PathBuf};

use common::{
    SpireFixture, assert_one_line_error, file_repo, ok_json, repositories, run_json, spirekeep,
    stderr, stdout,
};
use serde_json::Value as Json;
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::{Population, TestDatabase};

fn population(entries: usize) -> Population {
    Population {
        seed: 17,
        hostile: true,
        ..Population::new(entries)
    }
}

fn backup(url: &str, repo: &[String]) -> String {
    ok_json(&["backup", "--datastore", url], repo)["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn summary_of<'a>(list: &'a Json, id: &str) -> &'a Json {
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()
}

fn object_path(dir: &tempfile::TempDir, id: &str, table: &str) -> PathBuf {
    dir.path()
        .join("repo/snapshots")
        .join(id)
        .join(format!("data/{table}.0.spkd.zst"))
}

fn object_key(id: &str, table: &str) -> String {
    format!("snapshots/{id}/data/{table}.0.spkd.zst")
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_checks_every_object_and_records_the_result() {
    let fx = SpireFixture::create(Engine::Sqlite, "verify", &population(30))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for repo in repositories(&dir, "verify") {
        let id = backup(&fx.url(), &repo);
        let report = ok_json(&["verify"], &repo);
        assert_eq!(report["snapshot_id"], id.as_str(), "latest by default");
        assert_eq!(report["ok"], true);
        assert_eq!(report["kind"], "shallow");
        assert_eq!(report["objects"], 13);
        assert_eq!(report["rows"], fx.counts.total());
        assert!(
            report["tables"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["ok"] == true)
        );
        assert!(
            report["record_key"]
                .as_str()
                .unwrap()
                .starts_with(&format!("verifications/{id}/"))
        );
        let list = ok_json(&["list"], &repo);
        let s = summary_of(&list, &id);
        assert_eq!(s["last_verification"]["kind"], "shallow");
        assert_eq!(s["last_verification"]["ok"], true);
        assert!(s["last_deep_ok"].is_null());
        // Text form, by id.
        let mut args = vec!["verify", id.as_str()];
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("ok (shallow verification)"),
            "{}",
            stdout(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_verify_is_a_restore_drill_recorded_for_list() {
    for engine in [Engine::Postgres, Engine::Mysql] {
        let Some(fx) = SpireFixture::create(engine, "deep", &population(20)).await else {
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        let repo = file_repo(&dir);
        let id = backup(&fx.url(), &repo);
        let report = ok_json(&["verify", "latest", "--deep"], &repo);
        assert_eq!(report["ok"], true, "{engine}: {report}");
        assert_eq!(report["kind"], "deep");
        for t in report["tables"].as_array().unwrap() {
            assert_eq!(t["restored_rows"], t["rows"], "{engine}: {t}");
            assert_eq!(t["restored_hash_ok"], true, "{engine}: {t}");
        }
        let scratch = report["scratch"].as_str().unwrap();
        assert!(scratch.contains("(temporary, deleted)"), "{scratch}");
        let path = scratch
            .trim_start_matches("sqlite:")
            .trim_end_matches(" (temporary, deleted)");
        assert!(
            !Path::new(path).parent().unwrap().exists(),
            "the scratch directory is gone"
        );
        let list = ok_json(&["list"], &repo);
        let s = summary_of(&list, &id);
        assert_eq!(s["last_deep_ok"]["kind"], "deep", "{engine}: {s}");
        assert_eq!(s["last_verification"]["ok"], true);
        fx.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_verify_into_a_given_scratch_datastore_leaves_it_empty() {
    let fx = SpireFixture::create(Engine::Sqlite, "scratch", &population(15))
        .await
        .unwrap();
    let Some(scratch) = TestDatabase::create_or_skip(Engine::Postgres, "scratch")
        .await
        .unwrap()
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    backup(&fx.url(), &repo);
    let report = ok_json(&["verify", "--deep", "--scratch", scratch.url()], &repo);
    assert_eq!(report["ok"], true, "{report}");
    // SQLite's nanoseconds become PostgreSQL's microseconds: noted, and
    // compared with the adapted rows.
    assert!(
        report["notes"][0].as_str().unwrap().contains("adapted"),
        "{report}"
    );
    let ds = scratch.open().await.unwrap();
    assert!(
        ds.catalogue().await.unwrap().tables.is_empty(),
        "left empty"
    );
    // A scratch datastore that holds tables is refused (and nothing is recorded as failed).
    ds.execute_script("CREATE TABLE keep_me (id integer)")
        .await
        .unwrap();
    let mut args = vec!["verify", "--deep", "--scratch", scratch.url()];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_one_line_error(&out, 2, "is not empty");
    let list = ok_json(&["list"], &repo);
    assert_eq!(list[0]["last_verification"]["ok"], true);
    ds.close().await;
    scratch.cleanup().await.unwrap();
    // --scratch without --deep is a usage error.
    let mut args = vec!["verify", "--scratch", "/tmp/x.sqlite3"];
    args.extend(repo.iter().map(String::as_str));
    assert_eq!(spirekeep(&args, &[]).status.code(), Some(2));
}

/// What a corruption does to a snapshot stored in a file:// repository.
enum Damage {
    FlipByte(&'static str),
    Truncate(&'static str),
    Delete(&'static str),
}

fn damage(dir: &tempfile::TempDir, id: &str, d: &Damage) {
    match d {
        Damage::FlipByte(table) => {
            let p = object_path(dir, id, table);
            let mut bytes = std::fs::read(&p).unwrap();
            let at = bytes.len() * 2 / 3;
            bytes[at] ^= 0x01;
            std::fs::write(&p, bytes).unwrap();
        }
        Damage::Truncate(table) => {
            let p = object_path(dir, id, table);
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        }
        Damage::Delete(table) => std::fs::remove_file(object_path(dir, id, table)).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_objects_are_named_and_their_snapshots_are_never_restored() {
    let fx = SpireFixture::create(Engine::Sqlite, "damage", &population(40))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let cases = [
        (Damage::FlipByte("registered_entries"), "registered_entries"),
        (Damage::Truncate("selectors"), "selectors"),
        (Damage::Delete("bundles"), "bundles"),
    ];
    for (d, table) in &cases {
        let id = backup(&fx.url(), &repo);
        damage(&dir, &id, d);
        let (code, report, err) = run_json(&["verify", &id], &repo);
        assert_eq!(code, 1, "{err}");
        assert_eq!(report["ok"], false);
        let problems: Vec<&str> = report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("table {table}: "))
                && problems[0].contains(&object_key(&id, table)),
            "{problems:?}"
        );
        assert!(err.contains(&object_key(&id, table)), "{err}");
        let failed: Vec<&Json> = report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["ok"] == false)
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["table"], *table);
        // Recorded as a failed verification.
        let list = ok_json(&["list"], &repo);
        let s = summary_of(&list, &id);
        assert_eq!(s["last_verification"]["ok"], false, "{s}");
        assert!(s["last_verified_ok"].is_null());
        // Deep verification does not get as far as a restore drill.
        let (code, deep, _) = run_json(&["verify", &id, "--deep"], &repo);
        assert_eq!(code, 1);
        assert!(deep["tables"][0]["restored_rows"].is_null());
        // A restore refuses before it touches the target: a new SQLite file is not even created.
        let target = dir.path().join(format!("target-{table}.sqlite3"));
        let mut args = vec![
            "restore",
            id.as_str(),
            "--datastore",
            target.to_str().unwrap(),
        ];
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert_one_line_error(&out, 1, &object_key(&id, table));
        assert!(!target.exists());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_problem_is_collected_not_just_the_first() {
    let fx = SpireFixture::create(Engine::Sqlite, "all", &population(20))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let id = backup(&fx.url(), &repo);
    damage(&dir, &id, &Damage::Delete("dns_names"));
    damage(&dir, &id, &Damage::FlipByte("selectors"));
    let (code, report, _) = run_json(&["verify"], &repo);
    assert_eq!(code, 1);
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .contains(&object_key(&id, "dns_names"))
    );
    assert!(
        problems[1]
            .as_str()
            .unwrap()
            .contains(&object_key(&id, "selectors"))
    );
    // Text output names both.
    let mut args = vec!["verify"];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("FAILED (shallow verification)"), "{text}");
    assert_eq!(text.matches("  problem: table ").count(), 2, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_manifest_fails_verification_and_blocks_restore() {
    let fx = SpireFixture::create(Engine::Sqlite, "manifest", &population(10))
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
    let mut manifest: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let entries = manifest["tables"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == "registered_entries")
        .unwrap();
    entries["rows"] = Json::from(entries["rows"].as_u64().unwrap() + 1);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();

    let (code, report, err) = run_json(&["verify", &id], &repo);
    assert_eq!(code, 1, "{err}");
    let problem = report["problems"][0].as_str().unwrap();
    assert!(
        problem.contains(&format!("snapshots/{id}/manifest.json")),
        "{problem}"
    );
    assert!(
        problem.contains("table registered_entries records"),
        "{problem}"
    );
    // Recorded, although the manifest could not be read.
    let records = std::fs::read_dir(dir.path().join("repo/verifications").join(&id))
        .unwrap()
        .count();
    assert_eq!(records, 1);
    let target = dir.path().join("target.sqlite3");
    let mut args = vec![
        "restore",
        id.as_str(),
        "--datastore",
        target.to_str().unwrap(),
    ];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_one_line_error(&out, 1, "manifest.json");
    assert!(!target.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_usage_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let mut args = vec!["verify"];
    args.extend(repo.iter().map(String::as_str));
    assert_one_line_error(&spirekeep(&args, &[]), 2, "holds no snapshots yet");
    let mut args = vec!["verify", "nope"];
    args.extend(repo.iter().map(String::as_str));
    assert_one_line_error(&spirekeep(&args, &[]), 2, "snapshot id");
    assert_one_line_error(&spirekeep(&["verify"], &[]), 2, "no repository given");
}
