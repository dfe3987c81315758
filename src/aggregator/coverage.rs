//! Who covers what of one task hub: the reporting pods, one [`Partition`] record per control
//! queue (its holder, its last reading, whether it was ever read, its lost owner), the
//! work-item queue's, and from them what the cold probe must read. Part of one hub's state
//! ([`super::hub::HubState`]), changed under its lock only.
//!
//! A pod is **live** while its sidecar reports: a report at least every
//! [`STALE_AFTER_INTERVALS`] of its intervals. A sidecar whose storage reads run long (a slow
//! or throttling account) sends its latest report again meanwhile (`sidecar::report`), so its
//! pod stays live, a worker and the holder of its partitions, while its readings age; once
//! they are as old as that, its partitions count as **uncovered** and the cold probe reads
//! them, as it reads those of a pod gone silent.
//!
//! A partition's owner is **lost** when the live pod that reported it stops covering it
//! without saying it leaves: its sidecar went silent for [`STALE_AFTER_INTERVALS`], or it
//! stopped reporting the partition (its lease lapsed) and no live pod took it over. It is
//! lost as of its last report, the last moment it was seen. DTFx hides the messages such an
//! owner had dequeued until their visibility timeout lapses, so for that long the engine
//! counts them as work (`heuristic::durable`, rule 3). A pod that leaves (its last report
//! says so) lets its partitions go cleanly: DTFx drains and abandons its messages on shutdown.

use std::collections::{BTreeSet, HashMap};

use crate::clock::UnixMs;

/// A partition whose sidecar has not reported for this many of its intervals is uncovered.
pub(crate) const STALE_AFTER_INTERVALS: i64 = 3;

/// What a report did to the hub's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAdmission {
    /// The pod was tracked already.
    Known,
    /// A new pod was added.
    Added,
    /// A new pod took the place of the least recently reported one, no longer live.
    Replaced,
    /// The report was taken before the pod's latest (by the sidecar's clock): ignored.
    OutOfOrder,
}

/// A report from a new pod of a hub that tracks as many live pods as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the task hub tracks {tracked} pods, all reporting, and takes no more")]
pub struct PodsFull {
    /// How many pods the hub tracks.
    pub tracked: usize,
}

/// What the probe should read next: everything no live sidecar covers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CoverageView {
    /// The partition count, when known.
    pub partition_count: Option<u32>,
    /// Partitions some live sidecar reports.
    pub covered: Vec<u32>,
    /// Partitions no live sidecar reports.
    pub uncovered: Vec<u32>,
    /// No live sidecar reports the work-item queue.
    pub work_item_uncovered: bool,
}

impl CoverageView {
    /// Nothing to probe.
    pub(crate) fn is_complete(&self) -> bool {
        self.partition_count.is_some() && self.uncovered.is_empty() && !self.work_item_uncovered
    }
}

/// One reporting pod.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pod {
    /// When its latest report arrived (aggregator clock: liveness survives clock skew).
    last_report: UnixMs,
    /// When its latest new reading arrived (a report sent again carries the one before).
    last_reading: UnixMs,
    /// When its sidecar took it (sidecar clock: orders one pod's reports).
    last_sampled_ms: i64,
    interval_ms: u64,
    leaving: bool,
    /// The partitions its latest report covered.
    pub partitions: BTreeSet<u32>,
    work_item: bool,
    /// What its sidecar says of itself (version, where it read ownership, its storage error).
    pub sidecar: SidecarNotes,
}

/// What a sidecar says of itself in its reports, kept for `/hubs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SidecarNotes {
    /// The sidecar's version.
    pub version: String,
    /// Where it read partition ownership (`table`, `safe`, `legacy`, or the mode it was set
    /// to until a layout was found).
    pub partition_mode: String,
    /// What went wrong reading storage for its latest report, if anything (a short quote).
    pub error: Option<String>,
}

impl Pod {
    fn horizon_ms(&self) -> i64 {
        STALE_AFTER_INTERVALS.saturating_mul(i64::try_from(self.interval_ms).unwrap_or(i64::MAX))
    }

    fn is_live(&self, now: UnixMs) -> bool {
        !self.leaving && now.millis_since(self.last_report) <= self.horizon_ms()
    }

    /// Live, with readings recent enough to answer from (module docs).
    fn reads(&self, now: UnixMs) -> bool {
        self.is_live(now) && now.millis_since(self.last_reading) <= self.horizon_ms()
    }
}

