//! The emulated DurableTask worker (`durable_scaler::emulator::dispatch`) against Azurite, on
//! what upstream does when it loses a message's lock: Azure/durabletask
//! `Core/TaskActivityDispatcher.cs` `RenewUntil` stops renewing an activity's work item at the
//! first failure, and `DurableTask.AzureStorage/Messaging/TaskHubQueue.cs`
//! `DeleteMessageAsync` tries a delete once more when the message is gone, then gives up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use durable_scaler::emulator::dispatch::{AppCode, DispatchSettings, Dispatcher, Stop, Work};
use durable_scaler::emulator::{DequeuedMessage, TaskHubEmulator};
use durable_scaler::storage::{Layout, QueueRef};

use crate::common::{account, hub};

/// Activities run 12 s; no episodes.
struct LongActivities {
    started: AtomicUsize,
}

impl AppCode for LongActivities {
    fn episode(&self, _partition: u32, _message: &DequeuedMessage) -> Work {
        Work::default()
    }

    fn activity(&self, _message: &DequeuedMessage) -> Work {
        self.started.fetch_add(1, Ordering::SeqCst);
        Work { runs_for: Duration::from_secs(12), ..Work::default() }
    }
}

#[tokio::test]
async fn an_activity_whose_message_is_gone_stops_renewing_and_counts_a_lost_lock() {
    let account = account();
    let emulator = TaskHubEmulator::new(&account, hub("LostLock"), Layout::Table);
    emulator.create(1).await.unwrap();
    emulator.enqueue(QueueRef::WorkItem, "run", Duration::ZERO).await.unwrap();
    let app = Arc::new(LongActivities { started: AtomicUsize::new(0) });
    // A 6 s visibility timeout: renewed 5 s in (the 5 s check), then every 5 s.
    let settings = DispatchSettings {
        activity_slots: 1,
        work_item_visibility_timeout: Duration::from_secs(6),
        ..DispatchSettings::default()
    };
    let worker = Dispatcher::start(emulator.clone(), settings, app.clone());
    let taken = Instant::now() + Duration::from_secs(30);
    while worker.held().activities == 0 {
        assert!(Instant::now() < taken, "the activity was never taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The message goes while the activity runs (another worker finished it, or an operator
    // cleared the queue): the renewal 5 s in finds it gone.
    emulator.clear(QueueRef::WorkItem).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // From here until the activity ends (12 s in) a renewing worker would renew once more
    // (10 s in); one that stopped at the failure sends nothing (its only slot is busy, so the
    // dispatcher does not poll either).
    let before = account.request_count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sent = account.request_count() - before;
    assert_eq!(sent, 0, "the worker went on calling storage after its renewal failed");
    let done = Instant::now() + Duration::from_secs(30);
    while worker.held().activities > 0 {
        assert!(Instant::now() < done, "the activity never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = worker.held();
    worker.stop(Stop::Graceful).await;
    assert_eq!(held.locks_lost, 1, "{held:?}");
    assert_eq!(app.started.load(Ordering::SeqCst), 1);
}
