//! The cold probe: reads from storage whatever no live sidecar covers (everything while the
//! app runs no pods), with the connection KEDA sent in the trigger's metadata. One loop per
//! tracked hub, at `--probe-interval`; when sidecars cover the whole hub it reads nothing.
//! The aggregator keeps no storage secrets of its own: a hub without a connection is served
//! from sidecar reports alone.
//!
//! The probe needs no metadata about where the hub keeps partition ownership: its reader
//! detects the layout as DurableTask does (`storage::Layout`; the metadata
//! `useTablePartitionManagement` is only an override). A hub whose queues exist but whose
//! ownership store is nowhere to be found is an error on `/hubs`, in the log and in
//! `durable_scaler_aggregator_ownership_reads_total{layout="none"}`; the probe still reads
//! the control queues it finds by name, because upstream's `GetControlQueuesAsync` would
//! read control queues 0..P-1 too (creating `taskhub.json` with the default P where we only
//! read): a hub with visible work must not look idle, or an app at zero pods would never be
//! started again.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::clock::UnixMs;
use crate::shutdown::{FailureReporter, Shutdown};
use crate::storage::{
    Connection, Layout, PartitionMode, QueueChoice, StorageAccount, StorageError, StorageOptions, TaskHub,
    TaskHubReader,
};

use super::metrics::ProbeOutcome;
use super::registry::{HubEntry, Registry};

/// Starts and runs the probe loops.
#[derive(Debug, Clone)]
pub(crate) struct Prober {
    registry: Arc<Registry>,
    interval: Duration,
    options: StorageOptions,
    shutdown: Shutdown,
    metrics: ProbeMetrics,
    failures: Option<FailureReporter>,
}

/// Where a probe found the hub's partition ownership, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum OwnershipFound {
    /// In a layout (`table`, `safe`, `legacy`).
    Layout(Layout),
    /// Nowhere, though the hub's queues exist (`none`).
    Nowhere,
}

impl EncodeLabelValue for OwnershipFound {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            OwnershipFound::Layout(layout) => layout.as_str(),
            OwnershipFound::Nowhere => "none",
        })
    }
}

/// Labels of [`ProbeMetrics::ownership_reads`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OwnershipLabels {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
    /// Where ownership was found.
    pub layout: OwnershipFound,
}

/// The probe's own metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeMetrics {
    /// Cold-probe reads of partition ownership, by the layout found (`none`: queues but no
    /// ownership store).
    pub ownership_reads: Family<OwnershipLabels, Counter>,
}

impl ProbeMetrics {
    /// Registers the probe's metrics in `registry` under `durable_scaler_aggregator_`.
    pub(crate) fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.sub_registry_with_prefix("durable_scaler_aggregator").register(
            "ownership_reads",
            "Cold-probe reads of partition ownership, by the layout found (none: the hub's queues \
             exist but no ownership store does)",
            metrics.ownership_reads.clone(),
        );
        metrics
    }
}

/// How often a probe round in flight looks whether its hub's connection changed.
const SETTINGS_LOOK_INTERVAL: Duration = Duration::from_millis(100);

/// Completes once `entry`'s connection or partition mode is no longer `have`.
async fn settings_changed(entry: &HubEntry, have: &(Connection, PartitionMode)) {
    let mut ticker = tokio::time::interval(SETTINGS_LOOK_INTERVAL);
    loop {
        ticker.tick().await;
        let changed = entry.with_state(|s| !s.probes_with(&have.0, have.1));
        if changed {
            return;
        }
    }
}

impl Prober {
    /// Probes hubs of `registry` every `interval`.
    pub(crate) fn new(
        registry: Arc<Registry>,
        interval: Duration,
        options: StorageOptions,
        shutdown: Shutdown,
    ) -> Self {
        Self { registry, interval, options, shutdown, metrics: ProbeMetrics::default(), failures: None }
    }

    /// Reports a probe loop that panics to `failures` (the role's supervisor), which takes
    /// the process down, instead of letting the hub go unprobed in silence.
    pub(crate) fn with_failures(mut self, failures: FailureReporter) -> Self {
        self.failures = Some(failures);
        self
    }

