#![expect(
    missing_docs,
    reason = "criterion_group! and criterion_main! generate undocumented items"
)]
//! `Engine::decide` on the memory store: one request that three limits apply to; how
//! matching scales with the plan: 10 to 100,000 routes, 10 to 100,000 listed addresses; and
//! new keys into the memory store below its cap and at it.
//!
//! `cargo bench --bench engine`. Figures and the machine are in `docs/performance.md`.

#[path = "support/ready.rs"]
mod ready;
#[path = "support/sink.rs"]
mod sink;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::Method;
use ready::ready;
use tollgate::pipeline::Pipeline;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RequestCtx, compile};

const THREE_LIMITS: &str = include_str!("three_limits.rl");

const ALWAYS_OVER: &str = r#"
limit tiny { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate 1/day; }
"#;

fn engine(policy: &str) -> Engine<MemoryStore> {
    let plan = compile(&PolicySet::from_sources([("bench.rl", policy)])).expect("valid policy");
    Engine::new(plan, MemoryStore::new())
}

/// A pipeline around an engine for `policy`, with `observers` attached.
fn pipeline(
    policy: &str,
    observers: Vec<std::sync::Arc<dyn tollgate::pipeline::Observer>>,
) -> std::sync::Arc<Pipeline<MemoryStore>> {
    let mut pipeline = Pipeline::new(std::sync::Arc::new(engine(policy)));
    for observer in observers {
        pipeline = pipeline.observe(observer);
    }
    std::sync::Arc::new(pipeline)
}

/// One request through `pipeline`'s two phases: admitted, then completed with 200.
fn admit(rt: &Rt, pipeline: &std::sync::Arc<Pipeline<MemoryStore>>, req: &RequestCtx) {
    let admission = rt.block_on(pipeline.admit(req, "req-1".to_owned(), None));
    assert!(admission.verdict.is_allowed());
    admission.complete(200);
}

fn request() -> RequestCtx {
    RequestCtx::new(Method::GET, "/api/v1/items/42")
        .with_client_ip("203.0.113.9".parse().unwrap())
        .try_header("X-Client-Id", "client-7")
        .unwrap()
}

fn decide(c: &mut Criterion) {
    let rt = Rt;
    let mut group = c.benchmark_group("decide");

    let allow = engine(THREE_LIMITS);
    let req = request();
    let v = rt.block_on(allow.decide(&req));
    assert!(
        v.is_allowed() && v.reports.len() == 3,
        "three limits must apply: {v:?}"
    );
    group.bench_function("three_limits_allowed", |b| {
        b.iter(|| rt.block_on(allow.decide(&req)))
    });

    // The same through the pipeline, without observers: the admission and completion
    // phases' own cost (span, refusal, completion).
    let bare = pipeline(THREE_LIMITS, Vec::new());
    group.bench_function("three_limits_allowed_pipeline", |b| {
        b.iter(|| admit(&rt, &bare, &req))
    });

    // The same with every decision counted for Prometheus (what `tollgate serve` does).
    let metrics = std::sync::Arc::new(tollgate::metrics::Metrics::new());
    let counted = pipeline(THREE_LIMITS, vec![metrics]);
    group.bench_function("three_limits_allowed_with_metrics", |b| {
        b.iter(|| admit(&rt, &counted, &req))
    });

    // The same, each decision then exported (three rows): what the request path pays, the
    // rows being made and inserted by the exporter's task on another thread, into a
    // stand-in ClickHouse that takes every insert.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let exporter = {
        let _inside = background.enter();
        let sink = background.block_on(sink::insert_sink());
        tollgate::analytics::export::Exporter::start(
            sink::sink_client(sink),
            tollgate::analytics::export::ExportSettings::default(),
        )
        .unwrap()
    };
    let exporting = pipeline(
        THREE_LIMITS,
        vec![std::sync::Arc::new(
            tollgate::analytics::export::Exporting::new(
                exporter.clone(),
                "bench",
                tollgate::plan::KeyHasher::random(),
            ),
        )],
    );
    // One decision before the measurement (which a filter may skip): its rows go out.
    admit(&rt, &exporting, &req);
    group.bench_function("three_limits_allowed_exporting", |b| {
        b.iter(|| admit(&rt, &exporting, &req))
    });
    background.block_on(exporter.flush());
    // At this rate (three rows a microsecond and a half) the exporter's one thread cannot
    // keep up, and the queue drops what does not fit: see what it
    // sustains (`examples/export_throughput.rs`). The figure above is the request path's cost either way.
    let sent = exporter
        .stats()
        .sent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent >= 3, "rows went out");

    let reject = engine(ALWAYS_OVER);
    rt.block_on(reject.decide(&req));
    assert!(!rt.block_on(reject.decide(&req)).is_allowed());
    group.bench_function("one_limit_rejected", |b| {
        b.iter(|| rt.block_on(reject.decide(&req)))
    });

    let none = engine(THREE_LIMITS);
    let miss =
        RequestCtx::new(Method::GET, "/health").with_client_ip("203.0.113.9".parse().unwrap());
    group.bench_function("no_limit_applies", |b| {
        b.iter(|| rt.block_on(none.decide(&miss)))
    });
    group.finish();
}

