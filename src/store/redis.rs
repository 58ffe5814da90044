//! The Redis store: `redis/batch.lua` decides every operation of a request with the memory
//! store's arithmetic and consumes all of them or none; requests queued behind the call in
//! flight to their server (Cluster: slot) share the next call (`batcher`), each decided as
//! if alone. Local-first operations (`sync every`) are decided in this process and their
//! counts synced per interval (`local`, `redis/sync.lua`).
//!
//! - `now` comes from the engine's clock, so that tests are deterministic; with
//!   [`RedisOptions::server_time`] the script reads Redis's `TIME` instead, for nodes whose
//!   clocks must not matter.
//! - One server (`redis://`, a [`ConnectionManager`]: multiplexed, reconnects after errors) or
//!   a Cluster (`redis+cluster://host:port,host:port`, the `redis` crate's cluster client:
//!   MOVED/ASK followed, writes to masters only). `rediss://` and `rediss+cluster://` speak
//!   TLS (rustls), trusting the system's roots or [`RedisTls::ca_pem`], with an optional
//!   client certificate. In a Cluster a request's keys are grouped by
//!   slot — a client's keys share one through the `{client}` hash tag, a global limit has its
//!   own — and the groups go out at once; when one group rejects, what the others consumed is
//!   given back (`redis/undo.lua`), so a request is still all-or-nothing.
//! - Every call has a timeout; failures feed a circuit breaker (one per server, or per 64
//!   Cluster slots) that stops calling after repeated failures and probes again with
//!   back-off. A failure is a [`StoreError`]; each limit's `on_store_error` decides.
//! - Rejections with a known end are remembered in a local [`DenyCache`], so that a flood is
//!   answered without a round trip.

mod admin;
mod apply;
mod batcher;
mod breaker;
mod cluster;
mod connect;
mod local;
mod region;
mod sentinel;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::Script;

use apply::{eval, params};
use batcher::{Batcher, Link};
use breaker::Breaker;
pub use breaker::BreakerSettings;
pub use cluster::slot;
use connect::{Connection, open};
pub use connect::{Password, RedisOptions, RedisTls, RedisTlsFiles};
use local::LocalFirst;
use region::Regions;
pub use region::{Peer, PeerHealth, RegionSettings, RegionsHealth};
use sentinel::Follower;

use super::deny::DenyCache;
use super::{BatchResult, Op, Settlement, Store, StoreError};
use crate::clock::Timestamp;
use crate::limiter::LeaseId;

const BATCH: &str = include_str!("redis/batch.lua");
const UNDO: &str = include_str!("redis/undo.lua");
const CLUSTER_SLOTS: usize = 16_384;
/// Cluster slots per circuit breaker: masters own ranges of slots, so a failing master trips
/// the breakers of its ranges and leaves the others closed.
const SLOTS_PER_BREAKER: usize = 64;

/// A [`Store`] on one Redis server or a Redis Cluster.
pub struct RedisStore {
    /// The connection (swapped whole when TLS certificates rotate), the batch script and the
    /// call counters, shared with the dispatchers.
    link: Arc<Link>,
    /// Where it connects (with any password: never shown).
    url: String,
    options: RedisOptions,
    breakers: Arc<[Breaker]>,
    /// Behind Sentinel: the master in use, followed.
    sentinel: Option<Arc<Follower>>,
    /// Limits counted across regions: the exchange with the other regions.
    regions: Option<Arc<Regions>>,
    batchers: Batchers,
    /// Local-first limits' counts (`sync every`).
    local: Arc<LocalFirst>,
    deny: Option<DenyCache>,
    cached: AtomicU64,
    tls_rotations: AtomicU64,
}

