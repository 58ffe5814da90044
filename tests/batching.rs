//! Natural batching on real servers: requests queued behind a call in flight are decided in
//! one call, each exactly as alone — all-or-nothing, in order, seeing what the ones before it
//! consumed — whether its neighbours came through a batching store or one that sends every
//! request alone.

mod support;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::redis::{Cluster, Redis};
use tollgate::Timestamp;
use tollgate::limiter::{BucketQuota, LeaseId, Quota, State, WindowQuota};
use tollgate::store::redis::{RedisOptions, RedisStore};
use tollgate::store::{AdminStore, Op, Store};

/// A minute boundary, so that windows start aligned.
const START: u64 = 1_700_006_400;
const KEYS: [&str; 3] = ["t:{a}:l", "t:{b}:l", "t:{c}:l"];
const CLUSTER_KEYS: [&str; 3] = ["t:{a}:x", "t:{a}:y", "t:{a}:z"];

async fn store(url: &str, batch_max: usize) -> RedisStore {
    RedisStore::connect_with(
        url,
        RedisOptions {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            // Every request asks Redis: the cache would answer some rejections itself.
            deny_cache: None,
            batch_max,
            ..RedisOptions::default()
        },
    )
    .await
    .expect("the store connects")
}

/// One request of a case: which store sends it, which keys it counts in (a bit mask of
/// `KEYS`), and its cost.
#[derive(Debug, Clone, Copy)]
struct Request {
    caller: usize,
    keys: u8,
    cost: u64,
}

/// The algorithm of a case: at one instant, each is a counter of `limit`.
#[derive(Debug, Clone, Copy)]
enum Algorithm {
    Fixed,
    Bucket,
    Gcra,
}

fn quota(algorithm: Algorithm, limit: u64) -> Quota {
    let limit = std::num::NonZeroU64::new(limit).expect("positive");
    let day = std::num::NonZeroU64::new(86_400_000_000).expect("positive");
    let one = std::num::NonZeroU64::MIN;
    match algorithm {
        Algorithm::Fixed => Quota::FixedWindow(WindowQuota {
            limit,
            window: std::num::NonZeroU64::new(60_000_000).expect("positive"),
        }),
        Algorithm::Bucket => Quota::TokenBucket(BucketQuota::new(limit, one, day)),
        Algorithm::Gcra => Quota::Gcra(BucketQuota::new(limit, one, day)),
    }
}

fn case() -> impl Strategy<Value = (Algorithm, u64, Vec<Request>)> {
    let algorithm = prop_oneof![
        Just(Algorithm::Fixed),
        Just(Algorithm::Bucket),
        Just(Algorithm::Gcra)
    ];
    let request = (0..3usize, 1..8u8, 1..4u64).prop_map(|(caller, keys, cost)| Request {
        caller,
        keys,
        cost,
    });
    (
        algorithm,
        3..25u64,
        proptest::collection::vec(request, 1..60),
    )
}

