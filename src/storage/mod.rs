//! Azure Storage, read-only: the queues and partition ownership of a task hub.
//!
//! Used by the sidecar (its own partitions) and by the aggregator's cold probe (whatever no
//! sidecar covers). Never creates or writes a task hub's resources.
//!
//! - `account`: [`StorageAccount`], connection strings, endpoints, credentials, and the
//!   azure_core client options every call goes through;
//! - `policy`: the Shared Key (Blob/Queue and Table variants) and SAS signing, per-attempt
//!   timeout and request-counting pipeline policies the official crates lack;
//! - `table`: the few Table service calls, sent through the same azure_core pipeline since no
//!   official table crate exists;
//! - `layout`: [`Layout`], the three places DurableTask keeps partition ownership, and the
//!   names of their records;
//! - `reader`: [`TaskHubReader`], the reads themselves (queues through `azure_storage_queue`,
//!   lease blobs through `azure_storage_blob`, the Partitions table through `table`), and the
//!   detection of a hub's layout.
//!
//! The write side (creating hubs, claiming partitions, enqueueing) lives apart, in
//! [`crate::emulator`], for tests and the demo only.

use std::time::Duration;

mod account;
pub(crate) mod http;
mod layout;
mod policy;
mod reader;
pub(crate) mod table;

pub(crate) use account::Service;
pub use account::{AppIdentity, AzureCloud, Connection, ConnectionString, IdentityAccount, StorageAccount};
pub(crate) use layout::lease_blob_name;
pub use layout::{Layout, REDETECT_INTERVAL};
pub use reader::{HubRead, Ownership, QueueChoice, TaskHubReader};
// The name rule and the partition limit are the roles' contract; storage derives the hub's
// resource names from a checked name.
pub(crate) use crate::contract::MAX_PARTITIONS;
pub use crate::contract::TaskHub;

/// Where to look for partition ownership: detected by default, as upstream decides it; the
/// other values are overrides (host.json `useTablePartitionManagement` true or false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionMode {
    /// Detect per hub: the `{hub}Partitions` table when it exists, else `taskhub.json` with
    /// `ownership/` (safe) or `default/` (legacy) lease blobs ([`Layout`]).
    #[default]
    Auto,
    /// Only the `{hub}Partitions` table.
    Table,
    /// Only lease blobs in `{hub lowercased}-leases`: safe or legacy, whichever is there.
    Blob,
}

/// Who holds one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLease {
    /// Partition index (the NN of `{hub}-control-NN`).
    pub partition: u32,
    /// The worker id (pod name) holding it, when its lease is unexpired.
    pub owner: Option<String>,
    /// When the current lease ends, ms since the Unix epoch, when known.
    pub expires_at_unix_ms: Option<i64>,
    /// The owner is handing the partition over.
    pub draining: bool,
}

/// Which queue of a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueRef {
    /// `{hub}-workitems`.
    WorkItem,
    /// `{hub}-control-NN`.
    Control(u32),
}

/// Why a read failed; every variant names the resource it was reading.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The queue, table or container does not exist: the app has not started yet.
    #[error("task hub not provisioned: {resource} does not exist")]
    NotProvisioned {
        /// The missing resource.
        resource: String,
    },
    /// Storage refused the credentials (401/403).
    #[error("storage refused the credentials for {resource} (HTTP {status})")]
    Authentication {
        /// What was being read.
        resource: String,
        /// The HTTP status.
        status: u16,
    },
    /// Storage could not be reached or timed out.
    #[error("storage unreachable while reading {resource}: {message}")]
    Unreachable {
        /// What was being read.
        resource: String,
        /// The transport error.
        message: String,
    },
    /// The hub's queues exist but none of the places DurableTask keeps partition ownership
    /// does: the hub cannot be read as upstream reads it (and must not pass for empty).
    #[error(
        "task hub {task_hub} has queues but no partition ownership store: looked for {looked_for}; \
         found {partition_count} control queue(s)"
    )]
    NoOwnershipStore {
        /// The task hub.
        task_hub: String,
        /// What was looked for: the table, the `taskhub.json` blob, the lease prefixes.
        looked_for: String,
        /// The partition count the control queues found by name imply (the highest index
        /// found + 1; 0 when only the work-item queue exists).
        partition_count: u32,
    },
    /// Anything else storage answered.
    #[error("storage error reading {resource}: {message}")]
    Unexpected {
        /// What was being read.
        resource: String,
        /// Status and detail.
        message: String,
    },
}

/// Limits on every storage call.
#[derive(Debug, Clone, Copy)]
pub struct StorageOptions {
    /// Timeout of one HTTP attempt.
    pub attempt_timeout: Duration,
    /// Retries on transient failures (with backoff and jitter).
    pub max_retries: u32,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self { attempt_timeout: Duration::from_secs(5), max_retries: 2 }
    }
}

