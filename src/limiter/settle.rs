//! Settling a reservation: what a request really used, known after its response.
//!
//! A limit whose cost comes from the response counts a reservation at admission. When the
//! request completes, the difference — what it used minus what it reserved — is settled on
//! the same key: a refund when it used less, a debt when it used more. A debt may take the
//! counter past its quota; later requests are then refused until time pays it (a window
//! rolls, a bucket refills, GCRA's TAT moves back within reach).
//!
//! Where a settlement lands:
//! - **Windows** (fixed, calendar, sliding): in the window the reservation was counted in
//!   while that window still counts (for a sliding window, also while it is the previous
//!   one, whose count still weighs). Once it no longer counts, a refund has nothing left to
//!   give back and is dropped, and a debt is charged to the current window: usage is never
//!   forgotten.
//! - **Token bucket**: the level moves by the difference; a refund fills at most to
//!   capacity, a debt takes the level below zero (kept as a refill that starts later, see
//!   [`TokenBucketState`]).
//! - **GCRA**: the TAT moves by the difference's emission intervals; a refund never moves it
//!   before now.
//! - **Concurrency** holds leases, not amounts: nothing to settle.
//!
//! The Redis store runs the same arithmetic in `settle.lua`.

use super::bucket::{at_level, level_at, refill_time};
use super::window::{SlidingState, WindowState, rolled};
use super::{GcraState, Quota, State, TokenBucketState};
use crate::clock::Timestamp;

/// The state after settling `delta` (used − reserved, in cost units) on a key whose
/// reservation was counted at `counted_at`, and when that state may be forgotten; `None`
/// when nothing changes.
pub fn settle(
    quota: &Quota,
    state: Option<&State>,
    now: Timestamp,
    counted_at: Timestamp,
    delta: i64,
) -> Option<(State, Timestamp)> {
    if delta == 0 {
        return None;
    }
    match quota {
        Quota::FixedWindow(q) => {
            let window = |t: Timestamp| q.bounds(t);
            fixed(window(counted_at), window(now), state, delta)
        }
        Quota::Calendar { period, .. } => {
            fixed(period.bounds(counted_at), period.bounds(now), state, delta)
        }
        Quota::SlidingWindow(q) => {
            let w = q.window.get();
            let (start, end) = q.bounds(now);
            let (counted, _) = q.bounds(counted_at);
            let state = match state {
                Some(State::Sliding(s)) => Some(s),
                _ => None,
            };
            let (mut previous, mut current) = rolled(state, start, w);
            if counted == start {
                current = add(current, delta);
            } else if counted.saturating_add(w) == start {
                previous = add(previous, delta);
            } else if delta > 0 {
                current = add(current, delta);
            } else {
                return None;
            }
            let state = State::Sliding(SlidingState {
                start,
                previous,
                current,
            });
            Some((state, Timestamp::from_micros(end.saturating_add(w))))
        }
        Quota::TokenBucket(q) => {
            let state = match state {
                Some(State::TokenBucket(s)) => Some(s),
                _ => None,
            };
            let t = now.as_micros();
            let period = i128::from(q.period.get());
            let full = i128::from(q.capacity.get()) * period;
            let level = (level_at(q, state, t) - i128::from(delta) * period).min(full);
            let settled: TokenBucketState = at_level(q, level, t);
            let expires = t.saturating_add(refill_time(q, full - level));
            Some((State::TokenBucket(settled), Timestamp::from_micros(expires)))
        }
        Quota::Gcra(q) => {
            let t = now.as_micros();
            let tat = match state {
                Some(State::Gcra(s)) => s.tat.max(t),
                _ => t,
            };
            let shift = delta.unsigned_abs().saturating_mul(q.emission_interval());
            let tat = if delta > 0 {
                tat.saturating_add(shift)
            } else if tat == t {
                return None;
            } else {
                tat.saturating_sub(shift).max(t)
            };
            Some((State::Gcra(GcraState { tat }), Timestamp::from_micros(tat)))
        }
        Quota::Concurrency(_) => None,
    }
}

