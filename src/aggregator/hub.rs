//! One task hub's merged view: which pods report what, what the cold probe must read, which
//! worker count decisions are taken from, and which partitions lost their owner. The
//! decisions themselves (telling sleeping timers from work, the algorithms, the metric value)
//! are [`HubEngine`]'s, the same engine the simulator and `recommend` run; this file feeds it
//! the readings of reports and probes (each sidecar reading once: a queue reading is known by
//! its `sampled_at`), the worker count, and owner liveness. Pure: reports, probe results and
//! the time come in as values, so all of it is unit-tested below.
//!
//! A partition's owner is **lost** when the live pod that reported it stops covering it
//! without saying it leaves: its sidecar went silent for [`STALE_AFTER_INTERVALS`], or it
//! stopped reporting the partition (its lease lapsed) and no live pod took it over. It is
//! lost as of its last report, the last moment it was seen. DTFx hides the messages such an
//! owner had dequeued until their visibility timeout lapses, so for that long after its last
//! report (the aggregator's `--work-grace`) the engine counts them as work, not timers
//! (`heuristic::durable`, rule 3). A pod that leaves (its last report says so) lets its
//! partitions go cleanly: DTFx drains and abandons its messages on shutdown.

use std::collections::{BTreeSet, HashMap};

use crate::clock::UnixMs;
use crate::heuristic::Recommendation;
use crate::heuristic::engine::{EngineSettings, HubEngine};
use crate::reading::HubReading;

use super::settings::{EffectiveLimits, HubSettings, ReportedLimits, ReportedQueueSettings};

/// How long the worker-count source's last answer stands in when it cannot answer.
pub(crate) const SOURCE_ANSWER_KEPT_MS: i64 = 60_000;

/// A partition whose sidecar has not reported for this many of its intervals is uncovered.
pub(crate) const STALE_AFTER_INTERVALS: i64 = 3;

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
}

/// What the probe should read next: everything no live sidecar covers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Coverage {
    /// The partition count, when known.
    pub partition_count: Option<u32>,
    /// Partitions some live sidecar reports.
    pub covered: Vec<u32>,
    /// Partitions no live sidecar reports.
    pub uncovered: Vec<u32>,
    /// No live sidecar reports the work-item queue.
    pub work_item_uncovered: bool,
}

impl Coverage {
    /// Nothing to probe.
    pub(crate) fn is_complete(&self) -> bool {
        self.partition_count.is_some() && self.uncovered.is_empty() && !self.work_item_uncovered
    }
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

/// What a report did to the hub's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAdmission {
    /// The pod was tracked already (or the report was out of order).
    Known,
    /// A new pod was added.
    Added,
    /// A new pod took the place of the least recently reported one, no longer live.
    Replaced,
}

/// A report from a new pod of a hub that tracks as many live pods as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the task hub tracks {tracked} pods, all reporting, and takes no more")]
pub struct PodsFull {
    /// How many pods the hub tracks.
    pub tracked: usize,
}

#[derive(Debug, Clone, Default)]
struct PodState {
    /// When the latest report arrived (aggregator clock: liveness survives clock skew).
    last_report: UnixMs,
    /// When the sidecar took it (sidecar clock: orders one pod's reports).
    last_sampled_ms: i64,
    interval_ms: u64,
    leaving: bool,
    partitions: BTreeSet<u32>,
    work_item: bool,
}

