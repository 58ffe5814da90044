//! The decision plan: policies compiled into values that cannot hold an invalid limit.
//!
//! [`compile`] resolves every name, checks every rate and window, compiles route templates
//! into one [`RouteIndex`], and reports every problem of the whole file set at once. A
//! [`Plan`] is immutable; a new version replaces it whole.

pub mod adaptive;
mod compile;
pub mod condition;
mod cost;
pub mod ipset;
pub mod key;
mod replaces;
pub mod route;
pub mod select;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

pub use self::compile::compile;
pub use self::condition::Condition;
pub use self::cost::{Amount, Cost, Usage, describe_usage};
pub use self::key::{KeyHasher, KeySpec};
pub use self::route::{RouteIndex, RouteMatches};
use crate::diagnostic::PolicyError;
use crate::limiter::Quota;
pub use crate::request::ValueFrom;

/// A plan's version: the first 16 hex digits of the content hash of its sources, held
/// inline (a verdict copies it: no reference count shared by every request).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanVersion([u8; 16]);

impl PlanVersion {
    /// The version of a hash's hex digits (the first 16; shorter input is padded with `0`).
    pub fn from_hex(hex: &str) -> Self {
        let mut digits = [b'0'; 16];
        for (slot, b) in digits
            .iter_mut()
            .zip(hex.bytes().filter(u8::is_ascii_hexdigit))
        {
            *slot = b;
        }
        PlanVersion(digits)
    }

    /// The 16 hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are stored.
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

impl std::ops::Deref for PlanVersion {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for PlanVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for PlanVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlanVersion({})", self.as_str())
    }
}

/// A compiled, validated set of policies.
#[derive(Debug)]
pub struct Plan {
    pub(crate) version: PlanVersion,
    pub(crate) limits: Vec<Limit>,
    /// Whether a limit `counts bytes` (the proxy then paces streamed bodies).
    pub(crate) counts_bytes: bool,
    /// Whether a limit reserves from the request's JSON body (`reserve json(…)`).
    pub(crate) reads_request_json: bool,
    pub(crate) routes: RouteIndex,
    pub(crate) safelists: Vec<ListRule>,
    pub(crate) denylists: Vec<DenyRule>,
    pub(crate) anomalies: Vec<Anomaly>,
    pub(crate) tiers: Vec<TierTable>,
    pub(crate) cedar_imports: Vec<CedarImport>,
    /// The imported Cedar policy sets, loaded and validated.
    pub(crate) cedar: Vec<Arc<crate::authz::CedarSet>>,
    /// The `.rl` files it was compiled from.
    pub(crate) sources: Vec<Arc<str>>,
    pub(crate) warnings: Vec<PolicyError>,
}

impl Plan {
    /// The content hash of the sources this plan was compiled from.
    pub fn version(&self) -> &str {
        self.version.as_str()
    }

    /// The content hash, as a value every verdict carries (copied, never counted).
    pub fn plan_version(&self) -> PlanVersion {
        self.version
    }

    /// Whether a limit `counts bytes`: streamed response bodies are then paced.
    pub fn counts_bytes(&self) -> bool {
        self.counts_bytes
    }

    /// Whether a limit reserves from the request's JSON body (`reserve json(…)`): the body
    /// is then read before deciding (see `middleware::ReadJsonBodyLayer`).
    pub fn reads_request_json(&self) -> bool {
        self.reads_request_json
    }

    /// The limits, highest priority first (then by name).
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// A limit by name.
    pub fn limit(&self, name: &str) -> Option<&Limit> {
        self.limits.iter().find(|l| &*l.name == name)
    }

    /// The safelists.
    pub fn safelists(&self) -> &[ListRule] {
        &self.safelists
    }

    /// The denylists.
    pub fn denylists(&self) -> &[DenyRule] {
        &self.denylists
    }

    /// The anomaly detectors.
    pub fn anomalies(&self) -> &[Anomaly] {
        &self.anomalies
    }

    /// The tier tables.
    pub fn tier_tables(&self) -> &[TierTable] {
        &self.tiers
    }

