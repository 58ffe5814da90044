//! What a request costs: a constant, a header, or what its response says (`cost response
//! …`) with what it reserves (`reserve …`).

use super::Spanned;

/// Where an amount is read: a header, or a field of a JSON body (the request's for a
/// reservation, the response's for a cost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountSource {
    /// `header("X-Usage")`
    Header(Spanned<String>),
    /// `json("usage.total_tokens")`: the path as written.
    Json(Spanned<String>),
    /// `hits_addend`: the hits an Envoy rate-limit request reports (where it is written).
    Hits(super::Span),
}

/// One term of `cost response …`: `4 * json("usage.completion_tokens")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTerm {
    /// The weight (`None`: 1).
    pub weight: Option<Spanned<u64>>,
    /// Where the amount is read.
    pub source: AmountSource,
}

/// What a response that never says what was used counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageDefault {
    /// `default reserved`: the reservation.
    Reserved,
    /// `default N`
    Amount(u64),
}

/// `reserve 1000;` or `reserve json("max_tokens") default 1000 max 32000;`
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveExpr {
    /// The same for every request.
    Fixed(Spanned<u64>),
    /// Read from the request.
    Read {
        /// Where.
        source: AmountSource,
        /// When it is missing or not a whole number.
        default: Option<Spanned<u64>>,
        /// The largest accepted.
        max: Option<Spanned<u64>>,
    },
}

/// `cost 5;` or `cost header("X-Cost") default 1 max 100;`
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CostExpr {
    /// A fixed cost per request.
    Fixed(Spanned<u64>),
    /// The cost read from a header.
    Header {
        /// The header's name.
        name: Spanned<String>,
        /// The cost when the header is missing or not a number.
        default: Option<Spanned<u64>>,
        /// The largest cost accepted from the header.
        max: Option<Spanned<u64>>,
    },
    /// `cost response …`: what the response says the request used, settled after it.
    Response {
        /// The terms added up.
        terms: Vec<UsageTerm>,
        /// What a response that never says counts.
        default: Option<Spanned<UsageDefault>>,
        /// The largest cost accepted from a response.
        max: Option<Spanned<u64>>,
    },
}
