#![expect(
    missing_docs,
    reason = "criterion_group! and criterion_main! generate undocumented items"
)]
//! A Cedar-conditioned decision with 50 generated policies (`tests/support/cedar_gen.rs`):
//! `Engine::decide` with the answer cache off (cold: every question evaluated, on the
//! policies sliced for its action) and on (warm), beside Cedar's unsliced evaluation of the
//! same question, and the same engine without the Cedar condition; and cold with roles from
//! the requests' claims.
//!
//! `cargo bench --bench cedar`. Figures and the machine are in `docs/performance.md`.

use std::time::Duration;

#[path = "support/ready.rs"]
mod ready;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use ready::ready;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RequestCtx, compile};

#[path = "../tests/support/cedar_gen.rs"]
mod cedar_gen;

fn requests() -> Vec<RequestCtx> {
    (0..100)
        .map(|u| {
            RequestCtx::new(Method::GET, &format!("/api/v1/res{}/42", u % 10))
                .with_client_ip("203.0.113.9".parse().unwrap())
                .with_user_id(format!("u{u}"))
        })
        .collect()
}

fn cedar(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    cedar_gen::write(dir.path(), 50);
    let plan = || compile(&PolicySet::load(&[dir.path()])).expect("the generated set compiles");
    let requests = requests();
    let mut group = c.benchmark_group("cedar_50_policies");

    let cold = Engine::new(
        plan().with_cedar_cache(1, Duration::ZERO),
        MemoryStore::new(),
    );
    let permitted = requests
        .iter()
        .filter(|r| ready(cold.decide(r)).reports.len() == 1)
        .count();
    assert!(
        permitted > 10 && permitted < 100,
        "the condition must hold for some users only: {permitted}"
    );
    let mut i = 0;
    group.bench_function("decide_cache_cold", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            ready(cold.decide(&requests[i]))
        })
    });

    // The same users with a role from their token's claims (`parents Role from
    // claim("roles")`): each question evaluates over a copy of the entities with the
    // principal's parents added.
    let with_roles: Vec<RequestCtx> = requests
        .iter()
        .enumerate()
        .map(|(u, r)| r.clone().with_claim("roles", format!("r{}", u % 7)))
        .collect();
    group.bench_function("decide_cache_cold_roles_from_claims", |b| {
        b.iter(|| {
            i = (i + 1) % with_roles.len();
            ready(cold.decide(&with_roles[i]))
        })
    });

    let warm = Engine::new(plan(), MemoryStore::new());
    group.bench_function("decide_cache_warm", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            ready(warm.decide(&requests[i]))
        })
    });

    let unsliced = plan();
    let set = &unsliced.cedar()[0];
    let hasher = tollgate::plan::KeyHasher::random();
    group.bench_function("cedar_unsliced_question", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            let request = &requests[i];
            let principal = set.principal(request, &hasher);
            let question = tollgate::authz::Question {
                principal: &principal,
                action: "read",
                resource: "/api/v1/res0/{id}",
                tier: None,
            };
            set.decide_unsliced(&question, request)
        })
    });

    let plain = compile(&PolicySet::from_sources([(
        "plain.rl",
        r#"limit reads { match { route GET "/api/v1/**"; } key user_id; algorithm fixed_window; rate 1000000/s; }"#,
    )]))
    .unwrap();
    let plain = Engine::new(plain, MemoryStore::new());
    group.bench_function("decide_without_cedar", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            ready(plain.decide(&requests[i]))
        })
    });
    group.finish();
}

criterion_group!(benches, cedar);
criterion_main!(benches);
