//! A header that chooses a tier or names a client is a claim: believed from a trusted proxy
//! (or a decision API caller that says its gateway set it), not from the client itself,
//! unless the policy marks it `trusted` — through the tower layer and `/v1/check`.

mod support;

use std::sync::Arc;

use axum::Router;
use serde_json::json;
use support::InProcess;
use tollgate::identity::Identifier;
use tollgate::middleware::HttpOptions;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RateLimitLayer, compile};
use tower::ServiceExt;

const POLICY: &str = r#"
tiers plans { from header("X-Plan"); default free;
  tier free { api = 1/min; } tier pro extends free { api = 100/min; } }
tiers groups { from header("X-Group") trusted; default solo;
  tier solo { shared = 1/min; } tier team extends solo { shared = 100/min; } }
limit api { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate plans.api; }
limit shared { match { route ANY "/shared/**"; } key ip; algorithm fixed_window; rate groups.shared; }
"#;

fn options() -> HttpOptions {
    HttpOptions {
        identifier: Identifier::new().with_trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()]),
        ..HttpOptions::default()
    }
}

#[tokio::test]
async fn through_the_layer_a_plan_header_counts_only_from_the_gateway() {
    let plan = compile(&PolicySet::from_sources([("test.rl", POLICY)])).unwrap();
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    let app = Router::new()
        .fallback(|| async { "ok" })
        .layer(RateLimitLayer::new(engine).with_options(options()));
    let call = |path: &str, peer: &str, headers: &[(&str, &str)]| {
        app.clone()
            .oneshot(support::from_peer("GET", path, peer, headers))
    };
    // A client claiming `pro` on its own: the free tier, one request a minute.
    let direct = [("X-Plan", "pro")];
    let first = call("/api/a", "203.0.113.5", &direct).await.unwrap();
    assert_eq!(first.headers()["x-ratelimit-limit"], "1");
    assert_eq!(
        call("/api/a", "203.0.113.5", &direct)
            .await
            .unwrap()
            .status(),
        429
    );
    // The same claim set by the gateway (a trusted proxy) for its client: `pro`.
    let via_gateway = [("X-Plan", "pro"), ("X-Forwarded-For", "203.0.113.6")];
    let reply = call("/api/a", "10.0.0.2", &via_gateway).await.unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["x-ratelimit-limit"], "100");
    // A header the policy marks `trusted` counts from anyone.
    let reply = call("/shared/a", "203.0.113.5", &[("X-Group", "team")])
        .await
        .unwrap();
    assert_eq!(reply.headers()["x-ratelimit-limit"], "100");
}

#[test]
fn through_the_decision_api_the_caller_says_whether_its_gateway_set_the_headers() {
    let server = InProcess::start(POLICY, options());
    let limit = |trusted: Option<bool>| {
        let mut body = json!({ "method": "GET", "path": "/api/x", "client_ip": "198.51.100.4",
                               "headers": { "X-Plan": "pro" } });
        if let Some(t) = trusted {
            body["trusted_headers"] = json!(t);
        }
        server.check(&body).json()["limit"].clone()
    };
    assert_eq!(
        limit(None),
        1,
        "by default the described headers are the client's"
    );
    assert_eq!(limit(Some(false)), 1);
    assert_eq!(limit(Some(true)), 100);
}
