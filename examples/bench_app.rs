//! The apps the load scripts compare.
//!
//! `scripts/bench-http.sh`: a bare axum hello (`bare`), the same behind `tower_governor`
//! (`governor`), and the same behind Tollgate's `RateLimitLayer` (`tollgate`: memory store,
//! three limits matching every request, never reached).
//!
//! `scripts/bench-redis.sh`, against the Redis at `BENCH_REDIS_URL`: `standin`, the hello
//! with one `EVALSHA` of a fixed-window script per request (what a minimal Redis limiter
//! does); `tollgate-redis`, Tollgate on the Redis store with the same three limits;
//! `tollgate-redis-exceeded`, the same with a limit every request exceeds (the local deny
//! cache answers); `tollgate-redis-one`, Tollgate with the stand-in's one fixed window;
//! `tollgate-redis-ten`, ten limits matching; `tollgate-redis-unbatched`, `tollgate-redis`
//! with every request its own call (`redis_batch_max = 1`); `tollgate-redis-local`, three
//! local-first limits (`benches/three_limits_local.rl`), and `tollgate-local-memory`, the same
//! policy on the memory store (like for like).
//!
//! `tollgate-export`: `tollgate` with every decision exported to the ClickHouse at
//! `BENCH_CLICKHOUSE_URL` (migrated first), or, without it, to an in-process stand-in that
//! takes every insert (what Tollgate itself pays); `BENCH_SAMPLE_ALLOWS` samples admissions.
//!
//! `cargo run --release --example bench_app -- MODE PORT`.

#[path = "../benches/support/sink.rs"]
mod sink;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;

/// The same allocator as the `tollgate` binary, for all three apps alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POLICY: &str = include_str!("../benches/three_limits.rl");
const EXCEEDED: &str = include_str!("../benches/exceeded.rl");
const ONE_LIMIT: &str = include_str!("../benches/one_limit.rl");
const TEN_LIMITS: &str = include_str!("../benches/ten_limits.rl");
const LOCAL_FIRST: &str = include_str!("../benches/three_limits_local.rl");

/// The stand-in's script: a fixed window of 1,000,000,000 per second per client.
const STANDIN: &str = r"
local c = redis.call('INCR', KEYS[1])
if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return c
";

