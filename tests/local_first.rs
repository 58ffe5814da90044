//! Local-first limits (`sync every`) on real servers: two nodes on one Redis stay within the
//! stated over-admission bound and Redis's count is exact; a request is all-or-nothing across
//! local-first and exact limits; with Redis down each node falls back to its share, never to
//! unlimited; the background sync sends counts on its own; `tollgate check` warns where
//! local-first should not be used.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use support::redis::{Cluster, Redis};
use tollgate::clock::Clock;
use tollgate::limiter::State;
use tollgate::store::AdminStore;
use tollgate::store::redis::{BreakerSettings, RedisOptions, RedisStore};
use tollgate::verdict::Counted;
use tollgate::{Action, Engine, ManualClock, PolicySet, RequestCtx, Timestamp, compile};

/// A minute boundary, so that windows start aligned.
const START: u64 = 1_700_006_400;

const POLICY: &str = r#"
limit fast { match { route ANY "/fast"; } key global; algorithm fixed_window; rate 300/min; sync every 50ms; }
limit slide { match { route ANY "/slide"; } key global; algorithm sliding_window; rate 300/min; sync every 50ms; }
limit strict { match { route ANY "/both"; } key global; algorithm fixed_window; rate 5/min; }
limit loose { match { route ANY "/both"; } key global; algorithm fixed_window; rate 100/min; sync every 50ms; }
limit closed { match { route ANY "/closed"; } key global; algorithm fixed_window; rate 100/min; sync every 50ms; on_store_error deny; }
limit banning { match { route ANY "/ban"; } key global; algorithm fixed_window; rate 3/min; on_exceed reject 429 ban 10min; sync every 50ms; }
"#;

fn plan() -> tollgate::Plan {
    compile(&PolicySet::from_sources([("lf.rl", POLICY)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)))
}

fn get(path: &str) -> RequestCtx {
    RequestCtx::new(Method::GET, path).with_client_ip("198.51.100.7".parse().unwrap())
}

async fn store(url: &str) -> RedisStore {
    RedisStore::connect_with(
        url,
        RedisOptions {
            timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(5),
            deny_cache: None,
            breaker: BreakerSettings {
                failures: 3,
                min_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
            },
            ..RedisOptions::default()
        },
    )
    .await
    .expect("the store connects")
}

type Node = Engine<RedisStore, ManualClock>;

/// Two nodes on one Redis, one clock, and the same key hashing; two nodes share a quota.
async fn two_nodes(url: &str) -> (Arc<[Node; 2]>, ManualClock) {
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let hasher = tollgate::plan::KeyHasher::new([7; 32]);
    let a = Engine::with_clock(plan(), store(url).await, clock.clone())
        .with_key_hasher(hasher.clone())
        .with_local_share(std::num::NonZeroU64::new(2).unwrap());
    let b = Engine::with_clock(plan(), store(url).await, clock.clone())
        .with_key_hasher(hasher)
        .with_local_share(std::num::NonZeroU64::new(2).unwrap());
    (Arc::new([a, b]), clock)
}

