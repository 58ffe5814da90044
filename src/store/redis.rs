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
mod batcher;
mod breaker;
mod cluster;
mod local;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use smallvec::SmallVec;

use batcher::{Batcher, Encoded, Link};
use local::{LocalFirst, LocalOp};

pub use breaker::BreakerSettings;
use breaker::{Breaker, Permit};
pub use cluster::slot;

use super::deny::{Denied, DenyCache};
use super::{
    AdminStore, BatchResult, KeySelector, KeyState, Op, OpResult, RuntimeStore, Store, StoreError,
};
use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota, us};

const BATCH: &str = include_str!("redis/batch.lua");
const UNDO: &str = include_str!("redis/undo.lua");
const CLUSTER_SLOTS: usize = 16_384;
/// Cluster slots per circuit breaker: masters own ranges of slots, so a failing master trips
/// the breakers of its ranges and leaves the others closed.
const SLOTS_PER_BREAKER: usize = 64;

/// How the store talks to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// The most one call may take before it counts as failed (default 50 ms).
    pub timeout: Duration,
    /// The most connecting may take (default 1 s).
    pub connect_timeout: Duration,
    /// Read the time from Redis (`TIME`) instead of the engine's clock, so that nodes with
    /// skewed clocks agree. Calendar quotas still take their period from the engine's clock.
    pub server_time: bool,
    /// When to stop calling a failing Redis, and how to probe it again.
    pub breaker: BreakerSettings,
    /// Remember rejections locally until they end, for up to this many keys (`None`: off).
    pub deny_cache: Option<usize>,
    /// Certificates for `rediss://` URLs (`None`: the system's roots, no client certificate).
    pub tls: Option<RedisTls>,
    /// The most requests decided in one call (default 64): requests that arrive while a call
    /// to their server (Cluster: their slot) is in flight wait for it and go out together in
    /// the next one. 1: every request is its own call, sent at once.
    pub batch_max: usize,
}

/// Certificates for TLS to Redis, in PEM.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    /// The CA that signed the servers' certificates, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its private key, for servers that require one
    /// (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

/// Where the certificates for TLS to Redis are read from (`redis_tls_ca_file`,
/// `redis_tls_cert_file`, `redis_tls_key_file`): read at start-up, and again when they
/// change (a rotated certificate is picked up without a restart).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisTlsFiles {
    /// The CA that signed the servers' certificates.
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    pub key: Option<std::path::PathBuf>,
}

impl RedisTlsFiles {
    /// The files' paths, to watch.
    pub fn paths(&self) -> Vec<std::path::PathBuf> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Reads the certificates; every problem, each with the setting it is about.
    pub fn read(&self) -> Result<RedisTls, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let mut read = |key: &'static str,
                        path: &Option<std::path::PathBuf>,
                        marker: &str,
                        what: &str| {
            let path = path.as_ref()?;
            match std::fs::read(path) {
                Ok(pem) if pem.windows(marker.len()).any(|w| w == marker.as_bytes()) => Some(pem),
                Ok(_) => {
                    problems.push((key, format!("`{}` holds no PEM {what}", path.display())));
                    None
                }
                Err(e) => {
                    problems.push((key, format!("cannot read `{}`: {e}", path.display())));
                    None
                }
            }
        };
        const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";
        let ca_pem = read("redis_tls_ca_file", &self.ca, CERTIFICATE, "certificate");
        let cert = read(
            "redis_tls_cert_file",
            &self.cert,
            CERTIFICATE,
            "certificate",
        );
        let key = read(
            "redis_tls_key_file",
            &self.key,
            "PRIVATE KEY-----",
            "private key",
        );
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ if self.cert.is_some() != self.key.is_some() => {
                let missing = if self.cert.is_some() {
                    "redis_tls_key_file"
                } else {
                    "redis_tls_cert_file"
                };
                problems.push((
                    missing,
                    "a client certificate needs both `redis_tls_cert_file` and `redis_tls_key_file`"
                        .to_owned(),
                ));
                None
            }
            _ => None,
        };
        if problems.is_empty() {
            Ok(RedisTls { ca_pem, client })
        } else {
            Err(problems)
        }
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            server_time: false,
            breaker: BreakerSettings::default(),
            deny_cache: Some(100_000),
            tls: None,
            batch_max: 64,
        }
    }
}

