//! Client-side encryption at rest with [age](https://age-encryption.org):
//! the keys an operator gives (recipients to encrypt to, an identity file to
//! decrypt with) and the streaming adapters the codec wraps around a data
//! object's compressed bytes.
//!
//! Only X25519 keys are taken (`age1…` recipients, `AGE-SECRET-KEY-1…`
//! identities, as `age-keygen` and `spirekeep keygen` write them): they need
//! no plugin and no terminal, so a cron job or the agent can use them. The
//! STREAM format encrypts in 64 KiB chunks, so memory stays flat whatever the
//! object size.
//!
//! Secrets never leave this module: [`Identities`] prints (Debug, errors)
//! only the file it came from and the matching public keys.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use age::secrecy::ExposeSecret;

use crate::error::{Error, Result};

/// The keys a repository handle carries (see [`crate::store::Repository::with_keyring`]).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    /// New snapshots are encrypted to these.
    pub recipients: Option<Arc<Recipients>>,
    /// Encrypted snapshots are read with these.
    pub identities: Option<Arc<Identities>>,
}

/// The public keys a backup encrypts every data object to. Any one of the
/// matching identities can decrypt.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.public_keys()).finish()
    }
}

impl Recipients {
    /// Recipients from `--recipient` values and recipients files (one key a
    /// line; blank lines and `#` comments allowed). `None` when neither
    /// names any key: the backup is not encrypted.
    ///
    /// # Errors
    /// An unreadable file or a line that is not an `age1…` X25519 public key
    /// (the message names the file and line).
    pub fn from_args(keys: &[String], files: &[PathBuf]) -> Result<Option<Self>> {
        let mut out: Vec<age::x25519::Recipient> = Vec::new();
        for key in keys {
            for part in key.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                push_unique(&mut out, parse_recipient(part, "--recipient")?);
            }
        }
        for file in files {
            let text = read_key_file(file, "recipients file")?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let at = format!("recipients file {} line {}", file.display(), n + 1);
                push_unique(&mut out, parse_recipient(line, &at)?);
            }
            if out.is_empty() {
                return Err(key_error(format!(
                    "recipients file {} holds no age1… public key; add one per line",
                    file.display()
                )));
            }
        }
        Ok((!out.is_empty()).then_some(Self { keys: out }))
    }

    /// The recipients' public keys (`age1…`), in the order given.
    #[must_use]
    pub fn public_keys(&self) -> Vec<String> {
        self.keys.iter().map(ToString::to_string).collect()
    }

    /// Starts an age file to these recipients on `sink`: the header is
    /// written at once; the returned writer encrypts what follows, and must
    /// be [finished](Sealer::finish).
    ///
    /// # Errors
    /// The sink's failure writing the header.
    pub fn seal<W: Write>(&self, sink: W) -> io::Result<Sealer<W>> {
        let encryptor =
            age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
                .map_err(|e| io::Error::other(format!("cannot encrypt to the recipients: {e}")))?;
        Ok(Sealer(encryptor.wrap_output(sink)?))
    }
}

fn push_unique(out: &mut Vec<age::x25519::Recipient>, key: age::x25519::Recipient) {
    if !out.iter().any(|k| k.to_string() == key.to_string()) {
        out.push(key);
    }
}

fn parse_recipient(text: &str, at: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(text).map_err(|_| {
        let shown: String = text.chars().take(12).collect();
        let hint = if text.starts_with("AGE-SECRET-KEY-") {
            "that is a secret key: give its public key (`spirekeep keygen --public FILE` prints it)"
                .to_owned()
        } else if text.starts_with("ssh-") {
            "SSH keys are not supported: give an age X25519 public key".to_owned()
        } else {
            format!("{shown:?}… is not an age X25519 public key (age1…)")
        };
        key_error(format!("{at}: {hint}"))
    })
}

/// The writing end of an age file (see [`Recipients::seal`]).
pub struct Sealer<W: Write>(age::stream::StreamWriter<W>);

