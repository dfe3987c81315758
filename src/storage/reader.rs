//! [`TaskHubReader`]: the read-only view of one task hub that the sidecar (its own
//! partitions) and the aggregator's probe (the uncovered ones) share, and the detection of
//! where the hub keeps partition ownership ([`Layout`]).
//!
//! Detection follows upstream's `AzureStorageOrchestrationService.GetControlQueuesAsync`
//! (Azure/durabletask src/DurableTask.AzureStorage/AzureStorageOrchestrationService.cs): the
//! `{hub}Partitions` table if it exists, else `taskhub.json` and lease blobs. It is cached
//! per reader and re-checked every [`REDETECT_INTERVAL`] (blob layouts) or whenever the
//! cached layout's records are gone. Unlike upstream, which creates `taskhub.json` when it
//! finds none, the reader never writes: a hub with queues and no ownership records is the
//! [`StorageError::NoOwnershipStore`] error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use azure_core::http::headers::HeaderName;
use azure_storage_blob::models::{BlobContainerClientListBlobsOptions, LeaseState};
use azure_storage_queue::models::{
    QueueClientGetPropertiesResultHeaders, QueueClientPeekMessagesOptions,
    QueueServiceClientListQueuesOptions,
};
use futures::{StreamExt, TryStreamExt};

use super::http::{LISTING_MAX_PAGES, LISTING_PAGE_SIZE};
use super::layout::TASK_HUB_INFO_BLOB;
use super::{
    Layout, PartitionLease, PartitionMode, QueueRef, REDETECT_INTERVAL, StorageAccount, StorageError,
    StorageOptions, TaskHub, table::TableService,
};
use crate::clock::UnixMs;
use crate::reading::{HubReading, PEEK_LIMIT, QueueReading};

/// How many queues one read of a hub reads at once: a short read without a burst of
/// connections (each queue is two calls).
const QUEUE_READ_CONCURRENCY: usize = 4;

/// How many lease blobs are downloaded at once: enough to keep a poll short, few enough to
/// keep the connection pool (and memory) small.
const BLOB_READ_CONCURRENCY: usize = 4;

/// Reads one task hub's queues and partition ownership. Never writes. Cheap to clone;
/// clones share the detected layout and the lease bodies read so far.
#[derive(Debug, Clone)]
pub struct TaskHubReader {
    hub: TaskHub,
    mode: PartitionMode,
    account: StorageAccount,
    options: StorageOptions,
    table: TableService,
    cache: Arc<Mutex<Cache>>,
}

/// What the reader remembers between reads.
#[derive(Debug, Default)]
struct Cache {
    detected: Option<Detected>,
    /// Lease blob name -> (its ETag, the `Owner` of its body). A new owner rewrites the body
    /// (`BlobPartitionLeaseManager.AcquireAsync` uploads it under the new lease), which
    /// changes the ETag; lease state changes do not, and come from the listing each time.
    owners: HashMap<String, (String, Option<String>)>,
}

/// A detected layout and when it was found.
#[derive(Debug, Clone, Copy)]
struct Detected {
    layout: Layout,
    /// Blob layouts: `PartitionCount` of `taskhub.json` (the table counts its rows each read).
    partition_count: u32,
    at: UnixMs,
}

/// One lease blob as a listing shows it.
#[derive(Debug, Clone)]
struct ListedLease {
    partition: u32,
    name: String,
    etag: String,
    /// `x-ms-lease-state: leased`: upstream's `Blob.IsLeasedAsync` (Storage/Blob.cs) counts
    /// only this state as held; `breaking`, `broken`, `expired` and `available` are not.
    leased: bool,
}

/// Which queues one [`TaskHubReader::read`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueChoice {
    /// Control queues, by partition (read in this order).
    pub control: Vec<u32>,
    /// The work-item queue too.
    pub work_item: bool,
}

/// Where a hub keeps partition ownership and what it says: the first half of one read.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    /// P: the partitions found (0 when unknown).
    pub partition_count: u32,
    /// Who holds each partition (empty when ownership could not be read).
    pub leases: Vec<PartitionLease>,
    /// Where ownership was read from, once detected.
    pub layout: Option<Layout>,
    /// Why ownership could not be read, if it could not.
    pub error: Option<StorageError>,
    /// The queues may be read all the same (ownership read, or only its store missing).
    queues_readable: bool,
}

