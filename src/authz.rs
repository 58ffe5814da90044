//! Cedar: the policies a `.rl` file imports, validated against their schema in strict mode,
//! with the entities they are evaluated with; and what a request is in Cedar's terms.
//!
//! A request is asked about as (principal, action, resource, context):
//! - the principal is a `{Namespace}::User`: the user id, else `token:` and the API token's
//!   keyed hash, else `ip:` and the client address, else `anonymous`; its parents (roles,
//!   groups, tenants) come from the imported entities file and from the claims and headers
//!   the import names (`parents Role from claim("roles");`);
//! - the action is a `{Namespace}::Action` the policy names (`authorize action "read"`);
//! - the resource is a `{Namespace}::Endpoint` whose id is the route template the limit
//!   matched (`/api/v1/orders/{id}`), else the canonical path;
//! - the context holds `ip` (an `ipaddr`), `method`, `path` and `host` (strings), `tier`
//!   (the limit's tier, when its table does not itself ask Cedar) and the attributes the
//!   import names (`context "client" from header("X-Client");`).
//!
//! Everything static (policies, schema, entities, the policies sliced per action) is built once
//! per plan. Answers are cached for a short time per (principal, action, resource) when no
//! policy of the slice reads the context (see [`AnswerCache`]).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Entities, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    RestrictedExpression,
};

use crate::diagnostic::PolicyError;
use crate::request::RequestCtx;
use crate::request::{KeyHasher, ValueFrom};

mod asking;
mod cache;
mod evaluate;
mod load;
mod reach;

pub use self::asking::Asking;
pub use self::cache::{AnswerCache, DEFAULT_CAPACITY, DEFAULT_TTL_MICROS};
use self::reach::Reach;

/// The entity type of principals, in the import's namespace.
pub const PRINCIPAL_TYPE: &str = "User";
/// The entity type of resources, in the import's namespace.
pub const RESOURCE_TYPE: &str = "Endpoint";
/// The action classification asks about when the tier table names none.
pub const DEFAULT_CLASSIFY_ACTION: &str = "read";

/// The files of one `import cedar` statement.
#[derive(Debug, Clone)]
pub struct CedarFiles<'a> {
    /// The policies.
    pub policies: &'a Path,
    /// The schema (Cedar's human-readable format).
    pub schema: Option<&'a Path>,
    /// The entities (Cedar's JSON format).
    pub entities: Option<&'a Path>,
    /// The Cedar namespace of the entity types (`Api`).
    pub namespace: Option<&'a str>,
    /// The principals' entity type, without the namespace (`None`: `User`).
    pub principal_type: Option<&'a str>,
    /// The resources' entity type, without the namespace (`None`: `Endpoint`).
    pub resource_type: Option<&'a str>,
    /// The principal's parents each request names: entity type (without the namespace) and
    /// where the list of ids comes from.
    pub parents: &'a [(String, ValueFrom)],
    /// The context attributes each request adds: name and where the value comes from.
    pub context: &'a [(String, ValueFrom)],
}

/// The most parents one request may name (more are ignored).
pub const MAX_REQUEST_PARENTS: usize = 32;
/// The longest parent id a request may name (longer ones are ignored).
pub const MAX_PARENT_ID_LEN: usize = 256;
/// Context attribute names Tollgate sets itself.
pub const BUILT_IN_CONTEXT: [&str; 5] = ["ip", "method", "path", "host", "tier"];

/// A request's principal: its entity, and the parents the request itself names (from the
/// claims and headers the import lists), sorted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The entity (`Api::User::"alice"`).
    pub uid: EntityUid,
    /// Parents from the request (`Api::Role::"staff"`), beside those of the entities file.
    pub parents: Vec<EntityUid>,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.uid)?;
        if !self.parents.is_empty() {
            let parents: Vec<String> = self.parents.iter().map(ToString::to_string).collect();
            write!(f, " (in {} from the request)", parents.join(", "))?;
        }
        Ok(())
    }
}

/// Which entities a question with request parents is evaluated over.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Those the evaluation can reach (requests).
    Reached,
    /// The whole file (the reference).
    Whole,
}

/// One question to Cedar: may `principal` do `action` on `resource`, with the limit's `tier`
/// in the context?
#[derive(Debug, Clone, Copy)]
pub struct Question<'q> {
    /// Who asks.
    pub principal: &'q Principal,
    /// The action (`read`).
    pub action: &'q str,
    /// The route template, else the path.
    pub resource: &'q str,
    /// The tier of the limit being decided, when known.
    pub tier: Option<&'q str>,
}

