//! What a live DurableTask worker does to the queues, for tests and the demo: the dispatchers
//! of Azure/durabletask played against real storage through [`TaskHubEmulator`].
//!
//! Read from upstream (src/DurableTask.AzureStorage and src/DurableTask.Core):
//! - **Control queues, prefetch** (`Messaging/ControlQueue.cs` `GetMessagesAsync`): one loop
//!   per owned partition; while the worker buffers fewer than `ControlQueueBufferThreshold`
//!   control messages (one count over all its partitions, `stats.PendingOrchestratorMessages`,
//!   released when a message is deleted or abandoned) it receives batches of
//!   `ControlQueueBatchSize` (32) with `ControlQueueVisibilityTimeout`, else it waits 1 s. The
//!   buffered messages are not renewed; they wait in `OrchestrationSessionManager` for an
//!   orchestration slot.
//! - **Polling back-off** (`BackoffPollingHelper.cs`, `TaskHubQueue.cs`): after an empty
//!   receive the loop waits min + rand(0.8..1.2) x 2^(k-1) x min (min 50 ms), up to
//!   `MaxQueuePollingInterval` (30 s); a receive that found messages resets it, and so does
//!   the worker's own `AddMessageAsync` onto that queue ("Wake up the queue polling thread").
//! - **Sessions** (`Core/TaskOrchestrationDispatcher.cs` `RenewUntil`): a message being run
//!   in an episode is renewed (UpdateMessage, `ControlQueueVisibilityTimeout` from now) every
//!   LockedUntil - 30 s, clamped to 5..30 s, then deleted when the episode ends.
//! - **Activities** (`Messaging/WorkItemQueue.cs` `GetMessageAsync`,
//!   `Core/TaskActivityDispatcher.cs` `RenewUntil`/`AdjustRenewAt`): one message at a time
//!   while an activity slot is free, with `WorkItemQueueVisibilityTimeout`; renewed, checked
//!   every 5 s, when LockedUntil - 30 s (at most 30 s ahead) has come; deleted when done; a
//!   failed one abandoned with min(2^DequeueCount, 600) s back-off
//!   (`TaskHubQueue.AbandonMessageAsync`), and retried for ever.
//! - **Lost locks** (`TaskHubQueue.RenewMessageAsync`, `DeleteMessageAsync`): a renewal that
//!   fails (a timed-out UpdateMessage that storage did apply leaves the worker with a stale
//!   pop receipt, and every later call on the message fails with PopReceiptMismatch) ends the
//!   activity's renewals (`TaskActivityDispatcher.RenewUntil` breaks out of its loop), while
//!   a session keeps trying every interval (`TaskOrchestrationDispatcher.RenewUntil` only
//!   logs); a delete that finds the message gone or its receipt stale is tried once more,
//!   then given up. Such a message reappears when its visibility timeout lapses and runs
//!   again: real work still in the queue ([`Held::locks_lost`] counts them).
//! - **Stop** (`TaskHubWorker.StopAsync`, azure-functions-durable-extension#2651): a graceful
//!   stop lets running episodes and activities finish; buffered control messages are left
//!   invisible until their visibility timeout. [`Stop::Kill`] is a pod killed at once: what
//!   it holds stays invisible until its timeout too.
//!
//! Left out: partition leases (the caller says which partitions the worker owns,
//! [`Dispatcher::own`]), grouping one instance's messages into one session (each message is
//! its own episode), extended sessions, and the duplicate detection of a buffered message
//! that reappeared after its visibility timeout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::{DequeuedMessage, TaskHubEmulator};
use crate::shutdown::Shutdown;
use crate::storage::{QueueRef, StorageError};

