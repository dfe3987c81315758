//! One task hub's whole state behind one lock (`registry::HubEntry`): its trigger settings,
//! its coverage (pods and one record per partition, [`super::coverage`]), its cold probe's
//! status, the ScaledObject that asks about it, the worker count decisions are taken from,
//! and its [`HubEngine`], whose decisions (telling sleeping timers from work, the
//! algorithms, the metric value) are the same engine the simulator and `recommend` run.
//!
//! Every change is one method that returns what changed ([`Outcome`]: the activity and
//! answerability to publish, a recommendation change to log, the gauges), so the registry
//! never reads a hub's state back after changing it, and every answer (KEDA's
//! [`HubState::answer`], `/hubs`'s [`HubState::status`]) is taken from one consistent state.
//! Pure: reports, probe results and the time come in as values, so all of it is unit-tested
//! below.

use crate::clock::UnixMs;
use crate::heuristic::Recommendation;
use crate::heuristic::engine::{AppQueueSettings, EngineSettings, HubEngine, TriggerInputs};
use crate::reading::HubReading;
use crate::storage::{Connection, PartitionMode};

pub(crate) use super::coverage::CoverageView;
use super::coverage::{Coverage, ReportedPod};
pub use super::coverage::{PodAdmission, PodsFull, SidecarNotes};
use super::settings::{EffectiveLimits, HubSettings, ReportedLimits, ReportedQueueSettings};
use super::sources::{PodCost, ScaledObjectKey};

/// How long the worker-count source's last answer stands in when it cannot answer.
pub(crate) const SOURCE_ANSWER_KEPT_MS: i64 = 60_000;

/// Pods silent this long are forgotten (their partitions were uncovered long before).
const FORGET_SILENT_PODS_MS: i64 = 10 * 60 * 1000;

/// Where a hub lives: KEDA's ScaledObject namespace (= the app pods' namespace) and the task
/// hub name lowercased (queue names are lowercased, so case does not tell hubs apart).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HubKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name, lowercased.
    pub task_hub: String,
}

impl HubKey {
    /// The key of `task_hub` (any case) in `namespace`.
    pub fn new(namespace: &str, task_hub: &str) -> Self {
        Self { namespace: namespace.to_string(), task_hub: task_hub.to_ascii_lowercase() }
    }
}

/// A report that passed validation (see `reports::validate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidReport {
    /// The reporting pod's name.
    pub pod: String,
    /// What it read: P (0 when the sidecar could not tell), the control queues the pod owns,
    /// and the work-item queue when this pod reports it.
    pub reading: HubReading,
    /// The sidecar's interval, ms (> 0).
    pub interval_ms: u64,
    /// The pod is shutting down.
    pub leaving: bool,
    /// When the sidecar took the report.
    pub sampled_at_unix_ms: i64,
    /// The app's per-pod limits, when the sidecar reports them.
    pub limits: Option<ReportedLimits>,
    /// The app's queue settings, when the sidecar reports them.
    pub queue_settings: Option<ReportedQueueSettings>,
    /// What the sidecar says of itself.
    pub sidecar: SidecarNotes,
}

/// A change of the recommendation, for the one log line it deserves.
#[derive(Debug, Clone, PartialEq)]
pub struct RecommendationChange {
    /// The desired worker count before, when there was a decision before.
    pub previous: Option<u32>,
    /// The new desired worker count.
    pub desired_workers: u32,
    /// The worker count it was decided from.
    pub workers: u32,
    /// The heuristic's reason.
    pub reason: String,
}

/// The per-hub gauges, as one state shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gauges {
    /// Partitions live sidecars cover.
    pub covered: usize,
    /// Partitions nobody covers.
    pub uncovered: usize,
    /// Invisible control messages taken for held work.
    pub held: u64,
    /// Invisible control messages taken for sleeping timers.
    pub timers: u64,
    /// Invisible work items.
    pub invisible_work_items: u64,
    /// The trigger gives a storage connection.
    pub connection_known: bool,
    /// The latest decision: desired workers and the workers it was taken from.
    pub decision: Option<(u32, u32)>,
    /// KEDA would be told UNAVAILABLE now.
    pub unavailable: bool,
    /// The visible messages of the latest readings.
    pub visible: crate::heuristic::engine::QueueMessages,
}

/// What one change to a hub did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    /// IsActive's answer now.
    pub active: bool,
    /// Every queue was read (KEDA may be answered).
    pub fully_read: bool,
    /// The recommendation changed.
    pub change: Option<RecommendationChange>,
    /// The ScaledObject that asks about the hub (the change is recorded on it).
    pub scaled_object: Option<ScaledObjectKey>,
    /// The gauges, when this change refreshes them (they look at every pod: the sampling
    /// loop's job, and a hub's first or a pod's last report).
    pub gauges: Option<Gauges>,
    /// What became of a reporting pod.
    pub admission: PodAdmission,
    /// Pods forgotten for being silent long.
    pub forgotten_pods: usize,
    /// The live pods' deletion costs, when the sampling loop evaluated the hub.
    pub costs: Option<Vec<PodCost>>,
}

/// Why KEDA cannot be answered about a hub now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unanswerable {
    /// Not every queue was read yet (the reason says what of it was and why not the rest).
    NotRead(String),
    /// Read before, but nobody can read it now: the last picture would decay.
    Stale(String),
}

/// KEDA's answer about a hub.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Answer {
    /// IsActive.
    pub active: bool,
    /// GetMetrics' value.
    pub metric_value: f64,
}

/// The cold probe's bookkeeping of one hub.
#[derive(Debug, Clone, Default)]
struct ProbeStatus {
    task_started: bool,
    last_error: Option<String>,
    /// The latest round left queues it set out to read unread (storage failed).
    missed: bool,
}

/// What the cold probe needs for one round.
#[derive(Debug, Clone)]
pub(crate) struct ProbePlan {
    /// The trigger's connection (the probe reads nothing without one).
    pub connection: Option<Connection>,
    /// The layout override.
    pub partition_mode: PartitionMode,
    /// The task hub name as configured.
    pub task_hub: String,
}

