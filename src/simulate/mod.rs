//! `durable-scaler simulate`: race the scaling algorithms side by side on the same workload
//! and see, before deploying, how each behaves.
//!
//! A fixed-tick simulation (100 ms by default), deterministic for a seed:
//! - [`model`]: the app: queues, orchestrations, pods and partition leases, doing what a
//!   live DTFx worker does to the queues, and what a scale-in costs;
//! - [`source`]: what scalers can read of the app (the seam between the two);
//! - [`autoscale`]: KEDA and the HPA, with the arithmetic of [`crate::heuristic::hpa`];
//! - [`scalers`]: the peer scalers, and ours, which runs the aggregator's engine
//!   ([`crate::heuristic::engine`]) from the app's queue readings to the metric;
//! - [`scenario`]: the built-in workloads and user traces;
//! - [`metrics`], [`output`], [`svg`]: what a run measured, the table/JSON, the charts.
//!
//! Every assumption and default, and where it comes from, is in docs/simulator.md.

pub mod autoscale;
pub mod metrics;
pub mod model;
pub mod output;
pub mod scalers;
pub mod scenario;
pub mod source;
pub mod svg;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::heuristic::durable::DurableSettings;
use crate::heuristic::engine::DEFAULT_WORK_GRACE_MS;
use crate::heuristic::hpa::ReplicaBounds;
use autoscale::{Autoscaler, KedaConfig};
use metrics::{Recorder, RunResult};
use model::{App, AppConfig};
use scalers::{ScalerConfig, ScalerKind};
use scenario::Scenario;