/// A fixed window's settlement: `counted` is the window of the reservation, `current` the
/// window at the settlement's time, both `(start, end)` in microseconds.
fn fixed(
    counted: (u64, u64),
    current: (u64, u64),
    state: Option<&State>,
    delta: i64,
) -> Option<(State, Timestamp)> {
    let (start, end) = if counted == current {
        counted
    } else if delta > 0 {
        current
    } else {
        return None;
    };
    let count = match state {
        Some(State::Window(s)) if s.start == start => s.count,
        _ => 0,
    };
    let state = State::Window(WindowState {
        start,
        count: add(count, delta),
    });
    Some((state, Timestamp::from_micros(end)))
}

/// `count + delta`, at least 0 and at most `u64::MAX`.
fn add(count: u64, delta: i64) -> u64 {
    if delta >= 0 {
        count.saturating_add(delta.unsigned_abs())
    } else {
        count.saturating_sub(delta.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use super::*;
    use crate::limiter::{BucketQuota, CalendarPeriod, LeaseId, WindowQuota, decide};

    const T0: u64 = 1_700_006_400_000_000;

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_micros(T0 + ms * 1_000)
    }

    /// Admits `cost` at `ms`, returning the state (panics when refused).
    fn admit(quota: &Quota, state: Option<State>, ms: u64, cost: u64) -> State {
        let outcome = decide(quota, state.as_ref(), at(ms), cost, LeaseId(1));
        assert!(outcome.decision.allowed, "{cost} at {ms} ms refused");
        outcome.state
    }

    fn allowed(quota: &Quota, state: &State, ms: u64, cost: u64) -> bool {
        decide(quota, Some(state), at(ms), cost, LeaseId(1))
            .decision
            .allowed
    }

    fn settled(quota: &Quota, state: &State, ms: u64, counted_ms: u64, delta: i64) -> State {
        settle(quota, Some(state), at(ms), at(counted_ms), delta)
            .expect("a change")
            .0
    }

    #[test]
    fn a_window_refund_gives_back_room_in_the_window_it_was_counted_in() {
        let q = Quota::FixedWindow(WindowQuota {
            limit: nz(100),
            window: nz(60_000_000),
        });
        let s = admit(&q, None, 0, 100);
        assert!(!allowed(&q, &s, 10, 1));
        let s = settled(&q, &s, 20, 0, -30);
        assert_eq!(
            s,
            State::Window(WindowState {
                start: window_start(&q, 0),
                count: 70
            })
        );
        assert!(allowed(&q, &s, 30, 30));
        assert!(!allowed(&q, &s, 30, 31));
        // Once the window has rolled, a refund has nothing to give back.
        assert_eq!(settle(&q, Some(&s), at(60_000), at(0), -10), None);
    }

    fn window_start(q: &Quota, ms: u64) -> u64 {
        match q {
            Quota::FixedWindow(w) => w.bounds(at(ms)).0,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_window_debt_passes_the_quota_and_refuses_until_the_window_rolls() {
        let q = Quota::FixedWindow(WindowQuota {
            limit: nz(100),
            window: nz(60_000_000),
        });
        let s = admit(&q, None, 0, 10);
        let s = settled(&q, &s, 1_000, 0, 150);
        let State::Window(w) = &s else { panic!() };
        assert_eq!(w.count, 160);
        assert!(!allowed(&q, &s, 2_000, 1));
        assert!(allowed(&q, &s, 60_000, 100), "the next window is whole");
        // A debt known after its window ended is charged to the current one.
        let s = settled(&q, &s, 61_000, 0, 40);
        assert!(allowed(&q, &s, 62_000, 60));
        assert!(!allowed(&q, &s, 62_000, 61));
    }

    #[test]
    fn a_calendar_quota_settles_in_its_day() {
        let q = Quota::Calendar {
            limit: nz(1_000),
            period: CalendarPeriod::Day,
        };
        let s = admit(&q, None, 0, 500);
        let s = settled(&q, &s, 10, 0, 600);
        assert!(!allowed(&q, &s, 20, 1));
        let s = settled(&q, &s, 30, 0, -200);
        assert!(allowed(&q, &s, 40, 100));
        assert!(!allowed(&q, &s, 40, 101));
    }

    #[test]
    fn a_sliding_window_settles_in_the_current_or_the_previous_window() {
        let q = Quota::SlidingWindow(WindowQuota {
            limit: nz(100),
            window: nz(10_000_000),
        });
        // Counted late in one window, settled early in the next: the previous count moves.
        let base = 10_000 - (T0 / 1_000) % 10_000;
        let s = admit(&q, None, base + 9_000, 100);
        let s = settled(&q, &s, base + 10_500, base + 9_000, -50);
        let State::Sliding(w) = &s else { panic!() };
        assert_eq!((w.previous, w.current), (50, 0));
        // Two windows on, a refund is dropped and a debt lands in the current window.
        assert_eq!(
            settle(&q, Some(&s), at(base + 30_000), at(base + 9_000), -5),
            None
        );
        let s = settled(&q, &s, base + 30_000, base + 9_000, 120);
        let State::Sliding(w) = &s else { panic!() };
        assert_eq!((w.previous, w.current), (0, 120));
        assert!(!allowed(&q, &s, base + 30_001, 1));
    }

    #[test]
    fn a_token_bucket_in_debt_refills_from_below_zero() {
        // 10 tokens, 1 token per second.
        let q = BucketQuota::new(nz(10), nz(1), nz(1_000_000));
        let quota = Quota::TokenBucket(q);
        let s = admit(&quota, None, 0, 10);
        // Used 15 more than reserved: 15 tokens owed, paid in 15 s.
        let s = settled(&quota, &s, 0, 0, 15);
        assert!(!allowed(&quota, &s, 14_999, 1));
        let outcome = decide(&quota, Some(&s), at(14_000), 1, LeaseId(1));
        assert_eq!(
            outcome.decision.retry_after,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(outcome.decision.remaining, 0);
        assert!(allowed(&quota, &s, 16_000, 1));
        // A refund fills at most to capacity.
        let s = settled(&quota, &s, 40_000, 0, -50);
        assert!(allowed(&quota, &s, 40_000, 10));
        assert!(!allowed(&quota, &s, 40_000, 11));
    }

    #[test]
    fn a_refund_pays_a_token_bucket_debt_first() {
        let q = BucketQuota::new(nz(10), nz(1), nz(1_000_000));
        let quota = Quota::TokenBucket(q);
        let s = admit(&quota, None, 0, 10);
        let s = settled(&quota, &s, 0, 0, 5);
        let s = settled(&quota, &s, 0, 0, -7);
        assert!(allowed(&quota, &s, 0, 2));
        assert!(!allowed(&quota, &s, 0, 3));
    }

    #[test]
    fn gcra_moves_its_tat_by_the_difference() {
        // 10 per second, burst 10: an emission interval of 100 ms.
        let q = BucketQuota::new(nz(10), nz(10), nz(1_000_000));
        let quota = Quota::Gcra(q);
        let s = admit(&quota, None, 0, 5);
        let s = settled(&quota, &s, 0, 0, 20);
        let State::Gcra(g) = &s else { panic!() };
        assert_eq!(g.tat, T0 + 2_500_000);
        assert!(!allowed(&quota, &s, 1_500, 1));
        assert!(allowed(&quota, &s, 1_600, 1));
        // A refund never moves the TAT before now.
        let s = settled(&quota, &s, 0, 0, -1_000);
        let State::Gcra(g) = &s else { panic!() };
        assert_eq!(g.tat, T0);
        assert_eq!(settle(&quota, Some(&s), at(0), at(0), -1), None);
    }

    #[test]
    fn nothing_to_settle_for_concurrency_or_a_zero_difference() {
        let q = Quota::Concurrency(crate::limiter::ConcurrencyQuota {
            max: nz(2),
            lease: nz(1_000_000),
        });
        assert_eq!(settle(&q, None, at(0), at(0), 5), None);
        let w = Quota::FixedWindow(WindowQuota {
            limit: nz(1),
            window: nz(1_000_000),
        });
        assert_eq!(settle(&w, None, at(0), at(0), 0), None);
    }
}
