//! The one engine: a task hub's decision state, and the one path from queue readings to the
//! [`Recommendation`] and the metric value KEDA gets, whichever [`Algorithm`] runs.
//!
//! The aggregator keeps one [`HubEngine`] per tracked hub (`aggregator::hub`, which adds what
//! is not decision logic: pods, coverage, the worker-count source), the simulator one per
//! simulated app (`simulate::scalers`), `recommend` one per case. So a simulated
//! `durable-scaler` runs the production code from readings to metric, and a test
//! (tests/it/engine_equivalence.rs) holds the aggregator and the simulator to the same answers.
//!
//! Readings come in whenever they are taken ([`HubEngine::observe_work_item`],
//! [`HubEngine::observe_control`]; each call is one fresh reading of that queue); a decision is
//! taken once per sampling interval ([`HubEngine::evaluate`]). Time is always passed in.
//!
//! # What each algorithm is fed
//!
//! - `durable`: every evaluation records each queue's latest reading in the durable history;
//!   the algorithm counts every work item as work, tells held control messages from sleeping
//!   timers by how the invisible count came to be, and counts a dead owner's held messages as
//!   work until the visibility timeout (`heuristic::durable`'s module docs). IsActive: a visible message anywhere,
//!   or the latest decision's `keep_workers_alive`. The owner liveness it needs comes from
//!   the caller ([`HubEngine::set_owner_lost`]; the aggregator knows it from its sidecars).
//! - `latency`: as upstream's `DisconnectedPerformanceMonitor` is fed
//!   (DurableTask.AzureStorage, src/DurableTask.AzureStorage/Monitoring/
//!   DisconnectedPerformanceMonitor.cs, `UpdateQueueMetrics`: each `PulseAsync` reads every
//!   queue once and adds that reading's latency to the queue's ring). Here a queue's ring gets
//!   one sample per fresh reading, taken at the next evaluation; an evaluation with no new
//!   reading of a queue adds nothing to its ring, so a sidecar report read by several
//!   evaluations counts once (the `previous == 0` guard and "idle = 5 zero samples" keep
//!   their meaning). Random scale-in ("All queues are not busy", one chance in ten) is on, as
//!   upstream's `EnableRandomScaleDownOnLowLatency` defaults to true, drawn from a generator
//!   seeded per hub ([`EngineSettings::latency_seed`]); `randomScaleIn: "false"` turns it
//!   off. IsActive: a visible message anywhere, or the vote's `keep_workers_alive`
//!   (upstream's answer: the hub is idle after five zero-latency samples).
//! - `target`: the Functions host's `DurableTaskTargetScaler` (azure-functions-durable-extension,
//!   src/WebJobs.Extensions.DurableTask/Listener/DurableTaskTargetScaler.cs) with the inputs
//!   its `DurableTaskMetricsProvider` gives it: `PulseAsync`'s queue lengths, i.e. a queue's
//!   approximate count, or 0 when its peek returns nothing (`GetQueueMetricsAsync`). So
//!   sleeping timers never count, and neither do messages in progress when nothing is
//!   visible. IsActive: the target is above zero (a visible message anywhere).
//! - `target-inflight`: the same formula over lengths that also count invisible messages while
//!   their queue shows work in progress: a queue is **working** while its invisible count is
//!   non-zero and, within the last `work_grace_ms` (default [`DEFAULT_WORK_GRACE_MS`], DTFx's
//!   visibility timeout), either a message was visible in it or its invisible count changed;
//!   its length is then its approximate count. A timers-only hub turns inactive one grace
//!   period after its last movement. IsActive: a visible message, or a working queue.
//!
//! # The metric value
//!
//! KEDA's GetMetrics gets [`metric_value`] of the latest decision (target 1, AverageValue),
//! computed against the worker count that decision was taken from.

use super::durable::{self, DurableSettings, HubHistory};
use super::latency::{DEFAULT_MAX_POLLING_INTERVAL_MS, LatencyVoter, TaskHubLatencies};
use super::target::{self, TargetSettings};
use super::{Algorithm, Recommendation, hpa};
use crate::clock::UnixMs;
use crate::reading::QueueReading;

