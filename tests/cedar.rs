//! Cedar with the limits, evaluated for real on the memory store and on a real
//! `redis-server`: authorization (403, nothing counted, determining policies named),
//! conditions (`cedar permits`, `principal in`), tiers chosen by annotations (`pick
//! highest|lowest|first`); the indexed, cached evaluation agrees with Cedar's own unsliced
//! one; and the decision API answers a denial as `docs/openapi.yaml` says.

mod support;

use std::path::Path;

use http::Method;
use serde_json::json;
use tollgate::store::redis::RedisStore;
use tollgate::store::{MemoryStore, Store};
use tollgate::verdict::{Action, Verdict};
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

fn report<'v>(verdict: &'v Verdict, limit: &str) -> &'v tollgate::verdict::LimitReport {
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
            roles in proptest::option::of(0usize..5),
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
            // Roles the request names (`parents Role from claim("roles")`), beside the file's.
            let request = match roles {
                Some(r) => request.with_claim(
                    "roles",
                    ["r1", "r3, r7", "staff", "writer,staff", "r0,nobody"][r],
                ),
                None => request,
            };
            let hasher = tollgate::plan::KeyHasher::random();
            let principal = cedar.principal(&request, &hasher);
            let question = tollgate::authz::Question {
                principal: &principal,
                action,
                resource: &resource,
                tier: None,
            };
            let indexed = cedar.decide(&question, &request, 0);
            let unsliced = cedar.decide_unsliced(&question, &request);
            prop_assert_eq!(&*indexed, &unsliced);
        }
    }

    thread_local! {
        static SETS: std::rc::Rc<Vec<Case>> =
            std::rc::Rc::new(sets());
    }
}

const ORG_SCHEMA: &str = r#"
namespace Org {
  entity Role;
  entity Tenant;
  entity User in [Role, Tenant];
  entity Endpoint;
  type Request = { ip: ipaddr, method: String, path: String, host: String, tier?: String, client?: String };
  action "read", "write", "export" appliesTo { principal: User, resource: Endpoint, context: Request };
}
"#;

const ORG_POLICIES: &str = r#"
@id("editors-write")
permit (principal in Org::Role::"editor", action == Org::Action::"write", resource);

@id("no-legacy-writes")
forbid (principal, action == Org::Action::"write", resource)
when { context has client && context.client == "legacy-cli" };

@id("acme-pro-exports")
permit (principal in Org::Tenant::"acme", action == Org::Action::"export", resource)
when { context has tier && context.tier == "pro" };

@id("readers")
permit (principal in Org::Role::"reader", action == Org::Action::"read", resource);
"#;

const ORG_ENTITIES: &str = r#"[
  { "uid": { "type": "Org::Role", "id": "editor" }, "attrs": {}, "parents": [] },
  { "uid": { "type": "Org::Role", "id": "reader" }, "attrs": {}, "parents": [] },
  { "uid": { "type": "Org::Tenant", "id": "acme" }, "attrs": {}, "parents": [] },
  { "uid": { "type": "Org::User", "id": "dave" }, "attrs": {},
    "parents": [{ "type": "Org::Role", "id": "editor" }] }
]"#;

const ORG_LIMITS: &str = r#"
version 1;
import cedar "org.cedar" schema "org.cedarschema" namespace "Org" entities "org.entities.json" {
  parents Role from claim("roles");
  parents Tenant from header("X-Tenant");
  context "client" from header("X-Client") trusted;
}
tiers plans { from header("X-Plan") trusted; default free;
  tier free { api = 10/min; } tier pro extends free { api = 100/min; } }

limit edit { match { route POST "/docs/**"; } authorize action "write"; key user_id;
  algorithm fixed_window; rate 100/min; }
limit export { match { route GET "/export"; } authorize action "export"; key user_id;
  algorithm fixed_window; rate plans.api; }
limit editors { match { route GET "/docs/**"; } when cedar principal in Role "editor";
  key user_id; algorithm fixed_window; rate 5/min; }