/// The names of a task hub's resources (durabletask-facts.md).
impl TaskHub {
    /// `{hub lowercased}-control-{NN}`.
    pub(crate) fn control_queue(&self, partition: u32) -> String {
        format!("{}-control-{partition:02}", self.name().to_ascii_lowercase())
    }

    /// `{hub lowercased}-workitems`.
    pub(crate) fn work_item_queue(&self) -> String {
        format!("{}-workitems", self.name().to_ascii_lowercase())
    }

    /// The queue `queue` names.
    pub(crate) fn queue_name(&self, queue: QueueRef) -> String {
        match queue {
            QueueRef::WorkItem => self.work_item_queue(),
            QueueRef::Control(partition) => self.control_queue(partition),
        }
    }

    /// `{hub}Partitions` (case as configured): table partition management.
    pub fn partitions_table(&self) -> String {
        format!("{}Partitions", self.name())
    }

    /// `{hub lowercased}-leases`: blob partition management (safe and legacy).
    pub fn lease_container(&self) -> String {
        format!("{}-leases", self.name().to_ascii_lowercase())
    }

    /// The partition index a control queue name ends with, if it is one of this hub's.
    pub(crate) fn partition_of(&self, queue_name: &str) -> Option<u32> {
        let prefix = format!("{}-control-", self.name().to_ascii_lowercase());
        let index = queue_name.to_ascii_lowercase().strip_prefix(&prefix)?.parse().ok()?;
        (index < MAX_PARTITIONS).then_some(index)
    }
}

impl PartitionMode {
    /// `auto`, `table` or `blob`, as the command line and logs spell it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PartitionMode::Auto => "auto",
            PartitionMode::Table => "table",
            PartitionMode::Blob => "blob",
        }
    }

    /// Reads `auto`, `table` or `blob` (any case, surrounding spaces ignored).
    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(PartitionMode::Auto),
            "table" => Some(PartitionMode::Table),
            "blob" => Some(PartitionMode::Blob),
            _ => None,
        }
    }

    /// Whether this mode may find `layout`.
    pub(crate) fn allows(self, layout: Layout) -> bool {
        match self {
            PartitionMode::Auto => true,
            PartitionMode::Table => layout == Layout::Table,
            PartitionMode::Blob => layout != Layout::Table,
        }
    }
}

impl StorageError {
    /// Classifies an azure_core error from reading `resource`: 404 means the hub is not
    /// provisioned, 401/403 a refused credential, transport errors unreachable storage.
    /// Nothing of an answer's body reaches the message but a short quoted error code: the
    /// SDK copies a body it cannot parse into its errors (typespec `src/xml.rs` `from_xml`,
    /// azure_core `src/error/error_response.rs` `check_success`), and the endpoint is the
    /// connection string's to choose.
    pub(crate) fn from_azure(resource: &str, error: &azure_core::Error) -> Self {
        use azure_core::error::ErrorKind;
        let resource = resource.to_string();
        match error.kind() {
            ErrorKind::HttpResponse { status, error_code, .. } => {
                let code = u16::from(*status);
                match code {
                    404 => StorageError::NotProvisioned { resource },
                    401 | 403 => StorageError::Authentication { resource, status: code },
                    _ => StorageError::Unexpected {
                        resource,
                        message: match error_code.as_deref().filter(|c| !c.is_empty()) {
                            Some(error_code) => format!("HTTP {code} {}", crate::contract::quote(error_code)),
                            None => format!("HTTP {code}"),
                        },
                    },
                }
            }
            ErrorKind::Io | ErrorKind::Connection => {
                StorageError::Unreachable { resource, message: brief(error) }
            }
            ErrorKind::Credential => StorageError::Authentication { resource, status: 0 },
            _ => StorageError::Unexpected { resource, message: brief(error) },
        }
    }

    /// Which kind of error this is (metric labels, logs).
    pub fn kind(&self) -> StorageErrorKind {
        match self {
            StorageError::NotProvisioned { .. } => StorageErrorKind::NotProvisioned,
            StorageError::Authentication { .. } => StorageErrorKind::Authentication,
            StorageError::Unreachable { .. } => StorageErrorKind::Unreachable,
            StorageError::NoOwnershipStore { .. } => StorageErrorKind::NoOwnershipStore,
            StorageError::Unexpected { .. } => StorageErrorKind::Unexpected,
        }
    }
}

/// The kinds of [`StorageError`], without their details: a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageErrorKind {
    /// [`StorageError::NotProvisioned`].
    NotProvisioned,
    /// [`StorageError::Authentication`].
    Authentication,
    /// [`StorageError::Unreachable`].
    Unreachable,
    /// [`StorageError::NoOwnershipStore`].
    NoOwnershipStore,
    /// [`StorageError::Unexpected`].
    Unexpected,
}

