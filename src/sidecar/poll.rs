//! One poll: which partitions this pod owns now, and the readings of their control queues
//! (plus the work-item queue when it owns partition 0), as one report.
//!
//! Ownership is read from whichever layout the hub has (the reader detects it: the
//! `{hub}Partitions` table, safe `ownership/` or legacy `default/` lease blobs; see
//! `storage::Layout`). A hub with queues and no ownership store is reported as an error
//! that names what was looked for, never as a pod that owns nothing in silence.

use crate::{
    clock::UnixMs,
    contract::limits::REPORT_TEXT_MAX_LEN,
    proto::report::{self as proto, report_error::Kind},
    reading::QueueReading,
    storage::{HubRead, PartitionLease, QueueChoice, StorageError, TaskHubReader},
};

/// Reads what `pod_name` owns at `now`: its partitions' control queues, and the work-item
/// queue when it owns partition 0 (the designated reporter of the work-item queue), through
/// the read path the cold probe uses too (`TaskHubReader::ownership`, then `read`).
pub(crate) async fn poll(reader: &TaskHubReader, pod_name: &str, now: UnixMs) -> HubRead {
    let ownership = reader.ownership(now).await;
    let control = owned_partitions(&ownership.leases, pod_name);
    let work_item = control.first() == Some(&0);
    reader.read(ownership, QueueChoice { control, work_item }, now).await
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

/// The report protocol's form of a queue reading (the wire's edge).
pub(crate) fn reading_to_proto(r: &QueueReading) -> proto::QueueSignals {
    proto::QueueSignals {
        approximate_count: r.approximate_count,
        visible_count: r.visible_count,
        first_visible_age_ms: r.first_visible_age_ms,
        sampled_at_unix_ms: r.sampled_at.as_millis(),
        redelivered_count: r.redelivered_count,
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
    proto::ReportError { kind: kind as i32, message: within_report_limit(e.to_string()) }
}

/// `text` cut (on a character boundary, marked with "...") to what the aggregator accepts
/// in a report (`contract::limits::REPORT_TEXT_MAX_LEN`): a longer error message (a storage
/// answer quoted in full) would have the whole report refused.
fn within_report_limit(mut text: String) -> String {
    const MARK: &str = "...";
    if text.len() <= REPORT_TEXT_MAX_LEN {
        return text;
    }
    let mut end = REPORT_TEXT_MAX_LEN - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(partition: u32, owner: Option<&str>) -> PartitionLease {
        PartitionLease { partition, owner: owner.map(Into::into), expires_at_unix_ms: None, draining: false }
    }

    #[test]
    fn error_text_is_cut_to_what_a_report_may_carry() {
        let short = "storage unreachable".to_string();
        assert_eq!(within_report_limit(short.clone()), short);
        // Multi-byte characters across the cut: still valid UTF-8, within the limit.
        let long = "é".repeat(REPORT_TEXT_MAX_LEN);
        let cut = within_report_limit(long);
        assert!(cut.len() <= REPORT_TEXT_MAX_LEN && cut.len() > REPORT_TEXT_MAX_LEN - 8, "{}", cut.len());
        assert!(cut.ends_with("...") && cut.starts_with("éé"));
        let error = StorageError::Unexpected { resource: "q".into(), message: "x".repeat(5_000) };
        assert!(error_to_proto(&error).message.len() <= REPORT_TEXT_MAX_LEN);
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
