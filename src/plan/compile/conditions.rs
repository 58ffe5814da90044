//! Conditions: routes, methods, hosts, headers, address lists, Cedar, Envoy's domains and
//! descriptors.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn condition(&mut self, f: usize, c: &ast::Condition) -> Option<Condition> {
        use ast::ConditionKind as K;
        match &c.kind {
            K::Or(parts) | K::And(parts) => {
                let mut out = Vec::with_capacity(parts.len());
                let mut ok = true;
                for p in parts {
                    match self.condition(f, p) {
                        Some(c) => out.push(c),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                Some(if matches!(c.kind, K::Or(_)) {
                    Condition::Any(out)
                } else {
                    Condition::All(out)
                })
            }
            K::Not(inner) => self
                .condition(f, inner)
                .map(|c| Condition::Not(Box::new(c))),
            K::Route { methods, templates } => {
                let methods = self.methods(f, methods);
                let patterns: Vec<Option<PatternId>> =
                    templates.iter().map(|t| self.pattern(f, t)).collect();
                let patterns = patterns.into_iter().collect::<Option<Vec<_>>>()?;
                Some(Condition::Route {
                    methods: methods?,
                    patterns,
                })
            }
            K::Method(methods) => {
                let methods = self.methods(f, methods)?;
                Some(if methods.is_empty() {
                    Condition::Always
                } else {
                    Condition::Method(methods)
                })
            }
            K::Host { regex, value } => {
                if *regex {
                    self.regex(f, value).map(Condition::HostMatches)
                } else {
                    Some(Condition::HostIs(Arc::from(
                        value.node.to_ascii_lowercase(),
                    )))
                }
            }
            K::Header { name, test } => {
                let header = self.header_name(f, name)?;
                self.header_test(f, header, test.as_ref())
            }
            K::UserAgent(op, value) => {
                self.header_test(f, http::header::USER_AGENT, Some(&(*op, value.clone())))
            }
            K::Ip(items) => self.address_list(f, c.span, items),
            K::Cedar(action) => {
                let cedar = self.cedar_for(f, c.span, "`cedar` conditions")?;
                self.cedar_action(f, cedar, action)
                    .then(|| Condition::Cedar {
                        cedar,
                        action: Arc::from(action.node.as_str()),
                    })
            }
            K::CedarPrincipalIn(kind, id) => self.principal_in(f, c.span, kind, id),
            K::Domain { regex, value } => Some(Condition::Domain(if *regex {
                ValueTest::Matches(self.regex(f, value)?)
            } else {
                ValueTest::Is(Arc::from(value.node.as_str()))
            })),
            K::Descriptor { key, test } => {
                let key = self.descriptor_key(f, key)?;
                Some(Condition::Descriptor(
                    key,
                    self.value_test(f, test.as_ref())?,
                ))
            }
            K::DescriptorShape(entries) => {
                let mut shape = Vec::with_capacity(entries.len());
                let mut ok = true;
                for entry in entries {
                    let key = self.descriptor_key(f, &entry.key);
                    let test = self.value_test(f, entry.test.as_ref());
                    match (key, test) {
                        (Some(key), Some(test)) => shape.push((key, test)),
                        _ => ok = false,
                    }
                }
                ok.then_some(Condition::DescriptorShape(shape))
            }
        }
    }

    /// `== "v"`, `!= "v"`, `~= "re"`, or nothing (present).
    fn value_test(
        &mut self,
        f: usize,
        test: Option<&(ast::CmpOp, Spanned<String>)>,
    ) -> Option<ValueTest> {
        Some(match test {
            None => ValueTest::Present,
            Some((ast::CmpOp::Eq, v)) => ValueTest::Is(Arc::from(v.node.as_str())),
            Some((ast::CmpOp::Ne, v)) => ValueTest::IsNot(Arc::from(v.node.as_str())),
            Some((ast::CmpOp::Matches, v)) => ValueTest::Matches(self.regex(f, v)?),
        })
    }

    /// `ip in [...]`: addresses and networks, at least one.
    fn address_list(
        &mut self,
        f: usize,
        span: Span,
        items: &[Spanned<String>],
    ) -> Option<Condition> {
        let mut nets = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            let text = item.node.trim();
            match crate::plan::ipset::parse_net(text) {
                Some(n) => nets.push(n),
                None => {
                    self.error_help(
                        f,
                        item.span,
                        format!("`{text}` is not an IP address or network"),
                        "invalid network",
                        "write an address (`192.0.2.1`) or a network in CIDR form (`10.0.0.0/8`, `fd00::/8`)",
                    );
                    ok = false;
                }
            }
        }
        if nets.is_empty() && ok {
            self.error_help(
                f,
                span,
                "the address list is empty",
                "empty list",
                "list at least one address or network",
            );
            return None;
        }
        ok.then(|| Condition::IpIn(Arc::new(IpSet::new(nets))))
    }

    /// `cedar principal in Type::"id"`: an entity of a type the schema declares.
    fn principal_in(
        &mut self,
        f: usize,
        span: Span,
        kind: &Spanned<String>,
        id: &Spanned<String>,
    ) -> Option<Condition> {
        let cedar = self.cedar_for(f, span, "`cedar` conditions")?;
        let set = &self.cedar[cedar];
        let Some(ancestor) = set.entity(&kind.node, &id.node) else {
            self.error_help(
                f,
                kind.span,
                format!("`{}` is not a Cedar entity type", kind.node),
                "not a type name",
                "name a type the schema declares, such as `Role`",
            );
            return None;
        };
        if !set.knows_entity_type(&ancestor) {
            let message = format!(
                "the Cedar schema of `{}` declares no entity type `{}`",
                set.name(),
                kind.node
            );
            self.error_help(
                f,
                kind.span,
                message,
                "unknown type",
                "name a type the schema declares, such as `Role`",
            );
            return None;
        }
        Some(Condition::CedarIn {
            cedar,
            ancestor: Arc::new(ancestor),
        })
    }

    pub(super) fn header_test(
        &mut self,
        f: usize,
        name: HeaderName,
        test: Option<&(ast::CmpOp, Spanned<String>)>,
    ) -> Option<Condition> {
        Some(match test {
            None => Condition::HeaderPresent(name),
            Some((ast::CmpOp::Eq, v)) => Condition::HeaderIs(name, Arc::from(v.node.as_str())),
            Some((ast::CmpOp::Ne, v)) => Condition::HeaderIsNot(name, Arc::from(v.node.as_str())),
            Some((ast::CmpOp::Matches, v)) => Condition::HeaderMatches(name, self.regex(f, v)?),
        })
    }

    pub(super) fn regex(&mut self, f: usize, pattern: &Spanned<String>) -> Option<Regex> {
        match RegexBuilder::new(&pattern.node).size_limit(1 << 20).build() {
            Ok(re) => Some(re),
            Err(e) => {
                let text = e.to_string();
                let reason = text
                    .lines()
                    .rev()
                    .find(|l| l.trim_start().starts_with("error:"))
                    .map(|l| {
                        l.trim_start()
                            .trim_start_matches("error:")
                            .trim()
                            .to_owned()
                    })
                    .unwrap_or_else(|| text.lines().last().unwrap_or("").trim().to_owned());
                self.error_help(
                    f,
                    pattern.span,
                    format!("invalid regular expression: {reason}"),
                    "invalid regex",
                    "the syntax is Rust's `regex` crate's; inside a string, write `\\\\` for a backslash",
                );
                None
            }
        }
    }

    pub(super) fn methods(&mut self, f: usize, methods: &[ast::Ident]) -> Option<Vec<Method>> {
        let mut out = Vec::new();
        let mut ok = true;
        for m in methods {
            if m.node == "ANY" {
                if methods.len() > 1 {
                    self.error_help(
                        f,
                        m.span,
                        "`ANY` stands alone",
                        "combined with other methods",
                        "write `ANY` for every method, or list the methods",
                    );
                    ok = false;
                }
                continue;
            }
            if METHODS.contains(&m.node.as_str()) {
                if let Ok(method) = Method::from_bytes(m.node.as_bytes()) {
                    out.push(method);
                }
                continue;
            }
            let upper = m.node.to_ascii_uppercase();
            let help = if METHODS.contains(&upper.as_str()) || upper == "ANY" {
                format!("methods are written in capitals: `{upper}`")
            } else {
                suggest(&upper, METHODS)
                    .unwrap_or_else(|| format!("methods are {} or ANY", METHODS.join(", ")))
            };
            self.error_help(
                f,
                m.span,
                format!("unknown HTTP method `{}`", m.node),
                "unknown method",
                help,
            );
            ok = false;
        }
        ok.then_some(out)
    }

    pub(super) fn pattern(&mut self, f: usize, template: &Spanned<String>) -> Option<PatternId> {
        match Template::parse(&template.node) {
            Ok(parsed) => {
                if let Some(&id) = self.pattern_ids.get(&parsed) {
                    return Some(id);
                }
                let id = PatternId(self.templates.len());
                self.pattern_ids.insert(parsed.clone(), id);
                self.templates
                    .push((Arc::from(template.node.as_str()), parsed));
                Some(id)
            }
            Err(e) => {
                self.error_help(
                    f,
                    template.span,
                    format!("invalid route template `{}`", template.node),
                    "invalid template",
                    e.0,
                );
                None
            }
        }
    }
}