limit reads { match { route GET "/r"; } when cedar permits action "read"; key user_id;
  algorithm fixed_window; rate 5/min; }
"#;

fn org_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("org.cedarschema", ORG_SCHEMA),
        ("org.cedar", ORG_POLICIES),
        ("org.entities.json", ORG_ENTITIES),
        ("org.rl", ORG_LIMITS),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Parents from a claim and a trusted header (beside the entities file's), context
/// attributes from a header and the limit's tier, against `store`.
async fn request_parents_and_context_on<S: Store>(store: S) {
    let dir = org_dir();
    let engine = Engine::new(plan(dir.path()), store);
    let user = |path: &str, method: Method, name: &str| {
        RequestCtx::new(method, path)
            .with_client_ip([198, 51, 100, 1].into())
            .with_user_id(name)
    };
    let unauthorized = |v: &Verdict| match &v.action {
        Action::Unauthorized { policies, .. } => {
            Some(policies.iter().map(|p| p.to_string()).collect::<Vec<_>>())
        }
        _ => None,
    };
    let applies = |v: &Verdict, limit: &str| v.reports.iter().any(|r| &*r.limit == limit);

    // A role from the token's claims.
    let erin = || user("/docs/1", Method::POST, "erin");
    let with_role = engine
        .decide(&erin().with_claim("roles", "viewer, editor"))
        .await;
    assert!(with_role.is_allowed(), "{:?}", with_role.action);
    let without = engine.decide(&erin()).await;
    assert_eq!(unauthorized(&without), Some(vec![]), "no role, no permit");
    // A context attribute from a header: the forbid names it.
    let legacy = engine
        .decide(
            &erin()
                .with_claim("roles", "editor")
                .try_header("X-Client", "legacy-cli")
                .unwrap(),
        )
        .await;
    assert_eq!(
        unauthorized(&legacy),
        Some(vec!["no-legacy-writes".to_owned()])
    );
    // `principal in` sees claimed roles and the entities file's.
    let read_docs = |who: &str, roles: Option<&str>| {
        let mut r = user("/docs/1", Method::GET, who);
        if let Some(roles) = roles {
            r = r.with_claim("roles", roles);
        }
        r
    };
    assert!(applies(
        &engine.decide(&read_docs("erin", Some("editor"))).await,
        "editors"
    ));
    assert!(!applies(
        &engine.decide(&read_docs("erin", None)).await,
        "editors"
    ));
    assert!(applies(
        &engine.decide(&read_docs("dave", None)).await,
        "editors"
    ));

    // Cached answers are per principal *and* its parents: the same user with and without
    // the role, one after the other, within the cache's lifetime.
    for _ in 0..2 {
        let reader = engine
            .decide(&user("/r", Method::GET, "erin").with_claim("roles", "reader"))
            .await;
        assert!(applies(&reader, "reads"));
        let plain = engine.decide(&user("/r", Method::GET, "erin")).await;
        assert!(!applies(&plain, "reads"));
    }

    // A tenant from a header believed only from trusted proxies, and the tier in the
    // context: dave (an editor in the file) of tenant acme on the pro plan may export.
    let export = |tenant: &str, plan: &str, trusted: bool| {
        let r = user("/export", Method::GET, "dave")
            .try_header("X-Tenant", tenant)
            .unwrap()
            .try_header("X-Plan", plan)
            .unwrap();
        if trusted { r.with_trusted_headers() } else { r }
    };
    let exported = engine.decide(&export("acme", "pro", true)).await;
    assert!(exported.is_allowed(), "{:?}", exported.action);
    assert_eq!(report(&exported, "export").decision.limit, 100);
    assert!(
        unauthorized(&engine.decide(&export("acme", "free", true)).await).is_some(),
        "the context's tier is free"
    );
    assert!(
        unauthorized(&engine.decide(&export("acme", "pro", false)).await).is_some(),
        "a tenant header from a client that is not a trusted proxy is not believed"
    );
    assert!(unauthorized(&engine.decide(&export("globex", "pro", true)).await).is_some());
    // Dave keeps the file's role with parents from the request.
    let dave_writes = engine
        .decide(
            &user("/docs/1", Method::POST, "dave")
                .try_header("X-Tenant", "acme")
                .unwrap()
                .with_trusted_headers(),
        )
        .await;
    assert!(dave_writes.is_allowed(), "{:?}", dave_writes.action);

    // Explain names the parents the request brought.
    let text = tollgate::explain::explain(
        engine.plan().as_ref(),
        &read_docs("erin", Some("editor")),
        &tollgate::plan::KeyHasher::random(),
    )
    .to_string();
    assert!(
        text.contains(r#"Org::User::"erin" (in Org::Role::"editor" from the request)"#),
        "{text}"
    );
}

#[tokio::test]
async fn request_parents_and_context_on_the_memory_store() {
    request_parents_and_context_on(MemoryStore::new()).await;
}

#[tokio::test]
async fn request_parents_and_context_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let store = RedisStore::connect(&redis.url(), std::time::Duration::from_secs(2))
        .await
        .expect("the store connects");
    request_parents_and_context_on(store).await;
}

/// Through the layer with a verified JWT: the roles its `roles` claim lists (a JSON array)
/// are the principal's parents; a forged token's roles count for nothing.
#[tokio::test]
async fn roles_from_a_verified_token_reach_cedar() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use tower::ServiceExt;
    const SECRET: &[u8] = b"the-verification-secret-32-bytes!";
    let dir = org_dir();
    let engine = std::sync::Arc::new(Engine::new(plan(dir.path()), MemoryStore::new()));
    let identifier = support::jwt_identifier(SECRET);
    let app = axum::Router::new()
        .route("/docs/{id}", axum::routing::post(|| async { "saved" }))
        .layer(tollgate::RateLimitLayer::new(engine).with_options(
            tollgate::middleware::HttpOptions {
                identifier,
                ..Default::default()
            },
        ));
    let token = |roles: serde_json::Value, key: &[u8]| {
        let exp = jsonwebtoken::get_current_timestamp() + 3600;
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({ "sub": "erin", "exp": exp, "roles": roles }),
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let send = |token: String| {
        let app = app.clone();
        async move {
            let bearer = format!("Bearer {token}");
            let request = support::from_peer(
                "POST",
                "/docs/1",
                "198.51.100.1",
                &[("Authorization", bearer.as_str())],
            );
            app.oneshot(request).await.unwrap().status()
        }
    };
    assert_eq!(send(token(json!(["reader", "editor"]), SECRET)).await, 200);
    assert_eq!(send(token(json!(["reader"]), SECRET)).await, 403);
    assert_eq!(
        send(token(
            json!(["editor"]),
            b"not-the-secret-at-all-not-at-all"
        ))
        .await,
        403,
        "a forged token names no role"
    );
}

/// With parents from the request, evaluation runs over the entities it can reach, not a
/// copy of the file: entities that attributes name (on the principal, on a parent, on a
/// policy's literal), action groups and the resource's ancestors must all be there. Each
/// answer is compared with the evaluation over the whole file.
#[test]
fn request_parents_reach_every_entity_the_policies_read() {
    const SCHEMA: &str = r#"
namespace Deep {
  entity Plan = { level: Long };
  entity Team = { plan: Plan };
  entity Role = { team: Team };
  entity Switch = { open: Bool };
  entity User in [Role] = { home: Team };
  entity Area;
  entity Endpoint in [Area];
  type Request = { ip: ipaddr, method: String, path: String, host: String };
  action "read", "write";
  action "edit" in ["write"] appliesTo { principal: User, resource: Endpoint, context: Request };
  action "view" in ["read"] appliesTo { principal: User, resource: Endpoint, context: Request };
}
"#;
    const POLICIES: &str = r#"
@id("gold-teams")
permit (principal, action in Deep::Action::"write", resource in Deep::Area::"docs")
when { principal in Deep::Role::"lead" && Deep::Role::"lead".team.plan.level >= 2 };
@id("home-plan")
permit (principal, action == Deep::Action::"view", resource)
when { principal.home.plan.level >= 3 && Deep::Switch::"views".open };
@id("writers")
permit (principal in Deep::Role::"writer", action in Deep::Action::"write", resource);
"#;
    const ENTITIES: &str = r#"[
  { "uid": { "type": "Deep::Plan", "id": "gold" }, "attrs": { "level": 3 }, "parents": [] },
  { "uid": { "type": "Deep::Plan", "id": "silver" }, "attrs": { "level": 2 }, "parents": [] },
  { "uid": { "type": "Deep::Team", "id": "core" },
    "attrs": { "plan": { "__entity": { "type": "Deep::Plan", "id": "gold" } } }, "parents": [] },
  { "uid": { "type": "Deep::Team", "id": "edge" },
    "attrs": { "plan": { "__entity": { "type": "Deep::Plan", "id": "silver" } } }, "parents": [] },
  { "uid": { "type": "Deep::Role", "id": "lead" },
    "attrs": { "team": { "__entity": { "type": "Deep::Team", "id": "edge" } } }, "parents": [] },
  { "uid": { "type": "Deep::Role", "id": "writer" },
    "attrs": { "team": { "__entity": { "type": "Deep::Team", "id": "core" } } }, "parents": [] },
  { "uid": { "type": "Deep::Switch", "id": "views" }, "attrs": { "open": true }, "parents": [] },
  { "uid": { "type": "Deep::User", "id": "gina" },
    "attrs": { "home": { "__entity": { "type": "Deep::Team", "id": "core" } } }, "parents": [] },
  { "uid": { "type": "Deep::User", "id": "hugo" },
    "attrs": { "home": { "__entity": { "type": "Deep::Team", "id": "edge" } } },
    "parents": [{ "type": "Deep::Role", "id": "writer" }] },
  { "uid": { "type": "Deep::Area", "id": "docs" }, "attrs": {}, "parents": [] },
  { "uid": { "type": "Deep::Endpoint", "id": "/docs/{id}" }, "attrs": {},
    "parents": [{ "type": "Deep::Area", "id": "docs" }] }
]"#;
    const LIMITS: &str = r#"
version 1;
import cedar "deep.cedar" schema "deep.cedarschema" namespace "Deep" entities "deep.entities.json" {
  parents Role from claim("roles");
}
limit l { match { route GET "/docs/{id}"; } when cedar permits action "view"; rate 1/s; }
limit m { match { route POST "/docs/{id}"; } when cedar permits action "edit"; rate 1/s; }
"#;
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("deep.cedarschema", SCHEMA),
        ("deep.cedar", POLICIES),
        ("deep.entities.json", ENTITIES),
        ("deep.rl", LIMITS),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let plan = plan(dir.path()).with_cedar_cache(1, std::time::Duration::ZERO);
    let cedar = &plan.cedar()[0];
    let hasher = tollgate::plan::KeyHasher::random();
    let mut allowed = 0;
    for user in ["gina", "hugo", "ivan"] {
        for roles in [
            None,
            Some("lead"),
            Some("writer"),
            Some("lead,writer"),
            Some("nobody"),
        ] {
            for (action, resource) in [
                ("view", "/docs/{id}"),
                ("edit", "/docs/{id}"),
                ("edit", "/other"),
            ] {
                let mut request = request(Method::GET, "/docs/1", Some(user), "198.51.100.1");
                if let Some(roles) = roles {
                    request = request.with_claim("roles", roles);
                }
                let principal = cedar.principal(&request, &hasher);
                let question = tollgate::authz::Question {
                    principal: &principal,
                    action,
                    resource,
                    tier: None,
                };
                let reached = cedar.decide(&question, &request, 0);
                let whole = cedar.decide_unsliced(&question, &request);
                assert_eq!(*reached, whole, "{user} {roles:?} {action} {resource}");
                // ivan is in no file: `principal.home` is an error for him, alike in both.
                assert_eq!(
                    whole.errors.is_empty(),
                    user != "ivan" || action != "view",
                    "{:?}",
                    whole.errors
                );
                allowed += usize::from(whole.allowed);
            }
        }
    }
    // gina views (her home team's plan is gold) whatever her roles; a lead edits docs only
    // when the lead role's team plan is at least 2 (edge: silver, 2); writers edit anything.
    assert!(allowed > 10 && allowed < 45, "{allowed}");
}

