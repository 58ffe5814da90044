//! `tollgate serve` and its store: two servers share counters through one real Redis or a
//! real Redis Cluster; in `prod` an unreachable Redis stops the start with a message naming
//! the URL; in `dev` it falls back to memory with a warning.

mod support;

use serde_json::json;
use support::send;
use support::serving::{Serving, tollgate};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn login(server: &Serving) -> bool {
    let body = json!({ "method": "POST", "path": "/auth/login", "client_ip": "198.51.100.20" });
    let reply = send(
        server.addr,
        "POST",
        "/v1/check",
        &[],
        body.to_string().as_bytes(),
    );
    reply.json()["allowed"].as_bool().unwrap()
}

#[test]
fn two_servers_share_their_counters_through_redis() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    share_counters(&redis.url(), &[]);
}

#[test]
fn two_prod_servers_share_their_counters_through_a_cluster() {
    let Some(cluster) = support::redis::Cluster::start(3, 0) else {
        return;
    };
    share_counters(&cluster.url(), &[]);
}

#[test]
fn two_prod_servers_share_their_counters_over_tls_with_client_certificates() {
    let certs = support::tls::Certs::generate();
    let Some(redis) = support::redis::Redis::start_tls(&certs, true) else {
        return;
    };
    let path = |f: &str| certs.path(f).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    share_counters(
        &redis.tls_url(),
        &[
            ("TOLLGATE_REDIS_TLS_CA_FILE", &ca),
            ("TOLLGATE_REDIS_TLS_CERT_FILE", &cert),
            ("TOLLGATE_REDIS_TLS_KEY_FILE", &key),
        ],
    );
    assert!(redis.calls("evalsha") >= 7, "the decisions were Redis's");

    // Without the CA, the server's certificate is not trusted: prod does not start, and says why.
    let stderr = prod_start_fails(
        &redis.tls_url(),
        &[
            ("TOLLGATE_REDIS_TLS_CERT_FILE", &cert),
            ("TOLLGATE_REDIS_TLS_KEY_FILE", &key),
        ],
    );
    assert!(
        stderr.contains("cannot reach Redis at `rediss://") && stderr.contains("certificate"),
        "{stderr}"
    );
}

/// Runs `tollgate serve` in `prod` on `url` (and `extra` settings), which must exit with a
/// failure; returns what it wrote to stderr.
fn prod_start_fails(url: &str, extra: &[(&str, &str)]) -> String {
    let listen = format!("127.0.0.1:{}", support::free_port());
    let mut env = vec![
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_REDIS_URL", url),
        ("TOLLGATE_KEY_SECRET", SECRET),
        ("TOLLGATE_LISTEN", &listen),
    ];
    env.extend_from_slice(extra);
    let output = tollgate(&env).output().unwrap();
    assert!(!output.status.success(), "tollgate started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn share_counters(url: &str, extra: &[(&str, &str)]) {
    // A call slower than the default 50 ms on a loaded machine would be answered by the
    // limit's fail mode; this test is about sharing, so the store gets its time.
    let mut env = vec![
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_REDIS_URL", url),
        ("TOLLGATE_KEY_SECRET", SECRET),
        ("TOLLGATE_STORE_TIMEOUT_MS", "5000"),
    ];
    env.extend_from_slice(extra);
    let a = Serving::start(&env);
    let b = Serving::start(&env);
    // The shipped `login` limit: 5 per minute per /24, whichever node is asked.
    for server in [&a, &b, &a, &b, &a] {
        assert!(login(server));
    }
    assert!(!login(&b), "the sixth login, on either node, is refused");
    assert!(!login(&a));
    assert_eq!(send(a.addr, "GET", "/readyz", &[], b"").status, 200);
}

#[test]
fn prod_refuses_to_start_without_its_redis() {
    let url = format!("redis://127.0.0.1:{}", support::free_port());
    let stderr = prod_start_fails(&url, &[]);
    assert!(
        stderr.contains(&format!("cannot reach Redis at `{url}`")),
        "{stderr}"
    );
}

#[test]
fn dev_falls_back_to_memory_with_a_warning() {
    let url = format!("redis://127.0.0.1:{}", support::free_port());
    let server = Serving::start(&[("TOLLGATE_REDIS_URL", &url)]);
    assert!(login(&server), "the server answers, counting in memory");
    let log = server.stop();
    assert!(log.contains("COUNTING IN THIS PROCESS'S MEMORY"), "{log}");
}

#[test]
fn a_failed_redis_follows_each_limit_s_store_error_mode_over_http() {
    let Some(mut redis) = support::redis::Redis::start() else {
        return;
    };
    let url = redis.url();
    let server = Serving::start(&[
        ("TOLLGATE_REDIS_URL", url.as_str()),
        ("TOLLGATE_KEY_SECRET", SECRET),
        ("TOLLGATE_STORE_TIMEOUT_MS", "50"),
    ]);
    // The shipped `monthly` limit fails closed (`on_store_error deny`); `api` fails open.
    let check = |path: &str| {
        let body = json!({
            "method": "GET",
            "path": path,
            "client_ip": "198.51.100.20",
            "headers": { "X-Tenant-Id": "acme" },
        });
        support::check(server.addr, &body).json()
    };
    assert_eq!(check("/api/orders")["allowed"], true);
    redis.kill();
    let answer = check("/api/orders");
    assert_eq!(answer["allowed"], false, "{answer}");
    assert_eq!(answer["status"], 503, "{answer}");
    assert_eq!(answer["policy"], "monthly", "{answer}");
    let ready = send(server.addr, "GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 503, "not ready without its store");
    let log = server.stop();
    assert!(
        log.contains("circuit open") || log.contains("counter store failed"),
        "{log}"
    );
}
