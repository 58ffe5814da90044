//! How many decision rows a second the exporter sustains: decisions of three rows (the
//! `three_limits.rl` benchmark policy) queued as fast as the queue takes them, timed until
//! the last is inserted.
//!
//! ```sh
//! cargo run --release --example export_throughput                           # a stand-in that takes every insert
//! cargo run --release --example export_throughput -- http://127.0.0.1:8123  # a real ClickHouse (migrated here)
//! ```
//!
//! Figures in `docs/performance.md`.

#[path = "../benches/support/sink.rs"]
mod sink;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tollgate::analytics::export::{ExportSettings, Exporter};

/// The allocator of the `tollgate` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DECISIONS: usize = 200_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let client = match std::env::args().nth(1) {
        Some(url) => sink::migrated_client(&url).await,
        None => sink::sink_client(sink::insert_sink().await),
    };
    let exporter = Exporter::start(
        client,
        ExportSettings {
            queue_rows: DECISIONS + 1,
            ..Default::default()
        },
    )
    .unwrap();
    let policy = include_str!("../benches/three_limits.rl");
    let plan = tollgate::compile(&tollgate::PolicySet::from_sources([("bench.rl", policy)]))
        .expect("the benchmark policy compiles");
    let engine = Arc::new(tollgate::Engine::new(
        plan,
        tollgate::store::MemoryStore::new(),
    ));
    let exporting = tollgate::analytics::export::Exporting::new(
        exporter.clone(),
        "bench",
        engine.key_hasher().clone(),
    );
    let request = tollgate::RequestCtx::new(http::Method::GET, "/api/v1/items/42")
        .with_client_ip("203.0.113.9".parse().unwrap())
        .try_header("X-Client-Id", "client-7")
        .unwrap();
    let verdict = engine.decide(&request).await;
    #[expect(
        clippy::disallowed_methods,
        reason = "a throughput figure is wall time"
    )]
    let start = std::time::Instant::now();
    use tollgate::pipeline::{Admitted, Done, Ended, Observer};
    let done = Done {
        status: 200,
        latency: std::time::Duration::ZERO,
        ended: Ended::Answered,
        usage: Vec::new(),
    };
    for n in 0..DECISIONS {
        let admitted = Admitted {
            verdict: &verdict,
            request: &request,
            request_id: &format!("req-{n}"),
            status: 200,
            now: engine.now(),
        };
        if let Some(rows) = exporting.admitted(&admitted) {
            rows.completed(&done);
        }
    }
    let queued = start.elapsed();
    exporter.flush().await;
    let took = start.elapsed();
    let stats = exporter.stats();
    let sent = stats.sent.load(Ordering::Relaxed);
    println!(
        "{sent} rows in {:.2} s: {:.0} rows/s (queued in {:.3} s; dropped {}, failed inserts {})",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        queued.as_secs_f64(),
        stats.dropped.load(Ordering::Relaxed),
        stats.failures.load(Ordering::Relaxed),
    );
}
