//! The tower middleware: [`RateLimitLayer`] wraps any `Service<http::Request<B>>` (axum,
//! hyper, tonic) in a [`RateLimit`] that decides each request before passing it on.
//!
//! Allowed requests go to the inner service with rate-limit headers added to the response;
//! refused ones get a `problem+json` answer without reaching it — or, for gRPC requests
//! (`content-type: application/grpc…`), a gRPC status the client library understands. Soft thresholds add a
//! warning header or hold the request (on tokio's timer). Concurrency leases are given back
//! when the response body ends, or when the request or the body is dropped.

mod body;
mod future;

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{Request, Response};
use tower::{Layer, Service};

pub use self::body::{DEFAULT_MAX_JSON_BODY, ReadJsonBody, ReadJsonBodyLayer, RequestJson};
use self::future::Answer;
pub use self::future::ResponseFuture;
use crate::clock::{Clock, SystemClock};
use crate::engine::Engine;
use crate::identity::Identifier;
use crate::pipeline::Pipeline;
use crate::request::{PathError, RequestCtx};
use crate::response::{self, HeaderFamilies};
use crate::store::{RuntimeStore, Store};
use crate::verdict::Action;

/// How the middleware reads requests and writes responses.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// How clients are identified.
    pub identifier: Identifier,
    /// Which header families to send.
    pub headers: HeaderFamilies,
}

/// Builds [`RateLimit`] services around inner services.
pub struct RateLimitLayer<S, C = SystemClock> {
    pipeline: Arc<Pipeline<S, C>>,
    options: Arc<HttpOptions>,
    only: Option<Arc<[Arc<str>]>>,
    keep_context: bool,
}

impl<S, C> Clone for RateLimitLayer<S, C> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            pipeline: Arc::clone(&self.pipeline),
            options: Arc::clone(&self.options),
            only: self.only.clone(),
            keep_context: self.keep_context,
        }
    }
}

impl<S, C> std::fmt::Debug for RateLimitLayer<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("options", &self.options)
            .field("only", &self.only)
            .finish_non_exhaustive()
    }
}

/// The pipeline a layer built from an engine alone uses: decisions logged, and the plan's
/// anomalies detected (their actions taken; nothing counted for Prometheus or exported —
/// build the pipeline with [`Observers`](crate::observers::Observers) for those, and use
/// [`RateLimitLayer::from_pipeline`]).
pub fn default_pipeline<S: Store + RuntimeStore, C: Clock>(
    engine: Arc<Engine<S, C>>,
) -> Pipeline<S, C> {
    crate::observers::Observers::new(&engine, None, None).pipeline(engine)
}

impl<S: Store + RuntimeStore, C: Clock> RateLimitLayer<S, C> {
    /// A layer deciding with `engine` through [`default_pipeline`], with default options (no
    /// trusted proxies, both header families).
    pub fn new(engine: Arc<Engine<S, C>>) -> Self {
        Self::from_pipeline(Arc::new(default_pipeline(engine)))
    }
}

impl<S: Store, C: Clock> RateLimitLayer<S, C> {
    /// A layer deciding through `pipeline` (its engine and observers), with default options.
    pub fn from_pipeline(pipeline: Arc<Pipeline<S, C>>) -> Self {
        RateLimitLayer {
            pipeline,
            options: Arc::new(HttpOptions::default()),
            only: None,
            keep_context: false,
        }
    }

    /// Uses `options` to identify clients and write headers.
    pub fn with_options(mut self, options: HttpOptions) -> Self {
        self.options = Arc::new(options);
        self
    }

    /// Checks only the named limits, whatever their `match` conditions: for a route that
    /// names its limit in code (see [`limit`]).
    pub fn only<I, N>(mut self, limits: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<Arc<str>>,
    {
        self.only = Some(limits.into_iter().map(Into::into).collect());
        self
    }

    /// Leaves the request's context, as the layer read it, in the request's extensions for
    /// the inner service (a [`LayerContext`]), so that it need not read the request again: what
    /// the proxy does for WebSocket messages and streamed bytes. Its headers are in the
    /// request.
    pub fn keep_context(mut self) -> Self {
        self.keep_context = true;
        self
    }
}

/// The request's context as the layer read it (identity established), left in the
/// request's extensions by [`RateLimitLayer::keep_context`]. Its `headers` are empty: they
/// are the request's.
#[derive(Debug, Clone)]
pub struct LayerContext(pub RequestCtx);

/// A layer for one route that applies the limit named `name` in the policies, whatever its
/// `match` block says — the declarative per-route helper:
///
/// ```no_run
/// # use std::sync::Arc;
/// # use axum::{Router, routing::post};
/// # fn f(engine: Arc<tollgate::Engine<tollgate::store::MemoryStore>>) {
/// let app: Router = Router::new()
///     .route("/auth/login", post(|| async { "ok" }))
///     .route_layer(tollgate::middleware::limit(&engine, "login"));
/// # }
/// ```
pub fn limit<S: Store + RuntimeStore, C: Clock>(
    engine: &Arc<Engine<S, C>>,
    name: &str,
) -> RateLimitLayer<S, C> {
    RateLimitLayer::new(Arc::clone(engine)).only([name])
}

impl<Inner, S, C> Layer<Inner> for RateLimitLayer<S, C> {
    type Service = RateLimit<Inner, S, C>;

