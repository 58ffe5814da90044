//! Deciding a request in Redis: local-first operations here, the others in one batch call
//! per server (Cluster: slot), rejections remembered in the deny cache, and the script's
//! answer read back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{Cmd, Script};
use smallvec::SmallVec;

use super::batcher::{Batcher, Encoded};
use super::breaker::Permit;
use super::cluster::slot;
use super::local::LocalOp;
use super::{Batchers, Connection, RedisStore};
use crate::clock::Timestamp;
use crate::limiter::{Decision, Quota, us};
use crate::store::deny::Denied;
use crate::store::{BatchResult, KeySelector, Op, OpResult, Settlement, StoreError};

impl RedisStore {
    /// Appends the undo script's first two arguments: `now` (or `T`, for Redis's own clock) and
    /// the number of operations.
    pub(super) fn push_clock(&self, cmd: &mut Cmd, now: Timestamp, n: usize) {
        if self.options.server_time {
            cmd.arg("T");
        } else {
            cmd.arg(now.as_micros());
        }
        cmd.arg(n);
    }

    /// One batch call for the operations `group` of `ops`, through the breaker of `slot`.
    pub(super) async fn run_group(
        &self,
        ops: &[Op<'_>],
        group: &[usize],
        slot: u16,
        now: Timestamp,
    ) -> Result<BatchResult, StoreError> {
        // After a connection loss the failed call left a fresh connection attempt, which the
        // next call (the probe, once the breaker is open) makes.
        self.guarded(slot, now, async {
            let global = |op: &Op<'_>| self.regions.as_ref().and_then(|r| r.extra(op, now));
            let reply = self
                .send(Encoded::new(ops, group, now, global), slot)
                .await?;
            parse(&reply, ops, group, now)
        })
        .await
    }

    /// Runs `call` through the breaker of `slot`: refused at once while it is open, its
    /// outcome recorded — but not the failure of a connection swapped out meanwhile (a
    /// master Sentinel replaced): the breaker is about the one in use.
    pub(super) async fn guarded<T>(
        &self,
        slot: u16,
        now: Timestamp,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let breaker = self.breaker(slot);
        let probe = match breaker.permit(now) {
            Permit::Refuse => {
                self.link.failing();
                return Err(StoreError::CircuitOpen);
            }
            Permit::Probe => true,
            Permit::Call => false,
        };
        let connection = self.link.generation();
        let result = call.await;
        match &result {
            Ok(_) => breaker.success(probe),
            Err(_) if self.link.generation() == connection => breaker.failure(now, probe),
            Err(_) => {}
        }
        result
    }

    /// One request of the batch script, through the batcher of `slot` when batching is on.
    async fn send(&self, request: Encoded, slot: u16) -> Result<Vec<i64>, StoreError> {
        match &self.batchers {
            Batchers::Off => self.link.run(&[&request]).await.map(|mut a| a.remove(0)),
            Batchers::Single(batcher) => self.queued(batcher.submit(request)).await,
            Batchers::Cluster(slots) => {
                let batcher = slots[usize::from(slot)]
                    .get_or_init(|| Batcher::start(Arc::clone(&self.link), self.options.batch_max));
                self.queued(batcher.submit(request)).await
            }
        }
    }

    /// Settles reservations: one request of the batch script per server (Cluster: slot),
    /// queued with the admissions. A refund also forgets the key's cached rejection here.
    pub(super) async fn settle_all(
        &self,
        settlements: &[Settlement<'_>],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if let Some(deny) = &self.deny {
            for s in settlements.iter().filter(|s| s.delta < 0) {
                deny.forget(s.key);
            }
        }
        let mut groups: SmallVec<[(u16, SmallVec<[usize; 8]>); 2]> = SmallVec::new();
        for (i, s) in settlements.iter().enumerate() {
            if self.local.settle(s, now) {
                continue;
            }
            let slot = if self.is_cluster() { slot(s.key) } else { 0 };
            match groups.iter_mut().find(|(g, _)| *g == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, smallvec::smallvec![i])),
            }
        }
        let calls = groups.iter().map(|(slot, group)| async move {
            let request = Encoded::settlements(settlements, group, now);
            self.guarded(*slot, now, self.send(request, *slot))
                .await
                .map(drop)
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect()
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
            // A region partitioned off may refuse for what it assumes of the silent regions,
            // which ends when they are heard again: not a known end.
            let partitioned = self.regions.as_ref().is_some_and(|r| r.partitioned());
            if op.global.is_some() && partitioned {
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
    pub(super) fn forget(&self, selector: KeySelector<'_>) {
        if let Some(deny) = &self.deny {
            deny.forget_matching(|k| selector.matches(k));
        }
        self.local.forget(|k| selector.matches(k));
    }
}

/// The local-first operations of a request, and where each is among them all.
fn local_part<'a>(ops: &[Op<'a>]) -> (SmallVec<[usize; 4]>, SmallVec<[LocalOp<'a>; 4]>) {
    ops.iter()
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
        .unzip()
}

/// Runs `cmd`, an `EVALSHA` of `script`; when Redis no longer has the script (`NOSCRIPT`,
/// after a `SCRIPT FLUSH` or a restart), loads it and runs `cmd` again.
pub(super) async fn eval<T: redis::FromRedisValue>(
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
pub(super) fn params(quota: &Quota, now: Timestamp) -> [u64; 4] {
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
    pub(super) async fn apply_local_first(
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
        let (local_at, local_ops) = local_part(ops);
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
                    global: None,
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
    pub(super) async fn apply_exact(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> Result<BatchResult, StoreError> {
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
