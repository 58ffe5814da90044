//! Cedar with the limits, evaluated for real on the memory store and on a real
//! `redis-server`: authorization (403, nothing counted, determining policies named),
//! conditions (`cedar permits`, `principal in`), tiers chosen by annotations (`pick
//! highest|lowest|first`); the indexed, cached evaluation agrees with Cedar's own unsliced
//! one; and the decision API answers a denial as `docs/openapi.yaml` says.

mod support;

use std::path::Path;

use http::Method;
use serde_json::json;
use tollgate::engine::{Action, Verdict};
use tollgate::store::redis::RedisStore;
use tollgate::store::{MemoryStore, Store};
use tollgate::{Engine, PolicySet, RequestCtx, compile};

const SCHEMA: &str = r#"
namespace Shop {
  entity Role;
  entity User in [Role];
  entity Endpoint;
  type Request = { ip: ipaddr, method: String, path: String, host: String };
  action "read", "write", "admin" appliesTo { principal: User, resource: Endpoint, context: Request };
}
"#;

const POLICIES: &str = r#"
@id("writers")
permit (principal in Shop::Role::"writer", action == Shop::Action::"write", resource);

@id("staff")
@rl_tier("pro")
permit (principal in Shop::Role::"staff", action, resource);

@id("gold-for-writers")
@rl_tier("gold")
permit (principal in Shop::Role::"writer", action == Shop::Action::"read", resource);

@id("no-admin-outside")
forbid (principal, action == Shop::Action::"admin", resource)
unless { context.ip.isInRange(ip("10.0.0.0/8")) };
"#;

const ENTITIES: &str = r#"[
  { "uid": { "type": "Shop::Role", "id": "writer" }, "attrs": {}, "parents": [] },
  { "uid": { "type": "Shop::Role", "id": "staff" }, "attrs": {}, "parents": [] },
  { "uid": { "type": "Shop::User", "id": "alice" }, "attrs": {},
    "parents": [{ "type": "Shop::Role", "id": "staff" }, { "type": "Shop::Role", "id": "writer" }] },
  { "uid": { "type": "Shop::User", "id": "bob" }, "attrs": {},
    "parents": [{ "type": "Shop::Role", "id": "writer" }] }
]"#;

const LIMITS: &str = r#"
version 1;
import cedar "shop.cedar" schema "shop.cedarschema" namespace "Shop" entities "shop.entities.json";

tiers highest { from cedar annotation "rl_tier" pick highest; default free;
  tier free { api = 1/min; } tier pro extends free { api = 3/min; } tier gold extends pro { api = 5/min; } }
tiers lowest { from cedar annotation "rl_tier" pick lowest; default free;
  tier free { api = 1/min; } tier pro extends free { api = 3/min; } tier gold extends pro { api = 5/min; } }
tiers first { from cedar annotation "rl_tier" for action "read" pick first; default free;
  tier free { api = 1/min; } tier pro extends free { api = 3/min; } tier gold extends pro { api = 5/min; } }

limit admin { match { route ANY "/admin/**"; } authorize action "admin"; key user_id;
  algorithm fixed_window; rate 100/min; }
limit writes { match { route POST "/orders"; } when cedar permits action "write"; key user_id;
  algorithm fixed_window; rate 1/min; }
limit staff_reports { match { route GET "/reports"; } when cedar principal in Role "staff";
  key user_id; algorithm fixed_window; rate 1/min; }
limit by_highest { match { route GET "/h/**"; } key user_id; algorithm fixed_window; rate highest.api; }
limit by_lowest { match { route GET "/l/**"; } key user_id; algorithm fixed_window; rate lowest.api; }
limit by_first { match { route GET "/f/**"; } key user_id; algorithm fixed_window; rate first.api; }
"#;

/// The policies in a fresh directory.
fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("shop.cedarschema", SCHEMA),
        ("shop.cedar", POLICIES),
        ("shop.entities.json", ENTITIES),
        ("shop.rl", LIMITS),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn plan(dir: &Path) -> tollgate::Plan {
    compile(&PolicySet::load(&[dir])).unwrap_or_else(|e| panic!("{}", e.render_plain(100)))
}

