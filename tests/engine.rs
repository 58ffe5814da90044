//! The engine on the memory store and a manual clock: lists, several limits at once, shadow
//! mode, soft thresholds, priorities, cost, tiers, bans, concurrency.

use std::time::Duration;

use http::{Method, StatusCode};
use tollgate::store::MemoryStore;
use tollgate::{Action, Engine, ManualClock, PolicySet, RequestCtx, Timestamp, compile};

/// A day boundary, so that every window starts aligned.
const START: u64 = 1_700_006_400;

fn engine(policy: &str) -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let plan = compile(&PolicySet::from_sources([("test.rl", policy)]))
        .unwrap_or_else(|e| panic!("policy does not compile:\n{}", e.render_plain(100)));
    let clock = ManualClock::new(Timestamp::from_secs(START));
    (
        Engine::with_clock(plan, MemoryStore::new(), clock.clone()),
        clock,
    )
}

fn get(path: &str) -> RequestCtx {
    RequestCtx::new(Method::GET, path).with_client_ip("198.51.100.7".parse().unwrap())
}

fn with(request: RequestCtx, name: &str, value: &str) -> RequestCtx {
    request.try_header(name, value).unwrap()
}

#[tokio::test]
async fn rejects_after_the_quota_with_retry_after_and_reason() {
    let (engine, clock) = engine(
        r#"limit api { match { route ANY "/api/**"; } algorithm fixed_window; rate 2/min;
           on_exceed reject 429 reason "slow down"; }"#,
    );
    assert!(engine.decide(&get("/api/a")).await.is_allowed());
    assert!(engine.decide(&get("/api/b")).await.is_allowed());
    clock.advance(Duration::from_secs(15));
    let v = engine.decide(&get("/api/c")).await;
    match &v.action {
        Action::Reject {
            status,
            limit,
            reason,
            retry_after,
        } => {
            assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(&**limit, "api");
            assert_eq!(reason.as_deref(), Some("slow down"));
            assert_eq!(*retry_after, Some(Duration::from_secs(45)));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let headline = v.headline().unwrap();
    assert_eq!(
        (headline.decision.limit, headline.decision.remaining),
        (2, 0)
    );
    // Paths outside the route are not limited.
    assert!(engine.decide(&get("/health")).await.reports.is_empty());
    clock.advance(Duration::from_secs(45));
    assert!(engine.decide(&get("/api/d")).await.is_allowed());
}

#[tokio::test]
async fn several_limits_are_all_or_nothing() {
    // `burst` allows 3 per minute, `steady` 5 per minute: once `burst` rejects, `steady` must
    // not have been charged for the rejected requests.
    let (engine, _clock) = engine(
        r#"limit burst  { match { route ANY "/x"; } algorithm fixed_window; rate 3/min; }
           limit steady { match { route ANY "/x"; } algorithm fixed_window; rate 5/min; }"#,
    );
    for _ in 0..3 {
        assert!(engine.decide(&get("/x")).await.is_allowed());
    }
    for _ in 0..10 {
        let v = engine.decide(&get("/x")).await;
        assert!(matches!(&v.action, Action::Reject { limit, .. } if &**limit == "burst"));
    }
    let v = engine.decide(&get("/x")).await;
    let steady = v.reports.iter().find(|r| &*r.limit == "steady").unwrap();
    assert_eq!(
        steady.decision.remaining, 2,
        "rejected requests consumed `steady`"
    );
}

#[tokio::test]
async fn shadow_mode_reports_but_never_rejects() {
    let (engine, _clock) = engine(
        r#"limit tuned { match { route ANY "/x"; } algorithm fixed_window; rate 1/min; mode shadow; }
           limit real  { match { route ANY "/x"; } algorithm fixed_window; rate 10/min; }"#,
    );
    assert!(engine.decide(&get("/x")).await.is_allowed());
    let v = engine.decide(&get("/x")).await;
    assert_eq!(v.action, Action::Allow);
    let shadow: Vec<_> = v.shadow_rejections().map(|r| &*r.limit).collect();
    assert_eq!(shadow, ["tuned"]);
    // The enforced limit still counted both requests.
    let real = v.reports.iter().find(|r| &*r.limit == "real").unwrap();
    assert_eq!(real.decision.remaining, 8);
}

#[tokio::test]
async fn soft_thresholds_warn_then_delay() {
    let (engine, _clock) = engine(
        r#"limit api { match { route ANY "/x"; } algorithm fixed_window; rate 10/min;
           soft warn at 50%, delay 250ms at 80%; }"#,
    );
    let mut actions = Vec::new();
    for _ in 0..11 {
        actions.push(engine.decide(&get("/x")).await.action);
    }
    let delay = Action::Delay(Duration::from_millis(250));
    assert_eq!(
        &actions[..4],
        &[Action::Allow, Action::Allow, Action::Allow, Action::Allow]
    );
    assert_eq!(&actions[4..7], &[Action::Warn, Action::Warn, Action::Warn]);
    assert_eq!(&actions[7..10], &[delay.clone(), delay.clone(), delay]);
    assert!(matches!(actions[10], Action::Reject { .. }));
}

