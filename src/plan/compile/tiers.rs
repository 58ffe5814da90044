//! Tier tables: sources, inheritance, entries.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn tier_table(
        &mut self,
        f: usize,
        block: &'a ast::TiersBlock,
    ) -> Option<CompiledTable> {
        let mut ok = true;
        let source = self.table_source(f, block, &mut ok);
        let index = self.tier_names(f, block, &mut ok);
        if block.tiers.is_empty() {
            self.error_help(
                f,
                block.name.span,
                format!("tier table `{}` has no tiers", block.name.node),
                "empty table",
                "add a tier such as `tier free { api = 60/min; }`",
            );
            return None;
        }
        let entries = block
            .tiers
            .iter()
            .map(|tier| self.tier_entries(f, block, &index, tier, &mut ok))
            .collect();
        let default = self.default_tier(f, block, &index);
        let (Some(source), Some(default), true) = (source, default, ok) else {
            return None;
        };
        Some(CompiledTable {
            table: TierTable {
                name: Arc::from(block.name.node.as_str()),
                source,
                tiers: block
                    .tiers
                    .iter()
                    .map(|t| Arc::from(t.name.node.as_str()))
                    .collect(),
                default,
            },
            entries,
        })
    }

    /// The table's one `from`.
    fn table_source(
        &mut self,
        f: usize,
        block: &ast::TiersBlock,
        ok: &mut bool,
    ) -> Option<TierSource> {
        match block.sources.as_slice() {
            [] => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("tier table `{}` does not say where the tier comes from", block.name.node),
                    "no `from`",
                    "add `from header(\"X-Plan\");`, `from claim(\"plan\");` or `from cedar annotation \"rl_tier\";`",
                );
                None
            }
            [one, rest @ ..] => {
                for extra in rest {
                    self.error_help(
                        f,
                        extra.span,
                        "a tier table has one `from`",
                        "second `from`",
                        "keep the `from` the tier should come from",
                    );
                    *ok = false;
                }
                self.tier_source(f, one)
            }
        }
    }

    /// The tiers' names and positions; a name given twice is a problem.
    fn tier_names(
        &mut self,
        f: usize,
        block: &'a ast::TiersBlock,
        ok: &mut bool,
    ) -> HashMap<&'a str, usize> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, tier) in block.tiers.iter().enumerate() {
            if let Some(&first) = index.get(tier.name.node.as_str()) {
                let site = Site {
                    file: f,
                    span: block.tiers[first].name.span,
                };
                self.duplicate("tier", &tier.name, f, site);
                *ok = false;
            } else {
                index.insert(&tier.name.node, i);
            }
        }
        index
    }

    /// A tier's entries through inheritance: its own override its parent's.
    fn tier_entries(
        &mut self,
        f: usize,
        block: &'a ast::TiersBlock,
        index: &HashMap<&'a str, usize>,
        tier: &'a ast::TierDef,
        ok: &mut bool,
    ) -> HashMap<String, (usize, Spanned<ast::RateValue>)> {
        let chain = self.tier_chain(f, block, index, tier, ok);
        let mut resolved: HashMap<String, (usize, Spanned<ast::RateValue>)> = HashMap::new();
        for t in chain.iter().rev() {
            let mut own: HashMap<&str, Span> = HashMap::new();
            for entry in &t.entries {
                if std::ptr::eq(*t, tier) {
                    if let Some(first) = own.get(entry.name.node.as_str()) {
                        let site = Site {
                            file: f,
                            span: *first,
                        };
                        self.duplicate("tier entry", &entry.name, f, site);
                        *ok = false;
                    }
                    own.insert(&entry.name.node, entry.name.span);
                }
                resolved.insert(entry.name.node.clone(), (f, entry.value.clone()));
            }
        }
        resolved
    }

    /// `tier` and the tiers it extends, nearest first; an unknown parent or a cycle is a
    /// problem (a cycle reported once, at its member defined first).
    fn tier_chain(
        &mut self,
        f: usize,
        block: &'a ast::TiersBlock,
        index: &HashMap<&'a str, usize>,
        tier: &'a ast::TierDef,
        ok: &mut bool,
    ) -> Vec<&'a ast::TierDef> {
        let mut chain = vec![tier];
        let mut current = tier;
        while let Some(parent) = &current.extends {
            let Some(&p) = index.get(parent.node.as_str()) else {
                let names: Vec<&str> = index.keys().copied().collect();
                let label = "not a tier of this table";
                self.unknown_name(f, parent, "tier", label, &names, "the tiers are");
                *ok = false;
                break;
            };
            let next = &block.tiers[p];
            if let Some(pos) = chain.iter().position(|t| std::ptr::eq(*t, next)) {
                let first = chain[pos..]
                    .iter()
                    .min_by_key(|t| t.span.start)
                    .is_some_and(|t| std::ptr::eq(*t, tier));
                if pos == 0 && first {
                    let names: Vec<&str> = chain.iter().map(|t| t.name.node.as_str()).collect();
                    let at = tier.extends.as_ref().map_or(parent.span, |e| e.span);
                    self.error_help(
                        f,
                        at,
                        format!("tier `{}` inherits from itself", tier.name.node),
                        "inheritance cycle",
                        format!(
                            "the chain goes round: {} → {}",
                            names.join(" → "),
                            tier.name.node
                        ),
                    );
                }
                *ok = false;
                break;
            }
            chain.push(next);
            current = next;
        }
        chain
    }

    /// The table's one `default`, a tier of the table.
    fn default_tier(
        &mut self,
        f: usize,
        block: &ast::TiersBlock,
        index: &HashMap<&str, usize>,
    ) -> Option<usize> {
        let Some((d, rest)) = block.defaults.split_first() else {
            self.error_help(
                f,
                block.name.span,
                format!("tier table `{}` has no default tier", block.name.node),
                "no `default`",
                format!(
                    "add `default {};`: it applies when a request names no known tier",
                    block.tiers[0].name.node
                ),
            );
            return None;
        };
        for extra in rest {
            self.error_help(
                f,
                extra.span,
                "a tier table has one `default`",
                "second `default`",
                "keep one `default` tier",
            );
        }
        if let Some(&i) = index.get(d.node.as_str()) {
            return Some(i);
        }
        let names: Vec<&str> = index.keys().copied().collect();
        let help = suggest(&d.node, &names)
            .unwrap_or_else(|| format!("the tiers are: {}", names.join(", ")));
        self.error_help(
            f,
            d.span,
            format!("unknown tier `{}`", d.node),
            "not a tier of this table",
            help,
        );
        None
    }

    pub(super) fn tier_source(
        &mut self,
        f: usize,
        source: &Spanned<ast::TierSource>,
    ) -> Option<TierSource> {
        match &source.node {
            ast::TierSource::Request(value) => self.value_from(f, value).map(TierSource::Request),
            ast::TierSource::CedarAnnotation {
                annotation,
                action,
                pick,
            } => {
                let what = "tiers from a Cedar annotation";
                let cedar = self.cedar_for(f, source.span, what)?;
                let action = action.clone().unwrap_or_else(|| {
                    Spanned::new(
                        crate::authz::DEFAULT_CLASSIFY_ACTION.to_owned(),
                        annotation.span,
                    )
                });
                if !self.cedar_action(f, cedar, &action) {
                    return None;
                }
                let pick = match pick {
                    None => Pick::Highest,
                    Some(p) => self.keyword(f, p, "pick", PICKS)?,
                };
                Some(TierSource::CedarAnnotation {
                    annotation: Arc::from(annotation.node.as_str()),
                    pick,
                    cedar,
                    action: Arc::from(action.node.as_str()),
                })
            }
        }
    }
}
