//! What one request asks Cedar while it is decided.

use std::sync::Arc;

use cedar_policy::EntityUid;

use super::{Answer, CedarSet, Principal, Question};
use crate::request::{KeyHasher, RequestCtx};

/// A question asked while deciding a request: set, action, resource, tier; and its answer.
type Asked = (usize, Arc<str>, String, Option<Arc<str>>, Arc<Answer>);

/// What one request asks Cedar, kept while the request is decided: the principal of each
/// set (built once), the answers so far (each question asked once), and the resource and
/// tier of the limit being looked at.
pub struct Asking<'a> {
    sets: &'a [Arc<CedarSet>],
    hasher: &'a KeyHasher,
    now_micros: u64,
    resource: std::cell::RefCell<Option<Arc<str>>>,
    tier: std::cell::RefCell<Option<Arc<str>>>,
    principals: std::cell::RefCell<Vec<(usize, Arc<Principal>)>>,
    answers: std::cell::RefCell<Vec<Asked>>,
}

impl<'a> Asking<'a> {
    /// Questions about `request` to `sets`, at `now_micros` (for the answer cache).
    pub fn new(sets: &'a [Arc<CedarSet>], hasher: &'a KeyHasher, now_micros: u64) -> Self {
        Asking {
            sets,
            hasher,
            now_micros,
            resource: std::cell::RefCell::new(None),
            tier: std::cell::RefCell::new(None),
            principals: std::cell::RefCell::new(Vec::new()),
            answers: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// The route template the next questions are about (`None`: the request's path), and
    /// the tier of the limit asking (`None`: unknown, or chosen by Cedar itself).
    pub fn focus(&self, template: Option<&Arc<str>>, tier: Option<Arc<str>>) {
        *self.resource.borrow_mut() = template.cloned();
        *self.tier.borrow_mut() = tier;
    }

    /// The request's principal in set `set`.
    pub fn principal(&self, request: &RequestCtx, set: usize) -> Arc<Principal> {
        if let Some((_, p)) = self.principals.borrow().iter().find(|(s, _)| *s == set) {
            return Arc::clone(p);
        }
        let principal = Arc::new(self.sets[set].principal(request, self.hasher));
        self.principals
            .borrow_mut()
            .push((set, Arc::clone(&principal)));
        principal
    }

    /// Cedar's answer to: may the request's principal do `action` on the current resource?
    pub fn answer(&self, request: &RequestCtx, set: usize, action: &Arc<str>) -> Arc<Answer> {
        let current = self.resource.borrow().clone();
        let resource = current.as_deref().unwrap_or(&request.path);
        let tier = self.tier.borrow().clone();
        if let Some((.., answer)) = self
            .answers
            .borrow()
            .iter()
            .find(|(s, a, r, t, _)| *s == set && a == action && r == resource && *t == tier)
        {
            return Arc::clone(answer);
        }
        let principal = self.principal(request, set);
        let question = Question {
            principal: &principal,
            action,
            resource,
            tier: tier.as_deref(),
        };
        let answer = self.sets[set].decide(&question, request, self.now_micros);
        self.answers.borrow_mut().push((
            set,
            Arc::clone(action),
            resource.to_owned(),
            tier,
            Arc::clone(&answer),
        ));
        answer
    }

    /// Whether the request's principal is `ancestor` or one of its descendants.
    pub fn principal_in(&self, request: &RequestCtx, set: usize, ancestor: &EntityUid) -> bool {
        let principal = self.principal(request, set);
        self.sets[set].principal_in(&principal, ancestor)
    }

    /// Set `set`.
    pub fn set(&self, set: usize) -> &CedarSet {
        &self.sets[set]
    }
}
