//! Safelists, denylists and anomaly detectors.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn list(
        &mut self,
        f: usize,
        block: &ast::ListBlock,
        safelist: bool,
    ) -> (ListRule, StatusCode, Option<Arc<str>>) {
        let conditions: Vec<Condition> = block
            .conditions
            .iter()
            .filter_map(|c| self.condition(f, c))
            .collect();
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
        let mut conditions = Vec::new();
        let mut key = None;
        let mut statuses = None;
        let mut detect = None;
        let mut then = None;
        let mut ok = true;
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for stmt in &block.stmts {
            let (name, span) = match stmt {
                ast::AnomalyStmt::Match(m) => {
                    for c in &m.node {
                        match self.condition(f, c) {
                            Some(c) => conditions.push(c),
                            None => ok = false,
                        }
                    }
                    continue;
                }
                ast::AnomalyStmt::Key(k) => {
                    key = Some(k);
                    ("key", k.span)
                }
                ast::AnomalyStmt::Count(c) => {
                    statuses = Some(c);
                    ("count", c.span)
                }
                ast::AnomalyStmt::Detect {
                    count,
                    window,
                    span,
                } => {
                    detect = Some((count, window));
                    ("detect", *span)
                }
                ast::AnomalyStmt::Then(t) => {
                    then = Some(t);
                    ("then", t.span)
                }
            };
            if seen.insert(name, span).is_some() {
                self.error_help(
                    f,
                    span,
                    format!("`{name}` is set twice"),
                    "set again here",
                    "keep one",
                );
                ok = false;
            }
        }
        let key = match key {
            Some(k) => self.key_expr(f, k),
            None => Some(KeySpec {
                parts: vec![KeyPart::One(KeySource::Ip { v4: 32, v6: 64 })],
            }),
        };
        let mut status_codes = Vec::new();
        match statuses {
            Some(list) => {
                for s in &list.node {
                    match u16::try_from(s.node)
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                    {
                        Some(code) => status_codes.push(code),
                        None => {
                            self.error_help(
                                f,
                                s.span,
                                format!("`{}` is not an HTTP status", s.node),
                                "not a status",
                                "statuses are between 100 and 599",
                            );
                            ok = false;
                        }
                    }
                }
            }
            None => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("anomaly `{}` does not say what to count", block.name.node),
                    "no `count`",
                    "add `count when status in [401, 403];`",
                );
                ok = false;
            }
        }
        let (threshold, window) = match detect {
            Some((count, window)) => {
                if count.node == 0 {
                    self.error_help(
                        f,
                        count.span,
                        "a threshold is at least 1",
                        "zero",
                        "write how many counted responses trigger it, such as `detect 10 in 5min;`",
                    );
                    ok = false;
                }
                let w = self.duration_micros(f, window, "window");
                if w.is_none() {
                    ok = false;
                }
                (count.node, Duration::from_micros(w.unwrap_or(1)))
            }
            None => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("anomaly `{}` has no threshold", block.name.node),
                    "no `detect`",
                    "add `detect 10 in 5min;`",
                );
                ok = false;
                (1, Duration::from_secs(1))
            }
        };
        let mut ban = None;
        let mut alerts = Vec::new();
        match then {
            Some(actions) => {
                for action in &actions.node {
                    match action {
                        ast::ThenAction::Ban(d) => match self.duration_micros(f, d, "ban") {
                            Some(m) if m <= MAX_BAN => ban = Some(Duration::from_micros(m)),
                            Some(_) => {
                                self.error_help(
                                    f,
                                    d.span,
                                    "a ban lasts at most 30 days",
                                    "too long",
                                    "for longer, put the client on a denylist",
                                );
                                ok = false;
                            }
                            None => ok = false,
                        },
                        ast::ThenAction::Alert(a) => alerts.push(Arc::from(a.node.as_str())),
                    }
                }
            }
            None => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("anomaly `{}` does nothing when detected", block.name.node),
                    "no `then`",
                    "add `then ban 15min;` or `then alert \"security\";`",
                );
                ok = false;
            }
        }
        let condition = match conditions.len() {
            0 => Condition::Always,
            1 => conditions.remove(0),
            _ => Condition::All(conditions),
        };
        let key = key?;
        ok.then(|| Anomaly {
            name: Arc::from(block.name.node.as_str()),
            namespace: Arc::clone(namespace),
            condition,
            key,
            statuses: status_codes,
            threshold,
            window,
            ban,
            alerts,
        })
    }
}