/// What can go wrong before or after a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range.
    #[error("{flag} (env {env}): {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
        /// Why the value is refused.
        reason: String,
    },
    /// A trace file could not be read.
    #[error("reading trace {path}: {source}")]
    ReadTrace {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A trace file's content is malformed.
    #[error("trace {path}: {reason}")]
    BadTrace {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the row or line.
        reason: String,
    },
    /// An output file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Race the scalers on simulated Durable Functions workloads.
///
/// Runs every chosen scenario against every chosen scaler on the same seeded workload and
/// prints, per scenario and scaler: orchestration latency p50/p95/p99, backlog drain time,
/// pod-seconds, peak pods, scale changes, time from the first message to the first ready
/// worker when at zero, time at zero, and what scale-ins cost (work items interrupted, work
/// lost). `*` marks the lowest pod-seconds among scalers within 10 % of the best p95, `w` the
/// fastest wake from zero. Writes one SVG chart per scenario (pods per scaler, backlog
/// beneath). The model and every default, with its source, are described in
/// docs/simulator.md.
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Built-in scenarios to run, comma-separated. Default: all of them (unless --trace is
    /// given).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SCENARIOS", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(scenario::BUILTIN))]
    pub scenarios: Vec<String>,
    /// A trace of arrivals to run as a scenario: CSV with a header (at_s required; count,
    /// activities, activity_s, timer_s, poison optional) or a JSON array of such rows (.json).
    /// Each row starts `count` orchestrations at `at_s` that fan out `activities` activities of
    /// `activity_s` seconds, then, if timer_s > 0, sleep that long and run one more, and, if
    /// poison is 1, end with an activity that fails every time.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_TRACE")]
    pub trace: Option<PathBuf>,
    /// Scalers to race, comma-separated: kedacore, wsugarman, functions-target,
    /// keda-azure-queue, durable-scaler (ours; durable-scaler:latency, durable-scaler:target
    /// and durable-scaler:target-inflight run our scaler with the other algorithms). Default:
    /// the first five.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SCALERS", value_delimiter = ',')]
    pub scalers: Vec<ScalerKind>,
    /// Seed for arrivals, activity durations, the ReplicaSet's choice among equal pods, DTFx's
    /// back-off jitter and the latency vote's random scale-in; one seed, one result.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Override every scenario's simulated duration (seconds, at most a week).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_DURATION_S",
          value_parser = clap::value_parser!(u64).range(1..=scenario::MAX_DURATION_MS / 1_000))]
    pub duration_s: Option<u64>,
    /// Simulation tick (ms): smaller is finer and slower.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_TICK_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub tick_ms: u64,

    /// Partition count P (control queues), 1..16.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_PARTITIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub partitions: u32,
    /// Seconds from pod creation until it takes work (image pull, host start).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_STARTUP_S", default_value = "20")]
    pub startup_s: Seconds,
    /// maxConcurrentActivityFunctions per pod, also the scalers' maxActivitiesPerWorker.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_ACTIVITIES", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PER_POD)))]
    pub max_activities: u32,
    /// maxConcurrentOrchestratorFunctions per pod, also maxOrchestrationsPerWorker. The
    /// defaults, 10 and 10, are a 1-CPU pod's: the extension's 10 x ProcessorCount outside
    /// the Consumption plan (docs/simulator.md).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_ORCHESTRATIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PER_POD)))]
    pub max_orchestrations: u32,
    /// Seconds a partition lease that changes hands is unusable.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_LEASE_TAKEOVER_S", default_value = "10")]
    pub lease_takeover_s: Seconds,
    /// DTFx maxQueuePollingInterval (seconds): the idle back-off ceiling of a worker's polls.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_POLLING_INTERVAL_S", default_value = "30",
          value_parser = positive_seconds)]
    pub max_polling_interval_s: Seconds,
    /// DTFx controlQueueBufferThreshold: a worker stops prefetching control messages while it
    /// holds this many (256 in the Functions extension off the Consumption plan).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_CONTROL_QUEUE_BUFFER_THRESHOLD", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub control_queue_buffer_threshold: u32,
    /// DTFx controlQueueBatchSize: control messages per dequeue (Azure Queue's maximum is 32).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_CONTROL_QUEUE_BATCH_SIZE", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=32))]
    pub control_queue_batch_size: u32,
    /// DTFx controlQueueVisibilityTimeout (seconds): a dequeued control message is hidden this
    /// long; prefetched messages are not renewed.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_CONTROL_VISIBILITY_TIMEOUT_S", default_value = "300",
          value_parser = positive_seconds)]
    pub control_visibility_timeout_s: Seconds,
    /// DTFx workItemQueueVisibilityTimeout (seconds): a dequeued work item is hidden this long
    /// past its last renewal (every 30 s while it runs).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_WORK_ITEM_VISIBILITY_TIMEOUT_S", default_value = "300",
          value_parser = positive_seconds)]
    pub work_item_visibility_timeout_s: Seconds,
    /// Milliseconds one orchestration episode (replay and scheduling) takes.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_EPISODE_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=MAX_EPISODE_MS))]
    pub episode_ms: u64,
    /// terminationGracePeriodSeconds of the apps' pods: how long a terminating pod may run
    /// on. A pod that drains (`--drain`) gets at least its function timeout and 30 s, as our
    /// webhook sets it.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_GRACE_S", default_value = "30")]
    pub grace_s: Seconds,
    /// The apps' `functionTimeout` (host.json), in seconds: the longest a function runs, so
    /// what a drain waits for at most. Default: the scenario's own (long-activities: 1 h),
    /// else the host's default off Consumption, 30 min.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_FUNCTION_TIMEOUT_S", value_parser = positive_seconds)]
    pub function_timeout_s: Option<Seconds>,
    /// Whose apps drain on SIGTERM (wait for their running functions within the grace
    /// period): ours (our webhook's preStop drain, given to apps whose host keys are in a
    /// Kubernetes Secret or ConfigMap), all, or none (the host stops at once).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_DRAIN", value_enum, default_value_t = DrainPolicy::Ours)]
    pub drain: DrainPolicy,
    /// Ours sets no pod-deletion-cost: the ReplicaSet picks the pods to remove among equals
    /// at random, as for the peers.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_NO_DELETION_COST")]
    pub no_deletion_cost: bool,

    /// KEDA pollingInterval (seconds): how often IsActive is asked.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_POLLING_INTERVAL_S", default_value = "30",
          value_parser = positive_seconds)]
    pub polling_interval_s: Seconds,
    /// KEDA cooldownPeriod (seconds): inactive this long before scaling to zero.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_COOLDOWN_S", default_value = "300")]
    pub cooldown_s: Seconds,
    /// minReplicaCount.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MIN_REPLICAS", default_value_t = 0)]
    pub min_replicas: u32,
    /// maxReplicaCount.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_REPLICAS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REPLICAS)))]
    pub max_replicas: u32,
    /// HPA sync period (seconds).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_HPA_SYNC_S", default_value = "15",
          value_parser = positive_seconds)]
    pub hpa_sync_s: Seconds,
    /// HPA scale-down stabilization window (seconds).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_STABILIZATION_S", default_value = "300")]
    pub stabilization_s: Seconds,
    /// KEDA azure-queue queueLength target (keda-azure-queue scaler).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_QUEUE_LENGTH", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_length: u32,

    /// Our sidecars' report interval (seconds) while pods run.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_REPORT_INTERVAL_S", default_value = "5",
          value_parser = positive_seconds)]
    pub report_interval_s: Seconds,
    /// Our aggregator's probe interval (seconds) when no pod is ready.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_PROBE_INTERVAL_S", default_value = "2",
          value_parser = positive_seconds)]
    pub probe_interval_s: Seconds,
    /// Our algorithm: seconds a control queue must have been quiet (no consumer at work)
    /// before invisible messages that came while it was busy are taken for sleeping timers.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SETTLE_S", default_value = "30")]
    pub settle_s: Seconds,
    /// Our algorithm: seconds of history scale-in keeps the peak of.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SCALE_IN_WINDOW_S", default_value = "10")]
    pub scale_in_window_s: Seconds,

    /// Our algorithm: do not count waiting orchestration messages as activities to come.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_NO_ACTIVITY_LOOKAHEAD")]
    pub no_activity_lookahead: bool,

    /// Our algorithm: the longest an orchestration episode is assumed to take (ms); with the
    /// start-up delay it says how many rounds of episodes a worker runs before a new pod
    /// could help. 0 counts one round (earliest pods); 1000 is cheaper for small fan-outs.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_EPISODE_ESTIMATE_MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=MAX_EPISODE_MS))]
    pub episode_estimate_ms: u64,
    /// Our algorithm: the lookahead counts only control messages that arrived within this
    /// many seconds (not timers that fired); 0 counts every waiting message.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_LOOKAHEAD_WINDOW_S", default_value = "60")]
    pub lookahead_window_s: Seconds,
    /// Our algorithm: ask for new pods even when the work will be gone before they start.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_NO_DRAIN_HOLD")]
    pub no_drain_hold: bool,

    /// Print the results as JSON on stdout instead of the table.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_JSON")]
    pub json: bool,
    /// Also print the table as Markdown (for a README).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MARKDOWN")]
    pub markdown: bool,
    /// Directory for the SVG charts, one per scenario (created if missing).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SVG_DIR", default_value = "simulate-out")]
    pub svg_dir: PathBuf,
    /// Write no charts.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_NO_SVG")]
    pub no_svg: bool,
}