/// One imported Cedar policy set, ready to answer.
pub struct CedarSet {
    /// The policy file's name, for messages.
    name: Arc<str>,
    namespace: Option<Arc<str>>,
    policies: PolicySet,
    /// The policies whose action scope can match each action, by action name.
    by_action: HashMap<String, Slice>,
    /// Each policy's place in its file, for `pick first`.
    order: HashMap<PolicyId, usize>,
    entities: Entities,
    authorizer: Authorizer,
    principal_type: EntityTypeName,
    resource_type: EntityTypeName,
    /// Declared actions (with a schema); `None`: any action name is accepted.
    actions: Option<Vec<String>>,
    /// Declared entity types (with a schema); `None`: any type is accepted.
    entity_types: Option<Vec<EntityTypeName>>,
    cache: AnswerCache,
    /// The principal's parents each request names.
    request_parents: Vec<(EntityTypeName, ValueFrom)>,
    /// The context attributes each request adds.
    request_context: Vec<(String, ValueFrom)>,
    /// What evaluation reaches, for questions whose principal names parents.
    reach: Reach,
    /// The entities built for such questions, per question: the same user with the same
    /// roles asks again, and the entities do not change while the plan serves.
    reached: quick_cache::sync::Cache<cache::Key, Arc<Entities>>,
    /// Client addresses as Cedar `ipaddr` values: Cedar parses the extension's name with
    /// its full grammar on every `RestrictedExpression::new_ip`, a third of a question.
    addresses: quick_cache::sync::Cache<std::net::IpAddr, RestrictedExpression>,
}

/// Entity sets kept for questions whose principal names parents.
const REACHED_KEPT: usize = 10_000;

/// Client addresses kept as Cedar values.
const ADDRESSES_KEPT: usize = 10_000;

/// The policies that can apply to one action.
struct Slice {
    /// The policies, each with the entity its principal and resource scopes name.
    scoped: Vec<Scoped>,
    /// Whether an answer depends only on (principal, action, resource): no policy of the
    /// slice reads the context.
    cacheable: bool,
    /// The policy sets built so far, by which of `scoped` they hold (one bit each): requests
    /// whose principals share roles share a set.
    built: std::sync::Mutex<HashMap<Vec<u64>, Arc<PolicySet>>>,
}

/// Policy sets kept per slice before the memo starts over.
const MAX_BUILT: usize = 4_096;

/// A policy and what its scope requires of the principal and the resource.
struct Scoped {
    policy: cedar_policy::Policy,
    principal: Needs,
    resource: Needs,
}

/// What a scope requires of an entity (its type was checked when the slice was built).
enum Needs {
    /// Anything.
    Any,
    /// To be this entity (`==`).
    Is(EntityUid),
    /// To be this entity or one of its descendants (`in`).
    In(EntityUid),
}

impl Needs {
    fn holds(&self, entity: &EntityUid, ancestors: &[EntityUid]) -> bool {
        match self {
            Needs::Any => true,
            Needs::Is(e) => e == entity,
            Needs::In(e) => e == entity || ancestors.contains(e),
        }
    }
}

impl fmt::Debug for CedarSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CedarSet")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("policies", &self.policies.policies().count())
            .field("entities", &self.entities.len())
            .finish_non_exhaustive()
    }
}

/// Which part of an import a problem is about, when Cedar cannot say where in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportPart {
    /// The policy file.
    Policies,
    /// The schema file.
    Schema,
    /// The entities file.
    Entities,
    /// The namespace.
    Namespace,
    /// The `principal` statement (else the schema).
    PrincipalType,
    /// The `resource` statement (else the schema).
    ResourceType,
    /// The n-th `parents` statement of the import's block.
    Parents(usize),
}

/// A problem with an import: located in a Cedar file, or about a part of the import (the
/// compiler points at that part of the `import` statement).
#[derive(Debug)]
pub enum LoadProblem {
    /// Located in a Cedar file.
    Located(PolicyError),
    /// About a part of the import.
    About {
        /// The part.
        part: ImportPart,
        /// What is wrong.
        message: String,
        /// What to do.
        help: String,
    },
}

impl LoadProblem {
    fn about(part: ImportPart, message: impl Into<String>, help: impl Into<String>) -> Self {
        LoadProblem::About {
            part,
            message: message.into(),
            help: help.into(),
        }
    }
}