/// Where a request's batch call is queued.
enum Batchers {
    /// Batching off: every request is its own call.
    Off,
    /// One dispatcher for the server.
    Single(Batcher),
    /// One dispatcher per Cluster slot, started when the slot is first used.
    Cluster(Box<[OnceLock<Batcher>]>),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Whether `url` is a Redis URL Tollgate can connect with (its form only: nothing is
/// reached); what is wrong with it.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    connect::target(url).map(drop)
}

impl RedisStore {
    /// Connects to `url` with the default options, all within `timeout` (which is also the
    /// per-call timeout).
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Self::connect_with(
            url,
            RedisOptions {
                timeout,
                connect_timeout: timeout,
                ..RedisOptions::default()
            },
        )
        .await
    }

    /// Connects to `url` (see the module documentation for its forms), loads the scripts and
    /// checks that the server answers, all within `options.connect_timeout`.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        let (connection, master) = open(url, &options, options.tls.as_ref()).await?;
        let cluster = matches!(connection, Connection::Cluster(_));
        let breakers = if cluster {
            CLUSTER_SLOTS / SLOTS_PER_BREAKER
        } else {
            1
        };
        let sentinel = match (connect::target(url)?, master) {
            (connect::Target::Sentinel(target), Some(master)) => {
                Some(Arc::new(Follower::new(target, master, options.tls.clone())))
            }
            _ => None,
        };
        let link = Arc::new(Link {
            connection: ArcSwap::from_pointee(connection),
            batch: Script::new(BATCH),
            undo: Script::new(UNDO),
            timeout: options.timeout,
            server_time: options.server_time,
            calls: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failed: sentinel.as_ref().map(|s| Arc::clone(&s.wake)),
            swaps: AtomicU64::new(0),
        });
        let batchers = match (options.batch_max > 1, cluster) {
            (false, _) => Batchers::Off,
            (true, false) => Batchers::Single(Batcher::start(Arc::clone(&link), options.batch_max)),
            (true, true) => {
                Batchers::Cluster((0..CLUSTER_SLOTS).map(|_| OnceLock::new()).collect())
            }
        };
        let store = RedisStore {
            link,
            url: url.to_owned(),
            breakers: (0..breakers)
                .map(|_| Breaker::new(options.breaker))
                .collect(),
            sentinel,
            regions: options
                .regions
                .clone()
                .map(|r| Arc::new(Regions::new(r, &options))),
            batchers,
            local: Arc::new(LocalFirst::new()),
            deny: options.deny_cache.map(DenyCache::new),
            options,
            cached: AtomicU64::new(0),
            tls_rotations: AtomicU64::new(0),
        };
        store
            .link
            .ready(&store.link.connection.load(), store.options.connect_timeout)
            .await?;
        if let Some(regions) = &store.regions {
            regions.start(Arc::downgrade(&store.link), cluster);
        }
        if let Some(follower) = &store.sentinel {
            follower.start(
                Arc::downgrade(&store.link),
                Arc::clone(&store.breakers),
                store.options.clone(),
            );
        }
        Ok(store)
    }

    /// Uses `tls` for the connections made from now on: connects with it, checks that the
    /// store answers, and only then swaps it in (calls in flight finish on the old
    /// connection). On any error the connection in use stays, and the error is returned.
    pub async fn rotate_tls(&self, tls: &RedisTls) -> Result<(), StoreError> {
        if !self.url.starts_with("rediss") {
            return Err(StoreError::Backend(
                "TLS certificates apply to `rediss://` URLs only".to_owned(),
            ));
        }
        let (connection, _) = open(&self.url, &self.options, Some(tls)).await?;
        self.link
            .ready(&connection, self.options.connect_timeout)
            .await?;
        if let Some(follower) = &self.sentinel {
            follower.set_tls(tls.clone());
        }
        self.link.swap(connection);
        self.tls_rotations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many times new TLS certificates were put in use.
    pub fn tls_rotations(&self) -> u64 {
        self.tls_rotations.load(Ordering::Relaxed)
    }

    /// Whether this store is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(**self.link.connection.load(), Connection::Cluster(_))
    }

    /// The options in force.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// Batch script calls sent to Redis so far (each decides one request, or one Cluster
    /// slot group of a request, or a batch of them).
    pub fn round_trips(&self) -> u64 {
        self.link.calls.load(Ordering::Relaxed)
    }

    /// Requests (Cluster: slot groups of requests) those calls decided: divided by
    /// [`RedisStore::round_trips`], the mean batch size.
    pub fn batched_requests(&self) -> u64 {
        self.link.requests.load(Ordering::Relaxed)
    }

    /// Local-first sync calls made so far, and how many of them failed.
    pub fn sync_calls(&self) -> (u64, u64) {
        self.local.calls()
    }

    /// Keys of local-first limits this node decides.
    pub fn local_first_keys(&self) -> usize {
        self.local.keys()
    }

    /// Sends the local-first counts of every key used since its last sync and reads the
    /// totals back, now — what the background sync does every interval.
    pub async fn sync_now(&self) -> Result<(), StoreError> {
        self.local.sync_now(&self.link, self.is_cluster()).await
    }

    /// Exchanges the counts of global limits with the other regions now, and waits for the
    /// pushes — what the background exchange does every `region_sync_ms`.
    pub async fn exchange_now(&self) -> Result<(), StoreError> {
        let Some(regions) = &self.regions else {
            return Ok(());
        };
        for push in regions.exchange(&self.link, self.is_cluster()).await? {
            let _ = push.await;
        }
        Ok(())
    }

    /// Requests answered from the local deny cache, without a round trip.
    pub fn cached_rejections(&self) -> u64 {
        self.cached.load(Ordering::Relaxed)
    }

    /// Whether any circuit breaker is open (Redis, or part of the Cluster, is being avoided).
    pub fn circuit_open(&self) -> bool {
        self.breakers.iter().any(Breaker::is_open)
    }

    fn breaker(&self, slot: u16) -> &Breaker {
        &self.breakers[usize::from(slot) / SLOTS_PER_BREAKER % self.breakers.len()]
    }

    /// Runs `f` on a connection within the timeout.
    async fn call<T>(
        &self,
        f: impl AsyncFnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        self.link.call(f).await
    }
}

