//! `algorithm adaptive_concurrency` with its `adaptive <method> { … }` block, and
//! `admission { … }` blocks: each tuning value checked by name, kind and range, with the
//! defaults of Netflix's concurrency-limits and Envoy's admission control.

use super::*;
use crate::limiter::adaptive::Method;
use crate::plan::adaptive::{Adaptive, AdaptiveConcurrency, Admission};

/// The methods of an adaptive concurrency limit.
const METHODS: &[&str] = &["gradient", "gradient2", "aimd", "vegas"];

/// What a tuning value is.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A whole number: `20`.
    Count,
    /// A share: `20%` or `0.2`.
    Share,
    /// A positive number, whole or not: `1.5`.
    Factor,
    /// A span of time: `500ms`.
    Time,
}

impl Kind {
    fn example(self) -> &'static str {
        match self {
            Kind::Count => "a whole number such as `20`",
            Kind::Share => "a share such as `20%`",
            Kind::Factor => "a number such as `1.5`",
            Kind::Time => "a span of time such as `500ms`",
        }
    }
}

/// One tuning a block takes: its name, kind, default and allowed range.
struct Knob {
    name: &'static str,
    kind: Kind,
    default: f64,
    range: (f64, f64),
}

const fn knob(name: &'static str, kind: Kind, default: f64, range: (f64, f64)) -> Knob {
    Knob {
        name,
        kind,
        default,
        range,
    }
}

const BOUNDS: [Knob; 3] = [
    knob("initial", Kind::Count, 20.0, (1.0, 1_000_000.0)),
    knob("min", Kind::Count, 1.0, (1.0, 1_000_000.0)),
    knob("max", Kind::Count, 1_000.0, (1.0, 1_000_000.0)),
];
const GRADIENT: [Knob; 7] = [
    knob("tolerance", Kind::Factor, 1.25, (1.0, 100.0)),
    knob("smoothing", Kind::Share, 0.2, (0.01, 1.0)),
    knob("percentile", Kind::Share, 0.9, (0.01, 1.0)),
    knob("interval", Kind::Time, 0.1, (0.001, 60.0)),
    knob("min_rtt_every", Kind::Time, 30.0, (1.0, 86_400.0)),
    knob("min_rtt_requests", Kind::Count, 50.0, (1.0, 100_000.0)),
    knob("min_concurrency", Kind::Count, 3.0, (1.0, 1_000.0)),
];
const GRADIENT2: [Knob; 3] = [
    knob("tolerance", Kind::Factor, 1.5, (1.0, 100.0)),
    knob("smoothing", Kind::Share, 0.2, (0.01, 1.0)),
    knob("long_window", Kind::Count, 600.0, (1.0, 1_000_000.0)),
];
const AIMD: [Knob; 2] = [
    knob("backoff", Kind::Share, 0.9, (0.5, 0.99)),
    knob("timeout", Kind::Time, 5.0, (0.001, 3_600.0)),
];
const VEGAS: [Knob; 2] = [
    knob("alpha", Kind::Factor, 3.0, (0.1, 1_000.0)),
    knob("beta", Kind::Factor, 6.0, (0.1, 1_000.0)),
];
const ADMISSION: [Knob; 5] = [
    knob("threshold", Kind::Share, 0.95, (0.01, 1.0)),
    knob("aggression", Kind::Factor, 1.0, (1.0, 100.0)),
    knob("max_reject", Kind::Share, 0.8, (0.0, 1.0)),
    knob("window", Kind::Time, 30.0, (1.0, 86_400.0)),
    knob("min_requests", Kind::Count, 20.0, (1.0, 1_000_000.0)),
];

