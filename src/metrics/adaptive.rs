//! The adaptive limits' families: where each limit stands on this node, read at each scrape.

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};

use crate::store::adaptive::Summary;

/// `tollgate_adaptive_*{namespace,limit}`.
pub(super) struct AdaptiveFamilies {
    limit: IntGaugeVec,
    in_flight: IntGaugeVec,
    keys: IntGaugeVec,
    reject_probability: GaugeVec,
}

impl AdaptiveFamilies {
    pub(super) fn new(registry: &Registry) -> AdaptiveFamilies {
        let labels = &["namespace", "limit"];
        let int = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let reject_probability = GaugeVec::new(
            Opts::new(
                "tollgate_adaptive_reject_probability",
                "The share of requests an admission block refuses now on this node (the highest among the limit's keys).",
            ),
            labels,
        )
        .expect("a valid metric");
        registry
            .register(Box::new(reject_probability.clone()))
            .expect("registered once");
        AdaptiveFamilies {
            limit: int(
                "tollgate_adaptive_limit",
                "The current limit of an adaptive concurrency limit on this node (the lowest among its keys).",
            ),
            in_flight: int(
                "tollgate_adaptive_in_flight",
                "Requests in flight under an adaptive limit on this node (all its keys).",
            ),
            keys: int(
                "tollgate_adaptive_keys",
                "Keys an adaptive limit keeps a controller for on this node.",
            ),
            reject_probability,
        }
    }

    /// Sets every family from `summary`; limits no longer in it disappear.
    pub(super) fn update(&self, summary: &[Summary]) {
        self.limit.reset();
        self.in_flight.reset();
        self.keys.reset();
        self.reject_probability.reset();
        for s in summary {
            let labels = [s.namespace.as_str(), s.limit.as_str()];
            if let Some(lowest) = s.lowest {
                self.limit.with_label_values(&labels).set(i64::from(lowest));
            }
            self.in_flight
                .with_label_values(&labels)
                .set(i64::try_from(s.in_flight).unwrap_or(i64::MAX));
            self.keys
                .with_label_values(&labels)
                .set(i64::try_from(s.keys).unwrap_or(i64::MAX));
            self.reject_probability
                .with_label_values(&labels)
                .set(s.reject_probability);
        }
    }
}