    /// Problems worth reading that did not stop the plan (a key that may have no value).
    pub fn warnings(&self) -> &[PolicyError] {
        &self.warnings
    }

    /// The Cedar files the policies import.
    pub fn cedar_imports(&self) -> &[CedarImport] {
        &self.cedar_imports
    }

    /// The `.rl` files the plan was compiled from.
    pub fn source_files(&self) -> &[Arc<str>] {
        &self.sources
    }

    /// The imported Cedar policy sets, in import order.
    pub fn cedar(&self) -> &[Arc<crate::authz::CedarSet>] {
        &self.cedar
    }

    /// Keeps at most `capacity` Cedar answers per policy set, each for `ttl` (zero: none),
    /// instead of the defaults (100,000 answers, 1 s). Call before the plan is shared.
    pub fn with_cedar_cache(mut self, capacity: usize, ttl: std::time::Duration) -> Self {
        for set in &mut self.cedar {
            if let Some(set) = Arc::get_mut(set) {
                set.set_cache(crate::authz::AnswerCache::new(
                    capacity,
                    crate::clock::micros(ttl),
                ));
            }
        }
        self
    }

    /// The route matcher shared by every rule of the plan.
    pub fn routes(&self) -> &RouteIndex {
        &self.routes
    }
}

/// One named limit.
#[derive(Debug)]
pub struct Limit {
    /// Its name, unique in the plan.
    pub name: Arc<str>,
    /// The namespace its counters live in.
    pub namespace: Arc<str>,
    /// When it applies.
    pub condition: Condition,
    /// Whether it is for Envoy rate-limit requests (its conditions name `domain` or
    /// `descriptor`), not for HTTP requests.
    pub for_descriptors: bool,
    /// The limits that count none of an Envoy request's descriptors when one of them meets
    /// this limit (`replaces`).
    pub replaces: Box<[Arc<str>]>,
    /// What it counts by.
    pub key: KeySpec,
    /// How much it allows.
    pub rate: LimitRate,
    /// What one request costs (with `usage`: what it reserves).
    pub cost: Cost,
    /// A cost known after the response, settled against the reservation.
    pub usage: Option<Arc<Usage>>,
    /// Soft thresholds before the hard limit, lowest first.
    pub soft: Vec<SoftStep>,
    /// What happens over the limit.
    pub on_exceed: OnExceed,
    /// Enforce, shadow or off.
    pub mode: Mode,
    /// What to do when the store fails.
    pub on_store_error: StoreErrorMode,
    /// What a request whose key has no value meets.
    pub on_missing_key: MissingKey,
    /// Higher goes first, and its rejection is the one reported.
    pub priority: i32,
    /// What it counts.
    pub counts: Counts,
    /// The Cedar permit a request needs (`authorize action "…"`), if any.
    pub authorize: Option<Authorize>,
    /// Local-first (`sync every …`): each node decides from its own count and the last
    /// global one, and sends its counts to the store once per this interval.
    pub sync: Option<Duration>,
    /// Counted across regions (`global;`), and what it does while its region has not heard
    /// from another.
    pub global: Option<OnPartition>,
    /// What it decides in each node's memory (adaptive concurrency, admission control).
    pub adaptive: Option<Arc<adaptive::Adaptive>>,
    /// The header values that depend on the limit and its quota only, made once: one per
    /// value of its rate (per tier, in the table's order), `None` for a value without a
    /// quota (`unlimited`, `blocked`).
    pub headers: Vec<Option<Arc<PolicyHeaders>>>,
}

/// A quota's constant header values: `X-RateLimit-Limit` and `RateLimit-Policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyHeaders {
    /// `X-RateLimit-Limit`: the quota.
    pub limit: http::HeaderValue,
    /// `RateLimit-Policy`: `"name";q=quota;w=window`.
    pub policy: http::HeaderValue,
}

