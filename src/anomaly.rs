//! Anomaly detection: the plan's `anomaly` blocks, run on responses, as an observer of the
//! request pipeline ([`Anomalies`]).
//!
//! A request is *watched* at admission ([`Anomalies::watch`]): each anomaly whose `match`
//! it meets gets its counter key (and, for `detect distinct`, the hashed value). Once the
//! response's status is known (the pipeline's completion, for the layer and the proxy;
//! `/v1/report` lets an application report it, [`Anomalies::report`]), each counted
//! response feeds its anomaly's detector:
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
//! admin API), `alert` logs a warning per channel, and every detection goes to the
//! [`DetectionSink`]s attached (Prometheus, ClickHouse's `anomalies` table).

mod local;

use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use self::local::LocalDetectors;
use crate::clock::{Clock, Timestamp};
use crate::engine::Engine;
use crate::limiter::{LeaseId, Quota, WindowQuota};
use crate::pipeline::{Admitted, CLIENT_CLOSED, Completion, DetectionSink, Done, Observer};
use crate::plan::key::FIRED_SUFFIX;
use crate::plan::select::Watched;
use crate::plan::{Detector, Plan};
use crate::request::RequestCtx;
use crate::store::runtime::{RuntimeEntry, RuntimeList, Target};
use crate::store::{Op, RuntimeStore, Store};
use crate::telemetry::{BURST_WINDOW, Burst};
use crate::verdict::Action;
pub use crate::verdict::Detection;

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

    /// Whether none does (never, for a watch [`Anomalies::watch`] returns).
    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

/// The anomaly detectors of an engine's plan, and where their detections go.
pub struct Anomalies<S, C> {
    inner: Arc<Inner<S, C>>,
}

struct Inner<S, C> {
    engine: Arc<Engine<S, C>>,
    local: LocalDetectors,
    sinks: Vec<Arc<dyn DetectionSink>>,
    store_failures: Burst,
}

impl<S, C> Clone for Anomalies<S, C> {
    fn clone(&self) -> Self {
        Anomalies {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S, C> std::fmt::Debug for Anomalies<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anomalies")
            .field("local", &self.inner.local)
            .field("sinks", &self.inner.sinks.len())
            .finish_non_exhaustive()
    }
}

impl<S: Store + RuntimeStore, C: Clock> Anomalies<S, C> {
    /// The detectors of `engine`'s plan (as it is when each request is watched), whose
    /// detections go to `sinks`.
    pub fn new(engine: Arc<Engine<S, C>>, sinks: Vec<Arc<dyn DetectionSink>>) -> Self {
        Anomalies {
            inner: Arc::new(Inner {
                engine,
                local: LocalDetectors::default(),
                sinks,
                store_failures: Burst::new(BURST_WINDOW),
            }),
        }
    }

    /// The anomalies watching `request`, to [`Anomalies::observe`] its response with
    /// (`None`: no anomaly watches it, the usual case, decided without allocating).
    pub fn watch(&self, request: &RequestCtx) -> Option<Watch> {
        let engine = &self.inner.engine;
        let plan = engine.plan_guard();
        if plan.anomalies().is_empty() {
            return None;
        }
        let watched =
            crate::plan::select::watching(&plan, request, engine.key_hasher(), engine.now());
        (!watched.is_empty()).then(|| Watch {
            plan: arc_swap::Guard::into_inner(plan),
            watched,
            client_ip: request.client_ip,
        })
    }

    /// Counts the response to a watched request (its `status`), and acts on what is
    /// detected. Returns the detections acted on (by this node).
    pub async fn observe(&self, watch: Watch, status: u16) -> Vec<Detection> {
        self.inner.observe(watch, status).await
    }

