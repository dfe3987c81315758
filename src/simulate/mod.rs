//! `durable-scaler simulate`: race the scaling algorithms side by side on the same workload
//! and see, before deploying, how each behaves.
//!
//! A fixed-tick simulation (100 ms by default), deterministic for a seed:
//! - [`model`]: the app: queues, orchestrations, pods and partition leases;
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
/// worker when at zero, and time at zero. `*` marks the lowest pod-seconds among scalers
/// within 10 % of the best p95, `w` the fastest wake from zero. Writes one SVG chart per
/// scenario (pods per scaler, backlog beneath). The model and every default, with its
/// source, are described in docs/simulator.md.
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Built-in scenarios to run, comma-separated: burst, steady, diurnal, spiky, timers,
    /// trickle. Default: all of them (unless --trace is given).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SCENARIOS", value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// A trace of arrivals to run as a scenario: CSV with a header (at_s required; count,
    /// activities, activity_s, timer_s optional) or a JSON array of such rows (.json). Each row
    /// starts `count` orchestrations at `at_s` that fan out `activities` activities of
    /// `activity_s` seconds, then, if timer_s > 0, sleep that long and run one more.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_TRACE")]
    pub trace: Option<PathBuf>,
    /// Scalers to race, comma-separated: kedacore, wsugarman, functions-target,
    /// keda-azure-queue, durable-scaler (ours; durable-scaler:latency, durable-scaler:target
    /// and durable-scaler:target-inflight run our scaler with the other algorithms). Default:
    /// the first five.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SCALERS", value_delimiter = ',')]
    pub scalers: Vec<ScalerKind>,
    /// Seed for arrivals, activity durations and the latency vote's random scale-in; one seed,
    /// one result.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Override every scenario's simulated duration (seconds).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_DURATION_S")]
    pub duration_s: Option<u64>,
    /// Simulation tick (ms): smaller is finer and slower.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_TICK_MS", default_value_t = 100)]
    pub tick_ms: u64,

    /// Partition count P (control queues), 1..16.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_PARTITIONS", default_value_t = 4)]
    pub partitions: u32,
    /// Seconds from pod creation until it takes work (image pull, host start).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_STARTUP_S", default_value_t = 20.0)]
    pub startup_s: f64,
    /// maxConcurrentActivityFunctions per pod, also the scalers' maxActivitiesPerWorker.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_ACTIVITIES", default_value_t = 10)]
    pub max_activities: u32,
    /// maxConcurrentOrchestratorFunctions per pod, also maxOrchestrationsPerWorker. The
    /// defaults, 10 and 10, are a 1-CPU pod's: the extension's 10 x ProcessorCount outside
    /// the Consumption plan (docs/simulator.md).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_ORCHESTRATIONS", default_value_t = 10)]
    pub max_orchestrations: u32,
    /// Seconds a partition lease that changes hands is unusable.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_LEASE_TAKEOVER_S", default_value_t = 10.0)]
    pub lease_takeover_s: f64,
    /// DTFx maxQueuePollingInterval (seconds): the idle backoff ceiling of a worker's polls.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_POLLING_INTERVAL_S", default_value_t = 30.0)]
    pub max_polling_interval_s: f64,
    /// Milliseconds one orchestration episode (replay and scheduling) takes.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_EPISODE_MS", default_value_t = 100)]
    pub episode_ms: u64,
    /// terminationGracePeriodSeconds: how long a draining pod may finish its work.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_GRACE_S", default_value_t = 30.0)]
    pub grace_s: f64,

    /// KEDA pollingInterval (seconds): how often IsActive is asked.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_POLLING_INTERVAL_S", default_value_t = 30.0)]
    pub polling_interval_s: f64,
    /// KEDA cooldownPeriod (seconds): inactive this long before scaling to zero.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_COOLDOWN_S", default_value_t = 300.0)]
    pub cooldown_s: f64,
    /// minReplicaCount.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MIN_REPLICAS", default_value_t = 0)]
    pub min_replicas: u32,
    /// maxReplicaCount.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_MAX_REPLICAS", default_value_t = 100)]
    pub max_replicas: u32,
    /// HPA sync period (seconds).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_HPA_SYNC_S", default_value_t = 15.0)]
    pub hpa_sync_s: f64,
    /// HPA scale-down stabilization window (seconds).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_STABILIZATION_S", default_value_t = 300.0)]
    pub stabilization_s: f64,
    /// KEDA azure-queue queueLength target (keda-azure-queue scaler).
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_QUEUE_LENGTH", default_value_t = 5)]
    pub queue_length: u32,

    /// Our sidecars' report interval (seconds) while pods run.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_REPORT_INTERVAL_S", default_value_t = 5.0)]
    pub report_interval_s: f64,
    /// Our aggregator's probe interval (seconds) when no pod is ready.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_PROBE_INTERVAL_S", default_value_t = 2.0)]
    pub probe_interval_s: f64,
    /// Our algorithm: seconds a control queue must have been quiet (no consumer at work)
    /// before invisible messages that came while it was busy are taken for sleeping timers.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SETTLE_S", default_value_t = 30.0)]
    pub settle_s: f64,
    /// Our algorithm: seconds of history scale-in keeps the peak of.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_SCALE_IN_WINDOW_S", default_value_t = 10.0)]
    pub scale_in_window_s: f64,

    /// Our algorithm: do not count waiting orchestration messages as activities to come.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_NO_ACTIVITY_LOOKAHEAD")]
    pub no_activity_lookahead: bool,

    /// Our algorithm: the longest an orchestration episode is assumed to take (ms); with the
    /// start-up delay it says how many rounds of episodes a worker runs before a new pod
    /// could help. 0 counts one round (earliest pods); 1000 is cheaper for small fan-outs.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_EPISODE_ESTIMATE_MS", default_value_t = 0)]
    pub episode_estimate_ms: u64,
    /// Our algorithm: the lookahead counts only control messages that arrived within this
    /// many seconds (not timers that fired); 0 counts every waiting message.
    #[arg(long, env = "DURABLE_SCALER_SIMULATE_LOOKAHEAD_WINDOW_S", default_value_t = 60.0)]
    pub lookahead_window_s: f64,
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

