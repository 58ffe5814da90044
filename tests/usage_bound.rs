//! The stated bound of usage limits, measured. An OpenAI-compatible upstream (in this file)
//! answers each chat completion as an event stream whose last chunk says a usage between 10
//! and 2,000 tokens (one in eight streams is cut before it says anything). 64 clients at once
//! go through two `tollgate serve --upstream` nodes sharing one store — memory, Redis, a
//! Redis Cluster, local-first on Redis — with one limit of 100,000 tokens a minute, until
//! refused. The clock stands still: everything happens in one window.
//!
//! Checked: what the window counts in the end is exactly what the responses used, a cut
//! stream counting its reservation (nothing lost, nothing counted twice); with `reserve` at
//! the maximum usage the window never passes its quota; with `reserve` at the mean it passes
//! it by at most the sum of (used − reserved) over the requests in flight — here at most 64
//! × (2,000 − 1,005). The figures are printed (`--nocapture`) for docs/deployment.md.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use support::redis::{Cluster, Redis};
use tollgate::limiter::State;
use tollgate::middleware::HttpOptions;
use tollgate::store::redis::{RedisOptions, RedisStore};
use tollgate::store::{MemoryStore, ServedStore};
use tollgate::{Engine, ManualClock, PolicySet, Timestamp, compile};

const QUOTA: u64 = 100_000;
const MIN_USAGE: u64 = 10;
const MAX_USAGE: u64 = 2_000;
const MEAN_USAGE: u64 = (MIN_USAGE + MAX_USAGE) / 2;
const CLIENTS: usize = 64;
/// A minute boundary: the window starts with the test.
const START: u64 = 1_700_006_400;

fn policy(reserve: u64, local_first: bool) -> String {
    let sync = if local_first { "sync every 50ms;" } else { "" };
    format!(
        r#"
limit tokens {{
  match {{ route POST "/v1/chat/completions"; }}
  key global;
  algorithm fixed_window;
  rate {QUOTA}/min;
  cost response json("usage.total_tokens") max {MAX_USAGE};
  reserve {reserve};
  {sync}
}}
"#
    )
}