crate::metrics::label_values!(StorageErrorKind {
    NotProvisioned => "not_provisioned",
    Authentication => "authentication",
    Unreachable => "unreachable",
    NoOwnershipStore => "no_ownership_store",
    Unexpected => "unexpected",
});

/// The most characters of one error message (of an error or of one of its sources) that
/// [`brief`] keeps.
const BRIEF_PART_MAX_CHARS: usize = 160;

/// The error and its sources on one line (transport errors hide the useful part in a
/// source), each cut to its first line and [`BRIEF_PART_MAX_CHARS`]: an error may carry
/// what a storage endpoint answered (the SDK puts an unparsable body after the first line).
pub(crate) fn brief(error: &dyn std::error::Error) -> String {
    let part = |e: &dyn std::error::Error| {
        let text = e.to_string();
        let line = text.lines().next().unwrap_or_default().trim_end();
        match line.char_indices().nth(BRIEF_PART_MAX_CHARS) {
            Some((cut, _)) => format!("{}...", &line[..cut]),
            None => line.to_string(),
        }
    };
    let mut message = part(error);
    let mut source = error.source();
    while let Some(s) = source {
        let text = part(s);
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_durable_task() {
        let hub = TaskHub::parse("MyHub").unwrap();
        assert_eq!(hub.control_queue(3), "myhub-control-03");
        assert_eq!(hub.work_item_queue(), "myhub-workitems");
        assert_eq!(hub.partitions_table(), "MyHubPartitions");
        assert_eq!(hub.lease_container(), "myhub-leases");
    }

    #[test]
    fn partition_index_is_read_back_from_a_control_queue_name() {
        let hub = TaskHub::parse("MyHub").unwrap();
        assert_eq!(hub.partition_of("myhub-control-07"), Some(7));
        assert_eq!(hub.partition_of("otherhub-control-07"), None);
        assert_eq!(hub.partition_of("myhub-control-99"), None);
    }

    #[test]
    fn partition_modes_read_back_what_they_print() {
        for mode in [PartitionMode::Auto, PartitionMode::Table, PartitionMode::Blob] {
            assert_eq!(PartitionMode::parse(&format!(" {} ", mode.as_str().to_uppercase())), Some(mode));
        }
        assert_eq!(PartitionMode::parse("sql"), None);
        assert_eq!(PartitionMode::default(), PartitionMode::Auto);
    }

    #[test]
    fn an_override_limits_the_layouts_found() {
        assert!(PartitionMode::Blob.allows(Layout::Legacy) && !PartitionMode::Blob.allows(Layout::Table));
        assert!(PartitionMode::Table.allows(Layout::Table) && !PartitionMode::Table.allows(Layout::Safe));
        assert!(
            [Layout::Table, Layout::Safe, Layout::Legacy].into_iter().all(|l| PartitionMode::Auto.allows(l))
        );
    }

    #[test]
    fn an_answer_body_in_an_sdk_error_never_reaches_the_storage_error() {
        use azure_core::error::ErrorKind;
        let body = format!("<html>{}</html>", "internal secret page ".repeat(10_000));
        // What typespec `from_xml` makes of a 200 it cannot parse: the body after one line.
        let parse = azure_core::Error::with_message(
            ErrorKind::DataConversion,
            format!("failed to deserialize the following xml into a Model\n{body}"),
        );
        let e = StorageError::from_azure("hub-control-00", &parse);
        assert_eq!(e.kind(), StorageErrorKind::Unexpected);
        assert!(e.to_string().len() < 300 && !e.to_string().contains("secret"), "{e}");
        // What azure_core `check_success` makes of an error status: the body in the message,
        // a code taken from it.
        let status = azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status: azure_core::http::StatusCode::from(500),
                error_code: Some(body.clone()),
                raw_response: None,
            },
            format!("500: {body}"),
        );
        let e = StorageError::from_azure("hub-control-00", &status);
        assert!(e.to_string().starts_with("storage error reading hub-control-00: HTTP 500 \"<html>"), "{e}");
        assert!(e.to_string().len() < 300, "{} bytes", e.to_string().len());
    }

    #[test]
    fn brief_keeps_each_first_line_short_and_the_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer\nbody line")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("x".repeat(1_000)));
        let text = brief(&e);
        assert!(text.starts_with("outer: xxx") && text.ends_with("..."), "{text}");
        assert!(!text.contains("body line") && text.len() < 200, "{text}");
    }

    #[test]
    fn task_hub_names_are_checked_like_durable_task() {
        assert!(TaskHub::parse("MyHub1").is_ok());
        for bad in ["ab", "my-hub", "1hub", &"a".repeat(51)] {
            assert!(TaskHub::parse(bad).is_err(), "{bad}");
        }
    }
}