/// DTFx's visibility timeout, by default (5 minutes; the aggregator's `--work-grace`): how long
/// `target-inflight` counts a queue's invisible messages after its last movement, and how
/// long `durable` counts a dead owner's messages (the app's own timeout, when its pods report
/// it, wins).
pub(crate) const DEFAULT_WORK_GRACE_MS: u64 = durable::DEFAULT_VISIBILITY_TIMEOUT_MS;

/// A hub's visible messages at the latest readings (the `visible_messages` gauges of
/// `/metrics`; what is invisible, the durable rules split into held work and timers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct QueueMessages {
    /// Visible messages of the work-item queue (a peek sees at most 32).
    pub work_item_visible: u64,
    /// Visible messages over the control queues (at most 32 per queue seen).
    pub control_visible: u64,
}

/// Everything the engine needs to know about a hub's trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EngineSettings {
    /// Which algorithm decides.
    pub algorithm: Algorithm,
    /// The target formula's limits (`maxActivitiesPerWorker`, `maxOrchestrationsPerWorker`).
    pub target: TargetSettings,
    /// The durable algorithm's knobs.
    pub durable: DurableSettings,
    /// DTFx's maximum polling interval, for the latency vote (`maxPollingIntervalMs`).
    pub max_polling_interval_ms: u64,
    /// DTFx's visibility timeout: how long invisible messages count as work after their
    /// queue last moved under `target-inflight`, and `durable`'s
    /// [`DurableSettings::visibility_timeout_ms`] (module docs).
    pub work_grace_ms: u64,
    /// The latency vote's random scale-in (upstream's `EnableRandomScaleDownOnLowLatency`,
    /// default true; the trigger's `randomScaleIn`).
    pub random_scale_in: bool,
    /// The seed of the random scale-in's generator (the aggregator derives it from the hub's
    /// name with [`super::latency::seed_for`]; the simulator uses its run's seed).
    pub latency_seed: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            target: TargetSettings::default(),
            durable: DurableSettings::default(),
            max_polling_interval_ms: DEFAULT_MAX_POLLING_INTERVAL_MS,
            work_grace_ms: DEFAULT_WORK_GRACE_MS,
            random_scale_in: true,
            latency_seed: 0,
        }
    }
}

/// Everything a hub's engine settings are made of, wherever the engine runs: the aggregator
/// (a trigger's metadata, the pods' reports), `recommend` (a case file) and the simulator (its
/// flags). [`EngineSettings::for_trigger`] is the one place they become settings, so the three
/// cannot drift apart (e.g. `durable`'s limits differing from the target formula's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TriggerInputs {
    /// Which algorithm decides.
    pub algorithm: Algorithm,
    /// Activities and orchestrations one worker runs at once (the trigger's, else the pods'
    /// reported, else per CPU).
    pub limits: TargetSettings,
    /// How long a new pod takes to start (the trigger's `workerStartupSeconds`).
    pub worker_startup_ms: u64,
    /// The trigger's `maxPollingIntervalMs`, if it set one.
    pub max_polling_interval_ms: Option<u64>,
    /// What the app's own settings say (its `host.json` via the sidecar), if known.
    pub app: AppQueueSettings,
    /// The visibility timeout assumed when the app has not said (`--work-grace`).
    pub work_grace_ms: u64,
    /// The latency vote's random scale-in.
    pub random_scale_in: bool,
    /// Its generator's seed.
    pub latency_seed: u64,
    /// The `durable` algorithm's knobs that no trigger sets (the simulator tries others);
    /// its limits, buffer threshold and start-up delay are taken from the fields above.
    pub durable_tuning: DurableSettings,
}

/// The app's DurableTask queue settings as its pods report them (`host.json`
/// `extensions.durableTask.storageProvider`), each `None` when not said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct AppQueueSettings {
    /// `controlQueueVisibilityTimeout`, ms.
    pub control_queue_visibility_timeout_ms: Option<u64>,
    /// `controlQueueBufferThreshold`.
    pub control_queue_buffer_threshold: Option<u32>,
    /// `maxQueuePollingInterval`, ms.
    pub max_queue_polling_interval_ms: Option<u64>,
}

impl TriggerInputs {
    /// The defaults of everything but the algorithm and the limits.
    pub(crate) fn new(algorithm: Algorithm, limits: TargetSettings) -> Self {
        Self {
            algorithm,
            limits,
            worker_startup_ms: DurableSettings::default().startup_ms,
            max_polling_interval_ms: None,
            app: AppQueueSettings::default(),
            work_grace_ms: DEFAULT_WORK_GRACE_MS,
            random_scale_in: true,
            latency_seed: 0,
            durable_tuning: DurableSettings::default(),
        }
    }
}

