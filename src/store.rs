//! Counter stores: where the algorithms' state lives.
//!
//! A [`Store`] applies one request's operations — one per matching limit — atomically: every
//! operation is decided, and unless an enforcing one rejects, all of them are consumed;
//! otherwise none is. The design lets a networked store do the whole batch in one round trip.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota};

pub use memory::MemoryStore;

/// One limit's part of a request.
#[derive(Debug, Clone, Copy)]
pub struct Op<'a> {
    /// The counter's key: `{namespace}:{client}:{limit}` with the client in braces.
    pub key: &'a str,
    /// The quota and algorithm.
    pub quota: Quota,
    /// What the request costs.
    pub cost: u64,
    /// Whether a rejection blocks the whole request (`false` for shadow limits).
    pub enforce: bool,
    /// When rejected, refuse the key for this long.
    pub ban: Option<Duration>,
    /// The request's lease, for concurrency limits.
    pub lease: LeaseId,
}

/// What the store decided for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpResult {
    /// The algorithm's decision (a ban shows as a rejection until the ban ends).
    pub decision: Decision,
    /// Whether the key was refused because of a ban.
    pub banned: bool,
}

/// What the store decided for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchResult {
    /// Whether the request was admitted: no enforcing operation rejected. When `false`,
    /// nothing was consumed.
    pub admitted: bool,
    /// One result per operation, in order. When not admitted, each `remaining` is what is
    /// left before this request, since nothing was consumed.
    pub results: Vec<OpResult>,
}

/// A store failed to answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time.
    #[error("the counter store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store is unreachable or answered with an error.
    #[error("the counter store failed: {0}")]
    Backend(String),
}

/// Where counters live.
pub trait Store: Send + Sync + 'static {
    /// Decides and, when admitted, consumes every operation of one request, atomically.
    fn apply(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> impl Future<Output = Result<BatchResult, StoreError>> + Send;

    /// Whether the store answers (for readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Drops expired state this process keeps; returns how many entries (a shared store
    /// expires its own keys: nothing to do).
    fn sweep(&self, now: Timestamp) -> usize {
        let _ = now;
        0
    }

    /// Gives back a concurrency lease.
    fn release(
        &self,
        key: &str,
        lease: LeaseId,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store `tollgate serve` chose at start-up.
#[derive(Debug)]
pub enum AnyStore {
    /// This process's memory (development).
    Memory(MemoryStore),
    /// A Redis server shared by every node.
    Redis(redis::RedisStore),
}

impl Store for AnyStore {
    async fn apply(&self, ops: &[Op<'_>], now: Timestamp) -> Result<BatchResult, StoreError> {
        match self {
            AnyStore::Memory(m) => m.apply(ops, now).await,
            AnyStore::Redis(r) => r.apply(ops, now).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => m.ping().await,
            AnyStore::Redis(r) => r.ping().await,
        }
    }

    fn sweep(&self, now: Timestamp) -> usize {
        match self {
            AnyStore::Memory(m) => m.sweep(now),
            AnyStore::Redis(r) => r.sweep(now),
        }
    }

    async fn release(&self, key: &str, lease: LeaseId, now: Timestamp) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => m.release(key, lease, now).await,
            AnyStore::Redis(r) => r.release(key, lease, now).await,
        }
    }
}
