//! Logs for Loki/Vector and for files (issue 13):
//!
//! - `--log-format json` (or `SPIREKEEP_LOG_FORMAT=json`) writes one JSON
//!   object per line on stderr, with `time` (RFC 3339), `level`, `event`,
//!   and the snapshot id and duration where they apply;
//! - no password, S3 key or token reaches stderr in either format, even at
//!   debug level and on failures;
//! - no colour escape when stderr is a file or a pipe, or with `NO_COLOR`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{SpireFixture, spirekeep, stderr, stdout, test_password};
use serde_json::Value as Json;
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::Population;

/// Distinctive S3 credentials: moto accepts any, so they can be scanned for.
const S3_KEY_ID: &str = "AKIASPIREKEEPLOGSCAN7";
const S3_SECRET: &str = "sk-log-scan-secret-Vq93xLw";
const S3_TOKEN: &str = "sk-log-scan-session-token-4Rt";
/// A wrong password, refused by the server: it must not be echoed either.
const WRONG_PASSWORD: &str = "Wrong-Log-Scan-Pass-81";

fn s3_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", S3_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ("AWS_SESSION_TOKEN", S3_TOKEN),
    ]
}

/// `--repo` for the S3 test server, else a local directory.
fn repo_args(dir: &Path, test: &str) -> Vec<String> {
    match std::env::var("SPIREKEEP_TEST_S3_ENDPOINT") {
        Ok(endpoint) => {
            let bucket = std::env::var("SPIREKEEP_TEST_S3_BUCKET")
                .unwrap_or_else(|_| "spirekeep-test".into());
            let n: u32 = rand::random();
            vec![
                "--repo".into(),
                format!("s3://{bucket}/spirekeep-tests/{test}-{n:08x}"),
                "--s3-endpoint".into(),
                endpoint,
            ]
        }
        Err(_) => {
            assert!(
                !spirekeep::datastore::testkit::services_required(),
                "SPIREKEEP_TEST_S3_ENDPOINT is not set"
            );
            vec![
                "--repo".into(),
                format!("file://{}", dir.join("repo").display()),
            ]
        }
    }
}

/// Every secret the commands below are given.
fn secrets() -> Vec<String> {
    let mut s = vec![
        S3_KEY_ID.into(),
        S3_SECRET.into(),
        S3_TOKEN.into(),
        WRONG_PASSWORD.into(),
    ];
    let password = test_password();
    // The fallback password is also the user name, which may appear.
    if password != "spirekeep" {
        s.push(password);
    }
    s
}

fn assert_no_secret(what: &str, out: &Output) {
    for secret in secrets() {
        for (stream, text) in [("stderr", stderr(out)), ("stdout", stdout(out))] {
            assert!(
                !text.contains(&secret),
                "{what}: a secret appears on {stream}:\n{text}"
            );
        }
    }
}

