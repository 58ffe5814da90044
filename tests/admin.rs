//! The admin API: the token is required and compared whole; the plan, reload (a broken one
//! keeps the plan and shows its located error), explain (`tollgate explain`'s words), key
//! counts, resets and states on the memory store, a real `redis-server` and a real Redis
//! Cluster, and diagnostics — every answer checked against `docs/admin-openapi.yaml`.

mod support;

use std::path::Path;
use std::sync::Arc;

use http::Method;
use serde_json::json;
use support::{InProcess, Reply};
use tollgate::pipeline::Pipeline;
use tollgate::reload::Reloader;
use tollgate::server::Observers;
use tollgate::server::{AdminState, admin_router};
use tollgate::store::redis::RedisStore;
use tollgate::store::{MemoryStore, ServedStore};
use tollgate::{Engine, PolicySet, RequestCtx, compile};

const SPEC: &str = "docs/admin-openapi.yaml";
const TOKEN: &str = "an-admin-token-of-32-characters!";

const POLICY: &str = r#"version 1;
namespace "shop";
limit api { match { route GET "/api/**"; } key ip; algorithm fixed_window; rate 10/min; }
limit login { match { route POST "/login"; } key ip; algorithm fixed_window; rate 5/min; }
limit tenants { match { route GET "/t/**"; } key header("X-Tenant") trusted + ip; algorithm fixed_window; rate 10/min; }
"#;

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.rl"), POLICY).unwrap();
    dir
}

fn load(
    dir: &Path,
) -> impl Fn() -> Result<tollgate::Plan, tollgate::diagnostic::PolicyErrors> + Send + Sync + use<> {
    let dir = dir.to_path_buf();
    move || compile(&PolicySet::load(&[&dir]))
}

/// The admin API over `store`, with the engine to make traffic.
fn admin<S: ServedStore>(
    dir: &Path,
    store: impl AsyncFnOnce() -> S,
) -> (InProcess, Arc<Engine<S>>) {
    let (app, pipeline) = admin_with_pipeline(dir, store);
    (app, Arc::clone(pipeline.engine()))
}

/// The admin API over `store`, with the pipeline (metrics attached) to make traffic.
fn admin_with_pipeline<S: ServedStore>(
    dir: &Path,
    store: impl AsyncFnOnce() -> S,
) -> (InProcess, Arc<Pipeline<S>>) {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let kept = Arc::clone(&slot);
    let load = load(dir);
    let app = InProcess::build(async move || {
        let plan = load().unwrap();
        let metrics = Arc::new(tollgate::metrics::Metrics::new());
        let engine = Arc::new(Engine::new(plan, store().await));
        let observers = Observers::new(&engine, Some(metrics), None);
        *kept.lock().unwrap() = Some(Arc::new(observers.pipeline(Arc::clone(&engine))));
        let reloader = Reloader::new(Arc::clone(&engine), load);
        admin_router(Arc::new(AdminState {
            engine,
            observers,
            identifier: tollgate::identity::Identifier::new(),
            reloader,
            token: TOKEN.to_owned(),
        }))
    });
    let pipeline = slot.lock().unwrap().take().expect("the pipeline was built");
    (app, pipeline)
}

/// One request through `pipeline`'s two phases, as the server's adapters do; its verdict.
fn through<S: ServedStore>(
    app: &InProcess,
    pipeline: &Arc<Pipeline<S>>,
    request: &RequestCtx,
) -> tollgate::Verdict {
    let admission = app.block_on(pipeline.admit(request, "req".to_owned(), None));
    let verdict = admission.verdict.clone();
    let status = admission.status();
    admission.complete(status);
    verdict
}

