//! A map split into shards under short locks, with a count of its keys and a size cap per
//! shard: what the memory store and the deny cache keep their keys in.
//!
//! A full shard makes room the way Redis does (sampled eviction): it looks at a few entries
//! at random positions and drops the one ending first — an expired one if the sample holds
//! any — so that inserting at the cap costs the same few steps as below it, never a scan.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use foldhash::fast::RandomState;
use indexmap::IndexMap;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::hash_tag;

/// One shard's map: indexed, so that entries can be sampled at random positions.
pub(crate) type Shard<V> = IndexMap<Box<str>, V, RandomState>;

/// How many entries an eviction looks at (Redis samples 5 by default; more finds a better
/// victim for a few more reads).
pub(crate) const EVICTION_SAMPLE: usize = 16;

/// How many samples an eviction takes at most while it finds only live entries.
const EVICTION_ROUNDS: usize = 4;

/// What making room removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evicted {
    /// An entry that had already ended.
    Expired,
    /// A live entry: its state is lost.
    Live,
}

/// The shards one request's keys live in, locked.
pub(crate) struct Locked<'a, V> {
    /// Each key's shard.
    shard_of: SmallVec<[usize; 4]>,
    /// The shards, each once, in index order; `guards[i]` locks `order[i]`.
    order: SmallVec<[usize; 4]>,
    guards: SmallVec<[MutexGuard<'a, Shard<V>>; 4]>,
}

impl<V> Locked<'_, V> {
    /// The locked shard of the request's key `i`.
    pub(crate) fn map(&mut self, i: usize) -> &mut Shard<V> {
        let slot = self
            .order
            .binary_search(&self.shard_of[i])
            .unwrap_or_default();
        &mut self.guards[slot]
    }
}

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
                .map(|_| Mutex::new(IndexMap::with_hasher(RandomState::default())))
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

    /// Locks the shards of `keys` for one request: each shard once, in index order, so that
    /// two requests never wait on each other in a cycle.
    pub(crate) fn lock_keys<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Locked<'_, V> {
        let shard_of: SmallVec<[usize; 4]> = keys.map(|k| self.index(k)).collect();
        let mut order = shard_of.clone();
        order.sort_unstable();
        order.dedup();
        let guards = order.iter().map(|&s| self.lock(s)).collect();
        Locked {
            shard_of,
            order,
            guards,
        }
    }

    /// The number of shards.
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
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

    /// Removes `key` from a locked shard; returns whether it was there.
    pub(crate) fn remove_in(&self, map: &mut Shard<V>, key: &str) -> bool {
        let removed = map.swap_remove(key).is_some();
        if removed {
            self.removed(1);
        }
        removed
    }

    /// Makes room for one more entry in a locked shard when it is full: of
    /// [`EVICTION_SAMPLE`] entries at random positions, removes the one whose `end` comes
    /// first. `None` when the shard had room.
    pub(crate) fn make_room(
        &self,
        map: &mut Shard<V>,
        end: impl Fn(&V) -> u64,
        now: u64,
    ) -> Option<Evicted> {
        if map.len() < self.max_per_shard || map.is_empty() {
            return None;
        }
        let len = map.len();
        // Rounds of samples until one holds an expired entry, four at most: a shard where a
        // fifth of the entries have ended gives one up with odds of about a million to one.
        let mut best: Option<(usize, u64)> = None;
        for _ in 0..EVICTION_ROUNDS {
            let round = (0..EVICTION_SAMPLE.min(len))
                .map(|_| rand::random_range(0..len))
                .map(|i| (i, end(&map[i])))
                .min_by_key(|(_, ends)| *ends);
            best = best.into_iter().chain(round).min_by_key(|(_, ends)| *ends);
            if best.is_some_and(|(_, ends)| ends <= now) {
                break;
            }
        }
        let (victim, ends) = best?;
        map.swap_remove_index(victim);
        self.removed(1);
        Some(if ends <= now {
            Evicted::Expired
        } else {
            Evicted::Live
        })
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
