//! Decisions to ClickHouse without holding up a request: each decision becomes a row on a
//! bounded queue ([`Exporter::send`] never waits; a full queue drops the row and counts it),
//! and one task inserts them in batches, by size or by time, retrying a failed batch without
//! ever inserting it twice (each batch carries an id, looked up before a retry). While
//! ClickHouse is down, batches wait in a bounded on-disk [`Spool`] (when one is configured)
//! and are delivered in order when it answers again; only a full spool loses rows, and each
//! lost row is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clickhouse::Client;
use tokio::sync::{mpsc, oneshot};

use super::spool::{Spool, SpoolSettings};

/// One row of `decisions` (see the migrations in [`super::MIGRATIONS`]); field names are the
/// columns.
#[derive(
    Debug, Clone, Default, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize,
)]
pub struct DecisionRow {
    /// Seconds since the epoch.
    pub ts: u32,
    /// The node that decided.
    pub node: Arc<str>,
    /// The plan's version.
    pub plan_version: Arc<str>,
    /// The policy file's namespace.
    pub namespace: String,
    /// The limit (or list) that decided.
    pub limit_name: Arc<str>,
    /// The limit's algorithm.
    pub algorithm: std::borrow::Cow<'static, str>,
    /// The `decision` enum's value (see [`Decision`]).
    pub decision: i8,
    /// The tier, for tiered limits.
    pub tier: Arc<str>,
    /// The tenant, when known.
    pub tenant: Arc<str>,
    /// What the key counts by (`ip`, `user`, `token`, …).
    pub key_kind: String,
    /// The counter key's keyed hash.
    pub key_hash: String,
    /// The client's address.
    pub client_ip: Arc<str>,
    /// The request's method.
    pub method: Arc<str>,
    /// The route template (else the path).
    pub route: Arc<str>,
    /// The status Tollgate answered (200 when it let the request through).
    pub status: u16,
    /// Units charged.
    pub cost: u64,
    /// Units used after the decision.
    pub used: u64,
    /// The quota.
    pub quota: u64,
    /// Units left.
    pub remaining: u64,
    /// The delay imposed, in milliseconds.
    pub delay_ms: u32,
    /// The decision's own latency, in microseconds (0: not measured).
    pub latency_us: u32,
    /// Cedar's determining policies.
    pub policies: Vec<Arc<str>>,
    /// 1 in shadow mode.
    pub shadow: u8,
    /// The share of such decisions exported (allows may be sampled).
    pub sample_rate: f32,
    /// The request's id.
    pub request_id: Arc<str>,
    /// The batch it was inserted in (set by the exporter).
    pub batch_id: Arc<str>,
    /// The flags (anomalies' `flag`) the client carried.
    #[serde(default)]
    pub flags: Vec<Arc<str>>,
}

/// One row of `anomalies`: a detection acted on.
#[derive(
    Debug, Clone, Default, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize,
)]
pub struct AnomalyRow {
    /// Seconds since the epoch.
    pub ts: u32,
    /// The node that acted.
    pub node: String,
    /// The plan's version.
    pub plan_version: String,
    /// The anomaly block's namespace.
    pub namespace: String,
    /// The anomaly block.
    pub anomaly: String,
    /// What its key counts by (`ip`, `user`, …).
    pub key_kind: String,
    /// The counter key's keyed hash.
    pub key_hash: String,
    /// The client's address.
    pub client_ip: String,
    /// What was seen in the window (responses, distinct values).
    pub observed: u64,
    /// What it was compared with.
    pub threshold: f64,
    /// The detector's window, in seconds.
    pub window_s: u32,
    /// The ban imposed, in seconds (0: none).
    pub ban_s: u32,
    /// How long the key is flagged, in seconds (0: not).
    pub flag_s: u32,
    /// The tarpit's hold, in milliseconds (0: none).
    pub tarpit_ms: u32,
    /// The alert channels told.
    pub alerts: Vec<String>,
}

