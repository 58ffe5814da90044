//! An adaptive concurrency limit protecting a real upstream through Tollgate's reverse proxy,
//! on the system clock. The upstream (in this file) takes 5 ms, plus 1 ms per request in
//! flight above 20, and answers 503 at once past 50 in flight. 200 clients send through the
//! proxy, each again 1 ms after an answer and 50 ms after a refusal or a failure.
//!
//! One run measures, side by side: one client (the unloaded latency), 200 clients without a
//! limit, 200 clients with `algorithm adaptive_concurrency` (the default gradient method);
//! then the upstream struggles for 2 s (20 ms at best, slower past 5 in flight, failing past
//! 15) and recovers, and the time the limit takes to come back is measured. Bounds are
//! asserted, never speeds; the figures are printed (`--nocapture`) and recorded in
//! docs/performance.md from the release build (`scripts/bench-adaptive.sh`).
//!
//! `ADAPTIVE_SECONDS` sets each phase's length (3 s by default; half of it is measured);
//! `ADAPTIVE_SCALE` multiplies the upstream's latencies (4 by default: 20 ms, plus 4 ms per
//! request above 20, so that a debug build's own CPU time is not what is measured on a
//! two-core machine; the benchmark runs the release build at 1, the upstream as stated);
//! `ADAPTIVE_TUNING` adds tuning to the limit's `adaptive gradient` block.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate::middleware::HttpOptions;
use tollgate::store::MemoryStore;
use tollgate::{Clock, Engine, PolicySet, SystemClock, Timestamp, compile};

fn now() -> Timestamp {
    SystemClock.now()
}

const CLIENTS: usize = 200;
/// How long a client waits after a refusal or a failure before it sends again.
const BACK_OFF_MS: u64 = 50;

const ADAPTIVE: &str = r#"
limit upstream {
  match { route ANY "/api/**"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive gradient { initial 10; min 2; max 200; }
  admission { window 5s; }
}
"#;

const NO_LIMIT: &str = r#"
limit elsewhere {
  match { route ANY "/elsewhere"; }
  rate 1/s;
}
"#;

/// The simulated upstream's state.
struct Upstream {
    in_flight: AtomicU64,
    struggling: AtomicBool,
    /// Multiplies every latency.
    scale: u64,
}

async fn answer(State(up): State<Arc<Upstream>>) -> StatusCode {
    let n = up.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let (base, knee, capacity) = if up.struggling.load(Ordering::Relaxed) {
        (20, 5, 15)
    } else {
        (5, 20, 50)
    };
    let status = if n > capacity {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        let ms = up.scale * (base + n.saturating_sub(knee));
        tokio::time::sleep(Duration::from_millis(ms)).await;
        StatusCode::OK
    };
    up.in_flight.fetch_sub(1, Ordering::SeqCst);
    status
}

/// The proxy in front of `upstream`, with metrics.
async fn proxy(
    policy: &str,
    upstream: SocketAddr,
) -> (
    SocketAddr,
    Arc<Engine<MemoryStore>>,
    tollgate::server::Observers<MemoryStore>,
) {
    let plan = compile(&PolicySet::from_sources([("adaptive.rl", policy)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let observers = tollgate::server::Observers::new(&engine, Some(metrics), None);
    let state = Arc::new(tollgate::server::AppState {
        upstream: Some(tollgate::proxy::Upstream::new(
            format!("http://{upstream}").parse().unwrap(),
        )),
        ..tollgate::server::AppState::new(
            Arc::clone(&engine),
            observers.clone(),
            HttpOptions::default(),
        )
    });
    (
        support::serve_router(tollgate::server::router(state)).await,
        engine,
        observers,
    )
}

/// What a phase measured over its second half.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    /// Upstream successes per second.
    goodput: f64,
    /// Upstream failures per second.
    failures: f64,
    /// Tollgate's refusals per second.
    refused: f64,
    /// The 99th percentile latency of the successes, ms.
    p99_ms: f64,
}

/// `clients` closed-loop clients through `addr` for `length`.
async fn load(addr: SocketAddr, clients: usize, length: Duration) -> Measured {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build(connector);
    let start = now();
    let measure_from = start.saturating_add(length / 2);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed, mut refused, mut latencies) =
                    (0u64, 0u64, 0u64, Vec::new());
                while now().saturating_since(start) < length {
                    let sent = now();
                    let request = Request::get(format!("http://{addr}/api/orders"))
                        .body(Empty::new())
                        .unwrap();
                    let status = match client.request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            status
                        }
                        Err(_) => StatusCode::BAD_GATEWAY,
                    };
                    let took = now().saturating_since(sent);
                    let counted = sent >= measure_from;
                    let wait = match status {
                        StatusCode::OK => {
                            if counted {
                                ok += 1;
                                latencies.push(took.as_micros() as u64);
                            }
                            1
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            refused += u64::from(counted);
                            BACK_OFF_MS
                        }
                        _ => {
                            failed += u64::from(counted);
                            BACK_OFF_MS
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                (ok, failed, refused, latencies)
            })
        })
        .collect();
    let (mut ok, mut failed, mut refused, mut latencies) = (0, 0, 0, Vec::new());
    for task in tasks {
        let (o, f, r, l) = task.await.unwrap();
        (ok, failed, refused) = (ok + o, failed + f, refused + r);
        latencies.extend(l);
    }
    let seconds = (length - length / 2).as_secs_f64();
    Measured {
        goodput: ok as f64 / seconds,
        failures: failed as f64 / seconds,
        refused: refused as f64 / seconds,
        p99_ms: support::p99_ms(&mut latencies),
    }
}

