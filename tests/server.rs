//! `tollgate serve`: the decision API, forward-auth in both flavours, bad input, and every
//! JSON answer checked against `docs/openapi.yaml`. The router is called in-process; what
//! only a socket shows (header-size limits) goes over a real one.

mod support;

use std::net::IpAddr;

use serde_json::{Value, json};
use support::{InProcess, Reply, TestServer, assert_conforms, schema};
use tollgate::identity::Identifier;
use tollgate::middleware::HttpOptions;

const POLICY: &str = r#"
limit login {
  match { route POST "/auth/login"; }
  key ip;
  algorithm fixed_window;
  rate 2/min;
  on_exceed reject 429 reason "too many login attempts";
}
limit exports { match { route GET "/export"; } key ip; rate 1 concurrent; lease 1h; }
limit search { match { route GET "/search"; } key ip; algorithm fixed_window; rate 10/min; }
denylist bots { user_agent ~= "(?i)sqlmap"; respond 403 reason "no scanners"; }
"#;

fn options() -> HttpOptions {
    HttpOptions {
        identifier: Identifier::new().with_trusted_proxies(vec!["127.0.0.0/8".parse().unwrap()]),
        ..HttpOptions::default()
    }
}

fn server() -> InProcess {
    InProcess::start(POLICY, options())
}