/// The `decision` column's values (`Enum8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i8)]
pub enum Decision {
    /// Admitted.
    Allow = 1,
    /// Admitted, 80 % or more used.
    NearLimit = 2,
    /// Admitted past a soft `warn`.
    Warn = 3,
    /// Admitted past a soft `delay`.
    Delay = 4,
    /// Refused by a limit.
    Reject = 5,
    /// Over a limit in shadow mode.
    ShadowReject = 6,
    /// Refused by a denylist.
    Forbid = 7,
    /// Refused by Cedar.
    Unauthorized = 8,
    /// Passed by a safelist.
    Bypass = 9,
    /// The store failed.
    StoreError = 10,
}

/// How the exporter batches and what it keeps.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// Rows per insert at most (default 10,000).
    pub batch_rows: usize,
    /// The longest a row waits before its batch is inserted (default 1 s).
    pub flush_every: Duration,
    /// Rows waiting at most; past that new rows are dropped and counted (default 100,000).
    pub queue_rows: usize,
    /// The database holding `decisions` (see [`super::migrate`]).
    pub database: String,
    /// Where batches wait while ClickHouse is down (`None`: in memory, retried in place, so
    /// that the queue fills and drops once it is full).
    pub spool: Option<SpoolSettings>,
    /// The share of admitted requests exported, in `(0, 1]` (default 1: all); refusals,
    /// warnings, delays, shadow rejections and store errors are always exported.
    pub sample_allows: f64,
    /// The request header whose value is the row's tenant.
    pub tenant_header: Option<http::HeaderName>,
    /// Client addresses are cut to their /24 (IPv4) or /48 (IPv6) network.
    pub truncate_ip: bool,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            batch_rows: 10_000,
            flush_every: Duration::from_secs(1),
            queue_rows: 100_000,
            database: "tollgate".to_owned(),
            spool: None,
            sample_allows: 1.0,
            tenant_header: None,
            truncate_ip: false,
        }
    }
}

/// What the exporter did so far (for metrics and tests).
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Rows inserted.
    pub sent: AtomicU64,
    /// Rows lost: the queue or the spool was full, or a spooled file could not be read.
    pub dropped: AtomicU64,
    /// Inserts that failed (each retried).
    pub failures: AtomicU64,
    /// Requests (and rows) waiting in the queue.
    pub queued: AtomicU64,
    /// Rows written to the spool, in all.
    pub spooled: AtomicU64,
    /// Rows waiting in the spool now.
    pub spool_rows: AtomicU64,
    /// Admitted requests not exported (sampling).
    pub sampled_out: AtomicU64,
}

enum Item {
    Event(Box<DecisionEvent>),
    Anomaly(Box<AnomalyRow>),
    Flush(oneshot::Sender<()>),
}

/// Anomaly rows kept while ClickHouse does not take them (they are rare; past this, the
/// oldest are dropped and counted).
const ANOMALIES_KEPT: usize = 10_000;

/// The handle decisions are sent through (cheap to clone).
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Item>,
    stats: Arc<ExportStats>,
    shape: Arc<RowShape>,
}

/// What [`rows`] needs from the settings.
#[derive(Debug, Clone, Default)]
pub struct RowShape {
    /// See [`ExportSettings::sample_allows`].
    pub sample_allows: f64,
    /// See [`ExportSettings::tenant_header`].
    pub tenant_header: Option<http::HeaderName>,
    /// See [`ExportSettings::truncate_ip`].
    pub truncate_ip: bool,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("stats", &self.stats)
            .finish()
    }
}

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The spool's directory cannot be used.
    #[error("cannot open the export spool at `{dir}`: {source}")]
    Spool {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exporter's thread cannot start.
    #[error("cannot start the exporter's thread: {0}")]
    Thread(std::io::Error),
}

