//! The aggregator's Prometheus metrics, per task hub, served on `/metrics`, with the enums
//! their labels are spelled by. The Kubernetes sources and the TLS listeners register their
//! own series in the same registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::hub::HubKey;
pub(crate) use crate::heuristic::engine::QueueMessages;
use crate::metrics::label_values;
use crate::storage::StorageError;
use crate::tls::{ReloadCounters, ReloadOutcome};

/// Labels of every per-hub series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HubLabels {
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
pub(crate) enum ProbeOutcome {
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
pub(crate) enum RejectionReason {
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
    /// A name beyond Kubernetes' rules or a text field beyond its length limit.
    InvalidName,
    /// The aggregator tracks as many hubs, or the hub as many pods, as it may.
    TooMany,
    /// A setting outside what the Durable extension accepts.
    OutOfRange,
}

label_values!(RejectionReason {
    MissingField => "missing_field",
    UnknownHubShape => "unknown_hub_shape",
    PartitionOutOfRange => "partition_out_of_range",
    FutureTimestamp => "future_timestamp",
    Unauthenticated => "unauthenticated",
    PermissionDenied => "permission_denied",
    InvalidName => "invalid_name",
    TooMany => "too_many",
    OutOfRange => "out_of_range",
});

/// Labels of the report refusals: the reason alone. What a refused report claims (its
/// namespace, its hub) is the sender's to choose; a series per claim would let anyone grow
/// `/metrics` without bound.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// Why.
    pub(crate) reason: RejectionReason,
}

/// What the aggregator keeps a bounded number of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tracked {
    /// Task hubs (`contract::limits::MAX_TRACKED_HUBS`).
    Hub,
    /// Pods of one hub (`contract::limits::MAX_PODS_PER_HUB`) or of all hubs
    /// (`contract::limits::MAX_TRACKED_PODS`).
    Pod,
}

label_values!(Tracked { Hub => "hub", Pod => "pod" });

/// Labels of the tracking limits' counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrackedLabels {
    /// What was refused or dropped.
    pub kind: Tracked,
}

/// Every [`ProbeOutcome`], to drop a hub's probe series.
const PROBE_OUTCOMES: [ProbeOutcome; 8] = [
    ProbeOutcome::Ok,
    ProbeOutcome::Partial,
    ProbeOutcome::BadConnection,
    ProbeOutcome::NotProvisioned,
    ProbeOutcome::Authentication,
    ProbeOutcome::Unreachable,
    ProbeOutcome::NoOwnershipStore,
    ProbeOutcome::Unexpected,
];

/// Drops a dropped hub's series from a family registered elsewhere (the probe's).
pub(crate) type ForgetHook = Box<dyn Fn(&HubLabels) + Send + Sync>;

/// The [`ForgetHook`]s, with a `Debug` that names how many.
#[derive(Default)]
struct ForgetHooks(Vec<ForgetHook>);

impl std::fmt::Debug for ForgetHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} hooks", self.0.len())
    }
}

/// Labels of the cold probes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProbeLabels {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
    /// What the round came to.
    pub outcome: ProbeOutcome,
}

/// The aggregator's TLS ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Port {
    /// The KEDA port (`--grpc-addr`).
    Keda,
    /// The report port (`--report-addr`, under `--report-tls`).
    Report,
}

label_values!(Port { Keda => "keda", Report => "report" });

/// Labels of the certificate reloads.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    /// Which port.
    pub port: Port,
    /// Taken into use or refused.
    pub outcome: ReloadOutcome,
}

/// Labels of the served certificates' expiry.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PortLabels {
    /// Which port.
    pub port: Port,
}

/// Which of a hub's queues a message count is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum QueueKind {
    /// The work-item queue (activities).
    WorkItem,
    /// The control queues (orchestrations), summed.
    Control,
}

label_values!(QueueKind { WorkItem => "work_item", Control => "control" });

/// Labels of the visible message counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QueueLabels {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
    /// Which queues.
    pub queue: QueueKind,
}

/// Every [`QueueKind`], to drop a hub's queue series.
const QUEUE_KINDS: [QueueKind; 2] = [QueueKind::WorkItem, QueueKind::Control];

/// A KEDA call the aggregator times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KedaCall {
    /// `IsActive`.
    IsActive,
    /// `GetMetrics`.
    GetMetrics,
}

label_values!(KedaCall { IsActive => "is_active", GetMetrics => "get_metrics" });

/// Labels of the KEDA call durations.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KedaCallLabels {
    /// Which call.
    pub method: KedaCall,
}

