//! Redis Cluster: a request's operations grouped by slot, the groups sent at once, and what
//! an admitted group consumed given back when another group rejects (`undo.lua`).

use std::time::Duration;

use smallvec::SmallVec;

use super::{CLUSTER_SLOTS, RedisStore, eval, params};
use crate::clock::Timestamp;
use crate::limiter::Decision;
use crate::store::{BatchResult, Op, OpResult, StoreError, hash_tag};

/// The Cluster slot of `key`: CRC16 of its hash tag (or of the whole key), modulo 16384.
pub fn slot(key: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key).as_bytes()) % CLUSTER_SLOTS as u16
}

impl RedisStore {
    /// Gives back what `group`'s operations consumed (a later part of the request was
    /// rejected). Best effort: a failure is logged, and the counts expire with their window.
    async fn undo_group(&self, ops: &[Op<'_>], group: &[usize], now: Timestamp) {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.link.undo.get_hash()).arg(group.len());
        for &i in group {
            cmd.arg(ops[i].key);
        }
        self.push_clock(&mut cmd, now, group.len());
        for &i in group {
            let op = &ops[i];
            let [algorithm, p1, p2, p3] = params(&op.quota, now);
            cmd.arg(algorithm)
                .arg(op.cost)
                .arg(op.lease.0)
                .arg(p1)
                .arg(p2)
                .arg(p3);
        }
        if let Err(error) = self
            .call(async |c| eval::<i64>(c, &self.link.undo, &cmd).await)
            .await
        {
            tracing::warn!(%error, "could not give back a rejected request's counts in another Cluster slot; they expire with their window");
        }
    }

    /// A Cluster batch: one call per slot, all at once; when one group rejects, the groups
    /// that consumed are given back.
    pub(super) async fn apply_by_slot(
        &self,
        ops: &[Op<'_>],
        now: Timestamp,
    ) -> Result<BatchResult, StoreError> {
        let mut groups: SmallVec<[(u16, SmallVec<[usize; 8]>); 2]> = SmallVec::new();
        for (i, op) in ops.iter().enumerate() {
            let s = slot(op.key);
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, members)) => members.push(i),
                None => groups.push((s, smallvec::smallvec![i])),
            }
        }
        if let [(s, members)] = groups.as_slice() {
            return self.run_group(ops, members, *s, now).await;
        }
        // When part of the request would be refused, call no part (nothing to give back).
        if groups.iter().any(|(s, _)| self.breaker(*s).refuses(now)) {
            return Err(StoreError::CircuitOpen);
        }
        let answers = futures_util::future::join_all(
            groups
                .iter()
                .map(|(s, members)| self.run_group(ops, members, *s, now)),
        )
        .await;
        let admitted = answers.iter().all(|a| a.as_ref().is_ok_and(|r| r.admitted));
        let failed = answers.iter().any(Result::is_err);
        if !admitted {
            // Give back what the admitted groups consumed.
            let undo = groups
                .iter()
                .zip(&answers)
                .filter(|(_, a)| a.as_ref().is_ok_and(|r| r.admitted))
                .map(|((_, members), _)| self.undo_group(ops, members, now));
            futures_util::future::join_all(undo).await;
        }
        if failed {
            let error = answers
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_else(|| StoreError::Backend("a Cluster slot failed".to_owned()));
            return Err(error);
        }
        let mut results = vec![
            OpResult {
                decision: Decision {
                    allowed: true,
                    limit: 0,
                    remaining: 0,
                    reset: Duration::ZERO,
                    retry_after: None,
                },
                banned: false,
            };
            ops.len()
        ];
        for ((_, members), answer) in groups.iter().zip(answers) {
            let Ok(answer) = answer else { continue };
            for (&i, mut r) in members.iter().zip(answer.results) {
                if !admitted && answer.admitted && r.decision.allowed {
                    // Given back: what was left before this request.
                    let d = &mut r.decision;
                    d.remaining = d.remaining.saturating_add(ops[i].cost).min(d.limit);
                }
                results[i] = r;
            }
        }
        Ok(BatchResult { admitted, results })
    }
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("api:{ip:1.2.3.0/24}:login"), slot("ip:1.2.3.0/24"));
        assert_eq!(
            slot("foo{}{bar}"),
            slot("foo{}{bar}"),
            "an empty tag hashes the key"
        );
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
    }
}
