//! The app under test: a Durable Functions app on the Azure Storage backend, its queues, its
//! orchestrations and its pods, advanced one fixed tick at a time, doing to the queues what a
//! live Durable Task Framework (DTFx, DurableTask.AzureStorage) worker does.
//!
//! Upstream is the oracle; each behaviour cites the file it was read from (Azure/durabletask
//! unless said otherwise; "the extension" is Azure/azure-functions-durable-extension, "the
//! host" Azure/azure-functions-host). Every default and what is left out: docs/simulator.md.
//!
//! - **Storage.** One work-item queue and P control queues. A message is visible, invisible
//!   until a time (durable timers, `TaskHubQueue.GetVisibilityDelay`; abandoned, prefetched
//!   and left-behind messages), or held by a live worker that renews it. Get Queue Metadata's
//!   approximate count is all three; a Peek shows visible messages only, at most 32.
//! - **Control-queue prefetch** (`Messaging/ControlQueue.cs` `GetMessagesAsync`,
//!   `OrchestrationSessionManager.cs` `DequeueLoop`, `AddMessageToPendingOrchestration`): per
//!   owned partition, a loop dequeues batches of `ControlQueueBatchSize` (32) with the control
//!   visibility timeout (5 min) whatever the free orchestration slots, until the pod's
//!   dequeued-and-not-deleted control messages (`PendingOrchestratorMessages`, one count per
//!   worker) reach `ControlQueueBufferThreshold`, then retries every second. Buffered messages
//!   are grouped per instance, in arrival order, and are not renewed: one still buffered when
//!   its visibility ends turns visible again, and when its owner dequeues it again it replaces
//!   the buffered copy ("duplicate", `ControlQueue.cs`).
//! - **Sessions** (`OrchestrationSessionManager.GetNextSessionAsync`, `Core/
//!   TaskOrchestrationDispatcher.cs` `RenewUntil`): an orchestration slot takes the next
//!   instance's batch; its messages are renewed while the episode runs (since 2023), messages
//!   arriving for it meanwhile wait for its next episode.
//! - **Activities** (`Messaging/WorkItemQueue.cs` `GetMessageAsync`, `Core/
//!   TaskActivityDispatcher.cs` `RenewUntil`/`AdjustRenewAt`): one message per free activity
//!   slot, visibility 5 min, renewed every 30 s while it runs. A poison activity is abandoned
//!   each time (`TaskHubQueue.AbandonMessageAsync`: invisible min(2^dequeues, 600) s) and
//!   retried for ever.
//! - **Polling back-off** (`BackoffPollingHelper.cs`, `TaskHubQueue.cs`): each queue a pod
//!   reads has its randomized exponential back-off (50 ms up to `MaxQueuePollingInterval`),
//!   reset by a non-empty fetch and by the pod's own enqueue on that queue
//!   (`TaskHubQueue.AddMessageAsync`: "Wake up the queue polling thread").
//! - **Leases** balanced over the pods that take work; a moved lease is unusable for the
//!   takeover delay; its old owner abandons what it had buffered of that partition
//!   (`AzureStorageOrchestrationService.LockNextTaskOrchestrationWorkItemAsync`: a session of
//!   a released queue is abandoned).
//! - **Scale-in** ([`App::set_replicas`]): the ReplicaSet's choice of pod (kubernetes
//!   `pkg/controller/controller_utils.go` `ActivePodsWithRanks.Less`), SIGTERM stopping the
//!   DTFx worker at once (prefetched messages stay invisible until their visibility timeout,
//!   azure-functions-durable-extension#2651), and, with drain, running work finishing within
//!   the grace period; what a stopped pod still ran reappears one visibility timeout after
//!   its last renewal. What that costs is counted ([`ScaleInCost`]).

mod backoff;
mod pod;
mod storage;

use std::collections::{BTreeMap, VecDeque};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::source::{PodReport, QueueSource, sim_ms};
use crate::clock::UnixMs;
use crate::reading::QueueReading;
use backoff::Poller;
use pod::{Batch, Held, Pod, Running, Session};
use storage::{Message, MessageKind, Queue, RENEWAL_MS, abandon_delay_ms, reappears_at};

/// A worker at its buffer threshold tries again after a second (`ControlQueue.GetMessagesAsync`).
const BUFFER_FULL_RETRY_MS: u64 = 1_000;

/// How long an activity runs: uniform in [min, max] ms, drawn from a generator seeded by the
/// run's seed and the activity's orchestration and step, so every scaler sees the same work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Duration {
    /// Shortest run (ms).
    pub min_ms: u64,
    /// Longest run (ms).
    pub max_ms: u64,
}

impl Duration {
    /// Always `ms`.
    pub const fn fixed(ms: u64) -> Self {
        Self { min_ms: ms, max_ms: ms }
    }

    fn sample(&self, rng: &mut StdRng) -> u64 {
        if self.max_ms > self.min_ms { rng.random_range(self.min_ms..=self.max_ms) } else { self.min_ms }
    }
}

