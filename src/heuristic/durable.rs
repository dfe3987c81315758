//! `scaleAlgorithm: durable`, the project's default: a worker count from approximate counts,
//! visible counts and first-message ages, that tells sleeping durable timers from running
//! work by count (durabletask-facts.md, "Queue signals" and "Durable timers in storage") and
//! is shaped for the HPA that applies it.
//!
//! Rules, in order (chosen from `durable-scaler simulate` runs, docs/simulator.md):
//!
//! 1. **Work-item queue**: every message counts, visible or not. Durable timers live on
//!    control queues only, so an invisible work item is an activity being run (or one whose
//!    worker died, which will run again): `ceil(messages / maxActivitiesPerWorker)`. One
//!    exception: work items that sat invisible with the count unchanged and nothing visible for
//!    longer than the visibility timeout ([`DurableSettings::visibility_timeout_ms`], DTFx's
//!    5 minutes) are **stuck or poison work items** and stop counting. A running activity's
//!    message is only hidden for the visibility timeout at a time; a poison activity is retried
//!    forever with back-off of up to 10 minutes, invisible in between. Without this rule one
//!    such message keeps a pod alive for ever. The price: an activity that runs longer than the
//!    visibility timeout with nothing else moving in the queue stops keeping its pod (KEDA's
//!    cooldown still applies first).
//! 2. **Control queues, timers told apart by count**: a control queue's invisible messages are
//!    a mix of sleeping timers (enqueued with a visibility delay; the count sits still) and
//!    messages being processed (dequeued, hidden for at most the visibility timeout). Per
//!    queue, the **baseline** is the lowest invisible count seen over the last
//!    [`DurableSettings::timer_baseline_ms`] (10 s, two sidecar reports; the samples in it and
//!    the one that opens it). What is above the baseline, plus everything visible, is work; the baseline is
//!    sleeping timers. So a partition with 50 sleeping timers and one new message counts one
//!    message, not 51; a monitor whose timer re-fires every few seconds counts the message or
//!    two in flight, not the partition's timers; timers set by work count for one window and
//!    then sleep. The window is longer than an orchestration episode holds its messages (ms
//!    to seconds); a longer one only kept pods longer after timers were set (the simulator:
//!    60 s cost 34 % more pod-seconds in `timers` and 6-27 % in `spiky`, for no latency).
//!    Messages a live owner holds for longer than the window read as timers; one that dies
//!    holding them is rule 3. With no worker running every invisible control message is
//!    a timer (nothing can be processing it), so a hub of timers never wakes from zero.
//! 3. **Dead owners**: when a partition's owner is gone without letting go (its sidecar went
//!    silent, or its lease lapsed with no pod taking the partition over: the caller says so
//!    with [`HubHistory::set_owner_lost`], as of the owner's last report), the messages it held
//!    stay invisible until their visibility timeout lapses, and then reappear. Until that could
//!    have happened (lost at + visibility timeout) the partition's baseline stays what it was
//!    when the owner was last seen:
//!    the dead owner's in-flight messages are work, not timers, even at zero workers, so the
//!    hub does not cool to zero with work in it and wake five minutes later.
//! 4. **Orchestration workers** = `min(partitions with work, ceil(orchestration work /
//!    maxOrchestrationsPerWorker))`: one partition is processed by one worker at a time, so
//!    more never helps.
//! 5. **Lookahead**: orchestration messages beyond what those workers take in one round are
//!    episodes still to run, and an episode mostly schedules activities; those that arrived
//!    within [`DurableSettings::lookahead_window_ms`] (not timers that fired) count as
//!    activities to come, so pods are asked for before the fan-out lands (a pod takes its
//!    start-up delay to help).
//! 6. Desired = max(activity, orchestration, lookahead workers), at least 1 while any work
//!    exists; `keep_workers_alive` is false only when no queue holds work (timers, stuck work
//!    items and nothing else let the hub sleep).
//! 7. **No late pods**: while the work is falling fast enough to be gone before a new pod
//!    could start ([`DurableSettings::startup_ms`]), no scale-up is asked for.
//! 8. **Damped scale-in**: below the current count, the answer is the highest the rules gave
//!    over the last [`DurableSettings::scale_in_window_ms`], so one empty sample between
//!    batches sheds nothing (the HPA's stabilization window then damps further).
//! 9. **HPA tolerance**: [`metric_value`] turns the desired count into the value to report
//!    (target 1, AverageValue) so that a needed +1 at 10 or more replicas still moves the HPA.

use std::collections::VecDeque;

use super::{Recommendation, hpa};
use crate::clock::UnixMs;

/// At most this many messages come back from one Peek, so a visible count of this size means
/// "this many or more".
pub(crate) const PEEK_LIMIT: u64 = 32;

/// One sample of one queue, as a sidecar or the aggregator's probe takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueSample {
    /// When the sample was taken (the caller's clock).
    pub at: UnixMs,
    /// `x-ms-approximate-messages-count`: visible, in progress and delayed messages.
    pub approximate_count: u64,
    /// Messages a Peek of up to [`PEEK_LIMIT`] returned (visible now).
    pub visible_count: u64,
    /// now - InsertedOn of the first visible message; 0 when none is visible.
    pub first_visible_age_ms: u64,
}

