//! Anomaly blocks at run time: failed logins ban an address for the configured time (on an
//! injected clock) and the ban lifts; a ban set by one engine is enforced by another on the
//! same Redis; a burst of ten times the baseline is reported once per window; distinct
//! values flag and tarpit a client; the layer counts the application's statuses and the
//! decision API takes reports.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tollgate::anomaly::Anomalies;
use tollgate::clock::ManualClock;
use tollgate::store::redis::RedisStore;
use tollgate::store::runtime::{RuntimeList, Target};
use tollgate::store::{MemoryStore, ServedStore};
use tollgate::verdict::Action;
use tollgate::{Engine, RequestCtx, Timestamp};

const BRUTE_FORCE: &str = r#"namespace "auth";
limit api { match { route ANY "/**"; } key ip; algorithm fixed_window; rate 1000/min; }
anomaly login_bruteforce {
  match { route POST "/login"; }
  key ip;
  count when status in [401, 403];
  detect 10 in 5min;
  then ban 15min, alert "security";
}
"#;

fn plan(policy: &str) -> tollgate::plan::Plan {
    tollgate::compile(&tollgate::PolicySet::from_sources([("test.rl", policy)])).unwrap()
}

fn login(ip: &str) -> RequestCtx {
    RequestCtx::new(Method::POST, "/login").with_client_ip(ip.parse().unwrap())
}

/// A time at the start of a 5-minute window (windows are aligned to the epoch).
fn window_start() -> Timestamp {
    Timestamp::from_micros(1_800_000_000 / 300 * 300 * 1_000_000)
}

type Detecting<S> = Anomalies<S, ManualClock>;

/// `engine`, shared, and the detectors of its plan.
fn detecting<S: ServedStore>(
    engine: Engine<S, ManualClock>,
) -> (Arc<Engine<S, ManualClock>>, Detecting<S>) {
    let engine = Arc::new(engine);
    let anomalies = Anomalies::new(Arc::clone(&engine), Vec::new());
    (engine, anomalies)
}

async fn report<S: ServedStore>(
    anomalies: &Detecting<S>,
    request: &RequestCtx,
    status: u16,
) -> Vec<tollgate::anomaly::Detection> {
    let watch = anomalies
        .watch(request)
        .expect("the anomaly watches the request");
    anomalies.observe(watch, status).await
}

fn is_banned(action: &Action) -> Option<Duration> {
    match action {
        Action::Forbid {
            status,
            retry_after,
            reason,
            ..
        } if *status == StatusCode::FORBIDDEN => {
            assert_eq!(reason.as_deref(), Some("anomaly login_bruteforce"));
            *retry_after
        }
        _ => None,
    }
}

/// Ten failed logins within five minutes ban the address for fifteen minutes (refused with
/// 403 and `Retry-After`), listed among the runtime entries; then the ban lifts.
async fn brute_force_is_banned_then_lifted<S: ServedStore>(store: S) {
    let clock = ManualClock::new(window_start());
    let (engine, anomalies) =
        detecting(Engine::with_clock(plan(BRUTE_FORCE), store, clock.clone()));
    let attacker = login("203.0.113.9");
    for n in 0..9 {
        assert!(engine.decide(&attacker).await.is_allowed(), "attempt {n}");
        assert_eq!(report(&anomalies, &attacker, 401).await, [], "attempt {n}");
        clock.advance(Duration::from_secs(20));
    }
    // Successes are not counted; other routes are not watched.
    assert_eq!(report(&anomalies, &attacker, 200).await, []);
    let page = RequestCtx::new(Method::GET, "/home").with_client_ip("203.0.113.9".parse().unwrap());
    assert!(anomalies.watch(&page).is_none());

    let detected = report(&anomalies, &attacker, 401).await;
    assert_eq!(detected.len(), 1, "the tenth failure within 5 minutes");
    assert_eq!(&*detected[0].anomaly, "login_bruteforce");
    assert_eq!(detected[0].observed, 10);
    assert_eq!(detected[0].actions.ban, Some(Duration::from_secs(900)));

    let banned = engine.decide(&attacker).await;
    assert_eq!(is_banned(&banned.action), Some(Duration::from_secs(900)));
    let problem = tollgate::response::problem(&banned, None).unwrap();
    assert_eq!((problem.status, problem.retry_after), (403, Some(900)));
    let page_banned = engine.decide(&page).await;
    assert!(
        is_banned(&page_banned.action).is_some(),
        "the whole address is banned"
    );
    let neighbour = login("203.0.113.10");
    assert!(engine.decide(&neighbour).await.is_allowed());
    let entries = engine.runtime_lists();
    let ban = entries
        .entries()
        .iter()
        .find(|e| e.list == RuntimeList::Denylist)
        .expect("the ban is a runtime denylist entry");
    assert_eq!(ban.target, Target::Net("203.0.113.9/32".parse().unwrap()));

    clock.advance(Duration::from_secs(899));
    let late = engine.decide(&attacker).await;
    assert_eq!(is_banned(&late.action), Some(Duration::from_secs(1)));
    clock.advance(Duration::from_secs(1));
    assert!(
        engine.decide(&attacker).await.is_allowed(),
        "the ban lifted"
    );
}

