//! Decisions to ClickHouse without holding up a request: each decision becomes a row on a
//! bounded queue ([`Exporter::send`] never waits; a full queue drops the row and counts it),
//! and one task inserts them in batches, by size or by time, retrying a failed batch without
//! ever inserting it twice (each batch carries an id, looked up before a retry).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clickhouse::Client;
use tokio::sync::{mpsc, oneshot};

/// One row of `decisions` (see the migrations in [`super::MIGRATIONS`]); field names are the
/// columns.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize)]
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
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            batch_rows: 10_000,
            flush_every: Duration::from_secs(1),
            queue_rows: 100_000,
            database: "tollgate".to_owned(),
        }
    }
}

/// What the exporter did so far (for metrics and tests).
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Rows inserted.
    pub sent: AtomicU64,
    /// Rows dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Inserts that failed (each retried).
    pub failures: AtomicU64,
    /// Rows waiting in the queue.
    pub queued: AtomicU64,
}

enum Item {
    Row(Box<DecisionRow>),
    Flush(oneshot::Sender<()>),
}

/// The handle decisions are sent through (cheap to clone).
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Item>,
    stats: Arc<ExportStats>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("stats", &self.stats)
            .finish()
    }
}

impl Exporter {
    /// Starts the batching task on the current runtime.
    pub fn start(client: Client, settings: ExportSettings) -> Exporter {
        let (tx, rx) = mpsc::channel(settings.queue_rows.max(1));
        let stats = Arc::new(ExportStats::default());
        let client = client.with_database(&settings.database);
        tokio::spawn(run(client, settings, rx, Arc::clone(&stats)));
        Exporter { tx, stats }
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

    /// Waits until every row queued before the call is inserted.
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
}

async fn run(
    client: Client,
    settings: ExportSettings,
    mut rx: mpsc::Receiver<Item>,
    stats: Arc<ExportStats>,
) {
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
                        stats.queued.fetch_sub(1, Ordering::Relaxed);
                        batch.push(*row);
                    }
                    Some(Item::Flush(done)) => flushes.push(done),
                    None => {
                        insert_batch(&client, &mut batch, &stats).await;
                        return;
                    }
                },
                () = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            insert_batch(&client, &mut batch, &stats).await;
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Inserts `batch` under a fresh batch id, retrying with back-off until it is in; a retry
/// first looks the id up, so that an insert that succeeded without its answer arriving is
/// not repeated.
async fn insert_batch(client: &Client, batch: &mut Vec<DecisionRow>, stats: &ExportStats) {
    let id = format!("{:032x}", rand::random::<u128>());
    for row in batch.iter_mut() {
        row.batch_id.clone_from(&id);
    }
    let mut backoff = Duration::from_millis(100);
    let mut retry = false;
    loop {
        if retry && already_in(client, &id).await == Some(true) {
            break;
        }
        match try_insert(client, batch).await {
            Ok(()) => break,
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, rows = batch.len(), "exporting decisions to ClickHouse failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                retry = true;
            }
        }
    }
    stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
    batch.clear();
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

/// Whether rows of batch `id` are in the table (`None`: ClickHouse did not say).
async fn already_in(client: &Client, id: &str) -> Option<bool> {
    let n: u64 = client
        .query("SELECT count() FROM decisions WHERE batch_id = ?")
        .bind(id)
        .fetch_one()
        .await
        .ok()?;
    Some(n > 0)
}

/// The rows a decision becomes: one per limit that applied (its outcome, counter and tier),
/// or one for the list or Cedar answer that decided without counting. `node` names this
/// Tollgate; `status` is what it answered.
pub fn rows(
    verdict: &crate::Verdict,
    request: &crate::RequestCtx,
    request_id: &str,
    node: &str,
    hasher: &crate::plan::KeyHasher,
    now: crate::Timestamp,
) -> Vec<DecisionRow> {
    use crate::engine::{Action, Counted};
    let status = crate::response::problem(verdict, None).map_or(200, |p| p.status);
    let base = DecisionRow {
        ts: u32::try_from(now.as_micros() / 1_000_000).unwrap_or(u32::MAX),
        node: node.to_owned(),
        plan_version: verdict.plan_version.to_string(),
        namespace: String::new(),
        limit_name: String::new(),
        algorithm: String::new(),
        decision: Decision::Allow as i8,
        tier: String::new(),
        tenant: String::new(),
        key_kind: String::new(),
        key_hash: String::new(),
        client_ip: request
            .client_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        method: request.method.as_str().to_owned(),
        route: request
            .route_template
            .clone()
            .unwrap_or_else(|| request.path.clone()),
        status,
        cost: 0,
        used: 0,
        quota: 0,
        remaining: 0,
        delay_ms: match verdict.action {
            Action::Delay(d) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
            _ => 0,
        },
        latency_us: 0,
        policies: Vec::new(),
        shadow: 0,
        sample_rate: 1.0,
        request_id: request_id.to_owned(),
        batch_id: String::new(),
    };
    let decided_by = |decision: Decision, name: &str, policies: &[Arc<str>]| DecisionRow {
        decision: decision as i8,
        limit_name: name.to_owned(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        ..base.clone()
    };
    match &verdict.action {
        Action::Bypass { list } => return vec![decided_by(Decision::Bypass, list, &[])],
        Action::Forbid { list, .. } => return vec![decided_by(Decision::Forbid, list, &[])],
        Action::Unauthorized {
            limit, policies, ..
        } => return vec![decided_by(Decision::Unauthorized, limit, policies)],
        _ => {}
    }
    let headline = verdict.headline().map(|r| &*r.limit);
    verdict
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
                key_kind: client
                    .split('+')
                    .map(|part| part.split(':').next().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("+"),
                key_hash: hasher.hash(&r.key),
                used: r.decision.limit.saturating_sub(r.decision.remaining),
                quota: r.decision.limit,
                remaining: r.decision.remaining,
                shadow: u8::from(r.mode == crate::plan::Mode::Shadow),
                ..base.clone()
            }
        })
        .collect()
}
