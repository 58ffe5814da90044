//! What a limit decides in each node's memory rather than in the store: an adaptive
//! concurrency limit (`algorithm adaptive_concurrency` with its `adaptive` block) and
//! admission control (`admission { … }`). The state machines are
//! [`crate::limiter::adaptive`]; the engine keeps one per limit and key.

use std::time::Duration;

use crate::limiter::adaptive::{AdmissionControl, ConcurrencyLimit, Method};

/// A limit's node-local parts. Compared on reload: a limit whose parts did not change keeps
/// what its controllers learnt.
#[derive(Debug, Clone, PartialEq)]
pub struct Adaptive {
    /// The adaptive concurrency limit, for `algorithm adaptive_concurrency`.
    pub concurrency: Option<AdaptiveConcurrency>,
    /// Admission control, when the limit has an `admission` block.
    pub admission: Option<Admission>,
    /// How long a slot taken through `/v1/check` or forward-auth waits for the request's
    /// `/v1/report` before it is given back (the limit's `lease`).
    pub lease: Duration,
}

/// `adaptive <method> { initial …; min …; max …; … }`
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConcurrency {
    /// How the limit moves.
    pub method: Method,
    /// Where it starts.
    pub initial: u32,
    /// The lowest it goes.
    pub min: u32,
    /// The highest it goes.
    pub max: u32,
}

impl AdaptiveConcurrency {
    /// A controller in its initial state.
    pub fn controller(&self) -> ConcurrencyLimit {
        ConcurrencyLimit::new(self.method, self.initial, self.min, self.max)
    }
}

/// `admission { success when status in […]; threshold …; aggression …; max …; window …; }`
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// The statuses that count as a success, as inclusive ranges.
    pub success: Box<[(u16, u16)]>,
    /// The success ratio under which requests start being refused (0–1).
    pub threshold: f64,
    /// How steeply refusals grow as the ratio falls (≥ 1).
    pub aggression: f64,
    /// The highest share of requests refused (0–1).
    pub max_probability: f64,
    /// The window outcomes are counted over.
    pub window: Duration,
    /// Fewer outcomes than this in the window refuse nothing.
    pub min_requests: u64,
}

impl Admission {
    /// Whether an answer with `status` counts as a success.
    pub fn is_success(&self, status: u16) -> bool {
        self.success
            .iter()
            .any(|&(low, high)| (low..=high).contains(&status))
    }

    /// A controller with nothing counted yet.
    pub fn controller(&self) -> AdmissionControl {
        AdmissionControl::new(
            self.window,
            self.threshold,
            self.aggression,
            self.max_probability,
            self.min_requests,
        )
    }
}