/// Runs a sequence of commands on a PostgreSQL datastore (password in the
/// connection string) and an S3 repository, in one log format, returning
/// each command's name and output.
fn run_everything(
    format_args: &[&str],
    env: &[(&str, &str)],
    url: &str,
    repo: &[String],
    scratch: &Path,
) -> Vec<(String, Output)> {
    let repo: Vec<&str> = repo.iter().map(String::as_str).collect();
    let scratch = scratch.to_str().unwrap();
    // spirekeep_auth's scram password is really checked (scripts/test-services.sh).
    let wrong_password = format!(
        "postgres://spirekeep_auth:{WRONG_PASSWORD}@127.0.0.1:5432/postgres?sslmode=disable"
    );
    let endpoint = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT").unwrap_or_default();
    let mut commands: Vec<Vec<&str>> = vec![
        vec!["inspect", "--datastore", url],
        vec!["check", "--datastore", url, "--target", "1.15.3"],
        [
            &["backup", "--datastore", url, "--label", "logscan"][..],
            &repo,
        ]
        .concat(),
        [&["list"][..], &repo].concat(),
        [&["verify", "latest", "--deep"][..], &repo].concat(),
        [&["restore", "latest", "--datastore", scratch][..], &repo].concat(),
        [&["prune", "--keep-last", "1"][..], &repo].concat(),
        // Failures: a wrong password, a bucket that does not exist.
        vec!["inspect", "--datastore", &wrong_password],
    ];
    if !endpoint.is_empty() {
        commands.push(vec![
            "backup",
            "--datastore",
            url,
            "--repo",
            "s3://spirekeep-no-such-bucket/x",
            "--s3-endpoint",
            &endpoint,
        ]);
    }
    let mut outputs = Vec::new();
    for command in commands {
        let mut all: Vec<&str> = format_args.to_vec();
        all.push("-vv");
        all.extend(command.iter().copied());
        let out = spirekeep(&all, env);
        outputs.push((command.join(" "), out));
    }
    outputs
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_in_either_log_format_and_json_lines_are_objects() {
    let pop = Population {
        entries: 60,
        schema: 25,
        code_version: "1.15.3".into(),
        ..Population::default()
    };
    let Some(fx) = SpireFixture::create(Engine::Postgres, "logscan", &pop).await else {
        return;
    };
    let url = fx.url();
    assert!(
        url.contains(&test_password()),
        "the URL carries the password"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut env = s3_env();
    for (round, (format, format_args, extra_env)) in [
        ("text", vec!["--log-format", "text"], None),
        ("json", vec!["--log-format", "json"], None),
        ("json (env)", vec![], Some(("SPIREKEEP_LOG_FORMAT", "json"))),
    ]
    .into_iter()
    .enumerate()
    {
        let repo = repo_args(dir.path(), "logscan");
        let scratch = dir.path().join(format!("restored-{round}.sqlite3"));
        if let Some(e) = extra_env {
            env.push(e);
        }
        let outputs = run_everything(&format_args, &env, &url, &repo, &scratch);
        for (what, out) in &outputs {
            let what = format!("{format}: {what}");
            assert_no_secret(&what, out);
            assert!(!stderr(out).contains("panicked"), "{what}: {}", stderr(out));
            if format.starts_with("json") {
                assert_json_lines(&what, &stderr(out));
            }
        }
        let (_, backup) = &outputs[2];
        assert!(
            backup.status.success(),
            "{format}: backup: {}",
            stderr(backup)
        );
        if format.starts_with("json") {
            let events = json_lines(&stderr(backup));
            let done = events
                .iter()
                .find(|e| e["event"] == "backup_finished")
                .unwrap_or_else(|| panic!("no backup_finished event in {events:#?}"));
            assert!(
                done["snapshot_id"].as_str().is_some_and(|s| !s.is_empty()),
                "{done}"
            );
            assert!(done["duration_seconds"].is_number(), "{done}");
            assert_eq!(done["level"], "info");
            let (_, verify) = &outputs[4];
            let events = json_lines(&stderr(verify));
            assert!(
                events
                    .iter()
                    .any(|e| e["event"] == "verify_finished" && e["snapshot_id"].is_string()),
                "{events:#?}"
            );
            // A failure is a JSON line too, not a bare "error:" line.
            let (_, failed) = &outputs[7];
            assert_eq!(failed.status.code(), Some(4), "{}", stderr(failed));
            let events = json_lines(&stderr(failed));
            assert!(
                events.iter().any(|e| e["event"] == "command_failed"
                    && e["level"] == "error"
                    && e["exit_code"] == 4),
                "{events:#?}"
            );
        } else {
            let (_, failed) = &outputs[7];
            assert_eq!(failed.status.code(), Some(4), "{}", stderr(failed));
            assert!(stderr(failed).contains("error: "), "{}", stderr(failed));
        }
        if extra_env.is_some() {
            env.pop();
        }
    }
    fx.cleanup().await;
}

fn json_lines(text: &str) -> Vec<Json> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Every stderr line is a JSON object with an RFC 3339 time, a level and an event.
fn assert_json_lines(what: &str, text: &str) {
    for event in json_lines(text) {
        let obj = event
            .as_object()
            .unwrap_or_else(|| panic!("{what}: not an object: {event}"));
        let time = obj["time"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no time: {event}"));
        assert!(
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{what}: time {time:?} is not RFC 3339"
        );
        assert!(
            ["error", "warn", "info", "debug", "trace"]
                .contains(&obj["level"].as_str().unwrap_or("")),
            "{what}: {event}"
        );
        assert!(
            obj["event"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {event}"
        );
    }
}

// ------------------------------------------------------------------ colour

/// The binary with a clean environment: no `NO_COLOR` unless given.
fn raw(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spirekeep"));
    cmd.args(args).env_remove("NO_COLOR");
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run spirekeep")
}

/// A SQLite copy of the bundled datastore in rollback-journal mode, so
/// spirekeep logs a warning (what put `ESC[33m` into demo logs).
fn journal_mode_copy(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("datastore.sqlite3");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/spire-datastore.sqlite3"
        ),
        &path,
    )
    .unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA journal_mode=DELETE'); c.close()",
            path.to_str().unwrap(),
        ])
        .output();
    assert!(
        out.is_ok_and(|o| o.status.success()),
        "python3 sqlite3 is needed"
    );
    path
}

