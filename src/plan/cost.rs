//! What a request costs a limit: at admission, and — for a cost its response says — after.

use crate::request::JsonPath;

/// What one request costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    /// The same for every request.
    Fixed(u64),
    /// Read from a header, with a default and a ceiling.
    Header {
        /// The header.
        name: http::HeaderName,
        /// When the header is missing or not a whole number.
        default: u64,
        /// The largest accepted.
        max: u64,
    },
    /// Read from a field of the request's JSON body (`reserve json(…)`), with a default and
    /// a ceiling.
    Json {
        /// The field.
        path: JsonPath,
        /// When the body or the field is missing or not a whole number.
        default: u64,
        /// The largest accepted.
        max: u64,
    },
}

/// A cost known after the response (`cost response …`): the request counts its
/// reservation (the limit's [`Cost`]) at admission, and the difference is settled when the
/// response says what it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The terms added up: weight and where the amount is read.
    pub terms: Box<[(u64, Amount)]>,
    /// What a response that never says counts: `None` for the reservation.
    pub default: Option<u64>,
    /// The largest cost a response may count.
    pub max: u64,
}

/// Where an amount of a response is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Amount {
    /// A header (or trailer) of the response.
    Header(http::HeaderName),
    /// A field of the JSON body, or of an event of a `text/event-stream` body (the last
    /// event that carries it).
    Json(JsonPath),
    /// The hits an Envoy rate-limit request reports (`hits_addend`): Envoy's call once a
    /// stream is done carries what it used.
    Hits,
}

impl Usage {
    /// Whether it reads Envoy's hits: its requests count nothing at admission, and their
    /// hits are what they used.
    pub fn reads_hits(&self) -> bool {
        self.terms.iter().any(|(_, a)| *a == Amount::Hits)
    }

    /// What a response used, from the amount of each term (`None`: the response did not
    /// say it): the weighted sum, at most `max`; `None` when no term was said.
    pub fn total(&self, amounts: impl Iterator<Item = Option<u64>>) -> Option<u64> {
        let mut said = false;
        let mut total = 0u64;
        for ((weight, _), amount) in self.terms.iter().zip(amounts) {
            if let Some(a) = amount {
                said = true;
                total = total.saturating_add(a.saturating_mul(*weight));
            }
        }
        said.then_some(total.min(self.max))
    }
}

/// A usage limit in words, for `tollgate explain`: what `request` reserves (its `cost`) and
/// how what it used is read.
pub fn describe_usage(cost: &Cost, usage: &Usage, request: &crate::request::RequestCtx) -> String {
    let reserves = match cost {
        Cost::Fixed(n) => format!("reserves {n}"),
        Cost::Header { name, default, max } => {
            format!("reserves header `{name}` (default {default}, at most {max})")
        }
        Cost::Json { path, default, max } => {
            let read = request.body.as_deref().and_then(|b| path.amount(b));
            let now = read.map_or_else(String::new, |n| format!(": {}", n.min(*max)));
            format!(
                "reserves the request body's `{}`{now} (default {default}, at most {max})",
                path.as_str()
            )
        }
    };
    let terms: Vec<String> = usage
        .terms
        .iter()
        .map(|(weight, amount)| {
            let what = match amount {
                Amount::Header(name) => format!("header `{name}`"),
                Amount::Json(path) => format!("`{}`", path.as_str()),
                Amount::Hits => "Envoy's hits_addend".to_owned(),
            };
            if *weight == 1 {
                what
            } else {
                format!("{weight} × {what}")
            }
        })
        .collect();
    let silent = match usage.default {
        None => "as reserved".to_owned(),
        Some(n) => n.to_string(),
    };
    format!(
        "{reserves}; settles at what the response says it used, {} (at most {}; a response that never says: {silent})",
        terms.join(" + "),
        usage.max
    )
}