/// The recent samples of one queue, oldest first, trimmed to a horizon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QueueHistory {
    samples: VecDeque<QueueSample>,
}

impl QueueHistory {
    /// An empty history.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends `sample` and forgets samples older than `horizon_ms` before it (keeping at
    /// least one older sample, so a window that starts before the horizon stays covered).
    pub(crate) fn record(&mut self, sample: QueueSample, horizon_ms: u64) {
        self.samples.push_back(sample);
        let cutoff = before(sample.at, horizon_ms);
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|s| s.at <= cutoff) {
            self.samples.pop_front();
        }
    }

    /// The newest sample.
    pub(crate) fn latest(&self) -> Option<&QueueSample> {
        self.samples.back()
    }

    /// Samples, oldest first.
    pub(crate) fn samples(&self) -> impl DoubleEndedIterator<Item = &QueueSample> {
        self.samples.iter()
    }

    /// Samples taken at or after `since`.
    fn since(&self, since: UnixMs) -> impl Iterator<Item = &QueueSample> {
        self.samples.iter().filter(move |s| s.at >= since)
    }
}

/// A partition whose owner is gone (rule 3 of the module docs): when, and the baseline it had
/// then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LostOwner {
    at: UnixMs,
    baseline: u64,
}

/// The histories of one task hub's queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HubHistory {
    /// The work-item (activity) queue.
    pub work_item: QueueHistory,
    /// Control queue `i` of partition `i`.
    pub control: Vec<QueueHistory>,
    /// Per partition: its owner is gone (rule 3).
    lost: Vec<Option<LostOwner>>,
    /// Since when the work-item queue's invisible count has not moved with nothing visible
    /// (rule 1); `None` while it holds no invisible message.
    work_item_still_since: Option<UnixMs>,
}

impl HubHistory {
    /// Empty histories for `partitions` control queues.
    pub(crate) fn new(partitions: usize) -> Self {
        Self {
            work_item: QueueHistory::new(),
            control: vec![QueueHistory::new(); partitions],
            lost: vec![None; partitions],
            work_item_still_since: None,
        }
    }

    /// Records one sample per queue, keeping what `settings` needs.
    pub(crate) fn record(
        &mut self,
        settings: &DurableSettings,
        work_item: QueueSample,
        control: &[QueueSample],
    ) {
        let horizon = settings.horizon_ms();
        let still =
            self.work_item.latest().is_some_and(|previous| invisible(previous) == invisible(&work_item));
        self.work_item_still_since = match (invisible(&work_item), work_item.visible_count) {
            (0, _) => None,
            (_, 0) if still => self.work_item_still_since.or(Some(work_item.at)),
            _ => Some(work_item.at),
        };
        self.work_item.record(work_item, horizon);
        if self.control.len() < control.len() {
            self.control.resize(control.len(), QueueHistory::new());
        }
        for (history, sample) in self.control.iter_mut().zip(control) {
            history.record(*sample, horizon);
        }
    }

    /// Says whether partition `partition`'s owner is gone: `Some(t)` when it was lost at `t`
    /// (went silent or let its lease lapse without a pod taking over), `None` when a live
    /// owner holds it or it was let go cleanly. The baseline is frozen at its value at `t`
    /// (rule 3); calling again with the same `t` keeps it.
    pub(crate) fn set_owner_lost(
        &mut self,
        settings: &DurableSettings,
        partition: usize,
        lost_at: Option<UnixMs>,
    ) {
        if self.lost.len() < self.control.len() {
            self.lost.resize(self.control.len(), None);
        }
        let Some(slot) = self.lost.get_mut(partition) else { return };
        match lost_at {
            None => *slot = None,
            Some(at) if slot.is_some_and(|l| l.at == at) => {}
            Some(at) => {
                // No sample before the loss: nothing is known to be a timer, all of it is work.
                let baseline =
                    self.control.get(partition).and_then(|h| baseline(h, settings, at)).unwrap_or(0);
                *slot = Some(LostOwner { at, baseline });
            }
        }
    }
}

/// The algorithm's knobs (defaults in docs/simulator.md, "Our algorithm").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableSettings {
    /// Activities one worker runs at once (`maxActivitiesPerWorker`, default 10).
    pub max_activities_per_worker: u32,
    /// Orchestrations one worker runs at once (`maxOrchestrationsPerWorker`, default 5).
    pub max_orchestrations_per_worker: u32,
    /// The window over which a control queue's lowest invisible count is its baseline of
    /// sleeping timers (rule 2; default 10 s, two sidecar reports).
    pub timer_baseline_ms: u64,
    /// DTFx's visibility timeout (default 5 min): how long a dequeued message stays hidden.
    /// A dead owner's messages count as work for this long (rule 3); work items invisible
    /// and unchanged for longer are stuck or poison (rule 1). The engine sets it from the
    /// aggregator's `--work-grace`.
    pub visibility_timeout_ms: u64,
    /// Scale-in looks back this far and keeps the highest answer (default 10 s: two sidecar
    /// reports, so one empty sample between batches sheds nothing; the HPA's own 300 s
    /// stabilization window does the rest, and a longer window here only adds to it).
    pub scale_in_window_ms: u64,
    /// Count each orchestration message with work as an activity to come (default true):
    /// an episode mostly schedules activities, and pods take a start-up delay to help, so
    /// workers are asked for before the fan-out lands on the work-item queue.
    pub activity_lookahead: bool,
    /// How long a new pod takes to take work (default 20 s). No scale-up is asked for while
    /// the work is falling fast enough to be gone sooner; 0 turns this rule off.
    pub startup_ms: u64,
    /// How long one orchestration episode is assumed to take at most. With
    /// [`Self::startup_ms`] it says how many rounds of episodes a worker runs before a new
    /// pod could help. Default 0: count one round, which asks for pods earliest; a value such
    /// as 1000 is cheaper when orchestrations fan out little (see docs/simulator.md).
    pub episode_estimate_ms: u64,
    /// The lookahead counts only control messages that arrived within this window (growth
    /// of the approximate count over its lowest in the window), not timers that fired
    /// (default 60 s; 0 counts every waiting message).
    pub lookahead_window_ms: u64,
}

