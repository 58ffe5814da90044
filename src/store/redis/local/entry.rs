//! One key's local view: this node's part of the current window (and of the window
//! before, while Redis has not confirmed it), the global counts last read, bans.

use std::time::Duration;

use super::{Item, LocalOp};
use crate::clock::Timestamp;
use crate::limiter::{Decision, LeaseId, Quota, SlidingState, State, WindowState, decide};
use crate::store::OpResult;

/// One key's local view.
pub(super) struct Entry {
    pub(super) quota: Quota,
    /// The sync interval, in ticks.
    pub(super) every: u64,
    /// This node's part of the window the key is in.
    pub(super) current: Part,
    /// The global count of that window last read (every node, this one's `current.acked`
    /// included).
    pub(super) total: u64,
    /// The global count of the window before, for a sliding window: last read, or what this
    /// node knew of it when the window rolled.
    pub(super) previous: u64,
    /// This node's part of the window before, while Redis has not confirmed all of it.
    pub(super) late: Option<Part>,
    /// Used since its last sync.
    pub(super) touched: bool,
    /// The latest time it was decided at.
    pub(super) seen: u64,
    /// The limit bans (`on_exceed … ban`): its ban key is read and written with each sync.
    pub(super) bans: bool,
    /// Refused until then (µs; 0: not banned), as this node last knew it.
    pub(super) banned_until: u64,
    /// A ban this node started, to send with the next sync (µs; 0: none).
    pub(super) ban_to_send: u64,
}

/// This node's part of one window's count: its component, sent whole with every sync so that
/// a sync that ran twice counts once (`sync.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Part {
    /// The window's start (µs).
    pub(super) start: u64,
    /// Admitted here in the window, less what was given back.
    pub(super) mine: u64,
    /// The component Redis last confirmed holding (and counted in the totals read).
    pub(super) acked: u64,
    /// Which of the node's two fields in the key holds it (alternates by window).
    pub(super) slot: u8,
}

impl Part {
    /// What Redis does not hold of this node's count yet (negative: given back since).
    pub(super) fn unconfirmed(&self) -> i64 {
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        signed(self.mine).saturating_sub(signed(self.acked))
    }
}

/// `total` plus `change`, at least zero.
fn plus(total: u64, change: i64) -> u64 {
    total.saturating_add_signed(change)
}

impl Entry {
    /// The window containing `now` and, for a sliding window, its length.
    pub(super) fn window(quota: &Quota, now: Timestamp) -> (u64, u64, Option<u64>) {
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

    /// Moves the entry to the window starting at `start`; this node's part of the window it
    /// leaves is kept while Redis has not confirmed it.
    pub(super) fn roll(&mut self, start: u64, sliding: Option<u64>) {
        if self.current.start == start {
            return;
        }
        let left = self.current;
        self.previous = match sliding {
            Some(w) if left.start + w == start => self.total,
            _ => 0,
        };
        self.late = (left.unconfirmed() != 0).then_some(left);
        self.current = Part {
            start,
            mine: 0,
            acked: 0,
            slot: 1 - left.slot,
        };
        self.total = 0;
    }

    /// This window's count as this node knows it: the global count read, plus what it
    /// admitted since.
    pub(super) fn known(&self) -> u64 {
        plus(self.total, self.current.unconfirmed())
    }

    /// The window before's count as this node knows it (sliding windows).
    pub(super) fn known_before(&self, window: u64) -> u64 {
        match self.late {
            Some(late) if late.start + window == self.current.start => {
                plus(self.previous, late.unconfirmed())
            }
            _ => self.previous,
        }
    }

    /// This node's part of the window starting at `start`, while it holds one: the current
    /// window's, or the one before's not yet confirmed.
    pub(super) fn part_of(&mut self, start: u64) -> Option<&mut Part> {
        if self.current.start == start {
            return Some(&mut self.current);
        }
        self.late.as_mut().filter(|l| l.start == start)
    }

    /// Whether Redis holds everything this node counted.
    pub(super) fn confirmed(&self) -> bool {
        self.current.unconfirmed() == 0 && self.late.is_none()
    }

    pub(super) fn state(&self) -> State {
        match self.quota {
            Quota::SlidingWindow(q) => State::Sliding(SlidingState {
                start: self.current.start,
                previous: self.known_before(q.window.get()),
                current: self.known(),
            }),
            _ => State::Window(WindowState {
                start: self.current.start,
                count: self.known(),
            }),
        }
    }

    /// Takes in the answer to `item`: what Redis holds of this node's part, and the totals.
    pub(super) fn confirm(&mut self, item: &Item, answer: Answer) {
        self.banned_until = self.banned_until.max(answer.banned_until);
        let start = item.numbers[1];
        if self.current.start == start {
            self.current.acked = answer.applied;
            if item.main {
                self.total = answer.current;
                self.previous = answer.previous;
            }
            return;
        }
        // The window rolled while the sync was in flight: the answer is about the window
        // before now.
        if item.main
            && let Quota::SlidingWindow(q) = self.quota
            && start + q.window.get() == self.current.start
        {
            self.previous = answer.current;
        }
        if let Some(late) = self.late.as_mut().filter(|l| l.start == start) {
            late.acked = answer.applied;
            if late.unconfirmed() == 0 {
                self.late = None;
            }
        }
    }
}

/// What a sync answers for one item.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Answer {
    pub(super) previous: u64,
    pub(super) current: u64,
    pub(super) banned_until: u64,
    /// The node's component Redis holds now.
    pub(super) applied: u64,
}

