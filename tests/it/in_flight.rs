//! Work in flight, as DurableTask really holds it, against the real binaries: hubs laid out in
//! Azurite, workers that touch the queues as DTFx's dispatchers do
//! (`durable_scaler::emulator::dispatch`: prefetch in batches of 32 up to the buffer
//! threshold, 30 s renewals with a 5-minute visibility timeout, abandon back-off), sidecar
//! and aggregator processes of `env!("CARGO_BIN_EXE_durable-scaler")` with their default
//! windows, and a KEDA stand-in asking IsActive and GetMetrics as KEDA does. One test runs
//! every case at once (they mostly wait), each on its own task hub:
//!
//! - a 7-minute activity renewed every 30 s is never answered inactive or 0, under every
//!   algorithm, and the hub sleeps once it is done;
//! - 240 prefetched control messages worked off one a second while one a second arrives stay
//!   active and sized;
//! - backlogs of 100, 300 and 1,000 visible messages per partition (a full peek) hold one
//!   worker per partition for minutes;
//! - 200 sleeping timers and nothing else go inactive;
//! - a poison work item (abandoned with back-off for ever) keeps the hub awake, even once its
//!   pod is gone.
//!
//! The cases run on two Azurites of their own, not the suite's shared one: the backlogs on
//! one, the rest on the other. Azurite is one Node.js process whose every queue call costs
//! time in proportion to all the messages it holds (measured here: a read of an empty queue
//! takes 6.6 ms in an empty Azurite, 30 ms beside 4,000 messages), so the backlogs' 5,600
//! messages and fifteen sidecars reading every 5 s kept one Azurite near a whole core, and
//! on a busy machine it fell behind until it answered an UpdateMessage after 30 s. A worker
//! whose renewal times out keeps a stale pop receipt and loses its message's lock as DTFx
//! would (the message stays in the queue and runs again: real work, `Held::locks_lost`),
//! which is not what these cases are about: Azure Storage's partitions do not slow down with
//! another queue's depth. A failure names what the workers hold and lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use durable_scaler::azurite::Azurite;
use durable_scaler::contract::env;
use durable_scaler::emulator::dispatch::{AppCode, DispatchSettings, Dispatcher, Stop, Work};
use durable_scaler::emulator::{DequeuedMessage, TaskHubEmulator};
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::storage::{Layout, QueueRef, StorageAccount, TaskHub};

use crate::aggregator_support::http_get;
use crate::common::hub;
use crate::processes::{AggregatorPorts, Process};

const PARTITIONS: u32 = 4;
/// How often KEDA asks, here (KEDA's own default is 30 s; more often only looks closer).
const ASK_EVERY: Duration = Duration::from_secs(2);
/// How long a hub may take to be seen at all (first reports, first probe).
const SEEN_WITHIN: Duration = Duration::from_secs(120);

/// Which of these cases' two Azurites (module docs).
#[derive(Clone, Copy)]
enum Storage {
    /// Every case's but the backlogs'.
    Cases = 0,
    /// The backlogs'.
    Backlogs = 1,
}

/// `which` Azurite, started on first use; it dies with the process.
fn azurite(which: Storage) -> &'static Azurite {
    static STARTED: [OnceLock<Azurite>; 2] = [OnceLock::new(), OnceLock::new()];
    STARTED[which as usize].get_or_init(|| Azurite::start().unwrap_or_else(|e| panic!("{e}")))
}

/// The app's code as the queues see it: a work item `run <ms>` runs that long, `fail` fails
/// after 100 ms (and is abandoned with upstream's back-off, for ever); a control message
/// `episode <ms>` is an episode of that length that sends nothing.
struct Script;

fn millis(text: &str, verb: &str) -> Option<Duration> {
    text.strip_prefix(verb)?.trim().parse().ok().map(Duration::from_millis)
}

impl AppCode for Script {
    fn episode(&self, _partition: u32, message: &DequeuedMessage) -> Work {
        Work {
            runs_for: millis(&message.text, "episode").unwrap_or(Duration::from_millis(100)),
            ..Work::default()
        }
    }

    fn activity(&self, message: &DequeuedMessage) -> Work {
        match millis(&message.text, "run") {
            Some(runs_for) => Work { runs_for, ..Work::default() },
            None => Work { runs_for: Duration::from_millis(100), fails: true, ..Work::default() },
        }
    }
}

