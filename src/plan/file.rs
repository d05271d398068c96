//! Plan files (`plans/*.toml`): the target release, the datastore and the
//! repository, the fleet (servers and agent groups), how to act on each member
//! (an executor) and the health gates. See `plans/README.md` for the format.
//!
//! A file is read into [`PlanFile`] (plain serde data, kept verbatim in the
//! saved plan) and validated into [`Plan`] before anything is contacted:
//! unknown keys, unknown placeholders, bad durations, versions that are not
//! SPIRE releases and duplicate member names are all errors that name the
//! exact key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use semver::Version;
use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::executor::{CommandSpec, Commands, ExecutorSpec, KubernetesSpec};
use super::health::{Gate, GateConfig};
use super::template::{BUILTIN_PLACEHOLDERS, Template, Vars};
use crate::compat::ReleaseTable;
use crate::config::DatastoreSource;
use crate::store::RepoOptions;

/// The plan file format this build reads.
pub const PLAN_FILE_FORMAT: u32 = 1;

/// A plan file as written (TOML), before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    /// Format version of the file: 1.
    pub format: u32,
    /// A short name; the saved plan's id is `<name>-<time>`.
    #[serde(default = "default_name")]
    pub name: String,
    /// The SPIRE release to end at, e.g. `1.15.3`.
    pub target: String,
    /// Which role moves first in each hop. SPIRE's rule is servers first on
    /// an upgrade and agents first on a downgrade; `auto` follows it.
    #[serde(default)]
    pub order: Order,
    /// Skippable `check` findings to accept (e.g. `agent_version_unknown`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// The SPIRE datastore.
    pub datastore: DatastoreConfig,
    /// Where the pre-upgrade snapshot goes.
    pub repository: RepositoryConfig,
    /// How members are acted on.
    pub executor: ExecutorConfig,
    /// The SPIRE servers.
    pub servers: ServersConfig,
    /// Groups of SPIRE agents.
    #[serde(default)]
    pub agents: Vec<AgentGroupConfig>,
    /// Gates run once at the end, after every member reached the target.
    #[serde(default)]
    pub post_checks: Vec<GateConfig>,
    /// What a failed post-check does: `stop` (the default) or `roll_back`.
    #[serde(default)]
    pub on_post_check_failure: PostCheckFailure,
    /// The clock-skew preflight.
    #[serde(default)]
    pub clock: ClockConfig,
    /// An upgrade rehearsal before the first hop (`spirekeep verify --rehearse`).
    #[serde(default)]
    pub rehearsal: Option<RehearsalConfig>,
}

/// `[rehearsal]`: before anything changes, restore the pre-upgrade snapshot
/// into a scratch datastore and start the first hop's `spire-server` on it;
/// a release that refuses the data stops the plan before it touches anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RehearsalConfig {
    /// The first hop's `spire-server` binary; `{version}` is replaced by its
    /// release (e.g. `/opt/spire/{version}/bin/spire-server`).
    pub spire_server: String,
    /// An environment variable holding an empty scratch database, written as
    /// SPIRE takes it. Default: a temporary SQLite file.
    pub scratch_env: Option<String>,
    /// How long the rehearsal server may take to become healthy (default 90s).
    pub timeout: Option<String>,
}

/// A validated `[rehearsal]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rehearsal {
    pub spire_server: String,
    pub scratch_env: Option<String>,
    pub timeout: Duration,
}

impl Rehearsal {
    /// The binary for release `version`.
    #[must_use]
    pub fn binary_for(&self, version: &str) -> PathBuf {
        PathBuf::from(self.spire_server.replace("{version}", version))
    }
}

/// What a failed post-check (after every member moved) does.
///
/// The default is `stop`: the plan stops and reports, the datastore is left
/// as it is. `roll_back` restores the pre-upgrade snapshot and returns every
/// member, which also discards everything SPIRE wrote since the snapshot
/// (registrations, attestations, CA and bundle updates): only the operator
/// can weigh that, so it is asked for, never assumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostCheckFailure {
    #[default]
    Stop,
    RollBack,
}

/// `[clock]`: how far a member's clock may be from spirekeep's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// The largest offset accepted (e.g. `"30s"`). Default: a tenth of
    /// `svid_ttl`.
    pub max_skew: Option<String>,
    /// The shortest SVID TTL in this deployment. Default `5m`, SPIRE's
    /// default JWT-SVID TTL (`default_jwt_svid_ttl`), the shortest of its
    /// defaults.
    pub svid_ttl: Option<String>,
}

