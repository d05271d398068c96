//! The command line: clap definitions and one file per command. Everything
//! here is thin; the work is done by the library modules.

mod agent;
mod apply;
mod backup;
mod check;
mod inspect;
mod keys;
mod list;
mod lock;
pub mod logging;
mod output;
mod pin;
mod plan;
mod progress;
mod prune;
mod repo;
mod restore;
mod status;
mod verify;

pub use repo::RepoArgs;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{DatastoreSource, ResolvedDatastore, resolve_datastore};
use crate::error::{Error, ErrorKind};

/// Exit codes, one table for every command: [`EXIT_CODES_HELP`] (printed by
/// `--help`) and the README's "Output and exit codes" section.
pub mod exit {
    /// Success; `check`: the target can be deployed directly (verdict `ok`).
    pub const OK: u8 = 0;
    /// A check found problems (`check` verdict `refused`, a failed verification).
    pub const CHECK_FAILED: u8 = 1;
    /// Bad input: flags, connection string, config file, not a SPIRE datastore;
    /// a restore refused for its target (not empty without `--replace`, in
    /// use by other clients without `--force`).
    pub const USAGE: u8 = 2;
    /// An upgrade failed and was rolled back.
    pub const ROLLED_BACK: u8 = 3;
    /// A server could not be reached or refused the credentials.
    pub const UNREACHABLE: u8 = 4;
    /// Any other runtime failure (database or storage error).
    pub const FAILED: u8 = 5;
    /// `check`: reachable only through the stepping-stone releases it prints.
    pub const NEEDS_STEPS: u8 = 6;
    /// `apply`: failed and could NOT roll back (or stopped half-way): an
    /// operator must act; the journal says where everything is.
    pub const ROLLBACK_FAILED: u8 = 7;
    /// `plan`/`apply`: refused before touching anything (stale plan,
    /// blocking finding, failed preflight).
    pub const REFUSED: u8 = 8;
    /// `plan`/`apply`: nothing to do, everything already runs the target.
    pub const NOTHING_TO_DO: u8 = 9;
}

/// The exit-code table every command follows, shown at the end of `--help`.
/// The README's "Output and exit codes" section carries the same table; a
/// test keeps the two in step.
pub const EXIT_CODES_HELP: &str = "\
Exit codes (every command):
  0  success; check: the target can be deployed directly (verdict ok); apply: done
  1  a check found problems: check verdict refused, a failed verify
  2  bad input: flags, connection string, server.conf, plan file, not a SPIRE datastore; restore: a non-empty target without --replace, or one other clients use without --force
  3  apply: failed and rolled back (everything is back where it started)
  4  a server could not be reached, or refused the credentials
  5  any other failure (database or storage error)
  6  check: verdict needs_steps (reachable only through the stepping-stone releases it prints)
  7  apply: stopped, or failed and could NOT roll back: an operator must act (the journal says where)
  8  plan/apply: refused before touching anything (stale plan, blocking finding, failed preflight)
  9  plan/apply: nothing to do (everything is already at the target)";

#[derive(Debug, Parser)]
#[command(
    name = "spirekeep",
    version,
    about = "Snapshots, verified restores and staged upgrades for SPIRE server datastores",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output (-v info, -vv debug). Logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log format on stderr: text for people, json for Loki/Vector (one object per line:
    /// time, level, event, message, snapshot_id/plan_id/step, duration_seconds).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SPIREKEEP_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: logging::LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what is in a SPIRE datastore: engine, schema and code version, row counts, agents by version.
    Inspect(inspect::InspectArgs),
    /// Can SPIRE get to a target release on this datastore? Verdict, upgrade path, and every finding with its way out.
    Check(check::CheckArgs),
    /// Take a snapshot of the datastore into the repository: one consistent read, streamed, manifest last.
    Backup(backup::BackupArgs),
    /// List the snapshots in the repository.
    List(list::ListArgs),
    /// Show one snapshot's manifest: tables, rows, hashes, verification state.
    Show(list::ShowArgs),
    /// Delete snapshots by retention (keep-last/hourly/daily/weekly/monthly), never pinned ones or the newest verified one; clean up after killed backups.
    Prune(prune::PruneArgs),
    /// Run scheduled backups, retention and verification, serving Prometheus /metrics and /healthz.
    Agent(agent::AgentArgs),
    /// Inspect or break the repository lock.
    Lock(lock::LockCommandArgs),
    /// Pin snapshots so prune keeps them, or list and remove pins.
    Pin(pin::PinArgs),
    /// Re-read every object of a snapshot and check every hash; --deep restores it into a scratch datastore and compares.
    Verify(verify::VerifyArgs),
    /// Restore a snapshot into a datastore (same engine or another): hash check first, preflight, impact, all or nothing.
    Restore(restore::RestoreArgs),
    /// Make a staged-upgrade plan from a plan file and the live facts: every hop, every step, SPIRE's skew checked at each.
    Plan(plan::PlanArgs),
    /// Run a saved plan: pre-upgrade snapshot, servers, datastore gates, agent batches; restore and roll back on failure.
    Apply(apply::ApplyArgs),
    /// Show where a plan stands, from its journal.
    Status(status::StatusArgs),
    /// Create an age identity file for encrypted snapshots and print its public key (or, with -y, print an identity file's public keys).
    Keygen(keys::KeygenArgs),
}

