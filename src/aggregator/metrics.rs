//! The aggregator's Prometheus metrics, per task hub, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::hub::HubKey;

/// Labels of every per-hub series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubLabels {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
}

impl From<&HubKey> for HubLabels {
    fn from(key: &HubKey) -> Self {
        Self { namespace: key.namespace.clone(), task_hub: key.task_hub.clone() }
    }
}

/// A per-hub series with one more label saying which kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubKindLabels {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
    /// The reason (rejections) or outcome (probes).
    pub kind: String,
}

/// Every metric the aggregator exports.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Registry,
    /// The worker count GetMetrics asks for.
    pub desired_workers: Family<HubLabels, Gauge>,
    /// The worker count the decision was taken from.
    pub workers: Family<HubLabels, Gauge>,
    /// 1 while IsActive answers true.
    pub active: Family<HubLabels, Gauge>,
    /// Partitions a live sidecar reports.
    pub covered_partitions: Family<HubLabels, Gauge>,
    /// Partitions no live sidecar reports (probed when a connection is known).
    pub uncovered_partitions: Family<HubLabels, Gauge>,
    /// 1 when KEDA sent a connection, so uncovered queues are probed; 0 when the hub is
    /// served from sidecar reports alone.
    pub connection_known: Family<HubLabels, Gauge>,
    /// Reports accepted.
    pub reports_received: Family<HubLabels, Counter>,
    /// Reports refused, by reason.
    pub reports_rejected: Family<HubKindLabels, Counter>,
    /// Cold probes, by outcome.
    pub probes: Family<HubKindLabels, Counter>,
    /// Task hubs in memory.
    pub hubs_tracked: Gauge,
}

impl Metrics {
    /// Registers every family under `durable_scaler_aggregator_`.
    pub fn new() -> Self {
        let mut m = Self::default();
        let r = m.registry.sub_registry_with_prefix("durable_scaler_aggregator");
        r.register("desired_workers", "Worker count GetMetrics asks for", m.desired_workers.clone());
        r.register("workers", "Worker count the decision was taken from", m.workers.clone());
        r.register("active", "1 while IsActive answers true", m.active.clone());
        r.register("covered_partitions", "Partitions a live sidecar reports", m.covered_partitions.clone());
        r.register(
            "uncovered_partitions",
            "Partitions no live sidecar reports (cold-probed when a connection is known)",
            m.uncovered_partitions.clone(),
        );
        r.register(
            "connection_known",
            "1 when KEDA sent a storage connection; 0 when served from sidecar reports alone",
            m.connection_known.clone(),
        );
        r.register("reports_received", "Sidecar reports accepted", m.reports_received.clone());
        r.register("reports_rejected", "Sidecar reports refused, by reason", m.reports_rejected.clone());
        r.register("probes", "Cold probes, by outcome", m.probes.clone());
        r.register("hubs_tracked", "Task hubs in memory", m.hubs_tracked.clone());
        m
    }

    /// The registry, for other parts (the Kubernetes sources) to register their metrics in
    /// before the aggregator starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Drops a dropped hub's gauges, so /metrics does not keep reporting it. Its counters
    /// stay (counters must not go back; they stop growing).
    pub fn forget(&self, labels: &HubLabels) {
        for family in [
            &self.desired_workers,
            &self.workers,
            &self.active,
            &self.covered_partitions,
            &self.uncovered_partitions,
            &self.connection_known,
        ] {
            family.remove(labels);
        }
    }

    /// Counts one event of `kind` for `key` in `family`.
    pub fn count(family: &Family<HubKindLabels, Counter>, key: &HubKey, kind: &str) {
        family
            .get_or_create(&HubKindLabels {
                namespace: key.namespace.clone(),
                task_hub: key.task_hub.clone(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