    /// Counts into `metrics` (registered in the aggregator's registry) instead of
    /// unregistered ones.
    pub(crate) fn with_metrics(mut self, metrics: ProbeMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn count_ownership(&self, entry: &HubEntry, layout: OwnershipFound) {
        let labels = OwnershipLabels {
            namespace: entry.key.namespace.clone(),
            task_hub: entry.key.task_hub.clone(),
            layout,
        };
        self.metrics.ownership_reads.get_or_create(&labels).inc();
    }

    /// Starts the probe loop of `entry`; it ends with the shutdown signal.
    pub(crate) fn spawn(&self, entry: Arc<HubEntry>) {
        let prober = self.clone();
        let name = format!("cold probe of {}/{}", entry.key.namespace, entry.key.task_hub);
        let run = async move { prober.run(entry).await };
        match &self.failures {
            Some(failures) => failures.spawn_watched(name, run),
            None => drop(tokio::spawn(run)),
        }
    }

    async fn run(self, entry: Arc<HubEntry>) {
        // The reader is rebuilt only when the connection or partition mode changes.
        let mut reader: Option<((Connection, PartitionMode), TaskHubReader)> = None;
        while !entry.is_evicted() {
            let plan = entry.with_state(|s| s.probe_plan());
            let (connection, mode, task_hub) = (plan.connection, plan.partition_mode, plan.task_hub);
            if let Some(connection) = connection {
                let wanted = (connection, mode);
                if reader.as_ref().is_none_or(|(have, _)| *have != wanted) {
                    // The settings hold a name `HubSettings::from_metadata` checked with the
                    // same rule, so `parse` only fails on a hub no KEDA call named.
                    let hub = TaskHub::parse(&task_hub).map_err(|e| e.to_string());
                    let account = StorageAccount::from_connection(&wanted.0).map_err(|e| e.to_string());
                    reader = match hub.and_then(|hub| account.map(|account| (hub, account))) {
                        Ok((hub, account)) => {
                            let r = TaskHubReader::new(&account, hub, mode, self.options);
                            Some((wanted, r))
                        }
                        Err(e) => {
                            self.record(
                                &entry,
                                ProbeOutcome::BadConnection,
                                Some(format!("the trigger's connection: {e}")),
                            );
                            None
                        }
                    };
                }
                if let Some((have, r)) = &reader {
                    // A connection corrected meanwhile is used at once: the round with the
                    // old one (three attempts of 5 s against a host that does not answer)
                    // is dropped, not waited for.
                    tokio::select! {
                        _ = self.probe_once(&entry, r) => {}
                        _ = settings_changed(&entry, have) => continue,
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.wait() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    fn record(&self, entry: &HubEntry, outcome: ProbeOutcome, error: Option<String>) {
        self.registry.metrics.count_probe(&entry.key, outcome);
        // One line per new failure (and one when it clears), not one per interval.
        let previous = entry.with_state(|s| s.record_probe(error.clone()));
        match (&error, previous) {
            (Some(e), previous) if previous.as_ref() != Some(e) => {
                tracing::warn!(namespace = %entry.key.namespace, task_hub = %entry.key.task_hub, "cold probe failed: {e}");
            }
            (None, Some(_)) => {
                tracing::info!(namespace = %entry.key.namespace, task_hub = %entry.key.task_hub, "cold probe reads again");
            }
            _ => {}
        }
    }

    /// One round: reads P, then every uncovered queue, through the read path the sidecars
    /// use too (`TaskHubReader::ownership`, then `read`).
    async fn probe_once(&self, entry: &HubEntry, reader: &TaskHubReader) {
        let coverage = entry.with_state(|s| s.coverage(UnixMs::now()));
        if coverage.is_complete() {
            return;
        }
        let missed = |missed: bool| entry.with_state(|s| s.record_probe_missed(missed));
        let now = UnixMs::now();
        let ownership = reader.ownership(now).await;
        let no_store = match &ownership.error {
            None => {
                if let Some(layout) = ownership.layout {
                    self.count_ownership(entry, OwnershipFound::Layout(layout));
                }
                None
            }
            Some(e @ StorageError::NoOwnershipStore { .. }) => {
                // Read the control queues found by name all the same (module docs).
                self.count_ownership(entry, OwnershipFound::Nowhere);
                Some(e.clone())
            }
            Some(StorageError::NotProvisioned { .. }) => {
                missed(false);
                self.record(entry, ProbeOutcome::NotProvisioned, None);
                self.registry.apply_probe(entry, None, UnixMs::now());
                return;
            }
            Some(e) => {
                missed(true);
                return self.record(entry, ProbeOutcome::from(e), Some(e.to_string()));
            }
        };
        let partitions = ownership.partition_count;
        // Coverage was worked out against the P known before; a new P means all of it.
        let choice = if coverage.partition_count == Some(partitions) {
            QueueChoice { control: coverage.uncovered.clone(), work_item: coverage.work_item_uncovered }
        } else {
            QueueChoice { control: (0..partitions).collect(), work_item: true }
        };
        let read = reader.read(ownership, choice, now).await;
        let reading = read.reading;
        // The queues' errors (the ownership store's, if missing, comes first): the last one.
        let failure = read.errors.into_iter().skip(usize::from(no_store.is_some())).last();
        let nothing_read = reading.control.is_empty() && reading.work_item.is_none();
        // A hub not provisioned after all is read: there is nothing to miss.
        let not_provisioned = matches!(failure, Some(StorageError::NotProvisioned { .. })) && nothing_read;
        missed(failure.is_some() && !not_provisioned);
        if let Some(e) = no_store {
            self.record(entry, ProbeOutcome::from(&e), Some(e.to_string()));
            if !nothing_read {
                self.registry.apply_probe(entry, Some(&reading), UnixMs::now());
            }
            return;
        }
        match failure {
            Some(StorageError::NotProvisioned { .. }) if nothing_read => {
                self.record(entry, ProbeOutcome::NotProvisioned, None);
                self.registry.apply_probe(entry, None, UnixMs::now());
                return;
            }
            Some(e) if nothing_read => {
                return self.record(entry, ProbeOutcome::from(&e), Some(e.to_string()));
            }
            Some(e) => self.record(entry, ProbeOutcome::Partial, Some(e.to_string())),
            None => self.record(entry, ProbeOutcome::Ok, None),
        }
        self.registry.apply_probe(entry, Some(&reading), UnixMs::now());
    }
}