/// `authorize` in `defaults` applies to every limit of the file; a limit's own `authorize`
/// wins.
#[tokio::test]
async fn authorize_in_defaults_applies_to_every_limit_of_the_file() {
    let dir = policy_dir();
    std::fs::write(
        dir.path().join("shop.rl"),
        r#"
version 1;
import cedar "shop.cedar" schema "shop.cedarschema" namespace "Shop" entities "shop.entities.json";
defaults { authorize action "write"; key user_id; algorithm fixed_window; }
limit orders { match { route POST "/orders"; } rate 10/min; }
limit carts { match { route POST "/carts"; } rate 10/min; }
limit settings { match { route POST "/settings"; } authorize action "admin"; rate 10/min; }
"#,
    )
    .unwrap();
    let engine = Engine::new(plan(dir.path()), MemoryStore::new());
    let ask = |path: &str, user: &str| {
        let request = request(Method::POST, path, Some(user), "203.0.113.9");
        let engine = &engine;
        async move { engine.decide(&request).await.action }
    };
    for path in ["/orders", "/carts"] {
        assert!(
            matches!(ask(path, "bob").await, Action::Allow),
            "a writer may write {path}"
        );
        match ask(path, "carol").await {
            Action::Unauthorized { limit, action, .. } => {
                assert_eq!(&*limit, &path[1..]);
                assert_eq!(&*action, "write", "the default's action");
            }
            other => panic!("carol on {path}: {other:?}"),
        }
    }
    match ask("/settings", "bob").await {
        Action::Unauthorized {
            action, policies, ..
        } => {
            assert_eq!(&*action, "admin", "the limit's own authorize wins");
            assert_eq!(
                policies.iter().map(|p| &**p).collect::<Vec<_>>(),
                ["no-admin-outside"]
            );
        }
        other => panic!("bob on /settings: {other:?}"),
    }
}