/// What `/hubs` shows of one tracked hub: what was decided, from what, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct HubStatus {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name as configured.
    pub task_hub: String,
    /// The ScaledObject that asks about it, once KEDA has called.
    pub scaled_object: Option<String>,
    /// `scaleAlgorithm` in force.
    pub algorithm: String,
    /// IsActive's answer now.
    pub active: bool,
    /// The latest decision's worker count, once one was made.
    pub desired_workers: Option<u32>,
    /// The worker count that decision was taken from.
    pub workers: u32,
    /// What GetMetrics reports.
    pub metric_value: f64,
    /// The latest decision's reason.
    pub reason: Option<String>,
    /// Partitions live sidecars cover, and those the cold probe reads.
    pub covered_partitions: Vec<u32>,
    /// Partitions no live sidecar covers.
    pub uncovered_partitions: Vec<u32>,
    /// Sidecars reporting now.
    pub live_pods: u32,
    /// What each live sidecar says of itself (version, ownership layout, storage error).
    pub sidecars: std::collections::BTreeMap<String, SidecarNotes>,
    /// Why KEDA calls would be refused now, if they would.
    pub probe_error: Option<String>,
    /// The per-worker limits decisions divide by, and where each comes from.
    pub limits: EffectiveLimits,
    /// How the cold probe reaches storage, when the trigger says (no secrets).
    pub storage: Option<StorageView>,
    /// What the user should know: metadata left to a default, limits that are a guess.
    pub notes: Vec<String>,
}

/// How the cold probe reaches a hub's storage account, for `/hubs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StorageView {
    /// `connection string` or `workload identity`.
    pub credential: &'static str,
    /// The Blob, Queue and Table endpoints (workload identity; a connection string's are
    /// not shown).
    pub endpoints: Vec<String>,
    /// The Entra ID authority tokens are asked from (workload identity).
    pub authority_host: Option<String>,
    /// The identity's client id, when the trigger names one.
    pub client_id: Option<String>,
}

impl StorageView {
    fn of(connection: &Connection) -> Self {
        match connection {
            Connection::String(_) => Self {
                credential: "connection string",
                endpoints: Vec::new(),
                authority_host: None,
                client_id: None,
            },
            Connection::Identity(identity) => Self {
                credential: "workload identity",
                endpoints: identity.endpoints().to_vec(),
                authority_host: Some(identity.cloud.authority_host().to_owned()),
                client_id: identity.client_id.clone(),
            },
        }
    }
}

/// The engine settings of a trigger's settings, the hub's effective limits and the app's
/// reported queue settings; `work_grace_ms` is the aggregator's (`--work-grace`), the
/// visibility timeout assumed when no pod has said.
fn engine_settings(
    settings: &HubSettings,
    limits: &EffectiveLimits,
    queues: Option<ReportedQueueSettings>,
    work_grace_ms: u64,
) -> EngineSettings {
    let queues = queues.unwrap_or_default();
    EngineSettings::for_trigger(&TriggerInputs {
        worker_startup_ms: settings.worker_startup_ms,
        max_polling_interval_ms: settings.max_polling_interval_ms,
        app: AppQueueSettings {
            control_queue_visibility_timeout_ms: queues.control_queue_visibility_timeout_ms,
            control_queue_buffer_threshold: queues.control_queue_buffer_threshold,
            max_queue_polling_interval_ms: queues.max_queue_polling_interval_ms,
        },
        work_grace_ms,
        random_scale_in: settings.random_scale_in,
        latency_seed: crate::heuristic::latency::seed_for(&settings.task_hub),
        ..TriggerInputs::new(
            settings.algorithm,
            crate::heuristic::target::TargetSettings {
                max_activities_per_worker: limits.max_activities,
                max_orchestrations_per_worker: limits.max_orchestrations,
            },
        )
    })
}

/// The merged view of one task hub and the decisions taken on it.
#[derive(Debug, Clone)]
pub struct HubState {
    settings: HubSettings,
    work_grace_ms: u64,
    engine: HubEngine,
    coverage: Coverage,
    probe: ProbeStatus,
    scaled_object: Option<ScaledObjectKey>,
    /// Something was read about this hub (a report or a probe, even "not provisioned").
    seen: bool,
    /// The probe found no task hub in storage.
    not_provisioned: bool,
    /// The worker-count source's last answer and when it came.
    source_workers: Option<(u32, UnixMs)>,
    /// The limits a pod last reported; kept when the pods go (scale to zero).
    reported_limits: Option<ReportedLimits>,
    /// The queue settings a pod last reported; kept likewise.
    reported_queues: Option<ReportedQueueSettings>,
}

impl HubState {
    /// A hub nothing is known about yet. `work_grace_ms`: see `heuristic::engine`'s docs.
    pub fn new(settings: HubSettings, work_grace_ms: u64) -> Self {
        let limits = EffectiveLimits::resolve(settings.limits, None);
        let engine = HubEngine::new(engine_settings(&settings, &limits, None, work_grace_ms), 0);
        Self {
            settings,
            work_grace_ms,
            engine,
            coverage: Coverage::default(),
            probe: ProbeStatus::default(),
            scaled_object: None,
            seen: false,
            not_provisioned: false,
            source_workers: None,
            reported_limits: None,
            reported_queues: None,
        }
    }

    /// Takes the settings of the latest KEDA call.
    pub fn update_settings(&mut self, settings: HubSettings) {
        if self.settings == settings {
            return;
        }
        self.settings = settings;
        self.refresh_engine_settings();
    }

    fn refresh_engine_settings(&mut self) {
        let limits = self.limits();
        self.engine.update_settings(engine_settings(
            &self.settings,
            &limits,
            self.reported_queues,
            self.work_grace_ms,
        ));
    }

    /// A KEDA call from `scaled_object` with `settings`: both are taken; returns true when
    /// the cold probe has yet to be started (once per hub).
    pub(crate) fn keda_call(&mut self, settings: &HubSettings, scaled_object: ScaledObjectKey) -> bool {
        self.update_settings(settings.clone());
        self.scaled_object = Some(scaled_object);
        !std::mem::replace(&mut self.probe.task_started, true)
    }

    /// The ScaledObject that last asked about this hub.
    pub(crate) fn scaled_object(&self) -> Option<&ScaledObjectKey> {
        self.scaled_object.as_ref()
    }

    /// The per-worker limits decisions divide by, and where they come from.
    pub fn limits(&self) -> EffectiveLimits {
        EffectiveLimits::resolve(self.settings.limits, self.reported_limits)
    }