#[tokio::test]
async fn safelist_bypasses_and_denylist_forbids() {
    let (engine, _clock) = engine(
        r#"limit api { match { route ANY "/**"; } rate 1/min; }
           safelist internal { ip in [10.0.0.0/8]; }
           denylist scanners { user_agent ~= "(?i)sqlmap"; respond 403 reason "no scanners"; }"#,
    );
    let internal = RequestCtx::new(Method::GET, "/a").with_client_ip("10.1.2.3".parse().unwrap());
    for _ in 0..5 {
        let v = engine.decide(&internal).await;
        assert!(matches!(&v.action, Action::Bypass { list } if &**list == "internal"));
    }
    let scanner = with(get("/a"), "User-Agent", "sqlmap/1.7");
    match engine.decide(&scanner).await.action {
        Action::Forbid {
            status,
            list,
            reason,
            retry_after,
        } => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(&*list, "scanners");
            assert_eq!(reason.as_deref(), Some("no scanners"));
            assert_eq!(retry_after, None, "a policy's denylist does not end");
        }
        other => panic!("expected forbid, got {other:?}"),
    }
    // The refusal consumed nothing: the client's one request per minute is still there.
    let ok = with(get("/a"), "User-Agent", "curl/8");
    assert!(engine.decide(&ok).await.is_allowed());
}

