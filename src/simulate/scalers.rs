//! The scalers raced against each other, each as a user would run it today, each answering
//! KEDA's three questions (IsActive, the metrics with their targets, and, for ours, a push
//! of activation through StreamIsActive) from what the app's queues show.
//!
//! - `kedacore`: the archived original KEDA Durable Functions scaler. Every IsActive and
//!   GetMetrics call pulses DTFx's latency vote; IsActive is always true (so never below one
//!   pod); the metric is 25 for AddWorker, 1 for RemoveWorker, 0 otherwise, against a target
//!   of 5 (so AddWorker means "5 pods" and anything else "1 pod").
//! - `wsugarman`: wsugarman/durabletask-azurestorage-scaler. Approximate counts (sleeping
//!   timers included); value = work items + packed orchestration workers x maxActivities,
//!   target maxActivities, i.e. activity workers + orchestration workers, summed; active when
//!   any count is non-zero.
//! - `functions-target`: the Functions host's DurableTaskTargetScaler formula behind an
//!   external scaler (value = target workers, target 1), with upstream's rule that a queue
//!   whose peek returns nothing has length 0.
//! - `keda-azure-queue`: KEDA's built-in azure-queue scaler, one trigger per queue,
//!   queueLength 5, queueLengthStrategy `all` (approximate count), activationQueueLength 0.
//! - `durable-scaler`: ours, the production code: one [`HubEngine`] (the aggregator's
//!   per-hub engine, `heuristic::engine`) takes a reading of every queue each time a sidecar
//!   would report (every 5 s while pods run) or the aggregator would probe (every 2 s at
//!   zero) and decides; IsActive, GetMetrics and the StreamIsActive push on the inactive ->
//!   active transition are answered from it as the aggregator answers them. At each report
//!   it also ranks the pods by what their sidecars say they hold ([`deletion_cost`]), as the
//!   aggregator keeps `controller.kubernetes.io/pod-deletion-cost` on them (architecture.md,
//!   "Work in flight and scale-in"), so the ReplicaSet removes the pod holding least first.
//!   Peers set no cost: the ReplicaSet picks among equals at random.
//!
//! Scalers see the app through [`QueueSource`], so a test can drive them with a sequence of
//! readings of its own (tests/it/engine_equivalence.rs).

use std::fmt;
use std::str::FromStr;

use crate::clock::UnixMs;
use crate::heuristic::{
    Algorithm, ScaleAction,
    durable::DurableSettings,
    engine::{DEFAULT_WORK_GRACE_MS, Decision, EngineSettings, HubEngine, TriggerInputs},
    latency::{DEFAULT_MAX_POLLING_INTERVAL_MS, LatencyVoter, TaskHubLatencies},
    target::{self, TargetSettings},
};
use crate::reading::QueueReading;

pub use super::source::{PodReport, QueueSource, sim_time};

/// One external metric as the HPA reads it (metricType AverageValue).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    /// The value GetMetrics returned.
    pub value: f64,
    /// The MetricSpec's target.
    pub target: f64,
}

/// What KEDA asks of a scaler.
pub trait Scaler {
    /// Called every tick; returns true to push "active" through StreamIsActive now.
    fn tick(&mut self, _now: UnixMs, _app: &dyn QueueSource, _replicas: u32) -> bool {
        false
    }
    /// KEDA's IsActive, every polling interval.
    fn is_active(&mut self, now: UnixMs, app: &dyn QueueSource, replicas: u32) -> bool;
    /// GetMetrics for every trigger, every HPA sync.
    fn metrics(&mut self, now: UnixMs, app: &dyn QueueSource, replicas: u32) -> Vec<Metric>;
    /// Ours only: the engine's latest decision, with its reason (peers have none to show).
    fn decision(&self) -> Option<&Decision> {
        None
    }
    /// Ours only: `controller.kubernetes.io/pod-deletion-cost` per pod (pod id, cost), when
    /// it changed since the last call (at each sidecar report); peers set none, so the
    /// ReplicaSet picks among equals.
    fn take_deletion_costs(&mut self) -> Option<Vec<(u64, i32)>> {
        None
    }
}