/// One step of an orchestration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Step {
    /// Fan out `count` activities and wait for all of them.
    Activities {
        /// Activities scheduled at once.
        count: u32,
        /// How long each runs.
        duration: Duration,
    },
    /// Sleep on a durable timer.
    Timer {
        /// How long (ms).
        delay_ms: u64,
    },
    /// One poison activity: it runs for `duration`, then fails in a way DTFx retries (the
    /// dispatcher abandons it), every time; the orchestration never goes past this step.
    Poison {
        /// How long each attempt runs.
        duration: Duration,
    },
}

/// An orchestration's steps, run in order.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Script {
    /// The steps.
    pub steps: Vec<Step>,
}

/// Orchestrations started at `at_ms`, all running `script`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// When the start messages are enqueued (ms from the run's start).
    pub at_ms: u64,
    /// How many orchestrations start then.
    pub count: u32,
    /// Index into [`Workload::scripts`].
    pub script: usize,
}

/// What the app is asked to do: arrivals sorted by time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    /// The distinct scripts.
    pub scripts: Vec<Script>,
    /// Start times, ascending.
    pub arrivals: Vec<Arrival>,
}

impl Workload {
    /// Orchestrations in the workload.
    pub fn orchestrations(&self) -> u64 {
        self.arrivals.iter().map(|a| u64::from(a.count)).sum()
    }
}

/// The app's and the platform's settings (defaults and their sources: docs/simulator.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppConfig {
    /// Partition count P (1..16).
    pub partitions: u32,
    /// From pod creation to taking work.
    pub startup_ms: u64,
    /// `maxConcurrentActivityFunctions` per pod.
    pub max_activities: u32,
    /// `maxConcurrentOrchestratorFunctions` per pod.
    pub max_orchestrations: u32,
    /// A lease that changes hands is unusable this long.
    pub lease_takeover_ms: u64,
    /// DTFx's `MaxQueuePollingInterval` (back-off ceiling).
    pub max_polling_interval_ms: u64,
    /// DTFx's back-off floor and step (`TaskHubQueue`: 50 ms).
    pub min_polling_interval_ms: u64,
    /// How long one orchestration episode (replay + scheduling) takes.
    pub episode_ms: u64,
    /// Kubernetes' terminationGracePeriodSeconds: how long a draining pod may run on.
    pub grace_ms: u64,
    /// `ControlQueueVisibilityTimeout`: a dequeued control message is hidden this long.
    pub control_visibility_timeout_ms: u64,
    /// `WorkItemQueueVisibilityTimeout`: a dequeued work item is hidden this long (renewed).
    pub work_item_visibility_timeout_ms: u64,
    /// `ControlQueueBatchSize`: control messages per dequeue.
    pub control_batch_size: usize,
    /// `ControlQueueBufferThreshold`: a worker stops dequeuing control messages while it holds
    /// this many.
    pub control_buffer_threshold: usize,
    /// On SIGTERM, the pod waits for its running functions before it exits (within the grace
    /// period); without it, the host stops at once and running work dies with it.
    pub drain: bool,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            partitions: 4,
            startup_ms: 20_000,
            max_activities: crate::contract::WORK_ITEMS_PER_CPU,
            max_orchestrations: crate::contract::WORK_ITEMS_PER_CPU,
            lease_takeover_ms: 10_000,
            max_polling_interval_ms: 30_000,
            min_polling_interval_ms: 50,
            episode_ms: 100,
            grace_ms: 30_000,
            control_visibility_timeout_ms: 300_000,
            work_item_visibility_timeout_ms: 300_000,
            control_batch_size: 32,
            control_buffer_threshold: 256,
            drain: false,
        }
    }
}
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    owner: Option<u64>,
    usable_from_ms: u64,
}

#[derive(Debug, Clone)]
struct Instance {
    arrived_ms: u64,
    partition: usize,
    script: usize,
    next_step: usize,
    pending_activities: u32,
    sleeping: bool,
    /// An episode of it runs on some pod.
    busy: bool,
    done: bool,
    /// A scale-in interrupted or stranded one of its messages.
    hit_by_scale_in: bool,
}

/// A finished orchestration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// When its start message was enqueued.
    pub arrived_ms: u64,
    /// When its last episode ended.
    pub done_ms: u64,
}

/// Message bookkeeping, for the conservation invariant: every message enqueued is deleted or
/// present (visible, invisible or held); `returned` counts how often a worker let one go
/// without deleting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageCounts {
    /// Messages ever enqueued.
    pub enqueued: u64,
    /// Messages deleted after processing.
    pub deleted: u64,
    /// Messages in some queue now (visible, invisible or held by a worker).
    pub present: u64,
    /// Times a message went back to its queue undeleted: abandoned (poison, lease moved),
    /// interrupted by a stopped pod, or left prefetched by one.
    pub returned: u64,
}