impl<W: Write> Sealer<W> {
    /// Encrypts and writes the last chunk; returns the sink.
    ///
    /// # Errors
    /// The sink's failure.
    pub fn finish(self) -> io::Result<W> {
        self.0.finish()
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Secret keys from an identity file, to decrypt data objects. Debug and
/// every message show only the file and the public keys.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    source: PathBuf,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("file", &self.source)
            .field("public_keys", &self.public_keys())
            .finish()
    }
}

impl Identities {
    /// Reads an identity file: `AGE-SECRET-KEY-1…` lines, blank lines and
    /// `#` comments (the format `age-keygen` writes).
    ///
    /// # Errors
    /// An unreadable file, or one without a valid key (the message gives the
    /// line number, never the line).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_key_file(path, "identity file")?;
        Self::parse(&text, path)
    }

    /// Parses an identity file's text; `path` names it in messages.
    fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = age::x25519::Identity::from_str(line).map_err(|_| {
                key_error(format!(
                    "identity file {} line {}: not an age X25519 secret key (AGE-SECRET-KEY-1…); \
                     passphrase-protected and SSH identities are not supported",
                    path.display(),
                    n + 1
                ))
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(key_error(format!(
                "identity file {} holds no AGE-SECRET-KEY-1… line; create one with `spirekeep keygen --output FILE`",
                path.display()
            )));
        }
        Ok(Self {
            keys,
            source: path.to_owned(),
        })
    }

    /// The file the keys came from.
    #[must_use]
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The public keys (`age1…`) of these identities.
    #[must_use]
    pub fn public_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    /// Whether one of these identities is one of `recipients` (public keys):
    /// decided without touching any object.
    #[must_use]
    pub fn matches_any(&self, recipients: &[String]) -> bool {
        self.public_keys().iter().any(|k| recipients.contains(k))
    }

    /// Reads an age file's header from `input` and returns a reader of the
    /// plaintext, which checks every chunk's tag and the end of the stream.
    ///
    /// # Errors
    /// A damaged header, or no identity that can open it.
    pub fn open<R: Read>(&self, input: R) -> Result<age::stream::StreamReader<R>, OpenError> {
        let decryptor = age::Decryptor::new(input).map_err(OpenError::from)?;
        if decryptor.is_scrypt() {
            return Err(OpenError::Damaged(
                "encrypted with a passphrase, not to a recipient".into(),
            ));
        }
        decryptor
            .decrypt(self.keys.iter().map(|k| k as &dyn age::Identity))
            .map_err(OpenError::from)
    }
}

/// A fresh key pair, for tests: the identities and the matching recipients.
#[cfg(test)]
pub(crate) fn test_keys() -> (Identities, Recipients) {
    let (text, public) = generate();
    let ids = Identities::parse(&text, Path::new("test-identity.txt")).expect("a fresh key parses");
    let recipients = Recipients::from_args(&[public], &[])
        .expect("a fresh key parses")
        .expect("one key");
    (ids, recipients)
}

/// Why an age file could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// None of the identities is a recipient of the file.
    NoMatchingKey,
    /// The header is not a well-formed age header, or its MAC does not match.
    Damaged(String),
    /// The reader failed.
    Io(io::Error),
}

