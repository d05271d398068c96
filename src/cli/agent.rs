//! `spirekeep agent`

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::lock::LockArgs;
use super::prune::RetentionArgs;
use super::repo::RepoArgs;
use super::{DatastoreArgs, exit};
use crate::agent::{Agent, AgentConfig, RetentionSettings, Schedule, shutdown};
use crate::snapshot::CodecOptions;
use crate::snapshot::backup::validate_label;

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub datastore: DatastoreArgs,

    #[command(flatten)]
    pub repo: RepoArgs,

    /// When to back up: cron in UTC, five fields ("17 */4 * * *") or six with leading seconds.
    #[arg(long, value_name = "CRON", env = "SPIREKEEP_SCHEDULE")]
    pub schedule: String,

    /// When to verify the newest snapshot (cron, UTC). Without it the agent never verifies.
    #[arg(long, value_name = "CRON", env = "SPIREKEEP_VERIFY_SCHEDULE")]
    pub verify_schedule: Option<String>,

    /// Verify by re-reading every object and hash only, instead of a deep verify (a restore drill
    /// into a scratch datastore, compared with the manifest).
    #[arg(long)]
    pub verify_shallow: bool,

    /// Retention applied after each successful backup. Without any --keep-* rule the agent never prunes.
    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Where to serve /metrics and /healthz.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:9898",
        env = "SPIREKEEP_LISTEN"
    )]
    pub listen: SocketAddr,

    /// Label of every scheduled snapshot (repeatable).
    #[arg(long = "label", value_name = "LABEL", default_value = "scheduled")]
    pub labels: Vec<String>,

    /// zstd level (1-19).
    #[arg(long, default_value_t = crate::snapshot::codec::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: i32,

    /// How often the metrics are re-read from the repository between jobs (to see other writers).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub metrics_refresh: Duration,

    /// Encrypt every scheduled snapshot to these age recipients.
    #[command(flatten)]
    pub recipients: super::keys::RecipientArgs,

    /// Lets the verify job decrypt encrypted snapshots (without it, it checks only the stored bytes).
    #[command(flatten)]
    pub identity: super::keys::IdentityArgs,

    #[command(flatten)]
    pub lock: LockArgs,
}

pub(crate) async fn run(args: &AgentArgs) -> anyhow::Result<u8> {
    let datastore = args.datastore.resolve()?;
    let keyring = super::keys::keyring(&args.recipients, &args.identity, false)?;
    let repo = args.repo.open()?.with_keyring(keyring);
    let schedule = Schedule::parse(&args.schedule)?;
    let verify_schedule = args
        .verify_schedule
        .as_deref()
        .map(Schedule::parse)
        .transpose()?;
    for label in &args.labels {
        validate_label(label)?;
    }
    let options = args.retention.options()?;
    let retention = if options.policy.is_empty() {
        tracing::warn!("no --keep-* rule given: the agent never prunes");
        None
    } else {
        Some(RetentionSettings {
            policy: options.policy,
            pin_labels: options.pin_labels,
            orphan_grace: options.orphan_grace,
        })
    };
    if verify_schedule.is_none() {
        tracing::warn!("no --verify-schedule: the agent never verifies snapshots");
    }
    let config = AgentConfig {
        datastore,
        repo,
        schedule,
        verify_schedule,
        deep_verify: !args.verify_shallow,
        retention,
        listen: args.listen,
        lock_ttl: args.lock.lock_ttl,
        lock_wait: args.lock.lock_wait,
        labels: args.labels.clone(),
        codec: CodecOptions {
            level: args.compression_level,
            workers: 0,
        },
        refresh_every: args.metrics_refresh.max(Duration::from_secs(1)),
    };
    let signals = shutdown::listen()?;
    Agent::new(config).run(signals).await?;
    Ok(exit::OK)
}
