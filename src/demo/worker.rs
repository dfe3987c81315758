//! A worker pod's stand-in for the Functions host: what a Durable Functions app does to the
//! task hub's storage, and nothing more.
//!
//! It takes partitions in the Partitions table as DurableTask does (renews its own, claims
//! free or expired ones up to its fair share, steals from a worker holding more than its
//! share, hands back extras), processes the control queues it owns (an orchestration start
//! fans out activities to the work-item queue; an activity result counts the orchestration
//! down), and runs activities from the work-item queue, a bounded number at a time. On stop
//! it finishes the activities it holds and hands its partitions back.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::{
    emulator::{Claim, DequeuedMessage, TaskHubEmulator},
    shutdown::Shutdown,
    storage::{QueueRef, StorageError, TaskHubReader},
};

use super::processes::ChildProcess;

/// What a worker pod does and how fast.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSettings {
    /// How long one activity works.
    pub activity_duration: Duration,
    /// Activities one pod runs at once (the trigger's `maxActivitiesPerWorker`).
    pub max_activities: usize,
    /// From pod start to taking work (image pull, host start-up).
    pub startup_delay: Duration,
    /// How long a partition claim lasts without renewal.
    pub lease: Duration,
    /// How often partitions are renewed and rebalanced.
    pub rebalance_every: Duration,
    /// Pause after a round that found nothing to do.
    pub idle_pause: Duration,
    /// How long a dequeued message stays invisible to other workers.
    pub visibility_timeout: Duration,
}

/// A control-queue message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum ControlMessage {
    /// Start orchestration `id`, fanning out `activities` activities.
    Start {
        /// Orchestration id.
        id: u64,
        /// Activities to fan out.
        activities: u32,
    },
    /// One activity of orchestration `id` finished.
    Done {
        /// Orchestration id.
        id: u64,
    },
    /// A durable timer of orchestration `id` fired.
    Timer {
        /// Orchestration id.
        id: u64,
    },
}

/// A work-item (activity) message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ActivityMessage {
    /// The orchestration it belongs to.
    pub id: u64,
    /// The orchestration's partition, where the result goes.
    pub partition: u32,
}

/// The orchestrations' progress, shared by every pod (the demo's stand-in for the History
/// and Instances tables).
#[derive(Debug, Default)]
pub(crate) struct OrchestrationBook {
    remaining: Mutex<HashMap<u64, u32>>,
    started: AtomicU64,
    completed: AtomicU64,
}

impl OrchestrationBook {
    /// Orchestrations submitted and not yet completed.
    pub(crate) fn running(&self) -> u64 {
        self.started.load(Ordering::SeqCst).saturating_sub(self.completed.load(Ordering::SeqCst))
    }

    /// Counts an orchestration as submitted (its start message is on its control queue).
    pub(crate) fn submitted(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }

    fn start(&self, id: u64, activities: u32) -> bool {
        let mut remaining = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        if activities == 0 {
            self.completed.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        remaining.insert(id, activities).is_none()
    }

    fn activity_done(&self, id: u64) {
        let mut remaining = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left) = remaining.get_mut(&id) {
            *left -= 1;
            if *left == 0 {
                remaining.remove(&id);
                self.completed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// One running worker pod: the host stand-in and its sidecar process.
pub(crate) struct WorkerPod {
    name: String,
    stop: Shutdown,
    host: tokio::task::JoinHandle<()>,
    sidecar: ChildProcess,
}

impl WorkerPod {
    /// Starts the host stand-in for pod `name` beside its already started `sidecar`.
    pub(crate) fn start(
        name: String,
        emulator: TaskHubEmulator,
        reader: TaskHubReader,
        book: Arc<OrchestrationBook>,
        settings: WorkerSettings,
        sidecar: ChildProcess,
    ) -> Self {
        let stop = Shutdown::new();
        let host = Host { name: name.clone(), emulator, reader, book, settings, claims: BTreeMap::new() };
        let handle = tokio::spawn(host.run(stop.clone()));
        Self { name, stop, host: handle, sidecar }
    }

    /// Stops the pod as Kubernetes does: SIGTERM to both containers; the host finishes what it
    /// holds and hands its partitions back, the sidecar sends its leaving report.
    pub(crate) async fn stop(self) {
        self.stop.trigger();
        let sidecar = self.sidecar.terminate(Duration::from_secs(5));
        let (_, host) = tokio::join!(sidecar, self.host);
        if let Err(e) = host {
            tracing::warn!(pod = %self.name, "host stand-in ended abnormally: {e}");
        }
    }
}

struct Host {
    name: String,
    emulator: TaskHubEmulator,
    reader: TaskHubReader,
    book: Arc<OrchestrationBook>,
    settings: WorkerSettings,
    claims: BTreeMap<u32, Claim>,
}

impl Host {
    async fn run(mut self, stop: Shutdown) {
        tokio::select! {
            _ = tokio::time::sleep(self.settings.startup_delay) => {}
            _ = stop.wait() => return,
        }
        let mut activities = JoinSet::new();
        let mut last_rebalance: Option<tokio::time::Instant> = None;
        while !stop.is_triggered() {
            if last_rebalance.is_none_or(|t| t.elapsed() >= self.settings.rebalance_every) {
                if let Err(e) = self.rebalance().await {
                    tracing::debug!(pod = %self.name, "rebalance failed: {e}");
                }
                last_rebalance = Some(tokio::time::Instant::now());
            }
            while activities.try_join_next().is_some() {}
            let mut busy = self.process_control().await;
            busy |= self.take_activities(&mut activities).await;
            if !busy {
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.idle_pause) => {}
                    _ = stop.wait() => {}
                }
            }
        }
        while activities.join_next().await.is_some() {}
        for (_, claim) in std::mem::take(&mut self.claims) {
            if let Err(e) = self.emulator.release(claim).await {
                tracing::debug!(pod = %self.name, "release failed: {e}");
            }
        }
    }

    /// Renews what it holds, drops what others took, and moves toward its fair share:
    /// ceil(P / workers), counting itself among the workers.
    async fn rebalance(&mut self) -> Result<(), StorageError> {
        let now = crate::clock::UnixMs::now();
        let rows = self.reader.partitions(now).await?;
        let partitions = rows.len();
        let mut held_by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for row in &rows {
            if let Some(owner) = &row.owner {
                held_by.entry(owner.clone()).or_default().push(row.partition);
            }
        }
        let mine: Vec<u32> = held_by.get(&self.name).cloned().unwrap_or_default();
        self.claims.retain(|p, _| mine.contains(p));
        let workers = held_by.len() + usize::from(!held_by.contains_key(&self.name));
        let share = partitions.div_ceil(workers.max(1));

        while self.claims.len() > share {
            if let Some((_, claim)) = self.claims.pop_last() {
                self.emulator.release(claim).await?;
            }
        }
        for claim in self.claims.values() {
            self.emulator.renew(claim, self.settings.lease).await?;
        }
        let free = rows.iter().filter(|r| r.owner.is_none()).map(|r| r.partition);
        let stealable = held_by
            .iter()
            .filter(|(owner, held)| **owner != self.name && held.len() > share)
            .flat_map(|(_, held)| held.iter().rev().take(1).copied());
        let wanted: Vec<u32> = free.chain(stealable).take(share.saturating_sub(self.claims.len())).collect();
        for partition in wanted {
            let claim = self.emulator.claim(partition, &self.name, self.settings.lease).await?;
            self.claims.insert(partition, claim);
        }
        Ok(())
    }

    /// One round over the owned control queues. Returns true when it found messages.
    async fn process_control(&mut self) -> bool {
        let mut found = false;
        let partitions: Vec<u32> = self.claims.keys().copied().collect();
        for partition in partitions {
            let queue = QueueRef::Control(partition);
            let messages = match self.emulator.dequeue(queue, 16, self.settings.visibility_timeout).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(pod = %self.name, partition, "dequeue failed: {e}");
                    continue;
                }
            };
            found |= !messages.is_empty();
            for message in messages {
                self.handle_control(partition, &message).await;
            }
        }
        found
    }