/// What scale-ins cost a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScaleInCost {
    /// Work items (activities and orchestration episodes) whose pod was stopped while it ran
    /// them.
    pub interrupted_work_items: u64,
    /// The time those had run: work done again.
    pub lost_work_ms: u64,
    /// Control messages a stopped pod had prefetched and not started, hidden until their
    /// visibility timeout (azure-functions-durable-extension#2651).
    pub stranded_messages: u64,
    /// Orchestrations that had a message interrupted or stranded.
    pub delayed_orchestrations: u64,
    /// What scale-ins added to those orchestrations: per stop, for each orchestration it hit,
    /// the longest of (time its message stayed hidden after the stop + work lost on it).
    pub delay_ms: u64,
}

/// The whole app at one moment.
#[derive(Debug)]
pub struct App {
    cfg: AppConfig,
    seed: u64,
    workload: Workload,
    next_arrival: usize,
    work_item: Queue,
    control: Vec<Queue>,
    leases: Vec<Lease>,
    pods: Vec<Pod>,
    next_pod_id: u64,
    next_message_id: u64,
    instances: Vec<Instance>,
    completions: Vec<Completion>,
    counts: MessageCounts,
    cost: ScaleInCost,
    /// Pod UIDs and DTFx's back-off jitter.
    rng: StdRng,
}

/// The generator of one orchestration's step: its activities' durations (and, for the step
/// after the last, its partition), the same for every scaler whatever order things happen in.
fn item_rng(seed: u64, instance: u32, step: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ (u64::from(instance) << 24 | step))
}

/// The stream [`item_rng`] draws an instance's partition from.
const PARTITION_STREAM: u64 = 0xFF_FFFF;

impl App {
    /// An app with no pods, empty queues and `workload` still to arrive.
    pub fn new(cfg: AppConfig, workload: Workload, seed: u64) -> Self {
        let p = cfg.partitions.max(1) as usize;
        Self {
            cfg,
            seed,
            workload,
            next_arrival: 0,
            work_item: Queue::default(),
            control: (0..p).map(|_| Queue::default()).collect(),
            leases: vec![Lease::default(); p],
            pods: Vec::new(),
            next_pod_id: 0,
            next_message_id: 0,
            instances: Vec::new(),
            completions: Vec::new(),
            counts: MessageCounts::default(),
            cost: ScaleInCost::default(),
            rng: StdRng::seed_from_u64(seed ^ 0xD7F0_5EED),
        }
    }

    /// The settings the app runs with.
    pub fn config(&self) -> &AppConfig {
        &self.cfg
    }

    fn message(&mut self, instance: u32, kind: MessageKind, now_ms: u64) -> Message {
        self.next_message_id += 1;
        Message { id: self.next_message_id, instance, kind, inserted_ms: now_ms, dequeue_count: 0 }
    }

    fn enqueue(&mut self, queue: Option<usize>, message: Message, visible_at_ms: u64, now_ms: u64) {
        self.counts.enqueued += 1;
        let q = match queue {
            Some(p) => &mut self.control[p],
            None => &mut self.work_item,
        };
        q.hide(message, visible_at_ms, now_ms);
    }

    /// Advances the app to `now_ms` (one tick after the previous call).
    pub fn tick(&mut self, now_ms: u64) {
        self.arrive(now_ms);
        self.work_item.release_due(now_ms);
        for q in &mut self.control {
            q.release_due(now_ms);
        }
        self.finish_work(now_ms);
        self.end_drains(now_ms);
        self.balance_leases(now_ms);
        self.poll(now_ms);
    }

    fn arrive(&mut self, now_ms: u64) {
        while let Some(a) = self.workload.arrivals.get(self.next_arrival).cloned() {
            if a.at_ms > now_ms {
                break;
            }
            self.next_arrival += 1;
            for _ in 0..a.count {
                let id = self.instances.len() as u32;
                // DTFx hashes the instance id (a GUID by default) to a partition: uniform.
                let partition = item_rng(self.seed, id, PARTITION_STREAM).random_range(0..self.control.len());
                self.instances.push(Instance {
                    arrived_ms: now_ms,
                    partition,
                    script: a.script,
                    next_step: 0,
                    pending_activities: 0,
                    sleeping: false,
                    busy: false,
                    done: false,
                    hit_by_scale_in: false,
                });
                let m = self.message(id, MessageKind::Start, now_ms);
                self.enqueue(Some(partition), m, now_ms, now_ms);
            }
        }
    }

