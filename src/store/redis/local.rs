//! Local-first limits (`sync every`): decided in this process from the node's own count plus
//! the last global count it read, with the counts sent to Redis — and the totals read back —
//! once per interval for every key of the node, in one call (`sync.lua`; one per slot on a
//! Cluster).
//!
//! A sync writes each key's *component* — everything this node admitted in the window —
//! rather than a delta, in a field of the node's own (`sync.lua`): a call that timed out here
//! but ran when Redis went on, sent again, counts once.
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

mod entry;

use self::entry::{Answer, Entry, Part};
use super::batcher::{Link, exact};
use super::{cluster::slot, eval};
use crate::clock::Timestamp;
use crate::limiter::Quota;
use crate::plan::key::ban_key;
use crate::store::sharded::{Shard, Sharded};
use crate::store::{OpResult, Settlement, StoreError};

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
    /// This node's name in the keys it writes (its components' fields): random, so that a
    /// restarted process is a new node.
    node: Box<str>,
    /// The last sync's number: a key keeps the highest it has seen per node and ignores
    /// older calls that reach Redis late.
    sequence: AtomicU64,
    /// One sync at a time (the background task, or [`LocalFirst::sync_now`]).
    syncing: tokio::sync::Mutex<()>,
    task: OnceLock<()>,
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
    counted: SmallVec<[(usize, u64, u64); 4]>,
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
            node: format!("{:016x}", rand::random::<u64>()).into(),
            sequence: AtomicU64::new(0),
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
        // The operations that fit, with their window.
        let mut fitting: SmallVec<[(usize, u64); 4]> = SmallVec::new();
        for (i, op) in ops.iter().enumerate() {
            let Some(entry) = self.entry(locked.map(i), op, now) else {
                exact[i] = true;
                continue;
            };
            let (result, allowed) = entry.decide(op, now);
            admitted &= allowed || !op.enforce;
            results[i] = Some(result);
            if allowed {
                fitting.push((i, entry.current.start));
            }
        }
        let mut taken = Taken {
            counted: SmallVec::new(),
        };
        for &(i, start) in &fitting {
            let op = &ops[i];
            if admitted {
                if let Some(entry) = locked.map(i).get_mut(op.key) {
                    entry.current.mine = entry.current.mine.saturating_add(op.cost);
                    taken.counted.push((i, start, op.cost));
                }
            } else if let Some(r) = results[i].as_mut() {
                // Nothing counted: what is left is what was left before.
                let d = &mut r.decision;
                d.remaining = d.remaining.saturating_add(op.cost).min(d.limit);
            }
        }
        (admitted, taken)
    }

    /// The entry of `op`'s key in its locked shard `map`, made if new, following the
    /// policy and the window at `now`; `None` past the key cap (decided exactly).
    fn entry<'m>(
        &self,
        map: &'m mut Shard<Entry>,
        op: &LocalOp<'_>,
        now: Timestamp,
    ) -> Option<&'m mut Entry> {
        if !map.contains_key(op.key) {
            if self.entries.len() >= MAX_KEYS {
                return None;
            }
            let entry = Entry::new(op, ticks(op.every), now);
            self.intervals.lock().insert(entry.every);
            self.entries.added(1);
            map.insert(op.key.into(), entry);
        }
        let entry = map.get_mut(op.key)?;
        entry.follow(op, ticks(op.every), now);
        Some(entry)
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
            if let Some(part) = self
                .entries
                .lock_key(ops[i].key)
                .get_mut(ops[i].key)
                .and_then(|e| e.part_of(start))
            {
                part.mine = part.mine.saturating_sub(cost);
            }
            if let Some(r) = results[i].as_mut() {
                let d = &mut r.decision;
                d.remaining = d.remaining.saturating_add(ops[i].cost).min(d.limit);
            }
        }
    }

    /// Settles `s` in this node's part of the window its reservation was counted in — or,
    /// for a debt whose window has ended, of the current one — when this node holds that
    /// part (Redis may not have it yet: the next sync sends it). `false` when the key is not
    /// counted here, or its part was confirmed and left behind (the window before of a
    /// sliding window): settle it in Redis.
    pub(super) fn settle(&self, s: &Settlement<'_>, now: Timestamp) -> bool {
        if self.entries.len() == 0 {
            return false;
        }
        let mut map = self.entries.lock_key(s.key);
        let Some(entry) = map.get_mut(s.key) else {
            return false;
        };
        let (start, _, sliding) = Entry::window(&entry.quota, now);
        entry.roll(start, sliding);
        let (counted, _, _) = Entry::window(&entry.quota, s.counted_at);
        entry.touched = true;
        let part = match entry.part_of(counted) {
            Some(part) => part,
            // A debt of a window this node no longer holds: charged to the current one.
            None if s.delta > 0 => &mut entry.current,
            // A refund for a window whose part Redis confirmed: there, if it still counts.
            None => return sliding.is_none(),
        };
        part.mine = part.mine.saturating_add_signed(s.delta);
        true
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
        if let Some(tick) = tick
            && !self.intervals.lock().iter().any(|&every| tick % every == 0)
        {
            return Ok(());
        }
        let degraded = self.degraded();
        let items = self.collect(tick, degraded);
        if items.is_empty() {
            if degraded {
                // Nothing to send, but the store must be seen answering again.
                link.call(async |c| redis::cmd("PING").query_async::<String>(c).await)
                    .await?;
                self.failures.store(0, Ordering::Relaxed);
            }
            return Ok(());
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        let answers = self.send(link, cluster, &items, sequence).await;
        // The items come shard by shard: each shard is locked once, for its own items.
        let groups = items.chunk_by(|a, b| a.shard == b.shard);
        match answers {
            Ok(answers) => {
                self.failures.store(0, Ordering::Relaxed);
                let mut answers = answers.into_iter();
                for group in groups {
                    let mut map = self.entries.lock(group[0].shard);
                    for (item, answer) in group.iter().zip(answers.by_ref()) {
                        if let Some(e) = map.get_mut(&item.key) {
                            e.confirm(item, answer);
                        }
                    }
                }
                Ok(())
            }
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.failed.fetch_add(1, Ordering::Relaxed);
                // The components go whole with the next sync (whether or not this one ran);
                // only a ban to announce and the need to read the totals are kept.
                for group in groups {
                    let mut map = self.entries.lock(group[0].shard);
                    for item in group.iter().filter(|i| i.main) {
                        if let Some(e) = map.get_mut(&item.key) {
                            e.touched = true;
                            if let Some(until) = item.ban.filter(|&u| u != 0) {
                                e.ban_to_send = e.ban_to_send.max(until);
                            }
                        }
                    }
                }
                Err(error)
            }
        }
    }

    /// What a sync sends, shard by shard (each lock held while its keys are read): the keys
    /// whose interval is due at `tick` (`None`: all) and that changed or are in use, every
    /// one when `degraded`. Idle keys whose window has passed are dropped.
    fn collect(&self, tick: Option<u64>, degraded: bool) -> Vec<Item> {
        let latest = self.latest.load(Ordering::Relaxed);
        let mut items: Vec<Item> = Vec::new();
        let mut intervals = BTreeSet::new();
        for shard in 0..self.entries.shard_count() {
            let mut map = self.entries.lock(shard);
            self.entries.retain_in(&mut map, |_, e| {
                let (_, end, sliding) =
                    Entry::window(&e.quota, Timestamp::from_micros(e.current.start));
                let matters_until = end.saturating_add(sliding.unwrap_or(0));
                let idle = e.confirmed() && e.ban_to_send == 0 && e.banned_until <= latest;
                !(idle && matters_until <= latest)
            });
            for (key, e) in map.iter_mut() {
                intervals.insert(e.every);
                let due = tick.is_none_or(|t| t % e.every == 0);
                let changed = e.touched || !e.confirmed() || e.ban_to_send != 0;
                if !due || !(changed || degraded) {
                    continue;
                }
                let numbers = |start: u64| {
                    let (_, end, sliding) = Entry::window(&e.quota, Timestamp::from_micros(start));
                    match sliding {
                        Some(w) => [3, start, w],
                        None => [1, start, end],
                    }
                };
                let item = |part: Part, main: bool, ban: Option<u64>| Item {
                    key: key.clone(),
                    shard,
                    numbers: {
                        let [kind, start, span] = numbers(part.start);
                        // `sync.lua`: + 10 for the window before.
                        [kind + if main { 0 } else { 10 }, start, span]
                    },
                    part,
                    seen: e.seen,
                    ban,
                    main,
                };
                // Counts of the window before go first: the current window's answer then
                // reads them in its `p`.
                if let Some(late) = e.late {
                    items.push(item(late, false, None));
                }
                let ban = e.bans.then(|| std::mem::take(&mut e.ban_to_send));
                items.push(item(e.current, true, ban));
                e.touched = false;
            }
        }
        *self.intervals.lock() = intervals;
        items
    }

    /// The sync calls for `items` (one per slot on a Cluster, at once), numbered `sequence`:
    /// each item's answer.
    async fn send(
        &self,
        link: &Link,
        cluster: bool,
        items: &[Item],
        sequence: u64,
    ) -> Result<Vec<Answer>, StoreError> {
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
                    cmd.arg(ban_key(&items[i].key));
                }
            }
            let mut numbers = Vec::with_capacity(8 * (2 + 8 * members.len()));
            let mut push = |n: f64| numbers.extend_from_slice(&n.to_le_bytes());
            push(exact(members.len() as u64));
            push(exact(sequence));
            for &i in members {
                let item = &items[i];
                for n in item.numbers {
                    push(exact(n));
                }
                push(exact(item.part.mine));
                push(exact(item.part.acked));
                push(f64::from(item.part.slot));
                push(exact(item.seen));
                push(item.ban.map_or(-1.0, exact));
            }
            cmd.arg(numbers).arg(&*self.node);
            self.calls.fetch_add(1, Ordering::Relaxed);
            async move {
                let reply: Vec<i64> = link.call(async |c| eval(c, &self.sync, &cmd).await).await?;
                if reply.len() != 4 * members.len() {
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
        let mut answers = vec![Answer::default(); items.len()];
        for (&members, reply) in groups.iter().zip(replies) {
            let reply = reply?;
            for (&i, four) in members.iter().zip(reply.chunks_exact(4)) {
                let count = |v: i64| u64::try_from(v).unwrap_or(0);
                answers[i] = Answer {
                    previous: count(four[0]),
                    current: count(four[1]),
                    banned_until: count(four[2]),
                    applied: count(four[3]),
                };
            }
        }
        Ok(answers)
    }
}

/// One key's part of a sync call.
struct Item {
    key: Box<str>,
    /// The shard its entry is in.
    shard: usize,
    /// Kind, window start, and end (fixed) or length (sliding).
    numbers: [u64; 3],
    /// This node's part of that window.
    part: Part,
    seen: u64,
    /// The limit bans: read its ban key, and set it until this (µs; 0: only read).
    ban: Option<u64>,
    /// The key's current window (not counts of the window before, sent late).
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