fn request(method: Method, path: &str, user: Option<&str>, ip: &str) -> RequestCtx {
    let request = RequestCtx::new(method, path).with_client_ip(ip.parse().unwrap());
    match user {
        Some(user) => request.with_user_id(user),
        None => request,
    }
}

/// Every Cedar use, against `store`.
async fn cedar_uses_on<S: Store>(store: S) {
    let dir = policy_dir();
    let engine = Engine::new(plan(dir.path()), store);
    let decide = |method: Method, path: &str, user: Option<&str>, ip: &str| {
        let request = request(method, path, user, ip);
        let engine = &engine;
        async move { engine.decide(&request).await }
    };

    // Authorization: a forbid from outside the private network, whoever asks; nothing
    // permits carol; denied requests count nothing.
    for _ in 0..3 {
        let outside = decide(Method::GET, "/admin/users", Some("alice"), "203.0.113.9").await;
        match &outside.action {
            Action::Unauthorized {
                limit,
                action,
                policies,
            } => {
                assert_eq!(&**limit, "admin");
                assert_eq!(&**action, "admin");
                let ids: Vec<&str> = policies.iter().map(|p| &**p).collect();
                assert_eq!(ids, ["no-admin-outside"]);
            }
            other => panic!("alice from outside: {other:?}"),
        }
        assert!(outside.reports.is_empty(), "nothing is counted");
    }
    let carol = decide(Method::GET, "/admin/users", Some("carol"), "10.0.0.7").await;
    assert!(
        matches!(&carol.action, Action::Unauthorized { policies, .. } if policies.is_empty()),
        "{:?}",
        carol.action
    );
    let inside = decide(Method::GET, "/admin/users", Some("alice"), "10.0.0.7").await;
    assert!(inside.is_allowed(), "{:?}", inside.action);
    assert_eq!(
        report(&inside, "admin").decision.remaining,
        99,
        "the three denied requests were not counted"
    );

    // Conditions: `cedar permits action "write"` and `cedar principal in Role "staff"`.
    let applies = |v: &Verdict, limit: &str| v.reports.iter().any(|r| &*r.limit == limit);
    let bob_writes = decide(Method::POST, "/orders", Some("bob"), "198.51.100.1").await;
    assert!(applies(&bob_writes, "writes"));
    let carol_writes = decide(Method::POST, "/orders", Some("carol"), "198.51.100.1").await;
    assert!(!applies(&carol_writes, "writes"));
    let second = decide(Method::POST, "/orders", Some("bob"), "198.51.100.1").await;
    assert!(!second.is_allowed(), "the writes limit counts bob's writes");
    assert!(applies(
        &decide(Method::GET, "/reports", Some("alice"), "198.51.100.1").await,
        "staff_reports"
    ));
    assert!(!applies(
        &decide(Method::GET, "/reports", Some("bob"), "198.51.100.1").await,
        "staff_reports"
    ));

    // Tiers: alice is permitted by `staff` (pro) and `gold-for-writers` (gold), bob by
    // `gold-for-writers`, carol by nothing.
    for (path, user, tier) in [
        ("/h/x", "alice", "gold"),
        ("/l/x", "alice", "pro"),
        ("/f/x", "alice", "pro"),
        ("/h/x", "bob", "gold"),
        ("/l/x", "bob", "gold"),
        ("/h/x", "carol", "free"),
    ] {
        let verdict = decide(Method::GET, path, Some(user), "198.51.100.1").await;
        let limit = &verdict.reports[0];
        assert_eq!(limit.tier.as_deref(), Some(tier), "{user} on {path}");
        let quota = match tier {
            "free" => 1,
            "pro" => 3,
            _ => 5,
        };
        assert_eq!(
            limit.decision.limit, quota,
            "{user} on {path} counts the {tier} quota"
        );
    }
}