/// One server or a Cluster, behind one connection interface.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection to `url` with `tls` (for `rediss` URLs), within `options.connect_timeout`.
async fn open(
    url: &str,
    options: &RedisOptions,
    tls: Option<&RedisTls>,
) -> Result<Connection, StoreError> {
    let wait = options.connect_timeout;
    let secure = url.starts_with("rediss");
    let tls = tls.filter(|_| secure);
    if secure {
        // rustls picks its crypto from the process default: make it ring (the one compiled
        // in). An error only says a default is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let connecting = async {
        match target(url)? {
            Target::Single(url) => {
                let client = match tls {
                    Some(tls) => redis::Client::build_with_tls(url.as_str(), tls.certificates()),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(backend)?;
                // Reconnection is the breaker's job: one attempt per call.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(wait))
                    .set_response_timeout(None);
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map(Connection::Single)
                    .map_err(backend)
            }
            Target::Cluster(seeds) => {
                let mut builder = ClusterClientBuilder::new(seeds);
                if let Some(tls) = tls {
                    builder = builder.certs(tls.certificates());
                }
                let client = builder
                    .connection_timeout(wait)
                    .response_timeout(options.timeout)
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(50)
                    .build()
                    .map_err(backend)?;
                client
                    .get_async_connection()
                    .await
                    .map(Connection::Cluster)
                    .map_err(backend)
            }
        }
    };
    tokio::time::timeout(wait, connecting)
        .await
        .map_err(|_| StoreError::Timeout(wait))?
}

/// Where a URL points: one server, or a Cluster's seed nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// `redis://…` (or `rediss://…`, `unix://…`) names one server;
/// `redis+cluster://[auth@]h1:p1,h2:p2` (or `rediss+cluster://…`) a Cluster, by any of its
/// nodes.
fn target(url: &str) -> Result<Target, StoreError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(Target::Single(url.to_owned()));
    };
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let seeds: Vec<String> = hosts
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{auth}{h}"))
        .collect();
    if seeds.is_empty() {
        return Err(StoreError::Backend(format!(
            "`{scheme}+cluster://` needs at least one host:port"
        )));
    }
    Ok(Target::Cluster(seeds))
}

/// A [`Store`] on one Redis server or a Redis Cluster.
pub struct RedisStore {
    /// The connection (swapped whole when TLS certificates rotate), the batch script and the
    /// call counters, shared with the dispatchers.
    link: Arc<Link>,
    /// Where it connects (with any password: never shown).
    url: String,
    undo: Script,
    options: RedisOptions,
    breakers: Box<[Breaker]>,
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
        let connection = open(url, &options, options.tls.as_ref()).await?;
        let cluster = matches!(connection, Connection::Cluster(_));
        let breakers = if cluster {
            CLUSTER_SLOTS / SLOTS_PER_BREAKER
        } else {
            1
        };
        let link = Arc::new(Link {
            connection: ArcSwap::from_pointee(connection),
            batch: Script::new(BATCH),
            timeout: options.timeout,
            server_time: options.server_time,
            calls: AtomicU64::new(0),
            requests: AtomicU64::new(0),
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
            undo: Script::new(UNDO),
            breakers: (0..breakers)
                .map(|_| Breaker::new(options.breaker))
                .collect(),
            batchers,
            local: Arc::new(LocalFirst::new()),
            deny: options.deny_cache.map(DenyCache::new),
            options,
            cached: AtomicU64::new(0),
            tls_rotations: AtomicU64::new(0),
        };
        store.ready(&store.link.connection.load()).await?;
        Ok(store)
    }

