//! The age key flags: recipients where backups are written, an identity
//! file where rows are read (restore, verify, the agent, apply), and
//! `spirekeep keygen`.
//!
//! Keys are never given on the command line or in the environment as
//! values: recipients are public, identity files are referred to by path.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::exit;
use super::output::print_json;
use crate::error::Error;
use crate::store::Repository;
use crate::store::crypt::{Identities, Keyring, Recipients, generate};

/// Who new snapshots are encrypted to.
#[derive(Debug, Args, Clone, Default)]
pub struct RecipientArgs {
    /// Encrypt every data object to this age public key (age1…); repeatable, or comma-separated in
    /// the environment. Any one matching identity can decrypt. Without a recipient, snapshots are not
    /// encrypted.
    #[arg(
        long = "recipient",
        value_name = "AGE1…",
        env = "SPIREKEEP_AGE_RECIPIENTS"
    )]
    pub recipients: Vec<String>,

    /// A file of age public keys, one per line (blank lines and # comments allowed); repeatable.
    #[arg(
        long = "recipients-file",
        value_name = "PATH",
        env = "SPIREKEEP_AGE_RECIPIENTS_FILE"
    )]
    pub recipients_files: Vec<PathBuf>,
}

impl RecipientArgs {
    /// The recipients, if any were given. Parse them before the repository
    /// is opened: a bad one stops the command before anything is touched.
    pub(crate) fn parse(&self) -> Result<Option<Recipients>, Error> {
        Recipients::from_args(&self.recipients, &self.recipients_files)
    }
}

/// The identity that decrypts encrypted snapshots.
#[derive(Debug, Args, Clone, Default)]
pub struct IdentityArgs {
    /// age identity file (AGE-SECRET-KEY-1… lines, as `spirekeep keygen` or age-keygen write them) to
    /// decrypt encrypted snapshots with. Give the path; the key itself never goes on the command line.
    #[arg(
        long = "identity",
        value_name = "PATH",
        env = "SPIREKEEP_AGE_IDENTITY_FILE"
    )]
    pub identity: Option<PathBuf>,
}

impl IdentityArgs {
    /// The repository handle, able to decrypt with the identity file if one
    /// was given.
    pub(crate) fn attach(&self, repo: Repository) -> Result<Repository, Error> {
        Ok(match &self.identity {
            Some(path) => {
                warn_if_readable_by_others(path);
                repo.with_identities(Identities::from_file(path)?)
            }
            None => repo,
        })
    }
}

/// Both kinds of key, for a command that writes snapshots and may have to
/// read them back (the agent's verify, apply's rollback). With `round_trip`,
/// recipients without a matching identity are refused up front: a rollback
/// that cannot decrypt its own pre-upgrade snapshot would fail at the worst
/// moment.
pub(crate) fn keyring(
    recipients: &RecipientArgs,
    identity: &IdentityArgs,
    round_trip: bool,
) -> Result<Keyring, Error> {
    let recipients = Recipients::from_args(&recipients.recipients, &recipients.recipients_files)?;
    let identities = match &identity.identity {
        Some(path) => {
            warn_if_readable_by_others(path);
            Some(Identities::from_file(path)?)
        }
        None => None,
    };
    if let Some(r) = &recipients {
        let readable = identities
            .as_ref()
            .is_some_and(|ids| ids.matches_any(&r.public_keys()));
        if round_trip && !readable {
            return Err(Error::Unsupported(format!(
                "snapshots will be encrypted to {}, and a rollback must decrypt the pre-upgrade snapshot: \
                 pass --identity FILE with the identity of one of those recipients",
                r.public_keys().join(", ")
            )));
        }
        if !readable {
            tracing::warn!(
                "snapshots are encrypted and no matching --identity was given: verification checks only the stored (encrypted) bytes"
            );
        }
    }
    Ok(Keyring {
        recipients: recipients.map(std::sync::Arc::new),
        identities: identities.map(std::sync::Arc::new),
    })
}

/// An identity file others can read is a leaked key waiting to happen.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "identity file {} can be read by other users; `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the new identity here (created with mode 0600; an existing file is never overwritten).
    /// Its public key is printed: give it to `backup --recipient`.
    #[arg(short, long, value_name = "PATH", required_unless_present = "public")]
    pub output: Option<PathBuf>,

    /// Print the public keys of an existing identity file instead (like `age-keygen -y`).
    #[arg(
        short = 'y',
        long = "public",
        value_name = "PATH",
        conflicts_with = "output"
    )]
    pub public: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct KeygenReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_file: Option<String>,
    public_keys: Vec<String>,
}

pub(crate) fn run(args: &KeygenArgs, json: bool) -> anyhow::Result<u8> {
    let report = match (&args.public, &args.output) {
        (Some(path), _) => KeygenReport {
            identity_file: Some(path.display().to_string()),
            public_keys: Identities::from_file(path)?.public_keys(),
        },
        (None, Some(path)) => {
            let (text, public) = generate();
            write_private(path, &text)?;
            KeygenReport {
                identity_file: Some(path.display().to_string()),
                public_keys: vec![public],
            }
        }
        (None, None) => unreachable!("clap requires --output or --public"),
    };
    if json {
        print_json(&report)?;
    } else {
        for key in &report.public_keys {
            println!("{key}");
        }
    }
    Ok(exit::OK)
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |e: std::io::Error| {
        Error::Unsupported(format!(
            "cannot create the identity file {}: {e}{}",
            path.display(),
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                "; it is never overwritten: choose another path"
            } else {
                ""
            }
        ))
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_needs_an_identity_among_the_recipients() {
        let dir = tempfile::tempdir().unwrap();
        let (text, public) = generate();
        let id_path = dir.path().join("id.txt");
        std::fs::write(&id_path, text).unwrap();
        let (_, other_public) = generate();
        let recipients = |key: &str| RecipientArgs {
            recipients: vec![key.to_owned()],
            recipients_files: Vec::new(),
        };
        let identity = IdentityArgs {
            identity: Some(id_path),
        };
        let none = IdentityArgs::default();
        // Writing and reading back with the same key pair: fine.
        let k = keyring(&recipients(&public), &identity, true).unwrap();
        assert!(k.recipients.is_some() && k.identities.is_some());
        // No identity, or one that is not a recipient: refused before anything runs.
        for (r, i) in [(&public, &none), (&other_public, &identity)] {
            let err = keyring(&recipients(r), i, true).unwrap_err().to_string();
            assert!(
                err.contains("--identity") && err.contains(r.as_str()),
                "{err}"
            );
        }
        // Without a round trip (the agent), only a warning.
        assert!(keyring(&recipients(&public), &none, false).is_ok());
        // No recipients: plaintext, nothing required.
        let k = keyring(&RecipientArgs::default(), &none, true).unwrap();
        assert!(k.recipients.is_none() && k.identities.is_none());
    }
}
