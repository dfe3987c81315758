//! The aggregator against real storage: Azurite, task hubs laid out and worked by the
//! emulator (DurableTask's writes), real sidecars in-process, and KEDA's calls over the real
//! gRPC port. Covers scale from zero through the cold probe, timers against running work, and
//! what happens to a sidecar's partitions when it dies or leaves. Whatever depends on
//! partition ownership runs on each of DurableTask's three layouts; neither the sidecars nor
//! the ScaledObject say which one the hub has.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::aggregator_support::*;
use durable_scaler::azurite::Azurite;
use durable_scaler::emulator::TaskHubEmulator;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::shutdown::Shutdown;
use durable_scaler::sidecar::{Args as SidecarArgs, Config as SidecarConfig, Sidecar};
use durable_scaler::storage::{Layout, PartitionMode, QueueRef, StorageAccount, TaskHub};

/// A durable timer's delay: far beyond any test.
const TIMER: Duration = Duration::from_secs(3600);
/// Partition leases the emulated workers hold.
const LEASE: Duration = Duration::from_secs(120);

fn connection() -> String {
    Azurite::shared().connection_string()
}

const LAYOUTS: [Layout; 3] = [Layout::Table, Layout::Safe, Layout::Legacy];

/// An emulator of a task hub unique to this test and run (nothing created yet).
fn emulator(name: &str, layout: Layout) -> (String, TaskHubEmulator) {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").subsec_nanos();
    let hub = format!("{name}{}{nanos}", layout.as_str());
    let account = StorageAccount::from_connection_string(&connection()).expect("Azurite's connection string");
    let emulator = TaskHubEmulator::new(&account, TaskHub::parse(&hub).expect("valid hub name"), layout);
    (hub, emulator)
}

/// A task hub unique to this test and run, laid out in Azurite as `layout` with 4 partitions.
async fn laid_out(name: &str, layout: Layout) -> (String, TaskHubEmulator) {
    let (hub, emulator) = emulator(name, layout);
    emulator.create(4).await.expect("create the task hub");
    (hub, emulator)
}

/// KEDA's reference to `hub`, with the connection the trigger resolves from the app's env.
fn keda_ref(hub: &str) -> ScaledObjectRef {
    scaled_object(hub, &[("connectionFromEnv", &connection())])
}

/// IsActive, retried while the aggregator answers UNAVAILABLE (no first probe yet).
async fn is_active(aggregator: &TestAggregator, hub: &str) -> bool {
    let start = Instant::now();
    loop {
        match aggregator.keda.clone().is_active(keda_ref(hub)).await {
            Ok(r) => return r.into_inner().result,
            Err(s) if s.code() == tonic::Code::Unavailable && start.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("IsActive failed: {s:?}"),
        }
    }
}

async fn desired(aggregator: &TestAggregator, hub: &str) -> f64 {
    let request = GetMetricsRequest {
        scaled_object_ref: Some(keda_ref(hub)),
        metric_name: format!("durabletask-{hub}"),
    };
    let response = aggregator.keda.clone().get_metrics(request).await.expect("GetMetrics").into_inner();
    response.metric_values[0].metric_value_float
}

