#![expect(
    missing_docs,
    reason = "criterion_group! and criterion_main! generate undocumented items"
)]
//! The tower layer's own cost: one request through an axum router, bare and behind
//! `RateLimitLayer` (three limits matching, never reached), with no network in between.
//!
//! `cargo bench --bench layer`. Figures in `docs/performance.md`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use tower::{Service, ServiceExt};

/// The allocator of the `tollgate` binary and the load-test app, so that the figures are the
/// server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POLICY: &str = include_str!("three_limits.rl");

fn request() -> Request<Body> {
    let mut r = Request::get("/api/v1/items/42")
        .body(Body::empty())
        .unwrap();
    r.extensions_mut().insert(ConnectInfo::<SocketAddr>(
        "203.0.113.9:4000".parse().unwrap(),
    ));
    r
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hello = Router::new().route("/api/v1/items/{id}", get(|| async { "hello" }));
    let plan =
        tollgate::compile(&tollgate::PolicySet::from_sources([("bench.rl", POLICY)])).unwrap();
    let engine = Arc::new(tollgate::Engine::new(
        plan,
        tollgate::store::MemoryStore::new(),
    ));
    let limited = hello.clone().layer(tollgate::RateLimitLayer::new(engine));
    let mut group = c.benchmark_group("router");
    for (name, app) in [("bare", hello), ("rate_limit_layer", limited)] {
        let mut service = app.into_service::<Body>();
        let response = rt.block_on(service.ready()).unwrap().call(request());
        assert_eq!(rt.block_on(response).unwrap().status(), 200);
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    service
                        .ready()
                        .await
                        .unwrap()
                        .call(request())
                        .await
                        .unwrap()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
