//! One request pipeline in two phases, used by every adapter (the tower layer, `/v1/check`,
//! forward-auth, the proxy behind the layer).
//!
//! **Admission** ([`Pipeline::admit`]): the engine's verdict, recorded in the request's span;
//! the problem document when it refuses and the status Tollgate answers; then each
//! [`Observer`] in the order it was attached (metrics, logs, exports, anomalies…) sees the
//! decision and says what it must follow to the end. That order exists here once.
//!
//! **Completion** ([`Admission::complete`], [`Admission::complete_after`]): once the outcome
//! is known — the status the client got and the latency, at the end of the response body for
//! streams, or on drop when the client goes away — the concurrency leases are given back and
//! each observer that asked is told.
//!
//! Observers live above this module and attach to it; it knows them only by their traits.

mod finish;
pub mod meter;
mod span;

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use self::finish::Held;
pub use self::finish::{CLIENT_CLOSED, Finishing};
pub use self::span::{record_verdict, request_span};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::engine::Engine;
use crate::request::RequestCtx;
use crate::response::Problem;
use crate::store::Store;
use crate::verdict::{Action, Detection, Verdict};

/// Something that follows decisions: it sees each one at admission, and may ask to be told
/// how the request ended. It runs on the request path: it must not block (queue, count,
/// spawn).
pub trait Observer: Send + Sync + 'static {
    /// A request was decided; what to follow to the end, if anything.
    fn admitted(&self, admitted: &Admitted<'_>) -> Option<Box<dyn Completion>>;
}

/// What an observer follows of one request, told once how it ended.
pub trait Completion: Send + Sync + 'static {
    /// The request ended.
    fn completed(self: Box<Self>, done: &Done);
}

/// Where detected anomalies go (metrics, exports), besides the detector's own actions.
pub trait DetectionSink: Send + Sync + 'static {
    /// One anomaly detected and acted on by this node; `key_hash` is the keyed hash of its
    /// counter key.
    fn detected(&self, detection: &Detection, key_hash: &str);
}

/// A decided request, as observers see it at admission.
#[derive(Debug)]
pub struct Admitted<'a> {
    /// The verdict.
    pub verdict: &'a Verdict,
    /// The request.
    pub request: &'a RequestCtx,
    /// Its id.
    pub request_id: &'a str,
    /// The status Tollgate answers: the refusal's, or 200 when the request goes on.
    pub status: u16,
    /// When it was decided.
    pub now: Timestamp,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The status the client got: Tollgate's refusal, or what the application answered.
    pub status: u16,
    /// From admission to the end (of the response body, for streams).
    pub latency: Duration,
    /// How it ended.
    pub ended: Ended,
    /// What it used, per limit whose cost its response says (`cost response …`).
    pub usage: Vec<Settled>,
}

/// What a request reserved on a limit whose cost its response says, and what it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The limit's namespace.
    pub namespace: Arc<str>,
    /// The limit.
    pub limit: Arc<str>,
    /// What was counted at admission.
    pub reserved: u64,
    /// What it used (what the response said, else the limit's default, else the
    /// reservation): what the counter holds for it once settled.
    pub used: u64,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Refused by Tollgate, or answered in full.
    Answered,
    /// The client went away (the request or its response body was dropped first).
    ClientGone,
}

/// The engine and the observers attached to it.
pub struct Pipeline<S, C = SystemClock> {
    engine: Arc<Engine<S, C>>,
    observers: Vec<Arc<dyn Observer>>,
}

impl<S, C> std::fmt::Debug for Pipeline<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("observers", &self.observers.len())
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> Pipeline<S, C> {
    /// A pipeline around `engine`, with no observer.
    pub fn new(engine: Arc<Engine<S, C>>) -> Self {
        Pipeline {
            engine,
            observers: Vec::new(),
        }
    }

    /// Attaches `observer`, after those attached before it.
    pub fn observe(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observers.push(observer);
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        &self.engine
    }

    /// The admission phase of `request` (id `request_id`): decided against every limit
    /// whose `match` it meets, or only the limits named by `only`.
    pub async fn admit(
        self: &Arc<Self>,
        request: &RequestCtx,
        request_id: String,
        only: Option<&[Arc<str>]>,
    ) -> Admission<S, C> {
        let span = request_span(&request_id, &request.method);
        let verdict = match only {
            Some(names) => self.engine.decide_only(request, names).await,
            None => self.engine.decide(request).await,
        };
        self.admitted(request, request_id, verdict, span)
    }

    /// The admission phase without waiting, when the engine's store answers in this process
    /// (the memory store); else `Err` with the request id back, for [`Pipeline::admit`].
    pub fn admit_now(
        self: &Arc<Self>,
        request: &RequestCtx,
        request_id: String,
        only: Option<&[Arc<str>]>,
    ) -> Result<Admission<S, C>, String> {
        let span = request_span(&request_id, &request.method);
        match self.engine.decide_now(request, only) {
            Some(verdict) => Ok(self.admitted(request, request_id, verdict, span)),
            None => Err(request_id),
        }
    }

    /// What follows the verdict: the span, the refusal, the observers.
    fn admitted(
        self: &Arc<Self>,
        request: &RequestCtx,
        request_id: String,
        verdict: Verdict,
        span: tracing::Span,
    ) -> Admission<S, C> {
        let started = verdict.decided_at;
        record_verdict(&span, &verdict, request, self.engine.key_hasher());
        let problem = crate::response::problem(&verdict, Some(&request_id)).map(Box::new);
        let status = problem.as_ref().map_or(200, |p| p.status);
        let mut completions = SmallVec::new();
        if !self.observers.is_empty() {
            let admitted = Admitted {
                verdict: &verdict,
                request,
                request_id: &request_id,
                status,
                now: started,
            };
            let _in_span = span.enter();
            completions.extend(self.observers.iter().filter_map(|o| o.admitted(&admitted)));
        }
        // Most requests have nothing to follow: then the pipeline's count is not touched
        // (a cache line every core would share).
        let finish = if completions.is_empty()
            && verdict.leases.is_empty()
            && verdict.reservations.is_empty()
            && verdict.adaptive.is_empty()
        {
            Finishing::nothing()
        } else {
            Finishing::new(Arc::clone(self), started, completions)
        };
        Admission {
            verdict,
            problem,
            request_id,
            span,
            finish,
        }
    }
}

