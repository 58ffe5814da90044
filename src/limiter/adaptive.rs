//! Adaptive limits, as pure state machines fed by what the pipeline's second phase learns of
//! each admitted request (its latency, whether it failed), on the caller's clock:
//!
//! - [`ConcurrencyLimit`]: how many requests may be in flight to an upstream, moved by one
//!   of three methods — [`Method::Gradient`] (Netflix concurrency-limits' Gradient2: the
//!   ratio of a long-term to the current latency, with a queue allowance, smoothed),
//!   [`Method::Aimd`] (additive increase while busy, multiplicative decrease on a drop or a
//!   timeout) and [`Method::Vegas`] (the queue estimated from the no-load latency);
//! - [`AdmissionControl`]: Envoy's admission control — refuse with probability
//!   `max(0, (requests − successes ÷ threshold) ÷ (requests + 1))^(1 ÷ aggression)`, capped,
//!   over a sliding window of recent outcomes.
//!
//! Nothing here reads a clock or shares state: a node keeps one per limit and feeds it.

use std::time::Duration;

use crate::clock::Timestamp;

/// How a [`ConcurrencyLimit`] moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Envoy's adaptive concurrency: the no-load latency (`min RTT`) is measured with the
    /// limit held at `min_concurrency`, again every `min_rtt_every`; between measurements,
    /// once per `interval`, the median latency of the interval gives
    /// `gradient = clamp(0.5, 2, min RTT × tolerance ÷ sample RTT)` and
    /// `new = limit × gradient + √limit` (an interval with an overload failure: 0.5), and
    /// the limit moves by `smoothing` towards it.
    Gradient {
        /// How much slower than the no-load latency requests may get (Envoy's `1 + buffer`;
        /// 1.25).
        tolerance: f64,
        /// The share of the way to the new limit taken per interval (0.2): without it the
        /// limit swings between two values around the knee.
        smoothing: f64,
        /// How often the limit moves (100 ms).
        interval: Duration,
        /// How often the no-load latency is measured again (30 s, plus up to 15 % jitter).
        min_rtt_every: Duration,
        /// How many requests the measurement takes (50).
        min_rtt_requests: u32,
        /// The limit while it measures (3).
        min_concurrency: u32,
    },
    /// Netflix's Gradient2: `gradient = clamp(0.5, 1, tolerance × long RTT ÷ short RTT)`,
    /// `new = limit × gradient + queue`, and the limit moves by `smoothing` towards it.
    Gradient2 {
        /// How much slower than the long-term latency the current one may be before the limit
        /// shrinks (Netflix's default: 1.5).
        tolerance: f64,
        /// The share of the way to the new limit taken per sample (0.2).
        smoothing: f64,
        /// Samples the long-term latency averages over (600).
        long_window: u32,
    },
    /// AIMD: `limit × backoff` on a drop or a latency past `timeout`; `limit + 1` when at
    /// least half the limit is in flight.
    Aimd {
        /// The factor a drop multiplies the limit by (0.9).
        backoff: f64,
        /// A latency past this counts as a drop.
        timeout: Duration,
    },
    /// Vegas: the queue is `limit × (1 − no-load RTT ÷ RTT)`; below `alpha` the limit grows,
    /// above `beta` it shrinks, each by `log10(limit)`.
    Vegas {
        /// Queue sizes below this grow the limit (× log10 of the limit; Netflix: 3).
        alpha: f64,
        /// Queue sizes above this shrink it (× log10 of the limit; Netflix: 6).
        beta: f64,
    },
}

/// One admitted request, as the second phase saw it end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When it ended.
    pub at: Timestamp,
    /// How long it took.
    pub latency: Duration,
    /// Requests in flight when it started (itself included).
    pub in_flight: u32,
    /// It failed the way an overloaded upstream fails (a 5xx, a timeout, a reset).
    pub dropped: bool,
}