/// The upstream: an event stream whose last chunk says the usage the client asked for
/// (`x-usage`), or (`x-cut`) a stream cut after its first chunk.
async fn completions(headers: HeaderMap) -> Response<Body> {
    let usage: u64 = headers
        .get("x-usage")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let first = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n";
    let chunks: Vec<Result<Bytes, std::io::Error>> = if headers.contains_key("x-cut") {
        vec![
            Ok(Bytes::from(first)),
            Err(std::io::Error::other("the stream is cut")),
        ]
    } else {
        let last = format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{},\"total_tokens\":{usage}}}}}\n\n",
            usage.saturating_sub(1)
        );
        vec![
            Ok(Bytes::from(first)),
            Ok(Bytes::from(last)),
            Ok(Bytes::from("data: [DONE]\n\n")),
        ]
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// A `tollgate serve --upstream` node on `store`, at the standing `clock`.
async fn node<S: ServedStore>(
    policy: &str,
    store: S,
    clock: &ManualClock,
    upstream: SocketAddr,
) -> (SocketAddr, Arc<Engine<S, ManualClock>>) {
    let plan = compile(&PolicySet::from_sources([("usage.rl", policy)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let engine = Arc::new(
        Engine::with_clock(plan, store, clock.clone())
            .with_key_hasher(tollgate::plan::KeyHasher::new([7; 32])),
    );
    let observers = tollgate::server::Observers::new(&engine, None, None);
    let state = Arc::new(tollgate::server::AppState {
        upstream: Some(tollgate::proxy::Upstream::new(
            format!("http://{upstream}").parse().unwrap(),
        )),
        ..tollgate::server::AppState::new(Arc::clone(&engine), observers, HttpOptions::default())
    });
    (
        support::serve_router(tollgate::server::router(state)).await,
        engine,
    )
}

/// What one run measured.
#[derive(Debug, Default)]
struct Run {
    /// Requests admitted, and of those the streams cut (cut upstream, before or after the
    /// proxy sent the first chunk on).
    admitted: u64,
    cut: u64,
    /// What the admitted requests used (a cut stream: its reservation).
    charged: u64,
    /// The largest sum of (used − reserved) over the requests in flight at once, where
    /// positive: the overspend the stated bound allows.
    bound: u64,
}

/// 64 clients, half on each node, each sending until refused.
async fn drive(nodes: [SocketAddr; 2], reserve: u64) -> Run {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS)
        .build_http();
    // The positive (used − reserved) of each request in flight, summed.
    let in_flight = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let worst = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = client.clone();
            let (in_flight, worst) = (Arc::clone(&in_flight), Arc::clone(&worst));
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
                let mut run = Run::default();
                for n in 0u64.. {
                    let usage = rng.random_range(MIN_USAGE..=MAX_USAGE);
                    let cut = (n + c as u64) % 8 == 7;
                    // A cut stream counts its reservation: nothing over.
                    let over = if cut {
                        0
                    } else {
                        usage.saturating_sub(reserve)
                    };
                    let now = in_flight.fetch_add(over, SeqCst) + over;
                    worst.fetch_max(now, SeqCst);
                    let mut request =
                        Request::post(format!("http://{}/v1/chat/completions", nodes[c % 2]))
                            .header(header::CONTENT_TYPE, "application/json")
                            .header("x-usage", usage.to_string());
                    if cut {
                        request = request.header("x-cut", "1");
                    }
                    let request = request
                        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
                        .unwrap();
                    let response = client.request(request).await.expect("the node answers");
                    let status = response.status();
                    let body = response.into_body().collect().await;
                    in_flight.fetch_sub(over, SeqCst);
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        break;
                    }
                    run.admitted += 1;
                    if cut {
                        // Cut before its first chunk left the upstream, the proxy answers
                        // 502; after, the client gets the stream cut. Either way the
                        // response never said: the reservation counts.
                        assert!(
                            status == StatusCode::BAD_GATEWAY
                                || (status == StatusCode::OK && body.is_err()),
                            "{status}"
                        );
                        run.cut += 1;
                        run.charged += reserve;
                    } else {
                        assert_eq!(status, StatusCode::OK);
                        let text = body.expect("the stream").to_bytes();
                        let text = String::from_utf8_lossy(&text);
                        assert!(
                            text.contains(&format!("\"total_tokens\":{usage}")),
                            "{text}"
                        );
                        run.charged += usage;
                    }
                }
                run
            })
        })
        .collect();
    let mut total = Run::default();
    for task in tasks {
        let run = task.await.unwrap();
        total.admitted += run.admitted;
        total.cut += run.cut;
        total.charged += run.charged;
    }
    total.bound = worst.load(std::sync::atomic::Ordering::SeqCst);
    total
}

/// What the window counts for the limit, read through `engine`'s store.
async fn counted<S: ServedStore>(engine: &Engine<S, ManualClock>) -> u64 {
    let request = tollgate::RequestCtx::new(http::Method::POST, "/v1/chat/completions");
    let explanation = tollgate::explain::explain(&engine.plan(), &request, engine.key_hasher());
    let key = explanation.limits[0].key.clone().expect("a key");
    match engine
        .store()
        .inspect(&key, engine.now())
        .await
        .unwrap()
        .state
    {
        Some(State::Window(w)) => w.count,
        None => 0,
        Some(other) => panic!("{other:?}"),
    }
}

