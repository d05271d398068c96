//! Server files: SPIRE's disk KeyManager keys (`keys.json`) and the other
//! files of the server's data directory (`bundle-acme/`, ...), stored beside
//! a snapshot's data objects as their own checksummed objects.
//!
//! - **Backup** ([`collect`], then [`upload`]): the data dir is listed before
//!   the datastore is read (so a refusal touches nothing), and the files are
//!   read right after the datastore read, so the keys are at least as new as
//!   the CA journal in the snapshot. The SQLite datastore file and its
//!   `-wal`/`-shm`/`-journal` are left out (the datastore snapshot covers
//!   them), and so are sockets, FIFOs, devices and symlinks. Each file becomes
//!   one object `snapshots/<id>/server/<n>` (`.age` when encrypted), encrypted
//!   to the snapshot's recipients. Without a recipient the caller must opt in
//!   to clear text ([`ServerFilesPolicy::allow_clear`]).
//! - **Restore** ([`restore_files`]): every object is read and checked
//!   (stored SHA-256, then decrypted and the plaintext SHA-256) before any
//!   file is written; each file is written to a temporary file, synced and
//!   then linked (or, with `replace`, renamed) into place; keys get mode 0600.
//! - **Verify** ([`verify_files`]): sizes and hashes of the stored bytes, and
//!   of the plaintext when the identity is at hand.
//!
//! File contents never reach a log, an error or the manifest: the manifest
//! holds each file's relative path, size, mode and hashes.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::{Manifest, ObjectEncryption};
use crate::datastore::spire_conf::{KeyManagerConfig, ServerLayout, normalize};
use crate::error::{Error, Result};
use crate::store::Repository;
use crate::store::keys::{SNAPSHOTS, SnapshotId};

/// The largest server file backed up (a `keys.json` is a few KiB).
pub const MAX_SERVER_FILE_BYTES: u64 = 64 << 20;
/// The most files taken from a data dir.
pub const MAX_SERVER_FILES: usize = 10_000;

/// What a server file is to SPIRE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFileRole {
    /// The disk KeyManager's keys file: the CA private keys.
    Keys,
    /// Any other file of the data dir.
    DataDir,
}

/// One stored server file, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFile {
    /// Relative to the data dir, `/`-separated (the keys file, when it is
    /// outside the data dir: its file name).
    pub path: String,
    pub role: ServerFileRole,
    /// Repository key (under `snapshots/<id>/server/`).
    pub key: String,
    /// Stored size (of the ciphertext when encrypted).
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Size of the file itself.
    pub raw_size: u64,
    /// SHA-256 of the file itself, hex.
    pub raw_sha256: String,
    /// The file's permission bits when backed up (e.g. 384 = 0o600).
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ObjectEncryption>,
}

/// `snapshots/<id>/server/`.
#[must_use]
pub fn server_prefix(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/server/")
}

/// How a backup treats server files.
#[derive(Debug, Clone)]
pub struct ServerFilesPolicy {
    /// Where the server's files are (from server.conf).
    pub layout: ServerLayout,
    /// Store them unencrypted when the snapshot has no recipient.
    pub allow_clear: bool,
}

/// A file found on disk, to be read by [`upload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    pub path: String,
    pub role: ServerFileRole,
    pub source: PathBuf,
}

/// What [`collect`] found.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub files: Vec<LocalFile>,
    /// Said once to the operator (a missing keys file, skipped entries).
    pub warnings: Vec<String>,
}

