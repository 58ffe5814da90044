//! The tower middleware on an axum router, driven with `oneshot`: headers, the problem body,
//! soft thresholds on paused time, concurrency leases, the per-route helper, identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use http::{Request, Response, StatusCode};
use tollgate::identity::Identifier;
use tollgate::middleware::{HttpOptions, limit};
use tollgate::store::MemoryStore;
use tollgate::{Engine, ManualClock, PolicySet, RateLimitLayer, Timestamp, compile};
use tower::ServiceExt;

type TestEngine = Engine<MemoryStore, ManualClock>;

fn engine(policy: &str) -> (Arc<TestEngine>, ManualClock) {
    let plan = compile(&PolicySet::from_sources([("test.rl", policy)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let clock = ManualClock::new(Timestamp::from_secs(1_700_006_400));
    (
        Arc::new(Engine::with_clock(plan, MemoryStore::new(), clock.clone())),
        clock,
    )
}

fn app(engine: &Arc<TestEngine>) -> Router {
    Router::new()
        .route("/api/items/{id}", get(|| async { "item" }))
        .route("/export", get(|| async { "a large export" }))
        .route("/auth/login", post(|| async { "welcome" }))
        .layer(RateLimitLayer::new(Arc::clone(engine)))
}

fn request(method: &str, uri: &str, peer: &str) -> Request<Body> {
    let mut r = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
    r.extensions_mut().insert(ConnectInfo(addr));
    r
}

fn header<'a>(response: &'a Response<Body>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no `{name}`"))
}

async fn call(app: &Router, request: Request<Body>) -> Response<Body> {
    app.clone().oneshot(request).await.unwrap()
}

async fn status(app: &Router, request: Request<Body>) -> StatusCode {
    call(app, request).await.status()
}

async fn json(response: Response<Body>) -> serde_json::Value {
    serde_json::from_slice(&to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap()
}

#[tokio::test]
async fn allowed_responses_carry_rate_limit_headers() {
    let (engine, _) = engine(
        r#"limit api { match { route GET "/api/**"; } algorithm fixed_window; rate 10/min; }
           limit wide { match { route GET "/api/**"; } algorithm fixed_window; rate 100/min; }"#,
    );
    let response = app(&engine)
        .oneshot(request("GET", "/api/items/1", "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The most restrictive limit is the one reported.
    assert_eq!(header(&response, "x-ratelimit-limit"), "10");
    assert_eq!(header(&response, "x-ratelimit-remaining"), "9");
    assert_eq!(header(&response, "x-ratelimit-reset"), "60");
    assert_eq!(header(&response, "ratelimit-policy"), "\"api\";q=10;w=60");
    assert_eq!(header(&response, "ratelimit"), "\"api\";r=9;t=60");
    assert_eq!(header(&response, "x-request-id").len(), 32);
    // Unlimited paths get no rate-limit headers.
    let response = app(&engine)
        .oneshot(request("POST", "/auth/login", "203.0.113.9"))
        .await
        .unwrap();
    assert!(response.headers().get("x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn rejections_are_problem_json_with_retry_after() {
    let (engine, clock) = engine(
        r#"limit api { match { route GET "/api/**"; } algorithm fixed_window; rate 1/min;
           on_exceed reject 429 reason "slow down"; }"#,
    );
    let app = app(&engine);
    call(&app, request("GET", "/api/items/1", "203.0.113.9")).await;
    clock.advance(Duration::from_secs(20));
    let mut r = request("GET", "/api/items/2", "203.0.113.9");
    r.headers_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    let response = app.oneshot(r).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&response, "content-type"),
        "application/problem+json"
    );
    assert_eq!(header(&response, "retry-after"), "40");
    assert_eq!(header(&response, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&response, "x-request-id"), "abc-123");
    let body = json(response).await;
    assert_eq!(body["type"], "urn:tollgate:problem:rate-limited");
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(body["status"], 429);
    assert_eq!(body["detail"], "slow down");
    assert_eq!(body["policy"], "api");
    assert_eq!(body["limit"], 1);
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["reset"], 40);
    assert_eq!(body["retry_after"], 40);
    assert_eq!(body["reason"], "slow down");
    assert_eq!(body["request_id"], "abc-123");
}

#[tokio::test]
async fn denylisted_requests_get_403_and_never_reach_the_app() {
    let (engine, _) = engine(
        r#"limit api { match { route GET "/api/**"; } rate 10/min; }
           denylist bots { user_agent ~= "(?i)sqlmap"; respond 403 reason "no scanners"; }"#,
    );
    let mut r = request("GET", "/api/items/1", "203.0.113.9");
    r.headers_mut()
        .insert("user-agent", "sqlmap/1.7".parse().unwrap());
    let response = app(&engine).oneshot(r).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body = json(response).await;
    assert_eq!(body["type"], "urn:tollgate:problem:forbidden");
    assert_eq!(body["policy"], "bots");
    assert_eq!(body["detail"], "no scanners");
}

#[tokio::test]
async fn soft_warn_adds_a_header() {
    let (engine, _) = engine(
        r#"limit api { match { route GET "/api/**"; } algorithm fixed_window; rate 4/min; soft warn at 50%; }"#,
    );
    let app = app(&engine);
    let first = call(&app, request("GET", "/api/items/1", "203.0.113.9")).await;
    assert!(first.headers().get("tollgate-warning").is_none());
    let second = app
        .oneshot(request("GET", "/api/items/1", "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(header(&second, "tollgate-warning"), "\"api\";used=50");
}

#[tokio::test(start_paused = true)]
#[expect(
    clippy::disallowed_methods,
    reason = "measures paused tokio time, not the wall clock"
)]
async fn soft_delay_holds_the_request_on_the_timer() {
    let (engine, _) = engine(
        r#"limit api { match { route GET "/api/**"; } algorithm fixed_window; rate 4/min; soft delay 750ms at 50%; }"#,
    );
    let app = app(&engine);
    let start = tokio::time::Instant::now();
    call(&app, request("GET", "/api/items/1", "203.0.113.9")).await;
    let response = app
        .oneshot(request("GET", "/api/items/1", "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_millis(750));
    assert!(response.headers().get("tollgate-warning").is_some());
}

/// Lets spawned release tasks run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn concurrency_leases_are_released_when_the_body_ends() {
    let (engine, _) =
        engine(r#"limit exports { match { route GET "/export"; } rate 1 concurrent; }"#);
    let app = app(&engine);
    let first = call(&app, request("GET", "/export", "203.0.113.9")).await;
    assert_eq!(first.status(), StatusCode::OK);
    // The first export is still streaming: the second is refused.
    let second = call(&app, request("GET", "/export", "203.0.113.9")).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    // Reading the body to its end releases the lease.
    assert_eq!(
        to_bytes(first.into_body(), 1024).await.unwrap(),
        "a large export"
    );
    settle().await;
    let third = app
        .oneshot(request("GET", "/export", "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::OK);
}

#[tokio::test]
async fn concurrency_leases_are_released_when_the_response_is_dropped() {
    let (engine, _) =
        engine(r#"limit exports { match { route GET "/export"; } rate 1 concurrent; }"#);
    let app = app(&engine);
    let first = call(&app, request("GET", "/export", "203.0.113.9")).await;
    drop(first); // the client went away
    settle().await;
    let second = app
        .oneshot(request("GET", "/export", "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_route_can_name_its_limit_in_code() {
    // `login` has no `match`: it applies only where a route names it.
    let (engine, _) = engine(
        r#"limit login { key ip/24; algorithm fixed_window; rate 2/min; on_exceed reject 429 reason "too many login attempts"; }"#,
    );
    let app = Router::new()
        .route("/auth/login", post(|| async { "welcome" }))
        .route_layer(limit(&engine, "login"))
        .route("/other", post(|| async { "free" }));
    for _ in 0..2 {
        let r = call(&app, request("POST", "/auth/login", "198.51.100.1")).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = call(&app, request("POST", "/auth/login", "198.51.100.2")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "same /24");
    assert_eq!(json(r).await["reason"], "too many login attempts");
    for _ in 0..5 {
        let r = call(&app, request("POST", "/other", "198.51.100.1")).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn matched_path_gives_the_route_key() {
    // Keyed by route: /api/items/1 and /api/items/2 share the template's counter.
    let (engine, _) =
        engine(r#"limit per_route { key route; algorithm fixed_window; rate 2/min; }"#);
    let app = app(&engine);
    for id in [1, 2] {
        let r = call(
            &app,
            request("GET", &format!("/api/items/{id}"), "203.0.113.9"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = call(&app, request("GET", "/api/items/3", "203.0.113.10")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = app
        .oneshot(request("GET", "/export", "203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "another route, another counter");
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let (engine, _) = engine(
        r#"limit api { match { route GET "/api/**"; } key ip; algorithm fixed_window; rate 1/min; }"#,
    );
    let options = HttpOptions {
        identifier: Identifier::new().with_trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()]),
        ..HttpOptions::default()
    };
    let app = Router::new()
        .route("/api/items/{id}", get(|| async { "item" }))
        .layer(RateLimitLayer::new(Arc::clone(&engine)).with_options(options));
    let via_proxy = |client: &str| {
        let mut r = request("GET", "/api/items/1", "10.0.0.5");
        r.headers_mut()
            .insert("x-forwarded-for", client.parse().unwrap());
        r
    };
    // Two clients behind the same proxy are counted apart.
    assert_eq!(
        status(&app, via_proxy("198.51.100.1")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, via_proxy("198.51.100.2")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&app, via_proxy("198.51.100.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A client forging the header directly is counted by its own address.
    let mut forged = request("GET", "/api/items/1", "203.0.113.50");
    forged
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.99".parse().unwrap());
    assert_eq!(
        app.clone().oneshot(forged).await.unwrap().status(),
        StatusCode::OK
    );
    let mut forged = request("GET", "/api/items/1", "203.0.113.50");
    forged
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.98".parse().unwrap());
    assert_eq!(
        app.oneshot(forged).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn the_layer_wraps_a_plain_hyper_style_service() {
    // No axum router: a bare `tower::Service` over `http` types, as hyper serves.
    use http_body_util::Full;
    let (engine, _) = engine(r#"limit all { key ip; algorithm fixed_window; rate 1/min; }"#);
    let service = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(Arc::clone(&engine)))
        .service_fn(|_request: Request<Full<bytes::Bytes>>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(bytes::Bytes::from("hi"))))
        });
    let request = || {
        let mut r = Request::new(Full::new(bytes::Bytes::new()));
        r.extensions_mut().insert(ConnectInfo::<SocketAddr>(
            "198.51.100.3:5000".parse().unwrap(),
        ));
        r
    };
    let ok = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(to_bytes(ok.into_body(), 100).await.unwrap(), "hi");
    let refused = service.oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
}