/// SPIRE's default JWT-SVID TTL, the shortest TTL it uses by default.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(300);

fn default_name() -> String {
    "upgrade".into()
}

/// Which role goes first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// SPIRE's rule: servers first going up, agents first going down.
    #[default]
    Auto,
    /// Servers before agents in every hop (SPIRE's rule for upgrades).
    ServersFirst,
    /// Agents before servers in every hop (SPIRE's rule for downgrades; on an
    /// upgrade it breaks SPIRE's skew rule and needs an explicit override).
    AgentsFirst,
}

/// `[datastore]`: exactly one of `spire_config`, `connection_string`,
/// `connection_string_env`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// SPIRE's server.conf; its `DataStore "sql"` block is read.
    pub spire_config: Option<PathBuf>,
    /// A connection string as SPIRE writes it. It is copied into the saved
    /// plan: prefer `spire_config` or `connection_string_env` when it holds a password.
    pub connection_string: Option<String>,
    /// The name of an environment variable holding the connection string.
    pub connection_string_env: Option<String>,
    /// SPIRE's `database_type` when the string alone is ambiguous.
    pub database_type: Option<String>,
    /// SPIRE's working directory (relative SQLite paths). Default: the plan file's directory.
    pub spire_workdir: Option<PathBuf>,
    /// Expand `$VAR` in server.conf, as `spire-server -expandEnv` does.
    #[serde(default)]
    pub expand_env: bool,
    /// Whether the restore-on-failure keeps the live agents (`restore
    /// --keep-live-agents`): on unless set to false. Agents that renewed
    /// their SVID during the failed upgrade keep working after the rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_live_agents_on_rollback: Option<bool>,
}

/// `[repository]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// `s3://…`, `gs://…`, `az://…`, `file:///…` or a local path.
    pub url: String,
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_allow_http: bool,
    #[serde(default)]
    pub s3_path_style: bool,
    pub s3_region: Option<String>,
}

/// How an executor is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// Shell command templates per action.
    Command,
    /// `kubectl` against a server StatefulSet and agent DaemonSets.
    Kubernetes,
}

/// `[executor]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    pub kind: ExecutorKind,
    /// The shell that runs command templates and command gates (`sh`).
    pub shell: Option<String>,
    /// Longest one command may take (default 5m).
    pub timeout: Option<String>,
    /// Extra environment for every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables of spirekeep's environment passed to every command and
    /// gate (e.g. `["KUBECONFIG"]`); besides these, commands only get
    /// `PATH`, `HOME`, `LANG`, `LC_*` and `TZ`.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// `command`: the default templates for every member.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// `kubernetes`: the kubectl binary (default `kubectl`).
    pub kubectl: Option<String>,
    /// `kubernetes`: `--context`.
    pub context: Option<String>,
    /// `kubernetes`: `--namespace`.
    pub namespace: Option<String>,
    /// `kubernetes`: the server image without tag, e.g. `ghcr.io/spiffe/spire-server`.
    pub server_image: Option<String>,
    /// `kubernetes`: the agent image without tag.
    pub agent_image: Option<String>,
    /// `kubernetes`: the image tag for a version (default `{version}`).
    pub tag: Option<String>,
    /// `kubernetes`: `rollout status --timeout` (default 10m).
    pub rollout_timeout: Option<String>,
}

/// Command templates; any may be left out where a role or group sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// Prints the version the member runs (like `spire-server --version 2>&1`).
    pub version: Option<String>,
    /// Installs `{version}` (newer) and restarts the member.
    pub upgrade: Option<String>,
    /// Installs `{version}` (older) and restarts the member if it runs.
    pub rollback: Option<String>,
    /// Stops the member.
    pub stop: Option<String>,
    /// Starts the member (must succeed when it already runs).
    pub start: Option<String>,
    /// Prints the member host's clock in Unix seconds (default `date +%s`).
    pub clock: Option<String>,
}

impl CommandsConfig {
    fn or(&self, fallback: &Self) -> Self {
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        Self {
            version: pick(&self.version, &fallback.version),
            upgrade: pick(&self.upgrade, &fallback.upgrade),
            rollback: pick(&self.rollback, &fallback.rollback),
            stop: pick(&self.stop, &fallback.stop),
            start: pick(&self.start, &fallback.start),
            clock: pick(&self.clock, &fallback.clock),
        }
    }

    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// `[servers]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServersConfig {
    /// Templates for servers, over `[executor.commands]`.
    #[serde(default)]
    pub commands: CommandsConfig,
    pub members: Vec<MemberConfig>,
    /// Gates after each server step.
    #[serde(default)]
    pub health: Vec<GateConfig>,
}

