//! Window counters: fixed windows, calendar quotas and the two-window sliding estimate.

use std::num::NonZeroU64;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};

use super::{Decision, Outcome, State, clamp_u64, us};
use crate::clock::Timestamp;

/// `limit` per `window` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowQuota {
    /// Requests (or cost units) per window.
    pub limit: NonZeroU64,
    /// The window, in microseconds.
    pub window: NonZeroU64,
}

impl WindowQuota {
    /// The aligned window containing `now`: windows start at multiples of their length since
    /// the Unix epoch, so every node agrees on them.
    pub fn bounds(&self, now: Timestamp) -> (u64, u64) {
        let w = self.window.get();
        let start = now.as_micros() - now.as_micros() % w;
        (start, start.saturating_add(w))
    }
}

/// A UTC calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarPeriod {
    /// From midnight to midnight, UTC.
    Day,
    /// From the first of the month to the first of the next, UTC.
    Month,
}

impl CalendarPeriod {
    /// The period containing `now`, as microseconds since the epoch.
    pub fn bounds(self, now: Timestamp) -> (u64, u64) {
        const DAY: u64 = 86_400_000_000;
        let t = now.as_micros();
        match self {
            CalendarPeriod::Day => {
                let start = t - t % DAY;
                (start, start + DAY)
            }
            CalendarPeriod::Month => {
                let secs = i64::try_from(t / 1_000_000).unwrap_or(i64::MAX);
                let date = DateTime::<Utc>::from_timestamp(secs, 0)
                    .map(|d| d.date_naive())
                    .unwrap_or_default();
                let first = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
                let next = first.checked_add_months(Months::new(1)).unwrap_or(first);
                (midnight_micros(first), midnight_micros(next))
            }
        }
    }

    /// A nominal length in seconds, for headers (a month counts as 30 days).
    pub fn nominal_secs(self) -> u64 {
        match self {
            CalendarPeriod::Day => 86_400,
            CalendarPeriod::Month => 30 * 86_400,
        }
    }
}

fn midnight_micros(date: NaiveDate) -> u64 {
    let secs = date
        .and_hms_opt(0, 0, 0)
        .map(|d| d.and_utc().timestamp())
        .unwrap_or(0);
    u64::try_from(secs).unwrap_or(0) * 1_000_000
}

/// The count of one fixed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WindowState {
    /// Start of the window counted, microseconds since the epoch.
    pub start: u64,
    /// What was admitted in it.
    pub count: u64,
}

/// Fixed window `[start, end)`: admit while the count plus cost stays within `limit`.
pub(crate) fn fixed(
    limit: u64,
    start: u64,
    end: u64,
    state: Option<&WindowState>,
    now: Timestamp,
    cost: u64,
) -> Outcome {
    let count = state.filter(|s| s.start == start).map_or(0, |s| s.count);
    let until_end = end.saturating_sub(now.as_micros());
    let total = count.saturating_add(cost);
    let allowed = total <= limit;
    let (count, retry_after) = if allowed {
        (total, None)
    } else {
        (count, (cost <= limit).then(|| us(until_end)))
    };
    Outcome {
        decision: Decision {
            allowed,
            limit,
            remaining: limit.saturating_sub(count),
            reset: us(until_end),
            retry_after,
        },
        state: State::Window(WindowState { start, count }),
        expires_at: Timestamp::from_micros(end),
    }
}

/// The two windows a sliding estimate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SlidingState {
    /// Start of the current window, microseconds since the epoch.
    pub start: u64,
    /// Admitted in the window before it.
    pub previous: u64,
    /// Admitted in the current window.
    pub current: u64,
}

