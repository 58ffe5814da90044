//! The Redis store: one `EVALSHA` per request runs `redis/batch.lua`, which decides every
//! operation with the memory store's arithmetic and consumes all of them or none.
//!
//! `now` comes from the engine's clock, so that tests are deterministic. Every call has a
//! timeout; a failure is a [`StoreError`] and each limit's `on_store_error` decides.

use std::future::Future;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::{BatchResult, Op, OpResult, Store, StoreError};
use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota};

const BATCH: &str = include_str!("redis/batch.lua");

/// A [`Store`] on one Redis server.
#[derive(Clone)]
pub struct RedisStore {
    connection: MultiplexedConnection,
    script: redis::Script,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), loads the script, and checks that the
    /// server answers, all within `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Backend(format!("`{url}`: {e}")))?;
        let connection = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| StoreError::Timeout(timeout))?
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = RedisStore {
            connection,
            script: redis::Script::new(BATCH),
            timeout,
        };
        store.ping().await?;
        Ok(store)
    }

    /// Uses `timeout` for every call from now on.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(|e| StoreError::Backend(e.to_string()))
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

impl Store for RedisStore {
    fn apply(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<BatchResult, StoreError>> + Send {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(now.as_micros()).arg(ops.len());
        for op in ops {
            invocation.key(op.key).key(format!("{}:ban", op.key));
            let [algorithm, p1, p2, p3] = params(&op.quota, now);
            let ban = op
                .ban
                .map_or(0, |b| u64::try_from(b.as_micros()).unwrap_or(u64::MAX));
            invocation
                .arg(algorithm)
                .arg(op.cost)
                .arg(u8::from(op.enforce))
                .arg(ban)
                .arg(op.lease.0)
                .arg(p1)
                .arg(p2)
                .arg(p3);
        }
        let mut connection = self.connection.clone();
        let n = ops.len();
        async move {
            let reply: Vec<i64> = self
                .call(async move { invocation.invoke_async(&mut connection).await })
                .await?;
            parse(&reply, n)
        }
    }

    fn release(
        &self,
        key: &str,
        lease: LeaseId,
        _now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut connection = self.connection.clone();
        let key = key.to_owned();
        async move {
            let _: i64 = self
                .call(async move {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(lease.0)
                        .query_async(&mut connection)
                        .await
                })
                .await?;
            Ok(())
        }
    }

    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut connection = self.connection.clone();
        async move {
            let _: String = self
                .call(async move { redis::cmd("PING").query_async(&mut connection).await })
                .await?;
            Ok(())
        }
    }
}

/// The script's flat reply: admitted, then six numbers per operation.
fn parse(reply: &[i64], n: usize) -> Result<BatchResult, StoreError> {
    if reply.len() != 1 + 6 * n {
        return Err(StoreError::Backend(format!(
            "the batch script answered {} numbers for {n} operations",
            reply.len()
        )));
    }
    let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    let results = reply[1..]
        .chunks_exact(6)
        .map(|r| OpResult {
            decision: Decision {
                allowed: r[0] == 1,
                limit: u64::try_from(r[1]).unwrap_or(0),
                remaining: u64::try_from(r[2]).unwrap_or(0),
                reset: us(r[3]),
                retry_after: (r[4] >= 0 && r[0] == 0).then(|| us(r[4])),
            },
            banned: r[5] == 1,
        })
        .collect();
    Ok(BatchResult {
        admitted: reply[0] == 1,
        results,
    })
}