/// `[[agents]]`: one group of agents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGroupConfig {
    pub name: String,
    /// Members per batch: a count (`2`) or a percentage (`"25%"`). Default 1.
    pub batch: Option<BatchConfig>,
    /// The share of a batch that may fail its gates without stopping the
    /// plan (0 to 1; default 0: any failure stops it).
    #[serde(default)]
    pub max_failure_ratio: f64,
    /// Templates for this group, over `[executor.commands]`.
    #[serde(default)]
    pub commands: CommandsConfig,
    pub members: Vec<MemberConfig>,
    /// Gates after each member's step.
    #[serde(default)]
    pub health: Vec<GateConfig>,
}

/// A batch size as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchConfig {
    Count(u32),
    Text(String),
}

/// One member as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub name: String,
    /// Where it runs (default: the name).
    pub host: Option<String>,
    /// Extra placeholders for this member's templates, e.g. `port`.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// `kubernetes`: `statefulset/NAME` or `daemonset/NAME` (default by role).
    pub workload: Option<String>,
    /// `kubernetes`: the container to set the image of (default `spire-server` / `spire-agent`).
    pub container: Option<String>,
}

// ------------------------------------------------------------------ validated

/// A server or an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    /// `server` or `agent`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Agent => "agent",
        }
    }
}

/// One member, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub host: String,
    pub role: Role,
    /// `servers` or the agent group's name.
    pub group: String,
    pub vars: BTreeMap<String, String>,
    pub workload: Option<String>,
    pub container: Option<String>,
}

impl Member {
    /// The template values for this member; `{version}` when given.
    #[must_use]
    pub fn vars(&self, version: Option<&Version>) -> Vars {
        let mut vars = Vars::new()
            .with("name", &self.name)
            .with("host", &self.host)
            .with("role", self.role.as_str())
            .with("group", &self.group);
        for (k, v) in &self.vars {
            vars.set(k, v);
        }
        if let Some(v) = version {
            vars.set("version", v.to_string());
        }
        vars
    }

    /// The template values with every placeholder known, `{version}`
    /// included: for validation.
    fn all_vars(&self) -> Vars {
        self.vars(Some(&Version::new(0, 0, 0)))
    }
}

/// Agents per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Batch {
    Count(u32),
    Percent(u32),
}

impl Batch {
    /// Splits `n` members into batches, in order.
    #[must_use]
    pub fn split(self, n: usize) -> Vec<std::ops::Range<usize>> {
        let size = match self {
            Self::Count(c) => usize::try_from(c).unwrap_or(usize::MAX),
            Self::Percent(p) => {
                let p = usize::try_from(p).unwrap_or(100);
                n.saturating_mul(p).div_ceil(100)
            }
        }
        .max(1);
        (0..n)
            .step_by(size)
            .map(|start| start..(start + size).min(n))
            .collect()
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(c) => write!(f, "{c} at a time"),
            Self::Percent(p) => write!(f, "{p}% at a time"),
        }
    }
}

/// An agent group, validated.
#[derive(Debug, Clone)]
pub struct AgentGroup {
    pub name: String,
    pub batch: Batch,
    pub max_failure_ratio: f64,
    pub commands: Option<Commands>,
    pub members: Vec<Member>,
    pub gates: Vec<Gate>,
}

/// A validated plan file.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub target: Version,
    pub order: Order,
    pub allow: Vec<String>,
    pub datastore: DatastoreSource,
    pub spire_workdir: PathBuf,
    pub repository: String,
    pub repo_options: RepoOptions,
    pub executor: ExecutorSpec,
    pub server_commands: Option<Commands>,
    pub servers: Vec<Member>,
    pub server_gates: Vec<Gate>,
    pub agents: Vec<AgentGroup>,
    pub post_checks: Vec<Gate>,
    pub on_post_check_failure: PostCheckFailure,
    /// The largest clock offset accepted for a member.
    pub max_clock_skew: Duration,
    /// The rehearsal before the first hop, when asked for.
    pub rehearsal: Option<Rehearsal>,
    /// The restore-on-failure keeps the live agents (`[datastore]
    /// keep_live_agents_on_rollback`, on unless set to false).
    pub keep_live_agents_on_rollback: bool,
}

