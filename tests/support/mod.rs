//! Helpers for tests that talk to real servers over real sockets.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "a helper module included by several test binaries, each using a part"
)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

pub mod caddy;
pub mod clickhouse;
#[cfg(feature = "envoy")]
pub mod envoy;
pub mod netem;
pub mod nginx;
pub mod process;
pub mod redis;
pub mod serving;
pub mod tls;

/// A current-thread runtime with timers and I/O, for tests that drive async code by hand.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// An identifier that believes HS256 tokens signed with `secret`, the user in `sub`.
pub fn jwt_identifier(secret: &[u8]) -> tollgate::identity::Identifier {
    tollgate::identity::Identifier::new()
        .with_jwt(&tollgate::identity::JwtSettings {
            algorithm: jsonwebtoken::Algorithm::HS256,
            key: tollgate::identity::JwtKey::Secret(secret.to_vec()),
            issuer: None,
            audience: None,
            user_claim: "sub".to_owned(),
        })
        .expect("a valid JWT setting")
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An HTTP/1.1 response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer and close before reading a large body: that is fine.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse(&raw)
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

/// A request as a tower layer sees it from the socket peer `peer` (an IP address).
pub fn from_peer(
    method: &str,
    uri: &str,
    peer: &str,
    headers: &[(&str, &str)],
) -> http::Request<axum::body::Body> {
    let mut request = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request.body(axum::body::Body::empty()).unwrap();
    let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    request
}

/// `POST /v1/check` with `body`.
pub fn check(addr: SocketAddr, body: &serde_json::Value) -> Reply {
    send(addr, "POST", "/v1/check", &[], body.to_string().as_bytes())
}

/// Whether servers that a test needs but cannot find must fail it (in CI) or skip it.
pub fn require(what: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what} is required in CI (scripts/test.sh installs it)");
    }
    eprintln!("skipped: {what} is not installed (scripts/test.sh installs it)");
    false
}

/// `tollgate serve`'s router called in this process with `oneshot`, without a socket: for
/// tests of what the server answers (sockets are tested where they matter: header limits,
/// nginx, the proxy, WebSockets). Each request comes from the peer 127.0.0.1.
pub struct InProcess {
    router: axum::Router,
    runtime: tokio::runtime::Runtime,
}

impl InProcess {
    /// Serves `policy` (one `.rl` text) with `options`.
    pub fn start(policy: &str, options: tollgate::middleware::HttpOptions) -> InProcess {
        Self::serve(
            tollgate::PolicySet::from_sources([("test.rl", policy)]),
            options,
        )
    }

    /// Serves the policies in a directory (with their Cedar imports) with `options`.
    pub fn start_dir(
        dir: &std::path::Path,
        options: tollgate::middleware::HttpOptions,
    ) -> InProcess {
        Self::serve(tollgate::PolicySet::load(&[dir]), options)
    }

    fn serve(set: tollgate::PolicySet, options: tollgate::middleware::HttpOptions) -> InProcess {
        let state = app_state(set, options, None);
        Self::build(async move || tollgate::server::router(state))
    }

    /// Serves the router `make` builds, made in this client's runtime (so that what it
    /// connects to, a Redis store, runs there).
    pub fn build(make: impl AsyncFnOnce() -> axum::Router) -> InProcess {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let router = runtime.block_on(make());
        InProcess { router, runtime }
    }

    /// Runs `future` on this client's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// `POST /v1/check` with `body`.
    pub fn check(&self, body: &serde_json::Value) -> Reply {
        self.send("POST", "/v1/check", &[], body.to_string().as_bytes())
    }

    /// Sends one request and reads the whole answer.
    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        use tower::ServiceExt;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(axum::body::Body::from(body.to_vec())).unwrap();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        self.runtime.block_on(async {
            let response = self.router.clone().oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            Reply {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body: body.to_vec(),
            }
        })
    }
}

/// The server's state for `set`, counting in memory.
fn app_state(
    set: tollgate::PolicySet,
    options: tollgate::middleware::HttpOptions,
    upstream: Option<SocketAddr>,
) -> std::sync::Arc<tollgate::server::AppState<tollgate::store::MemoryStore>> {
    use std::sync::Arc;
    let plan = tollgate::compile(&set).unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let engine = Arc::new(tollgate::Engine::new(
        plan,
        tollgate::store::MemoryStore::new(),
    ));
    let observers = tollgate::server::Observers::new(&engine, None, None);
    Arc::new(tollgate::server::AppState {
        upstream: upstream
            .map(|a| tollgate::proxy::Upstream::new(format!("http://{a}").parse().unwrap())),
        ..tollgate::server::AppState::new(engine, observers, options)
    })
}

impl TestServer {
    /// Sends one request over a new connection and reads the whole answer.
    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        send(self.addr, method, path, headers, body)
    }
}

