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
