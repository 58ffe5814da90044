//! What adaptive limits keep in this node's memory: one [`Controller`] per limit and key — its
//! concurrency limit, its admission control and the requests it has in flight — and the
//! [`Ticket`] each admitted request holds until it ends.
//!
//! Per node by design (as Envoy's adaptive concurrency is): a concurrency limit protects an
//! upstream from what this node sends it, and learns from the latencies this node sees.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::sharded::Sharded;
use crate::clock::Timestamp;
use crate::limiter::adaptive::{AdmissionControl, ConcurrencyLimit, Sample};
use crate::plan::adaptive::Adaptive;

/// The most controllers a node keeps (limits × keys); past it, idle ones make room.
pub const MAX_CONTROLLERS: usize = 10_000;

/// Every controller of this node, by counter key.
#[derive(Debug)]
pub struct Controllers {
    map: Sharded<Arc<Controller>>,
}

impl Default for Controllers {
    fn default() -> Self {
        Controllers {
            map: Sharded::new(16, MAX_CONTROLLERS),
        }
    }
}

impl Controllers {
    /// The controller of `key`, made for `spec` when there is none or the plan changed it.
    pub fn get(&self, key: &str, spec: &Arc<Adaptive>, now: Timestamp) -> Arc<Controller> {
        let mut shard = self.map.lock_key(key);
        if let Some(c) = shard.get(key)
            && (Arc::ptr_eq(&c.spec, spec) || *c.spec == **spec)
        {
            return Arc::clone(c);
        }
        // A new key, or its limit changed: start again from the plan's bounds.
        let controller = Arc::new(Controller::new(Arc::clone(spec), now));
        let idle_since = |c: &Arc<Controller>| c.idle_since();
        if shard.contains_key(key) {
            self.map.remove_in(&mut shard, key);
        }
        self.map.make_room(&mut shard, idle_since, 0);
        shard.insert(key.into(), Arc::clone(&controller));
        self.map.added(1);
        controller
    }

    /// The controller of `key`, if this node has one.
    pub fn find(&self, key: &str) -> Option<Arc<Controller>> {
        self.map.lock_key(key).get(key).cloned()
    }

    /// Each controller with its key, as it is now.
    pub fn snapshot(&self, now: Timestamp) -> Vec<(Box<str>, Reading)> {
        let mut all = Vec::new();
        for i in 0..self.map.shard_count() {
            let shard = self.map.lock(i);
            all.extend(shard.iter().map(|(k, c)| (k.clone(), c.reading(now))));
        }
        all
    }

    /// Each limit's controllers summed up, by namespace and limit.
    pub fn summary(&self, now: Timestamp) -> Vec<Summary> {
        let mut by_limit: std::collections::BTreeMap<(String, String), Summary> =
            std::collections::BTreeMap::new();
        for (key, reading) in self.snapshot(now) {
            let Some(parts) = crate::plan::key::CounterKey::parse(&key) else {
                continue;
            };
            let entry = by_limit
                .entry((parts.namespace.to_owned(), parts.limit.to_owned()))
                .or_insert_with(|| Summary {
                    namespace: parts.namespace.to_owned(),
                    limit: parts.limit.to_owned(),
                    keys: 0,
                    lowest: None,
                    highest: None,
                    in_flight: 0,
                    reject_probability: 0.0,
                });
            entry.keys += 1;
            entry.in_flight += u64::from(reading.in_flight);
            if let Some(limit) = reading.limit {
                entry.lowest = Some(entry.lowest.map_or(limit, |l: u32| l.min(limit)));
                entry.highest = Some(entry.highest.map_or(limit, |h: u32| h.max(limit)));
            }
            entry.reject_probability = entry.reject_probability.max(reading.reject_probability);
        }
        by_limit.into_values().collect()
    }

    /// Drops the controllers of keys the plan no longer has (`keep` says which it has).
    pub fn retain(&self, mut keep: impl FnMut(&str, &Adaptive) -> bool) {
        self.map.retain(|key, c| keep(key, &c.spec));
    }
}