    /// `/v1/report`: the response `status` of a request decided before (by `/v1/check`):
    /// how many anomalies watch it, and what they detected.
    pub async fn report(&self, request: &RequestCtx, status: u16) -> (usize, Vec<Detection>) {
        match self.watch(request) {
            Some(watch) => (watch.len(), self.observe(watch, status).await),
            None => (0, Vec::new()),
        }
    }
}

/// Watches every admitted request but those a list or a ban refused (not the client's
/// pattern), and counts its response when it ends.
impl<S: Store + RuntimeStore, C: Clock> Observer for Anomalies<S, C> {
    fn admitted(&self, admitted: &Admitted<'_>) -> Option<Box<dyn Completion>> {
        if matches!(admitted.verdict.action, Action::Forbid { .. }) {
            return None;
        }
        let watch = self.watch(admitted.request)?;
        Some(Box::new(Watching {
            anomalies: self.clone(),
            watch,
        }))
    }
}

/// A watched request waiting for its response.
struct Watching<S, C> {
    anomalies: Anomalies<S, C>,
    watch: Watch,
}

impl<S: Store + RuntimeStore, C: Clock> Completion for Watching<S, C> {
    fn completed(self: Box<Self>, done: &Done) {
        // A request that ended before any answer has no response to count.
        if done.status == CLIENT_CLOSED {
            return;
        }
        let status = done.status;
        // Counting may need the store: in the background, the response does not wait.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                self.anomalies.observe(self.watch, status).await;
            });
        }
    }
}

impl<S: Store + RuntimeStore, C: Clock> Inner<S, C> {
    async fn observe(&self, watch: Watch, status: u16) -> Vec<Detection> {
        let now = self.engine.now();
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
                Detector::Rate { factor, window } => {
                    self.local.rate(anomaly, &w.key, *factor, *window, now)
                }
                Detector::Distinct {
                    threshold, window, ..
                } => {
                    let value = w.value.as_deref().unwrap_or_default();
                    self.local
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
                plan_version: watch.plan.plan_version(),
                at: now,
            };
            self.act(&detection).await;
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
        match self.engine.store().apply(&[one(key, quota)], now).await {
            Ok(result) => {
                let r = result.results.first()?;
                (result.admitted && r.decision.remaining == 0)
                    .then_some((threshold, threshold as f64))
            }
            Err(e) => {
                self.warn_store(&e, "an anomaly's count", now);
                None
            }
        }
    }

    /// Whether this is the key's first detection in its window, on any node (when the store
    /// cannot say: yes, so that nothing detected goes unreported).
    async fn first_in_window(&self, key: &str, window: Duration, now: Timestamp) -> bool {
        let fired = format!("{key}{FIRED_SUFFIX}");
        let quota = Quota::FixedWindow(WindowQuota {
            limit: NonZeroU64::MIN,
            window: micros(window),
        });
        match self.engine.store().apply(&[one(&fired, quota)], now).await {
            Ok(result) => result.admitted,
            Err(e) => {
                self.warn_store(&e, "an anomaly's once-per-window check", now);
                true
            }
        }
    }

    /// Logs a store failure once per burst.
    fn warn_store(&self, error: &crate::store::StoreError, what: &str, now: Timestamp) {
        if let Some(suppressed) = self.store_failures.admit(now) {
            tracing::warn!(%error, suppressed, "counter store failed while counting {what}");
        }
    }

    /// Bans, flags, tarpits, alerts and logs `detection`, and hands it to the sinks.
    async fn act(&self, d: &Detection) {
        let key_hash = self.engine.key_hasher().hash(&d.key);
        let entries = entries(d);
        for entry in &entries {
            if let Err(e) = self.engine.store().put_runtime_entry(entry).await {
                tracing::warn!(error = %e, anomaly = %d.anomaly, list = entry.list.as_str(), "cannot store an anomaly's action");
            }
        }
        if !entries.is_empty()
            && let Err(e) = self.engine.refresh_runtime_lists().await
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
        for sink in &self.sinks {
            sink.detected(d, &key_hash);
        }
    }
}

/// The runtime entries a detection's actions make: a denylist entry for a ban, a flag, a
/// tarpit, on the key's client (its network for an address).
fn entries(d: &Detection) -> Vec<RuntimeEntry> {
    let target = target_of(d.key.client());
    let reason = format!("anomaly {}", d.anomaly);
    let entry = |list, lasting: Duration, delay_ms| RuntimeEntry {
        list,
        target: target.clone(),
        until: Some(d.at.saturating_add(lasting).as_micros()),
        reason: Some(reason.clone()),
        delay_ms,
    };
    let mut entries = Vec::new();
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
    entries
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
        global: None,
    }
}