fn call(app: &InProcess, method: &str, path: &str, body: &[u8]) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    app.send(
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

#[test]
fn every_route_needs_the_whole_token() {
    let dir = policy_dir();
    let (app, _) = admin(dir.path(), async || MemoryStore::new());
    for (method, path) in [
        ("GET", "/admin/plan"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/keys?limit=api"),
        ("DELETE", "/admin/keys?limit=api"),
        ("GET", "/admin/diagnostics"),
        ("GET", "/metrics"),
        ("GET", "/admin/nope"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong".to_owned()),
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
            Some(format!("Bearer {TOKEN}x")),
            Some(format!("Basic {TOKEN}")),
            Some(format!("Bearer{TOKEN}")),
            Some(format!("Bearer  {TOKEN} x")),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            let reply = app.send(method, path, &headers, b"");
            assert_eq!(reply.status, 401, "{method} {path} with {auth:?}");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
            support::assert_conforms_to(SPEC, &reply, "Problem");
        }
    }
}

/// The scheme is case-insensitive (RFC 9110 §11.1); two `Authorization` headers are
/// refused whatever they hold, never one of them chosen.
#[test]
fn the_bearer_scheme_in_any_case_and_one_authorization_header() {
    let dir = policy_dir();
    let (app, _) = admin(dir.path(), async || MemoryStore::new());
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        for spaces in [" ", "   "] {
            let auth = format!("{scheme}{spaces}{TOKEN}");
            let reply = app.send("GET", "/admin/plan", &[("Authorization", &auth)], b"");
            assert_eq!(reply.status, 200, "{auth}");
        }
    }
    let right = format!("Bearer {TOKEN}");
    for pair in [
        [right.as_str(), "Bearer wrong"],
        ["Bearer wrong", right.as_str()],
        [right.as_str(), right.as_str()],
    ] {
        let reply = app.send(
            "GET",
            "/admin/plan",
            &[("Authorization", pair[0]), ("Authorization", pair[1])],
            b"",
        );
        assert_eq!(reply.status, 401, "{pair:?}");
        assert!(
            reply.json()["detail"]
                .as_str()
                .unwrap()
                .contains("more than one `Authorization` header"),
            "{}",
            reply.text()
        );
        support::assert_conforms_to(SPEC, &reply, "Problem");
    }
}

#[test]
fn the_plan_reloads_and_a_broken_reload_keeps_it() {
    let dir = policy_dir();
    let (app, _) = admin(dir.path(), async || MemoryStore::new());
    let plan = call(&app, "GET", "/admin/plan", b"");
    assert_eq!(plan.status, 200);
    support::assert_conforms_to(SPEC, &plan, "PlanInfo");
    let first = plan.json();
    assert_eq!(first["limits"].as_array().unwrap().len(), 3);
    assert!(first["files"][0].as_str().unwrap().ends_with("shop.rl"));

    std::fs::write(
        dir.path().join("shop.rl"),
        POLICY.replace("10/min", "20/min"),
    )
    .unwrap();
    let reloaded = call(&app, "POST", "/admin/reload", b"");
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    support::assert_conforms_to(SPEC, &reloaded, "Reloaded");
    let version = reloaded.json()["version"].clone();
    assert_ne!(version, first["version"]);

    std::fs::write(
        dir.path().join("shop.rl"),
        POLICY.replace("10/min", "10/fortnight"),
    )
    .unwrap();
    let refused = call(&app, "POST", "/admin/reload", b"");
    assert_eq!(refused.status, 422);
    support::assert_conforms_to(SPEC, &refused, "Problem");
    assert!(
        refused.json()["detail"]
            .as_str()
            .unwrap()
            .contains("shop.rl:3:")
    );
    let plan = call(&app, "GET", "/admin/plan", b"").json();
    assert_eq!(plan["version"], version, "the good plan keeps serving");
    assert_eq!(plan["reloads_failed"], 1);
    assert!(plan["last_error"].as_str().unwrap().contains("fortnight"));
}

#[test]
fn explain_says_what_tollgate_explain_says() {
    let dir = policy_dir();
    let (app, _) = admin(dir.path(), async || MemoryStore::new());
    let reply = call(
        &app,
        "POST",
        "/admin/explain",
        json!({ "method": "GET", "path": "/api/items", "client_ip": "203.0.113.9" })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    support::assert_conforms_to(SPEC, &reply, "Explained");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["explain", "--policies"])
        .arg(dir.path())
        .args([
            "--method",
            "GET",
            "--path",
            "/api/items",
            "--ip",
            "203.0.113.9",
        ])
        .output()
        .unwrap();
    assert_eq!(
        reply.json()["explanation"],
        String::from_utf8_lossy(&output.stdout).as_ref()
    );
    let bad = call(&app, "POST", "/admin/explain", br#"{"path": "/x"}"#);
    assert_eq!(bad.status, 400);
    support::assert_conforms_to(SPEC, &bad, "Problem");
}

/// Counts, states and resets, by every selector, against `store`.
fn keys_on<S: ServedStore>(store: impl AsyncFnOnce() -> S) {
    let dir = policy_dir();
    let (app, engine) = admin(dir.path(), store);
    // Three clients use the API, one of them logs in too.
    for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip(ip.parse().unwrap());
        for _ in 0..2 {
            app.block_on(engine.decide(&request));
        }
    }
    let login =
        RequestCtx::new(Method::POST, "/login").with_client_ip("198.51.100.1".parse().unwrap());
    let key = app.block_on(engine.decide(&login)).reports[0].key.clone();

    let count = |query: &str| {
        let reply = call(&app, "GET", &format!("/admin/keys?{query}"), b"");
        assert_eq!(reply.status, 200, "{query}: {}", reply.text());
        support::assert_conforms_to(SPEC, &reply, "Counted");
        reply.json()["live_keys"].as_u64().unwrap()
    };
    assert_eq!(count("limit=api"), 3);
    assert_eq!(count("limit=login"), 1);
    assert_eq!(count("namespace=shop"), 4);
    assert_eq!(
        count(&format!("client={}", urlencode("ip:198.51.100.1/32"))),
        2
    );

    let state = call(
        &app,
        "GET",
        &format!("/admin/key?key={}", urlencode(&key)),
        b"",
    );
    assert_eq!(state.status, 200, "{}", state.text());
    support::assert_conforms_to(SPEC, &state, "KeyState");
    assert_eq!(state.json()["state"]["kind"], "window");
    assert_eq!(state.json()["state"]["count"], 1);

    let client = urlencode("ip:198.51.100.1/32");
    let reset = call(&app, "DELETE", &format!("/admin/keys?client={client}"), b"");
    assert_eq!(reset.status, 200);
    support::assert_conforms_to(SPEC, &reset, "Removed");
    assert_eq!(reset.json()["removed_keys"], 2);
    assert_eq!(count("namespace=shop"), 2);
    let reset = call(&app, "DELETE", "/admin/keys?namespace=shop", b"").json();
    assert_eq!(reset["removed_keys"], 2);
    assert_eq!(count("namespace=shop"), 0);
    let empty = call(
        &app,
        "GET",
        &format!("/admin/key?key={}", urlencode(&key)),
        b"",
    )
    .json();
    assert_eq!(empty["state"], serde_json::Value::Null);

    for bad in ["limit=api&client=x", "", "limit=api&wat=1"] {
        let reply = call(&app, "GET", &format!("/admin/keys?{bad}"), b"");
        assert_eq!(reply.status, 400, "{bad}");
        support::assert_conforms_to(SPEC, &reply, "Problem");
    }

    let diagnostics = call(&app, "GET", "/admin/diagnostics", b"");
    support::assert_conforms_to(SPEC, &diagnostics, "Diagnostics");
    assert_eq!(diagnostics.json()["store"]["ok"], true);
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[test]
fn keys_on_the_memory_store() {
    keys_on(async || MemoryStore::new());
}

#[test]
fn keys_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let url = redis.url();
    keys_on(async move || {
        RedisStore::connect(&url, std::time::Duration::from_secs(2))
            .await
            .expect("the store connects")
    });
}

#[test]
fn keys_on_a_redis_cluster() {
    let Some(cluster) = support::redis::Cluster::start(3, 0) else {
        return;
    };
    let url = cluster.url();
    keys_on(async move || {
        RedisStore::connect(&url, std::time::Duration::from_secs(5))
            .await
            .expect("the cluster connects")
    });
}

/// `tollgate admin …` calls a running `tollgate serve`'s admin API with the address and
/// token of the same settings; a wrong token fails with a readable message.
#[test]
fn the_admin_command_calls_a_running_server() {
    let dir = policy_dir();
    let policies = dir.path().display().to_string();
    let admin_listen = format!("127.0.0.1:{}", support::free_port());
    let env = [
        ("TOLLGATE_POLICIES", policies.as_str()),
        ("TOLLGATE_ADMIN_LISTEN", admin_listen.as_str()),
        ("TOLLGATE_ADMIN_TOKEN", TOKEN),
    ];
    let server = support::serving::Serving::start(&env);
    let admin = |args: &[&str], token: &str| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .arg("admin")
            .args(args)
            .env_clear()
            .env("TOLLGATE_POLICIES", &policies)
            .env("TOLLGATE_ADMIN_LISTEN", &admin_listen)
            .env("TOLLGATE_ADMIN_TOKEN", token);
        // The admin listener starts just after the main one.
        for _ in 0..500 {
            let output = command.output().unwrap();
            if !String::from_utf8_lossy(&output.stderr).contains("cannot reach") {
                return output;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the admin API never answered");
    };
    let plan = admin(&["plan"], TOKEN);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["limits"].as_array().unwrap().len(), 3);

    let explained = admin(
        &["explain", "--path", "/api/x", "--ip", "203.0.113.9"],
        TOKEN,
    );
    assert!(String::from_utf8_lossy(&explained.stdout).contains("✓ api"));
    let reload = admin(&["reload"], TOKEN);
    assert!(reload.status.success());
    let keys = admin(&["keys", "--limit", "api"], TOKEN);
    let keys: serde_json::Value = serde_json::from_slice(&keys.stdout).unwrap();
    assert_eq!(keys["live_keys"], 0);

    let ban = admin(
        &[
            "ban",
            "203.0.113.0/24",
            "--for",
            "60",
            "--reason",
            "scraping",
        ],
        TOKEN,
    );
    assert!(
        ban.status.success(),
        "{}",
        String::from_utf8_lossy(&ban.stderr)
    );
    let lists: serde_json::Value =
        serde_json::from_slice(&admin(&["lists"], TOKEN).stdout).unwrap();
    assert_eq!(lists["entries"][0]["net"], "203.0.113.0/24");
    let checked = support::check(
        server.addr,
        &json!({ "method": "GET", "path": "/api/x", "client_ip": "203.0.113.5" }),
    );
    assert_eq!(
        checked.json()["action"],
        "forbid",
        "the ban applies to the decision API"
    );
    let unlisted = admin(&["unlist", "203.0.113.0/24"], TOKEN);
    let unlisted: serde_json::Value = serde_json::from_slice(&unlisted.stdout).unwrap();
    assert_eq!(unlisted["removed"], true);

    // A client, and a token read from standard input (never on the command line).
    assert!(
        admin(&["ban", "--client", "h.x-tenant:evil"], TOKEN)
            .status
            .success()
    );
    let mut with_stdin = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    with_stdin
        .args(["admin", "ban", "--token-stdin", "--for", "60"])
        .env_clear()
        .env("TOLLGATE_POLICIES", &policies)
        .env("TOLLGATE_ADMIN_LISTEN", &admin_listen)
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = with_stdin.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"sk-from-stdin-123\n").unwrap();
    }
    let banned = child.wait_with_output().unwrap();
    assert!(banned.status.success());
    let banned: serde_json::Value = serde_json::from_slice(&banned.stdout).unwrap();
    assert!(banned["client"].as_str().unwrap().starts_with("token:"));
    let lists = String::from_utf8_lossy(&admin(&["lists"], TOKEN).stdout).into_owned();
    assert!(
        lists.contains("h.x-tenant:evil") && !lists.contains("sk-from-stdin"),
        "{lists}"
    );
    let checked = support::check(
        server.addr,
        &json!({ "method": "GET", "path": "/t/x", "client_ip": "198.51.100.9",
                 "headers": { "X-Tenant": "evil" } }),
    );
    assert_eq!(checked.json()["action"], "forbid", "{}", checked.text());
    let unlisted = admin(&["unlist", "--client", "h.x-tenant:evil"], TOKEN);
    assert!(String::from_utf8_lossy(&unlisted.stdout).contains("true"));
    let neither = admin(&["ban"], TOKEN);
    assert!(!neither.status.success(), "a ban names what it bans");

    let refused = admin(&["plan"], "not-the-admin-token-at-all-no");
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("401") && message.contains("Bearer"),
        "{message}"
    );
    drop(server);
}