impl PolicyHeaders {
    /// The values for limit `name` with `value`; `None` without a quota (or for a name no
    /// header can hold).
    pub fn of(name: &str, value: &TierValue) -> Option<Arc<PolicyHeaders>> {
        let TierValue::Quota(quota) = value else {
            return None;
        };
        let (q, w) = quota.policy();
        let mut digits = itoa::Buffer::new();
        let mut policy = String::with_capacity(name.len() + 32);
        policy.push('"');
        policy.push_str(name);
        policy.push_str("\";q=");
        policy.push_str(digits.format(q));
        policy.push_str(";w=");
        policy.push_str(digits.format(w));
        Some(Arc::new(PolicyHeaders {
            limit: http::HeaderValue::from(q),
            policy: http::HeaderValue::try_from(policy).ok()?,
        }))
    }
}

/// `authorize action "read";`: Cedar must permit the action, or the request is refused.
#[derive(Debug, Clone)]
pub struct Authorize {
    /// The Cedar policy set asked (an index into the plan's Cedar sets).
    pub cedar: usize,
    /// The action.
    pub action: Arc<str>,
}

/// What a limit does with a request whose key has no value (a user limit, an anonymous
/// request; a token that does not verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MissingKey {
    /// Count it by the client's address, as `key ip` would (the default): hiding the key
    /// does not escape the limit. Without an address either, all such requests share one
    /// counter.
    Ip,
    /// The limit does not apply to it; the decision lists it as skipped.
    Skip,
    /// Refuse it with the limit's status and a reason naming the missing key.
    Refuse,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counts {
    /// Requests (the default), decided before the request goes on.
    Requests,
    /// WebSocket messages from the client, decided for each message.
    Messages,
    /// Bytes of streamed response bodies, decided for each chunk.
    Bytes,
}

/// A limit's rate: fixed, or chosen by the request's tier.
#[derive(Debug, Clone)]
pub enum LimitRate {
    /// The same for every request.
    Fixed(TierValue),
    /// Chosen by tier: `values[i]` is the value for tier `i` of the table.
    Tiered {
        /// Index into [`Plan::tier_tables`].
        table: usize,
        /// The entry's name, for explanations.
        entry: Arc<str>,
        /// One value per tier of the table.
        values: Box<[TierValue]>,
    },
}

/// What a limit allows for one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierValue {
    /// Counted against this quota.
    Quota(Quota),
    /// Not limited.
    Unlimited,
    /// Always refused.
    Blocked,
}

/// A soft threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftStep {
    /// Share of the limit in use, in percent, from which the step applies.
    pub at_percent: u8,
    /// What it does.
    pub action: SoftAction,
}

/// What a soft threshold does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SoftAction {
    /// Adds a warning header and logs.
    Warn,
    /// Holds the request this long before passing it on.
    Delay(Duration),
}

/// What happens when a request exceeds the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnExceed {
    /// The status of the rejection.
    pub status: StatusCode,
    /// The reason shown to the client.
    pub reason: Option<Arc<str>>,
    /// How long the key stays refused afterwards.
    pub ban: Option<Duration>,
}

/// Whether a limit rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Counts and rejects.
    Enforce,
    /// Counts, reports what it would do, never rejects.
    Shadow,
    /// Does nothing.
    Off,
}

impl Mode {
    /// The name as written in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::Off => "off",
        }
    }
}

/// What a limit does when the counter store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorMode {
    /// Let the request through (fail open).
    Allow,
    /// Refuse it with 503 (fail closed).
    Deny,
    /// Count it in this node's memory instead.
    Local,
}

/// What a `global` limit does while its region has not heard from another one for
/// `region_partition_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPartition {
    /// Count each silent region as having used at least its share of the quota: the regions
    /// together stay within the quota, each within its share.
    Share,
    /// Go on with the silent regions' last known counts: each region may admit up to the
    /// whole quota.
    Local,
    /// Refuse the limit's requests until the region hears from every other one again.
    Deny,
}

/// A safelist: a request meeting any condition skips every limit.
#[derive(Debug)]
pub struct ListRule {
    /// Its name.
    pub name: Arc<str>,
    /// Any one of these puts a request on the list.
    pub conditions: Vec<Condition>,
}

/// A denylist: a request meeting any condition is refused.
#[derive(Debug)]
pub struct DenyRule {
    /// The conditions.
    pub list: ListRule,
    /// The status of the refusal.
    pub status: StatusCode,
    /// The reason shown to the client.
    pub reason: Option<Arc<str>>,
}