#[tokio::test]
async fn brute_force_is_banned_then_lifted_on_memory() {
    brute_force_is_banned_then_lifted(MemoryStore::new()).await;
}

#[test]
fn brute_force_is_banned_then_lifted_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    support::runtime().block_on(async {
        let store = RedisStore::connect(&redis.url(), Duration::from_secs(2))
            .await
            .unwrap();
        brute_force_is_banned_then_lifted(store).await;
    });
}

#[test]
fn brute_force_is_banned_then_lifted_on_a_redis_cluster() {
    let Some(cluster) = support::redis::Cluster::start(3, 0) else {
        return;
    };
    support::runtime().block_on(async {
        let store = RedisStore::connect(&cluster.url(), Duration::from_secs(5))
            .await
            .unwrap();
        brute_force_is_banned_then_lifted(store).await;
    });
}

/// Failures counted on two engines add up (the count is in the store); the ban one engine
/// sets is enforced by the other once it reads the runtime lists (every second in `serve`),
/// and lifting it through either lifts it for both.
#[test]
fn a_ban_set_by_one_engine_is_enforced_by_another_on_the_same_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    support::runtime().block_on(async {
        let clock = ManualClock::new(window_start());
        let connect = async || {
            RedisStore::connect(&redis.url(), Duration::from_secs(2))
                .await
                .unwrap()
        };
        let (a, a_detecting) = detecting(Engine::with_clock(
            plan(BRUTE_FORCE),
            connect().await,
            clock.clone(),
        ));
        let (b, b_detecting) = detecting(Engine::with_clock(
            plan(BRUTE_FORCE),
            connect().await,
            clock.clone(),
        ));
        let attacker = login("198.51.100.7");
        let mut detected = Vec::new();
        for n in 0..10 {
            let anomalies = if n % 2 == 0 {
                &a_detecting
            } else {
                &b_detecting
            };
            detected.extend(report(anomalies, &attacker, 403).await);
        }
        assert_eq!(detected.len(), 1, "five failures on each engine make ten");
        b.refresh_runtime_lists().await.unwrap();
        a.refresh_runtime_lists().await.unwrap();
        for engine in [&*a, &*b] {
            let v = engine.decide(&attacker).await;
            assert!(is_banned(&v.action).is_some(), "{:?}", v.action);
        }
        let target = Target::Net("198.51.100.7/32".parse().unwrap());
        assert!(
            b.remove_runtime_entry(RuntimeList::Denylist, &target)
                .await
                .unwrap()
        );
        a.refresh_runtime_lists().await.unwrap();
        assert!(a.decide(&attacker).await.is_allowed(), "lifted for both");
    });
}

/// A burst of ten times a key's usual rate is reported once in its window, however long
/// it lasts; the next burst, windows later, once again.
#[tokio::test]
async fn a_burst_of_ten_times_the_baseline_is_reported_once_per_window() {
    let policy = r#"namespace "api";
anomaly burst {
  match { route ANY "/api/**"; }
  key ip;
  detect rate > 10x baseline over 1min;
  then alert "ops";
}
"#;
    let clock = ManualClock::new(Timestamp::from_micros(1_800_000_000 / 60 * 60 * 1_000_000));
    let (_engine, anomalies) = detecting(Engine::with_clock(
        plan(policy),
        MemoryStore::new(),
        clock.clone(),
    ));
    let request =
        RequestCtx::new(Method::GET, "/api/items").with_client_ip("192.0.2.1".parse().unwrap());
    let mut per_minute = Vec::new();
    for n in [
        5, 5, 5, 5, 5, 5, 100, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 200,
    ] {
        let mut detected = 0;
        for _ in 0..n {
            detected += report(&anomalies, &request, 200).await.len();
        }
        per_minute.push(detected);
        clock.advance(Duration::from_secs(60));
    }
    assert_eq!(
        per_minute,
        [
            0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]
    );
}

