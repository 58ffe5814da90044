//! Compiling `import cedar` statements: the files resolved next to the policy file, each
//! import loaded and validated once, request parents and context checked, problems located
//! on the statement.

use super::*;

impl Compiler<'_> {
    pub(super) fn import(&mut self, f: usize, import: &ast::ImportStmt) -> Option<CedarImport> {
        let dir = &self.files[f].dir;
        let mut ok = true;
        let mut resolve = |cx: &mut Self, path: &Spanned<String>, what: &str| {
            let full = dir.join(&path.node);
            if !full.is_file() {
                ok = false;
                cx.error_help(
                    f,
                    path.span,
                    format!("cannot find Cedar {what} `{}`", path.node),
                    "no such file",
                    format!(
                        "paths are relative to the policy file; looked for `{}`",
                        full.display()
                    ),
                );
            }
            full
        };
        let policies = resolve(self, &import.cedar, "policy file");
        let schema = import.schema.as_ref().map(|s| resolve(self, s, "schema"));
        let entities = import
            .entities
            .as_ref()
            .map(|e| resolve(self, e, "entities file"));
        if !ok {
            return None;
        }
        if self.file_cedar[f].is_some() {
            self.error_help(
                f,
                import.span,
                "a file imports Cedar policies once",
                "second import",
                "put the policies in one `.cedar` file, or split the limits into two `.rl` files",
            );
            return None;
        }
        let (parents, context) = self.request_values(f, import);
        let files = crate::authz::CedarFiles {
            policies: &policies,
            schema: schema.as_deref(),
            entities: entities.as_deref(),
            namespace: import.namespace.as_ref().map(|n| n.node.as_str()),
            principal_type: self.single(f, &import.principal_type, "principal"),
            resource_type: self.single(f, &import.resource_type, "resource"),
            parents: &parents,
            context: &context,
        };
        match crate::authz::CedarSet::load(&files) {
            Ok(set) => {
                self.file_cedar[f] = Some(self.cedar.len());
                self.cedar.push(set);
            }
            Err(problems) => {
                for problem in problems {
                    self.import_problem(f, import, problem);
                }
            }
        }
        Some(CedarImport {
            policies,
            schema,
            namespace: import
                .namespace
                .as_ref()
                .map(|n| Arc::from(n.node.as_str())),
            entities,
        })
    }

    /// The one value of an import block statement given at most once (`principal Account;`);
    /// the others are reported.
    fn single<'i>(&mut self, f: usize, given: &'i [ast::Ident], what: &str) -> Option<&'i str> {
        for again in given.iter().skip(1) {
            self.error_help(
                f,
                again.span,
                format!("`{what}` is given twice"),
                "second time",
                format!("name the {what} entity type once"),
            );
        }
        given.first().map(|t| t.node.as_str())
    }

    /// The import block's `parents` and `context` statements that are right (the others are
    /// reported, and Cedar still checks the rest).
    #[expect(
        clippy::type_complexity,
        reason = "two lists of (name, source), as CedarFiles takes them"
    )]
    fn request_values(
        &mut self,
        f: usize,
        import: &ast::ImportStmt,
    ) -> (
        Vec<(String, crate::plan::ValueFrom)>,
        Vec<(String, crate::plan::ValueFrom)>,
    ) {
        use crate::authz::BUILT_IN_CONTEXT;
        use crate::plan::ValueFrom;
        let source = |cx: &mut Self, value: &ast::ImportValue| cx.value_from(f, &value.source);
        let mut parents = Vec::new();
        for value in &import.parents {
            // Kept in place (even when its header is wrong) so that Cedar's problems about
            // the n-th statement point at it.
            let from = source(self, value).unwrap_or(ValueFrom::Claim(Arc::from("")));
            parents.push((value.name.node.clone(), from));
        }
        let mut context: Vec<(String, ValueFrom)> = Vec::new();
        for value in &import.context {
            let name = &value.name;
            let identifier = name
                .node
                .starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name
                    .node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !identifier || BUILT_IN_CONTEXT.contains(&name.node.as_str()) {
                self.error_help(
                    f,
                    name.span,
                    format!("`{}` cannot name a context attribute here", name.node),
                    if identifier {
                        "Tollgate sets this one"
                    } else {
                        "not a name"
                    },
                    format!(
                        "use a name like `client_version` (letters, digits, `_`), other than {}",
                        BUILT_IN_CONTEXT.map(|n| format!("`{n}`")).join(", ")
                    ),
                );
                continue;
            }
            if context.iter().any(|(n, _)| *n == name.node) {
                self.error_help(
                    f,
                    name.span,
                    format!("the context attribute `{}` is set twice", name.node),
                    "second time",
                    "each context attribute comes from one header or claim",
                );
                continue;
            }
            if let Some(from) = source(self, value) {
                context.push((name.node.clone(), from));
            }
        }
        (parents, context)
    }

    /// A problem loading an import: where Cedar located it, else at the part of the
    /// `import` statement it is about.
    fn import_problem(
        &mut self,
        f: usize,
        import: &ast::ImportStmt,
        problem: crate::authz::LoadProblem,
    ) {
        use crate::authz::{ImportPart, LoadProblem};
        match problem {
            LoadProblem::Located(error) => self.errors.push(error),
            LoadProblem::About {
                part,
                message,
                help,
            } => {
                let site = match part {
                    ImportPart::Policies => Some(&import.cedar),
                    ImportPart::Schema => import.schema.as_ref(),
                    ImportPart::Entities => import.entities.as_ref(),
                    ImportPart::Namespace => import.namespace.as_ref(),
                    ImportPart::Parents(i) => import.parents.get(i).map(|p| &p.name),
                    ImportPart::PrincipalType => import.principal_type.first(),
                    ImportPart::ResourceType => import.resource_type.first(),
                };
                let span = site.map_or(import.span, |s| s.span);
                self.error_help(f, span, message, "here", help);
            }
        }
    }

    /// The Cedar set file `f`'s `what` asks: the file's own import, else the plan's only one.
    pub(super) fn cedar_for(&mut self, f: usize, span: Span, what: &str) -> Option<usize> {
        if let Some(set) = self.file_cedar[f] {
            return Some(set);
        }
        let imports_here = self.files[f]
            .ast
            .items
            .iter()
            .any(|i| matches!(i, ast::Item::Import(_)));
        let imported: Vec<usize> = self.file_cedar.iter().flatten().copied().collect();
        match imported[..] {
            // The file's own import failed, and was reported.
            _ if imports_here => None,
            [only] => Some(only),
            _ => {
                let help = if imported.is_empty() {
                    "add `import cedar \"policies.cedar\" schema \"policies.cedarschema\";` to the file"
                } else {
                    "several files import Cedar: import the policies this file means in it too"
                };
                self.error_help(
                    f,
                    span,
                    format!("{what} need Cedar policies"),
                    "no Cedar policies imported",
                    help,
                );
                None
            }
        }
    }

    /// Checks that the Cedar set knows `action` and prepares its slice.
    pub(super) fn cedar_action(
        &mut self,
        f: usize,
        cedar: usize,
        action: &Spanned<String>,
    ) -> bool {
        if self.cedar[cedar].knows_action(&action.node) {
            self.cedar[cedar].prepare_action(&action.node);
            return true;
        }
        let known = self.cedar[cedar].action_names();
        let help = suggest(&action.node, &known)
            .unwrap_or_else(|| format!("the schema's actions are: {}", known.join(", ")));
        let message = format!(
            "the Cedar schema of `{}` declares no action `{}`",
            self.cedar[cedar].name(),
            action.node
        );
        self.error_help(f, action.span, message, "unknown action", help);
        false
    }
}
