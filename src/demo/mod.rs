//! `durable-scaler demo`: the whole real path on one machine.
//!
//! Azurite stands in for the storage account; the real aggregator and real sidecars run as
//! child processes of this binary and talk gRPC over loopback; [`keda`] plays KEDA and the
//! HPA against the aggregator's real `externalscaler` endpoint; [`worker`] pods stand in for
//! the Functions host (they take partition leases in the Partitions table as DurableTask
//! does, process control messages and fan out activities through the work-item queue), each
//! with a sidecar beside it. The run drives a burst of orchestrations, a quiet period with
//! sleeping durable timers, and a second burst, prints live progress, and ends with an SVG
//! chart and a summary.

pub(crate) mod keda;
pub(crate) mod processes;
pub(crate) mod scrape;
pub(crate) mod timeline;
pub(crate) mod worker;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    azurite::Azurite,
    clock::UnixMs,
    contract::{MAX_PARTITIONS, env},
    heuristic::hpa::ReplicaBounds,
    shutdown::Shutdown,
    storage::{PartitionMode, QueueRef, StorageAccount, StorageOptions, TaskHub, TaskHubReader},
};
use keda::{KedaPlayer, KedaSettings};
use processes::{ChildProcess, free_port, log_path};
use timeline::{Burst, Sample, Summary};
use worker::{OrchestrationBook, WorkerPod, WorkerSettings};

/// Settings of `durable-scaler demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// How long the run lasts; bursts and quiet period scale with it.
    #[arg(long, env = "DURABLE_SCALER_DEMO_DURATION", default_value = "120s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Partitions (control queues) of the demo task hub, 1..16.
    #[arg(long, env = "DURABLE_SCALER_DEMO_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PARTITIONS)))]
    pub partitions: u32,
    /// Orchestrations started by each burst.
    #[arg(long, default_value_t = 24)]
    pub orchestrations: u32,
    /// Activities each orchestration fans out.
    #[arg(long, default_value_t = 6)]
    pub activities: u32,
    /// How long one activity works.
    #[arg(long, default_value = "400ms", value_parser = crate::config::parse_duration)]
    pub activity_duration: Duration,
    /// The trigger's maxReplicaCount.
    #[arg(long, default_value_t = 6)]
    pub max_workers: u32,
    /// The trigger's `scaleAlgorithm`; unset keeps the aggregator's default (durable).
    #[arg(long, value_enum)]
    pub algorithm: Option<crate::heuristic::Algorithm>,
    /// Where the chart, the summary and the child processes' logs go.
    #[arg(long, env = "DURABLE_SCALER_DEMO_OUT", default_value = "target/demo")]
    pub out_dir: PathBuf,
    /// Print the summary as JSON on stdout at the end (for scripts and tests).
    #[arg(long)]
    pub json: bool,
}