#[tokio::test]
async fn the_highest_priority_rejection_is_reported() {
    let (engine, _clock) = engine(
        r#"limit low  { match { route ANY "/x"; } algorithm fixed_window; rate 1/min; priority 1;
                        on_exceed reject 429 reason "low"; }
           limit high { match { route ANY "/x"; } algorithm fixed_window; rate 1/h; priority 9;
                        on_exceed reject 503 reason "high"; }"#,
    );
    assert!(engine.decide(&get("/x")).await.is_allowed());
    match engine.decide(&get("/x")).await.action {
        Action::Reject { status, limit, .. } => {
            assert_eq!(&*limit, "high");
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn cost_comes_from_a_header_within_bounds() {
    let (engine, _clock) = engine(
        r#"limit search { match { route GET "/search"; } algorithm fixed_window; rate 10/min;
           cost header("X-Cost") default 2 max 5; }"#,
    );
    let remaining = |v: &tollgate::Verdict| v.reports[0].decision.remaining;
    let v = engine.decide(&with(get("/search"), "X-Cost", "3")).await;
    assert_eq!(remaining(&v), 7);
    let v = engine.decide(&get("/search")).await; // default 2
    assert_eq!(remaining(&v), 5);
    let v = engine.decide(&with(get("/search"), "X-Cost", "1000")).await; // capped at 5
    assert_eq!(remaining(&v), 0);
    let v = engine
        .decide(&with(get("/search"), "X-Cost", "nonsense"))
        .await;
    assert!(!v.is_allowed());
}

#[tokio::test]
async fn tiers_choose_the_rate_and_blocked_refuses() {
    let (engine, _clock) = engine(
        r#"tiers plans { from header("X-Plan"); default free;
             tier free { api = 1/min; } tier pro extends free { api = 3/min; }
             tier vip extends pro { api = unlimited; } tier banned { api = blocked; } }
           limit api { match { route ANY "/x"; } algorithm fixed_window; rate plans.api; }"#,
    );
    // The headers come from a trusted proxy (see `header_tiers_are_believed_only_from_…`).
    let plan = |p: &str| with(get("/x"), "X-Plan", p).with_trusted_headers();
    assert!(engine.decide(&plan("free")).await.is_allowed());
    assert!(!engine.decide(&plan("free")).await.is_allowed());
    // Unknown plans fall back to the default, which this client has used up.
    assert!(!engine.decide(&plan("platinum")).await.is_allowed());

    let pro = RequestCtx::new(Method::GET, "/x")
        .with_client_ip("198.51.100.8".parse().unwrap())
        .try_header("X-Plan", "pro")
        .unwrap()
        .with_trusted_headers();
    for _ in 0..3 {
        let v = engine.decide(&pro).await;
        assert!(v.is_allowed());
        assert_eq!(v.reports[0].tier.as_deref(), Some("pro"));
    }
    assert!(!engine.decide(&pro).await.is_allowed());

    for _ in 0..10 {
        assert!(engine.decide(&plan("vip")).await.is_allowed());
    }
    let v = engine.decide(&plan("banned")).await;
    assert!(matches!(v.action, Action::Reject { .. }));
    assert_eq!(v.reports[0].algorithm, "blocked");
}

#[tokio::test]
async fn header_tiers_and_keys_are_believed_only_from_trusted_proxies_unless_marked() {
    let (engine, _clock) = engine(
        r#"tiers plans { from header("X-Plan"); default free;
             tier free { api = 1/min; } tier pro extends free { api = 100/min; } }
           tiers open { from header("X-Open-Plan") trusted; default free;
             tier free { open = 1/min; } tier pro extends free { open = 100/min; } }
           limit api { match { route ANY "/x"; } algorithm fixed_window; rate plans.api; }
           limit open { match { route ANY "/y"; } algorithm fixed_window; rate open.open; }
           limit per_client { match { route ANY "/z"; } key first_of(header("X-Client-Id"), ip);
                              algorithm fixed_window; rate 1/min; }"#,
    );
    // A client that claims `pro` itself gets the default tier.
    let claimed = with(get("/x"), "X-Plan", "pro");
    let v = engine.decide(&claimed).await;
    assert_eq!(v.reports[0].tier.as_deref(), Some("free"));
    assert!(!engine.decide(&claimed).await.is_allowed());
    // Through a trusted proxy, the header counts.
    let v = engine.decide(&claimed.clone().with_trusted_headers()).await;
    assert_eq!(v.reports[0].tier.as_deref(), Some("pro"));
    // `trusted` in the policy believes it from anyone.
    let v = engine.decide(&with(get("/y"), "X-Open-Plan", "pro")).await;
    assert_eq!(v.reports[0].tier.as_deref(), Some("pro"));
    // A client rotating its own X-Client-Id is still one client: its address.
    for (i, expected) in [true, false, false].into_iter().enumerate() {
        let rotated = with(get("/z"), "X-Client-Id", &format!("fresh-{i}"));
        let v = engine.decide(&rotated).await;
        assert_eq!(v.is_allowed(), expected, "request {i}");
        assert!(v.reports[0].key.contains("ip:"), "{}", v.reports[0].key);
    }
}