/// How long after an owner's last report its loss may be told (three sidecar intervals, up to
/// 20 s each): the history keeps enough to take its baseline as of then.
pub const OWNER_LOSS_NOTICE_MS: u64 = 60_000;

/// DTFx's default visibility timeout for dequeued messages (`ControlQueueVisibilityTimeout`
/// and `WorkItemQueueVisibilityTimeout`, 5 minutes, in DurableTask.AzureStorage's
/// `AzureStorageOrchestrationServiceSettings`).
pub const DEFAULT_VISIBILITY_TIMEOUT_MS: u64 = 300_000;

impl Default for DurableSettings {
    fn default() -> Self {
        Self {
            max_activities_per_worker: 10,
            max_orchestrations_per_worker: 5,
            timer_baseline_ms: 10_000,
            visibility_timeout_ms: DEFAULT_VISIBILITY_TIMEOUT_MS,
            scale_in_window_ms: 10_000,
            activity_lookahead: true,
            startup_ms: 20_000,
            episode_estimate_ms: 0,
            lookahead_window_ms: 60_000,
        }
    }
}

impl DurableSettings {
    /// How much history the rules read: the scale-in window looks back at moments whose
    /// baseline itself looks back its window, and a lost owner's baseline is taken as of its
    /// last report, told up to [`OWNER_LOSS_NOTICE_MS`] later.
    pub fn horizon_ms(&self) -> u64 {
        let baseline_back = self.scale_in_window_ms.max(OWNER_LOSS_NOTICE_MS);
        self.timer_baseline_ms.saturating_add(baseline_back).max(self.lookahead_window_ms)
    }
}

/// What the rules saw at one moment, kept for the reason string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Need {
    activity_messages: u64,
    activity_workers: u64,
    /// Work items left out as stuck or poison (rule 1).
    stuck_work_items: u64,
    orchestration_messages: u64,
    active_partitions: u64,
    /// Invisible control messages taken for sleeping timers.
    timers: u64,
    /// Partitions whose dead owner's messages count as work (rule 3).
    lost_partitions: u64,
    orchestration_workers: u64,
    lookahead_workers: u64,
}

impl Need {
    fn messages(&self) -> u64 {
        self.activity_messages + self.orchestration_messages
    }

    fn workers(&self) -> u64 {
        let any = self.activity_messages + self.orchestration_messages > 0;
        self.activity_workers.max(self.orchestration_workers).max(self.lookahead_workers).max(u64::from(any))
    }
}

/// `ms` before `t`, never before the epoch: windows that would start earlier start at the
/// first possible sample (the simulator's clock starts at 0).
fn before(t: UnixMs, ms: u64) -> UnixMs {
    t.plus_ms(-i64::try_from(ms).unwrap_or(i64::MAX)).max(UnixMs(0))
}

fn invisible(s: &QueueSample) -> u64 {
    s.approximate_count.saturating_sub(s.visible_count)
}

/// The lowest invisible count of `history` over the baseline window ending at `at`: the
/// samples in it and the newest one at or before its start. `None` before any sample.
fn baseline(history: &QueueHistory, settings: &DurableSettings, at: UnixMs) -> Option<u64> {
    let start = before(at, settings.timer_baseline_ms);
    let anchor = history.samples().rev().find(|s| s.at <= start);
    anchor.into_iter().chain(history.since(start).filter(|s| s.at <= at)).map(invisible).min()
}

/// Work items at `at` that are stuck or poison (rule 1): invisible, unchanged and with nothing
/// visible for longer than the visibility timeout. Only the newest moment is judged; earlier
/// moments (for damping) count them as work, which never sheds a pod too early.
fn stuck_work_items(hub: &HubHistory, settings: &DurableSettings, at: UnixMs, sample: &QueueSample) -> u64 {
    let timeout = i64::try_from(settings.visibility_timeout_ms).unwrap_or(i64::MAX);
    let still_long = hub.work_item_still_since.is_some_and(|since| at.millis_since(since) > timeout);
    let newest = hub.work_item.latest().is_some_and(|latest| latest.at == sample.at);
    if still_long && newest && sample.visible_count == 0 { invisible(sample) } else { 0 }
}

