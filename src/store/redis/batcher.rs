//! Natural batching: many requests decided in one call of `batch.lua`.
//!
//! Each Redis server (each Cluster slot: a script's keys must share one) has one dispatcher
//! task and at most one batch call in flight. A request that finds the dispatcher idle goes
//! out at once, alone; requests that arrive while a call is in flight queue, and when it
//! returns, everything queued (up to `redis_batch_max`) goes out in one call. The script
//! decides them in arrival order, each all-or-nothing, each seeing what the ones before it
//! consumed — the same answers as one call per request, for a fraction of Redis's time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::{Cmd, Script};
use smallvec::SmallVec;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{Connection, backend, eval, params};
use crate::clock::Timestamp;
use crate::limiter::Quota;
use crate::plan::key::BAN_SUFFIX;
use crate::store::{Op, Settlement, StoreError};

/// Added to an algorithm's code for a settlement (`batch.lua`).
const SETTLE: u64 = 40;

/// What every dispatcher of a store shares: the connection (swapped when TLS certificates
/// rotate), the script and the counters.
pub(super) struct Link {
    pub(super) connection: ArcSwap<Connection>,
    pub(super) batch: Script,
    /// Gives back what one Cluster slot group consumed when another rejected.
    pub(super) undo: Script,
    pub(super) timeout: Duration,
    /// Redis's clock instead of each request's.
    pub(super) server_time: bool,
    /// Batch calls sent.
    pub(super) calls: AtomicU64,
    /// Requests those calls decided.
    pub(super) requests: AtomicU64,
    /// Rung when a call fails: behind Sentinel, the master may have changed.
    pub(super) failed: Option<Arc<Notify>>,
    /// Times the connection was swapped.
    pub(super) swaps: AtomicU64,
}

impl Link {
    /// Puts `connection` in use (calls in flight finish on the old one).
    pub(super) fn swap(&self, connection: Connection) {
        self.connection.store(Arc::new(connection));
        self.swaps.fetch_add(1, Ordering::AcqRel);
    }

    /// Which connection is in use: it changes with every [`Link::swap`].
    pub(super) fn generation(&self) -> u64 {
        self.swaps.load(Ordering::Acquire)
    }

