//! The README's "Backups and restores" and "Disaster recovery" command
//! blocks, run as written (issue 12, item 6). Each block that starts with
//! `# tested: NAME` is taken from README.md and run by bash with `$CONF` (a
//! SPIRE `server.conf` over a SQLite datastore, a disk KeyManager's
//! keys.json and a data dir), `$REPO`, `$PRE_UPGRADE` and `$NEW_DATASTORE`
//! set, `spirekeep` on the PATH and `systemctl` standing in for the servers'
//! service manager (it records what it was asked). Then the outcome the
//! README promises is checked: the entries are back, the agents kept, the keys
//! file restored, the new engine holds the same rows.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{SpireFixture, stderr, stdout};
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{self, ColumnKind, Datastore, Engine, OpenMode, Value, dsn};

/// The blocks of README.md marked `# tested: NAME`.
fn readme_blocks() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line != "```sh" {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        if let Some(name) = block.first().and_then(|l| l.strip_prefix("# tested: ")) {
            out.insert(name.trim().to_string(), block[1..].join("\n"));
        }
    }
    out
}

fn block(name: &str) -> String {
    readme_blocks()
        .remove(name)
        .unwrap_or_else(|| panic!("README.md has no block `# tested: {name}`"))
}

/// A SPIRE server's files: server.conf, the SQLite datastore, keys.json, an
/// age identity and its recipients file, and a `systemctl` stand-in.
struct Deployment {
    dir: tempfile::TempDir,
    _fx: SpireFixture,
}

const KEYS: &str = "{\n\t\"keys\": {\n\t\t\"x509-CA-A\": \"readme-test-key-material\"\n\t}\n}";

