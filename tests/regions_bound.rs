//! Three regions on this machine — three Redis servers, two `tollgate serve` nodes each — the
//! exchanges between regions through proxies that add 50–150 ms each way and can cut a
//! region off; 64 clients spread over the six nodes ask for one global key at a steady
//! pace. Admissions per window are measured against the quota and the stated bound in steady
//! state, during a partition (the region cut off within its share, the others within the
//! rest) and after healing, where each region's view of the window is the true total: nothing
//! was counted twice.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use support::netem::Netem;
use support::redis::Redis;
use support::serving::Serving;
use tollgate::clock::{Clock, SystemClock};

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const TOKEN: &str = "regions-admin-token-01234";
const NAMES: [&str; 3] = ["eu", "us", "ap"];
/// The quota: per window of [`WINDOW_US`].
const QUOTA: u64 = 600;
const WINDOW_US: u64 = 2_000_000;
const SYNC_MS: u64 = 200;
const PARTITION_MS: u64 = 1_000;
/// The most one-way latency the proxies add.
const LATENCY_MAX_MS: u64 = 150;
const CLIENTS: usize = 64;
/// Each client's pace: one request per this long.
const PACE: Duration = Duration::from_millis(100);

fn now_us() -> u64 {
    SystemClock.now().as_micros()
}

struct Node {
    serving: Serving,
    admin: SocketAddr,
}

/// One decision of one client: the window it was decided in, on which region, admitted or
/// not.
type Answer = (u64, usize, bool);

/// The window a decision was made in, from when it was sent and answered (µs) and its
/// `reset` (whole seconds until the window ends, rounded up): a call that crossed a boundary
/// was decided after it when a whole window's worth of seconds was left (`reset` 2 of a 2 s
/// window), before it otherwise.
fn decided_in(sent: u64, answered: u64, reset: u64) -> u64 {
    let (before, after) = (sent / WINDOW_US, answered / WINDOW_US);
    if before == after || reset * 1_000_000 < WINDOW_US {
        before
    } else {
        after
    }
}

fn admin_get(admin: SocketAddr, path: &str) -> serde_json::Value {
    support::serving::admin_get(admin, TOKEN, path).json()
}

/// Whether every node of region `r` sees every other region as `partitioned`, or (`None`)
/// what they see.
fn sees(nodes: &[Node], r: usize, partitioned: impl Fn(&str) -> bool) -> bool {
    nodes[2 * r..2 * r + 2].iter().all(|n| {
        let d = admin_get(n.admin, "/admin/diagnostics");
        d["store"]["regions"]["peers"]
            .as_array()
            .expect("regions in the diagnostics")
            .iter()
            .all(|p| p["partitioned"].as_bool() == Some(partitioned(p["name"].as_str().unwrap())))
    })
}

/// Polls until `check` holds (at most 20 s): a wait for the system's own timers.
fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}");
}

/// Admissions per window and region, for the windows whose whole span lies in
/// `[from, to)` µs.
fn windows(answers: &[Answer], from: u64, to: u64) -> Vec<(u64, [u64; 3])> {
    let first = from.div_ceil(WINDOW_US);
    let last = to / WINDOW_US;
    (first..last)
        .map(|w| {
            let mut per = [0u64; 3];
            for &(window, region, admitted) in answers {
                if admitted && window == w {
                    per[region] += 1;
                }
            }
            (w, per)
        })
        .collect()
}