/// One limit's state for one key.
#[derive(Debug)]
pub struct Controller {
    spec: Arc<Adaptive>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    concurrency: Option<ConcurrencyLimit>,
    admission: Option<AdmissionControl>,
    in_flight: u32,
    /// When slots held for a `/v1/report` (the decision API, forward-auth) are given back
    /// if none comes, oldest first.
    awaiting: VecDeque<Timestamp>,
    /// When it last had nothing in flight (µs), for eviction; `u64::MAX` while busy.
    idle_since: u64,
}

/// A controller as it is now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// The concurrency limit, when the limit has one.
    pub limit: Option<u32>,
    /// Requests in flight.
    pub in_flight: u32,
    /// The probability admission control refuses a request now (0 without it).
    pub reject_probability: f64,
}

impl std::fmt::Display for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(limit) = self.limit {
            write!(f, "limit {limit}, ")?;
        }
        write!(f, "{} in flight", self.in_flight)?;
        if self.reject_probability > 0.0 {
            write!(
                f,
                ", admission control refusing {:.1}%",
                self.reject_probability * 100.0
            )?;
        }
        Ok(())
    }
}

/// One adaptive limit on this node, all its keys together.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// The limit's namespace.
    pub namespace: String,
    /// The limit.
    pub limit: String,
    /// Keys it has a controller for.
    pub keys: usize,
    /// The lowest concurrency limit among its keys (none: admission control only).
    pub lowest: Option<u32>,
    /// The highest.
    pub highest: Option<u32>,
    /// Requests in flight, all keys.
    pub in_flight: u64,
    /// Admission control's highest refusal probability among its keys.
    pub reject_probability: f64,
}

/// What a controller answers a request.
#[derive(Debug)]
pub enum Answer {
    /// It goes on holding the ticket (also in shadow mode when `refused` is set).
    Admitted(Arc<Ticket>, Reading, Option<Refusal>),
    /// It is refused; nothing is held.
    Refused(Reading, Refusal),
}

/// Why a controller refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// As many requests as the limit allows are in flight.
    Concurrency,
    /// Admission control drew a refusal.
    Admission,
}

impl Controller {
    fn new(spec: Arc<Adaptive>, now: Timestamp) -> Self {
        let state = State {
            concurrency: spec.concurrency.as_ref().map(|c| c.controller()),
            admission: spec.admission.as_ref().map(|a| a.controller()),
            in_flight: 0,
            awaiting: VecDeque::new(),
            idle_since: now.as_micros(),
        };
        Controller {
            spec,
            state: Mutex::new(state),
        }
    }

    fn idle_since(&self) -> u64 {
        self.state.lock().idle_since
    }

    /// What the controller says now.
    pub fn reading(&self, now: Timestamp) -> Reading {
        let mut state = self.state.lock();
        state.expire(now);
        state.reading(now)
    }

    /// Decides a request at `now`; `enforce` false (shadow mode) admits what it would
    /// refuse, saying so. `draw` is a number in `[0, 1)` admission control compares with its
    /// probability.
    pub fn admit(self: &Arc<Self>, now: Timestamp, enforce: bool, draw: f64) -> Answer {
        let mut state = self.state.lock();
        state.expire(now);
        let reading = state.reading(now);
        let refusal = if reading.limit.is_some_and(|l| state.in_flight >= l) {
            Some(Refusal::Concurrency)
        } else if draw < reading.reject_probability {
            Some(Refusal::Admission)
        } else {
            None
        };
        if let (Some(refusal), true) = (refusal, enforce) {
            return Answer::Refused(reading, refusal);
        }
        state.in_flight += 1;
        state.idle_since = u64::MAX;
        let ticket = Arc::new(Ticket {
            controller: Arc::clone(self),
            in_flight: state.in_flight,
            done: AtomicBool::new(false),
        });
        let reading = Reading {
            in_flight: state.in_flight,
            ..reading
        };
        Answer::Admitted(ticket, reading, refusal)
    }

    /// A request reported from outside (`/v1/report`) ended at `now` with `status` after
    /// `latency` (when the report says): the oldest slot held for a report is given back,
    /// and the controllers learn (the concurrency limit only from a latency).
    pub fn reported(&self, now: Timestamp, status: u16, latency: Option<Duration>) {
        let mut state = self.state.lock();
        state.expire(now);
        let in_flight = state.in_flight;
        if state.awaiting.pop_front().is_some() {
            state.release(now);
        }
        self.learn(&mut state, now, status, latency, in_flight);
    }

