//! Fault injection against the real binaries: a hub laid out in Azurite with a burst of work,
//! worker stand-ins draining it, sidecar and aggregator processes of
//! `env!("CARGO_BIN_EXE_durable-scaler")`, and a KEDA stand-in that asks IsActive and
//! GetMetrics every 0.5 s while holding a StreamIsActive stream. Each test injects one fault
//! while the burst is worked off and checks what KEDA was told: never inactive or 0 while the
//! queues held work (UNAVAILABLE is allowed: KEDA then leaves the replicas alone, see
//! `src/aggregator/keda.rs`), the same decision after recovery as before, and the aggregator's
//! memory and open descriptors back where they were.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use durable_scaler::azurite::Azurite;
use durable_scaler::contract::env;
use durable_scaler::emulator::TaskHubEmulator;
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::storage::{Layout, QueueRef, TaskHub};
use tokio_stream::StreamExt;

use crate::aggregator_support::http_get;
use crate::common::{account, hub};
use crate::forwarder::{ForwardedStorage, Forwarder};
use crate::processes::{AggregatorPorts, Process};

/// Partitions of every test hub; two sidecars own two each.
const PARTITIONS: u32 = 4;
/// Messages per control queue in the burst: with the target algorithm and the limits' guess
/// (10 orchestrations per worker: the sidecars here are given no CPU count) the decision is 4
/// workers while every queue holds at least one and 31 in all.
const BURST: u64 = 30;
const DEADLINE: Duration = Duration::from_secs(40);

/// The hub, its burst, and worker stand-ins that drain one message per queue per tick.
struct Burst {
    hub: TaskHub,
    emulator: TaskHubEmulator,
    /// Messages enqueued and not yet deleted.
    outstanding: Arc<AtomicU64>,
    /// Workers drain only while this is set.
    draining: Arc<AtomicBool>,
    /// Messages each worker stand-in takes per round (1 while a fault is injected, so the
    /// burst outlives it; more once the test only waits for the work to drain).
    batch: Arc<AtomicU32>,
    /// The connection string the sidecars and the probe (through KEDA's metadata) use.
    connection: String,
}

