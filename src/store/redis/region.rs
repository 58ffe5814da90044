//! Limits counted across regions (`global;`). A region is the nodes that share one Redis (or
//! Cluster): within it a global limit is decided exactly, as any other. Across regions, each
//! region is one component of a per-key grow-only counter: every `region_sync_ms`, each node
//! reads its region's count of every global key it used (`region/read.lua`) and writes it
//! into every other region's Redis (`region/merge.lua`: the later window wins, and in one
//! window the larger count, so pushes sent twice, late or out of order are harmless). The
//! batch script adds what the other regions sent (`o`) to the region's own count.
//!
//! - **Steady state.** What a region does not know yet is what the others admitted since
//!   their last push reached it: at most one interval plus the one-way latency of their
//!   admissions. With R regions admitting `rate` each, the regions together admit at most
//!   `(R − 1) × rate × (interval + latency)` past the quota, and never more than R × quota
//!   (a region never admits more than the quota on its own).
//! - **Partition.** Every push also writes the time it arrived, on the receiving Redis's
//!   clock (`region/heard.lua`), so no two machines' clocks are compared. A region that has
//!   not heard from another for `region_partition_ms` counts it by the limit's
//!   `on_partition`: `share` — as having used at least its share of the quota (so the
//!   regions together stay within it, each within its share); `local` — at its last known
//!   count; `deny` — refuse.
//! - **Healing.** Components are cumulative per window, not deltas: after a partition the
//!   next push carries the whole count, and nothing is counted twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;

use super::cluster::slot;
use super::connect::{Connection, RedisOptions, open};
use super::{Link, backend};
use crate::clock::Timestamp;
use crate::limiter::Quota;
use crate::plan::OnPartition;
use crate::store::{Op, StoreError};

/// The hash in each region's Redis of when every other region last wrote into it.
const HEARD: &str = "tollgate:regions:heard";
/// What a `deny` partition adds to the others' count: more than any quota.
const REFUSE: u64 = 1 << 50;
/// Pushes to one region in flight at once (a slow or cut-off region is not piled up on).
const IN_FLIGHT: u64 = 4;

/// This node's region, and the others it exchanges counts with.
#[derive(Clone, PartialEq, Eq)]
pub struct RegionSettings {
    /// This region's name.
    pub name: String,
    /// Its weight in the quota's shares (`on_partition share`).
    pub weight: u64,
    /// The other regions.
    pub peers: Vec<Peer>,
    /// How often counts are exchanged.
    pub interval: Duration,
    /// How long a region may stay silent before it is partitioned off.
    pub partition_after: Duration,
}

/// Another region: its name, its Redis, its weight.
#[derive(Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its name.
    pub name: String,
    /// Its Redis (any URL form; with credentials: never shown).
    pub url: String,
    /// Its weight in the quota's shares.
    pub weight: u64,
}

impl std::fmt::Debug for RegionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers: Vec<&str> = self.peers.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("RegionSettings")
            .field("name", &self.name)
            .field("peers", &peers)
            .field("interval", &self.interval)
            .field("partition_after", &self.partition_after)
            .finish_non_exhaustive()
    }
}

/// What an operator reads of the exchange (`/admin/diagnostics`, metrics).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegionsHealth {
    /// This region.
    pub region: String,
    /// Global keys this node exchanges.
    pub keys: usize,
    /// Global keys this node counted but could not exchange, its table being full (100,000
    /// keys), since start.
    pub keys_untracked: u64,
    /// Each other region.
    pub peers: Vec<PeerHealth>,
}

/// One other region, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerHealth {
    /// Its name.
    pub name: String,
    /// Whether it has not written into this region's Redis for `region_partition_ms`.
    pub partitioned: bool,
    /// Pushes to it that were answered, and that failed.
    pub pushes: u64,
    /// Of those, the ones that failed or timed out.
    pub push_failures: u64,
}

/// Per key, each other region's component as last read: window start and count.
type Components = HashMap<Box<str>, Vec<(u64, u64)>>;

/// A global key this node counted in.
struct Tracked {
    quota: Quota,
    used: Timestamp,
}