impl Entry {
    /// A new key's entry for `op` at `now`, synced every `every` ticks.
    pub(super) fn new(op: &LocalOp<'_>, every: u64, now: Timestamp) -> Entry {
        let (start, _, _) = Entry::window(&op.quota, now);
        Entry {
            quota: op.quota,
            every,
            current: Part {
                start,
                mine: 0,
                acked: 0,
                slot: 0,
            },
            total: 0,
            previous: 0,
            late: None,
            touched: true,
            seen: now.as_micros(),
            bans: op.ban.is_some(),
            banned_until: 0,
            ban_to_send: 0,
        }
    }

    /// Follows `op` at `now`: the policy (a changed quota keeps the counts), the window,
    /// and that the key is in use.
    pub(super) fn follow(&mut self, op: &LocalOp<'_>, every: u64, now: Timestamp) {
        if self.quota != op.quota {
            self.quota = op.quota;
            self.every = every;
        }
        let (start, _, sliding) = Entry::window(&op.quota, now);
        self.roll(start, sliding);
        self.touched = true;
        self.bans = op.ban.is_some();
        self.seen = self.seen.max(now.as_micros());
    }

    /// Decides `op` at `now` from what this node knows (nothing is counted yet): its result,
    /// and whether it fits. A rejection of a limit that bans starts the ban here.
    pub(super) fn decide(&mut self, op: &LocalOp<'_>, now: Timestamp) -> (OpResult, bool) {
        let t = now.as_micros();
        if self.banned_until > t {
            let wait = Duration::from_micros(self.banned_until - t);
            let decision = Decision {
                allowed: false,
                limit: op.quota.policy().0,
                remaining: 0,
                reset: wait,
                retry_after: Some(wait),
            };
            return (
                OpResult {
                    decision,
                    banned: true,
                },
                false,
            );
        }
        let outcome = decide(&op.quota, Some(&self.state()), now, op.cost, LeaseId(0));
        let allowed = outcome.decision.allowed;
        let mut result = OpResult {
            decision: outcome.decision,
            banned: false,
        };
        if !allowed
            && op.enforce
            && let Some(ban) = op.ban
        {
            // The rejection that starts a ban announces it; the other nodes learn it with
            // this node's next sync, and from Redis with theirs.
            let until = now.saturating_add(ban).as_micros();
            self.banned_until = until;
            self.ban_to_send = until;
            result.announce_ban(ban);
        }
        (result, allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(quota: Quota, start: u64) -> Entry {
        Entry {
            quota,
            every: 5,
            current: Part {
                start,
                mine: 0,
                acked: 0,
                slot: 0,
            },
            total: 0,
            previous: 0,
            late: None,
            touched: false,
            seen: 0,
            bans: false,
            banned_until: 0,
            ban_to_send: 0,
        }
    }

    fn item(part: Part, main: bool) -> Item {
        Item {
            key: "k".into(),
            shard: 0,
            numbers: [3, part.start, 60_000_000],
            part,
            seen: 0,
            ban: None,
            main,
        }
    }

    /// A sliding window rolls while a sync of the window it leaves is in flight: the answer
    /// confirms the node's part of that window and becomes the window before's count.
    #[test]
    fn an_answer_for_the_window_left_counts_as_the_window_before() {
        let minute = 60_000_000;
        let quota = Quota::SlidingWindow(crate::limiter::WindowQuota {
            limit: std::num::NonZeroU64::new(100).unwrap(),
            window: std::num::NonZeroU64::new(minute).unwrap(),
        });
        let mut e = entry(quota, 0);
        e.current.mine = 10;
        let sent = item(e.current, true);
        e.current.mine = 12;
        e.roll(minute, Some(minute));
        assert_eq!(e.current.slot, 1, "the next window has the other field");
        assert_eq!(e.known_before(minute), 12, "nothing confirmed yet");
        e.confirm(
            &sent,
            Answer {
                previous: 0,
                current: 30,
                banned_until: 0,
                applied: 10,
            },
        );
        // Other nodes' 20 and this node's 10 in Redis, and 2 this node has not sent.
        assert_eq!(e.known_before(minute), 32);
        let late = e.late.expect("2 still to send");
        assert_eq!((late.mine, late.acked), (12, 10));
        e.confirm(
            &item(late, false),
            Answer {
                previous: 0,
                current: 0,
                banned_until: 0,
                applied: 12,
            },
        );
        assert!(e.late.is_none(), "confirmed whole");
        assert_eq!(
            e.known_before(minute),
            30,
            "until the totals are read again"
        );
    }
}
