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
    /// Envoy's adaptive concurrency: the no-load latency (`min RTT`, the lowest decile of
    /// `min_rtt_requests` latencies) is measured with the limit held at `min_concurrency`,
    /// again every `min_rtt_every`; between measurements, once per `interval`, the
    /// interval's `percentile` latency gives
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
        /// Which percentile of an interval's latencies is its latency (Envoy's
        /// `sample_aggregate_percentile`; 0.9: the limit holds the tail, not the median).
        percentile: f64,
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
                percentile,
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
                        // The lowest decile: near the minimum, robust to one lucky request,
                        // and to the queueing a busy node adds to most of them.
                        self.baseline = Some(quantile(latencies, 0.1));
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
                            let sample = quantile(&mut iv.latencies, percentile);
                            (min_rtt * tolerance / sample).clamp(0.5, 2.0)
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

/// The `q` quantile of `values` (reordered; the nearest rank), µs.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
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
mod tests;
