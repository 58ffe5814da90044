//! Loading one import: reading its files, parsing the policies (each named by its `@id`),
//! validating them against the schema in strict mode, reading the entities, and slicing the
//! policies per action. Every problem is collected, each located where Cedar says.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Authorizer, Entities, EntityTypeName, PolicyId, PolicySet,
    PrincipalConstraint, ResourceConstraint, Schema, ValidationMode, Validator,
};

use super::reach::Reach;
use super::{
    ADDRESSES_KEPT, AnswerCache, CedarFiles, CedarSet, ImportPart, LoadProblem, Needs,
    PRINCIPAL_TYPE, REACHED_KEPT, RESOURCE_TYPE, Scoped, Slice,
};
use crate::diagnostic::{PolicyError, SourceFile, Span};
use crate::request::ValueFrom;

impl CedarSet {
    /// Reads, parses and validates the files of one import. Every problem is returned, each
    /// located in its file when Cedar says where.
    pub fn load(files: &CedarFiles<'_>) -> Result<CedarSet, Vec<LoadProblem>> {
        let mut l = Loading {
            files,
            errors: Vec::new(),
        };
        let policy_file = l.read(files.policies, ImportPart::Policies);
        let schema_file = files.schema.and_then(|p| l.read(p, ImportPart::Schema));
        let entities_file = files.entities.and_then(|p| l.read(p, ImportPart::Entities));
        let policies = policy_file.as_ref().and_then(|source| l.policies(source));
        let schema = schema_file.as_ref().and_then(|source| l.schema(source));
        let Some((principal_type, resource_type)) = l.entity_types(schema.as_ref()) else {
            return Err(l.errors);
        };
        let request_parents = l.request_parents(schema.as_ref(), &principal_type);
        if let (Some(schema), Some((policies, _)), Some(source)) =
            (&schema, &policies, &policy_file)
        {
            l.validate(schema, policies, source);
        }
        let entities = l.entities(entities_file.as_ref(), schema.as_ref());
        let (Some((policies, order)), Some(entities), true) =
            (policies, entities, l.errors.is_empty())
        else {
            return Err(l.errors);
        };
        let reach = if request_parents.is_empty() {
            Reach::default()
        } else {
            Reach::new(&policies, &entities)
        };
        let mut set = CedarSet {
            name: Arc::from(files.policies.display().to_string()),
            namespace: files.namespace.map(Arc::from),
            policies,
            by_action: HashMap::new(),
            order,
            entities,
            authorizer: Authorizer::new(),
            principal_type,
            resource_type,
            actions: schema.as_ref().map(|s| {
                s.actions()
                    .map(|a| a.id().unescaped().to_owned())
                    .collect::<Vec<_>>()
            }),
            entity_types: schema.as_ref().map(|s| s.entity_types().cloned().collect()),
            cache: AnswerCache::default(),
            reach,
            reached: quick_cache::sync::Cache::new(REACHED_KEPT),
            request_parents,
            request_context: files.context.to_vec(),
            addresses: quick_cache::sync::Cache::new(ADDRESSES_KEPT),
        };
        // With a schema, actions are known and their groups too; without, every action name
        // a policy mentions gets a slice when it is first needed at compile time.
        let action_entities = schema
            .as_ref()
            .and_then(|s| s.action_entities().ok())
            .unwrap_or_else(Entities::empty);
        for action in set.actions.clone().unwrap_or_default() {
            set.add_slice(&action, &action_entities);
        }
        Ok(set)
    }

