//! Answering a question: the policies of the action's slice that can apply to the
//! principal and the resource, evaluated over the entities they can reach, with the
//! request's context; answers cached when no policy reads the context.

use std::sync::Arc;

use cedar_policy::{
    Context, Decision, Entities, EntityId, EntityUid, PolicySet, Request, RestrictedExpression,
};

use super::*;

impl CedarSet {
    /// Cedar's answer to `question` about `request`. Cached when the answer cannot depend on
    /// the context.
    pub fn decide(
        &self,
        question: &Question<'_>,
        request: &RequestCtx,
        now_micros: u64,
    ) -> Arc<Answer> {
        let Some(slice) = self.by_action.get(question.action) else {
            // Compiled plans prepare every action they ask about; an unknown one permits
            // nothing.
            return Arc::new(Answer {
                allowed: false,
                policies: Vec::new(),
                errors: vec![format!("unknown action `{}`", question.action)],
            });
        };
        let key = slice
            .cacheable
            .then(|| cache::Key::new(question.principal, question.action, question.resource));
        if let Some(key) = &key
            && let Some(answer) = self.cache.get(key, now_micros)
        {
            return answer;
        }
        let policies = self.policies_for(slice, question.principal, question.resource);
        let answer = Arc::new(self.evaluate(&policies, question, request));
        if let Some(key) = key {
            self.cache.insert(key, Arc::clone(&answer), now_micros);
        }
        answer
    }

