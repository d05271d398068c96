//! Server files (issue 12 item 5): the disk KeyManager's keys.json and the
//! data dir of a SQLite SPIRE setup, through the real binary, on a `file://`
//! repository and (when `scripts/test-services.sh` runs it) the S3 test
//! server: left out (with a warning) in clear without consent, age-encrypted with a recipient
//! (no key bytes in any stored object), verified, restored byte-identical
//! with `--server-files`, a wrong identity refused, and the CA journal
//! compared with the keys by `inspect` and `verify`.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::{
    SpireFixture, assert_one_line_error, ok_json, repositories, run_json, spirekeep, stderr, stdout,
};
use serde_json::Value as Json;
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{self, Engine, OpenMode, dsn};
use spirekeep::store::{RepoOptions, Repository};

/// Stands in for a private key's base64: found in keys.json, never in the repository.
const KEY_MARKER: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49-spirekeep-test-ca-key";

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = u8::try_from(v & 0x7f).unwrap();
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn bytes_field(n: u64, b: &[u8], out: &mut Vec<u8>) {
    varint(n << 3 | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// A `journal.Entries` protobuf: X.509 CA slot A active, B prepared; JWT slot A active.
fn journal() -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, slot, status) in [(1u64, "A", 3u64), (1, "B", 2), (2, "A", 3)] {
        let (status_field, authority_field) = if kind == 1 { (5, 6) } else { (6, 7) };
        let mut e = Vec::new();
        bytes_field(1, slot.as_bytes(), &mut e);
        varint(2 << 3, &mut e);
        varint(1_760_000_000, &mut e);
        varint(status_field << 3, &mut e);
        varint(status, &mut e);
        bytes_field(
            authority_field,
            format!("authority-{slot}").as_bytes(),
            &mut e,
        );
        bytes_field(kind, &e, &mut out);
    }
    out
}

fn keys_json(ids: &[&str]) -> String {
    let entries: Vec<String> = ids
        .iter()
        .map(|id| format!("\t\t\"{id}\": \"{KEY_MARKER}-{id}\""))
        .collect();
    format!("{{\n\t\"keys\": {{\n{}\n\t}}\n}}", entries.join(",\n"))
}

/// A SPIRE server's working directory: server.conf with relative paths, a
/// data dir with the SQLite datastore, keys.json and bundle-acme/.
struct Setup {
    _fx: SpireFixture,
    workdir: PathBuf,
    conf: String,
}

impl Setup {
    async fn new(dir: &Path) -> Self {
        let fx = SpireFixture::create(Engine::Sqlite, "server-files", &Population::new(20))
            .await
            .unwrap();
        let workdir = dir.join("spire");
        let data = workdir.join(".data");
        std::fs::create_dir_all(data.join("bundle-acme/accounts")).unwrap();
        std::fs::copy(fx.sqlite_path(), data.join("datastore.sqlite3")).unwrap();
        let db = data.join("datastore.sqlite3");
        let spec = dsn::parse(db.to_str().unwrap(), Some(Engine::Sqlite), Path::new(".")).unwrap();
        let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
        let hex: String = journal().iter().map(|b| format!("{b:02x}")).collect();
        ds.execute_script(&format!("UPDATE ca_journals SET data = X'{hex}'"))
            .await
            .unwrap();
        ds.close().await;
        std::fs::write(
            data.join("keys.json"),
            keys_json(&["x509-CA-A", "x509-CA-B", "JWT-Signer-A"]),
        )
        .unwrap();
        std::fs::set_permissions(
            data.join("keys.json"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            data.join("bundle-acme/accounts/acme.json"),
            b"{\"account\": \"acme-test\"}",
        )
        .unwrap();
        let conf = workdir.join("server.conf");
        std::fs::write(
            &conf,
            r#"
server {
    trust_domain = "example.org"
    data_dir = "./.data"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "./.data/datastore.sqlite3"
        }
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = "./.data/keys.json"
        }
    }
}
"#,
        )
        .unwrap();
        Self {
            _fx: fx,
            conf: conf.to_str().unwrap().to_owned(),
            workdir,
        }
    }

    fn source(&self) -> Vec<String> {
        vec![
            "--spire-config".into(),
            self.conf.clone(),
            "--spire-workdir".into(),
            self.workdir.to_str().unwrap().into(),
        ]
    }

    fn data(&self, relative: &str) -> PathBuf {
        self.workdir.join(".data").join(relative)
    }
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = spirekeep(&["keygen", "--output", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "keygen: {}", stderr(&out));
    (path, common::stdout(&out).trim().to_owned())
}