impl EngineSettings {
    /// The engine settings of `inputs`: the trigger's polling interval before the app's, the
    /// app's visibility timeout before `--work-grace`, the app's buffer threshold before
    /// DurableTask's default.
    pub(crate) fn for_trigger(inputs: &TriggerInputs) -> Self {
        let defaults = Self::default();
        Self {
            algorithm: inputs.algorithm,
            target: inputs.limits,
            durable: DurableSettings {
                max_activities_per_worker: inputs.limits.max_activities_per_worker,
                max_orchestrations_per_worker: inputs.limits.max_orchestrations_per_worker,
                startup_ms: inputs.worker_startup_ms,
                buffer_threshold: inputs
                    .app
                    .control_queue_buffer_threshold
                    .unwrap_or(inputs.durable_tuning.buffer_threshold),
                ..inputs.durable_tuning
            },
            max_polling_interval_ms: inputs
                .max_polling_interval_ms
                .or(inputs.app.max_queue_polling_interval_ms)
                .unwrap_or(defaults.max_polling_interval_ms),
            work_grace_ms: inputs.app.control_queue_visibility_timeout_ms.unwrap_or(inputs.work_grace_ms),
            random_scale_in: inputs.random_scale_in,
            latency_seed: inputs.latency_seed,
        }
    }

    /// The `durable` algorithm's settings, its visibility timeout being [`Self::work_grace_ms`].
    pub(crate) fn durable_settings(&self) -> DurableSettings {
        DurableSettings { visibility_timeout_ms: self.work_grace_ms, ..self.durable }
    }

    fn voter(&self) -> LatencyVoter {
        if self.random_scale_in {
            LatencyVoter::with_random_scale_in(self.max_polling_interval_ms, self.latency_seed)
        } else {
            LatencyVoter::new(self.max_polling_interval_ms)
        }
    }
}

/// One decision: what the algorithm recommends and what KEDA is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The algorithm's answer.
    pub recommendation: Recommendation,
    /// The worker count it was decided from.
    pub workers: u32,
    /// What GetMetrics reports (target 1, AverageValue): [`metric_value`].
    pub metric_value: f64,
    /// Work live workers held when it was taken, if any (module docs, "Work in flight").
    pub in_flight: Option<InFlight>,
}

/// Work that running workers hold: what no algorithm may scale away (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// Invisible work items: activities running (renewed) or backing off.
    pub work_items: u64,
    /// Control messages the `durable` rules take for held by a worker, and on how many
    /// partitions.
    pub held_control: u64,
    /// Partitions with held control messages.
    pub held_partitions: u64,
    /// The fewest workers that run them: the activities at `maxActivitiesPerWorker` each,
    /// the held control messages at one worker per partition at most.
    pub workers: u32,
}

impl InFlight {
    /// The work in flight at `now` with `workers` running; `None` when there is none. At
    /// zero workers no control message is held (they are timers), but invisible work items
    /// still are work: the worker count may lag the pods that hold them.
    fn at(durable: &DurableSettings, history: &HubHistory, workers: u32, now: UnixMs) -> Option<Self> {
        let split = durable::split(durable, history, workers, now);
        // Visible work items are every algorithm's input already; the invisible ones are
        // activities running (renewed) or backing off.
        let work_items = split.invisible_work_items;
        let activities = work_items.div_ceil(u64::from(durable.max_activities_per_worker.max(1)));
        let held = split
            .held_partitions
            .min(split.held.div_ceil(u64::from(durable.max_orchestrations_per_worker.max(1))));
        let needed = u32::try_from(activities.max(held)).unwrap_or(u32::MAX);
        (needed > 0).then_some(Self {
            work_items,
            held_control: split.held,
            held_partitions: split.held_partitions,
            workers: needed,
        })
    }