/// How to reach the datastore: a connection string or SPIRE's server.conf.
#[derive(Debug, Args, Clone)]
pub struct DatastoreArgs {
    /// Connection string as SPIRE writes it (SQLite path or file: URI, lib/pq key=value or postgres:// URL,
    /// go-sql-driver DSN user:pass@tcp(host:3306)/spire?parseTime=true) or a mysql:// / sqlite:// URL.
    #[arg(
        long,
        env = "SPIREKEEP_DATASTORE",
        hide_env_values = true,
        conflicts_with = "spire_config"
    )]
    pub datastore: Option<String>,

    /// SPIRE server config file; the DataStore "sql" block is read from it.
    #[arg(long, env = "SPIREKEEP_SPIRE_CONFIG", value_name = "PATH")]
    pub spire_config: Option<PathBuf>,

    /// SPIRE's database_type (sqlite3, postgres, mysql) when the string alone is ambiguous.
    #[arg(long, value_name = "TYPE")]
    pub database_type: Option<String>,

    /// Directory relative SQLite paths are resolved against (SPIRE's working directory). Default: the current directory.
    #[arg(long, value_name = "DIR")]
    pub spire_workdir: Option<PathBuf>,

    /// Expand $VAR and ${VAR} in the SPIRE config, as spire-server -expandEnv does.
    #[arg(long)]
    pub expand_env: bool,
}

impl DatastoreArgs {
    /// Validates the flags into a datastore to open (no I/O beyond reading server.conf).
    pub(crate) fn resolve(&self) -> Result<ResolvedDatastore, Error> {
        let source = match (&self.datastore, &self.spire_config) {
            (Some(value), _) => DatastoreSource::Connection {
                value: value.clone(),
                database_type: self.database_type.clone(),
            },
            (None, Some(path)) => DatastoreSource::SpireConfig {
                path: path.clone(),
                expand_env: self.expand_env,
            },
            (None, None) => {
                return Err(Error::Unsupported(
                    "no datastore given: pass --datastore STRING or --spire-config PATH (or set SPIREKEEP_DATASTORE)".into(),
                ));
            }
        };
        resolve_datastore(&source, self.spire_workdir.as_deref())
    }
}

/// Runs a parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    use tracing::Instrument as _;
    let name = cli.command.name();
    let started = std::time::Instant::now();
    let span = tracing::info_span!("command", command = name, plan_id = tracing::field::Empty);
    // `apply` events (its steps) carry the plan they belong to.
    if let Command::Apply(args) = &cli.command
        && let Some(id) = saved_plan_id(&args.plan)
    {
        span.record("plan_id", id.as_str());
    }
    let result = async {
        match &cli.command {
            Command::Inspect(args) => inspect::run(args, cli.json).await,
            Command::Check(args) => check::run(args, cli.json).await,
            Command::Backup(args) => backup::run(args, cli.json).await,
            Command::List(args) => list::list(args, cli.json).await,
            Command::Show(args) => list::show(args, cli.json).await,
            Command::Prune(args) => prune::run(args, cli.json).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Lock(args) => lock::run(args, cli.json).await,
            Command::Pin(args) => pin::run(args, cli.json).await,
            Command::Verify(args) => verify::run(args, cli.json).await,
            Command::Restore(args) => restore::run(args, cli.json).await,
            Command::Plan(args) => plan::run(args, cli.json).await,
            Command::Apply(args) => apply::run(args, cli.json).await,
            Command::Status(args) => status::run(args, cli.json).await,
            Command::Keygen(args) => keys::run(args, cli.json),
        }
    }
    .instrument(span.clone())
    .await;
    let _entered = span.enter();
    let duration_seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(code) => {
            tracing::info!(
                event = "command_finished",
                exit_code = code,
                duration_seconds,
                "{name} finished"
            );
            code
        }
        Err(err) => {
            let code = exit_code_for(&err);
            if cli.log_format == logging::LogFormat::Json {
                // stderr stays all JSON lines; --json still prints the error on stdout.
                output::print_error_json_log(&err, cli.json, code, duration_seconds);
            } else {
                output::print_error(&err, cli.json);
            }
            code
        }
    }
}

/// The `plan_id` of a saved plan file, for the log context (`None` when it
/// cannot be read: `apply` itself then says why).
fn saved_plan_id(path: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let plan: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    plan.get("plan_id")?.as_str().map(str::to_owned)
}

impl Command {
    /// The subcommand's name, as typed.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Inspect(_) => "inspect",
            Self::Check(_) => "check",
            Self::Backup(_) => "backup",
            Self::List(_) => "list",
            Self::Show(_) => "show",
            Self::Prune(_) => "prune",
            Self::Agent(_) => "agent",
            Self::Lock(_) => "lock",
            Self::Pin(_) => "pin",
            Self::Verify(_) => "verify",
            Self::Restore(_) => "restore",
            Self::Plan(_) => "plan",
            Self::Apply(_) => "apply",
            Self::Status(_) => "status",
            Self::Keygen(_) => "keygen",
        }
    }
}

/// The exit code for an error that ended a command.
#[must_use]
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>().map(Error::kind) {
        Some(ErrorKind::Usage | ErrorKind::NotSpire) => exit::USAGE,
        Some(ErrorKind::Unreachable | ErrorKind::Auth) => exit::UNREACHABLE,
        Some(ErrorKind::Integrity) => exit::CHECK_FAILED,
        Some(ErrorKind::Backend) | None => exit::FAILED,
    }
}