#[tokio::test]
async fn a_ban_outlasts_the_window() {
    let (engine, clock) = engine(
        r#"limit login { match { route POST "/login"; } key ip/24; algorithm fixed_window;
           rate 2/min; on_exceed reject 429 ban 10min; }"#,
    );
    let login =
        |ip: &str| RequestCtx::new(Method::POST, "/login").with_client_ip(ip.parse().unwrap());
    assert!(engine.decide(&login("203.0.113.1")).await.is_allowed());
    assert!(engine.decide(&login("203.0.113.2")).await.is_allowed()); // same /24
    // The rejection that starts the ban announces it, not the window's end.
    let first = engine.decide(&login("203.0.113.3")).await;
    assert!(!first.is_allowed());
    assert!(first.reports[0].banned);
    assert_eq!(
        first.reports[0].decision.retry_after,
        Some(Duration::from_secs(600))
    );
    assert_eq!(first.reports[0].decision.reset, Duration::from_secs(600));
    clock.advance(Duration::from_secs(120)); // a new window, but still banned
    let v = engine.decide(&login("203.0.113.4")).await;
    assert!(v.reports[0].banned);
    assert_eq!(
        v.reports[0].decision.retry_after,
        Some(Duration::from_secs(480))
    );
    assert!(
        engine.decide(&login("198.51.100.1")).await.is_allowed(),
        "another network"
    );
    clock.advance(Duration::from_secs(480));
    assert!(engine.decide(&login("203.0.113.5")).await.is_allowed());
}

#[tokio::test]
async fn concurrency_leases_are_released() {
    let (engine, clock) =
        engine(r#"limit exports { match { route GET "/export"; } rate 2 concurrent; lease 30s; }"#);
    let a = engine.decide(&get("/export")).await;
    let b = engine.decide(&get("/export")).await;
    assert!(a.is_allowed() && b.is_allowed());
    let c = engine.decide(&get("/export")).await;
    assert!(!c.is_allowed());
    assert!(c.leases.is_empty(), "a rejected request holds no lease");
    engine.release(&a.leases).await;
    assert!(engine.decide(&get("/export")).await.is_allowed());
    // Never released: leases lapse.
    clock.advance(Duration::from_secs(31));
    assert!(engine.decide(&get("/export")).await.is_allowed());
}

#[tokio::test]
async fn limits_without_a_key_value_count_by_address_unless_told_otherwise() {
    let (engine, _clock) = engine(
        r#"limit per_user { match { route ANY "/x"; } key user_id; rate 1/min; }
           limit optional { match { route ANY "/y"; } key user_id; rate 1/min; on_missing_key skip; }"#,
    );
    // No user: counted by address, so the second anonymous request is refused.
    let first = engine.decide(&get("/x")).await;
    assert!(first.is_allowed());
    assert_eq!(first.reports[0].key, "test:{ip:198.51.100.7/32}:per_user");
    assert!(!engine.decide(&get("/x")).await.is_allowed());
    // A user has a counter of their own.
    let alice = get("/x").with_user_id("alice");
    assert!(engine.decide(&alice).await.is_allowed());
    assert!(!engine.decide(&alice).await.is_allowed());
    // `on_missing_key skip`: not limited, and said so.
    for _ in 0..3 {
        let v = engine.decide(&get("/y")).await;
        assert!(v.is_allowed() && v.reports.is_empty());
        assert_eq!(&*v.skipped[0].limit, "optional");
    }
}

#[tokio::test]
async fn swapping_the_plan_changes_decisions_and_version() {
    let (engine, _clock) = engine(r#"limit a { match { route ANY "/x"; } rate 1/min; }"#);
    let before = engine.plan().version().to_owned();
    assert!(engine.decide(&get("/x")).await.is_allowed());
    assert!(!engine.decide(&get("/x")).await.is_allowed());
    let plan = compile(&PolicySet::from_sources([(
        "test.rl",
        r#"limit a { match { route ANY "/y"; } rate 1/min; }"#,
    )]))
    .unwrap();
    engine.swap_plan(plan);
    assert_ne!(engine.plan().version(), before);
    assert!(engine.decide(&get("/x")).await.is_allowed());
}

#[test]
fn decisions_are_send_so_servers_can_spawn_them() {
    fn assert_send<T: Send>(_: &T) {}
    let (engine, _clock) = engine(r#"limit a { rate 1/min; }"#);
    let request = get("/x");
    let decision = engine.decide(&request);
    assert_send(&decision);
}