impl Exporter {
    /// Starts the batching task on a thread of its own; what a spool left by an earlier
    /// process holds is delivered first.
    pub fn start(client: Client, settings: ExportSettings) -> Result<Exporter, ExportError> {
        let spool = match &settings.spool {
            Some(s) => Some(Spool::open(s.clone()).map_err(|source| ExportError::Spool {
                dir: s.dir.clone(),
                source,
            })?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(settings.queue_rows.max(1));
        let stats = Arc::new(ExportStats::default());
        if let Some(spool) = &spool {
            stats.spool_rows.store(spool.rows(), Ordering::Relaxed);
        }
        let shape = Arc::new(RowShape {
            sample_allows: settings.sample_allows.clamp(f64::MIN_POSITIVE, 1.0),
            tenant_header: settings.tenant_header.clone(),
            truncate_ip: settings.truncate_ip,
        });
        let batcher = Batcher {
            client: client.with_database(&settings.database),
            stats: Arc::clone(&stats),
            spool,
            backoff: MIN_BACKOFF,
            retry_at: None,
            anomalies: Vec::new(),
            warnings: crate::telemetry::Burst::new(crate::telemetry::BURST_WINDOW),
        };
        // Its own thread and runtime: making, serializing and compressing a batch of 10,000
        // rows takes milliseconds, which must not hold up the requests sharing a worker.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ExportError::Thread)?;
        std::thread::Builder::new()
            .name("tollgate-export".to_owned())
            .spawn(move || runtime.block_on(batcher.run(settings, rx)))
            .map_err(ExportError::Thread)?;
        Ok(Exporter { tx, stats, shape })
    }

    /// Queues a request's decision without waiting; its rows are made by the exporter's
    /// task. A full queue drops them (counted in `dropped`).
    fn send_event(&self, event: Box<DecisionEvent>) {
        let rows = event.rows_len();
        self.queue(Item::Event(event), rows);
    }

    fn queue(&self, item: Item, rows: u64) {
        match self.tx.try_send(item) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
            }
        }
    }

