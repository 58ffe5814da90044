//! The counting algorithms, as pure functions of `(quota, state, now, cost)`.
//!
//! Each algorithm decides one request against one key's state and returns the decision and
//! the state to store. Nothing here reads a clock or touches a store: the memory store applies
//! these functions under a lock, and the Redis store runs the same arithmetic in Lua. All
//! state is integers (microseconds, counts) so that both agree exactly.

pub mod adaptive;
pub mod bucket;
pub mod concurrency;
mod settle;
pub mod window;

use std::num::NonZeroU64;
use std::time::Duration;

use crate::clock::Timestamp;

pub use bucket::{BucketQuota, GcraState, TokenBucketState};
pub use concurrency::{ConcurrencyQuota, ConcurrencyState, LeaseId};
pub use settle::settle;
pub use window::{CalendarPeriod, SlidingState, WindowQuota, WindowState};

/// What one algorithm decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request fits.
    pub allowed: bool,
    /// The quota: requests per window, or the bucket's capacity.
    pub limit: u64,
    /// What is left after this request (before it, when rejected).
    pub remaining: u64,
    /// How long until the quota is whole again (the window ends, the bucket refills).
    pub reset: Duration,
    /// When rejected: how long until the same request would fit, if nothing else happens.
    /// `None` when it never can (its cost is larger than the whole quota) or when allowed.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// The share of the quota in use after this decision, in percent (0–100).
    pub fn used_percent(&self) -> u64 {
        let used = self.limit.saturating_sub(self.remaining);
        let limit = self.limit.max(1);
        match used.checked_mul(100) {
            // Every quota this side of 10^17: one 64-bit division.
            Some(hundredfold) => hundredfold / limit,
            None => (u128::from(used) * 100 / u128::from(limit)) as u64,
        }
    }
}

/// How much one limit allows, with the algorithm that counts it. Every field is valid by
/// construction: rates and windows are non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    /// `limit` per aligned window.
    FixedWindow(WindowQuota),
    /// `limit` per rolling window, estimated from two aligned windows.
    SlidingWindow(WindowQuota),
    /// A bucket of `capacity` tokens refilled continuously.
    TokenBucket(BucketQuota),
    /// The generic cell rate algorithm: a bucket kept as one timestamp.
    Gcra(BucketQuota),
    /// At most `max` requests in flight, each holding a lease that expires.
    Concurrency(ConcurrencyQuota),
    /// `limit` per UTC calendar day or month.
    Calendar {
        /// Requests (or cost units) per period.
        limit: NonZeroU64,
        /// Which calendar period.
        period: CalendarPeriod,
    },
}

impl Quota {
    /// The algorithm's name as written in policies.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Quota::FixedWindow(_) => "fixed_window",
            Quota::SlidingWindow(_) => "sliding_window",
            Quota::TokenBucket(_) => "token_bucket",
            Quota::Gcra(_) => "gcra",
            Quota::Concurrency(_) => "concurrency",
            Quota::Calendar { .. } => "quota",
        }
    }

    /// The headline figures for `RateLimit-Policy`: quota and window in seconds.
    pub fn policy(&self) -> (u64, u64) {
        match *self {
            Quota::FixedWindow(q) | Quota::SlidingWindow(q) => {
                (q.limit.get(), q.window.get().div_ceil(1_000_000))
            }
            Quota::TokenBucket(q) | Quota::Gcra(q) => (q.capacity.get(), q.fill_secs),
            Quota::Concurrency(q) => (q.max.get(), q.lease.get().div_ceil(1_000_000)),
            Quota::Calendar { limit, period } => (limit.get(), period.nominal_secs()),
        }
    }

    /// The same algorithm at another rate: `count` per `per` microseconds (Envoy's limit
    /// override). Windows keep their kind, buckets hold `count` at most; a calendar quota
    /// becomes a fixed window of `per`; concurrency is not a rate and stays.
    pub fn with_rate(self, count: NonZeroU64, per: NonZeroU64) -> Quota {
        let window = WindowQuota {
            limit: count,
            window: per,
        };
        match self {
            Quota::FixedWindow(_) | Quota::Calendar { .. } => Quota::FixedWindow(window),
            Quota::SlidingWindow(_) => Quota::SlidingWindow(window),
            Quota::TokenBucket(_) => Quota::TokenBucket(BucketQuota::new(count, count, per)),
            Quota::Gcra(_) => Quota::Gcra(BucketQuota::new(count, count, per)),
            Quota::Concurrency(_) => self,
        }
    }

    /// One node's share of the quota when `nodes` nodes count alone (the `local` store-error
    /// mode): amounts divided by `nodes`, rounded down but at least 1, and rates divided by
    /// `nodes`. Rounding down means the nodes together never admit more than the quota,
    /// unless it is smaller than the number of nodes.
    pub fn share(self, nodes: NonZeroU64) -> Quota {
        let n = nodes.get();
        if n == 1 {
            return self;
        }
        let part = |v: NonZeroU64| NonZeroU64::new(v.get() / n).unwrap_or(NonZeroU64::MIN);
        match self {
            Quota::FixedWindow(q) => Quota::FixedWindow(WindowQuota {
                limit: part(q.limit),
                ..q
            }),
            Quota::SlidingWindow(q) => Quota::SlidingWindow(WindowQuota {
                limit: part(q.limit),
                ..q
            }),
            Quota::TokenBucket(q) | Quota::Gcra(q) => {
                let period = q.period.saturating_mul(nodes);
                let shared = BucketQuota::new(part(q.capacity), q.count, period);
                if matches!(self, Quota::Gcra(_)) {
                    Quota::Gcra(shared)
                } else {
                    Quota::TokenBucket(shared)
                }
            }
            Quota::Concurrency(q) => Quota::Concurrency(ConcurrencyQuota {
                max: part(q.max),
                ..q
            }),
            Quota::Calendar { limit, period } => Quota::Calendar {
                limit: part(limit),
                period,
            },
        }
    }
}