/// The app's settings that shape what a worker does to the queues (upstream defaults in
/// [`DispatchSettings::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSettings {
    /// `ControlQueueVisibilityTimeout` (5 min).
    pub control_visibility_timeout: Duration,
    /// `WorkItemQueueVisibilityTimeout` (5 min).
    pub work_item_visibility_timeout: Duration,
    /// `ControlQueueBufferThreshold` (256 in the Functions extension off Consumption).
    pub buffer_threshold: usize,
    /// `ControlQueueBatchSize` (32).
    pub batch_size: u32,
    /// `MaxQueuePollingInterval` (30 s).
    pub max_polling_interval: Duration,
    /// `maxConcurrentOrchestratorFunctions`.
    pub orchestration_slots: usize,
    /// `maxConcurrentActivityFunctions`.
    pub activity_slots: usize,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            control_visibility_timeout: Duration::from_secs(300),
            work_item_visibility_timeout: Duration::from_secs(300),
            buffer_threshold: 256,
            batch_size: 32,
            max_polling_interval: Duration::from_secs(30),
            orchestration_slots: 10,
            activity_slots: 10,
        }
    }
}

/// `TaskHubQueue`'s first back-off step after an empty receive.
const MIN_POLLING_DELAY: Duration = Duration::from_millis(50);
/// `ControlQueue.GetMessagesAsync`'s pause while the buffer is full.
const BUFFER_FULL_PAUSE: Duration = Duration::from_secs(1);
/// Both dispatchers renew this long before the lock ends, and at least this often.
const RENEW_AHEAD: Duration = Duration::from_secs(30);
/// `TaskActivityDispatcher.RenewUntil` checks this often; the orchestration dispatcher never
/// renews sooner (`MinRenewalInterval`).
const RENEW_CHECK: Duration = Duration::from_secs(5);

/// What an episode or an activity does, as the app's code would: how long it runs and what it
/// sends when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Work {
    /// How long it runs (the dispatcher renews the message meanwhile).
    pub runs_for: Duration,
    /// Messages it sends when it ends: queue, text, visibility delay (a durable timer).
    pub sends: Vec<(QueueRef, String, Duration)>,
    /// It fails: the message is abandoned with upstream's back-off, not deleted.
    pub fails: bool,
}

/// The app's code, as far as the queues see it.
pub trait AppCode: Send + Sync + 'static {
    /// One orchestration episode over a control message of `partition`.
    fn episode(&self, partition: u32, message: &DequeuedMessage) -> Work;
    /// One activity over a work item.
    fn activity(&self, message: &DequeuedMessage) -> Work;
}

/// How a worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// DTFx's graceful stop: running episodes and activities finish; buffered control
    /// messages stay invisible until their visibility timeout.
    Graceful,
    /// Killed: everything it holds stays invisible until its visibility timeout.
    Kill,
}

/// What a worker holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// Control messages prefetched and waiting for a slot.
    pub buffered: usize,
    /// Control messages in a running episode.
    pub in_sessions: usize,
    /// Work items of running activities.
    pub activities: usize,
    /// Messages whose renewal or deletion failed so far (module docs, "Lost locks"): each is
    /// still in its queue and comes back when its visibility timeout lapses.
    pub locks_lost: usize,
}

/// One queue's polling back-off (`BackoffPollingHelper`), wakeable by the worker's own sends.
#[derive(Debug)]
struct Backoff {
    wake: Notify,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { wake: Notify::new(), max: max.max(MIN_POLLING_DELAY) }
    }

    /// The wait after `empty` empty receives in a row (randomized exponential).
    fn delay(&self, empty: u32, rng: &mut StdRng) -> Duration {
        if empty == 0 {
            return Duration::ZERO;
        }
        let factor =
            rng.random_range(0.8..1.2) * 2f64.powi(i32::try_from(empty - 1).unwrap_or(i32::MAX).min(30));
        (MIN_POLLING_DELAY + MIN_POLLING_DELAY.mul_f64(factor)).min(self.max)
    }
}

struct Shared {
    emulator: TaskHubEmulator,
    settings: DispatchSettings,
    app: Arc<dyn AppCode>,
    /// Prefetched control messages waiting for a slot, in arrival order.
    buffer: Mutex<VecDeque<(u32, DequeuedMessage)>>,
    buffered: Notify,
    /// `PendingOrchestratorMessages`: buffered and in sessions.
    pending: AtomicUsize,
    in_sessions: AtomicUsize,
    activities: AtomicUsize,
    locks_lost: AtomicUsize,
    backoffs: Mutex<HashMap<QueueRef, Arc<Backoff>>>,
    /// Stops taking new work (graceful stop).
    draining: Shutdown,
    /// Stops everything at once (kill).
    killed: Shutdown,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn backoff(&self, queue: QueueRef) -> Arc<Backoff> {
        lock(&self.backoffs)
            .entry(queue)
            .or_insert_with(|| Arc::new(Backoff::new(self.settings.max_polling_interval)))
            .clone()
    }