    fn finish_work(&mut self, now_ms: u64) {
        let mut done_activities = Vec::new();
        let mut done_sessions = Vec::new();
        for (pi, pod) in self.pods.iter_mut().enumerate() {
            let mut i = 0;
            while i < pod.activities.len() {
                if pod.activities[i].done_ms <= now_ms {
                    done_activities.push((pi, pod.activities.swap_remove(i)));
                } else {
                    i += 1;
                }
            }
            let mut i = 0;
            while i < pod.sessions.len() {
                if pod.sessions[i].done_ms <= now_ms {
                    done_sessions.push((pi, pod.sessions.swap_remove(i)));
                } else {
                    i += 1;
                }
            }
        }
        done_activities.sort_by_key(|(pi, r)| (r.done_ms, *pi, r.message.id));
        for (pi, running) in done_activities {
            self.work_item.held -= 1;
            let m = running.message;
            if let MessageKind::Activity { poison: true, .. } = m.kind {
                // The dispatcher abandons it: back with a growing delay, retried for ever.
                self.counts.returned += 1;
                self.work_item.hide(m, now_ms + abandon_delay_ms(m.dequeue_count), now_ms);
                continue;
            }
            self.counts.deleted += 1;
            // `CompleteTaskActivityWorkItemAsync`: the response goes to the instance's control
            // queue first, through this pod's queue object for it.
            let partition = self.instances[m.instance as usize].partition;
            let reply = self.message(m.instance, MessageKind::ActivityDone, now_ms);
            self.enqueue(Some(partition), reply, now_ms, now_ms);
            self.wake_control_poller(pi, partition, now_ms);
        }
        done_sessions.sort_by_key(|(pi, s)| (s.done_ms, *pi, s.instance));
        for (pi, session) in done_sessions {
            let n = session.messages.len();
            self.control[session.partition].held -= n as u64;
            self.counts.deleted += n as u64;
            self.pods[pi].buffered -= n;
            self.instances[session.instance as usize].busy = false;
            let kinds: Vec<MessageKind> = session.messages.iter().map(|h| h.message.kind).collect();
            self.run_episode(session.instance, &kinds, now_ms, pi);
            if session.arrived.is_empty() {
                continue;
            }
            // `TryReleaseSession`: what arrived during the episode goes back to the buffer.
            if self.pods[pi].terminating_since.is_some() {
                self.strand(pi, session.arrived, now_ms);
            } else {
                let batch = Batch {
                    instance: session.instance,
                    partition: session.partition,
                    messages: session.arrived,
                };
                self.pods[pi].pending.push_back(batch);
            }
        }
    }

    /// Resets pod `pi`'s poller of control queue `partition` when it owns that queue: its own
    /// enqueue wakes the loop (`TaskHubQueue.AddMessageAsync`); a queue it does not own is a
    /// separate object nobody polls.
    fn wake_control_poller(&mut self, pi: usize, partition: usize, now_ms: u64) {
        let id = self.pods[pi].id;
        if self.leases[partition].owner == Some(id) {
            self.pods[pi].control_polls[partition].signal(now_ms, &mut self.rng);
        }
    }

    /// Applies an episode's messages to its orchestration and schedules what comes next,
    /// enqueued by pod `pi`.
    fn run_episode(&mut self, id: u32, messages: &[MessageKind], now_ms: u64, pi: usize) {
        let inst = &mut self.instances[id as usize];
        for kind in messages {
            match kind {
                MessageKind::ActivityDone => {
                    inst.pending_activities = inst.pending_activities.saturating_sub(1)
                }
                MessageKind::TimerFired => inst.sleeping = false,
                MessageKind::Start | MessageKind::Activity { .. } => {}
            }
        }
        loop {
            let inst = &self.instances[id as usize];
            if inst.pending_activities > 0 || inst.sleeping {
                return;
            }
            let script = &self.workload.scripts[inst.script];
            let Some(step) = script.steps.get(inst.next_step).cloned() else {
                let arrived_ms = inst.arrived_ms;
                self.instances[id as usize].done = true;
                self.completions.push(Completion { arrived_ms, done_ms: now_ms });
                return;
            };
            let (partition, step_index) = (inst.partition, inst.next_step);
            self.instances[id as usize].next_step += 1;
            let mut rng = item_rng(self.seed, id, step_index as u64);
            let (count, duration, poison) = match step {
                Step::Activities { count, duration } => (count, duration, false),
                Step::Poison { duration } => (1, duration, true),
                Step::Timer { delay_ms } => {
                    self.instances[id as usize].sleeping = true;
                    let m = self.message(id, MessageKind::TimerFired, now_ms);
                    self.enqueue(Some(partition), m, now_ms + delay_ms.max(1), now_ms);
                    self.wake_control_poller(pi, partition, now_ms);
                    continue;
                }
            };
            self.instances[id as usize].pending_activities = count;
            for _ in 0..count {
                let kind = MessageKind::Activity { run_ms: duration.sample(&mut rng), poison };
                let m = self.message(id, kind, now_ms);
                self.enqueue(None, m, now_ms, now_ms);
            }
            if count > 0 {
                self.pods[pi].work_item_poll.signal(now_ms, &mut self.rng);
            }
        }
    }