/// The value of one per-hub series on /metrics (0 when absent).
async fn series(aggregator: &TestAggregator, name: &str, hub: &str, outcome: Option<&str>) -> f64 {
    let labels = match outcome {
        Some(k) => {
            format!("{{namespace=\"{NAMESPACE}\",task_hub=\"{}\",outcome=\"{k}\"}}", hub.to_lowercase())
        }
        None => format!("{{namespace=\"{NAMESPACE}\",task_hub=\"{}\"}}", hub.to_lowercase()),
    };
    let prefix = format!("durable_scaler_aggregator_{name}{labels} ");
    let (_, body) = aggregator.http_get("/metrics").await;
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// A real sidecar for `pod` reporting `hub` to the aggregator every `interval`.
fn sidecar_args(
    aggregator: &TestAggregator,
    hub: &str,
    pod: &str,
    interval: &str,
    token_dir: &tempfile::TempDir,
) -> SidecarArgs {
    SidecarArgs {
        task_hub: Some(TaskHub::parse(hub).expect("valid hub name")),
        connection: Some(connection()),
        identity: Default::default(),
        aggregator: Some(format!("http://{}", aggregator.report_addr).parse().expect("a URL")),
        aggregator_ca: None,
        aggregator_addresses: Vec::new(),
        pod_name: Some(pod.to_string()),
        pod_namespace: Some(NAMESPACE.to_string()),
        interval: durable_scaler::config::parse_duration(interval).expect("a duration"),
        partition_mode: PartitionMode::Auto,
        token_file: token_dir.path().join("token"),
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

async fn start_sidecar(args: SidecarArgs) -> (Shutdown, tokio::task::JoinHandle<()>) {
    let sidecar =
        Sidecar::bind(SidecarConfig::from_args(args).expect("sidecar config")).await.expect("sidecar binds");
    let shutdown = Shutdown::new();
    let task = tokio::spawn(sidecar.run(shutdown.clone()));
    (shutdown, task)
}

/// The value of the probe's ownership-read counter for `hub` and `layout`.
async fn ownership_reads(aggregator: &TestAggregator, hub: &str, layout: &str) -> f64 {
    let prefix = format!(
        "durable_scaler_aggregator_ownership_reads_total{{namespace=\"{NAMESPACE}\",task_hub=\"{}\",layout=\"{layout}\"}} ",
        hub.to_lowercase()
    );
    let (_, body) = aggregator.http_get("/metrics").await;
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn scale_from_zero_through_the_cold_probe_in_each_layout() {
    let aggregator = start(args()).await;
    for layout in LAYOUTS {
        let (hub, emulator) = laid_out("ColdStart", layout).await;
        // No pods, no sidecars: only the cold probe can see this hub, and nothing tells it
        // the layout.
        assert!(!is_active(&aggregator, &hub).await, "an empty hub is inactive");
        let mut stream =
            aggregator.keda.clone().stream_is_active(keda_ref(&hub)).await.expect("stream").into_inner();
        assert!(!next(&mut stream).await, "inactive when the stream opens");

        emulator.enqueue(QueueRef::Control(2), "ExecutionStarted", Duration::ZERO).await.unwrap();
        assert!(next(&mut stream).await, "{layout:?}: true once the probe sees the message");
        assert!(is_active(&aggregator, &hub).await);
        eventually("one worker wanted", || async { desired(&aggregator, &hub).await == 1.0 }).await;
        assert!(series(&aggregator, "probes_total", &hub, Some("ok")).await >= 2.0);
        assert!(ownership_reads(&aggregator, &hub, layout.as_str()).await >= 2.0, "{layout:?} detected");
    }
    aggregator.stop().await;
}

#[tokio::test]
async fn queues_without_an_ownership_store_are_an_error_on_hubs_and_visible_work_stays_active() {
    let (hub, emulator) = emulator("NoStore", Layout::Table);
    // The queues of a hub whose ownership is kept nowhere DurableTask keeps it.
    emulator.create_queues(4).await.unwrap();
    emulator.enqueue(QueueRef::Control(3), "ExecutionStarted", Duration::ZERO).await.unwrap();
    let aggregator = start(args()).await;
    assert!(is_active(&aggregator, &hub).await, "a visible control message keeps the hub active");
    eventually("the error on /hubs", || async {
        let (_, hubs) = aggregator.http_get("/hubs").await;
        hubs.contains("no partition ownership store") && hubs.contains("taskhub.json")
    })
    .await;
    assert!(ownership_reads(&aggregator, &hub, "none").await >= 1.0);
    assert!(series(&aggregator, "probes_total", &hub, Some("no_ownership_store")).await >= 1.0);
    aggregator.stop().await;
}

#[tokio::test]
async fn a_timers_only_hub_is_inactive_and_a_running_message_keeps_it_active() {
    let (hub, emulator) = laid_out("Timers", Layout::Table).await;
    // Durable timers and scheduled starts go to control queues only (DTFx retries activities
    // through orchestration timers too), so the work-item queue never holds a delayed message.
    for queue in [QueueRef::Control(0), QueueRef::Control(3), QueueRef::Control(3)] {
        emulator.enqueue(queue, "TimerFired", TIMER).await.unwrap();
    }
    let aggregator = start(args()).await;
    assert!(!is_active(&aggregator, &hub).await);
    // Several probes later the sleeping timers still keep nothing awake.
    eventually("three probes", || async {
        series(&aggregator, "probes_total", &hub, Some("ok")).await >= 3.0
    })
    .await;
    assert!(!is_active(&aggregator, &hub).await, "timers only: inactive");
    assert_eq!(desired(&aggregator, &hub).await, 0.0);

    // An activity arrives and a worker takes it: invisible now, but the count moved.
    emulator.enqueue(QueueRef::WorkItem, "Activity", Duration::ZERO).await.unwrap();
    let taken = emulator.dequeue(QueueRef::WorkItem, 1, Duration::from_secs(300)).await.unwrap();
    assert_eq!(taken.len(), 1, "the activity was dequeued");
    eventually("active while the activity runs", || async { is_active(&aggregator, &hub).await }).await;
    aggregator.stop().await;
}

#[tokio::test]
async fn a_killed_sidecars_partitions_are_probed_within_three_intervals() {
    for layout in LAYOUTS {
        killed_sidecar(layout).await;
    }
}

async fn killed_sidecar(layout: Layout) {
    let (hub, emulator) = laid_out("Killed", layout).await;
    for p in 0..4 {
        emulator.claim(p, "pod-a", LEASE).await.unwrap();
    }
    let aggregator = start(args()).await;
    assert!(!is_active(&aggregator, &hub).await);
    let token_dir = tempfile::tempdir().unwrap();
    let (_sidecar_shutdown, sidecar) =
        start_sidecar(sidecar_args(&aggregator, &hub, "pod-a", "300ms", &token_dir)).await;
    eventually("pod-a covers every partition", || async {
        series(&aggregator, "covered_partitions", &hub, None).await == 4.0
    })
    .await;

    // Killed: no leaving report. Work arrives that only a probe can see.
    sidecar.abort();
    let killed = Instant::now();
    emulator.enqueue(QueueRef::Control(1), "ExecutionStarted", Duration::ZERO).await.unwrap();
    eventually("the dead pod's partitions are uncovered", || async {
        series(&aggregator, "uncovered_partitions", &hub, None).await == 4.0
    })
    .await;
    eventually("the probe sees the new message", || async { is_active(&aggregator, &hub).await }).await;
    // Figures, not assertions: 3 sidecar intervals are 900 ms, the probe runs every 200 ms.
    println!("{layout:?}: active {:?} after the sidecar was killed", killed.elapsed());
    aggregator.stop().await;
}

#[tokio::test]
async fn a_leaving_sidecar_hands_its_partitions_to_the_probe_at_once() {
    for layout in LAYOUTS {
        leaving_sidecar(layout).await;
    }
}

async fn leaving_sidecar(layout: Layout) {
    let (hub, emulator) = laid_out("Leaving", layout).await;
    for p in 0..4 {
        emulator.claim(p, "pod-b", LEASE).await.unwrap();
    }
    let aggregator = start(args()).await;
    assert!(!is_active(&aggregator, &hub).await);
    let token_dir = tempfile::tempdir().unwrap();
    // A 30 s interval: silence alone would uncover its partitions only after 90 s, far beyond
    // the deadline, so only the leaving report can do it in time.
    let (shutdown, sidecar) =
        start_sidecar(sidecar_args(&aggregator, &hub, "pod-b", "30s", &token_dir)).await;
    eventually("pod-b covers every partition", || async {
        series(&aggregator, "covered_partitions", &hub, None).await == 4.0
    })
    .await;
    shutdown.trigger();
    tokio::time::timeout(DEADLINE, sidecar).await.expect("the sidecar stops").expect("cleanly");
    assert_eq!(
        series(&aggregator, "uncovered_partitions", &hub, None).await,
        4.0,
        "uncovered by the leaving report"
    );
    aggregator.stop().await;
}

#[tokio::test]
async fn a_hub_not_provisioned_yet_is_inactive_and_wants_no_workers() {
    // The app has never run: no queues, no partition table. Nothing can be waiting.
    let hub =
        format!("NeverRan{}", SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").subsec_nanos());
    let aggregator = start(args()).await;
    assert!(!is_active(&aggregator, &hub).await);
    assert_eq!(desired(&aggregator, &hub).await, 0.0);
    assert!(series(&aggregator, "probes_total", &hub, Some("not_provisioned")).await >= 1.0);
    aggregator.stop().await;
}
