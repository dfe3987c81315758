//! `scaleAlgorithm: durable`, the project's default: a worker count from approximate counts,
//! visible counts and first-message ages, that counts what live workers hold as work, tells
//! sleeping durable timers apart by how they came to be, and is shaped for the HPA that
//! applies it.
//!
//! # What a live worker does to the queues (read from upstream, not from the layout)
//!
//! Azure/durabletask, src/DurableTask.AzureStorage and src/DurableTask.Core:
//! - **Work items are renewed for as long as an activity runs**
//!   (`Core/TaskActivityDispatcher.cs` `RenewUntil`/`AdjustRenewAt`, about every 30 s, ->
//!   `AzureStorageOrchestrationService.RenewTaskActivityWorkItemLockAsync` ->
//!   `Messaging/TaskHubQueue.cs` `RenewMessageAsync`: UpdateMessage, visible again only after
//!   `WorkItemQueueVisibilityTimeout`). A 20-minute activity reads "approximate 1, peek
//!   empty" for 20 minutes. Work items never carry timers (`TaskHubQueue.GetVisibilityDelay`
//!   delays TimerFired, scheduled ExecutionStarted and delayed entity messages only, all
//!   control-queue messages); a failed one is abandoned with a back-off of min(2^dequeues,
//!   600) s (`TaskHubQueue.AbandonMessageAsync`) and comes back, for ever.
//! - **Control messages are prefetched** (`Messaging/ControlQueue.cs` `GetMessagesAsync`):
//!   batches of 32 with `ControlQueueVisibilityTimeout` (5 min), not renewed, until the pod
//!   buffers `ControlQueueBufferThreshold` messages (256 in the Functions extension off the
//!   Consumption plan, `Options/AzureStorageOptions.cs`); they wait in
//!   `OrchestrationSessionManager` for an orchestration slot, and the session being run is
//!   renewed (`Core/TaskOrchestrationDispatcher.cs` `RenewUntil`). A backlog a pod prefetched
//!   reads invisible, exactly like sleeping timers.
//! - **A peek sees at most 32 messages**: "32 visible" means "32 or more", so approximate -
//!   visible says nothing about invisible messages then.
//! - **Timers are born invisible** (`GetVisibilityDelay`: visible at the fire time, at most
//!   6 days a hop) and stay invisible until they fire; a prefetched message was born
//!   visible, and is deleted (processed) or visible again within the visibility timeout,
//!   unless its session is being renewed.
//!
//! # Rules, in order
//!
//! 1. **Work items: every message is work**, visible or not, however long it has been
//!    invisible: only a live worker's renewal keeps a message invisible past the visibility
//!    timeout, a dead worker's reappears within it, and a poison one backs off and comes back
//!    for ever (so a poison message keeps waking the app, as upstream keeps retrying it). Even
//!    at zero workers: the worker count may lag the pods that hold them, and a work item is
//!    never a timer.
//! 2. **Control queues: the invisible count is accounted for by how it came to be**
//!    ([`HubHistory::record`]). Per queue, invisible messages are either **held** (possibly
//!    held by a worker: dequeued, prefetched, or in a session) or **timers**, and each new
//!    reading is explained from the one before:
//!    - the invisible count rose: the rise is held work, except as many as the timers that
//!      had just fired and were taken for processing: their episodes re-arm timers (a
//!      monitor's next wake-up). Held work that was seen visible and taken is **taken**; what
//!      appeared invisible may be an arrival a worker took at once or a timer born;
//!    - the invisible count fell: what turned visible and was dequeued before (the peek's
//!      `DequeueCount` > 0, [`QueueReading::redelivered_count`]) is held work reappearing; what
//!      turned visible never dequeued is timers firing (the known ones first, else held
//!      messages that were timers all along); what was deleted while invisible came from held
//!      work (a worker finished it: timers are never deleted while invisible);
//!    - held work becomes timers once the queue has been **quiet** for
//!      [`DurableSettings::settle_ms`] and the held messages are at least that old. Quiet: no
//!      consumer at work, i.e. neither its visible nor its approximate count fell beyond what
//!      finishing the timers that fired explains. Timers set by work settle one window after
//!      the work stops, and a monitor's own firing does not keep its queue busy. Taken work
//!      settles so only while there is no more of it than one worker's orchestration slots
//!      (`maxOrchestrationsPerWorker`): more than that waits in a buffer, which a pod may work
//!      off exactly as fast as new messages arrive and are taken, leaving both counts still;
//!      it settles only once nothing at all has moved for the visibility timeout (by then
//!      every message a worker took was finished or has reappeared);
//!    - a reading whose peek hit [`PEEK_LIMIT`] says "at least 32 visible": nothing is taken
//!      for held or timers on its say-so, the earlier split is only trimmed to what can still
//!      be invisible (timers first);
//!    - held work never exceeds what the owner can hold, its buffer threshold plus one batch
//!      ([`DurableSettings::buffer_threshold`]); more is timers;
//!    - with no worker running nothing holds anything: every invisible control message is a
//!      timer, so a hub of timers never wakes from zero.
//! 3. **Dead owners**: when a partition's owner is gone without letting go (its sidecar went
//!    silent, or its lease lapsed with no pod taking the partition over: the caller says so
//!    with [`HubHistory::set_owner_lost`], as of the owner's last report), the messages it
//!    held stay invisible until their visibility timeout lapses, and then reappear. Until then
//!    (lost at + [`DurableSettings::visibility_timeout_ms`]) the partition's held work is what
//!    it was when the owner was last seen, and does not settle, even at zero workers.
//! 4. **Orchestration workers** = `min(partitions with work, ceil(orchestration work /
//!    maxOrchestrationsPerWorker))`, orchestration work being visible plus held messages: one
//!    partition is processed by one worker at a time, so more never helps.
//! 5. **Lookahead**: orchestration messages beyond what those workers take in one round are
//!    episodes still to run, and an episode mostly schedules activities; those that arrived
//!    within [`DurableSettings::lookahead_window_ms`] (not timers that fired) count as
//!    activities to come, so pods are asked for before the fan-out lands (a pod takes its
//!    start-up delay to help).
//! 6. Desired = max(activity, orchestration, lookahead workers), at least 1 while any work
//!    exists; `keep_workers_alive` is false only when no queue holds work (sleeping timers and
//!    nothing else let the hub sleep).
//! 7. **No late pods**: while the work is falling fast enough to be gone before a new pod
//!    could start ([`DurableSettings::startup_ms`]), no scale-up is asked for.
//! 8. **Damped scale-in**: below the current count, the answer is the highest the rules gave
//!    over the last [`DurableSettings::scale_in_window_ms`], so one empty sample between
//!    batches sheds nothing (the HPA's stabilization window then damps further).
//! 9. **HPA tolerance**: [`metric_value`] turns the desired count into the value to report
//!    (target 1, AverageValue) so that a needed +1 at 10 or more replicas still moves the HPA.
//!
//! # Known blind spots
//!
//! - A pod that finishes held messages exactly as fast as new ones arrive and are prefetched
//!   between two readings, for the whole visibility timeout, leaves both counts unmoved that
//!   long: its buffer then settles into timers. Finishing is rarely in step with arriving for
//!   that long, and DTFx's own polling back-off makes new arrivals visible for a moment.
//! - A visible message taken by an episode that sets a timer in its place reads as taken
//!   work (the counts cannot tell); with no more of it than a worker's slots, it settles once
//!   the queue is quiet.
//! - A message that appears invisible on a busy queue may be a new timer or an arrival a pod
//!   prefetched at once: it counts as held work until the queue is quiet (cost, never lost
//!   work).
//! - A fired timer taken by a pod whose slots are all busy reads as re-armed (a timer) while
//!   it waits; that pod's other work keeps the hub active.
//! - An orchestration episode running alone on its partition for longer than the settle
//!   window (its session renewed, nothing else moving) settles into timers; its pod's work
//!   items, if any, still count.

