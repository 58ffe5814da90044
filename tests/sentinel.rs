//! Redis behind Sentinel, with real servers: one master, two replicas, three sentinels.
//! `tollgate serve` finds the master through the sentinels; the master is killed (SIGKILL)
//! under load; requests are answered by the fail mode during the switch, counting resumes on
//! the new master, and what the failover forgot (replication is asynchronous) is measured.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::Sentinels;
use support::serving::Serving;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const TOKEN: &str = "sentinel-admin-token-0123";
const QUOTA: u64 = 1_000_000;

/// A Sentinel-watched Redis (down after 1 s) and `tollgate serve` on it; its admin address.
fn serve(set: &Sentinels) -> (Serving, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("failover.rl"),
        format!(
            "limit counted {{ match {{ route ANY \"/c/**\"; }} key global; \
             algorithm fixed_window; rate {QUOTA}/h; on_store_error deny; }}"
        ),
    )
    .unwrap();
    let (url, policies) = (set.url(), dir.path().display().to_string());
    let (serving, admin) = Serving::start_with_admin(&[
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_REDIS_URL", &url),
        ("TOLLGATE_KEY_SECRET", SECRET),
        ("TOLLGATE_POLICIES", &policies),
        ("TOLLGATE_ADMIN_TOKEN", TOKEN),
        ("TOLLGATE_STORE_TIMEOUT_MS", "200"),
    ]);
    (serving, admin, dir)
}

/// One decision: `Some(remaining)` when counted, `None` when the fail mode answered.
fn check(addr: SocketAddr) -> Option<u64> {
    let reply = support::check(addr, &json!({ "method": "GET", "path": "/c/x" }));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    match answer["action"].as_str() {
        Some("allow") => Some(answer["remaining"].as_u64().expect("remaining")),
        Some("unavailable") => None,
        other => panic!("neither counted nor the fail mode: {other:?} {answer}"),
    }
}

fn admin_get(admin: SocketAddr, path: &str) -> support::Reply {
    support::serving::admin_get(admin, TOKEN, path)
}

/// What one client thread saw: when each request was sent, and whether it was counted.
type Answers = Vec<(Instant, Option<u64>)>;

