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
//! [`HubEngine::observe_control`]); a decision is taken once per sampling interval
//! ([`HubEngine::evaluate`]), which adds one sample of every queue's latest reading to the
//! algorithm's history. Time is always passed in.
//!
//! # Activity: telling sleeping timers from work in progress
//!
//! A queue's `approximate_count` counts invisible messages too, and an invisible message is
//! either being processed (dequeued, hidden for the visibility timeout) or a durable timer /
//! scheduled start (enqueued with a visibility delay). Both look the same in one reading; they
//! differ over time. Work in progress leaves traces: the message was visible before it was
//! dequeued, and dequeues, completions and new messages move the invisible count
//! (`approximate_count - visible_count`). A sleeping timer leaves none: nothing is visible and
//! the invisible count stays put, reading after reading. So a queue is **working** while its
//! invisible count is non-zero and, within the last `work_grace_ms` (default
//! [`DEFAULT_WORK_GRACE_MS`], DTFx's visibility timeout), either a message was visible in it or
//! its invisible count changed. A hub is **active** while any queue has a visible message now
//! or is working. A timers-only hub therefore turns inactive one grace period after its last
//! movement, and wakes again the moment a timer comes due (its message turns visible). The
//! price: an activity running for longer than the grace period without any other movement in
//! its queue looks like a timer; KEDA's cooldown still applies before it scales to zero, and
//! the message reappears (and wakes the hub) when its visibility timeout lapses. The first
//! reading of a queue has no history, so its invisible messages count as sleeping until they
//! move. Under the `durable` algorithm "working" is that algorithm's own verdict instead
//! (`keep_workers_alive` of the latest decision), which tells timers from work after seconds.
//!
//! The same classification feeds the target formula: a queue's length is its approximate
//! count while it is working or has visible messages, else 0 (upstream's "length is 0 when
//! the peek returns nothing", which also drops sleeping timers).
//!
//! # The metric value
//!
//! KEDA's GetMetrics gets [`metric_value`] of the latest decision (target 1, AverageValue),
//! computed against the worker count that decision was taken from.

use super::durable::{self, DurableSettings, HubHistory, QueueSample};
use super::latency::{DEFAULT_MAX_POLLING_INTERVAL_MS, LatencyVoter, TaskHubLatencies};
use super::target::{self, TargetSettings};
use super::{Algorithm, Recommendation, hpa};
use crate::clock::UnixMs;

/// How long a queue's invisible messages count as work after its last movement, by default
/// (DTFx's 5-minute visibility timeout; the aggregator's `--work-grace`).
pub(crate) const DEFAULT_WORK_GRACE_MS: u64 = 300_000;

/// What one read of one queue shows (Get Queue Metadata and a Peek).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Reading {
    /// `x-ms-approximate-messages-count`: visible, in progress and delayed messages.
    pub approximate_count: u64,
    /// Messages a Peek of up to [`durable::PEEK_LIMIT`] returned (visible now).
    pub visible_count: u64,
    /// now - InsertedOn of the first visible message; 0 when none is visible.
    pub first_visible_age_ms: u64,
}

impl Reading {
    fn invisible(&self) -> u64 {
        self.approximate_count.saturating_sub(self.visible_count)
    }
}

impl From<QueueSample> for Reading {
    fn from(s: QueueSample) -> Self {
        Self {
            approximate_count: s.approximate_count,
            visible_count: s.visible_count,
            first_visible_age_ms: s.first_visible_age_ms,
        }
    }
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
    /// How long invisible messages count as work after their queue last moved (module docs).
    pub work_grace_ms: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            target: TargetSettings::default(),
            durable: DurableSettings::default(),
            max_polling_interval_ms: DEFAULT_MAX_POLLING_INTERVAL_MS,
            work_grace_ms: DEFAULT_WORK_GRACE_MS,
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
}

/// The value to report to KEDA for `desired` workers at `current` replicas under `algorithm`.
///
/// `durable` uses [`durable::metric_value`] (a step down within the HPA's tolerance is
/// reported as is, and so kept); the others [`hpa::metric_value`], which lands the HPA on the
/// desired count in both directions.
pub(crate) fn metric_value(algorithm: Algorithm, desired: u32, current: u32) -> f64 {
    match algorithm {
        Algorithm::Durable => durable::metric_value(desired, current),
        Algorithm::Target | Algorithm::Latency => hpa::metric_value(desired, current),
    }
}

/// One queue: its latest reading and the history that tells timers from work.
#[derive(Debug, Clone, Copy, Default)]
struct QueueView {
    latest: Option<Reading>,
    /// When a visible message was last seen.
    last_visible: Option<UnixMs>,
    /// When the invisible count last changed between two readings.
    last_moved: Option<UnixMs>,
}

impl QueueView {
    fn observe(&mut self, reading: Reading, now: UnixMs) {
        if reading.visible_count > 0 {
            self.last_visible = Some(now);
        }
        if let Some(previous) = self.latest
            && previous.invisible() != reading.invisible()
        {
            self.last_moved = Some(now);
        }
        self.latest = Some(reading);
    }

    fn has_visible(&self) -> bool {
        self.latest.is_some_and(|s| s.visible_count > 0)
    }

    fn is_working(&self, now: UnixMs, grace_ms: u64) -> bool {
        let grace = i64::try_from(grace_ms).unwrap_or(i64::MAX);
        let recent = |t: Option<UnixMs>| t.is_some_and(|t| now.millis_since(t) <= grace);
        self.latest.is_some_and(|s| s.invisible() > 0)
            && (recent(self.last_visible) || recent(self.last_moved))
    }

    fn is_active(&self, now: UnixMs, grace_ms: u64) -> bool {
        self.has_visible() || self.is_working(now, grace_ms)
    }

