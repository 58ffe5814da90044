//! The decision engine: plan × request × store → [`Verdict`].
//!
//! A thin async orchestrator around pure parts: lists, then the route index and conditions,
//! then tiers and keys, then one atomic [`Store::apply`] for every limit that applies, then
//! soft thresholds, shadow mode and priorities decide what the client sees.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use smallvec::SmallVec;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::limiter::{Decision, LeaseId, Quota};
use crate::metrics::Metrics;
use crate::plan::key::{CounterKey, KeySource};
use crate::plan::select::{Charge, Scope, Selected, Selection, select};
use crate::plan::{Counts, KeyHasher, Limit, Mode, Plan, SoftAction, StoreErrorMode};
use crate::request::RequestCtx;
use crate::store::runtime::{RuntimeEntry, RuntimeList, RuntimeLists, Target};
use crate::store::{BatchResult, MemoryStore, Op, Store, StoreError};

/// The bits of a lease id chosen at random per engine: 32 to 52.
const LEASE_BASE_BITS: u64 = ((1 << 53) - 1) & !0xFFFF_FFFF;

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pass it on.
    Allow,
    /// Pass it on with a warning: a soft threshold was crossed.
    Warn,
    /// Hold it this long, then pass it on.
    Delay(Duration),
    /// On a safelist: no limit applies.
    Bypass {
        /// The safelist.
        list: Arc<str>,
    },
    /// Over a limit.
    Reject {
        /// The status to answer with (429 unless the policy says otherwise).
        status: StatusCode,
        /// The limit that rejected.
        limit: Arc<str>,
        /// The policy's reason.
        reason: Option<Arc<str>>,
        /// When the same request would fit, if known.
        retry_after: Option<Duration>,
    },
    /// On a denylist.
    Forbid {
        /// The status to answer with (403 unless the list says otherwise).
        status: StatusCode,
        /// The denylist.
        list: Arc<str>,
        /// The list's reason.
        reason: Option<Arc<str>>,
        /// When the refusal ends (a ban), if it does.
        retry_after: Option<Duration>,
    },
    /// A limit that applies requires Cedar's permit (`authorize action "…"`) and Cedar does
    /// not give it: refused with 403, nothing counted.
    Unauthorized {
        /// The limit whose authorization failed.
        limit: Arc<str>,
        /// The action Cedar was asked about.
        action: Arc<str>,
        /// The determining policies (the `forbid`s that denied; none when nothing permits).
        policies: Vec<Arc<str>>,
    },
    /// The counter store failed and a limit that applies fails closed.
    Unavailable {
        /// The limit that fails closed.
        limit: Arc<str>,
    },
}

/// The name refusals by the runtime denylist carry.
pub const RUNTIME_DENYLIST: &str = "runtime-denylist";
/// The name passes by the runtime safelist carry.
pub const RUNTIME_SAFELIST: &str = "runtime-safelist";

/// How a limit's decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// By the configured store.
    Store,
    /// By this node's memory, because the store failed (`on_store_error local`).
    Local,
    /// Not at all: the store failed and the limit fails open (`on_store_error allow`).
    Skipped,
    /// Refused by the tier's `blocked` value, without counting.
    Blocked,
    /// Refused without counting: the request has no value for the limit's key and the
    /// limit says `on_missing_key refuse`.
    Refused,
}

/// A limit that matched the request but did not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkippedLimit {
    /// The limit's name.
    pub limit: Arc<str>,
    /// Why it did not apply.
    pub reason: &'static str,
}

/// Why a limit with `on_missing_key skip` did not apply.
pub const SKIPPED_NO_KEY: &str =
    "the request has no value for the limit's key (on_missing_key skip)";