/// The import may name the principal and resource entity types of a schema that does not
/// call them `User` and `Endpoint`.
#[tokio::test]
async fn the_import_names_the_principal_and_resource_types() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "bank.cedarschema",
            r#"namespace Bank {
  entity Team;
  entity Account in [Team];
  entity Route;
  action "pay" appliesTo { principal: Account, resource: Route };
}"#,
        ),
        (
            "bank.cedar",
            r#"@id("treasury-pays")
permit (principal in Bank::Team::"treasury", action == Bank::Action::"pay", resource == Bank::Route::"/pay/{id}");"#,
        ),
        (
            "bank.rl",
            r#"version 1;
import cedar "bank.cedar" schema "bank.cedarschema" namespace "Bank" {
  principal Account;
  resource Route;
  parents Team from claim("teams");
}
limit pay { match { route POST "/pay/{id}"; } authorize action "pay"; key user_id; rate 5/min; }
"#,
        ),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let engine = Engine::new(plan(dir.path()), MemoryStore::new());
    let pay = |teams: &str| {
        request(Method::POST, "/pay/7", Some("acct-1"), "198.51.100.1").with_claim("teams", teams)
    };
    assert!(engine.decide(&pay("treasury")).await.is_allowed());
    assert!(matches!(
        engine.decide(&pay("sales")).await.action,
        Action::Unauthorized { .. }
    ));
    let text = tollgate::explain::explain(
        engine.plan().as_ref(),
        &pay("treasury"),
        &tollgate::plan::KeyHasher::random(),
    )
    .to_string();
    assert!(text.contains(r#"Bank::Account::"acct-1""#), "{text}");
}