/// The need at the moment `at` (the newest sample of each queue at or before it). With
/// `no_workers`, invisible control messages of partitions with no lost owner are timers at
/// once: nothing runs to hold them.
fn need_at(hub: &HubHistory, settings: &DurableSettings, at: UnixMs, no_workers: bool) -> Need {
    let newest = |h: &QueueHistory| h.samples().rev().find(|s| s.at <= at).copied();
    let work_item = newest(&hub.work_item);
    let stuck_work_items = work_item.map_or(0, |s| stuck_work_items(hub, settings, at, &s));
    let activity_messages =
        work_item.map_or(0, |s| s.approximate_count.max(s.visible_count).saturating_sub(stuck_work_items));
    let mut need = Need {
        activity_messages,
        activity_workers: activity_messages.div_ceil(u64::from(settings.max_activities_per_worker.max(1))),
        stuck_work_items,
        ..Need::default()
    };
    let timeout = i64::try_from(settings.visibility_timeout_ms).unwrap_or(i64::MAX);
    let mut arrived = 0u64;
    for (partition, history) in hub.control.iter().enumerate() {
        let Some(sample) = newest(history) else { continue };
        if settings.lookahead_window_ms > 0 {
            // Messages that arrived within the window: growth over its lowest count. Timers
            // that fire turn invisible messages visible without growing the count.
            let since = before(at, settings.lookahead_window_ms);
            let low = history
                .samples()
                .filter(|s| s.at >= since && s.at <= at)
                .map(|s| s.approximate_count)
                .min()
                .unwrap_or(sample.approximate_count);
            arrived += sample.approximate_count.saturating_sub(low);
        }
        let hidden = invisible(&sample);
        let lost = hub
            .lost
            .get(partition)
            .copied()
            .flatten()
            .filter(|l| l.at <= at && at.millis_since(l.at) < timeout);
        let timers = match lost {
            Some(l) => {
                need.lost_partitions += 1;
                hidden.min(l.baseline)
            }
            None if no_workers => hidden,
            None => hidden.min(baseline(history, settings, at).unwrap_or(hidden)),
        };
        need.timers += timers;
        let work = sample.visible_count.max(sample.approximate_count.saturating_sub(timers));
        if work > 0 {
            need.active_partitions += 1;
            need.orchestration_messages += work;
        }
    }
    // A worker runs maxOrchestrations episodes at once, and as many rounds of them in a
    // pod's start-up time as episodes fit in it: more workers only help with messages beyond
    // that (and never beyond one per partition with work).
    let rounds = match settings.episode_estimate_ms {
        0 => 1,
        episode => (settings.startup_ms / episode).max(1),
    };
    let per_worker = u64::from(settings.max_orchestrations_per_worker.max(1)) * rounds;
    need.orchestration_workers = need.active_partitions.min(need.orchestration_messages.div_ceil(per_worker));
    if settings.activity_lookahead {
        // Orchestration messages beyond what those workers take in that time are episodes
        // still to run, and each will mostly schedule activities.
        let mut waiting = need.orchestration_messages.saturating_sub(need.orchestration_workers * per_worker);
        if settings.lookahead_window_ms > 0 {
            // Only newly arrived messages (starts, events) are looked ahead for: fired timers
            // resume orchestrations whose next step is unknown, and often small.
            waiting = waiting.min(arrived);
        }
        need.lookahead_workers =
            (need.activity_messages + waiting).div_ceil(u64::from(settings.max_activities_per_worker.max(1)));
    }
    need
}

/// What the latest [`recommend`] left out of the work, for the metric and `/hubs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Discounted {
    /// Invisible control messages taken for sleeping timers.
    pub timers: u64,
    /// Work items invisible and unchanged past the visibility timeout: stuck or poison.
    pub stuck_work_items: u64,
}

/// What [`recommend`] leaves out of the work at `now` (the same rules, without deciding).
pub(crate) fn discounted(
    settings: &DurableSettings,
    hub: &HubHistory,
    workers: u32,
    now: UnixMs,
) -> Discounted {
    let need = need_at(hub, settings, now, workers == 0);
    Discounted { timers: need.timers, stuck_work_items: need.stuck_work_items }
}