/// Runs both reservations on stores made by `stores`, checks and prints them.
async fn measure<S: ServedStore>(
    name: &str,
    local_first: bool,
    mut stores: impl AsyncFnMut() -> (S, S),
    sync: impl AsyncFn(&Engine<S, ManualClock>, &Engine<S, ManualClock>),
) {
    let upstream = support::serve_router(
        axum::Router::new().route("/v1/chat/completions", axum::routing::post(completions)),
    )
    .await;
    for (run, reserve) in [MAX_USAGE, MEAN_USAGE].into_iter().enumerate() {
        // Each run in a window of its own, later than the one before.
        let clock = ManualClock::new(Timestamp::from_secs(START + 60 * run as u64));
        let (a, b) = stores().await;
        let policy = policy(reserve, local_first);
        let (a_addr, a) = node(&policy, a, &clock, upstream).await;
        let (b_addr, b) = node(&policy, b, &clock, upstream).await;
        let measured = drive([a_addr, b_addr], reserve).await;
        // Settlements go on after the last byte reached the client: wait for them to land
        // (a wait for an effect, bounded, not a timing test).
        let mut window = 0;
        for _ in 0..500 {
            sync(&a, &b).await;
            window = counted(&a).await;
            if window == measured.charged {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let over = window.saturating_sub(QUOTA);
        println!(
            "{name:<12} reserve {reserve:>5}: {admitted:>3} admitted ({cut} cut), window counts \
             {window:>6} of {QUOTA} ({pct:.1} %), over by {over}, bound {bound} (in flight at \
             most {CLIENTS} × {most})",
            admitted = measured.admitted,
            cut = measured.cut,
            pct = window as f64 * 100.0 / QUOTA as f64,
            bound = measured.bound,
            most = MAX_USAGE.saturating_sub(reserve),
        );
        assert_eq!(
            window, measured.charged,
            "{name}: the window counts what the responses used, cut streams at their reservation"
        );
        assert!(measured.admitted > 40, "{name}: {measured:?}");
        if reserve >= MAX_USAGE && !local_first {
            assert!(
                window <= QUOTA,
                "{name}: reservations at the maximum never go over"
            );
        }
        let allowed = if local_first {
            // Local-first adds what the other node admitted since its last sync (see
            // docs/deployment.md): here the clock stands still while the clients go as
            // fast as they can, so within one interval a node may admit up to the whole
            // quota alone — never more, as it counts its own admissions.
            measured.bound + QUOTA
        } else {
            measured.bound
        };
        assert!(
            over <= allowed,
            "{name}: over by {over}, the bound allows {allowed}"
        );
        assert!(measured.bound <= CLIENTS as u64 * MAX_USAGE.saturating_sub(reserve));
    }
}

fn redis_options() -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    }
}

async fn redis_pair(url: &str) -> (RedisStore, RedisStore) {
    let connect = async || {
        RedisStore::connect_with(url, redis_options())
            .await
            .expect("the store connects")
    };
    (connect().await, connect().await)
}

async fn no_sync<S: ServedStore>(_: &Engine<S, ManualClock>, _: &Engine<S, ManualClock>) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_shared_by_two_nodes() {
    measure(
        "memory",
        false,
        async || {
            let store = Arc::new(MemoryStore::new());
            (Arc::clone(&store), store)
        },
        no_sync,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_redis() {
    let Some(server) = Redis::start() else {
        return;
    };
    let url = server.url();
    measure("redis", false, async || redis_pair(&url).await, no_sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_cluster() {
    let Some(cluster) = Cluster::start(3, 0) else {
        return;
    };
    let url = cluster.url();
    measure("cluster", false, async || redis_pair(&url).await, no_sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_first_nodes_on_redis() {
    let Some(server) = Redis::start() else {
        return;
    };
    let url = server.url();
    measure(
        "local-first",
        true,
        async || redis_pair(&url).await,
        async |a: &Engine<RedisStore, ManualClock>, b: &Engine<RedisStore, ManualClock>| {
            a.store().sync_now().await.unwrap();
            b.store().sync_now().await.unwrap();
        },
    )
    .await;
}