/// Everything one run needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The app and platform.
    pub app: AppConfig,
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
            keda: KedaConfig::default(),
            scalers: ScalerConfig::default(),
            tick_ms: 100,
        }
    }
}

fn seconds(value: f64, flag: &'static str, env: &'static str) -> Result<u64, Error> {
    if (0.0..1e9).contains(&value) {
        Ok((value * 1_000.0).round() as u64)
    } else {
        Err(Error::Invalid { flag, env, reason: format!("{value} is not a number of seconds >= 0") })
    }
}

fn positive(value: u32, flag: &'static str, env: &'static str) -> Result<u32, Error> {
    if value == 0 {
        Err(Error::Invalid { flag, env, reason: "must be at least 1".to_string() })
    } else {
        Ok(value)
    }
}

impl Args {
    /// Validates the flags into [`Settings`].
    pub fn settings(&self) -> Result<Settings, Error> {
        if !(1..=16).contains(&self.partitions) {
            return Err(Error::Invalid {
                flag: "--partitions",
                env: "DURABLE_SCALER_SIMULATE_PARTITIONS",
                reason: format!("{} is outside 1..16", self.partitions),
            });
        }
        if !(10..=10_000).contains(&self.tick_ms) {
            return Err(Error::Invalid {
                flag: "--tick-ms",
                env: "DURABLE_SCALER_SIMULATE_TICK_MS",
                reason: format!("{} is outside 10..10000", self.tick_ms),
            });
        }
        let max_replicas =
            positive(self.max_replicas, "--max-replicas", "DURABLE_SCALER_SIMULATE_MAX_REPLICAS")?;
        if self.min_replicas > max_replicas {
            return Err(Error::Invalid {
                flag: "--min-replicas",
                env: "DURABLE_SCALER_SIMULATE_MIN_REPLICAS",
                reason: format!("{} is above --max-replicas {}", self.min_replicas, max_replicas),
            });
        }
        let positive_s = |v: f64, flag: &'static str, env: &'static str| {
            let ms = seconds(v, flag, env)?;
            if ms == 0 {
                Err(Error::Invalid { flag, env, reason: "must be above 0".to_string() })
            } else {
                Ok(ms)
            }
        };
        let max_activities =
            positive(self.max_activities, "--max-activities", "DURABLE_SCALER_SIMULATE_MAX_ACTIVITIES")?;
        let max_orchestrations = positive(
            self.max_orchestrations,
            "--max-orchestrations",
            "DURABLE_SCALER_SIMULATE_MAX_ORCHESTRATIONS",
        )?;
        let app = AppConfig {
            partitions: self.partitions,
            startup_ms: seconds(self.startup_s, "--startup-s", "DURABLE_SCALER_SIMULATE_STARTUP_S")?,
            max_activities,
            max_orchestrations,
            lease_takeover_ms: seconds(
                self.lease_takeover_s,
                "--lease-takeover-s",
                "DURABLE_SCALER_SIMULATE_LEASE_TAKEOVER_S",
            )?,
            max_polling_interval_ms: positive_s(
                self.max_polling_interval_s,
                "--max-polling-interval-s",
                "DURABLE_SCALER_SIMULATE_MAX_POLLING_INTERVAL_S",
            )?,
            episode_ms: self.episode_ms.max(1),
            grace_ms: seconds(self.grace_s, "--grace-s", "DURABLE_SCALER_SIMULATE_GRACE_S")?,
            ..AppConfig::default()
        };
        let keda = KedaConfig {
            polling_interval_ms: positive_s(
                self.polling_interval_s,
                "--polling-interval-s",
                "DURABLE_SCALER_SIMULATE_POLLING_INTERVAL_S",
            )?,
            cooldown_ms: seconds(self.cooldown_s, "--cooldown-s", "DURABLE_SCALER_SIMULATE_COOLDOWN_S")?,
            bounds: ReplicaBounds { min: self.min_replicas, max: max_replicas },
            hpa_sync_ms: positive_s(self.hpa_sync_s, "--hpa-sync-s", "DURABLE_SCALER_SIMULATE_HPA_SYNC_S")?,
            stabilization: std::time::Duration::from_millis(seconds(
                self.stabilization_s,
                "--stabilization-s",
                "DURABLE_SCALER_SIMULATE_STABILIZATION_S",
            )?),
        };
        let scalers = ScalerConfig {
            max_activities,
            max_orchestrations,
            queue_length: positive(
                self.queue_length,
                "--queue-length",
                "DURABLE_SCALER_SIMULATE_QUEUE_LENGTH",
            )?,
            report_interval_ms: positive_s(
                self.report_interval_s,
                "--report-interval-s",
                "DURABLE_SCALER_SIMULATE_REPORT_INTERVAL_S",
            )?,
            probe_interval_ms: positive_s(
                self.probe_interval_s,
                "--probe-interval-s",
                "DURABLE_SCALER_SIMULATE_PROBE_INTERVAL_S",
            )?,
            durable: DurableSettings {
                max_activities_per_worker: max_activities,
                max_orchestrations_per_worker: max_orchestrations,
                settle_ms: seconds(self.settle_s, "--settle-s", "DURABLE_SCALER_SIMULATE_SETTLE_S")?,
                scale_in_window_ms: seconds(
                    self.scale_in_window_s,
                    "--scale-in-window-s",
                    "DURABLE_SCALER_SIMULATE_SCALE_IN_WINDOW_S",
                )?,
                activity_lookahead: !self.no_activity_lookahead,
                episode_estimate_ms: self.episode_estimate_ms,
                lookahead_window_ms: seconds(
                    self.lookahead_window_s,
                    "--lookahead-window-s",
                    "DURABLE_SCALER_SIMULATE_LOOKAHEAD_WINDOW_S",
                )?,
                startup_ms: if self.no_drain_hold {
                    0
                } else {
                    seconds(self.startup_s, "--startup-s", "DURABLE_SCALER_SIMULATE_STARTUP_S")?
                },
                ..DurableSettings::default()
            },
            // The aggregator's default `--work-grace`.
            work_grace_ms: DEFAULT_WORK_GRACE_MS,
            seed: self.seed,
        };
        Ok(Settings { app, keda, scalers, tick_ms: self.tick_ms })
    }

