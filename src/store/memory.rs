//! The in-memory store: sharded maps under short locks, with expiry and a key cap.
//!
//! Used for development, tests, and as the per-node fallback when Redis fails. A request's
//! operations lock the shards they touch in ascending order (so two requests never deadlock),
//! decide with the pure algorithms, and write back only when admitted.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use smallvec::SmallVec;

use super::runtime::{RuntimeEntry, RuntimeList};
use super::sharded::{Evicted, Sharded};
use super::{
    AdminStore, BatchResult, KeySelector, KeyState, Op, OpResult, RuntimeStore, Settlement, Store,
    StoreError,
};
use crate::clock::Timestamp;
use crate::limiter::{self, Decision, LeaseId, State, concurrency, us};

/// Keys held by default before the oldest-expiring are evicted (about 230 MB: see
/// `docs/configuration.md` for the measured bytes per key).
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
const SHARDS: usize = 64;

#[derive(Debug)]
struct Entry {
    state: Option<State>,
    /// When the state stops mattering, microseconds since the epoch.
    expires_at: u64,
    /// Refused until then (0: not banned).
    banned_until: u64,
}

impl Entry {
    fn live_until(&self) -> u64 {
        self.expires_at.max(self.banned_until)
    }
}

type Shard = super::sharded::Shard<Entry>;

