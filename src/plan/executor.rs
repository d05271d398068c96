//! Executors: how spirekeep acts on one fleet member.
//!
//! Five actions: read the version it runs, upgrade it, roll it back, stop it
//! and start it. Two executors:
//!
//! - [`CommandExecutor`]: a shell template per action (systemd over ssh,
//!   Ansible, a local script), with `{name}`, `{host}`, `{version}` and the
//!   member's vars filled in (see [`super::template`]);
//! - [`KubernetesExecutor`]: SPIRE's usual deployment, servers in a
//!   StatefulSet and agents in a DaemonSet, driven through `kubectl` so the
//!   user's kubeconfig and context apply: `set image`, `rollout status`, the
//!   image tag read back from the workload; servers are stopped by scaling
//!   the StatefulSet to zero (the replica count is kept in an annotation).
//!
//! Every action can be rendered without running it, which is what
//! `apply --dry-run` prints.
//!
//! Commands, kubectl and command gates run with an explicit, minimal
//! environment ([`child_env`]): `PATH`, `HOME`, `LANG`, `LC_*`, `TZ`, the
//! variables the plan names in `executor.pass_env`, and `executor.env`;
//! never spirekeep's own (`PGPASSWORD`, `AWS_SECRET_ACCESS_KEY`,
//! `SPIREKEEP_*`, …).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use semver::Version;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::file::{Member, Plan, Role};
use super::health::{GateEnv, tail};
use super::template::{Quoting, Template, shell_quote};

/// `[executor] kind = "command"`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub shell: String,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    /// Variables of spirekeep's environment passed on (`executor.pass_env`).
    pub pass_env: Vec<String>,
}

/// The templates of one role or agent group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commands {
    pub version: Template,
    pub upgrade: Template,
    pub rollback: Template,
    pub stop: Template,
    pub start: Template,
    /// Prints the member host's clock as Unix seconds (default `date +%s`).
    pub clock: Template,
}

/// The default `clock` template.
pub const DEFAULT_CLOCK_COMMAND: &str = "date +%s";

/// Variables of spirekeep's environment that every child gets.
const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// Variables `executor.pass_env` may not name: spirekeep's own secrets.
#[must_use]
pub fn forbidden_pass_env(name: &str) -> bool {
    name.starts_with("SPIREKEEP_")
        || matches!(
            name,
            "PGPASSWORD"
                | "AWS_SECRET_ACCESS_KEY"
                | "AWS_SESSION_TOKEN"
                | "AZURE_STORAGE_ACCOUNT_KEY"
        )
}

/// The environment of every command, kubectl call and command gate:
/// `PATH`, `HOME`, `LANG`, `LC_*` and `TZ` from spirekeep's environment, the
/// variables named in `pass` (when set), then `extra` (`executor.env`) on
/// top. Nothing else of spirekeep's environment reaches a child.
#[must_use]
pub fn child_env(pass: &[String], extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        let wanted = BASE_ENV.contains(&k)
            || k.starts_with("LC_")
            || pass.iter().any(|p| p == k && !forbidden_pass_env(p));
        if wanted {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// `[executor] kind = "kubernetes"`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSpec {
    pub kubectl: String,
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub server_image: String,
    pub agent_image: String,
    pub tag: Template,
    pub rollout_timeout: Duration,
    /// Longest one kubectl call may take.
    pub timeout: Duration,
    /// For command gates.
    pub shell: String,
    pub env: BTreeMap<String, String>,
    /// Variables of spirekeep's environment passed on (`executor.pass_env`),
    /// e.g. `KUBECONFIG`.
    pub pass_env: Vec<String>,
    /// How long `stop` waits for the server pods to be gone.
    pub stop_timeout: Duration,
}

/// Which executor a plan uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorSpec {
    Command(CommandSpec),
    Kubernetes(KubernetesSpec),
}

/// What to do to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Version,
    Upgrade,
    Rollback,
    Stop,
    Start,
    /// Print the member host's clock (Unix seconds).
    Clock,
}

impl Action {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Version => "version",
            Self::Upgrade => "upgrade",
            Self::Rollback => "rollback",
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Clock => "clock",
        }
    }
}

/// One command that ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandRun {
    /// The command line, as a shell would read it.
    pub command: String,
    /// Its exit status (`None`: killed or could not start).
    pub exit: Option<i32>,
    /// The tail of its output (stdout and stderr).
    pub output: String,
    pub millis: u64,
}

