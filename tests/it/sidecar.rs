//! The sidecar against a real Azurite and a real gRPC server over loopback.
//!
//! The report receiver here is not the aggregator but a recording one: a real tonic
//! `ReportService` server that keeps every report it receives and the `authorization` header
//! it came with (and can stall on demand), so the sidecar's side of the wire is checked on
//! its own. tests/it/aggregator_storage.rs runs real sidecars against the real aggregator.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{LAYOUTS, hub, laid_out, now_ms};
use crate::forwarder::ForwardedStorage;
use durable_scaler::{
    azurite::{ACCOUNT_KEY, Azurite},
    emulator::TaskHubEmulator,
    proto::report::{
        Report, ReportAck,
        report_error::Kind,
        report_service_server::{ReportService, ReportServiceServer},
    },
    shutdown::Shutdown,
    sidecar::{Args, Config, Sidecar},
    storage::{Layout, PartitionMode, QueueRef, TaskHub},
};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpListener, task::JoinHandle};

const LEASE: Duration = Duration::from_secs(60);
const TIMER: Duration = Duration::from_secs(3600);
/// Generous: the machine running the suite is small and busy.
const DEADLINE: Duration = Duration::from_secs(60);

/// One received report and the credential it carried.
#[derive(Debug, Clone)]
struct Received {
    report: Report,
    authorization: Option<String>,
}

