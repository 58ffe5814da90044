//! Admin operations on the Redis store: a key's state, resets and counts, found with `SCAN` on
//! every master (never `KEYS`); and the runtime lists, kept in two hashes.

use redis::Value;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::{Connection, RedisStore, backend};
use crate::clock::Timestamp;
use crate::limiter::{
    ConcurrencyState, GcraState, LeaseId, SlidingState, State, TokenBucketState, WindowState,
};
use crate::plan::key::{ban_key, is_ban_key};
use crate::store::{AdminStore, KeySelector, KeyState, RuntimeStore, StoreError};

impl RedisStore {
    /// The state and ban of `key` at `now`.
    pub(super) async fn inspect_key(
        &self,
        key: &str,
        now: Timestamp,
    ) -> Result<KeyState, StoreError> {
        let ban_key = ban_key(key);
        let (kind, ban): (String, Option<u64>) = self
            .call(async |c| {
                let kind = redis::cmd("TYPE").arg(key).query_async(c).await?;
                let ban = redis::cmd("GET").arg(&ban_key).query_async(c).await?;
                Ok((kind, ban))
            })
            .await?;
        let state = match kind.as_str() {
            "hash" => {
                // The algorithms' fields only: a local-first node's own fields hold its
                // component in binary.
                let values: Vec<Option<u64>> = self
                    .call(async |c| {
                        redis::cmd("HMGET")
                            .arg(key)
                            .arg(&HASH_FIELDS)
                            .query_async(c)
                            .await
                    })
                    .await?;
                let fields = HASH_FIELDS
                    .iter()
                    .zip(values)
                    .filter_map(|(name, v)| Some(((*name).to_owned(), v?)))
                    .collect();
                hash_state(&fields)
            }
            "zset" => {
                let leases: Vec<(u64, u64)> = self
                    .call(async |c| {
                        redis::cmd("ZRANGE")
                            .arg(key)
                            .arg(0)
                            .arg(-1)
                            .arg("WITHSCORES")
                            .query_async(c)
                            .await
                    })
                    .await?;
                let live: Vec<(LeaseId, u64)> = leases
                    .into_iter()
                    .filter(|(_, expires)| *expires > now.as_micros())
                    .map(|(id, expires)| (LeaseId(id), expires))
                    .collect();
                (!live.is_empty()).then_some(State::Concurrency(ConcurrencyState { leases: live }))
            }
            _ => None,
        };
        Ok(KeyState {
            state,
            banned_until: ban
                .filter(|b| *b > now.as_micros())
                .map(Timestamp::from_micros),
        })
    }

    /// Removes the selected keys (and this node's cached rejections for them).
    pub(super) async fn reset_selected(
        &self,
        selector: KeySelector<'_>,
    ) -> Result<usize, StoreError> {
        let keys = match selector {
            KeySelector::Key(k) => vec![k.to_owned(), ban_key(k)],
            _ => self.scan(selector).await?,
        };
        self.forget(selector);
        let mut removed = 0;
        // One key per command: in a Cluster the keys live in many slots.
        for key in &keys {
            let n: usize = self
                .call(async |c| redis::cmd("UNLINK").arg(key).query_async(c).await)
                .await?;
            removed += n;
        }
        // Rejections cached while the keys were being removed.
        self.forget(selector);
        Ok(removed)
    }

    /// Counts the selected state keys.
    pub(super) async fn count_selected(
        &self,
        selector: KeySelector<'_>,
    ) -> Result<usize, StoreError> {
        // Redis expires keys itself: every key it returns is live.
        Ok(self
            .scan(selector)
            .await?
            .iter()
            .filter(|k| !is_ban_key(k))
            .count())
    }

    /// The master nodes' addresses (one server: itself).
    async fn masters(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        if !self.is_cluster() {
            return Ok(vec![None]);
        }
        let slots: Value = self
            .call(async |c| redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await)
            .await?;
        let mut masters = Vec::new();
        if let Value::Array(ranges) = slots {
            for range in ranges {
                let Value::Array(parts) = range else { continue };
                let Some(Value::Array(master)) = parts.get(2) else {
                    continue;
                };
                let host = match master.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => continue,
                };
                let Some(Value::Int(port)) = master.get(1) else {
                    continue;
                };
                let Ok(port) = u16::try_from(*port) else {
                    continue;
                };
                let node = Some((host, port));
                if !masters.contains(&node) {
                    masters.push(node);
                }
            }
        }
        Ok(masters)
    }

    /// Every key on every master that `selector` selects.
    async fn scan(&self, selector: KeySelector<'_>) -> Result<Vec<String>, StoreError> {
        let pattern = selector.pattern();
        let mut found = Vec::new();
        let connection = self.link.connection.load_full();
        for node in self.masters().await? {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = match (&node, &*connection) {
                    (Some((host, port)), Connection::Cluster(c)) => {
                        let mut c = c.clone();
                        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        });
                        let value = self
                            .call(async |_| c.route_command(scan, routing).await)
                            .await?;
                        redis::from_redis_value(value).map_err(|e| backend(e.into()))?
                    }
                    _ => self.call(async |c| scan.query_async(c).await).await?,
                };
                found.extend(keys.into_iter().filter(|k| selector.matches(k)));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }
}