#[test]
fn no_colour_when_stderr_is_not_a_terminal() {
    // The demo's commands, with stderr to a pipe (as `demo.sh > demo.log 2>&1`).
    let dir = tempfile::tempdir().unwrap();
    let ds = journal_mode_copy(dir.path());
    let ds = ds.to_str().unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let restored = dir.path().join("restored.sqlite3");
    let restored = restored.to_str().unwrap();
    let mut saw_a_log_line = false;
    for args in [
        vec!["-vv", "inspect", "--datastore", ds],
        vec![
            "-vv",
            "backup",
            "--datastore",
            ds,
            "--repo",
            &repo,
            "--label",
            "demo",
        ],
        vec!["-vv", "list", "--repo", &repo],
        vec!["-vv", "verify", "latest", "--deep", "--repo", &repo],
        vec![
            "-vv",
            "restore",
            "latest",
            "--repo",
            &repo,
            "--datastore",
            restored,
        ],
        vec!["-vv", "prune", "--keep-last", "1", "--repo", &repo],
        vec!["-vv", "inspect", "--datastore", restored],
    ] {
        let out = raw(&args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        for (stream, bytes) in [("stderr", &out.stderr), ("stdout", &out.stdout)] {
            assert!(
                !bytes.contains(&0x1b),
                "{args:?}: an escape byte on {stream}:\n{}",
                String::from_utf8_lossy(bytes)
            );
        }
        saw_a_log_line |= stderr(&out).contains("WARN");
    }
    assert!(saw_a_log_line, "the test needs a warning to be logged");
}

/// Runs `args` with stderr and stdout on a pseudo-terminal (util-linux `script`).
fn on_a_terminal(args: &[&str], env: &[(&str, &str)]) -> Option<String> {
    let line = std::iter::once(env!("CARGO_BIN_EXE_spirekeep"))
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"])
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn no_colour_on_a_terminal_with_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let ds = journal_mode_copy(dir.path());
    let repo = format!("file://{}", dir.path().join("repo").display());
    // --json: no progress bars (they redraw with cursor escapes, which
    // NO_COLOR does not cover); the journal-mode warning is logged.
    let args = [
        "--json",
        "backup",
        "--datastore",
        ds.to_str().unwrap(),
        "--repo",
        &repo,
    ];
    let Some(coloured) = on_a_terminal(&args, &[]) else {
        assert!(
            !spirekeep::datastore::testkit::services_required(),
            "util-linux `script` is needed to run on a pseudo-terminal"
        );
        return;
    };
    // On a terminal the log is coloured (this is what the test could miss)...
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal:\n{coloured}"
    );
    // ... and NO_COLOR turns it off.
    let plain = on_a_terminal(&args, &[("NO_COLOR", "1")]).unwrap();
    assert!(plain.contains("WARN"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "colour despite NO_COLOR:\n{plain}"
    );
}

// ---------------------------------------------------------------- progress

#[test]
fn progress_on_a_terminal_shows_rows_rate_and_eta() {
    let dir = tempfile::tempdir().unwrap();
    let ds = journal_mode_copy(dir.path());
    let repo = format!("file://{}", dir.path().join("repo").display());
    let restored = dir.path().join("restored.sqlite3");
    for (what, args) in [
        (
            "backup",
            vec![
                "backup",
                "--datastore",
                ds.to_str().unwrap(),
                "--repo",
                &repo,
            ],
        ),
        ("verify", vec!["verify", "latest", "--repo", &repo]),
        (
            "restore",
            vec![
                "restore",
                "latest",
                "--repo",
                &repo,
                "--datastore",
                restored.to_str().unwrap(),
            ],
        ),
    ] {
        let Some(screen) = on_a_terminal(&args, &[("NO_COLOR", "1")]) else {
            assert!(
                !spirekeep::datastore::testkit::services_required(),
                "util-linux `script` is needed to run on a pseudo-terminal"
            );
            return;
        };
        // The first table's bar (a pseudo-terminal is short: the last ones may not fit).
        for needle in ["attested_node_entries", "/20 rows", "rows/s", "ETA"] {
            assert!(
                screen.contains(needle),
                "{what}: {needle:?} not drawn:\n{screen}"
            );
        }
    }
}

#[test]
fn one_line_per_stage_when_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let ds = journal_mode_copy(dir.path());
    let ds = ds.to_str().unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let restored = dir.path().join("restored.sqlite3");
    let restored = restored.to_str().unwrap();
    for (args, needles) in [
        (
            vec!["backup", "--datastore", ds, "--repo", &repo],
            vec![
                "backup: snapshot ",
                "one consistent read of 13 tables",
                "backup: selectors: 660 rows, ",
            ],
        ),
        (
            vec!["backup", "--datastore", ds, "--repo", &repo],
            vec!["backup: migrations: 1 rows"],
        ),
        (
            vec!["verify", "latest", "--deep", "--repo", &repo],
            vec![
                "verify: snapshot ",
                "verify: selectors: 660 rows in ",
                "verify: restore drill",
            ],
        ),
        (
            vec![
                "restore",
                "latest",
                "--repo",
                &repo,
                "--datastore",
                restored,
            ],
            vec![
                "restore: loading",
                "restore: selectors: 660 rows in ",
                "restore: committing",
            ],
        ),
        (
            vec!["prune", "--keep-last", "1", "--repo", &repo],
            vec![
                "snapshots and 0 leftover groups",
                "prune: deleted snapshot ",
            ],
        ),
    ] {
        let out = raw(&args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        for needle in needles {
            assert!(
                err.contains(needle),
                "{args:?}: {needle:?} missing from:\n{err}"
            );
        }
        // With --json stdout is the result and stderr carries no progress.
        if args[0] == "backup" {
            let json = raw(&[&["--json"][..], &args].concat(), &[]);
            assert!(!stderr(&json).contains("backup: "), "{}", stderr(&json));
        }
    }
}

#[test]
fn a_closed_stderr_does_not_stop_a_backup() {
    // `spirekeep backup ... 2>&1 | head -1`: progress lines must not kill the
    // backup (and leave the repository lock behind) once the reader is gone.
    let dir = tempfile::tempdir().unwrap();
    let ds = journal_mode_copy(dir.path());
    let repo = format!("file://{}", dir.path().join("repo").display());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(env!("CARGO_BIN_EXE_spirekeep"))
        .args([
            "backup",
            "--datastore",
            ds.to_str().unwrap(),
            "--repo",
            &repo,
        ])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    // ... and it released the lock: a second backup need not wait.
    let out = spirekeep(
        &[
            "backup",
            "--datastore",
            ds.to_str().unwrap(),
            "--repo",
            &repo,
            "--lock-wait",
            "0s",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn apply_events_carry_the_plan_id() {
    // Even a plan file apply refuses to read names its plan in the log.
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(&plan, r#"{"plan_id": "p-logscan-7"}"#).unwrap();
    let out = spirekeep(
        &["--log-format", "json", "apply", plan.to_str().unwrap()],
        &[],
    );
    assert_ne!(out.status.code(), Some(0));
    let events = json_lines(&stderr(&out));
    let failed = events
        .iter()
        .find(|e| e["event"] == "command_failed")
        .unwrap_or_else(|| panic!("no command_failed event: {events:#?}"));
    assert_eq!(failed["plan_id"], "p-logscan-7", "{failed}");
    assert_eq!(failed["command"], "apply", "{failed}");
}