#[test]
#[expect(
    clippy::disallowed_methods,
    reason = "measures a real failover: the sentinels and Redis run on the real clock"
)]
fn a_killed_master_is_followed_to_the_replica_the_sentinels_promote() {
    let Some(mut set) = Sentinels::start(1000) else {
        return;
    };
    let first = set.master();
    let (serving, admin, _dir) = serve(&set);
    let diagnostics = admin_get(admin, "/admin/diagnostics").json();
    assert_eq!(diagnostics["store"]["kind"], "redis-sentinel");
    assert_eq!(
        diagnostics["store"]["sentinel"]["master"],
        first.to_string()
    );
    assert_eq!(diagnostics["store"]["sentinel"]["switches"], 0);

    // Eight clients, one after another each, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, addr) = (Arc::clone(&stop), serving.addr);
            std::thread::spawn(move || {
                let mut answers = Answers::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    answers.push((sent, check(addr)));
                }
                answers
            })
        })
        .collect();
    // Counting under load, then the crash.
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    set.server(first).kill();
    // The sentinels' failover: until one of them names another master.
    let mut switched = None;
    while killed.elapsed() < Duration::from_secs(30) {
        let named = set.master();
        if named != first {
            switched = Some((Instant::now(), named));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (switched, second) = switched.expect("the sentinels promote a replica within 30 s");
    // Load for two more seconds on the new master.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<Answers> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let all = || answers.iter().flatten();

    let counted_before = all().filter(|(at, a)| *at < killed && a.is_some()).count();
    let fail_mode = all().filter(|(_, a)| a.is_none()).count();
    let counted_after = all().filter(|(at, a)| *at > killed && a.is_some()).count();
    assert!(counted_before > 0, "counting before the crash");
    assert!(fail_mode > 0, "the fail mode answered during the switch");
    // Counting resumed within the failover time (the sentinels' switch) + 1 s.
    let resumed = all()
        .filter(|(at, a)| *at > switched && a.is_some())
        .map(|(at, _)| *at)
        .min()
        .expect("counting resumed on the new master");
    let late = resumed.saturating_duration_since(switched);
    assert!(
        late <= Duration::from_secs(1),
        "counting resumed {late:?} after the switch"
    );
    // Past the switch, every request is counted. The requests in flight as the new master
    // is swapped in (the probe that reached it first, the others the open breaker refused
    // an instant before it closed) are part of the switch: 50 ms of them.
    let settled = resumed + Duration::from_millis(50);
    let failed_late: Vec<Duration> = all()
        .filter(|(sent, a)| *sent > settled && a.is_none())
        .map(|(sent, _)| *sent - resumed)
        .collect();
    assert!(
        failed_late.is_empty(),
        "the fail mode answered requests sent this long after counting resumed: {failed_late:?}"
    );
    let in_flight = all()
        .filter(|(sent, a)| *sent > resumed && *sent <= settled && a.is_none())
        .count();

    // What the new master holds against what was admitted: the next answer's remaining.
    let admitted = all().filter(|(_, a)| a.is_some()).count() as u64;
    let remaining = check(serving.addr).expect("counted on the new master");
    let held = QUOTA - remaining - 1;
    let forgotten = admitted.saturating_sub(held);
    assert!(
        held <= admitted,
        "nothing counted twice: {held} > {admitted}"
    );
    let diagnostics = admin_get(admin, "/admin/diagnostics").json();
    assert_eq!(
        diagnostics["store"]["sentinel"]["master"],
        second.to_string()
    );
    assert_eq!(diagnostics["store"]["sentinel"]["switches"], 1);
    let metrics = admin_get(admin, "/metrics").text();
    assert!(
        metrics.contains(&format!(
            "tollgate_redis_master_info{{address=\"{second}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_redis_master_switches_total 1"));
    eprintln!(
        "failover: counted {counted_before} before the kill; sentinels switched after {:?}; \
         {fail_mode} answers by the fail mode ({in_flight} of them sent as the switch took \
         place, after the first request counted on the new master); counting resumed {late:?} \
         after the switch; \
         {counted_after} counted after; the new master holds {held} of {admitted} admitted: \
         {forgotten} forgotten",
        switched - killed
    );
}

#[test]
fn a_sentinel_url_without_its_service_is_a_located_setting_error() {
    let output = support::serving::tollgate(&[
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_KEY_SECRET", SECRET),
        ("TOLLGATE_REDIS_URL", "redis+sentinel://127.0.0.1:1"),
        ("TOLLGATE_REDIS_SENTINEL_PASSWORD", "s3ntinel-pass"),
    ])
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("redis_url"), "{stderr}");
    assert!(stderr.contains("names no service"), "{stderr}");
    assert!(
        !stderr.contains("s3ntinel-pass"),
        "the password is never shown: {stderr}"
    );
}

/// `rediss+sentinel://`: the sentinel and the master it names are reached over TLS, both
/// checked against the CA in `redis_tls_ca_file`.
#[test]
fn over_tls_the_sentinels_and_the_master_they_name_are_reached_with_the_ca() {
    let certs = support::tls::Certs::generate();
    let Some(master) = support::redis::Redis::start_tls(&certs, false) else {
        return;
    };
    let master_tls: SocketAddr = format!("127.0.0.1:{}", master.tls_port.unwrap())
        .parse()
        .unwrap();
    let Some(sentinel) = support::redis::Redis::start_sentinel_with(
        master_tls,
        support::redis::SERVICE,
        1000,
        1,
        Some(&certs),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tls.rl"),
        "limit counted { match { route ANY \"/c/**\"; } key global; algorithm fixed_window; \
         rate 10/h; on_store_error deny; }",
    )
    .unwrap();
    let url = format!(
        "rediss+sentinel://127.0.0.1:{}/{}",
        sentinel.tls_port.unwrap(),
        support::redis::SERVICE
    );
    let (policies, ca) = (
        dir.path().display().to_string(),
        certs.path("ca.pem").display().to_string(),
    );
    let (serving, admin) = Serving::start_with_admin(&[
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_REDIS_URL", &url),
        ("TOLLGATE_REDIS_TLS_CA_FILE", &ca),
        ("TOLLGATE_KEY_SECRET", SECRET),
        ("TOLLGATE_POLICIES", &policies),
        ("TOLLGATE_ADMIN_TOKEN", TOKEN),
    ]);
    let diagnostics = admin_get(admin, "/admin/diagnostics").json();
    assert_eq!(diagnostics["store"]["kind"], "redis-sentinel");
    assert_eq!(
        diagnostics["store"]["sentinel"]["master"],
        master_tls.to_string(),
        "the master's TLS address, as the sentinel names it"
    );
    // Counted on the master: the answers count down, and the master holds the count.
    assert_eq!(check(serving.addr), Some(9));
    assert_eq!(check(serving.addr), Some(8));
    assert_eq!(master.calls("evalsha"), 2);
}