/// One request that 1, 3 or 10 limits apply to (fixed windows on `/api/**`, each its own
/// counter), in a plan of 10 limits: how a decision grows with the limits it counts.
fn limits_per_request(c: &mut Criterion) {
    let rt = Rt;
    let mut group = c.benchmark_group("limits_per_request");
    for n in [1usize, 3, 10] {
        let policy: String = (0..10)
            .map(|i| {
                let route = if i < n { "/api/**" } else { "/other/**" };
                format!(
                    "limit l{i} {{ match {{ route ANY \"{route}\"; }} key ip; \
                     algorithm fixed_window; rate 1_000_000_000/s; }}\n"
                )
            })
            .collect();
        let engine = engine(&policy);
        let request = request();
        let v = rt.block_on(engine.decide(&request));
        assert!(
            v.is_allowed() && v.reports.len() == n,
            "{n} limits apply: {v:?}"
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| rt.block_on(engine.decide(&request)))
        });
    }
    group.finish();
}

/// Plan sizes for the matching benchmarks. Unoptimized builds (the benchmarks run once as
/// tests) stop at 10,000: compiling 100,000 limits there takes long for nothing.
fn sizes() -> &'static [usize] {
    if cfg!(debug_assertions) {
        &[10, 1_000, 10_000]
    } else {
        &[10, 1_000, 10_000, 100_000]
    }
}

/// `n` limits on distinct routes (`GET /rN/items/{id}`), a request that one of them matches.
fn routes(c: &mut Criterion) {
    let rt = Rt;
    let mut group = c.benchmark_group("match_routes");
    for &n in sizes() {
        let policy: String = (0..n)
            .map(|i| {
                format!(
                    "limit l{i} {{ match {{ route GET \"/r{i}/items/{{id}}\"; }} key ip; \
                     algorithm fixed_window; rate 1_000_000_000/s; }}\n"
                )
            })
            .collect();
        let engine = engine(&policy);
        let request = RequestCtx::new(Method::GET, &format!("/r{}/items/7", n / 2))
            .with_client_ip("203.0.113.9".parse().unwrap());
        let v = rt.block_on(engine.decide(&request));
        assert_eq!(v.reports.len(), 1, "exactly one limit applies");
        assert_eq!(&*v.reports[0].limit, format!("l{}", n / 2));
        group.bench_with_input(BenchmarkId::from_parameter(n), &request, |b, r| {
            b.iter(|| rt.block_on(engine.decide(r)))
        });
    }
    group.finish();
}

/// A denylist of `n` addresses, a request from an address that is not on it (the whole list
/// is consulted), and one limit that applies.
fn ip_lists(c: &mut Criterion) {
    let rt = Rt;
    let mut group = c.benchmark_group("match_ip_list");
    for &n in sizes() {
        let addresses: Vec<String> = (0..n as u32)
            .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i * 7).to_string())
            .collect();
        let policy = format!(
            "denylist feed {{ ip in [{}]; }}\n\
             limit api {{ match {{ route GET \"/api/**\"; }} key ip; algorithm fixed_window; \
             rate 1_000_000_000/s; }}\n",
            addresses.join(", ")
        );
        let engine = engine(&policy);
        let listed = RequestCtx::new(Method::GET, "/api/x")
            .with_client_ip(addresses[n / 2].parse().unwrap());
        assert!(!rt.block_on(engine.decide(&listed)).is_allowed());
        let request =
            RequestCtx::new(Method::GET, "/api/x").with_client_ip("203.0.113.9".parse().unwrap());
        assert!(rt.block_on(engine.decide(&request)).is_allowed());
        group.bench_with_input(BenchmarkId::from_parameter(n), &request, |b, r| {
            b.iter(|| rt.block_on(engine.decide(r)))
        });
    }
    group.finish();
}

