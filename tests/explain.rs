//! `explain` and the engine share one selection stage: for every example request, the limits
//! `explain` says apply, with their keys and tiers, are exactly those the engine counts.

use std::sync::Arc;

use http::Method;
use tollgate::plan::KeyHasher;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RequestCtx, compile};

/// The shipped policies and the cases the explain and missing-key tests use, with requests
/// that exercise routes, tiers (believed and not), identity chains, missing keys and lists.
fn cases() -> Vec<(PolicySet, Vec<RequestCtx>)> {
    let ip = |r: RequestCtx, ip: &str| r.with_client_ip(ip.parse().unwrap());
    let shipped = vec![
        ip(RequestCtx::new(Method::POST, "/auth/login"), "203.0.113.9"),
        ip(
            RequestCtx::new(Method::GET, "/api/v1/orders/7"),
            "203.0.113.9",
        )
        .try_header("X-Plan", "pro")
        .unwrap(),
        ip(
            RequestCtx::new(Method::GET, "/api/v1/orders/7"),
            "203.0.113.9",
        )
        .try_header("X-Plan", "pro")
        .unwrap()
        .with_trusted_headers(),
        ip(
            RequestCtx::new(Method::GET, "/api/search?q=x"),
            "198.51.100.1",
        )
        .try_header("X-Tenant-Id", "acme")
        .unwrap()
        .with_user_id("alice"),
        ip(RequestCtx::new(Method::POST, "/api/v1/exports"), "10.1.2.3"),
        ip(RequestCtx::new(Method::GET, "/api/x"), "198.51.100.2")
            .try_header("User-Agent", "sqlmap/1.7")
            .unwrap(),
        RequestCtx::new(Method::GET, "/api/v1/items/1"),
        ip(RequestCtx::new(Method::GET, "/health"), "198.51.100.3"),
    ];
    let missing = PolicySet::from_sources([(
        "missing.rl",
        r#"limit per_user { match { route ANY "/api/**"; } key user_id; rate 2/min; }
           limit optional { match { route ANY "/api/**"; } key user_id; rate 2/min; on_missing_key skip; }
           limit strict { match { route ANY "/strict/**"; } key user_id; rate 2/min; on_missing_key refuse; }
           limit stream { match { route ANY "/api/**"; } rate 10/s; counts messages; }
           limit off { match { route ANY "/api/**"; } rate 1/s; mode off; }"#,
    )]);
    let missing_requests = vec![
        ip(RequestCtx::new(Method::GET, "/api/a"), "192.0.2.1"),
        ip(RequestCtx::new(Method::GET, "/api/a"), "192.0.2.1").with_user_id("bob"),
        ip(RequestCtx::new(Method::GET, "/strict/a"), "192.0.2.1"),
        RequestCtx::new(Method::GET, "/api/a"),
    ];
    vec![
        (PolicySet::load(&["policies"]), shipped),
        (missing, missing_requests),
    ]
}

#[tokio::test]
async fn explain_lists_exactly_the_limits_the_engine_counts() {
    let hasher = KeyHasher::new([7; 32]);
    let mut compared = 0;
    for (set, requests) in cases() {
        let plan = compile(&set).unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
        let explained_plan = compile(&set).unwrap();
        let engine =
            Arc::new(Engine::new(plan, MemoryStore::new()).with_key_hasher(hasher.clone()));
        for request in requests {
            let explanation = tollgate::explain::explain(&explained_plan, &request, &hasher);
            let verdict = engine.decide(&request).await;
            let mut explained: Vec<(String, String)> =
                if explanation.safelisted.is_some() || explanation.denylisted.is_some() {
                    Vec::new()
                } else {
                    explanation
                        .limits
                        .iter()
                        .filter(|l| l.applies)
                        .map(|l| (l.name.to_string(), l.key.clone().unwrap_or_default()))
                        .collect()
                };
            let mut counted: Vec<(String, String)> = verdict
                .reports
                .iter()
                .map(|r| (r.limit.to_string(), r.key.to_string()))
                .collect();
            explained.sort();
            counted.sort();
            assert_eq!(
                explained, counted,
                "{} {}: explain and the engine disagree\n{explanation}",
                request.method, request.path
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 12);
}
