//! Giving concurrency leases back when a response ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http_body::Frame;
use pin_project_lite::pin_project;

use crate::clock::Clock;
use crate::engine::{Engine, Lease};
use crate::store::Store;

/// Holds an admitted request's concurrency leases and gives them back when dropped: when the
/// response body ends, or when the request or its body is dropped before that.
pub struct LeaseGuard<S: Store, C: Clock> {
    engine: Arc<Engine<S, C>>,
    leases: Vec<Lease>,
}

impl<S: Store, C: Clock> LeaseGuard<S, C> {
    /// Guards `leases` taken through `engine`.
    pub fn new(engine: Arc<Engine<S, C>>, leases: Vec<Lease>) -> Self {
        LeaseGuard { engine, leases }
    }

    /// The body, followed by the release of the leases once it ends or is dropped.
    pub fn wrap<B>(self, body: B) -> Body
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        if self.leases.is_empty() {
            return Body::new(body);
        }
        Body::new(ReleaseBody {
            inner: body,
            guard: Some(self),
        })
    }
}

impl<S: Store, C: Clock> Drop for LeaseGuard<S, C> {
    fn drop(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let leases = std::mem::take(&mut self.leases);
        let engine = Arc::clone(&self.engine);
        // Releasing may need the network (Redis): off the dropping thread. Without a runtime
        // the leases simply lapse when their time is up.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { engine.release(&leases).await });
        }
    }
}

pin_project! {
    struct ReleaseBody<B, S: Store, C: Clock> {
        #[pin]
        inner: B,
        guard: Option<LeaseGuard<S, C>>,
    }
}

impl<B, S, C> http_body::Body for ReleaseBody<B, S, C>
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
        if let Poll::Ready(None) = frame {
            // The end of the body: the request is over.
            this.guard.take();
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