    /// `recommendation`, kept active and raised to the workers this work needs when it asks
    /// for fewer: an algorithm whose inputs cannot see held work (upstream's `target` counts
    /// a queue whose peek is empty as 0; `latency` sees no latency in a held message) must
    /// not scale it away, since on Kubernetes nothing drains the app for the scaler.
    fn guard(&self, recommendation: Recommendation, workers: u32) -> Recommendation {
        if recommendation.desired_workers >= self.workers && recommendation.keep_workers_alive {
            return recommendation;
        }
        let desired = recommendation.desired_workers.max(self.workers);
        let reason = format!(
            "{}; held in flight, never scaled away: {} work item(s), {} control message(s) on {} partition(s) need {} worker(s)",
            recommendation.reason, self.work_items, self.held_control, self.held_partitions, self.workers
        );
        Recommendation::toward(workers, desired, true, reason)
    }
}

/// The value to report to KEDA for `desired` workers at `current` replicas under `algorithm`.
///
/// `durable` uses [`durable::metric_value`] (a step down within the HPA's tolerance is
/// reported as is, and so kept); the others [`hpa::metric_value`], which lands the HPA on the
/// desired count in both directions.
pub(crate) fn metric_value(algorithm: Algorithm, desired: u32, current: u32) -> f64 {
    match algorithm {
        Algorithm::Durable => durable::metric_value(desired, current),
        Algorithm::Target | Algorithm::TargetInflight | Algorithm::Latency => {
            hpa::metric_value(desired, current)
        }
    }
}

/// One queue: its latest reading and the history that tells timers from work.
#[derive(Debug, Clone, Copy, Default)]
struct QueueView {
    latest: Option<QueueReading>,
    /// When a visible message was last seen.
    last_visible: Option<UnixMs>,
    /// When the invisible count last changed between two readings.
    last_moved: Option<UnixMs>,
    /// The latest reading has not been added to the latency ring yet.
    fresh: bool,
}

impl QueueView {
    fn observe(&mut self, reading: QueueReading, now: UnixMs) {
        if reading.visible_count > 0 {
            self.last_visible = Some(now);
        }
        if let Some(previous) = self.latest
            && hidden(&previous) != hidden(&reading)
        {
            self.last_moved = Some(now);
        }
        self.latest = Some(reading);
        self.fresh = true;
    }

    fn has_visible(&self) -> bool {
        self.latest.is_some_and(|s| s.visible_count > 0)
    }

    fn is_working(&self, now: UnixMs, grace_ms: u64) -> bool {
        let grace = i64::try_from(grace_ms).unwrap_or(i64::MAX);
        let recent = |t: Option<UnixMs>| t.is_some_and(|t| now.millis_since(t) <= grace);
        self.latest.is_some_and(|s| hidden(&s) > 0) && (recent(self.last_visible) || recent(self.last_moved))
    }

    fn is_active(&self, now: UnixMs, grace_ms: u64) -> bool {
        self.has_visible() || self.is_working(now, grace_ms)
    }

    /// Upstream's length: the approximate count, 0 when the peek returned nothing.
    fn upstream_length(&self) -> u64 {
        match self.latest {
            Some(s) if s.visible_count > 0 => s.messages(),
            _ => 0,
        }
    }

    /// The length `target-inflight` sees (module docs).
    fn inflight_length(&self, now: UnixMs, grace_ms: u64) -> u64 {
        match self.latest {
            Some(s) if self.is_active(now, grace_ms) => s.messages(),
            _ => 0,
        }
    }

    /// The latency of a reading not sampled yet, once: upstream adds one sample per reading.
    fn take_fresh_latency(&mut self) -> Option<u64> {
        std::mem::take(&mut self.fresh).then(|| self.latest.map_or(0, |s| s.first_visible_age_ms))
    }

    /// The latest reading as a history sample taken `at`, or `None` before the queue was
    /// first read.
    fn sample(&self, at: UnixMs) -> Option<QueueReading> {
        self.latest.map(|latest| QueueReading { sampled_at: at, ..latest })
    }
}

/// Messages of a reading that are not visible (a saturated peek: those beyond it).
fn hidden(r: &QueueReading) -> u64 {
    r.messages() - r.visible()
}

/// One task hub's decision state: the latest reading of each queue with its activity
/// history, the latency rings, the durable history, and the latest decision.
#[derive(Debug, Clone)]
pub(crate) struct HubEngine {
    settings: EngineSettings,
    work_item: QueueView,
    control: Vec<QueueView>,
    latencies: TaskHubLatencies,
    voter: LatencyVoter,
    history: HubHistory,
    /// When the histories last took a sample (one sample per moment).
    sampled_at: Option<UnixMs>,
    decision: Option<Decision>,
}