fn lowest_limit(engine: &Engine<MemoryStore>) -> Option<u32> {
    engine.adaptive_summary().first().and_then(|s| s.lowest)
}

#[test]
fn an_adaptive_limit_protects_an_overloaded_upstream_through_the_proxy() {
    let seconds: u64 = std::env::var("ADAPTIVE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let length = Duration::from_secs(seconds);
    let scale: u64 = std::env::var("ADAPTIVE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let up = Arc::new(Upstream {
            in_flight: AtomicU64::new(0),
            struggling: AtomicBool::new(false),
            scale,
        });
        let upstream = support::serve_router(
            axum::Router::new()
                .route("/api/orders", axum::routing::get(answer))
                .with_state(Arc::clone(&up)),
        )
        .await;
        let (plain, _, _) = proxy(NO_LIMIT, upstream).await;
        let unloaded = load(plain, 1, length).await;
        let without = load(plain, CLIENTS, length).await;
        let policy = match std::env::var("ADAPTIVE_TUNING") {
            Ok(t) => ADAPTIVE.replace("max 200;", &format!("max 200; {t}")),
            Err(_) => ADAPTIVE.to_owned(),
        };
        let (guarded, engine, observers) = proxy(&policy, upstream).await;
        let with = load(guarded, CLIENTS, length).await;
        let settled = lowest_limit(&engine).expect("the limit is kept");
        println!("upstream latencies × {scale}");
        println!("unloaded: {unloaded:?}\nwithout a limit: {without:?}\nadaptive: {with:?}, limit {settled}");

        // Where it stands, in /metrics.
        let response = tollgate::server::metrics_response(&engine, &observers, None);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        let line = text
            .lines()
            .find(|l| l.starts_with("tollgate_adaptive_limit{"))
            .expect("tollgate_adaptive_limit is exported");
        assert!(line.contains(r#"limit="upstream""#) && line.contains(r#"namespace="adaptive""#), "{line}");

        // The upstream struggles for a while, then recovers, under the same load.
        let struggle = tokio::spawn({
            let up = Arc::clone(&up);
            async move {
                tokio::time::sleep(length / 3).await;
                up.struggling.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(2)).await;
                up.struggling.store(false, Ordering::Relaxed);
            }
        });
        let recovery = tokio::spawn({
            let engine = Arc::clone(&engine);
            async move {
                let mut lowest_seen = u32::MAX;
                let mut recovered = None;
                let started = now();
                let (mut struggled_at, mut healthy_since) = (None, None);
                while now().saturating_since(started)
                    < length / 3 + Duration::from_secs(2) + Duration::from_secs(5)
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let limit = lowest_limit(&engine).unwrap_or(0);
                    let t = now().saturating_since(started);
                    if t >= length / 3 && t < length / 3 + Duration::from_secs(2) {
                        lowest_seen = lowest_seen.min(limit);
                        struggled_at.get_or_insert(t);
                    } else if t >= length / 3 + Duration::from_secs(2) {
                        let since = *healthy_since.get_or_insert(t);
                        if recovered.is_none() && limit >= settled * 8 / 10 {
                            recovered = Some(t - since);
                        }
                    }
                }
                (lowest_seen, recovered)
            }
        });
        let during = load(guarded, CLIENTS, length / 3 + Duration::from_secs(7)).await;
        struggle.await.unwrap();
        let (struggling_limit, recovered) = recovery.await.unwrap();
        println!("struggling: lowest limit {struggling_limit}; back to 80 % of {settled} after {recovered:?}; that phase: {during:?}");

        assert!((10..=45).contains(&settled), "settled near the knee (20 to 25): {settled}");
        assert_eq!(without.refused, 0.0, "nothing limits the plain proxy");
        assert!(with.refused > 0.0, "the adaptive limit refuses what the upstream cannot take");
        assert!(with.goodput > without.goodput, "goodput {} vs {} without a limit", with.goodput, without.goodput);
        assert!(
            with.failures < without.failures / 10.0,
            "the upstream fails far less: {} vs {} per second",
            with.failures,
            without.failures
        );
        assert!(with.p99_ms < without.p99_ms, "p99 {} vs {} without a limit", with.p99_ms, without.p99_ms);
        assert!(struggling_limit < settled, "it came down while the upstream struggled: {struggling_limit}");
        let recovered = recovered.expect("the limit came back once the upstream recovered");
        assert!(recovered <= Duration::from_secs(3), "recovered in {recovered:?}");
    });
}
