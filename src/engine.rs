//! The decision engine: plan × request × store → [`Verdict`].
//!
//! A thin async orchestrator around pure parts: lists, then the route index and conditions,
//! then tiers and keys, then one atomic [`Store::apply`] for every limit that applies, then
//! soft thresholds, shadow mode and priorities decide what the client sees.

mod adaptive;
mod count;
mod runtime;
mod settle;

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use self::count::{Pending, charge, ops};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::plan::select::{Scope, Selection, select};
use crate::plan::{Counts, KeyHasher, Limit, Mode, Plan, SoftAction};
use crate::request::RequestCtx;
use crate::store::adaptive::{Controllers, Ticket};
use crate::store::runtime::RuntimeLists;
use crate::store::{MemoryStore, Store, StoreError};
use crate::verdict::{
    Action, Counted, Lease, LimitReport, Outcome, SKIPPED_NO_KEY, SkippedLimit, StoreCall, Verdict,
    soft_step,
};

/// The bits of a lease id chosen at random per engine: 32 to 52.
const LEASE_BASE_BITS: u64 = ((1 << 53) - 1) & !0xFFFF_FFFF;

/// Decides requests against the current plan and a store: select → count → action. What
/// becomes of a verdict (responses, metrics, logs, exports, anomalies) is the pipeline's
/// and its observers' (`crate::pipeline`).
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
    /// The adaptive limits' controllers, per limit and key.
    adaptive: Controllers,
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
            adaptive: Controllers::default(),
        }
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
    /// quota, `limit / nodes` (see [`Quota::share`](crate::limiter::Quota::share)). One by
    /// default.
    pub fn with_local_share(mut self, nodes: NonZeroU64) -> Self {
        self.local_nodes = nodes;
        self
    }

    /// The current plan.
    pub fn plan(&self) -> Arc<Plan> {
        self.plan.load_full()
    }

    /// The plan serving, without touching its reference count unless kept.
    pub fn plan_guard(&self) -> arc_swap::Guard<Arc<Plan>> {
        self.plan.load()
    }

    /// Replaces the plan; requests already being decided finish with the old one.
    pub fn swap_plan(&self, plan: Plan) -> Arc<Plan> {
        self.prune_adaptive(&plan);
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

    /// The engine's time now.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
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

    /// Decides one request now, without waiting, when the store answers in this process
    /// (the memory store): what [`Engine::decide`] (or, with `only`, [`Engine::decide_only`])
    /// would answer; `None` when the store must be waited for (Redis): then call those.
    pub fn decide_now(&self, request: &RequestCtx, only: Option<&[Arc<str>]>) -> Option<Verdict> {
        if !self.store.answers_now() {
            return None;
        }
        let plan = self.plan.load();
        let now = self.clock.now();
        let mut d = Deciding::new(&plan, now);
        self.begin(&mut d, request, Scope::only(only));
        if d.counts() {
            let lease = self.lease_id(&d.pending);
            let result = self
                .store
                .try_apply(&ops(&d.pending, &d.reports, lease), now)?;
            self.counted(&mut d, lease, result);
        }
        Some(self.end(request, &mut d))
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
        let mut d = Deciding::new(&plan, now);
        self.begin(&mut d, request, scope);
        if d.counts() {
            let lease = self.lease_id(&d.pending);
            let result = self
                .store
                .apply(&ops(&d.pending, &d.reports, lease), now)
                .await;
            self.counted(&mut d, lease, result);
        }
        self.end(request, &mut d)
    }

    /// Everything before counting: the runtime lists, the selection (each selected limit a
    /// report and an operation, in this frame: no list of selections is built or moved),
    /// the runtime lists' client entries.
    fn begin<'p>(&self, d: &mut Deciding<'p>, request: &RequestCtx, scope: Scope<'_>) {
        let (plan, now) = (d.plan, d.now);
        if let Some(action) = self.runtime_action(plan, request, now) {
            d.early = Some(action);
            return;
        }
        let (reports, pending, applied) = (&mut d.reports, &mut d.pending, &mut d.applied);
        let mut blocked = false;
        let selection = select(plan, request, &self.hasher, now, scope, |s| {
            blocked |= charge(s, reports, pending, applied);
        });
        d.blocked = blocked;
        match selection_action(selection) {
            Ok(skipped) => d.skipped = skipped,
            Err(action) => d.early = Some(action),
        }
        if d.early.is_none() {
            d.early = self.runtime_key_action(&d.reports, now);
        }
        if d.early.is_none() && !d.blocked {
            self.decide_adaptive(d);
        }
    }

    /// The verdict: the action (a rejection, a soft action or allow), the runtime marks.
    fn end(&self, request: &RequestCtx, d: &mut Deciding<'_>) -> Verdict {
        let mut reports = std::mem::take(&mut d.reports);
        let mut leases = std::mem::take(&mut d.leases);
        let mut tickets = std::mem::take(&mut d.tickets);
        self::adaptive::overrule(&mut reports, &d.overruled);
        let action = match (d.early.take(), d.unavailable.take()) {
            (Some(action), _) => {
                reports.clear();
                leases.clear();
                action
            }
            (None, unavailable) => {
                for (report, limit) in reports.iter_mut().zip(&d.applied) {
                    report.outcome =
                        Outcome::of(report.counted, report.mode, &report.decision, &limit.soft);
                }
                match unavailable {
                    Some(limit) => Action::Unavailable { limit },
                    None => action(&reports, &d.applied),
                }
            }
        };
        let goes_on = matches!(action, Action::Allow | Action::Warn | Action::Delay(_));
        if !goes_on {
            leases.clear();
            // Given back as they drop: the request never reaches the upstream.
            tickets.clear();
        }
        let reservations = if goes_on {
            self.reservations(d, &reports)
        } else {
            Vec::new()
        };
        let (action, flags) = self.runtime_marks(request, &reports, action, d.now);
        Verdict {
            action,
            reports,
            leases,
            adaptive: tickets,
            reservations,
            skipped: std::mem::take(&mut d.skipped),
            plan_version: d.plan.plan_version(),
            decided_at: d.now,
            // One reading of the clock when the store was asked: when it answered.
            elapsed: d
                .counted_at
                .unwrap_or_else(|| self.clock.now())
                .saturating_since(d.now),
            store_call: d.store_call.take(),
            flags,
        }
    }

    /// Gives back the concurrency leases an admitted request holds; call when its response
    /// ends (or it is dropped).
    pub async fn release(&self, leases: &[Lease]) {
        let now = self.clock.now();
        for lease in leases {
            if lease.is_local() {
                self.local.release_now(lease.key(), lease.id(), now);
            } else {
                match self.store.release(lease.key(), lease.id(), now).await {
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
}

/// A decision under way, between selection and counting.
struct Deciding<'p> {
    plan: &'p Plan,
    now: Timestamp,
    /// When the store answered, if it was asked.
    counted_at: Option<Timestamp>,
    reports: Vec<LimitReport>,
    pending: SmallVec<[Pending; 4]>,
    applied: SmallVec<[&'p Limit; 4]>,
    /// A limit refuses without counting (a blocked tier, a missing key refused).
    blocked: bool,
    leases: Vec<Lease>,
    /// What adaptive limits admitted the request with.
    tickets: Vec<Arc<Ticket>>,
    /// Limits counted in the store whose admission control refused the request.
    overruled: SmallVec<[usize; 2]>,
    skipped: Vec<SkippedLimit>,
    store_call: Option<StoreCall>,
    /// The limit that fails closed, when the store failed.
    unavailable: Option<Arc<str>>,
    /// What a list, Cedar or a runtime entry decided before anything is counted.
    early: Option<Action>,
}

impl<'p> Deciding<'p> {
    fn new(plan: &'p Plan, now: Timestamp) -> Self {
        Deciding {
            plan,
            now,
            counted_at: None,
            reports: Vec::new(),
            pending: SmallVec::new(),
            applied: SmallVec::new(),
            blocked: false,
            leases: Vec::new(),
            tickets: Vec::new(),
            overruled: SmallVec::new(),
            skipped: Vec::new(),
            store_call: None,
            unavailable: None,
            early: None,
        }
    }

    /// Whether the store is to be asked.
    fn counts(&self) -> bool {
        self.early.is_none() && !self.blocked && !self.pending.is_empty()
    }
}

/// What a selection says before anything is counted: the limits that did not apply, or the
/// action of a list or Cedar that decided alone.
fn selection_action(selection: Selection<'_>) -> Result<Vec<SkippedLimit>, Action> {
    match selection {
        Selection::Bypass(list) => Err(Action::Bypass {
            list: Arc::clone(&list.name),
        }),
        Selection::Forbid(deny) => Err(Action::Forbid {
            status: deny.status,
            list: Arc::clone(&deny.list.name),
            reason: deny.reason.clone(),
            retry_after: None,
        }),
        Selection::Unauthorized(denied) => Err(Action::Unauthorized {
            limit: Arc::clone(&denied.limit.name),
            action: denied.action,
            policies: denied.answer.policies.clone(),
        }),
        Selection::Limits { skipped } => Ok(skipped
            .into_iter()
            .map(|limit| SkippedLimit {
                limit: Arc::clone(&limit.name),
                reason: SKIPPED_NO_KEY,
            })
            .collect()),
    }
}

/// Rejection, soft action or allow, from the reports of the limits that applied.
fn action(reports: &[LimitReport], applied: &[&Limit]) -> Action {
    let counted = |r: &LimitReport| r.counted != Counted::Skipped;
    let mut soft: Option<SoftAction> = None;
    for (report, limit) in reports.iter().zip(applied) {
        if report.mode == Mode::Enforce && counted(report) && report.decision.allowed {
            soft = soft.max(soft_step(&limit.soft, report.decision.used_percent()));
        }
    }
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
    match soft {
        None => Action::Allow,
        Some(SoftAction::Warn) => Action::Warn,
        Some(SoftAction::Delay(d)) => Action::Delay(d),
    }
}