    /// Every queue of the hub was read at least once (by reports or probes) since its
    /// partition count was learnt, or the probe found no hub in storage. Until then KEDA is
    /// answered UNAVAILABLE: an answer from a part of the hub could say idle while the unread
    /// partitions hold work (`keda` module docs).
    pub fn is_fully_read(&self) -> bool {
        self.not_provisioned || self.coverage.is_fully_read()
    }

    /// The partition count, when known.
    pub(crate) fn partition_count(&self) -> Option<u32> {
        self.coverage.partition_count()
    }

    /// A new P (first seen, or the hub was recreated) drops what was known per partition.
    fn reshape(&mut self, partition_count: u32) {
        if self.coverage.reshape(partition_count) {
            self.engine.reshape(partition_count as usize);
            self.not_provisioned = false;
        }
    }

    /// Merges one sidecar report received at `now`; unbounded (tests).
    #[cfg(test)]
    pub(crate) fn apply_report(&mut self, report: &ValidReport, now: UnixMs) {
        // Unbounded, so this cannot fail.
        let _ = self.apply_report_bounded(report, now, usize::MAX, true);
    }

    /// Merges one sidecar report received at `now`. A pod not tracked yet is added only
    /// while the hub tracks fewer than `max_pods` (and `may_add`: the registry's budget over
    /// all hubs; `coverage::Coverage::admit`). A report taken before the pod's latest (by the
    /// sidecar's own clock) arrived out of order and is ignored. The hub's first report
    /// decides at once, and it and a pod's last refresh the gauges.
    pub(crate) fn apply_report_bounded(
        &mut self,
        report: &ValidReport,
        now: UnixMs,
        max_pods: usize,
        may_add: bool,
    ) -> Result<Outcome, PodsFull> {
        let pod = ReportedPod {
            pod: &report.pod,
            sampled_at_unix_ms: report.sampled_at_unix_ms,
            interval_ms: report.interval_ms,
            leaving: report.leaving,
            work_item: report.reading.work_item.is_some(),
            sidecar: report.sidecar.clone(),
        };
        let admission = self.coverage.admit(&pod, now, max_pods, may_add)?;
        if admission == PodAdmission::OutOfOrder {
            return Ok(self.outcome(now, None, false, admission));
        }
        self.reshape(report.reading.partition_count);
        if self.partition_count() == Some(report.reading.partition_count) {
            for (partition, reading) in &report.reading.control {
                if self.coverage.reported(&report.pod, *partition, reading.sampled_at.as_millis()) {
                    self.engine.observe_control(*partition as usize, *reading, now);
                }
            }
        }
        if let Some(reading) = report.reading.work_item
            && self.coverage.reported_work_item(reading.sampled_at.as_millis())
        {
            self.engine.observe_work_item(reading, now);
        }
        let first = !std::mem::replace(&mut self.seen, true);
        let new_limits = report.limits.is_some() && report.limits != self.reported_limits;
        let new_queues = report.queue_settings.is_some() && report.queue_settings != self.reported_queues;
        if new_limits || new_queues {
            self.reported_limits = report.limits.or(self.reported_limits);
            self.reported_queues = report.queue_settings.or(self.reported_queues);
            self.refresh_engine_settings();
        }
        let change = if first { self.decide(now, None) } else { None };
        Ok(self.outcome(now, change, first || report.leaving, admission))
    }

    /// Merges what a cold probe read at `now` (`None`: it found no task hub in storage, so
    /// the app never ran and there is no work). The hub's first reading decides at once.
    pub(crate) fn apply_probe(&mut self, reading: Option<&HubReading>, now: UnixMs) -> Outcome {
        match reading {
            Some(reading) => {
                self.reshape(reading.partition_count);
                for (partition, queue) in &reading.control {
                    if self.coverage.probed(*partition) {
                        self.engine.observe_control(*partition as usize, *queue, now);
                    }
                }
                if let Some(queue) = reading.work_item {
                    self.engine.observe_work_item(queue, now);
                    self.coverage.probed_work_item();
                }
            }
            None => self.not_provisioned = true,
        }
        let first = !std::mem::replace(&mut self.seen, true);
        let change = if first { self.decide(now, None) } else { None };
        self.outcome(now, change, true, PodAdmission::Known)
    }

    /// Records the latest probe round's failure (`None`: it read). Returns the failure
    /// before, so a change is logged once.
    pub(crate) fn record_probe(&mut self, error: Option<String>) -> Option<String> {
        std::mem::replace(&mut self.probe.last_error, error)
    }

    /// Records whether the latest probe round left queues it set out to read unread.
    pub(crate) fn record_probe_missed(&mut self, missed: bool) {
        self.probe.missed = missed;
    }

    /// What the cold probe needs for a round.
    pub(crate) fn probe_plan(&self) -> ProbePlan {
        ProbePlan {
            connection: self.settings.connection.clone(),
            partition_mode: self.settings.partition_mode,
            task_hub: self.settings.task_hub.clone(),
        }
    }

    /// The trigger still gives the probe `connection` and `mode` (a round in flight with
    /// others is stopped and the next started with the new ones).
    pub(crate) fn probes_with(&self, connection: &Connection, mode: PartitionMode) -> bool {
        self.settings.connection.as_ref() == Some(connection) && self.settings.partition_mode == mode
    }

    /// The pods whose latest report is fresh and who are not leaving.
    pub(crate) fn live_pods(&self, now: UnixMs) -> u32 {
        self.coverage.live_pods(now)
    }

    /// How many pods the hub tracks (live or not).
    pub fn tracked_pods(&self) -> usize {
        self.coverage.tracked_pods()
    }

    /// What live sidecars cover at `now`, and what the probe must read.
    pub(crate) fn coverage(&self, now: UnixMs) -> CoverageView {
        self.coverage.view(now)
    }

    /// IsActive's answer at `now` ([`HubEngine::is_active`]).
    pub fn is_active(&self, now: UnixMs) -> bool {
        self.engine.is_active(now)
    }

    /// Partitions whose owner is lost, for `/hubs`.
    pub fn lost_partitions(&self) -> Vec<u32> {
        self.coverage.lost_partitions()
    }