/// The result of an action.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActionResult {
    pub ok: bool,
    pub runs: Vec<CommandRun>,
    /// Why it failed, on one line.
    pub error: Option<String>,
    /// The full stdout of the last command (a version, a replica count).
    #[serde(skip)]
    pub stdout: String,
}

/// Acts on fleet members.
#[async_trait]
pub trait Executor: Send + Sync {
    /// `command` or `kubernetes`.
    fn kind(&self) -> &'static str;

    /// The exact commands `action` runs (for `--dry-run`). `wait = false`
    /// leaves out waiting for the member to come up.
    fn render(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        wait: bool,
    ) -> Vec<String>;

    /// Runs `action`.
    async fn run(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        wait: bool,
    ) -> ActionResult;

    /// How command gates run (shell and environment).
    fn gate_env(&self) -> GateEnv;

    /// The version the member runs, read back.
    async fn version(&self, member: &Member) -> Result<Version, String> {
        let r = self.run(Action::Version, member, None, true).await;
        if !r.ok {
            return Err(r
                .error
                .unwrap_or_else(|| "the version command failed".into()));
        }
        self.parse_version(&r.stdout).ok_or_else(|| {
            format!(
                "cannot find a version in the output of `{}`: {:?}",
                r.runs.last().map_or("", |c| c.command.as_str()),
                tail(&r.stdout)
            )
        })
    }

    /// Finds the version in what the version action printed.
    fn parse_version(&self, output: &str) -> Option<Version> {
        find_version(output)
    }

    /// The member host's clock minus the local clock, in milliseconds (the
    /// local clock is taken half-way through the call; the member's clock
    /// is read to the second, so the result is good to about a second).
    async fn clock_offset(&self, member: &Member) -> Result<i64, String> {
        let before = time::OffsetDateTime::now_utc();
        let r = self.run(Action::Clock, member, None, true).await;
        let after = time::OffsetDateTime::now_utc();
        if !r.ok {
            return Err(r.error.unwrap_or_else(|| "the clock command failed".into()));
        }
        let remote = parse_unix_seconds(&r.stdout).ok_or_else(|| {
            format!(
                "`{}` printed {:?}, not Unix seconds",
                r.runs.last().map_or("", |c| c.command.as_str()),
                tail(&r.stdout)
            )
        })?;
        let local_ms =
            (before.unix_timestamp_nanos() + after.unix_timestamp_nanos()) / 2 / 1_000_000;
        i64::try_from(remote - local_ms).map_err(|_| "clock out of range".to_owned())
    }
}

/// Unix time in milliseconds from what a clock command printed: the last
/// word that is a number of seconds (`1764850000` or `1764850000.25`).
#[must_use]
pub fn parse_unix_seconds(output: &str) -> Option<i128> {
    output.split_whitespace().rev().find_map(|w| {
        let (int, frac) = w.split_once('.').unwrap_or((w, ""));
        let secs: i128 = int.parse().ok()?;
        if !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let ms: i128 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
        Some(secs * 1000 + if secs < 0 { -ms } else { ms })
    })
}

/// Builds the executor a plan asks for.
#[must_use]
pub fn build(plan: &Plan) -> Box<dyn Executor> {
    match &plan.executor {
        ExecutorSpec::Command(spec) => {
            let mut templates = BTreeMap::new();
            for m in plan.members() {
                if let Some(c) = plan.commands_of(m) {
                    templates
                        .entry(m.group.clone())
                        .or_insert_with(|| c.clone());
                }
            }
            Box::new(CommandExecutor {
                spec: spec.clone(),
                templates,
            })
        }
        ExecutorSpec::Kubernetes(spec) => Box::new(KubernetesExecutor { spec: spec.clone() }),
    }
}

/// The first word of `output` that is a semantic version (a leading `v` and
/// surrounding punctuation are ignored): `1.14.7`, `spire-server version
/// 1.14.7`, `v1.15.3-dev-unk`.
#[must_use]
pub fn find_version(output: &str) -> Option<Version> {
    output
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '"' | '\'' | '(' | ')' | '='))
        .filter_map(|w| {
            let w = w.trim_matches(|c: char| !c.is_ascii_alphanumeric());
            let w = w.strip_prefix('v').unwrap_or(w);
            Version::parse(w).ok()
        })
        .next()
}