/// A scaler by name, as `--scalers` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ScalerKind {
    /// The archived original KEDA Durable Functions scaler.
    Kedacore,
    /// wsugarman/durabletask-azurestorage-scaler.
    Wsugarman,
    /// The Functions host's target formula behind an external scaler.
    FunctionsTarget,
    /// KEDA's built-in azure-queue scaler, one trigger per queue.
    KedaAzureQueue,
    /// Ours, with its algorithm.
    DurableScaler(Algorithm),
}

/// Every scaler of the suite, ours last.
pub const ALL: [ScalerKind; 5] = [
    ScalerKind::Kedacore,
    ScalerKind::Wsugarman,
    ScalerKind::FunctionsTarget,
    ScalerKind::KedaAzureQueue,
    ScalerKind::DurableScaler(Algorithm::Durable),
];

impl fmt::Display for ScalerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kedacore => f.write_str("kedacore"),
            Self::Wsugarman => f.write_str("wsugarman"),
            Self::FunctionsTarget => f.write_str("functions-target"),
            Self::KedaAzureQueue => f.write_str("keda-azure-queue"),
            Self::DurableScaler(Algorithm::Durable) => f.write_str("durable-scaler"),
            Self::DurableScaler(algorithm) => write!(f, "durable-scaler:{algorithm}"),
        }
    }
}

impl FromStr for ScalerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "kedacore" => Self::Kedacore,
            "wsugarman" => Self::Wsugarman,
            "functions-target" => Self::FunctionsTarget,
            "keda-azure-queue" => Self::KedaAzureQueue,
            "durable-scaler" => Self::DurableScaler(Algorithm::Durable),
            other => {
                if let Some(algorithm) =
                    other.strip_prefix("durable-scaler:").and_then(|a| a.parse::<Algorithm>().ok())
                {
                    return Ok(Self::DurableScaler(algorithm));
                }
                return Err(format!(
                    "unknown scaler {other:?}: expected kedacore, wsugarman, functions-target, \
                     keda-azure-queue, durable-scaler[:durable|:latency|:target|:target-inflight]"
                ));
            }
        })
    }
}

/// The settings scalers share with the app (the trigger's metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalerConfig {
    /// `maxActivitiesPerWorker`.
    pub max_activities: u32,
    /// `maxOrchestrationsPerWorker`.
    pub max_orchestrations: u32,
    /// KEDA azure-queue `queueLength`.
    pub queue_length: u32,
    /// Our sidecars' report interval while pods run.
    pub report_interval_ms: u64,
    /// Our aggregator's probe interval at zero.
    pub probe_interval_ms: u64,
    /// Our algorithm's settings.
    pub durable: DurableSettings,
    /// DTFx's visibility timeout (the aggregator's `--work-grace`): `durable`'s dead-owner and
    /// stuck-work-item rules and `target-inflight`'s grace.
    pub work_grace_ms: u64,
    /// Seed for the latency vote's random scale-in.
    pub seed: u64,
    /// Ours keeps `controller.kubernetes.io/pod-deletion-cost` on the pods from what their
    /// sidecars report, so the ReplicaSet removes the pod holding least first.
    pub deletion_cost: bool,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            max_activities: crate::contract::WORK_ITEMS_PER_CPU,
            max_orchestrations: crate::contract::WORK_ITEMS_PER_CPU,
            queue_length: 5,
            report_interval_ms: 5_000,
            probe_interval_ms: 2_000,
            // The same limits as above: the scalers and the app agree on a 1-CPU pod's.
            durable: DurableSettings {
                max_activities_per_worker: crate::contract::WORK_ITEMS_PER_CPU,
                max_orchestrations_per_worker: crate::contract::WORK_ITEMS_PER_CPU,
                ..DurableSettings::default()
            },
            work_grace_ms: DEFAULT_WORK_GRACE_MS,
            seed: 0,
            deletion_cost: true,
        }
    }
}

