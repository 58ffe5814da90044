//! Usage limits (`cost response …`, `reserve`) through the tower layer on the memory store:
//! the reservation counts at admission, the response's header, JSON body or event stream
//! says what was used, and the difference is settled when the body ends — a refund when it
//! used less, a debt when more, the reservation (or the limit's `default`) when the response
//! never says or the client goes away.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, Query};
use axum::response::IntoResponse;
use axum::routing::get;
use http::{Request, StatusCode, header};
use tollgate::limiter::State;
use tollgate::store::MemoryStore;
use tollgate::{Engine, ManualClock, PolicySet, RateLimitLayer, Timestamp, compile};
use tower::ServiceExt;

type TestEngine = Engine<MemoryStore, ManualClock>;

const POLICY: &str = r#"
limit tokens {
  match { route GET "/v1/chat"; }
  key header("X-Tenant");
  algorithm fixed_window;
  rate 1_000/min;
  cost response json("usage.prompt_tokens") + 2 * json("usage.completion_tokens") max 5_000;
  reserve 100;
}
limit by_header {
  match { route GET "/v1/header"; }
  key header("X-Tenant");
  algorithm fixed_window;
  rate 1_000/min;
  cost response header("X-Usage-Tokens") default 0;
  reserve 300;
}
"#;

fn engine() -> Arc<TestEngine> {
    let plan = compile(&PolicySet::from_sources([("usage.rl", POLICY)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let clock = ManualClock::new(Timestamp::from_secs(1_700_006_400));
    Arc::new(Engine::with_clock(plan, MemoryStore::new(), clock))
}

#[derive(serde::Deserialize)]
struct Used {
    prompt: Option<u64>,
    completion: Option<u64>,
    /// Answer as an event stream.
    #[serde(default)]
    stream: bool,
    /// Answer with `X-Usage-Tokens`.
    header: Option<u64>,
}

/// An upstream that says what it was asked to say it used.
async fn chat(Query(used): Query<Used>) -> axum::response::Response {
    if let Some(n) = used.header {
        return ([("x-usage-tokens", n.to_string())], "ok").into_response();
    }
    let usage = match (used.prompt, used.completion) {
        (Some(p), Some(c)) => serde_json::json!({"prompt_tokens": p, "completion_tokens": c}),
        _ => serde_json::Value::Null,
    };
    if used.stream {
        let first = serde_json::json!({"choices": [{"delta": {"content": "Hel"}}], "usage": null});
        let last = serde_json::json!({"choices": [], "usage": usage});
        let body = format!("data: {first}\n\ndata: {last}\n\ndata: [DONE]\n\n");
        return ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response();
    }
    axum::Json(serde_json::json!({"id": "x", "usage": usage})).into_response()
}

fn app(engine: &Arc<TestEngine>) -> Router {
    Router::new()
        .route("/v1/chat", get(chat))
        .route("/v1/header", get(chat))
        .layer(RateLimitLayer::new(Arc::clone(engine)))
}

fn request(uri: &str) -> Request<Body> {
    let mut r = Request::builder()
        .uri(uri)
        .header("x-tenant", "acme")
        .body(Body::empty())
        .unwrap();
    let addr: SocketAddr = "203.0.113.9:40000".parse().unwrap();
    r.extensions_mut().insert(ConnectInfo(addr));
    r
}

/// Sends `uri` and reads the whole answer; its status.
async fn send(app: &Router, uri: &str) -> StatusCode {
    let response = app.clone().oneshot(request(uri)).await.unwrap();
    let status = response.status();
    to_bytes(response.into_body(), 1 << 20).await.unwrap();
    status
}

/// What the tenant's counter holds for `limit`.
fn counted(engine: &TestEngine, limit: &str) -> u64 {
    let explanation =
        tollgate::explain::explain(&engine.plan(), &request_ctx(limit), engine.key_hasher());
    let key = explanation
        .limits
        .iter()
        .find(|l| &*l.name == limit)
        .and_then(|l| l.key.clone())
        .expect("the limit applies");
    match engine.store().peek(&key, engine.now()) {
        Some(State::Window(w)) => w.count,
        None => 0,
        Some(other) => panic!("{other:?}"),
    }
}

fn request_ctx(limit: &str) -> tollgate::RequestCtx {
    let path = if limit == "tokens" {
        "/v1/chat"
    } else {
        "/v1/header"
    };
    tollgate::RequestCtx::new(http::Method::GET, path)
        .with_client_ip("203.0.113.9".parse().unwrap())
        .with_header(
            http::HeaderName::from_static("x-tenant"),
            http::HeaderValue::from_static("acme"),
        )
}

#[tokio::test]
async fn a_json_body_settles_a_refund_and_a_debt() {
    let engine = engine();
    let app = app(&engine);
    // 10 + 2 × 20 = 50 used of 100 reserved: 50 back.
    assert_eq!(
        send(&app, "/v1/chat?prompt=10&completion=20").await,
        StatusCode::OK
    );
    assert_eq!(counted(&engine, "tokens"), 50);
    // 100 + 2 × 300 = 700 used: 600 more than reserved.
    assert_eq!(
        send(&app, "/v1/chat?prompt=100&completion=300").await,
        StatusCode::OK
    );
    assert_eq!(counted(&engine, "tokens"), 750);
    // 250 left: two more reservations of 100 fit, the third does not.
    assert_eq!(send(&app, "/v1/chat").await, StatusCode::OK);
    assert_eq!(send(&app, "/v1/chat").await, StatusCode::OK);
    assert_eq!(
        counted(&engine, "tokens"),
        950,
        "no usage said: settled as reserved"
    );
    assert_eq!(send(&app, "/v1/chat").await, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn an_event_stream_is_read_as_it_passes() {
    let engine = engine();
    let app = app(&engine);
    assert_eq!(
        send(&app, "/v1/chat?prompt=7&completion=1&stream=true").await,
        StatusCode::OK
    );
    assert_eq!(counted(&engine, "tokens"), 9);
    // A debt: 2,000 + 2 × 1,500 = 5,000 (at most `max`), far past the quota.
    assert_eq!(
        send(&app, "/v1/chat?prompt=2000&completion=1500&stream=true").await,
        StatusCode::OK
    );
    assert_eq!(counted(&engine, "tokens"), 5_009);
    assert_eq!(send(&app, "/v1/chat").await, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_header_says_it_and_a_silent_response_counts_the_default() {
    let engine = engine();
    let app = app(&engine);
    assert_eq!(send(&app, "/v1/header?header=40").await, StatusCode::OK);
    assert_eq!(counted(&engine, "by_header"), 40);
    // No header: `default 0` gives the whole reservation back.
    assert_eq!(send(&app, "/v1/header").await, StatusCode::OK);
    assert_eq!(counted(&engine, "by_header"), 40);
}

#[tokio::test]
async fn a_client_gone_mid_stream_settles_at_the_reservation() {
    let engine = engine();
    let app = app(&engine);
    let response = app
        .clone()
        .oneshot(request("/v1/chat?prompt=1&completion=1&stream=true"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(counted(&engine, "tokens"), 100, "reserved while it streams");
    drop(response);
    assert_eq!(counted(&engine, "tokens"), 100, "never said: as reserved");
}
