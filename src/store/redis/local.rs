//! Local-first limits (`sync every`): decided in this process from the node's own count plus
//! the last global count it read, with the counts sent to Redis — and the totals read back —
//! once per interval for every key of the node, in one call (`sync.lua`; one per slot on a
//! Cluster).
//!
//! What a node does not see is what the other nodes admitted since they last sent their
//! counts and it last read them: at most about one interval of their admissions each, so a
//! window admits at most the quota plus `(nodes − 1) × rate per node × interval` (see
//! `docs/deployment.md`). When the counts cannot be sent (two syncs failed in a row), the
//! store answers with an error, so that each limit's `on_store_error` applies: a
//! local-first limit then counts its node's share of the quota (`local`) or refuses
//! (`deny`), never unlimited.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{Cmd, Script};
use smallvec::SmallVec;

use super::batcher::{Link, exact};
use super::{cluster::slot, eval};
use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota, SlidingState, State, WindowState, decide};
use crate::store::sharded::Sharded;
use crate::store::{OpResult, StoreError};

/// The scheduler's resolution: intervals are multiples of it.
pub(super) const TICK: Duration = Duration::from_millis(10);
/// Keys decided locally at most; past that, new keys are decided exactly (in Redis).
const MAX_KEYS: usize = 100_000;
/// Shards of the keys.
const SHARDS: usize = 16;
/// The most keys one sync call sends (a call of 256 keys keeps Redis about a quarter of a
/// millisecond).
const SYNC_CHUNK: usize = 256;
/// Consecutive failed syncs after which local-first requests get a store error.
const DEGRADED_AFTER: u32 = 2;

/// The local-first state of one store.
pub(super) struct LocalFirst {
    /// Keys by shard (a client's keys share one), so that a sync holds each lock briefly.
    entries: Sharded<Entry>,
    /// The intervals in use, in ticks.
    intervals: Mutex<BTreeSet<u64>>,
    sync: Script,
    /// Consecutive syncs that failed.
    failures: AtomicU32,
    /// Sync calls made, and those that failed.
    calls: AtomicU64,
    failed: AtomicU64,
    /// The latest time a request was decided at: the sync's clock for expiring entries.
    latest: AtomicU64,
    /// One sync at a time (the background task, or [`LocalFirst::sync_now`]).
    syncing: tokio::sync::Mutex<()>,
    task: OnceLock<()>,
}

/// One key's local view.
struct Entry {
    quota: Quota,
    /// The sync interval, in ticks.
    every: u64,
    /// Start of the window the counts below are for.
    start: u64,
    /// The global counts last read: the window before (sliding) and this one.
    previous: u64,
    current: u64,
    /// Admitted here and not yet sent (negative: given back after it was sent).
    pending: i64,
    /// Sent in the sync in flight, for the window `sending_start`.
    sending: i64,
    sending_start: u64,
    /// Counts of an earlier window not yet sent, with that window's start.
    stale: Option<(u64, i64)>,
    /// Used since its last sync.
    touched: bool,
    /// The latest time it was decided at.
    seen: u64,
    /// The limit bans (`on_exceed … ban`): its ban key is read and written with each sync.
    bans: bool,
    /// Refused until then (µs; 0: not banned), as this node last knew it.
    banned_until: u64,
    /// A ban this node started, to send with the next sync (µs; 0: none).
    ban_to_send: u64,
}

impl Entry {
    /// The window containing `now` and, for a sliding window, its length.
    fn window(quota: &Quota, now: Timestamp) -> (u64, u64, Option<u64>) {
        match quota {
            Quota::FixedWindow(q) => {
                let (start, end) = q.bounds(now);
                (start, end, None)
            }
            Quota::SlidingWindow(q) => {
                let (start, end) = q.bounds(now);
                (start, end, Some(q.window.get()))
            }
            Quota::Calendar { period, .. } => {
                let (start, end) = period.bounds(now);
                (start, end, None)
            }
            // The compiler allows local-first on counting windows only.
            _ => (0, u64::MAX, None),
        }
    }

