//! Decisions to ClickHouse without holding up a request: [`Exporting`], an observer of the
//! request pipeline, makes each decision an event at admission and queues it on a bounded
//! queue when the request ends (never waiting; a full queue drops its rows and counts them),
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

use super::rows::{AnomalyRow, DecisionEvent, DecisionRow, EventContext, RowShape, anomaly_row};
use super::spool::{Spool, SpoolSettings};
use crate::pipeline::{Admitted, Completion, DetectionSink, Done, Observer};
use crate::request::KeyHasher;
use crate::verdict::Detection;

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

/// How a retry finds out whether a batch went in (in the client's database).
pub const BATCH_LOOKUP: &str = "SELECT count() FROM decisions WHERE batch_id = ?";

/// Whether rows of batch `id` are in the table (`None`: ClickHouse did not say).
async fn already_in(client: &Client, id: &str) -> Option<bool> {
    let n: u64 = client.query(BATCH_LOOKUP).bind(id).fetch_one().await.ok()?;
    Some(n > 0)
}

/// The pipeline's observer that exports every decision (and every anomaly detected) through
/// an [`Exporter`], as node `node`.
#[derive(Debug, Clone)]
pub struct Exporting {
    exporter: Exporter,
    node: Arc<str>,
    hasher: KeyHasher,
}

impl Exporting {
    /// Exports through `exporter` as node `node`, hashing keys with `hasher` (the engine's).
    pub fn new(exporter: Exporter, node: impl Into<Arc<str>>, hasher: KeyHasher) -> Self {
        Exporting {
            exporter,
            node: node.into(),
            hasher,
        }
    }

    /// The exporter.
    pub fn exporter(&self) -> &Exporter {
        &self.exporter
    }
}

/// At admission, the decision's event (nothing formatted or hashed: the exporter's task
/// makes the rows); queued with the status the client got when the request ends.
impl Observer for Exporting {
    fn admitted(&self, admitted: &Admitted<'_>) -> Option<Box<dyn Completion>> {
        let cx = EventContext {
            request_id: admitted.request_id,
            node: &self.node,
            hasher: &self.hasher,
            now: admitted.now,
            shape: &self.exporter.shape,
            status: admitted.status,
        };
        match super::rows::event(admitted.verdict, admitted.request, &cx) {
            Some(event) => Some(Box::new(PendingExport {
                exporter: self.exporter.clone(),
                event: Box::new(event),
            })),
            None => {
                self.exporter
                    .stats
                    .sampled_out
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Each anomaly detected becomes a row of `anomalies`.
impl DetectionSink for Exporting {
    fn detected(&self, detection: &Detection, key_hash: &str) {
        self.exporter
            .send_anomaly(anomaly_row(detection, &self.node, key_hash));
    }
}

/// A request's decision, waiting for the status the client got before it is queued.
#[derive(Debug)]
struct PendingExport {
    exporter: Exporter,
    event: Box<DecisionEvent>,
}

impl Completion for PendingExport {
    fn completed(mut self: Box<Self>, done: &Done) {
        self.event.set_status(done.status);
        self.event.set_usage(&done.usage);
        self.exporter.send_event(self.event);
    }
}