/// Runtime lists on `store`, shared by two engines (two nodes): a ban added through one
/// node's admin API refuses the address on the other once it has read the lists back; a
/// safelisted address is not counted; entries end and can be removed.
fn runtime_lists_on<S: ServedStore + Clone>(store: impl AsyncFnOnce() -> S) {
    let dir = policy_dir();
    let (app, engine) = admin(dir.path(), store);
    let other = Engine::new(load(dir.path())().unwrap(), engine.store().clone());
    let ask = |engine: &Engine<S>, ip: &str| {
        let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip(ip.parse().unwrap());
        app.block_on(engine.decide(&request))
    };
    let add = |body: serde_json::Value| {
        let reply = call(&app, "POST", "/admin/lists", body.to_string().as_bytes());
        assert_eq!(reply.status, 201, "{}", reply.text());
        support::assert_conforms_to(SPEC, &reply, "RuntimeEntry");
        reply.json()
    };
    add(json!({ "list": "denylist", "net": "203.0.113.0/24", "reason": "scraping" }));
    add(json!({ "list": "safelist", "net": "198.51.100.7" }));
    let banned = add(json!({ "list": "denylist", "net": "192.0.2.1", "for_seconds": 600 }));
    assert!(banned["until"].as_u64().is_some());

    // The node that took the change applies it at once; the other once it reads the lists.
    let refused = ask(&engine, "203.0.113.50");
    assert!(
        matches!(&refused.action, tollgate::verdict::Action::Forbid { list, reason, .. }
            if &**list == "runtime-denylist" && reason.as_deref() == Some("scraping")),
        "{:?}",
        refused.action
    );
    assert!(ask(&other, "203.0.113.50").is_allowed(), "not read yet");
    assert_eq!(app.block_on(other.refresh_runtime_lists()).unwrap(), 3);
    assert!(!ask(&other, "203.0.113.50").is_allowed());
    assert!(!ask(&other, "192.0.2.1").is_allowed());
    let safe = ask(&other, "198.51.100.7");
    assert!(matches!(
        safe.action,
        tollgate::verdict::Action::Bypass { .. }
    ));
    assert!(
        safe.reports.is_empty(),
        "a safelisted address is not counted"
    );
    assert!(ask(&other, "198.51.100.8").is_allowed());

    let listed = call(&app, "GET", "/admin/lists", b"");
    support::assert_conforms_to(SPEC, &listed, "Entries");
    assert_eq!(listed.json()["entries"].as_array().unwrap().len(), 3);

    let removed = call(
        &app,
        "DELETE",
        "/admin/lists?list=denylist&net=203.0.113.0%2F24",
        b"",
    );
    support::assert_conforms_to(SPEC, &removed, "EntryRemoved");
    assert_eq!(removed.json()["removed"], true);
    let again = call(
        &app,
        "DELETE",
        "/admin/lists?list=denylist&net=203.0.113.0%2F24",
        b"",
    );
    assert_eq!(again.json()["removed"], false);
    app.block_on(other.refresh_runtime_lists()).unwrap();
    assert!(ask(&other, "203.0.113.50").is_allowed());

    for bad in [
        json!({ "list": "denylist", "net": "not-an-address" }),
        json!({ "list": "greylist", "net": "192.0.2.9" }),
        json!({ "list": "denylist", "net": "192.0.2.9", "for_seconds": 0 }),
        json!({ "list": "denylist", "net": "192.0.2.9", "extra": true }),
        json!({ "list": "denylist" }),
        json!({ "list": "denylist", "net": "192.0.2.9", "client": "user:bob" }),
        json!({ "list": "denylist", "client": "bob" }),
        json!({ "list": "denylist", "client": "user:" }),
        json!({ "list": "denylist", "client": "user:a b" }),
        json!({ "list": "denylist", "client": format!("user:{}", "a".repeat(600)) }),
        json!({ "list": "denylist", "token": "" }),
    ] {
        let reply = call(&app, "POST", "/admin/lists", bad.to_string().as_bytes());
        assert_eq!(reply.status, 400, "{bad}");
        support::assert_conforms_to(SPEC, &reply, "Problem");
    }
    let listed = call(&app, "GET", "/admin/lists", b"");
    assert_eq!(
        listed.json()["entries"].as_array().unwrap().len(),
        2,
        "bad input changed nothing"
    );
}

