//! The memory store and the Redis store — on a real `redis-server`, and on a real 3-master
//! Redis Cluster — decide alike, step by step, for every algorithm: the same requests at the
//! same times give the same decisions. The Redis store's deny cache is off here (it answers
//! rejections without asking, see tests/redis_store.rs); this is about the scripts.

mod support;

use std::num::NonZeroU64;
use std::time::Duration;

use tollgate::Timestamp;
use tollgate::limiter::{
    BucketQuota, CalendarPeriod, ConcurrencyQuota, LeaseId, Quota, WindowQuota,
};
use tollgate::store::redis::{RedisOptions, RedisStore};
use tollgate::store::{
    AdminStore, BatchResult, KeySelector, MemoryStore, Op, ServedStore, Settlement, Store,
};

const T0: u64 = 1_700_006_400_000_000;

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

fn quotas() -> Vec<Quota> {
    vec![
        Quota::FixedWindow(WindowQuota {
            limit: nz(5),
            window: nz(1_000_000),
        }),
        Quota::SlidingWindow(WindowQuota {
            limit: nz(7),
            window: nz(2_000_000),
        }),
        Quota::TokenBucket(BucketQuota::new(nz(4), nz(3), nz(1_000_000))),
        Quota::Gcra(BucketQuota::new(nz(3), nz(10), nz(1_000_000))),
        Quota::Concurrency(ConcurrencyQuota {
            max: nz(2),
            lease: nz(700_000),
        }),
        Quota::Calendar {
            limit: nz(6),
            period: CalendarPeriod::Day,
        },
    ]
}

/// A small deterministic generator, so that a failure replays.
struct Steps(u64);

