//! The sidecar's Prometheus metrics and its small HTTP server (`/healthz`, `/metrics`).

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::storage::StorageErrorKind;

/// Labels of the storage error counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorKindLabel {
    /// Which kind of storage error.
    pub kind: StorageErrorKind,
}

/// Labels of the per-replica report counters: one aggregator replica's address.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    /// `ip:port` the reports go to.
    pub address: String,
}

/// Labels of the preStop drain counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DrainResultLabel {
    /// `completed`, `wait_ran_out`, `failed` (the host refused or did not answer) or
    /// `forbidden` (no or a wrong drain token).
    pub result: &'static str,
}

/// Everything the sidecar counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Polls completed.
    pub polls: Counter,
    /// Storage errors met while polling, by kind.
    pub(crate) storage_errors: Family<ErrorKindLabel, Counter>,
    /// Storage HTTP calls made (retries included).
    pub storage_requests: Counter,
    /// Reports the aggregator accepted.
    pub reports_sent: Counter,
    /// Reports that could not be delivered.
    pub report_failures: Counter,
    /// How long one poll took.
    pub poll_duration: Histogram,
    /// Partitions this pod owns at the last poll.
    pub owned_partitions: Gauge,
    /// Reports each aggregator replica accepted (series removed with the replica).
    pub replica_reports_sent: Family<ReplicaLabel, Counter>,
    /// Reports each aggregator replica did not take (series removed with the replica).
    pub replica_report_failures: Family<ReplicaLabel, Counter>,
    /// 1 while the latest report to the replica was accepted, 0 while it is failing.
    pub replica_reachable: Family<ReplicaLabel, Gauge>,
    /// Aggregator replicas reported to (addresses the aggregator host resolved to).
    pub replicas: Gauge,
    /// `/drain` calls (the app's preStop hook), by how they ended.
    pub(crate) drains: Family<DrainResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered under the `durable_scaler_sidecar` prefix.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("durable_scaler_sidecar");
        let polls = Counter::default();
        let storage_errors = Family::<ErrorKindLabel, Counter>::default();
        let storage_requests = Counter::default();
        let reports_sent = Counter::default();
        let report_failures = Counter::default();
        let poll_duration = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let owned_partitions = Gauge::default();
        let replica_reports_sent = Family::<ReplicaLabel, Counter>::default();
        let replica_report_failures = Family::<ReplicaLabel, Counter>::default();
        let replica_reachable = Family::<ReplicaLabel, Gauge>::default();
        let replicas = Gauge::default();
        let drains = Family::<DrainResultLabel, Counter>::default();
        registry.register(
            "drains",
            "Calls of /drain, the app's preStop hook, by result: completed, wait_ran_out, failed, forbidden",
            drains.clone(),
        );
        registry.register(
            "replica_reports_sent",
            "Reports each aggregator replica accepted, by its address",
            replica_reports_sent.clone(),
        );
        registry.register(
            "replica_report_failures",
            "Reports each aggregator replica did not take, by its address",
            replica_report_failures.clone(),
        );
        registry.register(
            "replica_reachable",
            "1 while the latest report to the aggregator replica at this address was accepted",
            replica_reachable.clone(),
        );
        registry.register(
            "aggregator_replicas",
            "Aggregator replicas reported to: the addresses the aggregator host resolved to",
            replicas.clone(),
        );
        registry.register("polls", "Polls of storage completed", polls.clone());
        registry.register(
            "storage_errors",
            "Storage errors met while polling, by kind",
            storage_errors.clone(),
        );
        registry.register(
            "storage_requests",
            "Storage HTTP calls made, retries included",
            storage_requests.clone(),
        );
        registry.register("reports_sent", "Reports the aggregator accepted", reports_sent.clone());
        registry.register(
            "report_failures",
            "Reports that could not be delivered to the aggregator",
            report_failures.clone(),
        );
        registry.register("poll_duration_seconds", "Duration of one poll of storage", poll_duration.clone());
        registry.register(
            "owned_partitions",
            "Partitions this pod owned at the last poll",
            owned_partitions.clone(),
        );
        Self {
            registry,
            polls,
            storage_errors,
            storage_requests,
            reports_sent,
            report_failures,
            poll_duration,
            owned_partitions,
            replica_reports_sent,
            replica_report_failures,
            replica_reachable,
            replicas,
            drains,
        }
    }

    /// Counts one `/drain` call that ended with `result`.
    pub(crate) fn count_drain(&self, result: &'static str) {
        self.drains.get_or_create(&DrainResultLabel { result }).inc();
    }

    /// Drops the series of a replica no longer reported to.
    pub(crate) fn forget_replica(&self, label: &ReplicaLabel) {
        self.replica_reports_sent.remove(label);
        self.replica_report_failures.remove(label);
        self.replica_reachable.remove(label);
    }

    /// Records one poll.
    pub(crate) fn record_poll(
        &self,
        duration: Duration,
        owned: usize,
        error_kinds: &[StorageErrorKind],
        requests: u64,
    ) {
        self.polls.inc();
        self.poll_duration.observe(duration.as_secs_f64());
        self.owned_partitions.set(owned as i64);
        self.storage_requests.inc_by(requests);
        for kind in error_kinds {
            self.storage_errors.get_or_create(&ErrorKindLabel { kind: *kind }).inc();
        }
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}

/// `/healthz` (the process is up and serving) and `/metrics`.
pub(crate) fn router(metrics: Arc<Metrics>, drainer: super::drain::Drainer) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(serve_metrics))
        .route(crate::contract::DRAIN_PATH, get(super::drain::handle).with_state(drainer))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], metrics.encode())
}