/// Client entries on `store`: a user, a token (given raw, kept hashed) and one part of a
/// composite key are refused on every node; a safelisted client is not counted; a key's
/// address part is taken as a network; entries are removed the way they were added.
fn runtime_client_entries_on<S: ServedStore + Clone>(store: impl AsyncFnOnce() -> S) {
    const TOKEN_SENT: &str = "sk-live-client-entry-token-4711";
    let dir = policy_dir();
    let (app, engine) = admin(dir.path(), store);
    // Nodes share the secret tokens are hashed with (`key_hash_secret`).
    let other = Engine::new(load(dir.path())().unwrap(), engine.store().clone())
        .with_key_hasher(engine.key_hasher().clone());
    let add = |body: serde_json::Value| {
        let reply = call(&app, "POST", "/admin/lists", body.to_string().as_bytes());
        assert_eq!(reply.status, 201, "{}", reply.text());
        support::assert_conforms_to(SPEC, &reply, "RuntimeEntry");
        reply.json()
    };
    add(json!({ "list": "denylist", "client": "user:mallory", "reason": "abuse" }));
    let token = add(json!({ "list": "denylist", "token": TOKEN_SENT, "for_seconds": 60 }));
    let hashed = token["client"].as_str().unwrap().to_owned();
    assert!(hashed.starts_with("token:") && !hashed.contains(TOKEN_SENT));
    add(json!({ "list": "denylist", "client": "h.x-tenant:evil" }));
    add(json!({ "list": "safelist", "client": "h.x-tenant:partner" }));
    let net = add(json!({ "list": "denylist", "client": "ip:192.0.2.0/24" }));
    assert_eq!(
        net["net"], "192.0.2.0/24",
        "a key's address part is a network"
    );
    app.block_on(other.refresh_runtime_lists()).unwrap();

    let ask = |request: RequestCtx| app.block_on(other.decide(&request));
    let api = || RequestCtx::new(Method::GET, "/api/x").with_client_ip([198, 51, 100, 1].into());
    let tenant = |name: &str| {
        RequestCtx::new(Method::GET, "/t/x")
            .with_client_ip([198, 51, 100, 1].into())
            .try_header("X-Tenant", name)
            .unwrap()
    };
    let forbidden = |v: &tollgate::verdict::Verdict| matches!(&v.action, tollgate::verdict::Action::Forbid { list, .. } if &**list == "runtime-denylist");
    let mallory = ask(api().with_user_id("mallory"));
    assert!(
        forbidden(&mallory),
        "a banned user, whatever the key: {:?}",
        mallory.action
    );
    assert!(ask(api().with_user_id("alice")).is_allowed());
    assert!(
        forbidden(&ask(api().with_api_token(TOKEN_SENT))),
        "a banned token"
    );
    assert!(ask(api().with_api_token("another-token")).is_allowed());
    assert!(
        forbidden(&ask(tenant("evil"))),
        "one part of the key `h.x-tenant:evil+ip:…`"
    );
    let partner = ask(tenant("partner"));
    assert!(
        matches!(partner.action, tollgate::verdict::Action::Bypass { .. })
            && partner.reports.is_empty(),
        "a safelisted client is not counted: {partner:?}"
    );
    assert!(ask(tenant("acme")).is_allowed());
    assert!(forbidden(&ask(
        RequestCtx::new(Method::GET, "/api/x").with_client_ip([192, 0, 2, 7].into())
    )));
    // Nothing was counted for refused clients.
    let keys = call(&app, "GET", "/admin/keys?client=user%3Amallory", b"");
    assert_eq!(keys.json()["live_keys"], 0);

    let removed = call(
        &app,
        "DELETE",
        &format!("/admin/lists?list=denylist&token={TOKEN_SENT}"),
        b"",
    );
    assert_eq!(removed.json()["removed"], true, "{}", removed.text());
    let removed = call(
        &app,
        "DELETE",
        "/admin/lists?list=denylist&client=user%3Amallory",
        b"",
    );
    assert_eq!(removed.json()["removed"], true);
    app.block_on(other.refresh_runtime_lists()).unwrap();
    assert!(ask(api().with_user_id("mallory")).is_allowed());
    assert!(ask(api().with_api_token(TOKEN_SENT)).is_allowed());
    let listed = call(&app, "GET", "/admin/lists", b"").text();
    assert!(!listed.contains(TOKEN_SENT), "{listed}");
}

