//! What Cedar can reach when a request names the principal's parents: the entities the
//! policies, the actions and the entities' own attributes name, so that a question is
//! evaluated over a small slice of the entities, checked against the whole file.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{
    ActionConstraint, Entities, EntityId, EntityTypeName, EntityUid, PolicySet,
    PrincipalConstraint, ResourceConstraint,
};

/// What evaluation can reach besides the principal, the resource and the action: the
/// policies' entity literals and the action entities, and which entities each entity's
/// attributes and tags name. Built at load when the import names request parents (else
/// evaluation uses the whole entities file, and this stays empty).
#[derive(Debug, Default)]
pub(super) struct Reach {
    pub(super) always: Vec<EntityUid>,
    refs: HashMap<EntityUid, Vec<EntityUid>>,
    /// The entities with attributes or tags.
    pub(super) described: std::collections::HashSet<EntityUid>,
}

impl Reach {
    pub(super) fn new(policies: &PolicySet, entities: &Entities) -> Reach {
        // A literal of the scope (`principal in Role::"x"`) is only compared with what the
        // principal, action or resource hold; only literals of the conditions may be read.
        let mut always: Vec<EntityUid> = policies.policies().flat_map(body_literals).collect();
        always.sort_by_key(ToString::to_string);
        always.dedup();
        let mut refs = HashMap::new();
        let mut described = std::collections::HashSet::new();
        for entity in entities.iter() {
            let Ok(json) = entity.to_json_value() else {
                // Kept whole when it cannot be looked into.
                described.insert(entity.uid());
                continue;
            };
            let mut named = Vec::new();
            for part in ["attrs", "tags"] {
                if let Some(value) = json.get(part) {
                    if value.as_object().is_some_and(|o| !o.is_empty()) {
                        described.insert(entity.uid());
                    }
                    entity_refs(value, &mut named);
                }
            }
            if !named.is_empty() {
                refs.insert(entity.uid(), named);
            }
        }
        Reach {
            always,
            refs,
            described,
        }
    }

    /// The entities `uid`'s attributes and tags name.
    pub(super) fn from<'a>(&'a self, uid: &EntityUid) -> impl Iterator<Item = EntityUid> + 'a {
        self.refs.get(uid).into_iter().flatten().cloned()
    }
}

/// The entity literals of `policy`'s `when` and `unless` conditions: those of the whole
/// condition (which includes the scope) less one for each use in the scope.
fn body_literals(policy: &cedar_policy::Policy) -> Vec<EntityUid> {
    let mut literals = policy.entity_literals();
    let mut scope = Vec::new();
    match policy.principal_constraint() {
        PrincipalConstraint::In(e)
        | PrincipalConstraint::Eq(e)
        | PrincipalConstraint::IsIn(_, e) => {
            scope.push(e);
        }
        PrincipalConstraint::Any | PrincipalConstraint::Is(_) => {}
    }
    match policy.action_constraint() {
        ActionConstraint::Eq(e) => scope.push(e),
        ActionConstraint::In(list) => scope.extend(list),
        ActionConstraint::Any => {}
    }
    match policy.resource_constraint() {
        ResourceConstraint::In(e) | ResourceConstraint::Eq(e) | ResourceConstraint::IsIn(_, e) => {
            scope.push(e);
        }
        ResourceConstraint::Any | ResourceConstraint::Is(_) => {}
    }
    for used in scope {
        if let Some(at) = literals.iter().position(|l| *l == used) {
            literals.swap_remove(at);
        }
    }
    literals
}

/// The entity references (`{"__entity": {"type", "id"}}`) in a JSON value of Cedar's
/// entity format.
fn entity_refs(value: &serde_json::Value, out: &mut Vec<EntityUid>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(r) = map.get("__entity")
                && let (Some(kind), Some(id)) = (
                    r.get("type").and_then(|t| t.as_str()),
                    r.get("id").and_then(|i| i.as_str()),
                )
                && let Ok(kind) = EntityTypeName::from_str(kind)
            {
                out.push(EntityUid::from_type_name_and_id(kind, EntityId::new(id)));
                return;
            }
            map.values().for_each(|v| entity_refs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| entity_refs(v, out)),
        _ => {}
    }
}