    async fn handle_control(&self, partition: u32, message: &DequeuedMessage) {
        match serde_json::from_str::<ControlMessage>(&message.text) {
            Ok(ControlMessage::Start { id, activities }) => {
                if self.book.start(id, activities) {
                    let text = serde_json::to_string(&ActivityMessage { id, partition }).unwrap_or_default();
                    for _ in 0..activities {
                        if let Err(e) = self.emulator.enqueue(QueueRef::WorkItem, &text, Duration::ZERO).await
                        {
                            tracing::debug!(pod = %self.name, "enqueue activity failed: {e}");
                        }
                    }
                }
            }
            Ok(ControlMessage::Done { id }) => self.book.activity_done(id),
            Ok(ControlMessage::Timer { .. }) => {}
            Err(e) => tracing::debug!(pod = %self.name, "unreadable control message: {e}"),
        }
        if let Err(e) = self.emulator.delete(message).await {
            tracing::debug!(pod = %self.name, "delete failed: {e}");
        }
    }

    /// Takes as many activities as it has room for and runs each in its own task. Returns
    /// true when it took any.
    async fn take_activities(&self, running: &mut JoinSet<()>) -> bool {
        let room = self.settings.max_activities.saturating_sub(running.len());
        if room == 0 {
            return true;
        }
        let messages = match self
            .emulator
            .dequeue(QueueRef::WorkItem, room.min(32) as u32, self.settings.visibility_timeout)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(pod = %self.name, "dequeue work items failed: {e}");
                return false;
            }
        };
        let took = !messages.is_empty();
        for message in messages {
            let emulator = self.emulator.clone();
            let duration = self.settings.activity_duration;
            running.spawn(async move {
                tokio::time::sleep(duration).await;
                if let Ok(activity) = serde_json::from_str::<ActivityMessage>(&message.text) {
                    let done =
                        serde_json::to_string(&ControlMessage::Done { id: activity.id }).unwrap_or_default();
                    let _ =
                        emulator.enqueue(QueueRef::Control(activity.partition), &done, Duration::ZERO).await;
                }
                let _ = emulator.delete(&message).await;
            });
        }
        took
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_as_tagged_json() {
        let text = serde_json::to_string(&ControlMessage::Start { id: 7, activities: 3 }).unwrap();
        assert_eq!(text, r#"{"op":"start","id":7,"activities":3}"#);
        assert_eq!(
            serde_json::from_str::<ControlMessage>(&text).unwrap(),
            ControlMessage::Start { id: 7, activities: 3 }
        );
    }

    #[test]
    fn an_orchestration_completes_when_its_last_activity_does() {
        let book = OrchestrationBook::default();
        book.submitted();
        assert!(book.start(1, 2));
        assert!(!book.start(1, 2), "a redelivered start does not fan out twice");
        book.activity_done(1);
        assert_eq!(book.running(), 1);
        book.activity_done(1);
        assert_eq!((book.running(), book.completed.load(Ordering::SeqCst)), (0, 1));
        book.activity_done(1);
        assert_eq!(book.completed.load(Ordering::SeqCst), 1, "late duplicates change nothing");
    }
}