/// One limit that applied to the request, and what it decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReport {
    /// The limit's name.
    pub limit: Arc<str>,
    /// Enforce or shadow.
    pub mode: Mode,
    /// The algorithm's name.
    pub algorithm: &'static str,
    /// The counter key (secrets hashed).
    pub key: String,
    /// The tier, for tiered limits.
    pub tier: Option<Arc<str>>,
    /// The quota and window, in seconds, for `RateLimit-Policy`.
    pub policy: (u64, u64),
    /// The decision.
    pub decision: Decision,
    /// Whether the key was refused because of a ban.
    pub banned: bool,
    /// How the decision was reached.
    pub counted: Counted,
    /// The units this request asked of the limit (0 when nothing was counted).
    pub cost: u64,
}

/// A concurrency lease held by an admitted request, to give back when it ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    key: String,
    id: LeaseId,
    local: bool,
}

/// The engine's answer for one request.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// What to do.
    pub action: Action,
    /// Every limit that applied, highest priority first.
    pub reports: Vec<LimitReport>,
    /// Concurrency leases to give back with [`Engine::release`].
    pub leases: Vec<Lease>,
    /// Limits that matched but did not apply (`on_missing_key skip`), and why.
    pub skipped: Vec<SkippedLimit>,
    /// The plan version that decided.
    pub plan_version: Arc<str>,
    /// How long deciding took.
    pub elapsed: Duration,
    /// The flags (runtime flag entries, set by anomalies) the client carries.
    pub flags: Vec<Arc<str>>,
}

impl Verdict {
    /// Whether the request goes on (allowed, warned, delayed or safelisted).
    pub fn is_allowed(&self) -> bool {
        matches!(
            self.action,
            Action::Allow | Action::Warn | Action::Delay(_) | Action::Bypass { .. }
        )
    }

    /// The report headers should show: the rejecting limit when rejected, else the most
    /// restrictive enforced limit (least remaining, then longest reset).
    pub fn headline(&self) -> Option<&LimitReport> {
        if let Action::Reject { limit, .. } = &self.action {
            return self.reports.iter().find(|r| &r.limit == limit);
        }
        self.reports
            .iter()
            .filter(|r| r.mode == Mode::Enforce && r.counted != Counted::Skipped)
            .min_by(|a, b| {
                a.decision
                    .remaining
                    .cmp(&b.decision.remaining)
                    .then(b.decision.reset.cmp(&a.decision.reset))
            })
    }

    /// Shadow limits that would have rejected this request.
    pub fn shadow_rejections(&self) -> impl Iterator<Item = &LimitReport> {
        self.reports
            .iter()
            .filter(|r| r.mode == Mode::Shadow && !r.decision.allowed)
    }
}

/// Decides requests against the current plan and a store.
pub struct Engine<S, C = SystemClock> {
    plan: ArcSwap<Plan>,
    store: S,
    clock: C,
    hasher: KeyHasher,
    local: MemoryStore,
    local_nodes: NonZeroU64,
    lease_base: u64,
    lease_counter: AtomicU64,
    /// Runtime list entries, as last read from the store.
    runtime: ArcSwap<RuntimeLists>,
    /// How many there are: requests skip the lists without loading them when none.
    runtime_len: AtomicU64,
    /// Where decisions are counted for Prometheus (`None`: nowhere).
    metrics: Option<Arc<Metrics>>,
    /// A failing store is logged once per burst, not once per request.
    store_warnings: crate::telemetry::Burst,
    /// Where decisions go for analytics, and this node's name in them (`None`: nowhere).
    exporter: Option<(crate::analytics::export::Exporter, Arc<str>)>,
    /// The anomaly detectors that count in this node's memory.
    anomalies: crate::anomaly::LocalDetectors,
}