    /// Pod `pi` lets go of buffered control messages without starting them: they stay hidden
    /// until their visibility timeout (#2651); its copies are dropped.
    fn strand(&mut self, pi: usize, held: Vec<Held>, now_ms: u64) {
        self.pods[pi].buffered -= held.len();
        let mut hit: BTreeMap<u32, u64> = BTreeMap::new();
        for h in held {
            self.counts.returned += 1;
            self.cost.stranded_messages += 1;
            let delay = h.visible_at_ms.saturating_sub(now_ms);
            let entry = hit.entry(h.message.instance).or_default();
            *entry = (*entry).max(delay);
        }
        self.charge(hit);
    }

    fn charge(&mut self, hit: BTreeMap<u32, u64>) {
        for (instance, delay) in hit {
            let inst = &mut self.instances[instance as usize];
            if !std::mem::replace(&mut inst.hit_by_scale_in, true) {
                self.cost.delayed_orchestrations += 1;
            }
            self.cost.delay_ms += delay;
        }
    }

    /// Pod `pi` stops with work running: its activities and episodes die; their messages
    /// reappear one visibility timeout after their last renewal.
    fn kill(&mut self, pi: usize, now_ms: u64) {
        let activities = std::mem::take(&mut self.pods[pi].activities);
        let sessions = std::mem::take(&mut self.pods[pi].sessions);
        let mut hit: BTreeMap<u32, u64> = BTreeMap::new();
        for running in activities {
            let lost = now_ms.saturating_sub(running.started_ms);
            let back = reappears_at(running.started_ms, now_ms, self.cfg.work_item_visibility_timeout_ms);
            self.work_item.held -= 1;
            self.work_item.hide(running.message, back, now_ms);
            self.counts.returned += 1;
            self.cost.interrupted_work_items += 1;
            self.cost.lost_work_ms += lost;
            let entry = hit.entry(running.message.instance).or_default();
            *entry = (*entry).max(back.saturating_sub(now_ms) + lost);
        }
        let mut arrived = Vec::new();
        for session in sessions {
            let lost = now_ms.saturating_sub(session.started_ms);
            let renewed = reappears_at(session.started_ms, now_ms, self.cfg.control_visibility_timeout_ms);
            let mut longest = 0;
            self.control[session.partition].held -= session.messages.len() as u64;
            self.pods[pi].buffered -= session.messages.len();
            for h in &session.messages {
                // Renewed only once the episode has run a renewal interval.
                let back = if now_ms >= session.started_ms + RENEWAL_MS { renewed } else { h.visible_at_ms };
                longest = longest.max(back.saturating_sub(now_ms));
                self.control[session.partition].hide(h.message, back, now_ms);
                self.counts.returned += 1;
            }
            self.instances[session.instance as usize].busy = false;
            self.cost.interrupted_work_items += 1;
            self.cost.lost_work_ms += lost;
            let entry = hit.entry(session.instance).or_default();
            *entry = (*entry).max(longest + lost);
            arrived.extend(session.arrived);
        }
        self.charge(hit);
        self.strand(pi, arrived, now_ms);
    }

    /// Removes terminating pods whose drain is over: nothing left running, or the grace
    /// period ran out (what still runs dies).
    fn end_drains(&mut self, now_ms: u64) {
        let grace = self.cfg.grace_ms;
        let mut i = 0;
        while i < self.pods.len() {
            let pod = &self.pods[i];
            let Some(since) = pod.terminating_since else {
                i += 1;
                continue;
            };
            if !pod.idle() && now_ms < since + grace {
                i += 1;
                continue;
            }
            self.kill(i, now_ms);
            self.pods.remove(i);
        }
    }

    /// Pod `pi` is sent SIGTERM. The DTFx worker stops at once, drain or not (the host's
    /// drain mode stops the listeners, `DrainModeManager.EnableDrainModeAsync`; the extension's
    /// listener stop calls `TaskHubWorker.StopAsync`): no new fetches, no new episodes, its
    /// leases go, and what it had prefetched stays hidden until its visibility timeout
    /// (#2651). Without drain the pod exits now and running work dies with it; with drain it
    /// exits when its running work is done or the grace period is over.
    fn terminate(&mut self, pi: usize, now_ms: u64) {
        self.pods[pi].terminating_since = Some(now_ms);
        let mut held: Vec<Held> = self.pods[pi].pending.drain(..).flat_map(|b| b.messages).collect();
        for s in &mut self.pods[pi].sessions {
            held.append(&mut s.arrived);
        }
        self.strand(pi, held, now_ms);
        if !self.cfg.drain {
            self.kill(pi, now_ms);
            self.pods.remove(pi);
        }
    }

    /// Pod `pi` lost partition `p` while it lives: what it buffered of it is abandoned
    /// (back in min(2^dequeues, 600) s).
    fn abandon_partition(&mut self, pi: usize, p: usize, now_ms: u64) {
        let pod = &mut self.pods[pi];
        let mut held = Vec::new();
        pod.pending.retain_mut(|b| {
            if b.partition == p {
                held.append(&mut b.messages);
                false
            } else {
                true
            }
        });
        for s in pod.sessions.iter_mut().filter(|s| s.partition == p) {
            held.append(&mut s.arrived);
        }
        pod.buffered -= held.len();
        for h in held {
            if let Some(m) = self.control[p].take(h.visible_at_ms, h.message.id) {
                self.control[p].hide(m, now_ms + abandon_delay_ms(m.dequeue_count), now_ms);
                self.counts.returned += 1;
            }
        }
    }

