//! The observers Tollgate ships, attached together: the decision log and the anomaly
//! detectors always, Prometheus's metrics and the ClickHouse export when wanted. The server
//! and the tower layer build their pipelines here.

use std::sync::Arc;

use crate::analytics::export::Exporting;
use crate::anomaly::Anomalies;
use crate::clock::{Clock, SystemClock};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pipeline::{DetectionSink, Observer, Pipeline};
use crate::store::{RuntimeStore, Store};
use crate::telemetry::Logs;

/// The observers attached to a pipeline, kept for what reads them back (the `/metrics`
/// scrape, `/v1/report`).
pub struct Observers<S, C = SystemClock> {
    /// Prometheus's families (`None`: nothing counted, `/metrics` answers 404).
    pub metrics: Option<Arc<Metrics>>,
    /// The ClickHouse export (`None`: nothing exported).
    pub exporting: Option<Exporting>,
    /// The anomaly detectors; their detections go to the metrics and the export.
    pub anomalies: Anomalies<S, C>,
    logs: Arc<Logs>,
}

impl<S, C> Clone for Observers<S, C> {
    fn clone(&self) -> Self {
        Observers {
            metrics: self.metrics.clone(),
            exporting: self.exporting.clone(),
            anomalies: self.anomalies.clone(),
            logs: Arc::clone(&self.logs),
        }
    }
}

impl<S: Store + RuntimeStore, C: Clock> Observers<S, C> {
    /// The decision log and the anomalies of `engine`, with `metrics` and `exporting` when
    /// given (anomalies report to both).
    pub fn new(
        engine: &Arc<Engine<S, C>>,
        metrics: Option<Arc<Metrics>>,
        exporting: Option<Exporting>,
    ) -> Self {
        let mut sinks: Vec<Arc<dyn DetectionSink>> = Vec::new();
        if let Some(metrics) = &metrics {
            sinks.push(Arc::clone(metrics) as Arc<dyn DetectionSink>);
        }
        if let Some(exporting) = &exporting {
            sinks.push(Arc::new(exporting.clone()));
        }
        Observers {
            metrics,
            exporting,
            anomalies: Anomalies::new(Arc::clone(engine), sinks),
            logs: Arc::new(Logs::new(engine.key_hasher().clone())),
        }
    }

    /// A pipeline around `engine` with these observers attached, in the order they see
    /// each decision: metrics, the log, the export, the anomalies.
    pub fn pipeline(&self, engine: Arc<Engine<S, C>>) -> Pipeline<S, C> {
        let mut pipeline = Pipeline::new(engine);
        if let Some(metrics) = &self.metrics {
            pipeline = pipeline.observe(Arc::clone(metrics) as Arc<dyn Observer>);
        }
        pipeline = pipeline.observe(Arc::clone(&self.logs) as Arc<dyn Observer>);
        if let Some(exporting) = &self.exporting {
            pipeline = pipeline.observe(Arc::new(exporting.clone()));
        }
        pipeline.observe(Arc::new(self.anomalies.clone()))
    }
}