    /// Moves the entry to the window starting at `start`, keeping unsent counts to send.
    fn roll(&mut self, start: u64, sliding: Option<u64>) {
        if self.start == start {
            return;
        }
        let known = self.known();
        self.previous = match sliding {
            Some(w) if self.start + w == start => known,
            _ => 0,
        };
        if self.pending != 0 {
            self.stale = Some((self.start, self.pending));
        }
        self.current = 0;
        self.pending = 0;
        self.start = start;
    }

    /// This window's count as this node knows it: the global count read, plus what it
    /// admitted since.
    fn known(&self) -> u64 {
        let sending = if self.sending_start == self.start {
            self.sending
        } else {
            0
        };
        let ours = self.pending + sending;
        u64::try_from(
            i64::try_from(self.current)
                .unwrap_or(i64::MAX)
                .saturating_add(ours),
        )
        .unwrap_or(0)
    }

    /// Takes back what a failed sync sent, to send it with the next one.
    fn restore(&mut self, item: &Item) {
        let start = item.numbers[1];
        if !item.main {
            let (stale_start, n) = self.stale.get_or_insert((start, 0));
            if *stale_start == start {
                *n += item.increment;
            }
            return;
        }
        if self.sending_start == start {
            self.sending = 0;
        }
        if let Some(until) = item.ban.filter(|&u| u != 0) {
            self.ban_to_send = self.ban_to_send.max(until);
        }
        if self.start == start {
            self.pending += item.increment;
        } else if self.stale.is_none() {
            self.stale = Some((start, item.increment));
        }
        self.touched = true;
    }

    fn state(&self) -> State {
        match self.quota {
            Quota::SlidingWindow(_) => State::Sliding(SlidingState {
                start: self.start,
                previous: self.previous,
                current: self.known(),
            }),
            _ => State::Window(WindowState {
                start: self.start,
                count: self.known(),
            }),
        }
    }
}

/// A local-first operation of a request.
pub(super) struct LocalOp<'a> {
    pub(super) key: &'a str,
    pub(super) quota: Quota,
    pub(super) cost: u64,
    pub(super) enforce: bool,
    pub(super) ban: Option<Duration>,
    pub(super) every: Duration,
}

/// What a request counted locally, to give back if another part of it is rejected.
pub(super) struct Taken {
    counted: SmallVec<[(usize, u64, i64); 4]>,
}

impl LocalFirst {
    pub(super) fn new() -> Self {
        LocalFirst {
            entries: Sharded::new(SHARDS, MAX_KEYS),
            intervals: Mutex::new(BTreeSet::new()),
            sync: Script::new(include_str!("sync.lua")),
            failures: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latest: AtomicU64::new(0),
            syncing: tokio::sync::Mutex::new(()),
            task: OnceLock::new(),
        }
    }

    /// Whether the counts have stopped reaching Redis.
    pub(super) fn degraded(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= DEGRADED_AFTER
    }