#[test]
fn three_regions_of_two_nodes_stay_within_the_stated_bound() {
    let Some(servers) = (0..3).map(|_| Redis::start()).collect::<Option<Vec<_>>>() else {
        return;
    };
    // links[from][to]: the proxy a node of `from` writes into `to`'s Redis through.
    let links: Vec<Vec<Option<Netem>>> = (0..3)
        .map(|from| {
            (0..3)
                .map(|to| {
                    (from != to).then(|| {
                        let link = Netem::start(servers[to].addr);
                        link.set_latency(
                            Duration::from_millis(50)..Duration::from_millis(LATENCY_MAX_MS),
                        );
                        link
                    })
                })
                .collect()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("g.rl"),
        format!(
            "limit g {{ match {{ route ANY \"/g\"; }} key global; algorithm fixed_window; \
             rate {QUOTA}/2s; global; on_partition share; }}\n\
             # Never refuses: what every region admitted today, to check the merge.\n\
             limit all {{ match {{ route ANY \"/g\"; }} key global; algorithm fixed_window; \
             rate 1_000_000/day; global; }}"
        ),
    )
    .unwrap();
    let policies = dir.path().display().to_string();
    let mut nodes = Vec::new();
    for r in 0..3 {
        let peers: Vec<String> = (0..3)
            .filter(|&o| o != r)
            .map(|o| {
                format!(
                    "{}=redis://{}",
                    NAMES[o],
                    links[r][o].as_ref().unwrap().addr
                )
            })
            .collect();
        let (url, peers) = (servers[r].url(), peers.join(","));
        for _ in 0..2 {
            let (serving, admin) = Serving::start_with_admin(&[
                ("TOLLGATE_ENV", "prod"),
                ("TOLLGATE_REDIS_URL", &url),
                ("TOLLGATE_KEY_SECRET", SECRET),
                ("TOLLGATE_POLICIES", &policies),
                ("TOLLGATE_ADMIN_TOKEN", TOKEN),
                // Decisions are about the exchange, not a loaded machine's local calls.
                ("TOLLGATE_STORE_TIMEOUT_MS", "2000"),
                ("TOLLGATE_REGION", NAMES[r]),
                ("TOLLGATE_REGION_PEERS", &peers),
                ("TOLLGATE_REGION_SYNC_MS", &SYNC_MS.to_string()),
                ("TOLLGATE_REGION_PARTITION_MS", &PARTITION_MS.to_string()),
            ]);
            nodes.push(Node { serving, admin });
        }
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.serving.addr).collect();

    // The clients: one request per PACE each, node by node in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, addr, region) = (Arc::clone(&stop), addrs[c % 6], (c % 6) / 2);
            std::thread::spawn(move || {
                let mut answers: Vec<Answer> = Vec::new();
                let mut next = now_us();
                while !stop.load(Ordering::Relaxed) {
                    let sent = now_us();
                    let reply = support::check(addr, &json!({ "method": "GET", "path": "/g" }));
                    assert_eq!(reply.status, 200, "{}", reply.text());
                    let answer = reply.json();
                    let admitted = answer["allowed"] == true;
                    let reset = answer["reset"].as_u64().expect("a reset");
                    let answered = now_us();
                    answers.push((decided_in(sent, answered, reset), region, admitted));
                    next += PACE.as_micros() as u64;
                    let wait = next.saturating_sub(now_us());
                    std::thread::sleep(Duration::from_micros(wait));
                }
                answers
            })
        })
        .collect();

    // Steady state: three whole windows.
    let steady_from = now_us();
    std::thread::sleep(Duration::from_micros(4 * WINDOW_US));
    let steady_to = now_us();
    // ap cut off, both ways; measured once every region sees it.
    for other in [0, 1] {
        links[2][other].as_ref().unwrap().cut(true);
        links[other][2].as_ref().unwrap().cut(true);
    }
    until("the partition is seen", || {
        sees(&nodes, 2, |_| true)
            && sees(&nodes, 0, |name| name == "ap")
            && sees(&nodes, 1, |name| name == "ap")
    });
    let partition_from = now_us();
    std::thread::sleep(Duration::from_micros(3 * WINDOW_US));
    let partition_to = now_us();
    // Healed: measured once every region hears every other again.
    for other in [0, 1] {
        links[2][other].as_ref().unwrap().cut(false);
        links[other][2].as_ref().unwrap().cut(false);
    }
    until("the partition heals", || {
        (0..3).all(|r| sees(&nodes, r, |_| false))
    });
    let healed_from = now_us();
    std::thread::sleep(Duration::from_micros(3 * WINDOW_US));
    let healed_to = now_us();
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<Answer> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();

    // The offered pace per region (its share of the clients), per second: what a region
    // admits until the quota is spent.
    let per_region = |r: usize| (0..CLIENTS).filter(|c| (c % 6) / 2 == r).count() as f64;
    let rate = per_region(0).max(per_region(1)).max(per_region(2)) / PACE.as_secs_f64();
    let lag = (SYNC_MS + LATENCY_MAX_MS) as f64 / 1000.0;
    // The stated bound: (R − 1) × rate × (interval + one-way latency).
    let bound = |regions: f64| ((regions - 1.0) * rate * lag).ceil() as u64;
    let share = QUOTA / 3;
    let mut report = Vec::new();

    for (w, per) in windows(&answers, steady_from, steady_to) {
        let total: u64 = per.iter().sum();
        report.push(format!(
            "steady    window {w}: {per:?} = {total} (quota {QUOTA}, bound +{})",
            bound(3.0)
        ));
        assert!(total <= QUOTA + bound(3.0), "{}", report.join("\n"));
        assert!(
            total >= QUOTA * 9 / 10,
            "demand exceeds the quota: {}",
            report.join("\n")
        );
    }
    // During the partition, past the window in which it began.
    for (w, per) in windows(&answers, partition_from, partition_to) {
        let rest = per[0] + per[1];
        report.push(format!(
            "partition window {w}: {per:?}: ap {} (share {share}), eu + us {rest} (rest {}, bound +{})",
            per[2],
            QUOTA - share,
            bound(2.0)
        ));
        assert!(per[2] <= share, "{}", report.join("\n"));
        assert!(rest <= QUOTA - share + bound(2.0), "{}", report.join("\n"));
    }
    for (w, per) in windows(&answers, healed_from, healed_to) {
        let total: u64 = per.iter().sum();
        report.push(format!(
            "healed    window {w}: {per:?} = {total} (quota {QUOTA}, bound +{})",
            bound(3.0)
        ));
        assert!(total <= QUOTA + bound(3.0), "{}", report.join("\n"));
    }
    eprintln!("{}", report.join("\n"));

    // Merged without counting twice: once the last exchanges have landed, each region's view
    // of the day's count (its own plus the others' components) is what all admitted.
    let admitted: u64 = answers.iter().filter(|(_, _, ok)| *ok).count() as u64;
    let day = |us: u64| us / 86_400_000_000;
    if day(steady_from) != day(now_us()) {
        eprintln!("the test crossed midnight (UTC): the merge is not checked");
        return;
    }
    let view = |r: usize| {
        let (own, others) = support::redis::components(&servers[r].hash("g:{global}:all"));
        own + others
    };
    // The last pushes land within an interval and two one-way latencies.
    for _ in 0..100 {
        if (0..3).all(|r| view(r) == admitted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (r, name) in NAMES.iter().enumerate() {
        assert_eq!(view(r), admitted, "region {name}");
    }
}
