//! Where a task hub keeps partition ownership, and the names DurableTask gives those records.
//!
//! DurableTask.AzureStorage has three partition managers, chosen per app by host.json
//! (`AzureStorageOrchestrationService`'s constructor in Azure/durabletask
//! src/DurableTask.AzureStorage/AzureStorageOrchestrationService.cs):
//! - `TablePartitionManager` (Partitioning/TablePartitionManager.cs,
//!   `useTablePartitionManagement`, default in DurableTask.AzureStorage 2.x): table
//!   `{hub}Partitions`, one `TablePartitionLease` row per control queue;
//! - `SafePartitionManager` (Partitioning/SafePartitionManager.cs, the default otherwise,
//!   every Durable Functions 2.x app): container `{hub lowercased}-leases` with `taskhub.json`
//!   and two lease blobs per control queue, `intent/{queue}` and `ownership/{queue}`; the
//!   owner of `ownership/` is the worker processing the partition;
//! - `LegacyPartitionManager` (Partitioning/LegacyPartitionManager.cs,
//!   `useLegacyPartitionManagement`): the same container with `taskhub.json` and one lease
//!   blob `default/{queue}` per control queue.
//!
//! A scaler cannot see host.json, so it detects the layout the way upstream's
//! `AzureStorageOrchestrationService.GetControlQueuesAsync` finds the partition count: the
//! table when it exists, else `taskhub.json`; among the blob layouts, `ownership/` blobs
//! mean the safe manager and `default/` blobs the legacy one.

use std::time::Duration;

use super::TaskHub;

/// Which partition manager's records a task hub has (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The `{hub}Partitions` table (`TablePartitionManager`).
    Table,
    /// `taskhub.json` with `intent/` and `ownership/` lease blobs (`SafePartitionManager`).
    Safe,
    /// `taskhub.json` with `default/` lease blobs (`LegacyPartitionManager`).
    Legacy,
}

/// How long a detected layout is trusted before it is checked again. An app upgraded from
/// Durable Functions 2.x to 3.x starts writing the Partitions table: a blob layout is
/// re-checked (one table lookup and one `taskhub.json` read more) once a minute, so the move
/// shows within a minute. A detected table needs no re-check: it takes precedence over
/// everything else, and a table that disappears is noticed by the next read.
pub const REDETECT_INTERVAL: Duration = Duration::from_secs(60);

/// The blob DurableTask's `BlobPartitionLeaseManager` keeps the partition count in
/// (Partitioning/BlobPartitionLeaseManager.cs, `TaskHubInfoBlobName`; body: `TaskHubInfo`).
pub(crate) const TASK_HUB_INFO_BLOB: &str = "taskhub.json";

impl Layout {
    /// `table`, `safe` or `legacy`, as the report protocol and logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Table => "table",
            Layout::Safe => "safe",
            Layout::Legacy => "legacy",
        }
    }

    /// The "directory" of the lease blobs that say who processes a partition: the
    /// `leaseType` the partition manager hands its `BlobPartitionLeaseManager` (`ownership`
    /// in SafePartitionManager.cs, `default` in LegacyPartitionManager.cs). None for the table.
    pub(crate) fn ownership_directory(self) -> Option<&'static str> {
        match self {
            Layout::Table => None,
            Layout::Safe => Some("ownership"),
            Layout::Legacy => Some("default"),
        }
    }
}

/// `{directory}/{control queue}`: a lease blob's name inside [`TaskHub::lease_container`]
/// (`BlobContainer.GetBlobReference(partitionId, blobDirectoryName)` upstream; the
/// partition id is the control queue's name).
pub(crate) fn lease_blob_name(hub: &TaskHub, directory: &str, partition: u32) -> String {
    format!("{directory}/{}", hub.control_queue(partition))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_blobs_live_under_the_manager_s_directory() {
        let hub = TaskHub::parse("MyHub").unwrap();
        let name = |layout: Layout| layout.ownership_directory().map(|d| lease_blob_name(&hub, d, 3));
        assert_eq!(name(Layout::Safe).as_deref(), Some("ownership/myhub-control-03"));
        assert_eq!(name(Layout::Legacy).as_deref(), Some("default/myhub-control-03"));
        assert_eq!(name(Layout::Table), None);
    }
}
