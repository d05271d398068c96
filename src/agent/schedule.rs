//! Cron schedules for the agent, evaluated in UTC.
//!
//! Standard five-field cron (`minute hour day-of-month month day-of-week`,
//! Vixie semantics: day-of-month and day-of-week are OR-ed) with an optional
//! leading seconds field (`*/5 * * * * *`: every five seconds) and the
//! `@hourly`-style nicknames. Parsing is croner's.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// A parsed cron schedule.
#[derive(Clone)]
pub struct Schedule {
    pattern: String,
    cron: Cron,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Schedule").field(&self.pattern).finish()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl Schedule {
    /// Parses a cron pattern.
    ///
    /// # Errors
    /// A pattern croner does not accept, or one that never fires.
    pub fn parse(pattern: &str) -> Result<Self> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(pattern.trim())
            .map_err(|e| {
                Error::Unsupported(format!(
                    "invalid cron schedule {pattern:?}: {e}; use five fields \
                     (minute hour day-of-month month day-of-week, UTC), e.g. \"17 */4 * * *\", or six \
                     with a leading seconds field"
                ))
            })?;
        let schedule = Self {
            pattern: pattern.trim().to_owned(),
            cron,
        };
        if schedule.next_after(OffsetDateTime::now_utc()).is_none() {
            return Err(Error::Unsupported(format!(
                "the cron schedule {pattern:?} never fires"
            )));
        }
        Ok(schedule)
    }

    /// The first time strictly after `t` that the schedule fires.
    #[must_use]
    pub fn next_after(&self, t: OffsetDateTime) -> Option<OffsetDateTime> {
        let nanos = i64::try_from(t.unix_timestamp_nanos()).ok()?;
        let start: DateTime<Utc> = DateTime::from_timestamp_nanos(nanos);
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        let nanos = next.timestamp_nanos_opt()?;
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos)).ok()
    }

    /// The longest gap between two consecutive firings over the next 64
    /// (at least one day of them): what "on time" means for an alert.
    #[must_use]
    pub fn expected_interval(&self, from: OffsetDateTime) -> Option<Duration> {
        let mut prev = self.next_after(from)?;
        let horizon = prev + time::Duration::days(1);
        let mut longest = time::Duration::ZERO;
        for i in 0..10_000 {
            let next = self.next_after(prev)?;
            longest = longest.max(next - prev);
            prev = next;
            if i >= 64 && prev >= horizon {
                break;
            }
        }
        Duration::try_from(longest).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn five_and_six_fields() {
        let s = Schedule::parse("17 */4 * * *").unwrap();
        let t = datetime!(2026-11-28 09:30:00 UTC);
        assert_eq!(s.next_after(t), Some(datetime!(2026-11-28 12:17:00 UTC)));
        assert_eq!(
            s.next_after(datetime!(2026-11-28 12:17:00 UTC)),
            Some(datetime!(2026-11-28 16:17:00 UTC))
        );
        assert_eq!(s.expected_interval(t), Some(Duration::from_secs(4 * 3600)));

        let fast = Schedule::parse("*/5 * * * * *").unwrap();
        assert_eq!(
            fast.next_after(datetime!(2026-11-28 09:30:02.5 UTC)),
            Some(datetime!(2026-11-28 09:30:05 UTC))
        );
        assert_eq!(fast.expected_interval(t), Some(Duration::from_secs(5)));

        let weekdays = Schedule::parse("0 9 * * MON-FRI").unwrap();
        assert_eq!(
            weekdays.expected_interval(t),
            Some(Duration::from_secs(3 * 86_400)),
            "the weekend gap"
        );
        assert!(Schedule::parse("@daily").is_ok());
        let err = Schedule::parse("every day").unwrap_err();
        assert!(err.to_string().contains("five fields"), "{err}");
        assert!(Schedule::parse("61 * * * *").is_err());
    }
}
