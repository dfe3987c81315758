//! What one read of a task hub's queues shows: the one reading type from storage to the engine.
//!
//! A sidecar and the aggregator's cold probe read queues with the same function
//! (`storage::TaskHubReader::read_hub`); the report protocol carries the same fields and
//! converts at the wire's edge only (`sidecar::report`, `aggregator::reports`); the engine
//! (`heuristic`), the simulator and `recommend` take these types as they are.

use crate::clock::UnixMs;

/// At most this many messages come back from one Peek (Azure Queue Storage's
/// `numofmessages` limit), so a visible count of this size means "this many or more".
pub const PEEK_LIMIT: u32 = 32;

/// One queue read at one moment: Get Queue Metadata and a Peek of up to [`PEEK_LIMIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueReading {
    /// `x-ms-approximate-messages-count`: visible messages, messages a worker holds
    /// (dequeued, renewed or prefetched) and messages enqueued with a visibility delay
    /// (durable timers, scheduled starts, abandoned messages backing off).
    pub approximate_count: u64,
    /// Messages the Peek returned: visible ones only, and at most [`PEEK_LIMIT`]
    /// ([`QueueReading::peek_saturated`] says when the queue holds at least that many).
    pub visible_count: u32,
    /// now - InsertedOn of the first visible message, ms; 0 when none is visible.
    pub first_visible_age_ms: u64,
    /// Of the messages the Peek returned, those dequeued before (`DequeueCount` > 0): held
    /// messages that reappeared (a worker died or gave up on them), never timers that fired,
    /// which are first dequeued after they turn visible.
    pub redelivered_count: u32,
    /// When the queue was read (the reader's clock).
    pub sampled_at: UnixMs,
}

impl QueueReading {
    /// The peek came back full: at least [`PEEK_LIMIT`] messages are visible, perhaps many
    /// more, so nothing here says how many of the others are invisible.
    pub fn peek_saturated(&self) -> bool {
        self.visible_count >= PEEK_LIMIT
    }

    /// Visible messages, as far as the peek can tell (a lower bound when saturated).
    pub fn visible(&self) -> u64 {
        u64::from(self.visible_count)
    }

    /// Messages in the queue (never fewer than the peek saw: the approximate count may lag).
    pub fn messages(&self) -> u64 {
        self.approximate_count.max(self.visible())
    }

    /// Invisible messages when the peek tells them apart exactly; `None` when it is
    /// saturated (the queue's visible count is unknown, so is its invisible count).
    pub fn invisible(&self) -> Option<u64> {
        (!self.peek_saturated()).then(|| self.messages() - self.visible())
    }
}

/// One read of (part of) a task hub: its partition count and the queues read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HubReading {
    /// The partition count found in storage; 0 when unknown.
    pub partition_count: u32,
    /// Control queues read, by partition, in partition order.
    pub control: Vec<(u32, QueueReading)>,
    /// The work-item queue, when it was read.
    pub work_item: Option<QueueReading>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(approximate_count: u64, visible_count: u32) -> QueueReading {
        QueueReading { approximate_count, visible_count, ..QueueReading::default() }
    }

    #[test]
    fn a_full_peek_says_at_least_and_hides_the_invisible_count() {
        let deep = reading(300, PEEK_LIMIT);
        assert!(deep.peek_saturated());
        assert_eq!(deep.invisible(), None, "300 visible messages are not 268 invisible ones");
        assert_eq!(deep.messages(), 300);
        let shallow = reading(30, 5);
        assert_eq!(shallow.invisible(), Some(25));
    }

    #[test]
    fn a_lagging_approximate_count_never_hides_what_the_peek_saw() {
        assert_eq!(reading(2, 5).messages(), 5);
        assert_eq!(reading(2, 5).invisible(), Some(0));
    }
}