    /// The policies of `slice` whose scope can hold for `principal` and `resource`, given
    /// the entities' hierarchy: the others cannot be satisfied, so Cedar's answer (decision,
    /// reasons, errors) is the same without them.
    fn policies_for(&self, slice: &Slice, principal: &Principal, resource: &str) -> Arc<PolicySet> {
        let resource =
            EntityUid::from_type_name_and_id(self.resource_type.clone(), EntityId::new(resource));
        let ancestors = |e: &EntityUid| -> Vec<EntityUid> {
            self.entities
                .ancestors(e)
                .map(|a| a.cloned().collect())
                .unwrap_or_default()
        };
        let mut p_up = ancestors(&principal.uid);
        for parent in &principal.parents {
            p_up.push(parent.clone());
            p_up.extend(ancestors(parent));
        }
        let r_up = ancestors(&resource);
        let mut bits = vec![0u64; slice.scoped.len().div_ceil(64)];
        for (i, scoped) in slice.scoped.iter().enumerate() {
            if scoped.principal.holds(&principal.uid, &p_up)
                && scoped.resource.holds(&resource, &r_up)
            {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        let mut built = slice
            .built
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(set) = built.get(&bits) {
            return Arc::clone(set);
        }
        let mut set = PolicySet::new();
        for (i, scoped) in slice.scoped.iter().enumerate() {
            if bits[i / 64] & (1 << (i % 64)) != 0 {
                // Ids are unique in the set they come from.
                let _ = set.add(scoped.policy.clone());
            }
        }
        let set = Arc::new(set);
        if built.len() >= MAX_BUILT {
            built.clear();
        }
        built.insert(bits, Arc::clone(&set));
        set
    }

    /// Cedar's answer over the whole policy set, unsliced and uncached: what [`decide`]
    /// must always agree with.
    ///
    /// [`decide`]: CedarSet::decide
    /// With parents from the request, it evaluates over the whole entities file with the
    /// principal added (not the entities the evaluation can reach): the reference for those
    /// too.
    pub fn decide_unsliced(&self, question: &Question<'_>, request: &RequestCtx) -> Answer {
        self.evaluate_with(&self.policies, question, request, Scope::Whole)
    }

    fn evaluate(
        &self,
        policies: &PolicySet,
        question: &Question<'_>,
        request: &RequestCtx,
    ) -> Answer {
        self.evaluate_with(policies, question, request, Scope::Reached)
    }

    fn evaluate_with(
        &self,
        policies: &PolicySet,
        question: &Question<'_>,
        request: &RequestCtx,
        scope: Scope,
    ) -> Answer {
        let denied = |error: String| Answer {
            allowed: false,
            policies: Vec::new(),
            errors: vec![error],
        };
        let action_uid = self.action_uid(question.action);
        let resource = EntityUid::from_type_name_and_id(
            self.resource_type.clone(),
            EntityId::new(question.resource),
        );
        let context = self.context(request, question.tier);
        let cedar_request = match Request::new(
            question.principal.uid.clone(),
            action_uid,
            resource,
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return denied(e.to_string()),
        };
        let with_parents;
        let entities = if question.principal.parents.is_empty() {
            &self.entities
        } else {
            let (resource, action) = (cedar_request.resource(), cedar_request.action());
            let (Some(resource), Some(action)) = (resource, action) else {
                return denied("a question without resource or action".to_owned());
            };
            let built = match scope {
                Scope::Reached => {
                    let key =
                        cache::Key::new(question.principal, question.action, question.resource);
                    self.reached.get_or_insert_with(&key, || {
                        self.entities_with(question.principal, resource, action)
                            .map(Arc::new)
                    })
                }
                Scope::Whole => self.whole_entities_with(question.principal).map(Arc::new),
            };
            with_parents = match built {
                Ok(entities) => entities,
                Err(e) => return denied(e),
            };
            &with_parents
        };
        let response = self
            .authorizer
            .is_authorized(&cedar_request, policies, entities);
        let mut determining: Vec<&PolicyId> = response.diagnostics().reason().collect();
        determining.sort_by_key(|id| self.order.get(*id).copied().unwrap_or(usize::MAX));
        Answer {
            allowed: response.decision() == Decision::Allow,
            policies: determining
                .into_iter()
                .map(|id| Arc::from(id.as_ref()))
                .collect(),
            errors: response
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// The whole entities file with the principal's request parents added: what
    /// [`entities_with`](Self::entities_with) must always be equivalent to, at the cost of a
    /// copy of the file and its transitive closure.
    fn whole_entities_with(&self, principal: &Principal) -> Result<Entities, String> {
        let entity = self.principal_entity(principal)?;
        self.entities
            .clone()
            .upsert_entities([entity], None)
            .map_err(|e| e.to_string())
    }

    /// The principal's entity: the entities file's (attributes and tags kept), with the
    /// parents the request names added.
    fn principal_entity(&self, principal: &Principal) -> Result<cedar_policy::Entity, String> {
        // The request's parents with their ancestors in the file: the closure is complete
        // here, so the entities built from this one need none of those ancestors.
        let mut ancestors: std::collections::HashSet<EntityUid> = principal
            .parents
            .iter()
            .flat_map(|p| {
                let up = self.entities.ancestors(p).into_iter().flatten().cloned();
                std::iter::once(p.clone()).chain(up)
            })
            .collect();
        let Some(known) = self.entities.get(&principal.uid) else {
            return Ok(cedar_policy::Entity::new_no_attrs(
                principal.uid.clone(),
                ancestors,
            ));
        };
        ancestors.extend(
            self.entities
                .ancestors(&principal.uid)
                .into_iter()
                .flatten()
                .cloned(),
        );
        if !self.reach.described.contains(&principal.uid) {
            // No attributes or tags to keep.
            return Ok(cedar_policy::Entity::new_no_attrs(
                principal.uid.clone(),
                ancestors,
            ));
        }
        let mut json = known.to_json_value().map_err(|e| e.to_string())?;
        if let Some(parents) = json.get_mut("parents").and_then(|p| p.as_array_mut()) {
            parents.clear();
            for parent in &ancestors {
                parents.push(serde_json::json!({
                    "type": parent.type_name().to_string(),
                    "id": parent.id().unescaped(),
                }));
            }
        }
        cedar_policy::Entity::from_json_value(json, None).map_err(|e| e.to_string())
    }

    /// The entities a question whose principal names parents can reach: the principal, with
    /// the request's parents added to those of the entities file (its attributes and tags
    /// kept), and every entity of the file the evaluation can get to from it, the resource,
    /// the action and the policies' literals (entities that attributes name; each entity of
    /// the file carries its ancestors, so those are not needed unless named). A few
    /// entities, not a copy of the file.
    fn entities_with(
        &self,
        principal: &Principal,
        resource: &EntityUid,
        action: &EntityUid,
    ) -> Result<Entities, String> {
        let merged = self.principal_entity(principal)?;
        let mut seen: std::collections::HashSet<EntityUid> =
            std::collections::HashSet::from([principal.uid.clone()]);
        let mut pending: Vec<EntityUid> = principal
            .parents
            .iter()
            .chain([resource, action])
            .chain(&self.reach.always)
            .cloned()
            .collect();
        pending.extend(self.reach.from(&principal.uid));
        let mut reached = vec![merged];
        while let Some(uid) = pending.pop() {
            if !seen.insert(uid.clone()) {
                continue;
            }
            if let Some(entity) = self.entities.get(&uid) {
                pending.extend(self.reach.from(&uid));
                reached.push(entity.clone());
            }
        }
        Entities::from_entities(reached, None).map_err(|e| e.to_string())
    }

    /// The request's context: `ip` (an `ipaddr`; `0.0.0.0` when unknown), `method`, `path`
    /// and `host` (strings; the host empty when unknown), `tier` when known, and the
    /// attributes the import names that the request has.
    fn context(&self, request: &RequestCtx, tier: Option<&str>) -> Context {
        let ip = request
            .client_ip
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let ip = self
            .addresses
            .get_or_insert_with(&ip, || {
                Ok::<_, std::convert::Infallible>(RestrictedExpression::new_ip(ip.to_string()))
            })
            .unwrap_or_else(|never| match never {});
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let mut pairs = vec![
            ("ip".to_owned(), ip),
            ("method".to_owned(), string(request.method.as_str())),
            ("path".to_owned(), string(&request.path)),
            (
                "host".to_owned(),
                string(request.host.as_deref().unwrap_or_default()),
            ),
        ];
        if let Some(tier) = tier {
            pairs.push(("tier".to_owned(), string(tier)));
        }
        for (name, from) in &self.request_context {
            if let Some(value) = from.read(request) {
                pairs.push((name.clone(), string(value)));
            }
        }
        Context::from_pairs(pairs).unwrap_or_else(|_| Context::empty())
    }
}
