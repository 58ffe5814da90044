//! What a decision is, as data: the [`Verdict`] on one request, the [`LimitReport`] of each
//! limit that applied, and the [`Detection`] of an anomaly. The bottom of the house above
//! the plan: the engine makes these, and everything above it — responses, metrics, logs,
//! exports, anomalies — reads them, without going back to the engine.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota};
use crate::plan::key::CounterKey;
use crate::plan::{AnomalyActions, Mode, PlanVersion, PolicyHeaders, SoftAction, SoftStep, Usage};

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

impl Action {
    /// Whether the request goes on (allowed, warned, delayed or safelisted).
    pub fn is_allowed(&self) -> bool {
        matches!(
            self,
            Action::Allow | Action::Warn | Action::Delay(_) | Action::Bypass { .. }
        )
    }

    /// What was done, as `tollgate_requests_total{outcome}`, the request's span and the
    /// decision API (`allow`, `reject`, `store_error`, …) name it, and the list or limit
    /// that did it (empty for an admission no rule decided).
    pub fn outcome(&self) -> (&'static str, &str) {
        match self {
            Action::Allow => ("allow", ""),
            Action::Warn => ("warn", ""),
            Action::Delay(_) => ("delay", ""),
            Action::Bypass { list } => ("bypass", list),
            Action::Reject { limit, .. } => ("reject", limit),
            Action::Forbid { list, .. } => ("forbid", list),
            Action::Unauthorized { limit, .. } => ("unauthorized", limit),
            Action::Unavailable { limit } => ("store_error", limit),
        }
    }
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
    /// In this node's memory by design: an adaptive concurrency limit, admission control.
    Node,
    /// Refused by the tier's `blocked` value, without counting.
    Blocked,
    /// Refused without counting: the request has no value for the limit's key and the
    /// limit says `on_missing_key refuse`.
    Refused,
}

/// What one limit did to one request: the label of `tollgate_decisions_total` and the
/// `decision` of its analytics row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted, well below the limit.
    Allow,
    /// Admitted, with [`NEAR_LIMIT_PERCENT`] or more of the limit used.
    NearLimit,
    /// Admitted past a soft `warn` threshold.
    Warn,
    /// Admitted past a soft `delay` threshold.
    Delay,
    /// Refused.
    Reject,
    /// Over the limit in shadow mode: reported, not refused.
    ShadowReject,
    /// The store failed; the limit's `on_store_error` decided.
    StoreError,
}

/// From this share of a limit used, an admitted request is `near_limit`.
pub const NEAR_LIMIT_PERCENT: u64 = 80;

impl Outcome {
    /// Every outcome, in the order of their indexes (`outcome as usize`).
    pub const ALL: [Outcome; 7] = [
        Outcome::Allow,
        Outcome::NearLimit,
        Outcome::Warn,
        Outcome::Delay,
        Outcome::Reject,
        Outcome::ShadowReject,
        Outcome::StoreError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::NearLimit => "near_limit",
            Outcome::Warn => "warn",
            Outcome::Delay => "delay",
            Outcome::Reject => "reject",
            Outcome::ShadowReject => "shadow_reject",
            Outcome::StoreError => "store_error",
        }
    }

    /// What a limit with soft thresholds `soft` did, in `mode`, from how it `counted` and
    /// its `decision`.
    pub fn of(counted: Counted, mode: Mode, decision: &Decision, soft: &[SoftStep]) -> Outcome {
        if matches!(counted, Counted::Skipped | Counted::Local) {
            return Outcome::StoreError;
        }
        if !decision.allowed {
            return if mode == Mode::Shadow {
                Outcome::ShadowReject
            } else {
                Outcome::Reject
            };
        }
        let used = decision.used_percent();
        match soft_step(soft, used) {
            Some(SoftAction::Delay(_)) => Outcome::Delay,
            Some(SoftAction::Warn) => Outcome::Warn,
            None if used >= NEAR_LIMIT_PERCENT => Outcome::NearLimit,
            None => Outcome::Allow,
        }
    }
}

/// The soft action of the highest threshold `used` percent reaches, if any.
pub fn soft_step(soft: &[SoftStep], used: u64) -> Option<SoftAction> {
    soft.iter()
        .rev()
        .find(|s| used >= u64::from(s.at_percent))
        .map(|s| s.action)
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
    /// The counter key (secrets hashed), with its parts.
    pub key: CounterKey,
    /// The tier, for tiered limits.
    pub tier: Option<Arc<str>>,
    /// The quota and window, in seconds, for `RateLimit-Policy`.
    pub policy: (u64, u64),
    /// The quota's constant header values, made with the plan (`None`: made when needed).
    pub headers: Option<Arc<PolicyHeaders>>,
    /// The decision.
    pub decision: Decision,
    /// Whether the key was refused because of a ban.
    pub banned: bool,
    /// How the decision was reached.
    pub counted: Counted,
    /// What the limit did, soft thresholds included.
    pub outcome: Outcome,
    /// The units this request asked of the limit (0 when nothing was counted).
    pub cost: u64,
}