impl Steps {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

async fn apply<S: ServedStore>(store: &S, ops: &[Op<'_>], now: u64) -> BatchResult {
    store
        .apply(ops, Timestamp::from_micros(now))
        .await
        .expect("the store answers")
}

/// A Redis store on `url` that asks Redis every time.
async fn store(url: &str) -> RedisStore {
    let options = RedisOptions {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        deny_cache: None,
        ..RedisOptions::default()
    };
    RedisStore::connect_with(url, options)
        .await
        .expect("the store connects")
}

#[tokio::test]
async fn one_server_agrees_with_memory() {
    let Some(server) = support::redis::Redis::start() else {
        return;
    };
    let redis = store(&server.url()).await;
    every_algorithm(&redis).await;
    late_requests(&redis).await;
    batches_and_bans(&redis, "b:{c}:large").await;
    every_algorithm_in_one_batch(&redis).await;
    settlements(&redis).await;
}

#[tokio::test]
async fn a_cluster_agrees_with_memory() {
    let Some(cluster) = support::redis::Cluster::start(3, 0) else {
        return;
    };
    let redis = store(&cluster.url()).await;
    assert!(redis.is_cluster());
    every_algorithm(&redis).await;
    settlements(&redis).await;
    // The same client's keys share a slot: one call.
    batches_and_bans(&redis, "b:{c}:large").await;
    every_algorithm_in_one_batch(&redis).await;
    // A limit of another client (a global one) lives in another slot, on another master:
    // still all-or-nothing, with what the admitted slot consumed given back.
    assert_ne!(
        cluster.master_of("b:{c}:small"),
        cluster.master_of("b:{all}:large"),
        "the test needs the two keys on two masters"
    );
    batches_and_bans(&redis, "b:{all}:large").await;
}

async fn every_algorithm(redis: &RedisStore) {
    let memory = MemoryStore::new();
    let mut steps = Steps(0x9E37_79B9_7F4A_7C15);
    for (q, quota) in quotas().into_iter().enumerate() {
        let key = format!("conf:{{client}}:q{q}");
        let mut now = T0;
        for i in 0..300u64 {
            now += steps.next(400_000);
            let cost = if matches!(quota, Quota::Concurrency(_)) {
                1
            } else {
                1 + steps.next(3)
            };
            let op = Op {
                key: &key,
                quota,
                cost,
                enforce: true,
                ban: None,
                lease: LeaseId(i),
                sync: None,
                global: None,
            };
            let m = apply(&memory, &[op], now).await;
            let r = apply(redis, &[op], now).await;
            assert_eq!(
                m,
                r,
                "{} differs at step {i} (now {now}, cost {cost})",
                quota.algorithm()
            );
            // Release some concurrency leases, in both.
            if matches!(quota, Quota::Concurrency(_)) && m.admitted && steps.next(2) == 0 {
                memory
                    .release(&key, LeaseId(i), Timestamp::from_micros(now))
                    .await
                    .unwrap();
                redis
                    .release(&key, LeaseId(i), Timestamp::from_micros(now))
                    .await
                    .unwrap();
            }
        }
    }
}

/// Requests stamped up to 80 ms behind the clock, as from nodes whose clocks are a little
/// apart: both stores decide them alike, in the window their key already counts in.
async fn late_requests(redis: &RedisStore) {
    let memory = MemoryStore::new();
    let mut steps = Steps(0x2545_F491_4F6C_DD1D);
    let windows = quotas().into_iter().filter(|q| {
        matches!(
            q,
            Quota::FixedWindow(_) | Quota::SlidingWindow(_) | Quota::Calendar { .. }
        )
    });
    for (q, quota) in windows.enumerate() {
        let key = format!("late:{{client}}:q{q}");
        let mut now = T0 + 86_400_000_000 - 3_000_000;
        for i in 0..300u64 {
            now += steps.next(100_000);
            let stamped = now - steps.next(80_000);
            let op = Op {
                key: &key,
                quota,
                cost: 1 + steps.next(2),
                enforce: true,
                ban: None,
                lease: LeaseId(i),
                sync: None,
                global: None,
            };
            let m = apply(&memory, &[op], stamped).await;
            let r = apply(redis, &[op], stamped).await;
            assert_eq!(
                m,
                r,
                "{} differs at step {i} (stamped {stamped})",
                quota.algorithm()
            );
        }
    }
}

/// Reservations settled after the fact — refunds and debts, in the window they were counted
/// in, the one after, or later — move both stores alike: every admission after them gets the
/// same answer. Each call settles on two keys (two clients, so two slots on a Cluster).
async fn settlements(redis: &RedisStore) {
    let memory = MemoryStore::new();
    let mut steps = Steps(0x51_7CC1_B727_220A);
    let countable = quotas()
        .into_iter()
        .filter(|q| !matches!(q, Quota::Concurrency(_)));
    for (q, quota) in countable.enumerate() {
        let keys = [format!("settle:{{a}}:q{q}"), format!("settle:{{b}}:q{q}")];
        let mut now = T0;
        let mut counted: Vec<u64> = Vec::new();
        for i in 0..400u64 {
            now += steps.next(300_000);
            let key = &keys[usize::from(steps.next(2) == 0)];
            if steps.next(3) > 0 || counted.is_empty() {
                let op = Op {
                    key,
                    quota,
                    cost: 1 + steps.next(4),
                    enforce: true,
                    ban: None,
                    lease: LeaseId(i),
                    sync: None,
                    global: None,
                };
                let m = apply(&memory, &[op], now).await;
                let r = apply(redis, &[op], now).await;
                assert_eq!(
                    m,
                    r,
                    "{} differs at step {i} (now {now})",
                    quota.algorithm()
                );
                if m.admitted {
                    counted.push(now);
                }
                continue;
            }
            // Settle on both keys: a difference from a refund of 6 to a debt of 9, for a
            // reservation counted at one of the times admitted so far.
            let at = |steps: &mut Steps| {
                let pick = counted[steps.next(counted.len() as u64) as usize];
                Timestamp::from_micros(pick)
            };
            let settled = [
                Settlement {
                    key: &keys[0],
                    quota,
                    delta: steps.next(16) as i64 - 6,
                    counted_at: at(&mut steps),
                },
                Settlement {
                    key: &keys[1],
                    quota,
                    delta: steps.next(16) as i64 - 6,
                    counted_at: at(&mut steps),
                },
            ];
            let t = Timestamp::from_micros(now);
            memory.settle(&settled, t).await.unwrap();
            redis.settle(&settled, t).await.expect("Redis settles");
        }
    }
}

/// All six algorithms in every request — more operations than the script's tables are first
/// built for — some banning, the calendar quota only observed (shadow): the script reads each operation's
/// keys and arguments where that operation put them.
async fn every_algorithm_in_one_batch(redis: &RedisStore) {
    let memory = MemoryStore::new();
    let mut steps = Steps(0x2545_F491_4F6C_DD1D);
    let keys: Vec<String> = (0..6).map(|q| format!("all:{{client}}:q{q}")).collect();
    let mut now = T0;
    let mut admitted = 0;
    for i in 0..200u64 {
        now += steps.next(300_000);
        let ops: Vec<Op<'_>> = quotas()
            .into_iter()
            .zip(&keys)
            .enumerate()
            .map(|(q, (quota, key))| Op {
                key,
                quota,
                cost: if matches!(quota, Quota::Concurrency(_)) {
                    1
                } else {
                    1 + steps.next(2)
                },
                enforce: q != 5,
                ban: (q == 1 || q == 4).then(|| Duration::from_micros(1 + steps.next(900_000))),
                lease: LeaseId(i),
                sync: None,
                global: None,
            })
            .collect();
        let m = apply(&memory, &ops, now).await;
        let r = apply(redis, &ops, now).await;
        assert_eq!(m, r, "step {i} (now {now})");
        admitted += u32::from(m.admitted);
        if m.admitted && steps.next(2) == 0 {
            let at = Timestamp::from_micros(now);
            memory.release(&keys[4], LeaseId(i), at).await.unwrap();
            redis.release(&keys[4], LeaseId(i), at).await.unwrap();
        }
    }
    assert!(
        (20..180).contains(&admitted),
        "the table must both admit and reject: {admitted} of 200 admitted"
    );
    redis
        .reset(KeySelector::Namespace("all"))
        .await
        .expect("the namespace resets");
}

/// Batches are all-or-nothing and bans hold, in Redis as in memory; `large` is the key of the
/// batch's second limit.
async fn batches_and_bans(redis: &RedisStore, large_key: &str) {
    let memory = MemoryStore::new();
    let small = Quota::FixedWindow(WindowQuota {
        limit: nz(1),
        window: nz(60_000_000),
    });
    let large = Quota::SlidingWindow(WindowQuota {
        limit: nz(100),
        window: nz(60_000_000),
    });
    let ops = |ban| {
        [
            Op {
                key: "b:{c}:small",
                quota: small,
                cost: 1,
                enforce: true,
                ban,
                lease: LeaseId(1),
                sync: None,
                global: None,
            },
            Op {
                key: large_key,
                quota: large,
                cost: 1,
                enforce: true,
                ban: None,
                lease: LeaseId(1),
                sync: None,
                global: None,
            },
            Op {
                key: "b:{c}:shadow",
                quota: small,
                cost: 1,
                enforce: false,
                ban: None,
                lease: LeaseId(1),
                sync: None,
                global: None,
            },
        ]
    };
    let ban = Some(Duration::from_secs(300));
    for (i, at) in [0u64, 1, 2, 200, 301, 302].into_iter().enumerate() {
        let now = T0 + at * 1_000_000;
        let m = apply(&memory, &ops(ban), now).await;
        let r = apply(redis, &ops(ban), now).await;
        assert_eq!(m, r, "step {i} at +{at}s");
    }
    // The rejected batches consumed nothing from `large`: of the six, only those at +0 s and
    // +301 s were admitted, and only the second is in the current window.
    let r = apply(redis, &ops(None)[1..2], T0 + 303_000_000).await;
    assert_eq!(r.results[0].decision.remaining, 100 - 2);
    redis
        .reset(KeySelector::Namespace("b"))
        .await
        .expect("the namespace resets");
}