impl Plan {
    /// Every member, servers first.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.servers
            .iter()
            .chain(self.agents.iter().flat_map(|g| g.members.iter()))
    }

    /// A member by name.
    #[must_use]
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members().find(|m| m.name == name)
    }

    /// The gates that apply to a member.
    #[must_use]
    pub fn gates_of(&self, member: &Member) -> &[Gate] {
        match member.role {
            Role::Server => &self.server_gates,
            Role::Agent => self
                .agents
                .iter()
                .find(|g| g.name == member.group)
                .map_or(&[], |g| &g.gates),
        }
    }

    /// The command templates that apply to a member (command executor).
    #[must_use]
    pub fn commands_of(&self, member: &Member) -> Option<&Commands> {
        match member.role {
            Role::Server => self.server_commands.as_ref(),
            Role::Agent => self
                .agents
                .iter()
                .find(|g| g.name == member.group)
                .and_then(|g| g.commands.as_ref()),
        }
    }
}

/// Reads and validates a plan file. Relative paths in it (server.conf,
/// SPIRE's working directory, a local repository) resolve against the
/// file's directory.
///
/// # Errors
/// An unreadable file, TOML errors (with line and column), and every
/// validation error of [`PlanFile::validate`].
pub fn load(path: &Path) -> Result<(PlanFile, Plan), PlanError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PlanError::PlanFile(format!("cannot read plan file {}: {e}", path.display()))
    })?;
    let mut file = parse(&text)
        .map_err(|e| PlanError::PlanFile(format!("plan file {}: {e}", path.display())))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base = std::path::absolute(&base).unwrap_or(base);
    file.absolutize(&base);
    let plan = file
        .validate()
        .map_err(|e| PlanError::PlanFile(format!("plan file {}: {e}", path.display())))?;
    Ok((file, plan))
}

/// Parses plan-file TOML (no validation beyond the shape).
///
/// # Errors
/// TOML syntax errors, unknown keys and wrong types, with their position.
pub fn parse(text: &str) -> Result<PlanFile, PlanError> {
    toml::from_str::<PlanFile>(text)
        .map_err(|e| PlanError::PlanFile(e.to_string().trim_end().replace('\n', " ")))
}

impl PlanFile {
    /// Makes relative paths absolute against `base` (the plan file's directory).
    pub fn absolutize(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = &mut self.datastore.spire_config {
            abs(p);
        }
        match &mut self.datastore.spire_workdir {
            Some(p) => abs(p),
            None => self.datastore.spire_workdir = Some(base.to_path_buf()),
        }
        let url = &self.repository.url;
        if !url.is_empty() && !url.contains("://") && Path::new(url).is_relative() {
            self.repository.url = base.join(url).display().to_string();
        }
    }

    /// Validates the file into a [`Plan`].
    ///
    /// # Errors
    /// A message naming the key at fault and what would be accepted.
    pub fn validate(&self) -> Result<Plan, PlanError> {
        self.validated().map_err(PlanError::PlanFile)
    }

