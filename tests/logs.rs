//! What Tollgate logs, captured as the JSON lines `log_format = "json"` writes: one line per
//! refusal with the request id, decision, namespace, limit and the counter key's hash — and
//! never the API token a client sent; a failing store warns once per burst, with a count of
//! the lines held back.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, Method};
use tollgate::middleware::HttpOptions;
use tollgate::store::MemoryStore;
use tollgate::store::redis::RedisStore;
use tollgate::{Engine, ManualClock, PolicySet, RateLimitLayer, RequestCtx, Timestamp, compile};
use tower::ServiceExt;

const TOKEN: &str = "sk-live-log-capture-0123456789";

const POLICY: &str = r#"
namespace "shop";
limit per_token { match { route ANY "/api/**"; } key api_token; algorithm fixed_window; rate 2/min;
                  on_exceed reject 429 reason "two per minute"; }
limit open { match { route ANY "/open/**"; } key ip; algorithm fixed_window; rate 100/min;
             on_store_error allow; }
"#;

/// Lines written while `f` runs on this thread, as JSON values.
fn captured(f: impl FnOnce()) -> Vec<serde_json::Value> {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = sink.0.lock().unwrap().clone();
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

use support::runtime;

#[test]
fn a_refusal_is_one_line_with_its_fields_and_no_secret() {
    let plan = compile(&PolicySet::from_sources([("shop.rl", POLICY)])).unwrap();
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    let app = axum::Router::new().fallback(|| async { "ok" }).layer(
        RateLimitLayer::new(engine).with_options(HttpOptions {
            identifier: tollgate::identity::Identifier::new()
                .with_api_key_header(HeaderName::from_static("x-api-key")),
            ..HttpOptions::default()
        }),
    );
    let mut statuses = Vec::new();
    let lines = captured(|| {
        runtime().block_on(async {
            for n in 0..3 {
                let request = http::Request::builder()
                    .uri("/api/orders")
                    .header("x-api-key", TOKEN)
                    .header("x-request-id", format!("req-{n}"))
                    .body(Body::empty())
                    .unwrap();
                statuses.push(
                    app.clone()
                        .oneshot(request)
                        .await
                        .unwrap()
                        .status()
                        .as_u16(),
                );
            }
        });
    });
    assert_eq!(statuses, [200, 200, 429]);
    let text = lines.iter().map(ToString::to_string).collect::<String>();
    assert!(!text.contains(TOKEN), "the token never appears: {text}");
    let rejected: Vec<_> = lines.iter().filter(|l| l["decision"] == "reject").collect();
    assert_eq!(rejected.len(), 1, "{text}");
    let line = rejected[0];
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["request_id"], "req-2");
    assert_eq!(line["namespace"], "shop");
    assert_eq!(line["limit"], "per_token");
    assert_eq!(line["reason"], "two per minute");
    let hash = line["key_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 24, "a keyed hash: {hash}");
    assert!(
        !text.contains("token:"),
        "not even the counter key's hashed token"
    );
    let allowed = lines.iter().filter(|l| l["decision"] == "allow").count();
    assert_eq!(allowed, 2, "allows at debug: {text}");
    assert!(
        lines
            .iter()
            .all(|l| l["decision"] != "allow" || l["level"] == "DEBUG")
    );
}

#[test]
fn a_failing_store_warns_once_per_burst() {
    let Some(mut redis) = support::redis::Redis::start() else {
        return;
    };
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::connect(
            &redis.url(),
            Duration::from_millis(200),
        ))
        .expect("the store connects");
    redis.kill();
    let plan = compile(&PolicySet::from_sources([("shop.rl", POLICY)])).unwrap();
    let clock = ManualClock::new(Timestamp::from_secs(1_700_000_000));
    let pipeline = Arc::new(tollgate::middleware::default_pipeline(Arc::new(
        Engine::with_clock(plan, store, clock.clone()),
    )));
    let decide = async |request: &RequestCtx| {
        let admission = pipeline.admit(request, "req".to_owned(), None).await;
        let verdict = admission.verdict.clone();
        admission.complete(200);
        verdict
    };
    let request = RequestCtx::new(Method::GET, "/open/x").with_client_ip([198, 51, 100, 1].into());
    let warnings = |lines: &[serde_json::Value]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                l["level"] == "WARN"
                    && l["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("counter store failed")
            })
            .cloned()
            .collect()
    };
    let first = captured(|| {
        rt.block_on(async {
            for _ in 0..50 {
                assert!(decide(&request).await.is_allowed(), "fails open");
            }
        });
    });
    let first = warnings(&first);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["suppressed"], 0);
    // Past the window (and the breaker's back-off), the next failure warns again and says
    // how many were held back: the failures before the breaker opened (its refusals are not
    // failures of the store, and log at debug).
    clock.advance(Duration::from_secs(11));
    let second = captured(|| {
        rt.block_on(async {
            for _ in 0..5 {
                decide(&request).await;
            }
        });
    });
    let second = warnings(&second);
    assert_eq!(second.len(), 1, "{second:?}");
    let held_back = second[0]["suppressed"].as_u64().unwrap();
    assert!((1..50).contains(&held_back), "{held_back}");
}

/// What the application logs while handling a request carries the request's span: its id,
/// the decision, namespace, limit and hashed key (never the token).
#[test]
fn the_applications_lines_carry_the_requests_span() {
    let plan = compile(&PolicySet::from_sources([("shop.rl", POLICY)])).unwrap();
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    let app = axum::Router::new()
        .fallback(|| async {
            tracing::info!("handling the order");
            "ok"
        })
        .layer(
            RateLimitLayer::new(engine).with_options(HttpOptions {
                identifier: tollgate::identity::Identifier::new()
                    .with_api_key_header(HeaderName::from_static("x-api-key")),
                ..HttpOptions::default()
            }),
        );
    let lines = captured(|| {
        runtime().block_on(async {
            let request = http::Request::builder()
                .uri("/api/orders")
                .header("x-api-key", TOKEN)
                .header("x-request-id", "req-span")
                .body(Body::empty())
                .unwrap();
            app.oneshot(request).await.unwrap();
        });
    });
    let line = lines
        .iter()
        .find(|l| l["message"] == "handling the order")
        .expect("the application's line");
    let span = &line["span"];
    assert_eq!(span["name"], "request");
    assert_eq!(span["request_id"], "req-span");
    assert_eq!(span["decision"], "allow");
    assert_eq!(span["namespace"], "shop");
    assert_eq!(span["limit"], "per_token");
    assert_eq!(span["key_hash"].as_str().map(str::len), Some(24));
    assert!(!line.to_string().contains(TOKEN));
}