#[test]
fn runtime_client_entries_on_the_memory_store() {
    runtime_client_entries_on(async || Arc::new(MemoryStore::new()));
}

#[test]
fn runtime_client_entries_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let url = redis.url();
    runtime_client_entries_on(async move || {
        Arc::new(
            RedisStore::connect(&url, std::time::Duration::from_secs(2))
                .await
                .expect("the store connects"),
        )
    });
}

#[test]
fn runtime_client_entries_on_a_redis_cluster() {
    let Some(cluster) = support::redis::Cluster::start(3, 0) else {
        return;
    };
    let url = cluster.url();
    runtime_client_entries_on(async move || {
        Arc::new(
            RedisStore::connect(&url, std::time::Duration::from_secs(5))
                .await
                .expect("the cluster connects"),
        )
    });
}

#[test]
fn runtime_lists_on_the_memory_store() {
    runtime_lists_on(async || Arc::new(MemoryStore::new()));
}

#[test]
fn runtime_lists_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let url = redis.url();
    runtime_lists_on(async move || {
        Arc::new(
            RedisStore::connect(&url, std::time::Duration::from_secs(2))
                .await
                .expect("the store connects"),
        )
    });
}

#[test]
fn runtime_lists_on_a_redis_cluster() {
    let Some(cluster) = support::redis::Cluster::start(3, 0) else {
        return;
    };
    let url = cluster.url();
    runtime_lists_on(async move || {
        Arc::new(
            RedisStore::connect(&url, std::time::Duration::from_secs(5))
                .await
                .expect("the cluster connects"),
        )
    });
}

