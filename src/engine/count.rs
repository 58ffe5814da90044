//! Counting a request's selected limits in the store, all or nothing, and the fail modes
//! when the store fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use smallvec::SmallVec;

use super::{Deciding, Engine};
use crate::clock::Clock;
use crate::limiter::{Decision, LeaseId, Quota};
use crate::plan::select::{Charge, Selected};
use crate::plan::{Limit, Mode, OnPartition, StoreErrorMode};
use crate::store::{BatchResult, Op, Store, StoreError};
use crate::verdict::{Counted, Lease, LimitReport, Outcome, Reservation, StoreCall, StoreFailure};

/// One limit's operation, before it borrows its key from the reports.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    slot: usize,
    quota: Quota,
    cost: u64,
    enforce: bool,
    ban: Option<Duration>,
    sync: Option<Duration>,
    global: Option<OnPartition>,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Takes in the store's answer to a decision's operations (all or nothing, taken
    /// with `lease`); when the store failed, each limit's `on_store_error` decides.
    pub(super) fn counted(
        &self,
        d: &mut Deciding<'_>,
        lease: LeaseId,
        result: Result<BatchResult, StoreError>,
    ) {
        let now = d.now;
        // From the decision's start: the selection before the call is a few hundred
        // nanoseconds, the call itself (Redis) far longer; one reading of the clock serves
        // the call and the decision.
        let answered = self.clock.now();
        d.counted_at = Some(answered);
        let took = answered.saturating_since(now);
        let error = match result {
            Ok(result) => {
                record(
                    &mut d.reports,
                    &d.pending,
                    &result,
                    Counted::Store,
                    lease,
                    &mut d.leases,
                );
                d.store_call = Some(StoreCall { took, error: None });
                return;
            }
            Err(error) => error,
        };
        let mut local: SmallVec<[Pending; 4]> = SmallVec::new();
        for p in &d.pending {
            let limit = d.applied[p.slot];
            match limit.on_store_error {
                StoreErrorMode::Allow => d.reports[p.slot].counted = Counted::Skipped,
                StoreErrorMode::Deny => {
                    if p.enforce {
                        d.unavailable.get_or_insert_with(|| Arc::clone(&limit.name));
                    }
                    d.reports[p.slot].counted = Counted::Skipped;
                }
                StoreErrorMode::Local => local.push(Pending {
                    quota: p.quota.share(self.local_nodes),
                    ..*p
                }),
            }
        }
        if d.unavailable.is_none() && !local.is_empty() {
            let result = self.local.apply_now(&ops(&local, &d.reports, lease), now);
            record(
                &mut d.reports,
                &local,
                &result,
                Counted::Local,
                lease,
                &mut d.leases,
            );
        }
        d.store_call = Some(StoreCall {
            took,
            error: Some(Box::new(StoreFailure {
                circuit_open: matches!(error, StoreError::CircuitOpen),
                message: error.to_string(),
            })),
        });
    }

    /// What an admitted request reserved on limits whose cost its response says: each
    /// such limit whose operation was counted (in the store, or here when it failed).
    pub(super) fn reservations(
        &self,
        d: &Deciding<'_>,
        reports: &[LimitReport],
    ) -> Vec<Reservation> {
        let mut reservations = Vec::new();
        for p in &d.pending {
            let (limit, report) = (d.applied[p.slot], &reports[p.slot]);
            if limit.usage.is_none() || !report.decision.allowed {
                continue;
            }
            let local = match report.counted {
                Counted::Store => false,
                Counted::Local => true,
                _ => continue,
            };
            // Counted here, it was counted at the node's share of the quota.
            let quota = if local {
                p.quota.share(self.local_nodes)
            } else {
                p.quota
            };
            reservations.extend(Reservation::of(
                limit,
                &report.key,
                quota,
                p.cost,
                d.now,
                local,
            ));
        }
        reservations
    }

    /// A lease id only for requests that take a lease: the shared counter is a cache line
    /// every core would otherwise fight over on every request.
    pub(super) fn lease_id(&self, pending: &[Pending]) -> LeaseId {
        if pending
            .iter()
            .any(|p| matches!(p.quota, Quota::Concurrency(_)))
        {
            let count = self.lease_counter.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF;
            LeaseId(self.lease_base | count)
        } else {
            LeaseId(0)
        }
    }
}

