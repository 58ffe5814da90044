//! The store `tollgate serve` runs on, chosen at start-up: memory or Redis.

use super::runtime;
use super::{
    AdminStore, BatchResult, KeySelector, KeyState, MemoryStore, Op, RuntimeStore, Settlement,
    Store, StoreError, StoreHealth, redis,
};
use crate::clock::Timestamp;
use crate::limiter::LeaseId;

/// The store `tollgate serve` chose at start-up.
#[derive(Debug)]
pub enum AnyStore {
    /// This process's memory (development).
    Memory(MemoryStore),
    /// A Redis server or Cluster shared by every node.
    Redis(Box<redis::RedisStore>),
}

impl AnyStore {
    /// Puts new TLS certificates in use for Redis (see [`redis::RedisStore::rotate_tls`]);
    /// the memory store has none.
    pub async fn rotate_tls(&self, tls: &redis::RedisTls) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(_) => Err(StoreError::Backend(
                "the memory store has no TLS certificates".to_owned(),
            )),
            AnyStore::Redis(r) => r.rotate_tls(tls).await,
        }
    }
}

impl Store for AnyStore {
    fn answers_now(&self) -> bool {
        match self {
            AnyStore::Memory(s) => s.answers_now(),
            AnyStore::Redis(s) => s.answers_now(),
        }
    }

    fn try_apply(&self, ops: &[Op<'_>], now: Timestamp) -> Option<Result<BatchResult, StoreError>> {
        match self {
            AnyStore::Memory(s) => s.try_apply(ops, now),
            AnyStore::Redis(s) => s.try_apply(ops, now),
        }
    }

    async fn apply(&self, ops: &[Op<'_>], now: Timestamp) -> Result<BatchResult, StoreError> {
        match self {
            AnyStore::Memory(m) => m.apply(ops, now).await,
            AnyStore::Redis(r) => r.apply(ops, now).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => m.ping().await,
            AnyStore::Redis(r) => r.ping().await,
        }
    }

    fn health(&self) -> StoreHealth {
        match self {
            AnyStore::Memory(m) => m.health(),
            AnyStore::Redis(r) => r.health(),
        }
    }

    fn evictions(&self) -> u64 {
        match self {
            AnyStore::Memory(m) => Store::evictions(m),
            AnyStore::Redis(r) => r.evictions(),
        }
    }

    fn sweep(&self, now: Timestamp) -> usize {
        match self {
            AnyStore::Memory(m) => m.sweep(now),
            AnyStore::Redis(r) => r.sweep(now),
        }
    }

    async fn release(&self, key: &str, lease: LeaseId, now: Timestamp) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => m.release(key, lease, now).await,
            AnyStore::Redis(r) => r.release(key, lease, now).await,
        }
    }

    async fn settle(
        &self,
        settlements: &[Settlement<'_>],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => m.settle(settlements, now).await,
            AnyStore::Redis(r) => r.settle(settlements, now).await,
        }
    }
}

impl RuntimeStore for AnyStore {
    async fn runtime_entries(
        &self,
        now: Timestamp,
    ) -> Result<Vec<runtime::RuntimeEntry>, StoreError> {
        match self {
            AnyStore::Memory(m) => m.runtime_entries(now).await,
            AnyStore::Redis(r) => r.runtime_entries(now).await,
        }
    }

    async fn put_runtime_entry(&self, entry: &runtime::RuntimeEntry) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => m.put_runtime_entry(entry).await,
            AnyStore::Redis(r) => r.put_runtime_entry(entry).await,
        }
    }

    async fn remove_runtime_entry(
        &self,
        list: runtime::RuntimeList,
        target: &runtime::Target,
    ) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(m) => m.remove_runtime_entry(list, target).await,
            AnyStore::Redis(r) => r.remove_runtime_entry(list, target).await,
        }
    }
}

impl AdminStore for AnyStore {
    async fn inspect(&self, key: &str, now: Timestamp) -> Result<KeyState, StoreError> {
        match self {
            AnyStore::Memory(m) => m.inspect(key, now).await,
            AnyStore::Redis(r) => r.inspect(key, now).await,
        }
    }

    async fn reset(&self, selector: KeySelector<'_>) -> Result<usize, StoreError> {
        match self {
            AnyStore::Memory(m) => m.reset(selector).await,
            AnyStore::Redis(r) => r.reset(selector).await,
        }
    }

    async fn count(&self, selector: KeySelector<'_>, now: Timestamp) -> Result<usize, StoreError> {
        match self {
            AnyStore::Memory(m) => m.count(selector, now).await,
            AnyStore::Redis(r) => r.count(selector, now).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KeySelector;

    #[test]
    fn selectors_match_the_parts_of_a_key() {
        let key = "api:{ip:10.0.0.0/24}:login";
        assert!(KeySelector::Key(key).matches(key));
        assert!(KeySelector::Key(key).matches("api:{ip:10.0.0.0/24}:login:ban"));
        assert!(KeySelector::Client("ip:10.0.0.0/24").matches(key));
        assert!(!KeySelector::Client("ip:10.0.0.0").matches(key));
        assert!(KeySelector::Namespace("api").matches(key));
        assert!(!KeySelector::Namespace("ap").matches(key));
        assert!(KeySelector::Limit("login").matches(key));
        assert!(!KeySelector::Limit("log").matches(key));
        assert!(!KeySelector::Limit("login").matches("unrelated"));
        assert_eq!(KeySelector::Client("a*b").pattern(), "*:{a\\*b}:*");
        assert_eq!(KeySelector::Namespace("api").pattern(), "api:{*");
    }
}