/// One control queue's record.
#[derive(Debug, Clone, Default)]
pub(crate) struct Partition {
    /// The live pod that held it when last seen held.
    holder: Option<String>,
    /// When its owner was lost, until the visibility timeout has passed.
    lost_at: Option<UnixMs>,
    /// The `sampled_at` of the last sidecar reading the engine took (a reading is taken once).
    last_read: Option<i64>,
    /// Read at least once (by a report or the probe) since the partition count was learnt.
    read: bool,
}

/// One report's view of coverage, as the hub passes it in.
#[derive(Debug, Clone)]
pub(crate) struct ReportedPod<'a> {
    /// The pod's name.
    pub pod: &'a str,
    /// When its sidecar took the report.
    pub sampled_at_unix_ms: i64,
    /// Its interval, ms.
    pub interval_ms: u64,
    /// It is shutting down.
    pub leaving: bool,
    /// It reads the work-item queue.
    pub work_item: bool,
    /// What it says of itself.
    pub sidecar: SidecarNotes,
}

/// Pods, partitions and the work-item queue of one hub.
#[derive(Debug, Clone, Default)]
pub(crate) struct Coverage {
    partition_count: Option<u32>,
    pods: HashMap<String, Pod>,
    partitions: Vec<Partition>,
    work_item_last_read: Option<i64>,
    work_item_read: bool,
}

impl Coverage {
    /// The partition count, when known.
    pub(crate) fn partition_count(&self) -> Option<u32> {
        self.partition_count
    }

    /// A new P (first seen, or the hub was recreated) drops what was known per partition.
    /// Returns true when P changed.
    pub(crate) fn reshape(&mut self, partition_count: u32) -> bool {
        if partition_count == 0 || self.partition_count == Some(partition_count) {
            return false;
        }
        self.partition_count = Some(partition_count);
        self.partitions = vec![Partition::default(); partition_count as usize];
        self.work_item_last_read = None;
        true
    }

    /// Takes `report`'s pod received at `now`. A pod not tracked yet is added only while the
    /// hub tracks fewer than `max_pods` (and `may_add`: the registry's budget over all hubs);
    /// when full, the least recently reported pod makes room if it is no longer live, else
    /// the report is refused. The cost is constant but for that search, which only a new pod
    /// of a full hub pays and which `max_pods` bounds.
    pub(crate) fn admit(
        &mut self,
        report: &ReportedPod<'_>,
        now: UnixMs,
        max_pods: usize,
        may_add: bool,
    ) -> Result<PodAdmission, PodsFull> {
        let mut admission = PodAdmission::Known;
        let mut last_reading = now;
        match self.pods.get(report.pod) {
            Some(pod) if pod.last_sampled_ms > report.sampled_at_unix_ms => {
                return Ok(PodAdmission::OutOfOrder);
            }
            // The same report again: the pod lives, its reading is as old as it was.
            Some(pod) if pod.last_sampled_ms == report.sampled_at_unix_ms => last_reading = pod.last_reading,
            Some(_) => {}
            None if may_add && self.pods.len() < max_pods => admission = PodAdmission::Added,
            None => {
                let oldest = self.pods.iter().min_by_key(|(_, p)| p.last_report);
                match oldest {
                    Some((name, pod)) if !pod.is_live(now) => {
                        let name = name.clone();
                        self.pods.remove(&name);
                        admission = PodAdmission::Replaced;
                    }
                    _ => return Err(PodsFull { tracked: self.pods.len() }),
                }
            }
        }
        self.pods.insert(
            report.pod.to_string(),
            Pod {
                last_report: now,
                last_reading,
                last_sampled_ms: report.sampled_at_unix_ms,
                interval_ms: report.interval_ms,
                leaving: report.leaving,
                partitions: BTreeSet::new(),
                work_item: report.work_item,
                sidecar: report.sidecar.clone(),
            },
        );
        Ok(admission)
    }

    /// `pod` covers `partition` in the report just admitted, with a reading taken at
    /// `sampled_at`: returns true when that reading is new (the same reading, sent again or
    /// in two reports of one read, is taken once: the latency vote adds one sample per
    /// reading). False for a partition the hub does not have.
    pub(crate) fn reported(&mut self, pod: &str, partition: u32, sampled_at: i64) -> bool {
        let Some(record) = self.partitions.get_mut(partition as usize) else { return false };
        record.read = true;
        if let Some(p) = self.pods.get_mut(pod) {
            p.partitions.insert(partition);
        }
        record.last_read.replace(sampled_at) != Some(sampled_at)
    }

