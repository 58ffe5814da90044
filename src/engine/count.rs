//! Counting a request's selected limits in the store, all or nothing, and the fail modes
//! when the store fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use smallvec::SmallVec;

use super::Engine;
use crate::clock::{Clock, Timestamp};
use crate::limiter::{Decision, LeaseId, Quota};
use crate::plan::select::{Charge, Selected};
use crate::plan::{Limit, Mode, StoreErrorMode};
use crate::store::{BatchResult, Op, Store, StoreError};
use crate::verdict::{Counted, Lease, LimitReport, Outcome, StoreCall, StoreFailure};

/// One limit's operation, before it borrows its key from the reports.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    slot: usize,
    quota: Quota,
    cost: u64,
    enforce: bool,
    ban: Option<Duration>,
    sync: Option<Duration>,
}

/// What counting gave: the leases taken, the limit that fails closed (the store failed),
/// and the call itself.
pub(super) struct Counting {
    pub(super) leases: Vec<Lease>,
    pub(super) unavailable: Option<Arc<str>>,
    pub(super) call: StoreCall,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Counts the pending operations in the store, all or nothing; when the store fails,
    /// each limit's `on_store_error` decides.
    pub(super) async fn count(
        &self,
        reports: &mut [LimitReport],
        pending: &[Pending],
        applied: &[&Limit],
        now: Timestamp,
    ) -> Counting {
        let lease = self.lease_id(pending);
        let mut leases = Vec::new();
        let batch = ops(pending, reports, lease);
        let result = self.store.apply(&batch, now).await;
        drop(batch);
        let took = self.clock.now().saturating_since(now);
        let error = match result {
            Ok(result) => {
                record(
                    reports,
                    pending,
                    &result,
                    Counted::Store,
                    lease,
                    &mut leases,
                );
                return Counting {
                    leases,
                    unavailable: None,
                    call: StoreCall { took, error: None },
                };
            }
            Err(error) => error,
        };
        let mut unavailable = None;
        let mut local: SmallVec<[Pending; 4]> = SmallVec::new();
        for p in pending {
            match applied[p.slot].on_store_error {
                StoreErrorMode::Allow => reports[p.slot].counted = Counted::Skipped,
                StoreErrorMode::Deny => {
                    if p.enforce {
                        unavailable.get_or_insert_with(|| Arc::clone(&applied[p.slot].name));
                    }
                    reports[p.slot].counted = Counted::Skipped;
                }
                StoreErrorMode::Local => local.push(Pending {
                    quota: p.quota.share(self.local_nodes),
                    ..*p
                }),
            }
        }
        if unavailable.is_none() && !local.is_empty() {
            let result = self.local.apply_now(&ops(&local, reports, lease), now);
            record(reports, &local, &result, Counted::Local, lease, &mut leases);
        }
        let failure = StoreFailure {
            circuit_open: matches!(error, StoreError::CircuitOpen),
            message: error.to_string(),
        };
        Counting {
            leases,
            unavailable,
            call: StoreCall {
                took,
                error: Some(failure),
            },
        }
    }

    /// A lease id only for requests that take a lease: the shared counter is a cache line
    /// every core would otherwise fight over on every request.
    fn lease_id(&self, pending: &[Pending]) -> LeaseId {
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
            });
            (
                quota.algorithm(),
                quota.policy(),
                Counted::Store,
                true,
                cost,
            )
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
        outcome: Outcome::of(counted, limit.mode, &decision, &[]),
        decision,
        banned: false,
        counted,
        cost,
    });
    applied.push(limit);
    !allowed && limit.mode == Mode::Enforce
}

/// The store operations for `pending`, keyed by their reports' keys.
fn ops<'a>(
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