    fn validated(&self) -> Result<Plan, String> {
        if self.format != PLAN_FILE_FORMAT {
            return Err(format!(
                "format = {} is not supported; this spirekeep reads plan files of format {PLAN_FILE_FORMAT}",
                self.format
            ));
        }
        check_id("name", &self.name)?;
        let target = parse_release(&self.target).map_err(|e| format!("target: {e}"))?;

        let datastore = self.datastore_source()?;
        let spire_workdir = self
            .datastore
            .spire_workdir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."));
        if self.repository.url.trim().is_empty() {
            return Err("repository.url is required: where the pre-upgrade snapshot goes (s3://bucket/prefix, file:///path, …)".into());
        }
        let repo_options = RepoOptions {
            s3_endpoint: self.repository.s3_endpoint.clone(),
            s3_allow_http: self.repository.s3_allow_http
                || self
                    .repository
                    .s3_endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            s3_path_style: self.repository.s3_path_style,
            s3_region: self.repository.s3_region.clone(),
        };

        // members
        let mut names = BTreeSet::new();
        let mut members_of = |group: &str, role: Role, list: &[MemberConfig], key: &str| {
            let mut out = Vec::new();
            for (i, m) in list.iter().enumerate() {
                let at = format!("{key}[{i}]");
                check_id(&format!("{at}.name"), &m.name)?;
                if !names.insert(m.name.clone()) {
                    return Err(format!(
                        "{at}.name: {:?} is used twice; member names must be unique across the fleet",
                        m.name
                    ));
                }
                for k in m.vars.keys() {
                    if BUILTIN_PLACEHOLDERS.contains(&k.as_str()) {
                        return Err(format!(
                            "{at}.vars.{k}: {{{k}}} is built in and cannot be set per member"
                        ));
                    }
                }
                out.push(Member {
                    name: m.name.clone(),
                    host: m.host.clone().unwrap_or_else(|| m.name.clone()),
                    role,
                    group: group.to_owned(),
                    vars: m.vars.clone(),
                    workload: m.workload.clone(),
                    container: m.container.clone(),
                });
            }
            Ok::<_, String>(out)
        };
        if self.servers.members.is_empty() {
            return Err("servers.members is empty: a plan needs at least one SPIRE server".into());
        }
        let servers = members_of(
            "servers",
            Role::Server,
            &self.servers.members,
            "servers.members",
        )?;
        let mut groups = Vec::new();
        let mut group_names = BTreeSet::new();
        for (gi, g) in self.agents.iter().enumerate() {
            let at = format!("agents[{gi}]");
            check_id(&format!("{at}.name"), &g.name)?;
            if g.name == "servers" || !group_names.insert(g.name.clone()) {
                return Err(format!(
                    "{at}.name: {:?} is used twice (or is \"servers\")",
                    g.name
                ));
            }
            let members = members_of(&g.name, Role::Agent, &g.members, &format!("{at}.members"))?;
            let batch = parse_batch(g.batch.as_ref()).map_err(|e| format!("{at}.batch: {e}"))?;
            if !(0.0..1.0).contains(&g.max_failure_ratio) {
                return Err(format!(
                    "{at}.max_failure_ratio = {}: give a share from 0 (no failure allowed) to below 1",
                    g.max_failure_ratio
                ));
            }
            let gates = gates(&g.health, &format!("{at}.health"), &members)?;
            groups.push((g, members, batch, gates));
        }

        // executor
        let executor = self.executor_spec()?;
        let is_command = matches!(executor, ExecutorSpec::Command(_));
        if !is_command {
            for (key, c) in std::iter::once(("servers.commands", &self.servers.commands)).chain(
                self.agents
                    .iter()
                    .map(|g| ("agents[].commands", &g.commands)),
            ) {
                if !c.is_empty() {
                    return Err(format!(
                        "{key}: command templates apply to the command executor only, not kubernetes"
                    ));
                }
            }
            if !self.executor.commands.is_empty() {
                return Err(
                    "executor.commands: command templates apply to kind = \"command\" only".into(),
                );
            }
        }
        let server_commands = if is_command {
            Some(commands(
                &self.servers.commands.or(&self.executor.commands),
                "servers.commands",
                &servers,
            )?)
        } else {
            check_kubernetes_members(&servers, "servers.members", "statefulset")?;
            None
        };
        let server_gates = gates(&self.servers.health, "servers.health", &servers)?;
        let mut agents = Vec::new();
        for (gi, (g, members, batch, gates)) in groups.into_iter().enumerate() {
            let commands = if is_command {
                Some(commands(
                    &g.commands.or(&self.executor.commands),
                    &format!("agents[{gi}].commands"),
                    &members,
                )?)
            } else {
                check_kubernetes_members(&members, &format!("agents[{gi}].members"), "daemonset")?;
                None
            };
            agents.push(AgentGroup {
                name: g.name.clone(),
                batch,
                max_failure_ratio: g.max_failure_ratio,
                commands,
                members,
                gates,
            });
        }
        let target_vars = Vars::new().with("version", target.to_string());
        let post_checks = self
            .post_checks
            .iter()
            .enumerate()
            .map(|(i, g)| g.validate(&format!("post_checks[{i}]"), &[&target_vars]))
            .collect::<Result<Vec<_>, _>>()?;

        let svid_ttl = match &self.clock.svid_ttl {
            Some(v) => parse_duration(v).map_err(|e| format!("clock.svid_ttl: {e}"))?,
            None => DEFAULT_SVID_TTL,
        };
        let max_clock_skew = match &self.clock.max_skew {
            Some(v) => parse_duration(v).map_err(|e| format!("clock.max_skew: {e}"))?,
            None => svid_ttl / 10,
        };
        let rehearsal = match &self.rehearsal {
            None => None,
            Some(r) => {
                if r.spire_server.replace("{version}", "").contains(['{', '}']) {
                    return Err(format!(
                        "rehearsal.spire_server: only {{version}} can be replaced in {:?}",
                        r.spire_server
                    ));
                }
                if r.spire_server.trim().is_empty() {
                    return Err(
                        "rehearsal.spire_server: the path of a spire-server binary is needed"
                            .into(),
                    );
                }
                let timeout = match &r.timeout {
                    Some(v) => parse_duration(v).map_err(|e| format!("rehearsal.timeout: {e}"))?,
                    None => Duration::from_secs(90),
                };
                Some(Rehearsal {
                    spire_server: r.spire_server.clone(),
                    scratch_env: r.scratch_env.clone(),
                    timeout,
                })
            }
        };
        Ok(Plan {
            keep_live_agents_on_rollback: self
                .datastore
                .keep_live_agents_on_rollback
                .unwrap_or(true),
            on_post_check_failure: self.on_post_check_failure,
            max_clock_skew,
            rehearsal,
            name: self.name.clone(),
            target,
            order: self.order,
            allow: self.allow.clone(),
            datastore,
            spire_workdir,
            repository: self.repository.url.clone(),
            repo_options,
            executor,
            server_commands,
            servers,
            server_gates,
            agents,
            post_checks,
        })
    }

