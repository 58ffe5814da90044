//! A real Caddy with `forward_auth` to a real `tollgate serve`, in front of a real
//! application, configured with the documented `examples/caddy/Caddyfile`.

mod support;

use support::caddy::Caddy;
use support::{TestApp, TestServer, send};
use tollgate::identity::Identifier;
use tollgate::middleware::HttpOptions;

#[test]
fn the_sixth_login_in_a_minute_gets_tollgates_429_through_caddy() {
    let app = TestApp::start();
    let options = HttpOptions {
        identifier: Identifier::new().with_trusted_proxies(vec!["127.0.0.1/32".parse().unwrap()]),
        ..HttpOptions::default()
    };
    // The shipped policies: `login` allows 5 per minute per /24.
    let tollgate = TestServer::start_dir("policies", options);
    let Some(caddy) = Caddy::start(app.addr, tollgate.addr) else {
        return;
    };
    for i in 1..=5 {
        let reply = send(caddy.addr, "POST", "/auth/login", &[], b"");
        assert_eq!(
            reply.status,
            200,
            "login {i}: {}\n{}",
            reply.text(),
            caddy.log()
        );
        assert_eq!(reply.text(), "welcome");
    }
    let refused = send(caddy.addr, "POST", "/auth/login", &[], b"");
    assert_eq!(refused.status, 429, "{}\n{}", refused.text(), caddy.log());
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(refused.header("retry-after"), Some("900"), "the login ban");
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(refused.json()["policy"], "login");
    // Other paths, and the method Caddy forwarded: GET / is not a login.
    let home = send(caddy.addr, "GET", "/", &[], b"");
    assert_eq!(home.status, 200, "{}", home.text());
    assert_eq!(home.text(), "home");
}