    /// Runs `f` on a connection within the timeout.
    pub(super) async fn call<T>(
        &self,
        f: impl AsyncFnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut connection = (**self.connection.load()).clone();
        let result = tokio::time::timeout(self.timeout, f(&mut connection))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))
            .and_then(|answer| answer.map_err(backend));
        if result.is_err() {
            self.failing();
        }
        result
    }

    /// Says that a call failed or was refused (the breaker open): behind Sentinel, ask the
    /// sentinels whether the master changed.
    pub(super) fn failing(&self) {
        if let Some(failed) = &self.failed {
            failed.notify_one();
        }
    }

    /// Loads both scripts on `connection` (on every master of a Cluster) and checks that it
    /// answers, within `wait`.
    pub(super) async fn ready(
        &self,
        connection: &Connection,
        wait: Duration,
    ) -> Result<(), StoreError> {
        tokio::time::timeout(wait, async {
            let mut c = connection.clone();
            self.batch.prepare_invoke().load_async(&mut c).await?;
            self.undo.prepare_invoke().load_async(&mut c).await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map_err(|_| StoreError::Timeout(wait))?
        .map_err(backend)?;
        Ok(())
    }

    /// One call of the batch script for `requests`: the answer of each, in order. Keys are
    /// sent once per call, however many requests use them.
    pub(super) async fn run(&self, requests: &[&Encoded]) -> Result<Vec<Vec<i64>>, StoreError> {
        let ops: usize = requests.iter().map(|r| r.ops.len()).sum();
        let mut keys = KeyTable::default();
        let mut numbers = Vec::with_capacity(8 * (2 + 2 * requests.len() + 9 * ops));
        let mut push = |n: f64| numbers.extend_from_slice(&n.to_le_bytes());
        push(f64::from(u8::from(self.server_time)));
        push(exact(requests.len() as u64));
        let mut leases: SmallVec<[u64; 4]> = SmallVec::new();
        for request in requests {
            push(exact(request.now));
            push(exact(request.ops.len() as u64));
            for op in &request.ops {
                for n in op.numbers {
                    push(n);
                }
                push(keys.position(request.key(op.key)));
                push(op.ban_key.map_or(0.0, |k| keys.position(request.key(k))));
                match (op.lease, op.extra) {
                    (Some(lease), _) => {
                        leases.push(lease);
                        push(exact(1 + leases.len() as u64));
                    }
                    (None, Some(extra)) => push(exact(extra)),
                    (None, None) => push(0.0),
                }
            }
        }
        let keys = keys.keys;
        let key_bytes: usize = keys.iter().map(|k| k.len()).sum();
        let mut cmd = Cmd::with_capacity(
            4 + keys.len() + leases.len(),
            96 + key_bytes + numbers.len(),
        );
        cmd.arg("EVALSHA")
            .arg(self.batch.get_hash())
            .arg(keys.len());
        for key in &keys {
            cmd.arg(*key);
        }
        cmd.arg(numbers);
        for lease in &leases {
            cmd.arg(*lease);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.requests
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        let reply = self
            .call(async |c| {
                // When connecting was refused, the command never went out, and the connection
                // has started a fresh attempt at once: send it once more on that one, so that
                // a server back from a restart answers the first call (the breaker's probe).
                match eval::<Vec<i64>>(c, &self.batch, &cmd).await {
                    Err(e) if e.is_connection_refusal() => {
                        eval::<Vec<i64>>(c, &self.batch, &cmd).await
                    }
                    other => other,
                }
            })
            .await?;
        split(&reply, requests.len())
    }
}

/// The keys of a call, each once, and where each is in `KEYS` (from 1).
#[derive(Default)]
struct KeyTable<'a> {
    index: HashMap<&'a [u8], u32, foldhash::fast::RandomState>,
    keys: SmallVec<[&'a [u8]; 16]>,
}

impl<'a> KeyTable<'a> {
    fn position(&mut self, key: &'a [u8]) -> f64 {
        let next = u32::try_from(self.keys.len() + 1).unwrap_or(u32::MAX);
        let keys = &mut self.keys;
        f64::from(*self.index.entry(key).or_insert_with(|| {
            keys.push(key);
            next
        }))
    }
}

/// Cuts the script's reply into one answer per request (each preceded by its length).
fn split(reply: &[i64], requests: usize) -> Result<Vec<Vec<i64>>, StoreError> {
    let mut answers = Vec::with_capacity(requests);
    let mut rest = reply;
    for _ in 0..requests {
        let (&length, tail) = rest.split_first().ok_or_else(short_reply)?;
        let length = usize::try_from(length).map_err(|_| short_reply())?;
        if tail.len() < length {
            return Err(short_reply());
        }
        let (answer, tail) = tail.split_at(length);
        answers.push(answer.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(short_reply());
    }
    Ok(answers)
}

fn short_reply() -> StoreError {
    StoreError::Backend("the batch script's reply does not match the requests sent".to_owned())
}

/// `n` as a double: exact below 2^53, which every count, quota and time in microseconds is
/// (the compiler keeps products below it); larger ones, never sent, would be rounded.
pub(super) fn exact(n: u64) -> f64 {
    n as f64
}

/// One request's part of a batch call, owned so that it can wait in a queue: its keys and,
/// per operation, what `batch.lua` reads.
pub(super) struct Encoded {
    now: u64,
    /// Every key, one after the other; `key_ends` says where each ends.
    keys: Vec<u8>,
    key_ends: SmallVec<[usize; 8]>,
    ops: SmallVec<[EncodedOp; 4]>,
}

/// One operation: code, cost, ban and the algorithm's three parameters (a settlement: code,
/// difference, age and the parameters); its state key and ban key (indexes into the
/// request's keys); its lease id (concurrency).
struct EncodedOp {
    numbers: [f64; 6],
    key: usize,
    ban_key: Option<usize>,
    lease: Option<u64>,
    /// A global limit's addition for silent regions (its code carries [`GLOBAL`]).
    extra: Option<u64>,
}

/// Added to an algorithm's code for a limit counted across regions (`batch.lua`).
const GLOBAL: u64 = 80;

impl Encoded {
    /// A request at `now` with nothing in it yet, room for `key_bytes` of keys.
    fn empty(now: Timestamp, key_bytes: usize) -> Self {
        Encoded {
            now: now.as_micros(),
            keys: Vec::with_capacity(key_bytes),
            key_ends: SmallVec::new(),
            ops: SmallVec::new(),
        }
    }

    /// Adds the key made of `parts`, one after the other; its index among the request's.
    fn add_key(&mut self, parts: &[&[u8]]) -> usize {
        for part in parts {
            self.keys.extend_from_slice(part);
        }
        self.key_ends.push(self.keys.len());
        self.key_ends.len() - 1
    }

    /// The operations `group` of `ops`, decided at `now`; `global` says what a limit counted
    /// across regions adds for silent regions (`None`: an operation of this region alone).
    pub(super) fn new(
        ops: &[Op<'_>],
        group: &[usize],
        now: Timestamp,
        global: impl Fn(&Op<'_>) -> Option<u64>,
    ) -> Self {
        let key_bytes: usize = group.iter().map(|&i| ops[i].key.len() + 4).sum();
        let mut encoded = Encoded::empty(now, 2 * key_bytes);
        for &i in group {
            let op = &ops[i];
            let key = encoded.add_key(&[op.key.as_bytes()]);
            let ban_key = op
                .ban
                .map(|_| encoded.add_key(&[op.key.as_bytes(), BAN_SUFFIX.as_bytes()]));
            let [algorithm, p1, p2, p3] = params(&op.quota, now);
            let extra = global(op);
            let code = algorithm
                + 10 * u64::from(op.enforce)
                + 20 * u64::from(op.ban.is_some())
                + if extra.is_some() { GLOBAL } else { 0 };
            let ban = op
                .ban
                .map_or(0, |b| u64::try_from(b.as_micros()).unwrap_or(u64::MAX));
            encoded.ops.push(EncodedOp {
                numbers: [code, op.cost, ban, p1, p2, p3].map(exact),
                key,
                ban_key,
                lease: matches!(op.quota, Quota::Concurrency(_)).then_some(op.lease.0),
                extra,
            });
        }
        encoded
    }

    /// The settlements `group` of `settlements`, made at `now`: a request the script applies
    /// and always admits.
    pub(super) fn settlements(
        settlements: &[Settlement<'_>],
        group: &[usize],
        now: Timestamp,
    ) -> Self {
        let key_bytes = group.iter().map(|&i| settlements[i].key.len()).sum();
        let mut encoded = Encoded::empty(now, key_bytes);
        for &i in group {
            let s = &settlements[i];
            let key = encoded.add_key(&[s.key.as_bytes()]);
            let [algorithm, p1, p2, p3] = params(&s.quota, now);
            let age = now.as_micros().saturating_sub(s.counted_at.as_micros());
            encoded.ops.push(EncodedOp {
                // A difference is below 2^53 in size, as every cost is.
                numbers: [
                    exact(algorithm + SETTLE),
                    s.delta as f64,
                    exact(age),
                    exact(p1),
                    exact(p2),
                    exact(p3),
                ],
                key,
                ban_key: None,
                lease: None,
                extra: None,
            });
        }
        encoded
    }

    /// Key `i` of the request.
    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.key_ends[i - 1] };
        &self.keys[start..self.key_ends[i]]
    }
}

/// A request waiting for its batch, and where its answer goes.
struct Job {
    request: Encoded,
    answer: oneshot::Sender<Result<Vec<i64>, StoreError>>,
}

/// The queue of one server's (or Cluster slot's) dispatcher.
#[derive(Clone)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts a dispatcher on the current tokio runtime that sends up to `max` requests per
    /// call over `link`. It ends when the last `Batcher` for it is dropped.
    pub(super) fn start(link: Arc<Link>, max: usize) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(link, jobs, max.max(1)));
        Batcher { queue }
    }

    /// Sends `request` with the next call, and waits for its answer.
    pub(super) async fn submit(&self, request: Encoded) -> Result<Vec<i64>, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Job { request, answer })
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Backend("the Redis dispatcher stopped (its runtime shut down)".to_owned())
}