    fn datastore_source(&self) -> Result<DatastoreSource, String> {
        let d = &self.datastore;
        let given = [
            d.spire_config.is_some(),
            d.connection_string.is_some(),
            d.connection_string_env.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if given != 1 {
            return Err("[datastore] needs exactly one of spire_config (SPIRE's server.conf), connection_string, connection_string_env (an environment variable holding it)".into());
        }
        if let Some(path) = &d.spire_config {
            return Ok(DatastoreSource::SpireConfig {
                path: path.clone(),
                expand_env: d.expand_env,
            });
        }
        let value = match (&d.connection_string, &d.connection_string_env) {
            (Some(s), _) => s.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!(
                    "datastore.connection_string_env: the environment variable {var} is not set"
                )
            })?,
            (None, None) => unreachable!("counted above"),
        };
        Ok(DatastoreSource::Connection {
            value,
            database_type: d.database_type.clone(),
        })
    }

    fn executor_spec(&self) -> Result<ExecutorSpec, String> {
        let e = &self.executor;
        let timeout = parse_duration(e.timeout.as_deref().unwrap_or("5m"))
            .map_err(|err| format!("executor.timeout: {err}"))?;
        let shell = e.shell.clone().unwrap_or_else(|| "sh".into());
        for name in &e.pass_env {
            if super::executor::forbidden_pass_env(name) {
                return Err(format!(
                    "executor.pass_env: {name} is spirekeep's own secret and is never passed to commands; give a command what it needs in [executor.env]"
                ));
            }
        }
        match e.kind {
            ExecutorKind::Command => {
                for (key, v) in [
                    ("kubectl", &e.kubectl),
                    ("context", &e.context),
                    ("namespace", &e.namespace),
                    ("server_image", &e.server_image),
                    ("agent_image", &e.agent_image),
                    ("tag", &e.tag),
                    ("rollout_timeout", &e.rollout_timeout),
                ] {
                    if v.is_some() {
                        return Err(format!(
                            "executor.{key} applies to kind = \"kubernetes\" only"
                        ));
                    }
                }
                Ok(ExecutorSpec::Command(CommandSpec {
                    shell,
                    timeout,
                    env: e.env.clone(),
                    pass_env: e.pass_env.clone(),
                }))
            }
            ExecutorKind::Kubernetes => {
                let need = |key: &str, v: &Option<String>| {
                    v.clone().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                        format!("executor.{key} is required for kind = \"kubernetes\" (the image without its tag, e.g. ghcr.io/spiffe/spire-server)")
                    })
                };
                let tag = Template::parse(e.tag.as_deref().unwrap_or("{version}"))
                    .map_err(|err| format!("executor.tag: {err}"))?;
                if let Some(p) = tag.placeholders().find(|p| *p != "version") {
                    return Err(format!(
                        "executor.tag: only {{version}} can be used, not {{{p}}}"
                    ));
                }
                let rollout_timeout = parse_duration(e.rollout_timeout.as_deref().unwrap_or("10m"))
                    .map_err(|err| format!("executor.rollout_timeout: {err}"))?;
                Ok(ExecutorSpec::Kubernetes(KubernetesSpec {
                    kubectl: e.kubectl.clone().unwrap_or_else(|| "kubectl".into()),
                    context: e.context.clone(),
                    namespace: e.namespace.clone(),
                    server_image: need("server_image", &e.server_image)?,
                    agent_image: need("agent_image", &e.agent_image)?,
                    tag,
                    rollout_timeout,
                    timeout: timeout.max(rollout_timeout + Duration::from_secs(30)),
                    shell,
                    env: e.env.clone(),
                    pass_env: e.pass_env.clone(),
                    stop_timeout: rollout_timeout,
                }))
            }
        }
    }
}