/// A concurrency limit that follows the upstream's latency.
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyLimit {
    method: Method,
    min: f64,
    max: f64,
    limit: f64,
    /// Gradient: the no-load latency, µs; Gradient2: the long-term latency, µs (an
    /// exponential average); Vegas: the lowest seen.
    baseline: Option<f64>,
    samples: u64,
    /// Gradient: the no-load measurement under way (latencies, µs), or the interval's
    /// samples.
    measuring: Option<Vec<f64>>,
    interval: Interval,
}

/// Gradient: the interval being sampled.
#[derive(Debug, Clone, Default, PartialEq)]
struct Interval {
    /// Its end, µs (0: not started).
    ends: u64,
    latencies: Vec<f64>,
    dropped: bool,
    /// When the no-load latency is measured again, µs.
    next_min_rtt: u64,
}

impl ConcurrencyLimit {
    /// Starts at `initial`, kept within `min..=max` (`min` at least 1).
    pub fn new(method: Method, initial: u32, min: u32, max: u32) -> Self {
        let min = f64::from(min.max(1));
        let max = f64::from(max).max(min);
        ConcurrencyLimit {
            method,
            min,
            max,
            limit: f64::from(initial).clamp(min, max),
            baseline: None,
            samples: 0,
            // The gradient method measures the no-load latency first.
            measuring: matches!(method, Method::Gradient { .. }).then(Vec::new),
            interval: Interval::default(),
        }
    }

    /// The limit now: how many requests may be in flight.
    pub fn limit(&self) -> u32 {
        match (self.method, &self.measuring) {
            (
                Method::Gradient {
                    min_concurrency, ..
                },
                Some(_),
            ) => min_concurrency.max(1),
            _ => self.limit.floor() as u32,
        }
    }

    /// Takes one finished request into account.
    pub fn record(&mut self, sample: Sample) {
        self.samples += 1;
        let rtt = (sample.latency.as_micros() as f64).max(1.0);
        let in_flight = f64::from(sample.in_flight);
        let next = match self.method {
            Method::Gradient {
                tolerance,
                smoothing,
                interval,
                min_rtt_every,
                min_rtt_requests,
                min_concurrency,
            } => {
                let at = sample.at.as_micros();
                if let Some(latencies) = self.measuring.as_mut() {
                    // Only requests sent at the measuring concurrency tell the no-load latency.
                    if !sample.dropped && sample.in_flight <= min_concurrency.max(1) {
                        latencies.push(rtt);
                    }
                    if latencies.len() >= min_rtt_requests.max(1) as usize {
                        self.baseline = Some(median(latencies));
                        self.measuring = None;
                        // Up to 15 % later, so that nodes started together do not measure
                        // together (a spread from the samples seen, not a clock).
                        let jitter = (self.samples.wrapping_mul(2_654_435_761) % 1_000) as f64;
                        let every = min_rtt_every.as_micros() as f64 * (1.0 + 0.15 * jitter / 1e3);
                        self.interval = Interval {
                            next_min_rtt: at + every as u64,
                            ..Interval::default()
                        };
                    }
                    return;
                }
                let iv = &mut self.interval;
                let mut next = self.limit;
                if iv.ends == 0 {
                    iv.ends = at + interval.as_micros() as u64;
                } else if at >= iv.ends {
                    if let (Some(min_rtt), false) =
                        (self.baseline, iv.latencies.is_empty() && !iv.dropped)
                    {
                        let gradient = if iv.dropped {
                            0.5
                        } else {
                            (min_rtt * tolerance / median(&mut iv.latencies)).clamp(0.5, 2.0)
                        };
                        let target = self.limit * gradient + self.limit.sqrt();
                        next = self.limit * (1.0 - smoothing) + target * smoothing;
                    }
                    iv.latencies.clear();
                    iv.dropped = false;
                    iv.ends = at + interval.as_micros() as u64;
                    if at >= iv.next_min_rtt {
                        self.measuring = Some(Vec::new());
                    }
                }
                if sample.dropped {
                    iv.dropped = true;
                } else {
                    iv.latencies.push(rtt);
                }
                next
            }
            Method::Gradient2 {
                tolerance,
                smoothing,
                long_window,
            } => {
                if sample.dropped {
                    // An overload failure says nothing of latency (it may come back at once):
                    // the limit moves as if the gradient were at its floor.
                    let target = self.limit * 0.5 + self.limit.sqrt();
                    self.limit = (self.limit * (1.0 - smoothing) + target * smoothing)
                        .clamp(self.min, self.max);
                    return;
                }
                let window = f64::from(long_window.max(1));
                let long = match self.baseline {
                    // The first samples average plainly, then exponentially.
                    Some(long) if self.samples as f64 > window => {
                        long * (1.0 - 1.0 / window) + rtt / window
                    }
                    Some(long) => long + (rtt - long) / self.samples as f64,
                    None => rtt,
                };
                // After a lasting slowdown the long-term latency comes down faster, so that the
                // limit can recover (Gradient2's drift correction).
                let long = if long / rtt > 2.0 { long * 0.95 } else { long };
                self.baseline = Some(long);
                if in_flight < self.limit / 2.0 {
                    // Limited by the application, not the upstream: nothing learnt.
                    return;
                }
                let gradient = (tolerance * long / rtt).clamp(0.5, 1.0);
                let queue = self.limit.sqrt();
                let target = self.limit * gradient + queue;
                self.limit * (1.0 - smoothing) + target * smoothing
            }
            Method::Aimd { backoff, timeout } => {
                if sample.dropped || sample.latency > timeout {
                    self.limit * backoff
                } else if in_flight * 2.0 >= self.limit {
                    self.limit + 1.0
                } else {
                    self.limit
                }
            }
            Method::Vegas { alpha, beta } => {
                let no_load = self.baseline.map_or(rtt, |b| b.min(rtt));
                self.baseline = Some(no_load);
                let log = self.limit.log10().max(1.0);
                if sample.dropped {
                    self.limit - log
                } else if in_flight * 2.0 < self.limit {
                    self.limit
                } else {
                    let queue = (self.limit * (1.0 - no_load / rtt)).ceil();
                    if queue < alpha * log {
                        self.limit + log
                    } else if queue > beta * log {
                        self.limit - log
                    } else {
                        self.limit
                    }
                }
            }
        };
        self.limit = next.clamp(self.min, self.max);
    }
}