use std::collections::VecDeque;

use super::{Recommendation, hpa};
use crate::clock::UnixMs;
pub use crate::reading::PEEK_LIMIT;
use crate::reading::QueueReading;

/// One reading of one queue as the history keeps it: stamped with the moment it was taken
/// into the history, with the split of the queue's invisible messages at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// The reading (its `sampled_at` is the moment of the sample).
    pub reading: QueueReading,
    /// Invisible messages taken for sleeping timers then (control queues only).
    pub timers: u64,
    /// Invisible messages taken for work a worker holds then (control queues only).
    pub held: u64,
}

impl Sample {
    fn at(&self) -> UnixMs {
        self.reading.sampled_at
    }
}

/// The recent samples of one queue, oldest first, trimmed to a horizon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QueueHistory {
    samples: VecDeque<Sample>,
}

impl QueueHistory {
    /// An empty history.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends `sample` and forgets samples older than `horizon_ms` before it (keeping at
    /// least one older sample, so a window that starts before the horizon stays covered).
    fn record(&mut self, sample: Sample, horizon_ms: u64) {
        self.samples.push_back(sample);
        let cutoff = before(sample.at(), horizon_ms);
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|s| s.at() <= cutoff) {
            self.samples.pop_front();
        }
    }

    /// Samples, oldest first.
    pub(crate) fn samples(&self) -> impl DoubleEndedIterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Samples taken at or after `since`.
    fn since(&self, since: UnixMs) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.at() >= since)
    }

    /// The newest sample taken at or before `at`.
    fn at(&self, at: UnixMs) -> Option<&Sample> {
        self.samples.iter().rev().find(|s| s.at() <= at)
    }
}

/// Invisible messages of one control queue that may be held by a worker, since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    since: UnixMs,
    count: u64,
    /// Seen visible, then taken: a worker dequeued them (or found invisible at the first
    /// reading, which might be that). Otherwise they appeared invisible: taken at once, or
    /// timers born.
    taken: bool,
}

/// What the previous reading of a control queue showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Previous {
    messages: u64,
    /// Visible messages (estimated as messages - accounted invisible when the peek was full).
    visible: u64,
    redelivered: u64,
}

/// How one control queue's invisible messages came to be (rule 2 of the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ledger {
    /// Invisible messages taken for sleeping timers.
    timers: u64,
    /// Invisible messages possibly held by a worker, oldest first.
    held: VecDeque<Held>,
    /// Timers that fired and are not finished yet: their dequeue and their deletion need no
    /// other consumer to explain them.
    fired: u64,
    /// Of those, the ones whose episode has not re-armed a timer yet.
    rearmable: u64,
    /// When a timer last fired.
    fired_at: Option<UnixMs>,
    /// The last reading that showed a consumer at work beyond finishing fired timers.
    consumer_seen: Option<UnixMs>,
    /// The last reading whose counts differed from the one before.
    changed: Option<UnixMs>,
    previous: Option<Previous>,
}

impl Ledger {
    fn held(&self) -> u64 {
        self.held.iter().map(|h| h.count).sum()
    }

    fn stock(&self) -> u64 {
        self.timers + self.held()
    }

    fn hold(&mut self, since: UnixMs, count: u64, taken: bool) {
        if count > 0 {
            self.held.push_back(Held { since, count, taken });
        }
    }

    /// Moves the held cohorts that `settles` into the timers, oldest first.
    fn settle(&mut self, settles: impl Fn(&Held) -> bool) {
        let mut kept = VecDeque::with_capacity(self.held.len());
        for cohort in std::mem::take(&mut self.held) {
            if settles(&cohort) {
                self.timers += cohort.count;
            } else {
                kept.push_back(cohort);
            }
        }
        self.held = kept;
    }

    /// Takes up to `n` from the timers; returns how many.
    fn take_timers(&mut self, n: u64) -> u64 {
        let taken = n.min(self.timers);
        self.timers -= taken;
        taken
    }

    /// Takes up to `n` held messages, oldest first; returns how many.
    fn take_held(&mut self, n: u64) -> u64 {
        let mut taken = 0;
        while taken < n {
            let Some(oldest) = self.held.front_mut() else { break };
            let k = oldest.count.min(n - taken);
            oldest.count -= k;
            taken += k;
            if oldest.count == 0 {
                self.held.pop_front();
            }
        }
        taken
    }