/// One key's stored state; which variant depends on the algorithm. As JSON (the admin API):
/// `{"kind": "window", "start": …, "count": …}`, times in microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum State {
    /// Fixed windows and calendar quotas.
    Window(WindowState),
    /// Sliding windows.
    Sliding(SlidingState),
    /// Token buckets.
    TokenBucket(TokenBucketState),
    /// GCRA.
    Gcra(GcraState),
    /// Concurrency leases.
    Concurrency(ConcurrencyState),
}

/// The result of deciding: the decision, the state to store, and when that state stops
/// mattering (a key whose state has expired is the same as a key never seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// The state to store if the request is admitted.
    pub state: State,
    /// When the stored state may be forgotten.
    pub expires_at: Timestamp,
}

/// A window's time for a request at `now` against a state counted from `start`: a request
/// stamped before the window its key is already counting in (another node's clock a little
/// behind, or a request that waited in a batch across the boundary) is decided in that
/// window — never by starting the earlier window again, which would forget what the later
/// one counted.
fn not_before(now: Timestamp, start: Option<u64>) -> Timestamp {
    match start {
        Some(start) if start > now.as_micros() => Timestamp::from_micros(start),
        _ => now,
    }
}

/// Decides one request of weight `cost` against `state` (`None`: never seen or expired).
///
/// `lease` identifies the request for concurrency limits, so that it can be released.
/// A state of another algorithm's kind (the policy changed) counts as absent.
pub fn decide(
    quota: &Quota,
    state: Option<&State>,
    now: Timestamp,
    cost: u64,
    lease: LeaseId,
) -> Outcome {
    match quota {
        Quota::FixedWindow(q) => {
            let state = match state {
                Some(State::Window(s)) => Some(s),
                _ => None,
            };
            let now = not_before(now, state.map(|s| s.start));
            let (start, end) = q.bounds(now);
            window::fixed(q.limit.get(), start, end, state, now, cost)
        }
        Quota::Calendar { limit, period } => {
            let state = match state {
                Some(State::Window(s)) => Some(s),
                _ => None,
            };
            let now = not_before(now, state.map(|s| s.start));
            let (start, end) = period.bounds(now);
            window::fixed(limit.get(), start, end, state, now, cost)
        }
        Quota::SlidingWindow(q) => {
            let state = match state {
                Some(State::Sliding(s)) => Some(s),
                _ => None,
            };
            let now = not_before(now, state.map(|s| s.start));
            window::sliding(q, state, now, cost)
        }
        Quota::TokenBucket(q) => {
            let state = match state {
                Some(State::TokenBucket(s)) => Some(s),
                _ => None,
            };
            bucket::token_bucket(q, state, now, cost)
        }
        Quota::Gcra(q) => {
            let state = match state {
                Some(State::Gcra(s)) => Some(s),
                _ => None,
            };
            bucket::gcra(q, state, now, cost)
        }
        Quota::Concurrency(q) => {
            let state = match state {
                Some(State::Concurrency(s)) => Some(s),
                _ => None,
            };
            concurrency::acquire(q, state, now, lease)
        }
    }
}

/// Microseconds to a `Duration`.
pub(crate) fn us(micros: u64) -> Duration {
    Duration::from_micros(micros)
}

/// Saturating conversion after 128-bit arithmetic.
pub(crate) fn clamp_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}