impl<'a> Compiler<'a> {
    /// The limit's node-local parts: its `adaptive` block (for `algorithm
    /// adaptive_concurrency`, which needs no block: the gradient method with its defaults) and
    /// its `admission` block; `None` when it has neither. Problems are reported and clear `ok`.
    pub(super) fn adaptive(
        &mut self,
        f: usize,
        block: &'a ast::LimitBlock,
        algorithm: Option<Algorithm>,
        lease: u64,
        for_descriptors: bool,
        ok: &mut bool,
    ) -> Option<Arc<Adaptive>> {
        let mut adaptive = None;
        let mut admission = None;
        for stmt in &block.stmts {
            match stmt {
                ast::LimitStmt::Adaptive(b) => *ok &= self.once(f, &mut adaptive, b, "adaptive"),
                ast::LimitStmt::Admission(b) => {
                    *ok &= self.once(f, &mut admission, b, "admission");
                }
                _ => {}
            }
        }
        let is_adaptive = algorithm == Some(Algorithm::AdaptiveConcurrency);
        if let (Some(b), false) = (adaptive, is_adaptive) {
            self.error_help(
                f,
                b.span,
                "`adaptive` applies only to adaptive concurrency limits",
                "not an adaptive limit",
                "add `algorithm adaptive_concurrency;` to the limit",
            );
            *ok = false;
        }
        if (is_adaptive || admission.is_some()) && for_descriptors {
            let at = admission.map_or(block.name.span, |b| b.span);
            self.error_help(
                f,
                at,
                format!(
                    "limit `{}` is for Envoy rate-limit requests, which never report their latency or status: it cannot adapt",
                    block.name.node
                ),
                "adapts to responses",
                "protect the upstream where its responses pass: Tollgate's layer, proxy or forward-auth with `/v1/report`",
            );
            *ok = false;
        }
        let concurrency = match (is_adaptive, adaptive) {
            (false, _) => None,
            (true, Some(b)) => Some(self.concurrency(f, &b.node, ok)?),
            (true, None) => Some(AdaptiveConcurrency {
                method: gradient(&GRADIENT.map(|k| k.default)),
                initial: BOUNDS[0].default as u32,
                min: BOUNDS[1].default as u32,
                max: BOUNDS[2].default as u32,
            }),
        };
        let admission = match admission {
            Some(b) => Some(self.admission(f, &b.node, ok)?),
            None => None,
        };
        if concurrency.is_none() && admission.is_none() {
            return None;
        }
        Some(Arc::new(Adaptive {
            concurrency,
            admission,
            lease: Duration::from_micros(lease),
        }))
    }

    /// Keeps the first block of a kind; a second one is an error.
    fn once<T>(
        &mut self,
        f: usize,
        first: &mut Option<&'a Spanned<T>>,
        block: &'a Spanned<T>,
        what: &str,
    ) -> bool {
        if let Some(seen) = first {
            let help = format!(
                "it was first written at {}; keep one",
                self.location(Site {
                    file: f,
                    span: seen.span
                })
            );
            self.error_help(
                f,
                block.span,
                format!("`{what}` is written twice"),
                "again here",
                help,
            );
            return false;
        }
        *first = Some(block);
        true
    }

    /// `adaptive <method> { … }`
    fn concurrency(
        &mut self,
        f: usize,
        block: &'a ast::AdaptiveBlock,
        ok: &mut bool,
    ) -> Option<AdaptiveConcurrency> {
        let method = &block.method;
        let own: &[Knob] = match method.node.as_str() {
            "gradient" => &GRADIENT,
            "gradient2" => &GRADIENT2,
            "aimd" => &AIMD,
            "vegas" => &VEGAS,
            _ => {
                let intro = "the methods are";
                self.unknown_name(f, method, "method", "unknown method", METHODS, intro);
                *ok = false;
                return None;
            }
        };
        let knobs: Vec<&Knob> = BOUNDS.iter().chain(own).collect();
        let values = self.values(f, &knobs, &block.tuning, ok);
        let method = match method.node.as_str() {
            "gradient" => gradient(&values[3..]),
            "gradient2" => Method::Gradient2 {
                tolerance: values[3],
                smoothing: values[4],
                long_window: values[5] as u32,
            },
            "aimd" => Method::Aimd {
                backoff: values[3],
                timeout: Duration::from_secs_f64(values[4]),
            },
            _ => Method::Vegas {
                alpha: values[3],
                beta: values[4],
            },
        };
        let [initial, min, max] = [values[0], values[1], values[2]].map(|v| v as u32);
        if !(min <= initial && initial <= max) {
            self.error_help(
                f,
                block.method.span,
                format!("the bounds are out of order: min {min}, initial {initial}, max {max}"),
                "these bounds",
                "an adaptive limit starts at `initial` and stays within `min` and `max`: min ≤ initial ≤ max",
            );
            *ok = false;
        }
        if let Method::Vegas { alpha, beta } = method
            && alpha >= beta
        {
            self.error_help(
                f,
                block.method.span,
                format!("`alpha` ({alpha}) must be below `beta` ({beta})"),
                "vegas",
                "the limit grows while the queue is under `alpha` and shrinks once it is over `beta`",
            );
            *ok = false;
        }
        Some(AdaptiveConcurrency {
            method,
            initial,
            min,
            max,
        })
    }

