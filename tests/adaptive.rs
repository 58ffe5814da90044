//! Adaptive limits through the pipeline, on the injected clock: an upstream simulated event
//! by event — its latency grows with its concurrency past a knee and it fails past a
//! capacity — and closed-loop clients sending through Tollgate's two phases. Deterministic
//! apart from admission control's draws, and free of real time: each run below is a minute
//! of simulated traffic in well under a second.
//!
//! The upstream: 5 ms, plus 1 ms per request in flight above 20; past 50 in flight it answers
//! 503 at once. Clients send again 1 ms after an answer, 10 ms after a refusal.

mod support;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use http::Method;
use tollgate::pipeline::{Admission, Pipeline};
use tollgate::store::MemoryStore;
use tollgate::{Clock, Engine, ManualClock, PolicySet, RequestCtx, Timestamp, compile};

type Node = Pipeline<MemoryStore, ManualClock>;

/// How the simulated upstream answers.
#[derive(Debug, Clone, Copy)]
struct Upstream {
    /// Latency with few requests in flight.
    base_ms: u64,
    /// In flight above this, each request adds a millisecond.
    knee: u64,
    /// In flight above this, requests fail at once.
    capacity: u64,
}

const HEALTHY: Upstream = Upstream {
    base_ms: 5,
    knee: 20,
    capacity: 50,
};

/// What a run measured over its second half.
#[derive(Debug, Default)]
struct Measured {
    /// Successful answers per second.
    goodput: f64,
    /// The 99th percentile latency of successful answers, ms.
    p99_ms: f64,
    /// Failed answers per second.
    failures: f64,
    /// The adaptive limit at the end, if there is one.
    limit: Option<u64>,
    /// The adaptive limit sampled every 100 ms, with its time from the start (ms).
    limits: Vec<(u64, u64)>,
}

enum Event {
    /// Client `c` sends a request.
    Send(usize),
    /// A request ends: the upstream answered `status`.
    End(usize, u16, Box<Admission<MemoryStore, ManualClock>>),
}