impl HubEngine {
    /// A hub of `partitions` control queues (0 while unknown) nothing was read about yet.
    pub(crate) fn new(settings: EngineSettings, partitions: usize) -> Self {
        Self {
            settings,
            work_item: QueueView::default(),
            control: vec![QueueView::default(); partitions],
            latencies: TaskHubLatencies::new(partitions),
            voter: settings.voter(),
            history: HubHistory::new(partitions),
            sampled_at: None,
            decision: None,
        }
    }

    /// The visible messages of the latest reading of each queue (none read yet: 0), summed
    /// over the control queues.
    pub(crate) fn queue_messages(&self) -> QueueMessages {
        let latest = |view: &QueueView| view.latest.unwrap_or_default();
        let control = || self.control.iter().map(latest);
        QueueMessages {
            work_item_visible: latest(&self.work_item).visible(),
            control_visible: control().map(|r| r.visible()).sum(),
        }
    }

    /// Takes new settings; a new maximum polling interval or random scale-in setting restarts
    /// the voter (it holds nothing else), the histories are kept.
    pub(crate) fn update_settings(&mut self, settings: EngineSettings) {
        let voter = |s: &EngineSettings| (s.max_polling_interval_ms, s.random_scale_in, s.latency_seed);
        if voter(&settings) != voter(&self.settings) {
            self.voter = settings.voter();
        }
        self.settings = settings;
    }

    /// A new partition count (the hub was recreated, or first learnt): everything known per
    /// partition is dropped.
    pub(crate) fn reshape(&mut self, partitions: usize) {
        self.control = vec![QueueView::default(); partitions];
        self.latencies = TaskHubLatencies::new(partitions);
        self.history = HubHistory::new(partitions);
    }

    /// Takes a reading of the work-item queue taken at `now`.
    pub(crate) fn observe_work_item(&mut self, reading: QueueReading, now: UnixMs) {
        self.work_item.observe(reading, now);
    }

    /// Takes a reading of control queue `partition` taken at `now`; false (and ignored) when
    /// the hub has no such partition.
    pub(crate) fn observe_control(&mut self, partition: usize, reading: QueueReading, now: UnixMs) -> bool {
        match self.control.get_mut(partition) {
            Some(view) => {
                view.observe(reading, now);
                true
            }
            None => false,
        }
    }

    /// Partition `partition`'s owner is gone since `lost_at` (`None`: a live owner holds it,
    /// or it was let go cleanly). Only `durable` reads it (its module docs, rule 3).
    pub(crate) fn set_owner_lost(&mut self, partition: usize, lost_at: Option<UnixMs>) {
        self.history.set_owner_lost(partition, lost_at);
    }

    /// IsActive at `now` (module docs, per algorithm), and for every algorithm while the
    /// latest decision saw work held in flight.
    pub(crate) fn is_active(&self, now: UnixMs) -> bool {
        let mut queues = std::iter::once(&self.work_item).chain(&self.control);
        let held = self.decision.as_ref().is_some_and(|d| d.in_flight.is_some());
        held || match self.settings.algorithm {
            Algorithm::Durable | Algorithm::Latency => {
                queues.any(QueueView::has_visible)
                    || self.decision.as_ref().is_some_and(|d| d.recommendation.keep_workers_alive)
            }
            Algorithm::Target => queues.any(QueueView::has_visible),
            Algorithm::TargetInflight => queues.any(|q| q.is_active(now, self.settings.work_grace_ms)),
        }
    }

    /// How the `durable` rules split the hub's invisible messages at `now` into timers and
    /// held work (computed whichever algorithm decides, for the metrics and `/hubs`).
    pub(crate) fn split(&self, now: UnixMs) -> durable::Split {
        let workers = self.decision.as_ref().map_or(0, |d| d.workers);
        durable::split(&self.settings.durable_settings(), &self.history, workers, now)
    }

    /// The control messages taken for held work at `now`, per partition.
    pub(crate) fn held_by_partition(&self, now: UnixMs) -> Vec<u64> {
        durable::held_by_partition(&self.history, now)
    }