fn report<'v>(verdict: &'v Verdict, limit: &str) -> &'v tollgate::engine::LimitReport {
    verdict
        .reports
        .iter()
        .find(|r| &*r.limit == limit)
        .unwrap_or_else(|| panic!("no report for {limit}: {verdict:?}"))
}

#[tokio::test]
async fn cedar_authorizes_conditions_and_classifies_on_the_memory_store() {
    cedar_uses_on(MemoryStore::new()).await;
}

#[tokio::test]
async fn cedar_authorizes_conditions_and_classifies_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let store = RedisStore::connect(&redis.url(), std::time::Duration::from_secs(2))
        .await
        .expect("the store connects");
    cedar_uses_on(store).await;
}

/// A safelist lifts limits, not authorization.
#[tokio::test]
async fn a_safelisted_request_still_needs_cedars_permit() {
    let dir = policy_dir();
    std::fs::write(
        dir.path().join("lists.rl"),
        "version 1;\nsafelist office { ip in [198.51.100.0/24]; }\n",
    )
    .unwrap();
    let engine = Engine::new(plan(dir.path()), MemoryStore::new());
    let denied = engine
        .decide(&request(
            Method::GET,
            "/admin/x",
            Some("bob"),
            "198.51.100.4",
        ))
        .await;
    assert!(
        matches!(denied.action, Action::Unauthorized { .. }),
        "{:?}",
        denied.action
    );
    let other = engine
        .decide(&request(
            Method::GET,
            "/orders",
            Some("bob"),
            "198.51.100.4",
        ))
        .await;
    assert!(
        matches!(other.action, Action::Bypass { .. }),
        "{:?}",
        other.action
    );
}

/// `/v1/check` answers a denial with 403, `unauthorized` and the determining policies, in
/// the documented shape.
#[test]
fn the_decision_api_answers_a_denial_as_documented() {
    let dir = policy_dir();
    let options = tollgate::middleware::HttpOptions {
        identifier: tollgate::identity::Identifier::new()
            .with_user_header(http::HeaderName::from_static("x-user")),
        ..Default::default()
    };
    let server = support::InProcess::start_dir(dir.path(), options);
    let reply = server.check(&json!({
        "method": "GET", "path": "/admin/users", "client_ip": "203.0.113.9",
        "headers": { "X-User": "alice" }, "trusted_headers": true
    }));
    let body = reply.json();
    assert_eq!(body["allowed"], false, "{body}");
    assert_eq!(body["action"], "unauthorized");
    assert_eq!(body["status"], 403);
    assert_eq!(body["policy"], "admin");
    assert_eq!(body["determining_policies"], json!(["no-admin-outside"]));
    support::assert_conforms(&reply, "CheckResponse");
}

/// What `explain` says is what the engine does, and it names Cedar's determining policies.
#[test]
fn explain_shows_cedars_answers() {
    let dir = policy_dir();
    let plan = plan(dir.path());
    let hasher = tollgate::plan::KeyHasher::random();
    let text = tollgate::explain::explain(
        &plan,
        &request(Method::GET, "/admin/users", Some("alice"), "203.0.113.9"),
        &hasher,
    )
    .to_string();
    assert!(
        text.contains("unauthorized by limit `admin`")
            && text.contains("forbidden by `no-admin-outside`"),
        "{text}"
    );
    let text = tollgate::explain::explain(
        &plan,
        &request(Method::GET, "/h/x", Some("alice"), "198.51.100.1"),
        &hasher,
    )
    .to_string();
    assert!(
        text.contains("`gold` of `highest` (from Cedar annotation `@rl_tier` (permitted by `staff`, `gold-for-writers`: pro, gold))"),
        "{text}"
    );
}

