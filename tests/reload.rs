//! Hot reload: edits on disk (written in place, saved by rename, swapped by symlink as a
//! Kubernetes ConfigMap does) and `SIGHUP` rebuild the plan and swap it in; a broken edit
//! keeps the old plan serving and exposes its located error; counters survive; and a hundred
//! reloads, one in ten broken, under a load of requests through the layer, fail no request.
//!
//! These tests wait for the file watcher (real files, real events): they poll for the effect
//! with a generous deadline and assert what happened, never how fast.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tollgate::reload::{Reloader, Trigger};
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RequestCtx, compile};

fn policy(rate: &str) -> String {
    format!(
        "version 1;\nlimit api {{\n  match {{ route GET \"/api/**\"; }}\n  algorithm fixed_window;\n  rate {rate};\n}}\n"
    )
}

const BROKEN: &str =
    "version 1;\nlimit api {\n  match { route GET \"/api/**\"; }\n  rate 5/fortnight;\n}\n";

fn load(
    dir: &Path,
) -> impl Fn() -> Result<tollgate::Plan, tollgate::diagnostic::PolicyErrors> + Send + Sync + use<> {
    let dir = dir.to_path_buf();
    move || compile(&PolicySet::load(&[&dir]))
}

fn engine(dir: &Path) -> Arc<Engine<MemoryStore>> {
    let plan = load(dir)().unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    Arc::new(Engine::new(plan, MemoryStore::new()))
}

/// Waits until `done` holds, giving up after 1,000 looks 20 ms apart (20 s or more).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gave up waiting for {what}");
}

async fn remaining(engine: &Engine<MemoryStore>) -> (u64, u64) {
    let request =
        RequestCtx::new(Method::GET, "/api/x").with_client_ip("192.0.2.1".parse().unwrap());
    let verdict = engine.decide(&request).await;
    let report = &verdict.reports[0];
    (report.decision.limit, report.decision.remaining)
}

#[tokio::test]
async fn edits_reload_broken_ones_keep_the_old_plan_and_counters_survive() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.rl");
    std::fs::write(&file, policy("3/min")).unwrap();
    let engine = engine(dir.path());
    let reloader = Reloader::new(Arc::clone(&engine), load(dir.path()));
    let _watch = reloader
        .watch(&[dir.path().to_path_buf()], Duration::from_millis(50))
        .unwrap();
    assert_eq!(remaining(&engine).await, (3, 2));

    // A valid edit, written in place: the new rate counts the same counter.
    let first = engine.plan().version().to_owned();
    std::fs::write(&file, policy("10/min")).unwrap();
    eventually("the edit to load", || engine.plan().version() != first).await;
    assert_eq!(
        remaining(&engine).await,
        (10, 8),
        "the counter survived the reload"
    );

    // A broken edit: the plan in use keeps serving; the error is kept, with its place.
    let good = engine.plan().version().to_owned();
    std::fs::write(&file, BROKEN).unwrap();
    eventually("the broken edit to be refused", || {
        reloader.status().failed == 1
    })
    .await;
    assert_eq!(engine.plan().version(), good);
    let status = reloader.status();
    let error = status.last_error.expect("the error is kept");
    assert!(error.contains("api.rl:4:"), "located: {error}");
    assert_eq!(
        remaining(&engine).await,
        (10, 7),
        "still serving the good plan"
    );

    // Fixed again: loaded, and the error is gone.
    std::fs::write(&file, policy("20/min")).unwrap();
    eventually("the fix to load", || reloader.status().last_error.is_none()).await;
    assert_eq!(remaining(&engine).await.0, 20);
    assert_eq!(reloader.status().succeeded, 2);
}

#[tokio::test]
async fn a_save_by_rename_and_a_symlink_swap_both_reload() {
    // Saved by rename, as editors do.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.rl"), policy("3/min")).unwrap();
    let engine = engine(dir.path());
    let reloader = Reloader::new(Arc::clone(&engine), load(dir.path()));
    let _watch = reloader
        .watch(&[dir.path().to_path_buf()], Duration::from_millis(50))
        .unwrap();
    let temp = dir.path().join(".api.rl.swp");
    std::fs::write(&temp, policy("7/min")).unwrap();
    std::fs::rename(&temp, dir.path().join("api.rl")).unwrap();
    eventually("the renamed file to load", || {
        reloader.status().succeeded == 1
    })
    .await;
    assert_eq!(remaining(&engine).await.0, 7);

    // A ConfigMap: `api.rl -> ..data/api.rl`, `..data -> ..v1`; an update writes `..v2` and
    // renames a new `..data` link over the old one.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(root.join("..v1/api.rl"), policy("3/min")).unwrap();
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/api.rl", root.join("api.rl")).unwrap();
    let engine = self::engine(root);
    let reloader = Reloader::new(Arc::clone(&engine), load(root));
    let _watch = reloader
        .watch(&[root.to_path_buf()], Duration::from_millis(50))
        .unwrap();
    assert_eq!(remaining(&engine).await.0, 3);
    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(root.join("..v2/api.rl"), policy("9/min")).unwrap();
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    eventually("the swapped link to load", || {
        reloader.status().succeeded == 1
    })
    .await;
    assert_eq!(remaining(&engine).await.0, 9);
}

