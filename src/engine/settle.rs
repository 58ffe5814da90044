//! Settling reservations: what an ended request used against what it reserved, on the
//! counters its admission counted — from the pipeline's completion, or from a request
//! described again after the fact (`POST /v1/report`).

use smallvec::SmallVec;

use super::Engine;
use crate::clock::{Clock, Timestamp};
use crate::plan::select::{Charge, Scope, select};
use crate::request::RequestCtx;
use crate::store::{Settlement, Store, StoreError};
use crate::verdict::Reservation;

impl<S: Store, C: Clock> Engine<S, C> {
    /// Settles an ended request's reservations, given what its response said each used
    /// (`said[i]` for `reservations[i]`; `None`: nothing). A store that fails loses the
    /// settlement: the reservation stays counted (logged).
    pub async fn settle(&self, reservations: &[Reservation], said: &[Option<u64>]) {
        let now = self.clock.now();
        let mut shared: SmallVec<[Settlement<'_>; 2]> = SmallVec::new();
        let mut local: SmallVec<[Settlement<'_>; 2]> = SmallVec::new();
        for (r, said) in reservations.iter().zip(said) {
            let used = r.used(*said);
            let delta = i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(r.reserved).unwrap_or(i64::MAX);
            if delta == 0 {
                continue;
            }
            let settlement = Settlement {
                key: &r.key,
                quota: r.quota,
                delta,
                counted_at: r.counted_at,
            };
            if r.local {
                local.push(settlement);
            } else {
                shared.push(settlement);
            }
        }
        if !local.is_empty() {
            self.local.settle_now(&local, now);
        }
        if shared.is_empty() {
            return;
        }
        match self.store.settle(&shared, now).await {
            Ok(()) => {}
            Err(StoreError::CircuitOpen) => {}
            Err(error) => {
                tracing::warn!(%error, "could not settle a request's usage; its reservation stays counted");
            }
        }
    }

    /// What `request`, decided at `counted_at`, reserved on limits whose cost its
    /// response says — selected again (not counted): for a completion reported after the
    /// fact, when the admission's own reservations are not at hand.
    pub fn reservations_of(&self, request: &RequestCtx, counted_at: Timestamp) -> Vec<Reservation> {
        let plan = self.plan_guard();
        let mut reservations = Vec::new();
        select(
            &plan,
            request,
            &self.hasher,
            counted_at,
            Scope::REQUESTS,
            |s| {
                if let Charge::Count { quota, cost } = s.charge {
                    reservations.extend(Reservation::of(
                        s.limit, &s.key, quota, cost, counted_at, false,
                    ));
                }
            },
        );
        reservations
    }
}
