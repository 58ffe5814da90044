//! Requests one at a time through an axum router, for instruction counts under callgrind
//! (deterministic, unlike wall-clock figures on a shared VM): `bare`, behind
//! `RateLimitLayer` on the memory store (`memory`), or on the Redis store at
//! `BENCH_REDIS_URL` (`redis`; a `rediss://` URL trusts the CA in `BENCH_REDIS_CA`, a PEM
//! file), with the three limits of `benches/three_limits.rl`.
//!
//! ```sh
//! cargo build --release --example profile_requests
//! valgrind --tool=callgrind target/release/examples/profile_requests memory 1000
//! valgrind --tool=callgrind target/release/examples/profile_requests memory 3000
//! # instructions per request = (second total - first total) / 2000
//! ```
//!
//! Figures in `docs/performance.md`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use http::Request;
use tower::{Service, ServiceExt};

/// The allocator of the `tollgate` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POLICY: &str = include_str!("../benches/three_limits.rl");

fn request() -> Request<Body> {
    let mut r = Request::get("/api/v1/items/42")
        .header("host", "api.example.com")
        .body(Body::empty())
        .expect("a valid request");
    r.extensions_mut()
        .insert(ConnectInfo::<SocketAddr>(SocketAddr::from((
            [203, 0, 113, 9],
            4000,
        ))));
    r
}

fn layered<S: tollgate::store::ServedStore>(hello: Router, store: S) -> Router {
    let plan = tollgate::compile(&tollgate::PolicySet::from_sources([("bench.rl", POLICY)]))
        .expect("a valid policy");
    hello.layer(tollgate::RateLimitLayer::new(Arc::new(
        tollgate::Engine::new(plan, store),
    )))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "memory".into());
    let count: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let hello = Router::new().route("/api/v1/items/{id}", get(|| async { "hello" }));
    let app = match mode.as_str() {
        "bare" => hello,
        "memory" => layered(hello, tollgate::store::MemoryStore::new()),
        "redis" => {
            let url = std::env::var("BENCH_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let tls =
                std::env::var("BENCH_REDIS_CA")
                    .ok()
                    .map(|ca| tollgate::store::redis::RedisTls {
                        ca_pem: Some(std::fs::read(ca).expect("BENCH_REDIS_CA is readable")),
                        client: None,
                    });
            let options = tollgate::store::redis::RedisOptions {
                timeout: std::time::Duration::from_secs(1),
                tls,
                ..Default::default()
            };
            let store = rt
                .block_on(tollgate::store::redis::RedisStore::connect_with(
                    &url, options,
                ))
                .expect("Redis answers");
            layered(hello, store)
        }
        other => {
            eprintln!("unknown mode `{other}`: bare, memory or redis");
            std::process::exit(2);
        }
    };
    let mut service = app.into_service::<Body>();
    // A hundred first, so that both counts include the same warm-up.
    for _ in 0..100 + count {
        let response = rt.block_on(async {
            let ready = service.ready().await.expect("the router is ready");
            ready.call(request()).await.expect("the router answers")
        });
        assert_eq!(response.status(), 200, "every request is allowed");
        // A limit whose store failed (and fails open) sends no figures: this makes sure the
        // requests were counted, not waved through.
        assert!(
            mode == "bare" || response.headers().contains_key("x-ratelimit-remaining"),
            "every request is counted (is the store answering?)"
        );
    }
}
