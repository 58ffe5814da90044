//! Reading a request's JSON body before it is decided, for limits that reserve from it
//! (`reserve json("max_tokens") …`): a layer in front of the rate-limit layer.
//!
//! When the plan serving has such a limit and the request says it carries JSON, the body is
//! read up to a cap and parsed; the document goes in the request's extensions
//! ([`RequestJson`]), where the rate-limit layer finds it, and the body goes on whole. A body
//! over the cap, or not JSON, reserves the limit's default, and still goes on whole: what
//! was read is sent first, then the rest as it comes. Nothing is read for other requests.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tower::{Layer, Service};

use crate::clock::Clock;
use crate::engine::Engine;
use crate::request::{is_json_media, media_type};
use crate::store::Store;

/// The largest request body read for a reservation, by default.
pub const DEFAULT_MAX_JSON_BODY: usize = 1 << 20;

/// A request's JSON body, read by [`ReadJsonBodyLayer`] for `reserve json(…)`.
#[derive(Debug, Clone)]
pub struct RequestJson(pub Arc<serde_json::Value>);

/// Whether the plan serving now reads request bodies.
type Wanted = Arc<dyn Fn() -> bool + Send + Sync>;

/// Reads JSON request bodies, up to a cap, for the limits of `engine`'s plan that reserve
/// from them. Put it outside the [`RateLimitLayer`](crate::RateLimitLayer):
///
/// ```no_run
/// # use std::sync::Arc;
/// # use axum::{Router, routing::post};
/// # fn f(engine: Arc<tollgate::Engine<tollgate::store::MemoryStore>>) {
/// let app: Router = Router::new()
///     .route("/v1/chat/completions", post(|| async { "ok" }))
///     .layer(tollgate::RateLimitLayer::new(Arc::clone(&engine)))
///     .layer(tollgate::middleware::ReadJsonBodyLayer::new(&engine));
/// # }
/// ```
#[derive(Clone)]
pub struct ReadJsonBodyLayer {
    wanted: Wanted,
    max: usize,
}

impl std::fmt::Debug for ReadJsonBodyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadJsonBodyLayer")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl ReadJsonBodyLayer {
    /// Reads bodies of up to [`DEFAULT_MAX_JSON_BODY`] bytes while `engine`'s plan (as it
    /// is reloaded) has a limit that reserves from them.
    pub fn new<S: Store, C: Clock>(engine: &Arc<Engine<S, C>>) -> Self {
        let engine = Arc::clone(engine);
        ReadJsonBodyLayer {
            wanted: Arc::new(move || engine.plan_guard().reads_request_json()),
            max: DEFAULT_MAX_JSON_BODY,
        }
    }

    /// Reads bodies of up to `max` bytes.
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max = max;
        self
    }
}

impl<Inner> Layer<Inner> for ReadJsonBodyLayer {
    type Service = ReadJsonBody<Inner>;

    fn layer(&self, inner: Inner) -> Self::Service {
        ReadJsonBody {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`ReadJsonBodyLayer`].
#[derive(Clone)]
pub struct ReadJsonBody<Inner> {
    inner: Inner,
    layer: ReadJsonBodyLayer,
}

impl<Inner> std::fmt::Debug for ReadJsonBody<Inner> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadJsonBody").finish_non_exhaustive()
    }
}

impl<Inner, B> Service<Request<B>> for ReadJsonBody<Inner>
where
    Inner: Service<Request<Body>> + Clone + Send + 'static,
    Inner::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Inner::Response;
    type Error = Inner::Error;
    type Future = BoxFuture<'static, Result<Inner::Response, Inner::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service polled ready is the one that answers (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let max = self.layer.max;
        if !(self.layer.wanted)()
            || !is_json_media(&media_type(request.headers()))
            || declared_over(&request, max)
        {
            return Box::pin(inner.call(request.map(Body::new)));
        }
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let (document, body) = read(body, max).await;
            if let Some(document) = document {
                parts.extensions.insert(RequestJson(Arc::new(document)));
            }
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// Reads `body` up to `max` bytes: the JSON document when the whole body is one, and the
/// body to pass on (what was read, then the rest).
async fn read<B>(body: B, max: usize) -> (Option<serde_json::Value>, Body)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let mut body = Box::pin(body);
    let mut read: Vec<Result<Frame<Bytes>, axum::BoxError>> = Vec::new();
    let mut data = BytesMut::new();
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Ok(frame)) => {
                if let Some(chunk) = frame.data_ref() {
                    data.extend_from_slice(chunk);
                }
                read.push(Ok(frame));
                if data.len() > max {
                    break false;
                }
            }
            Some(Err(error)) => {
                read.push(Err(error.into()));
                break false;
            }
        }
    };
    let document = complete
        .then(|| serde_json::from_slice::<serde_json::Value>(&data).ok())
        .flatten();
    let read = futures_util::stream::iter(read);
    let body = if complete {
        Body::new(StreamBody::new(read))
    } else {
        use futures_util::StreamExt as _;
        let rest = BodyStream::new(body.map_err(Into::into));
        Body::new(StreamBody::new(read.chain(rest)))
    };
    (document, body)
}

/// Whether the request says its body is longer than `max`.
fn declared_over<B>(request: &Request<B>, max: usize) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > max as u64)
}
