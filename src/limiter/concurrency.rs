//! Concurrency: at most `max` requests in flight, each holding a lease that expires if the
//! request never reports its end.

use std::num::NonZeroU64;

use super::{Decision, Outcome, State, us};
use crate::clock::Timestamp;

/// At most `max` in flight; a lease not released within `lease` microseconds lapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConcurrencyQuota {
    /// Requests in flight at once.
    pub max: NonZeroU64,
    /// How long a lease lasts when never released, in microseconds.
    pub lease: NonZeroU64,
}

/// Identifies one request's lease so that it can be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct LeaseId(pub u64);

/// A lease id in JSON (`/v1/release`): an integer below 2^53, as every id the engine hands
/// out is, written with or without a fractional part of zero.
impl<'de> serde::Deserialize<'de> for LeaseId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::json::integer(d, crate::json::MAX_SAFE_INTEGER).map(LeaseId)
    }
}

/// The leases held on one key.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ConcurrencyState {
    /// `(lease, expires_at)` pairs, microseconds since the epoch.
    pub leases: Vec<(LeaseId, u64)>,
}

/// Takes a lease if fewer than `max` live leases are held.
pub(crate) fn acquire(
    q: &ConcurrencyQuota,
    state: Option<&ConcurrencyState>,
    now: Timestamp,
    lease: LeaseId,
) -> Outcome {
    let now_us = now.as_micros();
    let mut leases: Vec<(LeaseId, u64)> = state
        .map(|s| {
            s.leases
                .iter()
                .copied()
                .filter(|(_, exp)| *exp > now_us)
                .collect()
        })
        .unwrap_or_default();
    let max = q.max.get();
    let held = leases.len() as u64;
    let allowed = held < max;
    let retry_after = if allowed {
        leases.push((lease, now_us.saturating_add(q.lease.get())));
        None
    } else {
        leases.iter().map(|(_, exp)| exp - now_us).min().map(us)
    };
    let held = leases.len() as u64;
    let last = leases.iter().map(|(_, exp)| *exp).max().unwrap_or(now_us);
    Outcome {
        decision: Decision {
            allowed,
            limit: max,
            remaining: max.saturating_sub(held),
            reset: us(last - now_us),
            retry_after,
        },
        state: State::Concurrency(ConcurrencyState { leases }),
        expires_at: Timestamp::from_micros(last),
    }
}

/// Gives a lease back; expired leases are dropped on the way. Returns the new state and
/// when it expires, or `None` when no lease is left.
pub fn release(
    state: &ConcurrencyState,
    lease: LeaseId,
    now: Timestamp,
) -> Option<(ConcurrencyState, Timestamp)> {
    let now_us = now.as_micros();
    let leases: Vec<(LeaseId, u64)> = state
        .leases
        .iter()
        .copied()
        .filter(|(id, exp)| *id != lease && *exp > now_us)
        .collect();
    let last = leases.iter().map(|(_, exp)| *exp).max()?;
    Some((ConcurrencyState { leases }, Timestamp::from_micros(last)))
}
