//! Limits: settings gathered from the limit and the defaults, then checked together.

use super::*;

/// The rate of a limit decided in each node's memory only: nothing counted in the store.
static NODE_ONLY: Spanned<ast::RateValue> = Spanned {
    node: ast::RateValue::Unlimited,
    span: Span { start: 0, end: 0 },
};

impl<'a> Compiler<'a> {
    pub(super) fn limit(
        &mut self,
        f: usize,
        block: &'a ast::LimitBlock,
        defaults: &[&'a ast::Setting],
        namespace: &Arc<str>,
    ) -> Option<Limit> {
        let (settings, condition, mut ok) = self.limit_body(f, block, defaults);
        let name = &block.name;
        let written: Vec<&ast::Condition> = block
            .stmts
            .iter()
            .flat_map(|stmt| match stmt {
                ast::LimitStmt::Match(block) => block.node.iter().collect(),
                ast::LimitStmt::When(c) => vec![c],
                _ => Vec::new(),
            })
            .collect();
        let key = self.limit_key(f, &settings, &name.node, &written);
        let for_descriptors = condition.names_descriptor();
        if for_descriptors {
            ok &= self.descriptor_conditions(f, &written);
        }
        if let Some(key) = &key {
            let key_span = settings.key.map_or(name.span, |k| k.span);
            ok &= self.key_fits(f, key_span, key, for_descriptors);
        }
        let adaptive_algorithm = settings
            .algorithm
            .is_some_and(|a| a.node == Algorithm::AdaptiveConcurrency.name());
        let admission = block
            .stmts
            .iter()
            .any(|s| matches!(s, ast::LimitStmt::Admission(_)));
        if adaptive_algorithm {
            ok &= self.no_written_rate(f, block);
        }
        if adaptive_algorithm || (admission && settings.rate.is_none()) {
            ok &= self.node_only_settings(f, &settings, adaptive_algorithm, &name.node);
        }
        let rate_value = match settings.rate {
            // Decided in the node's memory: nothing to count in the store (a rate from
            // `defaults` does not apply).
            _ if adaptive_algorithm => &NODE_ONLY,
            Some(rate) => rate,
            None if admission => &NODE_ONLY,
            None => {
                self.error_help(
                    f,
                    name.span,
                    format!("limit `{}` has no rate", name.node),
                    "no `rate`",
                    "add a rate such as `rate 100/min;`, or set one in `defaults`",
                );
                return None;
            }
        };
        let algorithm = self.algorithm(f, &settings, rate_value);
        let lease = self.lease(f, &settings, algorithm, &name.node, &mut ok);
        let rate = self.limit_rate(f, rate_value, algorithm, lease, &name.node);
        let costs = self.costs(f, &settings, algorithm, name);
        let soft = match settings.soft {
            Some(soft) => self.soft(f, soft),
            None => Some(Vec::new()),
        };
        let on_exceed = match settings.on_exceed {
            Some(exceed) => self.on_exceed(f, exceed),
            None => Some(OnExceed {
                status: StatusCode::TOO_MANY_REQUESTS,
                reason: None,
                ban: None,
            }),
        };
        let (mode, on_store_error, on_missing_key) = self.limit_modes(f, &settings);
        let counts = self.counts(f, &settings, algorithm, &name.span, &mut ok);
        if let (true, Some(word)) = (admission, settings.counts)
            && word.node != "requests"
        {
            self.error_help(
                f,
                word.span,
                "admission control counts requests",
                "not requests",
                "it learns from each request's answer; a message or a chunk of bytes has none",
            );
            ok = false;
        }
        if let (Some((_, Some(usage))), Some(cost)) = (&costs, settings.cost) {
            let hits = usage.reads_hits();
            ok &= self.usage_applies(f, cost.span, counts, for_descriptors, hits);
        }
        let sync = self.sync(f, &settings, algorithm, on_exceed.as_ref(), &mut ok);
        // A local-first limit never fails open: without the store it counts its node's share
        // (`local`), unless it says `deny`.
        let on_store_error = match (sync, on_store_error) {
            (Some(_), Some(StoreErrorMode::Allow)) => Some(StoreErrorMode::Local),
            (_, mode) => mode,
        };
        let global = self.global(f, &settings, algorithm, &mut ok);
        let adaptive = self.adaptive(f, block, algorithm, lease, for_descriptors, &mut ok);
        let priority = self.priority(f, settings.priority);
        let authorize = match settings.authorize {
            Some(action) => self.authorize(f, action),
            None => Some(None),
        };
        algorithm?;
        let rate = rate?;
        let headers = match &rate {
            LimitRate::Fixed(v) => vec![PolicyHeaders::of(&name.node, v)],
            LimitRate::Tiered { values, .. } => values
                .iter()
                .map(|v| PolicyHeaders::of(&name.node, v))
                .collect(),
        };
        let limit = Limit {
            name: Arc::from(name.node.as_str()),
            namespace: Arc::clone(namespace),
            for_descriptors,
            condition,
            key: key?,
            rate,
            cost: costs.as_ref()?.0.clone(),
            usage: costs?.1,
            soft: soft?,
            on_exceed: on_exceed?,
            mode: mode?,
            on_store_error: on_store_error?,
            on_missing_key: on_missing_key?,
            priority: priority?,
            counts: counts?,
            authorize: authorize?,
            sync,
            global: global?,
            adaptive,
            headers,
            replaces: settings
                .replaces
                .map(|r| r.node.iter().map(|n| Arc::from(n.node.as_str())).collect())
                .unwrap_or_default(),
        };
        ok &= if for_descriptors {
            self.descriptor_limit(f, name, &settings, &limit)
        } else {
            self.http_limit_tiers(f, name, &settings, &limit)
        };
        ok.then_some(limit)
    }

    /// The keyword settings: `mode`, `on_store_error`, `on_missing_key` (each `None` when
    /// misspelt; the problem is reported).
    fn limit_modes(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
    ) -> (Option<Mode>, Option<StoreErrorMode>, Option<MissingKey>) {
        let mode = self.keyword_or(f, settings.mode, "mode", MODES, Mode::Enforce);
        let on_store_error = self.keyword_or(
            f,
            settings.on_store_error,
            "on_store_error",
            STORE_ERROR_MODES,
            StoreErrorMode::Allow,
        );
        let on_missing_key = self.keyword_or(
            f,
            settings.on_missing_key,
            "on_missing_key",
            MISSING_KEY_MODES,
            MissingKey::Ip,
        );
        (mode, on_store_error, on_missing_key)
    }

    /// `counts`: requests, messages or bytes (a concurrency limit counts requests).
    fn counts(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        algorithm: Option<Algorithm>,
        at: &Span,
        ok: &mut bool,
    ) -> Option<Counts> {
        let counts = self.keyword_or(f, settings.counts, "counts", COUNTS, Counts::Requests);
        if counts.is_some_and(|c| c != Counts::Requests)
            && algorithm.is_some_and(Algorithm::counts_in_flight)
        {
            self.error_help(
                f,
                *at,
                "a concurrency limit counts requests",
                "counts messages or bytes",
                "count messages or bytes with a rate, such as `rate 10/s;`",
            );
            *ok = false;
        }
        counts
    }

    /// The limit's statements: its settings over the file's defaults, and its conditions
    /// (all of them must hold); false when one of them is wrong.
    fn limit_body(
        &mut self,
        f: usize,
        block: &'a ast::LimitBlock,
        defaults: &[&'a ast::Setting],
    ) -> (Settings<'a>, Condition, bool) {
        let mut settings = Settings::default();
        for setting in defaults {
            self.apply_setting(f, &mut settings, setting, false, &mut HashMap::new());
        }
        let mut seen: HashMap<&'static str, Span> = HashMap::new();
        let mut conditions = Vec::new();
        let mut ok = true;
        for stmt in &block.stmts {
            let written: &[ast::Condition] = match stmt {
                ast::LimitStmt::Match(block) => &block.node,
                ast::LimitStmt::When(c) => std::slice::from_ref(c),
                ast::LimitStmt::Setting(s) => {
                    ok &= self.apply_setting(f, &mut settings, s, true, &mut seen);
                    &[]
                }
                ast::LimitStmt::Adaptive(_) | ast::LimitStmt::Admission(_) => &[],
            };
            for c in written {
                match self.condition(f, c) {
                    Some(c) => conditions.push(c),
                    None => ok = false,
                }
            }
        }
        let condition = match conditions.len() {
            0 => Condition::Always,
            1 => conditions.remove(0),
            _ => Condition::All(conditions),
        };
        (settings, condition, ok)
    }

    /// The key the limit counts by (the client address when none is given); a key that may
    /// be missing without `on_missing_key` is a warning (not a descriptor entry that the
    /// conditions name: Envoy sends a descriptor whole).
    fn limit_key(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        limit: &str,
        written: &[&ast::Condition],
    ) -> Option<KeySpec> {
        let Some(expr) = settings.key else {
            return Some(KeySpec {
                parts: vec![KeyPart::One(KeySource::Ip { v4: 32, v6: 64 })],
            });
        };
        let key = self.key_expr(f, expr);
        let named = envoy::entries_named(written);
        if let (Some(spec), None) = (&key, settings.on_missing_key)
            && let Some(missing) = spec.may_be_missing_unless(|s| match s {
                KeySource::Descriptor { key, .. } => named.contains(&&**key),
                _ => false,
            })
        {
            self.warn_missing_key(f, expr.span, limit, missing);
        }
        key
    }

    /// The algorithm: written in the limit; else implied by the rate (`5 concurrent`,
    /// `/month`); else from defaults; else the sliding window.
    fn algorithm(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        rate: &Spanned<ast::RateValue>,
    ) -> Option<Algorithm> {
        let implied = self.implied_algorithm(rate);
        match settings.algorithm {
            Some(ident) if settings.algorithm_explicit || implied.is_none() => {
                let found = lookup(ALGORITHMS, &ident.node);
                if found.is_none() {
                    let known = words(ALGORITHMS);
                    let intro = "the algorithms are";
                    self.unknown_name(f, ident, "algorithm", "unknown algorithm", &known, intro);
                }
                found
            }
            _ => Some(implied.unwrap_or(Algorithm::SlidingWindow)),
        }
    }

    /// `sync every …`: the interval of a local-first limit, checked against the rest of it.
    fn sync(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        algorithm: Option<Algorithm>,
        on_exceed: Option<&OnExceed>,
        ok: &mut bool,
    ) -> Option<Duration> {
        let every = settings.sync?;
        let mut fail = |this: &mut Self, label: &str, message: String, help: &str| {
            this.error_help(f, every.span, message, label, help);
            *ok = false;
        };
        if settings.sync_in_defaults {
            fail(
                self,
                "in `defaults`",
                "`sync every` is set in each limit, not in `defaults`".to_owned(),
                "local-first trades exactness for speed: choose it limit by limit",
            );
            return None;
        }
        if let Some(a) = algorithm.filter(|a| {
            !matches!(
                a,
                Algorithm::FixedWindow | Algorithm::SlidingWindow | Algorithm::Calendar
            )
        }) {
            fail(
                self,
                "not a counting algorithm",
                format!(
                    "`sync every` needs a window that counts, not `{}`",
                    a.name()
                ),
                "local-first applies to fixed and sliding windows and to calendar quotas: \
                 their counts add up across nodes",
            );
        }
        if settings.on_store_error_explicit
            && settings
                .on_store_error
                .is_some_and(|m| lookup(STORE_ERROR_MODES, &m.node) == Some(StoreErrorMode::Allow))
        {
            fail(
                self,
                "with `on_store_error allow`",
                "a local-first limit does not fail open".to_owned(),
                "without the store, each node counts its share of the quota (`on_store_error \
                 local`, the default here) or refuses (`on_store_error deny`)",
            );
        }
        let micros = self.duration_micros(f, every, "sync every")?;
        if !(10_000..=60_000_000).contains(&micros) || micros % 10_000 != 0 {
            fail(
                self,
                "out of range",
                "a sync interval is a multiple of 10ms from 10ms to 60s".to_owned(),
                "50ms to 1s is typical: the longer, the more a node may admit past the quota",
            );
            return None;
        }
        let warn = |this: &mut Self, label: &str, message: &str, help: &str| {
            let warning = PolicyError::new(&this.files[f].source, every.span, message, label)
                .with_help(help)
                .warning();
            this.warnings.push(warning);
        };
        if on_exceed.is_some_and(|e| e.ban.is_some()) {
            warn(
                self,
                "with a ban",
                "a local-first limit's bans start only when this node sees the quota spent",
                "a node may admit past the quota for up to one interval before the ban; \
                 keep limits that ban (logins, abuse) exact",
            );
        }
        if algorithm == Some(Algorithm::Calendar) {
            warn(
                self,
                "a calendar quota",
                "a local-first calendar quota may be exceeded by what the nodes admit in one \
                 interval",
                "quotas that are billed or promised (per day, per month) are usually kept exact",
            );
        }
        Some(Duration::from_micros(micros))
    }

    /// How long a concurrency slot is held when its end is never reported.
    fn lease(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        algorithm: Option<Algorithm>,
        limit: &str,
        ok: &mut bool,
    ) -> u64 {
        let Some(lease) = settings.lease else {
            return DEFAULT_LEASE;
        };
        if algorithm.is_some_and(|a| !a.counts_in_flight()) {
            self.error_help(
                f,
                lease.span,
                "`lease` applies only to concurrency limits",
                "not a concurrency limit",
                format!(
                    "limit `{limit}` uses `{}`",
                    algorithm.map_or("", Algorithm::name)
                ),
            );
            *ok = false;
        }
        match self.duration_micros(f, lease, "lease") {
            Some(d) if d <= DAY => d,
            Some(_) => {
                self.error_help(
                    f,
                    lease.span,
                    "a lease lasts at most 1 day",
                    "too long",
                    "a lease only matters when a request never reports its end; minutes are typical",
                );
                *ok = false;
                DEFAULT_LEASE
            }
            None => {
                *ok = false;
                DEFAULT_LEASE
            }
        }
    }

    /// `authorize action "…"`: the file's Cedar set, and an action its schema declares.
    fn authorize(&mut self, f: usize, action: &Spanned<String>) -> Option<Option<Authorize>> {
        let cedar = self.cedar_for(f, action.span, "`authorize`")?;
        self.cedar_action(f, cedar, action).then(|| {
            Some(Authorize {
                cedar,
                action: Arc::from(action.node.as_str()),
            })
        })
    }

    fn priority(&mut self, f: usize, setting: Option<&Spanned<i64>>) -> Option<i32> {
        let Some(p) = setting else {
            return Some(0);
        };
        i32::try_from(p.node).ok().or_else(|| {
            self.error_help(
                f,
                p.span,
                "priority is out of range",
                "out of range",
                "use a number between -2147483648 and 2147483647",
            );
            None
        })
    }

    /// Records one setting; returns false when it was set twice in the same block.
    pub(super) fn apply_setting(
        &mut self,
        f: usize,
        settings: &mut Settings<'a>,
        setting: &'a ast::Setting,
        explicit: bool,
        seen: &mut HashMap<&'static str, Span>,
    ) -> bool {
        let (name, span) = match setting {
            ast::Setting::Key(k) => {
                settings.key = Some(k);
                ("key", k.span)
            }
            ast::Setting::Algorithm(a) => {
                settings.algorithm = Some(a);
                settings.algorithm_explicit = explicit;
                ("algorithm", a.span)
            }
            ast::Setting::Rate(r) => {
                settings.rate = Some(r);
                ("rate", r.span)
            }
            ast::Setting::Lease(l) => {
                settings.lease = Some(l);
                ("lease", l.span)
            }
            ast::Setting::Cost(c) => {
                settings.cost = Some(c);
                ("cost", c.span)
            }
            ast::Setting::Reserve(r) => {
                settings.reserve = Some(r);
                ("reserve", r.span)
            }
            ast::Setting::Soft(s) => {
                settings.soft = Some(s);
                ("soft", s.span)
            }
            ast::Setting::OnExceed(e) => {
                settings.on_exceed = Some(e);
                ("on_exceed", e.span)
            }
            ast::Setting::Mode(m) => {
                settings.mode = Some(m);
                ("mode", m.span)
            }
            ast::Setting::OnStoreError(m) => {
                settings.on_store_error = Some(m);
                settings.on_store_error_explicit = explicit;
                ("on_store_error", m.span)
            }
            ast::Setting::OnMissingKey(m) => {
                settings.on_missing_key = Some(m);
                ("on_missing_key", m.span)
            }
            ast::Setting::Priority(p) => {
                settings.priority = Some(p);
                ("priority", p.span)
            }
            ast::Setting::Counts(c) => {
                settings.counts = Some(c);
                ("counts", c.span)
            }
            ast::Setting::Authorize(a) => {
                settings.authorize = Some(a);
                ("authorize", a.span)
            }
            ast::Setting::Replaces(r) => {
                settings.replaces = Some(r);
                ("replaces", r.span)
            }
            ast::Setting::Sync(d) => {
                settings.sync = Some(d);
                settings.sync_in_defaults = !explicit;
                ("sync", d.span)
            }
            ast::Setting::Global(span) => {
                settings.global = Some(*span);
                settings.global_in_defaults = !explicit;
                ("global", *span)
            }
            ast::Setting::OnPartition(m) => {
                settings.on_partition = Some(m);
                settings.on_partition_explicit = explicit;
                ("on_partition", m.span)
            }
        };
        if let Some(first) = seen.insert(name, span) {
            let help = format!(
                "it was first set at {}; keep one",
                self.location(Site {
                    file: f,
                    span: first
                })
            );
            self.error_help(
                f,
                span,
                format!("`{name}` is set twice"),
                "set again here",
                help,
            );
            return false;
        }
        true
    }
}