    /// Balances partition leases over the pods that take work: free leases go at once to the
    /// pod with the fewest; while one pod holds two more than another, one moves and is
    /// unusable for the takeover delay. A new owner starts a fresh dequeue loop.
    fn balance_leases(&mut self, now_ms: u64) {
        let live: Vec<u64> = self.pods.iter().filter(|p| p.takes_work(now_ms)).map(|p| p.id).collect();
        for lease in &mut self.leases {
            if lease.owner.is_some_and(|o| !live.contains(&o)) {
                lease.owner = None;
            }
        }
        if live.is_empty() {
            return;
        }
        let owned = |leases: &[Lease], id: u64| leases.iter().filter(|l| l.owner == Some(id)).count();
        for p in 0..self.leases.len() {
            if self.leases[p].owner.is_none() {
                let fewest = live.iter().copied().min_by_key(|&id| (owned(&self.leases, id), id));
                self.leases[p] = Lease { owner: fewest, usable_from_ms: now_ms };
                self.start_dequeue_loop(fewest, p, now_ms);
            }
        }
        loop {
            let most = live.iter().copied().max_by_key(|&id| (owned(&self.leases, id), u64::MAX - id));
            let fewest = live.iter().copied().min_by_key(|&id| (owned(&self.leases, id), id));
            let (Some(most), Some(fewest)) = (most, fewest) else { return };
            if owned(&self.leases, most) < owned(&self.leases, fewest) + 2 {
                return;
            }
            let Some(p) = self.leases.iter().rposition(|l| l.owner == Some(most)) else { return };
            let usable_from_ms = now_ms + self.cfg.lease_takeover_ms;
            self.leases[p] = Lease { owner: Some(fewest), usable_from_ms };
            if let Some(old) = self.pods.iter().position(|pod| pod.id == most) {
                self.abandon_partition(old, p, now_ms);
            }
            self.start_dequeue_loop(Some(fewest), p, usable_from_ms);
        }
    }

    fn start_dequeue_loop(&mut self, owner: Option<u64>, p: usize, at_ms: u64) {
        if let Some(pod) = owner.and_then(|id| self.pods.iter_mut().find(|pod| pod.id == id)) {
            pod.control_polls[p] =
                Poller::new(self.cfg.min_polling_interval_ms, self.cfg.max_polling_interval_ms, at_ms);
        }
    }

    fn poll(&mut self, now_ms: u64) {
        for pi in 0..self.pods.len() {
            if !self.pods[pi].takes_work(now_ms) {
                continue;
            }
            self.poll_work_items(pi, now_ms);
            let id = self.pods[pi].id;
            for p in 0..self.leases.len() {
                let lease = self.leases[p];
                if lease.owner == Some(id) && now_ms >= lease.usable_from_ms {
                    self.poll_control_queue(pi, p, now_ms);
                }
            }
            self.start_sessions(pi, now_ms);
        }
    }

    /// The activity dispatcher: while a slot is free, one Get Message each
    /// (`WorkItemQueue.GetMessageAsync`), invisible while it runs (renewed).
    fn poll_work_items(&mut self, pi: usize, now_ms: u64) {
        let cfg = self.cfg;
        let pod = &mut self.pods[pi];
        let free = (cfg.max_activities as usize).saturating_sub(pod.activities.len());
        if free == 0 || !pod.work_item_poll.due(now_ms) {
            return;
        }
        pod.work_item_poll.begin(&mut self.rng);
        let mut took = 0;
        while took < free {
            let Some(mut m) = self.work_item.visible.pop_front() else { break };
            // Only activities are ever put on the work-item queue.
            let run_ms = if let MessageKind::Activity { run_ms, .. } = m.kind { run_ms } else { 0 };
            m.dequeue_count += 1;
            self.work_item.held += 1;
            pod.activities.push(Running { message: m, started_ms: now_ms, done_ms: now_ms + run_ms.max(1) });
            took += 1;
        }
        if took > 0 {
            pod.work_item_poll.found(now_ms);
        }
        if took < free {
            pod.work_item_poll.empty(now_ms, &mut self.rng);
        }
    }