    /// `admission { … }`
    fn admission(
        &mut self,
        f: usize,
        block: &'a ast::AdmissionBlock,
        ok: &mut bool,
    ) -> Option<Admission> {
        let knobs: Vec<&Knob> = ADMISSION.iter().collect();
        let values = self.values(f, &knobs, &block.tuning, ok);
        let mut success = Vec::new();
        for range in block.success.iter().flat_map(|s| &s.node) {
            let (low, high) = range.node;
            if !(100..=599).contains(&low) || !(100..=599).contains(&high) || low > high {
                self.error_help(
                    f,
                    range.span,
                    "not a range of HTTP statuses",
                    "statuses",
                    "write statuses from 100 to 599, a range low first: `200..499`",
                );
                *ok = false;
                continue;
            }
            success.push((low as u16, high as u16));
        }
        if block.success.is_none() {
            // Envoy's default for HTTP: every answer but a 5xx is a success.
            success.push((100, 499));
        }
        Some(Admission {
            success: success.into(),
            threshold: values[0],
            aggression: values[1],
            max_probability: values[2],
            window: Duration::from_secs_f64(values[3]),
            min_requests: values[4] as u64,
        })
    }

    /// The value of each knob (in seconds for spans of time, 0–1 for shares): as written,
    /// else its default. Unknown names, repeated names, values of the wrong kind and values
    /// out of range are reported.
    fn values(
        &mut self,
        f: usize,
        knobs: &[&Knob],
        tuning: &'a [ast::Tuning],
        ok: &mut bool,
    ) -> Vec<f64> {
        let mut values: Vec<f64> = knobs.iter().map(|k| k.default).collect();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        let names: Vec<&str> = knobs.iter().map(|k| k.name).collect();
        for t in tuning {
            let Some(i) = names.iter().position(|n| *n == t.name.node) else {
                let intro = "this block takes";
                self.unknown_name(f, &t.name, "setting", "unknown here", &names, intro);
                *ok = false;
                continue;
            };
            if let Some(first) = seen.insert(names[i], t.name.span) {
                let help = format!(
                    "it was first set at {}; keep one",
                    self.location(Site {
                        file: f,
                        span: first
                    })
                );
                let message = format!("`{}` is set twice", names[i]);
                self.error_help(f, t.name.span, message, "set again here", help);
                *ok = false;
                continue;
            }
            let knob = knobs[i];
            match self.tuning_value(f, knob, &t.value) {
                Some(v) => values[i] = v,
                None => *ok = false,
            }
        }
        values
    }

