//! Counter stores: where the algorithms' state lives.
//!
//! A [`Store`] applies one request's operations — one per matching limit — atomically: every
//! operation is decided, and unless an enforcing one rejects, all of them are consumed;
//! otherwise none is. The design lets a networked store do the whole batch in one round trip.

pub mod adaptive;
mod any;
pub mod deny;
pub mod memory;
pub mod redis;
pub mod runtime;
mod sharded;

use std::future::Future;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota, State};
use crate::plan::OnPartition;
use crate::plan::key::{BAN_SUFFIX, CounterKey};

pub use any::AnyStore;
pub use memory::MemoryStore;

/// One limit's part of a request.
#[derive(Debug, Clone, Copy)]
pub struct Op<'a> {
    /// The counter's key: `{namespace}:{client}:{limit}` with the client in braces.
    pub key: &'a str,
    /// The quota and algorithm.
    pub quota: Quota,
    /// What the request costs.
    pub cost: u64,
    /// Whether a rejection blocks the whole request (`false` for shadow limits).
    pub enforce: bool,
    /// When rejected, refuse the key for this long.
    pub ban: Option<Duration>,
    /// The request's lease, for concurrency limits.
    pub lease: LeaseId,
    /// Local-first (`sync every`): a shared store may decide it from this node's count plus
    /// the last global count it read, and send the counts once per this interval. Stores
    /// that are local anyway (memory) decide it exactly.
    pub sync: Option<Duration>,
    /// Counted across regions: a store whose region has peers decides it on the region's
    /// count plus the last counts the other regions sent, and by this mode while one of
    /// them is silent. Stores without peers decide it as any other operation.
    pub global: Option<OnPartition>,
}

/// A reservation settled once the request's response said what it used (see
/// [`crate::limiter::settle`] for where each algorithm puts it).
#[derive(Debug, Clone, Copy)]
pub struct Settlement<'a> {
    /// The counter's key, as the reservation counted it.
    pub key: &'a str,
    /// The quota it was counted under.
    pub quota: Quota,
    /// What the request used minus what it reserved, in cost units: negative is a refund.
    pub delta: i64,
    /// When the reservation was counted.
    pub counted_at: Timestamp,
}

/// What the store decided for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpResult {
    /// The algorithm's decision (a ban shows as a rejection until the ban ends).
    pub decision: Decision,
    /// Whether the key is banned: refused because of a ban, or by the rejection that
    /// started one.
    pub banned: bool,
}

impl OpResult {
    /// What is reported for an operation a rejected request did not ask the store about:
    /// whole, as a rejected request consumes nothing.
    pub(crate) fn not_asked(quota: &Quota) -> Self {
        let limit = quota.policy().0;
        OpResult {
            decision: Decision {
                allowed: true,
                limit,
                remaining: limit,
                reset: Duration::ZERO,
                retry_after: None,
            },
            banned: false,
        }
    }

    /// Marks the rejection that starts a ban of length `ban`: the client is told to wait for
    /// the ban, not for the window, and the quota is not whole before the ban ends.
    pub(crate) fn announce_ban(&mut self, ban: std::time::Duration) {
        let d = &mut self.decision;
        d.reset = d.reset.max(ban);
        d.retry_after = Some(d.retry_after.map_or(ban, |r| r.max(ban)));
        self.banned = true;
    }
}

/// What the store decided for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchResult {
    /// Whether the request was admitted: no enforcing operation rejected. When `false`,
    /// nothing was consumed.
    pub admitted: bool,
    /// One result per operation, in order. When not admitted, each `remaining` is what is
    /// left before this request, since nothing was consumed.
    pub results: Vec<OpResult>,
}

/// A store failed to answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time.
    #[error("the counter store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store is unreachable or answered with an error.
    #[error("the counter store failed: {0}")]
    Backend(String),
    /// The store failed repeatedly and is not being called until its next probe.
    #[error("the counter store failed repeatedly: circuit open until the next probe")]
    CircuitOpen,
}

/// A key's stored state, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// The algorithm's state (`None`: nothing counted, or expired).
    pub state: Option<State>,
    /// Refused until then, when banned.
    pub banned_until: Option<Timestamp>,
}