impl<S: std::fmt::Debug, C: std::fmt::Debug> std::fmt::Debug for Engine<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("plan_version", &self.plan.load().version())
            .field("store", &self.store)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl<S: Store> Engine<S, SystemClock> {
    /// An engine on the system clock, hashing secrets with a random key (hashes then agree
    /// only within this process: set a key with [`Engine::with_key_hasher`] for several
    /// nodes).
    pub fn new(plan: Plan, store: S) -> Self {
        Self::with_clock(plan, store, SystemClock)
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// An engine reading time from `clock`.
    pub fn with_clock(plan: Plan, store: S, clock: C) -> Self {
        Engine {
            plan: ArcSwap::from_pointee(plan),
            store,
            clock,
            hasher: KeyHasher::random(),
            local: MemoryStore::with_max_keys(100_000),
            local_nodes: NonZeroU64::MIN,
            // 21 random bits above a 32-bit counter: ids stay below 2^53, so that every
            // JSON client (JavaScript's numbers included) gives them back exactly.
            lease_base: rand::random::<u64>() & LEASE_BASE_BITS,
            lease_counter: AtomicU64::new(0),
            runtime: ArcSwap::from_pointee(RuntimeLists::default()),
            runtime_len: AtomicU64::new(0),
            metrics: None,
            store_warnings: crate::telemetry::Burst::new(crate::telemetry::BURST_WINDOW),
            exporter: None,
            anomalies: crate::anomaly::LocalDetectors::default(),
        }
    }

    /// Counts every decision, its time and the store's in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sends every decision [`Engine::export`]ed to `exporter`, as node `node`.
    pub fn with_exporter(
        mut self,
        exporter: crate::analytics::export::Exporter,
        node: impl Into<Arc<str>>,
    ) -> Self {
        self.exporter = Some((exporter, node.into()));
        self
    }

    /// The analytics rows of `verdict`, when an exporter is set and the request is not
    /// sampled out: the adapters call this once per decided request, with its id, and send
    /// the rows (without waiting) once they know the response's status.
    pub fn export(
        &self,
        verdict: &Verdict,
        request: &RequestCtx,
        request_id: &str,
    ) -> Option<crate::analytics::export::PendingExport> {
        let (exporter, node) = self.exporter.as_ref()?;
        let event = crate::analytics::export::event(
            verdict,
            request,
            &crate::analytics::export::EventContext {
                request_id,
                node,
                hasher: &self.hasher,
                now: self.clock.now(),
                shape: exporter.shape(),
            },
        );
        match event {
            Some(event) => Some(exporter.pending(event)),
            None => {
                let sampled_out = &exporter.stats().sampled_out;
                sampled_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    }

    /// Where decisions are exported, if anywhere.
    pub fn exporter(&self) -> Option<&crate::analytics::export::Exporter> {
        self.exporter.as_ref().map(|(e, _)| e)
    }

    /// The metrics decisions are counted in, if any.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Reads the runtime list entries back from the store (every node does this every
    /// second; a node that changes them does it at once). Returns how many are live.
    pub async fn refresh_runtime_lists(&self) -> Result<usize, StoreError> {
        let entries = self.store.runtime_entries(self.clock.now()).await?;
        let live = entries.len();
        self.runtime.store(Arc::new(RuntimeLists::new(entries)));
        self.runtime_len.store(live as u64, Ordering::Relaxed);
        Ok(live)
    }

    /// The runtime list entries this node applies.
    pub fn runtime_lists(&self) -> Arc<RuntimeLists> {
        self.runtime.load_full()
    }

    /// Adds (or replaces) a runtime list entry, for every node sharing the store.
    pub async fn put_runtime_entry(&self, entry: &RuntimeEntry) -> Result<(), StoreError> {
        self.store.put_runtime_entry(entry).await?;
        self.refresh_runtime_lists().await.map(drop)
    }

    /// Removes a runtime list entry; whether there was one.
    pub async fn remove_runtime_entry(
        &self,
        list: RuntimeList,
        target: &Target,
    ) -> Result<bool, StoreError> {
        let removed = self.store.remove_runtime_entry(list, target).await?;
        self.refresh_runtime_lists().await?;
        Ok(removed)
    }

    /// The hasher secrets in keys are hashed with.
    pub fn key_hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Uses `hasher` for secrets in keys.
    pub fn with_key_hasher(mut self, hasher: KeyHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// Holds up to `max_keys` keys in this node's fallback memory (`on_store_error local`);
    /// 100,000 by default.
    pub fn with_local_max_keys(mut self, max_keys: usize) -> Self {
        self.local = MemoryStore::with_max_keys(max_keys);
        self
    }

    /// Drops expired state this node keeps (the memory store, the fallback memory);
    /// returns how many entries.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.store.sweep(now) + self.local.purge_expired(now)
    }

    /// Live keys dropped to stay within the key caps of this node's memory, since start.
    pub fn evictions(&self) -> u64 {
        self.store.evictions() + self.local.evictions()
    }

    /// How many nodes share the quotas when the store fails: a limit with
    /// `on_store_error local` then counts in this node's memory against its share of the
    /// quota, `limit / nodes` (see [`Quota::share`]). One by default.
    pub fn with_local_share(mut self, nodes: NonZeroU64) -> Self {
        self.local_nodes = nodes;
        self
    }

    /// The current plan.
    pub fn plan(&self) -> Arc<Plan> {
        self.plan.load_full()
    }

    /// The plan serving, without touching its reference count unless kept.
    pub(crate) fn plan_guard(&self) -> arc_swap::Guard<Arc<Plan>> {
        self.plan.load()
    }

    /// The per-node state of the `rate` and `distinct` anomaly detectors.
    pub(crate) fn local_detectors(&self) -> &crate::anomaly::LocalDetectors {
        &self.anomalies
    }

    /// Logs a store failure outside a decision (anomalies), once per burst.
    pub(crate) fn warn_store(&self, error: &StoreError, what: &str) {
        if let Some(suppressed) = self.store_warnings.admit(self.clock.now()) {
            tracing::warn!(%error, suppressed, "counter store failed while counting {what}");
        }
    }

    /// Queues `detection` for analytics, when an exporter is set.
    pub(crate) fn export_anomaly(
        &self,
        detection: &crate::anomaly::Detection,
        key_hash: &str,
        now: Timestamp,
    ) {
        if let Some((exporter, node)) = &self.exporter {
            exporter.send_anomaly(crate::analytics::export::anomaly_row(
                detection, node, key_hash, now,
            ));
        }
    }

    /// Replaces the plan; requests already being decided finish with the old one.
    pub fn swap_plan(&self, plan: Plan) -> Arc<Plan> {
        self.plan.swap(Arc::new(plan))
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Decides one request; when admitted, its counters are consumed.
    pub async fn decide(&self, request: &RequestCtx) -> Verdict {
        self.decide_with(request, None, Counts::Requests, None)
            .await
    }

    /// Decides `amount` units of what some limits count besides requests — WebSocket
    /// messages from the client, bytes of a streamed response — for the request that opened
    /// the stream. Only limits with that `counts` apply; lists do too.
    pub async fn decide_units(&self, request: &RequestCtx, counts: Counts, amount: u64) -> Verdict {
        self.decide_with(request, None, counts, Some(amount)).await
    }

    /// Decides one request against the named limits only, whatever their `match`
    /// conditions say (lists still apply). This is what a route that names its limit in code
    /// uses; names the plan does not have are ignored.
    pub async fn decide_only(&self, request: &RequestCtx, limits: &[Arc<str>]) -> Verdict {
        self.decide_with(request, Some(limits), Counts::Requests, None)
            .await
    }

    async fn decide_with(
        &self,
        request: &RequestCtx,
        only: Option<&[Arc<str>]>,
        counts: Counts,
        amount: Option<u64>,
    ) -> Verdict {
        let plan = self.plan.load();
        let now = self.clock.now();
        let scope = Scope {
            only,
            counts,
            amount,
        };
        let verdict = |action: Action, reports: Vec<LimitReport>, leases, skipped| {
            let (action, flags) = self.runtime_marks(request, &reports, action, now);
            let elapsed = self.clock.now().saturating_since(now);
            if let Some(metrics) = &self.metrics {
                metrics.record_request(&action, elapsed);
            }
            Verdict {
                action,
                reports,
                leases,
                skipped,
                plan_version: Arc::clone(&plan.version),
                elapsed,
                flags,
            }
        };
        if let Some(action) = self.runtime_action(&plan, request, now) {
            return verdict(action, Vec::new(), Vec::new(), Vec::new());
        }
        // Each selected limit becomes a report and an operation as it is found, in this
        // frame: no list of selections is built or moved.
        let mut reports = Vec::new();
        let mut pending: SmallVec<[Pending; 4]> = SmallVec::new();
        let mut applied: SmallVec<[&Limit; 4]> = SmallVec::new();
        let mut blocked = false;
        let selection = select(&plan, request, &self.hasher, now, scope, |s| {
            blocked |= charge(s, &mut reports, &mut pending, &mut applied);
        });
        let skipped = match selection {
            Selection::Bypass(list) => {
                let action = Action::Bypass {
                    list: Arc::clone(&list.name),
                };
                return verdict(action, Vec::new(), Vec::new(), Vec::new());
            }
            Selection::Forbid(deny) => {
                let action = Action::Forbid {
                    status: deny.status,
                    list: Arc::clone(&deny.list.name),
                    reason: deny.reason.clone(),
                    retry_after: None,
                };
                return verdict(action, Vec::new(), Vec::new(), Vec::new());
            }
            Selection::Unauthorized(denied) => {
                let action = Action::Unauthorized {
                    limit: Arc::clone(&denied.limit.name),
                    action: denied.action,
                    policies: denied.answer.policies.clone(),
                };
                return verdict(action, Vec::new(), Vec::new(), Vec::new());
            }
            Selection::Limits { skipped } if skipped.is_empty() => Vec::new(),
            Selection::Limits { skipped } => skipped
                .into_iter()
                .map(|limit| SkippedLimit {
                    limit: Arc::clone(&limit.name),
                    reason: SKIPPED_NO_KEY,
                })
                .collect(),
        };
        if let Some(action) = self.runtime_key_action(&reports, now) {
            return verdict(action, Vec::new(), Vec::new(), Vec::new());
        }
        let (leases, unavailable) = if blocked || pending.is_empty() {
            (Vec::new(), None)
        } else {
            self.count(&mut reports, &pending, &applied, now).await
        };

        let action = if let Some(limit) = unavailable {
            Action::Unavailable { limit }
        } else {
            self.action(&reports, &applied)
        };
        let leases = if matches!(action, Action::Allow | Action::Warn | Action::Delay(_)) {
            leases
        } else {
            Vec::new()
        };
        if let Some(metrics) = &self.metrics {
            metrics.record_limits(&reports, &applied);
        }
        verdict(action, reports, leases, skipped)
    }

    /// What the runtime lists say of the request's address or identity (user, token), if
    /// anything: a denylisted one is refused (403), whatever a safelist says; a safelisted
    /// one passes uncounted, unless a limit's `authorize` that applies to it is denied.
    fn runtime_action(&self, plan: &Plan, request: &RequestCtx, now: Timestamp) -> Option<Action> {
        if self.runtime_len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let lists = self.runtime.load();
        let identity = if lists.has_clients() {
            identity_clients(request, &self.hasher)
        } else {
            SmallVec::new()
        };
        let find = |list| {
            let by_ip = request.client_ip.and_then(|ip| lists.find(list, ip, now));
            by_ip.or_else(|| {
                identity
                    .iter()
                    .find_map(|client| lists.find_client(list, client, now))
            })
        };
        if let Some(entry) = find(RuntimeList::Denylist) {
            return Some(runtime_forbid(entry, now));
        }
        find(RuntimeList::Safelist)?;
        Some(
            match crate::plan::select::authorization_only_for(plan, request, &self.hasher, now) {
                Some(denied) => Action::Unauthorized {
                    limit: Arc::clone(&denied.limit.name),
                    action: denied.action,
                    policies: denied.answer.policies.clone(),
                },
                None => Action::Bypass {
                    list: Arc::from(RUNTIME_SAFELIST),
                },
            },
        )
    }

    /// What the runtime flags and tarpits say of a request decided `action`: its flags, and
    /// an admitted request held as long as the longest tarpit that holds for it.
    fn runtime_marks(
        &self,
        request: &RequestCtx,
        reports: &[LimitReport],
        action: Action,
        now: Timestamp,
    ) -> (Action, Vec<Arc<str>>) {
        if self.runtime_len.load(Ordering::Relaxed) == 0 {
            return (action, Vec::new());
        }
        let lists = self.runtime.load();
        if !lists.has_marks() {
            return (action, Vec::new());
        }
        let identity = identity_clients(request, &self.hasher);
        let keys = reports
            .iter()
            .filter_map(|r| CounterKey::parse(&r.key).map(|k| k.client));
        let clients = identity.iter().map(String::as_str).chain(keys);
        let (flags, hold) = lists.marks(request.client_ip, clients, now);
        let action = match (action, hold) {
            (Action::Allow | Action::Warn, Some(hold)) => Action::Delay(hold),
            (Action::Delay(d), Some(hold)) => Action::Delay(d.max(hold)),
            (action, _) => action,
        };
        (action, flags)
    }

    /// What the runtime lists' client entries say of the keys of the limits selected for a
    /// request (authorized already): a denylisted client is refused, a safelisted one
    /// passes uncounted.
    fn runtime_key_action(&self, reports: &[LimitReport], now: Timestamp) -> Option<Action> {
        if self.runtime_len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let lists = self.runtime.load();
        if !lists.has_clients() {
            return None;
        }
        let find = |list| {
            reports.iter().find_map(|r| {
                let client = CounterKey::parse(&r.key)?.client;
                lists.find_client(list, client, now)
            })
        };
        if let Some(entry) = find(RuntimeList::Denylist) {
            return Some(runtime_forbid(entry, now));
        }
        find(RuntimeList::Safelist).map(|_| Action::Bypass {
            list: Arc::from(RUNTIME_SAFELIST),
        })
    }

    /// Counts the pending operations in the store, all or nothing; when the store fails,
    /// each limit's `on_store_error` decides. Returns the leases taken and, when a limit
    /// fails closed, its name.
    async fn count(
        &self,
        reports: &mut [LimitReport],
        pending: &[Pending],
        applied: &[&Limit],
        now: Timestamp,
    ) -> (Vec<Lease>, Option<Arc<str>>) {
        let lease = self.lease_id(pending);
        let mut leases = Vec::new();
        let batch = ops(pending, reports, lease);
        let result = self.store.apply(&batch, now).await;
        drop(batch);
        if let Some(metrics) = &self.metrics {
            let took = self.clock.now().saturating_since(now);
            metrics.record_store_call(took, result.is_err());
        }
        let error = match result {
            Ok(result) => {
                record(
                    reports,
                    pending,
                    &result,
                    Counted::Store,
                    lease,
                    &mut leases,
                );
                return (leases, None);
            }
            Err(error) => error,
        };
        if matches!(error, StoreError::CircuitOpen) {
            // The breaker logged when it opened; once per request would flood.
            tracing::debug!(%error, "applying each limit's on_store_error");
        } else if let Some(suppressed) = self.store_warnings.admit(now) {
            tracing::warn!(
                %error,
                suppressed,
                "counter store failed; applying each limit's on_store_error (`suppressed`: \
                 failures not logged since the last line)"
            );
        }
        let mut unavailable = None;
        let mut local: SmallVec<[Pending; 4]> = SmallVec::new();
        for p in pending {
            match applied[p.slot].on_store_error {
                StoreErrorMode::Allow => reports[p.slot].counted = Counted::Skipped,
                StoreErrorMode::Deny => {
                    if p.enforce {
                        unavailable.get_or_insert_with(|| Arc::clone(&applied[p.slot].name));
                    }
                    reports[p.slot].counted = Counted::Skipped;
                }
                StoreErrorMode::Local => local.push(Pending {
                    quota: p.quota.share(self.local_nodes),
                    ..*p
                }),
            }
        }
        if unavailable.is_none() && !local.is_empty() {
            let result = self.local.apply_now(&ops(&local, reports, lease), now);
            record(reports, &local, &result, Counted::Local, lease, &mut leases);
        }
        (leases, unavailable)
    }

    /// A lease id only for requests that take a lease: the shared counter is a cache line
    /// every core would otherwise fight over on every request.
    fn lease_id(&self, pending: &[Pending]) -> LeaseId {
        if pending
            .iter()
            .any(|p| matches!(p.quota, Quota::Concurrency(_)))
        {
            let count = self.lease_counter.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF;
            LeaseId(self.lease_base | count)
        } else {
            LeaseId(0)
        }
    }

    /// Rejection, soft action or allow, from the reports of the limits that applied.
    fn action(&self, reports: &[LimitReport], applied: &[&Limit]) -> Action {
        let counted = |r: &LimitReport| r.counted != Counted::Skipped;
        let rejected = reports
            .iter()
            .zip(applied)
            .filter(|(r, _)| r.mode == Mode::Enforce && counted(r) && !r.decision.allowed)
            // Highest priority first; among equals, the longest wait.
            .max_by(|(a, la), (b, lb)| {
                la.priority
                    .cmp(&lb.priority)
                    .then(a.decision.retry_after.cmp(&b.decision.retry_after))
            });
        if let Some((report, limit)) = rejected {
            let reason = if report.counted == Counted::Refused {
                Some(Arc::from(format!(
                    "limit `{}` cannot tell who is asking: the request has no value for its key",
                    limit.name
                )))
            } else {
                limit.on_exceed.reason.clone()
            };
            return Action::Reject {
                status: limit.on_exceed.status,
                limit: Arc::clone(&limit.name),
                reason,
                retry_after: report.decision.retry_after,
            };
        }
        let mut soft: Option<SoftAction> = None;
        for (report, limit) in reports.iter().zip(applied) {
            if report.mode != Mode::Enforce || !counted(report) {
                continue;
            }
            let used = report.decision.used_percent();
            if let Some(step) = limit
                .soft
                .iter()
                .rev()
                .find(|s| used >= u64::from(s.at_percent))
            {
                soft = soft.max(Some(step.action));
            }
        }
        match soft {
            None => Action::Allow,
            Some(SoftAction::Warn) => Action::Warn,
            Some(SoftAction::Delay(d)) => Action::Delay(d),
        }
    }

    /// Gives back the concurrency leases an admitted request holds; call when its response
    /// ends (or it is dropped).
    pub async fn release(&self, leases: &[Lease]) {
        let now = self.clock.now();
        for lease in leases {
            if lease.local {
                self.local.release_now(&lease.key, lease.id, now);
            } else {
                match self.store.release(&lease.key, lease.id, now).await {
                    Ok(()) => {}
                    // The breaker logged when it opened; once per lease would flood.
                    Err(StoreError::CircuitOpen) => {}
                    Err(error) => {
                        tracing::warn!(%error, "could not release a concurrency lease; it will expire");
                    }
                }
            }
        }
    }

    /// The engine's time now.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

/// One selected limit as a report (the store fills in its decision), an operation to count
/// and the limit, in the same order; returns whether it refuses without counting.
#[inline]
fn charge<'p>(
    selected: Selected<'p>,
    reports: &mut Vec<LimitReport>,
    pending: &mut SmallVec<[Pending; 4]>,
    applied: &mut SmallVec<[&'p Limit; 4]>,
) -> bool {
    let Selected {
        limit,
        tier,
        key,
        charge,
        authorization,
        ..
    } = selected;
    if let Some(answer) = authorization.filter(|a| !a.allowed) {
        // Only a limit in shadow mode gets here with a denial: reported, not enforced.
        tracing::info!(
            limit = %limit.name,
            policies = ?answer.policies,
            "shadow: Cedar denies this request's authorization"
        );
    }
    let (algorithm, policy, counted, allowed, cost) = match charge {
        Charge::Count { quota, cost } => {
            pending.push(Pending {
                slot: reports.len(),
                quota,
                cost,
                enforce: limit.mode == Mode::Enforce,
                ban: limit.on_exceed.ban,
                sync: limit.sync,
            });
            (
                quota.algorithm(),
                quota.policy(),
                Counted::Store,
                true,
                cost,
            )
        }
        Charge::Blocked => ("blocked", (0, 0), Counted::Blocked, false, 0),
        Charge::Refused => ("refused", (0, 0), Counted::Refused, false, 0),
    };
    reports.push(LimitReport {
        limit: Arc::clone(&limit.name),
        mode: limit.mode,
        algorithm,
        key: key.into(),
        tier,
        policy,
        decision: Decision {
            allowed,
            limit: policy.0,
            remaining: policy.0,
            reset: Duration::ZERO,
            retry_after: None,
        },
        banned: false,
        counted,
        cost,
    });
    applied.push(limit);
    !allowed && limit.mode == Mode::Enforce
}

/// One limit's operation, before it borrows its key from the reports.
#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: usize,
    quota: Quota,
    cost: u64,
    enforce: bool,
    ban: Option<Duration>,
    sync: Option<Duration>,
}

/// The refusal a runtime denylist entry gives.
fn runtime_forbid(entry: &RuntimeEntry, now: Timestamp) -> Action {
    Action::Forbid {
        status: StatusCode::FORBIDDEN,
        list: Arc::from(RUNTIME_DENYLIST),
        reason: entry.reason.as_deref().map(Arc::from),
        retry_after: entry
            .until
            .map(|until| Duration::from_micros(until.saturating_sub(now.as_micros()))),
    }
}

/// The request's own identity as counter keys name it (`user:…`, `token:<hash>`), for the
/// runtime lists' client entries.
fn identity_clients(request: &RequestCtx, hasher: &KeyHasher) -> SmallVec<[String; 2]> {
    [KeySource::UserId, KeySource::ApiToken]
        .iter()
        .filter_map(|source| {
            let mut out = String::new();
            source.write(request, None, hasher, &mut out).then_some(out)
        })
        .collect()
}

/// The store operations for `pending`, keyed by their reports' keys.
fn ops<'a>(
    pending: &[Pending],
    reports: &'a [LimitReport],
    lease: LeaseId,
) -> SmallVec<[Op<'a>; 4]> {
    pending
        .iter()
        .map(|p| Op {
            key: &reports[p.slot].key,
            quota: p.quota,
            cost: p.cost,
            enforce: p.enforce,
            ban: p.ban,
            lease,
            sync: p.sync,
        })
        .collect()
}

/// Copies a store's results into the reports and collects the leases taken.
fn record(
    reports: &mut [LimitReport],
    pending: &[Pending],
    result: &BatchResult,
    counted: Counted,
    lease: LeaseId,
    leases: &mut Vec<Lease>,
) {
    for (p, r) in pending.iter().zip(&result.results) {
        let report = &mut reports[p.slot];
        report.decision = r.decision;
        report.banned = r.banned;
        report.counted = counted;
        if result.admitted && r.decision.allowed && matches!(p.quota, Quota::Concurrency(_)) {
            leases.push(Lease {
                key: report.key.clone(),
                id: lease,
                local: counted == Counted::Local,
            });
        }
    }
}

pub use crate::plan::select::resolve_tier;