/// Through the tower layer: a 403 problem naming the policies, and the app never sees it.
#[tokio::test]
async fn the_layer_refuses_an_unauthorized_request_with_403() {
    use tower::ServiceExt;
    let dir = policy_dir();
    let engine = std::sync::Arc::new(Engine::new(plan(dir.path()), MemoryStore::new()));
    let options = tollgate::middleware::HttpOptions {
        identifier: tollgate::identity::Identifier::new()
            .with_trusted_proxies(vec!["127.0.0.0/8".parse().unwrap()])
            .with_user_header(http::HeaderName::from_static("x-user")),
        ..Default::default()
    };
    let app = axum::Router::new()
        .route(
            "/admin/users",
            axum::routing::get(|| async { "the admin page" }),
        )
        .layer(tollgate::RateLimitLayer::new(engine).with_options(options));
    let send = |user: &'static str, client: &'static str| {
        let app = app.clone();
        async move {
            let headers = [("x-user", user), ("x-forwarded-for", client)];
            let request = support::from_peer("GET", "/admin/users", "127.0.0.1", &headers);
            app.oneshot(request).await.unwrap()
        }
    };
    // Through the trusted proxy, alice from outside the private network.
    let refused = send("alice", "203.0.113.9").await;
    assert_eq!(refused.status(), 403);
    let body = axum::body::to_bytes(refused.into_body(), 1 << 16)
        .await
        .unwrap();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:unauthorized");
    assert_eq!(problem["determining_policies"], json!(["no-admin-outside"]));
    assert_eq!(send("alice", "10.1.1.1").await.status(), 200);
    assert_eq!(
        send("bob", "10.1.1.1").await.status(),
        403,
        "nothing permits bob"
    );
}

#[path = "support/cedar_gen.rs"]
mod cedar_gen;

mod indexed_evaluation {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    /// A plan, the actions its schema declares, the users asked about.
    type Case = (tollgate::Plan, Vec<&'static str>, Vec<String>);

    /// The generated 50-policy set and the shipped policies, with the answer cache off so
    /// that every question goes through the index.
    fn sets() -> Vec<Case> {
        let dir = tempfile::tempdir().unwrap();
        cedar_gen::write(dir.path(), 50);
        let generated = plan(dir.path()).with_cedar_cache(1, Duration::ZERO);
        let shipped = plan(Path::new("policies")).with_cedar_cache(1, Duration::ZERO);
        let mut users: Vec<String> = (0..100).map(|u| format!("u{u}")).collect();
        users.extend(["alice", "bob", "carol", "r0"].map(String::from));
        vec![
            (
                generated,
                vec!["read", "write", "delete", "admin"],
                users.clone(),
            ),
            (shipped, vec!["read", "write", "admin"], users),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever the request, the indexed answer is Cedar's unsliced `is_authorized`:
        /// the same decision, the same determining policies, the same errors.
        #[test]
        fn indexed_answers_equal_cedars_unsliced_ones(
            set in 0usize..2,
            user in 0usize..104,
            anonymous in any::<bool>(),
            action in 0usize..4,
            resource in 0usize..14,
            private in any::<bool>(),
            post in any::<bool>(),
        ) {
            let sets = SETS.with(|s| s.clone());
            let (plan, actions, users) = &sets[set];
            let cedar = &plan.cedar()[0];
            let action = actions[action % actions.len()];
            let resource = match resource {
                0..=9 => format!("/api/v1/res{resource}/{{id}}"),
                10 => "/api/v1/admin/**".to_owned(),
                11 => "/api/v1/res3/42".to_owned(),
                12 => "/".to_owned(),
                _ => "/api/**".to_owned(),
            };
            let ip = if private { "10.2.3.4" } else { "203.0.113.77" };
            let method = if post { Method::POST } else { Method::GET };
            let request = if anonymous {
                request(method, &resource, None, ip)
            } else {
                request(method, &resource, Some(&users[user]), ip)
            };
            let hasher = tollgate::plan::KeyHasher::random();
            let principal = cedar.principal(&request, &hasher);
            let indexed = cedar.decide(&principal, action, &resource, &request, 0);
            let unsliced = cedar.decide_unsliced(&principal, action, &resource, &request);
            prop_assert_eq!(&*indexed, &unsliced);
        }
    }

    thread_local! {
        static SETS: std::rc::Rc<Vec<Case>> =
            std::rc::Rc::new(sets());
    }
}