/// The sliding window as Cloudflare describes it: the previous window's count weighted by how
/// much of it still overlaps the rolling window, plus the current window's count. The weight is
/// rounded up, so the estimate never undercounts.
pub(crate) fn sliding(
    q: &WindowQuota,
    state: Option<&SlidingState>,
    now: Timestamp,
    cost: u64,
) -> Outcome {
    let w = q.window.get();
    let limit = q.limit.get();
    let (start, end) = q.bounds(now);
    let (previous, current) = rolled(state, start, w);
    let elapsed = now.as_micros() - start;
    let estimate = weighted(previous, w - elapsed, w).saturating_add(current);
    let allowed = estimate.saturating_add(cost) <= limit;
    let (current, used, retry_after) = if allowed {
        (current + cost, estimate + cost, None)
    } else {
        let retry = sliding_retry(limit, w, start, previous, current, now.as_micros(), cost);
        (current, estimate, retry.map(us))
    };
    // The quota is whole again once nothing counted still weighs: at the window's end when
    // only the previous window holds requests, one window later when the current one does.
    let whole = if current > 0 { end + w } else { end };
    Outcome {
        decision: Decision {
            allowed,
            limit,
            remaining: limit.saturating_sub(used),
            reset: us(whole - now.as_micros()),
            retry_after,
        },
        state: State::Sliding(SlidingState {
            start,
            previous,
            current,
        }),
        expires_at: Timestamp::from_micros(end.saturating_add(w)),
    }
}

/// `ceil(count × part / whole)`, in 64 bits when the product fits.
/// A sliding window's counts `(previous, current)` as of the window starting at `start`
/// (length `w`): a state of the window before has rolled once; an older one counts nothing.
pub(crate) fn rolled(state: Option<&SlidingState>, start: u64, w: u64) -> (u64, u64) {
    match state {
        Some(s) if s.start == start => (s.previous, s.current),
        Some(s) if s.start.saturating_add(w) == start => (s.current, 0),
        _ => (0, 0),
    }
}

fn weighted(count: u64, part: u64, whole: u64) -> u64 {
    match count.checked_mul(part) {
        Some(product) => product.div_ceil(whole),
        None => clamp_u64((u128::from(count) * u128::from(part)).div_ceil(u128::from(whole))),
    }
}

/// The exact wait until a request of `cost` fits, if no other request comes.
///
/// Within the current window the estimate falls as the previous window slides out; it fits
/// once `ceil(previous × (w − e) / w) ≤ limit − cost − current`, that is once
/// `w − e ≤ floor((limit − cost − current) × w / previous)`. Failing that, in the next window
/// the current count becomes the previous one and the same reasoning applies with nothing
/// counted yet.
fn sliding_retry(
    limit: u64,
    w: u64,
    start: u64,
    previous: u64,
    current: u64,
    now: u64,
    cost: u64,
) -> Option<u64> {
    let earliest_offset = |room: u64, count: u64| -> u64 {
        if count == 0 {
            return 0;
        }
        let keep = clamp_u64(u128::from(room) * u128::from(w) / u128::from(count));
        w.saturating_sub(keep)
    };
    if let Some(room) = limit.checked_sub(cost).and_then(|r| r.checked_sub(current)) {
        let at = start + earliest_offset(room, previous);
        if at < start + w {
            return Some(at.max(now) - now);
        }
    }
    let room = limit.checked_sub(cost)?;
    Some(start + w + earliest_offset(room, current) - now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_secs(secs)
    }

    #[test]
    fn month_bounds_follow_the_calendar() {
        // 2024-02-15T12:00:00Z: February of a leap year has 29 days.
        let (start, end) = CalendarPeriod::Month.bounds(at(1_707_998_400));
        assert_eq!(start / 1_000_000, 1_706_745_600); // 2024-02-01
        assert_eq!(end / 1_000_000, 1_709_251_200); // 2024-03-01
        let (start, end) = CalendarPeriod::Month.bounds(at(1_735_603_200)); // 2024-12-31
        assert_eq!(start / 1_000_000, 1_733_011_200); // 2024-12-01
        assert_eq!(end / 1_000_000, 1_735_689_600); // 2025-01-01
    }

    #[test]
    fn day_bounds_are_utc_midnights() {
        let (start, end) = CalendarPeriod::Day.bounds(at(1_707_998_400));
        assert_eq!(start / 1_000_000, 1_707_955_200);
        assert_eq!(end - start, 86_400_000_000);
    }
}
