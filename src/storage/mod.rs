//! Azure Storage, read-only: the queues and partition ownership of a task hub.
//!
//! Used by the sidecar (its own partitions) and by the aggregator's cold probe (whatever no
//! sidecar covers). Never creates or writes a task hub's resources.
//!
//! INTERFACE SKELETON: the public API the sidecar and aggregator are written against. The
//! storage issue (#3) fills in the bodies; until then every read fails with
//! [`StorageError::Unexpected`].

use std::time::Duration;

/// How partition ownership is recorded (host.json `useTablePartitionManagement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionMode {
    /// The `{hub}Partitions` table (DurableTask.AzureStorage 2.x default).
    #[default]
    Table,
    /// Legacy lease blobs in `{hub lowercased}-leases`.
    Blob,
}

/// A task hub's name and the names of its resources (durabletask-facts.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskHub {
    name: String,
}

/// The signals of one queue at one moment (the report protocol's `QueueSignals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueSignals {
    /// `x-ms-approximate-messages-count`: includes invisible messages (in progress, timers).
    pub approximate_count: u64,
    /// Messages returned by a peek of up to 32: visible ones only.
    pub visible_count: u32,
    /// now - InsertedOn of the first visible message, ms; 0 when none is visible.
    pub first_visible_age_ms: u64,
    /// When the queue was read, ms since the Unix epoch.
    pub sampled_at_unix_ms: i64,
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

impl TaskHub {
    /// A task hub name as configured (case preserved). Validation is issue #3's.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The name as configured.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A storage account's endpoints and credential, parsed from a connection string.
#[derive(Debug, Clone)]
pub struct StorageAccount {
    _private: (),
}

impl StorageAccount {
    /// Parses a connection string as Durable Functions apps have it in `AzureWebJobsStorage`.
    pub fn from_connection_string(_connection: &str) -> Result<Self, StorageError> {
        Err(StorageError::Unexpected {
            resource: "connection string".into(),
            message: "not implemented yet".into(),
        })
    }
}

/// Reads one task hub's queues and partition ownership.
#[derive(Debug, Clone)]
pub struct TaskHubReader {
    hub: TaskHub,
}

impl TaskHubReader {
    /// A reader for `hub` in `account`.
    pub fn new(
        _account: &StorageAccount,
        hub: TaskHub,
        _mode: PartitionMode,
        _options: StorageOptions,
    ) -> Self {
        Self { hub }
    }

    /// The hub this reader reads.
    pub fn hub(&self) -> &TaskHub {
        &self.hub
    }

    /// Every partition of the hub (P = the number returned) and who holds it at `now_unix_ms`.
    pub async fn partitions(&self, _now_unix_ms: i64) -> Result<Vec<PartitionLease>, StorageError> {
        Err(StorageError::Unexpected {
            resource: self.hub.name.clone(),
            message: "not implemented yet".into(),
        })
    }

    /// One queue's signals at `now_unix_ms`.
    pub async fn read_queue(
        &self,
        _queue: QueueRef,
        _now_unix_ms: i64,
    ) -> Result<QueueSignals, StorageError> {
        Err(StorageError::Unexpected {
            resource: self.hub.name.clone(),
            message: "not implemented yet".into(),
        })
    }
}
