//! The tower middleware: [`RateLimitLayer`] wraps any `Service<http::Request<B>>` (axum,
//! hyper, tonic) in a [`RateLimit`] that decides each request before passing it on.
//!
//! Allowed requests go to the inner service with rate-limit headers added to the response;
//! refused ones get a `problem+json` answer without reaching it — or, for gRPC requests
//! (`content-type: application/grpc…`), a gRPC status the client library understands. Soft thresholds add a
//! warning header or hold the request (on tokio's timer). Concurrency leases are given back
//! when the response body ends, or when the request or the body is dropped.

mod body;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

pub use self::body::LeaseGuard;
use crate::anomaly::Watch;
use crate::clock::{Clock, SystemClock};
use crate::engine::{Action, Engine};
use crate::identity::Identifier;
use crate::request::{PathError, RequestCtx, X_REQUEST_ID};
use crate::response::{self, HeaderFamilies, grpc_refusal, refusal};
use crate::store::Store;

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
    engine: Arc<Engine<S, C>>,
    options: Arc<HttpOptions>,
    only: Option<Arc<[Arc<str>]>>,
}

impl<S, C> Clone for RateLimitLayer<S, C> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            engine: Arc::clone(&self.engine),
            options: Arc::clone(&self.options),
            only: self.only.clone(),
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

impl<S: Store, C: Clock> RateLimitLayer<S, C> {
    /// A layer deciding with `engine`, with default options (no trusted proxies, both header
    /// families).
    pub fn new(engine: Arc<Engine<S, C>>) -> Self {
        RateLimitLayer {
            engine,
            options: Arc::new(HttpOptions::default()),
            only: None,
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
}

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
pub fn limit<S: Store, C: Clock>(engine: &Arc<Engine<S, C>>, name: &str) -> RateLimitLayer<S, C> {
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

/// The future of [`RateLimit`]'s responses.
pub type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

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
    type Future = ResponseFuture<Inner::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone that was driven to readiness is the one to call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let request_id = crate::request::request_id(request.headers());
            let grpc = is_grpc(request.headers());
            let ctx = match request_ctx(&mut request, &layer.options.identifier) {
                Ok(ctx) => ctx,
                Err(error) => return Ok(bad_path(&error, &request_id)),
            };
            let span = crate::telemetry::request_span(&request_id, &ctx.method);
            let verdict = match &layer.only {
                Some(names) => layer.engine.decide_only(&ctx, names).await,
                None => layer.engine.decide(&ctx).await,
            };
            crate::telemetry::record_verdict(&span, &verdict, &ctx, layer.engine.key_hasher());
            let export = layer.engine.export(&verdict, &ctx, &request_id);
            // Refusals by a list or a ban are not the client's pattern: not watched.
            let watch = if matches!(verdict.action, Action::Forbid { .. }) {
                None
            } else {
                layer.engine.watch(&ctx)
            };
            // The headers go back to the request the application sees.
            *request.headers_mut() = ctx.headers;
            let mut verdict = verdict;
            let guard = (!verdict.leases.is_empty()).then(|| {
                LeaseGuard::new(
                    Arc::clone(&layer.engine),
                    std::mem::take(&mut verdict.leases),
                )
            });
            span.in_scope(|| {
                crate::telemetry::log_verdict(&verdict, &request_id, layer.engine.key_hasher());
            });
            if let Some(problem) = response::problem(&verdict, Some(&request_id)) {
                if let Some(rows) = export {
                    rows.send();
                }
                observe(&layer.engine, watch, problem.status);
                let refuse = if grpc { grpc_refusal } else { refusal };
                return Ok(refuse(
                    &verdict,
                    &problem,
                    layer.options.headers,
                    &request_id,
                ));
            }
            if let Action::Delay(wait) = verdict.action {
                tokio::time::sleep(wait).await;
            }
            let id = HeaderValue::from_str(&request_id).ok();
            if let Some(id) = &id {
                request
                    .headers_mut()
                    .insert(X_REQUEST_ID.clone(), id.clone());
            }
            let response = tracing::Instrument::instrument(inner.call(request), span).await;
            let status = response.as_ref().map_or(500, |r| r.status().as_u16());
            if let Some(rows) = export {
                rows.send_with_status(status);
            }
            observe(&layer.engine, watch, status);
            let (mut parts, body) = response?.into_parts();
            response::write_rate_limit_headers(&verdict, layer.options.headers, &mut parts.headers);
            if let Some(id) = id {
                parts.headers.insert(X_REQUEST_ID.clone(), id);
            }
            let body = match guard {
                Some(guard) => guard.wrap(body),
                None => Body::new(body),
            };
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// Counts a watched request's response for the anomalies, in the background: the response
/// does not wait for the store.
fn observe<S: Store, C: Clock>(engine: &Arc<Engine<S, C>>, watch: Option<Watch>, status: u16) {
    if let Some(watch) = watch {
        let engine = Arc::clone(engine);
        tokio::spawn(async move {
            engine.observe(watch, status).await;
        });
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