/// Lists the files to back up (nothing is read yet).
///
/// # Errors
/// A data dir that exists but cannot be listed, or one with more than
/// [`MAX_SERVER_FILES`] files.
pub fn collect(layout: &ServerLayout) -> Result<Collected> {
    let mut out = Collected::default();
    match &layout.key_manager {
        KeyManagerConfig::Disk { .. } => {}
        KeyManagerConfig::Memory => out.warnings.push(
            "KeyManager \"memory\": the CA keys live only in the running server, so there are no keys on disk \
             to back up (a server started from this snapshot mints a new CA)"
                .into(),
        ),
        KeyManagerConfig::Other(name) => out.warnings.push(format!(
            "KeyManager \"{name}\" keeps the CA keys outside the server's files: they are not in this snapshot \
             (back them up with that key store)"
        )),
        KeyManagerConfig::Unusable(why) => out
            .warnings
            .push(format!("server.conf: {why}; no keys file is backed up")),
    }
    let skip: BTreeSet<PathBuf> = layout.datastore_files.iter().cloned().collect();
    let keys = layout.keys_path.as_ref().map(|p| normalize(p));
    if let Some(dir) = &layout.data_dir {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => walk(dir, dir, &skip, keys.as_deref(), &mut out)?,
            Ok(_) => out.warnings.push(format!(
                "the data dir {} is not a directory; only the keys file is backed up",
                dir.display()
            )),
            Err(e) => out.warnings.push(format!(
                "the data dir {} cannot be read ({e}); only the keys file is backed up",
                dir.display()
            )),
        }
    }
    if let Some(keys) = &keys {
        let inside = out.files.iter().any(|f| f.role == ServerFileRole::Keys);
        if !inside {
            match std::fs::metadata(keys) {
                Ok(m) if m.is_file() => {
                    let name = keys
                        .file_name()
                        .map_or_else(|| "keys.json".into(), |n| n.to_string_lossy().into_owned());
                    let path = if out.files.iter().any(|f| f.path == name) {
                        format!("spire-keys/{name}")
                    } else {
                        name
                    };
                    out.files.push(LocalFile {
                        path,
                        role: ServerFileRole::Keys,
                        source: keys.clone(),
                    });
                }
                _ => out.warnings.push(format!(
                    "the disk KeyManager's keys file {} does not exist (a server that never started?): the \
                     snapshot holds no CA keys, and a server restored from it mints a new CA",
                    keys.display()
                )),
            }
        }
    }
    Ok(out)
}

fn walk(
    root: &Path,
    dir: &Path,
    skip: &BTreeSet<PathBuf>,
    keys: Option<&Path>,
    out: &mut Collected,
) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Error::Unsupported(format!(
            "cannot list the SPIRE data dir {}: {e}; run the backup as a user that can read it, or pass --no-server-files",
            dir.display()
        ))
    })?;
    let mut entries: Vec<_> = entries.filter_map(std::result::Result::ok).collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = normalize(&entry.path());
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(root, &path, skip, keys, out)?;
            continue;
        }
        if skip.contains(&path) {
            continue;
        }
        let Ok(relative) = path.strip_prefix(normalize(root)) else {
            continue;
        };
        let Some(relative) = relative_string(relative) else {
            out.warnings.push(format!(
                "{} has a name that is not UTF-8: skipped",
                path.display()
            ));
            continue;
        };
        if meta.file_type().is_symlink() {
            out.warnings
                .push(format!("{} is a symlink: skipped", path.display()));
            continue;
        }
        if !meta.is_file() {
            // Sockets (the server's API socket may live here), FIFOs, devices.
            continue;
        }
        if out.files.len() >= MAX_SERVER_FILES {
            return Err(Error::Unsupported(format!(
                "the SPIRE data dir {} holds more than {MAX_SERVER_FILES} files; pass --no-server-files",
                root.display()
            )));
        }
        let role = if keys == Some(path.as_path()) {
            ServerFileRole::Keys
        } else {
            ServerFileRole::DataDir
        };
        out.files.push(LocalFile {
            path: relative,
            role,
            source: path,
        });
    }
    Ok(())
}

fn relative_string(p: &Path) -> Option<String> {
    let parts: Option<Vec<&str>> = p
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    parts.map(|p| p.join("/"))
}

/// Server files are never stored in clear text without the operator's
/// say-so: with no recipient and no `allow_clear`, they are left out of the
/// snapshot (the datastore is still backed up: a backup job must not stop
/// because of them) and this warning says so and how to include them.
#[must_use]
pub fn left_out_in_clear(
    collected: &Collected,
    repo: &Repository,
    allow_clear: bool,
) -> Option<String> {
    if collected.files.is_empty() || repo.recipients().is_some() || allow_clear {
        return None;
    }
    let what = if collected
        .files
        .iter()
        .any(|f| f.role == ServerFileRole::Keys)
    {
        "the SPIRE server's CA private keys and data dir"
    } else {
        "the SPIRE server's data dir"
    };
    Some(format!(
        "{what} were left out of this snapshot: they are never stored unencrypted unless told; pass --recipient \
         (or --recipients-file) to encrypt the snapshot with them, --server-files-in-clear to store them in clear \
         anyway, or --no-server-files to silence this"
    ))
}