/// The longest any timing knob may be (a start-up delay, a cooldown, an interval), seconds:
/// a day.
const MAX_KNOB_S: f64 = 86_400.0;
/// Simulated ticks one run may take (duration / tick): a week and a half-day more at the
/// default 100 ms tick (a trace runs 30 minutes past its last arrival).
const MAX_TICKS: u64 = 7_000_000;
/// The most pods a run may scale to (`--max-replicas`): every pod is simulated.
const MAX_REPLICAS: u32 = 1_000;
/// The most work items one pod may run at once (`--max-activities`,
/// `--max-orchestrations`): 10 x CPUs of a very large node.
const MAX_PER_POD: u32 = 10_000;
/// The longest orchestration episode or episode estimate, ms: an hour.
const MAX_EPISODE_MS: u64 = 3_600_000;

/// A duration given in seconds on the command line (fractions allowed), kept in ms: finite,
/// not negative, at most a day ([`MAX_KNOB_S`]): a run simulates every tick, so a knob of
/// years would run for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(u64);

impl Seconds {
    /// The duration in ms.
    pub fn ms(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
        if (0.0..=MAX_KNOB_S).contains(&value) {
            Ok(Self((value * 1_000.0).round() as u64))
        } else {
            Err(format!("{value} is not a number of seconds from 0 to {MAX_KNOB_S}"))
        }
    }
}

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0 as f64 / 1_000.0)
    }
}

