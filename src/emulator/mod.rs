//! Plays the Durable Task side: lays out a task hub as DurableTask.AzureStorage does and
//! performs its storage writes (partition claims, messages, dequeues).
//!
//! For tests, benchmarks and the demo's worker stand-in only; the product roles never write a
//! task hub's resources and never use this module. It goes through the same
//! [`StorageAccount`] pipelines (Shared Key signing, timeouts, retries) as the reader.
//!
//! Layouts ([`Layout`]; upstream files in Azure/durabletask src/DurableTask.AzureStorage):
//! - all: queues `{hub}-control-NN` and `{hub}-workitems`
//!   (AzureStorageOrchestrationService.cs, `GetTaskHubCreatorTask`);
//! - table: table `{hub}Partitions` with one row per partition, inserted as
//!   `new TablePartitionLease { RowKey = control queue }` (PartitionKey "", no owner) and
//!   claimed, renewed and released as Partitioning/TablePartitionManager.cs does
//!   (`ClaimLease`: owner, OwnedSince, LastRenewal, ExpiresAt = now + 1 min; `RenewLease`;
//!   `ReleaseLease` clears CurrentOwner);
//! - safe: container `{hub}-leases` with `taskhub.json` (Partitioning/TaskHubInfo.cs) and, per
//!   partition, `intent/{queue}` and `ownership/{queue}` lease blobs
//!   (Partitioning/SafePartitionManager.cs); a worker leases its intent blob and then the
//!   ownership blob, and it is the ownership blob's lease that says who processes the
//!   partition;
//! - legacy: the same container with `taskhub.json` and one `default/{queue}` lease blob per
//!   partition (Partitioning/LegacyPartitionManager.cs).
//!
//! Lease blobs carry a `BlobPartitionLease` body (Partitioning/BlobPartitionLease.cs and
//! Lease.cs: `PartitionId`, `Owner`, `Token` = the lease id, `Epoch`), written the way
//! Partitioning/BlobPartitionLeaseManager.cs does: created with no owner; `AcquireAsync`
//! changes the lease when the blob is leased (taking it over with the token of the body) or
//! acquires it, then uploads the body with the new Owner and Epoch + 1 under the lease;
//! `ReleaseAsync` uploads the body without Owner and Token, then releases.

pub mod dispatch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use azure_core::http::{Etag, Method, RequestContent, StatusCode};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientAcquireLeaseResultHeaders, BlobClientBreakLeaseOptions,
    BlobClientUploadOptions,
};
use azure_storage_queue::models::{
    QueueClientReceiveMessagesOptions, QueueClientSendMessageOptions, QueueMessage,
};
use time::OffsetDateTime;

use crate::storage::{
    Layout, QueueRef, StorageAccount, StorageError, StorageOptions, TaskHub, lease_blob_name,
    table::TableService,
};

/// Writes a task hub's resources the way a DurableTask worker does.
#[derive(Debug, Clone)]
pub struct TaskHubEmulator {
    hub: TaskHub,
    layout: Layout,
    account: StorageAccount,
    options: StorageOptions,
    table: TableService,
}

/// A partition held by a worker: what it needs to renew or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The partition index.
    pub partition: u32,
    /// The worker id (pod name) holding it.
    pub worker: String,
    /// Blob layouts: the lease id of each lease blob held (safe: intent, then ownership;
    /// legacy: default), by blob path. Empty for the table.
    pub leases: Vec<(String, String)>,
}

/// A message taken off a queue, invisible to others until its visibility timeout ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DequeuedMessage {
    /// The queue it came from.
    pub queue: QueueRef,
    /// The service's message id.
    pub id: String,
    /// Needed to delete it.
    pub pop_receipt: String,
    /// Its text.
    pub text: String,
    /// When it was first enqueued.
    pub inserted_at: Option<OffsetDateTime>,
    /// How often it was dequeued, this time included (the service's `DequeueCount`).
    pub dequeue_count: u64,
}

