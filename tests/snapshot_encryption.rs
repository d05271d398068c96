//! Client-side encryption with age, through the real binary, on a `file://`
//! repository and (when `scripts/test-services.sh` runs it) the S3 test
//! server: backup → list → verify without and with the identity → restore;
//! no plaintext row in the stored bytes; wrong or missing identities refused
//! with the target untouched; bad recipients refused before anything is
//! written; and plaintext (format 1) snapshots still restore.

mod common;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use common::{
    SpireFixture, assert_one_line_error, file_repo, ok_json, repositories, run_json, spirekeep,
    stderr, stdout,
};
use serde_json::Value as Json;
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{self, Engine, OpenMode, Value, dsn};
use spirekeep::store::{RepoOptions, Repository};

/// A value no generator writes: found in the plaintext, never in the stored bytes.
const MARKER: &str = "spirekeep-secret-join-token-7f3a9c1e5b";

fn population() -> Population {
    Population {
        seed: 23,
        ..Population::new(40)
    }
}

/// A SQLite SPIRE datastore with a join token holding [`MARKER`].
async fn datastore_with_marker(hint: &str) -> SpireFixture {
    let fx = SpireFixture::create(Engine::Sqlite, hint, &population())
        .await
        .unwrap();
    let ds = fx.open().await;
    ds.execute_script(&format!(
        "INSERT INTO join_tokens (created_at, updated_at, token, expiry) \
         VALUES ('2026-12-01 10:00:00', '2026-12-01 10:00:00', '{MARKER}', 4102444800)"
    ))
    .await
    .unwrap();
    ds.close().await;
    fx
}

/// A new identity file in `dir`; returns its path and public key.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = spirekeep(&["keygen", "--output", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "keygen: {}", stderr(&out));
    let public = stdout(&out).trim().to_owned();
    assert!(public.starts_with("age1"), "{public}");
    (path, public)
}

/// The repository behind `--repo URL [--s3-endpoint URL]` arguments.
fn open_repo(args: &[String]) -> Repository {
    let url = &args[1];
    let options = RepoOptions {
        s3_endpoint: args.get(3).cloned(),
        s3_allow_http: args.len() > 2,
        ..RepoOptions::default()
    };
    Repository::open(url, &options).unwrap()
}