    /// One sampling interval at `now` with `workers` running: adds one sample of every queue's
    /// latest reading to the histories (once per moment: a second evaluation at the same or an
    /// earlier `now` re-decides from the samples already taken), runs the algorithm and
    /// computes the metric value.
    pub(crate) fn evaluate(&mut self, now: UnixMs, workers: u32) -> &Decision {
        let durable = self.settings.durable_settings();
        if self.sampled_at.is_none_or(|t| now > t) {
            self.sampled_at = Some(now);
            if let Some(latency) = self.work_item.take_fresh_latency() {
                self.latencies.work_item.add(latency);
            }
            for (ring, view) in self.latencies.control.iter_mut().zip(&mut self.control) {
                if let Some(latency) = view.take_fresh_latency() {
                    ring.add(latency);
                }
            }
            let control: Vec<Option<QueueReading>> = self.control.iter().map(|v| v.sample(now)).collect();
            self.history.record_read(&durable, self.work_item.sample(now), &control);
        }
        let grace = self.settings.work_grace_ms;
        let recommendation = match self.settings.algorithm {
            Algorithm::Target => {
                let lengths: Vec<u64> = self.control.iter().map(QueueView::upstream_length).collect();
                target::recommend(self.settings.target, workers, self.work_item.upstream_length(), &lengths)
            }
            Algorithm::TargetInflight => {
                let lengths: Vec<u64> = self.control.iter().map(|q| q.inflight_length(now, grace)).collect();
                let work_item = self.work_item.inflight_length(now, grace);
                target::recommend(self.settings.target, workers, work_item, &lengths)
            }
            Algorithm::Latency => self.voter.vote(&self.latencies, workers),
            Algorithm::Durable => durable::recommend(&durable, &self.history, workers, now),
        };
        let in_flight = InFlight::at(&durable, &self.history, workers, now);
        let recommendation = match in_flight {
            Some(held) => held.guard(recommendation, workers),
            None => recommendation,
        };
        let metric_value = metric_value(self.settings.algorithm, recommendation.desired_workers, workers);
        self.decision.insert(Decision { recommendation, workers, metric_value, in_flight })
    }

