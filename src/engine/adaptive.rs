//! Limits decided in this node's memory before anything is counted in the store: adaptive
//! concurrency and admission control (`crate::store::adaptive`), and what the end of a
//! request reported from outside (`/v1/report`) teaches them.

use std::time::Duration;

use super::{Deciding, Engine};
use crate::clock::{Clock, Timestamp};
use crate::limiter::Decision;
use crate::plan::Mode;
use crate::plan::select::{Scope, select};
use crate::request::RequestCtx;
use crate::store::Store;
use crate::store::adaptive::{Answer, Reading};
use crate::verdict::Counted;

impl<S: Store, C: Clock> Engine<S, C> {
    /// Decides the selected limits that have node-local parts: each takes a ticket (a slot
    /// in flight, an outcome to learn from) or refuses. An enforced refusal stops the
    /// decision before the store is asked.
    pub(super) fn decide_adaptive(&self, d: &mut Deciding<'_>) {
        for (slot, limit) in d.applied.iter().enumerate() {
            let Some(spec) = &limit.adaptive else {
                continue;
            };
            let report = &mut d.reports[slot];
            if matches!(report.counted, Counted::Blocked | Counted::Refused) {
                continue;
            }
            let enforce = limit.mode == Mode::Enforce;
            let controller = self.adaptive.get(report.key.as_str(), spec, d.now);
            let (reading, refusal) = match controller.admit(d.now, enforce, rand::random()) {
                Answer::Admitted(ticket, reading, refusal) => {
                    d.tickets.push(ticket);
                    (reading, refusal)
                }
                Answer::Refused(reading, refusal) => {
                    d.blocked = true;
                    (reading, Some(refusal))
                }
            };
            if report.counted == Counted::Node {
                report.decision = node_decision(reading, refusal.is_none());
                report.policy = (report.decision.limit, 0);
            } else if refusal.is_some() {
                // Counted in the store too: the store's answer is overruled once it is in.
                d.overruled.push(slot);
            }
        }
    }

    /// A request `/v1/check` or forward-auth admitted ended with `status`, `latency` after
    /// it was decided (when the report says), as its `/v1/report` says: each adaptive limit it was decided by gives back its oldest
    /// slot awaiting a report and learns from the outcome.
    pub fn report_adaptive(&self, request: &RequestCtx, status: u16, latency: Option<Duration>) {
        let plan = self.plan.load();
        let now = self.clock.now();
        let decided_at = now.saturating_sub(latency.unwrap_or_default());
        select(
            &plan,
            request,
            &self.hasher,
            decided_at,
            Scope::only(None),
            |s| {
                if s.limit.adaptive.is_some()
                    && let Some(controller) = self.adaptive.find(s.key.as_str())
                {
                    controller.reported(now, status, latency);
                }
            },
        );
    }

    /// The request's adaptive limits admitted it here, and its end will be reported from
    /// outside (`/v1/report`): each slot stays taken until then, or until the limit's lease.
    pub fn await_report(&self, verdict: &mut crate::verdict::Verdict) {
        let now = self.clock.now();
        for ticket in verdict.adaptive.drain(..) {
            ticket.await_report(now);
        }
    }

    /// Drops the controllers `plan` has no use for: of limits it no longer has, or whose
    /// adaptive parts it changed (they would start again anyway).
    pub(super) fn prune_adaptive(&self, plan: &crate::plan::Plan) {
        self.adaptive.retain(|key, spec| {
            crate::plan::key::CounterKey::parse(key)
                .and_then(|parts| plan.limit(parts.limit))
                .and_then(|limit| limit.adaptive.as_deref())
                .is_some_and(|kept| kept == spec)
        });
    }

    /// Where the adaptive limit counting on `key` stands on this node, if it has been used.
    pub fn adaptive_reading(&self, key: &str) -> Option<Reading> {
        let controller = self.adaptive.find(key)?;
        Some(controller.reading(self.clock.now()))
    }

    /// Each adaptive limit of this node, its keys summed up, as it is now.
    pub fn adaptive_summary(&self) -> Vec<crate::store::adaptive::Summary> {
        self.adaptive.summary(self.clock.now())
    }

    /// Each adaptive controller of this node, by counter key, as it is at `now`.
    pub fn adaptive_readings(&self, now: Timestamp) -> Vec<(Box<str>, Reading)> {
        self.adaptive.snapshot(now)
    }
}

/// What a node-decided limit reports: its current limit (the concurrency limit; 0 for
/// admission control alone) and what is left of it.
fn node_decision(reading: Reading, allowed: bool) -> Decision {
    let limit = reading.limit.map_or(0, u64::from);
    Decision {
        allowed,
        limit,
        remaining: limit.saturating_sub(u64::from(reading.in_flight)),
        reset: Duration::ZERO,
        retry_after: None,
    }
}

/// The refusals of the admission control of a limit also counted in the store.
pub(super) fn overrule(reports: &mut [crate::verdict::LimitReport], overruled: &[usize]) {
    for &slot in overruled {
        reports[slot].decision.allowed = false;
    }
}
