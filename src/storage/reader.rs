//! [`TaskHubReader`]: the read-only view of one task hub that the sidecar (its own
//! partitions) and the aggregator's probe (the uncovered ones) share.

use azure_core::http::headers::HeaderName;
use azure_storage_queue::models::{QueueClientGetPropertiesResultHeaders, QueueClientPeekMessagesOptions};
use futures::{StreamExt, TryStreamExt};

use super::{
    PartitionLease, PartitionMode, QueueRef, QueueSignals, StorageAccount, StorageError, StorageOptions,
    TaskHub, table::TableService,
};

/// How many messages one peek asks for (the service's maximum).
pub const PEEK_LIMIT: u32 = 32;

/// How many lease blobs are read at once in blob mode: enough to keep a poll short, few
/// enough to keep the connection pool (and memory) small.
const BLOB_READ_CONCURRENCY: usize = 4;

/// Reads one task hub's queues and partition ownership. Never writes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskHubReader {
    hub: TaskHub,
    mode: PartitionMode,
    account: StorageAccount,
    options: StorageOptions,
    table: TableService,
}

impl TaskHubReader {
    /// A reader for `hub` in `account`, finding owners the `mode` way.
    pub fn new(account: &StorageAccount, hub: TaskHub, mode: PartitionMode, options: StorageOptions) -> Self {
        Self { table: TableService::new(account, &options), hub, mode, account: account.clone(), options }
    }

    /// The hub this reader reads.
    pub fn hub(&self) -> &TaskHub {
        &self.hub
    }

    /// How partition ownership is read.
    pub fn mode(&self) -> PartitionMode {
        self.mode
    }

    /// The account read through (its [`StorageAccount::request_count`] counts this reader's
    /// calls too).
    pub fn account(&self) -> &StorageAccount {
        &self.account
    }

    /// Every partition of the hub (P = the number returned), ordered by index, and who holds
    /// each at `now_unix_ms`. Table mode: one table query. Blob mode: `taskhub.json` and one
    /// read per lease blob.
    pub async fn partitions(&self, now_unix_ms: i64) -> Result<Vec<PartitionLease>, StorageError> {
        match self.mode {
            PartitionMode::Table => self.table_partitions(now_unix_ms).await,
            PartitionMode::Blob => self.blob_partitions().await,
        }
    }

    /// One queue's signals at `now_unix_ms`: Get Queue Metadata and a peek of up to 32, sent
    /// together (two calls).
    pub async fn read_queue(&self, queue: QueueRef, now_unix_ms: i64) -> Result<QueueSignals, StorageError> {
        let name = self.hub.queue_name(queue);
        let client = self.account.queue_client(&name, &self.options)?;
        let peek_options = QueueClientPeekMessagesOptions {
            number_of_messages: Some(PEEK_LIMIT as i32),
            ..Default::default()
        };
        let (metadata, peeked) =
            tokio::join!(client.get_properties(None), client.peek_messages(Some(peek_options)));
        let metadata = metadata.map_err(|e| StorageError::from_azure(&name, &e))?;
        let approximate_count = metadata
            .approximate_messages_count()
            .map_err(|e| unexpected(&name, format!("bad x-ms-approximate-messages-count: {e}")))?
            .unwrap_or(0)
            .max(0) as u64;
        let peeked = peeked
            .map_err(|e| StorageError::from_azure(&name, &e))?
            .into_model()
            .map_err(|e| unexpected(&name, format!("unreadable peek result: {e}")))?;
        let messages = peeked.items.unwrap_or_default();
        let first_visible_age_ms = messages
            .first()
            .and_then(|m| m.insertion_time)
            .map(|inserted| (now_unix_ms - unix_ms(inserted)).max(0) as u64)
            .unwrap_or(0);
        Ok(QueueSignals {
            approximate_count,
            visible_count: messages.len().min(PEEK_LIMIT as usize) as u32,
            first_visible_age_ms,
            sampled_at_unix_ms: now_unix_ms,
        })
    }

