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
    pub node: String,
    /// The plan's version.
    pub plan_version: String,
    /// The policy file's namespace.
    pub namespace: String,
    /// The limit (or list) that decided.
    pub limit_name: String,
    /// The limit's algorithm.
    pub algorithm: String,
    /// The `decision` enum's value (see [`Decision`]).
    pub decision: i8,
    /// The tier, for tiered limits.
    pub tier: String,
    /// The tenant, when known.
    pub tenant: String,
    /// What the key counts by (`ip`, `user`, `token`, …).
    pub key_kind: String,
    /// The counter key's keyed hash.
    pub key_hash: String,
    /// The client's address.
    pub client_ip: String,
    /// The request's method.
    pub method: String,
    /// The route template (else the path).
    pub route: String,
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
    pub policies: Vec<String>,
    /// 1 in shadow mode.
    pub shadow: u8,
    /// The share of such decisions exported (allows may be sampled).
    pub sample_rate: f32,
    /// The request's id.
    pub request_id: String,
    /// The batch it was inserted in (set by the exporter).
    pub batch_id: String,
    /// The flags (anomalies' `flag`) the client carried.
    #[serde(default)]
    pub flags: Vec<String>,
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
    /// Rows waiting in the queue.
    pub queued: AtomicU64,
    /// Rows written to the spool, in all.
    pub spooled: AtomicU64,
    /// Rows waiting in the spool now.
    pub spool_rows: AtomicU64,
    /// Admitted requests not exported (sampling).
    pub sampled_out: AtomicU64,
}

