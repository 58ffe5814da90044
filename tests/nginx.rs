//! A real nginx with `auth_request` to a real `tollgate serve`, in front of a real
//! application, configured with the documented `examples/nginx/tollgate.conf`.

mod support;

use support::nginx::Nginx;
use support::{TestApp, TestServer, send};
use tollgate::identity::Identifier;
use tollgate::middleware::HttpOptions;

/// The application, Tollgate with the shipped policies (trusting nginx on 127.0.0.1), and
/// nginx in front; `None` where nginx is missing outside CI.
fn stack() -> Option<(TestApp, TestServer, Nginx)> {
    let app = TestApp::start();
    let options = HttpOptions {
        identifier: Identifier::new().with_trusted_proxies(vec!["127.0.0.1/32".parse().unwrap()]),
        ..HttpOptions::default()
    };
    let tollgate = TestServer::start_dir("policies", options);
    let nginx = Nginx::start(app.addr, tollgate.addr)?;
    Some((app, tollgate, nginx))
}

#[test]
fn the_sixth_login_in_a_minute_gets_429_through_nginx() {
    // The shipped policies: `login` allows 5 per minute per /24.
    let Some((_app, _tollgate, nginx)) = stack() else {
        return;
    };

    for i in 1..=5 {
        let reply = send(nginx.addr, "POST", "/auth/login", &[], b"");
        assert_eq!(
            reply.status,
            200,
            "login {i}: {}\n{}",
            reply.text(),
            nginx.log()
        );
        assert_eq!(reply.text(), "welcome");
        assert_eq!(reply.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(
            reply.header("x-ratelimit-remaining"),
            Some((5 - i).to_string().as_str())
        );
        // The IETF family too, as Tollgate wrote it.
        assert_eq!(reply.header("ratelimit-policy"), Some("\"login\";q=5;w=60"));
        let field = reply.header("ratelimit").unwrap_or_default();
        assert!(
            field.starts_with(&format!("\"login\";r={};t=", 5 - i)),
            "{field}"
        );
    }
    let refused = send(nginx.addr, "POST", "/auth/login", &[], b"");
    assert_eq!(refused.status, 429, "{}\n{}", refused.text(), nginx.log());
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    // The refusal that starts the login ban (15 minutes) announces it.
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, 900, "retry-after");
    assert_eq!(refused.header("ratelimit"), Some("\"login\";r=0;t=900"));
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"login\";q=5;w=60")
    );
    let body = refused.json();
    assert_eq!(body["status"], 429);
    assert_eq!(body["policy"], "login");
    // Other paths still pass.
    let home = send(nginx.addr, "GET", "/", &[], b"");
    assert_eq!(home.status, 200, "{}", home.text());
    assert_eq!(home.text(), "home");
}

#[test]
fn denylisted_clients_get_403_through_nginx() {
    let Some((_app, _tollgate, nginx)) = stack() else {
        return;
    };
    let reply = send(nginx.addr, "GET", "/", &[("User-Agent", "sqlmap/1.7")], b"");
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()["policy"], "scanners");
}
