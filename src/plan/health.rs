//! Health gates: what must hold after a step before the plan moves on.
//!
//! Three kinds, each with a timeout per attempt, an interval between attempts
//! and a number of retries:
//!
//! - `command`: a shell command must exit 0 (`spire-server healthcheck`, which
//!   prints "Server is healthy." and exits 0, or exits 1);
//! - `http`: a GET must answer 2xx (SPIRE's health listener answers 200 on
//!   `/live` and `/ready` and 500 otherwise, spire-reference §6);
//! - `metric`: a condition on a Prometheus text endpoint (spire-reference §7:
//!   counters have no `_total` suffix, so the names are SPIRE's own, e.g.
//!   `spire_agent_agent_svid_rotate{status="OK"}` must keep increasing, and
//!   `spire_server_rpc_agent_v1_agent_attest_agent` with `status!="OK"` must
//!   not rise). The value is the sum of every series that matches.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::file::parse_duration;
use super::template::{Quoting, Template, Vars};

/// A gate as written in a plan file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// `command`, `http` or `metric`.
    pub kind: String,
    /// A label for reports (default: the kind and target).
    pub name: Option<String>,
    /// `command`: the shell command.
    pub command: Option<String>,
    /// `http` and `metric`: the URL.
    pub url: Option<String>,
    /// `metric`: the metric name.
    pub metric: Option<String>,
    /// `metric`: labels that must equal these values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `metric`: labels that must differ from these values.
    #[serde(default)]
    pub labels_not: BTreeMap<String, String>,
    /// `metric`: `increases`, `does_not_increase`, `does_not_decrease`, or a
    /// comparison such as `>= 1`, `== 1`, `< 5`.
    pub condition: Option<String>,
    /// `metric`: how long to watch for the trend conditions (default 5s).
    pub window: Option<String>,
    /// Longest one attempt may take (default 10s).
    pub timeout: Option<String>,
    /// Pause between attempts (default 2s).
    pub interval: Option<String>,
    /// Attempts after the first one (default 10).
    pub retries: Option<u32>,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Cmp {
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Cmp {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Self::Eq => (a - b).abs() < f64::EPSILON,
            Self::Ne => (a - b).abs() >= f64::EPSILON,
            Self::Gt => a > b,
            Self::Ge => a >= b,
            Self::Lt => a < b,
            Self::Le => a <= b,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "==",
            Self::Ne => "!=",
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::Lt => "<",
            Self::Le => "<=",
        }
    }
}

/// What a metric gate checks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The value at the end of the window is above the value at its start.
    Increases,
    /// Not above (e.g. attestation errors).
    DoesNotIncrease,
    /// Not below (e.g. a count of agents).
    DoesNotDecrease,
    /// The current value compared with a number.
    Compare(Cmp, f64),
}

impl Condition {
    /// Parses a condition as written in a plan file.
    ///
    /// # Errors
    /// Anything but the trend words or `OP NUMBER`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        match t {
            "increases" => return Ok(Self::Increases),
            "does_not_increase" => return Ok(Self::DoesNotIncrease),
            "does_not_decrease" => return Ok(Self::DoesNotDecrease),
            _ => {}
        }
        let ops = [
            (">=", Cmp::Ge),
            ("<=", Cmp::Le),
            ("==", Cmp::Eq),
            ("!=", Cmp::Ne),
            (">", Cmp::Gt),
            ("<", Cmp::Lt),
        ];
        for (op, cmp) in ops {
            if let Some(rest) = t.strip_prefix(op) {
                let n: f64 = rest
                    .trim()
                    .parse()
                    .map_err(|_| format!("condition {s:?}: {:?} is not a number", rest.trim()))?;
                return Ok(Self::Compare(cmp, n));
            }
        }
        Err(format!(
            "condition {s:?}: use increases, does_not_increase, does_not_decrease, or a comparison such as \">= 1\""
        ))
    }

    fn is_trend(self) -> bool {
        !matches!(self, Self::Compare(..))
    }

    fn describe(self) -> String {
        match self {
            Self::Increases => "increases".into(),
            Self::DoesNotIncrease => "does not increase".into(),
            Self::DoesNotDecrease => "does not decrease".into(),
            Self::Compare(op, n) => format!("{} {n}", op.as_str()),
        }
    }
}

/// Which series a metric gate reads: a name and label matchers (values are templates).
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    pub metric: String,
    pub labels: Vec<(String, Template)>,
    pub labels_not: Vec<(String, Template)>,
}

