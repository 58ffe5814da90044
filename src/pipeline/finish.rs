//! The completion phase: telling the observers how a request ended, giving its leases back
//! and settling its reservations with what its response said it used — now, or at the end
//! of its response body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use futures_util::FutureExt as _;
use http_body::Frame;
use pin_project_lite::pin_project;
use smallvec::SmallVec;

use super::meter::Meter;
use super::{Completion, Done, Ended, Pipeline, Settled};
use crate::clock::{Clock, Timestamp};
use crate::store::Store;
use crate::store::adaptive::Ticket;
use crate::verdict::{Lease, Reservation};

/// What an admitted request holds until it ends: concurrency leases to give back,
/// reservations to settle.
#[derive(Debug, Default)]
pub(super) struct Held {
    pub(super) leases: Vec<Lease>,
    pub(super) reservations: Vec<Reservation>,
    pub(super) tickets: Vec<Arc<Ticket>>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.reservations.is_empty() && self.tickets.is_empty()
    }
}

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

    /// Runs the completion now (once): the client got `status`; `said[i]` is what the
    /// request used of reservation `i`, when something said it.
    pub(super) fn done(&mut self, status: u16, ended: Ended, held: Held, said: Vec<Option<u64>>) {
        if let Some(pending) = self.pending.take() {
            pending.run(status, ended, held, said);
        }
    }

    /// Runs the completion at the end of `body` (the response whose head is `parts`), or
    /// when it is dropped first; reservations are settled with what the response said.
    pub(super) fn after<B>(&mut self, parts: &http::response::Parts, held: Held, body: B) -> Body
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let Some(pending) = self.pending.take() else {
            return Body::new(body);
        };
        if pending.completions.is_empty() && held.is_empty() {
            // Nothing to follow: the body as it is.
            return Body::new(body);
        }
        let meter = (!held.reservations.is_empty())
            .then(|| Meter::new(held.reservations.iter().map(|r| &*r.usage), &parts.headers));
        Body::new(FinishBody {
            inner: body,
            end: Some(End {
                pending,
                status: parts.status.as_u16(),
                held,
                meter,
            }),
        })
    }
}

impl<S: Store, C: Clock> Pending<S, C> {
    fn run(self, status: u16, ended: Ended, held: Held, said: Vec<Option<u64>>) {
        let engine = Arc::clone(self.pipeline.engine());
        let now = engine.now();
        let latency = now.saturating_since(self.started);
        // The adaptive limits learn first: the slot is free for the next request at once.
        for ticket in &held.tickets {
            ticket.finish(now, status, latency, ended == Ended::Answered);
        }
        let done = Done {
            status,
            latency,
            ended,
            usage: held
                .reservations
                .iter()
                .zip(&said)
                .map(|(r, said)| Settled {
                    namespace: Arc::clone(&r.namespace),
                    limit: Arc::clone(&r.limit),
                    reserved: r.reserved,
                    used: r.used(*said),
                })
                .collect(),
        };
        for completion in self.completions {
            completion.completed(&done);
        }
        if held.leases.is_empty() && held.reservations.is_empty() {
            return;
        }
        let mut work = Box::pin(async move {
            engine.release(&held.leases).await;
            engine.settle(&held.reservations, &said).await;
        });
        // A store in this process (memory) has done it by now: the next request sees it.
        // One that needs the network (Redis) goes on off the ending thread; without a
        // runtime the leases lapse when their time is up, and the reservations stay counted.
        if (&mut work).now_or_never().is_none()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(work);
        }
    }
}

/// A completion waiting for the end of a response body, and what it reads of the body.
struct End<S: Store, C: Clock> {
    pending: Pending<S, C>,
    status: u16,
    held: Held,
    meter: Option<Meter>,
}

impl<S: Store, C: Clock> End<S, C> {
    fn run(mut self, ended: Ended) {
        if ended == Ended::Answered
            && let Some(meter) = self.meter.as_mut()
        {
            meter.finish();
        }
        let said = self
            .held
            .reservations
            .iter()
            .map(|r| self.meter.as_ref().and_then(|m| m.used(&r.usage)))
            .collect();
        self.pending.run(self.status, ended, self.held, said);
    }
}

pin_project! {
    /// A response body that completes its request when it ends, or when dropped first.
    struct FinishBody<B: http_body::Body, S: Store, C: Clock> {
        #[pin]
        inner: B,
        end: Option<End<S, C>>,
    }

    impl<B: http_body::Body, S: Store, C: Clock> PinnedDrop for FinishBody<B, S, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(end) = this.end.take() {
                // A body that says it has ended (an empty one, say) is dropped by the server
                // without being polled to its end: it was answered in full all the same.
                let ended = if this.inner.is_end_stream() {
                    Ended::Answered
                } else {
                    Ended::ClientGone
                };
                end.run(ended);
            }
        }
    }
}

impl<B, S, C> http_body::Body for FinishBody<B, S, C>
where
    B: http_body::Body<Data = bytes::Bytes>,
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
        match &frame {
            Poll::Ready(None) => {
                if let Some(end) = this.end.take() {
                    end.run(Ended::Answered);
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(meter) = this.end.as_mut().and_then(|e| e.meter.as_mut()) {
                    if let Some(data) = frame.data_ref() {
                        meter.feed(data);
                    } else if let Some(trailers) = frame.trailers_ref() {
                        meter.headers(trailers);
                    }
                }
            }
            _ => {}
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