/// [`Seconds`] above zero.
fn positive_seconds(s: &str) -> Result<Seconds, String> {
    let seconds: Seconds = s.parse()?;
    if seconds.ms() == 0 { Err(format!("{s:?} must be above 0 (at least 1 ms)")) } else { Ok(seconds) }
}

/// Whose apps drain on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum DrainPolicy {
    /// Only ours: our webhook turns the drain on (architecture.md, "Work in flight and
    /// scale-in").
    Ours,
    /// Every scaler's app.
    All,
    /// No app: the host stops at once.
    None,
}

impl DrainPolicy {
    /// Whether the app `kind` scales drains.
    pub fn applies_to(self, kind: ScalerKind) -> bool {
        match self {
            Self::Ours => matches!(kind, ScalerKind::DurableScaler(_)),
            Self::All => true,
            Self::None => false,
        }
    }
}

/// Everything one run needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The app and platform (its `drain` is set per scaler from [`Settings::drain`]).
    pub app: AppConfig,
    /// Whose apps drain on SIGTERM.
    pub drain: DrainPolicy,
    /// The apps' `functionTimeout` for every scenario, when given (else each scenario's).
    pub function_timeout_ms: Option<u64>,
    /// KEDA and the HPA.
    pub keda: KedaConfig,
    /// The scalers.
    pub scalers: ScalerConfig,
    /// Tick (ms).
    pub tick_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            app: AppConfig::default(),
            drain: DrainPolicy::Ours,
            function_timeout_ms: None,
            keda: KedaConfig::default(),
            scalers: ScalerConfig::default(),
            tick_ms: 100,
        }
    }
}

impl Args {
    /// The flags as [`Settings`]; clap checked each value, this checks how they combine.
    pub fn settings(&self) -> Result<Settings, Error> {
        if self.min_replicas > self.max_replicas {
            return Err(Error::Invalid {
                flag: "--min-replicas",
                env: "DURABLE_SCALER_SIMULATE_MIN_REPLICAS",
                reason: format!("{} is above --max-replicas {}", self.min_replicas, self.max_replicas),
            });
        }
        let app = AppConfig {
            partitions: self.partitions,
            startup_ms: self.startup_s.ms(),
            max_activities: self.max_activities,
            max_orchestrations: self.max_orchestrations,
            lease_takeover_ms: self.lease_takeover_s.ms(),
            max_polling_interval_ms: self.max_polling_interval_s.ms(),
            episode_ms: self.episode_ms,
            grace_ms: self.grace_s.ms(),
            control_visibility_timeout_ms: self.control_visibility_timeout_s.ms(),
            work_item_visibility_timeout_ms: self.work_item_visibility_timeout_s.ms(),
            control_batch_size: self.control_queue_batch_size as usize,
            control_buffer_threshold: self.control_queue_buffer_threshold as usize,
            ..AppConfig::default()
        };
        let keda = KedaConfig {
            polling_interval_ms: self.polling_interval_s.ms(),
            cooldown_ms: self.cooldown_s.ms(),
            bounds: ReplicaBounds { min: self.min_replicas, max: self.max_replicas },
            hpa_sync_ms: self.hpa_sync_s.ms(),
            stabilization: std::time::Duration::from_millis(self.stabilization_s.ms()),
        };
        let scalers = ScalerConfig {
            max_activities: self.max_activities,
            max_orchestrations: self.max_orchestrations,
            queue_length: self.queue_length,
            report_interval_ms: self.report_interval_s.ms(),
            probe_interval_ms: self.probe_interval_s.ms(),
            durable: DurableSettings {
                max_activities_per_worker: self.max_activities,
                max_orchestrations_per_worker: self.max_orchestrations,
                settle_ms: self.settle_s.ms(),
                scale_in_window_ms: self.scale_in_window_s.ms(),
                activity_lookahead: !self.no_activity_lookahead,
                episode_estimate_ms: self.episode_estimate_ms,
                lookahead_window_ms: self.lookahead_window_s.ms(),
                startup_ms: if self.no_drain_hold { 0 } else { self.startup_s.ms() },
                ..DurableSettings::default()
            },
            // The aggregator's default `--work-grace`.
            work_grace_ms: DEFAULT_WORK_GRACE_MS,
            seed: self.seed,
            deletion_cost: !self.no_deletion_cost,
        };
        Ok(Settings {
            app,
            drain: self.drain,
            function_timeout_ms: self.function_timeout_s.map(Seconds::ms),
            keda,
            scalers,
            tick_ms: self.tick_ms,
        })
    }