    /// One turn of partition `p`'s dequeue loop on pod `pi` (`ControlQueue.GetMessagesAsync`,
    /// `OrchestrationSessionManager.AddMessageToPendingOrchestration`).
    fn poll_control_queue(&mut self, pi: usize, p: usize, now_ms: u64) {
        let cfg = self.cfg;
        let pod = &mut self.pods[pi];
        if !pod.control_polls[p].due(now_ms) {
            return;
        }
        pod.control_polls[p].begin(&mut self.rng);
        if pod.buffered >= cfg.control_buffer_threshold {
            pod.control_polls[p].pause_until(now_ms + BUFFER_FULL_RETRY_MS);
            return;
        }
        let queue = &mut self.control[p];
        let take = queue.visible.len().min(cfg.control_batch_size);
        if take == 0 {
            pod.control_polls[p].empty(now_ms, &mut self.rng);
            return;
        }
        let visible_at_ms = now_ms + cfg.control_visibility_timeout_ms;
        for mut m in queue.visible.drain(..take) {
            m.dequeue_count += 1;
            queue.invisible.insert((visible_at_ms, m.id), m);
            let held = Held { message: m, visible_at_ms };
            if m.dequeue_count > 1 && pod.replace_duplicate(held) {
                continue;
            }
            pod.buffered += 1;
            if let Some(s) = pod.sessions.iter_mut().find(|s| s.instance == m.instance) {
                s.arrived.push(held);
            } else if let Some(b) = pod.pending.iter_mut().rev().find(|b| b.instance == m.instance) {
                b.messages.push(held);
            } else {
                pod.pending.push_back(Batch { instance: m.instance, partition: p, messages: vec![held] });
            }
        }
        pod.control_polls[p].found(now_ms);
    }

    /// The orchestration dispatcher: free slots take the oldest buffered batches whose
    /// instance runs nowhere else; their messages are held (renewed) while the episode runs.
    fn start_sessions(&mut self, pi: usize, now_ms: u64) {
        let slots = self.cfg.max_orchestrations as usize;
        let mut k = 0;
        while self.pods[pi].sessions.len() < slots && k < self.pods[pi].pending.len() {
            let instance = self.pods[pi].pending[k].instance;
            if self.instances[instance as usize].busy {
                k += 1;
                continue;
            }
            let Some(batch) = self.pods[pi].pending.remove(k) else { break };
            let queue = &mut self.control[batch.partition];
            let mut messages = Vec::with_capacity(batch.messages.len());
            for h in batch.messages {
                if let Some(message) = queue.take(h.visible_at_ms, h.message.id) {
                    queue.held += 1;
                    messages.push(Held { message, ..h });
                } else {
                    // Cannot happen: a buffered message stays in storage until its pod lets go.
                    debug_assert!(false, "buffered message {} not in storage", h.message.id);
                    self.pods[pi].buffered -= 1;
                }
            }
            self.instances[instance as usize].busy = true;
            self.pods[pi].sessions.push(Session {
                instance,
                partition: batch.partition,
                messages,
                started_ms: now_ms,
                done_ms: now_ms + self.cfg.episode_ms.max(1),
                arrived: Vec::new(),
            });
        }
    }

    /// Makes the number of pods that are not terminating equal `replicas`: new pods start
    /// now; surplus pods are chosen as the ReplicaSet chooses (`pod::Pod::deletion_rank`) and sent
    /// SIGTERM.
    pub fn set_replicas(&mut self, replicas: u32, now_ms: u64) {
        let active = self.pods.iter().filter(|p| p.terminating_since.is_none()).count() as u32;
        let poller = Poller::new(self.cfg.min_polling_interval_ms, self.cfg.max_polling_interval_ms, 0);
        for _ in active..replicas {
            self.next_pod_id += 1;
            let uid = self.rng.random();
            self.pods.push(Pod {
                id: self.next_pod_id,
                uid,
                created_ms: now_ms,
                ready_ms: now_ms + self.cfg.startup_ms,
                deletion_cost: 0,
                terminating_since: None,
                activities: Vec::new(),
                sessions: Vec::new(),
                pending: VecDeque::new(),
                buffered: 0,
                work_item_poll: poller,
                control_polls: vec![poller; self.control.len()],
            });
        }
        if replicas >= active {
            return;
        }
        let mut ranked: Vec<((bool, i32, i64, u64), u64)> = self
            .pods
            .iter()
            .filter(|p| p.terminating_since.is_none())
            .map(|p| (p.deletion_rank(now_ms), p.id))
            .collect();
        ranked.sort_unstable();
        for &(_, id) in ranked.iter().take((active - replicas) as usize) {
            if let Some(pi) = self.pods.iter().position(|p| p.id == id) {
                self.terminate(pi, now_ms);
            }
        }
    }

    /// Sets pods' `controller.kubernetes.io/pod-deletion-cost` (pod id, cost); pods not named
    /// keep theirs.
    pub fn set_deletion_costs(&mut self, costs: &[(u64, i32)]) {
        for &(id, cost) in costs {
            // Pods are kept in creation order, so by id.
            if let Ok(at) = self.pods.binary_search_by_key(&id, |p| p.id) {
                self.pods[at].deletion_cost = cost;
            }
        }
    }

    /// What a Peek and Get Queue Metadata would show now: the work-item queue, then each
    /// control queue.
    pub fn observe(&self, now_ms: u64) -> (QueueReading, Vec<QueueReading>) {
        (self.work_item.sample(now_ms), self.control.iter().map(|q| q.sample(now_ms)).collect())
    }