/// One task hub of the test: its storage, the ScaledObject KEDA asks about, its pods.
struct Hub {
    hub: TaskHub,
    emulator: TaskHubEmulator,
    connection: String,
    so: ScaledObjectRef,
    sidecars: Vec<Process>,
}

impl Hub {
    /// A hub of 4 partitions in the Partitions table, `owners[p]` owning partition p.
    async fn laid_out(name: &str, owners: [&str; PARTITIONS as usize], metadata: &[(&str, &str)]) -> Self {
        Self::laid_out_in(Storage::Cases, name, owners, metadata).await
    }

    /// [`Hub::laid_out`] in `storage`'s Azurite.
    async fn laid_out_in(
        storage: Storage,
        name: &str,
        owners: [&str; PARTITIONS as usize],
        metadata: &[(&str, &str)],
    ) -> Self {
        let hub = hub(name);
        let connection = azurite(storage).connection_string();
        let account =
            StorageAccount::from_connection_string(&connection).expect("Azurite's connection string");
        let emulator = TaskHubEmulator::new(&account, hub.clone(), Layout::Table);
        emulator.create(PARTITIONS).await.unwrap();
        for (p, owner) in owners.iter().enumerate() {
            // Long claims: lease renewal is not what these cases are about.
            emulator.claim(p as u32, owner, Duration::from_secs(3_600)).await.unwrap();
        }
        let mut scaler_metadata = HashMap::from([
            ("taskHubName".to_string(), hub.name().to_string()),
            ("connectionFromEnv".to_string(), connection.clone()),
        ]);
        for (k, v) in metadata {
            scaler_metadata.insert((*k).to_string(), (*v).to_string());
        }
        let so = ScaledObjectRef { name: name.to_lowercase(), namespace: "apps".into(), scaler_metadata };
        Self { hub, emulator, connection, so, sidecars: Vec::new() }
    }

    /// Starts the sidecar of `pod`, reporting to `report` at the default interval (5 s): a
    /// sidecar judged dead after 3 intervals of silence is what these cases must not hinge on.
    fn sidecar(&mut self, pod: &str, report: SocketAddr, dir: &tempfile::TempDir) {
        let args: Vec<String> = ["sidecar", "--http-addr", "127.0.0.1:0", "--token-file"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.path().join("no-token").display().to_string()])
            .collect();
        let envs = vec![
            (env::TASK_HUB, self.hub.name().to_string()),
            (env::CONNECTION, self.connection.clone()),
            (env::AGGREGATOR, format!("http://{report}")),
            (env::POD_NAME, pod.to_string()),
            (env::POD_NAMESPACE, "apps".to_string()),
            (env::APP_CPUS, "1".to_string()),
        ];
        self.sidecars.push(Process::spawn(&format!("{}-{pod}", self.hub.name()), &args, &envs, dir));
    }

    /// A worker running [`Script`] as DTFx does, owning every partition.
    fn worker(&self, settings: DispatchSettings) -> Dispatcher {
        let worker = Dispatcher::start(self.emulator.clone(), settings, Arc::new(Script));
        worker.own(&(0..PARTITIONS).collect::<Vec<_>>());
        worker
    }

    /// Enqueues `count` messages, a few at a time (Azurite is shared by every case).
    async fn enqueue(&self, queue: QueueRef, text: &str, count: usize, delay: Duration) {
        use futures::StreamExt;
        let sent: Vec<_> = futures::stream::iter(0..count)
            .map(|_| self.emulator.enqueue(queue, text, delay))
            .buffer_unordered(4)
            .collect()
            .await;
        for result in sent {
            result.unwrap();
        }
    }
}

/// KEDA's questions for one ScaledObject: IsActive, then GetMetrics.
struct Keda {
    client: ExternalScalerClient<tonic::transport::Channel>,
    so: ScaledObjectRef,
    metric: String,
}

impl Keda {
    async fn new(grpc: SocketAddr, hub: &Hub) -> Self {
        let client = ExternalScalerClient::connect(format!("http://{grpc}")).await.unwrap();
        let metric = format!("durabletask-{}", hub.hub.name().to_lowercase());
        let mut keda = Self { client, so: hub.so.clone(), metric };
        keda.client.get_metric_spec(keda.so.clone()).await.unwrap();
        keda
    }

    /// (IsActive, GetMetrics' value), or the status KEDA got.
    async fn ask(&mut self) -> Result<(bool, f64), String> {
        let active = self.client.is_active(self.so.clone()).await.map_err(|s| format!("{:?}", s.code()))?;
        let request =
            GetMetricsRequest { scaled_object_ref: Some(self.so.clone()), metric_name: self.metric.clone() };
        let value = self.client.get_metrics(request).await.map_err(|s| format!("{:?}", s.code()))?;
        Ok((active.into_inner().result, value.into_inner().metric_values[0].metric_value_float))
    }