/// Bucket bounds (seconds) of the KEDA call durations: fine below the 2 ms the aggregator aims
/// at (docs/performance.md), coarse up to the first-probe wait of a new hub.
const KEDA_CALL_BUCKETS: [f64; 11] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0];

/// How long the aggregator took to answer KEDA's calls, from the request reaching the service
/// to the answer leaving it (what a client sees on top is the network and its own scheduling).
#[derive(Debug, Clone)]
pub(crate) struct KedaCallDurations(pub(crate) Family<KedaCallLabels, Histogram, fn() -> Histogram>);

impl Default for KedaCallDurations {
    fn default() -> Self {
        Self(Family::new_with_constructor(|| Histogram::new(KEDA_CALL_BUCKETS)))
    }
}

/// Every metric the aggregator exports.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Registry,
    /// The worker count GetMetrics asks for.
    pub(crate) desired_workers: Family<HubLabels, Gauge>,
    /// The worker count the decision was taken from.
    pub(crate) workers: Family<HubLabels, Gauge>,
    /// 1 while IsActive answers true.
    pub(crate) active: Family<HubLabels, Gauge>,
    /// Partitions a live sidecar reports.
    pub(crate) covered_partitions: Family<HubLabels, Gauge>,
    /// Partitions no live sidecar reports (probed when a connection is known).
    pub(crate) uncovered_partitions: Family<HubLabels, Gauge>,
    /// 1 when KEDA sent a connection, so uncovered queues are probed; 0 when the hub is
    /// served from sidecar reports alone.
    pub(crate) connection_known: Family<HubLabels, Gauge>,
    /// Invisible control messages the durable rules take for held by a worker (work).
    pub(crate) held_messages: Family<HubLabels, Gauge>,
    /// Invisible control messages the durable rules take for sleeping timers (not work).
    pub(crate) timer_messages: Family<HubLabels, Gauge>,
    /// Invisible work items: activities running (renewed) or backing off.
    pub(crate) invisible_work_items: Family<HubLabels, Gauge>,
    /// 1 while KEDA's IsActive and GetMetrics for the hub are answered UNAVAILABLE (not wholly
    /// read yet, or nobody can read it now).
    pub(crate) unavailable: Family<HubLabels, Gauge>,
    /// Visible messages of the hub's queues at their latest readings: work waiting.
    pub(crate) visible_messages: Family<QueueLabels, Gauge>,
    /// Reports accepted.
    pub(crate) reports_received: Family<HubLabels, Counter>,
    /// Reports refused, by reason.
    pub(crate) reports_rejected: Family<RejectionLabels, Counter>,
    /// Cold probes, by outcome.
    pub(crate) probes: Family<ProbeLabels, Counter>,
    /// Task hubs in memory.
    pub hubs_tracked: Gauge,
    /// Pods in memory, over all hubs.
    pub pods_tracked: Gauge,
    /// Hubs and pods refused because as many as the limits allow were tracked and active.
    pub tracking_refused: Family<TrackedLabels, Counter>,
    /// Hubs and pods dropped, least recently seen first, to make room for new ones.
    pub tracking_replaced: Family<TrackedLabels, Counter>,
    forget_hooks: ForgetHooks,
    /// Changed TLS files taken into use or refused, by port.
    pub(crate) certificate_reloads: Family<ReloadLabels, Counter>,
    /// The notAfter of the certificate each TLS port serves (Unix seconds).
    pub(crate) certificate_expiry: Family<PortLabels, Gauge>,
    pub(crate) keda_call_durations: KedaCallDurations,
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
            "held_messages",
            "Invisible control messages taken for held by a worker (prefetched or in a session): counted as work",
            m.held_messages.clone(),
        );
        r.register(
            "timer_messages",
            "Invisible control messages taken for sleeping durable timers: not counted as work",
            m.timer_messages.clone(),
        );
        r.register(
            "invisible_work_items",
            "Invisible work items (activities running, renewed, or backing off): work while a worker runs",
            m.invisible_work_items.clone(),
        );
        r.register(
            "unavailable",
            "1 while KEDA's calls for the hub are answered UNAVAILABLE (not wholly read yet, or nobody can read it now)",
            m.unavailable.clone(),
        );
        r.register(
            "visible_messages",
            "Visible messages (work waiting) at the latest readings: queue=work_item, or control summed \
             over the control queues; a peek sees at most 32 per queue",
            m.visible_messages.clone(),
        );
        r.register("reports_received", "Sidecar reports accepted", m.reports_received.clone());
        r.register("reports_rejected", "Sidecar reports refused, by reason", m.reports_rejected.clone());
        r.register("probes", "Cold probes, by outcome", m.probes.clone());
        r.register("hubs_tracked", "Task hubs in memory", m.hubs_tracked.clone());
        r.register("pods_tracked", "Reporting pods in memory, over all task hubs", m.pods_tracked.clone());
        r.register(
            "tracking_refused",
            "Task hubs (kind=hub) and pods (kind=pod) refused because the limit was reached and nothing was idle",
            m.tracking_refused.clone(),
        );
        r.register(
            "tracking_replaced",
            "Idle task hubs and silent pods dropped, least recently seen first, to make room at the limit",
            m.tracking_replaced.clone(),
        );
        r.register(
            "keda_call_duration_seconds",
            "Time from a KEDA call reaching the aggregator to its answer, by method",
            m.keda_call_durations.0.clone(),
        );
        r.register(
            "certificate_reloads",
            "Changed TLS files taken into use (reloaded) or refused (the previous ones kept), by port",
            m.certificate_reloads.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When the certificate a TLS port serves now expires (notAfter, Unix seconds), by port",
            m.certificate_expiry.clone(),
        );
        m
    }

    /// The registry, for other parts (the Kubernetes sources) to register their metrics in
    /// before the aggregator starts.
    pub(crate) fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Also calls `hook` when a hub is dropped, for series registered elsewhere.
    pub(crate) fn on_forget(&mut self, hook: ForgetHook) {
        self.forget_hooks.0.push(hook);
    }

    /// Drops every series of a dropped hub, counters too: /metrics shows only what is
    /// tracked, so its size follows the hub limit. (A counter that disappears and comes back
    /// from 0 is a counter reset to Prometheus, which `rate()` handles.)
    pub(crate) fn forget(&self, labels: &HubLabels) {
        for family in [
            &self.desired_workers,
            &self.workers,
            &self.active,
            &self.covered_partitions,
            &self.uncovered_partitions,
            &self.connection_known,
            &self.held_messages,
            &self.timer_messages,
            &self.invisible_work_items,
            &self.unavailable,
        ] {
            family.remove(labels);
        }
        for queue in QUEUE_KINDS {
            self.visible_messages.remove(&QueueLabels {
                namespace: labels.namespace.clone(),
                task_hub: labels.task_hub.clone(),
                queue,
            });
        }
        self.reports_received.remove(labels);
        for outcome in PROBE_OUTCOMES {
            self.probes.remove(&ProbeLabels {
                namespace: labels.namespace.clone(),
                task_hub: labels.task_hub.clone(),
                outcome,
            });
        }
        for hook in &self.forget_hooks.0 {
            hook(labels);
        }
    }

    /// Counts one cold probe of `key` that came to `outcome`.
    pub(crate) fn count_probe(&self, key: &HubKey, outcome: ProbeOutcome) {
        let labels =
            ProbeLabels { namespace: key.namespace.clone(), task_hub: key.task_hub.clone(), outcome };
        self.probes.get_or_create(&labels).inc();
    }

    /// Counts one report refused for `reason`.
    pub(crate) fn count_rejection(&self, reason: RejectionReason) {
        self.reports_rejected.get_or_create(&RejectionLabels { reason }).inc();
    }

    /// Counts one hub or pod refused at its limit.
    pub fn count_refused(&self, kind: Tracked) {
        self.tracking_refused.get_or_create(&TrackedLabels { kind }).inc();
    }

    /// Counts one idle hub or silent pod dropped to make room.
    pub fn count_replaced(&self, kind: Tracked) {
        self.tracking_replaced.get_or_create(&TrackedLabels { kind }).inc();
    }

    /// The metrics of `port`'s certificate: its reloads and its expiry.
    pub(crate) fn certificate_reloads(&self, port: Port) -> ReloadCounters {
        let counter = |outcome| self.certificate_reloads.get_or_create_owned(&ReloadLabels { port, outcome });
        ReloadCounters {
            reloaded: counter(ReloadOutcome::Reloaded),
            refused: counter(ReloadOutcome::Refused),
            expires_at: self.certificate_expiry.get_or_create_owned(&PortLabels { port }),
        }
    }

    /// Sets `labels`' hub's visible message counts.
    pub(crate) fn set_visible_messages(&self, labels: &HubLabels, counts: &QueueMessages) {
        for queue in QUEUE_KINDS {
            let value = match queue {
                QueueKind::WorkItem => counts.work_item_visible,
                QueueKind::Control => counts.control_visible,
            };
            let series =
                QueueLabels { namespace: labels.namespace.clone(), task_hub: labels.task_hub.clone(), queue };
            self.visible_messages.get_or_create(&series).set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}