    /// The scenarios to run, validated: at most [`MAX_TICKS`] ticks of `--tick-ms` each.
    pub fn scenarios(&self) -> Result<Vec<Scenario>, Error> {
        let duration_ms = self.duration_s.map(|s| s.saturating_mul(1_000));
        let mut names = self.scenarios.clone();
        if names.is_empty() && self.trace.is_none() {
            names = scenario::BUILTIN.iter().map(|s| s.to_string()).collect();
        }
        let mut out = Vec::new();
        for name in &names {
            let mut s = scenario::builtin(name.trim(), self.seed).ok_or_else(|| Error::Invalid {
                flag: "--scenarios",
                env: "DURABLE_SCALER_SIMULATE_SCENARIOS",
                reason: format!("unknown scenario {name:?}; built in: {}", scenario::BUILTIN.join(", ")),
            })?;
            if let Some(d) = duration_ms {
                s.duration_ms = d;
            }
            out.push(s);
        }
        if let Some(path) = &self.trace {
            out.push(scenario::load_trace(path, duration_ms)?);
        }
        let tick_ms = self.tick_ms.max(1);
        if let Some(long) = out.iter().find(|s| s.duration_ms / tick_ms > MAX_TICKS) {
            return Err(Error::Invalid {
                flag: "--tick-ms",
                env: "DURABLE_SCALER_SIMULATE_TICK_MS",
                reason: format!(
                    "scenario {} would take {} ticks of {tick_ms} ms, more than {MAX_TICKS}: use a longer tick or \
                     a shorter --duration-s",
                    long.name,
                    long.duration_ms / tick_ms
                ),
            });
        }
        Ok(out)
    }

