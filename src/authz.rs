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
    ActionConstraint, Authorizer, Context, Decision, Entities, EntityId, EntityTypeName, EntityUid,
    PolicyId, PolicySet, PrincipalConstraint, Request, ResourceConstraint, RestrictedExpression,
    Schema, ValidationMode, Validator,
};

use crate::diagnostic::{PolicyError, SourceFile, Span};
use crate::request::RequestCtx;
use crate::request::{KeyHasher, ValueFrom};

mod cache;

pub use self::cache::{AnswerCache, DEFAULT_CAPACITY, DEFAULT_TTL_MICROS};

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

/// What evaluation can reach besides the principal, the resource and the action: the
/// policies' entity literals and the action entities, and which entities each entity's
/// attributes and tags name. Built at load when the import names request parents (else
/// evaluation uses the whole entities file, and this stays empty).
#[derive(Debug, Default)]
struct Reach {
    always: Vec<EntityUid>,
    refs: HashMap<EntityUid, Vec<EntityUid>>,
    /// The entities with attributes or tags.
    described: std::collections::HashSet<EntityUid>,
}

impl Reach {
    fn new(policies: &PolicySet, entities: &Entities) -> Reach {
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
    fn from<'a>(&'a self, uid: &EntityUid) -> impl Iterator<Item = EntityUid> + 'a {
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
    /// Reads, parses and validates the files of one import. Every problem is returned, each
    /// located in its file when Cedar says where.
    pub fn load(files: &CedarFiles<'_>) -> Result<CedarSet, Vec<LoadProblem>> {
        let mut errors = Vec::new();
        let read = |path: &Path, part, errors: &mut Vec<LoadProblem>| match std::fs::read_to_string(
            path,
        ) {
            Ok(text) => Some(SourceFile::new(path.display().to_string(), text)),
            Err(e) => {
                errors.push(LoadProblem::about(
                    part,
                    format!("cannot read `{}`: {e}", path.display()),
                    "check the path and the file's permissions",
                ));
                None
            }
        };
        let policy_file = read(files.policies, ImportPart::Policies, &mut errors);
        let schema_file = files
            .schema
            .and_then(|p| read(p, ImportPart::Schema, &mut errors));
        let entities_file = files
            .entities
            .and_then(|p| read(p, ImportPart::Entities, &mut errors));

        let policies = policy_file.as_ref().and_then(|source| {
            let mut located = Vec::new();
            let parsed = parse_policies(source, &mut located);
            errors.extend(located.into_iter().map(LoadProblem::Located));
            parsed
        });
        let schema = schema_file.as_ref().and_then(|source| {
            match Schema::from_cedarschema_str(source.text()) {
                Ok((schema, _warnings)) => Some(schema),
                Err(e) => {
                    errors.push(LoadProblem::Located(cedar_error(source, &e, SCHEMA_HELP)));
                    None
                }
            }
        });
        let namespace = files.namespace.map(Arc::from);
        let type_name = |name: &str| -> Option<EntityTypeName> {
            let full = match files.namespace {
                Some(ns) => format!("{ns}::{name}"),
                None => name.to_owned(),
            };
            EntityTypeName::from_str(&full).ok()
        };
        let (Some(principal_type), Some(resource_type)) = (
            type_name(files.principal_type.unwrap_or(PRINCIPAL_TYPE)),
            type_name(files.resource_type.unwrap_or(RESOURCE_TYPE)),
        ) else {
            errors.push(LoadProblem::about(
                ImportPart::Namespace,
                "not a Cedar namespace",
                "use a name like `Api` or `My::App`",
            ));
            return Err(errors);
        };
        if let Some(schema) = &schema {
            for (wanted, what, named) in [
                (
                    &principal_type,
                    "principals",
                    files.principal_type.is_some(),
                ),
                (&resource_type, "resources", files.resource_type.is_some()),
            ] {
                if !schema.entity_types().any(|t| t == wanted) {
                    let part = match (named, what) {
                        (false, _) => ImportPart::Schema,
                        (true, "principals") => ImportPart::PrincipalType,
                        (true, _) => ImportPart::ResourceType,
                    };
                    errors.push(LoadProblem::about(
                        part,
                        format!(
                            "the schema declares no entity type `{wanted}`: Tollgate's {what} are `{wanted}` entities"
                        ),
                        format!(
                            "declare `entity {}` in the schema's namespace, or name the namespace in the import",
                            wanted.basename()
                        ),
                    ));
                }
            }
        }
        let mut request_parents = Vec::new();
        for (i, (name, from)) in files.parents.iter().enumerate() {
            let Some(kind) = type_name(name) else {
                errors.push(LoadProblem::about(
                    ImportPart::Parents(i),
                    format!("`{name}` is not a Cedar entity type name"),
                    "name a type the schema declares, like `Role`",
                ));
                continue;
            };
            if let Some(schema) = &schema {
                let can_parent = schema
                    .ancestors(&principal_type)
                    .is_some_and(|mut up| up.any(|t| *t == kind));
                if !can_parent {
                    errors.push(LoadProblem::about(
                        ImportPart::Parents(i),
                        format!("in the schema, `{principal_type}` cannot be a member of `{kind}`"),
                        format!(
                            "declare `entity {} in [{}]` (and `entity {}`) in the schema",
                            principal_type.basename(),
                            kind.basename(),
                            kind.basename()
                        ),
                    ));
                    continue;
                }
            }
            request_parents.push((kind, from.clone()));
        }
        if let (Some(schema), Some((policies, _)), Some(source)) =
            (&schema, &policies, &policy_file)
        {
            let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
            for e in result.validation_errors() {
                errors.push(LoadProblem::Located(cedar_error(
                    source,
                    e,
                    VALIDATION_HELP,
                )));
            }
        }
        let entities = match (&entities_file, &schema) {
            (Some(source), schema) => match Entities::from_json_str(source.text(), schema.as_ref())
            {
                Ok(entities) => Some(entities),
                Err(e) => {
                    errors.push(LoadProblem::about(
                        ImportPart::Entities,
                        format!("`{}`: {}", source.name(), chain(&e)),
                        "the entities must match the schema: types, attributes and parents",
                    ));
                    None
                }
            },
            (None, _) => Some(Entities::empty()),
        };
        let (Some((policies, order)), Some(entities), true) =
            (policies, entities, errors.is_empty())
        else {
            return Err(errors);
        };
        let actions = schema.as_ref().map(|s| {
            s.actions()
                .map(|a| a.id().unescaped().to_owned())
                .collect::<Vec<_>>()
        });
        // With a schema, actions are known and their groups too; without, every action name a
        // policy mentions gets a slice when it is first needed at compile time.
        let action_entities = schema
            .as_ref()
            .and_then(|s| s.action_entities().ok())
            .unwrap_or_else(Entities::empty);
        let reach = if request_parents.is_empty() {
            Reach::default()
        } else {
            Reach::new(&policies, &entities)
        };
        let mut set = CedarSet {
            name: Arc::from(files.policies.display().to_string()),
            namespace,
            policies,
            by_action: HashMap::new(),
            order,
            entities,
            authorizer: Authorizer::new(),
            principal_type,
            resource_type,
            actions,
            entity_types: schema.as_ref().map(|s| s.entity_types().cloned().collect()),
            cache: AnswerCache::default(),
            reach,
            reached: quick_cache::sync::Cache::new(REACHED_KEPT),
            request_parents,
            request_context: files.context.to_vec(),
            addresses: quick_cache::sync::Cache::new(ADDRESSES_KEPT),
        };
        for action in set.actions.clone().unwrap_or_default() {
            set.add_slice(&action, &action_entities);
        }
        Ok(set)
    }

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