/// Builds the scaler `kind`.
pub fn build(kind: ScalerKind, cfg: &ScalerConfig, partitions: usize) -> Box<dyn Scaler> {
    match kind {
        ScalerKind::Kedacore => Box::new(Kedacore {
            voter: LatencyVoter::with_random_scale_in(DEFAULT_MAX_POLLING_INTERVAL_MS, cfg.seed),
            rings: TaskHubLatencies::new(partitions),
        }),
        ScalerKind::Wsugarman => Box::new(Wsugarman {
            max_activities: cfg.max_activities,
            max_orchestrations: cfg.max_orchestrations,
        }),
        ScalerKind::FunctionsTarget => Box::new(FunctionsTarget { settings: target_settings(cfg) }),
        ScalerKind::KedaAzureQueue => Box::new(KedaAzureQueue { queue_length: cfg.queue_length }),
        ScalerKind::DurableScaler(algorithm) => Box::new(DurableScaler::new(algorithm, cfg, partitions)),
    }
}

fn target_settings(cfg: &ScalerConfig) -> TargetSettings {
    TargetSettings {
        max_activities_per_worker: cfg.max_activities,
        max_orchestrations_per_worker: cfg.max_orchestrations,
    }
}

/// Upstream's queue length: the approximate count, or 0 when a peek returns nothing.
pub fn upstream_length(s: &QueueReading) -> u64 {
    if s.visible_count == 0 { 0 } else { s.approximate_count }
}

/// True when any queue's approximate count is above zero (sleeping timers included).
fn any_message(app: &dyn QueueSource, now: UnixMs) -> bool {
    let (wi, cq) = app.observe(now);
    wi.approximate_count > 0 || cq.iter().any(|s| s.approximate_count > 0)
}

/// The archived original KEDA Durable Functions scaler.
struct Kedacore {
    voter: LatencyVoter,
    rings: TaskHubLatencies,
}

/// kedacore's mapping of a vote to its metric (target 5).
pub fn kedacore_metric(action: ScaleAction) -> Metric {
    let value = match action {
        ScaleAction::AddWorker => 25.0,
        ScaleAction::RemoveWorker => 1.0,
        ScaleAction::None => 0.0,
    };
    Metric { value, target: 5.0 }
}

impl Kedacore {
    /// One PulseAsync: a latency sample per queue, then the vote.
    fn pulse(&mut self, now: UnixMs, app: &dyn QueueSource, replicas: u32) -> ScaleAction {
        let (wi, cq) = app.observe(now);
        self.rings.work_item.add(wi.first_visible_age_ms);
        for (ring, s) in self.rings.control.iter_mut().zip(&cq) {
            ring.add(s.first_visible_age_ms);
        }
        self.voter.vote(&self.rings, replicas).action
    }
}

impl Scaler for Kedacore {
    fn is_active(&mut self, now: UnixMs, app: &dyn QueueSource, replicas: u32) -> bool {
        self.pulse(now, app, replicas);
        true
    }

    fn metrics(&mut self, now: UnixMs, app: &dyn QueueSource, replicas: u32) -> Vec<Metric> {
        vec![kedacore_metric(self.pulse(now, app, replicas))]
    }
}

/// wsugarman/durabletask-azurestorage-scaler.
struct Wsugarman {
    max_activities: u32,
    max_orchestrations: u32,
}

