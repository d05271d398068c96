//! Pause points for the fault campaigns (`scripts/kill-campaign.sh`,
//! `tests/kill_campaign.rs`): with `SPIREKEEP_TEST_PAUSE_AT=<name>` in its
//! environment, the process says on stderr that it reached `<name>` and waits
//! there until it is killed, so a SIGKILL lands exactly between two writes
//! that a random delay would rarely separate (the data objects and the
//! manifest; the staging load and the swap).
//!
//! The points, in the order a run meets them:
//!
//! | name | where |
//! |---|---|
//! | `backup.before_manifest` | every data object is stored, the manifest is not |
//! | `backup.after_manifest` | the manifest is stored, the lease not yet released |
//! | `restore.before_commit` | the staging copy is loaded and checked, the swap not begun |
//! | `restore.mid_swap` | inside the engine's swap: after the tables moved out of the staging schema, before the `COMMIT` (PostgreSQL), before the staging file's copy into the target (SQLite), between the `RENAME TABLE` and the `DROP` of the replaced tables (MySQL) |
//! | `restore.after_commit` | the swap is done, the read-back and the record not |

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that names the point to pause at.
pub const PAUSE_AT_ENV: &str = "SPIREKEEP_TEST_PAUSE_AT";

/// The line printed on stderr at a pause point (the harness waits for it).
#[must_use]
pub fn announcement(name: &str) -> String {
    format!("spirekeep: paused at {name}")
}

fn pause_at() -> Option<&'static str> {
    static PAUSE_AT: OnceLock<Option<String>> = OnceLock::new();
    PAUSE_AT
        .get_or_init(|| std::env::var(PAUSE_AT_ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// Waits forever at `name` when the environment asks for it; otherwise
/// returns at once.
pub async fn pause(name: &str) {
    if pause_at() != Some(name) {
        return;
    }
    eprintln!("{}", announcement(name));
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