    /// Explains `reading` from the one before (module docs, rule 2). `lost`: the partition's
    /// owner is lost (its held work stays held).
    fn observe(&mut self, reading: &QueueReading, settings: &DurableSettings, lost: bool) {
        let now = reading.sampled_at;
        let messages = reading.messages();
        let redelivered = u64::from(reading.redelivered_count);
        let previous = self.previous;
        if previous.is_none_or(|p| {
            p.messages != messages || (!reading.peek_saturated() && p.visible != reading.visible())
        }) {
            self.changed = Some(now);
        }
        if let Some(p) = previous {
            // A consumer at work: visible messages taken, or invisible ones deleted, beyond
            // what finishing the timers that fired explains.
            let taken =
                if reading.peek_saturated() { 0 } else { p.visible.saturating_sub(reading.visible()) };
            let deleted = p.messages.saturating_sub(messages);
            if taken > self.fired || deleted > self.fired {
                self.consumer_seen = Some(now);
            }
            self.fired -= deleted.min(self.fired);
            self.rearmable = self.rearmable.min(self.fired);
        }
        match (reading.invisible(), previous) {
            (None, _) => {
                // At least PEEK_LIMIT visible: no more than approximate - 32 can be invisible.
                let excess = self.stock().saturating_sub(messages - reading.visible());
                let from_timers = self.take_timers(excess);
                self.take_held(excess - from_timers);
            }
            (Some(invisible), None) => self.hold(now, invisible, true),
            (Some(invisible), Some(p)) => {
                let stock = self.stock();
                if invisible > stock {
                    // Taken by a worker, or born invisible; a fired timer's episode re-arms.
                    let rise = invisible - stock;
                    let rearmed = rise.min(self.rearmable);
                    self.rearmable -= rearmed;
                    self.timers += rearmed;
                    let taken = (rise - rearmed).min(p.visible.saturating_sub(reading.visible()));
                    self.hold(now, taken, true);
                    self.hold(now, rise - rearmed - taken, false);
                } else if invisible < stock {
                    let fall = stock - invisible;
                    let to_visible = fall.min(reading.visible().saturating_sub(p.visible));
                    // Dequeued before (DequeueCount > 0): held messages reappearing. The rest
                    // were never dequeued: timers firing (first the known ones).
                    let reappeared = to_visible.min(redelivered.saturating_sub(p.redelivered));
                    let back = self.take_held(reappeared);
                    self.take_timers(reappeared - back);
                    let fresh = to_visible - reappeared;
                    let from_timers = self.take_timers(fresh);
                    self.take_held(fresh - from_timers);
                    self.fired += fresh;
                    self.rearmable += fresh;
                    if fresh > 0 {
                        self.fired_at = Some(now);
                    }
                    // Deleted while invisible: finished by a worker (timers are never deleted
                    // while invisible).
                    let deleted = fall - to_visible;
                    let finished = self.take_held(deleted);
                    self.take_timers(deleted - finished);
                }
            }
        }
        self.previous =
            Some(Previous { messages, visible: messages - self.stock().min(messages), redelivered });
        if lost {
            return;
        }
        let settle = i64::try_from(settings.settle_ms).unwrap_or(i64::MAX);
        let timeout = i64::try_from(settings.visibility_timeout_ms).unwrap_or(i64::MAX);
        let older = |t: Option<UnixMs>, ms: i64| t.is_none_or(|t| now.millis_since(t) >= ms);
        if self.fired_at.is_some_and(|t| now.millis_since(t) >= settle) {
            // What fired that long ago was finished, or is held by a worker like the rest.
            (self.fired, self.rearmable, self.fired_at) = (0, 0, None);
        }
        if older(self.consumer_seen, settle) {
            // Quiet. What appeared invisible and has been as long as the window is not held
            // by anyone: timers. Messages a worker took wait in its buffer only while its
            // orchestration slots are all busy: no more of them than it has slots are in
            // episodes (ms to seconds) unless the app is busy, which shows.
            let taken: u64 = self.held.iter().filter(|h| h.taken).map(|h| h.count).sum();
            let slots = u64::from(settings.max_orchestrations_per_worker.max(1));
            self.settle(|h| now.millis_since(h.since) >= settle && (!h.taken || taken <= slots));
        }
        if older(self.changed, timeout) {
            // Nothing moved for a whole visibility timeout: whatever a worker took would have
            // been finished or have reappeared by now.
            self.settle(|h| now.millis_since(h.since) >= timeout);
        }
        let over = self.held().saturating_sub(settings.held_cap());
        let over = self.take_held(over);
        self.timers += over;
    }
}

/// A partition whose owner is gone (rule 3 of the module docs): since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LostOwner {
    at: UnixMs,
}

/// The histories of one task hub's queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HubHistory {
    /// The work-item (activity) queue.
    pub work_item: QueueHistory,
    /// Control queue `i` of partition `i`.
    pub control: Vec<QueueHistory>,
    /// Per control queue: how its invisible messages came to be (rule 2).
    ledgers: Vec<Ledger>,
    /// Per partition: its owner is gone (rule 3).
    lost: Vec<Option<LostOwner>>,
}

impl HubHistory {
    /// Empty histories for `partitions` control queues.
    pub(crate) fn new(partitions: usize) -> Self {
        Self {
            work_item: QueueHistory::new(),
            control: vec![QueueHistory::new(); partitions],
            ledgers: vec![Ledger::default(); partitions],
            lost: vec![None; partitions],
        }
    }

    /// The owner of `partition` is lost at `at` (rule 3).
    fn is_lost(&self, settings: &DurableSettings, partition: usize, at: UnixMs) -> bool {
        let timeout = i64::try_from(settings.visibility_timeout_ms).unwrap_or(i64::MAX);
        self.lost
            .get(partition)
            .copied()
            .flatten()
            .is_some_and(|l| l.at <= at && at.millis_since(l.at) < timeout)
    }

    /// Records one reading per queue, all taken into the history at the same moment (their
    /// `sampled_at`), keeping what `settings` needs. Whether workers run is not asked: at zero
    /// workers the decision takes every invisible control message for a timer
    /// ([`recommend`]), while the split is kept for when a worker count that lagged its pods
    /// catches up.
    #[cfg(test)]
    pub(crate) fn record(
        &mut self,
        settings: &DurableSettings,
        work_item: QueueReading,
        control: &[QueueReading],
    ) {
        let control: Vec<Option<QueueReading>> = control.iter().copied().map(Some).collect();
        self.record_read(settings, Some(work_item), &control);
    }

    /// As [`HubHistory::record`], with `None` for a queue not read yet: nothing is recorded
    /// for it. A queue's history starts at its first reading; a count of 0 made up before it
    /// would read as that many messages arriving at once (the lookahead) and as invisible
    /// messages appearing (rule 2), as when the sidecars of a hub's pods report one after
    /// another and the first covers a partition or two.
    pub(crate) fn record_read(
        &mut self,
        settings: &DurableSettings,
        work_item: Option<QueueReading>,
        control: &[Option<QueueReading>],
    ) {
        let horizon = settings.horizon_ms();
        if let Some(work_item) = work_item {
            self.work_item.record(Sample { reading: work_item, timers: 0, held: 0 }, horizon);
        }
        if self.control.len() < control.len() {
            self.control.resize(control.len(), QueueHistory::new());
        }
        if self.ledgers.len() < self.control.len() {
            self.ledgers.resize(self.control.len(), Ledger::default());
        }
        for (partition, reading) in control.iter().enumerate() {
            let Some(reading) = reading else { continue };
            let lost = self.is_lost(settings, partition, reading.sampled_at);
            let ledger = &mut self.ledgers[partition];
            ledger.observe(reading, settings, lost);
            let sample = Sample { reading: *reading, timers: ledger.timers, held: ledger.held() };
            self.control[partition].record(sample, horizon);
        }
    }