/// wsugarman's orchestration workers: repeatedly give a worker the largest set of
/// partitions whose messages (each capped at `max_orchestrations`) fit in
/// `max_orchestrations`, by its dynamic programme (ties exclude the partition).
pub fn wsugarman_orchestration_workers(control_counts: &[u64], max_orchestrations: u32) -> u32 {
    let cap = max_orchestrations.max(1) as usize;
    let mut remaining: Vec<bool> = control_counts.iter().map(|&c| c > 0).collect();
    let mut workers = 0;
    while remaining.iter().any(|&r| r) {
        // best[p][c] = partitions chosen among the first p with capacity c.
        let n = control_counts.len();
        let mut best: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); cap + 1]; n + 1];
        for p in 1..=n {
            for c in 1..=cap {
                let exclude = best[p - 1][c].clone();
                let items = (control_counts[p - 1] as usize).min(cap);
                best[p][c] = if !remaining[p - 1] || items > c {
                    exclude
                } else {
                    let mut include = best[p - 1][c - items].clone();
                    include.push(p - 1);
                    if exclude.len() >= include.len() { exclude } else { include }
                };
            }
        }
        let chosen = &best[n][cap];
        if chosen.is_empty() {
            // Cannot happen (every remaining partition fits alone); stop rather than spin.
            workers += remaining.iter().filter(|&&r| r).count() as u32;
            break;
        }
        for &p in chosen {
            remaining[p] = false;
        }
        workers += 1;
    }
    workers
}

/// wsugarman's metric: work items + orchestration workers x maxActivities, target maxActivities.
pub fn wsugarman_metric(
    work_items: u64,
    control_counts: &[u64],
    max_activities: u32,
    max_orchestrations: u32,
) -> Metric {
    let active = work_items > 0 || control_counts.iter().any(|&c| c > 0);
    let value = if active {
        work_items as f64
            + f64::from(wsugarman_orchestration_workers(control_counts, max_orchestrations))
                * f64::from(max_activities)
    } else {
        0.0
    };
    Metric { value, target: f64::from(max_activities.max(1)) }
}

impl Scaler for Wsugarman {
    fn is_active(&mut self, now: UnixMs, app: &dyn QueueSource, _replicas: u32) -> bool {
        any_message(app, now)
    }

    fn metrics(&mut self, now: UnixMs, app: &dyn QueueSource, _replicas: u32) -> Vec<Metric> {
        let (wi, cq) = app.observe(now);
        let counts: Vec<u64> = cq.iter().map(|s| s.approximate_count).collect();
        vec![wsugarman_metric(wi.approximate_count, &counts, self.max_activities, self.max_orchestrations)]
    }
}

/// The Functions host's target formula behind an external scaler.
struct FunctionsTarget {
    settings: TargetSettings,
}

impl FunctionsTarget {
    fn target(&self, now: UnixMs, app: &dyn QueueSource) -> u64 {
        let (wi, cq) = app.observe(now);
        let lengths: Vec<u64> = cq.iter().map(upstream_length).collect();
        target::target_workers(self.settings, upstream_length(&wi), &lengths).target
    }
}

impl Scaler for FunctionsTarget {
    fn is_active(&mut self, now: UnixMs, app: &dyn QueueSource, _replicas: u32) -> bool {
        self.target(now, app) > 0
    }

    fn metrics(&mut self, now: UnixMs, app: &dyn QueueSource, _replicas: u32) -> Vec<Metric> {
        vec![Metric { value: self.target(now, app) as f64, target: 1.0 }]
    }
}

/// KEDA's built-in azure-queue scaler, one trigger per queue.
struct KedaAzureQueue {
    queue_length: u32,
}

impl Scaler for KedaAzureQueue {
    fn is_active(&mut self, now: UnixMs, app: &dyn QueueSource, _replicas: u32) -> bool {
        any_message(app, now)
    }

    fn metrics(&mut self, now: UnixMs, app: &dyn QueueSource, _replicas: u32) -> Vec<Metric> {
        let (wi, cq) = app.observe(now);
        let target = f64::from(self.queue_length.max(1));
        std::iter::once(wi).chain(cq).map(|s| Metric { value: s.approximate_count as f64, target }).collect()
    }
}

