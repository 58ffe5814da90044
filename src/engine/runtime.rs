//! The runtime lists in decisions: safelist and denylist entries by address or client, flags
//! and tarpits (set by hand through the admin API, or by anomalies), read back from the
//! store by every node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use smallvec::SmallVec;

use super::Engine;
use crate::clock::{Clock, Timestamp};
use crate::plan::Plan;
use crate::plan::key::KeySource;
use crate::request::{KeyHasher, RequestCtx};
use crate::store::runtime::{RuntimeEntry, RuntimeList, RuntimeLists, Target};
use crate::store::{RuntimeStore, Store, StoreError};
use crate::verdict::{Action, LimitReport, RUNTIME_DENYLIST, RUNTIME_SAFELIST};

impl<S: Store + RuntimeStore, C: Clock> Engine<S, C> {
    /// Reads the runtime list entries back from the store (every node does this every
    /// second; a node that changes them does it at once). Returns how many are live.
    pub async fn refresh_runtime_lists(&self) -> Result<usize, StoreError> {
        let entries = self.store.runtime_entries(self.clock.now()).await?;
        let live = entries.len();
        self.runtime.store(Arc::new(RuntimeLists::new(entries)));
        self.runtime_len.store(live as u64, Ordering::Relaxed);
        Ok(live)
    }

    /// Adds (or replaces) a runtime list entry, for every node sharing the store.
    pub async fn put_runtime_entry(&self, entry: &RuntimeEntry) -> Result<(), StoreError> {
        self.store.put_runtime_entry(entry).await?;
        self.refresh_runtime_lists().await.map(drop)
    }

    /// Removes a runtime list entry; whether there was one.
    pub async fn remove_runtime_entry(
        &self,
        list: RuntimeList,
        target: &Target,
    ) -> Result<bool, StoreError> {
        let removed = self.store.remove_runtime_entry(list, target).await?;
        self.refresh_runtime_lists().await?;
        Ok(removed)
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// The runtime list entries this node applies.
    pub fn runtime_lists(&self) -> Arc<RuntimeLists> {
        self.runtime.load_full()
    }

    /// Whether any runtime entry is in force: requests skip the lists without loading them
    /// when none is.
    fn has_runtime_entries(&self) -> bool {
        self.runtime_len.load(Ordering::Relaxed) != 0
    }

    /// What the runtime lists say of the request's address or identity (user, token), if
    /// anything: a denylisted one is refused (403), whatever a safelist says; a safelisted
    /// one passes uncounted, unless a limit's `authorize` that applies to it is denied.
    pub(super) fn runtime_action(
        &self,
        plan: &Plan,
        request: &RequestCtx,
        now: Timestamp,
    ) -> Option<Action> {
        if !self.has_runtime_entries() {
            return None;
        }
        let lists = self.runtime.load();
        let identity = if lists.has_clients() {
            identity_clients(request, &self.hasher)
        } else {
            SmallVec::new()
        };
        let find = |list| {
            let by_ip = request.client_ip.and_then(|ip| lists.find(list, ip, now));
            by_ip.or_else(|| {
                identity
                    .iter()
                    .find_map(|client| lists.find_client(list, client, now))
            })
        };
        if let Some(entry) = find(RuntimeList::Denylist) {
            return Some(runtime_forbid(entry, now));
        }
        find(RuntimeList::Safelist)?;
        Some(
            match crate::plan::select::authorization_only_for(plan, request, &self.hasher, now) {
                Some(denied) => Action::Unauthorized {
                    limit: Arc::clone(&denied.limit.name),
                    action: denied.action,
                    policies: denied.answer.policies.clone(),
                },
                None => Action::Bypass {
                    list: Arc::from(RUNTIME_SAFELIST),
                },
            },
        )
    }

    /// What the runtime flags and tarpits say of a request decided `action`: its flags, and
    /// an admitted request held as long as the longest tarpit that holds for it.
    pub(super) fn runtime_marks(
        &self,
        request: &RequestCtx,
        reports: &[LimitReport],
        action: Action,
        now: Timestamp,
    ) -> (Action, Vec<Arc<str>>) {
        if !self.has_runtime_entries() {
            return (action, Vec::new());
        }
        let lists = self.runtime.load();
        if !lists.has_marks() {
            return (action, Vec::new());
        }
        let identity = identity_clients(request, &self.hasher);
        let keys = reports.iter().map(|r| r.key.client());
        let clients = identity.iter().map(String::as_str).chain(keys);
        let (flags, hold) = lists.marks(request.client_ip, clients, now);
        let action = match (action, hold) {
            (Action::Allow | Action::Warn, Some(hold)) => Action::Delay(hold),
            (Action::Delay(d), Some(hold)) => Action::Delay(d.max(hold)),
            (action, _) => action,
        };
        (action, flags)
    }

    /// What the runtime lists' client entries say of the keys of the limits selected for a
    /// request (authorized already): a denylisted client is refused, a safelisted one
    /// passes uncounted.
    pub(super) fn runtime_key_action(
        &self,
        reports: &[LimitReport],
        now: Timestamp,
    ) -> Option<Action> {
        if !self.has_runtime_entries() {
            return None;
        }
        let lists = self.runtime.load();
        if !lists.has_clients() {
            return None;
        }
        let find = |list| {
            reports
                .iter()
                .find_map(|r| lists.find_client(list, r.key.client(), now))
        };
        if let Some(entry) = find(RuntimeList::Denylist) {
            return Some(runtime_forbid(entry, now));
        }
        find(RuntimeList::Safelist).map(|_| Action::Bypass {
            list: Arc::from(RUNTIME_SAFELIST),
        })
    }
}

/// The refusal a runtime denylist entry gives.
fn runtime_forbid(entry: &RuntimeEntry, now: Timestamp) -> Action {
    Action::Forbid {
        status: StatusCode::FORBIDDEN,
        list: Arc::from(RUNTIME_DENYLIST),
        reason: entry.reason.as_deref().map(Arc::from),
        retry_after: entry
            .until
            .map(|until| Duration::from_micros(until.saturating_sub(now.as_micros()))),
    }
}

/// The request's own identity as counter keys name it (`user:…`, `token:<hash>`), for the
/// runtime lists' client entries.
fn identity_clients(request: &RequestCtx, hasher: &KeyHasher) -> SmallVec<[String; 2]> {
    [KeySource::UserId, KeySource::ApiToken]
        .iter()
        .filter_map(|source| {
            let mut out = String::new();
            source.write(request, None, hasher, &mut out).then_some(out)
        })
        .collect()
}