/// The most global keys a node exchanges at once. A `global` limit keyed by client, sprayed
/// with new clients, would otherwise grow the table and every exchange without bound; past
/// the cap new keys are decided on their region's count plus what the other regions sent,
/// but this node does not send them (they are counted in `untracked`) until ended windows
/// make room.
pub(super) const MAX_GLOBAL_KEYS: usize = 100_000;

/// The global keys this node exchanges, capped.
struct Tracking {
    keys: HashMap<Box<str>, Tracked>,
    max: usize,
    /// Keys not tracked because the table was full, since start.
    untracked: u64,
}

impl Tracking {
    fn new(max: usize) -> Self {
        Tracking {
            keys: HashMap::new(),
            max,
            untracked: 0,
        }
    }

    /// Notes that `key` was counted at `now`; false when the table is full.
    fn track(&mut self, key: &str, quota: Quota, now: Timestamp) -> bool {
        if let Some(tracked) = self.keys.get_mut(key) {
            tracked.used = now;
            return true;
        }
        if self.keys.len() >= self.max {
            self.untracked += 1;
            return false;
        }
        self.keys.insert(key.into(), Tracked { quota, used: now });
        true
    }
}

struct PeerState {
    settings: Peer,
    connection: arc_swap::ArcSwapOption<Connection>,
    partitioned: AtomicBool,
    in_flight: AtomicU64,
    pushes: AtomicU64,
    failures: AtomicU64,
}

/// The exchange of one store's global counts with the other regions.
pub(super) struct Regions {
    settings: RegionSettings,
    options: RedisOptions,
    peers: Box<[PeerState]>,
    /// Whether any peer is partitioned off (the fast path reads this alone).
    any_partitioned: AtomicBool,
    keys: Mutex<Tracking>,
    /// The other regions' components per key, as last read: window start, count per peer.
    components: Mutex<Components>,
    /// When this node first read its Redis's clock (µs): peers not heard since are silent
    /// from then on.
    started: AtomicU64,
    /// The latest time a global operation was decided at (the engine's clock, µs): windows
    /// are the engine's, heartbeats the Redis's.
    latest: AtomicU64,
    read: Script,
    merge: Script,
    heard: Script,
}

impl Regions {
    pub(super) fn new(settings: RegionSettings, options: &RedisOptions) -> Self {
        let peers = settings
            .peers
            .iter()
            .map(|p| PeerState {
                settings: p.clone(),
                connection: arc_swap::ArcSwapOption::empty(),
                partitioned: AtomicBool::new(false),
                in_flight: AtomicU64::new(0),
                pushes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            })
            .collect();
        Regions {
            settings,
            options: options.clone(),
            peers,
            any_partitioned: AtomicBool::new(false),
            keys: Mutex::new(Tracking::new(MAX_GLOBAL_KEYS)),
            components: Mutex::new(HashMap::new()),
            started: AtomicU64::new(0),
            latest: AtomicU64::new(0),
            read: Script::new(include_str!("region/read.lua")),
            merge: Script::new(include_str!("region/merge.lua")),
            heard: Script::new(include_str!("region/heard.lua")),
        }
    }