    /// The latest decision, once one was taken.
    pub(crate) fn decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }

    /// The latency rings, for inspection.
    #[cfg(test)]
    pub(crate) fn latencies(&self) -> &TaskHubLatencies {
        &self.latencies
    }

    /// The work-item latency ring.
    pub(crate) fn work_item_latencies(&self) -> &super::latency::LatencyHistory {
        &self.latencies.work_item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(approximate_count: u64, visible_count: u32, first_visible_age_ms: u64) -> QueueReading {
        QueueReading {
            approximate_count,
            visible_count,
            first_visible_age_ms,
            redelivered_count: 0,
            sampled_at: UnixMs(0),
        }
    }

    fn engine(algorithm: Algorithm) -> HubEngine {
        HubEngine::new(EngineSettings { algorithm, work_grace_ms: 60_000, ..EngineSettings::default() }, 4)
    }

    #[test]
    fn a_reading_is_one_latency_sample_however_often_it_is_evaluated() {
        let mut e = engine(Algorithm::Latency);
        e.observe_work_item(r(3, 3, 2_000), UnixMs(0));
        e.evaluate(UnixMs(0), 1);
        e.evaluate(UnixMs(0), 1);
        e.evaluate(UnixMs(2_000), 1);
        assert_eq!(e.work_item_latencies().samples(), [0, 0, 0, 0, 2_000]);
        e.observe_work_item(r(3, 3, 3_000), UnixMs(4_000));
        e.evaluate(UnixMs(4_000), 1);
        assert_eq!(e.work_item_latencies().samples(), [0, 0, 0, 2_000, 3_000]);
    }

    #[test]
    fn the_metric_value_follows_the_algorithm() {
        // 10 -> 9: the HPA's tolerance would swallow a plain 9; durable keeps the pod on
        // purpose, the others land the HPA on 9.
        assert_eq!(metric_value(Algorithm::Durable, 9, 10), 9.0);
        for algorithm in [Algorithm::Target, Algorithm::Latency] {
            let v = metric_value(algorithm, 9, 10);
            let lands = hpa::desired_replicas(10, v, 1.0, hpa::MetricTargetType::AverageValue);
            assert_eq!(lands, 9, "{algorithm}: value {v}");
        }
    }

    #[test]
    fn the_decision_carries_the_metric_for_the_workers_it_was_taken_from() {
        let mut e = engine(Algorithm::Target);
        e.observe_work_item(r(200, 32, 100), UnixMs(0));
        let d = e.evaluate(UnixMs(0), 12).clone();
        assert_eq!((d.recommendation.desired_workers, d.workers), (20, 12));
        assert_eq!(d.metric_value, hpa::metric_value(20, 12));
    }

    #[test]
    fn timers_only_keep_a_target_inflight_hub_active_for_the_grace_period() {
        let mut e = engine(Algorithm::TargetInflight);
        e.observe_control(2, r(1, 1, 10), UnixMs(0));
        e.observe_control(2, r(1, 0, 0), UnixMs(2_000));
        assert!(e.is_active(UnixMs(62_000)), "within the grace");
        e.observe_control(2, r(1, 0, 0), UnixMs(62_001));
        assert!(!e.is_active(UnixMs(62_001)), "a sleeping timer");
    }

    #[test]
    fn target_takes_a_queue_whose_peek_is_empty_as_zero_as_upstream_does() {
        let mut e = engine(Algorithm::Target);
        // 7 control messages of which one is visible, nothing held yet.
        e.observe_control(1, r(7, 1, 300), UnixMs(0));
        let d = e.evaluate(UnixMs(0), 0).clone();
        assert_eq!(d.recommendation.desired_workers, 1, "{}", d.recommendation.reason);
        assert!(d.recommendation.reason.contains("ceil(7/10)"), "{}", d.recommendation.reason);
        assert!(e.is_active(UnixMs(0)));
        e.observe_control(1, r(7, 0, 0), UnixMs(1_000));
        e.evaluate(UnixMs(1_000), 0);
        assert!(!e.is_active(UnixMs(1_000)), "nothing visible and no worker: target 0");
    }

    #[test]
    fn under_every_algorithm_work_held_in_flight_is_never_scaled_away() {
        // 40 invisible work items while a worker runs: activities running, renewed. Upstream's
        // target counts a queue whose peek is empty as 0, the latency vote sees no latency:
        // the guard keeps the hub active and sized for them.
        for algorithm in Algorithm::ALL {
            let mut e = engine(algorithm);
            for at in (0..=60_000).step_by(5_000) {
                e.observe_work_item(r(40, 0, 0), UnixMs(at));
                e.evaluate(UnixMs(at), 4);
            }
            let d = e.decision().cloned().expect("decided");
            assert!(e.is_active(UnixMs(60_000)), "{algorithm}: {}", d.recommendation.reason);
            assert_eq!(d.recommendation.desired_workers, 4, "{algorithm}: {}", d.recommendation.reason);
            assert!(d.recommendation.keep_workers_alive, "{algorithm}");
            assert_eq!(d.in_flight.map(|f| (f.work_items, f.workers)), Some((40, 4)), "{algorithm}");
        }
    }

    #[test]
    fn latency_random_scale_in_is_on_by_default_and_can_be_turned_off() {
        // Quiet queues at 3 workers: only the random draw removes a worker.
        let run = |random_scale_in: bool| {
            let settings = EngineSettings {
                algorithm: Algorithm::Latency,
                random_scale_in,
                ..EngineSettings::default()
            };
            let mut e = HubEngine::new(settings, 4);
            (0..200)
                .filter(|i| {
                    let at = UnixMs(i * 1_000);
                    e.observe_work_item(r(1, 1, 100), at);
                    for p in 0..4 {
                        e.observe_control(p, r(1, 1, 100), at);
                    }
                    e.evaluate(at, 3).recommendation.action == crate::heuristic::ScaleAction::RemoveWorker
                })
                .count()
        };
        assert!(run(true) > 0, "upstream's default: one chance in ten");
        assert_eq!(run(false), 0);
    }

    #[test]
    fn readings_of_partitions_the_hub_does_not_have_are_ignored() {
        let mut e = engine(Algorithm::Target);
        assert!(!e.observe_control(4, r(9, 9, 0), UnixMs(0)));
        assert!(!e.is_active(UnixMs(0)));
        e.reshape(8);
        assert!(e.observe_control(4, r(9, 9, 0), UnixMs(0)));
        assert!(e.is_active(UnixMs(0)));
    }
}