fn check(server: &InProcess, body: &Value) -> Reply {
    server.send(
        "POST",
        "/v1/check",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

#[test]
fn check_allows_then_rejects_with_headers_to_set() {
    let server = server();
    let request = json!({ "method": "POST", "path": "/auth/login", "client_ip": "198.51.100.7" });
    let first = check(&server, &request);
    assert_eq!(first.status, 200);
    assert_conforms(&first, "CheckResponse");
    let body = first.json();
    assert_eq!(body["allowed"], true);
    assert_eq!(body["action"], "allow");
    assert_eq!(body["policy"], "login");
    assert_eq!(body["remaining"], 1);
    assert_eq!(body["headers"]["x-ratelimit-limit"], "2");
    check(&server, &request);
    let third = check(&server, &request);
    assert_conforms(&third, "CheckResponse");
    let body = third.json();
    assert_eq!(body["allowed"], false);
    assert_eq!(body["action"], "reject");
    assert_eq!(body["status"], 429);
    assert_eq!(body["reason"], "too many login attempts");
    assert!(body["retry_after"].as_u64().unwrap() >= 1);
    assert!(body["headers"]["retry-after"].is_string());
    // Another client is counted apart.
    let other = check(
        &server,
        &json!({ "method": "POST", "path": "/auth/login", "client_ip": "198.51.100.8" }),
    );
    assert_eq!(other.json()["allowed"], true);
}

#[test]
fn check_leases_can_be_released() {
    let server = server();
    let request = json!({ "method": "GET", "path": "/export", "client_ip": "198.51.100.9" });
    let first = check(&server, &request).json();
    assert_eq!(first["allowed"], true);
    assert_eq!(check(&server, &request).json()["allowed"], false);
    let release = json!({ "leases": first["leases"] });
    let reply = server.send("POST", "/v1/release", &[], release.to_string().as_bytes());
    assert_eq!(reply.status, 204);
    assert_eq!(check(&server, &request).json()["allowed"], true);
}

#[test]
fn check_cost_and_headers_count() {
    let server = server();
    let body = json!({ "method": "GET", "path": "/search?q=x", "client_ip": "2001:db8::1", "cost": 4,
                       "headers": { "User-Agent": "curl/8" } });
    assert_eq!(check(&server, &body).json()["remaining"], 6);
    let bot = json!({ "method": "GET", "path": "/search", "client_ip": "2001:db8::1",
                      "headers": { "user-agent": "sqlmap/1.7" } });
    let reply = check(&server, &bot);
    assert_conforms(&reply, "CheckResponse");
    let body = reply.json();
    assert_eq!(
        (body["action"].as_str(), body["status"].as_u64()),
        (Some("forbid"), Some(403))
    );
    assert_eq!(body["policy"], "bots");
}

#[test]
fn bad_input_gets_a_400_problem_naming_the_field() {
    let server = server();
    let cases: &[(&[u8], Option<&str>)] = &[
        (b"{not json", None),
        (br#"{"path": "/x"}"#, None),
        (
            br#"{"method": "GET", "path": "/x", "client_ip": 5}"#,
            Some("client_ip"),
        ),
        (
            br#"{"method": "GET", "path": "/x", "client_ip": "1.2.3.999"}"#,
            Some("client_ip"),
        ),
        (br#"{"method": "get", "path": "/x"}"#, Some("method")),
        (br#"{"method": "GET", "path": "x"}"#, Some("path")),
        (
            br#"{"method": "GET", "path": "/x", "cost": 0}"#,
            Some("cost"),
        ),
        (
            br#"{"method": "GET", "path": "/x", "cost": -1}"#,
            Some("cost"),
        ),
        (
            br#"{"method": "GET", "path": "/x", "headers": {"bad name": "v"}}"#,
            Some("headers.bad name"),
        ),
        (br#"{"method": "GET", "path": "/x", "extra": 1}"#, None),
        (b"", None),
    ];
    for (body, field) in cases {
        let reply = server.send("POST", "/v1/check", &[], body);
        assert_eq!(
            reply.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            reply.text()
        );
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert_conforms(&reply, "Problem");
        let problem = reply.json();
        assert_eq!(problem["type"], "urn:tollgate:problem:invalid-request");
        if let Some(field) = field {
            assert_eq!(problem["field"], *field, "{}", reply.text());
        }
    }
    // The missing field is named in the detail.
    let reply = server.send("POST", "/v1/check", &[], br#"{"path": "/x"}"#);
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("method"),
        "{}",
        reply.text()
    );
}

#[test]
fn oversized_bodies_and_headers_are_refused() {
    let server = TestServer::start(POLICY, options());
    let big = vec![b' '; 200 * 1024];
    let reply = server.send("POST", "/v1/check", &[], &big);
    assert_eq!(reply.status, 413);
    assert_conforms(&reply, "Problem");
    let huge = "x".repeat(512 * 1024);
    let reply = server.send("GET", "/v1/auth", &[("X-Huge", &huge)], b"");
    assert_eq!(reply.status, 431, "{}", reply.text());
    // The server is still there.
    assert_eq!(server.send("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn forward_auth_for_traefik_passes_the_real_status() {
    let server = server();
    let auth = |client: &str| {
        server.send(
            "GET",
            "/v1/auth",
            &[
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Uri", "/auth/login"),
                ("X-Forwarded-Host", "app.example.com"),
                ("X-Forwarded-For", client),
            ],
            b"",
        )
    };
    for _ in 0..2 {
        let ok = auth("203.0.113.1");
        assert_eq!(ok.status, 200);
        assert!(ok.header("x-ratelimit-remaining").is_some());
    }
    let refused = auth("203.0.113.1");
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert!(refused.header("retry-after").is_some());
    assert_conforms(&refused, "Problem");
    assert_eq!(refused.json()["policy"], "login");
    // Another client behind the same (trusted) proxy is counted apart.
    assert_eq!(auth("203.0.113.2").status, 200);
}

#[test]
fn forward_auth_for_nginx_answers_403_with_the_real_status_in_a_header() {
    let server = server();
    let auth = || {
        server.send(
            "GET",
            "/v1/auth",
            &[
                ("X-Original-Method", "POST"),
                ("X-Original-URI", "/auth/login?next=/home"),
                ("X-Forwarded-For", "203.0.113.77"),
            ],
            b"",
        )
    };
    assert_eq!(auth().status, 200);
    assert_eq!(auth().status, 200);
    let refused = auth();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("x-tollgate-status"), Some("429"));
    assert_eq!(refused.header("x-tollgate-policy"), Some("login"));
    assert!(refused.header("retry-after").is_some());
}

#[test]
fn health_readiness_and_unknown_paths() {
    let server = server();
    assert_eq!(server.send("GET", "/healthz", &[], b"").status, 200);
    let ready = server.send("GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 200);
    assert!(ready.text().starts_with("ready: plan "));
    let missing = server.send("GET", "/nope", &[], b"");
    assert_eq!(missing.status, 404);
    assert_conforms(&missing, "Problem");
}

#[test]
fn ipv6_clients_share_a_counter_per_64() {
    let server = InProcess::start(
        r#"limit l { match { route GET "/x"; } key ip; algorithm fixed_window; rate 1/min; }"#,
        HttpOptions::default(),
    );
    let ask = |ip: &str| {
        let ip: IpAddr = ip.parse().unwrap();
        check(
            &server,
            &json!({ "method": "GET", "path": "/x", "client_ip": ip }),
        )
        .json()["allowed"]
            .clone()
    };
    assert_eq!(ask("2001:db8:1:2::1"), true);
    assert_eq!(ask("2001:db8:1:2:ffff::9"), false, "same /64");
    assert_eq!(ask("2001:db8:1:3::1"), true, "another /64");
}

/// The server accepts exactly the bodies `docs/openapi.yaml` allows: for each body below,
/// valid by the schema ⇔ not refused with 400 — and every answer matches its documented
/// schema.
#[test]
fn the_decision_api_accepts_exactly_what_the_spec_allows() {
    let server = server();
    let check_schema = schema("CheckRequest");
    let release_schema = schema("ReleaseRequest");
    let report_schema = schema("ReportRequest");
    let bodies: &[(&str, &str)] = &[
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}, "status": 401}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login", "client_ip": "203.0.113.9"}, "status": 599}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}, "status": 600}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}, "status": 99}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}}"#,
        ),
        ("/v1/report", r#"{"status": 401}"#),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login", "x": 1}, "status": 401}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}, "status": 401, "x": 1}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/a%00"}, "status": 401}"#,
        ),
        ("/v1/check", r#"{"method": "GET", "path": "/x"}"#),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x?q=%2F%zz\u0001"}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "client_ip": null}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "client_ip": ""}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "client_ip": "203.0.113.9"}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "client_ip": "2001:db8::1"}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "client_ip": "203.0.113.9:80"}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "client_ip": "localhost"}"#,
        ),
        ("/v1/check", r#"{"method": "GET", "path": ""}"#),
        ("/v1/check", r#"{"method": "GET", "path": "x"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a%2Fb"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a%5cb"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a\\b"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a%00"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a\u0007"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a%"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/a%4g"}"#),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/caf\u00e9/%41/./x/../y//z"}"#,
        ),
        ("/v1/check", r#"{"method": "get", "path": "/x"}"#),
        ("/v1/check", r#"{"method": "", "path": "/x"}"#),
        ("/v1/check", r#"{"method": "PURGE", "path": "/x"}"#),
        ("/v1/check", r#"{"method": "GET", "path": "/x", "cost": 0}"#),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": -3}"#,
        ),
        ("/v1/check", r#"{"method": "GET", "path": "/x", "cost": 7}"#),
        // JSON Schema's integers: 2.0 and 1e2 are integers; null and 2.5 are not.
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": 2.0}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": 1e2}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": 2.5}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": null}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": 9007199254740991}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "cost": 9007199254740992}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "host": null}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}, "status": 401.0}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login"}, "status": 401.5}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "POST", "path": "/login", "cost": null}, "status": 401}"#,
        ),
        // What a request used: `cost`, or the `response` the gateway saw — not both.
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "cost": 500, "latency_ms": 30}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "cost": 2.0}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "cost": -1}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "cost": null}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "latency_ms": -5}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "response": {"headers": {"x-usage": "5"}, "body": {"usage": {"total_tokens": 5}}}}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "response": {"body": null}}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "response": {"headers": {"bad header": "5"}}}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "response": {"status": 200}}"#,
        ),
        (
            "/v1/report",
            r#"{"request": {"method": "GET", "path": "/x"}, "status": 200, "cost": 5, "response": {}}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": 2.0, "local": false}]}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": 1.5, "local": false}]}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": 9007199254740992, "local": false}]}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "headers": {"X-A": "b"}}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "headers": {"bad name": "b"}}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "headers": {"X-A": "a\nb"}}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "headers": {"X-A": "caf\u00e9\tok"}}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "host": "Example.COM:80"}"#,
        ),
        (
            "/v1/check",
            r#"{"method": "GET", "path": "/x", "extra": true}"#,
        ),
        ("/v1/check", r#"{"path": "/x"}"#),
        ("/v1/check", r#"[]"#),
        ("/v1/release", r#"{"leases": []}"#),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": 1, "local": false}]}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": 1, "local": false, "x": 1}]}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": -1, "local": false}]}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "id": 9007199254740991, "local": true}]}"#,
        ),
        (
            "/v1/release",
            r#"{"leases": [{"key": "k", "local": false}]}"#,
        ),
        ("/v1/release", r#"{"leases": {}}"#),
        ("/v1/release", r#"{}"#),
    ];
    for (endpoint, body) in bodies {
        let value: Value = serde_json::from_str(body).unwrap();
        let (validator, answer) = match *endpoint {
            "/v1/check" => (&check_schema, "CheckResponse"),
            "/v1/report" => (&report_schema, "ReportResponse"),
            _ => (&release_schema, ""),
        };
        let valid = validator.is_valid(&value);
        let reply = server.send("POST", endpoint, &[], body.as_bytes());
        assert_eq!(
            reply.status != 400,
            valid,
            "{endpoint} {body}: the spec says {}, the server answered {} {}",
            if valid { "valid" } else { "invalid" },
            reply.status,
            reply.text()
        );
        match reply.status {
            200 => assert_conforms(&reply, answer),
            204 => assert!(reply.body.is_empty()),
            _ => assert_conforms(&reply, "Problem"),
        }
    }
}

/// Forward-auth accepts exactly the forwarded URIs the spec's `RequestTarget` allows (an
/// absent header is `/`).
#[test]
fn forward_auth_accepts_exactly_the_forwarded_uris_the_spec_allows() {
    let server = server();
    let target = schema("RequestTarget");
    for uri in [
        "",
        "/",
        "/x?q=%2F",
        "x",
        "//x",
        "/a%2Fb",
        "/a%",
        "/caf%C3%A9",
        "/a\\b",
    ] {
        for header in ["X-Forwarded-Uri", "X-Original-URI"] {
            let valid = target.is_valid(&Value::String(uri.to_owned()));
            let reply = server.send("GET", "/v1/auth", &[(header, uri)], b"");
            assert_eq!(
                reply.status != 400,
                valid,
                "{header}: `{uri}`: the spec says {}, the server answered {} {}",
                if valid { "valid" } else { "invalid" },
                reply.status,
                reply.text()
            );
        }
    }
}

/// One JSON document per request: text after it is refused, not ignored.
#[test]
fn text_after_the_json_body_is_refused() {
    let server = server();
    for body in [
        r#"{"method": "GET", "path": "/x"}{"method": "GET", "path": "/y"}"#,
        r#"{"method": "GET", "path": "/x"} xyz"#,
        r#"{"method": "GET", "path": "/x"},"#,
    ] {
        let reply = server.send("POST", "/v1/check", &[], body.as_bytes());
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert_conforms(&reply, "Problem");
    }
    let trailing_space = server.send(
        "POST",
        "/v1/check",
        &[],
        b"{\"method\": \"GET\", \"path\": \"/x\"}\n  ",
    );
    assert_eq!(trailing_space.status, 200, "{}", trailing_space.text());
    let reply = server.send("POST", "/v1/release", &[], br#"{"leases": []} []"#);
    assert_eq!(reply.status, 400);
}

/// Every example the spec documents is accepted, and answered as documented.
#[test]
fn the_documented_examples_are_answered_as_documented() {
    let doc: Value =
        serde_norway::from_str(&std::fs::read_to_string("docs/openapi.yaml").unwrap()).unwrap();
    let mut sent = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let Some(examples) =
            item["post"]["requestBody"]["content"]["application/json"]["examples"].as_object()
        else {
            continue;
        };
        let server = server();
        for (name, example) in examples {
            let body = example["value"].to_string();
            let reply = server.send("POST", path, &[], body.as_bytes());
            let status = reply.status.to_string();
            let documented = &item["post"]["responses"][&status];
            assert!(
                documented.is_object(),
                "{path} example {name}: status {status} is not documented"
            );
            assert_ne!(reply.status, 400, "{path} example {name}: {}", reply.text());
            if let Some(schema_ref) =
                documented["content"]["application/json"]["schema"]["$ref"].as_str()
            {
                assert_conforms(
                    &reply,
                    schema_ref.trim_start_matches("#/components/schemas/"),
                );
            }
            sent += 1;
        }
    }
    assert!(
        sent >= 3,
        "the spec documents examples for /v1/check and /v1/release"
    );
}

/// A gateway that decides with `/v1/check` reports what the request used with `/v1/report`:
/// the check counted the reservation, the report settles it — as one amount (`cost`), or as
/// the response it saw, each limit reading its own terms — and says what it settled.
#[test]
fn a_report_settles_what_the_check_reserved() {
    let policy = r#"
limit tokens {
  match { route POST "/v1/chat"; }
  key ip;
  algorithm fixed_window;
  rate 1_000/min;
  cost response json("usage.prompt_tokens") + 2 * json("usage.completion_tokens") default 0;
  reserve header("X-Max-Tokens") default 100 max 500;
}
"#;
    // A clock that stands in the middle of a minute: the report's `latency_ms` never
    // reaches back into the window before.
    let server = InProcess::build(async || {
        let plan = tollgate::compile(&tollgate::PolicySet::from_sources([("t.rl", policy)]))
            .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
        let clock = tollgate::ManualClock::new(tollgate::Timestamp::from_secs(1_700_006_430));
        let engine = std::sync::Arc::new(tollgate::Engine::with_clock(
            plan,
            tollgate::store::MemoryStore::new(),
            clock,
        ));
        let observers = tollgate::server::Observers::new(&engine, None, None);
        tollgate::server::router(std::sync::Arc::new(tollgate::server::AppState::new(
            engine,
            observers,
            options(),
        )))
    });
    let request = json!({
        "method": "POST", "path": "/v1/chat", "client_ip": "203.0.113.9",
        "headers": {"x-max-tokens": "300"}
    });
    let remaining = |reply: &Reply| reply.json()["remaining"].as_u64().unwrap();
    let reply = check(&server, &request);
    assert_eq!(remaining(&reply), 700, "300 reserved");
    assert_eq!(
        remaining(&check(&server, &request)),
        400,
        "held until the report, though a response that never says counts 0"
    );
    let report = |body: Value| {
        let reply = server.send(
            "POST",
            "/v1/report",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_conforms(&reply, "ReportResponse");
        reply.json()
    };
    let settled = report(json!({"request": request, "status": 200, "cost": 40, "latency_ms": 900}));
    assert_eq!(
        settled["settled"],
        json!([{"limit": "tokens", "reserved": 300, "used": 40}])
    );
    let settled = report(json!({
        "request": request, "status": 200,
        "response": {"body": {"usage": {"prompt_tokens": 20, "completion_tokens": 140}}}
    }));
    assert_eq!(settled["settled"][0]["used"], 300);
    assert_eq!(
        remaining(&check(&server, &request)),
        360,
        "40 + 300 used, 300 reserved"
    );
    // A report that says nothing of usage settles at the limit's `default` (0 here); a
    // request with no usage limit settles nothing.
    let settled = report(json!({"request": request, "status": 500}));
    assert_eq!(settled["settled"][0]["used"], 0);
    assert_eq!(
        remaining(&check(&server, &request)),
        360,
        "300 back, 300 reserved"
    );
    // A reservation of 0, said in the header: nothing counted before the response.
    let mut nothing = request.clone();
    nothing["headers"]["x-max-tokens"] = json!("0");
    assert_eq!(remaining(&check(&server, &nothing)), 360);
    let other =
        report(json!({"request": {"method": "GET", "path": "/x"}, "status": 200, "cost": 5}));
    assert!(other.get("settled").is_none());
}