/// The median of `values` (reordered), µs.
fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Envoy's admission control over a sliding window of outcomes.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionControl {
    /// The success ratio under which requests start being refused (0 < threshold ≤ 1).
    threshold: f64,
    /// How steeply refusals grow as the success ratio falls (≥ 1: more is gentler).
    aggression: f64,
    /// The highest refusal probability (0–1).
    max_probability: f64,
    /// Fewer requests than this in the window refuse nothing.
    min_requests: u64,
    /// The window, in buckets of `bucket` each.
    bucket: Duration,
    /// Per bucket: its start (µs), requests, successes; oldest first.
    buckets: std::collections::VecDeque<(u64, u64, u64)>,
    buckets_kept: usize,
}

impl AdmissionControl {
    /// Over `window` (in ten buckets), refusing once the success ratio falls below
    /// `threshold`, with `aggression` and at most `max_probability`; nothing with fewer than
    /// `min_requests` in the window.
    pub fn new(
        window: Duration,
        threshold: f64,
        aggression: f64,
        max_probability: f64,
        min_requests: u64,
    ) -> Self {
        const BUCKETS: u32 = 10;
        AdmissionControl {
            threshold: threshold.clamp(f64::MIN_POSITIVE, 1.0),
            aggression: aggression.max(1.0),
            max_probability: max_probability.clamp(0.0, 1.0),
            min_requests,
            bucket: (window / BUCKETS).max(Duration::from_millis(1)),
            buckets: std::collections::VecDeque::new(),
            buckets_kept: BUCKETS as usize,
        }
    }

    /// One request ended at `now`, a success or not.
    pub fn record(&mut self, now: Timestamp, success: bool) {
        let start = self.bucket_start(now);
        self.expire(now);
        match self.buckets.back_mut() {
            Some(last) if last.0 == start => {
                last.1 += 1;
                last.2 += u64::from(success);
            }
            _ => self.buckets.push_back((start, 1, u64::from(success))),
        }
    }

