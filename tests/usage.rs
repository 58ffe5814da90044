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
use tollgate::middleware::{DEFAULT_MAX_JSON_BODY, ReadJsonBodyLayer};
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
limit by_body {
  match { route POST "/v1/body"; }
  key header("X-Tenant");
  algorithm fixed_window;
  rate 1_000/min;
  cost response header("X-Usage-Tokens");
  reserve json("max_tokens") default 50 max 500;
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

/// An upstream that answers with the body it got, and says it used 1.
async fn echo(body: axum::body::Bytes) -> axum::response::Response {
    ([("x-usage-tokens", "1")], body).into_response()
}

fn app(engine: &Arc<TestEngine>) -> Router {
    Router::new()
        .route("/v1/chat", get(chat))
        .route("/v1/header", get(chat))
        .route("/v1/body", axum::routing::post(echo))
        .layer(RateLimitLayer::new(Arc::clone(engine)))
        .layer(ReadJsonBodyLayer::new(engine))
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
        .unwrap_or_else(|| panic!("{:?}", explanation.limits));
    match engine.store().peek(&key, engine.now()) {
        Some(State::Window(w)) => w.count,
        None => 0,
        Some(other) => panic!("{other:?}"),
    }
}

fn request_ctx(limit: &str) -> tollgate::RequestCtx {
    let (method, path) = match limit {
        "tokens" => (http::Method::GET, "/v1/chat"),
        "by_body" => (http::Method::POST, "/v1/body"),
        _ => (http::Method::GET, "/v1/header"),
    };
    tollgate::RequestCtx::new(method, path)
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
    let response = app
        .clone()
        .oneshot(request("/v1/header?header=40"))
        .await
        .unwrap();
    // Known with the response's head: its headers carry the settled figures.
    assert_eq!(
        response.headers()["x-ratelimit-remaining"],
        "960",
        "1,000 − 40, not 1,000 − 300 reserved"
    );
    to_bytes(response.into_body(), 1 << 20).await.unwrap();
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

fn post(body: Vec<u8>, content_type: &str) -> Request<Body> {
    let mut r = Request::builder()
        .method("POST")
        .uri("/v1/body")
        .header("x-tenant", "acme")
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap();
    let addr: SocketAddr = "203.0.113.9:40000".parse().unwrap();
    r.extensions_mut().insert(ConnectInfo(addr));
    r
}

#[tokio::test]
async fn a_reservation_read_from_the_request_body_counts_while_the_body_goes_on_whole() {
    let engine = engine();
    let app = app(&engine);
    let body = br#"{"model":"m","max_tokens":300}"#.to_vec();
    let response = app
        .clone()
        .oneshot(post(body.clone(), "application/json"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        counted(&engine, "by_body"),
        300,
        "reserved while it streams"
    );
    let echoed = to_bytes(response.into_body(), 1 << 21).await.unwrap();
    assert_eq!(&echoed[..], &body[..], "the upstream got the body");
    assert_eq!(counted(&engine, "by_body"), 1, "settled at what it used");

    // Above `max`, at most `max`; without the field, or not JSON, the default.
    let cases: [(Vec<u8>, &str, u64); 3] = [
        (br#"{"max_tokens":90000}"#.to_vec(), "application/json", 500),
        (
            br#"{"messages":[]}"#.to_vec(),
            "application/json; charset=utf-8",
            50,
        ),
        (br#"{"max_tokens":300}"#.to_vec(), "text/plain", 50),
    ];
    for (body, content_type, reserved) in cases {
        let before = counted(&engine, "by_body");
        let response = app.clone().oneshot(post(body, content_type)).await.unwrap();
        assert_eq!(
            counted(&engine, "by_body") - before,
            reserved,
            "{content_type}"
        );
        to_bytes(response.into_body(), 1 << 21).await.unwrap();
    }

    // A body over the cap reserves the default, and reaches the upstream whole.
    let mut large = br#"{"max_tokens":400,"pad":""#.to_vec();
    large.extend(std::iter::repeat_n(b'a', DEFAULT_MAX_JSON_BODY));
    large.extend(br#""}"#);
    let before = counted(&engine, "by_body");
    let response = app
        .clone()
        .oneshot(post(large.clone(), "application/json"))
        .await
        .unwrap();
    assert_eq!(counted(&engine, "by_body") - before, 50);
    let echoed = to_bytes(response.into_body(), 1 << 22).await.unwrap();
    assert_eq!(echoed.len(), large.len());
    assert!(echoed[..] == large[..]);
}