/// Upstream's abandon back-off for a message dequeued `dequeue_count` times: 2^n seconds up
/// to 600 (`Messaging/TaskHubQueue.cs` `AbandonMessageAsync`).
pub fn abandon_backoff(dequeue_count: u64) -> Duration {
    const MAX_SECONDS: u64 = 600;
    let seconds = if dequeue_count <= 30 { (1u64 << dequeue_count).min(MAX_SECONDS) } else { MAX_SECONDS };
    Duration::from_secs(seconds)
}

/// Blob leases last 15 to 60 s (or forever); a claim's duration is clamped to that.
const BLOB_LEASE_SECONDS: std::ops::RangeInclusive<u64> = 15..=60;

/// Makes lease ids unique within the process (upstream uses `Guid.NewGuid()`).
static LEASE_IDS: AtomicU64 = AtomicU64::new(0);

fn new_lease_id() -> String {
    let n = LEASE_IDS.fetch_add(1, Ordering::Relaxed);
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    format!("{:08x}-{:04x}-4{:03x}-8000-{:012x}", nanos as u32, (nanos >> 32) as u16, n & 0xfff, n)
}

impl TaskHubEmulator {
    /// An emulator of `hub` in `account`, laying ownership out as `layout`'s partition
    /// manager does.
    pub fn new(account: &StorageAccount, hub: TaskHub, layout: Layout) -> Self {
        // A worker's storage calls wait as DTFx's do: DurableTask.AzureStorage keeps
        // Azure.Core's default per-attempt NetworkTimeout of 100 s for queue calls (only
        // `Http/LeaseTimeoutHttpPipelinePolicy.cs` shortens lease renewals). A call given up
        // sooner on a slow storage can be one storage applied: a renewal's new pop receipt is
        // then lost, and with it the message's lock.
        let options = StorageOptions {
            attempt_timeout: std::time::Duration::from_secs(100),
            // Azure.Core's default MaxRetries.
            max_retries: 3,
        };
        Self { table: TableService::new(account, &options), hub, layout, account: account.clone(), options }
    }

    /// The hub this emulator writes.
    pub fn hub(&self) -> &TaskHub {
        &self.hub
    }