    /// The length the target formula sees (module docs).
    fn length(&self, now: UnixMs, grace_ms: u64) -> u64 {
        match self.latest {
            Some(s) if self.is_active(now, grace_ms) => s.approximate_count.max(s.visible_count),
            _ => 0,
        }
    }

    fn latency_ms(&self) -> u64 {
        self.latest.map_or(0, |s| s.first_visible_age_ms)
    }

    /// The latest reading as a durable-history sample taken `at` (no reading yet: empty).
    fn sample(&self, at: UnixMs) -> QueueSample {
        let r = self.latest.unwrap_or_default();
        QueueSample {
            at,
            approximate_count: r.approximate_count,
            visible_count: r.visible_count,
            first_visible_age_ms: r.first_visible_age_ms,
        }
    }
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
            // Ours runs the vote without upstream's random scale-in (deterministic).
            voter: LatencyVoter::new(settings.max_polling_interval_ms),
            history: HubHistory::new(partitions),
            sampled_at: None,
            decision: None,
        }
    }

    /// Takes new settings; a new maximum polling interval restarts the voter (it holds
    /// nothing else), the histories are kept.
    pub(crate) fn update_settings(&mut self, settings: EngineSettings) {
        if settings.max_polling_interval_ms != self.settings.max_polling_interval_ms {
            self.voter = LatencyVoter::new(settings.max_polling_interval_ms);
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
    pub(crate) fn observe_work_item(&mut self, reading: Reading, now: UnixMs) {
        self.work_item.observe(reading, now);
    }

    /// Takes a reading of control queue `partition` taken at `now`; false (and ignored) when
    /// the hub has no such partition.
    pub(crate) fn observe_control(&mut self, partition: usize, reading: Reading, now: UnixMs) -> bool {
        match self.control.get_mut(partition) {
            Some(view) => {
                view.observe(reading, now);
                true
            }
            None => false,
        }
    }

    /// IsActive at `now`: a visible message anywhere, or work in progress (module docs).
    pub(crate) fn is_active(&self, now: UnixMs) -> bool {
        let mut queues = std::iter::once(&self.work_item).chain(&self.control);
        match self.settings.algorithm {
            Algorithm::Durable => {
                queues.any(QueueView::has_visible)
                    || self.decision.as_ref().is_some_and(|d| d.recommendation.keep_workers_alive)
            }
            Algorithm::Target | Algorithm::Latency => {
                queues.any(|q| q.is_active(now, self.settings.work_grace_ms))
            }
        }
    }

    /// One sampling interval at `now` with `workers` running: adds one sample of every queue's
    /// latest reading to the histories (once per moment: a second evaluation at the same or an
    /// earlier `now` re-decides from the samples already taken), runs the algorithm and
    /// computes the metric value.
    pub(crate) fn evaluate(&mut self, now: UnixMs, workers: u32) -> &Decision {
        if self.sampled_at.is_none_or(|t| now > t) {
            self.sampled_at = Some(now);
            self.latencies.work_item.add(self.work_item.latency_ms());
            for (ring, view) in self.latencies.control.iter_mut().zip(&self.control) {
                ring.add(view.latency_ms());
            }
            let control: Vec<QueueSample> = self.control.iter().map(|v| v.sample(now)).collect();
            self.history.record(&self.settings.durable, self.work_item.sample(now), &control);
        }
        let grace = self.settings.work_grace_ms;
        let recommendation = match self.settings.algorithm {
            Algorithm::Target => {
                let lengths: Vec<u64> = self.control.iter().map(|q| q.length(now, grace)).collect();
                target::recommend(self.settings.target, workers, self.work_item.length(now, grace), &lengths)
            }
            Algorithm::Latency => self.voter.vote(&self.latencies, workers),
            Algorithm::Durable => durable::recommend(&self.settings.durable, &self.history, workers, now),
        };
        let metric_value = metric_value(self.settings.algorithm, recommendation.desired_workers, workers);
        self.decision.insert(Decision { recommendation, workers, metric_value })
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
    #[cfg(test)]
    pub(crate) fn work_item_latencies(&self) -> &super::latency::LatencyHistory {
        &self.latencies.work_item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(approximate_count: u64, visible_count: u64, first_visible_age_ms: u64) -> Reading {
        Reading { approximate_count, visible_count, first_visible_age_ms }
    }

    fn engine(algorithm: Algorithm) -> HubEngine {
        HubEngine::new(EngineSettings { algorithm, work_grace_ms: 60_000, ..EngineSettings::default() }, 4)
    }

    #[test]
    fn a_second_evaluation_at_the_same_moment_adds_no_sample() {
        let mut e = engine(Algorithm::Latency);
        e.observe_work_item(r(3, 3, 2_000), UnixMs(0));
        e.evaluate(UnixMs(0), 1);
        e.evaluate(UnixMs(0), 1);
        assert_eq!(e.work_item_latencies().samples(), [0, 0, 0, 0, 2_000]);
        e.evaluate(UnixMs(1_000), 1);
        assert_eq!(e.work_item_latencies().samples(), [0, 0, 0, 2_000, 2_000]);
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
    fn timers_only_keep_the_target_and_latency_hubs_active_for_the_grace_period() {
        for algorithm in [Algorithm::Target, Algorithm::Latency] {
            let mut e = engine(algorithm);
            e.observe_control(2, r(1, 1, 10), UnixMs(0));
            e.observe_control(2, r(1, 0, 0), UnixMs(2_000));
            assert!(e.is_active(UnixMs(62_000)), "{algorithm}: within the grace");
            e.observe_control(2, r(1, 0, 0), UnixMs(62_001));
            assert!(!e.is_active(UnixMs(62_001)), "{algorithm}: a sleeping timer");
        }
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