impl From<age::DecryptError> for OpenError {
    fn from(e: age::DecryptError) -> Self {
        match e {
            age::DecryptError::NoMatchingKeys => Self::NoMatchingKey,
            age::DecryptError::Io(e) => Self::Io(e),
            other => Self::Damaged(other.to_string()),
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMatchingKey => f.write_str("none of the identities can decrypt it"),
            Self::Damaged(why) => write!(f, "its age header is damaged ({why})"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Whether `text` is an age X25519 public key (`age1…`).
#[must_use]
pub fn is_public_key(text: &str) -> bool {
    age::x25519::Recipient::from_str(text).is_ok()
}

/// A new X25519 identity: the identity file's text (as `age-keygen` writes
/// it, with the public key in a comment) and the public key.
#[must_use]
pub fn generate() -> (String, String) {
    let key = age::x25519::Identity::generate();
    let public = key.to_public().to_string();
    let created = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let text = format!(
        "# created: {created}\n# public key: {public}\n{}\n",
        key.to_string().expose_secret()
    );
    (text, public)
}

fn read_key_file(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        key_error(format!(
            "cannot read the {what} {}: {e}; check the path and its permissions",
            path.display()
        ))
    })
}

fn key_error(message: String) -> Error {
    Error::Unsupported(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn seal_bytes(r: &Recipients, plain: &[u8]) -> Vec<u8> {
        let mut w = r.seal(Vec::new()).unwrap();
        // Written in odd pieces, as the compressor does.
        for piece in plain.chunks(7919) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn seal_then_open_round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (text, public) = generate();
        let ids = Identities::from_file(&write(&dir, "id.txt", &text)).unwrap();
        assert_eq!(ids.public_keys(), vec![public.clone()]);
        let r = Recipients::from_args(std::slice::from_ref(&public), &[])
            .unwrap()
            .unwrap();
        let plain: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let sealed = seal_bytes(&r, &plain);
        assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
        assert!(
            !sealed
                .windows(64)
                .any(|w| plain.windows(64).next() == Some(w)),
            "plaintext leaked"
        );
        let mut back = Vec::new();
        ids.open(&sealed[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, plain);
        // Truncated or flipped: an error, never a short read that looks whole.
        let mut out = Vec::new();
        let cut = &sealed[..sealed.len() - 10];
        assert!(ids.open(cut).unwrap().read_to_end(&mut out).is_err());
        let mut flipped = sealed.clone();
        let at = flipped.len() - 100;
        flipped[at] ^= 1;
        assert!(
            ids.open(&flipped[..])
                .unwrap()
                .read_to_end(&mut out)
                .is_err()
        );
        // Another key cannot open it.
        let (other, _) = generate();
        let other = Identities::from_file(&write(&dir, "other.txt", &other)).unwrap();
        assert!(matches!(
            other.open(&sealed[..]),
            Err(OpenError::NoMatchingKey)
        ));
        assert!(!other.matches_any(&r.public_keys()));
        assert!(ids.matches_any(&r.public_keys()));
    }

    #[test]
    fn recipients_files_take_comments_and_refuse_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (_, a) = generate();
        let (_, b) = generate();
        let file = write(
            &dir,
            "r.txt",
            &format!("# ops team\n\n{a}\n  {b}  \n# duplicate below\n{a}\n"),
        );
        let r = Recipients::from_args(std::slice::from_ref(&b), &[file])
            .unwrap()
            .unwrap();
        assert_eq!(r.public_keys(), vec![b.clone(), a.clone()]);
        assert!(Recipients::from_args(&[], &[]).unwrap().is_none());
        let bad = write(&dir, "bad.txt", &format!("{a}\nage1nope\n"));
        let err = Recipients::from_args(&[], &[bad]).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let (secret, _) = generate();
        let secret_line = secret.lines().last().unwrap().to_owned();
        let err = Recipients::from_args(std::slice::from_ref(&secret_line), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret key"), "{err}");
        assert!(
            !err.contains(&secret_line[15..]),
            "key material printed: {err}"
        );
        let empty = write(&dir, "empty.txt", "# nobody\n");
        assert!(Recipients::from_args(&[], &[empty]).is_err());
        let missing = dir.path().join("missing.txt");
        assert!(Recipients::from_args(&[], &[missing]).is_err());
    }

    #[test]
    fn identity_files_never_print_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let (text, public) = generate();
        let secret = text.lines().last().unwrap().to_owned();
        let ids = Identities::from_file(&write(&dir, "id.txt", &text)).unwrap();
        let shown = format!("{ids:?}");
        assert!(
            shown.contains(&public) && !shown.contains(&secret),
            "{shown}"
        );
        let broken = format!("{}x\n", &secret[..secret.len() - 3]);
        let err = Identities::from_file(&write(&dir, "bad.txt", &broken))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && !err.contains(&secret[20..]),
            "{err}"
        );
        let err = Identities::from_file(&write(&dir, "none.txt", "# empty\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spirekeep keygen"), "{err}");
    }
}