impl Selector {
    /// The selector in PromQL notation, with `vars` filled in.
    #[must_use]
    pub fn render(&self, vars: &Vars) -> String {
        let mut matchers: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.render(vars, Quoting::Raw)))
            .collect();
        matchers.extend(
            self.labels_not
                .iter()
                .map(|(k, v)| format!("{k}!=\"{}\"", v.render(vars, Quoting::Raw))),
        );
        if matchers.is_empty() {
            self.metric.clone()
        } else {
            format!("{}{{{}}}", self.metric, matchers.join(","))
        }
    }
}

/// What a gate checks.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Command(Template),
    Http(Template),
    Metric {
        url: Template,
        selector: Selector,
        condition: Condition,
        window: Duration,
    },
}

/// A validated gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub name: String,
    pub check: Check,
    pub timeout: Duration,
    pub interval: Duration,
    pub retries: u32,
}

impl GateConfig {
    /// Validates the gate; `members` are the template values it will be
    /// rendered with (every placeholder must be known for each).
    ///
    /// # Errors
    /// A message naming `key` and the field at fault.
    pub fn validate(&self, key: &str, members: &[&Vars]) -> Result<Gate, String> {
        let tpl = |field: &str, v: &Option<String>| -> Result<Template, String> {
            let raw = v
                .as_deref()
                .ok_or_else(|| format!("{key}: kind = {:?} needs {field}", self.kind))?;
            let t = Template::parse(raw).map_err(|e| format!("{key}.{field}: {e}"))?;
            check_known(&t, key, field, members)?;
            Ok(t)
        };
        let forbid = |field: &str, present: bool| {
            if present {
                Err(format!(
                    "{key}.{field} does not apply to kind = {:?}",
                    self.kind
                ))
            } else {
                Ok(())
            }
        };
        let dur = |field: &str, v: &Option<String>, default: &str| {
            parse_duration(v.as_deref().unwrap_or(default))
                .map_err(|e| format!("{key}.{field}: {e}"))
        };
        let is_metric = self.kind == "metric";
        if !is_metric {
            forbid("metric", self.metric.is_some())?;
            forbid("labels", !self.labels.is_empty())?;
            forbid("labels_not", !self.labels_not.is_empty())?;
            forbid("condition", self.condition.is_some())?;
            forbid("window", self.window.is_some())?;
        }
        let (check, default_name) = match self.kind.as_str() {
            "command" => {
                forbid("url", self.url.is_some())?;
                let t = tpl("command", &self.command)?;
                let name = format!("command `{}`", t.raw());
                (Check::Command(t), name)
            }
            "http" => {
                forbid("command", self.command.is_some())?;
                let t = tpl("url", &self.url)?;
                let name = format!("GET {} is 2xx", t.raw());
                (Check::Http(t), name)
            }
            "metric" => {
                forbid("command", self.command.is_some())?;
                let url = tpl("url", &self.url)?;
                let metric = self
                    .metric
                    .clone()
                    .ok_or_else(|| format!("{key}: kind = \"metric\" needs metric (a name such as spire_agent_agent_svid_rotate)"))?;
                let valid_name = !metric.is_empty()
                    && metric
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && !metric.starts_with(|c: char| c.is_ascii_digit());
                if !valid_name {
                    return Err(format!(
                        "{key}.metric = {metric:?} is not a Prometheus metric name"
                    ));
                }
                let matchers = |field: &str, m: &BTreeMap<String, String>| {
                    m.iter()
                        .map(|(k, v)| {
                            let t = Template::parse(v)
                                .map_err(|e| format!("{key}.{field}.{k}: {e}"))?;
                            check_known(&t, key, field, members)?;
                            Ok((k.clone(), t))
                        })
                        .collect::<Result<Vec<_>, String>>()
                };
                let selector = Selector {
                    metric,
                    labels: matchers("labels", &self.labels)?,
                    labels_not: matchers("labels_not", &self.labels_not)?,
                };
                let condition = Condition::parse(self.condition.as_deref().ok_or_else(|| {
                    format!("{key}: kind = \"metric\" needs condition (increases, does_not_increase, does_not_decrease, or e.g. \">= 1\")")
                })?)
                .map_err(|e| format!("{key}.{e}"))?;
                if !condition.is_trend() && self.window.is_some() {
                    return Err(format!(
                        "{key}.window applies to the trend conditions (increases, does_not_increase, does_not_decrease) only"
                    ));
                }
                let window = dur("window", &self.window, "5s")?;
                let name = format!(
                    "{} {} at {}",
                    selector.render(&Vars::new()),
                    condition.describe(),
                    url.raw()
                );
                (
                    Check::Metric {
                        url,
                        selector,
                        condition,
                        window,
                    },
                    name,
                )
            }
            other => {
                return Err(format!(
                    "{key}.kind = {other:?}: use \"command\", \"http\" or \"metric\""
                ));
            }
        };
        Ok(Gate {
            name: self.name.clone().unwrap_or(default_name),
            check,
            timeout: dur("timeout", &self.timeout, "10s")?,
            interval: dur("interval", &self.interval, "2s")?,
            retries: self.retries.unwrap_or(10),
        })
    }
}