    fn learn(
        &self,
        state: &mut State,
        now: Timestamp,
        status: u16,
        latency: Option<Duration>,
        in_flight: u32,
    ) {
        if let (Some(limit), Some(latency)) = (state.concurrency.as_mut(), latency) {
            limit.record(Sample {
                at: now,
                latency,
                in_flight,
                dropped: overloaded(status),
            });
        }
        if let (Some(control), Some(spec)) = (state.admission.as_mut(), &self.spec.admission) {
            control.record(now, spec.is_success(status));
        }
    }
}

impl State {
    fn reading(&mut self, now: Timestamp) -> Reading {
        Reading {
            limit: self.concurrency.as_ref().map(ConcurrencyLimit::limit),
            in_flight: self.in_flight,
            reject_probability: self
                .admission
                .as_mut()
                .map_or(0.0, |a| a.reject_probability(now)),
        }
    }

    fn release(&mut self, now: Timestamp) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.idle_since = now.as_micros();
        }
    }

    /// Gives back the slots whose report never came.
    fn expire(&mut self, now: Timestamp) {
        while self.awaiting.front().is_some_and(|&due| due <= now) {
            self.awaiting.pop_front();
            self.release(now);
        }
    }
}

/// Whether an answer says the upstream is overloaded: a 5xx, or its own 429.
fn overloaded(status: u16) -> bool {
    status >= 500 || status == 429
}

/// An admitted request's hold on a controller. Finished when the request ends; dropped
/// unfinished (the request was refused by another limit, or never went on), its slot is
/// given back and nothing is learnt.
#[derive(Debug)]
pub struct Ticket {
    controller: Arc<Controller>,
    /// Requests in flight when it was admitted, itself included.
    in_flight: u32,
    done: AtomicBool,
}