    /// Pods that exist (starting, ready or terminating): what is paid for.
    pub fn pods(&self) -> u32 {
        self.pods.len() as u32
    }

    /// Pods ready to take work.
    pub fn ready_pods(&self, now_ms: u64) -> u32 {
        self.pods.iter().filter(|p| p.takes_work(now_ms)).count() as u32
    }

    /// What each pod's sidecar would report now.
    pub fn pod_reports(&self) -> Vec<PodReport> {
        self.pods
            .iter()
            .map(|pod| PodReport {
                pod: pod.id,
                owned_partitions: self.leases.iter().filter(|l| l.owner == Some(pod.id)).count() as u32,
                // What a sidecar can know: its partitions' held control messages (the
                // aggregator's split of their invisible counts). Which pod runs which activity
                // no sidecar can tell: work items are one shared queue.
                held_messages: pod.buffered as u64,
                terminating: pod.terminating_since.is_some(),
            })
            .collect()
    }

    /// Visible messages over all queues: work waiting for a worker.
    pub fn backlog(&self) -> u64 {
        self.work_item.visible.len() as u64 + self.control.iter().map(|q| q.visible.len() as u64).sum::<u64>()
    }

    /// Finished orchestrations, in completion order.
    pub fn completions(&self) -> &[Completion] {
        &self.completions
    }

    /// Orchestrations started so far.
    pub(crate) fn started(&self) -> u64 {
        self.instances.len() as u64
    }

    /// Arrival times of orchestrations not yet finished.
    pub(crate) fn unfinished_arrivals(&self) -> impl Iterator<Item = u64> + '_ {
        self.instances.iter().filter(|i| !i.done).map(|i| i.arrived_ms)
    }

    /// Message bookkeeping now.
    pub fn message_counts(&self) -> MessageCounts {
        let present = self.work_item.approximate() + self.control.iter().map(Queue::approximate).sum::<u64>();
        MessageCounts { present, ..self.counts }
    }

    /// What scale-ins cost so far.
    pub fn scale_in_cost(&self) -> ScaleInCost {
        self.cost
    }

    /// Checks the model's bookkeeping (for tests; it walks every message): every message
    /// enqueued is deleted or present; what storage counts as held is what live pods run;
    /// each pod's buffer count is what it buffers; every buffered message is in storage under
    /// its pop receipt (or visible again); no message is held twice.
    pub fn check_invariants(&self) -> Result<(), String> {
        let c = self.message_counts();
        if c.enqueued != c.deleted + c.present {
            return Err(format!("enqueued {} != deleted {} + present {}", c.enqueued, c.deleted, c.present));
        }
        let running: u64 = self.pods.iter().map(|p| p.activities.len() as u64).sum();
        if running != self.work_item.held {
            return Err(format!(
                "{running} activities run, the work-item queue holds {}",
                self.work_item.held
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (p, queue) in self.control.iter().enumerate() {
            let in_sessions: u64 = self
                .pods
                .iter()
                .flat_map(|pod| &pod.sessions)
                .filter(|s| s.partition == p)
                .map(|s| s.messages.len() as u64)
                .sum();
            if in_sessions != queue.held {
                return Err(format!(
                    "control {p}: episodes hold {in_sessions}, the queue holds {}",
                    queue.held
                ));
            }
        }
        for pod in &self.pods {
            let mut count = 0;
            let sessions = pod.sessions.iter().map(|s| (s.partition, &s.messages, &s.arrived));
            for (p, current, arrived) in sessions {
                count += current.len() + arrived.len();
                for h in current.iter().chain(arrived) {
                    if !seen.insert(h.message.id) {
                        return Err(format!("message {} is held twice", h.message.id));
                    }
                }
                for h in arrived {
                    if !self.control[p].contains(h.visible_at_ms, h.message.id) {
                        return Err(format!(
                            "pod {} buffers message {} that storage lost",
                            pod.id, h.message.id
                        ));
                    }
                }
            }
            for b in &pod.pending {
                count += b.messages.len();
                for h in &b.messages {
                    if !seen.insert(h.message.id) {
                        return Err(format!("message {} is held twice", h.message.id));
                    }
                    if !self.control[b.partition].contains(h.visible_at_ms, h.message.id) {
                        return Err(format!(
                            "pod {} buffers message {} that storage lost",
                            pod.id, h.message.id
                        ));
                    }
                }
            }
            if count != pod.buffered {
                return Err(format!("pod {} buffers {count} messages, counts {}", pod.id, pod.buffered));
            }
        }
        Ok(())
    }
}

impl QueueSource for App {
    fn observe(&self, now: UnixMs) -> (QueueReading, Vec<QueueReading>) {
        App::observe(self, sim_ms(now))
    }

    fn ready_pods(&self, now: UnixMs) -> u32 {
        App::ready_pods(self, sim_ms(now))
    }

    fn pod_reports(&self, _now: UnixMs) -> Vec<PodReport> {
        App::pod_reports(self)
    }
}