/// Every stored object of snapshot `id`: key and bytes.
async fn stored_objects(repo: &Repository, id: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for meta in repo.list(&format!("snapshots/{id}/")).await.unwrap() {
        let bytes = repo.get_capped(&meta.key, 1 << 30).await.unwrap();
        out.push((meta.key, bytes.to_vec()));
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The plaintext of an encrypted data object, through the age and zstd
/// crates directly (the format is documented, so this is what an operator
/// without spirekeep would do).
fn decrypt_by_hand(identity: &Path, sealed: &[u8]) -> Vec<u8> {
    let text = std::fs::read_to_string(identity).unwrap();
    let key: age::x25519::Identity = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap()
        .parse()
        .unwrap();
    let decryptor = age::Decryptor::new(sealed).unwrap();
    let mut compressed = Vec::new();
    decryptor
        .decrypt(std::iter::once(&key as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut compressed)
        .unwrap();
    zstd::decode_all(&compressed[..]).unwrap()
}

async fn tokens_in(path: &Path) -> Vec<String> {
    let spec = dsn::parse(path.to_str().unwrap(), Some(Engine::Sqlite), Path::new(".")).unwrap();
    let ds = datastore::open(&spec, OpenMode::ReadOnly).await.unwrap();
    let catalogue = ds.catalogue().await.unwrap();
    let rows = ds
        .read_table(catalogue.table("join_tokens").unwrap())
        .await
        .unwrap();
    ds.close().await;
    rows.iter()
        .flat_map(|r| r.iter())
        .filter_map(|v| match v {
            Value::Text(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_backup_list_verify_restore_round_trip() {
    let fx = datastore_with_marker("encrypt").await;
    let dir = tempfile::tempdir().unwrap();
    let (identity, public) = keygen(dir.path(), "identity.txt");
    let (other, _) = keygen(dir.path(), "other.txt");
    for (n, repo) in repositories(&dir, "encrypt").into_iter().enumerate() {
        eprintln!("repository {}", repo[1]);
        let snapshot = ok_json(
            &["backup", "--datastore", &fx.url(), "--recipient", &public],
            &repo,
        );
        let id = snapshot["id"].as_str().unwrap().to_owned();

        // Stored bytes: age files, no plaintext row, no secret anywhere; the
        // manifest names the recipient and marks every object.
        let handle = open_repo(&repo);
        let objects = stored_objects(&handle, &id).await;
        let mut found_in_plaintext = false;
        for (key, bytes) in &objects {
            assert!(!contains(bytes, MARKER), "{key} holds the row in plaintext");
            assert!(
                !contains(bytes, "AGE-SECRET-KEY"),
                "{key} holds a secret key"
            );
            if key.ends_with("manifest.json") {
                let m: Json = serde_json::from_slice(bytes).unwrap();
                assert_eq!(m["format_version"], 2);
                assert_eq!(m["encryption"]["scheme"], "age");
                assert_eq!(m["encryption"]["recipients"][0], public.as_str());
                for t in m["tables"].as_array().unwrap() {
                    for o in t["objects"].as_array().unwrap() {
                        assert_eq!(o["encryption"], "age", "{o}");
                    }
                }
                continue;
            }
            assert!(key.ends_with(".spkd.zst.age"), "{key}");
            assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{key}");
            if key.contains("/join_tokens.") {
                found_in_plaintext = contains(&decrypt_by_hand(&identity, bytes), MARKER);
            }
        }
        assert!(
            found_in_plaintext,
            "the marker row is in the decrypted join_tokens object (the check above can fail)"
        );

        // list needs no key.
        let list = ok_json(&["list"], &repo);
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|s| s["id"] == id.as_str()),
            "{list}"
        );

        // verify without the identity: the stored bytes only, and says so.
        let shallow = ok_json(&["verify", &id], &repo);
        assert_eq!(shallow["ok"], true, "{shallow}");
        assert_eq!(shallow["encrypted"], true);
        assert_eq!(shallow["kind"], "shallow");
        assert_eq!(shallow["objects"].as_u64(), Some(objects.len() as u64 - 1));
        let unchecked = shallow["unchecked"].to_string();
        assert!(unchecked.contains("content hashes"), "{unchecked}");
        let deep = ok_json(&["verify", "--deep", &id], &repo);
        assert_eq!(deep["kind"], "shallow", "no drill was possible: {deep}");
        assert!(
            deep["unchecked"].to_string().contains("restore drill"),
            "{deep}"
        );
        let mut text_args = vec!["verify", id.as_str()];
        text_args.extend(repo.iter().map(String::as_str));
        let text = stdout(&spirekeep(&text_args, &[]));
        assert!(
            text.contains("NOT checked") && text.contains("--identity"),
            "{text}"
        );

        // verify with it: everything, restore drill included.
        let full = ok_json(
            &[
                "verify",
                "--deep",
                &id,
                "--identity",
                identity.to_str().unwrap(),
            ],
            &repo,
        );
        assert_eq!(full["ok"], true, "{full}");
        assert_eq!(full["kind"], "deep");
        assert_eq!(full["unchecked"], serde_json::json!([]));
        assert!(full["rows"].as_u64().unwrap() > 0);

        // restore without the identity, or with the wrong one: one line, exit
        // 2, the target never created.
        let target = dir.path().join(format!("restored-{n}.sqlite3"));
        let mut args = vec![
            "restore",
            id.as_str(),
            "--datastore",
            target.to_str().unwrap(),
            // The marker is an unexpired join token: restored as told.
            "--keep-join-tokens",
        ];
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert_one_line_error(&out, 2, &public);
        assert!(stderr(&out).contains("--identity"), "{}", stderr(&out));
        assert!(!target.exists(), "a refused restore created its target");
        let mut wrong = args.clone();
        wrong.extend(["--identity", other.to_str().unwrap()]);
        let out = spirekeep(&wrong, &[]);
        assert_one_line_error(&out, 2, "none of the keys");
        assert!(!stderr(&out).contains("AGE-SECRET-KEY"));
        assert!(!target.exists(), "a refused restore created its target");

        // with the identity (from the environment, as a path): restored, marker and all.
        let out = spirekeep(
            &args,
            &[("SPIREKEEP_AGE_IDENTITY_FILE", identity.to_str().unwrap())],
        );
        assert!(out.status.success(), "restore: {}", stderr(&out));
        assert!(tokens_in(&target).await.iter().any(|t| t == MARKER));

        if repo.len() > 2 {
            for meta in handle.list("").await.unwrap() {
                handle.delete(&meta.key).await.unwrap();
            }
        }
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_ciphertext_is_found_without_the_identity() {
    let fx = datastore_with_marker("encrypt-damage").await;
    let dir = tempfile::tempdir().unwrap();
    let (identity, public) = keygen(dir.path(), "identity.txt");
    let repo = file_repo(&dir);
    let id = ok_json(
        &["backup", "--datastore", &fx.url(), "--recipient", &public],
        &repo,
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let object = dir.path().join(format!(
        "repo/snapshots/{id}/data/join_tokens.0.spkd.zst.age"
    ));
    let mut bytes = std::fs::read(&object).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    for extra in [vec![], vec!["--identity", identity.to_str().unwrap()]] {
        let mut args = vec!["verify", id.as_str()];
        args.extend(extra);
        let (code, report, err) = run_json(&args, &repo);
        assert_eq!(code, 1, "{err}");
        assert_eq!(report["ok"], false);
        assert!(
            report["problems"]
                .to_string()
                .contains("join_tokens.0.spkd.zst.age"),
            "{report}"
        );
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_recipients_are_refused_before_anything_is_written() {
    let fx = datastore_with_marker("encrypt-bad").await;
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let url = fx.url();
    let recipients_file = dir.path().join("recipients.txt");
    std::fs::write(&recipients_file, "# ops\nage1notakey\n").unwrap();
    let missing = dir.path().join("missing.txt");
    for (flag, value, needle) in [
        ("--recipient", "age1notakey", "not an age X25519 public key"),
        (
            "--recipient",
            "ssh-ed25519 AAAA",
            "SSH keys are not supported",
        ),
        (
            "--recipients-file",
            recipients_file.to_str().unwrap(),
            "line 2",
        ),
        (
            "--recipients-file",
            missing.to_str().unwrap(),
            "cannot read",
        ),
    ] {
        let mut args = vec!["backup", "--datastore", url.as_str(), flag, value];
        args.extend(repo.iter().map(String::as_str));
        assert_one_line_error(&spirekeep(&args, &[]), 2, needle);
        assert!(
            !dir.path().join("repo").exists(),
            "{flag} {value}: something was written"
        );
    }
    // An identity file that is not one, for a command that reads rows.
    let bogus = dir.path().join("bogus.txt");
    std::fs::write(&bogus, "AGE-SECRET-KEY-1NOTREALLY\n").unwrap();
    let mut args = vec!["verify", "--identity", bogus.to_str().unwrap()];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert_one_line_error(&out, 2, "line 1");
    assert!(!stderr(&out).contains("NOTREALLY"), "key material printed");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_snapshots_keep_format_1_and_restore_with_or_without_an_identity() {
    let fx = datastore_with_marker("encrypt-plain").await;
    let dir = tempfile::tempdir().unwrap();
    let (identity, _) = keygen(dir.path(), "identity.txt");
    let repo = file_repo(&dir);
    let id = ok_json(&["backup", "--datastore", &fx.url()], &repo)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Exactly the fields the 0.1.0 golden manifest has: an older spirekeep reads it.
    let manifest: Json = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join(format!("repo/snapshots/{id}/manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let golden: Json = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/manifest-v1.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let keys = |v: &Json| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(keys(&manifest), keys(&golden));
    assert_eq!(
        keys(&manifest["tables"][0]["objects"][0]),
        keys(&golden["tables"][0]["objects"][0])
    );
    for (n, extra) in [vec![], vec!["--identity", identity.to_str().unwrap()]]
        .into_iter()
        .enumerate()
    {
        let target = dir.path().join(format!("restored-{n}.sqlite3"));
        let mut args = vec![
            "restore",
            id.as_str(),
            "--datastore",
            target.to_str().unwrap(),
            // The marker is an unexpired join token: restored as told.
            "--keep-join-tokens",
        ];
        args.extend(extra);
        args.extend(repo.iter().map(String::as_str));
        let out = spirekeep(&args, &[]);
        assert!(out.status.success(), "restore: {}", stderr(&out));
        assert!(tokens_in(&target).await.iter().any(|t| t == MARKER));
    }
    fx.cleanup().await;
}

#[test]
fn keygen_writes_a_private_file_and_never_overwrites_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = keygen(dir.path(), "id.txt");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("# public key: {public}")));
    let secret = text.lines().last().unwrap();
    assert!(secret.starts_with("AGE-SECRET-KEY-1"));
    let again = spirekeep(&["keygen", "--output", path.to_str().unwrap()], &[]);
    assert_one_line_error(&again, 2, "never overwritten");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let y = spirekeep(&["--json", "keygen", "-y", path.to_str().unwrap()], &[]);
    assert!(y.status.success());
    let report: Json = serde_json::from_str(&stdout(&y)).unwrap();
    assert_eq!(report["public_keys"][0], public.as_str());
    assert!(!stdout(&y).contains(secret), "keygen -y printed the secret");
}
