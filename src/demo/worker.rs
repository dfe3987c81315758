//! A worker pod's stand-in for the Functions host: what a Durable Functions app does to the
//! task hub's storage, and nothing more.
//!
//! It takes partitions in the Partitions table as DurableTask does (renews its own, claims
//! free or expired ones up to its fair share, steals from a worker holding more than its
//! share, hands back extras), and touches the queues as DTFx's dispatchers do
//! ([`crate::emulator::dispatch`]): it prefetches the control queues it owns up to the buffer
//! threshold, runs episodes (an orchestration start fans out activities to the work-item
//! queue; an activity result counts the orchestration down) and activities a bounded number
//! at a time, renewing what runs. On stop it finishes what runs, leaves what it prefetched
//! invisible until its visibility timeout (as DTFx's graceful stop does) and hands its
//! partitions back.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    emulator::{
        Claim, DequeuedMessage, TaskHubEmulator,
        dispatch::{AppCode, DispatchSettings, Dispatcher, Stop, Work},
    },
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
    /// The longest pause between two polls of an empty queue (`maxQueuePollingInterval`).
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

/// The demo app's code, as the queues see it.
struct DemoApp {
    book: Arc<OrchestrationBook>,
    activity_duration: Duration,
}

impl AppCode for DemoApp {
    fn episode(&self, partition: u32, message: &DequeuedMessage) -> Work {
        let mut work = Work { runs_for: Duration::from_millis(20), ..Work::default() };
        match serde_json::from_str::<ControlMessage>(&message.text) {
            Ok(ControlMessage::Start { id, activities }) => {
                if self.book.start(id, activities) {
                    let text = serde_json::to_string(&ActivityMessage { id, partition }).unwrap_or_default();
                    work.sends =
                        (0..activities).map(|_| (QueueRef::WorkItem, text.clone(), Duration::ZERO)).collect();
                }
            }
            Ok(ControlMessage::Done { id }) => self.book.activity_done(id),
            Ok(ControlMessage::Timer { .. }) => {}
            Err(e) => tracing::debug!("unreadable control message: {e}"),
        }
        work
    }

    fn activity(&self, message: &DequeuedMessage) -> Work {
        let sends = serde_json::from_str::<ActivityMessage>(&message.text)
            .ok()
            .map(|activity| {
                let done =
                    serde_json::to_string(&ControlMessage::Done { id: activity.id }).unwrap_or_default();
                (QueueRef::Control(activity.partition), done, Duration::ZERO)
            })
            .into_iter()
            .collect();
        Work { runs_for: self.activity_duration, sends, fails: false }
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
        let dispatch = DispatchSettings {
            control_visibility_timeout: self.settings.visibility_timeout,
            work_item_visibility_timeout: self.settings.visibility_timeout,
            max_polling_interval: self.settings.idle_pause,
            orchestration_slots: self.settings.max_activities,
            activity_slots: self.settings.max_activities,
            ..DispatchSettings::default()
        };
        let app =
            Arc::new(DemoApp { book: self.book.clone(), activity_duration: self.settings.activity_duration });
        let dispatcher = Dispatcher::start(self.emulator.clone(), dispatch, app);
        while !stop.is_triggered() {
            if let Err(e) = self.rebalance().await {
                tracing::debug!(pod = %self.name, "rebalance failed: {e}");
            }
            dispatcher.own(&self.claims.keys().copied().collect::<Vec<u32>>());
            tokio::select! {
                _ = tokio::time::sleep(self.settings.rebalance_every) => {}
                _ = stop.wait() => {}
            }
        }
        dispatcher.stop(Stop::Graceful).await;
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
