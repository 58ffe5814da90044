//! Time, injected: the only place that reads the wall clock.
//!
//! Algorithms take `now` as an argument; the engine asks its [`Clock`]. Production uses
//! [`SystemClock`]; tests use [`ManualClock`] and move time by hand, so nothing sleeps to test
//! timing.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point in time: microseconds since the Unix epoch.
///
/// Microseconds keep every counter state in integers that Redis's Lua (doubles, exact to
/// 2^53) represents exactly until the year 2255.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from microseconds since the Unix epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    /// A timestamp from seconds since the Unix epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1_000_000))
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// The time `d` later, saturating at the end of representable time.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(micros(d)))
    }

    /// The time `d` earlier, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(micros(d)))
    }

    /// How long after `earlier` this is (zero when it is not later).
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}µs)", self.0)
    }
}

/// A duration in whole microseconds, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Something that tells the time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place that reads the wall clock"
    )]
    fn now(&self) -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(micros(since_epoch))
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            micros: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.micros.fetch_add(micros(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t`.
    pub fn set(&self, t: Timestamp) {
        self.micros.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.micros.load(Ordering::SeqCst))
    }
}

/// Tokio's clock, anchored to the wall clock once: it follows `tokio::time::pause` and
/// `advance`, so async code that sleeps and counts can be tested on paused time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: tokio::time::Instant,
    epoch: Timestamp,
}

impl TokioClock {
    /// A clock reading `epoch` now and moving with tokio's time.
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place that reads tokio's clock"
    )]
    pub fn starting_at(epoch: Timestamp) -> Self {
        TokioClock {
            start: tokio::time::Instant::now(),
            epoch,
        }
    }
}

impl Clock for TokioClock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place that reads tokio's clock"
    )]
    fn now(&self) -> Timestamp {
        self.epoch
            .saturating_add(tokio::time::Instant::now().saturating_duration_since(self.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(Timestamp::from_secs(10));
        let shared = clock.clone();
        assert_eq!(clock.now(), Timestamp::from_secs(10));
        shared.advance(Duration::from_millis(1500));
        assert_eq!(clock.now().as_micros(), 11_500_000);
        clock.set(Timestamp::EPOCH);
        assert_eq!(shared.now(), Timestamp::EPOCH);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > Timestamp::from_secs(1_577_836_800));
    }
}