    /// The scenarios to run, validated.
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
        Ok(out)
    }

    /// The scalers to race (default: the suite).
    pub fn scaler_kinds(&self) -> Vec<ScalerKind> {
        if self.scalers.is_empty() { scalers::ALL.to_vec() } else { self.scalers.clone() }
    }
}

/// Runs one scenario against one scaler; `progress` is called with simulated ms as it goes.
pub fn run_one(
    scenario: &Scenario,
    kind: ScalerKind,
    settings: &Settings,
    progress: &mut dyn FnMut(u64),
) -> RunResult {
    let mut app = App::new(settings.app, scenario.workload.clone(), settings.scalers.seed);
    let mut scaler = scalers::build(kind, &settings.scalers, settings.app.partitions as usize);
    let mut keda = Autoscaler::new(settings.keda);
    let mut recorder = Recorder::new(settings.tick_ms, scenario.duration_ms);
    let mut now = 0;
    let report_every = 600_000 / settings.tick_ms.max(1);
    let mut ticks = 0u64;
    while now <= scenario.duration_ms {
        app.tick(now);
        let pods_before = app.pods();
        let replicas = keda.tick(now, scaler.as_mut(), &app);
        app.set_replicas(replicas, now);
        recorder.record(now, &app, pods_before);
        now += settings.tick_ms;
        ticks += 1;
        if ticks.is_multiple_of(report_every) {
            progress(now);
        }
    }
    recorder.finish(&scenario.name, &kind.to_string(), &app, scenario.duration_ms, keda.changes())
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
