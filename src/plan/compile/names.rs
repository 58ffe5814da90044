//! Pass 1: each file's header (version, namespace, defaults), Cedar imports, and every
//! name with where it was defined, so that later passes can refer to anything.

use super::*;

/// What pass 1 found, in file order; each item with the index of its file.
#[derive(Default)]
pub(super) struct Declarations<'a> {
    /// `namespaces[file]`: the file's namespace (its stem when it names none).
    pub namespaces: Vec<Arc<str>>,
    /// `defaults[file]`: the settings of the file's `defaults` block.
    pub defaults: Vec<Vec<&'a ast::Setting>>,
    pub cedar_imports: Vec<CedarImport>,
    pub tables: Vec<(usize, &'a ast::TiersBlock)>,
    pub limits: Vec<(usize, &'a ast::LimitBlock)>,
    pub safelists: Vec<(usize, &'a ast::ListBlock)>,
    pub denylists: Vec<(usize, &'a ast::ListBlock)>,
    pub anomalies: Vec<(usize, &'a ast::AnomalyBlock)>,
}

/// Where each name of one kind was first defined.
type Sites<'a> = HashMap<&'a str, Site>;

impl<'a> Compiler<'a> {
    pub(super) fn declarations(&mut self) -> Declarations<'a> {
        let files = self.files;
        let mut out = Declarations {
            defaults: vec![Vec::new(); files.len()],
            ..Declarations::default()
        };
        let [mut limits, mut lists, mut anomalies, mut tables]: [Sites<'a>; 4] = Default::default();
        for (f, file) in files.iter().enumerate() {
            let mut namespace: Option<&Spanned<String>> = None;
            let mut version: Option<Span> = None;
            let mut defaults: Option<Span> = None;
            for item in &file.ast.items {
                match item {
                    ast::Item::Version(v) => self.version(f, v, &mut version),
                    ast::Item::Namespace(ns) => self.namespace(f, ns, &mut namespace),
                    ast::Item::Import(import) => {
                        if let Some(import) = self.import(f, import) {
                            out.cedar_imports.push(import);
                        }
                    }
                    ast::Item::Key(def) => self.key_name(f, def),
                    ast::Item::Defaults(block) => {
                        if self.first_defaults(f, block, &mut defaults) {
                            out.defaults[f] = block.settings.iter().collect();
                        }
                    }
                    ast::Item::Tiers(block) => {
                        if self.first_definition("tier table", &mut tables, f, &block.name) {
                            out.tables.push((f, block));
                        }
                    }
                    ast::Item::Limit(block) => {
                        if self.first_definition("limit", &mut limits, f, &block.name) {
                            out.limits.push((f, block));
                        }
                    }
                    ast::Item::Safelist(block) | ast::Item::Denylist(block) => {
                        if self.first_definition("list", &mut lists, f, &block.name) {
                            match item {
                                ast::Item::Safelist(_) => out.safelists.push((f, block)),
                                _ => out.denylists.push((f, block)),
                            }
                        }
                    }
                    ast::Item::Anomaly(block) => {
                        if self.first_definition("anomaly", &mut anomalies, f, &block.name) {
                            out.anomalies.push((f, block));
                        }
                    }
                }
            }
            out.namespaces.push(Arc::from(
                namespace.map_or(file.stem.as_str(), |n| n.node.as_str()),
            ));
        }
        out
    }

    /// Records the first definition of `name` among `sites`; a second one is an error.
    fn first_definition(
        &mut self,
        kind: &str,
        sites: &mut Sites<'a>,
        f: usize,
        name: &'a ast::Ident,
    ) -> bool {
        if let Some(first) = sites.get(name.node.as_str()) {
            self.duplicate(kind, name, f, *first);
            return false;
        }
        sites.insert(
            &name.node,
            Site {
                file: f,
                span: name.span,
            },
        );
        true
    }

    fn version(&mut self, f: usize, v: &Spanned<u64>, seen: &mut Option<Span>) {
        if seen.is_some() {
            self.error_help(
                f,
                v.span,
                "`version` is given twice",
                "given again here",
                "keep one `version 1;` at the top of the file",
            );
        } else if v.node != 1 {
            self.error_help(
                f,
                v.span,
                format!("unsupported policy version `{}`", v.node),
                "unknown version",
                "this Tollgate reads `version 1;`",
            );
        }
        *seen = Some(v.span);
    }

    fn namespace(
        &mut self,
        f: usize,
        ns: &'a Spanned<String>,
        seen: &mut Option<&'a Spanned<String>>,
    ) {
        if seen.is_some() {
            self.error_help(
                f,
                ns.span,
                "`namespace` is given twice",
                "given again here",
                "a file has one namespace; keep one",
            );
        } else if ns.node.is_empty()
            || !ns
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            self.error_help(
                f,
                ns.span,
                format!("namespace `{}` is not a valid name", ns.node),
                "invalid namespace",
                "use letters, digits, `_`, `-` and `.`",
            );
        }
        *seen = Some(ns);
    }

    fn key_name(&mut self, f: usize, def: &'a ast::KeyDef) {
        let name = &def.name;
        if BUILTIN_KEYS.contains(&name.node.as_str()) {
            self.error_help(
                f,
                name.span,
                format!("`{}` is a built-in key and cannot be redefined", name.node),
                "built-in name",
                "choose another name",
            );
        } else if let Some((first_file, first)) = self.keys.get(name.node.as_str()) {
            let first = Site {
                file: *first_file,
                span: first.name.span,
            };
            self.duplicate("key", name, f, first);
        } else {
            self.keys.insert(&name.node, (f, def));
        }
    }

    /// A file has at most one `defaults` block; true for the first.
    fn first_defaults(
        &mut self,
        f: usize,
        block: &ast::DefaultsBlock,
        seen: &mut Option<Span>,
    ) -> bool {
        let Some(first) = *seen else {
            *seen = Some(block.span);
            return true;
        };
        let help = format!(
            "the first is at {}; merge them",
            self.location(Site {
                file: f,
                span: first
            })
        );
        self.error_help(
            f,
            Span::new(block.span.start, block.span.start + 8),
            "a file has at most one `defaults` block",
            "second `defaults`",
            help,
        );
        false
    }
}