    /// Says whether partition `partition`'s owner is gone: `Some(t)` when it was lost at `t`
    /// (went silent or let its lease lapse without a pod taking over), `None` when a live
    /// owner holds it or it was let go cleanly. From `t` until the visibility timeout has
    /// passed, what the partition held at `t` counts as work and does not settle (rule 3);
    /// calling again with the same `t` keeps it.
    pub(crate) fn set_owner_lost(&mut self, partition: usize, lost_at: Option<UnixMs>) {
        if self.lost.len() < self.control.len() {
            self.lost.resize(self.control.len(), None);
        }
        let Some(slot) = self.lost.get_mut(partition) else { return };
        match lost_at {
            None => *slot = None,
            Some(at) if slot.is_some_and(|l| l.at == at) => {}
            Some(at) => {
                *slot = Some(LostOwner { at });
                // The loss is told up to a few intervals late: what settled since the owner's
                // last report was its held work, not timers.
                let then = self.control.get(partition).and_then(|h| h.at(at)).map_or(0, |s| s.held);
                if let Some(ledger) = self.ledgers.get_mut(partition) {
                    let missing = then.saturating_sub(ledger.held());
                    let back = ledger.take_timers(missing);
                    ledger.hold(at, back, true);
                }
            }
        }
    }
}

/// The algorithm's knobs (defaults and their sources in docs/simulator.md, "Our algorithm").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableSettings {
    /// Activities one worker runs at once (`maxActivitiesPerWorker`; by default the app's
    /// own limit, see `aggregator::settings`).
    pub max_activities_per_worker: u32,
    /// Orchestrations one worker runs at once (`maxOrchestrationsPerWorker`, likewise).
    pub max_orchestrations_per_worker: u32,
    /// How long a control queue must have been quiet (no consumer at work) before invisible
    /// messages that came while it was busy are taken for sleeping timers (rule 2).
    pub settle_ms: u64,
    /// The app's control-queue visibility timeout (DTFx's `ControlQueueVisibilityTimeout`,
    /// 5 min unless the app sets it): how long a dead owner's messages stay invisible and
    /// count as work (rule 3).
    pub visibility_timeout_ms: u64,
    /// The app's `ControlQueueBufferThreshold` (256 unless it sets it): with one batch more,
    /// the most a pod holds of one control queue (rule 2).
    pub buffer_threshold: u32,
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
/// 20 s each): the history keeps enough to take its held work as of then.
pub const OWNER_LOSS_NOTICE_MS: u64 = 60_000;

/// DTFx's default visibility timeout for dequeued messages (`ControlQueueVisibilityTimeout`
/// and `WorkItemQueueVisibilityTimeout`, 5 minutes: DurableTask.AzureStorage's
/// `AzureStorageOrchestrationServiceSettings.cs` and the extension's `AzureStorageOptions.cs`).
pub const DEFAULT_VISIBILITY_TIMEOUT_MS: u64 = 300_000;

/// The Functions extension's default `ControlQueueBufferThreshold` outside the Consumption
/// plan (azure-functions-durable-extension `Options/AzureStorageOptions.cs`; 128, or 32 for
/// Python, on Consumption in `AzureStorageDurabilityProviderFactory.cs`; 64 in DTFx alone).
pub const DEFAULT_BUFFER_THRESHOLD: u32 = 256;

/// `ControlQueueBatchSize`: what one prefetch takes (DTFx's default and Azure's maximum, 32).
const CONTROL_QUEUE_BATCH: u64 = PEEK_LIMIT as u64;

impl Default for DurableSettings {
    fn default() -> Self {
        Self {
            max_activities_per_worker: crate::contract::WORK_ITEMS_PER_CPU,
            max_orchestrations_per_worker: crate::contract::WORK_ITEMS_PER_CPU,
            settle_ms: 30_000,
            visibility_timeout_ms: DEFAULT_VISIBILITY_TIMEOUT_MS,
            buffer_threshold: DEFAULT_BUFFER_THRESHOLD,
            scale_in_window_ms: 10_000,
            activity_lookahead: true,
            startup_ms: 20_000,
            episode_estimate_ms: 0,
            lookahead_window_ms: 60_000,
        }
    }
}

impl DurableSettings {
    /// How much history the rules read: the scale-in window and the lookahead look back, and
    /// a lost owner's held work is taken as of its last report, told up to
    /// [`OWNER_LOSS_NOTICE_MS`] later.
    pub fn horizon_ms(&self) -> u64 {
        self.scale_in_window_ms.max(OWNER_LOSS_NOTICE_MS).max(self.lookahead_window_ms)
    }

    /// The most one control queue's owner can hold: its buffer and one batch more (the
    /// buffer is checked before each batch is fetched, `ControlQueue.GetMessagesAsync`).
    fn held_cap(&self) -> u64 {
        u64::from(self.buffer_threshold).saturating_add(CONTROL_QUEUE_BATCH)
    }
}

/// What the rules saw at one moment, kept for the reason string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Need {
    activity_messages: u64,
    activity_workers: u64,
    orchestration_messages: u64,
    active_partitions: u64,
    /// Invisible control messages taken for sleeping timers.
    timers: u64,
    /// Invisible control messages taken for work a worker holds.
    held: u64,
    /// Partitions with held control messages.
    held_partitions: u64,
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

