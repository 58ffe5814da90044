//! The algorithms, table-driven and by property, on explicit time.

use std::num::NonZeroU64;
use std::time::Duration;

use proptest::prelude::*;
use tollgate::Timestamp;
use tollgate::limiter::{
    BucketQuota, CalendarPeriod, ConcurrencyQuota, LeaseId, Quota, State, WindowQuota, decide,
};

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;
/// A start time aligned to every window used here (a multiple of one day).
const T0: u64 = 1_700_006_400 * SEC;

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

fn fixed(limit: u64, window: u64) -> Quota {
    Quota::FixedWindow(WindowQuota {
        limit: nz(limit),
        window: nz(window),
    })
}

fn sliding(limit: u64, window: u64) -> Quota {
    Quota::SlidingWindow(WindowQuota {
        limit: nz(limit),
        window: nz(window),
    })
}

fn bucket(capacity: u64, count: u64, period: u64) -> BucketQuota {
    BucketQuota::new(nz(capacity), nz(count), nz(period))
}

/// One step: advance the clock by `after` µs, then a request of `cost`; expect `allowed`,
/// `remaining`, and (when rejected) `retry_after` in µs.
struct Step {
    after: u64,
    cost: u64,
    allowed: bool,
    remaining: u64,
    retry: Option<u64>,
}

const fn ok(after: u64, cost: u64, remaining: u64) -> Step {
    Step {
        after,
        cost,
        allowed: true,
        remaining,
        retry: None,
    }
}

const fn no(after: u64, cost: u64, remaining: u64, retry: Option<u64>) -> Step {
    Step {
        after,
        cost,
        allowed: false,
        remaining,
        retry,
    }
}

/// Runs the steps, keeping the state only when admitted, as the stores do.
fn run(name: &str, quota: Quota, steps: &[Step]) {
    let mut now = T0;
    let mut state: Option<State> = None;
    for (i, step) in steps.iter().enumerate() {
        now += step.after;
        let out = decide(
            &quota,
            state.as_ref(),
            Timestamp::from_micros(now),
            step.cost,
            LeaseId(i as u64),
        );
        let d = out.decision;
        assert_eq!(d.allowed, step.allowed, "{name}: step {i} allowed");
        assert_eq!(d.remaining, step.remaining, "{name}: step {i} remaining");
        assert_eq!(
            d.retry_after,
            step.retry.map(Duration::from_micros),
            "{name}: step {i} retry_after"
        );
        if d.allowed {
            state = Some(out.state);
        }
    }
}

#[test]
fn fixed_window_cases() {
    run(
        "three per second",
        fixed(3, SEC),
        &[
            ok(0, 1, 2),
            ok(100 * MS, 1, 1),
            ok(100 * MS, 1, 0),
            no(100 * MS, 1, 0, Some(700 * MS)),
            ok(700 * MS, 1, 2), // the next window
        ],
    );
    run(
        "cost counts",
        fixed(10, SEC),
        &[ok(0, 7, 3), no(0, 4, 3, Some(SEC)), ok(0, 3, 0)],
    );
    run(
        "a cost above the limit never fits",
        fixed(5, SEC),
        &[no(0, 6, 5, None), ok(0, 5, 0)],
    );
}

#[test]
fn sliding_window_cases() {
    // 10 per second; 10 admitted in the first window, then the estimate decays.
    let mut steps = vec![ok(0, 10, 0)];
    // 0.5 s into the next window: 10 × 0.5 = 5 still count, so 5 fit.
    steps.push(ok(SEC + 500 * MS, 5, 0));
    // Right after: full; the earliest fit is when ceil(10 × (1 − e)) + 5 ≤ 9, at e = 0.6 s.
    steps.push(no(0, 1, 0, Some(100 * MS)));
    steps.push(ok(100 * MS, 1, 0));
    run("weighted previous window", sliding(10, SEC), &steps);
    run(
        "two windows later, nothing counts",
        sliding(4, SEC),
        &[
            ok(0, 4, 0),
            no(0, 1, 0, Some(SEC + 250 * MS)),
            ok(2 * SEC, 4, 0),
        ],
    );
}