/// New keys into the memory store: half full, and full (every insert evicts a sampled key).
/// Both start from a store filled untimed, so the figures compare the inserts alone.
fn memory_cap(c: &mut Criterion) {
    use std::num::NonZeroU64;
    use tollgate::Timestamp;
    use tollgate::limiter::{LeaseId, Quota, WindowQuota};
    use tollgate::store::Op;

    let quota = Quota::SlidingWindow(WindowQuota {
        limit: NonZeroU64::new(100).unwrap(),
        window: NonZeroU64::new(60_000_000).unwrap(),
    });
    let now = Timestamp::from_secs(1_700_000_000);
    let key = |i: u64| format!("api:{{ip:{}}}:search", std::net::Ipv4Addr::from(i as u32));
    let insert = |store: &MemoryStore, key: &str| {
        let op = Op {
            key,
            quota,
            cost: 1,
            enforce: true,
            ban: None,
            lease: LeaseId(0),
            sync: None,
            global: None,
        };
        store.apply_now(&[op], now);
    };
    let cap: u64 = if cfg!(debug_assertions) {
        64_000
    } else {
        1_000_000
    };
    let mut group = c.benchmark_group("memory_store_insert");
    group.sample_size(10);
    for (name, full) in [("below_cap", false), ("at_cap", true)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Below the cap: room for every new key; at it: filled to the cap first.
                let store = if full {
                    MemoryStore::with_max_keys(cap as usize)
                } else {
                    MemoryStore::with_max_keys((cap + 2 * iters) as usize)
                };
                for i in 0..cap.min(if full { cap * 2 } else { cap / 2 }) {
                    insert(&store, &key(i));
                }
                let fresh: Vec<String> = (0..iters).map(|i| key(cap * 2 + i)).collect();
                #[expect(
                    clippy::disallowed_methods,
                    reason = "criterion's iter_custom measures wall time"
                )]
                let start = std::time::Instant::now();
                for k in &fresh {
                    insert(&store, k);
                }
                let elapsed = start.elapsed();
                assert!(!full || store.evictions() > 0, "at the cap, inserts evict");
                elapsed
            })
        });
    }
    group.finish();
}

/// `rt.block_on(f)` reads like a runtime, but polls once.
struct Rt;

impl Rt {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        ready(future)
    }
}

/// What an adaptive limit costs a request against a fixed limit on the same route and key,
/// both through the pipeline's two phases (admitted, then completed with 200: the adaptive
/// limit's slot taken, then given back with what it learnt).
fn adaptive(c: &mut Criterion) {
    const WINDOW: &str = r#"
limit upstream { match { route ANY "/api/**"; } key global; algorithm fixed_window; rate 1_000_000_000/day; }
"#;
    const ADAPTIVE: &str = r#"
limit upstream { match { route ANY "/api/**"; } key global; algorithm adaptive_concurrency; }
"#;
    const BOTH: &str = r#"
limit upstream {
  match { route ANY "/api/**"; } key global; algorithm adaptive_concurrency;
  admission { }
}
"#;
    let rt = Rt;
    let req = request();
    let mut group = c.benchmark_group("adaptive");
    for (name, policy) in [
        ("fixed_window", WINDOW),
        ("adaptive_gradient", ADAPTIVE),
        ("adaptive_gradient_and_admission", BOTH),
    ] {
        let p = pipeline(policy, Vec::new());
        group.bench_function(name, |b| b.iter(|| admit(&rt, &p, &req)));
    }
    group.finish();
}

criterion_group!(
    benches,
    decide,
    adaptive,
    limits_per_request,
    routes,
    ip_lists,
    memory_cap
);
criterion_main!(benches);