impl Ticket {
    /// The request ended at `now` with `status`, after `latency`; `answered` is false when
    /// the client went away first (then nothing is learnt).
    pub fn finish(&self, now: Timestamp, status: u16, latency: Duration, answered: bool) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let controller = &self.controller;
        let mut state = controller.state.lock();
        state.release(now);
        if answered {
            controller.learn(&mut state, now, status, Some(latency), self.in_flight);
        }
    }

    /// The request's end will be reported from outside (`/v1/report`): its slot stays taken
    /// until then, or until `lease` has passed.
    pub fn await_report(&self, now: Timestamp) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let lease = self.controller.spec.lease;
        self.controller
            .state
            .lock()
            .awaiting
            .push_back(now.saturating_add(lease));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            let mut state = self.controller.state.lock();
            let idle = state.idle_since;
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight == 0 {
                // No clock here: it is idle from when it last was, or from now on for
                // eviction's purposes.
                state.idle_since = if idle == u64::MAX { 0 } else { idle };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::adaptive::Method;
    use crate::plan::adaptive::AdaptiveConcurrency;

    fn spec(initial: u32, lease: Duration) -> Arc<Adaptive> {
        Arc::new(Adaptive {
            concurrency: Some(AdaptiveConcurrency {
                method: Method::Aimd {
                    backoff: 0.5,
                    timeout: Duration::from_secs(1),
                },
                initial,
                min: 1,
                max: 100,
            }),
            admission: None,
            lease,
        })
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_micros(1_000_000_000 + ms * 1_000)
    }

    fn admitted(answer: Answer) -> Arc<Ticket> {
        match answer {
            Answer::Admitted(ticket, _, None) => ticket,
            other => panic!("refused: {other:?}"),
        }
    }

    #[test]
    fn slots_are_held_until_the_end_and_given_back_by_a_finish_or_a_drop() {
        let controllers = Controllers::default();
        let c = controllers.get("ns:{global}:a", &spec(2, Duration::from_secs(60)), at(0));
        let first = admitted(c.admit(at(0), true, 0.5));
        let second = admitted(c.admit(at(1), true, 0.5));
        assert!(matches!(
            c.admit(at(2), true, 0.5),
            Answer::Refused(_, Refusal::Concurrency)
        ));
        // Shadow mode admits and counts what it would refuse.
        let shadow = match c.admit(at(2), false, 0.5) {
            Answer::Admitted(ticket, reading, Some(Refusal::Concurrency)) => {
                assert_eq!(reading.in_flight, 3);
                ticket
            }
            other => panic!("{other:?}"),
        };
        drop(shadow);
        // A failure halves the AIMD limit (2 → 1) and frees its slot.
        first.finish(at(10), 503, Duration::from_millis(10), true);
        assert_eq!(c.reading(at(10)).limit, Some(1));
        assert_eq!(c.reading(at(10)).in_flight, 1);
        // Finishing twice changes nothing; dropping a finished ticket neither.
        first.finish(at(11), 503, Duration::from_millis(10), true);
        drop(first);
        assert_eq!(c.reading(at(11)).in_flight, 1);
        // A client gone away frees the slot and teaches nothing.
        second.finish(at(12), 499, Duration::from_secs(5), false);
        assert_eq!(
            c.reading(at(12)),
            Reading {
                limit: Some(1),
                in_flight: 0,
                reject_probability: 0.0
            }
        );
    }

    #[test]
    fn slots_awaiting_a_report_are_given_back_by_it_oldest_first_or_by_the_lease() {
        let controllers = Controllers::default();
        let c = controllers.get("ns:{global}:a", &spec(3, Duration::from_secs(10)), at(0));
        for t in [0, 1_000, 2_000] {
            admitted(c.admit(at(t), true, 0.5)).await_report(at(t));
        }
        assert_eq!(c.reading(at(2_000)).in_flight, 3);
        assert!(matches!(c.admit(at(2_001), true, 0.5), Answer::Refused(..)));
        // A report gives one back and teaches the limit (AIMD: + 1 while busy).
        c.reported(at(3_000), 200, Some(Duration::from_millis(5)));
        assert_eq!(
            c.reading(at(3_000)),
            Reading {
                limit: Some(4),
                in_flight: 2,
                reject_probability: 0.0
            }
        );
        // The slot taken at 1 s lapses at 11 s; the one taken at 2 s at 12 s.
        assert_eq!(c.reading(at(10_999)).in_flight, 2);
        assert_eq!(c.reading(at(11_000)).in_flight, 1);
        assert_eq!(c.reading(at(12_000)).in_flight, 0);
        // A report with no slot left to give back still teaches.
        c.reported(at(12_500), 503, None);
        assert_eq!(c.reading(at(12_500)).in_flight, 0);
    }

    #[test]
    fn a_reload_keeps_a_controller_unless_its_limit_changed() {
        let controllers = Controllers::default();
        let a = spec(5, Duration::from_secs(60));
        let c = controllers.get("ns:{global}:a", &a, at(0));
        let held = admitted(c.admit(at(0), true, 0.5));
        held.finish(at(1), 503, Duration::from_millis(1), true);
        assert_eq!(c.reading(at(1)).limit, Some(2), "5 × 0.5 = 2.5");
        // The same block in a new plan: the same controller, what it learnt kept.
        let same = controllers.get("ns:{global}:a", &spec(5, Duration::from_secs(60)), at(2));
        assert!(Arc::ptr_eq(&c, &same));
        // A changed block: a new controller from the new bounds.
        let changed = controllers.get("ns:{global}:a", &spec(7, Duration::from_secs(60)), at(3));
        assert_eq!(changed.reading(at(3)).limit, Some(7));
        assert_eq!(controllers.summary(at(3)).len(), 1);
    }

    #[test]
    fn a_full_table_makes_room_by_dropping_idle_controllers() {
        let controllers = Controllers::default();
        let s = spec(5, Duration::from_secs(60));
        let busy = controllers.get("ns:{busy}:a", &s, at(0));
        let _held = admitted(busy.admit(at(0), true, 0.5));
        for i in 0..MAX_CONTROLLERS * 2 {
            controllers.get(&format!("ns:{{k{i}}}:a"), &s, at(1));
        }
        assert!(controllers.map.len() <= controllers.map.max_keys());
        assert!(
            controllers.find("ns:{busy}:a").is_some(),
            "a controller with requests in flight stays"
        );
    }
}
