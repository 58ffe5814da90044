//! Prometheus metrics (the `prometheus` crate): what the engine decides, how long deciding
//! and the store take, the store's health, reloads and bans. Label values come from the plan
//! (namespaces, limits, lists) or from fixed sets (outcomes), never from clients, so the
//! number of series stays bounded.
//!
//! [`Metrics`] is an observer of the request pipeline (`crate::pipeline`): it counts each
//! decision as it is admitted, and each anomaly acted on. Values kept elsewhere (breakers,
//! memory keys, reloads, bans) are read when the registry is scraped ([`Metrics::render`]).

mod adaptive;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::pipeline::{Admitted, Completion, DetectionSink, Done, Observer};
use crate::store::StoreHealth;
use crate::verdict::{Action, Detection, LimitReport, Outcome, Verdict};

/// The counters of one limit, one per outcome (in [`Outcome::ALL`]'s order), resolved once.
type LimitCounters = [IntCounter; Outcome::ALL.len()];

type CountersByLimit =
    HashMap<Arc<str>, (Arc<str>, Arc<LimitCounters>), foldhash::fast::RandomState>;

/// Every metric Tollgate exports, in one registry.
pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    /// Limit name (unique in a plan) → its counters: one fast lookup per limit instead of
    /// hashing three label values.
    per_limit: ArcSwap<CountersByLimit>,
    requests: IntCounterVec,
    /// `requests{outcome=allow|warn|delay, rule=""}`, resolved once: most requests.
    admitted: [IntCounter; 3],
    decision_seconds: Histogram,
    store_seconds: Histogram,
    store_errors: IntCounter,
    breakers: IntGauge,
    breakers_open: IntGauge,
    memory_keys: IntGauge,
    memory_evictions: IntCounter,
    redis: RedisFamilies,
    reloads: IntCounterVec,
    active_bans: IntGauge,
    plan: IntGaugeVec,
    export: ExportFamilies,
    anomalies: IntCounterVec,
    usage: IntCounterVec,
    adaptive: adaptive::AdaptiveFamilies,
}

/// The Redis store's families (zero with the memory store).
struct RedisFamilies {
    calls: IntCounter,
    batched: IntCounter,
    syncs_ok: IntCounter,
    syncs_failed: IntCounter,
    local_first_keys: IntGauge,
    master: IntGaugeVec,
    master_switches: IntCounter,
    region_partitioned: IntGaugeVec,
    region_pushes: IntCounterVec,
    region_keys: IntGauge,
    region_keys_untracked: IntCounter,
}

impl RedisFamilies {
    fn new(registry: &Registry) -> RedisFamilies {
        let syncs = counter_vec(
            registry,
            "tollgate_redis_syncs_total",
            "Local-first sync calls (counts sent, totals read back), by outcome (ok, error).",
            &["outcome"],
        );
        RedisFamilies {
            calls: counter(
                registry,
                "tollgate_redis_calls_total",
                "Batch script calls to Redis (each decides one request or a batch of them).",
            ),
            batched: counter(
                registry,
                "tollgate_redis_batched_requests_total",
                "Requests decided by those calls: divided by the calls, the mean batch size.",
            ),
            syncs_ok: syncs.with_label_values(&["ok"]),
            syncs_failed: syncs.with_label_values(&["error"]),
            local_first_keys: gauge(
                registry,
                "tollgate_local_first_keys",
                "Keys of local-first limits (sync every) this node decides.",
            ),
            master: gauge_vec(
                registry,
                "tollgate_redis_master_info",
                "1 for the Redis master in use, as the sentinels name it (Sentinel only).",
                &["address"],
            ),
            master_switches: counter(
                registry,
                "tollgate_redis_master_switches_total",
                "Times the sentinels named another Redis master and this node followed.",
            ),
            region_partitioned: gauge_vec(
                registry,
                "tollgate_region_partitioned",
                "1 while another region has written nothing into this region's Redis for region_partition_ms (global limits follow on_partition).",
                &["region"],
            ),
            region_pushes: counter_vec(
                registry,
                "tollgate_region_pushes_total",
                "Exchanges of global counts sent to another region's Redis, by outcome (ok, error).",
                &["region", "outcome"],
            ),
            region_keys: gauge(
                registry,
                "tollgate_region_keys",
                "Keys of global limits (counted across regions) this node exchanges.",
            ),
            region_keys_untracked: counter(
                registry,
                "tollgate_region_keys_untracked_total",
                "Keys of global limits this node counted but did not exchange: its table of 100,000 keys was full.",
            ),
        }
    }