    /// Why the picture of a seen hub cannot be answered from at `now`: some queue is covered
    /// by no live sidecar (a sidecar that cannot read storage reports no queues) and the cold
    /// probe failed to read it. The last readings would then be answered without end, and
    /// they decay (work in progress seen before the outage would settle into sleeping timers
    /// without a reading): KEDA is told UNAVAILABLE instead and keeps the replicas as they are
    /// (`keda` module docs).
    pub(crate) fn stale_reason(&self, key: &HubKey, now: UnixMs) -> Option<String> {
        if !self.probe.missed {
            return None;
        }
        let coverage = self.coverage.view(now);
        if coverage.is_complete() {
            return None;
        }
        Some(format!(
            "task hub {}: partitions {:?}{} not read: no live sidecar reads them and the cold probe failed: {}",
            key.task_hub,
            coverage.uncovered,
            if coverage.work_item_uncovered { " and the work-item queue" } else { "" },
            self.probe.last_error.as_deref().unwrap_or("(no error recorded)")
        ))
    }

    /// Why KEDA cannot be answered about a hub not wholly read yet: what of it was read, and
    /// why the probe did not read the rest.
    fn unread_reason(&self, key: &HubKey) -> String {
        let part = self.partition_count().map(|p| {
            let unread: Vec<u32> = (0..p).filter(|i| !self.coverage.was_read(*i)).collect();
            format!(
                "task hub {} read in part only (partitions not read yet: {unread:?} of {p}{}); ",
                key.task_hub,
                if self.coverage.work_item_was_read() { "" } else { ", nor the work-item queue" }
            )
        });
        let why = match (&self.probe.last_error, self.settings.connection.is_some()) {
            (Some(e), _) => {
                format!("no signals for task hub {} yet: the cold probe failed: {e}", key.task_hub)
            }
            (None, true) => {
                format!("no signals for task hub {} yet: the first cold probe is still running", key.task_hub)
            }
            (None, false) => format!(
                "no signals for task hub {} yet: no sidecar has reported and the trigger has no connection to probe with",
                key.task_hub
            ),
        };
        format!("{}{why}", part.unwrap_or_default())
    }

    /// KEDA's answer at `now`, from this one state: refused while the hub is not wholly read
    /// or nobody can read it any more.
    pub(crate) fn answer(&self, key: &HubKey, now: UnixMs) -> Result<Answer, Unanswerable> {
        if !self.is_fully_read() {
            return Err(Unanswerable::NotRead(self.unread_reason(key)));
        }
        if let Some(reason) = self.stale_reason(key, now) {
            return Err(Unanswerable::Stale(reason));
        }
        Ok(Answer { active: self.is_active(now), metric_value: self.metric_value() })
    }

    /// What `/hubs` should point out about this hub at `now`, in words a user can act on.
    pub fn notes(&self, now: UnixMs) -> Vec<String> {
        let mut notes = Vec::new();
        let split = self.engine.split(now);
        if split.held > 0 || split.invisible_work_items > 0 {
            notes.push(format!(
                "held in flight: {} invisible work item(s) and {} invisible control message(s) on {} partition(s) \
                 count as work (running or prefetched by a worker); no algorithm scales them away",
                split.invisible_work_items, split.held, split.held_partitions
            ));
        }
        if split.timers > 0 {
            notes.push(format!(
                "{} invisible control message(s) taken for sleeping timers: they appeared invisible and their queue \
                 has been quiet since",
                split.timers
            ));
        }
        let lost = self.lost_partitions();
        if !lost.is_empty() {
            notes.push(format!(
                "partition(s) {lost:?} lost their owner without it leaving; their invisible messages count as \
                 work until the visibility timeout could have passed"
            ));
        }
        for (pod, sidecar) in self.coverage.live(now) {
            if let Some(error) = &sidecar.sidecar.error {
                notes.push(format!("sidecar of pod {pod} cannot read all it owns: {error}"));
            }
        }
        notes
    }

    /// How the `durable` rules split the hub's invisible messages at `now` (for the metrics).
    pub fn split(&self, now: UnixMs) -> crate::heuristic::durable::Split {
        self.engine.split(now)
    }

    /// Forgets pods that have been silent for long; their partitions are long uncovered.
    /// Returns how many were forgotten.
    pub fn forget_silent_pods(&mut self, now: UnixMs, silent_for_ms: i64) -> usize {
        self.coverage.forget_silent_pods(now, silent_for_ms)
    }

    /// One sampling interval: decides the worker count through the engine from `workers`
    /// (the worker-count source's answer; when it has none this time, its answer of the last
    /// [`SOURCE_ANSWER_KEPT_MS`], so one slow API call does not flip the count; else the live
    /// reporting pods). A hub nobody can read now ([`HubState::stale_reason`]) is not
    /// re-decided: its last readings would decay, so its decision, activity and latency
    /// rings are held as they were until a sidecar or the probe reads it again.
    pub(crate) fn evaluate(&mut self, key: &HubKey, now: UnixMs, workers: Option<u32>) -> Outcome {
        let forgotten = self.forget_silent_pods(now, FORGET_SILENT_PODS_MS);
        let change = if self.stale_reason(key, now).is_some() { None } else { self.decide(now, workers) };
        let mut outcome = self.outcome(now, change, true, PodAdmission::Known);
        outcome.forgotten_pods = forgotten;
        outcome.costs = Some(self.deletion_costs(key, now));
        outcome
    }

    /// Decides at `now`; returns the change when the desired count differs from the last.
    fn decide(&mut self, now: UnixMs, workers: Option<u32>) -> Option<RecommendationChange> {
        if let Some(w) = workers {
            self.source_workers = Some((w, now));
        }
        if !self.seen {
            return None;
        }
        let recent = self.source_workers.filter(|(_, at)| now.millis_since(*at) <= SOURCE_ANSWER_KEPT_MS);
        let workers = recent.map(|(w, _)| w).unwrap_or_else(|| self.live_pods(now));
        let previous = self.engine.decision().map(|d| d.recommendation.desired_workers);
        let timeout = self.engine_visibility_timeout();
        for (partition, lost_at) in self.coverage.refresh_owners(now, timeout).into_iter().enumerate() {
            self.engine.set_owner_lost(partition, lost_at);
        }
        let decision = self.engine.evaluate(now, workers);
        let r = &decision.recommendation;
        (previous != Some(r.desired_workers)).then(|| RecommendationChange {
            previous,
            desired_workers: r.desired_workers,
            workers,
            reason: r.reason.clone(),
        })
    }

    /// The visibility timeout dead owners' messages count for: the app's, else `--work-grace`.
    fn engine_visibility_timeout(&self) -> u64 {
        self.reported_queues.and_then(|q| q.control_queue_visibility_timeout_ms).unwrap_or(self.work_grace_ms)
    }