/// What one read of a hub found ([`TaskHubReader::ownership`], then [`TaskHubReader::read`]).
#[derive(Debug, Clone, Default)]
pub struct HubRead {
    /// P and the queues read.
    pub reading: HubReading,
    /// Who holds each partition (empty when ownership could not be read).
    pub leases: Vec<PartitionLease>,
    /// Where ownership was read from, once detected.
    pub layout: Option<Layout>,
    /// Every storage error met: the ownership read's first, then the queues'.
    pub errors: Vec<StorageError>,
}

impl TaskHubReader {
    /// A reader for `hub` in `account`; `mode` [`PartitionMode::Auto`] detects the layout,
    /// the others restrict it.
    pub fn new(account: &StorageAccount, hub: TaskHub, mode: PartitionMode, options: StorageOptions) -> Self {
        Self {
            table: TableService::new(account, &options),
            hub,
            mode,
            account: account.clone(),
            options,
            cache: Arc::default(),
        }
    }

    /// The layout the last read of [`TaskHubReader::partitions`] used; None before the first
    /// or after a read that found no ownership store.
    pub fn layout(&self) -> Option<Layout> {
        self.lock().detected.map(|d| d.layout)
    }

    /// The account read through (its [`StorageAccount::request_count`] counts this reader's
    /// calls too).
    pub fn account(&self) -> &StorageAccount {
        &self.account
    }

    /// Every partition of the hub (P = the number returned), ordered by index, and who holds
    /// each at `now`. Calls per read once the layout is known: table, one query;
    /// safe and legacy, one listing of the lease blobs plus a download of each leased blob
    /// whose body changed since the last read. Detection adds a table lookup, a
    /// `taskhub.json` read and up to two listings every [`REDETECT_INTERVAL`] for blob
    /// layouts.
    pub async fn partitions(&self, now: UnixMs) -> Result<Vec<PartitionLease>, StorageError> {
        let fresh =
            self.lock().detected.filter(|d| d.layout == Layout::Table || now.since(d.at) < REDETECT_INTERVAL);
        if let Some(detected) = fresh {
            let read = match detected.layout {
                Layout::Table => self.table_partitions(now).await.and_then(|rows| {
                    rows.ok_or_else(|| StorageError::NotProvisioned { resource: self.hub.partitions_table() })
                }),
                Layout::Safe | Layout::Legacy => {
                    self.blob_partitions(detected.layout, detected.partition_count).await
                }
            };
            match read {
                // The records of the layout found before are gone: detect again.
                Err(StorageError::NotProvisioned { .. }) => self.lock().detected = None,
                other => return other,
            }
        }
        let result = self.detect(now).await;
        if result.is_err() {
            self.lock().detected = None;
        }
        result
    }

    /// Finds the layout as upstream does and reads it.
    async fn detect(&self, now: UnixMs) -> Result<Vec<PartitionLease>, StorageError> {
        let mut looked_for = Vec::new();
        if self.mode.allows(Layout::Table) {
            match self.table_partitions(now).await? {
                Some(leases) => {
                    self.remember(Layout::Table, leases.len() as u32, now);
                    return Ok(leases);
                }
                None => looked_for.push(format!("table {}", self.hub.partitions_table())),
            }
        }
        if self.mode.allows(Layout::Safe) {
            let container = self.hub.lease_container();
            match self.task_hub_info().await? {
                Some(partition_count) => {
                    let (layout, leases) = self.detect_blob_layout(partition_count).await?;
                    self.remember(layout, partition_count, now);
                    return Ok(leases);
                }
                None => looked_for.push(format!(
                    "blob {container}/{TASK_HUB_INFO_BLOB} (with lease blobs under {container}/ownership/ \
                     or {container}/default/)"
                )),
            }
        }
        let (any_queue, partition_count) = self.queues_found().await?;
        let looked_for = looked_for.join(", ");
        if !any_queue {
            // The app never started: nothing exists, so there is no work.
            return Err(StorageError::NotProvisioned {
                resource: format!("{looked_for}, queue {}-*", self.hub.name().to_ascii_lowercase()),
            });
        }
        Err(StorageError::NoOwnershipStore {
            task_hub: self.hub.name().to_string(),
            looked_for,
            partition_count,
        })
    }