impl Burst {
    async fn laid_out(name: &str) -> Self {
        let hub = hub(name);
        let emulator = TaskHubEmulator::new(&account(), hub.clone(), Layout::Table);
        emulator.create(PARTITIONS).await.unwrap();
        for p in 0..PARTITIONS {
            let pod = if p < PARTITIONS / 2 { "pod-a" } else { "pod-b" };
            emulator.claim(p, pod, Duration::from_secs(600)).await.unwrap();
            for i in 0..BURST {
                emulator.enqueue(QueueRef::Control(p), &format!("m{i}"), Duration::ZERO).await.unwrap();
            }
        }
        let burst = Self {
            hub,
            emulator,
            outstanding: Arc::new(AtomicU64::new(BURST * u64::from(PARTITIONS))),
            draining: Arc::new(AtomicBool::new(false)),
            batch: Arc::new(AtomicU32::new(1)),
            connection: Azurite::shared().connection_string(),
        };
        for p in 0..PARTITIONS {
            let (emulator, outstanding, draining, batch) = (
                burst.emulator.clone(),
                burst.outstanding.clone(),
                burst.draining.clone(),
                burst.batch.clone(),
            );
            tokio::spawn(async move {
                while outstanding.load(Ordering::SeqCst) > 0 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    if !draining.load(Ordering::SeqCst) {
                        continue;
                    }
                    let take = batch.load(Ordering::SeqCst);
                    let Ok(messages) =
                        emulator.dequeue(QueueRef::Control(p), take, Duration::from_secs(30)).await
                    else {
                        continue;
                    };
                    for m in messages {
                        if emulator.delete(&m).await.is_ok() {
                            outstanding.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        burst
    }

    /// A sidecar process for `pod` reporting to `report` (or to each of `addresses`).
    fn sidecar(
        &self,
        pod: &str,
        report: SocketAddr,
        addresses: &[SocketAddr],
        dir: &tempfile::TempDir,
    ) -> Process {
        let args: Vec<String> =
            ["sidecar", "--interval", "300ms", "--http-addr", "127.0.0.1:0", "--token-file"]
                .iter()
                .map(|s| s.to_string())
                .chain([dir.path().join("no-token").display().to_string()])
                .collect();
        let mut envs = vec![
            (env::TASK_HUB, self.hub.name().to_string()),
            (env::CONNECTION, self.connection.clone()),
            (env::AGGREGATOR, format!("http://{report}")),
            (env::POD_NAME, pod.to_string()),
            (env::POD_NAMESPACE, "apps".to_string()),
        ];
        if !addresses.is_empty() {
            let list: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
            envs.push((env::AGGREGATOR_ADDRESSES, list.join(",")));
        }
        Process::spawn(pod, &args, &envs, dir)
    }

    fn scaled_object(&self) -> ScaledObjectRef {
        ScaledObjectRef {
            name: "app".into(),
            namespace: "apps".into(),
            scaler_metadata: HashMap::from([
                ("taskHubName".to_string(), self.hub.name().to_string()),
                ("connectionFromEnv".to_string(), self.connection.clone()),
                ("scaleAlgorithm".to_string(), "target".to_string()),
            ]),
        }
    }
}

/// What the KEDA stand-in saw.
#[derive(Debug, Default)]
struct Seen {
    answers: u64,
    unavailable: u64,
    /// Each error, with the seconds since polling started: what KEDA would have logged.
    errors: Vec<String>,
    /// Answers of inactive or 0 while the queues held work.
    violations: Vec<String>,
}

/// The KEDA stand-in of one test: its polling task and the flag that stops it.
struct KedaStandIn {
    stop: Arc<AtomicBool>,
    polling: tokio::task::JoinHandle<Seen>,
}

impl KedaStandIn {
    /// Lets the burst drain ([`drained`]), stops polling, and checks what KEDA was told
    /// ([`assert_safe`]); returns it.
    async fn finish(self, burst: &Burst, http: SocketAddr, what: &str) -> Seen {
        drained(burst, http).await;
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.polling.await.unwrap();
        assert_safe(&seen, what);
        seen
    }
}

/// KEDA's polling loop for `burst`'s hub: IsActive then GetMetrics every 0.5 s against
/// `grpc` (switchable: the Service sending KEDA to another replica), until finished.
fn poll_like_keda(burst: &Burst, grpc: Arc<std::sync::Mutex<SocketAddr>>) -> KedaStandIn {
    let (so, outstanding) = (burst.scaled_object(), burst.outstanding.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let polling_stop = stop.clone();
    let polling = tokio::spawn(async move {
        let stop = polling_stop;
        let mut seen = Seen::default();
        let started = Instant::now();
        let metric = format!("durabletask-{}", so.scaler_metadata["taskHubName"].to_lowercase());
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let addr = *grpc.lock().unwrap();
            let Ok(channel) =
                tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await
            else {
                seen.unavailable += 1;
                seen.errors.push(format!("{:.1} s: cannot connect", started.elapsed().as_secs_f64()));
                continue;
            };
            let mut keda = ExternalScalerClient::new(channel);
            let work_before = outstanding.load(Ordering::SeqCst);
            let active = keda.is_active(so.clone()).await;
            let request =
                GetMetricsRequest { scaled_object_ref: Some(so.clone()), metric_name: metric.clone() };
            let value = keda.get_metrics(request).await;
            match (active, value) {
                (Ok(a), Ok(v)) => {
                    seen.answers += 1;
                    let (a, v) = (a.into_inner().result, v.into_inner().metric_values[0].metric_value_float);
                    if work_before > 0 && (!a || v <= 0.0) {
                        seen.violations
                            .push(format!("active={a} metric={v} with {work_before} messages queued"));
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    seen.unavailable += 1;
                    let message: String = e.message().chars().take(80).collect();
                    let at = started.elapsed().as_secs_f64();
                    seen.errors.push(format!("{at:.1} s: {:?} {message}", e.code()));
                }
            }
        }
        seen
    });
    KedaStandIn { stop, polling }
}

/// The hub's decision on `/hubs`: (active, desired workers).
async fn decision(http: SocketAddr, hub: &TaskHub) -> Option<(bool, u64)> {
    let (status, body) = http_get(http, "/hubs").await;
    if status != 200 {
        return None;
    }
    let hubs: serde_json::Value = serde_json::from_str(&body).ok()?;
    let entry = hubs.as_array()?.iter().find(|h| h["task_hub"] == hub.name())?;
    Some((entry["active"].as_bool()?, entry["desired_workers"].as_u64()?))
}

/// GetMetricSpec against the KEDA port at `grpc`, as KEDA does before polling: the trigger's
/// settings (the target algorithm) reach that replica.
async fn announce(grpc: SocketAddr, so: &ScaledObjectRef) {
    let mut keda = ExternalScalerClient::connect(format!("http://{grpc}")).await.unwrap();
    keda.get_metric_spec(so.clone()).await.unwrap();
}

/// Waits until the aggregator at `http` decides (true, 4) for the hub: the burst's decision.
async fn steady(http: SocketAddr, hub: &TaskHub, what: &str) -> (bool, u64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(d) = decision(http, hub).await
            && d == (true, u64::from(PARTITIONS))
        {
            return d;
        }
        // The whole entry (reason, coverage, limits) on failure: a wrong count says why here.
        assert!(Instant::now() < deadline, "no steady decision {what}: {}", hub_status(http, hub).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the queues are empty and the aggregator says inactive. The workers take
/// several messages a round now: on a loaded machine one a round took close to the deadline.
async fn drained(burst: &Burst, http: SocketAddr) {
    burst.batch.store(8, Ordering::SeqCst);
    burst.draining.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while burst.outstanding.load(Ordering::SeqCst) > 0
        || decision(http, &burst.hub).await.is_none_or(|(active, _)| active)
    {
        assert!(
            Instant::now() < deadline,
            "the work did not drain: {} left",
            burst.outstanding.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The hub's entry on `/hubs`.
async fn hub_status(http: SocketAddr, hub: &TaskHub) -> serde_json::Value {
    let (_, body) = http_get(http, "/hubs").await;
    let hubs: serde_json::Value = serde_json::from_str(&body).unwrap();
    hubs.as_array().unwrap().iter().find(|h| h["task_hub"] == hub.name()).cloned().unwrap()
}

/// Waits until `/hubs` shows the hub as `what` says.
async fn wait_for_hub(
    http: SocketAddr,
    hub: &TaskHub,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = hub_status(http, hub).await;
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One IsActive call against `grpc`, as KEDA makes it.
async fn is_active(grpc: SocketAddr, so: &ScaledObjectRef) -> Result<bool, tonic::Status> {
    let mut keda = ExternalScalerClient::connect(format!("http://{grpc}")).await.unwrap();
    keda.is_active(so.clone()).await.map(|r| r.into_inner().result)
}

fn assert_safe(seen: &Seen, what: &str) {
    assert!(
        seen.violations.is_empty(),
        "{what}: KEDA was told idle while work was queued: {:?}",
        seen.violations
    );
    assert!(seen.answers > 0, "{what}: KEDA got no answer at all: {seen:?}");
    eprintln!("{what}: {} answers, {} unavailable: {:?}", seen.answers, seen.unavailable, seen.errors);
}

#[tokio::test]
async fn an_aggregator_killed_and_restarted_never_tells_keda_idle_and_decides_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let burst = Burst::laid_out("FaultRestart").await;
    let ports = AggregatorPorts::new();
    let mut aggregator = ports.start("aggregator", &dir).await;
    let _a = burst.sidecar("pod-a", ports.report, &[], &dir);
    let _b = burst.sidecar("pod-b", ports.report, &[], &dir);
    let keda = poll_like_keda(&burst, Arc::new(std::sync::Mutex::new(ports.grpc)));
    let before = steady(ports.http, &burst.hub, "before the fault").await;

    burst.draining.store(true, Ordering::SeqCst);
    aggregator.sigkill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    burst.draining.store(false, Ordering::SeqCst);
    aggregator = ports.start("aggregator-restarted", &dir).await;
    let after = steady(ports.http, &burst.hub, "after the restart").await;
    assert_eq!(after, before, "{}", aggregator.output());

    keda.finish(&burst, ports.http, "aggregator SIGKILL + restart").await;
}

#[tokio::test]
async fn storage_unreachable_for_twenty_seconds_is_answered_unavailable_never_idle_and_decided_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let storage = ForwardedStorage::new().await;
    let mut burst = Burst::laid_out("FaultStorage").await;
    // Sidecars and the probe reach storage through the forwarders; the workers directly.
    burst.connection = storage.connection.clone();
    let ports = AggregatorPorts::new();
    let aggregator = ports.start("aggregator", &dir).await;
    let _a = burst.sidecar("pod-a", ports.report, &[], &dir);
    let _b = burst.sidecar("pod-b", ports.report, &[], &dir);
    let keda = poll_like_keda(&burst, Arc::new(std::sync::Mutex::new(ports.grpc)));
    let before = steady(ports.http, &burst.hub, "before the fault").await;
    let rss_before = aggregator.rss_kib();

    let outage = Instant::now();
    storage.down();
    burst.draining.store(true, Ordering::SeqCst);
    // Nobody reads the queues now: the picture of before the outage is not answered from
    // (it would decay into idle without readings), KEDA is told UNAVAILABLE and why.
    let deadline = outage + Duration::from_secs(20);
    let reason = loop {
        match is_active(ports.grpc, &burst.scaled_object()).await {
            Err(status) => break status,
            Ok(active) => assert!(active, "told inactive during the outage"),
        }
        assert!(Instant::now() < deadline, "KEDA was answered from a picture nobody can read any more");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reason.code(), tonic::Code::Unavailable, "{reason:?}");
    assert!(reason.message().contains("cold probe failed"), "{}", reason.message());
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(outage.elapsed())).await;
    burst.draining.store(false, Ordering::SeqCst);
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;

    storage.up().await;
    let after = steady(ports.http, &burst.hub, "after storage came back").await;
    assert_eq!(after, before, "{}", aggregator.output());
    let recovered = Instant::now() + DEADLINE;
    while is_active(ports.grpc, &burst.scaled_object()).await.is_err() {
        assert!(Instant::now() < recovered, "KEDA still gets UNAVAILABLE after storage came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(is_active(ports.grpc, &burst.scaled_object()).await.unwrap(), before.0);

    let seen = keda.finish(&burst, ports.http, "storage unreachable for 20 s").await;
    assert!(seen.unavailable > 0, "the outage was answered UNAVAILABLE: {seen:?}");
    aggregator.assert_rss_grew_less_than(rss_before, 16 * 1024);
}

#[tokio::test]
async fn the_report_channel_cut_and_restored_leaves_keda_answered_from_the_probe_and_decided_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let burst = Burst::laid_out("FaultChannel").await;
    let ports = AggregatorPorts::new();
    let aggregator = ports.start("aggregator", &dir).await;
    let channel = Forwarder::to(ports.report).await;
    let _a = burst.sidecar("pod-a", channel.addr, &[], &dir);
    let _b = burst.sidecar("pod-b", channel.addr, &[], &dir);
    let keda = poll_like_keda(&burst, Arc::new(std::sync::Mutex::new(ports.grpc)));
    let before = steady(ports.http, &burst.hub, "before the fault").await;
    wait_for_hub(ports.http, &burst.hub, "both sidecars covering the hub", |h| {
        h["live_pods"] == 2 && h["uncovered_partitions"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let rss_before = aggregator.rss_kib();

    burst.draining.store(true, Ordering::SeqCst);
    channel.down();
    // Silent for three intervals, the sidecars no longer cover their partitions: the probe
    // reads them.
    wait_for_hub(ports.http, &burst.hub, "the cut noticed", |h| {
        h["live_pods"] == 0 && h["uncovered_partitions"].as_array().is_some_and(|u| u.len() == 4)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    burst.draining.store(false, Ordering::SeqCst);
    assert_eq!(decision(ports.http, &burst.hub).await, Some(before), "the probe's picture decides alike");

    channel.up().await;
    wait_for_hub(ports.http, &burst.hub, "the sidecars reporting again", |h| {
        h["live_pods"] == 2 && h["uncovered_partitions"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let after = steady(ports.http, &burst.hub, "after the channel came back").await;
    assert_eq!(after, before, "{}", aggregator.output());

    keda.finish(&burst, ports.http, "report channel cut and restored").await;
    aggregator.assert_rss_grew_less_than(rss_before, 16 * 1024);
}

#[tokio::test]
async fn a_sidecar_killed_has_its_partitions_probed_and_keda_is_never_told_idle() {
    let dir = tempfile::tempdir().unwrap();
    let burst = Burst::laid_out("FaultSidecar").await;
    let ports = AggregatorPorts::new();
    let aggregator = ports.start("aggregator", &dir).await;
    let _a = burst.sidecar("pod-a", ports.report, &[], &dir);
    let mut b = burst.sidecar("pod-b", ports.report, &[], &dir);
    let keda = poll_like_keda(&burst, Arc::new(std::sync::Mutex::new(ports.grpc)));
    let before = steady(ports.http, &burst.hub, "before the fault").await;
    let rss_before = aggregator.rss_kib();

    burst.draining.store(true, Ordering::SeqCst);
    b.sigkill();
    // Three sidecar intervals (300 ms) make its partitions stale; the probe (300 ms) reads them.
    wait_for_hub(ports.http, &burst.hub, "the killed sidecar's partitions uncovered", |h| {
        h["live_pods"] == 1 && h["uncovered_partitions"].as_array().is_some_and(|p| p.len() == 2)
    })
    .await;
    burst.draining.store(false, Ordering::SeqCst);
    let after = steady(ports.http, &burst.hub, "after the sidecar died").await;
    assert_eq!(after, before);

    keda.finish(&burst, ports.http, "sidecar SIGKILL").await;
    aggregator.assert_rss_grew_less_than(rss_before, 16 * 1024);
}

#[tokio::test]
async fn one_of_two_replicas_killed_leaves_the_other_answering_keda_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let burst = Burst::laid_out("FaultReplica").await;
    let (one, two) = (AggregatorPorts::new(), AggregatorPorts::new());
    let mut first = one.start("replica-1", &dir).await;
    let second = two.start("replica-2", &dir).await;
    let replicas = [one.report, two.report];
    let _a = burst.sidecar("pod-a", one.report, &replicas, &dir);
    let _b = burst.sidecar("pod-b", one.report, &replicas, &dir);
    let grpc = Arc::new(std::sync::Mutex::new(one.grpc));
    let keda = poll_like_keda(&burst, grpc.clone());
    announce(two.grpc, &burst.scaled_object()).await;
    let before = steady(one.http, &burst.hub, "on replica 1").await;
    assert_eq!(steady(two.http, &burst.hub, "on replica 2").await, before, "both replicas decide alike");

    burst.draining.store(true, Ordering::SeqCst);
    first.sigkill();
    // The ClusterIP Service sends KEDA to the replica left.
    *grpc.lock().unwrap() = two.grpc;
    tokio::time::sleep(Duration::from_secs(2)).await;
    burst.draining.store(false, Ordering::SeqCst);
    assert_eq!(steady(two.http, &burst.hub, "on the replica left").await, before, "{}", second.output());

    keda.finish(&burst, two.http, "one of two replicas SIGKILLed").await;
}

#[tokio::test]
async fn keda_dropping_and_reopening_its_stream_a_hundred_times_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let burst = Burst::laid_out("FaultStream").await;
    let ports = AggregatorPorts::new();
    let aggregator = ports.start("aggregator", &dir).await;
    let _a = burst.sidecar("pod-a", ports.report, &[], &dir);
    let _b = burst.sidecar("pod-b", ports.report, &[], &dir);
    announce(ports.grpc, &burst.scaled_object()).await;
    steady(ports.http, &burst.hub, "before the streams").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", ports.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut keda = ExternalScalerClient::new(channel);
    // One round first, so that lazily built state is not counted as a leak.
    let mut stream = keda.stream_is_active(burst.scaled_object()).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().unwrap().result);
    drop(stream);
    let (rss_before, fds_before) = (aggregator.rss_kib(), aggregator.open_fds());
    for round in 0..100 {
        let mut stream = keda.stream_is_active(burst.scaled_object()).await.unwrap().into_inner();
        let first = tokio::time::timeout(DEADLINE, stream.next()).await.unwrap().unwrap().unwrap();
        assert!(first.result, "round {round}: the stream opens with the hub active");
        drop(stream);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_after = aggregator.open_fds();
    assert!(fds_after <= fds_before + 2, "descriptors grew from {fds_before} to {fds_after}");
    aggregator.assert_rss_grew_less_than(rss_before, 8 * 1024);
    assert_eq!(decision(ports.http, &burst.hub).await, Some((true, u64::from(PARTITIONS))));
}

#[tokio::test]
async fn a_stream_open_at_shutdown_ends_with_status_ok() {
    let dir = tempfile::tempdir().unwrap();
    let burst = Burst::laid_out("FaultStreamEnd").await;
    let ports = AggregatorPorts::new();
    let aggregator = ports.start("aggregator", &dir).await;
    let _a = burst.sidecar("pod-a", ports.report, &[], &dir);
    let _b = burst.sidecar("pod-b", ports.report, &[], &dir);
    announce(ports.grpc, &burst.scaled_object()).await;
    steady(ports.http, &burst.hub, "before the stream").await;
    let mut keda = ExternalScalerClient::connect(format!("http://{}", ports.grpc)).await.unwrap();
    let mut stream = keda.stream_is_active(burst.scaled_object()).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().unwrap().result);
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe {
        libc::kill(aggregator.pid() as i32, libc::SIGTERM);
    }
    let end = tokio::time::timeout(DEADLINE, stream.next()).await.expect("the stream ends");
    assert!(end.is_none(), "a clean end (OK status) resets KEDA's back-off, not {end:?}");
}

/// A worker-count source that panics: the sampling loop dies with it.
struct Panicking;

impl durable_scaler::aggregator::sources::WorkerCountSource for Panicking {
    fn worker_count<'a>(
        &'a self,
        _scaled_object: &'a durable_scaler::aggregator::sources::ScaledObjectKey,
    ) -> durable_scaler::aggregator::sources::BoxFuture<'a, Option<u32>> {
        Box::pin(async { panic!("worker count source broke") })
    }
}

#[tokio::test]
async fn a_loop_that_dies_stops_the_aggregator_with_an_error_naming_it() {
    let (shutdown, running) = crate::aggregator_support::start_server_with(
        crate::aggregator_support::args(),
        durable_scaler::aggregator::ReportCheck::AcceptAny,
        Arc::new(Panicking),
    )
    .await
    .unwrap();
    let http = running.http_addr;
    // A hub with a ScaledObject makes the sampling loop ask the source.
    let mut keda = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let so = crate::aggregator_support::scaled_object("DoomedHub", &[]);
    let _ = keda.get_metric_spec(so).await;
    let error = tokio::time::timeout(DEADLINE, running.wait())
        .await
        .expect("the aggregator stops on its own")
        .expect_err("with an error");
    assert!(error.to_string().starts_with("sample loop panicked"), "{error}");
    assert!(shutdown.is_triggered(), "the other servers were told to stop");
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "the HTTP port is closed");
}