    /// The policies whose scope can match `action` with Tollgate's principal and resource
    /// types: the index that keeps evaluation from growing with unrelated policies.
    fn add_slice(&mut self, action: &str, action_entities: &Entities) {
        let action_uid = self.action_uid(action);
        let mut scoped = Vec::new();
        let mut cacheable = true;
        for policy in self.policies.policies() {
            let action_matches = match policy.action_constraint() {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(a) => a == action_uid,
                ActionConstraint::In(list) => list
                    .iter()
                    .any(|a| *a == action_uid || action_entities.is_ancestor_of(a, &action_uid)),
            };
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Any => Some(Needs::Any),
                PrincipalConstraint::Eq(p) => {
                    (*p.type_name() == self.principal_type).then_some(Needs::Is(p))
                }
                PrincipalConstraint::In(p) => Some(Needs::In(p)),
                PrincipalConstraint::Is(t) => (t == self.principal_type).then_some(Needs::Any),
                PrincipalConstraint::IsIn(t, p) => {
                    (t == self.principal_type).then_some(Needs::In(p))
                }
            };
            let resource = match policy.resource_constraint() {
                ResourceConstraint::Any => Some(Needs::Any),
                ResourceConstraint::Eq(r) => {
                    (*r.type_name() == self.resource_type).then_some(Needs::Is(r))
                }
                ResourceConstraint::In(r) => Some(Needs::In(r)),
                ResourceConstraint::Is(t) => (t == self.resource_type).then_some(Needs::Any),
                ResourceConstraint::IsIn(t, r) => (t == self.resource_type).then_some(Needs::In(r)),
            };
            if let (true, Some(principal), Some(resource)) = (action_matches, principal, resource) {
                cacheable &= !reads_context(&policy.to_string());
                scoped.push(Scoped {
                    policy: policy.clone(),
                    principal,
                    resource,
                });
            }
        }
        self.by_action.insert(
            action.to_owned(),
            Slice {
                scoped,
                cacheable,
                built: std::sync::Mutex::new(HashMap::new()),
            },
        );
    }
}