/// Diagnostics say which store counts and how it is: the memory store's keys and cap; a
/// Redis whose breaker opened once Redis stopped answering.
#[test]
fn diagnostics_show_the_memory_store_and_the_breaker() {
    let dir = policy_dir();
    let (app, engine) = admin(dir.path(), async || MemoryStore::with_max_keys(1_000));
    for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip(ip.parse().unwrap());
        assert!(app.block_on(engine.decide(&request)).is_allowed());
    }
    let memory = call(&app, "GET", "/admin/diagnostics", b"");
    support::assert_conforms_to(SPEC, &memory, "Diagnostics");
    let store = &memory.json()["store"];
    assert_eq!(store["kind"], "memory");
    assert_eq!(store["keys"], 3, "one counter per client");
    let cap = store["max_keys"].as_u64().unwrap();
    assert!(
        (1_000..1_100).contains(&cap),
        "rounded up to whole shards: {cap}"
    );
    assert_eq!(store["breakers_open"], 0);

    let Some(mut redis) = support::redis::Redis::start() else {
        return;
    };
    let url = redis.url();
    let (app, pipeline) = admin_with_pipeline(dir.path(), async move || {
        RedisStore::connect(&url, std::time::Duration::from_millis(200))
            .await
            .expect("the store connects")
    });
    let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip([198, 51, 100, 1].into());
    for _ in 0..3 {
        assert!(through(&app, &pipeline, &request).is_allowed());
    }
    let healthy = call(&app, "GET", "/admin/diagnostics", b"");
    support::assert_conforms_to(SPEC, &healthy, "Diagnostics");
    let healthy = healthy.json();
    assert_eq!(healthy["store"]["redis"]["calls"], 3, "{healthy}");
    assert_eq!(
        healthy["store"]["redis"]["batched_requests"], 3,
        "{healthy}"
    );
    let text = call(&app, "GET", "/metrics", b"").text();
    for line in [
        "tollgate_redis_calls_total 3",
        "tollgate_redis_batched_requests_total 3",
        r#"tollgate_redis_syncs_total{outcome="error"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    assert_eq!(healthy["store"]["kind"], "redis");
    assert_eq!(healthy["store"]["breakers"], 1);
    assert_eq!(healthy["store"]["breakers_open"], 0);
    assert!(healthy["store"].get("keys").is_none());
    redis.kill();
    for _ in 0..10 {
        through(&app, &pipeline, &request);
    }
    let down = call(&app, "GET", "/admin/diagnostics", b"");
    support::assert_conforms_to(SPEC, &down, "Diagnostics");
    let store = &down.json()["store"];
    assert_eq!(store["ok"], false, "{store}");
    assert_eq!(store["breakers_open"], 1, "{store}");
    let text = call(&app, "GET", "/metrics", b"").text();
    for line in [
        "tollgate_store_breakers 1",
        "tollgate_store_breakers_open 1",
        r#"tollgate_decisions_total{limit="api",namespace="shop",outcome="store_error"} 10"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let errors = text
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_store_errors_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(
        (1..=10).contains(&errors),
        "failed calls until the breaker opened, none after: {errors}"
    );
}

/// `metrics_on_main`: `/metrics` on the main listener too, without a token; off by default.
#[test]
fn metrics_on_the_main_listener_when_asked() {
    for on in [true, false] {
        let app = InProcess::build(async move || {
            let plan = compile(&PolicySet::from_sources([("shop.rl", POLICY)])).unwrap();
            let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
            let metrics = Arc::new(tollgate::metrics::Metrics::new());
            let observers = Observers::new(&engine, Some(metrics), None);
            tollgate::server::router(Arc::new(tollgate::server::AppState {
                metrics_on_main: on,
                ..tollgate::server::AppState::new(engine, observers, Default::default())
            }))
        });
        let reply = app.send("GET", "/metrics", &[], b"");
        assert_eq!(reply.status, if on { 200 } else { 404 });
        if on {
            assert!(
                reply
                    .text()
                    .contains("# TYPE tollgate_store_breakers gauge")
            );
        }
    }
}

/// `/metrics` (admin listener): every family is there, parsed by a Prometheus text parser;
/// the counters move with traffic, reloads and bans; no label names a client.
#[test]
fn metrics_follow_traffic_reloads_and_bans() {
    let dir = policy_dir();
    let (app, pipeline) = admin_with_pipeline(dir.path(), async || MemoryStore::new());
    let engine = pipeline.engine();
    let scrape = || {
        let reply = call(&app, "GET", "/metrics", b"");
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .header("content-type")
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let text = reply.text();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        (
            prometheus_parse::Scrape::parse(lines).expect("Prometheus text format"),
            text,
        )
    };
    let value = |scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref h) => h.last().map_or(0.0, |b| b.count),
                _ => 0.0,
            })
            .sum::<f64>()
    };
    let (before, _) = scrape();
    for family in [
        "tollgate_store_breakers",
        "tollgate_store_breakers_open",
        "tollgate_memory_store_keys",
        "tollgate_memory_store_evictions_total",
        "tollgate_redis_calls_total",
        "tollgate_redis_batched_requests_total",
        "tollgate_local_first_keys",
        "tollgate_store_errors_total",
        "tollgate_active_bans",
        "tollgate_plan_info",
        "tollgate_export_queue_rows",
        "tollgate_export_spool_rows",
        "tollgate_export_rows_sent_total",
        "tollgate_export_rows_spooled_total",
        "tollgate_export_rows_dropped_total",
    ] {
        assert!(
            before.samples.iter().any(|s| s.metric == family),
            "{family} is exported from the start"
        );
    }

    // `api` allows 10/min per address: 12 requests from one client, 1 from another.
    let ask = |ip: &str| {
        let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip(ip.parse().unwrap());
        through(&app, &pipeline, &request)
    };
    for _ in 0..12 {
        ask("198.51.100.23");
    }
    ask("198.51.100.24");
    let (after, text) = scrape();
    let api = |outcome: &str| {
        value(
            &after,
            "tollgate_decisions_total",
            &[
                ("namespace", "shop"),
                ("limit", "api"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(api("reject"), 2.0);
    assert_eq!(api("allow") + api("near_limit"), 11.0, "{text}");
    assert_eq!(api("near_limit"), 3.0, "8, 9 and 10 of 10 used");
    assert_eq!(
        value(
            &after,
            "tollgate_requests_total",
            &[("outcome", "reject"), ("rule", "api")]
        ),
        2.0
    );
    assert_eq!(
        value(&after, "tollgate_requests_total", &[("outcome", "allow")]),
        11.0
    );
    assert_eq!(
        value(&after, "tollgate_decision_duration_seconds_count", &[]),
        13.0
    );
    assert_eq!(
        value(&after, "tollgate_store_duration_seconds_count", &[]),
        13.0
    );
    assert_eq!(value(&after, "tollgate_memory_store_keys", &[]), 2.0);
    assert!(!text.contains("198.51.100"), "no client in any label");

    // A reload, a refused one, and a ban.
    assert_eq!(call(&app, "POST", "/admin/reload", b"").status, 200);
    std::fs::write(dir.path().join("broken.rl"), "limit {").unwrap();
    assert_eq!(call(&app, "POST", "/admin/reload", b"").status, 422);
    let ban = serde_json::json!({ "list": "denylist", "net": "203.0.113.0/24" });
    assert_eq!(
        call(&app, "POST", "/admin/lists", ban.to_string().as_bytes()).status,
        201
    );
    assert!(!ask("203.0.113.9").is_allowed());
    let (last, text) = scrape();
    assert_eq!(
        value(&last, "tollgate_reloads_total", &[("outcome", "ok")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&last, "tollgate_reloads_total", &[("outcome", "error")]),
        1.0
    );
    assert_eq!(value(&last, "tollgate_active_bans", &[]), 1.0);
    assert_eq!(
        value(
            &last,
            "tollgate_requests_total",
            &[("outcome", "forbid"), ("rule", "runtime-denylist")]
        ),
        1.0
    );
    let version = engine.plan().version().to_owned();
    assert_eq!(
        value(&last, "tollgate_plan_info", &[("version", &version)]),
        1.0
    );
}

/// Flags and tarpits added by hand (as anomalies add them): a tarpitted address is held
/// `delay_ms`, a flagged one carries the reason, both are listed and removed like bans;
/// a body the spec refuses is refused. On Redis they live in their own hash.
fn marks_on<S: ServedStore>(store: impl AsyncFnOnce() -> S) {
    let dir = policy_dir();
    let (app, engine) = admin(dir.path(), store);
    let schema = support::schema_in(SPEC, "NewEntry");
    for bad in [
        json!({ "list": "tarpit", "net": "192.0.2.7" }),
        json!({ "list": "tarpit", "net": "192.0.2.7", "delay_ms": 0 }),
        json!({ "list": "tarpit", "net": "192.0.2.7", "delay_ms": 30_001 }),
        json!({ "list": "denylist", "net": "192.0.2.7", "delay_ms": 100 }),
        json!({ "list": "flag", "net": "192.0.2.7", "delay_ms": 100 }),
    ] {
        assert!(!schema.is_valid(&bad), "the spec refuses {bad}");
        let reply = call(&app, "POST", "/admin/lists", bad.to_string().as_bytes());
        assert_eq!(reply.status, 400, "{bad}: {}", reply.text());
        support::assert_conforms_to(SPEC, &reply, "Problem");
    }
    for good in [
        json!({ "list": "tarpit", "net": "192.0.2.7", "delay_ms": 1500, "for_seconds": 600 }),
        json!({ "list": "flag", "net": "192.0.2.0/24", "reason": "watched" }),
    ] {
        assert!(schema.is_valid(&good), "the spec accepts {good}");
        let reply = call(&app, "POST", "/admin/lists", good.to_string().as_bytes());
        assert_eq!(reply.status, 201, "{good}: {}", reply.text());
        support::assert_conforms_to(SPEC, &reply, "RuntimeEntry");
    }
    let ask = |ip: &str| {
        let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip(ip.parse().unwrap());
        app.block_on(engine.decide(&request))
    };
    let held = ask("192.0.2.7");
    assert_eq!(
        held.action,
        tollgate::verdict::Action::Delay(std::time::Duration::from_millis(1500))
    );
    assert_eq!(held.flags, [Arc::<str>::from("watched")]);
    let neighbour = ask("192.0.2.8");
    assert_eq!(neighbour.action, tollgate::verdict::Action::Allow);
    assert_eq!(neighbour.flags.len(), 1, "the flag holds for the /24");
    let listed = call(&app, "GET", "/admin/lists", b"");
    let lists: Vec<String> = listed.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["list"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lists, ["flag", "tarpit"]);
    let removed = call(
        &app,
        "DELETE",
        "/admin/lists?list=tarpit&net=192.0.2.7",
        b"",
    );
    assert_eq!(removed.json()["removed"], true);
    assert_eq!(ask("192.0.2.7").action, tollgate::verdict::Action::Allow);
}

#[test]
fn flags_and_tarpits_through_the_admin_api_on_memory() {
    marks_on(async || MemoryStore::new());
}

#[test]
fn flags_and_tarpits_through_the_admin_api_on_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let url = redis.url();
    marks_on(async move || {
        RedisStore::connect(&url, std::time::Duration::from_secs(2))
            .await
            .expect("the store connects")
    });
    // Apart from the lists' hash, which earlier nodes prune of lists they do not know.
    let hashes = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.addr.port().to_string(),
            "HKEYS",
            "tollgate:runtime-marks",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&hashes.stdout).trim(),
        "flag|192.0.2.0/24"
    );
}

/// Where an adaptive limit stands on the node: `/admin/diagnostics`, `/metrics` and
/// `/admin/explain` (whose offline words `tollgate explain` shares) agree.
#[test]
fn adaptive_limits_show_where_they_stand() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("shop.rl"),
        r#"namespace "shop";
limit upstream {
  match { route GET "/api/**"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive aimd { initial 2; max 10; }
  admission { threshold 90%; }
}
"#,
    )
    .unwrap();
    let (app, pipeline) = admin_with_pipeline(dir.path(), async || MemoryStore::new());
    let request = RequestCtx::new(Method::GET, "/api/x").with_client_ip([203, 0, 113, 9].into());
    let held = app.block_on(pipeline.admit(&request, "held".to_owned(), None));
    assert!(held.verdict.is_allowed());

    let diagnostics = call(&app, "GET", "/admin/diagnostics", b"");
    support::assert_conforms_to(SPEC, &diagnostics, "Diagnostics");
    let adaptive = &diagnostics.json()["adaptive"][0];
    assert_eq!(adaptive["limit"], "upstream");
    assert_eq!(adaptive["namespace"], "shop");
    assert_eq!(adaptive["lowest"], 2);
    assert_eq!(adaptive["in_flight"], 1);
    assert_eq!(adaptive["reject_probability"], 0.0);

    let metrics = call(&app, "GET", "/metrics", b"").text();
    assert!(
        metrics.contains(r#"tollgate_adaptive_limit{limit="upstream",namespace="shop"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tollgate_adaptive_in_flight{limit="upstream",namespace="shop"} 1"#)
    );

    let explained = call(
        &app,
        "POST",
        "/admin/explain",
        json!({ "method": "GET", "path": "/api/x", "client_ip": "203.0.113.9" })
            .to_string()
            .as_bytes(),
    );
    let words = explained.json()["explanation"].as_str().unwrap().to_owned();
    assert!(words.contains("adaptive concurrency (aimd, backoff 0.9, timeout 5s): starts at 2 in flight, within 1–10, per node"), "{words}");
    assert!(
        words.contains(
            "admission control: refuses up to 80% while under 90% of answers over 30s succeed"
        ),
        "{words}"
    );
    assert!(words.contains("now   limit 2, 1 in flight"), "{words}");

    held.complete(200);
    let after = call(&app, "GET", "/admin/diagnostics", b"").json();
    assert_eq!(after["adaptive"][0]["in_flight"], 0);
}
