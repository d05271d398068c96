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
}

/// The five templates of one role or agent group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commands {
    pub version: Template,
    pub upgrade: Template,
    pub rollback: Template,
    pub stop: Template,
    pub start: Template,
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
            &self.spec.env,
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
            env: self.spec.env.clone(),
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
            Action::Stop if scalable => vec![KStep::StopScale(w)],
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
            &self.spec.env,
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
            env: self.spec.env.clone(),
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

fn annotation_path() -> String {
    format!(
        "jsonpath={{.metadata.annotations.{}}}",
        REPLICAS_ANNOTATION.replace('.', "\\.")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(k.render(Action::Stop, &s, None, true).len(), 3);
        assert!(k.render(Action::Stop, &a, None, true)[0].starts_with("# "));
    }
}