/// An in-memory [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    shards: Sharded<Entry>,
    evictions: AtomicU64,
    /// Runtime list entries, by their field.
    runtime: std::sync::Mutex<std::collections::BTreeMap<String, RuntimeEntry>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store holding up to [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// A store holding up to about `max_keys` keys (rounded up to a multiple of its shard
    /// count); past that, the key expiring first among a sample is evicted for each new one.
    pub fn with_max_keys(max_keys: usize) -> Self {
        MemoryStore {
            shards: Sharded::new(SHARDS, max_keys),
            evictions: AtomicU64::new(0),
            runtime: std::sync::Mutex::default(),
        }
    }

    /// Keys held, expired ones included until they are purged.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live keys evicted to make room since the store was made.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The most keys the store holds.
    pub fn max_keys(&self) -> usize {
        self.shards.max_keys()
    }

    /// Drops every key whose state has expired at `now`; returns how many.
    pub fn purge_expired(&self, now: Timestamp) -> usize {
        let t = now.as_micros();
        self.shards.retain(|_, e| e.live_until() > t)
    }

    /// The live state of `key`, without touching it.
    pub fn peek(&self, key: &str, now: Timestamp) -> Option<State> {
        let map = self.shards.lock_key(key);
        map.get(key)
            .filter(|e| e.live_until() > now.as_micros())
            .and_then(|e| e.state.clone())
    }

    /// The state and ban of `key` at `now`.
    pub fn inspect_now(&self, key: &str, now: Timestamp) -> KeyState {
        let t = now.as_micros();
        let map = self.shards.lock_key(key);
        let entry = map.get(key);
        KeyState {
            state: entry
                .filter(|e| e.expires_at > t)
                .and_then(|e| e.state.clone()),
            banned_until: entry
                .filter(|e| e.banned_until > t)
                .map(|e| Timestamp::from_micros(e.banned_until)),
        }
    }

    /// Forgets the selected keys; returns how many.
    pub fn reset_selected(&self, selector: KeySelector<'_>) -> usize {
        self.shards.retain(|k, _| !selector.matches(k))
    }

    /// Counts the selected keys whose state is live at `now`.
    pub fn count_selected(&self, selector: KeySelector<'_>, now: Timestamp) -> usize {
        let t = now.as_micros();
        self.shards
            .count(|k, e| e.state.is_some() && e.expires_at > t && selector.matches(k))
    }

    /// Makes room for one more key in a full shard: expired keys first, else the key that
    /// expires soonest among a sample.
    /// At the cap, drops a sampled entry that ends first (expired ones are not counted as
    /// evictions: the sweeper would have dropped them).
    fn make_room(&self, map: &mut Shard, now: u64) {
        if self.shards.make_room(map, Entry::live_until, now) == Some(Evicted::Live) {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The batch, decided and applied under the locks of the shards it touches.
    pub fn apply_now(&self, ops: &[Op<'_>], now: Timestamp) -> BatchResult {
        let t = now.as_micros();
        let mut locked = self.shards.lock_keys(ops.iter().map(|op| op.key));

        let mut outcomes: SmallVec<[_; 4]> = SmallVec::with_capacity(ops.len());
        let mut results = Vec::with_capacity(ops.len());
        let mut admitted = true;
        for (i, op) in ops.iter().enumerate() {
            let entry = locked.map(i).get(op.key).filter(|e| e.live_until() > t);
            let banned_until = entry.map_or(0, |e| e.banned_until);
            if banned_until > t {
                let decision = Decision {
                    allowed: false,
                    limit: op.quota.policy().0,
                    remaining: 0,
                    reset: us(banned_until - t),
                    retry_after: Some(us(banned_until - t)),
                };
                admitted &= !op.enforce;
                results.push(OpResult {
                    decision,
                    banned: true,
                });
                outcomes.push(None);
                continue;
            }
            let state = entry.and_then(|e| e.state.as_ref());
            let outcome = limiter::decide(&op.quota, state, now, op.cost, op.lease);
            admitted &= outcome.decision.allowed || !op.enforce;
            results.push(OpResult {
                decision: outcome.decision,
                banned: false,
            });
            outcomes.push(Some((outcome.state, outcome.expires_at)));
        }

        for (i, ((op, outcome), result)) in
            ops.iter().zip(outcomes).zip(results.iter_mut()).enumerate()
        {
            let Some((state, expires_at)) = outcome else {
                continue;
            };
            let allowed = result.decision.allowed;
            let map = locked.map(i);
            if admitted && allowed {
                let expires_at = expires_at.as_micros();
                self.upsert(map, op.key, t, |e| {
                    e.state = Some(state);
                    e.expires_at = expires_at;
                });
            } else if !allowed
                && op.enforce
                && let Some(ban) = op.ban
            {
                let until = now.saturating_add(ban).as_micros();
                self.upsert(map, op.key, t, |e| e.banned_until = until);
                // The rejection that starts a ban announces it.
                result.announce_ban(ban);
            }
        }
        if !admitted {
            // Nothing was consumed: report what is left before this request.
            for (r, op) in results.iter_mut().zip(ops) {
                if r.decision.allowed {
                    let d = &mut r.decision;
                    d.remaining = d.remaining.saturating_add(op.cost).min(d.limit);
                }
            }
        }
        BatchResult { admitted, results }
    }

    fn upsert(&self, map: &mut Shard, key: &str, now: u64, update: impl FnOnce(&mut Entry)) {
        if let Some(entry) = map.get_mut(key) {
            if entry.live_until() <= now {
                *entry = Entry {
                    state: None,
                    expires_at: 0,
                    banned_until: 0,
                };
            }
            update(entry);
            return;
        }
        self.make_room(map, now);
        let mut entry = Entry {
            state: None,
            expires_at: 0,
            banned_until: 0,
        };
        update(&mut entry);
        map.insert(Box::from(key), entry);
        self.shards.added(1);
    }

    /// Settles reservations now (see [`limiter::settle`]).
    pub fn settle_now(&self, settlements: &[Settlement<'_>], now: Timestamp) {
        let t = now.as_micros();
        for s in settlements {
            let mut map = self.shards.lock_key(s.key);
            let state = map
                .get(s.key)
                .filter(|e| e.expires_at > t)
                .and_then(|e| e.state.clone());
            if let Some((state, expires_at)) =
                limiter::settle(&s.quota, state.as_ref(), now, s.counted_at, s.delta)
            {
                let expires_at = expires_at.as_micros();
                self.upsert(&mut map, s.key, t, |e| {
                    e.state = Some(state);
                    e.expires_at = expires_at;
                });
            }
        }
    }

    /// Gives back a concurrency lease now.
    pub fn release_now(&self, key: &str, lease: LeaseId, now: Timestamp) {
        let mut map = self.shards.lock_key(key);
        let Some(entry) = map.get_mut(key) else {
            return;
        };
        if let Some(State::Concurrency(state)) = &entry.state {
            match concurrency::release(state, lease, now) {
                Some((state, expires_at)) => {
                    entry.state = Some(State::Concurrency(state));
                    entry.expires_at = expires_at.as_micros();
                }
                None => {
                    entry.state = None;
                    entry.expires_at = 0;
                    if entry.banned_until <= now.as_micros() {
                        self.shards.remove_in(&mut map, key);
                    }
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn answers_now(&self) -> bool {
        true
    }

    fn try_apply(&self, ops: &[Op<'_>], now: Timestamp) -> Option<Result<BatchResult, StoreError>> {
        Some(Ok(self.apply_now(ops, now)))
    }

    fn sweep(&self, now: Timestamp) -> usize {
        self.purge_expired(now)
    }

    fn health(&self) -> super::StoreHealth {
        super::StoreHealth {
            kind: "memory",
            keys: Some(self.len()),
            max_keys: Some(self.shards.max_keys()),
            ..super::StoreHealth::default()
        }
    }

    fn evictions(&self) -> u64 {
        MemoryStore::evictions(self)
    }

    fn apply(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<BatchResult, StoreError>> + Send {
        std::future::ready(Ok(self.apply_now(ops, now)))
    }

    fn release(
        &self,
        key: &str,
        lease: LeaseId,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.release_now(key, lease, now);
        std::future::ready(Ok(()))
    }

    fn settle(
        &self,
        settlements: &[Settlement<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.settle_now(settlements, now);
        std::future::ready(Ok(()))
    }
}

impl RuntimeStore for MemoryStore {
    async fn runtime_entries(&self, now: Timestamp) -> Result<Vec<RuntimeEntry>, StoreError> {
        let mut entries = self
            .runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|_, e| e.live(now));
        Ok(entries.values().cloned().collect())
    }

    async fn put_runtime_entry(&self, entry: &RuntimeEntry) -> Result<(), StoreError> {
        self.runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(entry.field(), entry.clone());
        Ok(())
    }

    async fn remove_runtime_entry(
        &self,
        list: RuntimeList,
        target: &crate::store::runtime::Target,
    ) -> Result<bool, StoreError> {
        Ok(self
            .runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&crate::store::runtime::field(list, target))
            .is_some())
    }
}

impl AdminStore for MemoryStore {
    fn inspect(
        &self,
        key: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<KeyState, StoreError>> + Send {
        std::future::ready(Ok(self.inspect_now(key, now)))
    }

    fn reset(
        &self,
        selector: KeySelector<'_>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        std::future::ready(Ok(self.reset_selected(selector)))
    }

    fn count(
        &self,
        selector: KeySelector<'_>,
        now: Timestamp,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        std::future::ready(Ok(self.count_selected(selector, now)))
    }
}