/// Many distinct user names from one address (credential stuffing): the address is flagged
/// (its decisions carry the anomaly) and tarpitted (held 2 s) for ten minutes; others are
/// not.
#[tokio::test]
async fn distinct_values_flag_and_tarpit_a_client() {
    let policy = r#"namespace "auth";
anomaly stuffing {
  match { route POST "/login"; }
  key ip;
  count when status in [401];
  detect distinct header("X-Login-User") trusted > 5 in 10min;
  then flag for 1h, tarpit 2s for 10min;
}
"#;
    let clock = ManualClock::new(window_start());
    let (engine, anomalies) = detecting(Engine::with_clock(
        plan(policy),
        MemoryStore::new(),
        clock.clone(),
    ));
    let attempt = |ip: &str, user: &str| {
        login(ip).with_header(
            http::HeaderName::from_static("x-login-user"),
            http::HeaderValue::from_str(user).unwrap(),
        )
    };
    for user in ["a", "b", "c", "a", "b", "d", "e"] {
        assert_eq!(
            report(&anomalies, &attempt("192.0.2.50", user), 401).await,
            []
        );
    }
    let detected = report(&anomalies, &attempt("192.0.2.50", "f"), 401).await;
    assert_eq!(detected.len(), 1);
    assert_eq!(detected[0].observed, 6);
    let v = engine.decide(&attempt("192.0.2.50", "g")).await;
    assert_eq!(v.action, Action::Delay(Duration::from_secs(2)));
    assert_eq!(v.flags, [Arc::<str>::from("anomaly stuffing")]);
    let other = engine.decide(&attempt("192.0.2.51", "a")).await;
    assert_eq!(other.action, Action::Allow);
    assert!(other.flags.is_empty());
    clock.advance(Duration::from_secs(600));
    let v = engine.decide(&attempt("192.0.2.50", "h")).await;
    assert_eq!(v.action, Action::Allow, "the tarpit ended");
    assert_eq!(v.flags.len(), 1, "the flag lasts an hour");
}

/// Through the layer: the application's 401s are counted without the response waiting, and
/// the eleventh login is refused with 403 and `Retry-After`.
#[tokio::test]
async fn the_layer_counts_the_applications_statuses() {
    use tower::ServiceExt;
    let engine = Arc::new(Engine::new(plan(BRUTE_FORCE), MemoryStore::new()));
    let app = axum::Router::new()
        .route(
            "/login",
            axum::routing::post(|| async { StatusCode::UNAUTHORIZED }),
        )
        .layer(tollgate::RateLimitLayer::new(Arc::clone(&engine)));
    let send = || {
        let request = http::Request::builder()
            .method("POST")
            .uri("/login")
            .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [203, 0, 113, 77],
                4000,
            ))))
            .body(axum::body::Body::empty())
            .unwrap();
        app.clone().oneshot(request)
    };
    for _ in 0..10 {
        assert_eq!(send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    // The responses did not wait for the counting: let the background tasks finish.
    for _ in 0..10_000 {
        if !engine.runtime_lists().entries().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let refused = send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((899..=900).contains(&retry), "{retry}");
}

/// `POST /v1/report`: an application behind the decision API reports its statuses; the
/// tenth failure is detected and answered, and `/v1/check` then refuses the address.
#[test]
fn the_decision_api_takes_reports() {
    let server = support::InProcess::start(BRUTE_FORCE, Default::default());
    let body = serde_json::json!({
        "request": { "method": "POST", "path": "/login", "client_ip": "203.0.113.20" },
        "status": 401,
    });
    for n in 0..9 {
        let reply = server.send("POST", "/v1/report", &[], body.to_string().as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
        support::assert_conforms(&reply, "ReportResponse");
        assert_eq!(reply.json()["watched"], 1, "{n}");
        assert_eq!(reply.json()["detected"], serde_json::json!([]), "{n}");
    }
    let reply = server.send("POST", "/v1/report", &[], body.to_string().as_bytes());
    support::assert_conforms(&reply, "ReportResponse");
    let detected = &reply.json()["detected"][0];
    assert_eq!(detected["anomaly"], "login_bruteforce");
    assert_eq!(detected["ban_seconds"], 900);
    assert_eq!(detected["alerts"], serde_json::json!(["security"]));
    let check = server.check(&body["request"]);
    assert_eq!(check.json()["action"], "forbid");
    assert_eq!(check.json()["status"], 403);
    assert!(check.json()["retry_after"].as_u64().unwrap() >= 899);
}