/// Reads each collected file and stores it under the snapshot (encrypted to
/// the handle's recipients, if any). Every key written is pushed to
/// `written` before the write, so a failed backup can delete it.
///
/// # Errors
/// A file that cannot be read (other than one that vanished, which is a
/// warning), one over [`MAX_SERVER_FILE_BYTES`], or a store failure.
pub async fn upload(
    repo: &Repository,
    id: &SnapshotId,
    collected: &Collected,
    written: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Vec<ServerFile>> {
    let mut out = Vec::with_capacity(collected.files.len());
    for (n, file) in collected.files.iter().enumerate() {
        let (plain, mode) = match read_file(&file.source) {
            Ok(Some(x)) => x,
            Ok(None) => {
                warnings.push(format!(
                    "{} disappeared before it could be read: not in the snapshot",
                    file.source.display()
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        let encryption = repo.recipients().map(|_| ObjectEncryption::Age);
        let stored = match repo.recipients() {
            Some(r) => seal(r, &plain)?,
            None => plain.clone(),
        };
        let key = format!(
            "{}{n:05}{}",
            server_prefix(id),
            if encryption.is_some() { ".age" } else { "" }
        );
        written.push(key.clone());
        let entry = ServerFile {
            path: file.path.clone(),
            role: file.role,
            key: key.clone(),
            size: stored.len() as u64,
            sha256: hex(&Sha256::digest(&stored)),
            raw_size: plain.len() as u64,
            raw_sha256: hex(&Sha256::digest(&plain)),
            mode,
            encryption,
        };
        repo.put_create(&key, stored.into()).await?;
        out.push(entry);
    }
    Ok(out)
}

/// The file's bytes and permission bits; `None` when it no longer exists.
fn read_file(path: &Path) -> Result<Option<(Vec<u8>, u32)>> {
    use std::os::unix::fs::PermissionsExt as _;
    let cannot = |e: std::io::Error| {
        Error::Unsupported(format!(
            "cannot read the SPIRE server file {}: {e}; run the backup as a user that can read it, or pass --no-server-files",
            path.display()
        ))
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot(e)),
    };
    let meta = f.metadata().map_err(cannot)?;
    let mut plain = Vec::new();
    f.take(MAX_SERVER_FILE_BYTES + 1)
        .read_to_end(&mut plain)
        .map_err(cannot)?;
    if plain.len() as u64 > MAX_SERVER_FILE_BYTES {
        return Err(Error::Unsupported(format!(
            "the SPIRE server file {} is larger than {} MiB, which is no SPIRE file: move it out of the data dir, or pass --no-server-files",
            path.display(),
            MAX_SERVER_FILE_BYTES >> 20
        )));
    }
    Ok(Some((plain, meta.permissions().mode() & 0o7777)))
}

fn seal(r: &crate::store::crypt::Recipients, plain: &[u8]) -> Result<Vec<u8>> {
    let fail = |e: std::io::Error| Error::Aborted(format!("cannot encrypt a server file: {e}"));
    let mut w = r.seal(Vec::new()).map_err(fail)?;
    w.write_all(plain).map_err(fail)?;
    w.finish().map_err(fail)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Everything inconsistent in a manifest's server files (see
/// [`Manifest::problems`]): keys under `snapshots/<id>/server/`, each used
/// once, safe relative paths used once, hashes well-formed, and encryption
/// matching the snapshot's.
#[must_use]
pub fn problems(manifest: &Manifest) -> Vec<String> {
    let mut p = Vec::new();
    let prefix = server_prefix(&manifest.snapshot_id);
    let mut keys = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let expected = manifest.encryption.as_ref().map(|e| e.scheme);
    for f in &manifest.server_files {
        let rest = f.key.strip_prefix(&prefix).unwrap_or("");
        if rest.is_empty() || rest.contains('/') {
            p.push(format!("server file {} is not under {prefix}", f.key));
        }
        if !keys.insert(f.key.as_str()) {
            p.push(format!("server file object {} is listed twice", f.key));
        }
        if !is_safe_path(&f.path) {
            p.push(format!(
                "server file path {:?} is not a plain relative path",
                f.path
            ));
        }
        if !paths.insert(f.path.as_str()) {
            p.push(format!("server file {} is listed twice", f.path));
        }
        for (what, v) in [("sha256", &f.sha256), ("raw_sha256", &f.raw_sha256)] {
            if !(v.len() == 64 && v.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))) {
                p.push(format!(
                    "server file {}: {what} is not 64 lower-case hex digits",
                    f.path
                ));
            }
        }
        if f.raw_size > MAX_SERVER_FILE_BYTES || f.size > MAX_SERVER_FILE_BYTES + (1 << 20) {
            p.push(format!("server file {} is over the size limit", f.path));
        }
        if f.encryption != expected {
            p.push(format!(
                "server file {} is {} in {} snapshot",
                f.path,
                if f.encryption.is_some() {
                    "encrypted"
                } else {
                    "not encrypted"
                },
                if expected.is_some() {
                    "an encrypted"
                } else {
                    "a plaintext"
                }
            ));
        }
    }
    p
}

/// A relative path of plain names: no `..`, no root, no empty or `.` parts,
/// no backslash or NUL, so it stays under the directory it is restored into.
fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 4096
        && path.split('/').all(|part| {
            !part.is_empty() && part != "." && part != ".." && !part.contains(['\\', '\0'])
        })
}

/// Why a stored server file could not be read back.
fn read_problem(f: &ServerFile, what: &str) -> String {
    format!("server file {} (object {}): {what}", f.path, f.key)
}

/// Reads one server file's object and checks it: stored size and SHA-256,
/// then (with `identities`, or for a plaintext file) the plaintext's.
/// Returns the plaintext when it was checked.
async fn fetch(
    repo: &Repository,
    f: &ServerFile,
    decrypt: bool,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let stored = repo
        .get_capped(&f.key, f.size)
        .await
        .map_err(|e| read_problem(f, &format!("cannot be read: {e}")))?;
    if stored.len() as u64 != f.size || hex(&Sha256::digest(&stored)) != f.sha256 {
        return Err(read_problem(
            f,
            "size or SHA-256 of the stored bytes does not match the manifest",
        ));
    }
    let plain = match f.encryption {
        None => stored.to_vec(),
        Some(ObjectEncryption::Age) => {
            let Some(ids) = repo.identities().filter(|_| decrypt) else {
                return Ok(None);
            };
            let mut reader = ids
                .open(&stored[..])
                .map_err(|e| read_problem(f, &format!("cannot be decrypted: {e}")))?;
            let mut plain = Vec::new();
            (&mut reader)
                .take(f.raw_size + 1)
                .read_to_end(&mut plain)
                .map_err(|e| read_problem(f, &format!("cannot be decrypted: {e}")))?;
            plain
        }
    };
    if plain.len() as u64 != f.raw_size || hex(&Sha256::digest(&plain)) != f.raw_sha256 {
        return Err(read_problem(
            f,
            "size or SHA-256 of the file does not match the manifest",
        ));
    }
    Ok(Some(plain))
}

/// The outcome of [`verify_files`].
#[derive(Debug, Default)]
pub struct FilesCheck {
    pub problems: Vec<String>,
    /// Stored bytes read.
    pub stored_bytes: u64,
    /// Whether the files' plaintext was checked too.
    pub plaintext_checked: bool,
    /// The key IDs in the snapshot's keys file, when it was read; `None` when
    /// the snapshot has no keys file or it could not be read.
    pub key_ids: Option<BTreeSet<String>>,
    /// Whether the snapshot holds a keys file at all.
    pub has_keys_file: bool,
}

/// Checks every server file of the snapshot: stored size and SHA-256, and,
/// when `decrypt` and the handle has the identity (or the files are not
/// encrypted), the file's own size and SHA-256. Problems are collected,
/// not returned as errors.
pub async fn verify_files(repo: &Repository, manifest: &Manifest, decrypt: bool) -> FilesCheck {
    let mut check = FilesCheck {
        plaintext_checked: !manifest.server_files.is_empty(),
        ..FilesCheck::default()
    };
    for f in &manifest.server_files {
        if f.role == ServerFileRole::Keys {
            check.has_keys_file = true;
        }
        match fetch(repo, f, decrypt).await {
            Ok(plain) => {
                check.stored_bytes += f.size;
                match plain {
                    None => check.plaintext_checked = false,
                    Some(bytes) if f.role == ServerFileRole::Keys => {
                        match crate::ca_keys::key_ids_from_keys_json(&bytes) {
                            Ok(ids) => check.key_ids = Some(ids),
                            Err(e) => check.problems.push(read_problem(
                                f,
                                &format!("the keys file is unreadable: {e}"),
                            )),
                        }
                    }
                    Some(_) => {}
                }
            }
            Err(p) => check.problems.push(p),
        }
    }
    check
}

/// What [`restore_files`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredFiles {
    pub dir: PathBuf,
    /// Relative paths written.
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Checks, before anything is written, that the snapshot's server files can
/// be restored into `dir`: the snapshot has some, the identity can decrypt
/// them, and (without `replace`) none of them exists yet.
///
/// # Errors
/// [`Error::Unsupported`] naming what is wrong and the way out.
pub fn check_restore(
    manifest: &Manifest,
    repo: &Repository,
    dir: &Path,
    replace: bool,
) -> Result<()> {
    if manifest.server_files.is_empty() {
        return Err(Error::Unsupported(format!(
            "snapshot {} holds no server files (it was taken without --spire-config, with --no-server-files, \
             or from a server with nothing on disk): restore without --server-files",
            manifest.snapshot_id
        )));
    }
    if manifest.server_files.iter().any(|f| f.encryption.is_some()) {
        match repo.identities() {
            None => return Err(manifest.needs_identity("restoring its server files")),
            Some(ids) if !ids.matches_any(manifest.recipients()) => {
                // row_access gives the full message.
                manifest.row_access(Some(ids))?;
            }
            Some(_) => {}
        }
    }
    if !replace {
        let existing: Vec<&str> = manifest
            .server_files
            .iter()
            .filter(|f| std::fs::symlink_metadata(dir.join(&f.path)).is_ok())
            .map(|f| f.path.as_str())
            .collect();
        if !existing.is_empty() {
            return Err(Error::Unsupported(format!(
                "{} already holds {}: stop the SPIRE server and pass --replace to overwrite them, or give \
                 --server-files another directory",
                dir.display(),
                existing.join(", ")
            )));
        }
    }
    Ok(())
}

/// Writes the snapshot's server files under `dir`. Every object is read and
/// checked first (nothing is written if one is damaged); then each file is
/// written to a temporary file beside its place, synced, and moved into
/// place (a new name without `replace`, so an existing file is never
/// overwritten). The keys file gets mode 0600; other files their recorded
/// mode (without set-id bits), directories 0700.
///
/// # Errors
/// [`check_restore`]'s refusals, a damaged object ([`Error::Integrity`]),
/// or a file system failure.
pub async fn restore_files(
    repo: &Repository,
    manifest: &Manifest,
    dir: &Path,
    replace: bool,
) -> Result<RestoredFiles> {
    check_restore(manifest, repo, dir, replace)?;
    let mut checked = Vec::with_capacity(manifest.server_files.len());
    for f in &manifest.server_files {
        match fetch(repo, f, true).await {
            Ok(Some(plain)) => checked.push((f, plain)),
            Ok(None) => return Err(manifest.needs_identity("restoring its server files")),
            Err(p) => {
                return Err(Error::Integrity(format!(
                    "{p}; nothing was written to {}: restore the server files from another snapshot",
                    dir.display()
                )));
            }
        }
    }
    let mut out = RestoredFiles {
        dir: dir.to_owned(),
        files: Vec::new(),
        bytes: 0,
    };
    for (f, plain) in checked {
        let mode = match f.role {
            ServerFileRole::Keys => 0o600,
            ServerFileRole::DataDir => f.mode & 0o777,
        };
        write_file(dir, &f.path, &plain, mode, replace).map_err(|e| {
            Error::Aborted(format!(
                "cannot write the server file {} under {}: {e}{}",
                f.path,
                dir.display(),
                if out.files.is_empty() {
                    String::new()
                } else {
                    format!(" (already written: {})", out.files.join(", "))
                }
            ))
        })?;
        out.bytes += plain.len() as u64;
        out.files.push(f.path.clone());
    }
    Ok(out)
}

fn write_file(
    dir: &Path,
    relative: &str,
    bytes: &[u8],
    mode: u32,
    replace: bool,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let target = dir.join(relative);
    let parent = target.parent().unwrap_or(dir).to_owned();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)?;
    let name = target
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let suffix: u32 = rand::random();
    let temp = parent.join(format!(".{name}.spirekeep-{suffix:08x}.tmp"));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.max(0o400) & 0o777)
            .open(&temp)?;
        file.write_all(bytes)?;
        // The umask may have narrowed the mode; set exactly what is wanted.
        file.set_permissions(std::fs::Permissions::from_mode(mode.max(0o400) & 0o777))?;
        file.sync_all()?;
        if replace {
            std::fs::rename(&temp, &target)
        } else {
            // A hard link fails if the target exists: never overwrite.
            std::fs::hard_link(&temp, &target)?;
            std::fs::remove_file(&temp)
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn layout(root: &Path) -> ServerLayout {
        ServerLayout {
            data_dir: Some(root.join("data")),
            keys_path: Some(root.join("data/keys.json")),
            key_manager: KeyManagerConfig::Disk {
                keys_path: "./data/keys.json".into(),
            },
            datastore_files: ["", "-wal", "-shm", "-journal"]
                .map(|s| root.join(format!("data/datastore.sqlite3{s}")))
                .to_vec(),
        }
    }

    fn populate(root: &Path) {
        let d = root.join("data");
        std::fs::create_dir_all(d.join("bundle-acme/acct")).unwrap();
        for f in [
            "datastore.sqlite3",
            "datastore.sqlite3-wal",
            "datastore.sqlite3-shm",
        ] {
            std::fs::write(d.join(f), b"db").unwrap();
        }
        std::fs::write(d.join("keys.json"), br#"{"keys":{"x509-CA-A":"c2VjcmV0"}}"#).unwrap();
        std::fs::write(d.join("bundle-acme/acct/key.pem"), b"acme").unwrap();
        std::os::unix::fs::symlink(d.join("keys.json"), d.join("link")).unwrap();
        std::os::unix::net::UnixListener::bind(d.join("api.sock")).unwrap();
    }

    #[test]
    fn collect_takes_keys_and_data_dir_but_not_the_datastore_or_specials() {
        let root = tempfile::tempdir().unwrap();
        populate(root.path());
        let c = collect(&layout(root.path())).unwrap();
        let got: Vec<(&str, ServerFileRole)> =
            c.files.iter().map(|f| (f.path.as_str(), f.role)).collect();
        assert_eq!(
            got,
            vec![
                ("bundle-acme/acct/key.pem", ServerFileRole::DataDir),
                ("keys.json", ServerFileRole::Keys),
            ]
        );
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("symlink"));
    }

    #[test]
    fn collect_warns_on_a_missing_keys_file_and_memory_key_manager() {
        let root = tempfile::tempdir().unwrap();
        let c = collect(&layout(root.path())).unwrap();
        assert!(c.files.is_empty());
        let all = c.warnings.join("\n");
        assert!(all.contains("does not exist"), "{all}");
        assert!(all.contains("cannot be read"), "{all}");
        let mut l = layout(root.path());
        l.key_manager = KeyManagerConfig::Memory;
        l.keys_path = None;
        let c = collect(&l).unwrap();
        assert!(c.warnings.join("\n").contains("no keys on disk"));
    }

    #[test]
    fn a_keys_file_outside_the_data_dir_is_taken_by_name() {
        let root = tempfile::tempdir().unwrap();
        populate(root.path());
        std::fs::write(root.path().join("keys.json"), b"{}").unwrap();
        let mut l = layout(root.path());
        l.keys_path = Some(root.path().join("keys.json"));
        let c = collect(&l).unwrap();
        let keys: Vec<&LocalFile> = c
            .files
            .iter()
            .filter(|f| f.role == ServerFileRole::Keys)
            .collect();
        // data/keys.json is a plain data-dir file now; the real one gets another name.
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].path, "spire-keys/keys.json");
    }

    #[test]
    fn safe_paths_only() {
        for ok in ["keys.json", "bundle-acme/a/b.pem", ".hidden"] {
            assert!(is_safe_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "a/",
        ] {
            assert!(!is_safe_path(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn upload_then_restore_round_trips_encrypted() {
        let root = tempfile::tempdir().unwrap();
        populate(root.path());
        let (ids, recipients) = crate::store::crypt::test_keys();
        let repo = Repository::in_memory().with_recipients(recipients);
        let id = SnapshotId::parse("20261128T093000Z-0a1b2c").unwrap();
        let c = collect(&layout(root.path())).unwrap();
        assert!(left_out_in_clear(&c, &repo, false).is_none());
        let (mut written, mut warnings) = (Vec::new(), Vec::new());
        let files = upload(&repo, &id, &c, &mut written, &mut warnings)
            .await
            .unwrap();
        assert_eq!(written.len(), 2);
        assert!(
            files
                .iter()
                .all(|f| f.key.ends_with(".age") && f.encryption.is_some())
        );
        for k in &written {
            let stored = repo.get(k).await.unwrap();
            assert!(
                !stored.windows(8).any(|w| w == b"c2VjcmV0"),
                "plaintext key stored"
            );
        }
        let mut m = manifest_with(&id, files, Some(repo.recipients().unwrap().public_keys()));
        assert_eq!(problems(&m), Vec::<String>::new());
        // Without the identity: refused; with it: byte-identical, keys 0600.
        let out = root.path().join("restored");
        assert!(restore_files(&repo, &m, &out, false).await.is_err());
        let repo = repo.with_identities(ids);
        let r = restore_files(&repo, &m, &out, false).await.unwrap();
        assert_eq!(r.files.len(), 2);
        let keys = out.join("keys.json");
        assert_eq!(
            std::fs::read(&keys).unwrap(),
            std::fs::read(root.path().join("data/keys.json")).unwrap()
        );
        assert_eq!(
            std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A second restore refuses to overwrite, unless replace.
        let e = restore_files(&repo, &m, &out, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("--replace"), "{e}");
        restore_files(&repo, &m, &out, true).await.unwrap();
        let check = verify_files(&repo, &m, true).await;
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert!(check.plaintext_checked);
        assert_eq!(check.key_ids.unwrap().len(), 1);
        // Damage is found, and nothing is written.
        repo.put_overwrite(&m.server_files[0].key, bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(verify_files(&repo, &m, true).await.problems.len(), 1);
        let fresh = root.path().join("fresh");
        assert!(restore_files(&repo, &m, &fresh, false).await.is_err());
        assert!(!fresh.exists());
        // A path that escapes is a manifest problem.
        m.server_files[0].path = "../escape".into();
        assert!(
            problems(&m)
                .join("\n")
                .contains("not a plain relative path")
        );
    }

    #[tokio::test]
    async fn clear_text_needs_consent() {
        let root = tempfile::tempdir().unwrap();
        populate(root.path());
        let repo = Repository::in_memory();
        let c = collect(&layout(root.path())).unwrap();
        let text = left_out_in_clear(&c, &repo, false).expect("left out");
        assert!(
            text.contains("--recipient") && text.contains("--server-files-in-clear"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert!(left_out_in_clear(&c, &repo, true).is_none());
        assert!(left_out_in_clear(&Collected::default(), &repo, false).is_none());
    }

    fn manifest_with(
        id: &SnapshotId,
        files: Vec<ServerFile>,
        recipients: Option<Vec<String>>,
    ) -> Manifest {
        let mut m: Manifest =
            serde_json::from_str(include_str!("../../tests/fixtures/manifest-v1.json")).unwrap();
        m.snapshot_id = id.clone();
        m.server_files = files;
        m.encryption = recipients.map(|recipients| super::super::manifest::Encryption {
            scheme: ObjectEncryption::Age,
            recipients,
        });
        m
    }
}