    /// Queues an anomaly row without waiting (a full queue drops it, counted).
    pub fn send_anomaly(&self, row: AnomalyRow) {
        if self.tx.try_send(Item::Anomaly(Box::new(row))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every row queued before the call is inserted or spooled, after one
    /// attempt to deliver what the spool holds.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Item::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// How rows are shaped (sampling, tenant, address truncation).
    pub fn shape(&self) -> &RowShape {
        &self.shape
    }
}

/// How often the exporter's task looks at its queue.
const TICK: Duration = Duration::from_millis(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The task that batches rows and inserts them.
struct Batcher {
    client: Client,
    stats: Arc<ExportStats>,
    spool: Option<Spool>,
    backoff: Duration,
    /// Runs out when the spool may be tried again (`None`: now).
    retry_at: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Anomaly rows not inserted yet.
    anomalies: Vec<AnomalyRow>,
    /// Failures are logged once per burst, with how many lines were held back.
    warnings: crate::telemetry::Burst,
}

impl Batcher {
    /// Drains the queue every [`TICK`] rather than waiting on it: a request that queues a
    /// decision never has to wake this task (a cross-thread wake-up per request would cost
    /// the request path more than the rest of the export).
    async fn run(mut self, settings: ExportSettings, mut rx: mpsc::Receiver<Item>) {
        use futures_util::FutureExt as _;
        // Room for a last decision's rows past the batch size, so the batch never grows.
        let mut batch: Vec<DecisionRow> = Vec::with_capacity(settings.batch_rows.min(10_000) + 64);
        let mut flushes = Vec::new();
        let mut tick = tokio::time::interval(TICK.min(settings.flush_every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Tokio's timer (paused in tests), not a wall clock.
        let mut deadline = Box::pin(tokio::time::sleep(settings.flush_every));
        loop {
            tick.tick().await;
            let mut closed = false;
            loop {
                match rx.try_recv() {
                    Ok(Item::Event(event)) => {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        event.into_rows(&mut batch);
                    }
                    Ok(Item::Anomaly(row)) => self.keep_anomaly(*row),
                    Ok(Item::Flush(done)) => flushes.push(done),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
                if batch.len() >= settings.batch_rows {
                    self.deliver(&mut batch, false).await;
                }
            }
            let due = deadline.as_mut().now_or_never().is_some();
            if !(due || closed || !flushes.is_empty()) {
                continue;
            }
            if !flushes.is_empty() {
                self.retry_at = None;
            }
            if !closed {
                self.drain_spool().await;
            }
            if !batch.is_empty() {
                self.deliver(&mut batch, closed).await;
            }
            self.insert_anomalies().await;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            if closed {
                return;
            }
            deadline = Box::pin(tokio::time::sleep(settings.flush_every));
        }
    }

    /// Whether a warning may be logged now (`Some`: how many were held back).
    fn burst(&self) -> Option<u64> {
        use crate::clock::Clock as _;
        self.warnings.admit(crate::clock::SystemClock.now())
    }

    fn keep_anomaly(&mut self, row: AnomalyRow) {
        if self.anomalies.len() >= ANOMALIES_KEPT {
            self.anomalies.remove(0);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.anomalies.push(row);
    }

    /// Inserts the anomaly rows waiting; kept for the next round when ClickHouse fails.
    async fn insert_anomalies(&mut self) {
        if self.anomalies.is_empty() {
            return;
        }
        let result = async {
            let mut insert = self.client.insert::<AnomalyRow>(ANOMALIES).await?;
            for row in &self.anomalies {
                insert.write(row).await?;
            }
            insert.end().await
        }
        .await;
        match result {
            Ok(()) => {
                let n = self.anomalies.len() as u64;
                self.stats.sent.fetch_add(n, Ordering::Relaxed);
                self.anomalies.clear();
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.burst() {
                    tracing::warn!(error = %e, rows = self.anomalies.len(), suppressed, "exporting anomalies to ClickHouse failed; kept for the next round");
                }
            }
        }
    }

    /// Inserts `batch` under a fresh batch id. With a spool, a failed insert (or a spool
    /// still holding older batches, which go first) spools it; without one, it is retried
    /// with back-off until it is in (`last`: the process is stopping, so it is given up
    /// after the back-off runs out once).
    async fn deliver(&mut self, batch: &mut Vec<DecisionRow>, last: bool) {
        let id: Arc<str> = Arc::from(format!("{:032x}", rand::random::<u128>()));
        for row in batch.iter_mut() {
            row.batch_id = Arc::clone(&id);
        }
        let rows = batch.len() as u64;
        if let Some(spool) = &mut self.spool {
            let inserted = spool.is_empty() && self.insert(batch, false).await;
            if !inserted {
                let spool = self.spool.as_mut().expect("checked above");
                match spool.push(batch).await {
                    Ok(true) => {
                        self.stats.spooled.fetch_add(rows, Ordering::Relaxed);
                        self.stats.spool_rows.store(spool.rows(), Ordering::Relaxed);
                    }
                    Ok(false) => {
                        self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                        if let Some(suppressed) = self.burst() {
                            tracing::warn!(
                                rows,
                                suppressed,
                                "the export spool is full: decisions dropped"
                            );
                        }
                    }
                    Err(e) => {
                        self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                        if let Some(suppressed) = self.burst() {
                            tracing::warn!(error = %e, rows, suppressed, "cannot write to the export spool: decisions dropped");
                        }
                    }
                }
            }
        } else {
            let mut backoff = MIN_BACKOFF;
            let mut retry = false;
            while !self.insert(batch, retry).await {
                if last && backoff >= MAX_BACKOFF {
                    self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                retry = true;
            }
        }
        batch.clear();
    }

    /// Delivers spooled batches, oldest first, until one fails (then waits a back-off
    /// before trying again).
    async fn drain_spool(&mut self) {
        use futures_util::FutureExt as _;
        if let Some(wait) = &mut self.retry_at
            && wait.as_mut().now_or_never().is_none()
        {
            return;
        }
        loop {
            let Some(spool) = &mut self.spool else { return };
            let Some(front) = spool.front().await else {
                break;
            };
            match front {
                Ok(batch) => {
                    // A spooled batch may have gone in just before a crash: the id says.
                    if !self.insert(&batch, true).await {
                        self.retry_at = Some(Box::pin(tokio::time::sleep(self.backoff)));
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        return;
                    }
                    let spool = self.spool.as_mut().expect("checked above");
                    if let Err(e) = spool.pop_front().await {
                        tracing::warn!(error = %e, "cannot remove a delivered batch from the export spool");
                        return;
                    }
                }
                Err(corrupt) => {
                    self.stats
                        .dropped
                        .fetch_add(corrupt.rows, Ordering::Relaxed);
                    tracing::warn!(
                        path = %corrupt.path.display(),
                        rows = corrupt.rows,
                        error = %corrupt.error,
                        "a spooled batch cannot be read: set aside"
                    );
                }
            }
            let spool = self.spool.as_ref().expect("checked above");
            self.stats.spool_rows.store(spool.rows(), Ordering::Relaxed);
        }
        self.backoff = MIN_BACKOFF;
        self.retry_at = None;
    }

    /// One insert of `batch` (whose rows carry their batch id); `retry`: look the id up
    /// first, so that a batch that went in without its answer arriving is not repeated.
    async fn insert(&self, batch: &[DecisionRow], retry: bool) -> bool {
        let id = batch.first().map_or("", |r| &*r.batch_id);
        if retry && already_in(&self.client, id).await == Some(true) {
            self.stats
                .sent
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            return true;
        }
        match try_insert(&self.client, batch).await {
            Ok(()) => {
                self.stats
                    .sent
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.burst() {
                    tracing::warn!(error = %e, rows = batch.len(), suppressed, "exporting decisions to ClickHouse failed (`suppressed`: failures not logged since the last line)");
                }
                false
            }
        }
    }
}

async fn try_insert(
    client: &Client,
    batch: &[DecisionRow],
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<DecisionRow>(TABLE).await?;
    for row in batch {
        insert.write(row).await?;
    }
    insert.end().await
}

/// The table decisions go to, in the client's database.
const TABLE: &str = "decisions";
/// The table anomalies go to.
const ANOMALIES: &str = "anomalies";

/// The row of an anomaly detected on `node`.
pub fn anomaly_row(
    d: &crate::anomaly::Detection,
    node: &str,
    key_hash: &str,
    now: crate::Timestamp,
) -> AnomalyRow {
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let client = crate::plan::key::CounterKey::parse(&d.key).map_or("", |p| p.client);
    AnomalyRow {
        ts: u32::try_from(now.as_micros() / 1_000_000).unwrap_or(u32::MAX),
        node: node.to_owned(),
        plan_version: d.plan_version.to_string(),
        namespace: d.namespace.to_string(),
        anomaly: d.anomaly.to_string(),
        key_kind: key_kind(client),
        key_hash: key_hash.to_owned(),
        client_ip: d.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        observed: d.observed,
        threshold: d.threshold,
        window_s: secs(d.window),
        ban_s: d.actions.ban.map_or(0, secs),
        flag_s: d.actions.flag.map_or(0, secs),
        tarpit_ms: d
            .actions
            .tarpit
            .map_or(0, |(h, _)| u32::try_from(h.as_millis()).unwrap_or(u32::MAX)),
        alerts: d.actions.alerts.iter().map(|a| a.to_string()).collect(),
    }
}

/// What a key's client part counts by: its parts' labels (`ip`, `user+h.x-tenant`).
fn key_kind(client: &str) -> String {
    client
        .split('+')
        .map(|part| part.split(':').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("+")
}

/// How a retry finds out whether a batch went in (in the client's database).
pub const BATCH_LOOKUP: &str = "SELECT count() FROM decisions WHERE batch_id = ?";

/// Whether rows of batch `id` are in the table (`None`: ClickHouse did not say).
async fn already_in(client: &Client, id: &str) -> Option<bool> {
    let n: u64 = client.query(BATCH_LOOKUP).bind(id).fetch_one().await.ok()?;
    Some(n > 0)
}

/// A request's decision, waiting for the response's status before it is queued.
#[derive(Debug)]
#[must_use = "the decision is exported by `send` or `send_with_status`"]
pub struct PendingExport {
    exporter: Exporter,
    event: Box<DecisionEvent>,
}

impl PendingExport {
    /// Queues it with the status Tollgate answered.
    pub fn send(self) {
        self.exporter.send_event(self.event);
    }

    /// Queues it with `status`: what the application or upstream answered.
    pub fn send_with_status(mut self, status: u16) {
        self.event.status = status;
        self.send();
    }
}

/// What a decision's rows need, gathered on the request path without formatting or hashing
/// (shared names, the counter keys): the rows are made by the exporter's task.
#[derive(Debug)]
pub struct DecisionEvent {
    ts: u32,
    node: Arc<str>,
    plan_version: Arc<str>,
    tenant: String,
    client_ip: Option<std::net::IpAddr>,
    truncate_ip: bool,
    method: http::Method,
    route: String,
    status: u16,
    delay_ms: u32,
    latency_us: u32,
    sample_rate: f32,
    request_id: String,
    flags: Vec<Arc<str>>,
    hasher: crate::plan::KeyHasher,
    outcome: Outcome,
}

/// What decided a request.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "the event is boxed whole; the limits stay inline, saving an allocation a request"
)]
enum Outcome {
    /// A list or Cedar, without counting: one row.
    DecidedBy {
        decision: Decision,
        name: Arc<str>,
        policies: Vec<Arc<str>>,
    },
    /// Limits: a row each.
    Limits(smallvec::SmallVec<[LimitEvent; 3]>),
}

/// One limit's part of a decision.
#[derive(Debug)]
struct LimitEvent {
    key: String,
    limit: Arc<str>,
    algorithm: &'static str,
    decision: Decision,
    tier: Option<Arc<str>>,
    cost: u64,
    quota: u64,
    remaining: u64,
    shadow: bool,
}

impl DecisionEvent {
    fn rows_len(&self) -> u64 {
        match &self.outcome {
            Outcome::DecidedBy { .. } => 1,
            Outcome::Limits(limits) => limits.len() as u64,
        }
    }

    /// Its rows, added to `batch`.
    pub fn into_rows(self, batch: &mut Vec<DecisionRow>) {
        let base = DecisionRow {
            ts: self.ts,
            node: self.node,
            plan_version: self.plan_version,
            tenant: Arc::from(self.tenant),
            client_ip: self.client_ip.map_or_else(Arc::default, |ip| {
                Arc::from(client_ip(ip, self.truncate_ip))
            }),
            method: Arc::from(self.method.as_str()),
            route: Arc::from(self.route),
            status: self.status,
            delay_ms: self.delay_ms,
            latency_us: self.latency_us,
            sample_rate: self.sample_rate,
            request_id: Arc::from(self.request_id),
            flags: self.flags,
            ..DecisionRow::default()
        };
        match self.outcome {
            Outcome::DecidedBy {
                decision,
                name,
                policies,
            } => batch.push(DecisionRow {
                decision: decision as i8,
                limit_name: name,
                policies,
                ..base
            }),
            Outcome::Limits(limits) => {
                for l in limits {
                    let parts = crate::plan::key::CounterKey::parse(&l.key);
                    batch.push(DecisionRow {
                        namespace: parts.map(|p| p.namespace.to_owned()).unwrap_or_default(),
                        limit_name: l.limit,
                        algorithm: std::borrow::Cow::Borrowed(l.algorithm),
                        decision: l.decision as i8,
                        tier: l.tier.unwrap_or_default(),
                        key_kind: key_kind(parts.map_or("", |p| p.client)),
                        key_hash: self.hasher.hash(&l.key),
                        cost: l.cost,
                        used: l.quota.saturating_sub(l.remaining),
                        quota: l.quota,
                        remaining: l.remaining,
                        shadow: u8::from(l.shadow),
                        ..base.clone()
                    });
                }
            }
        }
    }
}

impl Exporter {
    /// `event`, to send once the status is known.
    pub fn pending(&self, event: DecisionEvent) -> PendingExport {
        PendingExport {
            exporter: self.clone(),
            event: Box::new(event),
        }
    }
}

/// What a decision's event says besides the decision.
#[derive(Debug)]
pub struct EventContext<'a> {
    /// The request's id.
    pub request_id: &'a str,
    /// This Tollgate's name.
    pub node: &'a Arc<str>,
    /// Hashes counter keys (in the exporter's task).
    pub hasher: &'a crate::plan::KeyHasher,
    /// The decision's time.
    pub now: crate::Timestamp,
    /// Sampling, tenant, address truncation.
    pub shape: &'a RowShape,
}

/// Whether every row of `verdict` is exported whatever the sampling: anything but a plain
/// admission (refusals, warnings, delays, shadow rejections, store errors).
fn always_exported(verdict: &crate::Verdict) -> bool {
    use crate::engine::{Action, Counted};
    !matches!(verdict.action, Action::Allow | Action::Bypass { .. })
        || verdict
            .reports
            .iter()
            .any(|r| !r.decision.allowed || matches!(r.counted, Counted::Skipped | Counted::Local))
}

/// A decision's event: one row per limit that applied (its outcome, counter and tier), or
/// one for the list or Cedar answer that decided without counting; `None` when the request
/// is sampled out. Its status is what Tollgate answered.
pub fn event(
    verdict: &crate::Verdict,
    request: &crate::RequestCtx,
    cx: &EventContext<'_>,
) -> Option<DecisionEvent> {
    use crate::engine::{Action, Counted};
    let sample_rate = if always_exported(verdict) {
        1.0
    } else {
        cx.shape.sample_allows
    };
    if sample_rate < 1.0 && rand::random::<f64>() >= sample_rate {
        return None;
    }
    let outcome = match &verdict.action {
        Action::Bypass { list } => Outcome::DecidedBy {
            decision: Decision::Bypass,
            name: Arc::clone(list),
            policies: Vec::new(),
        },
        Action::Forbid { list, .. } => Outcome::DecidedBy {
            decision: Decision::Forbid,
            name: Arc::clone(list),
            policies: Vec::new(),
        },
        Action::Unauthorized {
            limit, policies, ..
        } => Outcome::DecidedBy {
            decision: Decision::Unauthorized,
            name: Arc::clone(limit),
            policies: policies.clone(),
        },
        _ => {
            let headline = verdict.headline().map(|r| &*r.limit);
            Outcome::Limits(
                verdict
                    .reports
                    .iter()
                    .map(|r| {
                        let shadow = r.mode == crate::plan::Mode::Shadow;
                        let decision = if matches!(r.counted, Counted::Skipped | Counted::Local) {
                            Decision::StoreError
                        } else if !r.decision.allowed {
                            if shadow {
                                Decision::ShadowReject
                            } else {
                                Decision::Reject
                            }
                        } else if headline == Some(&*r.limit)
                            && matches!(verdict.action, Action::Warn)
                        {
                            Decision::Warn
                        } else if headline == Some(&*r.limit)
                            && matches!(verdict.action, Action::Delay(_))
                        {
                            Decision::Delay
                        } else if r.decision.used_percent() >= crate::metrics::NEAR_LIMIT_PERCENT {
                            Decision::NearLimit
                        } else {
                            Decision::Allow
                        };
                        LimitEvent {
                            key: r.key.clone(),
                            limit: Arc::clone(&r.limit),
                            algorithm: r.algorithm,
                            decision,
                            tier: r.tier.clone(),
                            cost: r.cost,
                            quota: r.decision.limit,
                            remaining: r.decision.remaining,
                            shadow,
                        }
                    })
                    .collect(),
            )
        }
    };
    Some(DecisionEvent {
        ts: u32::try_from(cx.now.as_micros() / 1_000_000).unwrap_or(u32::MAX),
        node: Arc::clone(cx.node),
        plan_version: Arc::clone(&verdict.plan_version),
        tenant: cx
            .shape
            .tenant_header
            .as_ref()
            .and_then(|h| request.headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(64).collect())
            .unwrap_or_default(),
        client_ip: request.client_ip,
        truncate_ip: cx.shape.truncate_ip,
        method: request.method.clone(),
        route: request
            .route_template
            .clone()
            .unwrap_or_else(|| request.path.clone()),
        status: crate::response::problem(verdict, None).map_or(200, |p| p.status),
        delay_ms: match verdict.action {
            Action::Delay(d) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
            _ => 0,
        },
        latency_us: u32::try_from(verdict.elapsed.as_micros()).unwrap_or(u32::MAX),
        sample_rate: sample_rate as f32,
        request_id: cx.request_id.to_owned(),
        flags: verdict.flags.clone(),
        hasher: cx.hasher.clone(),
        outcome,
    })
}

/// `ip` as a row shows it: whole, or cut to its /24 or /48 network.
fn client_ip(ip: std::net::IpAddr, truncate: bool) -> String {
    use std::net::IpAddr;
    if !truncate {
        return ip.to_string();
    }
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            std::net::Ipv4Addr::new(a, b, c, 0).to_string()
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncated_addresses_keep_their_network_only() {
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(super::client_ip(ip("203.0.113.77"), true), "203.0.113.0");
        assert_eq!(super::client_ip(ip("203.0.113.77"), false), "203.0.113.77");
        assert_eq!(
            super::client_ip(ip("2001:db8:1:2:3:4:5:6"), true),
            "2001:db8:1::"
        );
    }
}
