//! `RateLimitLayer` in a tonic stack, over real HTTP/2: a tonic server with the layer, a
//! tonic client. Allowed calls carry the rate-limit headers as metadata; refused ones get the
//! gRPC status a gRPC client understands (`RESOURCE_EXHAUSTED`, the reason as its message,
//! `retry-after` in the metadata), and the client's address is read from tonic's connection
//! info (the `tonic` feature).

#![cfg(feature = "tonic")]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut};
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RateLimitLayer, compile};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};

/// Messages as raw bytes: no protobuf needed to test the transport.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// `test.Echo/Say`: answers with what it was sent.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let say = tower::service_fn(|r: tonic::Request<Vec<u8>>| async move {
                Ok::<_, Status>(tonic::Response::new(r.into_inner()))
            });
            Ok(tonic::server::Grpc::new(Raw).unary(say, request).await)
        })
    }
}

const POLICY: &str = r#"
limit calls {
  match { route POST "/test.Echo/*"; }
  key ip;
  algorithm fixed_window;
  rate 2/min;
  on_exceed reject 429 reason "too many calls, 100% sure";
}
"#;

#[tokio::test]
async fn a_tonic_service_is_limited_with_grpc_statuses() {
    let plan = compile(&PolicySet::from_sources([("grpc.rl", POLICY)])).expect("valid policy");
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(RateLimitLayer::new(Arc::clone(&engine)))
        .add_service(Echo)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let server = tokio::spawn(server);

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the client connects");
    let mut client = tonic::client::Grpc::new(channel);
    let mut say = async |text: &str| {
        client.ready().await.expect("ready");
        client
            .unary(
                tonic::Request::new(text.as_bytes().to_vec()),
                http::uri::PathAndQuery::from_static("/test.Echo/Say"),
                Raw,
            )
            .await
    };

    let first = say("one").await.expect("the first call goes through");
    assert_eq!(first.get_ref(), b"one");
    let meta = first.metadata();
    assert_eq!(meta.get("x-ratelimit-limit").unwrap(), "2");
    assert_eq!(meta.get("x-ratelimit-remaining").unwrap(), "1");
    assert_eq!(say("two").await.expect("the second too").get_ref(), b"two");

    let refused = say("three").await.expect_err("the third is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), "too many calls, 100% sure");
    let wait: u64 = refused
        .metadata()
        .get("retry-after")
        .expect("retry-after in the metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(
        refused.metadata().get("x-ratelimit-remaining").unwrap(),
        "0"
    );
    // The key is the client's address, read from tonic's connection info.
    let reports = engine
        .decide(
            &tollgate::RequestCtx::new(http::Method::POST, "/test.Echo/Say")
                .with_client_ip(addr.ip()),
        )
        .await;
    assert!(!reports.is_allowed(), "the same address is over its quota");
    server.abort();
}
