//! The per-node state of the `rate` and `distinct` detectors: bounded, in memory.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Timestamp;
use crate::plan::Anomaly;

/// Keys whose rate or distinct values a node keeps in memory.
const LOCAL_KEYS: usize = 100_000;
/// The weight of the newest window in a key's moving average.
const ALPHA: f64 = 0.3;

/// The per-node state of the `rate` and `distinct` detectors.
pub(super) struct LocalDetectors {
    keys: quick_cache::sync::Cache<String, Arc<Mutex<Local>>>,
    /// Per anomaly, the moving average of every key's closed windows: the baseline of keys
    /// without their own history.
    baselines: Mutex<HashMap<Arc<str>, f64>>,
}

impl Default for LocalDetectors {
    fn default() -> Self {
        LocalDetectors {
            keys: quick_cache::sync::Cache::new(LOCAL_KEYS),
            baselines: Mutex::new(HashMap::new()),
        }
    }
}

impl std::fmt::Debug for LocalDetectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDetectors")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// One key's state.
#[derive(Debug)]
enum Local {
    Rate {
        window: u64,
        count: u64,
        /// The key's moving average of its closed windows (`None`: none closed yet).
        baseline: Option<f64>,
    },
    Distinct {
        window: u64,
        values: HashSet<String>,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LocalDetectors {
    /// Counts one response for a `rate` detector; what it saw and its threshold when the
    /// key's window count is now above it.
    pub(super) fn rate(
        &self,
        anomaly: &Anomaly,
        key: &str,
        factor: u64,
        window: Duration,
        now: Timestamp,
    ) -> Option<(u64, f64)> {
        let w = window_index(window, now);
        let state = self.state(key, || Local::Rate {
            window: w,
            count: 0,
            baseline: None,
        });
        let mut state = lock(&state);
        let Local::Rate {
            window: at,
            count,
            baseline,
        } = &mut *state
        else {
            // The plan changed this anomaly's detector: start again.
            *state = Local::Rate {
                window: w,
                count: 0,
                baseline: None,
            };
            return None;
        };
        if *at < w {
            // The key's last window closed: it joins the key's and the anomaly's averages;
            // the empty windows since weigh the key's average down.
            let closed = *count as f64;
            let empty = i32::try_from(w - *at - 1).unwrap_or(i32::MAX);
            let decayed = |avg: f64| avg * (1.0 - ALPHA).powi(empty);
            *baseline = Some(decayed(baseline.map_or(closed, |b| ewma(b, closed))));
            let mut all = lock(&self.baselines);
            let global = all.entry(Arc::clone(&anomaly.name)).or_insert(closed);
            *global = ewma(*global, closed);
            *at = w;
            *count = 0;
        }
        *count += 1;
        let reference = match baseline {
            Some(b) => *b,
            None => lock(&self.baselines)
                .get(&anomaly.name)
                .copied()
                .unwrap_or(0.0),
        };
        let threshold = factor as f64 * reference.max(1.0);
        (*count as f64 > threshold).then_some((*count, threshold))
    }

    /// Adds one response's value for a `distinct` detector; how many distinct values the
    /// window holds when that is now above the threshold.
    pub(super) fn distinct(
        &self,
        key: &str,
        value: &str,
        threshold: u64,
        window: Duration,
        now: Timestamp,
    ) -> Option<u64> {
        let w = window_index(window, now);
        let state = self.state(key, || Local::Distinct {
            window: w,
            values: HashSet::new(),
        });
        let mut state = lock(&state);
        if !matches!(&*state, Local::Distinct { window, .. } if *window == w) {
            *state = Local::Distinct {
                window: w,
                values: HashSet::new(),
            };
        }
        let Local::Distinct { values, .. } = &mut *state else {
            return None;
        };
        // Bounded: past the threshold, more values change nothing.
        if values.len() as u64 <= threshold {
            values.insert(value.to_owned());
        }
        let seen = values.len() as u64;
        (seen > threshold).then_some(seen)
    }

    fn state(&self, key: &str, new: impl FnOnce() -> Local) -> Arc<Mutex<Local>> {
        // One state per key even when two responses of a new key race.
        let made = self.keys.get_or_insert_with(key, || {
            Ok::<_, std::convert::Infallible>(Arc::new(Mutex::new(new())))
        });
        match made {
            Ok(state) => state,
            Err(never) => match never {},
        }
    }
}

/// A moving average moved towards `value` (exactly `value` when they are equal).
fn ewma(average: f64, value: f64) -> f64 {
    average + ALPHA * (value - average)
}

/// The aligned window `now` falls in.
fn window_index(window: Duration, now: Timestamp) -> u64 {
    let w = u64::try_from(window.as_micros()).unwrap_or(u64::MAX).max(1);
    now.as_micros() / w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{AnomalyActions, Detector};

    fn anomaly() -> Anomaly {
        Anomaly {
            name: Arc::from("burst"),
            counter: Arc::from("anomaly.burst"),
            namespace: Arc::from("ns"),
            condition: crate::plan::Condition::Always,
            key: crate::plan::key::KeySpec { parts: Vec::new() },
            statuses: Vec::new(),
            detector: Detector::Rate {
                factor: 10,
                window: Duration::from_secs(60),
            },
            actions: AnomalyActions::default(),
        }
    }

    #[test]
    fn a_rate_ten_times_the_keys_average_detects_in_every_burst_window() {
        let local = LocalDetectors::default();
        let a = anomaly();
        let minute = Duration::from_secs(60);
        let at = |m: u64, s: u64| Timestamp::from_micros((m * 60 + s) * 1_000_000);
        let mut detected = Vec::new();
        // Five a minute for ten minutes: the average is five.
        for m in 0..10 {
            for s in 0..5 {
                assert_eq!(local.rate(&a, "k", 10, minute, at(m, s)), None);
            }
        }
        // Then 60 in minute 10: the 51st is more than ten times five.
        for s in 0..60 {
            if let Some(hit) = local.rate(&a, "k", 10, minute, at(10, s % 60)) {
                detected.push((s, hit));
            }
        }
        assert_eq!(detected.first(), Some(&(50, (51, 50.0))));
        assert_eq!(
            detected.len(),
            10,
            "every response past the threshold is over it"
        );
    }

    #[test]
    fn a_new_key_is_judged_against_the_anomalys_average() {
        let local = LocalDetectors::default();
        let a = anomaly();
        let minute = Duration::from_secs(60);
        let at = |m: u64| Timestamp::from_micros(m * 60 * 1_000_000);
        for m in 0..5 {
            for _ in 0..3 {
                local.rate(&a, "old", 10, minute, at(m));
            }
        }
        // The old key's closed windows average 3: a new key needs more than 30.
        let hits: Vec<_> = (0..31)
            .filter_map(|_| local.rate(&a, "new", 10, minute, at(5)))
            .collect();
        assert_eq!(hits, [(31, 30.0)]);
    }

    #[test]
    fn distinct_values_past_the_threshold_detect_and_the_window_resets() {
        let local = LocalDetectors::default();
        let w = Duration::from_secs(600);
        let t0 = Timestamp::from_micros(0);
        for n in 0..3 {
            assert_eq!(local.distinct("k", &format!("u{n}"), 3, w, t0), None);
        }
        assert_eq!(local.distinct("k", "u0", 3, w, t0), None, "a value again");
        assert_eq!(local.distinct("k", "u3", 3, w, t0), Some(4));
        let later = Timestamp::from_micros(600_000_000);
        assert_eq!(local.distinct("k", "u4", 3, w, later), None);
    }
}
