//! The three apps `scripts/bench-http.sh` compares: a bare axum hello, the same behind
//! `tower_governor`, and the same behind Tollgate's `RateLimitLayer` (memory store, three
//! limits matching every request, never reached).
//!
//! `cargo run --release --example bench_app -- MODE PORT` with MODE `bare`, `governor` or
//! `tollgate`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;

/// The same allocator as the `tollgate` binary, for all three apps alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POLICY: &str = include_str!("../benches/three_limits.rl");

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
        "tollgate" => {
            let plan =
                tollgate::compile(&tollgate::PolicySet::from_sources([("bench.rl", POLICY)]))
                    .expect("valid policy");
            let engine = Arc::new(tollgate::Engine::new(
                plan,
                tollgate::store::MemoryStore::new(),
            ));
            // `BENCH_HEADERS=none` sends no rate-limit headers (as tower_governor by default).
            let send = std::env::var("BENCH_HEADERS").map_or(true, |v| v != "none");
            let options = tollgate::middleware::HttpOptions {
                headers: tollgate::response::HeaderFamilies {
                    legacy: send,
                    ietf: send,
                },
                ..Default::default()
            };
            hello.layer(tollgate::RateLimitLayer::new(engine).with_options(options))
        }
        other => {
            eprintln!("unknown mode `{other}`: bare, governor or tollgate");
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
