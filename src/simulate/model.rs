//! The app under test: a Durable Functions app on the Azure Storage backend, its queues, its
//! orchestrations and its pods, advanced one fixed tick at a time.
//!
//! What is modelled (every default and its source in docs/simulator.md):
//! - one work-item queue and P control queues, each message with its insertion time, the time
//!   it becomes visible (durable timers and retried messages are enqueued invisible) and
//!   whether a worker holds it (dequeued messages are invisible while processed; the
//!   approximate count includes them);
//! - orchestrations hashed to partitions, each running a [`Script`] of fan-outs and timers:
//!   an episode (replay) takes the orchestration's control messages, schedules the next
//!   step's activities or timer, and ends;
//! - pods that are ready after a start-up delay, run at most `maxConcurrentActivityFunctions`
//!   activities and `maxConcurrentOrchestratorFunctions` episodes at once, poll queues with
//!   DTFx's backoff up to its maximum polling interval, hold partition leases balanced across
//!   ready pods (a moved lease is unusable for the takeover delay), and drain gracefully when
//!   scaled in: no new work, in-flight work finishes, and what outlives the grace period
//!   returns to its queue when its visibility timeout ends, so no work is ever lost.

use std::collections::{BTreeMap, VecDeque};

use crate::reading::{PEEK_LIMIT, QueueReading};

