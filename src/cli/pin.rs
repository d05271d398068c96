//! `spirekeep pin add|remove|list`

use clap::{Args, Subcommand};

use super::exit;
use super::output::print_json;
use super::repo::RepoArgs;
use crate::snapshot::listing::{resolve, rfc3339};
use crate::snapshot::pins::{list_pins, pin, unpin};
use crate::store::keys::SnapshotId;

#[derive(Debug, Args)]
pub struct PinArgs {
    #[command(subcommand)]
    pub action: PinAction,
}

#[derive(Debug, Subcommand)]
pub enum PinAction {
    /// Pin a snapshot: prune keeps it until every pin on it is removed.
    Add {
        /// Snapshot id, or `latest`.
        snapshot: String,
        /// Who holds the pin (a plan id, your name): letters, digits, '.', '_', '-'.
        #[arg(long, default_value = "operator")]
        holder: String,
        /// Why, shown by `prune --dry-run`.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Remove one holder's pin from a snapshot.
    Remove {
        /// Snapshot id.
        snapshot: String,
        #[arg(long, default_value = "operator")]
        holder: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// List every pin in the repository.
    List {
        #[command(flatten)]
        repo: RepoArgs,
    },
}

pub(crate) async fn run(args: &PinArgs, json: bool) -> anyhow::Result<u8> {
    match &args.action {
        PinAction::Add {
            snapshot,
            holder,
            reason,
            repo,
        } => {
            let repo = repo.open()?;
            let id = resolve(&repo, snapshot).await?;
            let p = pin(&repo, &id, holder, reason).await?;
            if json {
                print_json(&p)?;
            } else {
                println!(
                    "pinned {id} for {holder}: prune keeps it until `spirekeep pin remove {id} --holder {holder}`"
                );
            }
        }
        PinAction::Remove {
            snapshot,
            holder,
            repo,
        } => {
            let repo = repo.open()?;
            let id = SnapshotId::parse(snapshot).map_err(|e| {
                crate::Error::Unsupported(format!(
                    "{e}; give a snapshot id from `spirekeep pin list`"
                ))
            })?;
            let existed = unpin(&repo, &id, holder).await?;
            if json {
                print_json(
                    &serde_json::json!({ "snapshot": id, "holder": holder, "removed": existed }),
                )?;
            } else if existed {
                println!("removed the pin of {holder} on {id}");
            } else {
                println!("{id} had no pin by {holder}");
            }
        }
        PinAction::List { repo } => {
            let repo = repo.open()?;
            let pins = list_pins(&repo).await?;
            if json {
                print_json(&pins)?;
            } else if pins.is_empty() {
                println!("no pins in {repo}");
            } else {
                for p in pins {
                    println!(
                        "{}  {}  {}  {}",
                        p.snapshot_id,
                        p.holder,
                        rfc3339(p.pinned_at),
                        p.reason
                    );
                }
            }
        }
    }
    Ok(exit::OK)
}
