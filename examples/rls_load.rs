//! Load for `tollgate serve`'s two decision endpoints, from lean clients on one runtime:
//! Envoy's `ShouldRateLimit` over gRPC (one descriptor, `[remote_address=…]`) on bare HTTP/2
//! (`h2`, the request encoded once — as lean as Envoy's own client), or `POST /v1/check` over
//! HTTP/1.1 (`hyper`, the same client address); `tonic` is tonic's own client, for comparison.
//!
//!     cargo run --release --example rls_load -- grpc 127.0.0.1:8081 10 64
//!     cargo run --release --example rls_load -- tonic 127.0.0.1:8081 10 64
//!     cargo run --release --example rls_load -- check 127.0.0.1:8080 10 64
//!
//! Arguments: the mode, the address, seconds, connections (each sends one request at a time,
//! as Envoy's worker threads or nginx's subrequests do). Prints one line: requests/s,
//! p50 and p99 in microseconds, and how many answers were not "allowed".

#![expect(
    clippy::disallowed_methods,
    reason = "a load client measures wall time: its deadline and each request's latency"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use http_body_util::{BodyExt, Full};

/// What one connection measured: latencies in microseconds, and refusals.
#[derive(Default)]
struct Measured {
    latencies: Vec<u32>,
    refused: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr, seconds, connections, streams) = match args.as_slice() {
        [m, a, s, c] => (m, a, s, c, "1"),
        [m, a, s, c, n] => (m, a, s, c, n.as_str()),
        _ => {
            eprintln!("usage: rls_load grpc|tonic|check ADDRESS SECONDS CONNECTIONS [STREAMS]");
            std::process::exit(2);
        }
    };
    // gRPC only: requests in flight on each HTTP/2 connection (Envoy multiplexes).
    let streams: usize = streams.parse().expect("streams per connection");
    let addr: SocketAddr = addr.parse().expect("an address like 127.0.0.1:8081");
    let seconds: u64 = seconds.parse().expect("seconds");
    let connections: usize = connections.parse().expect("connections");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let results = runtime.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                let mode = mode.clone();
                tokio::spawn(async move {
                    match mode.as_str() {
                        "grpc" => grpc_h2(addr, c, streams, deadline).await,
                        "tonic" => grpc(addr, c, deadline).await,
                        "check" => check(addr, c, deadline).await,
                        other => panic!("unknown mode {other}: grpc or check"),
                    }
                })
            })
            .collect();
        let mut all = Measured::default();
        for task in tasks {
            let m = task.await.expect("a connection's task");
            all.latencies.extend(m.latencies);
            all.refused += m.refused;
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = results.latencies;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "{mode} {:.0} req/s p50 {}us p99 {}us refused {}",
        latencies.len() as f64 / elapsed,
        at(0.50),
        at(0.99),
        results.refused
    );
}

/// The client address of connection `c`.
fn client(c: usize) -> String {
    format!("10.0.{}.{}", c / 250, c % 250 + 1)
}

fn rls_request(c: usize) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "remote_address".into(),
                value: client(c),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

async fn grpc(addr: SocketAddr, c: usize, deadline: Instant) -> Measured {
    let mut client_ = RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("the gRPC listener answers");
    let request = rls_request(c);
    let mut m = Measured::default();
    while Instant::now() < deadline {
        let sent = Instant::now();
        let answer = client_
            .should_rate_limit(request.clone())
            .await
            .expect("an answer")
            .into_inner();
        m.latencies.push(sent.elapsed().as_micros() as u32);
        m.refused += u64::from(answer.overall_code != 1);
    }
    m
}

/// gRPC on one HTTP/2 connection with `streams` requests in flight, each message framed
/// once: a HEADERS and a DATA frame out, the answer's HEADERS, DATA and trailers in.
async fn grpc_h2(addr: SocketAddr, c: usize, streams: usize, deadline: Instant) -> Measured {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the gRPC listener answers");
    stream.set_nodelay(true).expect("nodelay");
    let (client_, connection) = h2::client::handshake(stream).await.expect("HTTP/2");
    tokio::spawn(connection);
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            tokio::spawn(grpc_stream(
                addr,
                client_.clone(),
                c * streams + s,
                deadline,
            ))
        })
        .collect();
    let mut all = Measured::default();
    for task in tasks {
        let m = task.await.expect("a stream's task");
        all.latencies.extend(m.latencies);
        all.refused += m.refused;
    }
    all
}

/// One request at a time on a shared HTTP/2 connection.
async fn grpc_stream(
    addr: SocketAddr,
    client_: h2::client::SendRequest<bytes::Bytes>,
    c: usize,
    deadline: Instant,
) -> Measured {
    use prost::Message;
    let message = rls_request(c).encode_to_vec();
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let framed = bytes::Bytes::from(framed);
    let uri = format!("http://{addr}/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit");
    let mut m = Measured::default();
    let mut client_ = client_.ready().await.expect("ready");
    while Instant::now() < deadline {
        let request = http::Request::post(uri.as_str())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a request");
        let sent = Instant::now();
        let (response, mut body) = client_.send_request(request, false).expect("sent");
        body.send_data(framed.clone(), true).expect("the message");
        let response = response.await.expect("an answer");
        let mut body = response.into_body();
        let mut answer = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            answer.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.expect("trailers");
        m.latencies.push(sent.elapsed().as_micros() as u32);
        let ok = trailers.is_some_and(|t| t.get("grpc-status").is_some_and(|s| s == "0"));
        let decoded = answer.get(5..).and_then(|b| {
            envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse::decode(b).ok()
        });
        m.refused += u64::from(!ok || decoded.is_none_or(|d| d.overall_code != 1));
        client_ = client_.ready().await.expect("ready");
    }
    m
}

async fn check(addr: SocketAddr, c: usize, deadline: Instant) -> Measured {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the HTTP listener answers");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
    tokio::spawn(connection);
    let body = format!(
        r#"{{"method":"GET","path":"/bench","client_ip":"{}"}}"#,
        client(c)
    );
    let mut m = Measured::default();
    while Instant::now() < deadline {
        let request = http::Request::post("/v1/check")
            .header("host", "bench")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body.clone())))
            .expect("a request");
        let sent = Instant::now();
        let response = sender.send_request(request).await.expect("an answer");
        let ok = response.status().is_success();
        let text = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        m.latencies.push(sent.elapsed().as_micros() as u32);
        m.refused += u64::from(!ok || !text.starts_with(br#"{"allowed":true"#));
    }
    m
}