/// One dispatcher: waits for a request, takes every one queued behind it (up to `max`),
/// decides them in one call and hands each its answer; then again.
async fn dispatch(link: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Job>, max: usize) {
    let mut jobs: Vec<Job> = Vec::with_capacity(max);
    while queue.recv_many(&mut jobs, max).await > 0 {
        let requests: SmallVec<[&Encoded; 16]> = jobs.iter().map(|j| &j.request).collect();
        let answers = link.run(&requests).await;
        drop(requests);
        match answers {
            Ok(answers) => {
                for (job, answer) in jobs.drain(..).zip(answers) {
                    // A caller that gave up (timed out, or its client left) no longer listens.
                    let _ = job.answer.send(Ok(answer));
                }
            }
            Err(error) => {
                for job in jobs.drain(..) {
                    let _ = job.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn a_reply_is_cut_at_each_answers_length() {
        assert_eq!(
            split(&[3, 1, 5, 9, 1, 0], 2).unwrap(),
            vec![vec![1, 5, 9], vec![0]]
        );
        assert!(split(&[3, 1, 5], 1).is_err(), "shorter than it says");
        assert!(split(&[1, 1, 9], 1).is_err(), "longer than the requests");
        assert!(split(&[1, 1], 2).is_err(), "an answer missing");
        assert!(split(&[-1], 1).is_err());
    }
}
