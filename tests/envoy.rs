//! Envoy's rate-limit service over real gRPC (tonic's client, the official v3 messages):
//! codes, `current_limit`, remaining and reset per descriptor, the headers Envoy adds,
//! hits, overrides and malformed requests; shadow limits; metrics; and `tollgate serve`
//! with `grpc_listen`: two nodes on one Redis admit exactly the quota to 64 concurrent gRPC
//! clients, and a failed Redis answers by each limit's `on_store_error`.

#![cfg(feature = "envoy")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use support::envoy::descriptor;
use tollgate::store::MemoryStore;
use tollgate::{ManualClock, Timestamp};
use tonic::transport::Channel;

const POLICY: &str = r#"
limit per_client {
  match { domain "edge"; descriptor ["remote_address"]; }
  key ip;
  algorithm fixed_window;
  rate 3/min;
}
limit per_path {
  match { domain "edge"; descriptor ["path"]; }
  key descriptor("path");
  rate 10/s;
}
limit tokens {
  match { domain "ai"; descriptor ["tenant"]; }
  key descriptor("tenant");
  rate 100/h;
}
limit used_tokens {
  match { domain "ai"; descriptor ["tokens_of"]; }
  key descriptor("tokens_of");
  algorithm fixed_window;
  rate 1_000/h;
  cost response hits_addend;
}
limit watched {
  match { domain "edge"; descriptor ["shadowed"]; }
  key descriptor("shadowed");
  rate 1/min;
  mode shadow;
}
limit http_only {
  key ip;
  rate 1/min;
}
"#;

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