/// The need at the moment `at` (the newest sample of each queue at or before it). With
/// `no_workers`, nothing holds anything: invisible work items and the invisible control
/// messages of partitions with no lost owner wait (rules 1 and 2).
fn need_at(hub: &HubHistory, settings: &DurableSettings, at: UnixMs, no_workers: bool) -> Need {
    let activity_messages = hub.work_item.at(at).map_or(0, |s| s.reading.messages());
    let mut need = Need {
        activity_messages,
        activity_workers: activity_messages.div_ceil(u64::from(settings.max_activities_per_worker.max(1))),
        ..Need::default()
    };
    let mut arrived = 0u64;
    for (partition, history) in hub.control.iter().enumerate() {
        let Some(sample) = history.at(at).copied() else { continue };
        let reading = sample.reading;
        if settings.lookahead_window_ms > 0 {
            // Messages that arrived within the window: growth over its lowest count. Timers
            // that fire turn invisible messages visible without growing the count.
            let since = before(at, settings.lookahead_window_ms);
            let low = history
                .samples()
                .filter(|s| s.at() >= since && s.at() <= at)
                .map(|s| s.reading.messages())
                .min()
                .unwrap_or(reading.messages());
            arrived += reading.messages().saturating_sub(low);
        }
        let lost = hub.is_lost(settings, partition, at);
        let (timers, held) = match reading.invisible() {
            Some(invisible) if no_workers && !lost => (invisible, 0),
            _ => (sample.timers, sample.held),
        };
        if lost {
            need.lost_partitions += 1;
        }
        need.timers += timers;
        need.held += held;
        need.held_partitions += u64::from(held > 0);
        let work = reading.messages() - timers.min(reading.messages());
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

/// How the latest [`recommend`] split the hub's invisible messages, for the metric and
/// `/hubs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Split {
    /// Invisible control messages taken for sleeping timers.
    pub timers: u64,
    /// Invisible control messages taken for work a worker holds (counted as work).
    pub held: u64,
    /// Partitions with held control messages.
    pub held_partitions: u64,
    /// Invisible work items (running activities, or backing off): work while a worker runs.
    pub invisible_work_items: u64,
}

/// The control messages taken for held work at `now`, per partition (a pod's share of the
/// hub's held work is that of the partitions it owns).
pub(crate) fn held_by_partition(hub: &HubHistory, now: UnixMs) -> Vec<u64> {
    hub.control.iter().map(|h| h.at(now).map_or(0, |s| s.held)).collect()
}

/// How the `durable` rules split the hub's invisible messages at `now`.
pub(crate) fn split(settings: &DurableSettings, hub: &HubHistory, workers: u32, now: UnixMs) -> Split {
    let need = need_at(hub, settings, now, workers == 0);
    // A full peek hides how many are invisible: none is known to be.
    let invisible_work_items = hub.work_item.at(now).and_then(|s| s.reading.invisible()).unwrap_or(0);
    Split {
        timers: need.timers,
        held: need.held,
        held_partitions: need.held_partitions,
        invisible_work_items,
    }
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
    let mut drain_eta = None;
    if raw > u64::from(workers) && workers > 0 && settings.startup_ms > 0 {
        // Scale-up only for work that outlasts a new pod's start-up: if the work is falling
        // fast enough to be gone before a new pod could help, the current workers suffice.
        let previous = hub.work_item.samples().rev().find(|s| s.at() < now);
        if let Some(previous) = previous {
            let earlier = need_at(hub, settings, previous.at(), workers == 0).messages();
            let after = need.messages();
            let elapsed = u64::try_from(now.millis_since(previous.at())).unwrap_or(0);
            if after < earlier && elapsed > 0 {
                let eta_ms = after.saturating_mul(elapsed) / (earlier - after);
                if eta_ms < settings.startup_ms {
                    desired = u64::from(workers);
                    drain_eta = Some(eta_ms);
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
            .filter(|s| s.at() <= now)
            .map(|s| need_at(hub, settings, s.at(), workers == 0).workers())
            .max()
            .unwrap_or(0);
        if peak > raw {
            desired = peak.min(u64::from(workers));
            damped = true;
        }
    }
    let desired = u32::try_from(desired).unwrap_or(u32::MAX);
    let not_counted = {
        let mut parts = Vec::new();
        if need.timers > 0 {
            parts.push(format!("{} invisible message(s) taken for sleeping timers", need.timers));
        }
        parts.join(", ")
    };
    let reason = if !keep && desired > 0 {
        format!(
            "No work now{}; scale-in damped at {desired} for {} s",
            if not_counted.is_empty() { String::new() } else { format!(" (only {not_counted})") },
            settings.scale_in_window_ms / 1000
        )
    } else if !keep && !not_counted.is_empty() {
        format!("Only {not_counted}: no work")
    } else if !keep {
        "Task hub is idle".to_string()
    } else {
        format!(
            "{} workers: activities ceil({}/{}) = {}, orchestrations min({} partitions with work, ceil({}/{})) = {}, lookahead {}{}{}{}{}{}",
            desired,
            need.activity_messages,
            settings.max_activities_per_worker.max(1),
            need.activity_workers,
            need.active_partitions,
            need.orchestration_messages,
            settings.max_orchestrations_per_worker.max(1),
            need.orchestration_workers,
            need.lookahead_workers,
            if need.held > 0 {
                format!("; {} invisible control message(s) held by workers count as work", need.held)
            } else {
                String::new()
            },
            if not_counted.is_empty() { String::new() } else { format!("; not counted: {not_counted}") },
            if need.lost_partitions > 0 {
                format!(
                    "; {} partition(s) whose owner is gone: its invisible messages count until the visibility timeout",
                    need.lost_partitions
                )
            } else {
                String::new()
            },
            if damped { format!(", scale-in damped from {raw}") } else { String::new() },
            drain_eta.map_or(String::new(), |eta| format!(
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

    /// The limits these cases were written for: 10 activities and 5 orchestrations a worker.
    fn settings() -> DurableSettings {
        DurableSettings { max_orchestrations_per_worker: 5, ..DurableSettings::default() }
    }

    fn s(at_ms: u64, approximate_count: u64, visible_count: u32) -> QueueReading {
        let first_visible_age_ms = if visible_count > 0 { 1_000 } else { 0 };
        QueueReading {
            sampled_at: ms(at_ms),
            approximate_count,
            visible_count,
            first_visible_age_ms,
            redelivered_count: 0,
        }
    }

    fn ms(at_ms: u64) -> UnixMs {
        UnixMs(i64::try_from(at_ms).expect("test times fit"))
    }

    /// A hub sampled every 5 s from `from_ms` to `until_ms` with one worker running and the
    /// given per-queue counts `(approximate, visible)` (work item first, then control queues),
    /// after `hub`'s samples.
    fn sampled(
        mut hub: HubHistory,
        from_ms: u64,
        until_ms: u64,
        wi: (u64, u32),
        control: &[(u64, u32)],
    ) -> HubHistory {
        for t in (from_ms..=until_ms).step_by(5_000) {
            let mut cq = vec![s(t, 0, 0); P];
            for (i, &(a, v)) in control.iter().enumerate() {
                cq[i] = s(t, a, v);
            }
            hub.record(&settings(), s(t, wi.0, wi.1), &cq);
        }
        hub
    }

    /// The counts held from 0 to `until_ms`.
    fn steady(until_ms: u64, wi: (u64, u32), control: &[(u64, u32)]) -> HubHistory {
        sampled(HubHistory::new(P), 0, until_ms, wi, control)
    }

    /// Like [`steady`], but the queues were empty at 0 and the counts arrived by 5 s.
    fn arriving(until_ms: u64, wi: (u64, u32), control: &[(u64, u32)]) -> HubHistory {
        sampled(steady(0, (0, 0), &[]), 5_000, until_ms, wi, control)
    }

    /// Records one moment: the work-item queue empty, control queue `partition` at `counts`,
    /// the others empty.
    fn record_one(hub: &mut HubHistory, t: u64, partition: usize, counts: (u64, u32)) {
        let mut cq = vec![s(t, 0, 0); P];
        cq[partition] = s(t, counts.0, counts.1);
        hub.record(&settings(), s(t, 0, 0), &cq);
    }

    fn run(hub: &HubHistory, workers: u32, now: u64) -> Recommendation {
        recommend(&settings(), hub, workers, ms(now))
    }

    #[test]
    fn fifty_sleeping_timers_alone_let_the_hub_sleep() {
        let hub = arriving(60_000, (0, 0), &[(50, 0), (3, 0), (0, 0), (7, 0)]);
        let r = run(&hub, 2, 60_000);
        assert!(!r.keep_workers_alive, "{}", r.reason);
        assert_eq!(r.desired_workers, 0);
        assert!(r.reason.contains("60 invisible message(s) taken for sleeping timers"), "{}", r.reason);
        assert!(!run(&hub, 0, 60_000).keep_workers_alive);
    }

    #[test]
    fn fifty_timers_and_one_new_message_need_one_messages_worth_of_workers() {
        // Lookahead over every waiting message, so that counting the timers would show.
        let settings = DurableSettings { lookahead_window_ms: 0, ..settings() };
        let mut hub = arriving(60_000, (0, 0), &[(50, 0), (50, 0), (50, 0), (50, 0)]);
        let mut control = [(50, 0); P].map(|(a, v)| s(65_000, a, v));
        control[1] = s(65_000, 51, 1);
        hub.record(&settings, s(65_000, 0, 0), &control);
        let r = recommend(&settings, &hub, 1, ms(65_000));
        assert!(r.keep_workers_alive);
        assert_eq!(r.desired_workers, 1, "{}", r.reason);
        assert!(r.reason.contains("ceil(1/5)"), "one message of work: {}", r.reason);
        // Dequeued by the worker, the message is invisible, held work, not a timer.
        control[1] = s(70_000, 51, 0);
        for c in control.iter_mut() {
            c.sampled_at = ms(70_000);
        }
        hub.record(&settings, s(70_000, 0, 0), &control);
        let r = recommend(&settings, &hub, 1, ms(70_000));
        assert_eq!((r.desired_workers, r.keep_workers_alive), (1, true), "{}", r.reason);
        assert_eq!(
            split(&settings, &hub, 1, ms(70_000)),
            Split { timers: 200, held: 1, held_partitions: 1, invisible_work_items: 0 }
        );
    }

    #[test]
    fn a_monitor_re_arming_its_timer_every_few_seconds_does_not_keep_a_worker_per_partition() {
        // Each partition: 20 timers set a while ago and a monitor whose timer fires every few
        // seconds; a sample catches it fired (visible), re-armed before the old message is
        // deleted (one more), or asleep, each partition in its own phase.
        let mut hub = arriving(40_000, (0, 0), &[(20, 0), (20, 0), (20, 0), (20, 0)]);
        let mut last = None;
        for (k, t) in (45_000..=300_000).step_by(5_000).enumerate() {
            let control: Vec<QueueReading> = (0..P)
                .map(|p| match (k + p) % 3 {
                    0 => s(t, 20, 1),
                    1 => s(t, 21, 0),
                    _ => s(t, 20, 0),
                })
                .collect();
            hub.record(&settings(), s(t, 0, 0), &control);
            last = Some(t);
        }
        let now = last.expect("sampled");
        let r = run(&hub, 4, now);
        assert!(r.keep_workers_alive, "the monitors do fire: {}", r.reason);
        // A message or two in flight over four partitions: one or two workers, not P.
        assert!(r.desired_workers <= 2, "{}", r.reason);
        assert!(
            split(&settings(), &hub, 4, ms(now)).timers >= 4 * 19,
            "the timers are told apart from the monitors in flight"
        );
    }

    #[test]
    fn what_is_invisible_at_the_first_reading_is_held_until_nothing_moves_for_the_visibility_timeout() {
        // An aggregator (re)started beside a pod working off a prefetched buffer exactly as
        // fast as messages arrive cannot tell that buffer from sleeping timers: it keeps it
        // as work while anything moves, and lets it go once nothing has for the visibility
        // timeout.
        let mut hub = HubHistory::new(P);
        for (k, t) in (0..=400_000).step_by(5_000).enumerate() {
            let counts = if k < 20 { (40 + (k % 2) as u64, 0) } else { (40, 0) };
            record_one(&mut hub, t, 0, counts);
            let r = run(&hub, 1, t);
            // The counts last moved at k = 20 (100 s).
            let moving_until = 100_000 + DEFAULT_VISIBILITY_TIMEOUT_MS;
            assert_eq!(r.keep_workers_alive, t < moving_until, "at {t} ms: {}", r.reason);
        }
    }

    #[test]
    fn a_dead_owners_in_flight_messages_count_as_work_until_the_visibility_timeout() {
        // 50 timers on partition 2; three messages arrive and are dequeued by its owner, which
        // then dies holding them (invisible, the count unchanged).
        let mut hub = arriving(60_000, (0, 0), &[(0, 0), (0, 0), (50, 0)]);
        record_one(&mut hub, 65_000, 2, (53, 3));
        record_one(&mut hub, 70_000, 2, (53, 0));
        let lost_at = ms(72_000);
        hub.set_owner_lost(2, Some(lost_at));
        let mut t = 75_000;
        while t <= 360_000 {
            record_one(&mut hub, t, 2, (53, 0));
            for workers in [0, 1] {
                let r = run(&hub, workers, t);
                assert!(r.keep_workers_alive, "at {t} ms, {workers} workers: {}", r.reason);
                assert!(r.reason.contains("ceil(3/5)"), "the three, not the timers: {}", r.reason);
            }
            t += 5_000;
        }
        // Past lost + visibility timeout the messages would have reappeared; still hidden,
        // they are timers.
        record_one(&mut hub, 375_000, 2, (53, 0));
        assert!(!run(&hub, 1, 375_000).keep_workers_alive);
        // Without the loss the same three would have settled into timers once the queue had
        // been quiet for the settle window.
        let mut alive = arriving(60_000, (0, 0), &[(0, 0), (0, 0), (50, 0)]);
        for (t, c) in [(65_000, (53, 3)), (70_000, (53, 0))] {
            record_one(&mut alive, t, 2, c);
        }
        for t in (75_000..=105_000).step_by(5_000) {
            record_one(&mut alive, t, 2, (53, 0));
        }
        assert!(!run(&alive, 1, 105_000).keep_workers_alive);
    }

    #[test]
    fn a_loss_told_late_restores_the_work_held_when_the_owner_was_last_seen() {
        // Three messages held at 70 s; the owner's last report is at 70 s, its loss is told
        // only at 110 s, after the queue was quiet long enough to settle them.
        let mut hub = arriving(60_000, (0, 0), &[(0, 0), (0, 0), (50, 0)]);
        record_one(&mut hub, 65_000, 2, (53, 3));
        for t in (70_000..=110_000).step_by(5_000) {
            record_one(&mut hub, t, 2, (53, 0));
        }
        assert!(!run(&hub, 1, 110_000).keep_workers_alive, "settled: the owner looked alive");
        hub.set_owner_lost(2, Some(ms(70_000)));
        record_one(&mut hub, 115_000, 2, (53, 0));
        let r = run(&hub, 0, 115_000);
        assert!(r.keep_workers_alive && r.reason.contains("ceil(3/5)"), "{}", r.reason);
    }

    #[test]
    fn an_activity_renewed_for_twenty_minutes_is_work_all_along() {
        // DTFx renews a running activity's message every ~30 s: approximate 1, peek empty.
        let mut hub = steady(0, (1, 0), &[]);
        for now in (5_000..=1_200_000).step_by(5_000) {
            hub = sampled(hub, now, now, (1, 0), &[]);
            let r = run(&hub, 1, now);
            assert_eq!((r.desired_workers, r.keep_workers_alive), (1, true), "at {now} ms: {}", r.reason);
        }
        assert_eq!(split(&settings(), &hub, 1, ms(1_200_000)).invisible_work_items, 1);
    }

    #[test]
    fn a_held_message_that_reappears_is_held_again_not_a_fired_timer() {
        // 5 timers known; a pod that died held 3 messages, which reappear (dequeued before:
        // redelivered) and are taken by the next owner.
        let mut hub = steady(60_000, (0, 0), &[(5, 0)]);
        record_one(&mut hub, 65_000, 0, (8, 3));
        record_one(&mut hub, 70_000, 0, (8, 0));
        let mut reappear = HubHistory::default();
        std::mem::swap(&mut reappear, &mut hub);
        let mut cq = vec![s(75_000, 0, 0); P];
        cq[0] = QueueReading { redelivered_count: 3, ..s(75_000, 8, 3) };
        reappear.record(&settings(), s(75_000, 0, 0), &cq);
        record_one(&mut reappear, 80_000, 0, (8, 0));
        let again = split(&settings(), &reappear, 1, ms(80_000));
        assert_eq!((again.timers, again.held), (5, 3), "the three are work again");
        // The same counts without the dequeue count read as three timers firing and their
        // episodes re-arming timers: a monitor.
        let mut fired = steady(60_000, (0, 0), &[(8, 0)]);
        record_one(&mut fired, 65_000, 0, (8, 3));
        record_one(&mut fired, 70_000, 0, (8, 0));
        assert_eq!(split(&settings(), &fired, 1, ms(70_000)).timers, 8);
    }

    #[test]
    fn a_poison_work_item_backing_off_keeps_waking_the_hub() {
        // A poison activity abandoned with back-off (TaskHubQueue.AbandonMessageAsync): it is
        // retried for ever, so it is work whether it is visible or not, even at zero workers.
        let hub = steady(60_000, (1, 0), &[]);
        let r = run(&hub, 0, 60_000);
        assert_eq!((r.action, r.keep_workers_alive), (ScaleAction::AddWorker, true), "{}", r.reason);
        let hub = sampled(hub, 65_000, 65_000, (1, 1), &[]);
        let r = run(&hub, 1, 65_000);
        assert_eq!((r.desired_workers, r.keep_workers_alive), (1, true), "{}", r.reason);
    }

    #[test]
    fn new_invisible_control_messages_count_until_they_settle() {
        let mut hub = HubHistory::new(P);
        hub.record(&settings(), s(0, 0, 0), &[s(0, 0, 0); P]);
        record_one(&mut hub, 5_000, 0, (2, 0));
        assert!(run(&hub, 1, 5_000).keep_workers_alive, "a count that just rose is work in progress");
        for t in (10_000..=35_000).step_by(5_000) {
            record_one(&mut hub, t, 0, (2, 0));
        }
        assert!(!run(&hub, 1, 35_000).keep_workers_alive, "quiet for the settle window: timers");
    }

    #[test]
    fn two_hundred_timers_born_invisible_let_the_hub_sleep_once_the_queue_is_quiet() {
        let mut hub = steady(10_000, (0, 0), &[]);
        record_one(&mut hub, 15_000, 1, (200, 0));
        assert!(run(&hub, 1, 15_000).keep_workers_alive);
        for t in (20_000..=60_000).step_by(5_000) {
            record_one(&mut hub, t, 1, (200, 0));
        }
        let r = run(&hub, 1, 60_000);
        assert_eq!((r.desired_workers, r.keep_workers_alive), (0, false), "{}", r.reason);
        assert!(r.reason.contains("200 invisible message(s) taken for sleeping timers"), "{}", r.reason);
    }

    #[test]
    fn a_prefetched_backlog_worked_off_while_new_messages_arrive_stays_work() {
        // 240 messages wait visible; a pod prefetches them (ControlQueue.GetMessagesAsync),
        // then finishes about one a second while one a second arrives: the count barely moves,
        // an arrival is sometimes caught visible before the pod's next poll. Seven minutes,
        // longer than the visibility timeout and many settle windows.
        let mut hub = steady(10_000, (0, 0), &[(240, 32)]);
        record_one(&mut hub, 15_000, 0, (240, 0));
        for (k, t) in (20_000..=440_000).step_by(5_000).enumerate() {
            let counts = match k % 4 {
                0 => (241, 1),
                1 => (240, 0),
                2 => (239, 0),
                _ => (240, 0),
            };
            record_one(&mut hub, t, 0, counts);
            let r = run(&hub, 1, t);
            assert!(r.keep_workers_alive, "at {t} ms: {}", r.reason);
            assert!(split(&settings(), &hub, 1, ms(t)).held >= 238, "at {t} ms: {}", r.reason);
        }
        // Sized: 240 messages held on one partition ask for that partition's worker.
        assert_eq!(run(&hub, 1, 440_000).desired_workers, 1);
    }

    #[test]
    fn a_backlog_whose_partitions_are_first_read_one_after_another_is_not_an_arrival() {
        // Four pods' sidecars report one after another: the first reading of a hub covers
        // partition 0 only. The other partitions' histories start at their own first reading,
        // so their 300 messages each are not 900 arrivals to look ahead for.
        let settings = DurableSettings { max_orchestrations_per_worker: 100, ..settings() };
        let mut hub = HubHistory::new(P);
        let mut first = vec![None; P];
        first[0] = Some(s(0, 300, 32));
        hub.record_read(&settings, Some(s(0, 0, 0)), &first);
        for t in (1_000..=10_000).step_by(1_000) {
            hub.record_read(&settings, Some(s(t, 0, 0)), &[Some(s(t, 300, 32)); P]);
            let r = recommend(&settings, &hub, 4, ms(t));
            assert_eq!(r.desired_workers, 4, "at {t} ms: {}", r.reason);
            assert!(r.reason.contains("lookahead 0"), "at {t} ms: {}", r.reason);
        }
        // Had the unread partitions been recorded as empty, the lookahead would see arrivals.
        let mut made_up = HubHistory::new(P);
        let mut zeros = [s(0, 0, 0); P];
        zeros[0] = s(0, 300, 32);
        made_up.record(&settings, s(0, 0, 0), &zeros);
        made_up.record(&settings, s(1_000, 0, 0), &[s(1_000, 300, 32); P]);
        assert!(recommend(&settings, &made_up, 4, ms(1_000)).desired_workers > 4);
    }

    #[test]
    fn a_full_peek_never_turns_a_deep_backlog_into_timers() {
        // 300 visible messages on each of four partitions, held for minutes, with 100
        // orchestrations a worker: one worker per partition.
        let settings = DurableSettings { max_orchestrations_per_worker: 100, ..settings() };
        for depth in [300, 1_000] {
            let mut hub = HubHistory::new(P);
            for t in (0..=180_000).step_by(5_000) {
                hub.record(&settings, s(t, 0, 0), &[s(t, depth, 32); P]);
            }
            let r = recommend(&settings, &hub, 4, ms(180_000));
            assert_eq!(r.desired_workers, 4, "{depth} a partition: {}", r.reason);
            assert!(r.reason.contains(&format!("ceil({}/100)", 4 * depth)), "{}", r.reason);
        }
    }

    #[test]
    fn a_backlog_over_old_timers_keeps_the_timers_and_counts_the_rest() {
        let settings = DurableSettings { max_orchestrations_per_worker: 100, ..settings() };
        let mut hub = HubHistory::new(P);
        for t in (0..=60_000).step_by(5_000) {
            hub.record(&settings, s(t, 0, 0), &[s(t, 50, 0); P]);
        }
        for t in (65_000..=120_000).step_by(5_000) {
            hub.record(&settings, s(t, 0, 0), &[s(t, 350, 32); P]);
        }
        let split = split(&settings, &hub, 4, ms(120_000));
        assert_eq!(split.timers, 200);
        let r = recommend(&settings, &hub, 4, ms(120_000));
        assert!(r.reason.contains("ceil(1200/100)"), "{}", r.reason);
    }

    #[test]
    fn held_work_never_exceeds_what_an_owner_can_buffer() {
        let mut hub = steady(5_000, (0, 0), &[]);
        record_one(&mut hub, 10_000, 0, (1_000, 0));
        let held = split(&settings(), &hub, 1, ms(10_000)).held;
        assert_eq!(held, u64::from(DEFAULT_BUFFER_THRESHOLD) + CONTROL_QUEUE_BATCH);
    }

    #[test]
    fn a_timer_that_fires_wakes_the_hub() {
        let mut hub = steady(60_000, (0, 0), &[(5, 0)]);
        record_one(&mut hub, 65_000, 0, (5, 1));
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
        let settings = DurableSettings { activity_lookahead: false, ..settings() };
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
        // 200 timers sleeping on each of two partitions for a minute, then all fire.
        let mut hub = arriving(60_000, (0, 0), &[(200, 0), (200, 0)]);
        hub.record(
            &settings(),
            s(65_000, 0, 0),
            &[s(65_000, 200, 32), s(65_000, 200, 32), s(65_000, 0, 0), s(65_000, 0, 0)],
        );
        let r = run(&hub, 1, 65_000);
        assert_eq!(r.desired_workers, 2, "two partition workers, no lookahead: {}", r.reason);
        // The same counts arriving as new messages are episodes to come: (400 - 10) / 10.
        let mut hub = steady(60_000, (0, 0), &[]);
        hub.record(
            &settings(),
            s(65_000, 0, 0),
            &[s(65_000, 200, 32), s(65_000, 200, 32), s(65_000, 0, 0), s(65_000, 0, 0)],
        );
        assert_eq!(run(&hub, 1, 65_000).desired_workers, 39);
    }

    #[test]
    fn an_episode_estimate_lets_one_worker_take_what_it_clears_before_a_pod_starts() {
        // 1 s episodes, 20 s start-up: one worker clears 5 x 20 = 100 messages in that time.
        let settings = DurableSettings { episode_estimate_ms: 1_000, ..settings() };
        let hub = steady(10_000, (0, 0), &[(25, 25), (25, 25), (25, 25), (25, 25)]);
        assert_eq!(recommend(&settings, &hub, 1, ms(10_000)).desired_workers, 1);
        let hub = arriving(10_000, (0, 0), &[(300, 32), (300, 32), (0, 0), (0, 0)]);
        let r = recommend(&settings, &hub, 1, ms(10_000));
        assert_eq!(r.desired_workers, 40, "2 partition workers, (600 - 200) / 10 to come: {}", r.reason);
    }

    #[test]
    fn no_scale_up_for_work_that_drains_before_a_new_pod_starts() {
        let mut hub = steady(5_000, (100, 32), &[]);
        // 100 -> 60 in 5 s: the remaining 60 are gone in about 7.5 s, well before 20 s.
        hub.record(&settings(), s(10_000, 60, 32), &[s(10_000, 0, 0); P]);
        let r = run(&hub, 2, 10_000);
        assert_eq!(r.desired_workers, 2, "{}", r.reason);
        assert!(r.reason.contains("held at 2"), "{}", r.reason);
        // Falling slowly (100 -> 95): more workers are worth starting.
        let mut hub = steady(5_000, (100, 32), &[]);
        hub.record(&settings(), s(10_000, 95, 32), &[s(10_000, 0, 0); P]);
        assert_eq!(run(&hub, 2, 10_000).desired_workers, 10);
    }

    #[test]
    fn activity_backlog_divides_by_activities_per_worker() {
        let hub = steady(10_000, (95, 32), &[]);
        assert_eq!(run(&hub, 1, 10_000).desired_workers, 10);
    }

    #[test]
    fn scale_in_keeps_the_window_peak() {
        let mut hub = steady(20_000, (80, 32), &[]);
        hub.record(&settings(), s(25_000, 0, 0), &[s(25_000, 0, 0); P]);
        let r = run(&hub, 8, 25_000);
        assert_eq!(r.desired_workers, 8, "{}", r.reason);
        assert!(r.reason.contains("damped"), "{}", r.reason);
        assert!(!r.keep_workers_alive, "damping holds pods, not the hub's activity");
        // Once the window has passed with nothing, the hub may sleep.
        for t in (30_000..=60_000).step_by(5_000) {
            hub.record(&settings(), s(t, 0, 0), &[s(t, 0, 0); P]);
        }
        let r = run(&hub, 8, 60_000);
        assert_eq!((r.desired_workers, r.keep_workers_alive), (0, false));
    }

    #[test]
    fn damping_never_asks_for_more_than_the_current_count() {
        let mut hub = steady(20_000, (200, 32), &[]);
        hub.record(&settings(), s(25_000, 10, 10), &[s(25_000, 0, 0); P]);
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
            h.record(Sample { reading: s(t, 1, 1), timers: 0, held: 0 }, 30_000);
        }
        let first = h.samples().next().map(Sample::at);
        assert_eq!(first, Some(ms(70_000)), "one sample at or before the horizon is kept");
    }

    #[test]
    fn at_zero_workers_invisible_control_messages_are_timers_from_the_first_sample() {
        let mut hub = HubHistory::new(P);
        record_one(&mut hub, 100_000, 1, (3, 0));
        let r = run(&hub, 0, 100_000);
        assert_eq!((r.desired_workers, r.keep_workers_alive), (0, false), "{}", r.reason);
        // With a worker running, messages that came in since may be its work.
        record_one(&mut hub, 105_000, 1, (5, 0));
        assert!(!run(&hub, 0, 105_000).keep_workers_alive);
        assert!(run(&hub, 1, 105_000).keep_workers_alive);
    }
}