#[tokio::test]
async fn sighup_reloads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.rl"), policy("3/min")).unwrap();
    let engine = engine(dir.path());
    let reloader = Reloader::new(Arc::clone(&engine), load(dir.path()));
    let hangups = reloader.on_sighup().unwrap();
    std::fs::write(dir.path().join("api.rl"), policy("4/min")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("SIGHUP to reload", || reloader.status().succeeded == 1).await;
    assert_eq!(remaining(&engine).await.0, 4);
    hangups.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_one_in_ten_broken_fail_no_request() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.rl");
    std::fs::write(&file, policy("1000000/min")).unwrap();
    let engine = engine(dir.path());
    let reloader = Reloader::new(Arc::clone(&engine), load(dir.path()));
    let app = axum::Router::new()
        .route("/api/{*rest}", axum::routing::get(|| async { "ok" }))
        .layer(tollgate::RateLimitLayer::new(Arc::clone(&engine)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_loop = {
        let (app, stop) = (app.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let request = http::Request::get("/api/items")
                    .extension(axum::extract::ConnectInfo(
                        "192.0.2.9:4000".parse::<std::net::SocketAddr>().unwrap(),
                    ))
                    .body(axum::body::Body::empty())
                    .unwrap();
                let response = app.clone().oneshot(request).await.unwrap();
                sent += 1;
                failed += u64::from(response.status() != 200);
                tokio::task::yield_now().await;
            }
            (sent, failed)
        })
    };
    let mut refused = 0;
    for i in 0..100 {
        let broken = i % 10 == 9;
        let text = if broken {
            BROKEN.to_owned()
        } else {
            policy(&format!("{}/min", 1_000_000 + i))
        };
        std::fs::write(&file, &text).unwrap();
        match reloader.reload(Trigger::Request).await {
            Ok(version) => {
                assert!(!broken, "version {i} is broken but loaded");
                assert_eq!(&*version, engine.plan().version());
            }
            Err(errors) => {
                assert!(
                    broken,
                    "version {i} is valid but refused: {}",
                    errors.render_plain(100)
                );
                refused += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = load_loop.await.unwrap();
    assert_eq!(refused, 10);
    assert_eq!(reloader.status().succeeded, 90);
    assert_eq!(reloader.status().failed, 10);
    assert!(sent > 100, "requests went on during the reloads: {sent}");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
}

/// `tollgate serve` reloads its policy directory when a file changes and on `SIGHUP`; a
/// broken edit leaves the plan in `/readyz` as it was and is logged with its place.
#[test]
fn tollgate_serve_reloads_its_policies() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.rl");
    std::fs::write(&file, policy("3/min")).unwrap();
    let policies = dir.path().display().to_string();
    let server = support::serving::Serving::start(&[("TOLLGATE_POLICIES", &policies)]);
    let version = || {
        let reply = support::send(server.addr, "GET", "/readyz", &[], b"");
        reply.text().trim_start_matches("ready: plan ").to_owned()
    };
    let wait_for = |what: &str, done: &dyn Fn(&str) -> bool| {
        for _ in 0..1_000 {
            if done(&version()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gave up waiting for {what}");
    };
    let first = version();
    std::fs::write(&file, policy("5/min")).unwrap();
    wait_for("the edit to load", &|v| v != first);
    let second = version();

    std::fs::write(&file, BROKEN).unwrap();
    // The broken edit is refused; then SIGHUP after a valid one loads that.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(version(), second, "a broken edit never takes effect");
    std::fs::write(&file, policy("6/min")).unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the fix to load", &|v| v != second);
    let log = server.stop();
    assert!(log.contains("do not compile"), "{log}");
    assert!(log.contains("api.rl:4:"), "the error is located: {log}");
}
