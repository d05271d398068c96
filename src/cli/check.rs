//! `spirekeep check`: can this SPIRE deployment get to a target release?
//!
//! The facts come from the datastore (the `migrations` row, agents by
//! `attested_node_entries.agent_version`, `disable_migration` from
//! server.conf) or from flags; the decision is [`crate::compat::check`].
//!
//! Exit codes: 0 only when the verdict is `ok` (the target can be deployed
//! directly, so `check && upgrade` is safe), 6 for `needs_steps` (reachable
//! only through the printed path), 1 when it is `refused` (a mandatory
//! finding, or a skippable one that was not allowed), 2 for bad input (flags,
//! config, not a SPIRE datastore), 4 when the datastore cannot be reached.

use std::fmt::Write as _;

use clap::Args;
use serde::Serialize;

use super::output::print_json;
use super::{DatastoreArgs, exit};
use crate::compat::{self, AgentCount, CheckInput, CheckReport, FindingCode, Severity, Verdict};
use crate::datastore::{self, Datastore, OpenMode};
use crate::error::Error;
use crate::inspect::{MigrationsState, SpireFacts, read_spire_facts};

#[derive(Debug, Args)]
#[command(after_long_help = codes_help())]
pub struct CheckArgs {
    /// The SPIRE release to get to, e.g. 1.15.3 (a leading v is accepted).
    #[arg(long, value_name = "VERSION")]
    pub target: String,

    // Where the migrations row and the agents are read from. Optional when
    // --server-version is given: the check then runs on the flags alone.
    #[command(flatten)]
    pub datastore: DatastoreArgs,

    /// The version a running SPIRE server reports (spire-server --version);
    /// repeat (or separate with commas) once per server. Default: every
    /// server runs the datastore's code_version.
    #[arg(long = "server-version", value_name = "VERSION", value_delimiter = ',')]
    pub server_versions: Vec<String>,

    /// Agents running VERSION (COUNT of them, default 1); repeatable. Replaces
    /// what the datastore reports (attested_node_entries.agent_version, from
    /// SPIRE 1.14.3 on).
    #[arg(
        long = "agent-version",
        value_name = "VERSION[=COUNT]",
        value_delimiter = ','
    )]
    pub agent_versions: Vec<String>,

    /// Accept a skippable finding by its code (repeatable). Mandatory findings
    /// cannot be allowed; see the list of codes below (--help).
    #[arg(long = "allow", value_name = "CODE", value_delimiter = ',')]
    pub allow: Vec<String>,

    /// Check as if the SQL DataStore had disable_migration = true. Also set
    /// when the server.conf given with --spire-config says so.
    #[arg(long)]
    pub disable_migration: bool,
}

/// The `--help` text listing every finding code.
fn codes_help() -> String {
    let mut s = String::from("Finding codes (--allow takes the skippable ones):\n");
    for code in FindingCode::ALL {
        let severity = match code.severity() {
            Severity::Mandatory => "mandatory",
            Severity::Skippable => "skippable",
        };
        let _ = writeln!(s, "  {:<26} {severity:<9}  {}", code.as_str(), code.about());
    }
    s.push_str(
        "\nExit codes: 0 ok (deploy the target directly), 6 needs steps (follow the path), 1 refused, 2 bad input, 4 datastore unreachable.",
    );
    s
}

/// Where each fact came from, printed with the report.
#[derive(Debug, Clone, Serialize)]
struct Sources {
    /// The datastore read, without any password; `None` when none was given.
    datastore: Option<String>,
    /// `datastore` or `flags`.
    servers: &'static str,
    /// `datastore`, `flags` or `none`.
    agents: &'static str,
    /// `server.conf`, `flag` or `default`.
    disable_migration: &'static str,
}

/// `--json` output: the report plus its sources.
#[derive(Debug, Serialize)]
struct CheckOutput<'a> {
    source: &'a Sources,
    #[serde(flatten)]
    report: &'a CheckReport,
}

/// What the datastore says.
struct DatastoreFacts {
    location: String,
    facts: SpireFacts,
    disable_migration: bool,
}