fn check_kubernetes_members(members: &[Member], key: &str, kind: &str) -> Result<(), String> {
    for (i, m) in members.iter().enumerate() {
        if let Some(w) = &m.workload {
            let ok = w.split_once('/').is_some_and(|(k, n)| {
                !n.is_empty() && (k == kind || (kind == "statefulset" && k == "deployment"))
            });
            if !ok {
                return Err(format!(
                    "{key}[{i}].workload = {w:?}: give {kind}/NAME (SPIRE's usual deployment: servers in a StatefulSet, agents in a DaemonSet)"
                ));
            }
        }
    }
    Ok(())
}

/// Builds the templates for one role or group and checks that every
/// placeholder is known for every member.
fn commands(c: &CommandsConfig, key: &str, members: &[Member]) -> Result<Commands, String> {
    let get = |name: &str, v: &Option<String>| -> Result<Template, String> {
        let raw = v.as_deref().ok_or_else(|| {
            format!("{key}.{name} is missing (set it there or in [executor.commands]); the command executor needs version, upgrade, rollback, stop and start")
        })?;
        let t = Template::parse(raw).map_err(|e| format!("{key}.{name}: {e}"))?;
        for m in members {
            if let Some(p) = t.missing(&m.all_vars()) {
                return Err(format!(
                    "{key}.{name}: unknown placeholder {{{p}}} for member {:?}; known: {}",
                    m.name,
                    known_placeholders(m)
                ));
            }
        }
        Ok(t)
    };
    Ok(Commands {
        version: get("version", &c.version)?,
        upgrade: get("upgrade", &c.upgrade)?,
        rollback: get("rollback", &c.rollback)?,
        stop: get("stop", &c.stop)?,
        start: get("start", &c.start)?,
        clock: get(
            "clock",
            &Some(
                c.clock
                    .clone()
                    .unwrap_or_else(|| super::executor::DEFAULT_CLOCK_COMMAND.into()),
            ),
        )?,
    })
}

