//! Cedar answers kept for a short time per (principal, action, resource), bounded in size.
//! Only answers that cannot depend on the request's context are kept (see
//! [`CedarSet::decide`](super::CedarSet::decide)); each plan has its own cache, so a reload
//! never serves an answer of the policies it replaced.

use std::sync::Arc;

use super::{Answer, Principal};

/// How long an answer is kept, in microseconds.
pub const DEFAULT_TTL_MICROS: u64 = 1_000_000;
/// How many answers are kept.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// What an answer is kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    principal: String,
    action: String,
    resource: String,
}

impl Key {
    pub(super) fn new(principal: &Principal, action: &str, resource: &str) -> Key {
        let mut shown = principal.uid.to_string();
        for parent in &principal.parents {
            shown.push('|');
            shown.push_str(&parent.to_string());
        }
        Key {
            principal: shown,
            action: action.to_owned(),
            resource: resource.to_owned(),
        }
    }
}

/// A bounded cache of answers, each valid for `ttl_micros` after it was computed.
pub struct AnswerCache {
    entries: quick_cache::sync::Cache<Key, (Arc<Answer>, u64)>,
    ttl_micros: u64,
}

impl Default for AnswerCache {
    fn default() -> Self {
        AnswerCache::new(DEFAULT_CAPACITY, DEFAULT_TTL_MICROS)
    }
}

impl AnswerCache {
    /// A cache of at most `capacity` answers kept `ttl_micros` each (0: nothing is kept).
    pub fn new(capacity: usize, ttl_micros: u64) -> AnswerCache {
        AnswerCache {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
            ttl_micros,
        }
    }

    pub(super) fn get(&self, key: &Key, now_micros: u64) -> Option<Arc<Answer>> {
        let (answer, expires) = self.entries.get(key)?;
        (now_micros < expires).then_some(answer)
    }

    pub(super) fn insert(&self, key: Key, answer: Arc<Answer>, now_micros: u64) {
        if self.ttl_micros > 0 {
            self.entries
                .insert(key, (answer, now_micros.saturating_add(self.ttl_micros)));
        }
    }

    /// How many answers are kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no answer is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