    fn update_regions(&self, regions: &crate::store::redis::RegionsHealth) {
        self.region_keys.set(gauge_value(regions.keys));
        catch_up(&self.region_keys_untracked, regions.keys_untracked);
        for peer in &regions.peers {
            self.region_partitioned
                .with_label_values(&[&peer.name])
                .set(i64::from(peer.partitioned));
            let ok = peer.pushes.saturating_sub(peer.push_failures);
            catch_up(
                &self.region_pushes.with_label_values(&[&peer.name, "ok"]),
                ok,
            );
            catch_up(
                &self.region_pushes.with_label_values(&[&peer.name, "error"]),
                peer.push_failures,
            );
        }
    }

    fn update_master(&self, sentinel: &crate::store::SentinelMaster) {
        self.master.reset();
        self.master.with_label_values(&[&sentinel.master]).set(1);
        catch_up(&self.master_switches, sentinel.switches);
    }

    fn update(&self, calls: &crate::store::RedisCalls) {
        catch_up(&self.calls, calls.calls);
        catch_up(&self.batched, calls.batched_requests);
        catch_up(
            &self.syncs_ok,
            calls.syncs.saturating_sub(calls.sync_failures),
        );
        catch_up(&self.syncs_failed, calls.sync_failures);
        self.local_first_keys
            .set(gauge_value(calls.local_first_keys));
    }
}

/// The exporter's families (zero when nothing is exported).
struct ExportFamilies {
    queued: IntGauge,
    spool_rows: IntGauge,
    sent: IntCounter,
    spooled: IntCounter,
    dropped: IntCounter,
    failures: IntCounter,
    sampled_out: IntCounter,
}

impl ExportFamilies {
    fn new(registry: &Registry) -> ExportFamilies {
        ExportFamilies {
            queued: gauge(
                registry,
                "tollgate_export_queue_rows",
                "Decision rows waiting in memory to be exported to ClickHouse.",
            ),
            spool_rows: gauge(
                registry,
                "tollgate_export_spool_rows",
                "Decision rows waiting in the on-disk spool for ClickHouse to answer.",
            ),
            sent: counter(
                registry,
                "tollgate_export_rows_sent_total",
                "Decision rows inserted into ClickHouse.",
            ),
            spooled: counter(
                registry,
                "tollgate_export_rows_spooled_total",
                "Decision rows written to the spool because ClickHouse did not take them.",
            ),
            dropped: counter(
                registry,
                "tollgate_export_rows_dropped_total",
                "Decision rows lost: the queue or the spool was full, or a spool file unreadable.",
            ),
            failures: counter(
                registry,
                "tollgate_export_insert_failures_total",
                "Inserts into ClickHouse that failed (their rows spooled or retried).",
            ),
            sampled_out: counter(
                registry,
                "tollgate_export_sampled_out_total",
                "Admitted requests not exported because of clickhouse_sample_allows.",
            ),
        }
    }