    /// Sends what finished work sends, waking this worker's poller of each queue it sends to
    /// (`TaskHubQueue.AddMessageAsync`).
    async fn send(&self, sends: Vec<(QueueRef, String, Duration)>) {
        for (queue, text, delay) in sends {
            if let Err(e) = self.emulator.enqueue(queue, &text, delay).await {
                tracing::debug!(?queue, "send failed: {e}");
            }
            self.backoff(queue).wake.notify_one();
        }
    }

    /// Runs `work` holding `message`, renewing it as the dispatchers do (an activity's
    /// renewals end at the first failure, a session's go on: module docs, "Lost locks"), then
    /// deletes (or abandons) it. Returns false when killed first (the message stays
    /// invisible).
    async fn hold(&self, message: &mut DequeuedMessage, work: Work, visibility: Duration) -> bool {
        let done = tokio::time::sleep(work.runs_for);
        tokio::pin!(done);
        let mut locked_until = tokio::time::Instant::now() + visibility;
        let mut renewing = true;
        let mut lost = false;
        loop {
            let renew_at = (locked_until.checked_sub(RENEW_AHEAD).unwrap_or(locked_until))
                .min(tokio::time::Instant::now() + RENEW_AHEAD)
                .max(tokio::time::Instant::now() + RENEW_CHECK);
            tokio::select! {
                _ = &mut done => break,
                _ = self.killed.wait() => return false,
                _ = tokio::time::sleep_until(renew_at), if renewing => {
                    match self.emulator.update_visibility(message, visibility).await {
                        Ok(()) => locked_until = tokio::time::Instant::now() + visibility,
                        Err(e) => {
                            tracing::debug!(queue = ?message.queue, "renewal failed: {e}");
                            lost = true;
                            // TaskActivityDispatcher.RenewUntil: `break` on failure.
                            renewing = message.queue != QueueRef::WorkItem;
                        }
                    }
                }
            }
        }
        let outcome = if work.fails {
            self.emulator.abandon(message).await.map(|_| ())
        } else {
            self.send(work.sends).await;
            // TaskHubQueue.DeleteMessageAsync: one more try when the message is gone or its
            // receipt stale (a delete racing an update), then given up.
            match self.emulator.delete(message).await {
                Err(e) if gone_or_stale(&e) => self.emulator.delete(message).await,
                outcome => outcome,
            }
        };
        if let Err(e) = outcome {
            tracing::debug!(queue = ?message.queue, "delete or abandon failed: {e}");
            lost = true;
        }
        if lost {
            self.locks_lost.fetch_add(1, Ordering::SeqCst);
        }
        true
    }
}

/// A delete or update that found the message gone (404, `MessageNotFound`) or its pop
/// receipt stale (400, `PopReceiptMismatch`): `TaskHubQueue`'s `IsMessageGoneException` and
/// `IsPopReceiptMismatch`.
fn gone_or_stale(e: &StorageError) -> bool {
    match e {
        StorageError::NotProvisioned { .. } => true,
        StorageError::Unexpected { message, .. } => message.contains("PopReceiptMismatch"),
        _ => false,
    }
}

