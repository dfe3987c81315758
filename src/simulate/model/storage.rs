//! Azure Storage queues as DTFx uses them: messages visible, invisible until a time, or held
//! by a live worker that renews them; what Get Queue Metadata and a Peek show; and the
//! visibility rules of DurableTask.AzureStorage's `Messaging/TaskHubQueue.cs` (abandon
//! back-off) and the dispatchers' renewal (`Core/TaskActivityDispatcher.cs`,
//! `Core/TaskOrchestrationDispatcher.cs`).

use std::collections::{BTreeMap, VecDeque};

use crate::reading::{PEEK_LIMIT, QueueReading};
use crate::simulate::source::sim_time;

/// DTFx renews a running activity's message, and a running episode's, every 30 s
/// (`TaskActivityDispatcher.AdjustRenewAt`; `TaskOrchestrationDispatcher.MaxRenewalInterval`).
pub(super) const RENEWAL_MS: u64 = 30_000;
/// The longest an abandoned message is hidden (`TaskHubQueue.AbandonMessageAsync`).
const MAX_ABANDON_DELAY_MS: u64 = 600_000;

/// What a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MessageKind {
    /// ExecutionStarted.
    Start,
    /// TaskCompleted, an activity's result.
    ActivityDone,
    /// TimerFired, enqueued invisible until it fires (`TaskHubQueue.GetVisibilityDelay`).
    TimerFired,
    /// TaskScheduled, on the work-item queue; a poison one fails every time.
    Activity { run_ms: u64, poison: bool },
}

/// One queue message.
#[derive(Debug, Clone, Copy)]
pub(super) struct Message {
    pub(super) id: u64,
    pub(super) instance: u32,
    pub(super) kind: MessageKind,
    /// InsertedOn.
    pub(super) inserted_ms: u64,
    /// Times it was dequeued (Azure's DequeueCount).
    pub(super) dequeue_count: u32,
}

/// How long an abandoned message stays hidden: min(2^dequeues, 600) s, so a poison message
/// is retried for ever, at least every 10 minutes (`TaskHubQueue.AbandonMessageAsync`).
pub(super) fn abandon_delay_ms(dequeue_count: u32) -> u64 {
    if dequeue_count >= 30 {
        MAX_ABANDON_DELAY_MS
    } else {
        (1_000u64 << dequeue_count).min(MAX_ABANDON_DELAY_MS)
    }
}

/// When a message renewed every [`RENEWAL_MS`] since `started_ms` is visible again if its
/// worker dies at `now_ms`: one visibility timeout after the last renewal (`RenewUntil`: the
/// first renewal 30 s after the dequeue, then every 30 s).
pub(super) fn reappears_at(started_ms: u64, now_ms: u64, timeout_ms: u64) -> u64 {
    let renewals = now_ms.saturating_sub(started_ms) / RENEWAL_MS;
    started_ms + renewals * RENEWAL_MS + timeout_ms
}

/// One Azure Storage queue.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// Visible, in the order they became visible.
    pub(super) visible: VecDeque<Message>,
    /// Invisible until the key's time: (visible at, message id).
    pub(super) invisible: BTreeMap<(u64, u64), Message>,
    /// Held by a live worker that renews them (running activities, episodes' messages).
    pub(super) held: u64,
}

impl Queue {
    /// `x-ms-approximate-messages-count`: visible, invisible and held.
    pub(super) fn approximate(&self) -> u64 {
        self.visible.len() as u64 + self.invisible.len() as u64 + self.held
    }

    /// Get Queue Metadata and a Peek of up to 32 at `now_ms`.
    pub(super) fn sample(&self, now_ms: u64) -> QueueReading {
        let peeked = self.visible.iter().take(PEEK_LIMIT as usize);
        QueueReading {
            sampled_at: sim_time(now_ms),
            approximate_count: self.approximate(),
            visible_count: self.visible.len().min(PEEK_LIMIT as usize) as u32,
            first_visible_age_ms: self.visible.front().map_or(0, |m| now_ms.saturating_sub(m.inserted_ms)),
            // The peek's DequeueCount > 0: dequeued before and reappeared.
            redelivered_count: peeked.filter(|m| m.dequeue_count > 0).count() as u32,
        }
    }

    /// Messages whose invisibility ended by `now_ms` turn visible.
    pub(super) fn release_due(&mut self, now_ms: u64) {
        while let Some(entry) = self.invisible.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            self.visible.push_back(entry.remove());
        }
    }

    /// Puts `message` back, invisible until `until_ms` (visible at once when that has passed).
    pub(super) fn hide(&mut self, message: Message, until_ms: u64, now_ms: u64) {
        if until_ms <= now_ms {
            self.visible.push_back(message);
        } else {
            self.invisible.insert((until_ms, message.id), message);
        }
    }

    /// Takes a dequeued message back from storage by its pop receipt: still invisible under
    /// it, or visible again once its visibility ran out (nobody dequeued it since).
    pub(super) fn take(&mut self, visible_at_ms: u64, id: u64) -> Option<Message> {
        if let Some(m) = self.invisible.remove(&(visible_at_ms, id)) {
            return Some(m);
        }
        let at = self.visible.iter().position(|m| m.id == id)?;
        self.visible.remove(at)
    }

    /// Whether a dequeued message is still in storage under its pop receipt or visible.
    pub(super) fn contains(&self, visible_at_ms: u64, id: u64) -> bool {
        self.invisible.contains_key(&(visible_at_ms, id)) || self.visible.iter().any(|m| m.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_messages_back_off_exponentially_up_to_ten_minutes() {
        assert_eq!(abandon_delay_ms(1), 2_000);
        assert_eq!(abandon_delay_ms(5), 32_000);
        assert_eq!(abandon_delay_ms(9), 512_000);
        assert_eq!(abandon_delay_ms(10), 600_000);
        assert_eq!(abandon_delay_ms(40), 600_000);
    }

    #[test]
    fn a_renewed_message_reappears_one_timeout_after_its_last_renewal() {
        assert_eq!(reappears_at(0, 10_000, 300_000), 300_000, "not renewed yet");
        assert_eq!(reappears_at(0, 65_000, 300_000), 60_000 + 300_000, "renewed at 30 s and 60 s");
    }

    #[test]
    fn a_peek_shows_at_most_32_visible_messages_and_the_count_includes_every_message() {
        let mut q = Queue::default();
        for id in 0..40 {
            let m = Message { id, instance: 0, kind: MessageKind::Start, inserted_ms: 0, dequeue_count: 0 };
            q.hide(m, if id < 35 { 0 } else { 9_000 }, 1_000);
        }
        q.held = 2;
        let s = q.sample(4_000);
        assert_eq!((s.approximate_count, s.visible_count, s.first_visible_age_ms), (42, 32, 4_000));
    }
}