/// How long an activity runs: uniform in [min, max] ms, drawn from a hash of the seed and the
/// activity's identity so every scaler sees the same durations.
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

    fn sample(&self, hash: u64) -> u64 {
        let span = self.max_ms.saturating_sub(self.min_ms);
        if span == 0 { self.min_ms } else { self.min_ms + hash % (span + 1) }
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

/// The app's and the platform's settings.
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
    /// DTFx's maximum queue polling interval (backoff ceiling).
    pub max_polling_interval_ms: u64,
    /// DTFx's first backoff step after an empty poll.
    pub min_polling_interval_ms: u64,
    /// How long one orchestration episode (replay + scheduling) takes.
    pub episode_ms: u64,
    /// Kubernetes' terminationGracePeriodSeconds for a draining pod.
    pub grace_ms: u64,
    /// Visibility timeout of a dequeued message (it reappears this long after dequeue if
    /// its worker disappears).
    pub visibility_timeout_ms: u64,
    /// Messages one dequeue takes at most.
    pub batch_size: usize,
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
            min_polling_interval_ms: 100,
            episode_ms: 100,
            grace_ms: 30_000,
            visibility_timeout_ms: 300_000,
            batch_size: 32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    Start,
    ActivityDone,
    TimerFired,
    Activity { run_ms: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Message {
    instance: u32,
    kind: MessageKind,
    inserted_ms: u64,
}

/// One Azure Storage queue.
#[derive(Debug, Default)]
struct Queue {
    visible: VecDeque<Message>,
    /// Invisible until the key's time: (visible_at, sequence).
    delayed: BTreeMap<(u64, u64), Message>,
    /// Dequeued and held by a worker.
    in_flight: u64,
}

impl Queue {
    fn approximate(&self) -> u64 {
        self.visible.len() as u64 + self.delayed.len() as u64 + self.in_flight
    }

    fn sample(&self, now_ms: u64) -> QueueReading {
        QueueReading {
            sampled_at: super::scalers::sim_time(now_ms),
            approximate_count: self.approximate(),
            visible_count: self.visible.len().min(PEEK_LIMIT as usize) as u32,
            first_visible_age_ms: self.visible.front().map_or(0, |m| now_ms.saturating_sub(m.inserted_ms)),
            redelivered_count: 0,
        }
    }

    fn release_due(&mut self, now_ms: u64) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            self.visible.push_back(entry.remove());
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Poller {
    next_ms: u64,
    backoff_ms: u64,
}

impl Poller {
    fn due(&self, now_ms: u64) -> bool {
        now_ms >= self.next_ms
    }

    /// DTFx's backoff: poll again at once after finding work, else double the wait up to
    /// the maximum polling interval.
    fn after(&mut self, now_ms: u64, found: bool, cfg: &AppConfig) {
        self.backoff_ms = if found {
            0
        } else {
            (self.backoff_ms * 2).clamp(cfg.min_polling_interval_ms, cfg.max_polling_interval_ms)
        };
        self.next_ms = now_ms + self.backoff_ms;
    }
}

#[derive(Debug)]
struct Episode {
    done_ms: u64,
    partition: usize,
    instance: u32,
    messages: Vec<Message>,
    dequeued_ms: u64,
}

#[derive(Debug)]
struct Pod {
    id: u64,
    ready_ms: u64,
    draining_since: Option<u64>,
    /// (done at, message, dequeued at)
    activities: Vec<(u64, Message, u64)>,
    episodes: Vec<Episode>,
    work_item_poll: Poller,
    control_polls: Vec<Poller>,
}

impl Pod {
    fn is_ready(&self, now_ms: u64) -> bool {
        now_ms >= self.ready_ms
    }

    fn takes_work(&self, now_ms: u64) -> bool {
        self.is_ready(now_ms) && self.draining_since.is_none()
    }

    fn idle(&self) -> bool {
        self.activities.is_empty() && self.episodes.is_empty()
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
    busy: bool,
    done: bool,
}

/// A finished orchestration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// When its start message was enqueued.
    pub arrived_ms: u64,
    /// When its last episode ended.
    pub done_ms: u64,
}

/// Message bookkeeping, for the conservation invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageCounts {
    /// Messages ever enqueued.
    pub enqueued: u64,
    /// Messages deleted after processing.
    pub deleted: u64,
    /// Messages in some queue now (visible, delayed or held by a worker).
    pub present: u64,
    /// Messages returned to their queue because their pod went away holding them.
    pub abandoned: u64,
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
    instances: Vec<Instance>,
    sequence: u64,
    completions: Vec<Completion>,
    counts: MessageCounts,
}

/// splitmix64: a stateless, well-mixed hash, so an activity's duration and an instance's
/// partition do not depend on the order a scaler made things happen in.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

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
            instances: Vec::new(),
            sequence: 0,
            completions: Vec::new(),
            counts: MessageCounts::default(),
        }
    }

    fn enqueue(&mut self, queue: Option<usize>, message: Message, visible_at_ms: u64, now_ms: u64) {
        self.counts.enqueued += 1;
        let q = match queue {
            Some(p) => &mut self.control[p],
            None => &mut self.work_item,
        };
        if visible_at_ms <= now_ms {
            q.visible.push_back(message);
        } else {
            self.sequence += 1;
            q.delayed.insert((visible_at_ms, self.sequence), message);
        }
    }

    /// Advances the app to `now_ms` (one tick after the previous call).
    pub fn tick(&mut self, now_ms: u64) {
        self.arrive(now_ms);
        self.work_item.release_due(now_ms);
        for q in &mut self.control {
            q.release_due(now_ms);
        }
        self.finish_work(now_ms);
        self.retire_pods(now_ms);
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
                let partition = (mix(u64::from(id) ^ 0xA5A5) % self.control.len() as u64) as usize;
                self.instances.push(Instance {
                    arrived_ms: now_ms,
                    partition,
                    script: a.script,
                    next_step: 0,
                    pending_activities: 0,
                    sleeping: false,
                    busy: false,
                    done: false,
                });
                let m = Message { instance: id, kind: MessageKind::Start, inserted_ms: now_ms };
                self.enqueue(Some(partition), m, now_ms, now_ms);
            }
        }
    }

    fn finish_work(&mut self, now_ms: u64) {
        let mut done_activities = Vec::new();
        let mut done_episodes = Vec::new();
        for pod in &mut self.pods {
            pod.activities.retain(|&(done, m, _)| {
                if done <= now_ms {
                    done_activities.push(m);
                    false
                } else {
                    true
                }
            });
            let mut i = 0;
            while i < pod.episodes.len() {
                if pod.episodes[i].done_ms <= now_ms {
                    done_episodes.push(pod.episodes.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        }
        for m in done_activities {
            self.work_item.in_flight -= 1;
            self.counts.deleted += 1;
            let partition = self.instances[m.instance as usize].partition;
            let reply =
                Message { instance: m.instance, kind: MessageKind::ActivityDone, inserted_ms: now_ms };
            self.enqueue(Some(partition), reply, now_ms, now_ms);
        }
        done_episodes.sort_by_key(|e| (e.done_ms, e.instance));
        for e in done_episodes {
            self.control[e.partition].in_flight -= e.messages.len() as u64;
            self.counts.deleted += e.messages.len() as u64;
            self.run_episode(e.instance, &e.messages, now_ms);
        }
    }

    /// Applies an episode's messages to its orchestration and schedules what comes next.
    fn run_episode(&mut self, id: u32, messages: &[Message], now_ms: u64) {
        let inst = &mut self.instances[id as usize];
        inst.busy = false;
        for m in messages {
            match m.kind {
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
            match step {
                Step::Activities { count, duration } => {
                    self.instances[id as usize].pending_activities = count;
                    for k in 0..count {
                        let h =
                            mix(self.seed
                                ^ mix(u64::from(id) << 32 | (step_index as u64) << 20 | u64::from(k)));
                        let kind = MessageKind::Activity { run_ms: duration.sample(h) };
                        self.enqueue(
                            None,
                            Message { instance: id, kind, inserted_ms: now_ms },
                            now_ms,
                            now_ms,
                        );
                    }
                }
                Step::Timer { delay_ms } => {
                    self.instances[id as usize].sleeping = true;
                    let m = Message { instance: id, kind: MessageKind::TimerFired, inserted_ms: now_ms };
                    self.enqueue(Some(partition), m, now_ms + delay_ms.max(1), now_ms);
                }
            }
        }
    }

    /// Removes draining pods that are done, or whose grace period ran out; what they still
    /// hold goes back to its queue when its visibility timeout ends.
    fn retire_pods(&mut self, now_ms: u64) {
        let grace = self.cfg.grace_ms;
        let timeout = self.cfg.visibility_timeout_ms;
        let mut i = 0;
        while i < self.pods.len() {
            let pod = &self.pods[i];
            let Some(since) = pod.draining_since else {
                i += 1;
                continue;
            };
            if !pod.idle() && now_ms < since + grace {
                i += 1;
                continue;
            }
            let pod = self.pods.remove(i);
            for (_, m, dequeued) in pod.activities {
                self.work_item.in_flight -= 1;
                self.counts.abandoned += 1;
                self.sequence += 1;
                self.work_item.delayed.insert((dequeued + timeout, self.sequence), m);
            }
            for e in pod.episodes {
                self.instances[e.instance as usize].busy = false;
                for m in e.messages {
                    self.control[e.partition].in_flight -= 1;
                    self.counts.abandoned += 1;
                    self.sequence += 1;
                    self.control[e.partition].delayed.insert((e.dequeued_ms + timeout, self.sequence), m);
                }
            }
        }
    }

    /// Balances partition leases over the pods that take work: free leases go at once to the
    /// pod with the fewest; while one pod holds two more than another, one moves and is
    /// unusable for the takeover delay.
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
            }
        }
        loop {
            let most = live.iter().copied().max_by_key(|&id| (owned(&self.leases, id), u64::MAX - id));
            let fewest = live.iter().copied().min_by_key(|&id| (owned(&self.leases, id), id));
            let (Some(most), Some(fewest)) = (most, fewest) else { return };
            if owned(&self.leases, most) < owned(&self.leases, fewest) + 2 {
                return;
            }
            if let Some(lease) = self.leases.iter_mut().rev().find(|l| l.owner == Some(most)) {
                *lease = Lease { owner: Some(fewest), usable_from_ms: now_ms + self.cfg.lease_takeover_ms };
            }
        }
    }

    fn poll(&mut self, now_ms: u64) {
        let cfg = self.cfg;
        for pi in 0..self.pods.len() {
            if !self.pods[pi].takes_work(now_ms) {
                continue;
            }
            // Activities.
            let pod = &mut self.pods[pi];
            let free = (cfg.max_activities as usize).saturating_sub(pod.activities.len()).min(cfg.batch_size);
            if free > 0 && pod.work_item_poll.due(now_ms) {
                let mut took = 0;
                while took < free {
                    let Some(m) = self.work_item.visible.pop_front() else { break };
                    let MessageKind::Activity { run_ms } = m.kind else { continue };
                    self.work_item.in_flight += 1;
                    pod.activities.push((now_ms + run_ms.max(1), m, now_ms));
                    took += 1;
                }
                pod.work_item_poll.after(now_ms, took > 0, &cfg);
            }
            // Orchestrations, on the partitions this pod holds.
            let id = self.pods[pi].id;
            for p in 0..self.leases.len() {
                let lease = self.leases[p];
                if lease.owner != Some(id) || now_ms < lease.usable_from_ms {
                    continue;
                }
                let pod = &mut self.pods[pi];
                let free = (cfg.max_orchestrations as usize).saturating_sub(pod.episodes.len());
                if free == 0 || !pod.control_polls[p].due(now_ms) {
                    continue;
                }
                let queue = &mut self.control[p];
                let scan = queue.visible.len().min(cfg.batch_size);
                let mut chosen: Vec<u32> = Vec::new();
                let mut taken = vec![false; scan];
                for (k, m) in queue.visible.iter().take(scan).enumerate() {
                    let inst = &self.instances[m.instance as usize];
                    if inst.busy {
                        continue;
                    }
                    if chosen.contains(&m.instance) || chosen.len() < free {
                        if !chosen.contains(&m.instance) {
                            chosen.push(m.instance);
                        }
                        taken[k] = true;
                    }
                }
                let mut episodes: Vec<Episode> = chosen
                    .iter()
                    .map(|&instance| Episode {
                        done_ms: now_ms + cfg.episode_ms.max(1),
                        partition: p,
                        instance,
                        messages: Vec::new(),
                        dequeued_ms: now_ms,
                    })
                    .collect();
                let mut k = 0;
                queue.visible.retain(|m| {
                    let take = k < scan && taken[k];
                    k += 1;
                    if take && let Some(e) = episodes.iter_mut().find(|e| e.instance == m.instance) {
                        e.messages.push(*m);
                    }
                    !take
                });
                for e in &episodes {
                    queue.in_flight += e.messages.len() as u64;
                    self.instances[e.instance as usize].busy = true;
                }
                pod.control_polls[p].after(now_ms, !episodes.is_empty(), &cfg);
                pod.episodes.extend(episodes);
            }
        }
    }

    /// Makes the number of pods that are not draining equal `replicas`: new pods start now;
    /// surplus pods (not yet ready first, then the newest, as a ReplicaSet picks) drain.
    pub fn set_replicas(&mut self, replicas: u32, now_ms: u64) {
        let active = self.pods.iter().filter(|p| p.draining_since.is_none()).count() as u32;
        for _ in active..replicas {
            self.next_pod_id += 1;
            self.pods.push(Pod {
                id: self.next_pod_id,
                ready_ms: now_ms + self.cfg.startup_ms,
                draining_since: None,
                activities: Vec::new(),
                episodes: Vec::new(),
                work_item_poll: Poller::default(),
                control_polls: vec![Poller::default(); self.control.len()],
            });
        }
        if replicas < active {
            let mut victims: Vec<(bool, u64)> = self
                .pods
                .iter()
                .filter(|p| p.draining_since.is_none())
                .map(|p| (p.is_ready(now_ms), u64::MAX - p.id))
                .collect();
            victims.sort();
            for &(_, inv) in victims.iter().take((active - replicas) as usize) {
                if let Some(pod) = self.pods.iter_mut().find(|p| p.id == u64::MAX - inv) {
                    pod.draining_since = Some(now_ms);
                }
            }
        }
    }

    /// What a Peek and Get Queue Metadata would show now: the work-item queue, then each
    /// control queue.
    pub fn observe(&self, now_ms: u64) -> (QueueReading, Vec<QueueReading>) {
        (self.work_item.sample(now_ms), self.control.iter().map(|q| q.sample(now_ms)).collect())
    }

    /// Pods that exist (starting, ready or draining): what is paid for.
    pub(crate) fn pods(&self) -> u32 {
        self.pods.len() as u32
    }

    /// Pods ready to take work.
    pub fn ready_pods(&self, now_ms: u64) -> u32 {
        self.pods.iter().filter(|p| p.takes_work(now_ms)).count() as u32
    }

    /// Visible messages over all queues: work waiting for a worker.
    pub(crate) fn backlog(&self) -> u64 {
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
}