/// Cedar's answer for one (principal, action, resource).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Whether Cedar permits.
    pub allowed: bool,
    /// The determining policies: those that permit when allowed, those that forbid when
    /// denied by a `forbid` (none when nothing permits), in file order.
    pub policies: Vec<Arc<str>>,
    /// Evaluation errors (a policy that failed to evaluate does not apply).
    pub errors: Vec<String>,
}

impl CedarSet {
    /// The policy file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.policies.policies().count()
    }

    /// Whether the set holds no policy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `action` is one the schema declares (any action without a schema).
    pub fn knows_action(&self, action: &str) -> bool {
        self.actions
            .as_ref()
            .is_none_or(|actions| actions.iter().any(|a| a == action))
    }

    /// The declared actions, for messages.
    pub fn action_names(&self) -> Vec<&str> {
        self.actions.iter().flatten().map(String::as_str).collect()
    }

    /// Makes sure `action` has its slice (sets without a schema add them as the compiler
    /// meets actions).
    pub fn prepare_action(&mut self, action: &str) {
        if !self.by_action.contains_key(action) {
            self.add_slice(action, &Entities::empty());
        }
    }

    /// The entity an ancestor reference (`Role "staff"`) names, in this set's namespace.
    pub fn entity(&self, kind: &str, id: &str) -> Option<EntityUid> {
        let full = match &self.namespace {
            Some(ns) => format!("{ns}::{kind}"),
            None => kind.to_owned(),
        };
        let kind = EntityTypeName::from_str(&full).ok()?;
        Some(EntityUid::from_type_name_and_id(kind, EntityId::new(id)))
    }

    /// Whether the schema (if any) declares the type of `entity`.
    pub fn knows_entity_type(&self, entity: &EntityUid) -> bool {
        self.entity_types
            .as_ref()
            .is_none_or(|types| types.contains(entity.type_name()))
    }

    /// Replaces the answer cache (size and lifetime come from the settings).
    pub fn set_cache(&mut self, cache: AnswerCache) {
        self.cache = cache;
    }

    /// The request's principal, with the parents the request names.
    pub fn principal(&self, request: &RequestCtx, hasher: &KeyHasher) -> Principal {
        let id = if let Some(user) = &request.user_id {
            user.clone()
        } else if let Some(token) = &request.api_token {
            format!("token:{}", hasher.hash(token))
        } else if let Some(ip) = request.client_ip {
            format!("ip:{ip}")
        } else {
            "anonymous".to_owned()
        };
        let uid = EntityUid::from_type_name_and_id(self.principal_type.clone(), EntityId::new(id));
        let mut parents: Vec<EntityUid> = self
            .request_parents
            .iter()
            .flat_map(|(kind, from)| {
                from.read(request)
                    .into_iter()
                    .flat_map(|list| list.split(','))
                    .map(str::trim)
                    .filter(|id| !id.is_empty() && id.len() <= MAX_PARENT_ID_LEN)
                    .map(|id| EntityUid::from_type_name_and_id(kind.clone(), EntityId::new(id)))
            })
            .take(MAX_REQUEST_PARENTS)
            .collect();
        parents.sort();
        parents.dedup();
        Principal { uid, parents }
    }

    /// Whether `principal` is `ancestor` or a descendant of it (Cedar's `principal in …`),
    /// through the entities file or the parents the request names.
    pub fn principal_in(&self, principal: &Principal, ancestor: &EntityUid) -> bool {
        principal.uid == *ancestor
            || self.entities.is_ancestor_of(ancestor, &principal.uid)
            || principal
                .parents
                .iter()
                .any(|p| p == ancestor || self.entities.is_ancestor_of(ancestor, p))
    }

    /// The values of annotation `key` on `policies`, in their order.
    pub fn annotations<'s>(
        &'s self,
        policies: &'s [Arc<str>],
        key: &'s str,
    ) -> impl Iterator<Item = &'s str> + 's {
        policies
            .iter()
            .filter_map(move |id| self.policies.annotation(&PolicyId::new(&**id), key))
    }

    fn action_uid(&self, action: &str) -> EntityUid {
        let kind = match &self.namespace {
            Some(ns) => format!("{ns}::Action"),
            None => "Action".to_owned(),
        };
        // The namespace was checked when the set was loaded.
        let kind = EntityTypeName::from_str(&kind).unwrap_or_else(|_| self.principal_type.clone());
        EntityUid::from_type_name_and_id(kind, EntityId::new(action))
    }
}
