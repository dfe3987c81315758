//! The aggregator's Prometheus metrics, per task hub, served on `/metrics`, with the enums
//! their labels are spelled by. The Kubernetes sources and the TLS listeners register their
//! own series in the same registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::hub::HubKey;
use crate::metrics::label_values;
use crate::storage::StorageError;
use crate::tls::{ReloadCounters, ReloadOutcome};

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

/// What one cold-probe round came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeOutcome {
    /// Every uncovered queue was read.
    Ok,
    /// Some queues were read, some failed.
    Partial,
    /// The trigger's connection string does not parse.
    BadConnection,
    /// The task hub does not exist in that storage account (yet).
    NotProvisioned,
    /// Storage refused the credentials.
    Authentication,
    /// Storage could not be reached.
    Unreachable,
    /// The hub's queues exist but no ownership store does (no table, no taskhub.json).
    NoOwnershipStore,
    /// Any other storage error.
    Unexpected,
}

label_values!(ProbeOutcome {
    Ok => "ok",
    Partial => "partial",
    BadConnection => "bad_connection",
    NotProvisioned => "not_provisioned",
    Authentication => "authentication",
    Unreachable => "unreachable",
    NoOwnershipStore => "no_ownership_store",
    Unexpected => "unexpected",
});

impl From<&StorageError> for ProbeOutcome {
    fn from(error: &StorageError) -> Self {
        match error {
            StorageError::NotProvisioned { .. } => Self::NotProvisioned,
            StorageError::Authentication { .. } => Self::Authentication,
            StorageError::Unreachable { .. } => Self::Unreachable,
            StorageError::NoOwnershipStore { .. } => Self::NoOwnershipStore,
            StorageError::Unexpected { .. } => Self::Unexpected,
        }
    }
}

/// Why a sidecar report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionReason {
    /// A required field is empty.
    MissingField,
    /// The task hub name, partition count or queue layout is not one DurableTask makes.
    UnknownHubShape,
    /// A partition number is not below the partition count.
    PartitionOutOfRange,
    /// A timestamp lies too far in the future.
    FutureTimestamp,
    /// No valid token.
    Unauthenticated,
    /// A valid token of another pod or namespace.
    PermissionDenied,
}

label_values!(RejectionReason {
    MissingField => "missing_field",
    UnknownHubShape => "unknown_hub_shape",
    PartitionOutOfRange => "partition_out_of_range",
    FutureTimestamp => "future_timestamp",
    Unauthenticated => "unauthenticated",
    PermissionDenied => "permission_denied",
});

impl RejectionReason {
    /// The sender did not pass authentication: nothing it claims can be trusted, not even
    /// which hub it reports for.
    pub fn is_authentication(self) -> bool {
        matches!(self, Self::Unauthenticated | Self::PermissionDenied)
    }
}

/// Labels of the report refusals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// Kubernetes namespace (empty when the sender is not trusted).
    pub namespace: String,
    /// Task hub name, lowercased (empty when the sender is not trusted).
    pub task_hub: String,
    /// Why.
    pub reason: RejectionReason,
}

/// Labels of the cold probes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
    /// What the round came to.
    pub outcome: ProbeOutcome,
}

/// The aggregator's TLS ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The KEDA port (`--grpc-addr`).
    Keda,
    /// The report port (`--report-addr`, under `--report-tls`).
    Report,
}

label_values!(Port { Keda => "keda", Report => "report" });

/// Labels of the certificate reloads.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// Which port.
    pub port: Port,
    /// Taken into use or refused.
    pub outcome: ReloadOutcome,
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
    /// Work items the durable rules call stuck or poison (invisible and unchanged past the
    /// visibility timeout); they no longer keep pods alive.
    pub stuck_work_items: Family<HubLabels, Gauge>,
    /// Reports accepted.
    pub reports_received: Family<HubLabels, Counter>,
    /// Reports refused, by reason.
    pub reports_rejected: Family<RejectionLabels, Counter>,
    /// Cold probes, by outcome.
    pub probes: Family<ProbeLabels, Counter>,
    /// Task hubs in memory.
    pub hubs_tracked: Gauge,
    /// Changed TLS files taken into use or refused, by port.
    pub certificate_reloads: Family<ReloadLabels, Counter>,
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
        r.register(
            "stuck_work_items",
            "Stuck or poison work items: invisible and unchanged past the visibility timeout, not keeping pods alive",
            m.stuck_work_items.clone(),
        );
        r.register("reports_received", "Sidecar reports accepted", m.reports_received.clone());
        r.register("reports_rejected", "Sidecar reports refused, by reason", m.reports_rejected.clone());
        r.register("probes", "Cold probes, by outcome", m.probes.clone());
        r.register("hubs_tracked", "Task hubs in memory", m.hubs_tracked.clone());
        r.register(
            "certificate_reloads",
            "Changed TLS files taken into use (reloaded) or refused (the previous ones kept), by port",
            m.certificate_reloads.clone(),
        );
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
            &self.stuck_work_items,
        ] {
            family.remove(labels);
        }
    }

    /// Counts one cold probe of `key` that came to `outcome`.
    pub fn count_probe(&self, key: &HubKey, outcome: ProbeOutcome) {
        let labels =
            ProbeLabels { namespace: key.namespace.clone(), task_hub: key.task_hub.clone(), outcome };
        self.probes.get_or_create(&labels).inc();
    }

    /// Counts one report refused for `reason`, labelled with `key` (empty for untrusted
    /// senders).
    pub fn count_rejection(&self, key: &HubKey, reason: RejectionReason) {
        let labels =
            RejectionLabels { namespace: key.namespace.clone(), task_hub: key.task_hub.clone(), reason };
        self.reports_rejected.get_or_create(&labels).inc();
    }

    /// The counters of `port`'s certificate reloads.
    pub fn certificate_reloads(&self, port: Port) -> ReloadCounters {
        let counter = |outcome| self.certificate_reloads.get_or_create_owned(&ReloadLabels { port, outcome });
        ReloadCounters {
            reloaded: counter(ReloadOutcome::Reloaded),
            refused: counter(ReloadOutcome::Refused),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}
