//! Shared helpers for the CLI tests: run the real binary, read its output,
//! and build generated SPIRE datastores on any engine.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

use spirekeep::datastore::testkit::{
    GeneratedCounts, Population, TestDatabase, create_spire_datastore,
};
use spirekeep::datastore::{self, Engine, OpenMode, dsn};
use tempfile::TempDir;

/// Runs the `spirekeep` binary with `args`, a clean `SPIREKEEP_*` environment
/// plus `env`, and returns its output.
pub fn spirekeep(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spirekeep"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run spirekeep")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with `code`, printed exactly one `error: ` line that
/// contains `needle`, and did not panic.
pub fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr:\n{err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(
        error_lines.len(),
        1,
        "exactly one error line; stderr:\n{err}"
    );
    assert!(
        error_lines[0].contains(needle),
        "error line {:?} lacks {needle:?}",
        error_lines[0]
    );
    assert!(!err.contains("panicked"), "panic; stderr:\n{err}");
    assert!(
        !err.contains("RUST_BACKTRACE"),
        "backtrace hint; stderr:\n{err}"
    );
}

/// The password the test script gives the `spirekeep` test users.
pub fn test_password() -> String {
    std::env::var("SPIREKEEP_TEST_PASSWORD").unwrap_or_else(|_| "spirekeep".to_string())
}

/// A generated SPIRE datastore on one engine: a temporary SQLite file or a
/// fresh database on the PostgreSQL / MySQL test server.
pub struct SpireFixture {
    pub engine: Engine,
    pub counts: GeneratedCounts,
    pub db: Option<TestDatabase>,
    pub dir: Option<TempDir>,
}

impl SpireFixture {
    /// Creates and fills a datastore; `None` when the engine's test server is
    /// absent and services are not required (see `scripts/test-services.sh`).
    pub async fn create(engine: Engine, hint: &str, population: &Population) -> Option<Self> {
        let mut fx = Self::create_empty(engine, hint).await?;
        let ds = fx.open().await;
        fx.counts = create_spire_datastore(ds.as_ref(), population)
            .await
            .expect("generate");
        ds.close().await;
        Some(fx)
    }

    /// An empty database (or a path where a SQLite file may be created).
    pub async fn create_empty(engine: Engine, hint: &str) -> Option<Self> {
        match engine {
            Engine::Sqlite => Some(Self {
                engine,
                counts: GeneratedCounts::default(),
                db: None,
                dir: Some(tempfile::tempdir().expect("tempdir")),
            }),
            _ => TestDatabase::create_or_skip(engine, hint)
                .await
                .expect("test database")
                .map(|db| Self {
                    engine,
                    counts: GeneratedCounts::default(),
                    db: Some(db),
                    dir: None,
                }),
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .expect("a SQLite fixture")
            .path()
            .join("datastore.sqlite3")
    }

    /// The connection string to give spirekeep.
    pub fn url(&self) -> String {
        match &self.db {
            Some(db) => db.url().to_string(),
            None => self.sqlite_path().display().to_string(),
        }
    }

    /// Opens the datastore read-write (creating a SQLite file).
    pub async fn open(&self) -> Box<dyn datastore::Datastore> {
        let spec =
            dsn::parse(&self.url(), Some(self.engine), std::path::Path::new(".")).expect("spec");
        datastore::open(&spec, OpenMode::Create)
            .await
            .expect("open")
    }

    pub async fn cleanup(self) {
        if let Some(db) = self.db {
            db.cleanup().await.expect("drop test database");
        }
    }
}

/// `--repo` plus S3 flags: a local directory and, when configured, the S3 test server.
pub fn repositories(dir: &TempDir, test: &str) -> Vec<Vec<String>> {
    let mut out = vec![file_repo(dir)];
    if let Ok(endpoint) = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT") {
        let bucket =
            std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
        let n: u32 = rand::random();
        out.push(vec![
            "--repo".into(),
            format!("s3://{bucket}/spirekeep-tests/{test}-{n:08x}"),
            "--s3-endpoint".into(),
            endpoint,
        ]);
    } else {
        assert!(
            !spirekeep::datastore::testkit::services_required(),
            "SPIREKEEP_TEST_S3_ENDPOINT is not set"
        );
    }
    out
}

/// `--repo file://<dir>/repo`.
pub fn file_repo(dir: &TempDir) -> Vec<String> {
    vec![
        "--repo".to_string(),
        format!("file://{}", dir.path().join("repo").display()),
    ]
}

/// Runs `spirekeep --json <args> <repo>`: exit code, parsed stdout, stderr.
pub fn run_json(args: &[&str], repo: &[String]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&all, &[]);
    let json = serde_json::from_str(&stdout(&out)).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr(&out))
}

/// [`run_json`] that must succeed.
pub fn ok_json(args: &[&str], repo: &[String]) -> serde_json::Value {
    let (code, json, err) = run_json(args, repo);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    json
}