    /// Each live pod's deletion cost at `now` (issue 20): the control messages held on the
    /// partitions it owns first (removing a pod that holds them strands them until their
    /// visibility timeout), then the partitions themselves (removing one moves its leases).
    /// Which pod runs which activity no reading tells: work items are one shared queue.
    fn deletion_costs(&self, key: &HubKey, now: UnixMs) -> Vec<PodCost> {
        let held = self.engine.held_by_partition(now);
        let per_message = i64::from(crate::contract::MAX_PARTITIONS) + 1;
        self.coverage
            .live(now)
            .map(|(pod, state)| {
                let messages: u64 =
                    state.partitions.iter().map(|p| held.get(*p as usize).copied().unwrap_or(0)).sum();
                let cost = i64::try_from(messages)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(per_message)
                    .saturating_add(i64::try_from(state.partitions.len()).unwrap_or(0));
                PodCost {
                    namespace: key.namespace.clone(),
                    pod: pod.clone(),
                    cost: i32::try_from(cost).unwrap_or(i32::MAX),
                }
            })
            .collect()
    }

    /// What a change leaves to publish.
    fn outcome(
        &self,
        now: UnixMs,
        change: Option<RecommendationChange>,
        gauges: bool,
        admission: PodAdmission,
    ) -> Outcome {
        Outcome {
            active: self.is_active(now),
            fully_read: self.is_fully_read(),
            change,
            scaled_object: self.scaled_object.clone(),
            gauges: gauges.then(|| self.gauges(now)),
            admission,
            forgotten_pods: 0,
            costs: None,
        }
    }

    fn gauges(&self, now: UnixMs) -> Gauges {
        let coverage = self.coverage.view(now);
        let split = self.engine.split(now);
        let key_free_stale = self.probe.missed && !coverage.is_complete();
        Gauges {
            covered: coverage.covered.len(),
            uncovered: coverage.uncovered.len(),
            held: split.held,
            timers: split.timers,
            invisible_work_items: split.invisible_work_items,
            connection_known: self.settings.connection.is_some(),
            decision: self.engine.decision().map(|d| (d.recommendation.desired_workers, d.workers)),
            unavailable: !self.is_fully_read() || key_free_stale,
            visible: self.engine.queue_messages(),
        }
    }

    /// This hub's status at `now`, for `/hubs`.
    pub(crate) fn status(&self, key: &HubKey, now: UnixMs) -> HubStatus {
        let coverage = self.coverage.view(now);
        let stale = self.stale_reason(key, now).map(|reason| {
            format!("decisions are held (not re-evaluated) and KEDA is told UNAVAILABLE until the hub is read again: {reason}")
        });
        HubStatus {
            namespace: key.namespace.clone(),
            task_hub: self.settings.task_hub.clone(),
            scaled_object: self.scaled_object.as_ref().map(|so| format!("{}/{}", so.namespace, so.name)),
            algorithm: self.settings.algorithm.to_string(),
            active: self.is_active(now),
            desired_workers: self.recommendation().map(|r| r.desired_workers),
            workers: self.workers(),
            metric_value: self.metric_value(),
            reason: self.recommendation().map(|r| r.reason.clone()),
            covered_partitions: coverage.covered,
            uncovered_partitions: coverage.uncovered,
            live_pods: self.live_pods(now),
            sidecars: self
                .coverage
                .live(now)
                .map(|(pod, state)| (pod.clone(), state.sidecar.clone()))
                .collect(),
            probe_error: self.probe.last_error.clone(),
            limits: self.limits(),
            storage: self.settings.connection.as_ref().map(StorageView::of),
            notes: self
                .settings
                .warnings
                .iter()
                .cloned()
                .chain(self.limits().note())
                .chain(self.notes(now))
                .chain(stale)
                .collect(),
        }
    }

    /// The latest recommendation, once one was made.
    pub fn recommendation(&self) -> Option<&Recommendation> {
        self.engine.decision().map(|d| &d.recommendation)
    }

    /// The worker count the latest recommendation was decided from.
    pub(crate) fn workers(&self) -> u32 {
        self.engine.decision().map_or(0, |d| d.workers)
    }

    /// The value GetMetrics reports (`heuristic::engine::metric_value`; 0 before a decision).
    pub fn metric_value(&self) -> f64 {
        self.engine.decision().map_or(0.0, |d| d.metric_value)
    }

    /// The latency rings, for inspection.
    #[cfg(test)]
    pub(crate) fn latencies(&self) -> &crate::heuristic::latency::TaskHubLatencies {
        self.engine.latencies()
    }

    /// The latest work-item latency ring.
    pub fn work_item_latencies(&self) -> &crate::heuristic::latency::LatencyHistory {
        self.engine.work_item_latencies()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heuristic::Algorithm;
    use crate::reading::QueueReading;
    use std::collections::HashMap;

    const GRACE: u64 = 60_000;

    fn settings(algorithm: Algorithm) -> HubSettings {
        let mut s = HubSettings::from_metadata(&HashMap::from([("taskHubName".into(), "MyHub".into())]))
            .expect("valid metadata");
        s.algorithm = algorithm;
        s
    }

    fn q(approximate: u64, visible: u32, age_ms: u64) -> QueueReading {
        QueueReading {
            approximate_count: approximate,
            visible_count: visible,
            first_visible_age_ms: age_ms,
            redelivered_count: 0,
            sampled_at: UnixMs(0),
        }
    }

    fn report(
        pod: &str,
        partitions: &[u32],
        signals: QueueReading,
        work_item: Option<QueueReading>,
    ) -> ValidReport {
        ValidReport {
            pod: pod.into(),
            reading: HubReading {
                partition_count: 4,
                control: partitions.iter().map(|p| (*p, signals)).collect(),
                work_item,
            },
            interval_ms: 1000,
            leaving: false,
            sampled_at_unix_ms: 0,
            limits: None,
            queue_settings: None,
            sidecar: SidecarNotes::default(),
        }
    }

    fn key() -> HubKey {
        HubKey::new("apps", "MyHub")
    }

    fn probe(control: QueueReading, work_item: QueueReading) -> HubReading {
        HubReading {
            partition_count: 4,
            control: (0..4).map(|p| (p, control)).collect(),
            work_item: Some(work_item),
        }
    }

    #[test]
    fn the_last_reported_limits_survive_the_pods_going() {
        use super::super::settings::{LimitSource, WorkerLimits};
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        let mut last = report("a", &[0, 1, 2, 3], q(0, 0, 0), None);
        last.limits = Some(ReportedLimits {
            limits: WorkerLimits { max_activities: 20, max_orchestrations: 20 },
            processor_count: 2,
        });
        last.leaving = true;
        hub.apply_report(&last, UnixMs(0));
        hub.forget_silent_pods(UnixMs(3_600_000), 600_000);
        assert_eq!(hub.live_pods(UnixMs(3_600_000)), 0);
        let limits = hub.limits();
        assert_eq!((limits.max_activities, limits.activities_from), (20, LimitSource::Reported));
    }

    #[test]
    fn nothing_is_decided_before_anything_was_read() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        assert!(!hub.seen);
        assert_eq!(hub.evaluate(&key(), UnixMs(0), Some(1)).change, None);
        assert_eq!(hub.coverage(UnixMs(0)).partition_count, None);
        assert!(hub.coverage(UnixMs(0)).work_item_uncovered);
    }

