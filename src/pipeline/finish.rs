//! The completion phase: telling the observers how a request ended and giving its leases
//! back, now or at the end of its response body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http_body::Frame;
use pin_project_lite::pin_project;
use smallvec::SmallVec;

use super::{Completion, Done, Ended, Pipeline};
use crate::clock::{Clock, Timestamp};
use crate::store::Store;
use crate::verdict::Lease;

/// The status a request that ended before any answer is recorded with (nginx's "client
/// closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// What the completion of one request needs; empty once it has run.
pub struct Finishing<S: Store, C: Clock> {
    pending: Option<Pending<S, C>>,
}

struct Pending<S: Store, C: Clock> {
    pipeline: Arc<Pipeline<S, C>>,
    started: Timestamp,
    completions: SmallVec<[Box<dyn Completion>; 2]>,
}

impl<S: Store, C: Clock> std::fmt::Debug for Finishing<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finishing")
            .field("done", &self.pending.is_none())
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> Finishing<S, C> {
    /// Nothing to follow: a completion that does nothing.
    pub(super) fn nothing() -> Self {
        Finishing { pending: None }
    }

    pub(super) fn new(
        pipeline: Arc<Pipeline<S, C>>,
        started: Timestamp,
        completions: SmallVec<[Box<dyn Completion>; 2]>,
    ) -> Self {
        Finishing {
            pending: Some(Pending {
                pipeline,
                started,
                completions,
            }),
        }
    }

    /// Whether the completion has run.
    pub(super) fn is_done(&self) -> bool {
        self.pending.is_none()
    }

    /// Runs the completion now (once): the client got `status`.
    pub(super) fn done(&mut self, status: u16, ended: Ended, leases: Vec<Lease>) {
        if let Some(pending) = self.pending.take() {
            pending.run(status, ended, leases);
        }
    }

    /// Runs the completion at the end of `body`, or when it is dropped first.
    pub(super) fn after<B>(&mut self, status: u16, leases: Vec<Lease>, body: B) -> Body
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let Some(pending) = self.pending.take() else {
            return Body::new(body);
        };
        if pending.completions.is_empty() && leases.is_empty() {
            // Nothing to follow: the body as it is.
            return Body::new(body);
        }
        Body::new(FinishBody {
            inner: body,
            end: Some(End {
                pending,
                status,
                leases,
            }),
        })
    }
}

impl<S: Store, C: Clock> Pending<S, C> {
    fn run(self, status: u16, ended: Ended, leases: Vec<Lease>) {
        let engine = Arc::clone(self.pipeline.engine());
        let done = Done {
            status,
            latency: engine.now().saturating_since(self.started),
            ended,
        };
        for completion in self.completions {
            completion.completed(&done);
        }
        if !leases.is_empty() {
            // Releasing may need the network (Redis): off the ending thread. Without a
            // runtime the leases simply lapse when their time is up.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { engine.release(&leases).await });
            }
        }
    }
}

/// A completion waiting for the end of a response body.
struct End<S: Store, C: Clock> {
    pending: Pending<S, C>,
    status: u16,
    leases: Vec<Lease>,
}

impl<S: Store, C: Clock> End<S, C> {
    fn run(self, ended: Ended) {
        self.pending.run(self.status, ended, self.leases);
    }
}

pin_project! {
    /// A response body that completes its request when it ends, or when dropped first.
    struct FinishBody<B, S: Store, C: Clock> {
        #[pin]
        inner: B,
        end: Option<End<S, C>>,
    }

    impl<B, S: Store, C: Clock> PinnedDrop for FinishBody<B, S, C> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(end) = this.project().end.take() {
                end.run(Ended::ClientGone);
            }
        }
    }
}

impl<B, S, C> http_body::Body for FinishBody<B, S, C>
where
    B: http_body::Body,
    S: Store,
    C: Clock,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame
            && let Some(end) = this.end.take()
        {
            end.run(Ended::Answered);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