#[test]
fn token_bucket_cases() {
    // 1 per 100 ms, burst 3.
    run(
        "burst then refill",
        Quota::TokenBucket(bucket(3, 10, SEC)),
        &[
            ok(0, 1, 2),
            ok(0, 1, 1),
            ok(0, 1, 0),
            no(0, 1, 0, Some(100 * MS)),
            no(50 * MS, 1, 0, Some(50 * MS)),
            ok(50 * MS, 1, 0),
            ok(SEC, 3, 0),
            no(0, 4, 0, None),
        ],
    );
}

#[test]
fn gcra_cases() {
    // 1 per 100 ms, burst 2.
    run(
        "emission interval",
        Quota::Gcra(bucket(2, 10, SEC)),
        &[
            ok(0, 1, 1),
            ok(0, 1, 0),
            no(0, 1, 0, Some(100 * MS)),
            no(99 * MS, 1, 0, Some(MS)),
            ok(MS, 1, 0),
            no(0, 3, 0, None),
        ],
    );
}

#[test]
fn concurrency_leases_expire_and_release() {
    let q = Quota::Concurrency(ConcurrencyQuota {
        max: nz(2),
        lease: nz(10 * SEC),
    });
    let at = |s: u64| Timestamp::from_micros(T0 + s * SEC);
    let a = decide(&q, None, at(0), 1, LeaseId(1));
    assert!(a.decision.allowed);
    let b = decide(&q, Some(&a.state), at(1), 1, LeaseId(2));
    assert!(b.decision.allowed);
    let c = decide(&q, Some(&b.state), at(2), 1, LeaseId(3));
    assert!(!c.decision.allowed);
    assert_eq!(
        c.decision.retry_after,
        Some(Duration::from_secs(8)),
        "lease 1 lapses at 10 s"
    );
    // Lease 1 given back: room again.
    let State::Concurrency(held) = &b.state else {
        panic!("not a concurrency state")
    };
    let (released, _) = tollgate::limiter::concurrency::release(held, LeaseId(1), at(2)).unwrap();
    let d = decide(
        &q,
        Some(&State::Concurrency(released)),
        at(2),
        1,
        LeaseId(4),
    );
    assert!(d.decision.allowed);
    // Never released: both leases lapse after 10 s.
    let e = decide(&q, Some(&b.state), at(11), 1, LeaseId(5));
    assert!(e.decision.allowed);
    assert_eq!(e.decision.remaining, 1);
}

#[test]
fn calendar_quota_resets_on_the_first_of_the_month() {
    let q = Quota::Calendar {
        limit: nz(2),
        period: CalendarPeriod::Month,
    };
    // 2024-01-31T23:59:59Z, then 2024-02-01T00:00:00Z.
    let jan = Timestamp::from_secs(1_706_745_599);
    let feb = Timestamp::from_secs(1_706_745_600);
    let a = decide(&q, None, jan, 2, LeaseId(0));
    assert!(a.decision.allowed);
    let b = decide(&q, Some(&a.state), jan, 1, LeaseId(0));
    assert!(!b.decision.allowed);
    assert_eq!(b.decision.retry_after, Some(Duration::from_secs(1)));
    assert!(
        decide(&q, Some(&a.state), feb, 2, LeaseId(0))
            .decision
            .allowed
    );
}

// ─── properties ──────────────────────────────────────────────────────────────────────────

/// One of the four rate algorithms (`which` in 0..4) at `limit` per `window` µs.
fn any_quota(which: usize, limit: u64, window: u64) -> Quota {
    match which {
        0 => fixed(limit, window),
        1 => sliding(limit, window),
        2 => Quota::TokenBucket(bucket(limit, limit, window)),
        _ => Quota::Gcra(bucket(limit, limit, window)),
    }
}

fn steps() -> impl Strategy<Value = Vec<(u64, u64)>> {
    // (µs to advance, cost)
    prop::collection::vec((0u64..300_000, 1u64..4), 1..120)
}

/// Steps that keep a bucket busy: each advance is 0–150 % of one emission interval, so the
/// bucket stays near empty and any rounding in the refill shows.
fn busy_steps(count: u64, period: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    let interval = (period / count).max(1);
    prop::collection::vec((0u64..=interval * 3 / 2, 1u64..3), 50..600)
}