fn check_known(t: &Template, key: &str, field: &str, members: &[&Vars]) -> Result<(), String> {
    for vars in members {
        if let Some(p) = t.missing(vars) {
            return Err(format!(
                "{key}.{field}: unknown placeholder {{{p}}} (known: {{name}}, {{host}}, {{version}}, {{role}}, {{group}} and the member's vars)"
            ));
        }
    }
    Ok(())
}

/// The result of one gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: String,
    pub ok: bool,
    pub attempts: u32,
    /// What the last attempt saw.
    pub detail: String,
}

/// How command gates run.
#[derive(Debug, Clone, Default)]
pub struct GateEnv {
    pub shell: String,
    /// The complete environment of a gate's command
    /// ([`super::executor::child_env`]).
    pub env: BTreeMap<String, String>,
}

/// Runs one gate with its retries: passes as soon as an attempt passes.
pub async fn run_gate(gate: &Gate, vars: &Vars, env: &GateEnv) -> GateResult {
    run_gate_attempts(gate, vars, env, gate.retries.saturating_add(1)).await
}

/// Runs one gate with at most `attempts` attempts (a `plan` reads health
/// once; `apply` waits for it).
pub async fn run_gate_attempts(
    gate: &Gate,
    vars: &Vars,
    env: &GateEnv,
    attempts: u32,
) -> GateResult {
    let mut detail = String::new();
    let attempts = attempts.max(1);
    for attempt in 1..=attempts {
        match tokio::time::timeout(
            gate.timeout + window_of(gate),
            attempt_once(gate, vars, env),
        )
        .await
        {
            Ok(Ok(d)) => {
                return GateResult {
                    gate: gate.name.clone(),
                    ok: true,
                    attempts: attempt,
                    detail: d,
                };
            }
            Ok(Err(d)) => detail = d,
            Err(_) => detail = format!("no answer within {}", human_duration(gate.timeout)),
        }
        tracing::debug!(gate = %gate.name, attempt, %detail, "gate not passed yet");
        if attempt < attempts {
            tokio::time::sleep(gate.interval).await;
        }
    }
    GateResult {
        gate: gate.name.clone(),
        ok: false,
        attempts,
        detail,
    }
}

fn window_of(gate: &Gate) -> Duration {
    match &gate.check {
        Check::Metric {
            condition, window, ..
        } if condition.is_trend() => *window,
        _ => Duration::ZERO,
    }
}