/// A running worker's dispatchers over one hub.
pub struct Dispatcher {
    shared: Arc<Shared>,
    /// The prefetch loop of each owned partition, and what stops it.
    owned: Mutex<BTreeMap<u32, (Shutdown, tokio::task::JoinHandle<()>)>>,
    slots: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("held", &self.held()).finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// Starts the orchestration and activity slots of a worker running `app` against the hub
    /// of `emulator`; it owns no partition until [`Dispatcher::own`].
    pub fn start(emulator: TaskHubEmulator, settings: DispatchSettings, app: Arc<dyn AppCode>) -> Self {
        let shared = Arc::new(Shared {
            emulator,
            settings,
            app,
            buffer: Mutex::new(VecDeque::new()),
            buffered: Notify::new(),
            pending: AtomicUsize::new(0),
            in_sessions: AtomicUsize::new(0),
            activities: AtomicUsize::new(0),
            locks_lost: AtomicUsize::new(0),
            backoffs: Mutex::new(HashMap::new()),
            draining: Shutdown::new(),
            killed: Shutdown::new(),
        });
        let mut slots = JoinSet::new();
        for _ in 0..settings.orchestration_slots {
            slots.spawn(orchestration_slot(shared.clone()));
        }
        slots.spawn(activity_dispatcher(shared.clone()));
        Self { shared, owned: Mutex::new(BTreeMap::new()), slots: Mutex::new(slots) }
    }

    /// The partitions this worker owns from now on (as its partition manager decides): a
    /// prefetch loop starts for each new one and stops for each one given up (what it
    /// buffered stays buffered, as a released `ControlQueue` leaves it).
    pub fn own(&self, partitions: &[u32]) {
        let mut owned = lock(&self.owned);
        owned.retain(|p, (stop, _)| {
            let keep = partitions.contains(p);
            if !keep {
                stop.trigger();
            }
            keep
        });
        for &p in partitions {
            owned.entry(p).or_insert_with(|| {
                let stop = Shutdown::new();
                (stop.clone(), tokio::spawn(prefetch(self.shared.clone(), p, stop)))
            });
        }
    }

    /// What it holds now.
    pub fn held(&self) -> Held {
        Held {
            buffered: lock(&self.shared.buffer).len(),
            in_sessions: self.shared.in_sessions.load(Ordering::SeqCst),
            activities: self.shared.activities.load(Ordering::SeqCst),
            locks_lost: self.shared.locks_lost.load(Ordering::SeqCst),
        }
    }

    /// Stops the worker `how`, and waits for it.
    pub async fn stop(self, how: Stop) {
        for (_, (stop, _)) in lock(&self.owned).iter() {
            stop.trigger();
        }
        self.shared.draining.trigger();
        if how == Stop::Kill {
            self.shared.killed.trigger();
        }
        self.shared.buffered.notify_waiters();
        let handles: Vec<tokio::task::JoinHandle<()>> =
            std::mem::take(&mut *lock(&self.owned)).into_values().map(|(_, h)| h).collect();
        for handle in handles {
            let _ = handle.await;
        }
        let mut slots = std::mem::take(&mut *lock(&self.slots));
        while slots.join_next().await.is_some() {}
    }
}

/// `ControlQueue.GetMessagesAsync` for one partition, until `stop`.
async fn prefetch(shared: Arc<Shared>, partition: u32, stop: Shutdown) {
    let queue = QueueRef::Control(partition);
    let backoff = shared.backoff(queue);
    let mut rng = StdRng::seed_from_u64(seed(u64::from(partition)));
    let mut empty = 0u32;
    let settings = shared.settings;
    while !stop.is_triggered() && !shared.killed.is_triggered() {
        if shared.pending.load(Ordering::SeqCst) >= settings.buffer_threshold {
            tokio::select! {
                _ = tokio::time::sleep(BUFFER_FULL_PAUSE) => {}
                _ = stop.wait() => return,
            }
            continue;
        }
        let received =
            shared.emulator.dequeue(queue, settings.batch_size, settings.control_visibility_timeout).await;
        match received {
            Ok(messages) if !messages.is_empty() => {
                empty = 0;
                shared.pending.fetch_add(messages.len(), Ordering::SeqCst);
                lock(&shared.buffer).extend(messages.into_iter().map(|m| (partition, m)));
                shared.buffered.notify_waiters();
                continue;
            }
            Ok(_) => empty = empty.saturating_add(1),
            Err(e) => {
                tracing::debug!(partition, "receive failed: {e}");
                empty = empty.saturating_add(1);
            }
        }
        let wait = backoff.delay(empty, &mut rng);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = backoff.wake.notified() => empty = 0,
            _ = stop.wait() => return,
        }
    }
}

