//! Safelists, denylists and anomaly detectors.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn list(
        &mut self,
        f: usize,
        block: &ast::ListBlock,
        safelist: bool,
    ) -> (ListRule, StatusCode, Option<Arc<str>>) {
        let mut conditions: Vec<Condition> = Vec::with_capacity(block.conditions.len());
        for written in &block.conditions {
            let Some(line) = self.condition(f, written) else {
                continue;
            };
            // A line that names `domain` or `descriptor` is for Envoy rate-limit requests.
            if !line.names_descriptor() || self.descriptor_conditions(f, &[written]) {
                conditions.push(line);
            }
        }
        if block.conditions.is_empty() {
            self.error_help(
                f,
                block.name.span,
                format!("list `{}` has no entries", block.name.node),
                "empty list",
                "add a condition such as `ip in [10.0.0.0/8];`",
            );
        }
        let mut status = StatusCode::FORBIDDEN;
        let mut reason = None;
        for (i, respond) in block.respond.iter().enumerate() {
            if safelist {
                self.error_help(
                    f,
                    respond.span,
                    "a safelist does not respond",
                    "only denylists respond",
                    "requests on a safelist skip every limit",
                );
            } else if i > 0 {
                self.error_help(
                    f,
                    respond.span,
                    "a denylist has one `respond`",
                    "second `respond`",
                    "keep one `respond`",
                );
            } else {
                if let Some(s) = self.error_status(f, &respond.node.status) {
                    status = s;
                }
                reason = respond
                    .node
                    .reason
                    .as_ref()
                    .map(|r| Arc::from(r.node.as_str()));
            }
        }
        (
            ListRule {
                name: Arc::from(block.name.node.as_str()),
                conditions,
            },
            status,
            reason,
        )
    }

    pub(super) fn anomaly(
        &mut self,
        f: usize,
        block: &ast::AnomalyBlock,
        namespace: &Arc<str>,
    ) -> Option<Anomaly> {
        let mut ok = true;
        let stmts = self.anomaly_stmts(f, block, &mut ok);
        let key = match stmts.key {
            Some(k) => self.key_expr(f, k),
            None => Some(KeySpec {
                parts: vec![KeyPart::One(KeySource::Ip { v4: 32, v6: 64 })],
            }),
        };
        let statuses = self.statuses(f, stmts.count, &mut ok);
        let name = &block.name;
        let detector = match stmts.detect {
            Some(d) => self.detector(f, d),
            None => {
                let what = format!("anomaly `{}` has no threshold", name.node);
                let help = "add `detect 10 in 5min;`";
                self.error_help(f, name.span, what, "no `detect`", help);
                None
            }
        };
        let actions = match stmts.then {
            Some(actions) => self.anomaly_actions(f, actions),
            None => {
                let what = format!("anomaly `{}` does nothing when detected", name.node);
                let help = "add `then ban 15min;` or `then alert \"security\";`";
                self.error_help(f, name.span, what, "no `then`", help);
                None
            }
        };
        let mut conditions = stmts.conditions;
        let condition = match conditions.len() {
            0 => Condition::Always,
            1 => conditions.remove(0),
            _ => Condition::All(conditions),
        };
        let (key, detector, actions) = (key?, detector?, actions?);
        ok &= self.anomaly_fits(f, block, &condition, &key, &detector);
        ok.then(|| Anomaly {
            name: Arc::from(block.name.node.as_str()),
            counter: Arc::from(format!(
                "{}{}",
                crate::plan::select::ANOMALY_PREFIX,
                block.name.node
            )),
            namespace: Arc::clone(namespace),
            condition,
            key,
            statuses,
            detector,
            actions,
        })
    }

    /// Errors for the parts of an anomaly that could never hold or have a value for the
    /// requests it watches (Envoy rate-limit requests when its conditions name `domain` or
    /// `descriptor`, else HTTP requests). `false` when there was one.
    fn anomaly_fits(
        &mut self,
        f: usize,
        block: &ast::AnomalyBlock,
        condition: &Condition,
        key: &KeySpec,
        detector: &Detector,
    ) -> bool {
        let for_descriptors = condition.names_descriptor();
        let mut ok = true;
        let mut key_span = block.name.span;
        for stmt in &block.stmts {
            match stmt {
                ast::AnomalyStmt::Match(m) if for_descriptors => {
                    let written: Vec<&ast::Condition> = m.node.iter().collect();
                    ok &= self.descriptor_conditions(f, &written);
                }
                ast::AnomalyStmt::Key(k) => key_span = k.span,
                ast::AnomalyStmt::Detect(d) => {
                    if let Detector::Distinct { source, .. } = detector {
                        let reads_descriptor =
                            matches!(source, crate::plan::ValueFrom::Descriptor(_));
                        if reads_descriptor != for_descriptors {
                            ok = false;
                            let (kind, help) = if for_descriptors {
                                (
                                    "an Envoy rate-limit request",
                                    "count distinct values of a descriptor entry: `detect distinct descriptor(\"user\") > 20 in 10min;`",
                                )
                            } else {
                                (
                                    "an HTTP request",
                                    "name `domain` or `descriptor` in the anomaly's `match` to watch Envoy rate-limit requests",
                                )
                            };
                            self.error_help(
                                f,
                                d.span,
                                format!("the values counted never exist for {kind}"),
                                "no value",
                                help,
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        ok & self.key_fits(f, key_span, key, for_descriptors)
    }

    /// An anomaly block's statements, each once (a second one is a problem).
    fn anomaly_stmts<'b>(
        &mut self,
        f: usize,
        block: &'b ast::AnomalyBlock,
        ok: &mut bool,
    ) -> AnomalyStmts<'b> {
        let mut stmts = AnomalyStmts::default();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for stmt in &block.stmts {
            let (name, span) = match stmt {
                ast::AnomalyStmt::Match(m) => {
                    for c in &m.node {
                        match self.condition(f, c) {
                            Some(c) => stmts.conditions.push(c),
                            None => *ok = false,
                        }
                    }
                    continue;
                }
                ast::AnomalyStmt::Key(k) => {
                    stmts.key = Some(k);
                    ("key", k.span)
                }
                ast::AnomalyStmt::Count(c) => {
                    stmts.count = Some(c);
                    ("count", c.span)
                }
                ast::AnomalyStmt::Detect(d) => {
                    stmts.detect = Some(d);
                    ("detect", d.span)
                }
                ast::AnomalyStmt::Then(t) => {
                    stmts.then = Some(t);
                    ("then", t.span)
                }
            };
            if seen.insert(name, span).is_some() {
                let help = if name == "detect" {
                    "one pattern per anomaly: write another `anomaly` block for the other"
                } else {
                    "keep one"
                };
                self.error_help(
                    f,
                    span,
                    format!("`{name}` is set twice"),
                    "set again here",
                    help,
                );
                *ok = false;
            }
        }
        stmts
    }

    /// `count when status in [...]`: HTTP statuses (none: every response counts).
    fn statuses(
        &mut self,
        f: usize,
        count: Option<&Spanned<Vec<Spanned<u64>>>>,
        ok: &mut bool,
    ) -> Vec<u16> {
        let mut codes = Vec::new();
        for s in count.iter().flat_map(|list| &list.node) {
            match u16::try_from(s.node)
                .ok()
                .filter(|s| (100..=599).contains(s))
            {
                Some(code) => codes.push(code),
                None => {
                    self.error_help(
                        f,
                        s.span,
                        format!("`{}` is not an HTTP status", s.node),
                        "not a status",
                        "statuses are between 100 and 599",
                    );
                    *ok = false;
                }
            }
        }
        codes
    }

    fn detector(&mut self, f: usize, detect: &Spanned<ast::Detect>) -> Option<Detector> {
        let at_least = |this: &mut Self, n: &Spanned<u64>, least: u64, what: &str, help: &str| {
            if n.node < least {
                this.error_help(
                    f,
                    n.span,
                    format!("{what} is at least {least}"),
                    "too small",
                    help,
                );
                false
            } else {
                true
            }
        };
        let window = |this: &mut Self, w: &Spanned<ast::DurationLit>| match this
            .duration_micros(f, w, "window")?
        {
            m if m <= DAY => Some(Duration::from_micros(m)),
            _ => {
                this.error_help(
                    f,
                    w.span,
                    "an anomaly's window is at most a day",
                    "too long",
                    "patterns slower than that are for analytics queries",
                );
                None
            }
        };
        match &detect.node {
            ast::Detect::Count { count, window: w } => {
                let fine = at_least(
                    self,
                    count,
                    1,
                    "a threshold",
                    "write how many counted responses trigger it, such as `detect 10 in 5min;`",
                );
                let window = window(self, w)?;
                fine.then_some(Detector::Count {
                    threshold: count.node,
                    window,
                })
            }
            ast::Detect::Rate { factor, window: w } => {
                let fine = at_least(
                    self,
                    factor,
                    2,
                    "a rate's factor",
                    "a burst is a multiple of the usual rate, such as `rate > 10x baseline`",
                );
                let window = window(self, w)?;
                fine.then_some(Detector::Rate {
                    factor: factor.node,
                    window,
                })
            }
            ast::Detect::Distinct {
                source,
                count,
                window: w,
            } => {
                let fine = at_least(
                    self,
                    count,
                    1,
                    "a distinct count",
                    "write how many different values are normal, such as `> 20`",
                );
                let fine = fine
                    && (count.node <= MAX_DISTINCT || {
                        self.error_help(
                            f,
                            count.span,
                            format!("a distinct count is at most {MAX_DISTINCT}"),
                            "too large",
                            "each key keeps its values until the window ends: keep it small",
                        );
                        false
                    });
                let source = self.value_from(f, source);
                let window = window(self, w)?;
                Some(Detector::Distinct {
                    source: source?,
                    threshold: count.node,
                    window,
                })
                .filter(|_| fine)
            }
        }
    }

    fn anomaly_actions(
        &mut self,
        f: usize,
        actions: &Spanned<Vec<ast::ThenAction>>,
    ) -> Option<AnomalyActions> {
        let mut out = AnomalyActions::default();
        let mut ok = true;
        let lasting = |this: &mut Self, d: &Spanned<ast::DurationLit>, what: &str| match this
            .duration_micros(f, d, what)?
        {
            m if m <= MAX_BAN => Some(Duration::from_micros(m)),
            _ => {
                this.error_help(
                    f,
                    d.span,
                    format!("a {what} lasts at most 30 days"),
                    "too long",
                    "for longer, put the client on a list",
                );
                None
            }
        };
        for action in &actions.node {
            match action {
                ast::ThenAction::Ban(d) => match lasting(self, d, "ban") {
                    Some(d) => out.ban = Some(d),
                    None => ok = false,
                },
                ast::ThenAction::Alert(a) => out.alerts.push(Arc::from(a.node.as_str())),
                ast::ThenAction::Flag(d) => {
                    match d.node.as_ref().map(|d| lasting(self, d, "flag")) {
                        None => out.flag = Some(DEFAULT_MARK),
                        Some(Some(d)) => out.flag = Some(d),
                        Some(None) => ok = false,
                    }
                }
                ast::ThenAction::Tarpit { delay, lasting: l } => {
                    let held = match self.duration_micros(f, delay, "delay")? {
                        m if m > 0 && m <= MAX_TARPIT => Some(Duration::from_micros(m)),
                        _ => {
                            self.error_help(
                                f,
                                delay.span,
                                "a tarpit holds each request between 1ms and 30s",
                                "out of range",
                                "longer holds tie up connections: ban instead",
                            );
                            None
                        }
                    };
                    let l = match l {
                        Some(l) => lasting(self, l, "tarpit"),
                        None => Some(DEFAULT_MARK),
                    };
                    match (held, l) {
                        (Some(h), Some(l)) => out.tarpit = Some((h, l)),
                        _ => ok = false,
                    }
                }
            }
        }
        ok.then_some(out)
    }
}

/// How long a `flag` or a `tarpit` lasts when the policy does not say.
const DEFAULT_MARK: Duration = Duration::from_secs(3600);
/// The most distinct values a `detect distinct` counts to (each key keeps them).
const MAX_DISTINCT: u64 = 1_000;
/// The longest a tarpit holds one request, in microseconds.
const MAX_TARPIT: u64 = 30_000_000;

/// The statements of an anomaly block, as written.
#[derive(Default)]
struct AnomalyStmts<'b> {
    conditions: Vec<Condition>,
    key: Option<&'b ast::KeyExpr>,
    count: Option<&'b Spanned<Vec<Spanned<u64>>>>,
    detect: Option<&'b Spanned<ast::Detect>>,
    then: Option<&'b Spanned<Vec<ast::ThenAction>>>,
}