enum Item {
    Row(Box<DecisionRow>),
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
#[error("cannot open the export spool at `{dir}`: {source}")]
pub struct SpoolError {
    dir: std::path::PathBuf,
    source: std::io::Error,
}

impl Exporter {
    /// Starts the batching task on the current runtime; what a spool left by an earlier
    /// process holds is delivered first.
    pub fn start(client: Client, settings: ExportSettings) -> Result<Exporter, SpoolError> {
        let spool = match &settings.spool {
            Some(s) => Some(Spool::open(s.clone()).map_err(|source| SpoolError {
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
        };
        tokio::spawn(batcher.run(settings, rx));
        Ok(Exporter { tx, stats, shape })
    }

    /// Queues `row` without waiting; a full queue drops it (counted in `dropped`).
    pub fn send(&self, row: DecisionRow) {
        match self.tx.try_send(Item::Row(Box::new(row))) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
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
}

impl Batcher {
    async fn run(mut self, settings: ExportSettings, mut rx: mpsc::Receiver<Item>) {
        let mut batch: Vec<DecisionRow> = Vec::with_capacity(settings.batch_rows.min(10_000));
        let mut flushes = Vec::new();
        loop {
            // Tokio's timer (paused in tests), not a wall clock.
            let deadline = tokio::time::sleep(settings.flush_every);
            tokio::pin!(deadline);
            // Fill the batch until it is full, the time is up, or someone asks for a flush.
            while batch.len() < settings.batch_rows && flushes.is_empty() {
                tokio::select! {
                    item = rx.recv() => match item {
                        Some(Item::Row(row)) => {
                            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                            batch.push(*row);
                        }
                        Some(Item::Anomaly(row)) => self.keep_anomaly(*row),
                        Some(Item::Flush(done)) => flushes.push(done),
                        None => {
                            if !batch.is_empty() {
                                self.deliver(&mut batch, true).await;
                            }
                            self.insert_anomalies().await;
                            return;
                        }
                    },
                    () = &mut deadline => break,
                }
            }
            if !flushes.is_empty() {
                self.retry_at = None;
            }
            self.drain_spool().await;
            if !batch.is_empty() {
                self.deliver(&mut batch, false).await;
            }
            self.insert_anomalies().await;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
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
                tracing::warn!(error = %e, rows = self.anomalies.len(), "exporting anomalies to ClickHouse failed; kept for the next round");
            }
        }
    }

    /// Inserts `batch` under a fresh batch id. With a spool, a failed insert (or a spool
    /// still holding older batches, which go first) spools it; without one, it is retried
    /// with back-off until it is in (`last`: the process is stopping, so it is given up
    /// after the back-off runs out once).
    async fn deliver(&mut self, batch: &mut Vec<DecisionRow>, last: bool) {
        let id = format!("{:032x}", rand::random::<u128>());
        for row in batch.iter_mut() {
            row.batch_id.clone_from(&id);
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
                        tracing::warn!(rows, "the export spool is full: decisions dropped");
                    }
                    Err(e) => {
                        self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                        tracing::warn!(error = %e, rows, "cannot write to the export spool: decisions dropped");
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
        let id = batch.first().map_or("", |r| r.batch_id.as_str());
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
                tracing::warn!(error = %e, rows = batch.len(), "exporting decisions to ClickHouse failed");
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

/// Rows made for one request, sent once the response's status is known.
#[derive(Debug)]
#[must_use = "the rows are exported by `send` or `send_with_status`"]
pub struct PendingRows {
    exporter: Exporter,
    rows: Vec<DecisionRow>,
}

impl PendingRows {
    /// Queues the rows with the status Tollgate answered.
    pub fn send(self) {
        for row in self.rows {
            self.exporter.send(row);
        }
    }

    /// Queues the rows with `status`: what the application or upstream answered.
    pub fn send_with_status(mut self, status: u16) {
        for row in &mut self.rows {
            row.status = status;
        }
        self.send();
    }
}

impl Exporter {
    /// `rows`, to send once the status is known.
    pub fn pending(&self, rows: Vec<DecisionRow>) -> PendingRows {
        PendingRows {
            exporter: self.clone(),
            rows,
        }
    }
}

/// What a row says besides the decision.
#[derive(Debug)]
pub struct RowContext<'a> {
    /// The request's id.
    pub request_id: &'a str,
    /// This Tollgate's name.
    pub node: &'a str,
    /// Hashes counter keys.
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

/// The rows a decision becomes: one per limit that applied (its outcome, counter and tier),
/// or one for the list or Cedar answer that decided without counting; `None` when the
/// request is sampled out. Their status is what Tollgate answered.
pub fn rows(
    verdict: &crate::Verdict,
    request: &crate::RequestCtx,
    cx: &RowContext<'_>,
) -> Option<Vec<DecisionRow>> {
    use crate::engine::{Action, Counted};
    let sample_rate = if always_exported(verdict) {
        1.0
    } else {
        cx.shape.sample_allows
    };
    if sample_rate < 1.0 && rand::random::<f64>() >= sample_rate {
        return None;
    }
    let status = crate::response::problem(verdict, None).map_or(200, |p| p.status);
    let tenant = cx
        .shape
        .tenant_header
        .as_ref()
        .and_then(|h| request.headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect())
        .unwrap_or_default();
    let base = DecisionRow {
        ts: u32::try_from(cx.now.as_micros() / 1_000_000).unwrap_or(u32::MAX),
        node: cx.node.to_owned(),
        plan_version: verdict.plan_version.to_string(),
        tenant,
        client_ip: request
            .client_ip
            .map(|ip| client_ip(ip, cx.shape.truncate_ip))
            .unwrap_or_default(),
        method: request.method.as_str().to_owned(),
        route: request
            .route_template
            .clone()
            .unwrap_or_else(|| request.path.clone()),
        status,
        delay_ms: match verdict.action {
            Action::Delay(d) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
            _ => 0,
        },
        latency_us: u32::try_from(verdict.elapsed.as_micros()).unwrap_or(u32::MAX),
        sample_rate: sample_rate as f32,
        request_id: cx.request_id.to_owned(),
        flags: verdict.flags.iter().map(|f| f.to_string()).collect(),
        ..DecisionRow::default()
    };
    let decided_by = |decision: Decision, name: &str, policies: &[Arc<str>]| DecisionRow {
        decision: decision as i8,
        limit_name: name.to_owned(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        ..base.clone()
    };
    match &verdict.action {
        Action::Bypass { list } => return Some(vec![decided_by(Decision::Bypass, list, &[])]),
        Action::Forbid { list, .. } => {
            return Some(vec![decided_by(Decision::Forbid, list, &[])]);
        }
        Action::Unauthorized {
            limit, policies, ..
        } => return Some(vec![decided_by(Decision::Unauthorized, limit, policies)]),
        _ => {}
    }
    let headline = verdict.headline().map(|r| &*r.limit);
    let rows = verdict
        .reports
        .iter()
        .map(|r| {
            let parts = crate::plan::key::CounterKey::parse(&r.key);
            let decision = if matches!(r.counted, Counted::Skipped | Counted::Local) {
                Decision::StoreError
            } else if !r.decision.allowed {
                if r.mode == crate::plan::Mode::Shadow {
                    Decision::ShadowReject
                } else {
                    Decision::Reject
                }
            } else if headline == Some(&*r.limit) && matches!(verdict.action, Action::Warn) {
                Decision::Warn
            } else if headline == Some(&*r.limit) && matches!(verdict.action, Action::Delay(_)) {
                Decision::Delay
            } else if r.decision.used_percent() >= crate::metrics::NEAR_LIMIT_PERCENT {
                Decision::NearLimit
            } else {
                Decision::Allow
            };
            let client = parts.map(|p| p.client).unwrap_or_default();
            DecisionRow {
                namespace: parts.map(|p| p.namespace.to_owned()).unwrap_or_default(),
                limit_name: r.limit.to_string(),
                algorithm: r.algorithm.to_owned(),
                decision: decision as i8,
                tier: r.tier.as_deref().unwrap_or_default().to_owned(),
                key_kind: key_kind(client),
                key_hash: cx.hasher.hash(&r.key),
                cost: r.cost,
                used: r.decision.limit.saturating_sub(r.decision.remaining),
                quota: r.decision.limit,
                remaining: r.decision.remaining,
                shadow: u8::from(r.mode == crate::plan::Mode::Shadow),
                ..base.clone()
            }
        })
        .collect();
    Some(rows)
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