/// Admitted cost over a run, checked against `bound(elapsed)` after every step.
fn admitted_within(quota: Quota, steps: &[(u64, u64)], bound: impl Fn(u64) -> u128) {
    let mut now = T0;
    let mut state = None;
    let mut admitted: u128 = 0;
    for (i, (after, cost)) in steps.iter().enumerate() {
        now += after;
        let out = decide(
            &quota,
            state.as_ref(),
            Timestamp::from_micros(now),
            *cost,
            LeaseId(i as u64),
        );
        if out.decision.allowed {
            admitted += u128::from(*cost);
            state = Some(out.state);
        }
        assert!(
            admitted <= bound(now - T0),
            "admitted {admitted} > bound {} after {} µs",
            bound(now - T0),
            now - T0
        );
    }
}

proptest! {
    #[test]
    fn buckets_never_admit_more_than_burst_plus_rate(
        (capacity, count, period, steps) in (1u64..20, 1u64..50, 1u64..5_000_000)
            .prop_flat_map(|(c, n, p)| (Just(c), Just(n), Just(p), busy_steps(n, p))),
    ) {
        let q = bucket(capacity, count, period);
        let bound = |elapsed: u64| {
            u128::from(capacity) + u128::from(elapsed) * u128::from(count) / u128::from(period)
        };
        admitted_within(Quota::TokenBucket(q), &steps, bound);
        admitted_within(Quota::Gcra(q), &steps, bound);
    }

    #[test]
    fn fixed_windows_never_admit_more_than_the_limit(
        limit in 1u64..30, window_ms in 1u64..2_000, steps in steps(),
    ) {
        let q = fixed(limit, window_ms * MS);
        let mut now = T0;
        let mut state = None;
        let mut per_window = std::collections::HashMap::<u64, u64>::new();
        for (after, cost) in steps {
            now += after;
            let out = decide(&q, state.as_ref(), Timestamp::from_micros(now), cost, LeaseId(0));
            if out.decision.allowed {
                *per_window.entry(now / (window_ms * MS)).or_default() += cost;
                state = Some(out.state);
            }
        }
        prop_assert!(per_window.values().all(|n| *n <= limit));
    }

    /// Requests stamped up to 50 ms behind the clock (nodes' clocks apart, a wait in a batch
    /// across a boundary) never start an earlier window again: every window, counted by the
    /// state that holds it, admits at most the limit.
    #[test]
    fn late_requests_never_reopen_an_earlier_window(
        limit in 1u64..30, window_ms in 1u64..500, steps in steps(),
        lateness in prop::collection::vec(0u64..50_000, 600),
    ) {
        let q = fixed(limit, window_ms * MS);
        let mut now = T0;
        let mut state: Option<State> = None;
        let mut per_window = std::collections::HashMap::<u64, u64>::new();
        for (i, (after, cost)) in steps.into_iter().enumerate() {
            now += after;
            let stamped = now.saturating_sub(lateness[i % lateness.len()]).max(T0);
            let out = decide(&q, state.as_ref(), Timestamp::from_micros(stamped), cost, LeaseId(0));
            if out.decision.allowed {
                let State::Window(w) = out.state else { unreachable!() };
                prop_assert!(
                    state.as_ref().is_none_or(|s| matches!(s, State::Window(p) if p.start <= w.start)),
                    "a window never goes back"
                );
                *per_window.entry(w.start).or_default() += cost;
                state = Some(out.state);
            }
        }
        prop_assert!(per_window.values().all(|n| *n <= limit), "{per_window:?}");
    }

    #[test]
    fn retry_after_is_exact(
        which in 0usize..4, limit in 1u64..10, window_ms in 1u64..3_000, steps in steps(),
    ) {
        let quota = any_quota(which, limit, window_ms * MS);
        let mut now = T0;
        let mut state = None;
        for (after, cost) in steps {
            now += after;
            let out = decide(&quota, state.as_ref(), Timestamp::from_micros(now), cost, LeaseId(0));
            if out.decision.allowed {
                state = Some(out.state);
                continue;
            }
            // Rejected: nothing was stored, so the same request at `now + retry` fits and
            // one microsecond earlier it does not.
            let Some(retry) = out.decision.retry_after else { continue };
            let retry = u64::try_from(retry.as_micros()).unwrap();
            prop_assert!(retry > 0);
            let at = |t: u64| decide(&quota, state.as_ref(), Timestamp::from_micros(t), cost, LeaseId(0)).decision.allowed;
            prop_assert!(at(now + retry), "{} not admitted after retry_after {retry}", quota.algorithm());
            prop_assert!(!at(now + retry - 1), "{} admitted before retry_after {retry}", quota.algorithm());
        }
    }

    /// `reset` is when the quota is whole again, for every algorithm: a request for the
    /// whole quota fits then; and a rejection's `retry_after` never exceeds its `reset`, so
    /// `Retry-After` never contradicts `X-RateLimit-Reset` or the `RateLimit` field's `t`.
    #[test]
    fn reset_is_when_the_quota_is_whole_again(
        which in 0usize..4, limit in 1u64..10, window_ms in 1u64..3_000, steps in steps(),
    ) {
        let quota = any_quota(which, limit, window_ms * MS);
        let mut now = T0;
        let mut state = None;
        for (after, cost) in steps {
            now += after;
            let out = decide(&quota, state.as_ref(), Timestamp::from_micros(now), cost, LeaseId(0));
            let d = out.decision;
            if d.allowed {
                state = Some(out.state);
            }
            if let Some(retry) = d.retry_after {
                prop_assert!(retry <= d.reset, "{}: retry {retry:?} > reset {:?}", quota.algorithm(), d.reset);
            }
            let whole = now + u64::try_from(d.reset.as_micros()).unwrap();
            let full = decide(&quota, state.as_ref(), Timestamp::from_micros(whole), limit, LeaseId(0));
            prop_assert!(full.decision.allowed, "{}: the whole quota does not fit at reset", quota.algorithm());
        }
    }

    #[test]
    fn splitting_time_with_free_looks_changes_nothing(
        which in 0usize..3, capacity in 1u64..20, count in 1u64..50, period_ms in 1u64..5_000,
        steps in steps(), looks in prop::collection::vec(0u64..300_000, 1..120),
    ) {
        // The same requests, with and without zero-cost looks in between: identical decisions.
        let quota = match which {
            0 => Quota::TokenBucket(bucket(capacity, count, period_ms * MS)),
            1 => Quota::Gcra(bucket(capacity, count, period_ms * MS)),
            _ => sliding(capacity, period_ms * MS),
        };
        let (mut plain, mut split) = (None, None);
        let mut now = T0;
        for (i, (after, cost)) in steps.iter().enumerate() {
            let look = looks[i % looks.len()].min(*after);
            let mid = Timestamp::from_micros(now + look);
            let peek = decide(&quota, split.as_ref(), mid, 0, LeaseId(0));
            split = Some(peek.state);
            now += after;
            let t = Timestamp::from_micros(now);
            let a = decide(&quota, plain.as_ref(), t, *cost, LeaseId(0));
            let b = decide(&quota, split.as_ref(), t, *cost, LeaseId(0));
            prop_assert_eq!(a.decision, b.decision);
            if a.decision.allowed {
                plain = Some(a.state);
                split = Some(b.state);
            }
        }
    }
}