    /// Safe or legacy, from the lease blobs (`taskhub.json` exists): leased `ownership/`
    /// blobs mean the safe manager, else leased `default/` blobs the legacy one; with nothing
    /// leased (no pod running), whichever directory has blobs, the safe one first (upstream's
    /// default since 2020, and what a hub whose leases are not created yet will get).
    async fn detect_blob_layout(
        &self,
        partition_count: u32,
    ) -> Result<(Layout, Vec<PartitionLease>), StorageError> {
        let safe = self.list_leases(Layout::Safe).await?;
        if safe.iter().any(|l| l.leased) {
            return Ok((Layout::Safe, self.owners(partition_count, safe).await?));
        }
        let legacy = self.list_leases(Layout::Legacy).await?;
        if legacy.iter().any(|l| l.leased) || (safe.is_empty() && !legacy.is_empty()) {
            return Ok((Layout::Legacy, self.owners(partition_count, legacy).await?));
        }
        Ok((Layout::Safe, self.owners(partition_count, safe).await?))
    }

    fn remember(&self, layout: Layout, partition_count: u32, now: UnixMs) {
        self.lock().detected = Some(Detected { layout, partition_count, at: now });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The first half of one read of the hub at `now`, the one read path of the sidecar and
    /// the cold probe ([`TaskHubReader::read`] is the second): partition ownership, P and who
    /// holds what. A hub with queues and no ownership store keeps P from the control queues
    /// found by name, no leases, and the error: upstream's `GetControlQueuesAsync` would read
    /// control queues 0..P-1 too, and a hub with visible work must not look idle.
    pub async fn ownership(&self, now: UnixMs) -> Ownership {
        let mut ownership = Ownership::default();
        match self.partitions(now).await {
            Ok(leases) => {
                ownership.partition_count = leases.len() as u32;
                ownership.leases = leases;
            }
            Err(e @ StorageError::NoOwnershipStore { partition_count, .. }) => {
                ownership.partition_count = partition_count;
                ownership.error = Some(e);
                ownership.queues_readable = true;
            }
            Err(e) => ownership.error = Some(e),
        }
        if ownership.error.is_none() {
            ownership.queues_readable = true;
        }
        ownership.layout = self.layout();
        ownership
    }

    /// The second half of one read: the queues `choice` picks (given what `ownership` found),
    /// a few at a time. Nothing is read when ownership could not be read at all.
    pub async fn read(&self, ownership: Ownership, choice: QueueChoice, now: UnixMs) -> HubRead {
        let Ownership { partition_count, leases, layout, error, queues_readable } = ownership;
        let mut read = HubRead {
            reading: HubReading { partition_count, ..HubReading::default() },
            leases,
            layout,
            errors: error.into_iter().collect(),
        };
        if !queues_readable {
            return read;
        }
        // Collected first: a stream over a borrowing iterator would not be `Send` across the
        // awaits below.
        let queues: Vec<QueueRef> = choice
            .control
            .iter()
            .map(|&p| QueueRef::Control(p))
            .chain(choice.work_item.then_some(QueueRef::WorkItem))
            .collect();
        let reads: Vec<(QueueRef, Result<QueueReading, StorageError>)> = futures::stream::iter(queues)
            .map(|queue| async move { (queue, self.read_queue(queue, now).await) })
            .buffered(QUEUE_READ_CONCURRENCY)
            .collect()
            .await;
        for (queue, result) in reads {
            match (queue, result) {
                (QueueRef::Control(p), Ok(reading)) => read.reading.control.push((p, reading)),
                (QueueRef::WorkItem, Ok(reading)) => read.reading.work_item = Some(reading),
                (_, Err(e)) => read.errors.push(e),
            }
        }
        read
    }

    /// One queue's signals at `now`: Get Queue Metadata and a peek of up to 32, sent
    /// together (two calls).
    pub async fn read_queue(&self, queue: QueueRef, now: UnixMs) -> Result<QueueReading, StorageError> {
        let name = self.hub.queue_name(queue);
        let client = self.account.queue_client(&name, &self.options)?;
        let peek_options = QueueClientPeekMessagesOptions {
            number_of_messages: Some(PEEK_LIMIT as i32),
            ..Default::default()
        };
        let (metadata, peeked) =
            tokio::join!(client.get_properties(None), client.peek_messages(Some(peek_options)));
        let metadata = metadata.map_err(|e| StorageError::from_azure(&name, &e))?;
        // Every Get Queue Metadata answer carries the count; a 200 without it is not the
        // Queue service (a proxy's or a portal's HTML page, say), and must not read as an
        // empty queue.
        let approximate_count = metadata
            .approximate_messages_count()
            .map_err(|e| {
                unexpected(&name, format!("bad x-ms-approximate-messages-count: {}", super::brief(&e)))
            })?
            .ok_or_else(|| {
                unexpected(
                    &name,
                    format!(
                        "the answer has no x-ms-approximate-messages-count: not an Azure Storage queue \
                         (Content-Type {})",
                        crate::contract::quote(
                            metadata
                                .headers()
                                .get_optional_str(&HeaderName::from_static("content-type"))
                                .unwrap_or("none")
                        )
                    ),
                )
            })?
            .max(0) as u64;
        let peeked = peeked
            .map_err(|e| StorageError::from_azure(&name, &e))?
            .into_model()
            .map_err(|e| unexpected(&name, format!("unreadable peek result: {}", super::brief(&e))))?;
        let messages = peeked.items.unwrap_or_default();
        let first_visible_age_ms = messages
            .first()
            .and_then(|m| m.insertion_time)
            .map(|inserted| now.millis_since(UnixMs(unix_ms(inserted))).max(0) as u64)
            .unwrap_or(0);
        // Dequeued before: a held message that reappeared (its worker died or abandoned it);
        // a timer that fired has not been dequeued yet.
        let redelivered_count = messages.iter().filter(|m| m.dequeue_count.is_some_and(|n| n > 0)).count();
        Ok(QueueReading {
            approximate_count,
            visible_count: messages.len().min(PEEK_LIMIT as usize) as u32,
            first_visible_age_ms,
            redelivered_count: redelivered_count.min(PEEK_LIMIT as usize) as u32,
            sampled_at: now,
        })
    }

    /// Table layout: one row per partition, RowKey = control queue name; owned by
    /// `CurrentOwner` while `ExpiresAt` is in the future (`TablePartitionLease`,
    /// Partitioning/TablePartitionLease.cs; a claim sets now + 1 min and a renewal now +
    /// LeaseInterval in TablePartitionManager.cs). None when the table does not exist.
    async fn table_partitions(&self, now: UnixMs) -> Result<Option<Vec<PartitionLease>>, StorageError> {
        let table = self.hub.partitions_table();
        let rows = match self.table.query_all(&table).await {
            Ok(rows) => rows,
            Err(StorageError::NotProvisioned { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut leases: Vec<PartitionLease> = rows
            .iter()
            .filter_map(|row| {
                let partition = self.hub.partition_of(row.get("RowKey")?.as_str()?)?;
                let expires_at_unix_ms =
                    row.get("ExpiresAt").and_then(|v| v.as_str()).and_then(parse_rfc3339_ms);
                let unexpired = expires_at_unix_ms.is_some_and(|t| t > now.as_millis());
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
            // Upstream creates the table before its rows; the table alone is no hub yet.
            return Err(StorageError::NotProvisioned { resource: format!("{table} (no partition rows)") });
        }
        leases.sort_by_key(|l| l.partition);
        Ok(Some(leases))
    }

    /// `PartitionCount` of `taskhub.json` (`TaskHubInfo`, Partitioning/TaskHubInfo.cs);
    /// None when the blob or its container does not exist.
    async fn task_hub_info(&self) -> Result<Option<u32>, StorageError> {
        let path = format!("{}/{TASK_HUB_INFO_BLOB}", self.hub.lease_container());
        let body = match self.read_blob(&path).await {
            Ok((_, body)) => body,
            Err(StorageError::NotProvisioned { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        #[derive(serde::Deserialize)]
        struct TaskHubInfo {
            #[serde(rename = "PartitionCount")]
            partition_count: u32,
        }
        let info: TaskHubInfo = serde_json::from_slice(&body).map_err(|e| {
            unexpected(&path, format!("unreadable {TASK_HUB_INFO_BLOB}: {}", super::brief(&e)))
        })?;
        if !(1..=super::MAX_PARTITIONS).contains(&info.partition_count) {
            return Err(unexpected(
                &path,
                format!("PartitionCount {} is outside 1..=16", info.partition_count),
            ));
        }
        Ok(Some(info.partition_count))
    }

    /// Safe and legacy layouts, once detected: one listing of the ownership directory, then
    /// the bodies of the leased blobs not read before.
    async fn blob_partitions(
        &self,
        layout: Layout,
        partition_count: u32,
    ) -> Result<Vec<PartitionLease>, StorageError> {
        let listed = self.list_leases(layout).await?;
        self.owners(partition_count, listed).await
    }

    /// The lease blobs of `layout`'s ownership directory, as one listing shows them
    /// (upstream's `BlobPartitionLeaseManager.ListLeasesAsync` lists the same prefix).
    async fn list_leases(&self, layout: Layout) -> Result<Vec<ListedLease>, StorageError> {
        let container = self.hub.lease_container();
        let Some(directory) = layout.ownership_directory() else {
            return Ok(Vec::new());
        };
        let prefix = format!("{directory}/");
        let resource = format!("{container}/{prefix}");
        let client = self.account.container_client(&container, &self.options)?;
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.clone()),
            maxresults: Some(LISTING_PAGE_SIZE),
            ..Default::default()
        };
        let pages = client.list_blobs(Some(options)).map_err(|e| StorageError::from_azure(&resource, &e))?;
        let mut items = Vec::new();
        let mut pages = pages.into_pages().take(LISTING_MAX_PAGES);
        while let Some(page) = pages.next().await {
            let page = page
                .and_then(|page| page.into_model())
                .map_err(|e| StorageError::from_azure(&resource, &e))?;
            items.extend(page.blob_items);
        }
        Ok(items
            .into_iter()
            .filter_map(|item| {
                let name = item.name?;
                let partition = self.hub.partition_of(name.strip_prefix(&prefix)?)?;
                let properties = item.properties?;
                Some(ListedLease {
                    partition,
                    leased: properties.lease_state == Some(LeaseState::Leased),
                    etag: properties.etag.map(|e| e.to_string()).unwrap_or_default(),
                    name,
                })
            })
            .collect())
    }

    /// Partitions 0..`partition_count` and their owners: the `Owner` of a lease blob's body
    /// while the blob is leased; nobody for a blob not leased or not created yet.
    async fn owners(
        &self,
        partition_count: u32,
        listed: Vec<ListedLease>,
    ) -> Result<Vec<PartitionLease>, StorageError> {
        let container = self.hub.lease_container();
        let leased: Vec<ListedLease> =
            listed.into_iter().filter(|l| l.leased && l.partition < partition_count).collect();
        let stale: Vec<ListedLease> = {
            let cache = self.lock();
            leased
                .iter()
                .filter(|l| {
                    l.etag.is_empty() || cache.owners.get(&l.name).is_none_or(|(etag, _)| *etag != l.etag)
                })
                .cloned()
                .collect()
        };
        let container = &container;
        let downloaded: Vec<(String, String, Option<String>)> = futures::stream::iter(stale)
            .map(|lease| async move {
                match self.read_blob(&format!("{container}/{}", lease.name)).await {
                    Ok((_, body)) => Ok((lease.name, lease.etag, lease_owner(&body))),
                    // Deleted since the listing: nobody holds it.
                    Err(StorageError::NotProvisioned { .. }) => Ok((lease.name, String::new(), None)),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(BLOB_READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut cache = self.lock();
        for (name, etag, owner) in downloaded {
            cache.owners.insert(name, (etag, owner));
        }
        let mut leases: Vec<PartitionLease> = (0..partition_count)
            .map(|partition| PartitionLease {
                partition,
                owner: None,
                expires_at_unix_ms: None,
                draining: false,
            })
            .collect();
        for lease in &leased {
            leases[lease.partition as usize].owner =
                cache.owners.get(&lease.name).and_then(|(_, o)| o.clone());
        }
        Ok(leases)
    }

    /// Whether any of the hub's queues exists, and the partition count its control queues
    /// imply (highest index + 1), from one listing of `{hub lowercased}-*`.
    async fn queues_found(&self) -> Result<(bool, u32), StorageError> {
        let prefix = format!("{}-", self.hub.name().to_ascii_lowercase());
        let resource = format!("queues {prefix}*");
        let client = self.account.queue_service_client(&self.options)?;
        let options = QueueServiceClientListQueuesOptions {
            prefix: Some(prefix),
            maxresults: Some(LISTING_PAGE_SIZE),
            ..Default::default()
        };
        let pages = client.list_queues(Some(options)).map_err(|e| StorageError::from_azure(&resource, &e))?;
        let mut items = Vec::new();
        let mut pages = pages.into_pages().take(LISTING_MAX_PAGES);
        while let Some(page) = pages.next().await {
            let page = page
                .and_then(|page| page.into_model())
                .map_err(|e| StorageError::from_azure(&resource, &e))?;
            items.extend(page.queue_items);
        }
        let work_items = self.hub.work_item_queue();
        let mut any = false;
        let mut partition_count = 0;
        for name in items.into_iter().filter_map(|q| q.name) {
            if let Some(partition) = self.hub.partition_of(&name) {
                any = true;
                partition_count = partition_count.max(partition + 1);
            } else if name == work_items {
                any = true;
            }
        }
        Ok((any, partition_count))
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
