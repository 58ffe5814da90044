//! The local deny cache: when the shared store says a key is over its limit until `T`, this
//! node remembers it until `T` and refuses later requests for that key without a round trip.
//! This is what makes a flood cheap: after the first rejection, the flood never reaches Redis.
//!
//! Only answers that stay true until `T` whatever other nodes do are cached: rejections with
//! a known retry time (a window, bucket or ban only refills with time), never concurrency
//! rejections (a lease can be released early). A cached answer holds for requests costing at
//! least what the rejected one cost.

use super::sharded::Sharded;
use crate::clock::Timestamp;

const SHARDS: usize = 16;

/// A remembered rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// Refused until then, microseconds since the epoch.
    pub until: u64,
    /// The cost that was refused: cheaper requests are asked again.
    pub cost: u64,
    /// The quota, for the report.
    pub limit: u64,
    /// Whether the refusal is a ban.
    pub banned: bool,
}

/// Rejections remembered until they end, up to a number of keys.
#[derive(Debug)]
pub struct DenyCache {
    shards: Sharded<Denied>,
}

impl DenyCache {
    /// A cache of up to about `max_keys` keys; past that, new rejections are not cached
    /// (expired ones are dropped first).
    pub fn new(max_keys: usize) -> Self {
        DenyCache {
            shards: Sharded::new(SHARDS, max_keys),
        }
    }

    /// The rejection that still holds at `now` for a request of `cost` on `key`.
    pub fn get(&self, key: &str, cost: u64, now: Timestamp) -> Option<Denied> {
        if self.shards.len() == 0 {
            return None;
        }
        let mut shard = self.shards.lock_key(key);
        let denied = *shard.get(key)?;
        if denied.until <= now.as_micros() {
            self.shards.remove_in(&mut shard, key);
            return None;
        }
        (cost >= denied.cost).then_some(denied)
    }

    /// Remembers that `key` is refused until `denied.until`.
    pub fn insert(&self, key: &str, denied: Denied, now: Timestamp) {
        let mut shard = self.shards.lock_key(key);
        if let Some(old) = shard.get_mut(key) {
            // Keep the longer refusal; for the same end, the cheaper cost.
            if denied.until > old.until || (denied.until == old.until && denied.cost < old.cost) {
                *old = denied;
            }
            return;
        }
        // Full: the sampled refusal ending first makes way.
        self.shards
            .make_room(&mut shard, |d| d.until, now.as_micros());
        shard.insert(key.into(), denied);
        self.shards.added(1);
    }

    /// Forgets `key`'s rejection (a refund made room).
    pub fn forget(&self, key: &str) {
        if self.shards.len() == 0 {
            return;
        }
        let mut shard = self.shards.lock_key(key);
        self.shards.remove_in(&mut shard, key);
    }

    /// Forgets every key for which `selected` holds (after an admin reset).
    pub fn forget_matching(&self, selected: impl Fn(&str) -> bool) {
        self.shards.retain(|k, _| !selected(k));
    }

    /// Keys remembered, expired ones included until they are looked at.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_micros(1_000_000_000_000_000 + s * 1_000_000)
    }

    fn denied(until: Timestamp, cost: u64) -> Denied {
        Denied {
            until: until.as_micros(),
            cost,
            limit: 5,
            banned: false,
        }
    }

    #[test]
    fn holds_until_the_end_for_requests_at_least_as_costly() {
        let cache = DenyCache::new(100);
        cache.insert("k", denied(at(10), 2), at(0));
        assert_eq!(cache.get("k", 2, at(9)).map(|d| d.cost), Some(2));
        assert_eq!(cache.get("k", 3, at(9)).map(|d| d.cost), Some(2));
        assert!(
            cache.get("k", 1, at(9)).is_none(),
            "a cheaper request may fit"
        );
        assert!(cache.get("other", 2, at(9)).is_none());
        assert!(cache.get("k", 2, at(10)).is_none(), "over at its end");
        assert!(cache.is_empty(), "and forgotten");
    }

    #[test]
    fn stays_within_its_size_and_forgets_by_prefix() {
        let cache = DenyCache::new(SHARDS);
        for i in 0..100 {
            cache.insert(&format!("ns:{{c{i}}}:l"), denied(at(10), 1), at(0));
        }
        assert!(cache.len() <= SHARDS);
        // Expired entries make room.
        cache.insert("late", denied(at(30), 1), at(20));
        assert_eq!(cache.get("late", 1, at(21)).map(|d| d.cost), Some(1));
        cache.forget_matching(|k| k.starts_with("la"));
        assert!(cache.get("late", 1, at(21)).is_none());
    }
}