/// An anomaly detector: watches the responses to matching requests per key, and acts on a
/// key whose pattern crosses its threshold.
#[derive(Debug)]
pub struct Anomaly {
    /// Its name.
    pub name: Arc<str>,
    /// What its counter keys have in place of a limit's name: `anomaly.<name>`.
    pub counter: Arc<str>,
    /// The namespace its counters live in.
    pub namespace: Arc<str>,
    /// Which requests it watches.
    pub condition: Condition,
    /// What it counts by.
    pub key: KeySpec,
    /// The response statuses counted (empty: every response).
    pub statuses: Vec<u16>,
    /// The pattern it detects.
    pub detector: Detector,
    /// What it does when it detects it.
    pub actions: AnomalyActions,
}

impl Anomaly {
    /// Whether a response with `status` is counted.
    pub fn counts(&self, status: u16) -> bool {
        self.statuses.is_empty() || self.statuses.contains(&status)
    }
}

/// The pattern an anomaly detects, per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detector {
    /// `detect N in W`: N counted responses within any window W (counted in the store, so
    /// across every node).
    Count {
        /// N.
        threshold: u64,
        /// W.
        window: Duration,
    },
    /// `detect rate > K x baseline over W`: a window's count above K times the key's moving
    /// average of earlier windows (at least one a window), counted on each node.
    Rate {
        /// K.
        factor: u64,
        /// W.
        window: Duration,
    },
    /// `detect distinct header("X") > N in W`: more than N distinct values within a
    /// window, counted on each node.
    Distinct {
        /// Where the value is read.
        source: ValueFrom,
        /// N.
        threshold: u64,
        /// W.
        window: Duration,
    },
}

impl Detector {
    /// The window it counts in.
    pub fn window(&self) -> Duration {
        match self {
            Detector::Count { window, .. }
            | Detector::Rate { window, .. }
            | Detector::Distinct { window, .. } => *window,
        }
    }
}

/// What an anomaly does to a key it detects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnomalyActions {
    /// `ban D`: refused (403, `Retry-After`) that long, on every node.
    pub ban: Option<Duration>,
    /// `alert "channel"`: a log line and an anomaly row per channel.
    pub alerts: Vec<Arc<str>>,
    /// `flag for D`: the key's decisions carry the anomaly's name that long.
    pub flag: Option<Duration>,
    /// `tarpit H for D`: each of the key's requests is held H, for D.
    pub tarpit: Option<(Duration, Duration)>,
}

/// A tier table: how a request's tier is found, and the tiers.
#[derive(Debug)]
pub struct TierTable {
    /// Its name.
    pub name: Arc<str>,
    /// Where the tier comes from.
    pub source: TierSource,
    /// The tiers, by index.
    pub tiers: Vec<Arc<str>>,
    /// The tier used when the source gives none or an unknown one.
    pub default: usize,
}

impl TierTable {
    /// The index of the tier named `name`.
    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.eq_ignore_ascii_case(name))
    }
}

/// Where a request's tier comes from.
#[derive(Debug, Clone)]
pub enum TierSource {
    /// A header or a claim of the request.
    Request(ValueFrom),
    /// A Cedar annotation on the policies that permit the request.
    CedarAnnotation {
        /// The annotation's name.
        annotation: Arc<str>,
        /// Which tier wins when several apply.
        pick: Pick,
        /// The Cedar policy set asked (an index into the plan's Cedar sets).
        cedar: usize,
        /// The action asked about.
        action: Arc<str>,
    },
}

/// Which tier wins when several apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The one listed last in the table.
    Highest,
    /// The one listed first.
    Lowest,
    /// The first policy's.
    First,
}

/// A Cedar file imported by a policy file.
#[derive(Debug, Clone)]
pub struct CedarImport {
    /// The policy file.
    pub policies: std::path::PathBuf,
    /// The schema file.
    pub schema: Option<std::path::PathBuf>,
    /// The Cedar namespace.
    pub namespace: Option<Arc<str>>,
    /// The entities file.
    pub entities: Option<std::path::PathBuf>,
}