    /// The scalers to race (default: the suite).
    pub fn scaler_kinds(&self) -> Vec<ScalerKind> {
        if self.scalers.is_empty() { scalers::ALL.to_vec() } else { self.scalers.clone() }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one scenario against one scaler; `progress` is called with simulated ms as it goes.
pub fn run_one(
    scenario: &Scenario,
    kind: ScalerKind,
    settings: &Settings,
    progress: &mut dyn FnMut(u64),
) -> RunResult {
    let drain = settings.drain.applies_to(kind);
    // A pod that drains may run for as long as its longest function may: our webhook sets
    // its grace period to the function timeout and a margin (never below the pod's own).
    let function_timeout_ms = settings
        .function_timeout_ms
        .or(scenario.function_timeout_ms)
        .unwrap_or(millis(crate::contract::DEFAULT_FUNCTION_TIMEOUT));
    let grace_ms = if drain {
        settings.app.grace_ms.max(function_timeout_ms + millis(crate::contract::DRAIN_GRACE_MARGIN))
    } else {
        settings.app.grace_ms
    };
    let app_cfg = AppConfig { drain, grace_ms, ..settings.app };
    let mut app = App::new(app_cfg, scenario.workload.clone(), settings.scalers.seed);
    let mut scaler = scalers::build(kind, &settings.scalers, settings.app.partitions as usize);
    let deletion_cost = settings.scalers.deletion_cost && matches!(kind, ScalerKind::DurableScaler(_));
    let mut keda = Autoscaler::new(settings.keda);
    let mut recorder = Recorder::new(settings.tick_ms, scenario.duration_ms);
    let mut now = 0;
    let report_every = 600_000 / settings.tick_ms.max(1);
    let mut ticks = 0u64;
    while now <= scenario.duration_ms {
        app.tick(now);
        let pods_before = app.pods();
        let replicas = keda.tick(now, scaler.as_mut(), &app);
        if let Some(costs) = scaler.take_deletion_costs() {
            app.set_deletion_costs(&costs);
        }
        app.set_replicas(replicas, now);
        recorder.record(now, &app, pods_before);
        now += settings.tick_ms;
        ticks += 1;
        if ticks.is_multiple_of(report_every) {
            progress(now);
        }
    }
    recorder.finish(
        &scenario.name,
        &kind.to_string(),
        &app,
        scenario.duration_ms,
        keda.changes(),
        deletion_cost,
    )
}

/// The results of a suite and how fast it ran.
#[derive(Debug, Clone)]
pub(crate) struct SuiteResults {
    /// Every run, grouped by scenario in order.
    pub results: Vec<RunResult>,
    /// Simulated hours per wall-clock second.
    pub simulated_hours_per_second: f64,
}

/// Runs every scenario against every scaler, with a progress bar on stderr when the run
/// takes more than a second and stderr is a terminal.
pub(crate) fn run_suite(scenarios: &[Scenario], kinds: &[ScalerKind], settings: &Settings) -> SuiteResults {
    let total_ms: u64 = scenarios.iter().map(|s| s.duration_ms).sum::<u64>() * kinds.len() as u64;
    let bar = ProgressBar::with_draw_target(Some(total_ms / 1_000), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{msg:32} [{bar:30}] {percent:>3}% simulated, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let show = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut done_ms = 0u64;
    let mut results = Vec::new();
    for s in scenarios {
        for &kind in kinds {
            bar.set_message(format!("{} / {}", s.name, kind));
            let base = done_ms;
            let mut progress = |at_ms: u64| {
                if show && bar.is_hidden() && started.elapsed().as_secs_f64() > 1.0 {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
                bar.set_position((base + at_ms) / 1_000);
            };
            results.push(run_one(s, kind, settings, &mut progress));
            done_ms += s.duration_ms;
            bar.set_position(done_ms / 1_000);
        }
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    SuiteResults { results, simulated_hours_per_second: total_ms as f64 / 3_600_000.0 / wall }
}

/// `durable-scaler simulate`: parses nothing itself (clap did), runs, prints, writes charts.
pub(crate) fn run(args: &Args) -> std::process::ExitCode {
    match execute(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("durable-scaler simulate: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn execute(args: &Args) -> Result<(), Error> {
    let settings = args.settings()?;
    let scenarios = args.scenarios()?;
    let kinds = args.scaler_kinds();
    let suite = run_suite(&scenarios, &kinds, &settings);
    let mut verdicts = Vec::new();
    for s in &scenarios {
        let of: Vec<RunResult> = suite.results.iter().filter(|r| r.scenario == s.name).cloned().collect();
        verdicts.extend(output::verdict(&of));
        if !args.no_svg {
            std::fs::create_dir_all(&args.svg_dir)
                .map_err(|source| Error::Write { path: args.svg_dir.clone(), source })?;
            let path = args.svg_dir.join(format!("{}.svg", s.name));
            std::fs::write(&path, svg::chart(&s.name, &s.description, &of))
                .map_err(|source| Error::Write { path: path.clone(), source })?;
        }
    }
    if args.json {
        let report = output::Report {
            results: &suite.results,
            verdicts: &verdicts,
            simulated_hours_per_second: suite.simulated_hours_per_second,
            seed: args.seed,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        );
    } else {
        print!("{}", output::table(&suite.results, &verdicts));
        if args.markdown {
            println!();
            print!("{}", output::markdown(&suite.results, &verdicts));
        }
        println!(
            "\nseed {}; simulator speed: {:.0} simulated hours per wall second{}",
            args.seed,
            suite.simulated_hours_per_second,
            if args.no_svg { String::new() } else { format!("; charts in {}", args.svg_dir.display()) }
        );
    }
    Ok(())
}
