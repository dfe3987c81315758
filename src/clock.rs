//! Time as a value: one Unix-milliseconds type for every role.
//!
//! Decisions take the time as an argument (`now: UnixMs`) instead of reading a clock, so they
//! can be unit-tested and replayed by the simulator. Only the edges (request handlers, loops)
//! call [`UnixMs::now`]. Milliseconds because that is what queue timestamps, report fields
//! (`sampled_at_unix_ms`) and KEDA's intervals are written in; signed because differences of
//! two readings (which may come from two machines) can be negative.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A moment as milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMs(pub i64);

impl UnixMs {
    /// The wall clock now; 0 if the clock is before 1970, `i64::MAX` past the year 292 million.
    pub fn now() -> Self {
        Self(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// The raw milliseconds, for wire formats and arithmetic with other millisecond values.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// `self + by`, saturating.
    pub fn plus(self, by: Duration) -> Self {
        Self(self.0.saturating_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX)))
    }

    /// `self + ms`, saturating (ms may be negative).
    pub const fn plus_ms(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`; negative when `earlier` is later.
    pub const fn millis_since(self, earlier: UnixMs) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The time from `earlier` to `self`, zero when `earlier` is later.
    pub(crate) fn since(self, earlier: UnixMs) -> Duration {
        Duration::from_millis(u64::try_from(self.millis_since(earlier)).unwrap_or(0))
    }
}

impl std::fmt::Display for UnixMs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_saturate_and_keep_their_sign() {
        let t = UnixMs(10_000);
        assert_eq!(t.plus(Duration::from_secs(2)), UnixMs(12_000));
        assert_eq!(t.plus_ms(-500), UnixMs(9_500));
        assert_eq!(t.millis_since(UnixMs(12_000)), -2_000);
        assert_eq!(t.since(UnixMs(12_000)), Duration::ZERO);
        assert_eq!(UnixMs(12_000).since(t), Duration::from_secs(2));
        assert_eq!(UnixMs(i64::MAX).plus_ms(1), UnixMs(i64::MAX));
    }

    #[test]
    fn now_is_after_2020() {
        assert!(UnixMs::now() > UnixMs(1_577_836_800_000));
    }
}
