//! Spellings of one path that an application server resolves to the same resource are
//! limited as that resource, through every way of running Tollgate: the tower layer, the
//! decision API, forward-auth (Traefik and nginx headers) and the reverse proxy, which
//! forwards the path it limited. Paths that cannot be normalized safely are refused.

mod support;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use http::Request;
use serde_json::json;
use support::{InProcess, TestApp, TestServer, send};
use tollgate::identity::Identifier;
use tollgate::middleware::HttpOptions;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RateLimitLayer, compile};
use tower::ServiceExt;

/// The shipped login limit's shape: a small quota, then a ban.
const POLICY: &str = r#"
limit login {
  match { route POST "/auth/login"; }
  key ip;
  algorithm fixed_window;
  rate 1/min;
  on_exceed reject 429 reason "too many login attempts" ban 15min;
}
limit proxied {
  match { route POST "/echo/auth/login"; }
  key ip;
  algorithm fixed_window;
  rate 1/min;
}
"#;

/// Ways of writing `/auth/login` that servers resolve to it.
const VARIANTS: &[&str] = &[
    "//auth/login",
    "/auth//login",
    "/auth/./login",
    "/auth/x/../login",
    "/auth/%6cogin",
    "/%61uth/login",
    "/auth/login/.",
    "/auth/login/",
    "/auth/%2e/login",
    "/auth/x/%2E%2E/login",
    "/./auth/login",
];

/// Paths that no server agrees on: refused with 400.
const UNSAFE: &[&str] = &[
    "/auth%2Flogin",
    "/auth%2flogin",
    "/auth%5Clogin",
    "/auth%00/login",
    "/auth/login%",
];

fn trusted() -> HttpOptions {
    HttpOptions {
        identifier: Identifier::new().with_trusted_proxies(vec!["127.0.0.0/8".parse().unwrap()]),
        ..HttpOptions::default()
    }
}

#[tokio::test]
async fn the_layer_limits_every_spelling_and_hands_the_app_the_canonical_path() {
    let plan = compile(&PolicySet::from_sources([("test.rl", POLICY)])).unwrap();
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    // The application echoes the path it was given.
    let app = Router::new()
        .fallback(|request: Request<Body>| async move { request.uri().to_string() })
        .layer(RateLimitLayer::new(engine));
    let call = |path: &str, peer: &str| {
        app.clone()
            .oneshot(support::from_peer("POST", path, peer, &[]))
    };
    let first = call("/auth/login", "192.0.2.1").await.unwrap();
    assert_eq!(first.status(), 200);
    for variant in VARIANTS {
        let reply = call(variant, "192.0.2.1").await.unwrap();
        assert_eq!(reply.status(), 429, "{variant} went through");
    }
    // Each spelling, from a client of its own, reaches the app as `/auth/login`.
    for (i, variant) in VARIANTS.iter().enumerate() {
        let reply = call(
            &format!("{variant}?next=%2F"),
            &format!("192.0.2.{}", 10 + i),
        )
        .await
        .unwrap();
        assert_eq!(reply.status(), 200, "{variant}");
        let seen = to_bytes(reply.into_body(), 1024).await.unwrap();
        let seen = String::from_utf8_lossy(&seen);
        assert!(
            seen == "/auth/login?next=%2F" || seen == "/auth/login/?next=%2F",
            "{variant} reached the app as {seen}"
        );
    }
    for path in UNSAFE {
        let reply = call(path, "192.0.2.200").await.unwrap();
        assert_eq!(reply.status(), 400, "{path}");
        assert_eq!(
            reply.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
}

#[test]
fn the_decision_api_limits_every_spelling() {
    let server = InProcess::start(POLICY, trusted());
    let check = |path: &str| {
        let body = json!({ "method": "POST", "path": path, "client_ip": "198.51.100.7" });
        server.check(&body)
    };
    assert_eq!(check("/auth/login").json()["allowed"], true);
    for variant in VARIANTS {
        let reply = check(variant).json();
        assert_eq!(reply["allowed"], false, "{variant}: {reply}");
        assert_eq!(reply["policy"], "login", "{variant}");
    }
    for path in UNSAFE {
        let reply = check(path);
        assert_eq!(reply.status, 400, "{path}");
        assert_eq!(reply.json()["field"], "path", "{path}");
    }
}

#[test]
fn forward_auth_limits_every_spelling_in_both_flavours() {
    let server = InProcess::start(POLICY, trusted());
    let traefik = |uri: &str| {
        server.send(
            "GET",
            "/v1/auth",
            &[
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Uri", uri),
                ("X-Forwarded-For", "203.0.113.1"),
            ],
            b"",
        )
    };
    let nginx = |uri: &str| {
        server.send(
            "GET",
            "/v1/auth",
            &[
                ("X-Original-Method", "POST"),
                ("X-Original-URI", uri),
                ("X-Forwarded-For", "203.0.113.2"),
            ],
            b"",
        )
    };
    assert_eq!(traefik("/auth/login").status, 200);
    assert_eq!(nginx("/auth/login?next=/").status, 200);
    for variant in VARIANTS {
        assert_eq!(traefik(variant).status, 429, "traefik {variant}");
        let refused = nginx(&format!("{variant}?next=/"));
        assert_eq!(refused.status, 403, "nginx {variant}");
        assert_eq!(refused.header("x-tollgate-status"), Some("429"));
    }
    for path in UNSAFE {
        assert_eq!(traefik(path).status, 400, "{path}");
    }
}

#[test]
fn the_proxy_limits_every_spelling_and_forwards_the_canonical_path() {
    let app = TestApp::start();
    let proxy = TestServer::start_proxy(POLICY, app.addr);
    let first = send(proxy.addr, "POST", "/echo/auth/login", &[], b"");
    assert_eq!(first.status, 200, "{}", first.text());
    for variant in VARIANTS {
        let path = format!("/echo{variant}");
        let reply = send(proxy.addr, "POST", &path, &[], b"");
        assert_eq!(reply.status, 429, "{path}: {}", reply.text());
    }
    // Unlimited spellings of another resource reach the app in canonical form.
    let reply = send(proxy.addr, "GET", "/echo//a/./b/../%63?x=%2F", &[], b"");
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().starts_with("GET /echo/a/c?x=%2F "),
        "{}",
        reply.text()
    );
    for path in UNSAFE {
        let reply = send(proxy.addr, "POST", &format!("/echo{path}"), &[], b"");
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
    }
}