/// The service of `POLICY` in this process, counting in memory on a clock that stands at
/// the start of an hour, with metrics; a connected client; the state (for `/metrics`).
struct Service {
    client: RateLimitServiceClient<Channel>,
    state: Arc<tollgate::server::AppState<MemoryStore, ManualClock>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Service {
    async fn start() -> Service {
        let plan = tollgate::compile(&tollgate::PolicySet::from_sources([("t.rl", POLICY)]))
            .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
        let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000 / 3_600 * 3_600));
        let engine = Arc::new(tollgate::Engine::with_clock(
            plan,
            MemoryStore::new(),
            clock,
        ));
        let metrics = Some(Arc::new(tollgate::metrics::Metrics::new()));
        let observers = tollgate::server::Observers::new(&engine, metrics, None);
        let state = Arc::new(tollgate::server::AppState::new(
            engine,
            observers,
            Default::default(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tollgate::server::serve_envoy(
            Arc::clone(&state),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Service {
            client: connect(addr).await,
            state,
            _stop: stop,
        }
    }

    async fn ask(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        self.client
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn refused(&mut self, request: RateLimitRequest) -> tonic::Status {
        self.client.should_rate_limit(request).await.unwrap_err()
    }
}

async fn connect(addr: SocketAddr) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn code(status: &DescriptorStatus) -> Code {
    Code::try_from(status.code).unwrap()
}

#[tokio::test]
async fn each_descriptor_is_decided_with_envoys_figures() {
    let mut service = Service::start().await;
    let client = || {
        request(
            "edge",
            vec![descriptor(&[("remote_address", "203.0.113.7")])],
        )
    };
    for remaining in [2, 1, 0] {
        let answer = service.ask(client()).await;
        assert_eq!(answer.overall_code, Code::Ok as i32);
        let status = &answer.statuses[0];
        assert_eq!(code(status), Code::Ok);
        assert_eq!(status.limit_remaining, remaining);
        let limit = status.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.name.as_str(), limit.requests_per_unit, limit.unit),
            ("per_client", 3, Unit::Minute as i32)
        );
        let reset = status.duration_until_reset.unwrap();
        assert_eq!(
            (reset.seconds, reset.nanos),
            (60, 0),
            "a whole window ahead"
        );
    }
    let answer = service.ask(client()).await;
    assert_eq!(answer.overall_code, Code::OverLimit as i32);
    assert_eq!(code(&answer.statuses[0]), Code::OverLimit);
    assert_eq!(answer.statuses[0].limit_remaining, 0);
    // The headers Envoy adds to its response: the settings' families, `Retry-After`.
    let header = |name: &str| {
        answer
            .response_headers_to_add
            .iter()
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
    };
    assert_eq!(header("x-ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(header("x-ratelimit-remaining").as_deref(), Some("0"));
    assert!(
        header("ratelimit-policy")
            .unwrap()
            .contains("\"per_client\";q=3;w=60")
    );
    assert!(header("retry-after").is_some());
    // Another address has its own counter; the HTTP-only limit never counts descriptors.
    let other = request(
        "edge",
        vec![descriptor(&[("remote_address", "203.0.113.8")])],
    );
    assert_eq!(service.ask(other).await.statuses[0].limit_remaining, 2);
}

#[tokio::test]
async fn the_answer_is_over_the_limit_when_any_descriptor_is() {
    let mut service = Service::start().await;
    let client = descriptor(&[("remote_address", "198.51.100.1")]);
    for _ in 0..3 {
        service.ask(request("edge", vec![client.clone()])).await;
    }
    let answer = service
        .ask(request(
            "edge",
            vec![
                descriptor(&[("path", "/login")]),
                client,
                descriptor(&[("nothing", "counts this")]),
            ],
        ))
        .await;
    assert_eq!(answer.overall_code, Code::OverLimit as i32);
    let codes: Vec<Code> = answer.statuses.iter().map(code).collect();
    assert_eq!(codes, [Code::Ok, Code::OverLimit, Code::Ok]);
    assert_eq!(answer.statuses[0].limit_remaining, 9);
    // A descriptor no limit counts: OK, no limit.
    assert_eq!(answer.statuses[2].current_limit, None);
    // Another domain meets none of `edge`'s limits.
    let elsewhere = request("other", vec![descriptor(&[("path", "/login")])]);
    let answer = service.ask(elsewhere).await;
    assert_eq!(
        (
            answer.overall_code,
            answer.statuses[0].current_limit.clone()
        ),
        (Code::Ok as i32, None)
    );
}

#[tokio::test]
async fn hits_are_the_descriptors_else_the_requests_and_zero_only_asks() {
    let mut service = Service::start().await;
    let tenant = || descriptor(&[("tenant", "acme")]);
    let mut asked = request("ai", vec![tenant()]);
    asked.hits_addend = 40;
    assert_eq!(service.ask(asked).await.statuses[0].limit_remaining, 60);
    // The descriptor's own hits win over the request's.
    let mut own = tenant();
    own.hits_addend = Some(UInt64Value { value: 50 });
    let mut asked = request("ai", vec![own]);
    asked.hits_addend = 7;
    assert_eq!(service.ask(asked).await.statuses[0].limit_remaining, 10);
    // Zero asks without counting.
    let mut peek = tenant();
    peek.hits_addend = Some(UInt64Value { value: 0 });
    let answer = service.ask(request("ai", vec![peek])).await;
    assert_eq!(
        (
            code(&answer.statuses[0]),
            answer.statuses[0].limit_remaining
        ),
        (Code::Ok, 10)
    );
    // More than is left: refused, nothing counted.
    let mut big = tenant();
    big.hits_addend = Some(UInt64Value { value: 11 });
    let answer = service.ask(request("ai", vec![big])).await;
    assert_eq!(code(&answer.statuses[0]), Code::OverLimit);
    let answer = service.ask(request("ai", vec![tenant()])).await;
    assert_eq!(answer.statuses[0].limit_remaining, 9);
}

/// Usage after the fact, as Envoy AI Gateway asks: the call before the request sends
/// hits_addend 0 (it only asks), the call once the stream is done sends the tokens used —
/// counted whatever is left, so that a tenant over its quota is refused until the window
/// rolls (`cost response hits_addend;`).
#[tokio::test]
async fn hits_reported_once_the_stream_is_done_are_counted_past_the_quota() {
    let mut service = Service::start().await;
    let tokens = |hits: u64| {
        let mut d = descriptor(&[("tokens_of", "acme")]);
        d.hits_addend = Some(UInt64Value { value: hits });
        request("ai", vec![d])
    };
    let before = service.ask(tokens(0)).await;
    assert_eq!(code(&before.statuses[0]), Code::Ok);
    assert_eq!(
        before.statuses[0].limit_remaining, 1_000,
        "asking counts nothing"
    );
    service.ask(tokens(900)).await;
    assert_eq!(
        service.ask(tokens(0)).await.statuses[0].limit_remaining,
        100
    );
    // More than is left: still counted (the tokens were used), and the tenant is over.
    service.ask(tokens(300)).await;
    let after = service.ask(tokens(0)).await;
    assert_eq!(code(&after.statuses[0]), Code::OverLimit);
    assert_eq!(after.statuses[0].limit_remaining, 0);
}

#[tokio::test]
async fn an_override_counts_at_its_own_rate_on_its_own_counter() {
    let mut service = Service::start().await;
    let mut overridden = descriptor(&[("tenant", "globex")]);
    overridden.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: envoy_types::pb::envoy::r#type::v3::RateLimitUnit::Second as i32,
    });
    let codes = async |service: &mut Service| {
        let answer = service.ask(request("ai", vec![overridden.clone()])).await;
        let limit = answer.statuses[0].current_limit.clone().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (2, Unit::Second as i32)
        );
        code(&answer.statuses[0])
    };
    assert_eq!(codes(&mut service).await, Code::Ok);
    assert_eq!(codes(&mut service).await, Code::Ok);
    assert_eq!(codes(&mut service).await, Code::OverLimit);
    // The limit's own counter was not touched.
    let plain = service
        .ask(request("ai", vec![descriptor(&[("tenant", "globex")])]))
        .await;
    assert_eq!(plain.statuses[0].limit_remaining, 99);
}

#[tokio::test]
async fn shadow_limits_answer_ok_and_are_counted_in_metrics() {
    let mut service = Service::start().await;
    let shadowed = || request("edge", vec![descriptor(&[("shadowed", "x")])]);
    for _ in 0..3 {
        let answer = service.ask(shadowed()).await;
        assert_eq!(answer.overall_code, Code::Ok as i32);
    }
    let metrics =
        tollgate::server::metrics_response(service.state.engine(), &service.state.observers, None);
    let body = axum::body::to_bytes(metrics.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    let shadow_rejects = text
        .lines()
        .find(|l| {
            l.starts_with("tollgate_decisions_total")
                && l.contains("limit=\"watched\"")
                && l.contains("outcome=\"shadow_reject\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(shadow_rejects.ends_with(" 2"), "{shadow_rejects}");
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments_saying_why() {
    let mut service = Service::start().await;
    let one = || vec![descriptor(&[("path", "/")])];
    let cases: Vec<(RateLimitRequest, &str)> = vec![
        (request("", one()), "domain is empty"),
        (request("edge", vec![]), "no descriptor"),
        (request("edge", vec![descriptor(&[])]), "no entry"),
        (request("edge", vec![descriptor(&[("", "v")])]), "no key"),
        (
            request("edge", vec![descriptor(&[("path", "/"); 33])]),
            "at most 32 entries",
        ),
        (
            request("edge", vec![descriptor(&[("path", "/")]); 65]),
            "at most 64",
        ),
        (
            request("edge", vec![descriptor(&[("k", &"v".repeat(1025))])]),
            "over 1024 bytes",
        ),
        (
            request(
                "edge",
                vec![RateLimitDescriptor {
                    is_negative_hits: true,
                    hits_addend: Some(UInt64Value { value: 3 }),
                    ..descriptor(&[("path", "/")])
                }],
            ),
            "negative hits",
        ),
        (
            request(
                "edge",
                vec![RateLimitDescriptor {
                    hits_addend: Some(UInt64Value { value: u64::MAX }),
                    ..descriptor(&[("path", "/")])
                }],
            ),
            "hits_addend",
        ),
        (
            request(
                "edge",
                vec![RateLimitDescriptor {
                    limit: Some(RateLimitOverride {
                        requests_per_unit: 5,
                        unit: 0,
                    }),
                    ..descriptor(&[("path", "/")])
                }],
            ),
            "override has no unit",
        ),
    ];
    for (asked, says) in cases {
        let status = service.refused(asked).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    }
    // Nothing was counted by the refused requests.
    let answer = service.ask(request("edge", one())).await;
    assert_eq!(answer.statuses[0].limit_remaining, 9);
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// `tollgate serve` with `grpc_listen`, on `policy`; its gRPC address.
fn serve_grpc(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (support::serving::Serving, SocketAddr) {
    let grpc: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let (grpc_text, policies) = (grpc.to_string(), dir.display().to_string());
    let mut all = vec![
        ("TOLLGATE_GRPC_LISTEN", grpc_text.as_str()),
        ("TOLLGATE_POLICIES", policies.as_str()),
        ("TOLLGATE_KEY_SECRET", SECRET),
    ];
    all.extend_from_slice(env);
    let serving = support::serving::Serving::start(&all);
    // The gRPC listener is bound after the HTTP one (a start-up wait, not a timing test).
    for _ in 0..1000 {
        if std::net::TcpStream::connect(grpc).is_ok() {
            return (serving, grpc);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("no gRPC listener on {grpc}");
}

fn policies(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("envoy.rl"), text).unwrap();
    dir
}

#[test]
fn two_nodes_on_one_redis_admit_exactly_the_quota_to_64_concurrent_clients() {
    let Some(redis) = support::redis::Redis::start() else {
        return;
    };
    let dir = policies(
        r#"limit shared {
             match { domain "edge"; descriptor ["generic_key" == "checkout"]; }
             key global;
             algorithm gcra;
             rate 100/h;
             on_store_error deny;
           }"#,
    );
    let url = redis.url();
    // Exactness is about counting, not about a loaded machine: a call slower than the
    // default 50 ms would be answered by the fail mode. With `deny`, a slow call could only
    // show as fewer admissions, never as more.
    let env = [
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_REDIS_URL", url.as_str()),
        ("TOLLGATE_STORE_TIMEOUT_MS", "5000"),
    ];
    let (_a, grpc_a) = serve_grpc(dir.path(), &env);
    let (_b, grpc_b) = serve_grpc(dir.path(), &env);
    let runtime = support::runtime();
    let admitted = runtime.block_on(async {
        let clients = (0..64).map(|i| {
            let addr = if i % 2 == 0 { grpc_a } else { grpc_b };
            tokio::spawn(async move {
                let mut client = connect(addr).await;
                let mut admitted = 0;
                for _ in 0..5 {
                    let asked = request("edge", vec![descriptor(&[("generic_key", "checkout")])]);
                    let answer = client.should_rate_limit(asked).await.unwrap().into_inner();
                    admitted += u32::from(answer.overall_code == Code::Ok as i32);
                }
                admitted
            })
        });
        let mut total = 0;
        for client in futures_util::future::join_all(clients).await {
            total += client.unwrap();
        }
        total
    });
    assert_eq!(admitted, 100, "320 asked of a quota of 100, on two nodes");
}

#[test]
fn a_failed_redis_answers_by_each_limits_store_error_mode() {
    let Some(mut redis) = support::redis::Redis::start() else {
        return;
    };
    let dir = policies(
        r#"limit open {
             match { domain "edge"; descriptor ["generic_key" == "open"]; }
             key global;
             rate 100/h;
             on_store_error allow;
           }
           limit closed {
             match { domain "edge"; descriptor ["generic_key" == "closed"]; }
             key global;
             rate 100/h;
             on_store_error deny;
           }"#,
    );
    let url = redis.url();
    let (_server, grpc) = serve_grpc(
        dir.path(),
        &[
            ("TOLLGATE_REDIS_URL", url.as_str()),
            ("TOLLGATE_STORE_TIMEOUT_MS", "50"),
        ],
    );
    let runtime = support::runtime();
    runtime.block_on(async {
        let mut client = connect(grpc).await;
        let mut ask = async |value: &str| {
            let asked = request("edge", vec![descriptor(&[("generic_key", value)])]);
            let answer = client.should_rate_limit(asked).await.unwrap().into_inner();
            Code::try_from(answer.overall_code).unwrap()
        };
        assert_eq!(ask("open").await, Code::Ok);
        assert_eq!(ask("closed").await, Code::Ok);
        redis.kill();
        assert_eq!(ask("open").await, Code::Ok, "fails open");
        assert_eq!(ask("closed").await, Code::OverLimit, "fails closed");
    });
}

/// The limits the Python client expects, one per descriptor shape of Envoy's actions (GCRA:
/// no window boundary can fall between two asks of the binary's real clock).
const ACTIONS: &str = r#"
limit per_client {
  match { domain "edge"; descriptor ["remote_address"]; }
  key ip;
  algorithm gcra;
  rate 3/min;
}
limit per_network {
  match { domain "edge"; descriptor ["masked_remote_address"]; }
  key descriptor("masked_remote_address");
  algorithm gcra;
  rate 2/min;
}
limit per_tenant {
  match { domain "edge"; descriptor ["tenant"]; }
  key descriptor("tenant");
  algorithm gcra;
  rate 2/min;
}
limit checkout {
  match { domain "edge"; descriptor ["generic_key" == "checkout"]; }
  key global;
  algorithm gcra;
  rate 2/min;
}
limit bots {
  match { domain "edge"; descriptor ["header_match" == "bot"]; }
  key global;
  algorithm gcra;
  rate 1/min;
}
limit per_upstream {
  match { domain "edge"; descriptor ["source_cluster", "destination_cluster"]; }
  key descriptor("source_cluster") + descriptor("destination_cluster");
  algorithm gcra;
  rate 2/min;
}
"#;

/// The Python interpreter with grpcio and xds-protos: `TOLLGATE_ENVOY_PYTHON`, else
/// `target/envoy-venv` (scripts/test.sh makes it).
fn envoy_python() -> Option<std::path::PathBuf> {
    let python = std::env::var_os("TOLLGATE_ENVOY_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/envoy-venv/bin/python")
        });
    let usable = std::process::Command::new(&python)
        .args(["-c", "import grpc, envoy.service.ratelimit.v3.rls_pb2"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        support::require("grpcio and xds-protos (target/envoy-venv)");
        return None;
    }
    Some(python)
}

#[test]
fn an_independent_grpc_client_gets_envoys_answers() {
    let Some(python) = envoy_python() else {
        return;
    };
    let dir = policies(ACTIONS);
    let (_server, grpc) = serve_grpc(dir.path(), &[]);
    let output = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/envoy_rls.py"
        ))
        .arg(grpc.to_string())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "ok");
}
