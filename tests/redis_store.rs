//! The Redis store on real servers: accuracy under concurrency (two engines, one Redis),
//! the local deny cache, admin operations, the Redis clock option, and faults — Redis killed,
//! hung, restarted, its scripts flushed, a Cluster master killed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use support::redis::{Cluster, Redis};
use tollgate::clock::{Clock, SystemClock};
use tollgate::limiter::{LeaseId, Quota, State, WindowQuota};
use tollgate::store::redis::{BreakerSettings, RedisOptions, RedisStore};
use tollgate::store::{AdminStore, KeySelector, MemoryStore, Op, ServedStore, Store, StoreError};
use tollgate::verdict::Counted;
use tollgate::{
    Action, Engine, ManualClock, PolicySet, RequestCtx, Timestamp, TokioClock, compile,
};

/// A minute boundary, so that windows start aligned.
const START: u64 = 1_700_006_400;

fn options() -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    }
}

async fn store(url: &str, options: RedisOptions) -> RedisStore {
    RedisStore::connect_with(url, options)
        .await
        .expect("the store connects")
}

fn plan(policy: &str) -> tollgate::Plan {
    compile(&PolicySet::from_sources([("test.rl", policy)]))
        .unwrap_or_else(|e| panic!("policy does not compile:\n{}", e.render_plain(100)))
}

fn get(path: &str) -> RequestCtx {
    RequestCtx::new(Method::GET, path).with_client_ip("198.51.100.7".parse().unwrap())
}

fn counted(verdict: &tollgate::Verdict, limit: &str) -> Counted {
    verdict
        .reports
        .iter()
        .find(|r| &*r.limit == limit)
        .unwrap_or_else(|| panic!("no report for {limit}: {verdict:?}"))
        .counted
}

// ---------------------------------------------------------------------------------------
// Accuracy

const HAMMER: &str = r#"
limit fixed { match { route ANY "/fixed"; } key global; algorithm fixed_window; rate 300/min; }
limit bucket { match { route ANY "/bucket"; } key global; algorithm token_bucket; rate 1/min burst 300; }
limit gcra { match { route ANY "/gcra"; } key global; algorithm gcra; rate 1/min burst 300; }
limit inflight { match { route ANY "/inflight"; } key global; rate 300 concurrent; lease 10min; }
limit sliding { match { route ANY "/sliding"; } key global; algorithm sliding_window; rate 200/10s; }
"#;

/// Two engines (two nodes), each with its own connection to the one Redis, on one clock.
async fn two_engines(url: &str) -> (Arc<[Engine<RedisStore, ManualClock>; 2]>, ManualClock) {
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let hasher = tollgate::plan::KeyHasher::new([7; 32]);
    let mut engines = Vec::new();
    for _ in 0..2 {
        let options = RedisOptions {
            // Every request asks Redis: the cache would only hide over-admission.
            deny_cache: None,
            ..options()
        };
        engines.push(
            Engine::with_clock(plan(HAMMER), store(url, options).await, clock.clone())
                .with_key_hasher(hasher.clone()),
        );
    }
    let engines: [Engine<RedisStore, ManualClock>; 2] = match engines.try_into() {
        Ok(e) => e,
        Err(_) => unreachable!("two engines"),
    };
    (Arc::new(engines), clock)
}