/// The aggregator's report service, reduced to recording what it receives.
#[derive(Debug, Clone, Default)]
struct RecordingAggregator {
    received: Arc<Mutex<Vec<Received>>>,
    stalled: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl ReportService for RecordingAggregator {
    async fn submit(
        &self,
        request: tonic::Request<Report>,
    ) -> Result<tonic::Response<ReportAck>, tonic::Status> {
        if self.stalled.load(Ordering::SeqCst) {
            // A stuck aggregator: never answers (the sidecar's call times out).
            std::future::pending::<()>().await;
        }
        let authorization =
            request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        self.received.lock().unwrap().push(Received { report: request.into_inner(), authorization });
        Ok(tonic::Response::new(ReportAck {}))
    }
}

impl RecordingAggregator {
    async fn start() -> (Self, String) {
        let aggregator = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = ReportServiceServer::new(aggregator.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (aggregator, url)
    }

    /// Waits for a report received at or after index `from` that satisfies `wanted`.
    async fn wait_for(
        &self,
        from: usize,
        what: &str,
        wanted: impl Fn(&Received) -> bool,
    ) -> (usize, Received) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            {
                let received = self.received.lock().unwrap();
                if let Some((i, r)) = received.iter().enumerate().skip(from).find(|(_, r)| wanted(r)) {
                    return (i, r.clone());
                }
                if Instant::now() > deadline {
                    panic!("no report {what} within {DEADLINE:?}; last: {:?}", received.last());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

fn args(
    hub: &TaskHub,
    connection: String,
    aggregator: &str,
    pod: &str,
    mode: PartitionMode,
    token_file: PathBuf,
) -> Args {
    Args {
        task_hub: Some(hub.clone()),
        connection: Some(connection),
        identity: Default::default(),
        aggregator: Some(aggregator.parse().expect("an aggregator URL")),
        aggregator_ca: None,
        aggregator_addresses: Vec::new(),
        pod_name: Some(pod.to_string()),
        pod_namespace: Some("apps".into()),
        interval: Duration::from_millis(200),
        partition_mode: mode,
        token_file,
        http_addr: ([127, 0, 0, 1], 0).into(),
        app_limits: Default::default(),
        app_port: None,
        app_exit_wait: Duration::ZERO,
        host_url: None,
        host_key_file: None,
        drain_token: None,
        drain_wait: Duration::from_secs(60),
    }
}

/// A sidecar running in this process, and what it reports to.
struct Running {
    aggregator: RecordingAggregator,
    sidecar: JoinHandle<()>,
    shutdown: Shutdown,
    http: SocketAddr,
    metrics: Arc<durable_scaler::sidecar::Metrics>,
    _token_dir: tempfile::TempDir,
    token_file: PathBuf,
}

async fn run_sidecar(hub: &TaskHub, connection: String, pod: &str, mode: PartitionMode) -> Running {
    let (aggregator, url) = RecordingAggregator::start().await;
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    let config = Config::from_args(args(hub, connection, &url, pod, mode, token_file.clone())).unwrap();
    let sidecar = Sidecar::bind(config).await.unwrap();
    let (http, metrics) = (sidecar.http_addr(), sidecar.metrics());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(sidecar.run(shutdown.clone()));
    Running { aggregator, sidecar: task, shutdown, http, metrics, _token_dir: token_dir, token_file }
}

fn partitions(report: &Report) -> Vec<u32> {
    report.control_queues.iter().map(|c| c.partition).collect()
}

fn error_kind(report: &Report) -> Option<Kind> {
    report.error.as_ref().map(|e| Kind::try_from(e.kind).unwrap_or(Kind::Unspecified))
}

#[tokio::test]
async fn the_report_names_the_owned_partitions_with_counts_visible_counts_and_ages() {
    let (hub, emulator) = laid_out("SidecarReport", Layout::Table, 4).await;
    emulator.claim(0, "pod-a", LEASE).await.unwrap();
    emulator.claim(2, "pod-a", LEASE).await.unwrap();
    emulator.claim(1, "pod-b", LEASE).await.unwrap();
    // Partition 0: two messages waiting and a durable timer; partition 2: only a timer;
    // partition 1 (someone else's) has work this pod must not report.
    let before_enqueue = now_ms();
    emulator.enqueue(QueueRef::Control(0), "start-1", Duration::ZERO).await.unwrap();
    emulator.enqueue(QueueRef::Control(0), "start-2", Duration::ZERO).await.unwrap();
    emulator.enqueue(QueueRef::Control(0), "timer", TIMER).await.unwrap();
    emulator.enqueue(QueueRef::Control(2), "timer", TIMER).await.unwrap();
    emulator.enqueue(QueueRef::Control(1), "theirs", Duration::ZERO).await.unwrap();
    emulator.enqueue(QueueRef::WorkItem, "activity", Duration::ZERO).await.unwrap();
    let enqueued_at = now_ms();

    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    std::fs::write(&running.token_file, "token-1\n").unwrap();
    let (_, got) = running.aggregator.wait_for(0, "with a credential", |r| r.authorization.is_some()).await;
    let report = got.report;

    assert_eq!(got.authorization.as_deref(), Some("Bearer token-1"));
    let pod = report.pod.as_ref().unwrap();
    assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("apps", "pod-a"));
    assert_eq!(report.task_hub, hub.name());
    assert_eq!(
        (report.partition_count, report.partition_mode.as_str(), report.interval_ms),
        (4, "table", 200)
    );
    assert_eq!(report.error, None);
    assert!(!report.leaving);
    assert_eq!(partitions(&report), [0, 2]);
    let p0 = report.control_queues[0].signals.unwrap();
    assert_eq!((p0.approximate_count, p0.visible_count), (3, 2));
    // The first message went in between before_enqueue and enqueued_at; Azurite keeps
    // insertion times to the second.
    let youngest = (report.sampled_at_unix_ms - enqueued_at - 1_000).max(0) as u64;
    let oldest = (report.sampled_at_unix_ms - before_enqueue + 1_000) as u64;
    assert!((youngest..=oldest).contains(&p0.first_visible_age_ms), "{p0:?} not in {youngest}..={oldest}");
    let p2 = report.control_queues[1].signals.unwrap();
    assert_eq!((p2.approximate_count, p2.visible_count, p2.first_visible_age_ms), (1, 0, 0));
    let work_item = report.work_item.expect("the owner of partition 0 reports the work-item queue");
    assert_eq!((work_item.approximate_count, work_item.visible_count), (1, 1));
    running.shutdown.trigger();
}

#[tokio::test]
async fn in_each_layout_the_report_names_the_partitions_the_pod_owns() {
    for layout in LAYOUTS {
        let (hub, emulator) = laid_out("SidecarOwns", layout, 4).await;
        emulator.claim(1, "pod-a", LEASE).await.unwrap();
        emulator.claim(3, "pod-a", LEASE).await.unwrap();
        emulator.claim(0, "pod-b", LEASE).await.unwrap();
        emulator.enqueue(QueueRef::Control(3), "start", Duration::ZERO).await.unwrap();

        let running =
            run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
        let (_, got) = running.aggregator.wait_for(0, "any", |_| true).await;
        let report = got.report;
        assert_eq!((report.partition_count, report.partition_mode.as_str()), (4, layout.as_str()));
        assert_eq!((partitions(&report), report.error), (vec![1, 3], None), "{layout:?}");
        assert_eq!(report.control_queues[1].signals.unwrap().visible_count, 1);
        assert_eq!(report.work_item, None, "partition 0 belongs to pod-b");
        running.shutdown.trigger();
    }
}

#[tokio::test]
async fn in_each_layout_ownership_moving_to_another_pod_shows_in_the_next_report() {
    for layout in LAYOUTS {
        let (hub, emulator) = laid_out("SidecarMove", layout, 3).await;
        emulator.claim(0, "pod-a", LEASE).await.unwrap();
        emulator.claim(1, "pod-a", LEASE).await.unwrap();
        let running =
            run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
        let (seen, _) =
            running.aggregator.wait_for(0, "owning 0 and 1", |r| partitions(&r.report) == [0, 1]).await;

        // pod-b takes partition 0 over; pod-a picks up partition 2.
        emulator.claim(0, "pod-b", LEASE).await.unwrap();
        emulator.claim(2, "pod-a", LEASE).await.unwrap();
        let (_, got) = running
            .aggregator
            .wait_for(seen + 1, "owning 1 and 2", |r| partitions(&r.report) == [1, 2])
            .await;
        assert_eq!(got.report.work_item, None, "{layout:?}: the work-item queue moved with partition 0");
        running.shutdown.trigger();
    }
}

/// Claims partitions 0 and 1 for pod-a, then gives 0 up the way `layout` lets a lease go
/// without a new owner: broken (blob layouts) or released.
async fn lose_partition_zero(emulator: &TaskHubEmulator, layout: Layout, breaking: bool) {
    let claim = emulator.claim(0, "pod-a", LEASE).await.unwrap();
    emulator.claim(1, "pod-a", LEASE).await.unwrap();
    if breaking && layout != Layout::Table {
        emulator.break_lease(0, Duration::from_secs(60)).await.unwrap();
    } else {
        emulator.release(claim).await.unwrap();
    }
}

#[tokio::test]
async fn a_breaking_or_available_lease_is_not_reported_as_owned() {
    for layout in LAYOUTS {
        for breaking in [true, false] {
            if breaking && layout == Layout::Table {
                continue; // Tables have no breaking state; expiry is tested below.
            }
            let (hub, emulator) = laid_out("SidecarLost", layout, 2).await;
            lose_partition_zero(&emulator, layout, breaking).await;
            let running =
                run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
            let (_, got) = running.aggregator.wait_for(0, "any", |_| true).await;
            assert_eq!(partitions(&got.report), [1], "{layout:?}, breaking {breaking}");
            running.shutdown.trigger();
        }
    }
}

#[tokio::test]
async fn queues_without_an_ownership_store_are_an_error_that_says_what_was_looked_for() {
    let hub = hub("SidecarNoStore");
    TaskHubEmulator::new(&crate::common::account(), hub.clone(), Layout::Table)
        .create_queues(2)
        .await
        .unwrap();
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    let (_, got) = running.aggregator.wait_for(0, "any", |_| true).await;
    assert_eq!(error_kind(&got.report), Some(Kind::Storage));
    let message = got.report.error.unwrap().message;
    assert!(
        message.contains("no partition ownership store") && message.contains("taskhub.json"),
        "{message}"
    );
    let (_, metrics) = http_get(running.http, "/metrics").await;
    assert!(metrics.contains(r#"storage_errors_total{kind="no_ownership_store"}"#), "{metrics}");
    running.shutdown.trigger();
}

#[tokio::test]
async fn a_pod_whose_leases_expired_owns_nothing() {
    let (hub, emulator) = laid_out("SidecarExpired", Layout::Table, 2).await;
    let a_minute_ago = time::OffsetDateTime::now_utc() - Duration::from_secs(60);
    emulator.write_partition_row(0, Some("pod-a"), Some(a_minute_ago), false).await.unwrap();
    emulator.write_partition_row(1, Some("pod-a"), Some(a_minute_ago), false).await.unwrap();
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    let (_, got) = running.aggregator.wait_for(0, "any", |_| true).await;
    assert_eq!((got.report.partition_count, got.report.control_queues.len()), (2, 0));
    assert_eq!((got.report.work_item, got.report.error), (None, None));
    running.shutdown.trigger();
}

#[tokio::test]
async fn a_hub_not_provisioned_is_reported_as_such() {
    let hub = hub("SidecarMissing");
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    let (_, got) = running.aggregator.wait_for(0, "any", |_| true).await;
    assert_eq!(error_kind(&got.report), Some(Kind::TaskHubNotProvisioned));
    assert_eq!(got.report.partition_count, 0);
    assert!(got.report.error.unwrap().message.contains("not provisioned"));
    running.shutdown.trigger();
}

#[tokio::test]
async fn a_wrong_key_is_reported_as_an_authentication_error() {
    let (hub, _emulator) = laid_out("SidecarWrongKey", Layout::Table, 1).await;
    let wrong = Azurite::shared().connection_string().replace(ACCOUNT_KEY, "d3Jvbmcga2V5IHdyb25nIGtleQ==");
    let running = run_sidecar(&hub, wrong, "pod-a", PartitionMode::Auto).await;
    let (_, got) = running.aggregator.wait_for(0, "any", |_| true).await;
    assert_eq!(error_kind(&got.report), Some(Kind::Authentication));
    let message = got.report.error.unwrap().message;
    assert!(message.contains("refused the credentials") && message.contains("403"), "{message}");
    assert!(!message.contains(ACCOUNT_KEY));
    running.shutdown.trigger();
}

#[tokio::test]
async fn storage_going_down_is_reported_and_the_sidecar_recovers_when_it_comes_back() {
    let (hub, emulator) = laid_out("SidecarOutage", Layout::Table, 1).await;
    emulator.claim(0, "pod-a", LEASE).await.unwrap();
    emulator.enqueue(QueueRef::Control(0), "start", Duration::ZERO).await.unwrap();
    let storage = ForwardedStorage::new().await;
    let running = run_sidecar(&hub, storage.connection.clone(), "pod-a", PartitionMode::Auto).await;
    let healthy = |r: &Received| r.report.error.is_none() && partitions(&r.report) == [0];
    let (seen, _) = running.aggregator.wait_for(0, "healthy", healthy).await;

    storage.down();
    let (seen, got) =
        running.aggregator.wait_for(seen + 1, "with an error", |r| r.report.error.is_some()).await;
    assert_eq!(error_kind(&got.report), Some(Kind::Unreachable), "{:?}", got.report.error);

    storage.up().await;
    let (_, got) = running.aggregator.wait_for(seen + 1, "healthy again", healthy).await;
    assert_eq!(got.report.control_queues[0].signals.unwrap().visible_count, 1);
    assert!(!running.sidecar.is_finished());
    running.shutdown.trigger();
}

#[tokio::test]
async fn while_storage_does_not_answer_the_latest_report_goes_again_so_the_pod_stays_live() {
    let (hub, emulator) = laid_out("SidecarSlowStorage", Layout::Table, 1).await;
    emulator.claim(0, "pod-a", LEASE).await.unwrap();
    let storage = ForwardedStorage::new().await;
    let running = run_sidecar(&hub, storage.connection.clone(), "pod-a", PartitionMode::Auto).await;
    let healthy = |r: &Received| r.report.error.is_none() && partitions(&r.report) == [0];
    let (seen, _) = running.aggregator.wait_for(0, "healthy", healthy).await;

    // A poll now takes three attempts of 2 s each per request (interval 200 ms): meanwhile
    // the latest report goes every 300 ms, unchanged, readings and all.
    storage.stall();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (from, _) = running.aggregator.wait_for(seen + 1, "after the stall began", |_| true).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received = running.aggregator.received.lock().unwrap()[from..].to_vec();
    let last = received.last().expect("reports while storage stalls").report.clone();
    assert!(received.len() >= 5, "{} reports in 3 s of stalled storage", received.len());
    let again = received.iter().filter(|r| r.report == last).count();
    assert!(again >= 5, "the same report again: {again} of {}", received.len());
    assert!(healthy(received.last().unwrap()), "the last reading, still the pod's partitions");

    storage.down();
    storage.up().await;
    running
        .aggregator
        .wait_for(from + received.len(), "a new reading", |r| {
            r.report.sampled_at_unix_ms > last.sampled_at_unix_ms
        })
        .await;
    running.shutdown.trigger();
}

#[tokio::test]
async fn the_token_file_is_read_again_for_every_report() {
    let (hub, _emulator) = laid_out("SidecarToken", Layout::Table, 1).await;
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    let (seen, _) =
        running.aggregator.wait_for(0, "without a credential", |r| r.authorization.is_none()).await;
    std::fs::write(&running.token_file, "first").unwrap();
    let (seen, _) = running
        .aggregator
        .wait_for(seen, "with the first token", |r| r.authorization.as_deref() == Some("Bearer first"))
        .await;
    // Kubernetes rotates projected tokens by replacing the file.
    std::fs::write(&running.token_file, "second").unwrap();
    running
        .aggregator
        .wait_for(seen, "with the rotated token", |r| r.authorization.as_deref() == Some("Bearer second"))
        .await;
    running.shutdown.trigger();
}

#[tokio::test]
async fn a_stalled_aggregator_holds_up_neither_polling_nor_memory_and_gets_the_latest_report() {
    let (hub, _emulator) = laid_out("SidecarStall", Layout::Table, 1).await;
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    running.aggregator.stalled.store(true, Ordering::SeqCst);
    let polls_before = running.metrics.polls.get();
    let deadline = Instant::now() + DEADLINE;
    // Fifteen polls at 200 ms: at least three seconds of reports nobody accepted.
    while running.metrics.polls.get() < polls_before + 15 {
        assert!(Instant::now() < deadline, "polling stopped while the aggregator was stalled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running.metrics.report_failures.get() >= 1, "the stalled calls time out and count as failures");
    let received_before = running.aggregator.count();
    let resumed_at = now_ms();
    running.aggregator.stalled.store(false, Ordering::SeqCst);
    let (_, got) = running.aggregator.wait_for(received_before, "after the stall", |_| true).await;
    // Not the backlog's oldest: the latest report at the time of sending.
    assert!(
        got.report.sampled_at_unix_ms >= resumed_at - 1_500,
        "stale report {} vs {resumed_at}",
        got.report.sampled_at_unix_ms
    );
    running.shutdown.trigger();
}

#[tokio::test]
async fn shutdown_sends_a_leaving_report_and_stops() {
    let (hub, emulator) = laid_out("SidecarLeave", Layout::Table, 2).await;
    emulator.claim(0, "pod-a", LEASE).await.unwrap();
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    running.aggregator.wait_for(0, "owning 0", |r| partitions(&r.report) == [0]).await;
    running.shutdown.trigger();
    tokio::time::timeout(DEADLINE, running.sidecar).await.expect("the sidecar stops").unwrap();
    let last = running.aggregator.received.lock().unwrap().last().cloned().unwrap();
    assert!(last.report.leaving);
    assert_eq!((last.report.partition_count, last.report.control_queues.len()), (2, 0));
}

/// A plain HTTP/1.0 GET: status line and body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: sidecar\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

#[tokio::test]
async fn health_and_metrics_are_served_over_http() {
    let hub = hub("SidecarMetrics");
    let running =
        run_sidecar(&hub, Azurite::shared().connection_string(), "pod-a", PartitionMode::Auto).await;
    running.aggregator.wait_for(0, "any", |_| true).await;
    let (status, body) = http_get(running.http, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");
    let (status, metrics) = http_get(running.http, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for name in [
        "durable_scaler_sidecar_polls_total",
        "durable_scaler_sidecar_storage_errors_total{kind=\"not_provisioned\"}",
        "durable_scaler_sidecar_report_failures_total",
        "durable_scaler_sidecar_poll_duration_seconds_count",
        "durable_scaler_sidecar_owned_partitions 0",
        "durable_scaler_sidecar_storage_requests_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    running.shutdown.trigger();
}

fn binary() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_durable-scaler"));
    command.arg("sidecar").env_clear().env("RUST_LOG", "warn");
    command
}

#[test]
fn a_missing_setting_stops_the_binary_naming_the_variable() {
    let output = binary().env("DURABLE_SCALER_TASK_HUB", "MyHub").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DURABLE_SCALER_CONNECTION") && stderr.contains("is not set"), "{stderr}");
}

#[tokio::test]
async fn sigterm_makes_the_binary_send_a_leaving_report_and_exit() {
    let (hub, emulator) = laid_out("SidecarSigterm", Layout::Table, 1).await;
    emulator.claim(0, "pod-term", LEASE).await.unwrap();
    let (aggregator, url) = RecordingAggregator::start().await;
    let mut child = tokio::process::Command::from(binary())
        .env("DURABLE_SCALER_TASK_HUB", hub.name())
        .env("DURABLE_SCALER_CONNECTION", Azurite::shared().connection_string())
        .env("DURABLE_SCALER_AGGREGATOR", &url)
        .env("POD_NAME", "pod-term")
        .env("POD_NAMESPACE", "apps")
        .env("DURABLE_SCALER_INTERVAL", "200ms")
        .env("DURABLE_SCALER_HTTP_ADDR", "127.0.0.1:0")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::select! {
        _ = aggregator.wait_for(0, "owning 0", |r| partitions(&r.report) == [0]) => {},
        status = child.wait() => panic!("the sidecar exited before reporting: {status:?}"),
    }

    let pid = child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits").unwrap();
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "{status:?}");
    let last = aggregator.received.lock().unwrap().last().cloned().unwrap();
    assert!(last.report.leaving);
}

/// The binary as the webhook runs it in a plain container: told the app's port and how long
/// it may wait for the app after SIGTERM.
async fn spawn_plain_container_sidecar(
    hub: &TaskHub,
    pod: &str,
    url: &str,
    app_port: Option<u16>,
    wait: &str,
) -> tokio::process::Child {
    let mut command = sidecar_command(hub, pod, url, "127.0.0.1:0");
    command.env("DURABLE_SCALER_APP_EXIT_WAIT", wait);
    if let Some(port) = app_port {
        command.env("DURABLE_SCALER_APP_PORT", port.to_string());
    }
    command.spawn().unwrap()
}

/// The binary reading `hub` as pod `pod`, reporting to `url`, serving HTTP on `http`.
fn sidecar_command(hub: &TaskHub, pod: &str, url: &str, http: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(binary());
    command
        .env("DURABLE_SCALER_TASK_HUB", hub.name())
        .env("DURABLE_SCALER_CONNECTION", Azurite::shared().connection_string())
        .env("DURABLE_SCALER_AGGREGATOR", url)
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", "apps")
        .env("DURABLE_SCALER_INTERVAL", "200ms")
        .env("DURABLE_SCALER_HTTP_ADDR", http)
        .kill_on_drop(true);
    command
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

fn still_running(child: &mut tokio::process::Child) -> bool {
    child.try_wait().unwrap().is_none()
}

#[tokio::test]
async fn a_plain_container_sidecar_reports_draining_until_its_app_stops_listening_and_lets_go() {
    let (hub, emulator) = laid_out("SidecarDrain", Layout::Table, 2).await;
    let claim = emulator.claim(0, "pod-drain", LEASE).await.unwrap();
    // The app: something listening on the app container's port of the pod.
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = app.local_addr().unwrap().port();
    let (aggregator, url) = RecordingAggregator::start().await;
    let mut child = spawn_plain_container_sidecar(&hub, "pod-drain", &url, Some(port), "60s").await;
    aggregator.wait_for(0, "owning 0", |r| partitions(&r.report) == [0] && !r.report.draining).await;

    sigterm(&child);
    // The app still runs and holds partition 0: the sidecar stays and says so.
    let (first, got) = aggregator.wait_for(0, "draining", |r| r.report.draining).await;
    assert_eq!(partitions(&got.report), [0], "a draining report carries what the pod holds");
    aggregator.wait_for(first + 3, "more draining reports", |r| r.report.draining).await;
    assert!(still_running(&mut child), "left while the app still listened");

    // The host stops listening first (Kestrel), and still holds its partition a while.
    drop(app);
    let closed = aggregator.count();
    aggregator.wait_for(closed + 3, "draining after the port closed", |r| r.report.draining).await;
    assert!(still_running(&mut child), "left while the app still held a partition");

    // Then it lets go of its partition: the sidecar leaves.
    let released = aggregator.count();
    emulator.release(claim).await.unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits").unwrap();
    assert!(status.success(), "{status:?}");
    let received = aggregator.received.lock().unwrap().clone();
    let (last, before) = received.split_last().unwrap();
    assert!(last.report.leaving && !last.report.draining);
    assert!(received.len() > released, "the leaving report came after the release");
    assert!(before[first..].iter().all(|r| r.report.draining && !r.report.leaving));
}

#[tokio::test]
async fn a_plain_container_sidecar_without_an_app_port_drains_for_its_bounded_wait_then_leaves() {
    let (hub, emulator) = laid_out("SidecarLinger", Layout::Table, 1).await;
    emulator.claim(0, "pod-linger", LEASE).await.unwrap();
    let (aggregator, url) = RecordingAggregator::start().await;
    let mut child = spawn_plain_container_sidecar(&hub, "pod-linger", &url, None, "2s").await;
    aggregator.wait_for(0, "owning 0", |r| partitions(&r.report) == [0]).await;
    sigterm(&child);
    let (first, _) = aggregator.wait_for(0, "draining", |r| r.report.draining).await;
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits").unwrap();
    assert!(status.success(), "{status:?}");
    let received = aggregator.received.lock().unwrap().clone();
    assert!(received.last().unwrap().report.leaving);
    assert!(
        received[first..received.len() - 1].iter().all(|r| r.report.draining && partitions(&r.report) == [0])
    );
}

#[tokio::test]
async fn a_sidecar_told_no_wait_leaves_at_sigterm_without_draining() {
    // A native sidecar: Kubernetes stops it only after the app, so it leaves at once.
    let (hub, emulator) = laid_out("SidecarNative", Layout::Table, 1).await;
    emulator.claim(0, "pod-native", LEASE).await.unwrap();
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = app.local_addr().unwrap().port();
    let (aggregator, url) = RecordingAggregator::start().await;
    let mut child = spawn_plain_container_sidecar(&hub, "pod-native", &url, Some(port), "0s").await;
    aggregator.wait_for(0, "owning 0", |r| partitions(&r.report) == [0]).await;
    sigterm(&child);
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits").unwrap();
    assert!(status.success(), "{status:?}");
    let received = aggregator.received.lock().unwrap().clone();
    assert!(received.last().unwrap().report.leaving);
    assert!(received.iter().all(|r| !r.report.draining));
    drop(app);
}

// ---------------------------------------------------------------------------------------------
// The preStop drain (src/sidecar/drain.rs) against a fake Functions host
// ---------------------------------------------------------------------------------------------

/// The Functions host's admin API as far as the drain uses it, standing for azure-functions-host
/// `src/WebJobs.Script.WebHost/Controllers/HostController.cs`: `POST /admin/host/drain`
/// answers 202 at once and turns drain mode on (`DrainModeManager.EnableDrainModeAsync` stops
/// the listeners and cancels nothing, so the invocations running go on); `GET
/// /admin/host/drain/status` answers `Models/DrainModeStatus.cs` as Newtonsoft writes it:
/// `Disabled` before, `InProgress` while invocations or retries are outstanding, then
/// `Completed`. Both need the master key in `x-functions-key` (policy
/// `AdminAuthLevelOrInternal`, `AuthenticationLevelHandler`): 401 without it.
#[derive(Clone)]
struct FakeHost {
    key: &'static str,
    state: Arc<Mutex<HostState>>,
}

#[derive(Debug, Default)]
struct HostState {
    draining: bool,
    running: u32,
    /// How long the running invocations still take once drain mode is on.
    finish_after: Option<Duration>,
    posts: Vec<Option<String>>,
    status_calls: u32,
}

impl FakeHost {
    async fn start(
        key: &'static str,
        running: u32,
        finish_after: Option<Duration>,
    ) -> (Self, u16, JoinHandle<()>) {
        use axum::{
            Json,
            extract::State,
            http::{HeaderMap, StatusCode},
            routing::{get, post},
        };
        let host = Self {
            key,
            state: Arc::new(Mutex::new(HostState { running, finish_after, ..Default::default() })),
        };
        let authorized = |host: &FakeHost, headers: &HeaderMap| {
            headers.get("x-functions-key").and_then(|v| v.to_str().ok()) == Some(host.key)
        };
        let app = axum::Router::new()
            .route(
                "/admin/host/drain",
                post(move |State(host): State<FakeHost>, headers: HeaderMap| async move {
                    let key = headers.get("x-functions-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let mut state = host.state.lock().unwrap();
                    state.posts.push(key);
                    if !authorized(&host, &headers) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    if !state.draining {
                        state.draining = true;
                        if let Some(after) = state.finish_after {
                            let host = host.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(after).await;
                                host.state.lock().unwrap().running = 0;
                            });
                        }
                    }
                    StatusCode::ACCEPTED
                }),
            )
            .route(
                "/admin/host/drain/status",
                get(move |State(host): State<FakeHost>, headers: HeaderMap| async move {
                    if !authorized(&host, &headers) {
                        return Err(StatusCode::UNAUTHORIZED);
                    }
                    let mut state = host.state.lock().unwrap();
                    state.status_calls += 1;
                    let phase = match (state.draining, state.running) {
                        (false, _) => "Disabled",
                        (true, 0) => "Completed",
                        (true, _) => "InProgress",
                    };
                    Ok(Json(serde_json::json!({
                        "state": phase, "outstandingInvocations": state.running, "outstandingRetries": 0
                    })))
                }),
            )
            .with_state(host.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (host, port, server)
    }
}

/// A free loopback port for the sidecar's HTTP address (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The binary as the webhook runs it with a preStop drain: the host's URL, the master key's
/// file, the pod's token and the wait, beside the plain-container settings.
async fn spawn_draining_sidecar(
    hub: &TaskHub,
    pod: &str,
    url: &str,
    host_port: u16,
    key_file: &std::path::Path,
    http_port: u16,
    (exit_wait, drain_wait): (&str, &str),
) -> tokio::process::Child {
    let mut command = sidecar_command(hub, pod, url, &format!("127.0.0.1:{http_port}"));
    command
        .env("DURABLE_SCALER_APP_PORT", host_port.to_string())
        .env("DURABLE_SCALER_APP_EXIT_WAIT", exit_wait)
        .env("DURABLE_SCALER_HOST_URL", format!("http://127.0.0.1:{host_port}"))
        .env("DURABLE_SCALER_HOST_KEY_FILE", key_file)
        .env("DURABLE_SCALER_DRAIN_TOKEN", "pod-token-1")
        .env("DURABLE_SCALER_DRAIN_WAIT", drain_wait);
    command.spawn().unwrap()
}

/// The kubelet's preStop `httpGet`: a GET of the hook's path with its `httpHeaders`.
async fn pre_stop(http_port: u16, token: Option<&str>) -> (u16, serde_json::Value, Duration) {
    durable_scaler::telemetry::install_crypto_provider();
    let started = Instant::now();
    let mut request = reqwest::Client::new().get(format!("http://127.0.0.1:{http_port}/drain"));
    if let Some(token) = token {
        request = request.header("X-Durable-Scaler-Drain", token);
    }
    let answer = request.send().await.expect("the sidecar answers the hook");
    let status = answer.status().as_u16();
    let body = answer.text().await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, json, started.elapsed())
}

#[tokio::test]
async fn the_prestop_drain_answers_once_the_host_runs_nothing_while_a_plain_sidecar_outlives_sigterm() {
    let (hub, emulator) = laid_out("SidecarPreStop", Layout::Table, 1).await;
    let claim = emulator.claim(0, "pod-prestop", LEASE).await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("host.master"), "master-key-1\n").unwrap();
    // Two invocations that go on for 3 s after drain mode is on.
    let (host, host_port, server) = FakeHost::start("master-key-1", 2, Some(Duration::from_secs(3))).await;
    let (aggregator, url) = RecordingAggregator::start().await;
    let http_port = free_port();
    let key_file = keys.path().join("host.master");
    let mut child =
        spawn_draining_sidecar(&hub, "pod-prestop", &url, host_port, &key_file, http_port, ("60s", "60s"))
            .await;
    aggregator.wait_for(0, "owning 0", |r| partitions(&r.report) == [0]).await;

    // Without the pod's token, or with another, nothing reaches the host.
    assert_eq!(pre_stop(http_port, None).await.0, 403);
    assert_eq!(pre_stop(http_port, Some("pod-token-2")).await.0, 403);
    assert!(host.state.lock().unwrap().posts.is_empty());

    // The kubelet: the app container's preStop hook, and at the same moment SIGTERM to the
    // plain-container sidecar, which has no hook.
    let hook = tokio::spawn(pre_stop(http_port, Some("pod-token-1")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&child);
    let (status, body, took) = hook.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "completed", "{body}");
    assert_eq!(body["host"]["state"], "Completed");
    assert!(took >= Duration::from_secs(3), "answered after {took:?}, before the invocations ended");
    {
        let state = host.state.lock().unwrap();
        assert_eq!(state.posts, [Some("master-key-1".to_owned())], "one drain, with the master key");
        assert!(state.status_calls >= 2, "polled the status: {}", state.status_calls);
    }
    assert!(still_running(&mut child), "the sidecar left while its app was draining");
    let (_, metrics) = http_get(([127, 0, 0, 1], http_port).into(), "/metrics").await;
    for line in [
        "durable_scaler_sidecar_drains_total{result=\"completed\"} 1",
        "durable_scaler_sidecar_drains_total{result=\"forbidden\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let draining = aggregator.wait_for(0, "draining", |r| r.report.draining).await.1;
    assert_eq!(partitions(&draining.report), [0]);

    // The kubelet's SIGTERM then stops the host; it lets go of its partition: the sidecar leaves.
    server.abort();
    let _ = server.await;
    emulator.release(claim).await.unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits").unwrap();
    assert!(status.success(), "{status:?}");
    assert!(aggregator.received.lock().unwrap().last().unwrap().report.leaving);
}

#[tokio::test]
async fn a_prestop_drain_the_host_refuses_or_that_outlasts_its_wait_lets_the_pod_stop() {
    let hub = hub("SidecarPreStopFail");
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("host.master");
    std::fs::write(&key_file, "not-the-key").unwrap();
    let (aggregator, url) = RecordingAggregator::start().await;

    // A key the host refuses: 502 at once, naming the status.
    let (host, host_port, server) = FakeHost::start("master-key-1", 1, None).await;
    let http_port = free_port();
    let mut child =
        spawn_draining_sidecar(&hub, "pod-a", &url, host_port, &key_file, http_port, ("0s", "3s")).await;
    aggregator.wait_for(0, "from pod-a", |_| true).await;
    let (status, body, _) = pre_stop(http_port, Some("pod-token-1")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["result"].as_str().unwrap().contains("401"), "{body}");
    assert!(!host.state.lock().unwrap().draining);

    // The right key, an invocation that never ends: the hook answers when the wait runs out.
    std::fs::write(&key_file, "master-key-1").unwrap();
    let (status, body, took) = pre_stop(http_port, Some("pod-token-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "wait ran out");
    assert_eq!(body["host"]["outstandingInvocations"], 1);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    server.abort();
    let (_, metrics) = http_get(([127, 0, 0, 1], http_port).into(), "/metrics").await;
    for line in [
        "durable_scaler_sidecar_drains_total{result=\"failed\"} 1",
        "durable_scaler_sidecar_drains_total{result=\"wait_ran_out\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // No host at all: 502.
    sigterm(&child);
    let _ = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits");
    let nothing_there = free_port();
    let http_port = free_port();
    let mut child =
        spawn_draining_sidecar(&hub, "pod-b", &url, nothing_there, &key_file, http_port, ("0s", "3s")).await;
    aggregator.wait_for(0, "from pod-b", |r| r.report.pod.as_ref().is_some_and(|p| p.name == "pod-b")).await;
    let (status, body, _) = pre_stop(http_port, Some("pod-token-1")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["result"].as_str().unwrap().contains("did not answer"), "{body}");
    sigterm(&child);
    let _ = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the sidecar exits");
}