    /// The policies whose scope can match `action` with Tollgate's principal and resource
    /// types: the index that keeps evaluation from growing with unrelated policies.
    pub(super) fn add_slice(&mut self, action: &str, action_entities: &Entities) {
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

/// One import being loaded, and the problems found so far.
struct Loading<'f> {
    files: &'f CedarFiles<'f>,
    errors: Vec<LoadProblem>,
}

impl Loading<'_> {
    /// A file of the import, or a problem about `part`.
    fn read(&mut self, path: &Path, part: ImportPart) -> Option<SourceFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(SourceFile::new(path.display().to_string(), text)),
            Err(e) => {
                self.errors.push(LoadProblem::about(
                    part,
                    format!("cannot read `{}`: {e}", path.display()),
                    "check the path and the file's permissions",
                ));
                None
            }
        }
    }

    /// The policies, named, in the file's order.
    fn policies(&mut self, source: &SourceFile) -> Option<(PolicySet, HashMap<PolicyId, usize>)> {
        let mut located = Vec::new();
        let parsed = parse_policies(source, &mut located);
        self.errors
            .extend(located.into_iter().map(LoadProblem::Located));
        parsed
    }

    /// The schema.
    fn schema(&mut self, source: &SourceFile) -> Option<Schema> {
        match Schema::from_cedarschema_str(source.text()) {
            Ok((schema, _warnings)) => Some(schema),
            Err(e) => {
                self.errors
                    .push(LoadProblem::Located(cedar_error(source, &e, SCHEMA_HELP)));
                None
            }
        }
    }

    /// `name` in the import's namespace.
    fn type_name(&self, name: &str) -> Option<EntityTypeName> {
        let full = match self.files.namespace {
            Some(ns) => format!("{ns}::{name}"),
            None => name.to_owned(),
        };
        EntityTypeName::from_str(&full).ok()
    }

    /// The principals' and resources' entity types, which the schema must declare.
    fn entity_types(
        &mut self,
        schema: Option<&Schema>,
    ) -> Option<(EntityTypeName, EntityTypeName)> {
        let files = self.files;
        let (Some(principal_type), Some(resource_type)) = (
            self.type_name(files.principal_type.unwrap_or(PRINCIPAL_TYPE)),
            self.type_name(files.resource_type.unwrap_or(RESOURCE_TYPE)),
        ) else {
            self.errors.push(LoadProblem::about(
                ImportPart::Namespace,
                "not a Cedar namespace",
                "use a name like `Api` or `My::App`",
            ));
            return None;
        };
        let Some(schema) = schema else {
            return Some((principal_type, resource_type));
        };
        for (wanted, what, named) in [
            (
                &principal_type,
                "principals",
                files.principal_type.is_some(),
            ),
            (&resource_type, "resources", files.resource_type.is_some()),
        ] {
            if schema.entity_types().any(|t| t == wanted) {
                continue;
            }
            let part = match (named, what) {
                (false, _) => ImportPart::Schema,
                (true, "principals") => ImportPart::PrincipalType,
                (true, _) => ImportPart::ResourceType,
            };
            self.errors.push(LoadProblem::about(
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
        Some((principal_type, resource_type))
    }

    /// The parents requests name, of types the principal may be a member of.
    fn request_parents(
        &mut self,
        schema: Option<&Schema>,
        principal_type: &EntityTypeName,
    ) -> Vec<(EntityTypeName, ValueFrom)> {
        let mut request_parents = Vec::new();
        for (i, (name, from)) in self.files.parents.iter().enumerate() {
            let Some(kind) = self.type_name(name) else {
                self.errors.push(LoadProblem::about(
                    ImportPart::Parents(i),
                    format!("`{name}` is not a Cedar entity type name"),
                    "name a type the schema declares, like `Role`",
                ));
                continue;
            };
            let can_parent = schema.is_none_or(|schema| {
                schema
                    .ancestors(principal_type)
                    .is_some_and(|mut up| up.any(|t| *t == kind))
            });
            if !can_parent {
                self.errors.push(LoadProblem::about(
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
            request_parents.push((kind, from.clone()));
        }
        request_parents
    }

    /// Strict validation of the policies against the schema.
    fn validate(&mut self, schema: &Schema, policies: &PolicySet, source: &SourceFile) {
        let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
        for e in result.validation_errors() {
            self.errors.push(LoadProblem::Located(cedar_error(
                source,
                e,
                VALIDATION_HELP,
            )));
        }
    }

    /// The entities (none without a file), checked against the schema.
    fn entities(&mut self, file: Option<&SourceFile>, schema: Option<&Schema>) -> Option<Entities> {
        let Some(source) = file else {
            return Some(Entities::empty());
        };
        match Entities::from_json_str(source.text(), schema) {
            Ok(entities) => Some(entities),
            Err(e) => {
                self.errors.push(LoadProblem::about(
                    ImportPart::Entities,
                    format!("`{}`: {}", source.name(), chain(&e)),
                    "the entities must match the schema: types, attributes and parents",
                ));
                None
            }
        }
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