fn known_placeholders(m: &Member) -> String {
    BUILTIN_PLACEHOLDERS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(m.vars.keys().cloned())
        .map(|p| format!("{{{p}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn gates(list: &[GateConfig], key: &str, members: &[Member]) -> Result<Vec<Gate>, String> {
    let vars: Vec<Vars> = members.iter().map(Member::all_vars).collect();
    let refs: Vec<&Vars> = vars.iter().collect();
    list.iter()
        .enumerate()
        .map(|(i, g)| g.validate(&format!("{key}[{i}]"), &refs))
        .collect()
}

fn parse_batch(b: Option<&BatchConfig>) -> Result<Batch, String> {
    match b {
        None => Ok(Batch::Count(1)),
        Some(BatchConfig::Count(0)) => Err("a batch needs at least one member".into()),
        Some(BatchConfig::Count(n)) => Ok(Batch::Count(*n)),
        Some(BatchConfig::Text(s)) => {
            let t = s.trim();
            if let Some(p) = t.strip_suffix('%') {
                let p: u32 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("{s:?} is not a percentage such as \"25%\""))?;
                if p == 0 || p > 100 {
                    return Err(format!("{s:?}: give 1% to 100%"));
                }
                Ok(Batch::Percent(p))
            } else {
                match t.parse::<u32>() {
                    Ok(0) | Err(_) => Err(format!(
                        "{s:?}: give a member count (2) or a percentage (\"25%\")"
                    )),
                    Ok(n) => Ok(Batch::Count(n)),
                }
            }
        }
    }
}

/// A name that is safe in keys, file names and labels.
fn check_id(key: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key} = {value:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

/// A SPIRE release from the release table (a leading `v` is accepted).
///
/// # Errors
/// Not semver, or not a release spirekeep knows.
pub fn parse_release(value: &str) -> Result<Version, String> {
    let bare = value.trim().strip_prefix('v').unwrap_or(value.trim());
    let v = Version::parse(bare)
        .map_err(|e| format!("{value:?} is not a SPIRE version such as 1.15.3 ({e})"))?;
    let table = ReleaseTable::builtin();
    if table.get(&v).is_none() {
        return Err(format!(
            "{v} is not in spirekeep's release table (known: {} to {})",
            table.oldest().version,
            table.newest().version
        ));
    }
    Ok(v)
}

/// Parses `500ms`, `5s`, `2m`, `1h` or combinations such as `1m30s`.
///
/// # Errors
/// Anything else, or zero.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let s = value.trim();
    let err = || format!("{value:?} is not a duration such as 500ms, 5s, 2m or 1m30s");
    if s.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(err()),
        };
        total = total.saturating_add(d);
    }
    if total.is_zero() {
        return Err(format!("{value:?}: a duration must be more than zero"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
format = 1
target = "1.15.3"
[datastore]
connection_string = "/var/lib/spire/datastore.sqlite3"
[repository]
url = "file:///backups"
[executor]
kind = "command"
[executor.commands]
version = "ssh {host} spire-{role} --version 2>&1"
upgrade = "ssh {host} install-spire {version}"
rollback = "ssh {host} install-spire {version}"
stop = "ssh {host} systemctl stop spire-{role}"
start = "ssh {host} systemctl start spire-{role}"
[servers]
members = [{ name = "s1", host = "10.0.0.1" }]
[[servers.health]]
kind = "http"
url = "http://{host}:8080/ready"
[[agents]]
name = "nodes"
batch = "50%"
members = [{ name = "a1" }, { name = "a2" }, { name = "a3" }]
"#;

    #[test]
    fn minimal_plan_validates() {
        let plan = parse(MINIMAL).unwrap().validate().unwrap();
        assert_eq!(plan.target, Version::new(1, 15, 3));
        assert_eq!(plan.servers[0].host, "10.0.0.1");
        assert_eq!(plan.agents[0].members[1].host, "a2");
        assert_eq!(plan.agents[0].batch, Batch::Percent(50));
        assert_eq!(plan.agents[0].batch.split(3), vec![0..2, 2..3]);
        assert_eq!(plan.name, "upgrade");
        assert!(plan.keep_live_agents_on_rollback, "on by default");
    }

    #[test]
    fn the_rollback_can_leave_live_agents_out() {
        let text = MINIMAL.replace(
            "[repository]",
            "keep_live_agents_on_rollback = false\n[repository]",
        );
        let plan = parse(&text).unwrap().validate().unwrap();
        assert!(!plan.keep_live_agents_on_rollback);
    }

    fn invalid(patch: impl Fn(&str) -> String) -> String {
        let text = patch(MINIMAL);
        match parse(&text) {
            Err(e) => e.to_string(),
            Ok(f) => f.validate().expect_err("should be invalid").to_string(),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = invalid(|s| s.replace("{host}:8080", "{hots}:8080"));
        assert!(
            e.contains("servers.health[0]") && e.contains("{hots}"),
            "{e}"
        );
        let e = invalid(|s| {
            s.replace(
                "install-spire {version}\"\nstop",
                "install-spire {versoin}\"\nstop",
            )
        });
        assert!(
            e.contains("servers.commands.rollback")
                && e.contains("{versoin}")
                && e.contains("known:"),
            "{e}"
        );
        let e = invalid(|s| s.replace("1.15.3", "1.15.99"));
        assert!(e.contains("target") && e.contains("release table"), "{e}");
        let e = invalid(|s| s.replace("name = \"a2\"", "name = \"s1\""));
        assert!(e.contains("used twice"), "{e}");
        let e = invalid(|s| s.replace("batch = \"50%\"", "batch = \"150%\""));
        assert!(e.contains("agents[0].batch"), "{e}");
        let e = invalid(|s| s.replace("[repository]", "[repository]\nbucket = 1"));
        assert!(e.contains("unknown field") && e.contains("bucket"), "{e}");
        let e = invalid(|s| s.replace("stop = \"ssh {host} systemctl stop spire-{role}\"\n", ""));
        assert!(e.contains("servers.commands.stop is missing"), "{e}");
        let e = invalid(|s| {
            s.replace(
                "connection_string = ",
                "spire_config = \"x\"\nconnection_string = ",
            )
        });
        assert!(e.contains("exactly one"), "{e}");
        let e = invalid(|s| s.replace("format = 1", "format = 2"));
        assert!(e.contains("format = 2"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "5", "s", "5x", "0s", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn batches_split() {
        assert_eq!(Batch::Count(2).split(5), vec![0..2, 2..4, 4..5]);
        assert_eq!(Batch::Percent(34).split(3), vec![0..2, 2..3]);
        assert_eq!(Batch::Percent(33).split(3), vec![0..1, 1..2, 2..3]);
        assert_eq!(Batch::Percent(100).split(4), vec![0..4]);
        assert!(Batch::Count(3).split(0).is_empty());
    }
}
