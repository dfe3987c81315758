//! One pod of the app: what its DTFx worker runs and holds (activities, orchestration
//! episodes, prefetched control messages), and how the ReplicaSet ranks it for removal.

use std::collections::VecDeque;

use super::backoff::Poller;
use super::storage::Message;

/// A running activity.
#[derive(Debug)]
pub(super) struct Running {
    pub(super) message: Message,
    pub(super) started_ms: u64,
    pub(super) done_ms: u64,
}

/// A dequeued control message and its pop receipt (when its visibility ends).
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) message: Message,
    pub(super) visible_at_ms: u64,
}

/// One instance's buffered messages, waiting for an orchestration slot.
#[derive(Debug)]
pub(super) struct Batch {
    pub(super) instance: u32,
    pub(super) partition: usize,
    pub(super) messages: Vec<Held>,
}

/// An orchestration episode running on a pod.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) instance: u32,
    pub(super) partition: usize,
    /// The episode's messages, renewed while it runs.
    pub(super) messages: Vec<Held>,
    pub(super) started_ms: u64,
    pub(super) done_ms: u64,
    /// Messages dequeued for the instance during the episode: its next batch.
    pub(super) arrived: Vec<Held>,
}

/// One pod of the app, as its DTFx worker holds work.
#[derive(Debug)]
pub(super) struct Pod {
    pub(super) id: u64,
    /// The ReplicaSet's last tie-break among equals (a pod's UID is random).
    pub(super) uid: u64,
    pub(super) created_ms: u64,
    pub(super) ready_ms: u64,
    /// `controller.kubernetes.io/pod-deletion-cost` (0 when not set).
    pub(super) deletion_cost: i32,
    /// When it was sent SIGTERM.
    pub(super) terminating_since: Option<u64>,
    pub(super) activities: Vec<Running>,
    pub(super) sessions: Vec<Session>,
    /// Buffered batches, oldest first (`pendingOrchestrationMessageBatches`).
    pub(super) pending: VecDeque<Batch>,
    /// `PendingOrchestratorMessages`: control messages dequeued and not deleted or abandoned.
    pub(super) buffered: usize,
    pub(super) work_item_poll: Poller,
    pub(super) control_polls: Vec<Poller>,
}

impl Pod {
    pub(super) fn is_ready(&self, now_ms: u64) -> bool {
        now_ms >= self.ready_ms
    }

    pub(super) fn takes_work(&self, now_ms: u64) -> bool {
        self.is_ready(now_ms) && self.terminating_since.is_none()
    }

    pub(super) fn idle(&self) -> bool {
        self.activities.is_empty() && self.sessions.is_empty()
    }

    /// A control message this pod dequeued again after its visibility ran out: the buffered
    /// copy takes the new pop receipt (`ControlQueue`: "a duplicate ... we need the updated pop
    /// receipt"). False when the pod does not hold it.
    pub(super) fn replace_duplicate(&mut self, again: Held) -> bool {
        let id = again.message.id;
        let buffers = self
            .pending
            .iter_mut()
            .flat_map(|b| b.messages.iter_mut())
            .chain(self.sessions.iter_mut().flat_map(|s| s.arrived.iter_mut()));
        for held in buffers {
            if held.message.id == id {
                *held = again;
                return true;
            }
        }
        false
    }

    /// What the ReplicaSet ranks this pod by (kubernetes `pkg/controller/controller_utils.go`
    /// `ActivePodsWithRanks.Less`, lowest deleted first): not ready before ready, lower
    /// deletion cost first, then (both ready) the shorter time ready in log2 buckets, or (both
    /// not ready) the shorter life in log2 buckets (`LogarithmicScaleDown`), and the UID among
    /// equals. Left out: unassigned and pending phases (a starting pod is not ready), pods
    /// doubled up on a node, restart counts.
    pub(super) fn deletion_rank(&self, now_ms: u64) -> (bool, i32, i64, u64) {
        let ready = self.is_ready(now_ms);
        let since = if ready { self.ready_ms } else { self.created_ms };
        (ready, self.deletion_cost, log2_bucket_ns(now_ms.saturating_sub(since)), self.uid)
    }
}

/// kubernetes' `logarithmicRankDiff` bucket: floor(log2(age in ns)), -1 for no age.
pub(super) fn log2_bucket_ns(age_ms: u64) -> i64 {
    if age_ms == 0 { -1 } else { (age_ms as f64 * 1e6).log2().floor() as i64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_set_ranks_pods_ready_for_similar_times_as_equals() {
        assert_eq!(log2_bucket_ns(0), -1);
        assert_eq!(log2_bucket_ns(40_000), log2_bucket_ns(50_000), "both in [2^35, 2^36) ns");
        assert!(log2_bucket_ns(30_000) < log2_bucket_ns(40_000));
    }
}