impl Deployment {
    async fn new(hint: &str) -> Self {
        let population = Population {
            four_byte_utf8: Some(false),
            subsecond: false,
            ..Population::new(30)
        };
        let fx = SpireFixture::create(Engine::Sqlite, hint, &population)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(fx.sqlite_path(), data.join("datastore.sqlite3")).unwrap();
        std::fs::write(data.join("keys.json"), KEYS).unwrap();
        std::fs::write(
            dir.path().join("server.conf"),
            format!(
                "server {{\n  trust_domain = \"example.org\"\n  data_dir = \"{data}\"\n}}\nplugins {{\n  \
                 DataStore \"sql\" {{\n    plugin_data {{\n      database_type = \"sqlite3\"\n      \
                 connection_string = \"{data}/datastore.sqlite3\"\n    }}\n  }}\n  KeyManager \"disk\" {{\n    \
                 plugin_data {{\n      keys_path = \"{data}/keys.json\"\n    }}\n  }}\n}}\n",
                data = data.display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_spirekeep"))
            .args(["keygen", "--output", "identity.txt"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "keygen: {}", stderr(&out));
        let out = Command::new(env!("CARGO_BIN_EXE_spirekeep"))
            .args(["keygen", "-y", "identity.txt"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        std::fs::write(dir.path().join("recipients.txt"), &out.stdout).unwrap();
        // systemctl: records each call.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let systemctl = bin.join("systemctl");
        std::fs::write(&systemctl, "#!/bin/sh\necho \"$*\" >> \"$SYSTEMCTL_LOG\"\n").unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(&systemctl)
            .status()
            .unwrap();
        Self { dir, _fx: fx }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn datastore_path(&self) -> PathBuf {
        self.path("data/datastore.sqlite3")
    }

    async fn open(&self) -> Box<dyn Datastore> {
        let path = self.datastore_path();
        let spec =
            dsn::parse(path.to_str().unwrap(), Some(Engine::Sqlite), Path::new(".")).unwrap();
        datastore::open(&spec, OpenMode::ReadWrite).await.unwrap()
    }

    /// Runs `script` with bash the way an operator would, in this deployment.
    fn run(&self, script: &str, env: &[(&str, &str)]) -> String {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_spirekeep")).parent().unwrap();
        let path = format!(
            "{}:{}:{}",
            self.path("bin").display(),
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", script])
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("CONF", self.path("server.conf"))
            .env("SYSTEMCTL_LOG", self.path("systemctl.log"))
            .env("NO_COLOR", "1");
        for (key, _) in std::env::vars() {
            if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "the README block failed:\n{script}\n--- stdout\n{}\n--- stderr\n{}",
            stdout(&out),
            stderr(&out)
        );
        format!("{}{}", stdout(&out), stderr(&out))
    }

    fn systemctl_log(&self) -> String {
        std::fs::read_to_string(self.path("systemctl.log")).unwrap_or_default()
    }
}

async fn entry_ids(ds: &dyn Datastore) -> Vec<String> {
    let catalogue = ds.catalogue().await.unwrap();
    let t = catalogue.table("registered_entries").unwrap();
    let at = t.columns.iter().position(|c| c.name == "entry_id").unwrap();
    let mut ids: Vec<String> = ds
        .read_table(t)
        .await
        .unwrap()
        .into_iter()
        .map(|r| match &r[at] {
            Value::Text(s) => s.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    ids.sort();
    ids
}

async fn row_counts(ds: &dyn Datastore) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for t in ds.catalogue().await.unwrap().tables {
        out.insert(t.name.clone(), ds.count_rows(&t.name).await.unwrap());
    }
    out
}

fn file_repo(d: &Deployment) -> String {
    format!("file://{}", d.path("repo").display())
}

/// The deployment's own backup (what the nightly job took), encrypted.
fn nightly_backup(d: &Deployment, repo: &str, label: &str, env: &[(&str, &str)]) -> String {
    let out = d.run(
        &format!(
            "spirekeep --json backup --spire-config \"$CONF\" --repo {repo} --recipients-file recipients.txt --label {label}"
        ),
        env,
    );
    let start = out.find('{').unwrap();
    let end = out.rfind('}').unwrap();
    let v: serde_json::Value = serde_json::from_str(&out[start..=end]).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// The S3 test server's settings as an operator would give them.
fn s3_env() -> Option<Vec<(&'static str, String)>> {
    let endpoint = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT").ok()?;
    Some(vec![
        ("SPIREKEEP_S3_ENDPOINT", endpoint),
        ("SPIREKEEP_S3_ALLOW_HTTP", "true".into()),
        ("SPIREKEEP_S3_PATH_STYLE", "true".into()),
        ("SPIREKEEP_S3_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "readme".into()),
        ("AWS_SECRET_ACCESS_KEY", "readme".into()),
    ])
}

/// Azurite's settings as an operator would give them.
fn azure_env() -> Option<Vec<(&'static str, String)>> {
    let endpoint = std::env::var("SPIREKEEP_TEST_AZURE_ENDPOINT").ok()?;
    let account = std::env::var("SPIREKEEP_TEST_AZURE_ACCOUNT").ok()?;
    let key = std::env::var("SPIREKEEP_TEST_AZURE_KEY").ok()?;
    let url = endpoint
        .trim_end_matches(&format!("/{account}"))
        .to_string();
    Some(vec![
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", url),
        ("AZURE_STORAGE_ACCOUNT_NAME", account),
        ("AZURE_STORAGE_ACCOUNT_KEY", key),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_and_restores_on_every_kind_of_repository() {
    let d = Deployment::new("readme-backups").await;
    let script = block("backups-and-restores");
    let n: u32 = rand::random();
    let mut repos: Vec<(String, Vec<(&str, String)>)> = vec![(file_repo(&d), Vec::new())];
    if let Some(env) = s3_env() {
        let bucket =
            std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
        repos.push((format!("s3://{bucket}/readme-{n:08x}"), env));
    }
    if let Some(env) = azure_env() {
        let container = std::env::var("SPIREKEEP_TEST_AZURE_CONTAINER")
            .unwrap_or_else(|_| "spirekeep-test".into());
        repos.push((format!("az://{container}/readme-{n:08x}"), env));
    }
    if spirekeep::datastore::testkit::services_required() {
        assert_eq!(repos.len(), 3, "the S3 and Azure test servers are required");
    }
    let source = entry_ids(d.open().await.as_ref()).await;
    for (repo, env) in &repos {
        let _ = std::fs::remove_file(d.path("scratch.sqlite3"));
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.push(("REPO", repo));
        let out = d.run(&script, &all);
        assert!(out.contains("nightly"), "{repo}: {out}");
        let restored = dsn::parse(
            d.path("scratch.sqlite3").to_str().unwrap(),
            Some(Engine::Sqlite),
            Path::new("."),
        )
        .unwrap();
        let ds = datastore::open(&restored, OpenMode::ReadWrite)
            .await
            .unwrap();
        assert_eq!(entry_ids(ds.as_ref()).await, source, "{repo}");
        ds.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_datastore_is_lost() {
    let d = Deployment::new("readme-lost").await;
    let repo = file_repo(&d);
    nightly_backup(&d, &repo, "nightly", &[]);
    let ds = d.open().await;
    let before = row_counts(ds.as_ref()).await;
    let entries = entry_ids(ds.as_ref()).await;
    ds.close().await;
    // The disk is gone: the datastore and every file of the data dir.
    std::fs::remove_dir_all(d.path("data")).unwrap();
    std::fs::create_dir_all(d.path("data")).unwrap();
    d.run(&block("datastore-lost"), &[("REPO", &repo)]);
    let ds = d.open().await;
    assert_eq!(entry_ids(ds.as_ref()).await, entries);
    let after = row_counts(ds.as_ref()).await;
    ds.close().await;
    for (table, rows) in &before {
        if table != "join_tokens" {
            assert_eq!(after.get(table), Some(rows), "{table}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(d.path("data/keys.json")).unwrap(),
        KEYS
    );
    assert_eq!(d.systemctl_log(), "stop spire-server\nstart spire-server\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_change_to_entries() {
    let d = Deployment::new("readme-bad-change").await;
    let repo = file_repo(&d);
    nightly_backup(&d, &repo, "nightly", &[]);
    let ds = d.open().await;
    let entries = entry_ids(ds.as_ref()).await;
    // The bad change, and an agent that attested after the snapshot.
    ds.execute_script("DELETE FROM registered_entries WHERE id % 3 = 0")
        .await
        .unwrap();
    let agent = "spiffe://example.org/spire/agent/x509pop/attested-after-the-snapshot";
    ds.insert_rows(
        "attested_node_entries",
        &[
            ("spiffe_id".into(), ColumnKind::Text),
            ("data_type".into(), ColumnKind::Text),
            ("serial_number".into(), ColumnKind::Text),
        ],
        &[vec![
            Value::Text(agent.into()),
            Value::Text("x509pop".into()),
            Value::Text("77".into()),
        ]],
    )
    .await
    .unwrap();
    ds.close().await;
    let out = d.run(&block("bad-change-to-entries"), &[("REPO", &repo)]);
    assert!(out.contains("live ones are kept"), "{out}");
    let ds = d.open().await;
    assert_eq!(entry_ids(ds.as_ref()).await, entries);
    assert_eq!(
        ds.count_by("attested_node_entries", "spiffe_id")
            .await
            .unwrap()
            .iter()
            .filter(|(id, _)| id.as_deref() == Some(agent))
            .count(),
        1,
        "the agent attested since is kept"
    );
    ds.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_upgrade() {
    let d = Deployment::new("readme-failed-upgrade").await;
    let repo = file_repo(&d);
    let pre_upgrade = nightly_backup(&d, &repo, "pre-upgrade", &[]);
    let ds = d.open().await;
    let entries = entry_ids(ds.as_ref()).await;
    // The upgrade went wrong and wrote into the datastore; a later backup ran too.
    ds.execute_script("DELETE FROM registered_entries WHERE id % 2 = 0")
        .await
        .unwrap();
    ds.close().await;
    nightly_backup(&d, &repo, "nightly", &[]);
    let out = d.run(
        &block("failed-upgrade"),
        &[("REPO", &repo), ("PRE_UPGRADE", &pre_upgrade)],
    );
    assert!(out.contains("pre-upgrade"), "{out}");
    let ds = d.open().await;
    assert_eq!(entry_ids(ds.as_ref()).await, entries);
    ds.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_to_another_engine() {
    let d = Deployment::new("readme-move").await;
    let Some(target) = SpireFixture::create_empty(Engine::Postgres, "readme-move").await else {
        return;
    };
    let repo = file_repo(&d);
    let ds = d.open().await;
    let before = row_counts(ds.as_ref()).await;
    ds.close().await;
    let url = target.url();
    d.run(
        &block("move-to-another-engine"),
        &[("REPO", &repo), ("NEW_DATASTORE", &url)],
    );
    let moved = target.open().await;
    assert_eq!(
        row_counts(moved.as_ref()).await,
        before,
        "every row, join tokens too"
    );
    moved.close().await;
    target.cleanup().await;
}