    /// Table mode: one row per partition, RowKey = control queue name; owned while
    /// `ExpiresAt` is in the future.
    async fn table_partitions(&self, now_unix_ms: i64) -> Result<Vec<PartitionLease>, StorageError> {
        let table = self.hub.partitions_table();
        let rows = self.table.query_all(&table).await?;
        let mut leases: Vec<PartitionLease> = rows
            .iter()
            .filter_map(|row| {
                let partition = self.hub.partition_of(row.get("RowKey")?.as_str()?)?;
                let expires_at_unix_ms =
                    row.get("ExpiresAt").and_then(|v| v.as_str()).and_then(parse_rfc3339_ms);
                let unexpired = expires_at_unix_ms.is_some_and(|t| t > now_unix_ms);
                let owner = row
                    .get("CurrentOwner")
                    .and_then(|v| v.as_str())
                    .filter(|o| !o.is_empty() && unexpired)
                    .map(str::to_string);
                let draining = row.get("IsDraining").and_then(|v| v.as_bool()).unwrap_or(false);
                Some(PartitionLease { partition, owner, expires_at_unix_ms, draining })
            })
            .collect();
        if leases.is_empty() {
            return Err(StorageError::NotProvisioned { resource: format!("{table} (no partition rows)") });
        }
        leases.sort_by_key(|l| l.partition);
        Ok(leases)
    }

    /// Blob mode: P from `taskhub.json`, then each lease blob: the owner named in its JSON
    /// body holds the partition while the blob is leased (`x-ms-lease-state: leased`, or
    /// `breaking`: still held, but on its way out, reported as draining).
    async fn blob_partitions(&self) -> Result<Vec<PartitionLease>, StorageError> {
        let container = self.hub.lease_container();
        let info_path = format!("{container}/taskhub.json");
        let (_, info) = self.read_blob(&info_path).await?;
        #[derive(serde::Deserialize)]
        struct TaskHubInfo {
            #[serde(rename = "PartitionCount")]
            partition_count: u32,
        }
        let info: TaskHubInfo = serde_json::from_slice(&info)
            .map_err(|e| unexpected(&info_path, format!("unreadable taskhub.json: {e}")))?;
        if !(1..=super::MAX_PARTITIONS).contains(&info.partition_count) {
            return Err(unexpected(
                &info_path,
                format!("PartitionCount {} is outside 1..=16", info.partition_count),
            ));
        }
        let container = &container;
        futures::stream::iter(0..info.partition_count)
            .map(|partition| async move {
                let path = format!("{container}/{}", self.hub.lease_blob(partition));
                let (owner, draining) = match self.read_blob(&path).await {
                    Ok((state, body)) => match state.as_str() {
                        "leased" => (lease_owner(&body), false),
                        "breaking" => (lease_owner(&body), true),
                        _ => (None, false),
                    },
                    // A lease blob not created yet is a partition nobody holds.
                    Err(StorageError::NotProvisioned { .. }) => (None, false),
                    Err(e) => return Err(e),
                };
                Ok(PartitionLease { partition, owner, expires_at_unix_ms: None, draining })
            })
            .buffered(BLOB_READ_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Downloads a small blob: its lease state (`x-ms-lease-state`, lowercased; empty when
    /// absent) and its content.
    async fn read_blob(&self, path: &str) -> Result<(String, Vec<u8>), StorageError> {
        let client = self.account.blob_client(path, &self.options)?;
        let result = client.download(None).await.map_err(|e| StorageError::from_azure(path, &e))?;
        let state = result
            .headers
            .get_optional_str(&HeaderName::from_static("x-ms-lease-state"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = result.body.collect().await.map_err(|e| StorageError::from_azure(path, &e))?;
        Ok((state, body.to_vec()))
    }
}

/// The `Owner` of a lease blob's JSON body, when non-empty.
fn lease_owner(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("Owner")?.as_str().filter(|o| !o.is_empty()).map(str::to_string)
}

fn unexpected(resource: &str, message: String) -> StorageError {
    StorageError::Unexpected { resource: resource.to_string(), message }
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// An RFC 3339 timestamp as the Table service writes DateTime values, in Unix ms.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_datetimes_parse_with_seven_fraction_digits() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5000000Z"), Some(1500));
        assert_eq!(parse_rfc3339_ms("not a date"), None);
    }

    #[test]
    fn lease_owner_comes_from_the_json_body() {
        assert_eq!(
            lease_owner(br#"{"PartitionId":"x","Owner":"pod-a","Token":"t","Epoch":2}"#),
            Some("pod-a".into())
        );
        assert_eq!(lease_owner(br#"{"Owner":""}"#), None);
        assert_eq!(lease_owner(b"garbage"), None);
    }
}