/// 64 tasks, half on each engine, each sending `each` requests to `path` at once; returns
/// how many were admitted.
async fn hammer(
    engines: &Arc<[Engine<RedisStore, ManualClock>; 2]>,
    path: &'static str,
    each: usize,
) -> usize {
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let engines = Arc::clone(engines);
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..each {
                    let v = engines[t % 2].decide(&get(path)).await;
                    assert_eq!(counted(&v, path.trim_start_matches('/')), Counted::Store);
                    admitted += usize::from(v.is_allowed());
                }
                admitted
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("a task finishes");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_on_two_engines_admit_exactly_the_quota() {
    let Some(server) = Redis::start() else {
        return;
    };
    admit_exactly_the_quota(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_on_two_engines_admit_exactly_the_quota_on_a_cluster() {
    let Some(cluster) = Cluster::start(3, 0) else {
        return;
    };
    admit_exactly_the_quota(&cluster.url()).await;
}

/// 640 attempts at one instant for each quota of 300: exactly 300 get in, no more, no less,
/// with requests batched (each engine's store batches what queues behind its call).
async fn admit_exactly_the_quota(url: &str) {
    let (engines, _clock) = two_engines(url).await;
    for path in ["/fixed", "/bucket", "/gcra", "/inflight"] {
        assert_eq!(hammer(&engines, path, 10).await, 300, "{path}");
    }
    let calls: u64 = engines.iter().map(|e| e.store().round_trips()).sum();
    let requests: u64 = engines.iter().map(|e| e.store().batched_requests()).sum();
    assert!(
        requests > calls,
        "{requests} requests in {calls} calls: no batch was ever formed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sliding_window_stays_within_one_percent_of_an_exact_sliding_log() {
    let Some(server) = Redis::start() else {
        return;
    };
    let (engines, clock) = two_engines(&server.url()).await;
    let window = 10_000_000u64;
    let limit = 200usize;
    let step = Duration::from_millis(50);
    // 64 requests every 50 ms for 30 s: about 13 times the rate, as in a flood.
    let mut sliding = 0usize;
    let mut log: Vec<u64> = Vec::new();
    let mut exact = 0usize;
    for _ in 0..600 {
        let now = clock.now().as_micros();
        let admitted = hammer(&engines, "/sliding", 1).await;
        sliding += admitted;
        // The exact log: a request fits when fewer than `limit` were admitted in the last
        // window.
        for _ in 0..64 {
            let in_window = log.iter().filter(|&&t| t + window > now).count();
            if in_window < limit {
                log.push(now);
                exact += 1;
            }
        }
        clock.advance(step);
    }
    let error = (sliding as f64 - exact as f64).abs() / exact as f64;
    assert!(
        error <= 0.01,
        "sliding admitted {sliding}, the exact log {exact}: {:.2} % apart",
        error * 100.0
    );
}

// ---------------------------------------------------------------------------------------
// Key lifetimes

/// A bucket's or GCRA key lives until the bucket is full again (the TAT is past), and at
/// most an eighth of that refill time longer: a 500-a-day bucket touched once is gone within
/// minutes, not days.
#[tokio::test]
async fn bucket_and_gcra_keys_expire_soon_after_they_are_full_again() {
    let Some(server) = Redis::start() else {
        return;
    };
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let engine = Engine::with_clock(
        plan(
            r#"limit bucket { match { route GET "/bucket"; } key ip; algorithm token_bucket; rate 500/24h; }
               limit gcra { match { route GET "/gcra"; } key ip; algorithm gcra; rate 500/24h; }"#,
        ),
        store(&server.url(), options()).await,
        clock.clone(),
    );
    // One unit refills in 86,400 s / 500 = 172.8 s.
    let refill_ms = 172_800u64;
    for path in ["/bucket", "/gcra"] {
        let v = engine.decide(&get(path)).await;
        assert!(v.is_allowed());
        let key = &v.reports[0].key;
        let ttl: u64 = server.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(
            ttl >= refill_ms - 1_000 && ttl <= refill_ms + refill_ms / 8 + 2,
            "{path}: the key lives {ttl} ms, the bucket is full again in {refill_ms} ms"
        );
    }
}

/// A window's key outlives its window by a margin — the window's length, at most 10 s, the
/// longest a request may wait for its call — so that a request stamped in the window but
/// decided just after it finds the window's count rather than an expired key it would take for
/// an empty window (found by tests/regions_bound.rs: a loaded node's late requests re-opened a
/// spent window).
#[tokio::test]
async fn window_keys_outlive_their_window_by_the_longest_wait() {
    let Some(server) = Redis::start() else {
        return;
    };
    // START is a minute boundary: each window starts now.
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let engine = Engine::with_clock(
        plan(
            r#"limit fixed { match { route GET "/fixed"; } key ip; algorithm fixed_window; rate 5/min; }
               limit short { match { route GET "/short"; } key ip; algorithm fixed_window; rate 5/2s; }
               limit sliding { match { route GET "/sliding"; } key ip; algorithm sliding_window; rate 5/min; }"#,
        ),
        store(&server.url(), options()).await,
        clock.clone(),
    );
    for (path, window_ms, margin_ms) in [
        ("/fixed", 60_000u64, 10_000u64),
        ("/short", 2_000, 2_000),
        // A sliding key's count matters for two windows.
        ("/sliding", 120_000, 10_000),
    ] {
        let v = engine.decide(&get(path)).await;
        assert!(v.is_allowed());
        let ttl: u64 = server
            .cli(&["PTTL", &v.reports[0].key])
            .trim()
            .parse()
            .unwrap();
        let expected = window_ms + margin_ms;
        assert!(
            ttl + 1_000 >= expected && ttl <= expected + 2,
            "{path}: the key lives {ttl} ms, expected {expected}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The deny cache

#[tokio::test]
async fn the_deny_cache_answers_a_flood_without_round_trips() {
    let Some(server) = Redis::start() else {
        return;
    };
    let redis = store(&server.url(), options()).await;
    let quota = Quota::FixedWindow(WindowQuota {
        limit: std::num::NonZeroU64::new(5).unwrap(),
        window: std::num::NonZeroU64::new(60_000_000).unwrap(),
    });
    let op = |cost| Op {
        key: "flood:{c}:login",
        quota,
        cost,
        enforce: true,
        ban: None,
        lease: LeaseId(1),
        sync: None,
        global: None,
    };
    let t0 = Timestamp::from_secs(START);
    for _ in 0..5 {
        assert!(redis.apply(&[op(1)], t0).await.unwrap().admitted);
    }
    let rejected = redis
        .apply(&[op(1)], t0.saturating_add(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(!rejected.admitted);
    assert_eq!(
        rejected.results[0].decision.retry_after,
        Some(Duration::from_secs(40))
    );
    let (trips, evalsha) = (redis.round_trips(), server.calls("evalsha"));
    assert_eq!(trips, 6);

    // The flood: a thousand more, none of which reaches Redis.
    let later = t0.saturating_add(Duration::from_secs(30));
    for _ in 0..1000 {
        let r = redis.apply(&[op(1)], later).await.unwrap();
        assert!(!r.admitted);
        assert_eq!(
            r.results[0].decision.retry_after,
            Some(Duration::from_secs(30))
        );
    }
    assert_eq!(redis.round_trips(), trips);
    assert_eq!(
        server.calls("evalsha"),
        evalsha,
        "Redis saw none of the flood"
    );
    assert_eq!(redis.cached_rejections(), 1000);

    // When the window ends, Redis is asked again and the request fits.
    let next = t0.saturating_add(Duration::from_secs(60));
    assert!(redis.apply(&[op(1)], next).await.unwrap().admitted);
    assert_eq!(redis.round_trips(), trips + 1);
}

#[tokio::test]
async fn the_deny_cache_never_hides_what_might_fit() {
    let Some(server) = Redis::start() else {
        return;
    };
    let redis = store(&server.url(), options()).await;
    let quota = Quota::FixedWindow(WindowQuota {
        limit: std::num::NonZeroU64::new(5).unwrap(),
        window: std::num::NonZeroU64::new(60_000_000).unwrap(),
    });
    let op = |cost, enforce| Op {
        key: "cheap:{c}:api",
        quota,
        cost,
        enforce,
        ban: None,
        lease: LeaseId(1),
        sync: None,
        global: None,
    };
    let t0 = Timestamp::from_secs(START);
    assert!(redis.apply(&[op(3, true)], t0).await.unwrap().admitted);
    // Cost 3 no longer fits, but cost 2 does: it is asked, not refused from the cache.
    assert!(!redis.apply(&[op(3, true)], t0).await.unwrap().admitted);
    assert!(redis.apply(&[op(2, true)], t0).await.unwrap().admitted);
    // Shadow rejections are not remembered: shadow limits never refuse.
    let trips = redis.round_trips();
    assert!(redis.apply(&[op(1, false)], t0).await.unwrap().admitted);
    assert!(redis.apply(&[op(1, false)], t0).await.unwrap().admitted);
    assert_eq!(redis.round_trips(), trips + 2);
    // An admin reset forgets the cached rejection along with the counter.
    assert!(!redis.apply(&[op(1, true)], t0).await.unwrap().admitted);
    redis
        .reset(KeySelector::Key("cheap:{c}:api"))
        .await
        .unwrap();
    assert!(redis.apply(&[op(1, true)], t0).await.unwrap().admitted);
}

// ---------------------------------------------------------------------------------------
// Admin operations, alike on memory, one server and a Cluster

async fn admin_operations<S: ServedStore>(store: &S) {
    let quota = Quota::FixedWindow(WindowQuota {
        limit: std::num::NonZeroU64::new(10).unwrap(),
        window: std::num::NonZeroU64::new(60_000_000).unwrap(),
    });
    let now = Timestamp::from_secs(START);
    let keys = [
        "adm:{ip:10.0.0.0/24}:login",
        "adm:{ip:10.0.0.0/24}:api",
        "adm:{ip:10.9.0.0/24}:login",
        "adm:{u:alice}:login",
        "other:{ip:10.0.0.0/24}:login",
    ];
    for (i, key) in keys.iter().enumerate() {
        let op = Op {
            key,
            quota,
            cost: 1 + i as u64,
            enforce: true,
            ban: Some(Duration::from_secs(60)),
            lease: LeaseId(1),
            sync: None,
            global: None,
        };
        assert!(store.apply(&[op], now).await.unwrap().admitted);
    }
    let state = store.inspect(keys[1], now).await.unwrap();
    assert_eq!(
        state.state,
        Some(State::Window(tollgate::limiter::WindowState {
            start: now.as_micros(),
            count: 2
        }))
    );
    assert_eq!(state.banned_until, None);
    assert_eq!(
        store
            .inspect("adm:{nobody}:login", now)
            .await
            .unwrap()
            .state,
        None
    );

    let count = async |selector| store.count(selector, now).await.unwrap();
    assert_eq!(count(KeySelector::Limit("login")).await, 4);
    assert_eq!(count(KeySelector::Limit("api")).await, 1);
    // One client in one limit.
    store
        .reset(KeySelector::Key("adm:{u:alice}:login"))
        .await
        .unwrap();
    assert_eq!(count(KeySelector::Limit("login")).await, 3);
    // One client in every limit and namespace.
    store
        .reset(KeySelector::Client("ip:10.0.0.0/24"))
        .await
        .unwrap();
    assert_eq!(count(KeySelector::Namespace("adm")).await, 1);
    assert_eq!(count(KeySelector::Namespace("other")).await, 0);
    // A whole namespace.
    store.reset(KeySelector::Namespace("adm")).await.unwrap();
    assert_eq!(count(KeySelector::Namespace("adm")).await, 0);
}

#[tokio::test]
async fn admin_operations_in_memory() {
    admin_operations(&MemoryStore::new()).await;
}

#[tokio::test]
async fn admin_operations_on_one_server() {
    let Some(server) = Redis::start() else {
        return;
    };
    admin_operations(&store(&server.url(), options()).await).await;
}

#[tokio::test]
async fn admin_operations_on_a_cluster() {
    let Some(cluster) = Cluster::start(3, 0) else {
        return;
    };
    admin_operations(&store(&cluster.url(), options()).await).await;
}

// ---------------------------------------------------------------------------------------
// Redis's clock

#[tokio::test]
async fn the_server_time_option_counts_on_redis_s_clock() {
    let Some(server) = Redis::start() else {
        return;
    };
    let quota = Quota::FixedWindow(WindowQuota {
        limit: std::num::NonZeroU64::new(10).unwrap(),
        window: std::num::NonZeroU64::new(60_000_000).unwrap(),
    });
    let op = |key| Op {
        key,
        quota,
        cost: 1,
        enforce: true,
        ban: None,
        lease: LeaseId(1),
        sync: None,
        global: None,
    };
    // The engine's clock is years behind; the window must still be Redis's current one.
    let stale = Timestamp::from_secs(START);
    let local = store(&server.url(), options()).await;
    let shared = store(
        &server.url(),
        RedisOptions {
            server_time: true,
            ..options()
        },
    )
    .await;
    local.apply(&[op("clock:{c}:local")], stale).await.unwrap();
    shared.apply(&[op("clock:{c}:redis")], stale).await.unwrap();
    let start = |key| {
        let local = &local;
        async move {
            match local.inspect(key, stale).await.unwrap().state {
                Some(State::Window(w)) => w.start,
                other => panic!("no window state for {key}: {other:?}"),
            }
        }
    };
    assert_eq!(start("clock:{c}:local").await, stale.as_micros());
    let real = SystemClock.now().as_micros();
    let redis_start = start("clock:{c}:redis").await;
    assert!(
        redis_start.abs_diff(real) <= 120_000_000,
        "window start {redis_start} is not within two windows of now {real}"
    );
    assert_eq!(redis_start % 60_000_000, 0, "aligned to the minute");
}

// ---------------------------------------------------------------------------------------
// Faults

const FAIL_MODES: &str = r#"
limit open { match { route ANY "/**"; } algorithm fixed_window; rate 100/min; on_store_error allow; }
limit local { match { route ANY "/local/**"; } algorithm fixed_window; rate 6/min; on_store_error local; }
limit closed { match { route ANY "/closed/**"; } algorithm fixed_window; rate 100/min; on_store_error deny; }
"#;

fn fail_fast() -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_millis(50),
        breaker: BreakerSettings {
            failures: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        ..options()
    }
}

/// Sends one request and checks that it took no longer than the store's 50 ms timeout, on
/// tokio's clock. Callers pause that clock first: a request waiting on a silent Redis is then
/// ended by its timeout alone, at 50 ms of tokio time (plus the timer's 1 ms resolution),
/// however busy the machine is.
async fn timed<S: ServedStore, C: Clock>(engine: &Engine<S, C>, path: &str) -> tollgate::Verdict {
    let tokio_clock = TokioClock::starting_at(Timestamp::from_secs(START));
    let started = tokio_clock.now();
    let verdict = engine.decide(&get(path)).await;
    let took = tokio_clock.now().saturating_since(started);
    assert!(
        took <= Duration::from_millis(50 + 1),
        "{path} took {took:?} with a 50 ms store timeout"
    );
    verdict
}

/// Every limit follows its `on_store_error` while the store fails.
async fn follows_fail_modes<S: ServedStore, C: Clock>(engine: &Engine<S, C>) {
    let v = timed(engine, "/open").await;
    assert_eq!(v.action, Action::Allow);
    assert_eq!(counted(&v, "open"), Counted::Skipped);
    let v = timed(engine, "/closed/x").await;
    assert!(
        matches!(&v.action, Action::Unavailable { limit } if &**limit == "closed"),
        "{v:?}"
    );
    // Two nodes expected: this node counts half of `local` (6/min) on its own.
    for i in 0..3 {
        let v = timed(engine, "/local/x").await;
        assert_eq!(counted(&v, "local"), Counted::Local);
        assert!(v.is_allowed(), "local request {i}");
    }
    let v = timed(engine, "/local/x").await;
    assert!(matches!(v.action, Action::Reject { .. }), "{v:?}");
}

#[tokio::test]
async fn redis_killed_then_restarted_fails_by_mode_then_recovers_without_restart() {
    let Some(mut server) = Redis::start() else {
        return;
    };
    let port = server.addr.port();
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let engine = Engine::with_clock(
        plan(FAIL_MODES),
        store(&server.url(), fail_fast()).await,
        clock.clone(),
    )
    .with_local_share(std::num::NonZeroU64::new(2).unwrap());
    let v = engine.decide(&get("/local/x")).await;
    assert_eq!(counted(&v, "local"), Counted::Store);

    tokio::time::pause();
    server.kill();
    follows_fail_modes(&engine).await;
    assert!(
        engine.store().circuit_open(),
        "repeated failures open the circuit"
    );
    let trips = engine.store().round_trips();
    timed(&engine, "/open").await;
    assert_eq!(
        engine.store().round_trips(),
        trips,
        "an open circuit does not call Redis"
    );
    assert!(
        matches!(
            engine
                .store()
                .release("fm:{c}:x", LeaseId(1), clock.now())
                .await,
            Err(StoreError::CircuitOpen)
        ),
        "nor to give a lease back"
    );

    // Restarted (empty, without the scripts): within the breaker's longest back-off, 1 s,
    // the next request is counted in Redis again.
    tokio::time::resume();
    let _server = Redis::start_on(port, &[]).expect("redis restarts");
    clock.advance(Duration::from_secs(1));
    let v = engine.decide(&get("/open")).await;
    assert_eq!(counted(&v, "open"), Counted::Store, "{v:?}");
    assert!(!engine.store().circuit_open());
    let v = engine.decide(&get("/closed/x")).await;
    assert_eq!(v.action, Action::Allow);
    assert_eq!(counted(&v, "closed"), Counted::Store);
}

#[tokio::test]
async fn a_hung_redis_times_out_by_mode_and_recovers() {
    let Some(server) = Redis::start() else {
        return;
    };
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let engine = Engine::with_clock(
        plan(FAIL_MODES),
        store(&server.url(), fail_fast()).await,
        clock.clone(),
    )
    .with_local_share(std::num::NonZeroU64::new(2).unwrap());
    assert_eq!(
        counted(&engine.decide(&get("/open")).await, "open"),
        Counted::Store
    );

    tokio::time::pause();
    server.pause(true);
    follows_fail_modes(&engine).await;
    assert!(engine.store().circuit_open());
    tokio::time::resume();
    server.pause(false);
    clock.advance(Duration::from_secs(1));
    let v = engine.decide(&get("/open")).await;
    assert_eq!(counted(&v, "open"), Counted::Store, "{v:?}");
}

#[tokio::test]
async fn flushed_scripts_are_reloaded_transparently() {
    let Some(server) = Redis::start() else {
        return;
    };
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let engine = Engine::with_clock(
        plan(FAIL_MODES),
        store(&server.url(), options()).await,
        clock,
    );
    for i in 1..=3u64 {
        assert!(server.cli(&["SCRIPT", "FLUSH"]).contains("OK"));
        let v = engine.decide(&get("/closed/x")).await;
        assert_eq!(counted(&v, "closed"), Counted::Store, "{v:?}");
        let report = v.reports.iter().find(|r| &*r.limit == "closed").unwrap();
        assert_eq!(report.decision.remaining, 100 - i, "the count went on");
    }
    assert_eq!(
        server.calls("script|load"),
        2 + 3,
        "loaded at start, then after each flush"
    );
}

#[tokio::test]
async fn a_cluster_master_killed_fails_over_to_its_replica() {
    let Some(mut cluster) = Cluster::start(3, 1) else {
        return;
    };
    let engine = Engine::new(plan(FAIL_MODES), store(&cluster.url(), fail_fast()).await)
        .with_local_share(std::num::NonZeroU64::new(2).unwrap());
    let v = engine.decide(&get("/closed/x")).await;
    assert_eq!(counted(&v, "closed"), Counted::Store);
    let key = v.reports[0].key.clone();
    let master = cluster.master_of(&key);
    cluster.nodes[master].kill();

    // Until the cluster promotes the replica (node timeout 1 s), requests follow their fail
    // mode; then they are counted in Redis again. Up to 30 s for the
    // failover (waiting for the cluster, not timing it).
    let mut failed_over = false;
    for _ in 0..300 {
        let v = engine.decide(&get("/closed/x")).await;
        match v.action {
            Action::Allow => {
                assert_eq!(counted(&v, "closed"), Counted::Store);
                failed_over = true;
                break;
            }
            Action::Unavailable { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed_over,
        "requests never failed over to the promoted replica"
    );
    let promoted = cluster.master_of(&key);
    assert_ne!(promoted, master, "a replica now serves the slot");
}
