#![expect(
    missing_docs,
    reason = "criterion_group! and criterion_main! generate undocumented items"
)]
//! The tower layer's own cost: one request through an axum router, bare and behind
//! `RateLimitLayer` (three limits matching, never reached), with no network in between; and
//! with every decision exported (three rows a request) to a stand-in ClickHouse that takes
//! every insert, its batching and inserting done on another thread (as on a server's other
//! core): what the request path pays is the difference.
//!
//! `cargo bench --bench layer`. Figures in `docs/performance.md`.

#[path = "support/sink.rs"]
mod sink;

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
    // Requests run on this thread (`block_on`); the exporter's task and the stand-in
    // ClickHouse on the runtime's one worker, as they would on another core of a server.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
    let sink = rt.block_on(sink::insert_sink());
    let exporter = rt.block_on(async {
        tollgate::analytics::export::Exporter::start(
            sink::sink_client(sink),
            tollgate::analytics::export::ExportSettings::default(),
        )
        .unwrap()
    });
    let plan =
        tollgate::compile(&tollgate::PolicySet::from_sources([("bench.rl", POLICY)])).unwrap();
    let engine = Arc::new(tollgate::Engine::new(
        plan,
        tollgate::store::MemoryStore::new(),
    ));
    let exporting = tollgate::analytics::export::Exporting::new(
        exporter.clone(),
        "bench",
        engine.key_hasher().clone(),
    );
    let observers = tollgate::observers::Observers::new(&engine, None, Some(exporting));
    let exported = hello
        .clone()
        .layer(tollgate::RateLimitLayer::from_pipeline(Arc::new(
            observers.pipeline(engine),
        )));
    let mut group = c.benchmark_group("router");
    for (name, app) in [
        ("bare", hello),
        ("rate_limit_layer", limited),
        ("rate_limit_layer_exporting", exported),
    ] {
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
    rt.block_on(exporter.flush());
    let stats = exporter.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // Every row went out: the figure is the whole export's, not a queue dropping rows.
    assert_eq!(load(&stats.dropped), 0, "rows dropped");
    assert!(load(&stats.sent) >= 3, "rows sent");
}

criterion_group!(benches, layer);
criterion_main!(benches);