    /// The probability that a request arriving at `now` is refused.
    pub fn reject_probability(&mut self, now: Timestamp) -> f64 {
        self.expire(now);
        let (requests, successes) = self
            .buckets
            .iter()
            .fold((0, 0), |(r, s), b| (r + b.1, s + b.2));
        if requests < self.min_requests.max(1) {
            return 0.0;
        }
        let (requests, successes) = (requests as f64, successes as f64);
        let p = ((requests - successes / self.threshold) / (requests + 1.0)).max(0.0);
        p.powf(1.0 / self.aggression).min(self.max_probability)
    }

    fn bucket_start(&self, now: Timestamp) -> u64 {
        let width = self.bucket.as_micros().max(1) as u64;
        now.as_micros() - now.as_micros() % width
    }

    /// Drops the buckets that left the window by `now`.
    fn expire(&mut self, now: Timestamp) {
        let width = self.bucket.as_micros() as u64;
        let oldest = self
            .bucket_start(now)
            .saturating_sub(width * (self.buckets_kept as u64 - 1));
        while self.buckets.front().is_some_and(|b| b.0 < oldest) {
            self.buckets.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sample(latency_ms: u64, in_flight: u32, dropped: bool) -> Sample {
        Sample {
            at: Timestamp::from_micros(0),
            latency: ms(latency_ms),
            in_flight,
            dropped,
        }
    }

    #[test]
    fn gradient_grows_by_its_queue_while_latency_holds_and_shrinks_by_the_gradient() {
        let method = Method::Gradient2 {
            tolerance: 1.5,
            smoothing: 1.0,
            long_window: 100,
        };
        let mut c = ConcurrencyLimit::new(method, 16, 1, 1000);
        // Steady latency: gradient 1 (clamped), new = 16 × 1 + √16 = 20.
        c.record(sample(10, 16, false));
        assert_eq!(c.limit(), 20);
        // Latency doubles: long ≈ (10 + 20) / 2 = 15; gradient = 1.5 × 15 ÷ 20 = 1.125 → 1.
        c.record(sample(20, 20, false));
        assert_eq!(c.limit(), 24, "20 × 1 + √20 = 24.47");
        // Latency far above the long-term one: the limit shrinks by the gradient.
        let before = c.limit;
        c.record(sample(400, 24, false));
        let long = 15_000.0 + (400_000.0 - 15_000.0) / 3.0;
        let gradient: f64 = (1.5 * long / 400_000.0_f64).clamp(0.5, 1.0);
        let expected = before * gradient + before.sqrt();
        assert!(
            (c.limit - expected).abs() < 1e-9,
            "{} ≠ {expected}",
            c.limit
        );
        assert_eq!(c.limit(), 18, "it shrank, by the gradient");
        // Ten times slower than ever: the gradient clamps at 0.5.
        let mut d = ConcurrencyLimit::new(method, 100, 1, 1000);
        for _ in 0..10 {
            d.record(sample(10, 1000, false));
        }
        let before = d.limit;
        d.record(sample(1_000, 1000, false));
        assert!((d.limit - (before * 0.5 + before.sqrt())).abs() < 1e-9);
    }

    #[test]
    fn gradient_measures_the_no_load_latency_then_moves_by_envoys_formula_each_interval() {
        let method = Method::Gradient {
            tolerance: 1.25,
            smoothing: 1.0,
            interval: ms(100),
            min_rtt_every: Duration::from_secs(30),
            min_rtt_requests: 5,
            min_concurrency: 3,
        };
        let t0 = 1_700_000_000_000_000u64;
        let at = |ms: u64| Timestamp::from_micros(t0 + ms * 1_000);
        let end = |t: u64, latency: u64, in_flight: u32, dropped: bool| Sample {
            at: at(t),
            latency: self::ms(latency),
            in_flight,
            dropped,
        };
        let mut c = ConcurrencyLimit::new(method, 40, 1, 1000);
        assert_eq!(c.limit(), 3, "held at min_concurrency while it measures");
        // Requests sent at a higher concurrency (before the measurement) do not count.
        c.record(end(1, 50, 40, false));
        for (i, latency) in [6, 4, 5, 9, 5].into_iter().enumerate() {
            c.record(end(2 + i as u64, latency, 3, false));
        }
        assert_eq!(c.baseline, Some(5_000.0), "the median of 6, 4, 5, 9, 5 ms");
        assert_eq!(c.limit(), 40, "back to where it was");
        // The first sample opens the interval; the first one past its end closes it.
        c.record(end(10, 10, 40, false));
        c.record(end(50, 10, 40, false));
        c.record(end(60, 20, 40, false));
        // The sample that closes an interval belongs to the next one.
        c.record(end(111, 1, 40, false));
        // Median 10 ms: gradient = 5 × 1.25 ÷ 10 = 0.625; 40 × 0.625 + √40 = 31.32.
        let expected = 40.0 * 0.625 + 40f64.sqrt();
        assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
        // Faster than the no-load latency (1 ms): the gradient is capped at 2.
        c.record(end(212, 1, 31, true));
        let before = expected;
        let expected = before * 2.0 + before.sqrt();
        assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
        // An interval with an overload failure: gradient 0.5, whatever the latencies.
        c.record(end(250, 1, 31, false));
        c.record(end(313, 1, 31, false));
        let before = expected;
        let expected = before * 0.5 + before.sqrt();
        assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
        // 30 s on (plus up to 15 %), an interval's end starts a new measurement.
        c.record(end(35_000, 5, 10, false));
        assert_eq!(c.limit(), 3, "measuring again");
    }

    #[test]
    fn gradient_moves_by_its_smoothing() {
        let method = Method::Gradient {
            tolerance: 1.0,
            smoothing: 0.2,
            interval: ms(100),
            min_rtt_every: Duration::from_secs(30),
            min_rtt_requests: 1,
            min_concurrency: 3,
        };
        let at = |ms: u64| Timestamp::from_micros(1_000_000 + ms * 1_000);
        let mut c = ConcurrencyLimit::new(method, 100, 1, 1000);
        let end = |t: u64, latency: u64, in_flight: u32| Sample {
            at: at(t),
            latency: self::ms(latency),
            in_flight,
            dropped: false,
        };
        c.record(end(0, 10, 1));
        c.record(end(1, 20, 100));
        c.record(end(102, 20, 100));
        // gradient 0.5: target 50 + 10 = 60; a fifth of the way from 100: 92.
        assert!((c.limit - 92.0).abs() < 1e-9, "{}", c.limit);
    }

    #[test]
    fn gradient_learns_nothing_when_the_application_is_the_limit() {
        let method = Method::Gradient2 {
            tolerance: 1.5,
            smoothing: 0.2,
            long_window: 600,
        };
        let mut c = ConcurrencyLimit::new(method, 40, 10, 200);
        for _ in 0..100 {
            c.record(sample(5, 3, false));
        }
        assert_eq!(c.limit(), 40, "3 in flight of 40: nothing learnt");
    }

    #[test]
    fn gradient_smooths_and_stays_within_its_bounds() {
        let method = Method::Gradient2 {
            tolerance: 1.5,
            smoothing: 0.2,
            long_window: 600,
        };
        let mut c = ConcurrencyLimit::new(method, 20, 10, 30);
        for _ in 0..200 {
            c.record(sample(5, 30, false));
        }
        assert_eq!(c.limit(), 30, "capped at max");
        // A sudden slowdown moves it a fifth of the way to `30 × 0.5 + √30`.
        c.record(sample(5_000, 30, false));
        let expected = 30.0 * 0.8 + (15.0 + 30f64.sqrt()) * 0.2;
        assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
        let mut d = ConcurrencyLimit::new(method, 12, 10, 30);
        for _ in 0..50 {
            d.record(sample(5, 12, false));
        }
        for _ in 0..50 {
            d.record(sample(5_000, 30, false));
        }
        assert!(d.limit() >= 10, "never under min: {}", d.limit);
    }

    #[test]
    fn aimd_backs_off_on_drops_and_timeouts_and_adds_one_when_busy() {
        let method = Method::Aimd {
            backoff: 0.9,
            timeout: ms(100),
        };
        let mut c = ConcurrencyLimit::new(method, 20, 5, 100);
        c.record(sample(10, 10, false));
        assert_eq!(c.limit(), 21, "half in flight: + 1");
        c.record(sample(10, 5, false));
        assert_eq!(c.limit(), 21, "under half: unchanged");
        c.record(sample(10, 21, true));
        assert_eq!(c.limit(), 18, "21 × 0.9 = 18.9");
        c.record(sample(150, 18, false));
        assert_eq!(
            c.limit(),
            17,
            "a timeout counts as a drop: 18.9 × 0.9 = 17.01"
        );
        for _ in 0..50 {
            c.record(sample(10, 1, true));
        }
        assert_eq!(c.limit(), 5, "floored at min");
    }

    #[test]
    fn vegas_grows_on_a_short_queue_and_shrinks_on_a_long_one() {
        let method = Method::Vegas {
            alpha: 3.0,
            beta: 6.0,
        };
        let mut c = ConcurrencyLimit::new(method, 100, 1, 1000);
        // The first sample sets the no-load latency: queue 0 < 3 × log10(100) = 6 → + 2.
        c.record(sample(10, 100, false));
        assert_eq!(c.limit(), 102);
        // 13 ms against 10 ms no-load: queue = ceil(102 × 0.23) = 24 > 6 × log10(102) → − 2.
        c.record(sample(13, 102, false));
        assert_eq!(c.limit(), 99);
        // A drop shrinks it too.
        c.record(sample(10, 99, true));
        assert_eq!(c.limit(), 97);
    }

    #[test]
    fn admission_control_refuses_by_envoys_formula_and_stops_when_failures_stop() {
        let t0 = 1_700_000_000_000_000;
        let at = |ms: u64| Timestamp::from_micros(t0 + ms * 1000);
        let mut a = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
        // 19 requests: under the minimum, nothing refused whatever they did.
        for i in 0..19 {
            a.record(at(i), false);
        }
        assert_eq!(a.reject_probability(at(20)), 0.0);
        // 100 requests, 50 successes: (100 − 50 ÷ 0.95) ÷ 101 = 0.4690…
        let mut a = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
        for i in 0..100 {
            a.record(at(i), i % 2 == 0);
        }
        let p = a.reject_probability(at(100));
        assert!((p - (100.0 - 50.0 / 0.95) / 101.0).abs() < 1e-12, "{p}");
        // Aggression 2: the square root.
        let mut b = AdmissionControl::new(Duration::from_secs(10), 0.95, 2.0, 0.8, 20);
        for i in 0..100 {
            b.record(at(i), i % 2 == 0);
        }
        assert!((b.reject_probability(at(100)) - p.sqrt()).abs() < 1e-12);
        // All failing: capped.
        let mut c = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
        for i in 0..100 {
            c.record(at(i), false);
        }
        assert_eq!(c.reject_probability(at(100)), 0.8);
        // Healthy traffic: nothing refused (successes ÷ threshold ≥ requests).
        let mut d = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
        for i in 0..100 {
            d.record(at(i), i % 50 != 0);
        }
        assert_eq!(d.reject_probability(at(100)), 0.0, "98 % success");
        // Once the failures leave the window, refusals stop.
        assert_eq!(c.reject_probability(at(10_500)), 0.0);
        // While the window slides, only what is in it counts: 100 failures, then 1,000
        // successes a second later, then the failures out of the window.
        let mut e = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
        for i in 0..100 {
            e.record(at(i), false);
        }
        for i in 0..1000 {
            e.record(at(1_000 + i), true);
        }
        let p = e.reject_probability(at(2_000));
        assert!((p - (1100.0 - 1000.0 / 0.95) / 1101.0).abs() < 1e-12, "{p}");
        assert_eq!(
            e.reject_probability(at(10_500)),
            0.0,
            "the failures left the window"
        );
    }
}