impl Store for RedisStore {
    async fn apply(&self, ops: &[Op<'_>], now: Timestamp) -> Result<BatchResult, StoreError> {
        if ops.iter().any(|op| op.sync.is_some()) {
            self.apply_local_first(ops, now).await
        } else {
            self.apply_exact(ops, now).await
        }
    }

    async fn release(&self, key: &str, lease: LeaseId, now: Timestamp) -> Result<(), StoreError> {
        // While the circuit is open the lease cannot be given back: it expires on its own.
        if self.breaker(slot(key)).refuses(now) {
            return Err(StoreError::CircuitOpen);
        }
        let _: i64 = self
            .call(async |c| {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(lease.0)
                    .query_async(c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn settle(
        &self,
        settlements: &[Settlement<'_>],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.settle_all(settlements, now).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self
            .call(async |c| redis::cmd("PING").query_async(c).await)
            .await?;
        Ok(())
    }

    fn health(&self) -> super::StoreHealth {
        super::StoreHealth {
            kind: if self.is_cluster() {
                "redis-cluster"
            } else if self.sentinel.is_some() {
                "redis-sentinel"
            } else {
                "redis"
            },
            breakers: self.breakers.len(),
            breakers_open: self.breakers.iter().filter(|b| b.is_open()).count(),
            tls_rotations: self.url.starts_with("rediss").then(|| self.tls_rotations()),
            redis: Some(super::RedisCalls {
                calls: self.round_trips(),
                batched_requests: self.batched_requests(),
                syncs: self.sync_calls().0,
                sync_failures: self.sync_calls().1,
                local_first_keys: self.local_first_keys(),
            }),
            regions: self.regions.as_ref().map(|r| r.health()),
            sentinel: self.sentinel.as_ref().map(|s| super::SentinelMaster {
                master: s.master(),
                switches: s.switches(),
            }),
            ..super::StoreHealth::default()
        }
    }
}
