//! Progress of long operations (backup, restore, verify, prune) on stderr.
//!
//! - On a terminal: a bar per table (rows, or bytes for prune) with the rate
//!   and an ETA when the total is known.
//! - Not on a terminal (cron, CI, `2> file`): one plain line per stage, no
//!   escape codes, so a log file reads top to bottom.
//! - With `--log-format json`: each stage is an `info` log event instead
//!   (`event = "stage"`), so stderr stays one JSON object per line.
//! - With `--json` (and text logs): nothing; stdout carries the result.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use super::logging::{self, LogFormat};
use crate::snapshot::listing::human_bytes;
use crate::snapshot::restore::RestoreObserver;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Bars,
    Lines,
    Events,
    Quiet,
}

impl Mode {
    /// The mode for this process: `json` is `--json`.
    pub(crate) fn detect(json: bool) -> Self {
        Self::choose(
            logging::current_format(),
            json,
            std::io::stderr().is_terminal(),
        )
    }

    fn choose(format: LogFormat, json: bool, terminal: bool) -> Self {
        match (format, json, terminal) {
            (LogFormat::Json, _, _) => Self::Events,
            (LogFormat::Text, true, _) => Self::Quiet,
            (LogFormat::Text, false, true) => Self::Bars,
            (LogFormat::Text, false, false) => Self::Lines,
        }
    }
}

/// What a bar counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unit {
    Rows,
    Bytes,
}

/// Progress for one command.
pub(crate) struct Progress {
    command: &'static str,
    mode: Mode,
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    started: Mutex<HashMap<String, Instant>>,
    /// When the last item finished: items run one after the other, so an
    /// item's time runs from its start or the previous item's end…
    last_finish: Mutex<Option<Instant>>,
    /// …unless the work on it is said to have begun ([`Self::begin`]), as a
    /// backup that copies two tables at once does.
    begun: Mutex<HashMap<String, Instant>>,
}

impl Progress {
    pub(crate) fn new(command: &'static str, json: bool) -> Self {
        Self::with_mode(command, Mode::detect(json))
    }