/// Sends every request of a case at once — through two batching stores and one that sends
/// each alone — and checks what the answers and Redis's counts say.
async fn check_case(
    stores: &Arc<[RedisStore; 3]>,
    keys: [&'static str; 3],
    algorithm: Algorithm,
    limit: u64,
    requests: &[Request],
    now: Timestamp,
) -> Result<(), TestCaseError> {
    let quota = quota(algorithm, limit);
    let tasks: Vec<_> = requests
        .iter()
        .map(|&r| {
            let stores = Arc::clone(stores);
            tokio::spawn(async move {
                let ops: Vec<Op<'_>> = keys
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| r.keys & (1 << i) != 0)
                    .map(|(_, key)| Op {
                        key,
                        quota,
                        cost: r.cost,
                        enforce: true,
                        ban: None,
                        lease: LeaseId(0),
                        sync: None,
                        global: None,
                    })
                    .collect();
                stores[r.caller].apply(&ops, now).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("the task ends").expect("Redis answers"));
    }
    let touches = |r: &Request, k: usize| r.keys & (1 << k) != 0;
    // What the admitted requests spent in key `k`.
    let spent = |k: usize| -> u64 {
        requests
            .iter()
            .zip(&answers)
            .filter(|(r, a)| a.admitted && touches(r, k))
            .map(|(r, _)| r.cost)
            .sum()
    };
    for (k, key) in keys.iter().enumerate() {
        let admitted = spent(k);
        prop_assert!(admitted <= limit, "{key}: {admitted} admitted of {limit}");
        // Every admitted request saw what the ones before it consumed: the quota left after
        // each is different (costs are positive), and the last one leaves what the total
        // says.
        let mut left = Vec::new();
        for (r, a) in requests.iter().zip(&answers) {
            if a.admitted && touches(r, k) {
                let position = (0..k).filter(|&j| touches(r, j)).count();
                left.push(a.results[position].decision.remaining);
            }
        }
        let distinct: std::collections::BTreeSet<u64> = left.iter().copied().collect();
        prop_assert_eq!(
            distinct.len(),
            left.len(),
            "{}: each admission saw the last",
            key
        );
        if let Some(&least) = left.iter().min() {
            prop_assert_eq!(
                least,
                limit - admitted,
                "{}: the last admission's remaining",
                key
            );
        }
        // Nothing rejected would have fitted: counts only grow at one instant, so what did
        // not fit when it was decided does not fit in the final count either.
        for (r, a) in requests.iter().zip(&answers) {
            if !a.admitted {
                let full = (0..3).any(|j| touches(r, j) && spent(j) + r.cost > limit);
                prop_assert!(full, "{:?} was rejected with room in every key", r);
            }
        }
        // All or nothing: what Redis counted is exactly what was admitted.
        if matches!(algorithm, Algorithm::Fixed) {
            let state = stores[0].inspect(key, now).await.expect("inspect");
            let counted = match state.state {
                Some(State::Window(w)) => w.count,
                None => 0,
                Some(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert_eq!(counted, admitted, "{}: Redis's count", key);
        }
    }
    Ok(())
}

/// Runs `cases` cases against `url`, each at its own minute (fresh counters).
fn run_cases(url: &str, keys: [&'static str; 3], cases: u32) -> usize {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime");
    let stores = runtime.block_on(async {
        Arc::new([
            store(url, 64).await,
            store(url, 64).await,
            store(url, 1).await,
        ])
    });
    let minute = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |(algorithm, limit, requests)| {
            // Fresh counters, in a new minute.
            let minute = minute.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let now = Timestamp::from_secs(START + 60 * minute);
            runtime.block_on(async {
                for s in stores.iter() {
                    s.reset(tollgate::store::KeySelector::Namespace("t"))
                        .await
                        .expect("reset");
                }
                check_case(&stores, keys, algorithm, limit, &requests, now).await
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let batched = stores[0].batched_requests() + stores[1].batched_requests();
    let calls = stores[0].round_trips() + stores[1].round_trips();
    assert_eq!(
        stores[2].batched_requests(),
        stores[2].round_trips(),
        "the store without batching sends one request per call"
    );
    usize::try_from(batched - calls).unwrap_or(0)
}

#[test]
fn batched_and_unbatched_callers_on_one_server_decide_each_request_as_alone() {
    let Some(server) = Redis::start() else {
        return;
    };
    let joined = run_cases(&server.url(), KEYS, 64);
    assert!(
        joined > 0,
        "no request ever shared a call: batching never happened"
    );
}

#[test]
fn batched_and_unbatched_callers_on_a_cluster_decide_each_request_as_alone() {
    let Some(cluster) = Cluster::start(3, 0) else {
        return;
    };
    // One hash tag: the keys share a slot, so requests batch together.
    let joined = run_cases(&cluster.url(), CLUSTER_KEYS, 24);
    assert!(
        joined > 0,
        "no request ever shared a call: batching never happened"
    );
}