pub(crate) async fn run(args: &CheckArgs, json: bool) -> anyhow::Result<u8> {
    // Validate every flag before any I/O.
    let agents_from_flags = parse_agent_flags(&args.agent_versions)?;
    let has_datastore = args.datastore.datastore.is_some() || args.datastore.spire_config.is_some();
    if !has_datastore && args.server_versions.is_empty() {
        return Err(Error::Unsupported(
            "no datastore given: pass --datastore STRING or --spire-config PATH (or set SPIREKEEP_DATASTORE), or give --server-version to check without one".into(),
        )
        .into());
    }
    let mut input = CheckInput {
        target: args.target.clone(),
        datastore: None,
        disable_migration: args.disable_migration,
        servers: args.server_versions.clone(),
        agents: agents_from_flags.clone().unwrap_or_default(),
        allow: args.allow.clone(),
    };
    compat::check(&input).map_err(|e| Error::Unsupported(e.to_string()))?;

    let facts = if has_datastore {
        Some(read_datastore(&args.datastore).await?)
    } else {
        None
    };
    let mut sources = Sources {
        datastore: facts.as_ref().map(|f| f.location.clone()),
        servers: if args.server_versions.is_empty() {
            "datastore"
        } else {
            "flags"
        },
        agents: if agents_from_flags.is_some() {
            "flags"
        } else if facts.is_some() {
            "datastore"
        } else {
            "none"
        },
        disable_migration: if args.disable_migration {
            "flag"
        } else {
            "default"
        },
    };
    let mut notes = Vec::new();
    let mut incomplete = None;
    if let Some(f) = facts {
        input.datastore = f.facts.row().cloned();
        if agents_from_flags.is_none() {
            input.agents = f.facts.agent_counts();
        }
        if f.disable_migration && !args.disable_migration {
            input.disable_migration = true;
            sources.disable_migration = "server.conf";
        }
        if let MigrationsState::Row { rows, .. } = f.facts.migrations
            && rows > 1
        {
            notes.push(format!(
                "`migrations` has {rows} rows; SPIRE reads the first and updates all of them"
            ));
        }
        incomplete = f.facts.incomplete(&f.location);
    }
    // A datastore SPIRE never finished creating has no row to start a path
    // from: say what it is and refuse, rather than plan from an invented row.
    let mut report = match &incomplete {
        Some(description) => compat::check_incomplete_datastore(&input, description),
        None => compat::check(&input),
    }
    .map_err(|e| Error::Unsupported(e.to_string()))?;
    report.notes.extend(notes);

    if json {
        print_json(&CheckOutput {
            source: &sources,
            report: &report,
        })?;
    } else {
        print!("{}", render(&report, &sources));
    }
    Ok(exit_code(report.verdict))
}

/// Only `ok` is success: a script running `check && upgrade` must not go
/// ahead when stepping stones are needed.
fn exit_code(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Ok => exit::OK,
        Verdict::NeedsSteps => exit::NEEDS_STEPS,
        Verdict::Refused => exit::CHECK_FAILED,
    }
}

/// `VERSION[=COUNT]` flags, normalised (no leading `v`); `None` when none given.
fn parse_agent_flags(values: &[String]) -> Result<Option<Vec<AgentCount>>, Error> {
    if values.is_empty() {
        return Ok(None);
    }
    values
        .iter()
        .map(|value| {
            let (version, count) = match value.split_once('=') {
                Some((v, n)) => {
                    let count = n.trim().parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::Unsupported(format!(
                            "--agent-version {value}: COUNT {n:?} is not a positive whole number"
                        ))
                    })?;
                    (v, count)
                }
                None => (value.as_str(), 1),
            };
            let trimmed = version.trim();
            let bare = trimmed.strip_prefix('v').unwrap_or(trimmed);
            semver::Version::parse(bare).map_err(|e| {
                Error::Unsupported(format!(
                    "--agent-version {value}: {version:?} is not a SPIRE version such as 1.15.3: {e}"
                ))
            })?;
            Ok(AgentCount {
                version: bare.to_owned(),
                count,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

async fn read_datastore(args: &DatastoreArgs) -> anyhow::Result<DatastoreFacts> {
    let resolved = args.resolve()?;
    let ds = datastore::open(&resolved.spec, OpenMode::ReadOnly).await?;
    let location = ds.location().to_owned();
    let facts = read_facts(ds.as_ref()).await;
    ds.close().await;
    Ok(DatastoreFacts {
        location,
        facts: facts?,
        disable_migration: resolved.disable_migration,
    })
}

/// The one reading of the SPIRE facts that `plan` and `inspect` share.
async fn read_facts(ds: &dyn Datastore) -> crate::Result<SpireFacts> {
    let catalogue = ds.catalogue().await?;
    read_spire_facts(ds, &catalogue).await
}

/// The human report, with a `source` line in the current state.
fn render(report: &CheckReport, sources: &Sources) -> String {
    let mut source = sources
        .datastore
        .clone()
        .unwrap_or_else(|| "no datastore (flags only)".to_owned());
    if sources.servers == "flags" {
        source.push_str("; servers from --server-version");
    }
    if sources.agents == "flags" {
        source.push_str("; agents from --agent-version");
    }
    match sources.disable_migration {
        "server.conf" => source.push_str("; disable_migration from server.conf"),
        "flag" => source.push_str("; disable_migration from --disable-migration"),
        _ => {}
    }
    compat::render_human(report).replacen(
        "Current state\n",
        &format!("Current state\n  {:<17}  {source}\n", "source"),
        1,
    )
}