    /// What a global operation adds to the other regions' count at `now`, by its partition
    /// mode (0 while every region is heard from); `None` for an operation of this region
    /// alone. Remembers the key for the exchange.
    pub(super) fn extra(&self, op: &Op<'_>, now: Timestamp) -> Option<u64> {
        let mode = op.global?;
        self.latest.fetch_max(now.as_micros(), Ordering::Relaxed);
        self.keys.lock().track(op.key, op.quota, now);
        if !self.any_partitioned.load(Ordering::Relaxed) {
            return Some(0);
        }
        Some(match mode {
            OnPartition::Local => 0,
            OnPartition::Deny => REFUSE,
            OnPartition::Share => {
                let (start, _, limit) = window(&op.quota, now);
                let components = self.components.lock();
                let known = components.get(op.key);
                self.peers
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.partitioned.load(Ordering::Relaxed))
                    .map(|(i, p)| {
                        let counted = known
                            .and_then(|k| k.get(i))
                            .filter(|(s, _)| *s == start)
                            .map_or(0, |(_, c)| *c);
                        self.share(limit, p.settings.weight).saturating_sub(counted)
                    })
                    .sum()
            }
        })
    }

    /// Whether any other region is partitioned off now.
    pub(super) fn partitioned(&self) -> bool {
        self.any_partitioned.load(Ordering::Relaxed)
    }

    /// A region's share of `limit`, by its weight among all the regions'.
    fn share(&self, limit: u64, weight: u64) -> u64 {
        let total =
            self.settings.weight + self.peers.iter().map(|p| p.settings.weight).sum::<u64>();
        share(limit, weight, total)
    }

    pub(super) fn health(&self) -> RegionsHealth {
        let (keys, keys_untracked) = {
            let tracking = self.keys.lock();
            (tracking.keys.len(), tracking.untracked)
        };
        RegionsHealth {
            region: self.settings.name.clone(),
            keys,
            keys_untracked,
            peers: self
                .peers
                .iter()
                .map(|p| PeerHealth {
                    name: p.settings.name.clone(),
                    partitioned: p.partitioned.load(Ordering::Relaxed),
                    pushes: p.pushes.load(Ordering::Relaxed),
                    push_failures: p.failures.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Exchanges every interval until the store is dropped.
    pub(super) fn start(self: &Arc<Self>, link: Weak<Link>, cluster: bool) {
        let regions = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(regions.settings.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(link) = link.upgrade() else { return };
                if let Err(error) = regions.exchange(&link, cluster).await {
                    tracing::debug!(%error, "reading this region's global counts failed");
                }
            }
        });
    }

    /// One exchange: who was heard from, this region's counts read, pushed to every peer.
    /// The pushes go on in the background: their tasks are returned.
    pub(super) async fn exchange(
        self: &Arc<Self>,
        link: &Link,
        cluster: bool,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, StoreError> {
        self.listen(link).await?;
        let now = self.latest.load(Ordering::Relaxed);
        let keys = self.due(now);
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pushed = Vec::with_capacity(keys.len());
        for group in by_slot(&keys, cluster) {
            let mut cmd = self.read.prepare_invoke();
            for &i in &group {
                cmd.key(&*keys[i].0);
            }
            let reply: Vec<String> = link.call(async |c| cmd.invoke_async(c).await).await?;
            let mut fields = reply.into_iter();
            for &i in &group {
                let (key, quota) = &keys[i];
                let own = self.take_components(key, &mut fields);
                if let Some((start, count)) = own {
                    let (_, end, _) = window(quota, Timestamp::from_micros(start));
                    // As long as the region's own key: the window and a margin (batch.lua).
                    let margin = end.saturating_sub(start).min(10_000_000);
                    let life_ms = (end.saturating_sub(now) + margin) / 1000 + 1;
                    pushed.push((key.clone(), start, count, life_ms));
                }
            }
        }
        let pushed = Arc::new(pushed);
        Ok((0..self.peers.len())
            .map(|i| {
                let regions = Arc::clone(self);
                let pushed = Arc::clone(&pushed);
                tokio::spawn(async move { regions.push(i, &pushed).await })
            })
            .collect())
    }

    /// Reads who wrote into this region's Redis and when (on its clock); marks the silent
    /// peers.
    async fn listen(&self, link: &Link) -> Result<(), StoreError> {
        let mut cmd = self.heard.prepare_invoke();
        cmd.key(HEARD);
        let reply: Vec<String> = link.call(async |c| cmd.invoke_async(c).await).await?;
        let mut fields = reply.into_iter();
        let now: u64 = fields.next().and_then(|t| t.parse().ok()).unwrap_or(0);
        let started =
            match self
                .started
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => now,
                Err(first) => first,
            };
        let mut heard: HashMap<String, u64> = HashMap::new();
        while let (Some(name), Some(at)) = (fields.next(), fields.next()) {
            heard.insert(name, at.parse().unwrap_or(0));
        }
        let silence = u64::try_from(self.settings.partition_after.as_micros()).unwrap_or(u64::MAX);
        let mut any = false;
        for p in self.peers.iter() {
            let last = heard
                .get(&p.settings.name)
                .copied()
                .unwrap_or(0)
                .max(started);
            let partitioned = now.saturating_sub(last) > silence;
            let was = p.partitioned.swap(partitioned, Ordering::Relaxed);
            if was != partitioned {
                if partitioned {
                    tracing::warn!(region = %p.settings.name, "no counts from this region: global limits follow on_partition");
                } else {
                    tracing::info!(region = %p.settings.name, "counts from this region again");
                }
            }
            any |= partitioned;
        }
        self.any_partitioned.store(any, Ordering::Relaxed);
        Ok(())
    }

    /// The keys whose window is still current at `now` (the others are dropped), with their
    /// quotas.
    fn due(&self, now: u64) -> Vec<(Box<str>, Quota)> {
        let now = Timestamp::from_micros(now);
        let mut tracking = self.keys.lock();
        let keys = &mut tracking.keys;
        keys.retain(|_, t| window(&t.quota, t.used).1 > now.as_micros());
        let mut components = self.components.lock();
        components.retain(|k, _| keys.contains_key(k));
        keys.iter().map(|(k, t)| (k.clone(), t.quota)).collect()
    }

    /// Reads one key's part of `read.lua`'s answer: keeps the other regions' components, and
    /// returns this region's own window start and count (`None`: nothing counted).
    fn take_components(
        &self,
        key: &str,
        fields: &mut impl Iterator<Item = String>,
    ) -> Option<(u64, u64)> {
        let start = fields.next().and_then(|s| s.parse().ok());
        let count = fields.next().and_then(|c| c.parse().ok());
        let n: usize = fields.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut known = vec![(0, 0); self.peers.len()];
        for _ in 0..n {
            let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
                break;
            };
            let Some(i) = self.peers.iter().position(|p| p.settings.name == name) else {
                continue;
            };
            if let Some((s, c)) = value.split_once(' ') {
                known[i] = (s.parse().unwrap_or(0), c.parse().unwrap_or(0));
            }
        }
        self.components.lock().insert(key.into(), known);
        Some((start?, count?))
    }

    /// Writes `pushed` (key, window start, count, life in ms) into peer `i`'s Redis, and
    /// says this region was heard from. Skipped while [`IN_FLIGHT`] pushes to it wait.
    async fn push(&self, i: usize, pushed: &[(Box<str>, u64, u64, u64)]) {
        let peer = &self.peers[i];
        if peer.in_flight.fetch_add(1, Ordering::AcqRel) >= IN_FLIGHT {
            peer.in_flight.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let outcome = self.push_to(peer, pushed).await;
        peer.in_flight.fetch_sub(1, Ordering::AcqRel);
        peer.pushes.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = outcome {
            peer.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(region = %peer.settings.name, %error, "sending global counts failed");
        }
    }

    async fn push_to(
        &self,
        peer: &PeerState,
        pushed: &[(Box<str>, u64, u64, u64)],
    ) -> Result<(), StoreError> {
        let wait = self.options.connect_timeout;
        let connection = match peer.connection.load_full() {
            Some(c) => c,
            None => {
                let (c, _) =
                    open(&peer.settings.url, &self.options, self.options.tls.as_ref()).await?;
                let c = Arc::new(c);
                peer.connection.store(Some(Arc::clone(&c)));
                c
            }
        };
        let cluster = matches!(*connection, Connection::Cluster(_));
        let names: Vec<&str> = pushed.iter().map(|p| &*p.0).collect();
        let calls = by_slot_names(&names, cluster).into_iter().map(|group| {
            let mut cmd = self.merge.prepare_invoke();
            cmd.arg(&self.settings.name);
            for &i in &group {
                let (key, start, count, life) = &pushed[i];
                cmd.key(&**key).arg(*start).arg(*count).arg(*life);
            }
            let mut c = (*connection).clone();
            async move { cmd.invoke_async::<i64>(&mut c).await.map(drop) }
        });
        let mut heard = self.heard.prepare_invoke();
        heard.key(HEARD).arg(&self.settings.name);
        let mut c = (*connection).clone();
        let all = async {
            futures_util::future::try_join_all(calls).await?;
            heard.invoke_async::<Vec<String>>(&mut c).await.map(drop)
        };
        let result = tokio::time::timeout(wait, all)
            .await
            .map_err(|_| StoreError::Timeout(wait))?
            .map_err(backend);
        if result.is_err() {
            // A fresh connection next time (the cluster client or manager may be stuck).
            peer.connection.store(None);
        }
        result
    }
}

/// `limit × weight ÷ total`, rounded down: the shares of all regions add up to at most the
/// limit.
fn share(limit: u64, weight: u64, total: u64) -> u64 {
    let share = u128::from(limit) * u128::from(weight) / u128::from(total.max(1));
    u64::try_from(share).unwrap_or(u64::MAX)
}

/// A window quota's bounds at `now` and its limit: (start, end, limit), µs.
/// (The language counts `global` limits in fixed windows and calendar quotas only; anything
/// else is a window of its own instant.)
fn window(quota: &Quota, now: Timestamp) -> (u64, u64, u64) {
    let ((start, end), limit) = match *quota {
        Quota::FixedWindow(q) => (q.bounds(now), q.limit.get()),
        Quota::Calendar { limit, period } => (period.bounds(now), limit.get()),
        other => ((now.as_micros(), now.as_micros()), other.policy().0),
    };
    (start, end, limit)
}

/// `keys` grouped by Cluster slot (one group without a Cluster).
fn by_slot(keys: &[(Box<str>, Quota)], cluster: bool) -> Vec<Vec<usize>> {
    let names: Vec<&str> = keys.iter().map(|k| &*k.0).collect();
    by_slot_names(&names, cluster)
}

fn by_slot_names(keys: &[&str], cluster: bool) -> Vec<Vec<usize>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
    for (i, key) in keys.iter().enumerate() {
        groups
            .entry(if cluster { slot(key) } else { 0 })
            .or_default()
            .push(i);
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_weights_and_never_add_up_past_the_limit() {
        assert_eq!(share(90, 1, 3), 30);
        assert_eq!(share(100, 2, 4), 50, "eu=2 of eu=2, us=1, ap=1");
        assert_eq!(share(100, 1, 4), 25);
        for limit in [1, 7, 100, 1_000_003] {
            for weights in [[1, 1, 1], [2, 1, 1], [5, 3, 1], [1000, 1, 1]] {
                let total: u64 = weights.iter().sum();
                let all: u64 = weights.iter().map(|w| share(limit, *w, total)).sum();
                assert!(all <= limit, "{limit} {weights:?}: {all}");
            }
        }
        assert_eq!(share(u64::MAX, 3, 3), u64::MAX, "no overflow");
    }

    #[test]
    fn the_exchanged_keys_are_capped_and_make_room_as_windows_end() {
        use std::num::NonZeroU64;
        let q = Quota::FixedWindow(crate::limiter::WindowQuota {
            limit: NonZeroU64::new(10).unwrap(),
            window: NonZeroU64::new(1_000_000).unwrap(),
        });
        let at = Timestamp::from_micros;
        let mut t = Tracking::new(2);
        assert!(t.track("a", q, at(100)));
        assert!(t.track("b", q, at(200)));
        assert!(!t.track("c", q, at(300)), "full: not tracked");
        assert!(t.track("a", q, at(400)), "a key already tracked stays so");
        assert_eq!((t.keys.len(), t.untracked), (2, 1));
        // The windows end: the exchange drops the keys, and there is room again.
        t.keys.retain(|_, k| window(&k.quota, k.used).1 > 1_000_000);
        assert!(t.track("c", q, at(1_000_100)));
        assert_eq!(t.keys.len(), 1);
    }

    #[test]
    fn windows_are_the_quotas_own() {
        use std::num::NonZeroU64;
        let q = Quota::FixedWindow(crate::limiter::WindowQuota {
            limit: NonZeroU64::new(10).unwrap(),
            window: NonZeroU64::new(2_000_000).unwrap(),
        });
        assert_eq!(
            window(&q, Timestamp::from_micros(7_500_000)),
            (6_000_000, 8_000_000, 10)
        );
    }
}
