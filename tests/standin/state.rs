//! A member's state directory: the installed version and the fault switches.
//!
//! Everything is read once, at start, the way a real install is "the binary
//! on disk when the process started": changing a file takes effect at the
//! next (re)start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use semver::Version;

/// The files a test or `fleet.sh` writes into a member's directory.
pub const VERSION_FILE: &str = "version";
pub const FAIL_START_FILE: &str = "fail-start";
pub const UNHEALTHY_AFTER_FILE: &str = "unhealthy-after";
pub const HALF_MIGRATE_FILE: &str = "half-migrate";
pub const WRONG_VERSION_FILE: &str = "wrong-version";

/// One member's state directory.
pub struct StateDir {
    path: PathBuf,
}

/// Which migration step the `half-migrate` fault crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfMigrate {
    /// The first step this start runs (the file is empty).
    FirstStep,
    /// The step that migrates to this schema version (the file holds it).
    StepTo(i64),
}

/// The fault switches that were set when the process started.
#[derive(Debug, Default)]
pub struct Faults {
    /// `fail-start`: exit 1 at start with this message.
    pub fail_start: Option<String>,
    /// `unhealthy-after`: `/ready` and `/live` answer 500 once this much time has passed.
    pub unhealthy_after: Option<Duration>,
    /// `half-migrate`: crash in a migration step after its DDL and before the
    /// `migrations` row is written.
    pub half_migrate: Option<HalfMigrate>,
    /// `wrong-version`: the version reported instead of the installed one.
    pub wrong_version: Option<String>,
}

impl StateDir {
    /// Opens an existing state directory.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            bail!("state directory {} does not exist", path.display());
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The last component of the directory: the member's name in a fleet.
    pub fn member_name(&self) -> String {
        self.path.file_name().map_or_else(
            || "standin".to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// The trimmed content of `name`, `None` when the file does not exist.
    fn read(&self, name: &str) -> Result<Option<String>> {
        let p = self.path.join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// The installed version: the content of `<dir>/version`, plain semver
    /// such as `1.14.7` (what `spire-server --version` prints).
    pub fn installed_version(&self) -> Result<Version> {
        let Some(text) = self.read(VERSION_FILE)? else {
            bail!(
                "{} has no `version` file: no SPIRE version is installed there",
                self.path.display()
            );
        };
        Version::parse(&text).with_context(|| {
            format!(
                "{}/version holds {text:?}, not a version like 1.14.7",
                self.path.display()
            )
        })
    }

    /// Reads every fault switch.
    pub fn faults(&self) -> Result<Faults> {
        let fail_start = self.read(FAIL_START_FILE)?.map(|m| {
            if m.is_empty() {
                "the fail-start fault switch is set".to_string()
            } else {
                m
            }
        });
        let unhealthy_after = match self.read(UNHEALTHY_AFTER_FILE)? {
            None => None,
            Some(s) => {
                let secs: f64 = s
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                    .with_context(|| {
                        format!("{UNHEALTHY_AFTER_FILE} holds {s:?}, not a number of seconds")
                    })?;
                Some(Duration::from_secs_f64(secs))
            }
        };
        let half_migrate = match self.read(HALF_MIGRATE_FILE)? {
            None => None,
            Some(s) if s.is_empty() => Some(HalfMigrate::FirstStep),
            Some(s) => Some(HalfMigrate::StepTo(s.parse::<i64>().with_context(|| {
                format!(
                    "{HALF_MIGRATE_FILE} holds {s:?}: leave it empty (first step) or give the schema version the step migrates to"
                )
            })?)),
        };
        let wrong_version = self.read(WRONG_VERSION_FILE)?.filter(|s| !s.is_empty());
        Ok(Faults {
            fail_start,
            unhealthy_after,
            half_migrate,
            wrong_version,
        })
    }

    /// The version this process reports (`version` output, metrics, the
    /// version an agent tells the server): `wrong-version` when set, else the
    /// installed one.
    pub fn reported_version(&self, faults: &Faults) -> Result<String> {
        match &faults.wrong_version {
            Some(v) => Ok(v.clone()),
            None => Ok(self.installed_version()?.to_string()),
        }
    }
}

/// A fault-driven health state: healthy until `unhealthy-after` has passed.
#[derive(Debug, Clone, Copy)]
pub struct HealthClock {
    started: std::time::Instant,
    unhealthy_after: Option<Duration>,
}

impl HealthClock {
    pub fn new(unhealthy_after: Option<Duration>) -> Self {
        Self {
            started: std::time::Instant::now(),
            unhealthy_after,
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// `Some(why)` once the `unhealthy-after` fault has fired.
    pub fn fault(&self) -> Option<String> {
        let after = self.unhealthy_after?;
        (self.started.elapsed() >= after).then(|| {
            format!(
                "unhealthy-after fault: unhealthy since {:.1} s after start",
                after.as_secs_f64()
            )
        })
    }
}