proptest! {
    /// `on_store_error local`: each of `nodes` nodes counts its share; together they never
    /// admit more than the quota (unless the quota is smaller than the number of nodes, when
    /// each still gets one), and a share is never zero.
    #[test]
    fn shares_of_a_quota_add_up_to_at_most_the_quota(limit in 1u64..10_000, nodes in 1u64..64) {
        let window = Quota::FixedWindow(WindowQuota { limit: nz(limit), window: nz(60_000_000) });
        let Quota::FixedWindow(share) = window.share(nz(nodes)) else {
            panic!("a share keeps its algorithm");
        };
        prop_assert!(share.limit.get() * nodes <= limit.max(nodes));
        prop_assert!(share.limit.get() * nodes > limit.saturating_sub(nodes));
        let bucket = Quota::Gcra(BucketQuota::new(nz(limit), nz(10), nz(1_000_000)));
        let Quota::Gcra(share) = bucket.share(nz(nodes)) else {
            panic!("a share keeps its algorithm");
        };
        prop_assert!(share.capacity.get() * nodes <= limit.max(nodes));
        // The rate is divided too: `nodes` shares refill no faster than the whole (10 per
        // second): nodes × count / period ≤ 10 / 1 s.
        let parts = u128::from(share.count.get()) * u128::from(nodes) * 1_000_000;
        prop_assert!(parts <= 10 * u128::from(share.period.get()));
    }
}
