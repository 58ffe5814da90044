//! A map split into shards under short locks, with a count of its keys and a size cap per
//! shard: what the memory store and the deny cache keep their keys in.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use foldhash::fast::RandomState;
use parking_lot::{Mutex, MutexGuard};

use super::hash_tag;

/// One shard's map.
pub(crate) type Shard<V> = HashMap<Box<str>, V, RandomState>;

/// Keys spread over `N` locked shards by their `{client}` hash tag (as Redis Cluster spreads
/// slots), so that one client's keys share a shard and a request usually takes one lock.
#[derive(Debug)]
pub(crate) struct Sharded<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: RandomState,
    max_per_shard: usize,
    len: AtomicUsize,
}

impl<V> Sharded<V> {
    /// `shards` shards holding up to about `max_keys` keys in all.
    pub(crate) fn new(shards: usize, max_keys: usize) -> Self {
        Sharded {
            shards: (0..shards)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            max_per_shard: max_keys.div_ceil(shards).max(1),
            len: AtomicUsize::new(0),
        }
    }

    /// The index of `key`'s shard.
    pub(crate) fn index(&self, key: &str) -> usize {
        (self.hasher.hash_one(hash_tag(key)) as usize) % self.shards.len()
    }

    /// Locks shard `index`.
    pub(crate) fn lock(&self, index: usize) -> MutexGuard<'_, Shard<V>> {
        self.shards[index].lock()
    }

    /// Locks `key`'s shard.
    pub(crate) fn lock_key(&self, key: &str) -> MutexGuard<'_, Shard<V>> {
        self.lock(self.index(key))
    }

    /// The most keys one shard holds.
    pub(crate) fn max_per_shard(&self) -> usize {
        self.max_per_shard
    }

    /// The most keys all shards hold.
    pub(crate) fn max_keys(&self) -> usize {
        self.max_per_shard * self.shards.len()
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Records `n` keys added to a shard (under its lock).
    pub(crate) fn added(&self, n: usize) {
        self.len.fetch_add(n, Ordering::Relaxed);
    }

    /// Records `n` keys removed from a shard (under its lock).
    pub(crate) fn removed(&self, n: usize) {
        self.len.fetch_sub(n, Ordering::Relaxed);
    }

    /// Keeps the entries of one locked shard for which `keep` holds; returns how many left.
    pub(crate) fn retain_in(
        &self,
        map: &mut Shard<V>,
        mut keep: impl FnMut(&str, &mut V) -> bool,
    ) -> usize {
        let before = map.len();
        map.retain(|k, v| keep(k, v));
        let removed = before - map.len();
        self.removed(removed);
        removed
    }

    /// Keeps the entries of every shard for which `keep` holds; returns how many left.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&str, &mut V) -> bool) -> usize {
        self.shards
            .iter()
            .map(|shard| self.retain_in(&mut shard.lock(), &mut keep))
            .sum()
    }

    /// Counts the entries of every shard for which `count` holds.
    pub(crate) fn count(&self, mut count: impl FnMut(&str, &V) -> bool) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().iter().filter(|(k, v)| count(k, v)).count())
            .sum()
    }
}
