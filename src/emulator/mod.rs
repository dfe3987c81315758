//! Plays the Durable Task side: lays out a task hub as DurableTask.AzureStorage does and
//! performs its storage writes (partition claims, messages, dequeues).
//!
//! For tests, benchmarks and the demo's worker stand-in only; the product roles never write a
//! task hub's resources and never use this module. It goes through the same
//! [`StorageAccount`] pipelines (Shared Key signing, timeouts, retries) as the reader.
//!
//! Layouts (durabletask-facts.md):
//! - table mode: queues `{hub}-control-NN` and `{hub}-workitems`, table `{hub}Partitions`
//!   with one row per partition (PartitionKey "", RowKey = control queue name);
//! - blob mode (legacy): the same queues, container `{hub}-leases` with `taskhub.json` and
//!   one lease blob `default/{control queue}` per partition whose JSON body names the owner.

use std::time::Duration;

use azure_core::http::{Method, RequestContent, StatusCode};
use azure_storage_blob::models::{BlobClientAcquireLeaseResultHeaders, BlobClientUploadOptions};
use azure_storage_queue::models::{
    QueueClientReceiveMessagesOptions, QueueClientSendMessageOptions, QueueMessage,
};
use time::OffsetDateTime;

use crate::storage::{
    PartitionMode, QueueRef, StorageAccount, StorageError, StorageOptions, TaskHub, table::TableService,
};

/// Writes a task hub's resources the way a DurableTask worker does.
#[derive(Debug, Clone)]
pub struct TaskHubEmulator {
    hub: TaskHub,
    mode: PartitionMode,
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
    /// The blob lease id (blob mode only).
    pub lease_id: Option<String>,
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
}

/// Blob leases last 15 to 60 s (or forever); a claim's duration is clamped to that.
const BLOB_LEASE_SECONDS: std::ops::RangeInclusive<u64> = 15..=60;

impl TaskHubEmulator {
    /// An emulator of `hub` in `account`, laying ownership out the `mode` way.
    pub fn new(account: &StorageAccount, hub: TaskHub, mode: PartitionMode) -> Self {
        let options = StorageOptions::default();
        Self { table: TableService::new(account, &options), hub, mode, account: account.clone(), options }
    }

    /// The hub this emulator writes.
    pub fn hub(&self) -> &TaskHub {
        &self.hub
    }

    /// Creates the hub with `partitions` control queues, the work-item queue, and the
    /// ownership records (table rows or `taskhub.json` and lease blobs), all unowned.
    /// Existing resources are kept.
    pub async fn create(&self, partitions: u32) -> Result<(), StorageError> {
        for partition in 0..partitions {
            self.create_queue(&self.hub.control_queue(partition)).await?;
        }
        self.create_queue(&self.hub.work_item_queue()).await?;
        match self.mode {
            PartitionMode::Table => {
                self.create_table().await?;
                for partition in 0..partitions {
                    self.write_partition_row(partition, None, None, false).await?;
                }
            }
            PartitionMode::Blob => {
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
                self.upload(&format!("{container}/taskhub.json"), info, None).await?;
                for partition in 0..partitions {
                    self.upload(&self.lease_path(partition), lease_body(partition, self.hub(), None), None)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// `worker` takes `partition` for `lease`: the row's CurrentOwner and ExpiresAt = now +
    /// lease (table), or a blob lease of `lease` clamped to 15..60 s with Owner written
    /// (blob). Fails when another holder's blob lease is active.
    pub async fn claim(&self, partition: u32, worker: &str, lease: Duration) -> Result<Claim, StorageError> {
        match self.mode {
            PartitionMode::Table => {
                let expires = OffsetDateTime::now_utc() + lease;
                self.write_partition_row(partition, Some(worker), Some(expires), false).await?;
                Ok(Claim { partition, worker: worker.to_string(), lease_id: None })
            }
            PartitionMode::Blob => {
                let path = self.lease_path(partition);
                let client = self.account.blob_client(&path, &self.options)?;
                let seconds = lease.as_secs().clamp(*BLOB_LEASE_SECONDS.start(), *BLOB_LEASE_SECONDS.end());
                let response = client
                    .acquire_lease(seconds as i32, None)
                    .await
                    .map_err(|e| StorageError::from_azure(&path, &e))?;
                let lease_id =
                    response.lease_id().ok().flatten().ok_or_else(|| StorageError::Unexpected {
                        resource: path.clone(),
                        message: "no lease id returned".into(),
                    })?;
                self.upload(&path, lease_body(partition, self.hub(), Some(worker)), Some(lease_id.clone()))
                    .await?;
                Ok(Claim { partition, worker: worker.to_string(), lease_id: Some(lease_id) })
            }
        }
    }

    /// Extends a claim by `lease` from now (table) or renews the blob lease.
    pub async fn renew(&self, claim: &Claim, lease: Duration) -> Result<(), StorageError> {
        match &claim.lease_id {
            None => {
                let expires = OffsetDateTime::now_utc() + lease;
                self.write_partition_row(claim.partition, Some(&claim.worker), Some(expires), false).await
            }
            Some(lease_id) => {
                let path = self.lease_path(claim.partition);
                let client = self.account.blob_client(&path, &self.options)?;
                client
                    .renew_lease(lease_id.clone(), None)
                    .await
                    .map_err(|e| StorageError::from_azure(&path, &e))?;
                Ok(())
            }
        }
    }

    /// Gives a claim up: clears the row's owner (table), or clears Owner and releases the
    /// blob lease (blob), as DurableTask does on shutdown.
    pub async fn release(&self, claim: Claim) -> Result<(), StorageError> {
        match claim.lease_id {
            None => self.write_partition_row(claim.partition, None, None, false).await,
            Some(lease_id) => {
                let path = self.lease_path(claim.partition);
                self.upload(&path, lease_body(claim.partition, self.hub(), None), Some(lease_id.clone()))
                    .await?;
                let client = self.account.blob_client(&path, &self.options)?;
                client
                    .release_lease(lease_id, None)
                    .await
                    .map_err(|e| StorageError::from_azure(&path, &e))?;
                Ok(())
            }
        }
    }

    /// Writes a Partitions-table row as DurableTask's table partition manager does (table
    /// mode): `owner` until `expires_at`, draining or not. Lets tests write expired leases.
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
                })
            })
            .collect())
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

    fn lease_path(&self, partition: u32) -> String {
        format!("{}/{}", self.hub.lease_container(), self.hub.lease_blob(partition))
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

/// A lease blob's JSON body as DurableTask's BlobPartitionLease writes it.
fn lease_body(partition: u32, hub: &TaskHub, owner: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "PartitionId": hub.control_queue(partition),
        "Owner": owner,
        "Token": null,
        "Epoch": 0,
    })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