/// Ours: sidecar reports / aggregator probes feed the production engine; KEDA is answered
/// from it as the aggregator answers (`aggregator::hub`, `aggregator::registry`).
struct DurableScaler {
    engine: HubEngine,
    report_interval_ms: i64,
    probe_interval_ms: i64,
    next_sample: UnixMs,
    /// IsActive as last published, for the StreamIsActive push on inactive -> active.
    active: bool,
    /// Whether it ranks pods for the ReplicaSet.
    deletion_cost: bool,
    /// The deletion costs of the latest reports, until KEDA's loop takes them.
    costs: Option<Vec<(u64, i32)>>,
}

impl DurableScaler {
    fn new(algorithm: Algorithm, cfg: &ScalerConfig, partitions: usize) -> Self {
        let settings = EngineSettings::for_trigger(&TriggerInputs {
            worker_startup_ms: cfg.durable.startup_ms,
            work_grace_ms: cfg.work_grace_ms,
            // On, as in the aggregator; the run's seed stands in for the hub's.
            latency_seed: cfg.seed,
            durable_tuning: cfg.durable,
            ..TriggerInputs::new(algorithm, target_settings(cfg))
        });
        Self {
            engine: HubEngine::new(settings, partitions),
            report_interval_ms: i64::try_from(cfg.report_interval_ms.max(1)).unwrap_or(i64::MAX),
            probe_interval_ms: i64::try_from(cfg.probe_interval_ms.max(1)).unwrap_or(i64::MAX),
            next_sample: UnixMs(i64::MIN),
            active: false,
            deletion_cost: cfg.deletion_cost,
            costs: None,
        }
    }
}

/// The deletion cost the aggregator keeps on a pod from its sidecar's report: the messages
/// it holds first (removing a pod that runs work interrupts it), then its leases (removing
/// one moves them, a takeover delay); lowest goes first. A held message outweighs every lease
/// a pod can own (at most 16, `contract::MAX_PARTITIONS`).
pub fn deletion_cost(report: &PodReport) -> i32 {
    let held = i64::try_from(report.held_messages).unwrap_or(i64::MAX);
    let per_message = i64::from(crate::contract::MAX_PARTITIONS) + 1;
    let cost = held.saturating_mul(per_message).saturating_add(i64::from(report.owned_partitions));
    i32::try_from(cost).unwrap_or(i32::MAX)
}

impl Scaler for DurableScaler {
    fn tick(&mut self, now: UnixMs, app: &dyn QueueSource, replicas: u32) -> bool {
        if now < self.next_sample {
            return false;
        }
        let at_zero = app.ready_pods(now) == 0;
        self.next_sample =
            now.plus_ms(if at_zero { self.probe_interval_ms } else { self.report_interval_ms });
        let (wi, cq) = app.observe(now);
        self.engine.observe_work_item(wi, now);
        for (partition, sample) in cq.into_iter().enumerate() {
            self.engine.observe_control(partition, sample, now);
        }
        self.engine.evaluate(now, replicas);
        if self.deletion_cost {
            self.costs = Some(
                app.pod_reports(now)
                    .iter()
                    .filter(|r| !r.terminating)
                    .map(|r| (r.pod, deletion_cost(r)))
                    .collect(),
            );
        }
        let was_active = std::mem::replace(&mut self.active, self.engine.is_active(now));
        !was_active && self.active
    }

    fn is_active(&mut self, now: UnixMs, _app: &dyn QueueSource, _replicas: u32) -> bool {
        self.engine.is_active(now)
    }

    fn metrics(&mut self, _now: UnixMs, _app: &dyn QueueSource, _replicas: u32) -> Vec<Metric> {
        let value = self.engine.decision().map_or(0.0, |d| d.metric_value);
        vec![Metric { value, target: 1.0 }]
    }

    fn decision(&self) -> Option<&Decision> {
        self.engine.decision()
    }

    fn take_deletion_costs(&mut self) -> Option<Vec<(u64, i32)>> {
        self.costs.take()
    }
}