/// One attempt: `Ok(what was seen)` or `Err(why not)`.
async fn attempt_once(gate: &Gate, vars: &Vars, env: &GateEnv) -> Result<String, String> {
    match &gate.check {
        Check::Command(t) => {
            let cmd = t.render(vars, Quoting::Shell);
            let mut c = tokio::process::Command::new(&env.shell);
            // the whole environment is given: nothing of spirekeep's own leaks
            c.arg("-c")
                .arg(&cmd)
                .env_clear()
                .envs(&env.env)
                .kill_on_drop(true);
            c.stdin(std::process::Stdio::null());
            let out = c
                .output()
                .await
                .map_err(|e| format!("cannot run {}: {e}", env.shell))?;
            let text = tail(&format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            if out.status.success() {
                Ok(if text.is_empty() {
                    "exit 0".into()
                } else {
                    text
                })
            } else {
                Err(format!("{}: {text}", describe_status(out.status)))
            }
        }
        Check::Http(t) => {
            let url = t.render(vars, Quoting::Raw);
            let (status, body) = http_get(&url, gate.timeout).await?;
            if (200..300).contains(&status) {
                Ok(format!("HTTP {status}"))
            } else {
                Err(format!("HTTP {status}: {}", tail(&body)))
            }
        }
        Check::Metric {
            url,
            selector,
            condition,
            window,
        } => {
            let url = url.render(vars, Quoting::Raw);
            let shown = selector.render(vars);
            let read = || async {
                let (status, body) = http_get(&url, gate.timeout).await?;
                if !(200..300).contains(&status) {
                    return Err(format!("{url} answered HTTP {status}"));
                }
                Ok::<_, String>(sum_matching(&body, selector, vars))
            };
            match condition {
                Condition::Compare(op, n) => {
                    let v = read()
                        .await?
                        .ok_or_else(|| format!("no series matches {shown} at {url}"))?;
                    if op.holds(v, *n) {
                        Ok(format!("{shown} = {v}"))
                    } else {
                        Err(format!("{shown} = {v}, wanted {} {n}", op.as_str()))
                    }
                }
                trend => {
                    let before = read().await?.unwrap_or(0.0);
                    let t0 = Instant::now();
                    tokio::time::sleep(*window).await;
                    let after = read().await?.unwrap_or(0.0);
                    let ok = match trend {
                        Condition::Increases => after > before,
                        Condition::DoesNotIncrease => after <= before,
                        _ => after >= before,
                    };
                    let seen = format!(
                        "{shown} went from {before} to {after} in {}",
                        human_duration(t0.elapsed())
                    );
                    if ok {
                        Ok(seen)
                    } else {
                        Err(format!(
                            "{seen}; wanted it to {}",
                            match trend {
                                Condition::Increases => "increase",
                                Condition::DoesNotIncrease => "stay at or below where it was",
                                _ => "stay at or above where it was",
                            }
                        ))
                    }
                }
            }
        }
    }
}

/// A GET with a timeout: (status, body).
async fn http_get(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    let status = resp.status().as_u16();
    let body = resp
        .text()
        .await
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    Ok((status, body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The sum of every sample of `selector` in Prometheus text; `None` when no
/// series matches.
#[must_use]
pub fn sum_matching(text: &str, selector: &Selector, vars: &Vars) -> Option<f64> {
    let want: Vec<(&str, String)> = selector
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.render(vars, Quoting::Raw)))
        .collect();
    let not: Vec<(&str, String)> = selector
        .labels_not
        .iter()
        .map(|(k, v)| (k.as_str(), v.render(vars, Quoting::Raw)))
        .collect();
    let mut sum = None;
    for sample in parse_samples(text) {
        if sample.name != selector.metric {
            continue;
        }
        let label = |k: &str| {
            sample
                .labels
                .iter()
                .find(|(n, _)| n == k)
                .map_or("", |(_, v)| v.as_str())
        };
        let matches =
            want.iter().all(|(k, v)| label(k) == v) && not.iter().all(|(k, v)| label(k) != v);
        if matches {
            sum = Some(sum.unwrap_or(0.0) + sample.value);
        }
    }
    sum
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (comments skipped, label
/// values unescaped, optional timestamps ignored). Malformed lines are skipped.
#[must_use]
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    if name_end == 0 {
        return None; // no metric name (found by fuzzing: `{a="b"} 1`)
    }
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            // skip separators
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = *i;
                    break;
                }
                None => return None,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => return None,
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return None;
            }
            labels.push((key.trim().to_owned(), value));
        }
        rest = &inner[end + 1..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn describe_status(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exit {c}"),
        None => "killed by a signal".into(),
    }
}

/// The last few hundred characters of some output, on one line.
#[must_use]
pub fn tail(s: &str) -> String {
    let s = s.trim();
    let start = s.char_indices().rev().nth(400).map_or(0, |(i, _)| i);
    s[start..].replace('\n', " | ")
}

/// `1.2s`, `350ms`, `2m05s`.
#[must_use]
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP spire_agent_agent_svid_rotate spire_agent_agent_svid_rotate
# TYPE spire_agent_agent_svid_rotate counter
spire_agent_agent_svid_rotate{host="agent-1",status="OK"} 12
spire_agent_agent_svid_rotate{host="agent-1",status="Unavailable"} 3
spire_server_started{host="s",trust_domain_id="spiffe://example.org",version="1.15.3"} 1
spire_server_rpc_agent_v1_agent_attest_agent{status="Internal"} 2 1700000000000
spire_server_rpc_agent_v1_agent_attest_agent{status="OK"} 1e+06
weird{a="x\"y,z}",b="2"} +Inf
spire_server_uptime_in_ms 5
"#;

    fn sel(metric: &str, labels: &[(&str, &str)], not: &[(&str, &str)]) -> Selector {
        let t = |v: &str| Template::parse(v).unwrap();
        Selector {
            metric: metric.into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), t(v))).collect(),
            labels_not: not.iter().map(|(k, v)| ((*k).into(), t(v))).collect(),
        }
    }

    #[test]
    fn parses_spire_metrics() {
        let samples = parse_samples(TEXT);
        assert_eq!(samples.len(), 7);
        assert_eq!(samples[5].labels[0], ("a".into(), "x\"y,z}".into()));
        assert!(samples[5].value.is_infinite());
        let v = Vars::new().with("version", "1.15.3");
        assert_eq!(
            sum_matching(TEXT, &sel("spire_agent_agent_svid_rotate", &[], &[]), &v),
            Some(15.0)
        );
        assert_eq!(
            sum_matching(
                TEXT,
                &sel("spire_agent_agent_svid_rotate", &[("status", "OK")], &[]),
                &v
            ),
            Some(12.0)
        );
        assert_eq!(
            sum_matching(
                TEXT,
                &sel(
                    "spire_server_rpc_agent_v1_agent_attest_agent",
                    &[],
                    &[("status", "OK")]
                ),
                &v
            ),
            Some(2.0)
        );
        assert_eq!(
            sum_matching(
                TEXT,
                &sel("spire_server_started", &[("version", "{version}")], &[]),
                &v
            ),
            Some(1.0)
        );
        assert_eq!(
            sum_matching(
                TEXT,
                &sel("spire_server_started", &[("version", "1.14.7")], &[]),
                &v
            ),
            None
        );
        assert_eq!(
            sum_matching(TEXT, &sel("spire_server_uptime_in_ms", &[], &[]), &v),
            Some(5.0)
        );
        assert_eq!(
            sel(
                "spire_server_started",
                &[("version", "{version}")],
                &[("host", "x")]
            )
            .render(&v),
            "spire_server_started{version=\"1.15.3\",host!=\"x\"}"
        );
    }

    #[test]
    fn conditions() {
        assert_eq!(
            Condition::parse(">= 1").unwrap(),
            Condition::Compare(Cmp::Ge, 1.0)
        );
        assert_eq!(
            Condition::parse("==1").unwrap(),
            Condition::Compare(Cmp::Eq, 1.0)
        );
        assert_eq!(Condition::parse("increases").unwrap(), Condition::Increases);
        assert!(Condition::parse("rises").is_err());
        assert!(Condition::parse("> x").is_err());
        assert!(Cmp::Le.holds(1.0, 1.0) && !Cmp::Lt.holds(1.0, 1.0));
    }

    #[test]
    fn gate_validation() {
        let vars = Vars::new()
            .with("name", "a")
            .with("host", "h")
            .with("version", "1.0.0");
        let g = GateConfig {
            kind: "metric".into(),
            url: Some("http://{host}:9988/metrics".into()),
            metric: Some("spire_agent_agent_svid_rotate".into()),
            labels: [("status".to_string(), "OK".to_string())].into(),
            condition: Some("increases".into()),
            ..GateConfig::default()
        };
        let gate = g.validate("agents[0].health[0]", &[&vars]).unwrap();
        assert_eq!(gate.retries, 10);
        assert!(
            gate.name
                .contains("spire_agent_agent_svid_rotate{status=\"OK\"} increases")
        );
        let bad = GateConfig {
            url: Some("http://{hots}/metrics".into()),
            ..g.clone()
        };
        let e = bad.validate("k", &[&vars]).unwrap_err();
        assert!(e.contains("{hots}"), "{e}");
        let bad = GateConfig {
            kind: "http".into(),
            ..g
        };
        let e = bad.validate("k", &[&vars]).unwrap_err();
        assert!(e.contains("k.metric does not apply"), "{e}");
    }

    #[tokio::test]
    async fn command_gates_run() {
        let env = GateEnv {
            shell: "sh".into(),
            env: crate::plan::executor::child_env(&[], &BTreeMap::new()),
        };
        let gate = |cmd: &str| Gate {
            name: "t".into(),
            check: Check::Command(Template::parse(cmd).unwrap()),
            timeout: Duration::from_secs(5),
            interval: Duration::from_millis(10),
            retries: 1,
        };
        let ok = run_gate(&gate("echo Server is healthy."), &Vars::new(), &env).await;
        assert!(ok.ok && ok.detail == "Server is healthy.", "{ok:?}");
        let bad = run_gate(&gate("echo nope >&2; exit 1"), &Vars::new(), &env).await;
        assert!(
            !bad.ok && bad.attempts == 2 && bad.detail == "exit 1: nope",
            "{bad:?}"
        );
    }

    #[test]
    fn a_sample_without_a_metric_name_is_skipped() {
        // Found by the prometheus_text fuzz target: a line starting with its
        // labels gave a sample named "".
        let samples = parse_samples("{job=\"spire\"} 3\nup{job=\"spire\"} 1\n");
        assert_eq!(samples.len(), 1, "{samples:?}");
        assert_eq!(samples[0].name, "up");
    }
}
