//! Logs on stderr: text for people (colour only on a terminal without
//! `NO_COLOR`), or one JSON object per line for Loki, Vector and friends.
//!
//! A JSON line holds `time` (RFC 3339, UTC), `level`, `event` (the event's
//! `event` field, else the module that logged it), `message`, the fields of
//! the event and of every span around it (`snapshot_id`, `plan_id`, `step`,
//! `duration_seconds`, ...). Nothing here redacts connection strings: they
//! never reach a log (see `ConnectionSpec::redacted`); fields whose name says
//! password, secret or token are blanked as a second line of defence.

use std::fmt;
use std::io::{IsTerminal, Write};

use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The format [`init`] installed (text before it ran).
#[must_use]
pub fn current_format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Whether text output on stderr may carry colour escapes: only on a
/// terminal, and never when `NO_COLOR` is set (to anything non-empty, as
/// no-color.org says).
#[must_use]
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. `default_level` applies to spirekeep's
/// own events; other crates log warnings only unless `SPIREKEEP_LOG` says
/// otherwise (their debug output is noise, and may quote what it should not).
pub fn init(format: LogFormat, default_level: &str) {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_env("SPIREKEEP_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,spirekeep={default_level}")));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(stderr_colour()),
            )
            .try_init(),
        LogFormat::Json => registry.with(JsonLayer).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}

/// The fields a span was created with, kept for the events inside it.
struct SpanFields(Map<String, Value>);

/// Writes each event as one JSON line on stderr.
struct JsonLayer;

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut Collect(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let line = json_line(event, &ctx);
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

fn json_line<S>(event: &Event<'_>, ctx: &Context<'_, S>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut fields = Map::new();
    if let Some(scope) = ctx.event_scope(event) {
        for span in scope.from_root() {
            if let Some(own) = span.extensions().get::<SpanFields>() {
                fields.extend(own.0.clone());
            }
        }
    }
    event.record(&mut Collect(&mut fields));
    let meta = event.metadata();
    let mut out = Map::new();
    out.insert("time".into(), Value::String(now_rfc3339()));
    out.insert(
        "level".into(),
        Value::String(meta.level().as_str().to_ascii_lowercase()),
    );
    let event_name = fields.remove("event").unwrap_or_else(|| {
        Value::String(
            meta.target()
                .strip_prefix("spirekeep::")
                .unwrap_or(meta.target())
                .replace("::", "."),
        )
    });
    out.insert("event".into(), event_name);
    if let Some(message) = fields.remove("message") {
        out.insert("message".into(), message);
    }
    out.extend(fields);
    Value::Object(out).to_string()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Whether a field's value must never be written, whatever it holds.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "credential"]
        .iter()
        .any(|s| name.contains(s))
}

struct Collect<'a>(&'a mut Map<String, Value>);

impl Collect<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let value = if is_secret(field.name()) {
            Value::String("[redacted]".into())
        } else {
            value
        };
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for Collect<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(
            field,
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number),
        );
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_field_names() {
        for name in [
            "password",
            "db_password",
            "secret_access_key",
            "token",
            "AWS_SESSION_TOKEN",
        ] {
            assert!(is_secret(name), "{name}");
        }
        for name in ["snapshot_id", "key", "table", "duration_seconds", "message"] {
            assert!(!is_secret(name), "{name}");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        let t = now_rfc3339();
        assert!(
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).is_ok(),
            "{t}"
        );
    }
}