fn node(policy: &str) -> (Arc<Node>, ManualClock) {
    let plan = compile(&PolicySet::from_sources([("adaptive.rl", policy)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let clock = ManualClock::new(Timestamp::from_secs(1_700_006_400));
    let engine = Engine::with_clock(plan, MemoryStore::new(), clock.clone());
    (Arc::new(Pipeline::new(Arc::new(engine))), clock)
}

/// Runs `clients` closed-loop clients for `seconds` of simulated time; the upstream is
/// `phases[i].1` from `phases[i].0` seconds on.
fn run(
    node: &Arc<Node>,
    clock: &ManualClock,
    clients: usize,
    seconds: u64,
    phases: &[(u64, Upstream)],
) -> Measured {
    let start = clock.now();
    let ms = |t: u64| t * 1_000;
    // (time µs, sequence) → event; the sequence keeps order among equal times.
    let mut queue: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut events: Vec<Option<Event>> = Vec::new();
    let push = |queue: &mut BinaryHeap<_>, events: &mut Vec<Option<Event>>, at: u64, e: Event| {
        events.push(Some(e));
        queue.push(Reverse((at, events.len() as u64, events.len() - 1)));
    };
    for c in 0..clients {
        // Spread over the first 10 ms.
        push(
            &mut queue,
            &mut events,
            (c as u64 * 50) % 10_000,
            Event::Send(c),
        );
    }
    let request =
        RequestCtx::new(Method::GET, "/api/orders").with_client_ip([198, 51, 100, 7].into());
    let (mut in_flight, mut latencies) = (0u64, Vec::new());
    let (mut good, mut failed) = (0u64, 0u64);
    let mut measured = Measured::default();
    let half = seconds * 1_000_000 / 2;
    let mut next_sample = 0;
    while let Some(Reverse((at, _, i))) = queue.pop() {
        if at >= seconds * 1_000_000 {
            break;
        }
        clock.set(Timestamp::from_micros(start.as_micros() + at));
        while next_sample <= at {
            let reading = node.engine().adaptive_readings(clock.now());
            if let Some(limit) = reading.first().and_then(|(_, r)| r.limit) {
                measured
                    .limits
                    .push((next_sample / 1_000, u64::from(limit)));
            }
            next_sample += 100_000;
        }
        let upstream = phases
            .iter()
            .rev()
            .find(|(from, _)| at >= from * 1_000_000)
            .map_or(HEALTHY, |p| p.1);
        match events[i].take().expect("each event runs once") {
            Event::Send(c) => {
                let admission = node
                    .admit_now(&request, format!("r{at}"), None)
                    .expect("the memory store answers at once");
                if !admission.verdict.is_allowed() {
                    let status = admission.status();
                    admission.complete(status);
                    push(&mut queue, &mut events, at + ms(10), Event::Send(c));
                    continue;
                }
                in_flight += 1;
                let (status, latency) = if in_flight > upstream.capacity {
                    (503, ms(1))
                } else {
                    let over = in_flight.saturating_sub(upstream.knee);
                    (200, ms(upstream.base_ms + over))
                };
                push(
                    &mut queue,
                    &mut events,
                    at + latency,
                    Event::End(c, status, Box::new(admission)),
                );
            }
            Event::End(c, status, admission) => {
                in_flight -= 1;
                let took = clock.now().saturating_since(admission.verdict.decided_at);
                admission.complete(status);
                if at >= half {
                    if status == 200 {
                        good += 1;
                        latencies.push(took.as_micros() as u64);
                    } else {
                        failed += 1;
                    }
                }
                // A failure is answered like a refusal: the client backs off.
                let wait = if status == 200 { 1 } else { 10 };
                push(&mut queue, &mut events, at + ms(wait), Event::Send(c));
            }
        }
    }
    let window = (seconds - seconds / 2) as f64;
    measured.goodput = good as f64 / window;
    measured.failures = failed as f64 / window;
    measured.p99_ms = support::p99_ms(&mut latencies);
    measured.limit = measured.limits.last().map(|l| l.1);
    measured
}

const GRADIENT: &str = r#"
limit upstream {
  match { route "/api/**"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive gradient { initial 10; min 2; max 200; }
  on_exceed reject 503;
}
"#;

const NO_LIMIT: &str = r#"
limit elsewhere {
  match { route "/elsewhere"; }
  rate 1/s;
}
"#;

#[test]
fn the_gradient_limit_settles_at_the_knee_and_beats_no_limit() {
    let (unloaded_node, clock) = node(NO_LIMIT);
    let unloaded = run(&unloaded_node, &clock, 1, 10, &[]);
    let (plain, clock) = node(NO_LIMIT);
    let without = run(&plain, &clock, 200, 20, &[]);
    let (adaptive, clock) = node(GRADIENT);
    let with = run(&adaptive, &clock, 200, 20, &[]);
    println!(
        "unloaded: {unloaded:?}\nwithout: {without:?}\nwith: goodput {} p99 {} failures {} limit {:?}",
        with.goodput, with.p99_ms, with.failures, with.limit
    );
    let limit = with.limit.expect("the limit is read");
    // The knee is 20 in flight; a tolerance of 2 lets the latency double (10 ms: 25 in flight).
    assert!((15..=30).contains(&limit), "settled at {limit}");
    assert!(
        with.goodput >= 1.5 * without.goodput,
        "{} vs {}",
        with.goodput,
        without.goodput
    );
    assert!(
        with.p99_ms <= 2.0 * unloaded.p99_ms,
        "p99 {} vs unloaded {}",
        with.p99_ms,
        unloaded.p99_ms
    );
    assert_eq!(with.failures, 0.0);
}

/// The limit while it is sampled: when it last left `band` before `from_ms`, and when it was
/// back in `band` to stay after `from_ms`.
fn back_in(
    limits: &[(u64, u64)],
    from_ms: u64,
    band: std::ops::RangeInclusive<u64>,
) -> Option<u64> {
    let after: Vec<_> = limits.iter().filter(|(t, _)| *t >= from_ms).collect();
    let last_out = after.iter().rposition(|(_, l)| !band.contains(l));
    match last_out {
        None => after.first().map(|(t, _)| *t),
        Some(i) => after.get(i + 1).map(|(t, _)| *t),
    }
}

#[test]
fn the_limit_follows_a_struggling_upstream_down_and_recovers_after_it() {
    // From 20 s to 30 s the upstream struggles: 20 ms at best, slower past 5 in flight,
    // failing past 15.
    let struggling = Upstream {
        base_ms: 20,
        knee: 5,
        capacity: 15,
    };
    let (node, clock) = node(GRADIENT);
    let run = run(
        &node,
        &clock,
        200,
        45,
        &[(0, HEALTHY), (20, struggling), (30, HEALTHY)],
    );
    let at = |ms: u64| {
        run.limits
            .iter()
            .find(|(t, _)| *t >= ms)
            .map(|l| l.1)
            .unwrap()
    };
    let healthy = at(19_900);
    let struggled = at(29_900);
    let recovered_at = back_in(&run.limits, 30_000, healthy * 9 / 10..=healthy * 11 / 10)
        .expect("the limit came back");
    println!(
        "healthy {healthy}, struggling {struggled}, back within 10 % after {} ms",
        recovered_at - 30_000
    );
    assert!(
        struggled <= 10,
        "it came down to what the struggling upstream takes: {struggled}"
    );
    assert!(
        recovered_at - 30_000 <= 3_000,
        "recovered {} ms after the upstream",
        recovered_at - 30_000
    );
    assert_eq!(run.failures, 0.0, "nothing failed in the second half");
}

const OTHER_METHODS: [(&str, &str); 3] = [
    (
        "gradient2",
        "adaptive gradient2 { initial 10; min 2; max 200; tolerance 1.5; }",
    ),
    (
        "aimd",
        "adaptive aimd { initial 10; min 2; max 200; backoff 90%; timeout 20ms; }",
    ),
    (
        "vegas",
        "adaptive vegas { initial 10; min 2; max 200; alpha 3; beta 6; }",
    ),
];

#[test]
fn every_method_keeps_the_upstream_under_its_capacity() {
    let (plain, clock) = node(NO_LIMIT);
    let without = run(&plain, &clock, 200, 20, &[]);
    for (name, block) in OTHER_METHODS {
        let policy = GRADIENT.replace("adaptive gradient { initial 10; min 2; max 200; }", block);
        let (node, clock) = node(&policy);
        let with = run(&node, &clock, 200, 20, &[]);
        println!(
            "{name}: goodput {:.0} p99 {} ms failures {:.1}/s limit {:?}",
            with.goodput, with.p99_ms, with.failures, with.limit
        );
        let limit = with.limit.expect("read");
        assert!(limit < 50, "{name}: under the capacity: {limit}");
        assert!(
            with.goodput > without.goodput,
            "{name}: {} vs {}",
            with.goodput,
            without.goodput
        );
    }
}

const ADMISSION: &str = r#"
limit upstream_errors {
  match { route "/api/**"; }
  key global;
  admission {
    success when status in [200..499];
    threshold 95%;
    aggression 1.0;
    max_reject 90%;
    window 10s;
    min_requests 20;
  }
  on_exceed reject 503;
}
"#;

/// Sends one request every millisecond for `seconds`; the upstream fails the first
/// `failing_in_10` of every ten it gets. Returns the share refused.
fn refused_share(node: &Arc<Node>, clock: &ManualClock, seconds: u64, failing_in_10: u64) -> f64 {
    let request =
        RequestCtx::new(Method::GET, "/api/orders").with_client_ip([198, 51, 100, 7].into());
    let (mut sent, mut refused, mut reached) = (0u64, 0u64, 0u64);
    for _ in 0..seconds * 1_000 {
        clock.advance(std::time::Duration::from_millis(1));
        let admission = node.admit_now(&request, "r".into(), None).expect("memory");
        sent += 1;
        if !admission.verdict.is_allowed() {
            refused += 1;
            let status = admission.status();
            admission.complete(status);
            continue;
        }
        let status = if reached % 10 < failing_in_10 {
            503
        } else {
            200
        };
        reached += 1;
        admission.complete(status);
    }
    refused as f64 / sent as f64
}

#[test]
fn admission_control_refuses_in_proportion_to_failures_and_stops_when_they_stop() {
    let (node, clock) = node(ADMISSION);
    assert_eq!(
        refused_share(&node, &clock, 20, 0),
        0.0,
        "a healthy upstream"
    );
    // Envoy's formula over a full window: (R − S ÷ 0.95) ÷ (R + 1) with S = (1 − f) R.
    let expected = |f: f64| 1.0 - (1.0 - f) / 0.95;
    // A window to fill with the new failure rate, then measured.
    refused_share(&node, &clock, 10, 2);
    let at_20 = refused_share(&node, &clock, 20, 2);
    refused_share(&node, &clock, 10, 4);
    let at_40 = refused_share(&node, &clock, 20, 4);
    println!(
        "refused: {at_20:.4} with 20 % failing (formula {:.4}), {at_40:.4} with 40 % ({:.4})",
        expected(0.2),
        expected(0.4)
    );
    // 20,000 draws each: the standard deviation is about 0.003.
    assert!((at_20 - expected(0.2)).abs() < 0.02, "{at_20}");
    assert!((at_40 - expected(0.4)).abs() < 0.02, "{at_40}");
    // Failures stop: refusals fade as the window slides, and stop once it has passed.
    refused_share(&node, &clock, 10, 0);
    assert_eq!(
        refused_share(&node, &clock, 10, 0),
        0.0,
        "nothing refused a window after"
    );
}

const CHECKED: &str = r#"
limit upstream {
  match { route ANY "/api/**"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive aimd { initial 2; min 1; max 10; backoff 50%; timeout 1s; }
  admission { min_requests 1000; }
  lease 1h;
}
"#;

/// `/v1/check` and forward-auth take a slot each, held until the request's `/v1/report`;
/// the report teaches the limit (AIMD: halved by a 503).
#[test]
fn checks_and_forward_auth_hold_slots_until_their_reports() {
    let server = support::InProcess::start(CHECKED, tollgate::middleware::HttpOptions::default());
    let request =
        serde_json::json!({"method": "GET", "path": "/api/orders", "client_ip": "198.51.100.7"});
    let check = || server.check(&request);
    let forward_auth = || {
        server.send(
            "GET",
            "/v1/auth",
            &[
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/api/orders"),
            ],
            b"",
        )
    };
    let report = |status: u16, latency: Option<u64>| {
        let mut body = serde_json::json!({"request": request, "status": status});
        if let Some(ms) = latency {
            body["latency_ms"] = ms.into();
        }
        let reply = server.send("POST", "/v1/report", &[], body.to_string().as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
    };
    assert_eq!(check().json()["allowed"], true);
    assert_eq!(forward_auth().status, 200);
    // Two in flight of a limit of 2: the third is refused, without taking a slot.
    let refused = check();
    assert_eq!(refused.json()["allowed"], false);
    assert_eq!(refused.json()["policy"], "upstream");
    assert_eq!(forward_auth().status, 429);
    // A report gives one slot back, and AIMD adds one while half the limit is busy: 3.
    report(200, Some(5));
    assert_eq!(forward_auth().status, 200);
    assert_eq!(check().json()["allowed"], true);
    assert_eq!(check().json()["allowed"], false, "3 in flight of 3");
    // A 503 reported with its latency halves the limit (1.5: 1) and frees a slot: 2 of 1.
    report(503, Some(5));
    assert_eq!(check().json()["allowed"], false);
    // A report without a latency frees a slot and teaches the concurrency limit nothing.
    report(200, None);
    assert_eq!(check().json()["allowed"], false, "1 in flight of 1");
    report(200, None);
    assert_eq!(check().json()["allowed"], true, "the last slot given back");
}

/// In shadow mode an adaptive limit reports what it would refuse and admits it, counting it
/// in flight.
#[test]
fn shadow_mode_reports_refusals_and_admits() {
    let policy = CHECKED.replace("lease 1h;", "lease 1h; mode shadow;");
    let (node, _clock) = node(&policy);
    let request =
        RequestCtx::new(Method::GET, "/api/orders").with_client_ip([198, 51, 100, 7].into());
    let admissions: Vec<_> = (0..3)
        .map(|i| node.admit_now(&request, format!("r{i}"), None).unwrap())
        .collect();
    assert!(admissions.iter().all(|a| a.verdict.is_allowed()));
    let third = &admissions[2].verdict;
    assert_eq!(third.shadow_rejections().count(), 1, "{:?}", third.reports);
    assert_eq!(third.reports[0].algorithm, "adaptive_concurrency");
    let summary = node.engine().adaptive_summary();
    assert_eq!(summary[0].in_flight, 3, "all three went on, all counted");
    drop(admissions);
    assert_eq!(
        node.engine().adaptive_summary()[0].in_flight,
        0,
        "dropped: the client went away"
    );
}

/// A reload keeps what a limit learnt when its adaptive parts are unchanged, and drops the
/// controllers of limits it removed or changed.
#[test]
fn a_reload_keeps_or_drops_the_controllers() {
    let (node, _clock) = node(CHECKED);
    let request =
        RequestCtx::new(Method::GET, "/api/orders").with_client_ip([198, 51, 100, 7].into());
    let admission = node.admit_now(&request, "r".into(), None).unwrap();
    // A 503: AIMD halves the limit, 2 → 1.
    admission.complete(503);
    let limit = |node: &Arc<Node>| {
        node.engine()
            .adaptive_summary()
            .first()
            .and_then(|s| s.lowest)
    };
    assert_eq!(limit(&node), Some(1));
    let compiled =
        |policy: &str| compile(&PolicySet::from_sources([("adaptive.rl", policy)])).unwrap();
    // The same limit, another priority: what it learnt is kept.
    node.engine().swap_plan(compiled(
        &CHECKED.replace("lease 1h;", "lease 1h; priority 5;"),
    ));
    assert_eq!(limit(&node), Some(1));
    // Its adaptive block changed: dropped, and started again from the new bounds when used.
    node.engine()
        .swap_plan(compiled(&CHECKED.replace("initial 2;", "initial 3;")));
    assert!(node.engine().adaptive_summary().is_empty());
    let admission = node.admit_now(&request, "r".into(), None).unwrap();
    assert_eq!(limit(&node), Some(3));
    drop(admission);
    // The limit removed: dropped.
    node.engine().swap_plan(compiled(NO_LIMIT));
    assert!(node.engine().adaptive_summary().is_empty());
}

/// Admission control alone counts nothing down: its report (limit 0) never becomes the
/// rate-limit headers of an admitted request; an adaptive concurrency limit shows its
/// current limit and what is left of it, as a concurrency limit does.
#[test]
fn admission_control_alone_never_heads_the_rate_limit_headers() {
    let policy = r#"
limit errors { match { route ANY "/api/**"; } key global; admission { } }
limit per_client { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate 100/min; }
"#;
    let server = support::InProcess::start(policy, tollgate::middleware::HttpOptions::default());
    let request =
        serde_json::json!({"method": "GET", "path": "/api/orders", "client_ip": "198.51.100.7"});
    let reply = server.check(&request).json();
    assert_eq!(reply["policy"], "per_client");
    assert_eq!(reply["limit"], 100);
    assert_eq!(reply["remaining"], 99);
    let alone = support::InProcess::start(
        r#"limit errors { match { route ANY "/api/**"; } key global; admission { } }"#,
        tollgate::middleware::HttpOptions::default(),
    );
    let reply = alone.check(&request).json();
    assert_eq!(reply["allowed"], true);
    assert!(reply.get("limit").is_none(), "no headline: {reply}");
    let adaptive = support::InProcess::start(CHECKED, tollgate::middleware::HttpOptions::default());
    let reply = adaptive.check(&request).json();
    assert_eq!(
        (reply["limit"].clone(), reply["remaining"].clone()),
        (2.into(), 1.into()),
        "{reply}"
    );
}

/// An adaptive limit's ClickHouse row names its algorithm, carries its current limit as the
/// quota and what is left of it, and the status the client got.
#[test]
fn the_exported_row_carries_the_current_limit() {
    use tollgate::analytics::rows::{EventContext, RowShape, event};
    let (node, clock) = node(CHECKED);
    let request =
        RequestCtx::new(Method::GET, "/api/orders").with_client_ip([198, 51, 100, 7].into());
    let admission = node.admit_now(&request, "r".into(), None).unwrap();
    let name: Arc<str> = Arc::from("node-1");
    let shape = RowShape {
        sample_allows: 1.0,
        ..RowShape::default()
    };
    let cx = EventContext {
        request_id: "r",
        node: &name,
        hasher: node.engine().key_hasher(),
        now: clock.now(),
        shape: &shape,
        status: 200,
    };
    let mut event = event(&admission.verdict, &request, &cx).expect("not sampled out");
    event.set_status(502);
    let mut rows = Vec::new();
    event.into_rows(&mut rows);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(&*row.limit_name, "upstream");
    assert_eq!(row.algorithm, "adaptive_concurrency");
    assert_eq!(
        (row.quota, row.remaining),
        (2, 1),
        "a limit of 2, one in flight"
    );
    assert_eq!(row.status, 502);
}