    fn layer(&self, inner: Inner) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service that rate-limits requests before passing them to `inner`.
pub struct RateLimit<Inner, S, C = SystemClock> {
    inner: Inner,
    layer: RateLimitLayer<S, C>,
}

impl<Inner: Clone, S, C> Clone for RateLimit<Inner, S, C> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<Inner: std::fmt::Debug, S, C> std::fmt::Debug for RateLimit<Inner, S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<Inner, ReqBody, ResBody, S, C> Service<Request<ReqBody>> for RateLimit<Inner, S, C>
where
    Inner: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    Inner::Future: Send + 'static,
    Inner::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<axum::BoxError>,
    S: Store,
    C: Clock,
{
    type Response = Response<Body>;
    type Error = Inner::Error;
    type Future = ResponseFuture<Inner::Future, S, C, Inner::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    /// Decides the request — without waiting when the store answers in this process, so
    /// that the future is the inner service's own, wrapped; else in a boxed future — then
    /// refuses it or calls the inner service.
    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone that was driven to readiness is the one to call (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = &self.layer;
        let request_id = crate::request::request_id(request.headers());
        let grpc = is_grpc(request.headers());
        let ctx = match request_ctx(&mut request, &layer.options.identifier) {
            Ok(ctx) => ctx,
            Err(error) => return ResponseFuture::ready(Ok(bad_path(&error, &request_id))),
        };
        let only = layer.only.as_deref();
        match layer.pipeline.admit_now(&ctx, request_id, only) {
            Ok(admission) if !matches!(admission.verdict.action, Action::Delay(_)) => {
                let answer = Answer::new(layer, grpc);
                if let Some(refusal) = answer.refusal(&admission) {
                    let status = admission.status();
                    admission.complete(status);
                    return ResponseFuture::ready(Ok(refusal));
                }
                let (call, id) = answer.forward(inner, request, ctx, &admission);
                ResponseFuture::calling(call, admission, id, answer)
            }
            Ok(admission) => {
                let answer = Answer::new(layer, grpc);
                ResponseFuture::boxed(answer.go_on(inner, request, ctx, admission))
            }
            Err(request_id) => {
                let layer = layer.clone();
                ResponseFuture::boxed(async move {
                    let only = layer.only.as_deref();
                    let admission = layer.pipeline.admit(&ctx, request_id, only).await;
                    Answer::new(&layer, grpc)
                        .go_on(inner, request, ctx, admission)
                        .await
                })
            }
        }
    }
}

/// The engine's view of an HTTP request, its client identified by `identifier` (see
/// [`RequestCtx::from_http`]).
pub fn request_ctx<B>(
    request: &mut Request<B>,
    identifier: &Identifier,
) -> Result<RequestCtx, PathError> {
    let (mut ctx, peer) = RequestCtx::from_http(request)?;
    identifier.identify(&mut ctx, peer);
    if let Some(RequestJson(document)) = request.extensions().get() {
        ctx.body = Some(Arc::clone(document));
    }
    Ok(ctx)
}

/// The answer to a request whose path cannot be normalized safely: 400 problem.
pub fn bad_path(error: &PathError, request_id: &str) -> Response<Body> {
    response::problem_response(
        response::Problem::bad_request(error.to_string()),
        request_id,
    )
}

/// Whether `headers` are a gRPC request's (`application/grpc`, `application/grpc+proto`…).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

#[cfg(test)]
mod tests {
    use super::is_grpc;

    #[test]
    fn grpc_requests_are_told_by_their_content_type() {
        let with = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(v),
            );
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(
            !with("application/grpc-web-text"),
            "grpc-web is plain HTTP to us"
        );
        assert!(!with("application/json"));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }
}