fn open_repo(args: &[String]) -> Repository {
    let options = RepoOptions {
        s3_endpoint: args.get(3).cloned(),
        s3_allow_http: args.len() > 2,
        ..RepoOptions::default()
    };
    Repository::open(&args[1], &options).unwrap()
}

fn with<'a>(base: &'a [&'a str], extra: &'a [String]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(extra.iter().map(String::as_str));
    v
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_data_dir_are_encrypted_verified_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path()).await;
    let src = setup.source();
    let (identity, public) = keygen(dir.path(), "identity.txt");
    let (other, _) = keygen(dir.path(), "other.txt");
    for (n, repo) in repositories(&dir, "server-files").into_iter().enumerate() {
        eprintln!("repository {}", repo[1]);
        // No recipient, no consent: the datastore is backed up, the server
        // files are left out, and a warning says how to include them.
        let mut args = with(&["--json", "backup"], &src);
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("left out") && err.contains("--server-files-in-clear"),
            "{err}"
        );
        assert!(err.contains("--recipient"), "{err}");
        let plain_id = serde_json::from_str::<Json>(&stdout(&out)).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let plain: Json = serde_json::from_slice(
            &open_repo(&repo)
                .get(&format!("snapshots/{plain_id}/manifest.json"))
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(plain.get("server_files").is_none(), "{plain}");
        assert_eq!(plain["format_version"], 1);

        // With a recipient: encrypted objects beside the data.
        let snapshot = ok_json(&with(&["backup", "--recipient", &public], &src), &repo);
        let id = snapshot["id"].as_str().unwrap().to_owned();
        let handle = open_repo(&repo);
        let manifest: Json = serde_json::from_slice(
            &handle
                .get(&format!("snapshots/{id}/manifest.json"))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["format_version"], 2);
        let files = manifest["server_files"].as_array().unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
        assert_eq!(paths, vec!["bundle-acme/accounts/acme.json", "keys.json"]);
        assert_eq!(files[1]["role"], "keys");
        assert_eq!(files[1]["mode"], 0o600);
        for f in files {
            assert_eq!(f["encryption"], "age", "{f}");
            assert!(
                f["key"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("snapshots/{id}/server/"))
            );
        }
        for meta in handle.list(&format!("snapshots/{id}/")).await.unwrap() {
            let bytes = handle.get(&meta.key).await.unwrap();
            assert!(
                !contains(&bytes, KEY_MARKER),
                "{} holds key bytes",
                meta.key
            );
            assert!(
                !contains(&bytes, "acme-test"),
                "{} holds a data dir file",
                meta.key
            );
        }

        // verify: stored bytes without the identity, everything with it.
        let shallow = ok_json(&["verify", &id], &repo);
        assert_eq!(shallow["ok"], true, "{shallow}");
        assert!(
            shallow["unchecked"].to_string().contains("server files"),
            "{shallow}"
        );
        let full = ok_json(
            &["verify", &id, "--identity", identity.to_str().unwrap()],
            &repo,
        );
        assert_eq!(full["ok"], true, "{full}");
        assert_eq!(full["unchecked"], serde_json::json!([]), "{full}");
        assert!(
            full.get("warnings").is_none(),
            "journal and keys agree: {full}"
        );

        // restore --server-files: byte-identical, keys 0600.
        let out_dir = dir.path().join(format!("restored-{n}"));
        let target = dir.path().join(format!("target-{n}.sqlite3"));
        let restore = |target: &Path, id_file: &Path, extra: &[&str]| {
            let mut a = vec![
                "restore",
                id.as_str(),
                "--datastore",
                target.to_str().unwrap(),
                "--server-files",
                out_dir.to_str().unwrap(),
                "--identity",
                id_file.to_str().unwrap(),
            ];
            a.extend(extra);
            a.extend(repo.iter().map(String::as_str));
            spirekeep(&a, &[])
        };
        // The wrong identity: refused, nothing written.
        let out = restore(&target, &other, &[]);
        assert_one_line_error(&out, 2, &public);
        assert!(!out_dir.exists() && !target.exists());
        let out = restore(&target, &identity, &[]);
        assert!(out.status.success(), "restore: {}", stderr(&out));
        for f in ["keys.json", "bundle-acme/accounts/acme.json"] {
            assert_eq!(
                std::fs::read(out_dir.join(f)).unwrap(),
                std::fs::read(setup.data(f)).unwrap(),
                "{f}"
            );
        }
        let mode = std::fs::metadata(out_dir.join("keys.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Existing files are not overwritten without --replace.
        let target2 = dir.path().join(format!("target2-{n}.sqlite3"));
        let out = restore(&target2, &identity, &[]);
        assert_one_line_error(&out, 2, "--replace");
        assert!(!target2.exists(), "a refused restore created its target");
        let out = restore(&target2, &identity, &["--replace"]);
        assert!(out.status.success(), "restore --replace: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn journal_and_keys_disagreeing_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path()).await;
    let src = setup.source();
    let (identity, public) = keygen(dir.path(), "identity.txt");
    let repo = common::file_repo(&dir);
    let inspect = ok_json(&with(&["inspect"], &src), &[]);
    assert!(inspect.get("warnings").is_none(), "{inspect}");
    // The JWT key is gone from keys.json, and a stray CA key appeared.
    std::fs::write(
        setup.data("keys.json"),
        keys_json(&["x509-CA-A", "x509-CA-C"]),
    )
    .unwrap();
    let inspect = ok_json(&with(&["inspect"], &src), &[]);
    let warnings = inspect["warnings"].to_string();
    assert!(warnings.contains("JWT-Signer-A (active"), "{warnings}");
    assert!(warnings.contains("x509-CA-C"), "{warnings}");
    assert!(!warnings.contains(KEY_MARKER), "{warnings}");
    let snapshot = ok_json(&with(&["backup", "--recipient", &public], &src), &repo);
    let id = snapshot["id"].as_str().unwrap();
    let report = ok_json(
        &["verify", id, "--identity", identity.to_str().unwrap()],
        &repo,
    );
    assert_eq!(
        report["ok"], true,
        "warnings do not fail a verification: {report}"
    );
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("JWT-Signer-A") && warnings.contains("x509-CA-C"),
        "{warnings}"
    );

    // A missing keys file is a warning at backup, and verify says the
    // snapshot holds no keys for its journal.
    std::fs::remove_file(setup.data("keys.json")).unwrap();
    let (code, json, err) = run_json(&with(&["backup", "--recipient", &public], &src), &repo);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning:") && err.contains("does not exist"),
        "{err}"
    );
    let id = json["id"].as_str().unwrap();
    let report = ok_json(
        &["verify", id, "--identity", identity.to_str().unwrap()],
        &repo,
    );
    assert!(
        report["warnings"].to_string().contains("x509-CA-A"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn in_clear_and_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path()).await;
    let src = setup.source();
    let repo = common::file_repo(&dir);
    let handle = open_repo(&repo);
    // --no-server-files: a plain format-1 snapshot, as before.
    let s = ok_json(&with(&["backup", "--no-server-files"], &src), &repo);
    let plain = s["id"].as_str().unwrap().to_owned();
    let m = handle
        .get(&format!("snapshots/{plain}/manifest.json"))
        .await
        .unwrap();
    let text = String::from_utf8(m.to_vec()).unwrap();
    assert!(
        text.contains("\"format_version\": 1") && !text.contains("server_files"),
        "{text}"
    );
    // --server-files-in-clear: format 1 with the files, restorable without a key.
    let s = ok_json(&with(&["backup", "--server-files-in-clear"], &src), &repo);
    let id = s["id"].as_str().unwrap();
    let m: Json = serde_json::from_slice(
        &handle
            .get(&format!("snapshots/{id}/manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["format_version"], 1);
    assert_eq!(m["server_files"].as_array().unwrap().len(), 2);
    assert!(m["server_files"][0].get("encryption").is_none());
    let out_dir = dir.path().join("clear");
    let target = dir.path().join("clear.sqlite3");
    let mut a = vec![
        "restore",
        id,
        "--datastore",
        target.to_str().unwrap(),
        "--server-files",
        out_dir.to_str().unwrap(),
    ];
    a.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&a, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(out_dir.join("keys.json")).unwrap(),
        std::fs::read(setup.data("keys.json")).unwrap()
    );
    // A snapshot without server files cannot restore them.
    let mut a = vec![
        "restore",
        plain.as_str(),
        "--datastore",
        target.to_str().unwrap(),
        "--server-files",
        out_dir.to_str().unwrap(),
    ];
    a.extend(repo.iter().map(String::as_str));
    assert_one_line_error(&spirekeep(&a, &[]), 2, "holds no server files");
}