    /// One value of `knob`'s kind, within its range.
    fn tuning_value(
        &mut self,
        f: usize,
        knob: &Knob,
        value: &Spanned<ast::TuningValue>,
    ) -> Option<f64> {
        let read = match (knob.kind, &value.node) {
            (Kind::Count, ast::TuningValue::Number(n)) => Some(*n as f64),
            (Kind::Share, ast::TuningValue::Percent(p)) => Some(*p as f64 / 100.0),
            (Kind::Share | Kind::Factor, ast::TuningValue::Decimal(d)) => d.parse().ok(),
            (Kind::Factor, ast::TuningValue::Number(n)) => Some(*n as f64),
            (Kind::Time, ast::TuningValue::Duration(d)) => {
                let spanned = Spanned::new(*d, value.span);
                let micros = self.duration_micros(f, &spanned, knob.name)?;
                Some(micros as f64 / 1e6)
            }
            _ => None,
        };
        let Some(v) = read else {
            let help = format!("`{}` takes {}", knob.name, knob.kind.example());
            let message = format!("`{}` cannot be this value", knob.name);
            self.error_help(f, value.span, message, "wrong kind of value", help);
            return None;
        };
        let (low, high) = knob.range;
        if !(low..=high).contains(&v) {
            let shown = |x: f64| match knob.kind {
                Kind::Share => format!("{}%", x * 100.0),
                Kind::Time => format!("{}s", x),
                _ => format!("{x}"),
            };
            let help = format!(
                "`{}` ranges from {} to {}",
                knob.name,
                shown(low),
                shown(high)
            );
            let message = format!("`{}` is out of range", knob.name);
            self.error_help(f, value.span, message, "out of range", help);
            return None;
        }
        Some(v)
    }

    /// What a limit decided in the node only cannot do: ban (it refuses because the
    /// upstream is full, not because of the client; nothing is counted per client), and —
    /// admission control alone, which counts nothing down — soft thresholds.
    pub(super) fn node_only_settings(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        concurrency: bool,
        limit: &str,
    ) -> bool {
        let mut ok = true;
        if let Some(ban) = settings.on_exceed.and_then(|e| e.node.ban.as_ref()) {
            self.error_help(
                f,
                ban.span,
                format!("limit `{limit}` is adaptive: it cannot ban"),
                "a ban",
                "it refuses because the upstream is full or failing, not because of who asks; ban with a rate limit or an anomaly block",
            );
            ok = false;
        }
        if let (Some(mode), true) = (settings.on_store_error, settings.on_store_error_explicit) {
            self.error_help(
                f,
                mode.span,
                format!(
                    "limit `{limit}` is decided in each node's memory: it has no store to fail"
                ),
                "never used",
                "drop `on_store_error`: this limit never calls the store",
            );
            ok = false;
        }
        if let (Some(soft), false) = (settings.soft, concurrency) {
            self.error_help(
                f,
                soft.span,
                format!("limit `{limit}` is admission control alone, which counts nothing down: `soft` has no share to act at"),
                "soft thresholds",
                "put `soft` on a limit with a rate, or on an `adaptive_concurrency` limit (its share is in flight ÷ its limit)",
            );
            ok = false;
        }
        ok
    }

    /// An adaptive concurrency limit moves its own limit: a `rate` written in it is an error.
    pub(super) fn no_written_rate(&mut self, f: usize, block: &ast::LimitBlock) -> bool {
        let written = block.stmts.iter().find_map(|s| match s {
            ast::LimitStmt::Setting(ast::Setting::Rate(rate)) => Some(rate.span),
            _ => None,
        });
        let Some(span) = written else {
            return true;
        };
        self.error_help(
            f,
            span,
            "an adaptive concurrency limit takes no `rate`",
            "a fixed rate",
            "it moves between the bounds of its `adaptive` block: `adaptive gradient { initial 20; min 5; max 200; }`",
        );
        false
    }
}

/// The gradient method from its tuning values: tolerance, smoothing, percentile, interval,
/// min RTT interval and requests, min concurrency.
fn gradient(values: &[f64]) -> Method {
    Method::Gradient {
        tolerance: values[0],
        smoothing: values[1],
        percentile: values[2],
        interval: Duration::from_secs_f64(values[3]),
        min_rtt_every: Duration::from_secs_f64(values[4]),
        min_rtt_requests: values[5] as u32,
        min_concurrency: values[6] as u32,
    }
}