impl PodState {
    fn is_live(&self, now: UnixMs) -> bool {
        !self.leaving
            && now.millis_since(self.last_report)
                <= STALE_AFTER_INTERVALS.saturating_mul(i64::try_from(self.interval_ms).unwrap_or(i64::MAX))
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
    let defaults = EngineSettings::default();
    let queues = queues.unwrap_or_default();
    EngineSettings {
        algorithm: settings.algorithm,
        target: crate::heuristic::target::TargetSettings {
            max_activities_per_worker: limits.max_activities,
            max_orchestrations_per_worker: limits.max_orchestrations,
        },
        durable: crate::heuristic::durable::DurableSettings {
            max_activities_per_worker: limits.max_activities,
            max_orchestrations_per_worker: limits.max_orchestrations,
            startup_ms: settings.worker_startup_ms,
            buffer_threshold: queues
                .control_queue_buffer_threshold
                .unwrap_or(defaults.durable.buffer_threshold),
            ..defaults.durable
        },
        max_polling_interval_ms: settings
            .max_polling_interval_ms
            .or(queues.max_queue_polling_interval_ms)
            .unwrap_or(defaults.max_polling_interval_ms),
        work_grace_ms: queues.control_queue_visibility_timeout_ms.unwrap_or(work_grace_ms),
        random_scale_in: settings.random_scale_in,
        latency_seed: crate::heuristic::latency::seed_for(&settings.task_hub),
    }
}

/// Who last held one partition, for telling a lost owner (module docs).
#[derive(Debug, Clone, Default)]
struct Holder {
    /// The live pod that held it when last seen held.
    pod: Option<String>,
    /// When its owner was lost, until the visibility timeout has passed.
    lost_at: Option<UnixMs>,
}

/// The `sampled_at` of the last sidecar reading of each queue the engine took.
#[derive(Debug, Clone, Default)]
struct LastRead {
    work_item: Option<i64>,
    control: HashMap<u32, i64>,
}

/// The merged view of one task hub and the decisions taken on it.
#[derive(Debug, Clone)]
pub struct HubState {
    settings: HubSettings,
    work_grace_ms: u64,
    partition_count: Option<u32>,
    pods: HashMap<String, PodState>,
    engine: HubEngine,
    holders: Vec<Holder>,
    last_read: LastRead,
    observed: bool,
    /// What was read at least once since the partition count was learnt: the control queues
    /// and the work-item queue (KEDA gets no answer from a hub read only in part).
    read_once: BTreeSet<u32>,
    work_item_read_once: bool,
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
            partition_count: None,
            pods: HashMap::new(),
            engine,
            holders: Vec::new(),
            last_read: LastRead::default(),
            observed: false,
            read_once: BTreeSet::new(),
            work_item_read_once: false,
            not_provisioned: false,
            source_workers: None,
            reported_limits: None,
            reported_queues: None,
        }
    }

    /// The settings from the latest KEDA call.
    pub(crate) fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// Takes the settings of the latest KEDA call.
    pub fn update_settings(&mut self, settings: HubSettings) {
        let limits = EffectiveLimits::resolve(settings.limits, self.reported_limits);
        self.engine.update_settings(engine_settings(
            &settings,
            &limits,
            self.reported_queues,
            self.work_grace_ms,
        ));
        self.settings = settings;
    }

    /// The per-worker limits decisions divide by, and where they come from.
    pub fn limits(&self) -> EffectiveLimits {
        EffectiveLimits::resolve(self.settings.limits, self.reported_limits)
    }

    /// Something was read about this hub (a report or a probe, even "not provisioned").
    pub(crate) fn is_observed(&self) -> bool {
        self.observed
    }

    /// Every queue of the hub was read at least once (by reports or probes) since its
    /// partition count was learnt, or the probe found no hub in storage. Until then KEDA is
    /// answered UNAVAILABLE: an answer from a part of the hub could say idle while the unread
    /// partitions hold work (`keda` module docs).
    pub fn is_fully_read(&self) -> bool {
        self.not_provisioned
            || self
                .partition_count
                .is_some_and(|p| self.read_once.len() == p as usize && self.work_item_read_once)
    }

    /// Control queue `partition` was read at least once since the partition count was learnt.
    pub fn was_read(&self, partition: u32) -> bool {
        self.read_once.contains(&partition)
    }

    /// The work-item queue was read at least once.
    pub fn work_item_was_read(&self) -> bool {
        self.work_item_read_once
    }

    /// The partition count, when known.
    pub(crate) fn partition_count(&self) -> Option<u32> {
        self.partition_count
    }

    /// A new P (first seen, or the hub was recreated) drops what was known per partition.
    fn reshape(&mut self, partition_count: u32) {
        if partition_count == 0 || self.partition_count == Some(partition_count) {
            return;
        }
        self.partition_count = Some(partition_count);
        self.engine.reshape(partition_count as usize);
        self.read_once.clear();
        self.not_provisioned = false;
        self.holders = vec![Holder::default(); partition_count as usize];
        self.last_read = LastRead::default();
    }

    /// Merges one sidecar report received at `now`. A report taken before the pod's latest
    /// (by the sidecar's own clock) arrived out of order and is ignored.
    #[cfg(test)]
    pub(crate) fn apply_report(&mut self, report: &ValidReport, now: UnixMs) {
        // Unbounded, so this cannot fail.
        let _ = self.apply_report_bounded(report, now, usize::MAX, true);
    }

    /// [`HubState::apply_report`] with a bound on the pods tracked. A pod not tracked yet is added only while the hub tracks fewer than `max_pods`
    /// (and `may_add`: the registry's budget over all hubs); when full, the least recently
    /// reported pod makes room if it is no longer live, else the report is refused. Returns
    /// what became of the pod. The cost is constant but for that search, which only a new
    /// pod of a full hub pays and which `max_pods` bounds.
    pub(crate) fn apply_report_bounded(
        &mut self,
        report: &ValidReport,
        now: UnixMs,
        max_pods: usize,
        may_add: bool,
    ) -> Result<PodAdmission, PodsFull> {
        let mut admission = PodAdmission::Known;
        match self.pods.get(&report.pod) {
            Some(pod) if pod.last_sampled_ms > report.sampled_at_unix_ms => return Ok(admission),
            Some(_) => {}
            None if may_add && self.pods.len() < max_pods => admission = PodAdmission::Added,
            None => {
                let oldest = self.pods.iter().min_by_key(|(_, p)| p.last_report);
                match oldest {
                    Some((name, pod)) if !pod.is_live(now) => {
                        let name = name.clone();
                        self.pods.remove(&name);
                        admission = PodAdmission::Replaced;
                    }
                    _ => return Err(PodsFull { tracked: self.pods.len() }),
                }
            }
        }
        self.reshape(report.reading.partition_count);
        let shape_known = self.partition_count == Some(report.reading.partition_count);
        let mut pod = PodState {
            last_report: now,
            last_sampled_ms: report.sampled_at_unix_ms,
            interval_ms: report.interval_ms,
            leaving: report.leaving,
            partitions: BTreeSet::new(),
            work_item: false,
        };
        if shape_known {
            for (partition, reading) in &report.reading.control {
                if (*partition as usize) < self.engine.partitions() {
                    pod.partitions.insert(*partition);
                    self.read_once.insert(*partition);
                    // The same reading (a report sent again, or two reports of one read) is
                    // taken once: the latency vote adds one sample per reading.
                    let at = reading.sampled_at.as_millis();
                    let taken = self.last_read.control.insert(*partition, at);
                    if taken != Some(at) {
                        self.engine.observe_control(*partition as usize, *reading, now);
                    }
                }
            }
        }
        if let Some(reading) = report.reading.work_item {
            let at = reading.sampled_at.as_millis();
            let taken = self.last_read.work_item.replace(at);
            if taken != Some(at) {
                self.engine.observe_work_item(reading, now);
            }
            pod.work_item = true;
            self.work_item_read_once = true;
        }
        self.pods.insert(report.pod.clone(), pod);
        self.observed = true;
        let new_limits = report.limits.is_some() && report.limits != self.reported_limits;
        let new_queues = report.queue_settings.is_some() && report.queue_settings != self.reported_queues;
        if new_limits || new_queues {
            self.reported_limits = report.limits.or(self.reported_limits);
            self.reported_queues = report.queue_settings.or(self.reported_queues);
            let limits = self.limits();
            self.engine.update_settings(engine_settings(
                &self.settings,
                &limits,
                self.reported_queues,
                self.work_grace_ms,
            ));
        }
        Ok(admission)
    }

    /// How many pods the hub tracks (live or not).
    pub fn tracked_pods(&self) -> usize {
        self.pods.len()
    }

    /// Merges what a cold probe read at `now`.
    pub(crate) fn apply_probe(&mut self, reading: &HubReading, now: UnixMs) {
        self.reshape(reading.partition_count);
        for (partition, queue) in &reading.control {
            if self.engine.observe_control(*partition as usize, *queue, now) {
                self.read_once.insert(*partition);
            }
        }
        if let Some(queue) = reading.work_item {
            self.engine.observe_work_item(queue, now);
            self.work_item_read_once = true;
        }
        self.observed = true;
    }

    /// The probe found no task hub in storage: the app never ran, so there is no work.
    pub(crate) fn apply_not_provisioned(&mut self) {
        self.observed = true;
        self.not_provisioned = true;
    }

    /// The pods whose latest report is fresh and who are not leaving.
    pub(crate) fn live_pods(&self, now: UnixMs) -> u32 {
        self.pods.values().filter(|p| p.is_live(now)).count() as u32
    }

    /// What live sidecars cover at `now`, and what the probe must read.
    pub(crate) fn coverage(&self, now: UnixMs) -> Coverage {
        let live: Vec<&PodState> = self.pods.values().filter(|p| p.is_live(now)).collect();
        let Some(p) = self.partition_count else {
            return Coverage { partition_count: None, work_item_uncovered: true, ..Coverage::default() };
        };
        let (covered, uncovered) = (0..p).partition(|i| live.iter().any(|pod| pod.partitions.contains(i)));
        Coverage {
            partition_count: Some(p),
            covered,
            uncovered,
            work_item_uncovered: !live.iter().any(|pod| pod.work_item),
        }
    }

    /// IsActive's answer at `now` ([`HubEngine::is_active`]).
    pub fn is_active(&self, now: UnixMs) -> bool {
        self.engine.is_active(now)
    }

    /// Follows each partition's owner and tells the engine which were lost (module docs).
    fn refresh_owners(&mut self, now: UnixMs) {
        let timeout = i64::try_from(self.work_grace_ms).unwrap_or(i64::MAX);
        for (partition, holder) in self.holders.iter_mut().enumerate() {
            let p = partition as u32;
            let live_owner =
                self.pods.iter().find(|(_, pod)| pod.is_live(now) && pod.partitions.contains(&p));
            if let Some((name, _)) = live_owner {
                *holder = Holder { pod: Some(name.clone()), lost_at: None };
            } else if let Some(name) = holder.pod.take() {
                // Lost as of the owner's last report: the last moment it was seen holding the
                // messages (the baseline is frozen there, before a short window could absorb
                // them), whether it went silent since or reported without the partition.
                holder.lost_at = match self.pods.get(&name) {
                    Some(pod) if pod.leaving => None,
                    Some(pod) => Some(pod.last_report.min(now)),
                    None => Some(now),
                };
            }
            if holder.lost_at.is_some_and(|t| now.millis_since(t) >= timeout) {
                holder.lost_at = None;
            }
            self.engine.set_owner_lost(partition, holder.lost_at);
        }
    }

    /// Partitions whose owner is lost at `now`, for `/hubs`.
    pub fn lost_partitions(&self) -> Vec<u32> {
        (0..).zip(&self.holders).filter(|(_, h)| h.lost_at.is_some()).map(|(p, _)| p).collect()
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
        notes
    }

    /// The visible messages of the hub's queues at their latest readings (for the metric).
    pub(crate) fn queue_messages(&self) -> crate::heuristic::engine::QueueMessages {
        self.engine.queue_messages()
    }

    /// How the `durable` rules split the hub's invisible messages at `now` (for the metrics).
    pub fn split(&self, now: UnixMs) -> crate::heuristic::durable::Split {
        self.engine.split(now)
    }

    /// Forgets pods that have been silent for long; their partitions are long uncovered.
    /// Returns how many were forgotten.
    pub fn forget_silent_pods(&mut self, now: UnixMs, silent_for_ms: i64) -> usize {
        let before = self.pods.len();
        self.pods.retain(|_, p| now.millis_since(p.last_report) <= silent_for_ms);
        before - self.pods.len()
    }

    /// One sampling interval: decides the worker count through the engine from `workers`
    /// (the worker-count source's answer; when it has none this time, its answer of the last
    /// [`SOURCE_ANSWER_KEPT_MS`], so one slow API call does not flip the count; else the live
    /// reporting pods). Returns the change when the desired count differs from the last
    /// decision.
    pub(crate) fn evaluate(&mut self, now: UnixMs, workers: Option<u32>) -> Option<RecommendationChange> {
        if let Some(w) = workers {
            self.source_workers = Some((w, now));
        }
        if !self.observed {
            return None;
        }
        let recent = self.source_workers.filter(|(_, at)| now.millis_since(*at) <= SOURCE_ANSWER_KEPT_MS);
        let workers = recent.map(|(w, _)| w).unwrap_or_else(|| self.live_pods(now));
        let previous = self.engine.decision().map(|d| d.recommendation.desired_workers);
        self.refresh_owners(now);
        let decision = self.engine.evaluate(now, workers);
        let r = &decision.recommendation;
        (previous != Some(r.desired_workers)).then(|| RecommendationChange {
            previous,
            desired_workers: r.desired_workers,
            workers,
            reason: r.reason.clone(),
        })
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
        }
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
        assert!(!hub.is_observed());
        assert_eq!(hub.evaluate(UnixMs(0), Some(1)), None);
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
            hub.apply_probe(&reading, UnixMs(t * 2000));
            assert!(!hub.is_active(UnixMs(t * 2000)), "timers keep nothing awake (sample {t})");
        }
        hub.evaluate(UnixMs(20_000), Some(0));
        assert_eq!(hub.recommendation().map(|r| r.desired_workers), Some(0));
    }

    #[test]
    fn timers_set_by_work_sleep_once_the_grace_period_is_over() {
        let mut hub = HubState::new(settings(Algorithm::TargetInflight), GRACE);
        hub.apply_probe(&probe(q(1, 1, 10), q(0, 0, 0)), UnixMs(0)); // an orchestration message
        hub.apply_probe(&probe(q(1, 0, 0), q(0, 0, 0)), UnixMs(2000)); // it ran and set a timer
        assert!(hub.is_active(UnixMs(2000 + GRACE as i64)));
        hub.apply_probe(&probe(q(1, 0, 0), q(0, 0, 0)), UnixMs(2000 + GRACE as i64 + 1));
        assert!(!hub.is_active(UnixMs(2000 + GRACE as i64 + 1)));
    }

    #[test]
    fn a_dequeued_running_message_keeps_the_hub_active() {
        // An activity message was seen visible, then dequeued: now invisible, being processed.
        let mut hub = HubState::new(settings(Algorithm::TargetInflight), GRACE);
        hub.apply_probe(&probe(q(0, 0, 0), q(1, 1, 50)), UnixMs(0));
        hub.apply_probe(&probe(q(0, 0, 0), q(1, 0, 0)), UnixMs(2000));
        assert!(hub.is_active(UnixMs(2000)));
        assert!(hub.is_active(UnixMs(30_000)));
        hub.evaluate(UnixMs(30_000), Some(1));
        assert_eq!(hub.recommendation().map(|r| r.desired_workers), Some(1));
    }

    #[test]
    fn work_whose_invisible_count_moves_is_active_though_never_seen_visible() {
        let mut hub = HubState::new(settings(Algorithm::TargetInflight), GRACE);
        hub.apply_probe(&probe(q(0, 0, 0), q(2, 0, 0)), UnixMs(0));
        assert!(!hub.is_active(UnixMs(0)), "no history yet: counts as sleeping");
        hub.apply_probe(&probe(q(0, 0, 0), q(5, 0, 0)), UnixMs(2000));
        assert!(hub.is_active(UnixMs(2000)));
    }

    #[test]
    fn a_visible_message_makes_the_hub_active_at_once() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_probe(&probe(q(0, 0, 0), q(0, 0, 0)), UnixMs(0));
        assert!(!hub.is_active(UnixMs(0)));
        hub.apply_report(&report("a", &[3], q(1, 1, 0), None), UnixMs(1000));
        assert!(hub.is_active(UnixMs(1000)));
    }

    #[test]
    fn the_target_formula_counts_visible_and_working_messages() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_probe(&probe(q(0, 0, 0), q(25, 25, 100)), UnixMs(0));
        let change = hub.evaluate(UnixMs(0), Some(0)).expect("first decision");
        assert_eq!(change.desired_workers, 3);
        assert!(change.reason.starts_with("Target 3 workers"), "{}", change.reason);
        assert_eq!(hub.evaluate(UnixMs(1000), Some(0)), None, "same decision, no change");
    }

    #[test]
    fn without_a_worker_source_the_live_pods_are_the_workers() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(0));
        hub.apply_report(&report("b", &[2, 3], q(0, 0, 0), None), UnixMs(0));
        hub.evaluate(UnixMs(100), None);
        assert_eq!(hub.workers(), 2);
    }

    #[test]
    fn a_missing_source_answer_keeps_the_last_one_for_a_minute() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(0));
        hub.evaluate(UnixMs(0), Some(7));
        hub.evaluate(UnixMs(1000), None);
        assert_eq!(hub.workers(), 7, "the source's answer stands in");
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), Some(q(0, 0, 0))), UnixMs(61_000));
        hub.evaluate(UnixMs(61_001), None);
        assert_eq!(hub.workers(), 1, "then the live pods count");
    }

    #[test]
    fn the_latency_vote_runs_over_rings_filled_one_sample_per_reading() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        for t in 0..4 {
            hub.apply_probe(&probe(q(0, 0, 0), q(5, 5, 2000)), UnixMs(t * 1000));
            let r = hub.evaluate(UnixMs(t * 1000), Some(1));
            assert_eq!(hub.recommendation().map(|r| r.reason.as_str()), Some("Not enough samples"), "{r:?}");
        }
        hub.apply_probe(&probe(q(0, 0, 0), q(5, 5, 2000)), UnixMs(4000));
        assert_eq!(hub.evaluate(UnixMs(4000), Some(1)).map(|c| c.desired_workers), Some(2));
        assert_eq!(hub.work_item_latencies().samples(), [2000; 5]);
        assert!(hub.recommendation().is_some_and(|r| r.reason.starts_with("Work-item queue latency")));
    }

    #[test]
    fn the_latency_vote_asks_for_a_first_worker_at_zero() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        hub.apply_probe(&probe(q(1, 1, 10), q(0, 0, 0)), UnixMs(0));
        assert_eq!(
            hub.evaluate(UnixMs(0), Some(0)).map(|c| (c.desired_workers, c.reason)),
            Some((1, "First worker".into()))
        );
    }

    #[test]
    fn a_new_partition_count_resets_the_rings() {
        let mut hub = HubState::new(settings(Algorithm::Latency), GRACE);
        hub.apply_probe(&probe(q(0, 0, 0), q(0, 0, 0)), UnixMs(0));
        hub.evaluate(UnixMs(0), Some(1));
        assert_eq!(hub.latencies().control.len(), 4);
        hub.apply_probe(&HubReading { partition_count: 8, control: vec![], work_item: None }, UnixMs(1000));
        assert_eq!(hub.latencies().control.len(), 8);
        assert_eq!(hub.partition_count(), Some(8));
    }

    #[test]
    fn a_full_hub_replaces_its_stalest_silent_pod_and_refuses_while_all_are_live() {
        let mut hub = HubState::new(settings(Algorithm::Target), GRACE);
        let bounded = |hub: &mut HubState, pod: &str, at: i64| {
            hub.apply_report_bounded(&report(pod, &[], q(0, 0, 0), None), UnixMs(at), 2, true)
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
                hub.evaluate(UnixMs(tick), Some(1));
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
                hub.apply_probe(&reading, UnixMs(at));
            }
            hub.evaluate(UnixMs(at), Some(1));
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
    fn a_pod_that_leaves_lets_its_partitions_go_cleanly() {
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        let mut last = report("a", &[0, 1, 2, 3], q(0, 0, 0), None);
        hub.apply_report(&last, UnixMs(0));
        hub.evaluate(UnixMs(0), Some(1));
        last.leaving = true;
        last.sampled_at_unix_ms = 1_000;
        hub.apply_report(&last, UnixMs(1_000));
        hub.evaluate(UnixMs(1_000), Some(1));
        assert_eq!(hub.lost_partitions(), Vec::<u32>::new());
        // A pod that goes silent instead loses them.
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        hub.apply_report(&report("a", &[0, 1, 2, 3], q(0, 0, 0), None), UnixMs(0));
        hub.evaluate(UnixMs(0), Some(1));
        hub.evaluate(UnixMs(3_001), Some(1));
        assert_eq!(hub.lost_partitions(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn under_the_durable_algorithm_timers_set_by_work_sleep_once_their_queue_is_quiet() {
        // Timers set by work a moment ago: the control count moved, then sits still.
        let settle = crate::heuristic::durable::DurableSettings::default().settle_ms as i64;
        let mut hub = HubState::new(settings(Algorithm::Durable), GRACE);
        hub.apply_probe(&probe(q(2, 2, 100), q(0, 0, 0)), UnixMs(0));
        hub.evaluate(UnixMs(0), Some(1));
        assert!(hub.is_active(UnixMs(0)), "visible orchestration messages are work");
        let mut t = 2_000;
        while t <= 2_000 + settle + 10_000 {
            hub.apply_probe(&probe(q(1, 0, 0), q(0, 0, 0)), UnixMs(t));
            hub.evaluate(UnixMs(t), Some(1));
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
                hub.apply_probe(&probe(q(0, 0, 0), q(1, 0, 0)), UnixMs(t));
                hub.evaluate(UnixMs(t), Some(1));
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