    /// Sync calls made, and how many failed.
    pub(super) fn calls(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Forgets the keys `selected` says (an admin reset): their counts start again from
    /// what Redis holds, with nothing of this node's waiting to be sent.
    pub(super) fn forget(&self, selected: impl Fn(&str) -> bool) {
        self.entries.retain(|k, _| !selected(k));
    }

    /// Keys decided locally.
    pub(super) fn keys(&self) -> usize {
        self.entries.len()
    }

    /// Starts the background sync on the current runtime, once.
    pub(super) fn start(self: &Arc<Self>, link: &Arc<Link>, cluster: bool) {
        self.task.get_or_init(|| {
            tokio::spawn(run(Arc::downgrade(self), Arc::clone(link), cluster));
        });
    }

    /// Decides `ops` at `now`, all or nothing, filling `results`: whether the request is
    /// admitted, and what was counted (to give back if another part of the request is
    /// rejected); when one of them is over its quota, nothing is counted. Keys past the cap
    /// are left out: `exact[i]` is set and the caller decides them in Redis.
    pub(super) fn decide(
        &self,
        ops: &[LocalOp<'_>],
        now: Timestamp,
        results: &mut [Option<OpResult>],
        exact: &mut [bool],
    ) -> (bool, Taken) {
        self.latest.fetch_max(now.as_micros(), Ordering::Relaxed);
        let mut locked = self.entries.lock_keys(ops.iter().map(|op| op.key));
        let mut admitted = true;
        let mut outcomes: SmallVec<[(usize, u64, bool); 4]> = SmallVec::new();
        for (i, op) in ops.iter().enumerate() {
            let (start, _, sliding) = Entry::window(&op.quota, now);
            let every = ticks(op.every);
            let map = locked.map(i);
            if !map.contains_key(op.key) {
                if self.entries.len() >= MAX_KEYS {
                    exact[i] = true;
                    continue;
                }
                self.intervals.lock().insert(every);
                self.entries.added(1);
                map.insert(
                    op.key.into(),
                    Entry {
                        quota: op.quota,
                        every,
                        start,
                        previous: 0,
                        current: 0,
                        pending: 0,
                        sending: 0,
                        sending_start: 0,
                        stale: None,
                        touched: true,
                        seen: now.as_micros(),
                        bans: op.ban.is_some(),
                        banned_until: 0,
                        ban_to_send: 0,
                    },
                );
            }
            let Some(entry) = map.get_mut(op.key) else {
                continue;
            };
            if entry.quota != op.quota {
                // The policy changed: the counts stay, the quota and interval follow it.
                entry.quota = op.quota;
                entry.every = every;
            }
            entry.roll(start, sliding);
            entry.touched = true;
            entry.bans = op.ban.is_some();
            entry.seen = entry.seen.max(now.as_micros());
            let t = now.as_micros();
            if entry.banned_until > t {
                let wait = Duration::from_micros(entry.banned_until - t);
                results[i] = Some(OpResult {
                    decision: Decision {
                        allowed: false,
                        limit: op.quota.policy().0,
                        remaining: 0,
                        reset: wait,
                        retry_after: Some(wait),
                    },
                    banned: true,
                });
                admitted &= !op.enforce;
                continue;
            }
            let outcome = decide(&op.quota, Some(&entry.state()), now, op.cost, LeaseId(0));
            let allowed = outcome.decision.allowed;
            let mut result = OpResult {
                decision: outcome.decision,
                banned: false,
            };
            if !allowed && op.enforce {
                admitted = false;
                if let Some(ban) = op.ban {
                    // The rejection that starts a ban announces it; the other nodes learn
                    // it with this node's next sync, and from Redis with theirs.
                    let until = now.saturating_add(ban).as_micros();
                    entry.banned_until = until;
                    entry.ban_to_send = until;
                    result.announce_ban(ban);
                }
            }
            results[i] = Some(result);
            outcomes.push((i, start, allowed));
        }
        let mut taken = Taken {
            counted: SmallVec::new(),
        };
        if admitted {
            for &(i, start, allowed) in &outcomes {
                let op = &ops[i];
                if !allowed {
                    continue;
                }
                if let Some(entry) = locked.map(i).get_mut(op.key) {
                    let cost = i64::try_from(op.cost).unwrap_or(i64::MAX);
                    entry.pending = entry.pending.saturating_add(cost);
                    taken.counted.push((i, start, cost));
                }
            }
        } else {
            // Nothing counted: what is left is what was left before.
            for &(i, _, allowed) in &outcomes {
                if let Some(r) = results[i].as_mut().filter(|_| allowed) {
                    let d = &mut r.decision;
                    d.remaining = d.remaining.saturating_add(ops[i].cost).min(d.limit);
                }
            }
        }
        (admitted, taken)
    }

    /// Gives back what a request counted (another part of it was rejected, or failed), and
    /// marks its results as not consumed.
    pub(super) fn give_back(
        &self,
        ops: &[LocalOp<'_>],
        taken: Taken,
        results: &mut [Option<OpResult>],
    ) {
        for (i, start, cost) in taken.counted {
            if let Some(entry) = self.entries.lock_key(ops[i].key).get_mut(ops[i].key) {
                if entry.start == start {
                    entry.pending -= cost;
                } else if let Some((stale_start, stale)) = entry.stale.as_mut()
                    && *stale_start == start
                {
                    *stale -= cost;
                }
            }
            if let Some(r) = results[i].as_mut() {
                let d = &mut r.decision;
                d.remaining = d.remaining.saturating_add(ops[i].cost).min(d.limit);
            }
        }
    }

    /// Sends every touched key's counts and reads the totals back, now (tests, shutdown).
    pub(super) async fn sync_now(&self, link: &Link, cluster: bool) -> Result<(), StoreError> {
        self.sync_due(link, cluster, None).await
    }

    /// One sync: the keys whose interval is due at tick `tick` (`None`: every key), or every
    /// live key when degraded (so that recovery is noticed).
    async fn sync_due(
        &self,
        link: &Link,
        cluster: bool,
        tick: Option<u64>,
    ) -> Result<(), StoreError> {
        let _one = self.syncing.lock().await;
        let degraded = self.degraded();
        let latest = self.latest.load(Ordering::Relaxed);
        // What to send: (key, kind, start, end or length, increment, time, is the main item).
        let mut items: Vec<Item> = Vec::new();
        if let Some(tick) = tick
            && !self.intervals.lock().iter().any(|&every| tick % every == 0)
        {
            return Ok(());
        }
        let mut intervals = BTreeSet::new();
        // Shard by shard, each lock held while its keys are read.
        for shard in 0..self.entries.shard_count() {
            let mut map = self.entries.lock(shard);
            self.entries.retain_in(&mut map, |_, e| {
                let (_, end, sliding) = Entry::window(&e.quota, Timestamp::from_micros(e.start));
                let matters_until = end.saturating_add(sliding.unwrap_or(0));
                let idle = e.pending == 0
                    && e.sending == 0
                    && e.stale.is_none()
                    && e.ban_to_send == 0
                    && e.banned_until <= latest;
                !(idle && matters_until <= latest)
            });
            for (key, e) in map.iter_mut() {
                intervals.insert(e.every);
                let due = tick.is_none_or(|t| t % e.every == 0);
                let ban_due = e.ban_to_send != 0;
                if !due
                    || !(e.touched || e.pending != 0 || e.stale.is_some() || degraded || ban_due)
                {
                    continue;
                }
                let (start, end, sliding) =
                    Entry::window(&e.quota, Timestamp::from_micros(e.start));
                let (kind, span) = match sliding {
                    Some(w) => (3, w),
                    None => (1, end),
                };
                if let Some((stale_start, stale)) = e.stale.take() {
                    let (_, stale_end, _) =
                        Entry::window(&e.quota, Timestamp::from_micros(stale_start));
                    items.push(Item {
                        key: key.clone(),
                        shard,
                        numbers: [
                            kind,
                            stale_start,
                            if sliding.is_some() { span } else { stale_end },
                        ],
                        increment: stale,
                        seen: e.seen,
                        ban: None,
                        main: false,
                    });
                }
                e.sending = e.pending;
                e.sending_start = start;
                e.pending = 0;
                e.touched = false;
                items.push(Item {
                    key: key.clone(),
                    shard,
                    numbers: [kind, start, span],
                    increment: e.sending,
                    seen: e.seen,
                    ban: e.bans.then_some(std::mem::take(&mut e.ban_to_send)),
                    main: true,
                });
            }
        }
        *self.intervals.lock() = intervals;
        if items.is_empty() {
            if degraded {
                // Nothing to send, but the store must be seen answering again.
                link.call(async |c| redis::cmd("PING").query_async::<String>(c).await)
                    .await?;
                self.failures.store(0, Ordering::Relaxed);
            }
            return Ok(());
        }
        let answers = self.send(link, cluster, &items).await;
        // The items come shard by shard: each shard is locked once, for its own items.
        let groups = items.chunk_by(|a, b| a.shard == b.shard);
        match answers {
            Ok(totals) => {
                self.failures.store(0, Ordering::Relaxed);
                let mut totals = totals.into_iter();
                for group in groups {
                    let mut map = self.entries.lock(group[0].shard);
                    for (item, (previous, current, banned_until)) in
                        group.iter().zip(totals.by_ref())
                    {
                        let Some(e) = map.get_mut(&item.key).filter(|_| item.main) else {
                            continue;
                        };
                        e.banned_until = e.banned_until.max(banned_until);
                        if e.sending_start == item.numbers[1] {
                            e.sending = 0;
                        }
                        if e.start == item.numbers[1] {
                            e.previous = previous;
                            e.current = current;
                        }
                    }
                }
                Ok(())
            }
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.failed.fetch_add(1, Ordering::Relaxed);
                // Sent again with the next sync.
                for group in groups {
                    let mut map = self.entries.lock(group[0].shard);
                    for item in group {
                        if let Some(e) = map.get_mut(&item.key) {
                            e.restore(item);
                        }
                    }
                }
                Err(error)
            }
        }
    }

    /// The sync calls for `items` (one per slot on a Cluster, at once): each item's previous
    /// and current count, and the end of its ban (0: none).
    async fn send(
        &self,
        link: &Link,
        cluster: bool,
        items: &[Item],
    ) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        for (i, item) in items.iter().enumerate() {
            let s = if cluster { slot(&item.key) } else { 0 };
            by_slot.entry(s).or_default().push(i);
        }
        // At most SYNC_CHUNK keys a call: Redis runs one script at a time, and other
        // clients' commands wait for the whole of it.
        let groups: Vec<&[usize]> = by_slot
            .values()
            .flat_map(|members| members.chunks(SYNC_CHUNK))
            .collect();
        let calls = groups.iter().map(|&members| {
            let mut cmd = Cmd::new();
            let keys = members.len() + members.iter().filter(|&&i| items[i].ban.is_some()).count();
            cmd.arg("EVALSHA").arg(self.sync.get_hash()).arg(keys);
            for &i in members {
                cmd.arg(&*items[i].key);
                if items[i].ban.is_some() {
                    cmd.arg(format!("{}:ban", items[i].key));
                }
            }
            let mut numbers = Vec::with_capacity(8 * (1 + 6 * members.len()));
            numbers.extend_from_slice(&exact(members.len() as u64).to_le_bytes());
            for &i in members {
                let item = &items[i];
                for n in item.numbers {
                    numbers.extend_from_slice(&exact(n).to_le_bytes());
                }
                numbers.extend_from_slice(&(item.increment as f64).to_le_bytes());
                numbers.extend_from_slice(&exact(item.seen).to_le_bytes());
                let ban = item.ban.map_or(-1.0, exact);
                numbers.extend_from_slice(&ban.to_le_bytes());
            }
            cmd.arg(numbers);
            self.calls.fetch_add(1, Ordering::Relaxed);
            async move {
                let reply: Vec<i64> = link.call(async |c| eval(c, &self.sync, &cmd).await).await?;
                if reply.len() != 3 * members.len() {
                    return Err(StoreError::Backend(format!(
                        "the sync script answered {} numbers for {} keys",
                        reply.len(),
                        members.len()
                    )));
                }
                Ok(reply)
            }
        });
        let replies = futures_util::future::join_all(calls).await;
        let mut totals = vec![(0, 0, 0); items.len()];
        for (&members, reply) in groups.iter().zip(replies) {
            let reply = reply?;
            for (&i, three) in members.iter().zip(reply.chunks_exact(3)) {
                let count = |v: i64| u64::try_from(v).unwrap_or(0);
                totals[i] = (count(three[0]), count(three[1]), count(three[2]));
            }
        }
        Ok(totals)
    }
}

/// One key's part of a sync call.
struct Item {
    key: Box<str>,
    /// The shard its entry is in.
    shard: usize,
    /// Kind, window start, and end (fixed) or length (sliding).
    numbers: [u64; 3],
    increment: i64,
    seen: u64,
    /// The limit bans: read its ban key, and set it until this (µs; 0: only read).
    ban: Option<u64>,
    /// The key's current window (not counts of an earlier one sent late).
    main: bool,
}

/// `every` in ticks, at least one.
fn ticks(every: Duration) -> u64 {
    u64::try_from(every.as_millis() / TICK.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The background sync: every tick, the keys whose interval is due. Ends with the store.
async fn run(local: Weak<LocalFirst>, link: Arc<Link>, cluster: bool) {
    let mut timer = tokio::time::interval(TICK);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick: u64 = 0;
    loop {
        timer.tick().await;
        tick += 1;
        let Some(local) = local.upgrade() else {
            return;
        };
        if let Err(error) = local.sync_due(&link, cluster, Some(tick)).await {
            tracing::debug!(%error, "local-first counts not sent; they go with the next sync");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_whole_ticks() {
        assert_eq!(ticks(Duration::from_millis(50)), 5);
        assert_eq!(ticks(Duration::from_millis(10)), 1);
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_secs(60)), 6000);
    }
}
