//! What the aggregator's integration tests share: a real aggregator on loopback ports chosen
//! by the OS, real tonic clients for its KEDA and report ports, and builders for the
//! messages KEDA and the sidecars send.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use durable_scaler::aggregator::sources::{LiveReportingPods, WorkerCountSource};
use durable_scaler::aggregator::{Aggregator, AggregatorError, Args, ReportCheck};
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use durable_scaler::proto::report::report_service_client::ReportServiceClient;
use durable_scaler::proto::report::{ControlQueueSignals, PodRef, QueueSignals, Report};
use durable_scaler::shutdown::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Generous deadline for anything that polls (a loaded 2-core machine).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Namespace of every test ScaledObject and pod.
pub const NAMESPACE: &str = "apps";

/// Command-line defaults for tests: loopback ports chosen by the OS, fast intervals, a
/// minute of grace for invisible work.
pub fn args() -> Args {
    Args {
        probe_interval: Duration::from_millis(200),
        sample_interval: Duration::from_millis(200),
        work_grace: Duration::from_secs(60),
        ..Args::loopback()
    }
}

/// A running aggregator and clients for it.
pub struct TestAggregator {
    pub grpc_addr: SocketAddr,
    pub report_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub shutdown: Shutdown,
    pub running: Option<durable_scaler::aggregator::RunningAggregator>,
    pub keda: ExternalScalerClient<Channel>,
    pub reports: ReportServiceClient<Channel>,
}

/// Starts an aggregator with `args` (plaintext KEDA port).
pub async fn start(args: Args) -> TestAggregator {
    start_with(args, ReportCheck::AcceptAny, Arc::new(LiveReportingPods)).await
}

/// Starts an aggregator with `args` and the given outside sources (plaintext KEDA port).
pub async fn start_with(
    args: Args,
    auth: ReportCheck,
    workers: Arc<dyn WorkerCountSource>,
) -> TestAggregator {
    let running = start_server_with(args, auth, workers).await.expect("aggregator starts");
    let keda =
        ExternalScalerClient::connect(format!("http://{}", running.1.grpc_addr)).await.expect("KEDA port");
    let reports =
        ReportServiceClient::connect(format!("http://{}", running.1.report_addr)).await.expect("report port");
    TestAggregator {
        grpc_addr: running.1.grpc_addr,
        report_addr: running.1.report_addr,
        http_addr: running.1.http_addr,
        shutdown: running.0,
        running: Some(running.1),
        keda,
        reports,
    }
}

/// Starts an aggregator without connecting to it (TLS tests connect themselves).
pub async fn start_server(
    args: Args,
) -> Result<(Shutdown, durable_scaler::aggregator::RunningAggregator), AggregatorError> {
    start_server_with(args, ReportCheck::AcceptAny, Arc::new(LiveReportingPods)).await
}

/// Starts an aggregator with the given outside sources, without connecting to it.
pub async fn start_server_with(
    args: Args,
    auth: ReportCheck,
    workers: Arc<dyn WorkerCountSource>,
) -> Result<(Shutdown, durable_scaler::aggregator::RunningAggregator), AggregatorError> {
    durable_scaler::telemetry::init();
    durable_scaler::telemetry::install_crypto_provider();
    let shutdown = Shutdown::new();
    let running = Aggregator::new(args, auth, workers).start(shutdown.clone()).await?;
    Ok((shutdown, running))
}

impl TestAggregator {
    /// Stops it and waits until every server has stopped.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(DEADLINE, running.wait())
                .await
                .expect("servers stop after the shutdown signal")
                .expect("servers stop cleanly");
        }
    }

    /// Submits `report`, expecting it accepted.
    pub async fn submit(&self, report: Report) {
        self.reports.clone().submit(report).await.expect("report accepted");
    }

    /// IsActive for `hub`.
    pub async fn is_active(&self, hub: &str) -> Result<bool, tonic::Status> {
        Ok(self.keda.clone().is_active(scaled_object(hub, &[])).await?.into_inner().result)
    }

    /// GetMetrics' float value for `hub`.
    pub async fn metric(&self, hub: &str) -> Result<f64, tonic::Status> {
        let request = GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(hub, &[])),
            metric_name: format!("durabletask-{}", hub.to_lowercase()),
        };
        let response = self.keda.clone().get_metrics(request).await?.into_inner();
        assert_eq!(response.metric_values.len(), 1, "exactly one value");
        Ok(response.metric_values[0].metric_value_float)
    }

    /// GET `path` on the HTTP port: status and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr, path).await
    }
}

/// The ScaledObjectRef KEDA sends for a trigger on `hub` with `extra` metadata.
pub fn scaled_object(hub: &str, extra: &[(&str, &str)]) -> ScaledObjectRef {
    let mut metadata: HashMap<String, String> = HashMap::from([
        ("taskHubName".into(), hub.into()),
        ("scalerAddress".into(), "aggregator:4370".into()),
    ]);
    for (k, v) in extra {
        metadata.insert(k.to_string(), v.to_string());
    }
    ScaledObjectRef {
        name: format!("{}-so", hub.to_lowercase()),
        namespace: NAMESPACE.into(),
        scaler_metadata: metadata,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// Queue signals: approximate count, visible count, age of the first visible message.
pub fn signals(approximate: u64, visible: u32, age_ms: u64) -> QueueSignals {
    QueueSignals {
        approximate_count: approximate,
        visible_count: visible,
        first_visible_age_ms: age_ms,
        sampled_at_unix_ms: now_ms(),
        redelivered_count: 0,
    }
}

/// A sidecar report from `pod` about `hub` (P = 4) owning `control`, with the work-item queue
/// when given.
pub fn report(
    pod: &str,
    hub: &str,
    control: &[(u32, QueueSignals)],
    work_item: Option<QueueSignals>,
) -> Report {
    Report {
        pod: Some(PodRef { namespace: NAMESPACE.into(), name: pod.into() }),
        task_hub: hub.into(),
        partition_count: 4,
        control_queues: control
            .iter()
            .map(|(p, s)| ControlQueueSignals { partition: *p, signals: Some(*s) })
            .collect(),
        work_item,
        sampled_at_unix_ms: now_ms(),
        interval_ms: 1000,
        leaving: false,
        draining: false,
        error: None,
        sidecar_version: "0.1.0".into(),
        partition_mode: "table".into(),
        queue_settings: None,
        limits: None,
    }
}

/// A report from one pod owning every partition of `hub`, all empty but the work-item queue
/// with `work_items` visible messages.
pub fn whole_hub_report(pod: &str, hub: &str, work_items: u32) -> Report {
    let empty: Vec<(u32, QueueSignals)> = (0..4).map(|p| (p, signals(0, 0, 0))).collect();
    report(
        pod,
        hub,
        &empty,
        Some(signals(u64::from(work_items), work_items, if work_items > 0 { 50 } else { 0 })),
    )
}

/// Polls `check` until it returns true, failing after [`DEADLINE`] with `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plaintext gRPC channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("valid URI").connect().await.expect("connects")
}

/// The next message of an IsActive stream.
pub async fn next(stream: &mut tonic::Streaming<IsActiveResponse>) -> bool {
    let message = tokio::time::timeout(DEADLINE, stream.next()).await.expect("a message in time");
    message.expect("the stream is open").expect("a message, not an error").result
}

/// A minimal HTTP/1.1 GET (the endpoints are plain text).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("HTTP port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
