//! A limit whose key has no value for a request — an anonymous request, a forged or expired
//! token, a decision API call without `client_ip` — never silently stops applying: by
//! default such requests are counted by address (or, without one, together); a limit may
//! instead skip them (listed as skipped) or refuse them.

mod support;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::InProcess;
use tollgate::identity::Identifier;
use tollgate::middleware::HttpOptions;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RateLimitLayer, compile};
use tower::ServiceExt;

const SECRET: &[u8] = b"the-verification-secret-32-bytes!";

const POLICY: &str = r#"
limit per_user { match { route ANY "/api/**"; } key user_id; algorithm fixed_window; rate 2/min; }
limit optional { match { route ANY "/skip/**"; } key user_id; algorithm fixed_window; rate 2/min;
                 on_missing_key skip; }
limit strict { match { route ANY "/refuse/**"; } key user_id; algorithm fixed_window; rate 2/min;
               on_missing_key refuse; }
"#;

fn identifier() -> Identifier {
    support::jwt_identifier(SECRET)
}

fn token(sub: &str, exp_offset: i64, key: &[u8]) -> String {
    // jsonwebtoken checks `exp` against the wall clock, so the token is made against it too.
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = json!({ "sub": sub, "exp": now + exp_offset });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// `alg: none`, unsigned: what an attacker writes to claim any user.
fn unsigned(sub: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload =
        URL_SAFE_NO_PAD.encode(json!({ "sub": sub, "exp": 4_000_000_000u64 }).to_string());
    format!("{header}.{payload}.")
}

/// Tokens that name no user: forged (unsigned, wrong key), expired, and none at all.
fn unbelieved() -> Vec<(&'static str, Option<String>)> {
    vec![
        ("alg none", Some(unsigned("victim"))),
        (
            "wrong key",
            Some(token("victim", 3600, b"not-the-secret-at-all-not-at-all")),
        ),
        ("expired", Some(token("victim", -3600, SECRET))),
        ("absent", None),
    ]
}

fn app() -> Router {
    let plan = compile(&PolicySet::from_sources([("test.rl", POLICY)])).unwrap();
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    Router::new()
        .fallback(|| async { "ok" })
        .layer(RateLimitLayer::new(engine).with_options(HttpOptions {
            identifier: identifier(),
            ..HttpOptions::default()
        }))
}

async fn call(app: &Router, path: &str, peer: &str, token: Option<&str>) -> http::Response<Body> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let request = support::from_peer("GET", path, peer, &headers);
    app.clone().oneshot(request).await.unwrap()
}

#[tokio::test]
async fn requests_without_a_believed_user_are_counted_by_address() {
    for (what, token) in unbelieved() {
        let app = app();
        let token = token.as_deref();
        assert_eq!(
            call(&app, "/api/a", "192.0.2.1", token).await.status(),
            200,
            "{what}"
        );
        assert_eq!(
            call(&app, "/api/b", "192.0.2.1", token).await.status(),
            200,
            "{what}"
        );
        let third = call(&app, "/api/c", "192.0.2.1", token).await;
        assert_eq!(
            third.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{what}: not limited"
        );
        // Another address is another counter.
        assert_eq!(
            call(&app, "/api/a", "192.0.2.2", token).await.status(),
            200,
            "{what}"
        );
    }
    // A verified user has a counter of their own, wherever they come from.
    let app = app();
    let alice = token("alice", 3600, SECRET);
    for _ in 0..2 {
        assert_eq!(call(&app, "/api/x", "192.0.2.1", None).await.status(), 200);
    }
    assert_eq!(
        call(&app, "/api/x", "192.0.2.1", Some(&alice))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_limit_may_skip_or_refuse_requests_without_a_key() {
    let app = app();
    let forged = unsigned("victim");
    for _ in 0..5 {
        let reply = call(&app, "/skip/x", "192.0.2.1", Some(&forged)).await;
        assert_eq!(reply.status(), 200, "skip: never limited");
    }
    let refused = call(&app, "/refuse/x", "192.0.2.1", Some(&forged)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = axum::body::to_bytes(refused.into_body(), 4096)
        .await
        .unwrap();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["policy"], "strict");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("no value for its key"),
        "{problem}"
    );
    let alice = token("alice", 3600, SECRET);
    assert_eq!(
        call(&app, "/refuse/x", "192.0.2.1", Some(&alice))
            .await
            .status(),
        200
    );
}

#[test]
fn the_decision_api_counts_unattributed_requests_and_lists_skipped_limits() {
    let server = InProcess::start(
        POLICY,
        HttpOptions {
            identifier: identifier(),
            ..HttpOptions::default()
        },
    );
    let check = |body: serde_json::Value| server.check(&body).json();
    // A forged token with an address: counted by the address.
    let forged = format!("Bearer {}", unsigned("victim"));
    let with_ip = json!({ "method": "GET", "path": "/api/x", "client_ip": "198.51.100.1",
                          "headers": { "Authorization": forged } });
    assert_eq!(check(with_ip.clone())["allowed"], true);
    assert_eq!(check(with_ip.clone())["allowed"], true);
    let third = check(with_ip);
    assert_eq!(third["allowed"], false, "{third}");
    assert_eq!(third["policy"], "per_user");
    // Neither a user nor an address (however the caller varies its headers): one counter.
    for (i, expected) in [true, true, false].into_iter().enumerate() {
        let body = json!({ "method": "GET", "path": "/api/y",
                           "headers": { "X-Noise": i.to_string() } });
        assert_eq!(check(body)["allowed"], expected, "unidentified request {i}");
    }
    // A skipping limit is listed, with why.
    let skipped = check(json!({ "method": "GET", "path": "/skip/z", "client_ip": "198.51.100.1" }));
    assert_eq!(skipped["allowed"], true);
    assert_eq!(skipped["skipped"][0]["limit"], "optional", "{skipped}");
    assert!(
        skipped["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("on_missing_key skip")
    );
}

#[test]
fn check_warns_about_keys_that_may_have_no_value() {
    let plan = compile(&PolicySet::from_sources([("test.rl", POLICY)])).unwrap();
    // `per_user` does not say what a missing user means; the others do.
    let warnings: Vec<String> = plan
        .warnings()
        .iter()
        .map(|w| w.render_plain(100))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("limit `per_user`'s key has no value"),
        "{}",
        warnings[0]
    );
    assert!(warnings[0].contains("on_missing_key"), "{}", warnings[0]);
    let settled = compile(&PolicySet::from_sources([(
        "ok.rl",
        "limit a { key first_of(user_id, ip); rate 1/s; }\nlimit b { key ip + route; rate 1/s; }",
    )]))
    .unwrap();
    assert!(settled.warnings().is_empty());
}
