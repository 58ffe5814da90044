//! `replaces`: across the descriptors of one Envoy rate-limit request, a limit that one
//! descriptor meets takes the named limits off every descriptor of the request (as
//! envoyproxy/ratelimit's `replaces` does).

use std::sync::Arc;

use super::select::with_env;
use super::{Mode, Plan};
use crate::clock::Timestamp;
use crate::request::{KeyHasher, RequestCtx};

impl Plan {
    /// Whether some limit `replaces` others.
    pub fn replaces_any(&self) -> bool {
        self.limits.iter().any(|l| !l.replaces.is_empty())
    }

    /// The limits replaced by those that `request` (one descriptor) meets, added to
    /// `replaced`.
    pub fn replaced_by(
        &self,
        request: &RequestCtx,
        hasher: &KeyHasher,
        now: Timestamp,
        replaced: &mut Vec<Arc<str>>,
    ) {
        with_env(self, request, hasher, now, |env| {
            for limit in &self.limits {
                if limit.replaces.is_empty() || !limit.for_descriptors || limit.mode == Mode::Off {
                    continue;
                }
                super::select::focus(self, limit, env);
                if !limit.condition.eval(env) {
                    continue;
                }
                for name in &limit.replaces {
                    if !replaced.contains(name) {
                        replaced.push(Arc::clone(name));
                    }
                }
            }
        });
    }
}