/// 64 tasks, half on each node, one request each to `path` at once; how many got in.
async fn round(nodes: &Arc<[Node; 2]>, path: &'static str) -> usize {
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let nodes = Arc::clone(nodes);
            tokio::spawn(async move {
                let v = nodes[t % 2].decide(&get(path)).await;
                let limit = path.trim_start_matches('/');
                assert_eq!(v.reports[0].counted, Counted::Store, "{limit}: {v:?}");
                usize::from(v.is_allowed())
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.expect("a task ends");
    }
    admitted
}

/// The count Redis holds for `limit`'s global key at `now`.
async fn stored(node: &Node, limit: &str, now: Timestamp) -> u64 {
    let key = format!("lf:{{global}}:{limit}");
    match node
        .store()
        .inspect(&key, now)
        .await
        .expect("inspect")
        .state
    {
        Some(State::Window(w)) => w.count,
        Some(State::Sliding(s)) => s.current,
        None => 0,
        Some(other) => panic!("{other:?}"),
    }
}

/// Rounds of 64 requests at once, the nodes syncing after each round (one after the
/// other): each node's view misses at most the other's last round (32 requests), so the
/// window admits between its quota and quota + 32; Redis's count is what was admitted.
async fn within_the_bound(url: &str) {
    let (nodes, clock) = two_nodes(url).await;
    for path in ["/fast", "/slide"] {
        let mut admitted = 0;
        for _ in 0..20 {
            admitted += round(&nodes, path).await;
            for node in nodes.iter() {
                node.store()
                    .sync_now()
                    .await
                    .expect("the counts reach Redis");
            }
        }
        assert!(
            (300..=300 + 32).contains(&admitted),
            "{path}: {admitted} admitted for a quota of 300, two nodes, 32 per node per sync"
        );
        let limit = path.trim_start_matches('/');
        let count = stored(&nodes[0], limit, clock.now()).await;
        assert_eq!(count, admitted as u64, "{path}: Redis's count");
    }
    for node in nodes.iter() {
        assert_eq!(
            node.store().round_trips(),
            0,
            "local-first requests never wait for a Redis call"
        );
        let (calls, failed) = node.store().sync_calls();
        assert!(calls >= 40 && failed == 0, "{calls} syncs, {failed} failed");
        assert_eq!(node.store().local_first_keys(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_server_stay_within_the_stated_bound() {
    let Some(server) = Redis::start() else {
        return;
    };
    within_the_bound(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_a_cluster_stay_within_the_stated_bound() {
    let Some(cluster) = Cluster::start(3, 0) else {
        return;
    };
    within_the_bound(&cluster.url()).await;
}

/// One request, two limits: `strict` is exact (5/min), `loose` local-first. Once `strict`
/// rejects, `loose` gives back what it counted: Redis ends with 5 in both.
#[tokio::test]
async fn a_request_is_all_or_nothing_across_exact_and_local_first_limits() {
    let Some(server) = Redis::start() else {
        return;
    };
    let (nodes, clock) = two_nodes(&server.url()).await;
    let node = &nodes[0];
    let mut allowed = 0;
    for _ in 0..8 {
        let v = node.decide(&get("/both")).await;
        allowed += usize::from(v.is_allowed());
        if !v.is_allowed() {
            let loose = v.reports.iter().find(|r| &*r.limit == "loose").unwrap();
            assert_eq!(loose.decision.remaining, 95, "nothing consumed: {v:?}");
        }
    }
    assert_eq!(allowed, 5);
    node.store().sync_now().await.unwrap();
    for limit in ["strict", "loose"] {
        assert_eq!(stored(node, limit, clock.now()).await, 5, "{limit}");
    }
}

/// A local-first limit that bans: the node that sees the quota spent bans at once; the ban
/// goes to Redis with its next sync, and another node refuses from its own next sync on.
#[tokio::test]
async fn a_ban_starts_on_one_node_and_reaches_the_others_with_their_sync() {
    let Some(server) = Redis::start() else {
        return;
    };
    let (nodes, clock) = two_nodes(&server.url()).await;
    let [a, b] = &*nodes;
    for _ in 0..3 {
        assert!(a.decide(&get("/ban")).await.is_allowed());
    }
    let v = a.decide(&get("/ban")).await;
    assert!(v.reports[0].banned, "{v:?}");
    assert_eq!(
        v.reports[0].decision.retry_after,
        Some(Duration::from_secs(600)),
        "the rejection that starts the ban announces it"
    );
    // Node A keeps refusing, without Redis.
    clock.advance(Duration::from_secs(61));
    assert!(a.decide(&get("/ban")).await.reports[0].banned);

    a.store().sync_now().await.unwrap();
    let banned = a
        .store()
        .inspect("lf:{global}:banning", clock.now())
        .await
        .unwrap()
        .banned_until;
    assert_eq!(
        banned,
        Some(Timestamp::from_secs(START + 600)),
        "the ban is in Redis, for every node"
    );
    // Node B had not used the key: its first request is decided before it learns of the
    // ban (one interval late, as documented); from its sync on, it refuses.
    assert!(b.decide(&get("/ban")).await.is_allowed());
    b.store().sync_now().await.unwrap();
    let v = b.decide(&get("/ban")).await;
    assert!(v.reports[0].banned && !v.is_allowed(), "{v:?}");
    assert_eq!(
        v.reports[0].decision.retry_after,
        Some(Duration::from_secs(600 - 61))
    );
    // An admin reset forgets the key here and in Redis (other nodes keep what they know
    // until it ends, as with the deny cache).
    b.store()
        .reset(tollgate::store::KeySelector::Key("lf:{global}:banning"))
        .await
        .unwrap();
    assert!(b.decide(&get("/ban")).await.is_allowed(), "reset lifts it");
    clock.advance(Duration::from_secs(600));
    assert!(a.decide(&get("/ban")).await.is_allowed(), "the ban ends");
}

/// Admits `n` requests to `path` on `node`, asserting each is admitted.
async fn admit(node: &Node, path: &str, n: usize) {
    for i in 0..n {
        let v = node.decide(&get(path)).await;
        assert!(v.is_allowed(), "{path}: request {i} of {n}: {v:?}");
    }
}

/// Admits requests to `path` on `node` until the first refusal; how many got in.
async fn admitted_until_refused(node: &Node, path: &str) -> u64 {
    let mut admitted = 0;
    while node.decide(&get(path)).await.is_allowed() {
        admitted += 1;
        assert!(admitted <= 1_000, "{path} never refuses");
    }
    admitted
}

/// Redis stalls (`SIGSTOP`) while a sync is in flight: the node times out, but the call
/// runs when Redis goes on, and the node sends its counts again. Syncs are idempotent —
/// each node writes its whole count, not a delta — so Redis's count is exactly what was
/// admitted, stalls or not, twice in a row, with a second node counting too; and the node
/// then admits exactly up to its quota (with the bug this found, 100 admitted and a stall
/// of 300 ms left Redis at 211 and the node refusing 111 early).
#[tokio::test]
async fn a_sync_that_timed_out_but_ran_later_counts_once() {
    let Some(server) = Redis::start() else {
        return;
    };
    let (nodes, clock) = two_nodes(&server.url()).await;
    let [a, b] = &*nodes;
    for path in ["/fast", "/slide"] {
        let limit = path.trim_start_matches('/');
        admit(a, path, 100).await;
        a.store().sync_now().await.expect("the counts reach Redis");
        for stalls in 1..=2 {
            // On tokio's paused clock the sync's timeout ends it as soon as Redis is silent;
            // the counts admitted meanwhile make sure there is something to send.
            tokio::time::pause();
            server.pause(true);
            admit(a, path, 17).await;
            for _ in 0..stalls {
                assert!(
                    a.store().sync_now().await.is_err(),
                    "{path}: a stalled Redis times the sync out"
                );
            }
            server.pause(false);
            tokio::time::resume();
            a.store().sync_now().await.expect("the counts reach Redis");
        }
        admit(b, path, 10).await;
        b.store()
            .sync_now()
            .await
            .expect("node B's counts reach Redis");
        let admitted = 100 + 2 * 17 + 10;
        assert_eq!(
            stored(a, limit, clock.now()).await,
            admitted,
            "{path}: Redis counts each admission once"
        );
        // Node A reads the total with the sync after its next request: it then takes the
        // rest of the quota, and no more.
        admit(a, path, 1).await;
        a.store().sync_now().await.unwrap();
        assert_eq!(
            admitted_until_refused(a, path).await,
            300 - admitted - 1,
            "{path}: node A admits up to the quota"
        );
        a.store().sync_now().await.unwrap();
        assert_eq!(stored(a, limit, clock.now()).await, 300, "{path}");
    }
}

/// Sent again and again, a node's counts stay what it admitted: after a request given back
/// (another limit of the request refused it) and after an admin reset, which keeps only what
/// the node admitted since.
#[tokio::test]
async fn give_backs_and_resets_stay_exact_across_repeated_syncs() {
    let Some(server) = Redis::start() else {
        return;
    };
    let (nodes, clock) = two_nodes(&server.url()).await;
    let node = &nodes[0];
    // `loose` is local-first, `strict` exact (5/min): the 6th request counts in `loose`,
    // then gives it back when `strict` refuses.
    admit(node, "/both", 5).await;
    node.store().sync_now().await.unwrap();
    assert!(!node.decide(&get("/both")).await.is_allowed());
    for _ in 0..3 {
        node.store().sync_now().await.unwrap();
        assert_eq!(stored(node, "loose", clock.now()).await, 5);
    }
    admit(node, "/fast", 40).await;
    node.store().sync_now().await.unwrap();
    nodes[1]
        .store()
        .reset(tollgate::store::KeySelector::Key("lf:{global}:fast"))
        .await
        .unwrap();
    admit(node, "/fast", 3).await;
    for _ in 0..3 {
        node.store().sync_now().await.unwrap();
        assert_eq!(
            stored(node, "fast", clock.now()).await,
            3,
            "after a reset, only what was admitted since counts"
        );
    }
}

/// Each node keeps its count in fields of its own in the key; the fields of nodes that are
/// gone (a restart is a new node) are removed once a key holds many, so a key used for days
/// across deployments does not grow.
#[tokio::test]
async fn fields_of_nodes_gone_are_pruned() {
    let Some(server) = Redis::start() else {
        return;
    };
    let clock = ManualClock::new(Timestamp::from_secs(START));
    let hasher = tollgate::plan::KeyHasher::new([7; 32]);
    let key = "lf:{global}:fast";
    let fields = || -> u64 { server.cli(&["HLEN", key]).trim().parse().unwrap() };
    for _ in 0..40 {
        let node = Engine::with_clock(plan(), store(&server.url()).await, clock.clone())
            .with_key_hasher(hasher.clone());
        admit(&node, "/fast", 1).await;
        node.store().sync_now().await.unwrap();
    }
    assert_eq!(fields(), 2 + 40, "`s`, `c`, and one field per node");
    clock.advance(Duration::from_secs(60));
    let node = Engine::with_clock(plan(), store(&server.url()).await, clock.clone())
        .with_key_hasher(hasher);
    admit(&node, "/fast", 1).await;
    node.store().sync_now().await.unwrap();
    assert_eq!(fields(), 43, "below the threshold, nothing is pruned");
    for _ in 0..30 {
        admit(&node, "/fast", 1).await;
        node.store().sync_now().await.unwrap();
    }
    // A new node's first write in the window, past 64 fields, prunes the windows gone.
    let mut added = 0;
    while fields() <= 64 {
        let other = Engine::with_clock(plan(), store(&server.url()).await, clock.clone())
            .with_key_hasher(tollgate::plan::KeyHasher::new([7; 32]));
        admit(&other, "/fast", 1).await;
        other.store().sync_now().await.unwrap();
        added += 1;
    }
    let last = Engine::with_clock(plan(), store(&server.url()).await, clock.clone())
        .with_key_hasher(tollgate::plan::KeyHasher::new([7; 32]));
    admit(&last, "/fast", 1).await;
    last.store().sync_now().await.unwrap();
    assert_eq!(
        fields(),
        2 + 1 + added + 1,
        "only this window's nodes keep their fields"
    );
    assert_eq!(stored(&last, "fast", clock.now()).await, 31 + added + 1);
}

/// With Redis gone, syncs fail; after two, local-first limits follow `on_store_error`:
/// `local` (their default) counts this node's share — 300 / 2 nodes — and no more; `deny`
/// refuses. When Redis is back, the next sync brings them back to Redis.
#[tokio::test]
async fn with_redis_down_each_node_falls_back_to_its_share() {
    let Some(mut server) = Redis::start() else {
        return;
    };
    let port = server.addr.port();
    let (nodes, _clock) = two_nodes(&server.url()).await;
    let node = &nodes[0];
    assert!(node.decide(&get("/fast")).await.is_allowed());
    assert!(node.decide(&get("/closed")).await.is_allowed());
    node.store().sync_now().await.unwrap();

    server.kill();
    assert!(
        node.decide(&get("/fast")).await.is_allowed(),
        "one sync failing is tolerated"
    );
    for _ in 0..2 {
        assert!(node.store().sync_now().await.is_err());
    }
    let mut admitted = 0;
    for _ in 0..400 {
        let v = node.decide(&get("/fast")).await;
        assert_eq!(v.reports[0].counted, Counted::Local, "{v:?}");
        admitted += usize::from(v.is_allowed());
    }
    assert_eq!(admitted, 150, "this node's share of 300, never unlimited");
    let v = node.decide(&get("/closed")).await;
    assert!(
        matches!(&v.action, Action::Unavailable { limit } if &**limit == "closed"),
        "{v:?}"
    );

    let _server = Redis::start_on(port, &[]).expect("redis restarts");
    let mut recovered = false;
    for _ in 0..3 {
        recovered |= node.store().sync_now().await.is_ok();
    }
    assert!(recovered, "a sync reaches Redis again");
    let v = node.decide(&get("/fast")).await;
    assert_eq!(v.reports[0].counted, Counted::Store, "{v:?}");
}

/// Without `sync_now`, the background task sends the counts every interval: node A's
/// admissions reach Redis, then node B's view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_sync_sends_counts_every_interval() {
    let Some(server) = Redis::start() else {
        return;
    };
    let (nodes, clock) = two_nodes(&server.url()).await;
    for _ in 0..10 {
        assert!(nodes[0].decide(&get("/fast")).await.is_allowed());
    }
    let key = "lf:{global}:fast";
    let mut seen = 0;
    for _ in 0..200 {
        let state = nodes[1].store().inspect(key, clock.now()).await.unwrap();
        if let Some(State::Window(w)) = state.state {
            seen = w.count;
        }
        if seen == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 10, "node A's counts reach Redis on their own");
    // Node B learns the total from its own sync once it uses the key: after its n-th
    // request, 300 − 10 − n are left.
    let mut mine = 0;
    let mut remaining = 0;
    for _ in 0..200 {
        let v = nodes[1].decide(&get("/fast")).await;
        mine += 1;
        remaining = v.reports[0].decision.remaining;
        if remaining == 300 - 10 - mine {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        remaining,
        300 - 10 - mine,
        "node B sees node A's 10 besides its own {mine}"
    );
}

#[test]
fn check_warns_about_bans_and_calendar_quotas_that_are_local_first() {
    let source = r#"
limit login { match { route POST "/login"; } key ip; algorithm fixed_window; rate 10/min; on_exceed reject 429 ban 15min; sync every 50ms; }
limit monthly { match { route ANY "/api/**"; } key ip; rate 100000/month; sync every 1s; }
limit fine { match { route ANY "/x"; } key ip; algorithm fixed_window; rate 10/min; sync every 100ms; }
"#;
    let plan = compile(&PolicySet::from_sources([("w.rl", source)])).unwrap();
    let warnings: Vec<String> = plan
        .warnings()
        .iter()
        .map(|w| w.render_plain(100))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].contains("bans start only when"),
        "{}",
        warnings[0]
    );
    assert!(warnings[1].contains("calendar quota"), "{}", warnings[1]);
    let fine = plan.limits().iter().find(|l| &*l.name == "fine").unwrap();
    assert_eq!(fine.sync, Some(Duration::from_millis(100)));
    assert_eq!(
        fine.on_store_error,
        tollgate::plan::StoreErrorMode::Local,
        "a local-first limit never fails open"
    );
    let explained = tollgate::explain::explain(
        &plan,
        &RequestCtx::new(Method::GET, "/x").with_client_ip("198.51.100.7".parse().unwrap()),
        &tollgate::plan::KeyHasher::new([7; 32]),
    )
    .to_string();
    assert!(
        explained.contains("fine: 10 per 1min (fixed_window), local-first (synced every 100ms)"),
        "{explained}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.rl"), source).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", dir.path().to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(printed.contains("2 warnings"), "{printed}");
    assert!(printed.contains("w.rl:2:"), "{printed}");
}

/// A local-first reservation settled before its count reached Redis goes into the node's
/// own component, so the next sync sends what was used — a refund is never lost on a count
/// Redis does not hold yet, nor counted twice. Settled after the sync, it lands in Redis.
/// Another node sees the settled count after its own sync.
#[tokio::test]
async fn settlements_count_what_was_used_before_and_after_the_sync() {
    use tollgate::limiter::{LeaseId, Quota, WindowQuota};
    use tollgate::store::{Op, Settlement, Store};

    let Some(server) = Redis::start() else {
        return;
    };
    let (a, b) = (store(&server.url()).await, store(&server.url()).await);
    let nz = |n| std::num::NonZeroU64::new(n).unwrap();
    let quota = Quota::FixedWindow(WindowQuota {
        limit: nz(1_000),
        window: nz(60_000_000),
    });
    let key = "lf:{tenant}:tokens";
    let reserve = |cost| Op {
        key,
        quota,
        cost,
        enforce: true,
        ban: None,
        lease: LeaseId(0),
        sync: Some(Duration::from_millis(50)),
        global: None,
    };
    let t0 = Timestamp::from_secs(START);
    let settle = |delta| Settlement {
        key,
        quota,
        delta,
        counted_at: t0,
    };
    let count = async |store: &RedisStore, now| match store.inspect(key, now).await.unwrap().state {
        Some(State::Window(w)) => w.count,
        other => panic!("{other:?}"),
    };
    for _ in 0..3 {
        assert!(a.apply(&[reserve(100)], t0).await.unwrap().admitted);
    }
    let t1 = t0.saturating_add(Duration::from_secs(1));
    a.settle(&[settle(-70), settle(50)], t1).await.unwrap();
    for _ in 0..2 {
        a.sync_now().await.unwrap();
        assert_eq!(count(&a, t1).await, 280, "300 reserved, 70 back, 50 more");
    }
    a.settle(&[settle(-30)], t1).await.unwrap();
    a.sync_now().await.unwrap();
    assert_eq!(count(&a, t1).await, 250);
    // Node B, local-first on the same key, knows 250 once it has read it: 750 fit, not 751.
    assert!(b.apply(&[reserve(1)], t1).await.unwrap().admitted);
    b.sync_now().await.unwrap();
    assert!(b.apply(&[reserve(749)], t1).await.unwrap().admitted);
    assert!(!b.apply(&[reserve(1)], t1).await.unwrap().admitted);
}

/// A node whose clock is behind another's by a window boundary finds Redis holding the later
/// window: its count has nowhere to go there, and it must not forget it — it keeps counting
/// its own admissions against the later window's count (before, every sync made it forget
/// them, and it admitted without limit until its clock caught up).
#[tokio::test]
async fn a_node_behind_the_window_redis_holds_keeps_its_count() {
    use tollgate::limiter::{LeaseId, Quota, WindowQuota};
    use tollgate::store::{Op, Store};

    let Some(server) = Redis::start() else {
        return;
    };
    let (ahead, behind) = (store(&server.url()).await, store(&server.url()).await);
    let nz = |n| std::num::NonZeroU64::new(n).unwrap();
    for quota in [
        Quota::FixedWindow(WindowQuota {
            limit: nz(20),
            window: nz(60_000_000),
        }),
        Quota::SlidingWindow(WindowQuota {
            limit: nz(20),
            window: nz(60_000_000),
        }),
    ] {
        let key = format!("lf:{{skew}}:{}", quota.algorithm());
        let op = Op {
            key: &key,
            quota,
            cost: 1,
            enforce: true,
            ban: None,
            lease: LeaseId(0),
            sync: Some(Duration::from_millis(50)),
            global: None,
        };
        // Two windows apart, so that the sliding window's "window before" does not apply.
        let t_behind = Timestamp::from_secs(START);
        let t_ahead = Timestamp::from_secs(START + 120);
        for _ in 0..10 {
            assert!(ahead.apply(&[op], t_ahead).await.unwrap().admitted);
        }
        ahead.sync_now().await.unwrap();
        let mut admitted = 0;
        for _ in 0..40 {
            if behind.apply(&[op], t_behind).await.unwrap().admitted {
                admitted += 1;
            }
            behind.sync_now().await.unwrap();
        }
        assert_eq!(
            admitted,
            10,
            "{}: the later window holds 10 of 20",
            quota.algorithm()
        );
    }
}
