//! One poll: which partitions this pod owns now, and the signals of their control queues
//! (plus the work-item queue when it owns partition 0), as one report.
//!
//! Ownership is read from whichever layout the hub has (the reader detects it: the
//! `{hub}Partitions` table, safe `ownership/` or legacy `default/` lease blobs; see
//! `storage::Layout`). A hub with queues and no ownership store is reported as an error
//! that names what was looked for, never as a pod that owns nothing in silence.

use futures::StreamExt;

use crate::{
    clock::UnixMs,
    proto::report::{self as proto, report_error::Kind},
    storage::{Layout, PartitionLease, QueueRef, QueueSignals, StorageError, TaskHubReader},
};

/// How many queues are read at once: a short poll without a burst of connections.
const QUEUE_READ_CONCURRENCY: usize = 4;

/// What one poll found, before it becomes a report.
#[derive(Debug, Clone, Default)]
pub(crate) struct PollResult {
    /// Partition count (0 when unknown).
    pub partition_count: u32,
    /// Owned partitions and their control queues' signals (in partition order).
    pub control_queues: Vec<(u32, QueueSignals)>,
    /// The work-item queue's signals when this pod owns partition 0.
    pub work_item: Option<QueueSignals>,
    /// The partitions this pod owns (even those whose queue could not be read).
    pub owned: Vec<u32>,
    /// Every storage error met (the report carries the first).
    pub errors: Vec<StorageError>,
    /// Where ownership was read from, once detected.
    pub layout: Option<Layout>,
}

/// Reads what `pod_name` owns at `now`.
pub(crate) async fn poll(reader: &TaskHubReader, pod_name: &str, now: UnixMs) -> PollResult {
    let leases = match reader.partitions(now).await {
        Ok(leases) => leases,
        Err(e) => return PollResult { errors: vec![e], layout: reader.layout(), ..Default::default() },
    };
    let owned = owned_partitions(&leases, pod_name);
    let mut queues: Vec<QueueRef> = owned.iter().map(|&p| QueueRef::Control(p)).collect();
    // The owner of partition 0 is the designated reporter of the work-item queue.
    if owned.first() == Some(&0) {
        queues.push(QueueRef::WorkItem);
    }
    let reads: Vec<(QueueRef, Result<QueueSignals, StorageError>)> = futures::stream::iter(queues)
        .map(|queue| async move { (queue, reader.read_queue(queue, now).await) })
        .buffered(QUEUE_READ_CONCURRENCY)
        .collect()
        .await;
    let mut result = PollResult {
        partition_count: leases.len() as u32,
        owned,
        layout: reader.layout(),
        ..Default::default()
    };
    for (queue, read) in reads {
        match (queue, read) {
            (QueueRef::Control(p), Ok(signals)) => result.control_queues.push((p, signals)),
            (QueueRef::WorkItem, Ok(signals)) => result.work_item = Some(signals),
            (_, Err(e)) => result.errors.push(e),
        }
    }
    result
}

/// The partitions whose unexpired owner is `pod_name` (the DurableTask worker id; compared
/// without case, as host names are).
pub(crate) fn owned_partitions(leases: &[PartitionLease], pod_name: &str) -> Vec<u32> {
    let mut owned: Vec<u32> = leases
        .iter()
        .filter(|l| l.owner.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(pod_name)))
        .map(|l| l.partition)
        .collect();
    owned.sort_unstable();
    owned
}

/// The report protocol's form of queue signals.
pub(crate) fn signals_to_proto(s: &QueueSignals) -> proto::QueueSignals {
    proto::QueueSignals {
        approximate_count: s.approximate_count,
        visible_count: s.visible_count,
        first_visible_age_ms: s.first_visible_age_ms,
        sampled_at_unix_ms: s.sampled_at_unix_ms,
    }
}

/// The report protocol's form of a storage error.
pub(crate) fn error_to_proto(e: &StorageError) -> proto::ReportError {
    let kind = match e {
        StorageError::NotProvisioned { .. } => Kind::TaskHubNotProvisioned,
        StorageError::Authentication { .. } => Kind::Authentication,
        StorageError::Unreachable { .. } => Kind::Unreachable,
        // The protocol has no kind of its own for it; the message says what was looked for.
        StorageError::NoOwnershipStore { .. } | StorageError::Unexpected { .. } => Kind::Storage,
    };
    proto::ReportError { kind: kind as i32, message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(partition: u32, owner: Option<&str>) -> PartitionLease {
        PartitionLease { partition, owner: owner.map(Into::into), expires_at_unix_ms: None, draining: false }
    }

    #[test]
    fn a_pod_owns_the_partitions_that_name_it() {
        let leases =
            [lease(2, Some("pod-a")), lease(0, Some("POD-A")), lease(1, Some("pod-b")), lease(3, None)];
        assert_eq!(owned_partitions(&leases, "pod-a"), [0, 2]);
        assert!(owned_partitions(&leases, "pod-c").is_empty());
    }

    #[test]
    fn storage_errors_map_to_report_error_kinds() {
        let e = StorageError::NotProvisioned { resource: "h-control-00".into() };
        assert_eq!(error_to_proto(&e).kind, Kind::TaskHubNotProvisioned as i32);
        let e = StorageError::Authentication { resource: "t".into(), status: 403 };
        assert_eq!(error_to_proto(&e).kind, Kind::Authentication as i32);
        let e = StorageError::NoOwnershipStore {
            task_hub: "MyHub".into(),
            looked_for: "table MyHubPartitions".into(),
            partition_count: 4,
        };
        let reported = error_to_proto(&e);
        assert_eq!(reported.kind, Kind::Storage as i32);
        assert!(reported.message.contains("no partition ownership store: looked for table MyHubPartitions"));
    }
}