    /// The work-item queue was reported with a reading taken at `sampled_at`: true when new.
    pub(crate) fn reported_work_item(&mut self, sampled_at: i64) -> bool {
        self.work_item_read = true;
        self.work_item_last_read.replace(sampled_at) != Some(sampled_at)
    }

    /// The probe read `partition`: false for a partition the hub does not have.
    pub(crate) fn probed(&mut self, partition: u32) -> bool {
        match self.partitions.get_mut(partition as usize) {
            Some(record) => {
                record.read = true;
                true
            }
            None => false,
        }
    }

    /// The probe read the work-item queue.
    pub(crate) fn probed_work_item(&mut self) {
        self.work_item_read = true;
    }

    /// Every queue was read at least once since the partition count was learnt.
    pub(crate) fn is_fully_read(&self) -> bool {
        self.partition_count.is_some() && self.partitions.iter().all(|p| p.read) && self.work_item_read
    }

    /// Control queue `partition` was read at least once since the partition count was learnt.
    pub(crate) fn was_read(&self, partition: u32) -> bool {
        self.partitions.get(partition as usize).is_some_and(|p| p.read)
    }

    /// The work-item queue was read at least once.
    pub(crate) fn work_item_was_read(&self) -> bool {
        self.work_item_read
    }

    /// The pods whose latest report is fresh and who are not leaving.
    pub(crate) fn live_pods(&self, now: UnixMs) -> u32 {
        self.pods.values().filter(|p| p.is_live(now)).count() as u32
    }

    /// The live pods, by name.
    pub(crate) fn live(&self, now: UnixMs) -> impl Iterator<Item = (&String, &Pod)> {
        self.pods.iter().filter(move |(_, p)| p.is_live(now))
    }

    /// How many pods the hub tracks (live or not).
    pub(crate) fn tracked_pods(&self) -> usize {
        self.pods.len()
    }

    /// What live sidecars cover with recent readings at `now`, and what the probe must read.
    pub(crate) fn view(&self, now: UnixMs) -> CoverageView {
        let Some(p) = self.partition_count else {
            return CoverageView {
                partition_count: None,
                work_item_uncovered: true,
                ..CoverageView::default()
            };
        };
        let reading: Vec<&Pod> = self.pods.values().filter(|pod| pod.reads(now)).collect();
        let (covered, uncovered) = (0..p).partition(|i| reading.iter().any(|pod| pod.partitions.contains(i)));
        CoverageView {
            partition_count: Some(p),
            covered,
            uncovered,
            work_item_uncovered: !reading.iter().any(|pod| pod.work_item),
        }
    }

    /// Follows each partition's owner at `now` (module docs); returns each partition's lost
    /// time (`None`: held by a live pod, let go cleanly, or lost longer than `timeout_ms`).
    pub(crate) fn refresh_owners(&mut self, now: UnixMs, timeout_ms: u64) -> Vec<Option<UnixMs>> {
        let timeout = i64::try_from(timeout_ms).unwrap_or(i64::MAX);
        let pods = &self.pods;
        self.partitions
            .iter_mut()
            .enumerate()
            .map(|(partition, record)| {
                let p = partition as u32;
                let live_owner = pods.iter().find(|(_, pod)| pod.is_live(now) && pod.partitions.contains(&p));
                if let Some((name, _)) = live_owner {
                    record.holder = Some(name.clone());
                    record.lost_at = None;
                } else if let Some(name) = record.holder.take() {
                    // Lost as of the owner's last report: the last moment it was seen holding
                    // the messages, whether it went silent since or reported without the
                    // partition.
                    record.lost_at = match pods.get(&name) {
                        Some(pod) if pod.leaving => None,
                        Some(pod) => Some(pod.last_report.min(now)),
                        None => Some(now),
                    };
                }
                if record.lost_at.is_some_and(|t| now.millis_since(t) >= timeout) {
                    record.lost_at = None;
                }
                record.lost_at
            })
            .collect()
    }

    /// Partitions whose owner is lost.
    pub(crate) fn lost_partitions(&self) -> Vec<u32> {
        (0..).zip(&self.partitions).filter(|(_, p)| p.lost_at.is_some()).map(|(p, _)| p).collect()
    }

    /// Forgets pods silent for longer than `silent_for_ms`; returns how many.
    pub(crate) fn forget_silent_pods(&mut self, now: UnixMs, silent_for_ms: i64) -> usize {
        let before = self.pods.len();
        self.pods.retain(|_, p| now.millis_since(p.last_report) <= silent_for_ms);
        before - self.pods.len()
    }
}
