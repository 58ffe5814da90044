//! A circuit breaker on the caller's clock: after repeated failures, stop calling Redis and
//! let one call through — the probe — after a back-off that doubles up to a maximum.
//!
//! Closed: every call goes through; `failures` consecutive failures open it. Open: calls are
//! refused at once until `open_until`; the first call after that is the probe. A probe that
//! succeeds closes the breaker (recovery needs no restart); one that fails re-opens it for
//! twice as long, up to `max_backoff`. Lock-free: a few atomics per breaker.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Timestamp;

/// When the breaker opens and how it backs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// The first wait before a probe.
    pub min_backoff: Duration,
    /// The longest wait between probes.
    pub max_backoff: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// What the breaker allows for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: call.
    Call,
    /// Open and due: call as the probe, and report the outcome with `probe: true`.
    Probe,
    /// Open: do not call; fail at once.
    Refuse,
}

/// One breaker (the store keeps one per server, or per group of cluster slots).
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    failures: AtomicU32,
    /// Microseconds since the epoch until which calls are refused; 0 when closed.
    open_until: AtomicU64,
    /// The current back-off, in microseconds.
    backoff: AtomicU64,
    probing: AtomicBool,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            backoff: AtomicU64::new(micros(settings.min_backoff)),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether a call may go out at `now`.
    pub(crate) fn permit(&self, now: Timestamp) -> Permit {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            Permit::Call
        } else if now.as_micros() < until {
            Permit::Refuse
        } else if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Permit::Probe
        } else {
            Permit::Refuse
        }
    }

    /// Whether a call at `now` would be refused (open, and the probe not yet due).
    pub(crate) fn refuses(&self, now: Timestamp) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && now.as_micros() < until
    }

    /// Whether the breaker is open (calls are refused or probing).
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    /// The call answered.
    pub(crate) fn success(&self, probe: bool) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if probe || self.is_open() {
            if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                tracing::info!("the counter store answers again: circuit closed");
            }
            self.backoff
                .store(micros(self.settings.min_backoff), Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Closes the breaker and forgets the failures: what they were about is gone (Sentinel
    /// named another master).
    pub(crate) fn close(&self) {
        self.success(true);
    }

    /// The call failed at `now`.
    pub(crate) fn failure(&self, now: Timestamp, probe: bool) {
        if probe {
            let backoff = self.backoff.load(Ordering::Relaxed);
            let next = backoff
                .saturating_mul(2)
                .min(micros(self.settings.max_backoff));
            self.backoff.store(next, Ordering::Relaxed);
            self.open_until
                .store(now.as_micros().saturating_add(next), Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.settings.failures.max(1) && !self.is_open() {
            let backoff = self.backoff.load(Ordering::Relaxed);
            self.open_until
                .store(now.as_micros().saturating_add(backoff), Ordering::Release);
            tracing::warn!(
                failures,
                backoff_ms = backoff / 1000,
                "the counter store keeps failing: circuit open, limits follow on_store_error"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_micros(1_000_000_000_000 + ms * 1000)
    }

    #[test]
    fn opens_after_repeated_failures_and_probes_with_doubling_backoff() {
        let b = Breaker::new(BreakerSettings {
            failures: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        });
        b.failure(at(0), false);
        b.failure(at(1), false);
        assert_eq!(b.permit(at(2)), Permit::Call, "two failures keep it closed");
        b.failure(at(2), false);
        assert_eq!(b.permit(at(3)), Permit::Refuse);
        assert!(b.refuses(at(101)) && !b.refuses(at(102)));
        assert_eq!(b.permit(at(101)), Permit::Refuse, "open for 100 ms");
        assert_eq!(b.permit(at(102)), Permit::Probe);
        assert_eq!(b.permit(at(102)), Permit::Refuse, "one probe at a time");
        b.failure(at(110), true);
        assert_eq!(b.permit(at(309)), Permit::Refuse, "then 200 ms");
        assert_eq!(b.permit(at(310)), Permit::Probe);
        b.failure(at(310), true);
        assert_eq!(b.permit(at(659)), Permit::Refuse, "capped at 350 ms");
        assert_eq!(b.permit(at(660)), Permit::Probe);
        b.success(true);
        assert_eq!(b.permit(at(661)), Permit::Call, "a good probe closes it");
        // And the back-off starts over.
        for i in 0..3 {
            b.failure(at(700 + i), false);
        }
        assert_eq!(b.permit(at(801)), Permit::Refuse);
        assert_eq!(b.permit(at(802)), Permit::Probe);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let b = Breaker::new(BreakerSettings::default());
        b.failure(at(0), false);
        b.failure(at(1), false);
        b.success(false);
        b.failure(at(2), false);
        b.failure(at(3), false);
        assert_eq!(b.permit(at(4)), Permit::Call);
    }
}