/// One orchestration slot: runs episodes over buffered messages, oldest first.
async fn orchestration_slot(shared: Arc<Shared>) {
    loop {
        let next = lock(&shared.buffer).pop_front();
        let Some((partition, mut message)) = next else {
            if shared.draining.is_triggered() {
                return;
            }
            let notified = shared.buffered.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shared.draining.wait() => {}
            }
            continue;
        };
        if shared.draining.is_triggered() {
            // A graceful stop leaves buffered messages invisible (#2651).
            return;
        }
        shared.in_sessions.fetch_add(1, Ordering::SeqCst);
        let work = shared.app.episode(partition, &message);
        let visibility = shared.settings.control_visibility_timeout;
        let finished = shared.hold(&mut message, work, visibility).await;
        shared.in_sessions.fetch_sub(1, Ordering::SeqCst);
        if finished {
            shared.pending.fetch_sub(1, Ordering::SeqCst);
        } else {
            return;
        }
    }
}

/// The activity dispatcher (`Core/WorkItemDispatcher.cs` with `TaskActivityDispatcher`): one
/// fetch loop that waits for a free slot, then `WorkItemQueue.GetMessageAsync` takes one
/// message, which runs in that slot.
async fn activity_dispatcher(shared: Arc<Shared>) {
    let backoff = shared.backoff(QueueRef::WorkItem);
    let slots = Arc::new(tokio::sync::Semaphore::new(shared.settings.activity_slots));
    let mut rng = StdRng::seed_from_u64(seed(0x5107));
    let mut empty = 0u32;
    let visibility = shared.settings.work_item_visibility_timeout;
    let mut running = JoinSet::new();
    while !shared.draining.is_triggered() {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            _ = shared.draining.wait() => break,
        };
        while running.try_join_next().is_some() {}
        match shared.emulator.dequeue(QueueRef::WorkItem, 1, visibility).await {
            Ok(mut messages) if !messages.is_empty() => {
                empty = 0;
                let mut message = messages.remove(0);
                let shared = shared.clone();
                running.spawn(async move {
                    shared.activities.fetch_add(1, Ordering::SeqCst);
                    let work = shared.app.activity(&message);
                    shared.hold(&mut message, work, visibility).await;
                    shared.activities.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                });
                continue;
            }
            Ok(_) => empty = empty.saturating_add(1),
            Err(e) => {
                tracing::debug!("receive work item failed: {e}");
                empty = empty.saturating_add(1);
            }
        }
        drop(permit);
        let wait = backoff.delay(empty, &mut rng);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = backoff.wake.notified() => empty = 0,
            _ = shared.draining.wait() => break,
        }
    }
    // A graceful stop lets running activities finish; a kill ends them where they are.
    while running.join_next().await.is_some() {}
}

/// A seed for the back-off jitter: the clock mixed with `salt` (the jitter only spreads
/// polls; nothing depends on its values).
fn seed(salt: u64) -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ salt.rotate_left(17)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_from_fifty_milliseconds_up_to_the_maximum_polling_interval() {
        let backoff = Backoff::new(Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            backoff.delay(0, &mut rng),
            Duration::ZERO,
            "a receive that found work polls again at once"
        );
        for (empty, low, high) in [(1, 90, 110), (2, 130, 170), (3, 210, 290), (10, 20_500, 30_000)] {
            let d = backoff.delay(empty, &mut rng).as_millis();
            assert!((low..=high).contains(&d), "after {empty} empty receives: {d} ms");
        }
        assert_eq!(backoff.delay(30, &mut rng), Duration::from_secs(30));
    }

    #[test]
    fn abandoning_backs_off_two_to_the_dequeue_count_up_to_ten_minutes() {
        use super::super::abandon_backoff;
        assert_eq!(abandon_backoff(1), Duration::from_secs(2));
        assert_eq!(abandon_backoff(5), Duration::from_secs(32));
        assert_eq!(abandon_backoff(10), Duration::from_secs(600));
        assert_eq!(abandon_backoff(99), Duration::from_secs(600));
    }
}