// ------------------------------------------------------------------ processes

/// Runs `program args` with a timeout; on timeout the whole process group
/// is killed. Members started by the command in their own session (as
/// `fleet.sh` and systemd do) are not affected.
async fn run_process(
    program: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
    shown: String,
) -> (CommandRun, String) {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let millis = |s: Instant| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                CommandRun {
                    command: shown,
                    exit: None,
                    output: format!("cannot run {program}: {e}"),
                    millis: millis(started),
                },
                String::new(),
            );
        }
    };
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_all = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let a = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let b = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(a, b);
        let status = child.wait().await;
        (status, out, err)
    };
    match tokio::time::timeout(timeout, read_all).await {
        Ok((status, out, err)) => {
            let stdout = String::from_utf8_lossy(&out).into_owned();
            let both = format!("{stdout}{}", String::from_utf8_lossy(&err));
            let exit = status.ok().and_then(|s| s.code());
            (
                CommandRun {
                    command: shown,
                    exit,
                    output: tail(&both),
                    millis: millis(started),
                },
                stdout,
            )
        }
        Err(_) => {
            if let Some(pid) = pid {
                // the child leads its own process group: end the group
                let _ = tokio::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(format!("-{pid}"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
            (
                CommandRun {
                    command: shown,
                    exit: None,
                    output: format!("timed out after {}s and was killed", timeout.as_secs()),
                    millis: millis(started),
                },
                String::new(),
            )
        }
    }
}

fn failed(run: &CommandRun) -> String {
    let status = match run.exit {
        Some(c) => format!("exited with status {c}"),
        None => "did not finish".into(),
    };
    if run.output.is_empty() {
        format!("`{}` {status}", run.command)
    } else {
        format!("`{}` {status}: {}", run.command, run.output)
    }
}

// ------------------------------------------------------------------ command

/// Shell templates per action.
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    spec: CommandSpec,
    /// By member group (`servers` or an agent group's name).
    templates: BTreeMap<String, Commands>,
}

impl CommandExecutor {
    fn template(&self, action: Action, member: &Member) -> Option<&Template> {
        let c = self.templates.get(&member.group)?;
        Some(match action {
            Action::Version => &c.version,
            Action::Upgrade => &c.upgrade,
            Action::Rollback => &c.rollback,
            Action::Stop => &c.stop,
            Action::Start => &c.start,
            Action::Clock => &c.clock,
        })
    }
}

#[async_trait]
impl Executor for CommandExecutor {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn render(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        _wait: bool,
    ) -> Vec<String> {
        self.template(action, member)
            .map(|t| vec![t.render(&member.vars(version), Quoting::Shell)])
            .unwrap_or_default()
    }

    async fn run(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        wait: bool,
    ) -> ActionResult {
        let Some(line) = self
            .render(action, member, version, wait)
            .into_iter()
            .next()
        else {
            return ActionResult {
                ok: false,
                error: Some(format!(
                    "no {} command for {}",
                    action.as_str(),
                    member.name
                )),
                ..ActionResult::default()
            };
        };
        tracing::info!(member = %member.name, action = action.as_str(), command = %line, "running");
        let (run, stdout) = run_process(
            &self.spec.shell,
            &["-c".to_owned(), line.clone()],
            &child_env(&self.spec.pass_env, &self.spec.env),
            self.spec.timeout,
            line,
        )
        .await;
        let ok = run.exit == Some(0);
        ActionResult {
            ok,
            error: (!ok).then(|| failed(&run)),
            runs: vec![run],
            stdout,
        }
    }

    fn gate_env(&self) -> GateEnv {
        GateEnv {
            shell: self.spec.shell.clone(),
            env: child_env(&self.spec.pass_env, &self.spec.env),
        }
    }
}

// ------------------------------------------------------------------ kubernetes

/// The annotation that remembers a StatefulSet's replicas while it is stopped.
pub const REPLICAS_ANNOTATION: &str = "spirekeep.spiffe.io/replicas";

/// `kubectl` against SPIRE's workloads.
#[derive(Debug, Clone)]
pub struct KubernetesExecutor {
    spec: KubernetesSpec,
}

/// One kubectl call, or a value that is only known when the previous call ran.
enum KStep {
    Call(Vec<String>),
    /// Read the replica count, remember it, scale to zero.
    StopScale(String),
    /// Scale back to the remembered count.
    StartScale(String),
    /// Wait until no pod of the workload is left (terminating ones
    /// included): the datastore must not be restored under a live server.
    WaitGone(String),
}

impl KubernetesExecutor {
    fn base(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(c) = &self.spec.context {
            v.push(format!("--context={c}"));
        }
        if let Some(n) = &self.spec.namespace {
            v.push(format!("--namespace={n}"));
        }
        v
    }

    fn workload(member: &Member) -> String {
        member
            .workload
            .clone()
            .unwrap_or_else(|| match member.role {
                Role::Server => format!("statefulset/{}", member.name),
                Role::Agent => format!("daemonset/{}", member.name),
            })
    }

    fn container(member: &Member) -> String {
        member
            .container
            .clone()
            .unwrap_or_else(|| match member.role {
                Role::Server => "spire-server".into(),
                Role::Agent => "spire-agent".into(),
            })
    }

    fn image(&self, member: &Member, version: &Version) -> String {
        let repo = match member.role {
            Role::Server => &self.spec.server_image,
            Role::Agent => &self.spec.agent_image,
        };
        let tag = self.spec.tag.render(
            &super::template::Vars::new().with("version", version.to_string()),
            Quoting::Raw,
        );
        format!("{repo}:{tag}")
    }

    fn args(&self, rest: &[&str]) -> Vec<String> {
        let mut v = self.base();
        v.extend(rest.iter().map(|s| (*s).to_owned()));
        v
    }

    fn rollout(&self, workload: &str) -> Vec<String> {
        self.args(&[
            "rollout",
            "status",
            workload,
            &format!("--timeout={}s", self.spec.rollout_timeout.as_secs()),
        ])
    }

    fn steps(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        wait: bool,
    ) -> Result<Vec<KStep>, String> {
        let w = Self::workload(member);
        let scalable = !w.starts_with("daemonset/");
        Ok(match action {
            Action::Version => vec![KStep::Call(self.args(&[
                "get",
                &w,
                "-o",
                &format!(
                    "jsonpath={{.spec.template.spec.containers[?(@.name==\"{}\")].image}}",
                    Self::container(member)
                ),
            ]))],
            Action::Upgrade | Action::Rollback => {
                let v = version.ok_or("no version given")?;
                let mut s = vec![KStep::Call(self.args(&[
                    "set",
                    "image",
                    &w,
                    &format!("{}={}", Self::container(member), self.image(member, v)),
                ]))];
                if wait {
                    s.push(KStep::Call(self.rollout(&w)));
                }
                s
            }
            Action::Stop if scalable => vec![KStep::StopScale(w.clone()), KStep::WaitGone(w)],
            Action::Stop => {
                return Err(format!(
                    "{w}: a DaemonSet cannot be stopped by scaling; spirekeep only stops servers"
                ));
            }
            Action::Start if scalable => {
                let mut s = vec![KStep::StartScale(w.clone())];
                if wait {
                    s.push(KStep::Call(self.rollout(&w)));
                }
                s
            }
            Action::Start => vec![KStep::Call(self.rollout(&w))],
            Action::Clock => vec![KStep::Call(self.args(&[
                "exec",
                &w,
                "-c",
                &Self::container(member),
                "--",
                "date",
                "+%s",
            ]))],
        })
    }

    fn show(&self, args: &[String]) -> String {
        std::iter::once(self.spec.kubectl.as_str())
            .chain(args.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }

    async fn call(&self, args: Vec<String>, runs: &mut Vec<CommandRun>) -> Result<String, String> {
        let shown = self.show(&args);
        tracing::info!(command = %shown, "running");
        let (run, stdout) = run_process(
            &self.spec.kubectl,
            &args,
            &child_env(&self.spec.pass_env, &self.spec.env),
            self.spec.timeout,
            shown,
        )
        .await;
        let ok = run.exit == Some(0);
        let err = (!ok).then(|| failed(&run));
        runs.push(run);
        match err {
            None => Ok(stdout),
            Some(e) => Err(e),
        }
    }
}

#[async_trait]
impl Executor for KubernetesExecutor {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn render(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        wait: bool,
    ) -> Vec<String> {
        match self.steps(action, member, version, wait) {
            Err(e) => vec![format!("# {e}")],
            Ok(steps) => steps
                .into_iter()
                .flat_map(|s| match s {
                    KStep::Call(a) => vec![self.show(&a)],
                    KStep::StopScale(w) => vec![
                        self.show(&self.args(&["get", &w, "-o", "jsonpath={.spec.replicas}"])),
                        self.show(&self.args(&[
                            "annotate",
                            &w,
                            &format!("{REPLICAS_ANNOTATION}=<replicas>"),
                            "--overwrite",
                        ])),
                        self.show(&self.args(&["scale", &w, "--replicas=0"])),
                    ],
                    KStep::StartScale(w) => vec![
                        self.show(&self.args(&["get", &w, "-o", &annotation_path()])),
                        self.show(&self.args(&["scale", &w, "--replicas=<replicas>"])),
                    ],
                    KStep::WaitGone(w) => vec![
                        self.show(&self.args(&["get", &w, "-o", SELECTOR_PATH])),
                        format!(
                            "{}   # until it lists no pod (at most {}s)",
                            self.show(&self.args(&[
                                "get",
                                "pods",
                                "-l",
                                "<selector>",
                                "-o",
                                "name"
                            ])),
                            self.spec.stop_timeout.as_secs()
                        ),
                    ],
                })
                .collect(),
        }
    }

    async fn run(
        &self,
        action: Action,
        member: &Member,
        version: Option<&Version>,
        wait: bool,
    ) -> ActionResult {
        let mut runs = Vec::new();
        let result: Result<String, String> = async {
            let mut last = String::new();
            for step in self.steps(action, member, version, wait)? {
                last = match step {
                    KStep::Call(a) => self.call(a, &mut runs).await?,
                    KStep::StopScale(w) => {
                        let n = self
                            .call(
                                self.args(&["get", &w, "-o", "jsonpath={.spec.replicas}"]),
                                &mut runs,
                            )
                            .await?;
                        let n = n.trim();
                        if n.parse::<u32>().is_ok_and(|n| n > 0) {
                            self.call(
                                self.args(&[
                                    "annotate",
                                    &w,
                                    &format!("{REPLICAS_ANNOTATION}={n}"),
                                    "--overwrite",
                                ]),
                                &mut runs,
                            )
                            .await?;
                            self.call(self.args(&["scale", &w, "--replicas=0"]), &mut runs)
                                .await?
                        } else {
                            String::new()
                        }
                    }
                    KStep::WaitGone(w) => self.wait_gone(&w, &mut runs).await?,
                    KStep::StartScale(w) => {
                        let n = self
                            .call(self.args(&["get", &w, "-o", &annotation_path()]), &mut runs)
                            .await?;
                        let n = n.trim();
                        if n.parse::<u32>().is_ok_and(|n| n > 0) {
                            self.call(
                                self.args(&["scale", &w, &format!("--replicas={n}")]),
                                &mut runs,
                            )
                            .await?
                        } else {
                            String::new()
                        }
                    }
                };
            }
            Ok(last)
        }
        .await;
        match result {
            Ok(stdout) => ActionResult {
                ok: true,
                runs,
                error: None,
                stdout,
            },
            Err(e) => ActionResult {
                ok: false,
                runs,
                error: Some(e),
                stdout: String::new(),
            },
        }
    }

    fn gate_env(&self) -> GateEnv {
        GateEnv {
            shell: self.spec.shell.clone(),
            env: child_env(&self.spec.pass_env, &self.spec.env),
        }
    }

    /// The tag of `repo:tag` (a digest after `@` is ignored).
    fn parse_version(&self, output: &str) -> Option<Version> {
        let image = output.split_whitespace().next()?;
        let image = image.split('@').next()?;
        let (_, tag) = image.rsplit_once(':')?;
        find_version(tag)
    }
}

/// The workload's pod selector, as JSON.
const SELECTOR_PATH: &str = "jsonpath={.spec.selector.matchLabels}";

impl KubernetesExecutor {
    /// Polls until no pod of `workload` is left, terminating ones included
    /// (scaling to zero returns at once; the pods stop later).
    async fn wait_gone(
        &self,
        workload: &str,
        runs: &mut Vec<CommandRun>,
    ) -> Result<String, String> {
        let labels = self
            .call(self.args(&["get", workload, "-o", SELECTOR_PATH]), runs)
            .await?;
        let labels: BTreeMap<String, String> =
            serde_json::from_str(labels.trim()).map_err(|e| {
                format!(
                    "{workload}: cannot read its pod selector ({e}): {:?}",
                    tail(&labels)
                )
            })?;
        if labels.is_empty() {
            return Err(format!(
                "{workload} has no matchLabels selector: cannot tell when its pods are gone"
            ));
        }
        let selector = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let deadline = Instant::now() + self.spec.stop_timeout;
        let mut polls = 0u32;
        loop {
            let mut scratch = Vec::new();
            let left = self
                .call(
                    self.args(&["get", "pods", "-l", &selector, "-o", "name"]),
                    &mut scratch,
                )
                .await;
            polls += 1;
            let last = scratch.pop();
            match left {
                Ok(out) if out.trim().is_empty() => {
                    if let Some(mut run) = last {
                        run.output = format!("no pod left after {polls} poll(s)");
                        runs.push(run);
                    }
                    return Ok(String::new());
                }
                Ok(out) if Instant::now() >= deadline => {
                    runs.extend(last);
                    return Err(format!(
                        "{workload} was scaled to 0 but its pods are still there after {}s: {}",
                        self.spec.stop_timeout.as_secs(),
                        tail(&out).replace('\n', " ")
                    ));
                }
                Err(e) if Instant::now() >= deadline => {
                    runs.extend(last);
                    return Err(e);
                }
                _ => tokio::time::sleep(STOP_POLL).await,
            }
        }
    }
}

/// How often a stop looks for pods that are still there.
const STOP_POLL: Duration = Duration::from_millis(500);

fn annotation_path() -> String {
    format!(
        "jsonpath={{.metadata.annotations.{}}}",
        REPLICAS_ANNOTATION.replace('.', "\\.")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn member(role: Role, name: &str) -> Member {
        Member {
            name: name.into(),
            host: name.into(),
            role,
            group: if role == Role::Server {
                "servers".into()
            } else {
                "nodes".into()
            },
            vars: BTreeMap::new(),
            workload: None,
            container: None,
        }
    }

    fn k8s() -> KubernetesExecutor {
        KubernetesExecutor {
            spec: KubernetesSpec {
                kubectl: "kubectl".into(),
                context: Some("prod".into()),
                namespace: Some("spire".into()),
                server_image: "ghcr.io/spiffe/spire-server".into(),
                agent_image: "ghcr.io/spiffe/spire-agent".into(),
                tag: Template::parse("{version}").unwrap(),
                rollout_timeout: Duration::from_secs(600),
                timeout: Duration::from_secs(630),
                shell: "sh".into(),
                env: BTreeMap::new(),
                pass_env: Vec::new(),
                stop_timeout: Duration::from_secs(600),
            },
        }
    }

    #[test]
    fn versions_are_found_in_output() {
        assert_eq!(find_version("1.14.7\n"), Some(Version::new(1, 14, 7)));
        assert_eq!(
            find_version("spire-server version v1.15.3"),
            Some(Version::new(1, 15, 3))
        );
        assert_eq!(
            find_version("1.16.0-dev-unk").unwrap().to_string(),
            "1.16.0-dev-unk"
        );
        assert_eq!(find_version("no version here"), None);
        let k = k8s();
        assert_eq!(
            k.parse_version("ghcr.io/spiffe/spire-server:1.14.7"),
            Some(Version::new(1, 14, 7))
        );
        assert_eq!(
            k.parse_version("registry:5000/spire-server:1.13.6@sha256:abc"),
            Some(Version::new(1, 13, 6))
        );
        assert_eq!(k.parse_version("spire-server"), None);
    }

    #[test]
    fn kubernetes_commands_render_exactly() {
        let k = k8s();
        let s = member(Role::Server, "spire-server");
        let v = Version::new(1, 14, 7);
        assert_eq!(
            k.render(Action::Upgrade, &s, Some(&v), true),
            [
                "kubectl --context=prod --namespace=spire set image statefulset/spire-server spire-server=ghcr.io/spiffe/spire-server:1.14.7",
                "kubectl --context=prod --namespace=spire rollout status statefulset/spire-server --timeout=600s",
            ]
        );
        let a = member(Role::Agent, "spire-agent");
        assert_eq!(
            k.render(Action::Rollback, &a, Some(&v), false),
            [
                "kubectl --context=prod --namespace=spire set image daemonset/spire-agent spire-agent=ghcr.io/spiffe/spire-agent:1.14.7"
            ]
        );
        assert_eq!(
            k.render(Action::Version, &s, None, true),
            [
                "kubectl --context=prod --namespace=spire get statefulset/spire-server -o 'jsonpath={.spec.template.spec.containers[?(@.name==\"spire-server\")].image}'"
            ]
        );
        assert_eq!(k.render(Action::Stop, &s, None, true).len(), 5);
        assert_eq!(
            k.render(Action::Clock, &a, None, true),
            [
                "kubectl --context=prod --namespace=spire exec daemonset/spire-agent -c spire-agent -- date +%s"
            ]
        );
        assert!(k.render(Action::Stop, &a, None, true)[0].starts_with("# "));
    }

    /// A kubectl stand-in: logs every call; `get pods` lists a terminating
    /// pod for the first two polls.
    fn fake_kubectl(dir: &std::path::Path) -> std::path::PathBuf {
        let script = dir.join("kubectl");
        std::fs::write(
            &script,
            r#"#!/bin/sh
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  *"jsonpath={.spec.replicas}"*) echo 2 ;;
  *"jsonpath={.spec.selector.matchLabels}"*) echo '{"app":"spire-server"}' ;;
  *"get pods -l app=spire-server -o name"*)
    n=$(cat "$FAKE_DIR/polls" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$FAKE_DIR/polls"
    if [ $n -le 2 ]; then echo pod/spire-server-0; fi ;;
esac
exit 0
"#,
        )
        .unwrap();
        let mut perms = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms).unwrap();
        script
    }

    #[tokio::test]
    async fn kubernetes_stop_waits_for_the_pods_to_be_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = k8s();
        k.spec.kubectl = fake_kubectl(dir.path()).display().to_string();
        k.spec
            .env
            .insert("FAKE_DIR".into(), dir.path().display().to_string());
        let s = member(Role::Server, "spire-server");
        let r = k.run(Action::Stop, &s, None, true).await;
        assert!(r.ok, "{r:?}");
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        let calls: Vec<&str> = calls.lines().collect();
        let scale = calls
            .iter()
            .position(|c| c.contains("scale statefulset/spire-server --replicas=0"))
            .unwrap();
        let polls: Vec<usize> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.contains("get pods -l app=spire-server"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(polls.len(), 3, "{calls:?}");
        assert!(polls[0] > scale, "{calls:?}");

        // pods that never go away: the stop fails instead of returning
        std::fs::write(dir.path().join("polls"), "-1000\n").unwrap();
        k.spec.stop_timeout = Duration::from_millis(700);
        let r = k.run(Action::Stop, &s, None, true).await;
        assert!(!r.ok, "{r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("still there"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn commands_get_a_minimal_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let template = format!("env > {}; echo 1.2.3", out.display());
        let t = Template::parse(&template).unwrap();
        let commands = Commands {
            version: t.clone(),
            upgrade: t.clone(),
            rollback: t.clone(),
            stop: t.clone(),
            start: t.clone(),
            clock: t,
        };
        let exec = CommandExecutor {
            spec: CommandSpec {
                shell: "sh".into(),
                timeout: Duration::from_secs(10),
                env: BTreeMap::from([("FROM_PLAN".to_owned(), "yes".to_owned())]),
                // one of spirekeep's own is never passed, even when named
                pass_env: vec!["SPIREKEEP_DATASTORE".into()],
            },
            templates: BTreeMap::from([("servers".to_owned(), commands)]),
        };
        let s = member(Role::Server, "s1");
        assert_eq!(exec.version(&s).await.unwrap(), Version::new(1, 2, 3));
        let env = std::fs::read_to_string(&out).unwrap();
        let names: BTreeSet<&str> = env
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        // sh itself adds PWD, SHLVL and _
        let allowed = |n: &str| {
            matches!(
                n,
                "PATH" | "HOME" | "LANG" | "TZ" | "FROM_PLAN" | "PWD" | "SHLVL" | "_" | "OLDPWD"
            ) || n.starts_with("LC_")
        };
        for n in &names {
            assert!(allowed(n), "{n} reached the command: {env}");
        }
        assert!(
            names.contains("FROM_PLAN") && names.contains("PATH"),
            "{env}"
        );
        assert!(forbidden_pass_env("SPIREKEEP_DATASTORE") && forbidden_pass_env("PGPASSWORD"));
        // a named variable of spirekeep's environment is passed on
        let env = child_env(&["PATH".to_owned()], &BTreeMap::new());
        assert!(env.contains_key("PATH"));
    }
}
