//! The blocks of adaptive limits: `adaptive <method> { … }` and `admission { … }`.

use super::{DurationLit, Ident, Spanned};

/// `adaptive gradient { initial 20; min 5; max 200; }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveBlock {
    /// `gradient`, `aimd` or `vegas`.
    pub method: Ident,
    /// Its tuning, in order.
    pub tuning: Vec<Tuning>,
}

/// `admission { success when status in [200..499]; threshold 95%; }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionBlock {
    /// The statuses that count as a success, as written.
    pub success: Option<Spanned<Vec<StatusRange>>>,
    /// Its tuning, in order.
    pub tuning: Vec<Tuning>,
}

/// `200..499` is `(200, 499)`; `404` is `(404, 404)`.
pub type StatusRange = Spanned<(u64, u64)>;

/// `name value;` inside an `adaptive` or `admission` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// What is tuned.
    pub name: Ident,
    /// Its value.
    pub value: Spanned<TuningValue>,
}

/// A tuning value as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TuningValue {
    /// `20`
    Number(u64),
    /// `1.5`, as written.
    Decimal(String),
    /// `20%`
    Percent(u64),
    /// `500ms`
    Duration(DurationLit),
}