/// Whether a policy's text mentions `context` as a word (conservative: a string holding the
/// word also counts).
fn reads_context(text: &str) -> bool {
    text.match_indices("context").any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + "context".len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Parses a policy file; each policy is named by its `@id` annotation, else `file#n` (the
/// n-th policy of the file). A duplicate `@id` and templates are errors.
fn parse_policies(
    source: &SourceFile,
    errors: &mut Vec<PolicyError>,
) -> Option<(PolicySet, HashMap<PolicyId, usize>)> {
    let parsed = match PolicySet::from_str(source.text()) {
        Ok(set) => set,
        Err(e) => {
            for error in e.iter() {
                errors.push(cedar_error(source, error, SYNTAX_HELP));
            }
            return None;
        }
    };
    if let Some(template) = parsed.templates().next() {
        let span = annotation_span(source.text(), template.id().as_ref(), 1);
        errors.push(
            PolicyError::new(
                source,
                span.unwrap_or(Span::new(0, 0)),
                format!(
                    "`{}` is a template (it has `?principal` or `?resource`)",
                    template.id()
                ),
                "a template",
            )
            .with_help("Tollgate evaluates static policies only: write the principal or resource"),
        );
        return None;
    }
    let mut numbered: Vec<(usize, &cedar_policy::Policy)> = parsed
        .policies()
        .map(|p| {
            let id: &str = p.id().as_ref();
            let n = id
                .strip_prefix("policy")
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            (n, p)
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    let stem = Path::new(source.name()).file_name().map_or_else(
        || source.name().to_owned(),
        |f| f.to_string_lossy().into_owned(),
    );
    let mut set = PolicySet::new();
    let mut order = HashMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut ok = true;
    for (n, policy) in numbered {
        let id = match policy.annotation("id") {
            Some(id) => id.to_owned(),
            None => format!("{stem}#{}", n + 1),
        };
        let occurrence = seen.entry(id.clone()).or_insert(0);
        *occurrence += 1;
        if *occurrence > 1 {
            ok = false;
            let span = annotation_span(source.text(), &id, *occurrence).unwrap_or(Span::new(0, 0));
            errors.push(
                PolicyError::new(
                    source,
                    span,
                    format!("policy id `{id}` is used twice"),
                    "used again here",
                )
                .with_help("each `@id(\"…\")` names one policy; rename one of them"),
            );
            continue;
        }
        order.insert(PolicyId::new(&id), n);
        if set.add(policy.new_id(PolicyId::new(&id))).is_err() {
            ok = false;
        }
    }
    ok.then_some((set, order))
}

/// Where the `occurrence`-th `@id("id")` of a file is.
fn annotation_span(text: &str, id: &str, occurrence: usize) -> Option<Span> {
    let pattern = format!(r#"@id\s*\(\s*"{}"\s*\)"#, regex::escape(id));
    let re = regex::Regex::new(&pattern).ok()?;
    let m = re.find_iter(text).nth(occurrence - 1)?;
    Some(Span::new(m.start(), m.end()))
}

const SCHEMA_HELP: &str =
    "see the Cedar schema format: https://docs.cedarpolicy.com/schema/human-readable-schema.html";
const VALIDATION_HELP: &str =
    "policies are validated against the schema in strict mode; fix the policy or the schema";
const SYNTAX_HELP: &str =
    "see the Cedar policy syntax: https://docs.cedarpolicy.com/policies/syntax-policy.html";

/// An error and its sources, in one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    // Cedar's errors often carry their detail in the source chain.
    let mut cause = error.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
}

/// A Cedar diagnostic as a policy error: its first label located in `source`, its help (or
/// `default_help`).
fn cedar_error(
    source: &SourceFile,
    diagnostic: &dyn miette::Diagnostic,
    default_help: &str,
) -> PolicyError {
    let message = chain(diagnostic);
    let label = diagnostic.labels().and_then(|mut labels| labels.next());
    let len = source.text().len();
    let mut error = match label {
        Some(label) => {
            let start = label.offset().min(len);
            let end = (label.offset() + label.len()).min(len);
            PolicyError::new(
                source,
                Span::new(start, end),
                message,
                label.label().unwrap_or("here"),
            )
        }
        None => PolicyError::new(source, Span::new(0, 0), message, "in this file"),
    };
    error = error.with_help(
        diagnostic
            .help()
            .map_or_else(|| default_help.to_owned(), |h| h.to_string()),
    );
    error
}

/// One question asked (set, action, resource) and its answer.
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