    #[test]
    fn a_fresh_sidecar_covers_its_partitions_and_the_rest_is_uncovered() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(0));
        let c = hub.coverage(UnixMs(1000));
        assert_eq!((c.covered, c.uncovered, c.work_item_uncovered), (vec![0, 1], vec![2, 3], false));
    }

    #[test]
    fn a_sidecar_silent_for_three_intervals_uncovers_its_partitions() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(0));
        assert!(hub.coverage(UnixMs(3000)).is_complete());
        let c = hub.coverage(UnixMs(3001));
        assert_eq!(c.uncovered, vec![0, 1, 2, 3]);
        assert!(c.work_item_uncovered);
    }

    #[test]
    fn a_leaving_pod_uncovers_its_partitions_at_once() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        let mut last = report("a", &[0, 1, 2, 3], q(0, 0, 0), None);
        last.leaving = true;
        hub.apply_report(&last, UnixMs(0));
        assert_eq!(hub.coverage(UnixMs(0)).uncovered, vec![0, 1, 2, 3]);
        assert_eq!(hub.live_pods(UnixMs(0)), 0);
    }

    #[test]
    fn a_partition_that_moved_to_another_pod_is_covered_by_it() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1], q(0, 0, 0), None), UnixMs(0));
        hub.apply_report(&report("b", &[2, 3], q(0, 0, 0), None), UnixMs(0));
        hub.apply_report(&report("a", &[0], q(0, 0, 0), None), UnixMs(500));
        hub.apply_report(&report("b", &[1, 2, 3], q(0, 0, 0), None), UnixMs(500));
        assert_eq!(hub.coverage(UnixMs(600)).covered, vec![0, 1, 2, 3]);
        assert_eq!(hub.live_pods(UnixMs(600)), 2);
    }

    #[test]
    fn a_timers_only_hub_is_inactive() {
        // Three sleeping timers in one control queue: never visible, count never moves.
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        for t in 0..10 {
            let mut control = vec![q(0, 0, 0); 4];
            control[2] = q(3, 0, 0);
            let reading = HubReading {
                partition_count: 4,
                control: control.into_iter().enumerate().map(|(i, s)| (i as u32, s)).collect(),
                work_item: Some(q(0, 0, 0)),
            };
            hub.apply_probe(Some(&reading), UnixMs(t * 2000));
            assert!(!hub.is_active(UnixMs(t * 2000)), "timers keep nothing awake (sample {t})");
        }
        hub.evaluate(&key(), UnixMs(20_000), Some(0));
        assert_eq!(hub.recommendation().map(|r| r.desired_workers), Some(0));
    }

    #[test]
    fn timers_set_by_work_sleep_once_the_grace_period_is_over() {
        let mut hub = HubState::new(settings(Algorithm::TargetInflight), GRACE);
        hub.apply_probe(Some(&probe(q(1, 1, 10), q(0, 0, 0))), UnixMs(0)); // an orchestration message
        hub.apply_probe(Some(&probe(q(1, 0, 0), q(0, 0, 0))), UnixMs(2000)); // it ran and set a timer
        assert!(hub.is_active(UnixMs(2000 + GRACE as i64)));
        hub.apply_probe(Some(&probe(q(1, 0, 0), q(0, 0, 0))), UnixMs(2000 + GRACE as i64 + 1));
        assert!(!hub.is_active(UnixMs(2000 + GRACE as i64 + 1)));
    }

    #[test]
    fn a_dequeued_running_message_keeps_the_hub_active() {
        // An activity message was seen visible, then dequeued: now invisible, being processed.
        let mut hub = HubState::new(settings(Algorithm::TargetInflight), GRACE);
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(1, 1, 50))), UnixMs(0));
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(1, 0, 0))), UnixMs(2000));
        assert!(hub.is_active(UnixMs(2000)));
        assert!(hub.is_active(UnixMs(30_000)));
        hub.evaluate(&key(), UnixMs(30_000), Some(1));
        assert_eq!(hub.recommendation().map(|r| r.desired_workers), Some(1));
    }

    #[test]
    fn work_whose_invisible_count_moves_is_active_though_never_seen_visible() {
        let mut hub = HubState::new(settings(Algorithm::TargetInflight), GRACE);
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(2, 0, 0))), UnixMs(0));
        // Work items never carry timers: invisible ones are running, from the first reading
        // (issue 18; before it, no history read as sleeping).
        assert!(hub.is_active(UnixMs(0)), "invisible work items are work in flight");
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(5, 0, 0))), UnixMs(2000));
        assert!(hub.is_active(UnixMs(2000)));
    }

    #[test]
    fn a_visible_message_makes_the_hub_active_at_once() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(0, 0, 0))), UnixMs(0));
        assert!(!hub.is_active(UnixMs(0)));
        hub.apply_report(&report("a", &[3], q(1, 1, 0), None), UnixMs(1000));
        assert!(hub.is_active(UnixMs(1000)));
    }

    #[test]
    fn the_target_formula_counts_visible_and_working_messages() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        // The first reading of a hub is decided on at once.
        let change = hub
            .apply_probe(Some(&probe(q(0, 0, 0), q(25, 25, 100))), UnixMs(0))
            .change
            .expect("first decision");
        assert_eq!(change.desired_workers, 3);
        assert!(change.reason.starts_with("Target 3 workers"), "{}", change.reason);
        assert_eq!(hub.evaluate(&key(), UnixMs(1000), Some(0)).change, None, "same decision, no change");
    }

    #[test]
    fn without_a_worker_source_the_live_pods_are_the_workers() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(0));
        hub.apply_report(&report("b", &[2, 3], q(0, 0, 0), None), UnixMs(0));
        hub.evaluate(&key(), UnixMs(100), None);
        assert_eq!(hub.workers(), 2);
    }

    #[test]
    fn a_missing_source_answer_keeps_the_last_one_for_a_minute() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(0));
        hub.evaluate(&key(), UnixMs(0), Some(7));
        hub.evaluate(&key(), UnixMs(1000), None);
        assert_eq!(hub.workers(), 7, "the source's answer stands in");
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(61_000));
        hub.evaluate(&key(), UnixMs(61_001), None);
        assert_eq!(hub.workers(), 1, "then the live pods count");
    }

    #[test]
    fn the_latency_vote_runs_over_rings_filled_one_sample_per_reading() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        for t in 0..4 {
            hub.apply_probe(Some(&probe(q(0, 0, 0), q(5, 5, 2000))), UnixMs(t * 1000));
            let r = hub.evaluate(&key(), UnixMs(t * 1000), Some(1)).change;
            assert_eq!(hub.recommendation().map(|r| r.reason.as_str()), Some("Not enough samples"), "{r:?}");
        }
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(5, 5, 2000))), UnixMs(4000));
        assert_eq!(hub.evaluate(&key(), UnixMs(4000), Some(1)).change.map(|c| c.desired_workers), Some(2));
        assert_eq!(hub.work_item_latencies().samples(), [2000; 5]);
        assert!(hub.recommendation().is_some_and(|r| r.reason.starts_with("Work-item queue latency")));
    }

    #[test]
    fn the_latency_vote_asks_for_a_first_worker_at_zero() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        // The first reading of a hub is decided on at once (the live pods: none).
        assert_eq!(
            hub.apply_probe(Some(&probe(q(1, 1, 10), q(0, 0, 0))), UnixMs(0))
                .change
                .map(|c| (c.desired_workers, c.reason)),
            Some((1, "First worker".into()))
        );
    }

    #[test]
    fn a_new_partition_count_resets_the_rings() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        hub.apply_probe(Some(&probe(q(0, 0, 0), q(0, 0, 0))), UnixMs(0));
        hub.evaluate(&key(), UnixMs(0), Some(1));
        assert_eq!(hub.latencies().control.len(), 4);
        hub.apply_probe(
            Some(&HubReading { partition_count: 8, control: vec![], work_item: None }),
            UnixMs(1000),
        );
        assert_eq!(hub.latencies().control.len(), 8);
        assert_eq!(hub.partition_count(), Some(8));
    }

    #[test]
    fn a_full_hub_replaces_its_stalest_silent_pod_and_refuses_while_all_are_live() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        let bounded = |hub: &mut HubState, pod: &str, at: i64| {
            hub.apply_report_bounded(&report(pod, &[], q(0, 0, 0), None), UnixMs(at), 2, true)
                .map(|o| o.admission)
        };
        assert_eq!(bounded(&mut hub, "a", 0), Ok(PodAdmission::Added));
        assert_eq!(bounded(&mut hub, "b", 1000), Ok(PodAdmission::Added));
        assert_eq!(bounded(&mut hub, "c", 2000), Err(PodsFull { tracked: 2 }), "a and b are live");
        assert_eq!(bounded(&mut hub, "b", 3500), Ok(PodAdmission::Known));
        assert_eq!(bounded(&mut hub, "c", 3500), Ok(PodAdmission::Replaced), "a is silent for 3 intervals");
        assert_eq!(hub.tracked_pods(), 2);
        assert_eq!(hub.live_pods(UnixMs(3500)), 2);
    }

    #[test]
    fn out_of_order_reports_are_ignored() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        let taken_at = |mut r: ValidReport, at: i64| {
            r.sampled_at_unix_ms = at;
            r
        };
        hub.apply_report(&taken_at(report("a", &[0], q(4, 4, 0), None), 2000), UnixMs(2100));
        hub.apply_report(&taken_at(report("a", &[0], q(0, 0, 0), None), 1000), UnixMs(2200));
        assert!(hub.is_active(UnixMs(2200)), "the older reading does not replace the newer");
    }

    #[test]
    fn a_sidecar_reading_evaluated_several_times_is_one_latency_sample() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        let mut reading = report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(3, 3, 700)));
        for (sampled_at, ticks) in [(1_000, [1_000, 3_000, 5_000]), (6_000, [6_000, 8_000, 10_000])] {
            reading.sampled_at_unix_ms = sampled_at;
            if let Some(w) = reading.reading.work_item.as_mut() {
                w.sampled_at = UnixMs(sampled_at);
            }
            for tick in ticks {
                // The report sent again (same reading) and evaluated every tick.
                hub.apply_report(&reading, UnixMs(tick));
                hub.evaluate(&key(), UnixMs(tick), Some(1));
            }
        }
        assert_eq!(hub.work_item_latencies().samples(), [0, 0, 0, 700, 700], "two readings, two samples");
    }

    #[test]
    fn a_dead_owners_in_flight_messages_keep_the_hub_active() {
        /// One sampling interval at `at`: partition 2 shows `control`, read by the pod's
        /// sidecar or, once it is silent, by the cold probe.
        fn tick(hub: &mut HubState, at: i64, control: QueueReading, from_pod: bool) {
            let mut r = report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0)));
            r.interval_ms = 5_000;
            r.sampled_at_unix_ms = at;
            for (_, reading) in r.reading.control.iter_mut() {
                reading.sampled_at = UnixMs(at);
            }
            r.reading.control[2].1 = QueueReading { sampled_at: UnixMs(at), ..control };
            if from_pod {
                hub.apply_report(&r, UnixMs(at));
            } else {
                let reading = HubReading { control: r.reading.control, ..probe(q(0, 0, 0), q(0, 0, 0)) };
                hub.apply_probe(Some(&reading), UnixMs(at));
            }
            hub.evaluate(&key(), UnixMs(at), Some(1));
        }
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        // 50 sleeping timers; three messages come in, the owner dequeues them and dies.
        for i in 0..13 {
            tick(&mut hub, i * 5_000, q(50, 0, 0), true);
        }
        tick(&mut hub, 65_000, q(53, 3, 100), true);
        tick(&mut hub, 70_000, q(53, 0, 0), true);
        // The loss is told once the sidecar has been silent for over three intervals (85 s); from
        // then until the visibility timeout after its last report (70 s) the three are work.
        let mut at = 75_000;
        while at < 70_000 + GRACE as i64 {
            tick(&mut hub, at, q(53, 0, 0), false);
            if at > 85_000 {
                assert!(hub.is_active(UnixMs(at)), "at {} s: {:?}", at / 1000, hub.recommendation());
            }
            at += 5_000;
        }
        assert_eq!(hub.lost_partitions(), vec![0, 1, 2, 3], "the silent pod held them all");
        let notes = hub.notes(UnixMs(at));
        assert!(notes.iter().any(|n| n.contains("lost their owner")), "{notes:?}");
    }

    #[test]
    fn a_sidecar_whose_reads_run_long_stays_a_worker_while_the_probe_reads_for_it() {
        // CI's in-flight failure: a pod prefetched 241 messages of partition 0, its sidecar
        // read partitions 1-3 but not 0 (a read timed out) and the probe read 0; then its next
        // poll ran long. With no worker source the live pods are the workers.
        fn run(resend: bool) -> Vec<(i64, bool, u32)> {
            let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
            let mut r = report("a", &[1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0)));
            r.interval_ms = 5_000;
            let backlog = |at: i64, approximate: u64, visible: u32| HubReading {
                control: vec![(0, QueueReading { sampled_at: UnixMs(at), ..q(approximate, visible, 100) })],
                ..probe(q(0, 0, 0), q(0, 0, 0))
            };
            hub.apply_probe(Some(&backlog(0, 240, 32)), UnixMs(0));
            hub.apply_report(&r, UnixMs(0));
            hub.evaluate(&key(), UnixMs(0), None);
            let mut answers = Vec::new();
            let mut at = 2_500;
            // Up to the visibility timeout (GRACE here): counts that stand still that long
            // settle into timers whoever reads them (durable, "Known blind spots").
            while at < GRACE as i64 {
                // One finished, one arrived and prefetched: the counts stand still.
                hub.apply_probe(Some(&backlog(at, 241, 0)), UnixMs(at));
                if resend && at % 7_500 == 0 {
                    hub.apply_report(&r, UnixMs(at));
                }
                hub.evaluate(&key(), UnixMs(at), None);
                answers.push((at, hub.is_active(UnixMs(at)), hub.live_pods(UnixMs(at))));
                if resend && at > 15_000 {
                    let c = hub.coverage(UnixMs(at));
                    assert_eq!(c.uncovered, vec![0, 1, 2, 3], "readings 15 s old are read by the probe");
                    assert!(hub.lost_partitions().is_empty(), "a live pod loses nothing");
                }
                at += 2_500;
            }
            answers
        }
        for (at, active, live) in run(true) {
            assert!(active && live == 1, "at {} s: active {active}, {live} live pod(s)", at / 1000);
        }
        // Without the report sent again the pod is no worker after three intervals, and with no
        // worker nothing holds the backlog: it reads as sleeping timers (durable, rule 2).
        let silent = run(false);
        assert!(silent.iter().any(|&(_, active, live)| !active && live == 0), "{silent:?}");
    }

    #[test]
    fn a_pod_that_leaves_lets_its_partitions_go_cleanly() {
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        let mut last = report("a", &[0, 1, 2, 3], q(0, 0, 0), None);
        hub.apply_report(&last, UnixMs(0));
        hub.evaluate(&key(), UnixMs(0), Some(1));
        last.leaving = true;
        last.sampled_at_unix_ms = 1_000;
        hub.apply_report(&last, UnixMs(1_000));
        hub.evaluate(&key(), UnixMs(1_000), Some(1));
        assert_eq!(hub.lost_partitions(), Vec::<u32>::new());
        // A pod that goes silent instead loses them.
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), None), UnixMs(0));
        hub.evaluate(&key(), UnixMs(0), Some(1));
        hub.evaluate(&key(), UnixMs(3_001), Some(1));
        assert_eq!(hub.lost_partitions(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn under_the_durable_algorithm_timers_set_by_work_sleep_once_their_queue_is_quiet() {
        // Timers set by work a moment ago: the control count moved, then sits still.
        let settle = crate::heuristic::durable::DurableSettings::default().settle_ms as i64;
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        hub.apply_probe(Some(&probe(q(2, 2, 100), q(0, 0, 0))), UnixMs(0));
        hub.evaluate(&key(), UnixMs(0), Some(1));
        assert!(hub.is_active(UnixMs(0)), "visible orchestration messages are work");
        let mut t = 2_000;
        while t <= 2_000 + settle + 10_000 {
            hub.apply_probe(Some(&probe(q(1, 0, 0), q(0, 0, 0))), UnixMs(t));
            hub.evaluate(&key(), UnixMs(t), Some(1));
            assert_eq!(
                hub.is_active(UnixMs(t)),
                t < 2_000 + settle,
                "at {t} ms: held until the queue was quiet"
            );
            t += 2_000;
        }
        assert_eq!(hub.recommendation().map(|r| r.desired_workers), Some(0));
    }

    #[test]
    fn under_every_algorithm_a_renewed_work_item_keeps_its_worker_however_long() {
        for algorithm in Algorithm::ALL {
            let mut hub = HubState::new(settings(algorithm), GRACE);
            let mut t = 0;
            while t <= 30 * 60_000 {
                // One work item dequeued and renewed: invisible, the count unmoved, for 30 min.
                hub.apply_probe(Some(&probe(q(0, 0, 0), q(1, 0, 0))), UnixMs(t));
                hub.evaluate(&key(), UnixMs(t), Some(1));
                assert!(hub.is_active(UnixMs(t)), "{algorithm} at {t} ms: {:?}", hub.recommendation());
                assert_eq!(hub.recommendation().map(|r| r.desired_workers), Some(1), "{algorithm} at {t} ms");
                t += 10_000;
            }
            assert_eq!(hub.split(UnixMs(t)).invisible_work_items, 1);
            assert!(
                hub.notes(UnixMs(t)).iter().any(|n| n.contains("held in flight: 1 invisible work item(s)"))
            );
        }
    }
}