    /// Loads both scripts (on every master of a Cluster) on `connection` and checks that the
    /// store answers, within the connect timeout.
    async fn ready(&self, connection: &Connection) -> Result<(), StoreError> {
        let wait = self.options.connect_timeout;
        tokio::time::timeout(wait, async {
            let mut c = connection.clone();
            self.link.batch.prepare_invoke().load_async(&mut c).await?;
            self.undo.prepare_invoke().load_async(&mut c).await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map_err(|_| StoreError::Timeout(wait))?
        .map_err(backend)?;
        Ok(())
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
        let connection = open(&self.url, &self.options, Some(tls)).await?;
        self.ready(&connection).await?;
        self.link.connection.store(Arc::new(connection));
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

    /// Appends the undo script's first two arguments: `now` (or `T`, for Redis's own clock) and
    /// the number of operations.
    fn push_clock(&self, cmd: &mut Cmd, now: Timestamp, n: usize) {
        if self.options.server_time {
            cmd.arg("T");
        } else {
            cmd.arg(now.as_micros());
        }
        cmd.arg(n);
    }

    /// One batch call for the operations `group` of `ops`, through the breaker of `slot`.
    async fn run_group(
        &self,
        ops: &[Op<'_>],
        group: &[usize],
        slot: u16,
        now: Timestamp,
    ) -> Result<BatchResult, StoreError> {
        let breaker = self.breaker(slot);
        let probe = match breaker.permit(now) {
            Permit::Refuse => return Err(StoreError::CircuitOpen),
            Permit::Probe => true,
            Permit::Call => false,
        };
        let request = Encoded::new(ops, group, now);
        let answer = match &self.batchers {
            Batchers::Off => self.link.run(&[&request]).await.map(|mut a| a.remove(0)),
            Batchers::Single(batcher) => self.queued(batcher.submit(request)).await,
            Batchers::Cluster(slots) => {
                let batcher = slots[usize::from(slot)]
                    .get_or_init(|| Batcher::start(Arc::clone(&self.link), self.options.batch_max));
                self.queued(batcher.submit(request)).await
            }
        };
        // After a connection loss the failed call left a fresh connection attempt, which the
        // next call (the probe, once the breaker is open) makes.
        let result = answer.and_then(|reply| parse(&reply, ops, group, now));
        match &result {
            Ok(_) => breaker.success(probe),
            Err(_) => breaker.failure(now, probe),
        }
        result
    }

    /// Waits for a queued request's answer, within the timeout (the wait in the queue
    /// included).
    async fn queued(
        &self,
        answer: impl Future<Output = Result<Vec<i64>, StoreError>>,
    ) -> Result<Vec<i64>, StoreError> {
        tokio::time::timeout(self.options.timeout, answer)
            .await
            .map_err(|_| StoreError::Timeout(self.options.timeout))?
    }

    /// A rejection remembered for one of `ops`, as the batch result it stands for.
    fn cached(&self, ops: &[Op<'_>], now: Timestamp) -> Option<BatchResult> {
        let deny = self.deny.as_ref()?;
        let (index, denied) = ops.iter().enumerate().find_map(|(i, op)| {
            if !op.enforce || matches!(op.quota, Quota::Concurrency(_)) {
                return None;
            }
            deny.get(op.key, op.cost, now).map(|d| (i, d))
        })?;
        self.cached.fetch_add(1, Ordering::Relaxed);
        let wait = us(denied.until.saturating_sub(now.as_micros()));
        let results = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                if i == index {
                    OpResult {
                        decision: Decision {
                            allowed: false,
                            limit: denied.limit,
                            remaining: 0,
                            reset: wait,
                            retry_after: Some(wait),
                        },
                        banned: denied.banned,
                    }
                } else {
                    OpResult::not_asked(&op.quota)
                }
            })
            .collect();
        Some(BatchResult {
            admitted: false,
            results,
        })
    }

    /// Remembers the rejections of `result` that hold until a known time.
    fn remember(&self, ops: &[Op<'_>], result: &BatchResult, now: Timestamp) {
        let Some(deny) = &self.deny else {
            return;
        };
        for (op, r) in ops.iter().zip(&result.results) {
            let d = &r.decision;
            if d.allowed || !op.enforce || matches!(op.quota, Quota::Concurrency(_)) {
                continue;
            }
            let Some(wait) = d.retry_after.filter(|w| !w.is_zero()) else {
                continue;
            };
            let denied = Denied {
                until: now.saturating_add(wait).as_micros(),
                cost: op.cost,
                limit: d.limit,
                banned: r.banned,
            };
            deny.insert(op.key, denied, now);
        }
    }

    /// Forgets what this node remembers of the selected keys: cached rejections, and
    /// local-first counts and bans.
    fn forget(&self, selector: KeySelector<'_>) {
        if let Some(deny) = &self.deny {
            deny.forget_matching(|k| selector.matches(k));
        }
        self.local.forget(|k| selector.matches(k));
    }
}

/// Runs `cmd`, an `EVALSHA` of `script`; when Redis no longer has the script (`NOSCRIPT`,
/// after a `SCRIPT FLUSH` or a restart), loads it and runs `cmd` again.
async fn eval<T: redis::FromRedisValue>(
    c: &mut Connection,
    script: &Script,
    cmd: &Cmd,
) -> redis::RedisResult<T> {
    match cmd.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(c).await?;
            cmd.query_async(c).await
        }
        other => other,
    }
}

/// The script's algorithm code and three parameters for a quota.
fn params(quota: &Quota, now: Timestamp) -> [u64; 4] {
    match *quota {
        Quota::FixedWindow(q) => [1, q.limit.get(), q.window.get(), 0],
        Quota::Calendar { limit, period } => {
            let (start, end) = period.bounds(now);
            [2, limit.get(), start, end]
        }
        Quota::SlidingWindow(q) => [3, q.limit.get(), q.window.get(), 0],
        Quota::TokenBucket(q) => [4, q.capacity.get(), q.count.get(), q.period.get()],
        Quota::Gcra(q) => [5, q.capacity.get(), q.emission_interval(), 0],
        Quota::Concurrency(q) => [6, q.max.get(), q.lease.get(), 0],
    }
}

impl RedisStore {
    /// A request with local-first operations: those decided here (all or nothing), then the
    /// others in Redis; when Redis rejects or fails, what was counted here is given back.
    async fn apply_local_first(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> Result<BatchResult, StoreError> {
        if self.local.degraded() {
            return Err(StoreError::Backend(
                "local-first counts are not reaching Redis (the last syncs failed)".to_owned(),
            ));
        }
        self.local.start(&self.link, self.is_cluster());
        let (local_at, local_ops): (SmallVec<[usize; 4]>, SmallVec<[LocalOp<'_>; 4]>) = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| {
                let every = op.sync?;
                Some((
                    i,
                    LocalOp {
                        key: op.key,
                        quota: op.quota,
                        cost: op.cost,
                        enforce: op.enforce,
                        ban: op.ban,
                        every,
                    },
                ))
            })
            .unzip();
        let mut local_results: SmallVec<[Option<OpResult>; 4]> =
            smallvec::smallvec![None; local_ops.len()];
        let mut overflow: SmallVec<[bool; 4]> = smallvec::smallvec![false; local_ops.len()];
        let (admitted, taken) =
            self.local
                .decide(&local_ops, now, &mut local_results, &mut overflow);
        let mut exact_at: SmallVec<[usize; 4]> =
            (0..ops.len()).filter(|&i| ops[i].sync.is_none()).collect();
        exact_at.extend(
            local_at
                .iter()
                .zip(&overflow)
                .filter(|(_, o)| **o)
                .map(|(&i, _)| i),
        );
        let mut results: Vec<Option<OpResult>> = vec![None; ops.len()];
        let mut admitted_all = admitted;
        if !admitted {
            for &i in &exact_at {
                results[i] = Some(OpResult::not_asked(&ops[i].quota));
            }
        } else if !exact_at.is_empty() {
            let exact_ops: SmallVec<[Op<'_>; 4]> = exact_at
                .iter()
                .map(|&i| Op {
                    sync: None,
                    ..ops[i]
                })
                .collect();
            match self.apply_exact(&exact_ops, now).await {
                Err(error) => {
                    self.local.give_back(&local_ops, taken, &mut local_results);
                    return Err(error);
                }
                Ok(answer) => {
                    if !answer.admitted {
                        self.local.give_back(&local_ops, taken, &mut local_results);
                        admitted_all = false;
                    }
                    for (&i, r) in exact_at.iter().zip(answer.results) {
                        results[i] = Some(r);
                    }
                }
            }
        }
        for (&i, r) in local_at.iter().zip(local_results) {
            if let Some(r) = r {
                results[i] = Some(r);
            }
        }
        let results = results
            .into_iter()
            .zip(ops)
            .map(|(r, op)| r.unwrap_or_else(|| OpResult::not_asked(&op.quota)))
            .collect();
        Ok(BatchResult {
            admitted: admitted_all,
            results,
        })
    }

    /// A request decided in Redis (or by the deny cache).
    async fn apply_exact(&self, ops: &[Op<'_>], now: Timestamp) -> Result<BatchResult, StoreError> {
        if let Some(result) = self.cached(ops, now) {
            return Ok(result);
        }
        let result = if !self.is_cluster() {
            let all: SmallVec<[usize; 8]> = (0..ops.len()).collect();
            self.run_group(ops, &all, 0, now).await?
        } else {
            self.apply_by_slot(ops, now).await?
        };
        self.remember(ops, &result, now);
        Ok(result)
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
            ..super::StoreHealth::default()
        }
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

/// The script's flat reply: admitted, then six numbers per operation.
/// The batch script's answer for the operations `group` of `ops`: the full form (six numbers
/// per operation), or the short one when all were allowed (remaining and reset).
fn parse(
    reply: &[i64],
    ops: &[Op<'_>],
    group: &[usize],
    now: Timestamp,
) -> Result<BatchResult, StoreError> {
    let n = group.len();
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    let us = |v: i64| Duration::from_micros(count(v));
    let results = if reply.len() == 1 + 2 * n && reply[0] == 1 {
        group
            .iter()
            .zip(reply[1..].chunks_exact(2))
            .map(|(&i, r)| OpResult {
                decision: Decision {
                    allowed: true,
                    limit: params(&ops[i].quota, now)[1],
                    remaining: count(r[0]),
                    reset: us(r[1]),
                    retry_after: None,
                },
                banned: false,
            })
            .collect()
    } else if reply.len() == 1 + 6 * n {
        reply[1..]
            .chunks_exact(6)
            .map(|r| OpResult {
                decision: Decision {
                    allowed: r[0] == 1,
                    limit: count(r[1]),
                    remaining: count(r[2]),
                    reset: us(r[3]),
                    retry_after: (r[4] >= 0 && r[0] == 0).then(|| us(r[4])),
                },
                banned: r[5] == 1,
            })
            .collect()
    } else {
        return Err(StoreError::Backend(format!(
            "the batch script answered {} numbers for {n} operations",
            reply.len()
        )));
    };
    Ok(BatchResult {
        admitted: reply[0] == 1,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_or_a_cluster() {
        assert_eq!(
            target("redis://h:1/0").unwrap(),
            Target::Single("redis://h:1/0".to_owned())
        );
        assert_eq!(
            target("redis+cluster://u:p@a:1, b:2").unwrap(),
            Target::Cluster(vec![
                "redis://u:p@a:1".to_owned(),
                "redis://u:p@b:2".to_owned()
            ])
        );
        assert_eq!(
            target("rediss+cluster://a:1,b:2").unwrap(),
            Target::Cluster(vec!["rediss://a:1".to_owned(), "rediss://b:2".to_owned()])
        );
        assert_eq!(
            target("rediss://h:1").unwrap(),
            Target::Single("rediss://h:1".to_owned())
        );
        assert!(target("redis+cluster://").is_err());
        assert!(target("rediss+cluster://").is_err());
    }
}