fn redis_url() -> String {
    std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn tollgate_layer<S: tollgate::store::ServedStore>(
    policy: &str,
    store: S,
) -> tollgate::RateLimitLayer<S> {
    tollgate_layer_with(policy, store, None)
}

fn tollgate_layer_with<S: tollgate::store::ServedStore>(
    policy: &str,
    store: S,
    exporter: Option<tollgate::analytics::export::Exporter>,
) -> tollgate::RateLimitLayer<S> {
    let plan = tollgate::compile(&tollgate::PolicySet::from_sources([("bench.rl", policy)]))
        .expect("valid policy");
    let engine = Arc::new(tollgate::Engine::new(plan, store));
    let exporting = exporter.map(|exporter| {
        tollgate::analytics::export::Exporting::new(exporter, "bench", engine.key_hasher().clone())
    });
    let observers = tollgate::observers::Observers::new(&engine, None, exporting);
    let pipeline = Arc::new(observers.pipeline(engine));
    // `BENCH_HEADERS=none` sends no rate-limit headers (as tower_governor by default).
    let send = std::env::var("BENCH_HEADERS").map_or(true, |v| v != "none");
    // `BENCH_TRUST_LOCAL=1` believes headers from 127.0.0.1 (a trusted proxy): keys may
    // then come from `X-Client-Id` (`CLIENTS=N scripts/bench-redis.sh`).
    let mut identifier = tollgate::identity::Identifier::new();
    if std::env::var("BENCH_TRUST_LOCAL").is_ok_and(|v| v == "1") {
        identifier =
            identifier.with_trusted_proxies(vec!["127.0.0.0/8".parse().expect("a network")]);
    }
    let options = tollgate::middleware::HttpOptions {
        headers: tollgate::response::HeaderFamilies {
            legacy: send,
            ietf: send,
        },
        identifier,
    };
    tollgate::RateLimitLayer::from_pipeline(pipeline).with_options(options)
}

async fn redis_store() -> tollgate::store::redis::RedisStore {
    redis_store_with(tollgate::store::redis::RedisOptions::default().batch_max).await
}

/// The Redis store with at most `batch_max` requests per call (1: no batching).
async fn redis_store_with(batch_max: usize) -> tollgate::store::redis::RedisStore {
    let options = tollgate::store::redis::RedisOptions {
        timeout: std::time::Duration::from_secs(1),
        connect_timeout: std::time::Duration::from_secs(1),
        batch_max,
        ..Default::default()
    };
    tollgate::store::redis::RedisStore::connect_with(&redis_url(), options)
        .await
        .expect("Redis answers")
}

/// An exporter to `BENCH_CLICKHOUSE_URL`, or to a stand-in that takes every insert.
async fn exporter() -> tollgate::analytics::export::Exporter {
    let client = match std::env::var("BENCH_CLICKHOUSE_URL") {
        Ok(url) => sink::migrated_client(&url).await,
        Err(_) => sink::sink_client(sink::insert_sink_apart()),
    };
    // `BENCH_SAMPLE_ALLOWS=0.1` exports a tenth of the admitted requests.
    let sample_allows = std::env::var("BENCH_SAMPLE_ALLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let settings = tollgate::analytics::export::ExportSettings {
        sample_allows,
        ..Default::default()
    };
    tollgate::analytics::export::Exporter::start(client, settings).expect("no spool to open")
}

/// One `EVALSHA` per request, keyed by client address and second.
async fn standin(
    axum::extract::State(connection): axum::extract::State<redis::aio::MultiplexedConnection>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(STANDIN));
    let second = tollgate::clock::Clock::now(&tollgate::SystemClock).as_micros() / 1_000_000;
    let key = format!("standin:{{{}}}:{second}", peer.ip());
    let mut connection = connection;
    let count: redis::RedisResult<u64> = SCRIPT
        .key(key)
        .arg(1000)
        .invoke_async(&mut connection)
        .await;
    match count {
        Ok(c) if c <= 1_000_000_000 => "hello".into_response(),
        Ok(_) => http::StatusCode::TOO_MANY_REQUESTS.into_response(),
        Err(_) => http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "bare".into());
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let hello = Router::new().route("/api/v1/items/{id}", get(|| async { "hello" }));
    let app = match mode.as_str() {
        "bare" => hello,
        "governor" => {
            let config = tower_governor::governor::GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(u32::MAX)
                .finish()
                .expect("a valid governor config");
            hello.layer(tower_governor::GovernorLayer::new(Arc::new(config)))
        }
        "tollgate" => hello.layer(tollgate_layer(POLICY, tollgate::store::MemoryStore::new())),
        "tollgate-export" => hello.layer(tollgate_layer_with(
            POLICY,
            tollgate::store::MemoryStore::new(),
            Some(exporter().await),
        )),
        "tollgate-redis" => hello.layer(tollgate_layer(POLICY, redis_store().await)),
        "tollgate-redis-exceeded" => hello.layer(tollgate_layer(EXCEEDED, redis_store().await)),
        "tollgate-redis-one" => hello.layer(tollgate_layer(ONE_LIMIT, redis_store().await)),
        "tollgate-redis-ten" => hello.layer(tollgate_layer(TEN_LIMITS, redis_store().await)),
        "tollgate-redis-unbatched" => {
            hello.layer(tollgate_layer(POLICY, redis_store_with(1).await))
        }
        "tollgate-redis-local" => hello.layer(tollgate_layer(LOCAL_FIRST, redis_store().await)),
        "tollgate-local-memory" => hello.layer(tollgate_layer(
            LOCAL_FIRST,
            tollgate::store::MemoryStore::new(),
        )),
        "standin" => {
            let client = redis::Client::open(redis_url()).expect("a Redis URL");
            let connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis answers");
            Router::new()
                .route("/api/v1/items/{id}", get(standin))
                .with_state(connection)
        }
        other => {
            eprintln!(
                "unknown mode `{other}`: bare, governor, tollgate, tollgate-export, standin, tollgate-redis, tollgate-redis-exceeded, tollgate-redis-one, tollgate-redis-ten, tollgate-redis-unbatched, tollgate-redis-local or tollgate-local-memory"
            );
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    .expect("serve");
}
