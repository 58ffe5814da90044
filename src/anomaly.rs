//! Anomaly detection: the plan's `anomaly` blocks, run on responses.
//!
//! A request is *watched* before it goes on ([`Engine::watch`]): each anomaly whose `match`
//! it meets gets its counter key (and, for `detect distinct`, the hashed value). Once the
//! response's status is known ([`Engine::observe`]: the layer and the reverse proxy do it
//! themselves; `/v1/report` lets an application report it), each counted response feeds its
//! anomaly's detector:
//!
//! - `detect N in W` counts in the store (a sliding window of N): every node sees one count;
//!   the N-th response within W detects.
//! - `detect rate > K x baseline over W` and `detect distinct … > N in W` count in this
//!   node's memory (bounded; a node sees its share of the traffic, so the pattern is judged
//!   per node).
//!
//! A detection is acted on once per key and window across every node (a one-per-window
//! counter in the store decides which node acts): `ban` and `flag`/`tarpit` become runtime
//! entries in the store (every node applies them; they show in, and are lifted through, the
//! admin API), `alert` logs a warning per channel, and every detection is exported to
//! ClickHouse's `anomalies` table and counted in Prometheus.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smallvec::SmallVec;

use crate::clock::{Clock, Timestamp};
use crate::engine::Engine;
use crate::limiter::{LeaseId, Quota, WindowQuota};
use crate::plan::key::CounterKey;
use crate::plan::select::Watched;
use crate::plan::{Anomaly, AnomalyActions, Detector, Plan};
use crate::request::RequestCtx;
use crate::store::runtime::{RuntimeEntry, RuntimeList, Target};
use crate::store::{Op, Store};

/// What a request's response will be counted under: the anomalies watching it.
#[derive(Debug)]
pub struct Watch {
    plan: Arc<Plan>,
    watched: SmallVec<[Watched; 1]>,
    client_ip: Option<IpAddr>,
}

impl Watch {
    /// How many anomalies watch the request.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    /// Whether none does (never, for a watch [`Engine::watch`] returns).
    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

/// One anomaly detected on one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The anomaly.
    pub anomaly: Arc<str>,
    /// Its namespace.
    pub namespace: Arc<str>,
    /// The counter key (secrets hashed); its client part is what was acted on.
    pub key: String,
    /// The client's address, when known.
    pub client_ip: Option<IpAddr>,
    /// What was seen: responses counted, or distinct values, in the window.
    pub observed: u64,
    /// What it was compared with (N, or K times the baseline).
    pub threshold: f64,
    /// The detector's window.
    pub window: Duration,
    /// What was done.
    pub actions: AnomalyActions,
    /// The plan's version.
    pub plan_version: Arc<str>,
}

/// Keys whose rate or distinct values a node keeps in memory.
const LOCAL_KEYS: usize = 100_000;
/// The weight of the newest window in a key's moving average.
const ALPHA: f64 = 0.3;