/// Which keys an admin operation is about. Keys are `{namespace}:{client}:{limit}`, with the
/// client in braces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySelector<'a> {
    /// One client in one limit: the full key.
    Key(&'a str),
    /// One client in every limit of every namespace: the client part, without braces.
    Client(&'a str),
    /// Every key of a namespace.
    Namespace(&'a str),
    /// Every client of a limit.
    Limit(&'a str),
}

impl KeySelector<'_> {
    /// Whether state key `key` (or its ban key) is selected.
    pub fn matches(&self, key: &str) -> bool {
        let Some(parts) = CounterKey::parse(key) else {
            return false;
        };
        match *self {
            KeySelector::Key(k) => key.strip_suffix(BAN_SUFFIX).unwrap_or(key) == k,
            KeySelector::Client(c) => parts.client == c,
            KeySelector::Namespace(ns) => parts.namespace == ns,
            KeySelector::Limit(l) => parts.limit == l,
        }
    }

    /// The `SCAN MATCH` pattern for the state and ban keys selected (a superset: check
    /// each with [`KeySelector::matches`]).
    pub fn pattern(&self) -> String {
        match *self {
            KeySelector::Key(k) => format!("{}*", glob_escape(k)),
            KeySelector::Client(c) => format!("*:{{{}}}:*", glob_escape(c)),
            KeySelector::Namespace(ns) => format!("{}:{{*", glob_escape(ns)),
            KeySelector::Limit(l) => format!("*}}:{}*", glob_escape(l)),
        }
    }
}

/// The part of `key` that decides where it lives, as Redis Cluster reads it: between the
/// first `{` and the next `}`, or the whole key when there is none or it is empty.
pub fn hash_tag(key: &str) -> &str {
    // Byte searches: `{` and `}` are ASCII, and `str::find(char)` costs a `memcmp` per hit.
    let bytes = key.as_bytes();
    bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            key.get(open + 1..open + 1 + close)
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where counters live: what the engine needs to decide — counting one request's
/// operations atomically, giving leases back, and the store's health.
pub trait Store: Send + Sync + 'static {
    /// Decides and, when admitted, consumes every operation of one request, atomically.
    fn apply(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<BatchResult, StoreError>> + Send;

    /// Whether [`Store::try_apply`] answers every request now (a store in this process):
    /// then a request is decided without waiting, and without a future to keep.
    fn answers_now(&self) -> bool {
        false
    }

    /// [`Store::apply`] without waiting, when the store can answer now (`None`: it cannot;
    /// call `apply`).
    fn try_apply(&self, ops: &[Op<'_>], now: Timestamp) -> Option<Result<BatchResult, StoreError>> {
        let _ = (ops, now);
        None
    }

    /// Whether the store answers (for readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Drops expired state this process keeps; returns how many entries (a shared store
    /// expires its own keys: nothing to do).
    fn sweep(&self, now: Timestamp) -> usize {
        let _ = now;
        0
    }

    /// Live keys this process dropped to stay within its key cap, since it started (a shared
    /// store manages its own memory: 0).
    fn evictions(&self) -> u64 {
        0
    }

    /// What the store says of itself, for operators: its kind, the keys this process holds,
    /// its circuit breakers.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Gives back a concurrency lease.
    fn release(
        &self,
        key: &str,
        lease: LeaseId,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Settles one request's reservations: refunds and debts, each on its own key. A shared
    /// store settles them all in one call (one per Cluster slot), batched with admissions.
    fn settle(
        &self,
        settlements: &[Settlement<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The runtime lists every node applies (safelist, denylist, flags, tarpits), kept in the
/// store: read back by every node, changed by the admin API and by anomalies.
pub trait RuntimeStore: Send + Sync + 'static {
    /// The runtime list entries live at `now` (ended ones are dropped).
    fn runtime_entries(
        &self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<runtime::RuntimeEntry>, StoreError>> + Send;

    /// Adds or replaces a runtime list entry.
    fn put_runtime_entry(
        &self,
        entry: &runtime::RuntimeEntry,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes a runtime list entry; whether there was one.
    fn remove_runtime_entry(
        &self,
        list: runtime::RuntimeList,
        target: &runtime::Target,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// What operators do to keys through the admin API: look at one, count and reset them.
pub trait AdminStore: Send + Sync + 'static {
    /// The state of one key at `now`, without touching it.
    fn inspect(
        &self,
        key: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<KeyState, StoreError>> + Send;

    /// Forgets the selected keys (counters and bans); returns how many keys were removed.
    fn reset(
        &self,
        selector: KeySelector<'_>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Counts the selected state keys that are live at `now` (ban keys are not counted).
    fn count(
        &self,
        selector: KeySelector<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

/// A store that does all three (the memory store, Redis, [`AnyStore`]): what the server
/// runs on.
pub trait ServedStore: Store + RuntimeStore + AdminStore {}

impl<S: Store + RuntimeStore + AdminStore> ServedStore for S {}

/// A store shared by several engines (nodes of one process, tests) is a store.
impl<S: Store> Store for std::sync::Arc<S> {
    fn answers_now(&self) -> bool {
        (**self).answers_now()
    }

    fn try_apply(&self, ops: &[Op<'_>], now: Timestamp) -> Option<Result<BatchResult, StoreError>> {
        (**self).try_apply(ops, now)
    }

    fn apply(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<BatchResult, StoreError>> + Send {
        (**self).apply(ops, now)
    }

    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).ping()
    }

    fn sweep(&self, now: Timestamp) -> usize {
        (**self).sweep(now)
    }

    fn evictions(&self) -> u64 {
        (**self).evictions()
    }

    fn health(&self) -> StoreHealth {
        (**self).health()
    }

    fn release(
        &self,
        key: &str,
        lease: LeaseId,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(key, lease, now)
    }

    fn settle(
        &self,
        settlements: &[Settlement<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).settle(settlements, now)
    }
}

impl<S: RuntimeStore> RuntimeStore for std::sync::Arc<S> {
    fn runtime_entries(
        &self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<runtime::RuntimeEntry>, StoreError>> + Send {
        (**self).runtime_entries(now)
    }

    fn put_runtime_entry(
        &self,
        entry: &runtime::RuntimeEntry,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).put_runtime_entry(entry)
    }

    fn remove_runtime_entry(
        &self,
        list: runtime::RuntimeList,
        target: &runtime::Target,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).remove_runtime_entry(list, target)
    }
}

impl<S: AdminStore> AdminStore for std::sync::Arc<S> {
    fn inspect(
        &self,
        key: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<KeyState, StoreError>> + Send {
        (**self).inspect(key, now)
    }

    fn reset(
        &self,
        selector: KeySelector<'_>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        (**self).reset(selector)
    }

    fn count(
        &self,
        selector: KeySelector<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        (**self).count(selector, now)
    }
}

/// What a store says of itself (`GET /admin/diagnostics`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// `memory`, `redis`, `redis-cluster` or `redis-sentinel` (`other` for stores outside
    /// Tollgate).
    pub kind: &'static str,
    /// Keys held in this process, expired ones included until swept (the memory store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<usize>,
    /// The most keys this process holds before evicting (the memory store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
    /// Circuit breakers (one per server, or per group of Cluster slots).
    pub breakers: usize,
    /// Of those, how many are open: refusing calls, or letting one probe through.
    pub breakers_open: usize,
    /// Times new TLS certificates were put in use (Redis over TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_rotations: Option<u64>,
    /// Redis: what the batch calls and local-first syncs did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisCalls>,
    /// Limits counted across regions: this region, and what it hears of the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<redis::RegionsHealth>,
    /// Redis behind Sentinel: the master in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelMaster>,
}

/// The master a Sentinel-watched Redis store uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SentinelMaster {
    /// Its `host:port`, as the sentinels name it.
    pub master: String,
    /// Times the sentinels named another master and this node followed.
    pub switches: u64,
}

/// What a Redis store's calls did since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct RedisCalls {
    /// Batch script calls (each decides one request, or one Cluster slot group of one).
    pub calls: u64,
    /// Requests those calls decided: divided by `calls`, the mean batch size.
    pub batched_requests: u64,
    /// Local-first sync calls, and how many failed.
    pub syncs: u64,
    /// Of those, the ones that failed.
    pub sync_failures: u64,
    /// Keys of local-first limits this node decides.
    pub local_first_keys: usize,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            kind: "other",
            keys: None,
            max_keys: None,
            breakers: 0,
            breakers_open: 0,
            tls_rotations: None,
            redis: None,
            regions: None,
            sentinel: None,
        }
    }
}