    pub(crate) fn with_mode(command: &'static str, mode: Mode) -> Self {
        Self {
            command,
            mode,
            multi: (mode == Mode::Bars)
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: Mutex::new(HashMap::new()),
            started: Mutex::new(HashMap::new()),
            last_finish: Mutex::new(None),
            begun: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// One line for a stage: above the bars, on its own line, or as a log event.
    pub(crate) fn stage(&self, line: &str) {
        match self.mode {
            Mode::Bars => {
                if let Some(multi) = &self.multi {
                    let _ = multi.println(line);
                }
            }
            Mode::Lines => line_to_stderr(&format!("{}: {line}", self.command)),
            Mode::Events => tracing::info!(event = "stage", "{line}"),
            Mode::Quiet => {}
        }
    }

    /// Starts counting `name` (a table, or a whole run): a bar on a terminal.
    /// `total` gives the bar a length, hence an ETA.
    pub(crate) fn start(&self, name: &str, total: Option<u64>, unit: Unit) {
        if let Ok(mut started) = self.started.lock() {
            started.insert(name.to_owned(), Instant::now());
        }
        let Some(multi) = &self.multi else { return };
        let (bar, template) = match (total, unit) {
            (Some(n), Unit::Rows) => (
                ProgressBar::new(n),
                "{prefix:<32} {bar:28} {human_pos:>11}/{human_len} rows {rate:>13} ETA {eta}",
            ),
            (Some(n), Unit::Bytes) => (
                ProgressBar::new(n),
                "{prefix:<32} {bar:28} {bytes:>11}/{total_bytes} {bytes_per_sec:>14} ETA {eta}",
            ),
            (None, Unit::Rows) => (
                ProgressBar::new_spinner(),
                "{spinner} {prefix:<30} {human_pos:>11} rows {rate:>13}",
            ),
            (None, Unit::Bytes) => (
                ProgressBar::new_spinner(),
                "{spinner} {prefix:<30} {bytes:>11} {bytes_per_sec:>14}",
            ),
        };
        let bar = multi.add(bar);
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0} rows/s", state.per_sec());
                    },
                ),
        );
        bar.set_prefix(name.to_owned());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(name.to_owned(), bar);
        }
    }

    fn bar(&self, name: &str) -> Option<ProgressBar> {
        self.bars.lock().ok()?.get(name).cloned()
    }

    /// The work on `name` begins now: its time is counted from here.
    pub(crate) fn begin(&self, name: &str) {
        if let Ok(mut begun) = self.begun.lock() {
            begun.insert(name.to_owned(), Instant::now());
        }
    }

    /// How far `name` got (rows or bytes so far).
    pub(crate) fn set(&self, name: &str, position: u64) {
        if let Some(bar) = self.bar(name) {
            bar.set_position(position);
        }
    }

    /// `name` is done: the bar finishes; without bars, one line says
    /// `summary` and how long it took.
    pub(crate) fn finish(&self, name: &str, position: u64, summary: &str) {
        let now = Instant::now();
        let started = self.started.lock().ok().and_then(|mut s| s.remove(name));
        let previous = self
            .last_finish
            .lock()
            .ok()
            .and_then(|mut last| last.replace(now));
        let begun = self.begun.lock().ok().and_then(|mut b| b.remove(name));
        let seconds = item_seconds(now, started, begun, previous);
        match self.mode {
            Mode::Bars => {
                if let Some(bar) = self.bar(name) {
                    bar.set_position(position);
                    bar.finish();
                }
            }
            Mode::Lines => line_to_stderr(&format!(
                "{}: {name}: {summary} in {seconds:.1} s",
                self.command
            )),
            Mode::Events => tracing::info!(
                event = "stage_done",
                item = name,
                count = position,
                duration_seconds = seconds,
                "{name}: {summary}"
            ),
            Mode::Quiet => {}
        }
    }

    /// Removes the bars (before the result is printed).
    pub(crate) fn clear(&self) {
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

/// Restore (and a verify's restore drill) report stages and rows per table.
impl RestoreObserver for Progress {
    fn stage(&self, stage: &str) {
        Progress::stage(self, stage);
    }

    fn table_started(&self, table: &str, rows: u64) {
        self.start(table, Some(rows), Unit::Rows);
    }

    fn rows(&self, table: &str, done: u64) {
        self.set(table, done);
    }

    fn table_done(&self, table: &str, rows: u64) {
        self.finish(table, rows, &format!("{rows} rows"));
    }
}

/// How long an item took: from when its work [began](Progress::begin) if
/// that is known, else from its start or the previous item's end, whichever
/// is later.
fn item_seconds(
    now: Instant,
    started: Option<Instant>,
    begun: Option<Instant>,
    previous: Option<Instant>,
) -> f64 {
    begun
        .or_else(|| started.map(|t| previous.map_or(t, |p| p.max(t))))
        .map_or(0.0, |t| (now - t).as_secs_f64())
}

/// Writes one line to stderr; a closed stderr (`| head`) must not stop the
/// operation half-way, as `eprintln!` would by panicking.
fn line_to_stderr(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `12 rows, 3.4 KiB` for a summary line.
pub(crate) fn rows_and_bytes(rows: u64, bytes: u64) -> String {
    format!("{rows} rows, {}", human_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tables copied at once: each one's time runs from its own
    /// beginning, not from when the other finished.
    #[test]
    fn an_item_that_began_is_timed_from_its_beginning() {
        let start = Instant::now();
        let at = |ms| start + std::time::Duration::from_millis(ms);
        // Started at 0, began at 100, the other item finished at 900, done at 1000.
        let began = item_seconds(at(1000), Some(at(0)), Some(at(100)), Some(at(900)));
        assert!((began - 0.9).abs() < 1e-9, "{began}");
        // One after the other, without a beginning: from the previous end.
        let sequential = item_seconds(at(1000), Some(at(0)), None, Some(at(900)));
        assert!((sequential - 0.1).abs() < 1e-9, "{sequential}");
        assert!(item_seconds(at(1000), None, None, None).abs() < 1e-9);
    }

    #[test]
    fn mode_follows_the_terminal_and_the_formats() {
        assert_eq!(Mode::choose(LogFormat::Text, false, true), Mode::Bars);
        assert_eq!(Mode::choose(LogFormat::Text, false, false), Mode::Lines);
        assert_eq!(Mode::choose(LogFormat::Text, true, true), Mode::Quiet);
        assert_eq!(Mode::choose(LogFormat::Text, true, false), Mode::Quiet);
        assert_eq!(Mode::choose(LogFormat::Json, false, true), Mode::Events);
        assert_eq!(Mode::choose(LogFormat::Json, true, false), Mode::Events);
    }
}
