//! `tollgate serve --upstream`: allowed requests reach the application with their bodies
//! streamed both ways; refused ones never do.

mod support;

use support::{TestApp, TestServer, send};

const POLICY: &str = r#"
limit uploads { match { route POST "/echo/**"; } key ip; algorithm fixed_window; rate 2/min; }
denylist bots { user_agent ~= "(?i)sqlmap"; }
"#;

#[test]
fn allowed_requests_reach_the_app_with_forwarding_headers() {
    let app = TestApp::start();
    let proxy = TestServer::start_proxy(POLICY, app.addr);
    let reply = send(
        proxy.addr,
        "GET",
        "/echo/a/b?x=1",
        &[("Connection", "close, x-hop"), ("X-Hop", "secret")],
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let text = reply.text();
    assert!(
        text.starts_with("GET /echo/a/b?x=1 xff=127.0.0.1 "),
        "{text}"
    );
    assert!(text.contains(&format!("host={}", proxy.addr)), "{text}");
    assert!(
        text.contains("conn=-"),
        "hop-by-hop headers named by Connection are dropped: {text}"
    );
}

#[test]
fn request_bodies_stream_to_the_app_and_limits_apply() {
    let app = TestApp::start();
    let proxy = TestServer::start_proxy(POLICY, app.addr);
    let body = vec![b'a'; 3 * 1024 * 1024];
    for _ in 0..2 {
        let reply = send(proxy.addr, "POST", "/echo/upload", &[], &body);
        assert_eq!(reply.status, 200);
        assert!(
            reply.text().ends_with(&format!("len={}", body.len())),
            "{}",
            reply.text()
        );
        assert_eq!(reply.header("x-ratelimit-limit"), Some("2"));
    }
    let refused = send(proxy.addr, "POST", "/echo/upload", &[], b"small");
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let bot = send(proxy.addr, "GET", "/", &[("User-Agent", "sqlmap")], b"");
    assert_eq!(bot.status, 403);
}

#[test]
fn large_responses_stream_back() {
    let app = TestApp::start();
    let proxy = TestServer::start_proxy(POLICY, app.addr);
    let reply = send(proxy.addr, "GET", "/stream", &[], b"");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), 8 * 1024 * 1024);
    // Tollgate's own endpoints stay Tollgate's.
    assert_eq!(send(proxy.addr, "GET", "/healthz", &[], b"").text(), "ok");
}

#[test]
fn an_unreachable_upstream_is_a_502_problem() {
    let port = support::free_port();
    let proxy = TestServer::start_proxy(POLICY, format!("127.0.0.1:{port}").parse().unwrap());
    let reply = send(proxy.addr, "GET", "/anything", &[], b"");
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["type"], "urn:tollgate:problem:bad-gateway");
}
