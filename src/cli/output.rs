//! Human versus `--json` rendering of results and errors.

use serde::Serialize;

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints an error as one line on stderr (and as JSON on stdout with `--json`).
pub(crate) fn print_error(err: &anyhow::Error, json: bool) {
    // `{:#}` joins the context chain with ": ", keeping it on one line.
    let line = format!("{err:#}").replace('\n', " ");
    if json {
        let body = serde_json::json!({ "error": line });
        println!("{body}");
    }
    eprintln!("error: {line}");
}

/// With `--log-format json`: the error as one `command_failed` log event
/// (error level), and as JSON on stdout
/// with `--json`.
pub(crate) fn print_error_json_log(err: &anyhow::Error, json: bool, code: u8, seconds: f64) {
    let line = format!("{err:#}").replace('\n', " ");
    if json {
        let body = serde_json::json!({ "error": line });
        println!("{body}");
    }
    tracing::error!(
        event = "command_failed",
        exit_code = code,
        duration_seconds = seconds,
        "{line}"
    );
}

/// A command's own failure line (it returns its exit code rather than an
/// error): `error: ...` on stderr, or a `command_failed` log event with
/// `--log-format json`.
pub(crate) fn print_failure(line: &str, code: u8) {
    if super::logging::current_format() == super::logging::LogFormat::Json {
        tracing::error!(event = "command_failed", exit_code = code, "{line}");
    } else {
        eprintln!("error: {line}");
    }
}

/// A warning that does not change the outcome: `warning: ...` on stderr,
/// or a `warning` log event with `--log-format json`.
pub(crate) fn print_warning(line: &str) {
    if super::logging::current_format() == super::logging::LogFormat::Json {
        tracing::warn!(event = "warning", "{line}");
    } else {
        eprintln!("warning: {line}");
    }
}
