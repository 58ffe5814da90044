//! Buckets: the token bucket and GCRA, two ways of keeping the same continuous refill.

use std::num::NonZeroU64;

use super::{Decision, Outcome, State, clamp_u64, us};
use crate::clock::Timestamp;

/// A bucket of `capacity` that refills `count` units every `period` microseconds.
///
/// Build it with [`BucketQuota::new`], which reduces the rate to lowest terms so that the
/// scaled arithmetic stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketQuota {
    /// The most that can be spent at once (the burst).
    pub capacity: NonZeroU64,
    /// Units added per period.
    pub count: NonZeroU64,
    /// The period, in microseconds.
    pub period: NonZeroU64,
    /// Seconds for an empty bucket to fill, rounded up (for headers).
    pub fill_secs: u64,
}

impl BucketQuota {
    /// A bucket of `capacity` refilled at `count` per `period` microseconds.
    pub fn new(capacity: NonZeroU64, count: NonZeroU64, period: NonZeroU64) -> Self {
        let g = gcd(count.get(), period.get());
        let mut q = BucketQuota {
            capacity,
            // Dividing non-zero numbers by a common divisor leaves them non-zero.
            count: NonZeroU64::new(count.get() / g).unwrap_or(count),
            period: NonZeroU64::new(period.get() / g).unwrap_or(period),
            fill_secs: 0,
        };
        q.fill_secs = q.time_to_fill().div_ceil(1_000_000);
        q
    }

    /// GCRA's emission interval: microseconds per unit, rounded up so that GCRA never admits
    /// faster than the rate.
    pub fn emission_interval(&self) -> u64 {
        self.period.get().div_ceil(self.count.get())
    }

    /// Microseconds for an empty bucket to fill.
    pub fn time_to_fill(&self) -> u64 {
        clamp_u64(
            (u128::from(self.capacity.get()) * u128::from(self.period.get()))
                .div_ceil(u128::from(self.count.get())),
        )
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// A token bucket's level, in units of `1 / period` token, and when it was measured.
///
/// A bucket in debt — a settlement took more than it held (see [`super::settle`]) — is empty
/// with `updated` in the future: it starts refilling then, so that the debt is paid by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TokenBucketState {
    /// Tokens × `period`, so that refilling `count` per microsecond stays exact.
    pub level: u64,
    /// When `level` was measured (or, in debt, when refilling starts), microseconds since
    /// the epoch.
    pub updated: u64,
}

/// The level at `now`, in tokens × `period`: refilled since it was measured, at most full;
/// negative while a debt is being paid.
pub(crate) fn level_at(q: &BucketQuota, state: Option<&TokenBucketState>, now: u64) -> i128 {
    let rate = i128::from(q.count.get());
    let full = full(q);
    match state {
        None => full,
        Some(s) if now >= s.updated => {
            let elapsed = i128::from(now - s.updated);
            i128::from(s.level)
                .saturating_add(elapsed.saturating_mul(rate))
                .min(full)
        }
        Some(s) => i128::from(s.level) - i128::from(s.updated - now) * rate,
    }
}

/// A full bucket, in tokens × `period`.
fn full(q: &BucketQuota) -> i128 {
    i128::from(q.capacity.get()) * i128::from(q.period.get())
}

/// The state that holds `level` at `now`: a negative level as an empty bucket whose refill
/// starts when the debt is paid.
pub(crate) fn at_level(q: &BucketQuota, level: i128, now: u64) -> TokenBucketState {
    match u64::try_from(level) {
        Ok(level) => TokenBucketState {
            level,
            updated: now,
        },
        Err(_) if level > 0 => TokenBucketState {
            level: u64::MAX,
            updated: now,
        },
        Err(_) => TokenBucketState {
            level: 0,
            updated: now.saturating_add(refill_time(q, -level)),
        },
    }
}

/// Microseconds for `missing` (tokens × `period`; none when negative) to refill.
pub(crate) fn refill_time(q: &BucketQuota, missing: i128) -> u64 {
    let missing = u128::try_from(missing).unwrap_or(0);
    clamp_u64(missing.div_ceil(u128::from(q.count.get())))
}

/// Token bucket: refill since the last request, then take `cost` tokens if there are enough.
pub(crate) fn token_bucket(
    q: &BucketQuota,
    state: Option<&TokenBucketState>,
    now: Timestamp,
    cost: u64,
) -> Outcome {
    let period = i128::from(q.period.get());
    let full = full(q);
    let now_us = now.as_micros();
    let level = level_at(q, state, now_us);
    let need = i128::from(cost).saturating_mul(period);
    let allowed = level >= need;
    let (level, retry_after) = if allowed {
        (level - need, None)
    } else {
        (
            level,
            (need <= full).then(|| us(refill_time(q, need - level))),
        )
    };
    let to_full = refill_time(q, full - level);
    Outcome {
        decision: Decision {
            allowed,
            limit: q.capacity.get(),
            remaining: u64::try_from(level.max(0) / period).unwrap_or(u64::MAX),
            reset: us(to_full),
            retry_after,
        },
        state: State::TokenBucket(at_level(q, level, now_us)),
        expires_at: Timestamp::from_micros(now_us.saturating_add(to_full)),
    }
}

/// GCRA's theoretical arrival time: when the bucket would be full again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GcraState {
    /// Microseconds since the epoch.
    pub tat: u64,
}

/// GCRA (virtual scheduling): each unit pushes the theoretical arrival time one emission
/// interval `T` later; a request fits while that time stays within `capacity × T` of now.
pub(crate) fn gcra(
    q: &BucketQuota,
    state: Option<&GcraState>,
    now: Timestamp,
    cost: u64,
) -> Outcome {
    // The compiler keeps `capacity × T` below 2^53 and timestamps are below 2^53 until 2255,
    // so these sums cannot overflow; a huge `cost` saturates and is rejected.
    let t = q.emission_interval();
    let tolerance = q.capacity.get().saturating_mul(t);
    let now_us = now.as_micros();
    let tat = state.map_or(now_us, |s| s.tat).max(now_us);
    let new_tat = tat.saturating_add(cost.saturating_mul(t));
    let allowed = new_tat - now_us <= tolerance;
    let (tat, retry_after) = if allowed {
        (new_tat, None)
    } else {
        let fits = cost.saturating_mul(t) <= tolerance;
        (tat, fits.then(|| us(new_tat - now_us - tolerance)))
    };
    let ahead = tat - now_us;
    Outcome {
        decision: Decision {
            allowed,
            limit: q.capacity.get(),
            remaining: tolerance.saturating_sub(ahead) / t,
            reset: us(ahead),
            retry_after,
        },
        state: State::Gcra(GcraState { tat }),
        expires_at: Timestamp::from_micros(tat),
    }
}