/// One selected limit as a report (the store fills in its decision), an operation to count
/// and the limit, in the same order; returns whether it refuses without counting.
#[inline]
pub(super) fn charge<'p>(
    selected: Selected<'p>,
    reports: &mut Vec<LimitReport>,
    pending: &mut SmallVec<[Pending; 4]>,
    applied: &mut SmallVec<[&'p Limit; 4]>,
) -> bool {
    let Selected {
        limit,
        tier,
        key,
        charge,
        authorization,
        headers,
        ..
    } = selected;
    if let Some(answer) = authorization.filter(|a| !a.allowed) {
        // Only a limit in shadow mode gets here with a denial: reported, not enforced.
        tracing::info!(
            limit = %limit.name,
            policies = ?answer.policies,
            "shadow: Cedar denies this request's authorization"
        );
    }
    let (algorithm, policy, counted, allowed, cost) = match charge {
        Charge::Count { quota, cost } => {
            pending.push(Pending {
                slot: reports.len(),
                quota,
                cost,
                enforce: limit.mode == Mode::Enforce,
                ban: limit.on_exceed.ban,
                sync: limit.sync,
                global: limit.global,
            });
            (
                quota.algorithm(),
                quota.policy(),
                Counted::Store,
                true,
                cost,
            )
        }
        Charge::Node => {
            let adaptive = limit.adaptive.as_ref();
            let algorithm = if adaptive.is_some_and(|a| a.concurrency.is_some()) {
                "adaptive_concurrency"
            } else {
                "admission_control"
            };
            (algorithm, (0, 0), Counted::Node, true, 1)
        }
        Charge::Blocked => ("blocked", (0, 0), Counted::Blocked, false, 0),
        Charge::Refused => ("refused", (0, 0), Counted::Refused, false, 0),
    };
    let decision = Decision {
        allowed,
        limit: policy.0,
        remaining: policy.0,
        reset: Duration::ZERO,
        retry_after: None,
    };
    reports.push(LimitReport {
        limit: Arc::clone(&limit.name),
        mode: limit.mode,
        algorithm,
        key,
        tier,
        policy,
        headers,
        // Set once the store has answered (`Engine::end`).
        outcome: Outcome::Allow,
        decision,
        banned: false,
        counted,
        cost,
    });
    applied.push(limit);
    !allowed && limit.mode == Mode::Enforce
}

/// The store operations for `pending`, keyed by their reports' keys.
pub(super) fn ops<'a>(
    pending: &[Pending],
    reports: &'a [LimitReport],
    lease: LeaseId,
) -> SmallVec<[Op<'a>; 4]> {
    pending
        .iter()
        .map(|p| Op {
            key: &reports[p.slot].key,
            quota: p.quota,
            cost: p.cost,
            enforce: p.enforce,
            ban: p.ban,
            lease,
            sync: p.sync,
            global: p.global,
        })
        .collect()
}

/// Copies a store's results into the reports and collects the leases taken.
fn record(
    reports: &mut [LimitReport],
    pending: &[Pending],
    result: &BatchResult,
    counted: Counted,
    lease: LeaseId,
    leases: &mut Vec<Lease>,
) {
    for (p, r) in pending.iter().zip(&result.results) {
        let report = &mut reports[p.slot];
        report.decision = r.decision;
        report.banned = r.banned;
        report.counted = counted;
        if result.admitted && r.decision.allowed && matches!(p.quota, Quota::Concurrency(_)) {
            leases.push(Lease::new(
                report.key.to_string(),
                lease,
                counted == Counted::Local,
            ));
        }
    }
}