    /// Asks until the hub is answered at all (the first reports or probe are in).
    async fn first_answer(&mut self) -> (bool, f64) {
        let deadline = Instant::now() + SEEN_WITHIN;
        loop {
            match self.ask().await {
                Ok(answer) => return answer,
                Err(e) => assert!(Instant::now() < deadline, "{}: never answered: {e}", self.so.name),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Asks every [`ASK_EVERY`] while `go_on`; every answer must pass `ok` (one given as
    /// `go_on` turned false, the work just finished, does not count). Returns how many answers
    /// there were, or the first that did not pass.
    async fn every_answer(
        &mut self,
        what: &str,
        mut go_on: impl AsyncFnMut() -> bool,
        ok: impl Fn(bool, f64) -> bool,
    ) -> Result<usize, String> {
        let started = Instant::now();
        let mut answers = 0;
        while go_on().await {
            match self.ask().await {
                Ok((active, value)) if ok(active, value) => answers += 1,
                Ok(_) if !go_on().await => break,
                Ok((active, value)) => {
                    return Err(format!(
                        "{what}: at {:.0} s KEDA was told active={active} metric={value}",
                        started.elapsed().as_secs_f64()
                    ));
                }
                // UNAVAILABLE leaves the replicas as they are (KEDA's "no change"): allowed.
                Err(_) => {}
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
        Ok(answers)
    }

    /// Asks until an answer passes `done`, within `limit`.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        done: impl Fn(bool, f64) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok((active, value)) = self.ask().await {
                if done(active, value) {
                    return Ok(());
                }
                last = Some((active, value));
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
        Err(format!("{what}: not within {} s; last answer {last:?}", limit.as_secs()))
    }
}

/// The `/metrics` value of `series` for `hub`.
async fn gauge(http: SocketAddr, series: &str, hub: &Hub) -> f64 {
    let (_, text) = http_get(http, "/metrics").await;
    let label = format!("task_hub=\"{}\"", hub.hub.name().to_lowercase());
    text.lines()
        .find(|l| l.starts_with(series) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A 7-minute activity, renewed every 30 s with a 5-minute visibility timeout, under
/// `algorithm`: never inactive or 0 while it runs, asleep soon after.
async fn long_activity(
    ports: &AggregatorPorts,
    dir: &tempfile::TempDir,
    algorithm: &str,
) -> Result<String, String> {
    let mut hub = Hub::laid_out(
        &format!("LongRun{}", algorithm.replace('-', "")),
        ["pod-0"; 4],
        &[("scaleAlgorithm", algorithm)],
    )
    .await;
    hub.sidecar("pod-0", ports.report, dir);
    let mut keda = Keda::new(ports.grpc, &hub).await;
    keda.first_answer().await;
    hub.enqueue(QueueRef::WorkItem, "run 420000", 1, Duration::ZERO).await;
    let worker = hub.worker(DispatchSettings { activity_slots: 1, ..DispatchSettings::default() });
    let taken = Instant::now() + SEEN_WITHIN;
    while worker.held().activities == 0 {
        assert!(Instant::now() < taken, "{algorithm}: the activity was never taken");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The sidecar reads every 2 s: the aggregator hears of the activity at its next report.
    keda.until(&format!("{algorithm}: the running activity seen"), SEEN_WITHIN, |active, value| {
        active && value >= 1.0
    })
    .await?;
    let running = async || worker.held().activities > 0;
    let answers = keda
        .every_answer(&format!("{algorithm}, a 7-minute activity running"), running, |active, value| {
            active && value >= 1.0
        })
        .await?;
    if answers < 100 {
        return Err(format!("{algorithm}: only {answers} answers over the activity's 7 minutes"));
    }
    keda.until(
        &format!("{algorithm}: asleep once it is done (worker {:?})", worker.held()),
        Duration::from_secs(90),
        |active, value| !active && value == 0.0,
    )
    .await?;
    worker.stop(Stop::Graceful).await;
    Ok(format!("{algorithm}: {answers} answers active and >= 1 over 7 min"))
}

/// 240 messages prefetched by a pod that finishes one a second while one a second arrives.
async fn prefetched_backlog(ports: &AggregatorPorts, dir: &tempfile::TempDir) -> Result<String, String> {
    let mut hub = Hub::laid_out("InFlightPrefetch", ["pod-0"; 4], &[]).await;
    hub.enqueue(QueueRef::Control(0), "episode 1000", 240, Duration::ZERO).await;
    hub.sidecar("pod-0", ports.report, dir);
    let mut keda = Keda::new(ports.grpc, &hub).await;
    keda.first_answer().await;
    let worker = hub.worker(DispatchSettings { orchestration_slots: 1, ..DispatchSettings::default() });
    let arrivals = {
        let emulator = hub.emulator.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = emulator.enqueue(QueueRef::Control(0), "episode 1000", Duration::ZERO).await;
            }
        })
    };
    let prefetched = Instant::now() + SEEN_WITHIN;
    while worker.held().buffered < 200 {
        assert!(Instant::now() < prefetched, "never prefetched: {:?}", worker.held());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // From the moment the aggregator reads them as held by a live worker (its sidecar may
    // still be starting when the worker has prefetched).
    let seen = Instant::now() + SEEN_WITHIN;
    while gauge(ports.http, "durable_scaler_aggregator_held_messages", &hub).await < 200.0 {
        if Instant::now() > seen {
            return Err(format!("prefetched: never read as held ({:?})", worker.held()));
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
    let until = Instant::now() + Duration::from_secs(180);
    let answers = keda
        .every_answer(
            "240 prefetched, worked off as they arrive",
            async || Instant::now() < until,
            |active, value| active && value >= 1.0,
        )
        .await;
    let held = gauge(ports.http, "durable_scaler_aggregator_held_messages", &hub).await;
    let buffered = worker.held();
    arrivals.abort();
    worker.stop(Stop::Kill).await;
    let answers = answers.map_err(|e| format!("{e} (worker {buffered:?})"))?;
    if held < 200.0 {
        return Err(format!("prefetched: the aggregator takes only {held} messages for held ({buffered:?})"));
    }
    Ok(format!("prefetched: {answers} answers active over 3 min, {held} held, worker {buffered:?}"))
}

/// A hub with `per_partition` visible messages on each partition, nobody taking them.
async fn backlog(per_partition: usize, owners: [&str; 4]) -> (Hub, usize, [&str; 4]) {
    let hub = Hub::laid_out_in(
        Storage::Backlogs,
        &format!("Deep{per_partition}"),
        owners,
        &[("maxOrchestrationsPerWorker", "100")],
    )
    .await;
    for p in 0..PARTITIONS {
        hub.enqueue(QueueRef::Control(p), "episode 100", per_partition, Duration::ZERO).await;
    }
    (hub, per_partition, owners)
}

/// `per_partition` visible messages on each partition, nobody taking them: one worker per
/// partition (100 orchestrations a worker allowed) after a minute and for minutes.
async fn deep_backlog(
    ports: &AggregatorPorts,
    dir: &tempfile::TempDir,
    backlog: (Hub, usize, [&str; 4]),
) -> Result<String, String> {
    let (mut hub, per_partition, owners) = backlog;
    let mut pods: Vec<&str> = owners.to_vec();
    pods.dedup();
    for pod in pods {
        hub.sidecar(pod, ports.report, dir);
    }
    let mut keda = Keda::new(ports.grpc, &hub).await;
    keda.first_answer().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let until = Instant::now() + Duration::from_secs(90);
    let answers = keda
        .every_answer(
            &format!("{per_partition} a partition, after a minute"),
            async || Instant::now() < until,
            |active, value| active && value == 4.0,
        )
        .await?;
    Ok(format!("{per_partition} a partition: {answers} answers of 4 workers over 90 s"))
}

/// 200 durable timers due in an hour and nothing else: inactive, and stays so.
async fn sleeping_timers(ports: &AggregatorPorts, dir: &tempfile::TempDir) -> Result<String, String> {
    let mut hub = Hub::laid_out("InFlightTimers", ["pod-0"; 4], &[]).await;
    hub.sidecar("pod-0", ports.report, dir);
    let worker = hub.worker(DispatchSettings::default());
    let mut keda = Keda::new(ports.grpc, &hub).await;
    keda.first_answer().await;
    for p in 0..PARTITIONS {
        hub.enqueue(QueueRef::Control(p), "episode 100", 50, Duration::from_secs(3_600)).await;
    }
    // Inactive once the aggregator has read them and taken them for timers (until it has read
    // them, KEDA is still told what the empty hub was: idle; then, for the settle window,
    // messages that appeared invisible may be work a worker took at once). And only once the
    // decision counts the hub's worker: with no Kubernetes the worker count is the live
    // reporting pods, and until the sidecar's first report is in (Azurite may take a while
    // under the backlogs) it is 0, when every invisible message is a timer (rule 2's last
    // point); the pod's arrival then makes the fresh ones possible work for the settle window.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let timers = gauge(ports.http, "durable_scaler_aggregator_timer_messages", &hub).await;
        let workers = gauge(ports.http, "durable_scaler_aggregator_workers{", &hub).await;
        let answer = keda.ask().await;
        if timers == 200.0 && workers >= 1.0 && answer == Ok((false, 0.0)) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "200 sleeping timers: not inactive within 120 s: {timers} taken for timers with {workers} \
                 worker(s), last answer {answer:?}"
            ));
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
    let until = Instant::now() + Duration::from_secs(30);
    let answers = keda
        .every_answer(
            "200 sleeping timers, later",
            async || Instant::now() < until,
            |active, value| !active && value == 0.0,
        )
        .await?;
    let timers = gauge(ports.http, "durable_scaler_aggregator_timer_messages", &hub).await;
    worker.stop(Stop::Graceful).await;
    if timers != 200.0 {
        return Err(format!("timers: {timers} taken for timers, not 200"));
    }
    Ok(format!("timers: inactive, {answers} answers, 200 taken for timers"))
}

/// A work item that fails every time: abandoned with back-off for ever, it keeps the hub
/// awake, and its reappearances keep waking it once its pod is gone.
async fn poison(ports: &AggregatorPorts, dir: &tempfile::TempDir) -> Result<String, String> {
    let mut hub = Hub::laid_out("InFlightPoison", ["pod-0"; 4], &[]).await;
    hub.sidecar("pod-0", ports.report, dir);
    let mut keda = Keda::new(ports.grpc, &hub).await;
    keda.first_answer().await;
    hub.enqueue(QueueRef::WorkItem, "fail", 1, Duration::ZERO).await;
    let worker = hub.worker(DispatchSettings { activity_slots: 1, ..DispatchSettings::default() });
    keda.until("the poison work item seen", SEEN_WITHIN, |active, value| active && value >= 1.0).await?;
    let until = Instant::now() + Duration::from_secs(120);
    let with_pod = keda
        .every_answer(
            "a poison work item, its pod running",
            async || Instant::now() < until,
            |active, value| active && value >= 1.0,
        )
        .await?;
    worker.stop(Stop::Kill).await;
    for sidecar in &mut hub.sidecars {
        sidecar.sigkill();
    }
    let until = Instant::now() + Duration::from_secs(60);
    let without = keda
        .every_answer("a poison work item, no pod left", async || Instant::now() < until, |active, _| active)
        .await?;
    Ok(format!("poison: {with_pod} answers active with its pod, {without} without"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_in_flight_is_never_scaled_away_and_sleeping_timers_still_sleep() {
    let dir = tempfile::tempdir().unwrap();
    let ports = AggregatorPorts::new();
    // The product's own windows: work grace 5 min, sampled every second.
    let aggregator = ports
        .start_with(
            "aggregator",
            &dir,
            &[("--work-grace", "300s"), ("--sample-interval", "1s"), ("--probe-interval", "2s")],
        )
        .await;
    // The backlogs' 5,600 messages go in, on their own Azurite (module docs), before the
    // other cases start: on a 2-core machine, writing them takes most of both.
    let b100 = backlog(100, ["pod-0"; 4]).await;
    let b300 = backlog(300, ["pod-0", "pod-1", "pod-2", "pod-3"]).await;
    let b1000 = backlog(1_000, ["pod-0"; 4]).await;
    let results = tokio::join!(
        long_activity(&ports, &dir, "durable"),
        long_activity(&ports, &dir, "target"),
        long_activity(&ports, &dir, "target-inflight"),
        long_activity(&ports, &dir, "latency"),
        prefetched_backlog(&ports, &dir),
        deep_backlog(&ports, &dir, b100),
        deep_backlog(&ports, &dir, b300),
        deep_backlog(&ports, &dir, b1000),
        sleeping_timers(&ports, &dir),
        poison(&ports, &dir),
    );
    let results = [
        results.0, results.1, results.2, results.3, results.4, results.5, results.6, results.7, results.8,
        results.9,
    ];
    for r in &results {
        eprintln!("{r:?}");
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{failures:#?}\naggregator log:\n{}", aggregator.output());
}