/// What an admitted request reserved on a limit whose cost its response says (`cost
/// response …`), settled when the request completes.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The limit's namespace.
    pub namespace: Arc<str>,
    /// The limit.
    pub limit: Arc<str>,
    /// The counter key, as the store knows it.
    pub key: String,
    /// The quota it was counted under.
    pub quota: Quota,
    /// What was counted.
    pub reserved: u64,
    /// When it was counted.
    pub counted_at: Timestamp,
    /// How the response's usage is read.
    pub usage: Arc<Usage>,
    /// Counted in this node's memory (the store failed: `on_store_error local`).
    pub local: bool,
}

impl Reservation {
    /// What a request counted on `limit` reserves (`reserved` under `quota`, on `key`, at
    /// `counted_at`; `local`: in this node's memory), when the limit's cost its response
    /// says; `None` for any other limit.
    pub(crate) fn of(
        limit: &crate::plan::Limit,
        key: &CounterKey,
        quota: Quota,
        reserved: u64,
        counted_at: Timestamp,
        local: bool,
    ) -> Option<Reservation> {
        let usage = limit.usage.as_ref()?;
        Some(Reservation {
            namespace: Arc::clone(&limit.namespace),
            limit: Arc::clone(&limit.name),
            key: key.to_string(),
            quota,
            reserved,
            counted_at,
            usage: Arc::clone(usage),
            local,
        })
    }

    /// What the request used, given what the response said (`None`: nothing): that, else
    /// the limit's `default`, else the reservation.
    pub fn used(&self, said: Option<u64>) -> u64 {
        said.or(self.usage.default).unwrap_or(self.reserved)
    }
}

/// A concurrency lease held by an admitted request, to give back when it ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    key: String,
    id: LeaseId,
    local: bool,
}

impl Lease {
    /// The lease `id` on `key`, taken in the store or (`local`) in this node's memory.
    pub(crate) fn new(key: String, id: LeaseId, local: bool) -> Lease {
        Lease { key, id, local }
    }

    /// The key it is held on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Its id.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Whether it was taken in this node's memory (the store had failed).
    pub fn is_local(&self) -> bool {
        self.local
    }
}

/// The counting call of a decision to the store: how long it took, and how it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    /// How long it took.
    pub took: Duration,
    /// Why it failed (each limit's `on_store_error` then decided), if it did.
    pub error: Option<Box<StoreFailure>>,
}

/// A failed counting call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    /// The store's error, in words.
    pub message: String,
    /// The circuit breaker was open: the store was not called (the breaker logged once).
    pub circuit_open: bool,
}

/// The engine's answer for one request.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// What to do.
    pub action: Action,
    /// Every limit that applied, highest priority first.
    pub reports: Vec<LimitReport>,
    /// Concurrency leases to give back when the request ends.
    pub leases: Vec<Lease>,
    /// What the adaptive limits that admitted the request learn from when it ends (its slot
    /// in flight is held until then).
    pub adaptive: Vec<Arc<crate::store::adaptive::Ticket>>,
    /// Reservations to settle when the request ends.
    pub reservations: Vec<Reservation>,
    /// Limits that matched but did not apply (`on_missing_key skip`), and why.
    pub skipped: Vec<SkippedLimit>,
    /// The plan version that decided.
    pub plan_version: PlanVersion,
    /// When deciding started.
    pub decided_at: Timestamp,
    /// How long deciding took.
    pub elapsed: Duration,
    /// The counting call, when the store was asked.
    pub store_call: Option<StoreCall>,
    /// The flags (runtime flag entries, set by anomalies) the client carries.
    pub flags: Vec<Arc<str>>,
}

impl Verdict {
    /// Whether the request goes on (allowed, warned, delayed or safelisted).
    pub fn is_allowed(&self) -> bool {
        self.action.is_allowed()
    }

    /// The report headers should show: the rejecting limit when rejected, else the most
    /// restrictive enforced limit (least remaining, then longest reset). Admission control
    /// alone counts nothing down: it is never the headline of an admitted request.
    pub fn headline(&self) -> Option<&LimitReport> {
        if let Action::Reject { limit, .. } = &self.action {
            return self.reports.iter().find(|r| &r.limit == limit);
        }
        let counts_down = |r: &&LimitReport| r.counted != Counted::Node || r.decision.limit > 0;
        self.reports
            .iter()
            .filter(counts_down)
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

    /// Whether this is a plain admission: allowed or safelisted, every limit within its
    /// quota and counted in the store (no refusal, soft action, shadow rejection or store
    /// error). Sampling of analytics applies to these only.
    pub fn is_plain_admission(&self) -> bool {
        matches!(self.action, Action::Allow | Action::Bypass { .. })
            && self.reports.iter().all(|r| {
                r.decision.allowed && !matches!(r.counted, Counted::Skipped | Counted::Local)
            })
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
    pub key: CounterKey,
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
    pub plan_version: PlanVersion,
    /// When it was detected.
    pub at: Timestamp,
}