/// The `durable` algorithm's recommendation for a hub at `workers` workers at `now`.
///
/// `hub` holds each queue's recent samples (record them with [`HubHistory::record`]). The
/// answer's `desired_workers` is the count the hub needs; report [`metric_value`] of it to
/// KEDA (target 1, AverageValue) and `keep_workers_alive` as IsActive.
pub(crate) fn recommend(
    settings: &DurableSettings,
    hub: &HubHistory,
    workers: u32,
    now: UnixMs,
) -> Recommendation {
    let need = need_at(hub, settings, now, workers == 0);
    let raw = need.workers();
    let keep = raw > 0;
    let mut desired = raw;
    let mut damped = false;
    let mut held = None;
    if raw > u64::from(workers) && workers > 0 && settings.startup_ms > 0 {
        // Scale-up only for work that outlasts a new pod's start-up: if the work is falling
        // fast enough to be gone before a new pod could help, the current workers suffice.
        let previous = hub.work_item.samples().rev().find(|s| s.at < now);
        if let Some(previous) = previous {
            let earlier = need_at(hub, settings, previous.at, workers == 0).messages();
            let after = need.messages();
            let elapsed = u64::try_from(now.millis_since(previous.at)).unwrap_or(0);
            if after < earlier && elapsed > 0 {
                let eta_ms = after.saturating_mul(elapsed) / (earlier - after);
                if eta_ms < settings.startup_ms {
                    desired = u64::from(workers);
                    held = Some(eta_ms);
                }
            }
        }
    }
    if raw < u64::from(workers) {
        // Scale-in: the highest need over the window, evaluated at each work-item sample time.
        let start = before(now, settings.scale_in_window_ms);
        let peak = hub
            .work_item
            .since(start)
            .filter(|s| s.at <= now)
            .map(|s| need_at(hub, settings, s.at, workers == 0).workers())
            .max()
            .unwrap_or(0);
        if peak > raw {
            desired = peak.min(u64::from(workers));
            damped = true;
        }
    }
    let desired = u32::try_from(desired).unwrap_or(u32::MAX);
    let discounted = {
        let mut parts = Vec::new();
        if need.timers > 0 {
            parts.push(format!("{} invisible message(s) taken for sleeping timers", need.timers));
        }
        if need.stuck_work_items > 0 {
            parts.push(format!("{} stuck or poison work item(s)", need.stuck_work_items));
        }
        parts.join(", ")
    };
    let reason = if !keep && desired > 0 {
        format!(
            "No work now{}; scale-in damped at {desired} for {} s",
            if discounted.is_empty() { String::new() } else { format!(" (only {discounted})") },
            settings.scale_in_window_ms / 1000
        )
    } else if !keep && !discounted.is_empty() {
        format!("Only {discounted}: no work")
    } else if !keep {
        "Task hub is idle".to_string()
    } else {
        format!(
            "{} workers: activities ceil({}/{}) = {}, orchestrations min({} partitions with work, ceil({}/{})) = {}, lookahead {}{}{}{}{}",
            desired,
            need.activity_messages,
            settings.max_activities_per_worker.max(1),
            need.activity_workers,
            need.active_partitions,
            need.orchestration_messages,
            settings.max_orchestrations_per_worker.max(1),
            need.orchestration_workers,
            need.lookahead_workers,
            if discounted.is_empty() { String::new() } else { format!("; not counted: {discounted}") },
            if need.lost_partitions > 0 {
                format!(
                    "; {} partition(s) whose owner is gone: its invisible messages count until the visibility timeout",
                    need.lost_partitions
                )
            } else {
                String::new()
            },
            if damped { format!(", scale-in damped from {raw}") } else { String::new() },
            held.map_or(String::new(), |eta| format!(
                ", held at {workers}: the work drains in about {} s, before a new pod starts",
                eta / 1000
            )),
        )
    };
    Recommendation::toward(workers, desired, keep, reason)
}