/// A `tollgate serve` running in this process on a free port, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Serves `policy` (one `.rl` text) with `options`.
    pub fn start(policy: &str, options: tollgate::middleware::HttpOptions) -> TestServer {
        Self::start_set(
            tollgate::PolicySet::from_sources([("test.rl", policy)]),
            options,
            None,
        )
    }

    /// Serves the policies in a directory with `options`.
    pub fn start_dir(dir: &str, options: tollgate::middleware::HttpOptions) -> TestServer {
        Self::start_set(tollgate::PolicySet::load(&[dir]), options, None)
    }

    /// Serves `policy` as a reverse proxy in front of `upstream`.
    pub fn start_proxy(policy: &str, upstream: SocketAddr) -> TestServer {
        Self::start_set(
            tollgate::PolicySet::from_sources([("test.rl", policy)]),
            tollgate::middleware::HttpOptions::default(),
            Some(upstream),
        )
    }

    fn start_set(
        set: tollgate::PolicySet,
        options: tollgate::middleware::HttpOptions,
        upstream: Option<SocketAddr>,
    ) -> TestServer {
        let state = app_state(set, options, upstream);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let shutdown = async move {
                    let _ = stopped.await;
                };
                tollgate::server::run(state, listener, shutdown)
                    .await
                    .unwrap();
            });
        });
        TestServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An application (axum) on a free port, answering `POST /auth/login` and `GET /`.
pub struct TestApp {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Dropping may happen inside an async test: do not block there.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl TestApp {
    pub fn start() -> TestApp {
        use axum::routing::{get, post};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let app = axum::Router::new()
                .route("/auth/login", post(|| async { "welcome" }))
                .route("/", get(|| async { "home" }))
                // Echoes what the proxy sent: method, path, query, forwarding headers, body.
                .route(
                    "/echo/{*rest}",
                    axum::routing::any(|request: axum::extract::Request| async move {
                        let (parts, body) = request.into_parts();
                        let body = axum::body::to_bytes(body, 1 << 30).await.unwrap();
                        let h = |n: &str| {
                            parts
                                .headers
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        format!(
                            "{} {} xff={} host={} conn={} len={}",
                            parts.method,
                            parts.uri,
                            h("x-forwarded-for"),
                            h("x-forwarded-host"),
                            h("x-hop"),
                            body.len()
                        )
                    }),
                )
                // Echoes WebSocket messages.
                .route(
                    "/ws",
                    get(|upgrade: axum::extract::ws::WebSocketUpgrade| async move {
                        upgrade.on_upgrade(|mut socket| async move {
                            while let Some(Ok(message)) = socket.recv().await {
                                if matches!(message, axum::extract::ws::Message::Close(_)) {
                                    break;
                                }
                                if socket.send(message).await.is_err() {
                                    break;
                                }
                            }
                        })
                    }),
                )
                // 8 MiB in 1 KiB chunks, streamed.
                .route(
                    "/stream",
                    get(|| async {
                        let chunks = futures_util::stream::iter((0..8192).map(|_| {
                            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1024]))
                        }));
                        axum::body::Body::from_stream(chunks)
                    }),
                );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = axum::serve(listener, app).await;
        });
        TestApp {
            addr,
            runtime: Some(runtime),
        }
    }
}

/// The OpenAPI document, and a validator for one of its component schemas.
pub fn schema(name: &str) -> jsonschema::Validator {
    schema_in("docs/openapi.yaml", name)
}

/// A validator for one component schema of the OpenAPI document at `path`.
pub fn schema_in(path: &str, name: &str) -> jsonschema::Validator {
    let doc: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let schemas = doc["components"]["schemas"].clone();
    fn inline(v: &serde_json::Value, schemas: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(r)) = map.get("$ref") {
                    let name = r.trim_start_matches("#/components/schemas/");
                    return inline(&schemas[name], schemas);
                }
                serde_json::Value::Object(
                    map.iter()
                        .map(|(k, v)| (k.clone(), inline(v, schemas)))
                        .collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(|v| inline(v, schemas)).collect())
            }
            other => other.clone(),
        }
    }
    let mut s = inline(&schemas[name], &schemas);
    // OpenAPI's `example` is not JSON Schema's; drop it before compiling.
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("example");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut s);
    // Formats (`ipv4`, `ipv6`) are part of the contract: check them.
    jsonschema::options()
        .should_validate_formats(true)
        .build(&s)
        .unwrap()
}

pub fn assert_conforms(reply: &Reply, name: &str) {
    assert_conforms_to("docs/openapi.yaml", reply, name);
}

/// Fails unless `reply`'s JSON body matches component schema `name` of the document `path`.
pub fn assert_conforms_to(path: &str, reply: &Reply, name: &str) {
    let value = reply.json();
    let validator = schema_in(path, name);
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{name} does not match {path}: {errors:?}\n{value:#}"
    );
}

/// Serves `router` on a free port of 127.0.0.1 in the current runtime, with each request's
/// peer address; the address.
pub async fn serve_router(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// The 99th percentile of `latencies_us` (sorted here; nearest rank below), in ms; 0 for none.
pub fn p99_ms(latencies_us: &mut [u64]) -> f64 {
    latencies_us.sort_unstable();
    latencies_us
        .get(latencies_us.len().saturating_sub(1) * 99 / 100)
        .map_or(0.0, |&us| us as f64 / 1e3)
}
