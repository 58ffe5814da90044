//! Cedar: the policies a `.rl` file imports, validated against their schema in strict mode,
//! with the entities they are evaluated with; and what a request is in Cedar's terms.
//!
//! A request is asked about as (principal, action, resource, context):
//! - the principal is a `{Namespace}::User`: the user id, else `token:` and the API token's
//!   keyed hash, else `ip:` and the client address, else `anonymous`; its parents (roles,
//!   groups, tenants) come from the imported entities file;
//! - the action is a `{Namespace}::Action` the policy names (`authorize action "read"`);
//! - the resource is a `{Namespace}::Endpoint` whose id is the route template the limit
//!   matched (`/api/v1/orders/{id}`), else the canonical path;
//! - the context holds `ip` (an `ipaddr`), `method`, `path` and `host` (strings).
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
use crate::plan::KeyHasher;
use crate::request::RequestCtx;

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
    /// Client addresses as Cedar `ipaddr` values: Cedar parses the extension's name with
    /// its full grammar on every `RestrictedExpression::new_ip`, a third of a question.
    addresses: quick_cache::sync::Cache<std::net::IpAddr, RestrictedExpression>,
}

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
        let (Some(principal_type), Some(resource_type)) =
            (type_name(PRINCIPAL_TYPE), type_name(RESOURCE_TYPE))
        else {
            errors.push(LoadProblem::about(
                ImportPart::Namespace,
                "not a Cedar namespace",
                "use a name like `Api` or `My::App`",
            ));
            return Err(errors);
        };
        if let Some(schema) = &schema {
            for (wanted, what) in [
                (&principal_type, "principals"),
                (&resource_type, "resources"),
            ] {
                if !schema.entity_types().any(|t| t == wanted) {
                    errors.push(LoadProblem::about(
                        ImportPart::Schema,
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

    /// The request's principal.
    pub fn principal(&self, request: &RequestCtx, hasher: &KeyHasher) -> EntityUid {
        let id = if let Some(user) = &request.user_id {
            user.clone()
        } else if let Some(token) = &request.api_token {
            format!("token:{}", hasher.hash(token))
        } else if let Some(ip) = request.client_ip {
            format!("ip:{ip}")
        } else {
            "anonymous".to_owned()
        };
        EntityUid::from_type_name_and_id(self.principal_type.clone(), EntityId::new(id))
    }

    /// Whether `principal` is `ancestor` or a descendant of it (Cedar's `principal in …`).
    pub fn principal_in(&self, principal: &EntityUid, ancestor: &EntityUid) -> bool {
        self.entities.is_ancestor_of(ancestor, principal)
    }

    /// Cedar's answer for `principal` doing `action` on `resource` (a route template or path),
    /// with the request as context. Cached when the answer cannot depend on the context.
    pub fn decide(
        &self,
        principal: &EntityUid,
        action: &str,
        resource: &str,
        request: &RequestCtx,
        now_micros: u64,
    ) -> Arc<Answer> {
        let Some(slice) = self.by_action.get(action) else {
            // Compiled plans prepare every action they ask about; an unknown one permits
            // nothing.
            return Arc::new(Answer {
                allowed: false,
                policies: Vec::new(),
                errors: vec![format!("unknown action `{action}`")],
            });
        };
        let key = slice
            .cacheable
            .then(|| cache::Key::new(principal, action, resource));
        if let Some(key) = &key
            && let Some(answer) = self.cache.get(key, now_micros)
        {
            return answer;
        }
        let policies = self.policies_for(slice, principal, resource);
        let answer = Arc::new(self.evaluate(&policies, principal, action, resource, request));
        if let Some(key) = key {
            self.cache.insert(key, Arc::clone(&answer), now_micros);
        }
        answer
    }

    /// The policies of `slice` whose scope can hold for `principal` and `resource`, given
    /// the entities' hierarchy: the others cannot be satisfied, so Cedar's answer (decision,
    /// reasons, errors) is the same without them.
    fn policies_for(&self, slice: &Slice, principal: &EntityUid, resource: &str) -> Arc<PolicySet> {
        let resource =
            EntityUid::from_type_name_and_id(self.resource_type.clone(), EntityId::new(resource));
        let ancestors = |e: &EntityUid| -> Vec<EntityUid> {
            self.entities
                .ancestors(e)
                .map(|a| a.cloned().collect())
                .unwrap_or_default()
        };
        let (p_up, r_up) = (ancestors(principal), ancestors(&resource));
        let mut bits = vec![0u64; slice.scoped.len().div_ceil(64)];
        for (i, scoped) in slice.scoped.iter().enumerate() {
            if scoped.principal.holds(principal, &p_up) && scoped.resource.holds(&resource, &r_up) {
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
    pub fn decide_unsliced(
        &self,
        principal: &EntityUid,
        action: &str,
        resource: &str,
        request: &RequestCtx,
    ) -> Answer {
        self.evaluate(&self.policies, principal, action, resource, request)
    }

    fn evaluate(
        &self,
        policies: &PolicySet,
        principal: &EntityUid,
        action: &str,
        resource: &str,
        request: &RequestCtx,
    ) -> Answer {
        let action_uid = self.action_uid(action);
        let resource =
            EntityUid::from_type_name_and_id(self.resource_type.clone(), EntityId::new(resource));
        let context = self.context(request);
        let request = match Request::new(principal.clone(), action_uid, resource, context, None) {
            Ok(request) => request,
            Err(e) => {
                return Answer {
                    allowed: false,
                    policies: Vec::new(),
                    errors: vec![e.to_string()],
                };
            }
        };
        let response = self
            .authorizer
            .is_authorized(&request, policies, &self.entities);
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

    /// The request's context: `ip` (an `ipaddr`; `0.0.0.0` when unknown), `method`, `path`
    /// and `host` (strings; the host empty when unknown).
    fn context(&self, request: &RequestCtx) -> Context {
        let ip = request
            .client_ip
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let ip = self
            .addresses
            .get_or_insert_with(&ip, || {
                Ok::<_, std::convert::Infallible>(RestrictedExpression::new_ip(ip.to_string()))
            })
            .unwrap_or_else(|never| match never {});
        let pairs = [
            ("ip", ip),
            (
                "method",
                RestrictedExpression::new_string(request.method.as_str().to_owned()),
            ),
            (
                "path",
                RestrictedExpression::new_string(request.path.clone()),
            ),
            (
                "host",
                RestrictedExpression::new_string(request.host.clone().unwrap_or_default()),
            ),
        ];
        Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)))
            .unwrap_or_else(|_| Context::empty())
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
type Asked = (usize, Arc<str>, String, Arc<Answer>);

/// What one request asks Cedar, kept while the request is decided: the principal of each
/// set (built once), the answers so far (each question asked once), and the resource of the
/// limit being looked at.
pub struct Asking<'a> {
    sets: &'a [Arc<CedarSet>],
    hasher: &'a KeyHasher,
    now_micros: u64,
    resource: std::cell::RefCell<Option<Arc<str>>>,
    principals: std::cell::RefCell<Vec<(usize, Arc<EntityUid>)>>,
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
            principals: std::cell::RefCell::new(Vec::new()),
            answers: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// The route template the next questions are about (`None`: the request's path).
    pub fn set_resource(&self, template: Option<&Arc<str>>) {
        *self.resource.borrow_mut() = template.cloned();
    }

    /// The request's principal in set `set`.
    pub fn principal(&self, request: &RequestCtx, set: usize) -> Arc<EntityUid> {
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
        if let Some((.., answer)) = self
            .answers
            .borrow()
            .iter()
            .find(|(s, a, r, _)| *s == set && a == action && r == resource)
        {
            return Arc::clone(answer);
        }
        let principal = self.principal(request, set);
        let answer = self.sets[set].decide(&principal, action, resource, request, self.now_micros);
        self.answers.borrow_mut().push((
            set,
            Arc::clone(action),
            resource.to_owned(),
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