/// The metric value to report for `desired` workers at `current` replicas, with a target of 1
/// and metricType AverageValue (the HPA computes ceil(value)).
///
/// The HPA ignores a ratio within its tolerance (0.1) of 1, so from 10 replicas up a step of
/// +1 (or up to +10 %) would never be taken. For such a step up this returns just over
/// `current * 1.1`, the smallest value the HPA acts on: it overshoots the desired count by at
/// most 10 % of `current`, which the next sync's scale-in corrects after the HPA's
/// stabilization window. A step down within tolerance is reported as is (and so swallowed):
/// keeping a pod too many is cheaper than draining one that holds work.
pub(crate) fn metric_value(desired: u32, current: u32) -> f64 {
    if desired <= current { f64::from(desired) } else { hpa::metric_value(desired, current) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heuristic::{ScaleAction, hpa::MetricTargetType};

    const P: usize = 4;

    fn s(at_ms: u64, approximate_count: u64, visible_count: u64) -> QueueSample {
        let first_visible_age_ms = if visible_count > 0 { 1_000 } else { 0 };
        QueueSample { at: ms(at_ms), approximate_count, visible_count, first_visible_age_ms }
    }

    fn ms(at_ms: u64) -> UnixMs {
        UnixMs(i64::try_from(at_ms).expect("test times fit"))
    }

    /// A hub sampled every 5 s from `from_ms` to `until_ms` with the given per-queue counts
    /// `(approximate, visible)` (work item first, then control queues), after `hub`'s samples.
    fn sampled(
        mut hub: HubHistory,
        from_ms: u64,
        until_ms: u64,
        wi: (u64, u64),
        control: &[(u64, u64)],
    ) -> HubHistory {
        let settings = DurableSettings::default();
        for t in (from_ms..=until_ms).step_by(5_000) {
            let mut cq = vec![s(t, 0, 0); P];
            for (i, &(a, v)) in control.iter().enumerate() {
                cq[i] = s(t, a, v);
            }
            hub.record(&settings, s(t, wi.0, wi.1), &cq);
        }
        hub
    }

    /// The counts held from 0 to `until_ms`.
    fn steady(until_ms: u64, wi: (u64, u64), control: &[(u64, u64)]) -> HubHistory {
        sampled(HubHistory::new(P), 0, until_ms, wi, control)
    }

    /// Like [`steady`], but the queues were empty at 0 and the counts arrived by 5 s.
    fn arriving(until_ms: u64, wi: (u64, u64), control: &[(u64, u64)]) -> HubHistory {
        sampled(steady(0, (0, 0), &[]), 5_000, until_ms, wi, control)
    }

    fn run(hub: &HubHistory, workers: u32, now: u64) -> Recommendation {
        recommend(&DurableSettings::default(), hub, workers, ms(now))
    }

    #[test]
    fn fifty_sleeping_timers_alone_let_the_hub_sleep() {
        let hub = steady(60_000, (0, 0), &[(50, 0), (3, 0), (0, 0), (7, 0)]);
        let r = run(&hub, 2, 60_000);
        assert!(!r.keep_workers_alive, "{}", r.reason);
        assert_eq!(r.desired_workers, 0);
        assert!(r.reason.contains("60 invisible message(s) taken for sleeping timers"), "{}", r.reason);
        assert!(!run(&hub, 0, 60_000).keep_workers_alive);
    }

    #[test]
    fn fifty_timers_and_one_new_message_need_one_messages_worth_of_workers() {
        // Lookahead over every waiting message, so that counting the timers would show.
        let settings = DurableSettings { lookahead_window_ms: 0, ..DurableSettings::default() };
        let mut hub = steady(60_000, (0, 0), &[(50, 0), (50, 0), (50, 0), (50, 0)]);
        let mut control = [(50, 0); P].map(|(a, v)| s(65_000, a, v));
        control[1] = s(65_000, 51, 1);
        hub.record(&settings, s(65_000, 0, 0), &control);
        let r = recommend(&settings, &hub, 1, ms(65_000));
        assert!(r.keep_workers_alive);
        assert_eq!(r.desired_workers, 1, "{}", r.reason);
        assert!(r.reason.contains("ceil(1/5)"), "one message of work: {}", r.reason);
        // Dequeued by the worker, the message is invisible but still above the baseline.
        control[1] = s(70_000, 51, 0);
        for c in control.iter_mut() {
            c.at = ms(70_000);
        }
        hub.record(&settings, s(70_000, 0, 0), &control);
        let r = recommend(&settings, &hub, 1, ms(70_000));
        assert_eq!((r.desired_workers, r.keep_workers_alive), (1, true), "{}", r.reason);
        assert_eq!(discounted(&settings, &hub, 1, ms(70_000)).timers, 200);
    }

    #[test]
    fn a_monitor_re_arming_its_timer_every_few_seconds_does_not_keep_a_worker_per_partition() {
        // Each partition: 20 sleeping timers and a monitor whose timer fires every few
        // seconds; a sample catches it fired (visible), re-armed before the old message is
        // deleted (one more), or asleep, each partition in its own phase.
        let settings = DurableSettings::default();
        let mut hub = HubHistory::new(P);
        for (k, t) in (0..=120_000).step_by(5_000).enumerate() {
            let control: Vec<QueueSample> = (0..P)
                .map(|p| match (k + p) % 3 {
                    0 => s(t, 20, 1),
                    1 => s(t, 21, 0),
                    _ => s(t, 20, 0),
                })
                .collect();
            hub.record(&settings, s(t, 0, 0), &control);
        }
        let r = recommend(&settings, &hub, 4, ms(120_000));
        assert!(r.keep_workers_alive, "the monitors do fire: {}", r.reason);
        // Five or six messages in flight over four partitions: one or two workers, not P.
        assert!(r.desired_workers <= 2, "{}", r.reason);
    }

    #[test]
    fn a_dead_owners_in_flight_messages_count_as_work_until_the_visibility_timeout() {
        let settings = DurableSettings::default();
        // 50 timers on partition 2; three messages arrive and are dequeued by its owner, which
        // then dies holding them (invisible, the count unchanged).
        let mut hub = steady(60_000, (0, 0), &[(0, 0), (0, 0), (50, 0)]);
        let record = |hub: &mut HubHistory, t: u64, control: (u64, u64)| {
            let mut cq = vec![s(t, 0, 0); P];
            cq[2] = s(t, control.0, control.1);
            hub.record(&settings, s(t, 0, 0), &cq);
        };
        record(&mut hub, 65_000, (53, 3));
        record(&mut hub, 70_000, (53, 0));
        let lost_at = ms(72_000);
        hub.set_owner_lost(&settings, 2, Some(lost_at));
        let mut t = 75_000;
        while t <= 360_000 {
            record(&mut hub, t, (53, 0));
            for workers in [0, 1] {
                let r = recommend(&settings, &hub, workers, ms(t));
                assert!(r.keep_workers_alive, "at {t} ms, {workers} workers: {}", r.reason);
                assert!(r.reason.contains("ceil(3/5)"), "the three, not the timers: {}", r.reason);
            }
            t += 5_000;
        }
        // Past lost + visibility timeout the messages would have reappeared; still hidden,
        // they are timers.
        record(&mut hub, 375_000, (53, 0));
        assert!(!recommend(&settings, &hub, 1, ms(375_000)).keep_workers_alive);
        // Without the loss the same three would have read as timers after one window.
        let mut alive = steady(60_000, (0, 0), &[(0, 0), (0, 0), (50, 0)]);
        for (t, c) in [(65_000, (53, 3)), (70_000, (53, 0))] {
            record(&mut alive, t, c);
        }
        for t in (75_000..=140_000).step_by(5_000) {
            record(&mut alive, t, (53, 0));
        }
        assert!(!recommend(&settings, &alive, 1, ms(140_000)).keep_workers_alive);
    }

    #[test]
    fn a_poison_work_item_stops_keeping_a_pod_after_the_visibility_timeout() {
        // One activity retried for ever: invisible, the count unchanged, nothing visible.
        let settings = DurableSettings::default();
        let hub = steady(300_000, (1, 0), &[]);
        let r = recommend(&settings, &hub, 1, ms(300_000));
        assert_eq!((r.desired_workers, r.keep_workers_alive), (1, true), "within the timeout: {}", r.reason);
        let hub = sampled(hub, 305_000, 305_000, (1, 0), &[]);
        let r = recommend(&settings, &hub, 1, ms(305_000));
        assert!(!r.keep_workers_alive, "{}", r.reason);
        assert!(r.reason.contains("1 stuck or poison work item(s)"), "{}", r.reason);
        assert_eq!(discounted(&settings, &hub, 1, ms(305_000)).stuck_work_items, 1);
        // A retry makes it visible: work again, and the clock starts over.
        let hub = sampled(hub, 310_000, 310_000, (1, 1), &[]);
        assert!(recommend(&settings, &hub, 1, ms(310_000)).keep_workers_alive);
        assert_eq!(discounted(&settings, &hub, 1, ms(310_000)).stuck_work_items, 0);
    }

    #[test]
    fn new_invisible_control_messages_count_until_they_settle() {
        let settings = DurableSettings::default();
        let mut hub = HubHistory::new(P);
        hub.record(&settings, s(0, 0, 0), &[s(0, 0, 0); P]);
        hub.record(
            &settings,
            s(5_000, 0, 0),
            &[s(5_000, 2, 0), s(5_000, 0, 0), s(5_000, 0, 0), s(5_000, 0, 0)],
        );
        assert!(run(&hub, 1, 5_000).keep_workers_alive, "a count that just moved is work in progress");
    }

    #[test]
    fn a_timer_that_fires_wakes_the_hub() {
        let settings = DurableSettings::default();
        let mut hub = steady(60_000, (0, 0), &[(5, 0)]);
        hub.record(
            &settings,
            s(65_000, 0, 0),
            &[s(65_000, 5, 1), s(65_000, 0, 0), s(65_000, 0, 0), s(65_000, 0, 0)],
        );
        let r = run(&hub, 0, 65_000);
        assert!(r.keep_workers_alive);
        assert_eq!((r.action, r.desired_workers), (ScaleAction::AddWorker, 1));
    }

    #[test]
    fn activities_in_progress_keep_their_workers() {
        // 35 activities running, none visible, for a minute: not timers (work items have none).
        let hub = steady(60_000, (35, 0), &[]);
        let r = run(&hub, 4, 60_000);
        assert!(r.keep_workers_alive);
        assert_eq!(r.desired_workers, 4);
    }

    #[test]
    fn orchestration_workers_are_capped_by_partitions_with_work() {
        let settings = DurableSettings { activity_lookahead: false, ..DurableSettings::default() };
        let run = |hub: &HubHistory| recommend(&settings, hub, 1, ms(10_000)).desired_workers;
        assert_eq!(run(&steady(10_000, (0, 0), &[(100, 32), (0, 0), (0, 0), (0, 0)])), 1);
        assert_eq!(run(&steady(10_000, (0, 0), &[(100, 32), (100, 32), (0, 0), (0, 0)])), 2);
        assert_eq!(
            run(&steady(10_000, (0, 0), &[(2, 2), (2, 2), (3, 3), (0, 0)])),
            2,
            "ceil(7/5) = 2 < 3 partitions"
        );
    }

    #[test]
    fn waiting_episodes_beyond_one_round_count_as_activities_to_come() {
        // 400 messages on two partitions: 2 orchestration workers take 10 per round; the other
        // 390 will mostly schedule activities: ceil(390 / 10) = 39 workers.
        let hub = arriving(10_000, (0, 0), &[(200, 32), (200, 32), (0, 0), (0, 0)]);
        let r = run(&hub, 1, 10_000);
        assert_eq!(r.desired_workers, 39, "{}", r.reason);
        // A few messages per partition are one round's work: no lookahead.
        let hub = steady(10_000, (0, 0), &[(3, 3), (3, 3), (0, 0), (0, 0)]);
        assert_eq!(run(&hub, 1, 10_000).desired_workers, 2);
    }

    #[test]
    fn timers_that_fire_are_not_looked_ahead_for_but_new_arrivals_are() {
        let settings = DurableSettings::default();
        // 200 timers sleeping on each of two partitions for a minute, then all fire.
        let mut hub = steady(60_000, (0, 0), &[(200, 0), (200, 0)]);
        hub.record(
            &settings,
            s(65_000, 0, 0),
            &[s(65_000, 200, 32), s(65_000, 200, 32), s(65_000, 0, 0), s(65_000, 0, 0)],
        );
        let r = recommend(&settings, &hub, 1, ms(65_000));
        assert_eq!(r.desired_workers, 2, "two partition workers, no lookahead: {}", r.reason);
        // The same counts arriving as new messages are episodes to come: (400 - 10) / 10.
        let mut hub = steady(60_000, (0, 0), &[]);
        hub.record(
            &settings,
            s(65_000, 0, 0),
            &[s(65_000, 200, 32), s(65_000, 200, 32), s(65_000, 0, 0), s(65_000, 0, 0)],
        );
        assert_eq!(recommend(&settings, &hub, 1, ms(65_000)).desired_workers, 39);
    }

    #[test]
    fn an_episode_estimate_lets_one_worker_take_what_it_clears_before_a_pod_starts() {
        // 1 s episodes, 20 s start-up: one worker clears 5 x 20 = 100 messages in that time.
        let settings = DurableSettings { episode_estimate_ms: 1_000, ..DurableSettings::default() };
        let hub = steady(10_000, (0, 0), &[(25, 25), (25, 25), (25, 25), (25, 25)]);
        assert_eq!(recommend(&settings, &hub, 1, ms(10_000)).desired_workers, 1);
        let hub = arriving(10_000, (0, 0), &[(300, 32), (300, 32), (0, 0), (0, 0)]);
        let r = recommend(&settings, &hub, 1, ms(10_000));
        assert_eq!(r.desired_workers, 40, "2 partition workers, (600 - 200) / 10 to come: {}", r.reason);
    }

    #[test]
    fn no_scale_up_for_work_that_drains_before_a_new_pod_starts() {
        let settings = DurableSettings::default();
        let mut hub = steady(5_000, (100, 32), &[]);
        // 100 -> 60 in 5 s: the remaining 60 are gone in about 7.5 s, well before 20 s.
        hub.record(&settings, s(10_000, 60, 32), &[s(10_000, 0, 0); P]);
        let r = run(&hub, 2, 10_000);
        assert_eq!(r.desired_workers, 2, "{}", r.reason);
        assert!(r.reason.contains("held at 2"), "{}", r.reason);
        // Falling slowly (100 -> 95): more workers are worth starting.
        let mut hub = steady(5_000, (100, 32), &[]);
        hub.record(&settings, s(10_000, 95, 32), &[s(10_000, 0, 0); P]);
        assert_eq!(run(&hub, 2, 10_000).desired_workers, 10);
    }

    #[test]
    fn activity_backlog_divides_by_activities_per_worker() {
        let hub = steady(10_000, (95, 32), &[]);
        assert_eq!(run(&hub, 1, 10_000).desired_workers, 10);
    }

    #[test]
    fn scale_in_keeps_the_window_peak() {
        let settings = DurableSettings::default();
        let mut hub = steady(20_000, (80, 32), &[]);
        hub.record(&settings, s(25_000, 0, 0), &[s(25_000, 0, 0); P]);
        let r = run(&hub, 8, 25_000);
        assert_eq!(r.desired_workers, 8, "{}", r.reason);
        assert!(r.reason.contains("damped"), "{}", r.reason);
        assert!(!r.keep_workers_alive, "damping holds pods, not the hub's activity");
        // Once the window has passed with nothing, the hub may sleep.
        for t in (30_000..=60_000).step_by(5_000) {
            hub.record(&settings, s(t, 0, 0), &[s(t, 0, 0); P]);
        }
        let r = run(&hub, 8, 60_000);
        assert_eq!((r.desired_workers, r.keep_workers_alive), (0, false));
    }

    #[test]
    fn damping_never_asks_for_more_than_the_current_count() {
        let settings = DurableSettings::default();
        let mut hub = steady(20_000, (200, 32), &[]);
        hub.record(&settings, s(25_000, 10, 10), &[s(25_000, 0, 0); P]);
        assert_eq!(run(&hub, 5, 25_000).desired_workers, 5);
    }

    #[test]
    fn metric_value_moves_the_hpa_past_its_tolerance() {
        use hpa::desired_replicas;
        for current in 10..60 {
            let v = metric_value(current + 1, current);
            let moved = desired_replicas(current, v, 1.0, MetricTargetType::AverageValue);
            assert!(moved > current, "at {current} a +1 step must move (value {v})");
            assert!(moved <= current + current / 10 + 2, "overshoot stays within 10 % at {current}");
        }
        assert_eq!(metric_value(7, 3), 7.0);
        assert_eq!(metric_value(3, 0), 3.0);
        assert_eq!(metric_value(9, 10), 9.0);
    }

    #[test]
    fn history_keeps_only_its_horizon() {
        let mut h = QueueHistory::new();
        for t in (0..=100_000).step_by(5_000) {
            h.record(s(t, 1, 1), 30_000);
        }
        let first = h.samples().next().map(|s| s.at);
        assert_eq!(first, Some(ms(70_000)), "one sample at or before the horizon is kept");
    }

    #[test]
    fn at_zero_workers_invisible_control_messages_are_timers_from_the_first_sample() {
        let settings = DurableSettings::default();
        let mut hub = HubHistory::new(P);
        let mut control = vec![s(100_000, 0, 0); P];
        control[1] = s(100_000, 3, 0);
        hub.record(&settings, s(100_000, 0, 0), &control);
        let r = recommend(&settings, &hub, 0, ms(100_000));
        assert_eq!((r.desired_workers, r.keep_workers_alive), (0, false), "{}", r.reason);
        // With a worker running, messages that came in over the window may be its work.
        let mut control = vec![s(105_000, 0, 0); P];
        control[1] = s(105_000, 5, 0);
        hub.record(&settings, s(105_000, 0, 0), &control);
        assert!(!recommend(&settings, &hub, 0, ms(105_000)).keep_workers_alive);
        assert!(recommend(&settings, &hub, 1, ms(105_000)).keep_workers_alive);
    }
}
