//! Envoy rate-limit requests (a domain and one descriptor) in the engine: which items meet
//! them, exact descriptor shapes, entries anywhere, keys (secrets hashed, `remote_address`
//! as the client address), tiers from an entry, `hits_addend` as the cost.

use http::Method;
use tollgate::request::Descriptor;
use tollgate::store::MemoryStore;
use tollgate::{Engine, ManualClock, PolicySet, RequestCtx, Timestamp, compile};

const POLICY: &str = r#"
tiers plans {
  from descriptor("plan");
  default free;
  tier free { calls = 2/min; }
  tier pro { calls = 4/min; }
}

// Every HTTP request: never a descriptor.
limit http_everything { rate 1/min; }

limit per_address {
  match { domain "edge"; descriptor ["remote_address"]; }
  key ip;
  rate 2/min;
}

limit nested {
  match { domain "messaging"; descriptor ["database" == "users", "to_number"]; }
  key descriptor("to_number");
  rate 1/min;
}

limit anywhere {
  match { domain ~= "^api"; descriptor("path") ~= "^/v1/"; }
  key descriptor("client") + domain;
  rate plans.calls;
}

limit by_key {
  match { domain "keys"; descriptor ["api_key"]; }
  key descriptor("api_key");
  rate 3/min;
}

denylist blocked { descriptor("client") == "evil"; }
"#;

fn engine() -> Engine<MemoryStore, ManualClock> {
    let plan = compile(&PolicySet::from_sources([("envoy.rl", POLICY)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let clock = ManualClock::new(Timestamp::from_secs(1_700_006_400));
    Engine::with_clock(plan, MemoryStore::new(), clock)
}

fn descriptor(domain: &str, entries: &[(&str, &str)]) -> RequestCtx {
    RequestCtx::for_descriptor(Descriptor::new(
        domain,
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    ))
}

/// The limits that counted the request.
fn limits(v: &tollgate::Verdict) -> Vec<&str> {
    v.reports.iter().map(|r| &*r.limit).collect()
}

#[tokio::test]
async fn descriptor_limits_and_http_limits_never_meet_the_other_kind() {
    let engine = engine();
    let d = descriptor("edge", &[("remote_address", "203.0.113.7")]);
    let v = engine.decide(&d).await;
    assert_eq!(
        limits(&v),
        ["per_address"],
        "no HTTP limit counts a descriptor"
    );
    let http = RequestCtx::new(Method::POST, tollgate::request::SHOULD_RATE_LIMIT)
        .with_client_ip("203.0.113.7".parse().unwrap());
    let v = engine.decide(&http).await;
    assert_eq!(
        limits(&v),
        ["http_everything"],
        "no descriptor limit counts HTTP"
    );
}

#[tokio::test]
async fn a_shape_matches_exactly_those_entries_in_that_order() {
    let engine = engine();
    let exact = [("database", "users"), ("to_number", "+15550100")];
    assert_eq!(
        limits(&engine.decide(&descriptor("messaging", &exact)).await),
        ["nested"]
    );
    for other in [
        &[("database", "users")][..],
        &[("to_number", "+15550100"), ("database", "users")],
        &[("database", "orders"), ("to_number", "+15550100")],
        &[("database", "users"), ("to_number", "+1"), ("extra", "x")],
    ] {
        let v = engine.decide(&descriptor("messaging", other)).await;
        assert!(limits(&v).is_empty(), "{other:?} matched {:?}", limits(&v));
    }
    // Another domain: nothing.
    assert!(limits(&engine.decide(&descriptor("edge", &exact)).await).is_empty());
}

#[tokio::test]
async fn the_remote_address_counts_as_the_client_and_the_quota_holds() {
    let engine = engine();
    let from = |ip| descriptor("edge", &[("remote_address", ip)]);
    assert!(engine.decide(&from("203.0.113.7")).await.is_allowed());
    assert!(engine.decide(&from("203.0.113.7")).await.is_allowed());
    let third = engine.decide(&from("203.0.113.7")).await;
    assert!(!third.is_allowed());
    assert_eq!(
        third.reports[0].key.to_string(),
        "envoy:{ip:203.0.113.7/32}:per_address"
    );
    assert!(engine.decide(&from("203.0.113.8")).await.is_allowed());
}

#[tokio::test]
async fn entries_anywhere_tiers_from_an_entry_and_hits_as_cost() {
    let engine = engine();
    let call = |client: &str, plan: &str| {
        descriptor(
            "api-eu",
            &[("plan", plan), ("client", client), ("path", "/v1/items")],
        )
    };
    let v = engine.decide(&call("c1", "pro")).await;
    assert_eq!(limits(&v), ["anywhere"]);
    assert_eq!(v.reports[0].tier.as_deref(), Some("pro"));
    assert_eq!(v.reports[0].decision.limit, 4);
    assert_eq!(
        v.reports[0].key.to_string(),
        "envoy:{d.client:c1+domain:api-eu}:anywhere"
    );
    // Three more hits at once: over the pro quota of 4 (1 used).
    let v = engine.decide(&call("c1", "pro").with_cost(4)).await;
    assert!(!v.is_allowed());
    let v = engine.decide(&call("c1", "pro").with_cost(3)).await;
    assert!(v.is_allowed());
    assert_eq!(v.reports[0].decision.remaining, 0);
    // The free tier by default.
    let v = engine.decide(&call("c2", "unknown")).await;
    assert_eq!(v.reports[0].tier.as_deref(), Some("free"));
    // A path outside the expression: no limit.
    let other = descriptor("api-eu", &[("client", "c1"), ("path", "/v2/items")]);
    assert!(limits(&engine.decide(&other).await).is_empty());
}

#[tokio::test]
async fn credentials_in_entries_never_appear_in_keys() {
    let engine = engine();
    let v = engine
        .decide(&descriptor("keys", &[("api_key", "sk_live_hunter2")]))
        .await;
    let key = v.reports[0].key.to_string();
    assert!(!key.contains("hunter2"), "{key}");
    assert!(key.starts_with("envoy:{d.api_key:#"), "{key}");
}

#[tokio::test]
async fn denylist_lines_that_name_descriptors_refuse_descriptors() {
    let engine = engine();
    let v = engine
        .decide(&descriptor("api", &[("client", "evil"), ("path", "/v1/x")]))
        .await;
    assert!(!v.is_allowed());
    assert!(v.reports.is_empty());
}