/// Runs `durable-scaler demo` from the command line (the caller provides the runtime):
/// progress on stdout, logs on stderr.
pub(crate) async fn run_cli(args: Args) -> std::process::ExitCode {
    let json = args.json;
    match run(args).await {
        Ok(summary) => {
            if json {
                println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("durable-scaler demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The demo's KEDA/HPA and pod timings, scaled down from the real defaults so the run fits in
/// minutes (KEDA polls every 30 s and cools down for 300 s in a real cluster).
const POLLING_INTERVAL: Duration = Duration::from_secs(2);
const COOLDOWN: Duration = Duration::from_secs(10);
const STABILIZATION: Duration = Duration::from_secs(6);
const SIDECAR_INTERVAL: &str = "1s";
const WORK_GRACE: &str = "10s";
const NAMESPACE: &str = "demo";
const SCALED_OBJECT: &str = "durable-demo";

/// Runs the demo and returns its summary.
pub(crate) async fn run(args: Args) -> anyhow::Result<Summary> {
    let shutdown = Shutdown::on_signal();
    std::fs::create_dir_all(&args.out_dir)?;
    let logs = args.out_dir.join("logs");

    println!(
        "durable-scaler demo: {} s, {} partitions, bursts of {} orchestrations x {} activities",
        args.duration.as_secs(),
        args.partitions,
        args.orchestrations,
        args.activities
    );
    let azurite = match std::env::var("AZURITE_CONNECTION_STRING") {
        Ok(cs) => Azurite::from_connection_string(&cs)?,
        Err(_) => {
            println!("starting Azurite on loopback (from node_modules)...");
            tokio::task::spawn_blocking(Azurite::start).await??
        }
    };
    let connection = azurite.connection_string();
    let account = StorageAccount::from_connection_string(&connection)?;
    let hub = TaskHub::parse(&format!("DemoHub{}", std::process::id()))?;
    let emulator =
        crate::emulator::TaskHubEmulator::new(&account, hub.clone(), crate::storage::Layout::Table);
    emulator.create(args.partitions).await?;
    let reader = TaskHubReader::new(&account, hub.clone(), PartitionMode::Table, StorageOptions::default());
    println!(
        "task hub {} laid out in Azurite: {} control queues, work-item queue, Partitions table",
        hub.name(),
        args.partitions
    );

    let (grpc, report, http) = (free_port()?, free_port()?, free_port()?);
    let aggregator_args: Vec<String> = [
        "aggregator",
        "--grpc-addr",
        &format!("127.0.0.1:{grpc}"),
        "--report-addr",
        &format!("127.0.0.1:{report}"),
        "--http-addr",
        &format!("127.0.0.1:{http}"),
        "--report-auth",
        "none",
        // Invisible messages count as work for this long after their queue last moved
        // (5 minutes by default, DTFx's visibility timeout); shortened like every other timing.
        "--work-grace",
        WORK_GRACE,
        // Azurite serves plain http (the default install probes https endpoints only).
        "--allow-http-storage",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut aggregator =
        ChildProcess::spawn("aggregator", &aggregator_args, &[], &log_path(&logs, "aggregator")?)?;
    wait_for_port(grpc, &mut aggregator, &logs, Duration::from_secs(30)).await?;
    println!("aggregator up: KEDA gRPC 127.0.0.1:{grpc}, reports 127.0.0.1:{report}, http 127.0.0.1:{http}");
    let scrape_targets = scrape::ScrapeTargets::new(&args.out_dir, http, NAMESPACE, hub.name())?;

    let mut metadata = HashMap::from([
        ("scalerAddress".to_string(), format!("127.0.0.1:{grpc}")),
        ("taskHubName".to_string(), hub.name().to_string()),
        // KEDA sends connectionFromEnv's value resolved from the target's env.
        ("connectionFromEnv".to_string(), connection.clone()),
        ("maxActivitiesPerWorker".to_string(), "4".to_string()),
        // The demo's pods take work 2 s after they start (WorkerSettings::startup_delay).
        ("workerStartupMs".to_string(), "2000".to_string()),
    ]);
    if let Some(algorithm) = args.algorithm {
        metadata.insert("scaleAlgorithm".into(), algorithm.to_string());
    }
    let settings = KedaSettings {
        cooldown: COOLDOWN,
        stabilization: STABILIZATION,
        bounds: ReplicaBounds { min: 0, max: args.max_workers },
        push: true,
    };
    let mut keda = KedaPlayer::connect(
        &format!("http://127.0.0.1:{grpc}"),
        SCALED_OBJECT,
        NAMESPACE,
        metadata,
        settings,
        shutdown.clone(),
    )
    .await?;
    println!(
        "playing KEDA (external-push, polling {}s, cooldown {}s) and the HPA (scale-down stabilization {}s) \
         against it; shortened from the real 30s, 300s and 300s so the run fits in minutes\n",
        POLLING_INTERVAL.as_secs(),
        COOLDOWN.as_secs(),
        STABILIZATION.as_secs()
    );

    let worker_settings = WorkerSettings {
        activity_duration: args.activity_duration,
        max_activities: 4,
        startup_delay: Duration::from_secs(2),
        lease: Duration::from_secs(10),
        rebalance_every: Duration::from_secs(1),
        idle_pause: Duration::from_millis(250),
        visibility_timeout: Duration::from_secs(30),
    };
    let book = Arc::new(OrchestrationBook::default());
    let pods = PodFleet {
        pods: Vec::new(),
        metrics_ports: Vec::new(),
        scrape_targets,
        next_id: 1,
        emulator: emulator.clone(),
        reader: reader.clone(),
        book: book.clone(),
        settings: worker_settings,
        connection: connection.clone(),
        hub: hub.name().to_string(),
        report_endpoint: format!("http://127.0.0.1:{report}"),
        logs: logs.clone(),
    };

    let duration = args.duration.as_secs_f64();
    let bursts = vec![
        Burst { at_s: (duration * 0.05).max(3.0), orchestrations: args.orchestrations },
        Burst { at_s: duration * 0.5, orchestrations: args.orchestrations },
    ];
    let decisions = AggregatorDecisions {
        client: reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?,
        url: format!("http://127.0.0.1:{http}/hubs"),
        task_hub: hub.name().to_string(),
    };
    let outcome =
        drive(&args, &shutdown, &mut keda, pods, &emulator, &reader, &book, &bursts, &decisions).await;
    aggregator.terminate(Duration::from_secs(5)).await;
    drop(azurite);
    let samples = outcome?;
    let summary = timeline::summarize(&samples, &bursts);
    std::fs::write(args.out_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    let description = format!(
        "Azurite, real aggregator and sidecars; {} partitions; two bursts of {} orchestrations x {} activities, timers between",
        args.partitions, args.orchestrations, args.activities
    );
    let chart = args.out_dir.join("demo.svg");
    std::fs::write(&chart, timeline::chart(&samples, &summary, &description))?;
    println!("\n{}", summary.paragraph());
    println!(
        "chart: {}; summary: {}; logs of every process: {}",
        chart.display(),
        args.out_dir.join("summary.json").display(),
        logs.display()
    );
    Ok(summary)
}

/// The worker pods and how to start one.
struct PodFleet {
    pods: Vec<WorkerPod>,
    /// Each pod's sidecar's name and metrics port, in the order of `pods`.
    metrics_ports: Vec<(String, u16)>,
    /// Where a Prometheus finds the sidecars (rewritten on every change).
    scrape_targets: scrape::ScrapeTargets,
    next_id: u32,
    emulator: crate::emulator::TaskHubEmulator,
    reader: TaskHubReader,
    book: Arc<OrchestrationBook>,
    settings: WorkerSettings,
    connection: String,
    hub: String,
    report_endpoint: String,
    logs: PathBuf,
}

impl PodFleet {
    /// Starts or stops pods (newest first) until `replicas` run.
    async fn scale_to(&mut self, replicas: u32) -> anyhow::Result<()> {
        while self.pods.len() < replicas as usize {
            let name = format!("demo-worker-{}", self.next_id);
            self.next_id += 1;
            let metrics_port = free_port()?;
            let sidecar_args: Vec<String> = ["sidecar", "--interval", SIDECAR_INTERVAL, "--http-addr"]
                .iter()
                .map(|s| s.to_string())
                .chain([
                    format!("127.0.0.1:{metrics_port}"),
                    "--token-file".into(),
                    "/nonexistent/token".into(),
                ])
                .collect();
            let env = [
                (env::TASK_HUB, self.hub.clone()),
                (env::CONNECTION, self.connection.clone()),
                (env::AGGREGATOR, self.report_endpoint.clone()),
                (env::POD_NAME, name.clone()),
                (env::POD_NAMESPACE, NAMESPACE.to_string()),
            ];
            let sidecar = ChildProcess::spawn(
                &format!("{name}-sidecar"),
                &sidecar_args,
                &env,
                &log_path(&self.logs, &name)?,
            )?;
            self.metrics_ports.push((name.clone(), metrics_port));
            self.pods.push(WorkerPod::start(
                name,
                self.emulator.clone(),
                self.reader.clone(),
                self.book.clone(),
                self.settings,
                sidecar,
            ));
        }
        let mut stopping = Vec::new();
        while self.pods.len() > replicas as usize {
            if let Some(pod) = self.pods.pop() {
                stopping.push(pod.stop());
            }
        }
        self.metrics_ports.truncate(self.pods.len());
        self.scrape_targets.sidecars(&self.metrics_ports)?;
        futures::future::join_all(stopping).await;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &Args,
    shutdown: &Shutdown,
    keda: &mut KedaPlayer,
    mut pods: PodFleet,
    emulator: &crate::emulator::TaskHubEmulator,
    reader: &TaskHubReader,
    book: &OrchestrationBook,
    bursts: &[Burst],
    decisions: &AggregatorDecisions,
) -> anyhow::Result<Vec<Sample>> {
    let start = Instant::now();
    let mut last_reason = None;
    let mut samples = Vec::new();
    let mut next_burst = 0;
    let mut next_poll = Duration::ZERO;
    let mut next_id = 0u64;
    let mut last = (false, 0.0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < args.duration && shutdown.tick(&mut tick).await {
        let elapsed = start.elapsed();
        // The played KEDA's clock: the demo's own, starting at 0.
        let now = UnixMs(0).plus(elapsed);
        if let Some(burst) = bursts.get(next_burst).filter(|b| elapsed.as_secs_f64() >= b.at_s) {
            for _ in 0..burst.orchestrations {
                let message = worker::ControlMessage::Start { id: next_id, activities: args.activities };
                let partition = (next_id % u64::from(args.partitions)) as u32;
                emulator
                    .enqueue(QueueRef::Control(partition), &serde_json::to_string(&message)?, Duration::ZERO)
                    .await?;
                book.submitted();
                next_id += 1;
            }
            if next_burst == 0 {
                // Orchestrations that then sleep on durable timers due in an hour: invisible
                // messages that must not keep the app awake.
                for partition in 0..args.partitions {
                    let timer = worker::ControlMessage::Timer { id: u64::MAX - u64::from(partition) };
                    emulator
                        .enqueue(
                            QueueRef::Control(partition),
                            &serde_json::to_string(&timer)?,
                            Duration::from_secs(3600),
                        )
                        .await?;
                }
            }
            println!(
                "[{:>4.0}s] burst {}: {} orchestrations started{}",
                elapsed.as_secs_f64(),
                next_burst + 1,
                burst.orchestrations,
                if next_burst == 0 {
                    format!(", plus {} durable timers due in an hour", args.partitions)
                } else {
                    String::new()
                }
            );
            next_burst += 1;
        }
        if keda.take_push() && pods.pods.is_empty() {
            let replicas = keda.on_push(now, 0);
            println!(
                "[{:>4.0}s] StreamIsActive pushed true: KEDA scales 0 -> {replicas} at once",
                elapsed.as_secs_f64()
            );
            pods.scale_to(replicas).await?;
        }
        if elapsed >= next_poll {
            next_poll = elapsed + POLLING_INTERVAL;
            match keda.poll(now, pods.pods.len() as u32).await {
                Ok(poll) => {
                    last = (poll.active, poll.metric);
                    if poll.replicas as usize != pods.pods.len() {
                        println!(
                            "[{:>4.0}s] KEDA/HPA: {} -> {} workers (metric {:.1}, active {})",
                            elapsed.as_secs_f64(),
                            pods.pods.len(),
                            poll.replicas,
                            poll.metric,
                            poll.active
                        );
                        pods.scale_to(poll.replicas).await?;
                    }
                }
                Err(e) => println!(
                    "[{:>4.0}s] KEDA poll failed, keeping {} workers: {e}",
                    elapsed.as_secs_f64(),
                    pods.pods.len()
                ),
            }
        }
        if let Some((desired, reason)) = decisions.latest().await
            && last_reason.as_ref() != Some(&reason)
        {
            println!("[{:>4.0}s] aggregator decided {desired} workers: {reason}", elapsed.as_secs_f64());
            last_reason = Some(reason);
        }
        let sample =
            observe(reader, args.partitions, elapsed.as_secs_f64(), book, last, pods.pods.len() as u32).await;
        println!(
            "[{:>4.0}s] control {:>3} (visible {:>3})  work-items {:>4}  orchestrations running {:>3}  active {:<5}  desired {:>4.1}  workers {}",
            sample.t_s,
            sample.control_messages,
            sample.control_visible,
            sample.work_items,
            sample.orchestrations_running,
            sample.active,
            sample.desired,
            sample.workers
        );
        samples.push(sample);
    }
    pods.scale_to(0).await?;
    Ok(samples)
}

/// The aggregator's latest decision for the demo hub, read from its `/hubs` endpoint.
struct AggregatorDecisions {
    client: reqwest::Client,
    url: String,
    task_hub: String,
}

impl AggregatorDecisions {
    /// (desired workers, reason) of the latest decision, when the aggregator has made one.
    async fn latest(&self) -> Option<(u64, String)> {
        let body = self.client.get(&self.url).send().await.ok()?.text().await.ok()?;
        let hubs: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
        let hub = hubs.iter().find(|h| h["task_hub"] == self.task_hub.as_str())?;
        Some((hub["desired_workers"].as_u64()?, hub["reason"].as_str()?.to_string()))
    }
}

async fn observe(
    reader: &TaskHubReader,
    partitions: u32,
    t_s: f64,
    book: &OrchestrationBook,
    last: (bool, f64),
    workers: u32,
) -> Sample {
    let now = UnixMs::now();
    let mut sample = Sample {
        t_s,
        control_messages: 0,
        control_visible: 0,
        work_items: 0,
        orchestrations_running: book.running(),
        active: last.0,
        desired: last.1,
        workers,
    };
    for partition in 0..partitions {
        if let Ok(s) = reader.read_queue(QueueRef::Control(partition), now).await {
            sample.control_messages += s.approximate_count;
            sample.control_visible += u64::from(s.visible_count);
        }
    }
    if let Ok(s) = reader.read_queue(QueueRef::WorkItem, now).await {
        sample.work_items = s.approximate_count;
    }
    sample
}

async fn wait_for_port(
    port: u16,
    child: &mut ChildProcess,
    logs: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if !child.is_running() {
            anyhow::bail!(
                "the {} exited at start; see {}",
                child.name(),
                logs.join(format!("{}.log", child.name())).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("nothing listened on 127.0.0.1:{port} within {timeout:?}")
}
