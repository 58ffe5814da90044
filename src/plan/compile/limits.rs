//! Limits: settings gathered from the limit and the defaults, then checked together.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn limit(
        &mut self,
        f: usize,
        block: &'a ast::LimitBlock,
        defaults: &[&'a ast::Setting],
        namespace: &Arc<str>,
    ) -> Option<Limit> {
        let mut settings = Settings::default();
        for setting in defaults {
            self.apply_setting(f, &mut settings, setting, false, &mut HashMap::new());
        }
        let mut seen: HashMap<&'static str, Span> = HashMap::new();
        let mut conditions = Vec::new();
        let mut ok = true;
        for stmt in &block.stmts {
            match stmt {
                ast::LimitStmt::Match(block) => {
                    for c in &block.node {
                        match self.condition(f, c) {
                            Some(c) => conditions.push(c),
                            None => ok = false,
                        }
                    }
                }
                ast::LimitStmt::When(c) => match self.condition(f, c) {
                    Some(c) => conditions.push(c),
                    None => ok = false,
                },
                ast::LimitStmt::Setting(s) => {
                    ok &= self.apply_setting(f, &mut settings, s, true, &mut seen);
                }
            }
        }
        let name = &block.name;

        let key = match settings.key {
            Some((kf, expr)) => self.key_expr(kf, expr),
            None => Some(KeySpec {
                parts: vec![KeyPart::One(KeySource::Ip { v4: 32, v6: 64 })],
            }),
        };
        if let (Some(spec), Some((kf, expr)), None) = (&key, settings.key, settings.on_missing_key)
            && let Some(missing) = spec.may_be_missing()
        {
            self.warn_missing_key(kf, expr.span, &name.node, missing);
        }
        let Some((rf, rate_value)) = settings.rate else {
            self.error_help(
                f,
                name.span,
                format!("limit `{}` has no rate", name.node),
                "no `rate`",
                "add a rate such as `rate 100/min;`, or set one in `defaults`",
            );
            return None;
        };

        // The algorithm: written in the limit; else implied by the rate (`5 concurrent`,
        // `/month`); else from defaults; else the sliding window.
        let implied = self.implied_algorithm(rate_value);
        let algorithm = match settings.algorithm {
            Some((af, ident)) if settings.algorithm_explicit || implied.is_none() => {
                match lookup(ALGORITHMS, &ident.node) {
                    Some(a) => Some(a),
                    None => {
                        let known = words(ALGORITHMS);
                        let help = suggest(&ident.node, &known)
                            .unwrap_or_else(|| format!("the algorithms are: {}", known.join(", ")));
                        self.error_help(
                            af,
                            ident.span,
                            format!("unknown algorithm `{}`", ident.node),
                            "unknown algorithm",
                            help,
                        );
                        None
                    }
                }
            }
            _ => Some(implied.unwrap_or(Algorithm::SlidingWindow)),
        };

        let lease = match settings.lease {
            Some((lf, lease)) => {
                if algorithm.is_some_and(|a| a != Algorithm::Concurrency) {
                    self.error_help(
                        lf,
                        lease.span,
                        "`lease` applies only to concurrency limits",
                        "not a concurrency limit",
                        format!(
                            "limit `{}` uses `{}`",
                            name.node,
                            algorithm.map_or("", Algorithm::name)
                        ),
                    );
                    ok = false;
                }
                match self.duration_micros(lf, lease, "lease") {
                    Some(d) if d <= DAY => d,
                    Some(_) => {
                        self.error_help(lf, lease.span, "a lease lasts at most 1 day", "too long", "a lease only matters when a request never reports its end; minutes are typical");
                        ok = false;
                        DEFAULT_LEASE
                    }
                    None => {
                        ok = false;
                        DEFAULT_LEASE
                    }
                }
            }
            None => DEFAULT_LEASE,
        };

        let rate = self.limit_rate(rf, rate_value, algorithm, lease, &name.node);
        let cost = match settings.cost {
            Some((cf, cost)) => self.cost(cf, cost, algorithm.unwrap_or(Algorithm::SlidingWindow)),
            None => Some(Cost::Fixed(1)),
        };
        let soft = match settings.soft {
            Some((sf, soft)) => self.soft(sf, soft),
            None => Some(Vec::new()),
        };
        let on_exceed = match settings.on_exceed {
            Some((ef, exceed)) => self.on_exceed(ef, exceed),
            None => Some(OnExceed {
                status: StatusCode::TOO_MANY_REQUESTS,
                reason: None,
                ban: None,
            }),
        };
        let mode = match settings.mode {
            Some((mf, m)) => self.keyword(mf, m, "mode", MODES),
            None => Some(Mode::Enforce),
        };
        let on_store_error = match settings.on_store_error {
            Some((mf, m)) => self.keyword(mf, m, "on_store_error", STORE_ERROR_MODES),
            None => Some(StoreErrorMode::Allow),
        };
        let on_missing_key = match settings.on_missing_key {
            Some((mf, m)) => self.keyword(mf, m, "on_missing_key", MISSING_KEY_MODES),
            None => Some(MissingKey::Ip),
        };
        let priority = match settings.priority {
            Some((pf, p)) => match i32::try_from(p.node) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.error_help(
                        pf,
                        p.span,
                        "priority is out of range",
                        "out of range",
                        "use a number between -2147483648 and 2147483647",
                    );
                    None
                }
            },
            None => Some(0),
        };

        let counts = match settings.counts {
            Some((cf, c)) => self.keyword(cf, c, "counts", COUNTS),
            None => Some(Counts::Requests),
        };
        if counts.is_some_and(|c| c != Counts::Requests)
            && algorithm == Some(Algorithm::Concurrency)
        {
            self.error_help(
                f,
                name.span,
                "a concurrency limit counts requests",
                "counts messages or bytes",
                "count messages or bytes with a rate, such as `rate 10/s;`",
            );
            ok = false;
        }
        let condition = match conditions.len() {
            0 => Condition::Always,
            1 => conditions.remove(0),
            _ => Condition::All(conditions),
        };
        algorithm?;
        Some(Limit {
            name: Arc::from(name.node.as_str()),
            namespace: Arc::clone(namespace),
            condition,
            key: key?,
            rate: rate?,
            cost: cost?,
            soft: soft?,
            on_exceed: on_exceed?,
            mode: mode?,
            on_store_error: on_store_error?,
            on_missing_key: on_missing_key?,
            priority: priority?,
            counts: counts?,
        })
        .filter(|_| ok)
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
                settings.key = Some((f, k));
                ("key", k.span)
            }
            ast::Setting::Algorithm(a) => {
                settings.algorithm = Some((f, a));
                settings.algorithm_explicit = explicit;
                ("algorithm", a.span)
            }
            ast::Setting::Rate(r) => {
                settings.rate = Some((f, r));
                ("rate", r.span)
            }
            ast::Setting::Lease(l) => {
                settings.lease = Some((f, l));
                ("lease", l.span)
            }
            ast::Setting::Cost(c) => {
                settings.cost = Some((f, c));
                ("cost", c.span)
            }
            ast::Setting::Soft(s) => {
                settings.soft = Some((f, s));
                ("soft", s.span)
            }
            ast::Setting::OnExceed(e) => {
                settings.on_exceed = Some((f, e));
                ("on_exceed", e.span)
            }
            ast::Setting::Mode(m) => {
                settings.mode = Some((f, m));
                ("mode", m.span)
            }
            ast::Setting::OnStoreError(m) => {
                settings.on_store_error = Some((f, m));
                ("on_store_error", m.span)
            }
            ast::Setting::OnMissingKey(m) => {
                settings.on_missing_key = Some((f, m));
                ("on_missing_key", m.span)
            }
            ast::Setting::Priority(p) => {
                settings.priority = Some((f, p));
                ("priority", p.span)
            }
            ast::Setting::Counts(c) => {
                settings.counts = Some((f, c));
                ("counts", c.span)
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
