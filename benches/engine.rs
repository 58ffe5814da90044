#![expect(
    missing_docs,
    reason = "criterion_group! and criterion_main! generate undocumented items"
)]
//! `Engine::decide` on the memory store: one request that three limits apply to.
//!
//! `cargo bench --bench engine`. Figures and the machine are in `docs/performance.md`.

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
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

fn request() -> RequestCtx {
    RequestCtx::new(Method::GET, "/api/v1/items/42")
        .with_client_ip("203.0.113.9".parse().unwrap())
        .try_header("X-Client-Id", "client-7")
        .unwrap()
}

/// Drives a future that completes without waiting (the memory store never waits), without
/// a runtime, so that the figure is `decide` itself.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
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

/// `rt.block_on(f)` reads like a runtime, but polls once.
struct Rt;

impl Rt {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        ready(future)
    }
}

criterion_group!(benches, decide);
criterion_main!(benches);
