//! Prometheus text exposition the way SPIRE's exporter writes it
//! (hashicorp/go-metrics Prometheus sink over client_golang, spire-reference §7):
//!
//! - names are `<prefix>_<key parts>`; counters have **no** `_total` suffix;
//! - "call counters" come as a counter `<key>{status}` plus a summary
//!   `<key>_elapsed_time{status}` in milliseconds (quantiles 0.5, 0.9, 0.99);
//! - every series carries a `host` label (SPIRE's `EnableHostnameLabel`
//!   defaults to true), and labels are sorted by name as client_golang sorts them;
//! - numbers are printed like Go's `strconv.FormatFloat(f, 'g', -1, 64)`
//!   (`1e+06`, not `1000000`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;

/// Observations a summary keeps for its quantiles.
const SUMMARY_WINDOW: usize = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Summary,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Summary => "summary",
        }
    }
}

enum Series {
    Value(f64),
    Summary {
        count: u64,
        sum: f64,
        window: VecDeque<f64>,
    },
}

struct Family {
    kind: Kind,
    series: BTreeMap<Vec<(String, String)>, Series>,
}

/// A set of metrics under one prefix (`spire_server`, `spire_agent`).
pub struct Registry {
    prefix: &'static str,
    host: Option<String>,
    families: Mutex<BTreeMap<String, Family>>,
}

impl Registry {
    /// `host`: the value of the `host` label, or `None` to leave it out
    /// (SPIRE's `EnableHostnameLabel = false`).
    pub fn new(prefix: &'static str, host: Option<String>) -> Self {
        Self {
            prefix,
            host,
            families: Mutex::new(BTreeMap::new()),
        }
    }

    fn with_series(
        &self,
        key: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        f: impl FnOnce(&mut Series),
    ) {
        let name = format!("{}_{}", self.prefix, key.replace(['.', '-'], "_"));
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        if let Some(host) = &self.host {
            labels.push(("host".into(), host.clone()));
        }
        labels.sort();
        let mut families = self
            .families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let family = families.entry(name).or_insert_with(|| Family {
            kind,
            series: BTreeMap::new(),
        });
        let series = family.series.entry(labels).or_insert_with(|| match kind {
            Kind::Counter | Kind::Gauge => Series::Value(0.0),
            Kind::Summary => Series::Summary {
                count: 0,
                sum: 0.0,
                window: VecDeque::new(),
            },
        });
        f(series);
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, key: &str, labels: &[(&str, &str)], value: f64) {
        self.with_series(key, Kind::Gauge, labels, |s| {
            if let Series::Value(v) = s {
                *v = value;
            }
        });
    }

    /// Adds to a counter (creating it at 0 first).
    pub fn add_counter(&self, key: &str, labels: &[(&str, &str)], by: f64) {
        self.with_series(key, Kind::Counter, labels, |s| {
            if let Series::Value(v) = s {
                *v += by;
            }
        });
    }

    /// Records one observation (milliseconds) in a summary.
    pub fn observe(&self, key: &str, labels: &[(&str, &str)], value: f64) {
        self.with_series(key, Kind::Summary, labels, |s| {
            if let Series::Summary { count, sum, window } = s {
                *count += 1;
                *sum += value;
                window.push_back(value);
                if window.len() > SUMMARY_WINDOW {
                    window.pop_front();
                }
            }
        });
    }

    /// A SPIRE "call counter": the counter `<key>{status}` and the summary
    /// `<key>_elapsed_time{status}`.
    pub fn call(&self, key: &str, status: &str, elapsed_ms: f64) {
        self.add_counter(key, &[("status", status)], 1.0);
        self.observe(
            &format!("{key}_elapsed_time"),
            &[("status", status)],
            elapsed_ms,
        );
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let families = self
            .families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        for (name, family) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {name}");
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.name());
            for (labels, series) in &family.series {
                match series {
                    Series::Value(v) => {
                        let _ = writeln!(
                            out,
                            "{name}{} {}",
                            render_labels(labels, None),
                            go_float(*v)
                        );
                    }
                    Series::Summary { count, sum, window } => {
                        let mut sorted: Vec<f64> = window.iter().copied().collect();
                        sorted.sort_by(f64::total_cmp);
                        for (q, pct) in [("0.5", 50), ("0.9", 90), ("0.99", 99)] {
                            let v = if sorted.is_empty() {
                                f64::NAN
                            } else {
                                sorted[(sorted.len() - 1) * pct / 100]
                            };
                            let _ = writeln!(
                                out,
                                "{name}{} {}",
                                render_labels(labels, Some(("quantile", q))),
                                go_float(v)
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{name}_sum{} {}",
                            render_labels(labels, None),
                            go_float(*sum)
                        );
                        let _ =
                            writeln!(out, "{name}_count{} {count}", render_labels(labels, None));
                    }
                }
            }
        }
        out
    }
}

fn render_labels(labels: &[(String, String)], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{}\"", escape(v)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 64)`, as client_golang prints
/// sample values: the shortest representation, in exponent form when the
/// decimal exponent is below -4 or at least 6.
pub fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f == 0.0 {
        return "0".into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..6).contains(&exp) {
        format!("{f}")
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.unsigned_abs())
    }
}
