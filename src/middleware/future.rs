//! [`ResponseFuture`], the layer's named future, and what it does with an admission: the
//! refusal, or the inner service's call and its response's headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::Service;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use super::{LayerContext, RateLimitLayer};
use crate::clock::Clock;
use crate::pipeline::Admission;
use crate::request::{RequestCtx, X_REQUEST_ID};
use crate::response::{self, HeaderFamilies, grpc_refusal, refusal};
use crate::store::Store;

/// A boxed response future: the path that waits for the store or holds a soft delay.
type Boxed<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

pin_project! {
    /// The future of [`RateLimit`](super::RateLimit)'s responses: ready (a refusal, a path
    /// that cannot be normalized), the inner service's call for a request decided without
    /// waiting (the memory store), or a boxed future when the store must be waited for or a
    /// soft delay held.
    pub struct ResponseFuture<F, S: Store, C: Clock, E> {
        #[pin]
        state: State<F, S, C, E>,
    }
}

pin_project! {
    #[project = Project]
    enum State<F, S: Store, C: Clock, E> {
        // The answer, already known.
        Ready {
            response: Option<Result<Response<Body>, E>>,
        },
        // The inner service's call, in the request's span.
        Calling {
            #[pin]
            call: Instrumented<F>,
            admission: Option<Admission<S, C>>,
            id: Option<HeaderValue>,
            headers: HeaderFamilies,
        },
        // The path that waits.
        Boxed {
            future: Boxed<E>,
        },
    }
}

impl<F, S: Store, C: Clock, E> ResponseFuture<F, S, C, E> {
    pub(super) fn ready(response: Result<Response<Body>, E>) -> Self {
        ResponseFuture {
            state: State::Ready {
                response: Some(response),
            },
        }
    }

    pub(super) fn calling(
        call: Instrumented<F>,
        admission: Admission<S, C>,
        id: Option<HeaderValue>,
        answer: Answer,
    ) -> Self {
        ResponseFuture {
            state: State::Calling {
                call,
                admission: Some(admission),
                id,
                headers: answer.headers,
            },
        }
    }

    pub(super) fn boxed(
        future: impl Future<Output = Result<Response<Body>, E>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            state: State::Boxed {
                future: Box::pin(future),
            },
        }
    }
}

impl<F, S: Store, C: Clock, E> std::fmt::Debug for ResponseFuture<F, S, C, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, S, C, E, ResBody> Future for ResponseFuture<F, S, C, E>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    S: Store,
    C: Clock,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<axum::BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Project::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(response),
                None => panic!("ResponseFuture polled after it completed"),
            },
            Project::Calling {
                call,
                admission,
                id,
                headers,
            } => {
                let result = std::task::ready!(call.poll(cx));
                let Some(admission) = admission.take() else {
                    panic!("ResponseFuture polled after it completed");
                };
                Poll::Ready(respond(result, admission, id.take(), *headers))
            }
            Project::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

/// How the layer answers: the header families, and whether the client speaks gRPC.
#[derive(Debug, Clone, Copy)]
pub(super) struct Answer {
    headers: HeaderFamilies,
    grpc: bool,
    keep_context: bool,
}

impl Answer {
    pub(super) fn new<S, C>(layer: &RateLimitLayer<S, C>, grpc: bool) -> Self {
        Answer {
            headers: layer.options.headers,
            grpc,
            keep_context: layer.keep_context,
        }
    }

    /// The refusal of a refused request (`None`: it goes on).
    pub(super) fn refusal<S: Store, C: Clock>(
        &self,
        admission: &Admission<S, C>,
    ) -> Option<Response<Body>> {
        let problem = admission.problem.as_deref()?;
        let refuse = if self.grpc { grpc_refusal } else { refusal };
        Some(refuse(
            &admission.verdict,
            problem,
            self.headers,
            admission.request_id(),
        ))
    }

    /// Hands `request` to `inner`: its headers back from `ctx`, the request id added, the
    /// context left in its extensions when the layer keeps it; the call in the request's
    /// span, and the id for the response.
    pub(super) fn forward<Inner, ReqBody, S: Store, C: Clock>(
        &self,
        mut inner: Inner,
        mut request: Request<ReqBody>,
        mut ctx: RequestCtx,
        admission: &Admission<S, C>,
    ) -> (Instrumented<Inner::Future>, Option<HeaderValue>)
    where
        Inner: Service<Request<ReqBody>>,
    {
        *request.headers_mut() = std::mem::take(&mut ctx.headers);
        let id = HeaderValue::from_str(admission.request_id()).ok();
        if let Some(id) = &id {
            request
                .headers_mut()
                .insert(X_REQUEST_ID.clone(), id.clone());
        }
        if self.keep_context {
            request.extensions_mut().insert(LayerContext(ctx));
        }
        let call = inner.call(request).instrument(admission.span().clone());
        (call, id)
    }

    /// The whole answer to an admitted request: the refusal, or (after any soft delay) the
    /// inner service's response.
    pub(super) async fn go_on<Inner, ReqBody, ResBody, S: Store, C: Clock>(
        self,
        inner: Inner,
        request: Request<ReqBody>,
        ctx: RequestCtx,
        admission: Admission<S, C>,
    ) -> Result<Response<Body>, Inner::Error>
    where
        Inner: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        ResBody::Error: Into<axum::BoxError>,
    {
        if let Some(refusal) = self.refusal(&admission) {
            let status = admission.status();
            admission.complete(status);
            return Ok(refusal);
        }
        admission.hold().await;
        let (call, id) = self.forward(inner, request, ctx, &admission);
        respond(call.await, admission, id, self.headers)
    }
}

/// The inner service's response with the rate-limit headers and the request id, its body
/// completing the request when it ends (or is dropped); an error completes it as a 500.
fn respond<ResBody, E, S: Store, C: Clock>(
    result: Result<Response<ResBody>, E>,
    admission: Admission<S, C>,
    id: Option<HeaderValue>,
    headers: HeaderFamilies,
) -> Result<Response<Body>, E>
where
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<axum::BoxError>,
{
    let (mut parts, body) = match result {
        Ok(response) => response.into_parts(),
        Err(error) => {
            admission.complete(500);
            return Err(error);
        }
    };
    let mut admission = admission;
    if !admission.verdict.reservations.is_empty() {
        admission.preview_settlement(&parts.headers);
    }
    response::write_rate_limit_headers(&admission.verdict, headers, &mut parts.headers);
    if let Some(id) = id {
        parts.headers.insert(X_REQUEST_ID.clone(), id);
    }
    let body = admission.complete_after(&parts, body);
    Ok(Response::from_parts(parts, body))
}