/// A decided request between its two phases. Dropped without [`Admission::complete`], it
/// completes as a client gone away.
#[derive(Debug)]
pub struct Admission<S: Store, C: Clock> {
    /// The verdict.
    pub verdict: Verdict,
    /// The refusal, when the request does not go on.
    pub problem: Option<Box<Problem>>,
    request_id: String,
    span: tracing::Span,
    finish: Finishing<S, C>,
}

impl<S: Store, C: Clock> Admission<S, C> {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The request's span: what is done for the request (the application, the upstream)
    /// runs in it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The status Tollgate answers: the refusal's, or 200 when the request goes on.
    pub fn status(&self) -> u16 {
        self.problem.as_ref().map_or(200, |p| p.status)
    }

    /// Holds an admitted request as long as a soft `delay` (on tokio's timer).
    pub async fn hold(&self) {
        if let Action::Delay(wait) = self.verdict.action {
            tokio::time::sleep(wait).await;
        }
    }

    /// The completion phase, now: the client got `status`; no response says what the
    /// request used (its reservations settle at each limit's `default`, else as reserved).
    pub fn complete(mut self, status: u16) {
        let held = self.held();
        let said = vec![None; held.reservations.len()];
        self.finish.done(status, Ended::Answered, held, said);
    }

    /// The completion phase of an Envoy rate-limit request, now: its `hits` are what it
    /// used of the limits that count `hits_addend` (`cost response hits_addend;`).
    pub fn complete_hits(mut self, status: u16, hits: u64) {
        let held = self.held();
        let said = held
            .reservations
            .iter()
            .map(|r| {
                let amounts = r.usage.terms.iter();
                r.usage
                    .total(amounts.map(|(_, a)| (*a == crate::plan::Amount::Hits).then_some(hits)))
            })
            .collect();
        self.finish.done(status, Ended::Answered, held, said);
    }

    /// The completion phase at the end of `body`, the response whose head is `parts`: when
    /// it ends, or as a client gone away when it is dropped first. Leases are held until
    /// then; reservations are settled with what the response said it used (`cost response
    /// …`: its headers and trailers, its JSON body or events, read as they pass).
    pub fn complete_after<B>(mut self, parts: &http::response::Parts, body: B) -> axum::body::Body
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let held = self.held();
        self.finish.after(parts, held, body)
    }

    /// The response's head is known (`headers`): where a reservation's usage is read from
    /// headers only and the response says it, the verdict's reports show what the counter
    /// will hold once it is settled — so that the rate-limit headers written now carry the
    /// settled figures. The settlement itself still runs at the completion.
    pub fn preview_settlement(&mut self, headers: &http::HeaderMap) {
        let verdict = &mut self.verdict;
        for r in &verdict.reservations {
            let headers_only = r
                .usage
                .terms
                .iter()
                .all(|(_, amount)| matches!(amount, crate::plan::Amount::Header(_)));
            if !headers_only {
                continue;
            }
            let meter = meter::Meter::described(std::iter::once(&*r.usage), headers, None);
            let Some(said) = meter.used(&r.usage) else {
                continue;
            };
            let used = r.used(Some(said));
            if let Some(report) = verdict.reports.iter_mut().find(|p| p.limit == r.limit) {
                let d = &mut report.decision;
                d.remaining = (d.remaining.saturating_add(r.reserved))
                    .saturating_sub(used)
                    .min(d.limit);
            }
        }
    }

    /// What the request holds until it ends, taken from the verdict.
    fn held(&mut self) -> Held {
        Held {
            leases: std::mem::take(&mut self.verdict.leases),
            reservations: std::mem::take(&mut self.verdict.reservations),
            tickets: std::mem::take(&mut self.verdict.adaptive),
        }
    }
}

impl<S: Store, C: Clock> Drop for Admission<S, C> {
    fn drop(&mut self) {
        if !self.finish.is_done() {
            let held = self.held();
            let said = vec![None; held.reservations.len()];
            self.finish
                .done(CLIENT_CLOSED, Ended::ClientGone, held, said);
        }
    }
}