    /// Creates the hub with `partitions` control queues, the work-item queue, and the
    /// ownership records (table rows, or `taskhub.json` and lease blobs), all unowned.
    /// Existing resources are kept.
    pub async fn create(&self, partitions: u32) -> Result<(), StorageError> {
        self.create_queues(partitions).await?;
        match self.layout {
            Layout::Table => {
                self.create_table().await?;
                for partition in 0..partitions {
                    self.insert_partition_row(partition).await?;
                }
            }
            Layout::Safe | Layout::Legacy => {
                let container = self.hub.lease_container();
                let client = self.account.container_client(&container, &self.options)?;
                // 409 ContainerAlreadyExists: keep it.
                if let Err(e) = client.create(None).await
                    && e.http_status() != Some(StatusCode::Conflict)
                {
                    return Err(StorageError::from_azure(&container, &e));
                }
                let info = serde_json::json!({
                    "TaskHubName": self.hub.name(),
                    "CreatedAt": rfc3339(OffsetDateTime::now_utc()),
                    "PartitionCount": partitions,
                });
                self.create_blob(&format!("{container}/taskhub.json"), info).await?;
                for partition in 0..partitions {
                    for path in self.lease_paths(partition) {
                        self.create_blob(&path, lease_body(self.hub(), partition, None, None, 0)).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates only the queues: `partitions` control queues and the work-item queue, as a
    /// hub whose ownership records are nowhere DurableTask keeps them would look.
    pub async fn create_queues(&self, partitions: u32) -> Result<(), StorageError> {
        for partition in 0..partitions {
            self.create_queue(&self.hub.control_queue(partition)).await?;
        }
        self.create_queue(&self.hub.work_item_queue()).await
    }

    /// `worker` takes `partition` for `lease`, taking it over from any current holder:
    /// the row's CurrentOwner and ExpiresAt = now + lease (table), or each lease blob of the
    /// partition acquired (or changed, when leased) for `lease` clamped to 15..60 s with
    /// Owner written (safe: intent then ownership; legacy: default).
    pub async fn claim(&self, partition: u32, worker: &str, lease: Duration) -> Result<Claim, StorageError> {
        if self.layout == Layout::Table {
            let expires = OffsetDateTime::now_utc() + lease;
            self.write_partition_row(partition, Some(worker), Some(expires), false).await?;
            return Ok(Claim { partition, worker: worker.to_string(), leases: Vec::new() });
        }
        let seconds = lease.as_secs().clamp(*BLOB_LEASE_SECONDS.start(), *BLOB_LEASE_SECONDS.end());
        let mut leases = Vec::new();
        for path in self.lease_paths(partition) {
            let lease_id = self.acquire_blob(&path, partition, worker, seconds as i32).await?;
            leases.push((path, lease_id));
        }
        Ok(Claim { partition, worker: worker.to_string(), leases })
    }

    /// Extends a claim by `lease` from now (table) or renews its blob leases.
    pub(crate) async fn renew(&self, claim: &Claim, lease: Duration) -> Result<(), StorageError> {
        if self.layout == Layout::Table {
            let expires = OffsetDateTime::now_utc() + lease;
            return self
                .write_partition_row(claim.partition, Some(&claim.worker), Some(expires), false)
                .await;
        }
        for (path, lease_id) in claim.leases.clone() {
            let client = self.account.blob_client(&path, &self.options)?;
            client.renew_lease(lease_id, None).await.map_err(|e| StorageError::from_azure(&path, &e))?;
        }
        Ok(())
    }

    /// Gives a claim up as DurableTask does on shutdown: clears the row's owner (table), or
    /// clears Owner and Token and releases each lease blob, ownership first (blob layouts).
    pub async fn release(&self, claim: Claim) -> Result<(), StorageError> {
        if self.layout == Layout::Table {
            return self.write_partition_row(claim.partition, None, None, false).await;
        }
        for (path, lease_id) in claim.leases.into_iter().rev() {
            let epoch = self.read_epoch(&path).await?;
            let body = lease_body(self.hub(), claim.partition, None, None, epoch);
            self.upload(&path, body, Some(lease_id.clone())).await?;
            let client = self.account.blob_client(&path, &self.options)?;
            client.release_lease(lease_id, None).await.map_err(|e| StorageError::from_azure(&path, &e))?;
        }
        Ok(())
    }

    /// Breaks the lease on `partition`'s ownership blob (safe: `ownership/`, legacy:
    /// `default/`) with `break_period` (whole seconds, up to 60): the blob stays `breaking`
    /// for that long, then `broken`. The body still names the last owner. Table layout: an
    /// error, it has no blob leases.
    pub async fn break_lease(&self, partition: u32, break_period: Duration) -> Result<(), StorageError> {
        let Some(path) = self.lease_paths(partition).pop() else {
            return Err(StorageError::Unexpected {
                resource: self.hub.partitions_table(),
                message: "the table layout has no blob leases to break".into(),
            });
        };
        let client = self.account.blob_client(&path, &self.options)?;
        let options = BlobClientBreakLeaseOptions {
            break_period: Some(break_period.as_secs().min(60) as i32),
            ..Default::default()
        };
        client.break_lease(Some(options)).await.map_err(|e| StorageError::from_azure(&path, &e))?;
        Ok(())
    }

    /// Writes a Partitions-table row as DurableTask's table partition manager does (table
    /// layout): `owner` until `expires_at`, draining or not. Lets tests write expired leases.
    pub async fn write_partition_row(
        &self,
        partition: u32,
        owner: Option<&str>,
        expires_at: Option<OffsetDateTime>,
        draining: bool,
    ) -> Result<(), StorageError> {
        let table = self.hub.partitions_table();
        let row_key = self.hub.control_queue(partition);
        let now = rfc3339(OffsetDateTime::now_utc());
        let mut row = serde_json::json!({
            "PartitionKey": "",
            "RowKey": row_key,
            "CurrentOwner": owner,
            "NextOwner": null,
            "IsDraining": draining,
        });
        if let (Some(fields), Some(expires_at)) = (row.as_object_mut(), expires_at) {
            for (name, value) in
                [("OwnedSince", now.clone()), ("LastRenewal", now), ("ExpiresAt", rfc3339(expires_at))]
            {
                fields.insert(name.into(), value.into());
                fields.insert(format!("{name}@odata.type"), "Edm.DateTime".into());
            }
        }
        let url = self.table.url(&format!("{table}(PartitionKey='',RowKey='{row_key}')"))?;
        self.table.send(Method::Put, url, Some(row), &[204], &table).await.map(drop)
    }

    /// Enqueues `text` on `queue`, invisible for `visible_after` first (a durable timer or a
    /// scheduled start when non-zero; whole seconds).
    pub async fn enqueue(
        &self,
        queue: QueueRef,
        text: &str,
        visible_after: Duration,
    ) -> Result<(), StorageError> {
        let name = self.hub.queue_name(queue);
        let client = self.account.queue_client(&name, &self.options)?;
        let message = QueueMessage { message_text: Some(text.to_string()) };
        let content = RequestContent::try_from(message).map_err(|e| StorageError::from_azure(&name, &e))?;
        let options = QueueClientSendMessageOptions {
            visibility_timeout: (!visible_after.is_zero()).then_some(visible_after.as_secs() as i32),
            ..Default::default()
        };
        client.send_message(content, Some(options)).await.map_err(|e| StorageError::from_azure(&name, &e))?;
        Ok(())
    }

    /// Takes up to `max` (1..=32) visible messages off `queue`, hiding them for
    /// `visibility_timeout` (whole seconds, at least 1) as a worker processing them does.
    pub async fn dequeue(
        &self,
        queue: QueueRef,
        max: u32,
        visibility_timeout: Duration,
    ) -> Result<Vec<DequeuedMessage>, StorageError> {
        let name = self.hub.queue_name(queue);
        let client = self.account.queue_client(&name, &self.options)?;
        let options = QueueClientReceiveMessagesOptions {
            number_of_messages: Some(max.clamp(1, 32) as i32),
            visibility_timeout: Some(visibility_timeout.as_secs().max(1) as i32),
            ..Default::default()
        };
        let received = client
            .receive_messages(Some(options))
            .await
            .map_err(|e| StorageError::from_azure(&name, &e))?
            .into_model()
            .map_err(|e| StorageError::from_azure(&name, &e))?;
        Ok(received
            .items
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                Some(DequeuedMessage {
                    queue,
                    id: m.message_id?,
                    pop_receipt: m.pop_receipt?,
                    text: m.message_text.unwrap_or_default(),
                    inserted_at: m.insertion_time,
                    dequeue_count: m.dequeue_count.and_then(|n| u64::try_from(n).ok()).unwrap_or(1),
                })
            })
            .collect())
    }

    /// Hides a dequeued message for `visibility` from now (whole seconds; 0 makes it visible
    /// at once), keeping it: UpdateMessage, as `Messaging/TaskHubQueue.cs` `RenewMessageAsync`
    /// renews a running activity or an active session, and `AbandonMessageAsync` backs a
    /// failed one off. The pop receipt changes; the message carries the new one.
    pub async fn update_visibility(
        &self,
        message: &mut DequeuedMessage,
        visibility: Duration,
    ) -> Result<(), StorageError> {
        let name = self.hub.queue_name(message.queue);
        let client = self.account.queue_client(&name, &self.options)?;
        let seconds = i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX);
        let response = client
            .update_message(&message.id, &message.pop_receipt, seconds, None)
            .await
            .map_err(|e| StorageError::from_azure(&name, &e))?;
        let receipt = response
            .headers()
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("x-ms-popreceipt"))
            .map(str::to_string);
        if let Some(receipt) = receipt {
            message.pop_receipt = receipt;
        }
        Ok(())
    }

    /// Gives a failed message back with upstream's back-off (`Messaging/TaskHubQueue.cs`
    /// `AbandonMessageAsync`: visible again after min(2^DequeueCount, 600) s, for ever: a
    /// poison message is logged, never dropped). Returns the back-off.
    pub async fn abandon(&self, message: &mut DequeuedMessage) -> Result<Duration, StorageError> {
        let backoff = abandon_backoff(message.dequeue_count);
        self.update_visibility(message, backoff).await?;
        Ok(backoff)
    }

    /// Deletes a dequeued message: the work is done.
    pub async fn delete(&self, message: &DequeuedMessage) -> Result<(), StorageError> {
        let name = self.hub.queue_name(message.queue);
        let client = self.account.queue_client(&name, &self.options)?;
        client
            .delete_message(&message.id, &message.pop_receipt, None)
            .await
            .map_err(|e| StorageError::from_azure(&name, &e))?;
        Ok(())
    }

    /// Deletes every message of `queue`, invisible ones included (Clear Messages): what an
    /// operator clearing a poisoned queue does, and, to a worker holding one of them, the same
    /// as another worker having finished it: its next renewal or delete finds it gone (404).
    pub async fn clear(&self, queue: QueueRef) -> Result<(), StorageError> {
        let name = self.hub.queue_name(queue);
        let client = self.account.queue_client(&name, &self.options)?;
        client.clear(None).await.map_err(|e| StorageError::from_azure(&name, &e))?;
        Ok(())
    }

    async fn create_queue(&self, name: &str) -> Result<(), StorageError> {
        let client = self.account.queue_client(name, &self.options)?;
        client.create(None).await.map_err(|e| StorageError::from_azure(name, &e))?;
        Ok(())
    }

    async fn create_table(&self) -> Result<(), StorageError> {
        let table = self.hub.partitions_table();
        let url = self.table.url("Tables")?;
        let body = serde_json::json!({ "TableName": table });
        // 409 TableAlreadyExists: keep it.
        self.table.send(Method::Post, url, Some(body), &[201, 204, 409], &table).await.map(drop)
    }

    /// `TablePartitionManager.CreateLease`: inserts the unowned row, keeping an existing one.
    async fn insert_partition_row(&self, partition: u32) -> Result<(), StorageError> {
        let table = self.hub.partitions_table();
        let url = self.table.url(&table)?;
        let row = serde_json::json!({
            "PartitionKey": "",
            "RowKey": self.hub.control_queue(partition),
            "IsDraining": false,
        });
        // 409 EntityAlreadyExists: keep it.
        self.table.send(Method::Post, url, Some(row), &[201, 204, 409], &table).await.map(drop)
    }

    /// The lease blobs of `partition`, as `container/name` paths: safe, intent then
    /// ownership; legacy, default; none for the table.
    fn lease_paths(&self, partition: u32) -> Vec<String> {
        let directories: &[&str] = match self.layout {
            Layout::Table => &[],
            Layout::Safe => &["intent", "ownership"],
            Layout::Legacy => &["default"],
        };
        let container = self.hub.lease_container();
        directories
            .iter()
            .map(|d| format!("{container}/{}", lease_blob_name(&self.hub, d, partition)))
            .collect()
    }

    /// `BlobPartitionLeaseManager.AcquireAsync`: change the lease when the blob is leased
    /// (with the Token of its body), else acquire it; then the body with Owner and Epoch + 1.
    async fn acquire_blob(
        &self,
        path: &str,
        partition: u32,
        worker: &str,
        seconds: i32,
    ) -> Result<String, StorageError> {
        let client = self.account.blob_client(path, &self.options)?;
        let (state, body) = self.download(path).await?;
        let current: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let epoch = current.get("Epoch").and_then(|e| e.as_u64()).unwrap_or(0);
        let token = current.get("Token").and_then(|t| t.as_str()).map(str::to_string);
        let proposed = new_lease_id();
        let lease_id = match (state.as_str(), token) {
            ("leased", Some(token)) => {
                client
                    .change_lease(token, proposed.clone(), None)
                    .await
                    .map_err(|e| StorageError::from_azure(path, &e))?;
                proposed
            }
            _ => {
                let options =
                    BlobClientAcquireLeaseOptions { proposed_lease_id: Some(proposed), ..Default::default() };
                let response = client
                    .acquire_lease(seconds, Some(options))
                    .await
                    .map_err(|e| StorageError::from_azure(path, &e))?;
                response.lease_id().ok().flatten().ok_or_else(|| StorageError::Unexpected {
                    resource: path.to_string(),
                    message: "no lease id returned".into(),
                })?
            }
        };
        let body = lease_body(self.hub(), partition, Some(worker), Some(&lease_id), epoch + 1);
        self.upload(path, body, Some(lease_id.clone())).await?;
        Ok(lease_id)
    }

    async fn read_epoch(&self, path: &str) -> Result<u64, StorageError> {
        let (_, body) = self.download(path).await?;
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        Ok(value.get("Epoch").and_then(|e| e.as_u64()).unwrap_or(0))
    }

    /// A blob's lease state (lowercased) and content.
    async fn download(&self, path: &str) -> Result<(String, Vec<u8>), StorageError> {
        let client = self.account.blob_client(path, &self.options)?;
        let result = client.download(None).await.map_err(|e| StorageError::from_azure(path, &e))?;
        let state = result
            .headers
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("x-ms-lease-state"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = result.body.collect().await.map_err(|e| StorageError::from_azure(path, &e))?;
        Ok((state, body.to_vec()))
    }

    /// Uploads `json` unless the blob exists (`UploadTextAsync(ifDoesntExist: true)`).
    async fn create_blob(&self, path: &str, json: serde_json::Value) -> Result<(), StorageError> {
        let client = self.account.blob_client(path, &self.options)?;
        let options = BlobClientUploadOptions { if_none_match: Some(Etag::from("*")), ..Default::default() };
        let content = RequestContent::from(json.to_string().into_bytes());
        match client.upload(content, Some(options)).await {
            Ok(_) => Ok(()),
            // 409 BlobAlreadyExists (412 from some versions): keep it.
            Err(e)
                if matches!(e.http_status(), Some(StatusCode::Conflict | StatusCode::PreconditionFailed)) =>
            {
                Ok(())
            }
            Err(e) => Err(StorageError::from_azure(path, &e)),
        }
    }

    async fn upload(
        &self,
        path: &str,
        json: serde_json::Value,
        lease_id: Option<String>,
    ) -> Result<(), StorageError> {
        let client = self.account.blob_client(path, &self.options)?;
        let options = BlobClientUploadOptions { lease_id, ..Default::default() };
        let content = RequestContent::from(json.to_string().into_bytes());
        client.upload(content, Some(options)).await.map_err(|e| StorageError::from_azure(path, &e))?;
        Ok(())
    }
}

/// A lease blob's JSON body as DurableTask's `BlobPartitionLease` serializes it.
fn lease_body(
    hub: &TaskHub,
    partition: u32,
    owner: Option<&str>,
    token: Option<&str>,
    epoch: u64,
) -> serde_json::Value {
    serde_json::json!({
        "PartitionId": hub.control_queue(partition),
        "Owner": owner,
        "Token": token,
        "Epoch": epoch,
    })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