/// The per-node state of the `rate` and `distinct` detectors.
pub(crate) struct LocalDetectors {
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
    fn rate(
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
    fn distinct(
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

impl<S: Store, C: Clock> Engine<S, C> {
    /// The anomalies watching `request`, to [`Engine::observe`] its response with (`None`:
    /// no anomaly watches it, the usual case, decided without allocating).
    pub fn watch(&self, request: &RequestCtx) -> Option<Watch> {
        let plan = self.plan_guard();
        if plan.anomalies().is_empty() {
            return None;
        }
        let watched = crate::plan::select::watching(&plan, request, self.key_hasher(), self.now());
        (!watched.is_empty()).then(|| Watch {
            plan: arc_swap::Guard::into_inner(plan),
            watched,
            client_ip: request.client_ip,
        })
    }

    /// Counts the response to a watched request (its `status`), and acts on what is
    /// detected. Returns the detections acted on (by this node).
    pub async fn observe(&self, watch: Watch, status: u16) -> Vec<Detection> {
        let now = self.now();
        let mut detections = Vec::new();
        for w in &watch.watched {
            let Some(anomaly) = watch.plan.anomalies().get(w.anomaly) else {
                continue;
            };
            if !anomaly.counts(status) {
                continue;
            }
            let seen = match &anomaly.detector {
                Detector::Count { threshold, window } => {
                    self.count_in_store(&w.key, *threshold, *window, now).await
                }
                Detector::Rate { factor, window } => self
                    .local_detectors()
                    .rate(anomaly, &w.key, *factor, *window, now),
                Detector::Distinct {
                    threshold, window, ..
                } => {
                    let value = w.value.as_deref().unwrap_or_default();
                    self.local_detectors()
                        .distinct(&w.key, value, *threshold, *window, now)
                        .map(|seen| (seen, *threshold as f64))
                }
            };
            let Some((observed, threshold)) = seen else {
                continue;
            };
            let window = anomaly.detector.window();
            if !self.first_in_window(&w.key, window, now).await {
                continue;
            }
            let detection = Detection {
                anomaly: Arc::clone(&anomaly.name),
                namespace: Arc::clone(&anomaly.namespace),
                key: w.key.clone(),
                client_ip: watch.client_ip,
                observed,
                threshold,
                window,
                actions: anomaly.actions.clone(),
                plan_version: Arc::from(watch.plan.version()),
            };
            self.act(&detection, now).await;
            detections.push(detection);
        }
        detections
    }

    /// Counts one response in the store; the count and threshold when it is the N-th in
    /// the window.
    async fn count_in_store(
        &self,
        key: &str,
        threshold: u64,
        window: Duration,
        now: Timestamp,
    ) -> Option<(u64, f64)> {
        let quota = Quota::SlidingWindow(WindowQuota {
            limit: NonZeroU64::new(threshold)?,
            window: micros(window),
        });
        let op = one(key, quota);
        match self.store().apply(&[op], now).await {
            Ok(result) => {
                let r = result.results.first()?;
                (result.admitted && r.decision.remaining == 0)
                    .then_some((threshold, threshold as f64))
            }
            Err(e) => {
                self.warn_store(&e, "an anomaly's count");
                None
            }
        }
    }

    /// Whether this is the key's first detection in its window, on any node (when the store
    /// cannot say: yes, so that nothing detected goes unreported).
    async fn first_in_window(&self, key: &str, window: Duration, now: Timestamp) -> bool {
        let fired = format!("{key}.fired");
        let quota = Quota::FixedWindow(WindowQuota {
            limit: NonZeroU64::MIN,
            window: micros(window),
        });
        match self.store().apply(&[one(&fired, quota)], now).await {
            Ok(result) => result.admitted,
            Err(e) => {
                self.warn_store(&e, "an anomaly's once-per-window check");
                true
            }
        }
    }

    /// Bans, flags, tarpits, alerts, logs, exports and counts `detection`.
    async fn act(&self, d: &Detection, now: Timestamp) {
        let target = CounterKey::parse(&d.key).map(|parts| target_of(parts.client));
        let key_hash = self.key_hasher().hash(&d.key);
        let reason = format!("anomaly {}", d.anomaly);
        let mut entries = Vec::new();
        if let Some(target) = &target {
            let entry = |list, lasting: Duration, delay_ms| RuntimeEntry {
                list,
                target: target.clone(),
                until: Some(now.saturating_add(lasting).as_micros()),
                reason: Some(reason.clone()),
                delay_ms,
            };
            if let Some(ban) = d.actions.ban {
                entries.push(entry(RuntimeList::Denylist, ban, None));
            }
            if let Some(flag) = d.actions.flag {
                entries.push(entry(RuntimeList::Flag, flag, None));
            }
            if let Some((hold, lasting)) = d.actions.tarpit {
                let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
                entries.push(entry(RuntimeList::Tarpit, lasting, Some(ms)));
            }
        }
        for entry in &entries {
            if let Err(e) = self.store().put_runtime_entry(entry).await {
                tracing::warn!(error = %e, anomaly = %d.anomaly, list = entry.list.as_str(), "cannot store an anomaly's action");
            }
        }
        if !entries.is_empty()
            && let Err(e) = self.refresh_runtime_lists().await
        {
            tracing::warn!(error = %e, "cannot read the runtime lists back after an anomaly");
        }
        tracing::warn!(
            anomaly = %d.anomaly,
            namespace = %d.namespace,
            key_hash,
            observed = d.observed,
            threshold = d.threshold,
            ban_s = d.actions.ban.map(|b| b.as_secs()),
            flag = d.actions.flag.is_some(),
            tarpit = d.actions.tarpit.is_some(),
            "anomaly detected"
        );
        for channel in &d.actions.alerts {
            tracing::warn!(
                target: "tollgate::alert",
                channel = %channel,
                anomaly = %d.anomaly,
                key_hash,
                observed = d.observed,
                "alert: anomaly detected"
            );
        }
        if let Some(metrics) = self.metrics() {
            metrics.record_anomaly(&d.namespace, &d.anomaly);
        }
        self.export_anomaly(d, &key_hash, now);
    }
}

/// The runtime entry target of a key's client part: its network for `ip:…`, else the
/// client.
fn target_of(client: &str) -> Target {
    match client
        .strip_prefix("ip:")
        .and_then(crate::plan::ipset::parse_net)
    {
        Some(net) => Target::Net(net.trunc()),
        None => Target::Client(client.to_owned()),
    }
}

fn micros(d: Duration) -> NonZeroU64 {
    NonZeroU64::new(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)).unwrap_or(NonZeroU64::MIN)
}

fn one(key: &str, quota: Quota) -> Op<'_> {
    Op {
        key,
        quota,
        cost: 1,
        enforce: true,
        ban: None,
        lease: LeaseId(0),
        sync: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