impl RuntimeStore for RedisStore {
    async fn runtime_entries(
        &self,
        now: Timestamp,
    ) -> Result<Vec<crate::store::runtime::RuntimeEntry>, StoreError> {
        use crate::store::runtime::{MARKS_KEY, RUNTIME_KEY, RuntimeEntry};
        let mut live = Vec::new();
        for key in [RUNTIME_KEY, MARKS_KEY] {
            let fields: std::collections::HashMap<String, String> = self
                .call(async |c| redis::cmd("HGETALL").arg(key).query_async(c).await)
                .await?;
            let mut ended = Vec::new();
            for (field, value) in fields {
                match serde_json::from_str::<RuntimeEntry>(&value) {
                    Ok(entry) if entry.live(now) && entry.list.store_key() == key => {
                        live.push(entry);
                    }
                    // Ended, or written by something else: dropped.
                    _ => ended.push(field),
                }
            }
            if !ended.is_empty() {
                let _: usize = self
                    .call(async |c| redis::cmd("HDEL").arg(key).arg(&ended).query_async(c).await)
                    .await?;
            }
        }
        live.sort_by_key(RuntimeEntry::field);
        Ok(live)
    }

    async fn put_runtime_entry(
        &self,
        entry: &crate::store::runtime::RuntimeEntry,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_string(entry).map_err(|e| StoreError::Backend(e.to_string()))?;
        let field = entry.field();
        let _: usize = self
            .call(async |c| {
                redis::cmd("HSET")
                    .arg(entry.list.store_key())
                    .arg(&field)
                    .arg(&value)
                    .query_async(c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn remove_runtime_entry(
        &self,
        list: crate::store::runtime::RuntimeList,
        target: &crate::store::runtime::Target,
    ) -> Result<bool, StoreError> {
        let field = crate::store::runtime::field(list, target);
        let removed: usize = self
            .call(async |c| {
                redis::cmd("HDEL")
                    .arg(list.store_key())
                    .arg(&field)
                    .query_async(c)
                    .await
            })
            .await?;
        Ok(removed > 0)
    }
}

impl AdminStore for RedisStore {
    async fn inspect(&self, key: &str, now: Timestamp) -> Result<KeyState, StoreError> {
        self.inspect_key(key, now).await
    }

    async fn reset(&self, selector: KeySelector<'_>) -> Result<usize, StoreError> {
        self.reset_selected(selector).await
    }

    async fn count(&self, selector: KeySelector<'_>, _now: Timestamp) -> Result<usize, StoreError> {
        self.count_selected(selector).await
    }
}

/// The fields the algorithms write in a hash key (`batch.lua`, `sync.lua`).
const HASH_FIELDS: [&str; 6] = ["s", "c", "p", "t", "l", "u"];

/// A hash key's state, by the fields its algorithm writes.
fn hash_state(f: &std::collections::HashMap<String, u64>) -> Option<State> {
    let get = |name: &str| f.get(name).copied();
    if let (Some(level), Some(updated)) = (get("l"), get("u")) {
        return Some(State::TokenBucket(TokenBucketState { level, updated }));
    }
    if let Some(tat) = get("t") {
        return Some(State::Gcra(GcraState { tat }));
    }
    let start = get("s")?;
    let current = get("c").unwrap_or(0);
    Some(match get("p") {
        Some(previous) => State::Sliding(SlidingState {
            start,
            previous,
            current,
        }),
        None => State::Window(WindowState {
            start,
            count: current,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_fields_tell_the_algorithm() {
        let f = |pairs: &[(&str, u64)]| {
            hash_state(&pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
        };
        assert_eq!(
            f(&[("s", 10), ("c", 3)]),
            Some(State::Window(WindowState {
                start: 10,
                count: 3
            }))
        );
        assert_eq!(f(&[("t", 7)]), Some(State::Gcra(GcraState { tat: 7 })));
        assert_eq!(f(&[]), None);
    }
}