    fn update(&self, stats: &crate::analytics::export::ExportStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.queued
            .set(i64::try_from(stats.queued.load(Relaxed)).unwrap_or(i64::MAX));
        self.spool_rows
            .set(i64::try_from(stats.spool_rows.load(Relaxed)).unwrap_or(i64::MAX));
        catch_up(&self.sent, stats.sent.load(Relaxed));
        catch_up(&self.spooled, stats.spooled.load(Relaxed));
        catch_up(&self.dropped, stats.dropped.load(Relaxed));
        catch_up(&self.failures, stats.failures.load(Relaxed));
        catch_up(&self.sampled_out, stats.sampled_out.load(Relaxed));
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help)).expect("a valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help)).expect("a valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("a valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
}

impl Metrics {
    /// A registry with every family, all at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let decisions = counter_vec(
            &registry,
            "tollgate_decisions_total",
            "What each limit did to each request it applied to.",
            &["namespace", "limit", "outcome"],
        );
        let requests = counter_vec(
            &registry,
            "tollgate_requests_total",
            "Requests decided, by what was done and the list or limit that decided it.",
            &["outcome", "rule"],
        );
        let decision_seconds = histogram(
            &registry,
            "tollgate_decision_duration_seconds",
            "Time to decide one request, store call included.",
            prometheus::exponential_buckets(0.000_005, 2.0, 16).expect("valid buckets"),
        );
        let store_seconds = histogram(
            &registry,
            "tollgate_store_duration_seconds",
            "Time from a decision's start to the store's answer (one counting call, plus the selection before it).",
            prometheus::exponential_buckets(0.000_01, 2.0, 16).expect("valid buckets"),
        );
        let store_errors = counter(
            &registry,
            "tollgate_store_errors_total",
            "Counting calls that failed (the limits' on_store_error decided).",
        );
        let breakers = gauge(
            &registry,
            "tollgate_store_breakers",
            "Circuit breakers in front of the store (one per Redis server or slot group).",
        );
        let breakers_open = gauge(
            &registry,
            "tollgate_store_breakers_open",
            "Circuit breakers open: calls refused, or one probe let through.",
        );
        let memory_keys = gauge(
            &registry,
            "tollgate_memory_store_keys",
            "Keys the memory store holds in this process (expired ones until swept).",
        );
        let memory_evictions = counter(
            &registry,
            "tollgate_memory_store_evictions_total",
            "Live keys the memory store dropped to stay within its cap.",
        );
        let redis = RedisFamilies::new(&registry);
        let reloads = counter_vec(
            &registry,
            "tollgate_reloads_total",
            "Policy reloads, by outcome (ok: swapped in; error: refused, the old plan serves).",
            &["outcome"],
        );
        let usage = counter_vec(
            &registry,
            "tollgate_usage_units_total",
            "Units of limits whose cost the response says: reserved at admission, and used (what the counter holds once settled).",
            &["namespace", "limit", "phase"],
        );
        let active_bans = gauge(
            &registry,
            "tollgate_active_bans",
            "Runtime denylist entries (bans) in force on this node.",
        );
        let plan = gauge_vec(
            &registry,
            "tollgate_plan_info",
            "The plan serving (1), by version.",
            &["version"],
        );
        let export = ExportFamilies::new(&registry);
        let anomalies = counter_vec(
            &registry,
            "tollgate_anomalies_total",
            "Anomalies detected and acted on by this node, by anomaly block.",
            &["namespace", "anomaly"],
        );
        let adaptive = adaptive::AdaptiveFamilies::new(&registry);
        let admitted = ["allow", "warn", "delay"].map(|o| requests.with_label_values(&[o, ""]));
        Metrics {
            registry,
            decisions,
            per_limit: ArcSwap::from_pointee(CountersByLimit::default()),
            requests,
            admitted,
            decision_seconds,
            store_seconds,
            store_errors,
            breakers,
            breakers_open,
            memory_keys,
            memory_evictions,
            redis,
            reloads,
            active_bans,
            plan,
            export,
            anomalies,
            usage,
            adaptive,
        }
    }

    /// Records one anomaly detected (and acted on) by this node.
    pub fn record_anomaly(&self, namespace: &str, anomaly: &str) {
        self.anomalies
            .with_label_values(&[namespace, anomaly])
            .inc();
    }

    /// The counters of the limit `report` is about, resolved on first use (copy on write:
    /// a plan has few limits, requests read without locking).
    fn add_limit(&self, report: &LimitReport) -> Arc<LimitCounters> {
        let namespace = report.key.namespace();
        let counters: Arc<LimitCounters> = Arc::new(Outcome::ALL.map(|o| {
            self.decisions
                .with_label_values(&[namespace, &report.limit, o.as_str()])
        }));
        self.per_limit.rcu(|map| {
            let mut map = CountersByLimit::clone(map);
            map.insert(
                Arc::clone(&report.limit),
                (Arc::from(namespace), Arc::clone(&counters)),
            );
            map
        });
        counters
    }

    /// Records what each limit that applied did.
    pub fn record_limits(&self, reports: &[LimitReport]) {
        if reports.is_empty() {
            return;
        }
        let known = self.per_limit.load();
        for report in reports {
            let outcome = report.outcome as usize;
            let found = known
                .get(&*report.limit)
                .filter(|(namespace, _)| **namespace == *report.key.namespace());
            match found {
                Some((_, counters)) => counters[outcome].inc(),
                None => self.add_limit(report)[outcome].inc(),
            }
        }
    }

    /// Records one request's action and how long deciding it took.
    pub fn record_request(&self, action: &Action, took: Duration) {
        match action {
            Action::Allow => self.admitted[0].inc(),
            Action::Warn => self.admitted[1].inc(),
            Action::Delay(_) => self.admitted[2].inc(),
            refused => {
                let (outcome, rule) = refused.outcome();
                self.requests.with_label_values(&[outcome, rule]).inc();
            }
        }
        self.decision_seconds.observe(took.as_secs_f64());
    }

    /// Records one counting call to the store.
    pub fn record_store_call(&self, took: Duration, failed: bool) {
        self.store_seconds.observe(took.as_secs_f64());
        if failed {
            self.store_errors.inc();
        }
    }

    /// Records everything `verdict` says: the request, each limit, the store call.
    pub fn record(&self, verdict: &Verdict) {
        self.record_request(&verdict.action, verdict.elapsed);
        self.record_limits(&verdict.reports);
        if let Some(call) = &verdict.store_call {
            self.record_store_call(call.took, call.error.is_some());
        }
    }

    /// Brings what is kept elsewhere up to date, then renders every family in Prometheus's
    /// text format.
    pub fn render(&self, scrape: &Scrape<'_>) -> String {
        self.breakers.set(gauge_value(scrape.store.breakers));
        self.breakers_open
            .set(gauge_value(scrape.store.breakers_open));
        self.memory_keys
            .set(gauge_value(scrape.store.keys.unwrap_or_default()));
        catch_up(&self.memory_evictions, scrape.evictions);
        if let Some(calls) = &scrape.store.redis {
            self.redis.update(calls);
        }
        if let Some(sentinel) = &scrape.store.sentinel {
            self.redis.update_master(sentinel);
        }
        if let Some(regions) = &scrape.store.regions {
            self.redis.update_regions(regions);
        }
        if let Some((ok, error)) = scrape.reloads {
            catch_up(&self.reloads.with_label_values(&["ok"]), ok);
            catch_up(&self.reloads.with_label_values(&["error"]), error);
        }
        self.active_bans.set(gauge_value(scrape.active_bans));
        if let Some(stats) = scrape.export {
            self.export.update(stats);
        }
        self.adaptive.update(&scrape.adaptive);
        self.plan.reset();
        self.plan.with_label_values(&[scrape.plan_version]).set(1);
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Counts every decision as the pipeline admits it.
impl Observer for Metrics {
    fn admitted(&self, admitted: &Admitted<'_>) -> Option<Box<dyn Completion>> {
        self.record(admitted.verdict);
        if admitted.verdict.reservations.is_empty() {
            return None;
        }
        Some(Box::new(UsageUnits(self.usage.clone())))
    }
}

/// Counts what a request reserved and used, once it has ended.
struct UsageUnits(IntCounterVec);

impl Completion for UsageUnits {
    fn completed(self: Box<Self>, done: &Done) {
        for s in &done.usage {
            let count = |phase: &str, units: u64| {
                self.0
                    .with_label_values(&[&*s.namespace, &*s.limit, phase])
                    .inc_by(units);
            };
            count("reserved", s.reserved);
            count("used", s.used);
        }
    }
}

/// Counts every anomaly this node acts on.
impl DetectionSink for Metrics {
    fn detected(&self, detection: &Detection, _key_hash: &str) {
        self.record_anomaly(&detection.namespace, &detection.anomaly);
    }
}

/// What a scrape reads from the engine, the store and the reloader.
#[derive(Debug)]
pub struct Scrape<'a> {
    /// The store's health.
    pub store: StoreHealth,
    /// Memory-store evictions so far.
    pub evictions: u64,
    /// Reloads so far: swapped in, refused (`None`: no reloader).
    pub reloads: Option<(u64, u64)>,
    /// Runtime bans in force.
    pub active_bans: usize,
    /// The plan serving.
    pub plan_version: &'a str,
    /// What the ClickHouse exporter did (`None`: no export).
    pub export: Option<&'a crate::analytics::export::ExportStats>,
    /// The adaptive limits on this node.
    pub adaptive: Vec<crate::store::adaptive::Summary>,
}

/// Raises `counter` to `total`, a count kept elsewhere that only grows.
fn catch_up(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
