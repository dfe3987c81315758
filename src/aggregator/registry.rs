//! The task hubs the aggregator tracks, shared by the KEDA service, the report service, the
//! cold probes and the sampling loop. Each hub's [`HubState`] sits behind a short-held mutex;
//! its activity is also published on a watch channel so StreamIsActive can follow it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::UnixMs;
use crate::contract::limits::{
    HUB_REPLACEABLE_AFTER_MS, MAX_PODS_PER_HUB, MAX_TRACKED_HUBS, MAX_TRACKED_PODS,
};

use super::hub::{HubKey, HubState, PodAdmission, PodsFull, RecommendationChange, ValidReport};
use super::metrics::{HubLabels, Metrics, Tracked};
use super::settings::{EffectiveLimits, HubSettings};
use super::sources::ScaledObjectKey;
use crate::reading::HubReading;
use crate::storage::Connection;

/// A hub's activity as StreamIsActive follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Activity {
    /// IsActive's answer now.
    pub active: bool,
    /// How many inactive -> active transitions there were; a stream sends `true` whenever it
    /// grows, so a short burst between two looks is not lost.
    pub activations: u64,
}

/// Why the last probe of a hub did not read it, for UNAVAILABLE answers.
#[derive(Debug, Clone, Default)]
struct ProbeStatus {
    task_started: bool,
    last_error: Option<String>,
    /// The latest round left queues it set out to read unread (storage failed).
    missed: bool,
}

/// One tracked task hub.
#[derive(Debug)]
pub struct HubEntry {
    /// Its key.
    pub key: HubKey,
    labels: HubLabels,
    state: Mutex<HubState>,
    activity: watch::Sender<Activity>,
    observed: watch::Sender<bool>,
    scaled_object: Mutex<Option<ScaledObjectKey>>,
    probe: Mutex<ProbeStatus>,
    /// When a KEDA call or a report last named this hub (Unix ms; atomic, so a read-locked
    /// registry can touch it).
    touched_ms: AtomicI64,
    /// Dropped from the registry: its probe loop stops.
    evicted: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a HubState half-updated in a way later
    // readers could not use, so a poisoned lock is taken over.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What `/hubs` shows of one tracked hub: what was decided, from what, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct HubStatus {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Task hub name as configured.
    pub task_hub: String,
    /// The ScaledObject that asks about it, once KEDA has called.
    pub scaled_object: Option<String>,
    /// `scaleAlgorithm` in force.
    pub algorithm: String,
    /// IsActive's answer now.
    pub active: bool,
    /// The latest decision's worker count, once one was made.
    pub desired_workers: Option<u32>,
    /// The worker count that decision was taken from.
    pub workers: u32,
    /// What GetMetrics reports.
    pub metric_value: f64,
    /// The latest decision's reason.
    pub reason: Option<String>,
    /// Partitions live sidecars cover, and those the cold probe reads.
    pub covered_partitions: Vec<u32>,
    /// Partitions no live sidecar covers.
    pub uncovered_partitions: Vec<u32>,
    /// Sidecars reporting now.
    pub live_pods: u32,
    /// Why KEDA calls would be refused now, if they would.
    pub probe_error: Option<String>,
    /// The per-worker limits decisions divide by, and where each comes from.
    pub limits: EffectiveLimits,
    /// How the cold probe reaches storage, when the trigger says (no secrets).
    pub storage: Option<StorageView>,
    /// What the user should know: metadata left to a default, limits that are a guess.
    pub notes: Vec<String>,
}

/// How the cold probe reaches a hub's storage account, for `/hubs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StorageView {
    /// `connection string` or `workload identity`.
    pub credential: &'static str,
    /// The Blob, Queue and Table endpoints (workload identity; a connection string's are
    /// not shown).
    pub endpoints: Vec<String>,
    /// The Entra ID authority tokens are asked from (workload identity).
    pub authority_host: Option<String>,
    /// The identity's client id, when the trigger names one.
    pub client_id: Option<String>,
}

impl StorageView {
    fn of(connection: &Connection) -> Self {
        match connection {
            Connection::String(_) => Self {
                credential: "connection string",
                endpoints: Vec::new(),
                authority_host: None,
                client_id: None,
            },
            Connection::Identity(identity) => Self {
                credential: "workload identity",
                endpoints: identity.endpoints().to_vec(),
                authority_host: Some(identity.cloud.authority_host().to_owned()),
                client_id: identity.client_id.clone(),
            },
        }
    }
}

impl HubEntry {
    /// This hub's status at `now`, for `/hubs`.
    pub(crate) fn status(&self, now: UnixMs) -> HubStatus {
        let scaled_object = self.scaled_object().map(|so| format!("{}/{}", so.namespace, so.name));
        let probe_error = lock(&self.probe).last_error.clone();
        let stale = self.stale_reason(now).map(|reason| {
            format!("decisions are held (not re-evaluated) and KEDA is told UNAVAILABLE until the hub is read again: {reason}")
        });
        self.with_state(|s| {
            let coverage = s.coverage(now);
            HubStatus {
                namespace: self.key.namespace.clone(),
                task_hub: s.settings().task_hub.clone(),
                scaled_object,
                algorithm: s.settings().algorithm.to_string(),
                active: s.is_active(now),
                desired_workers: s.recommendation().map(|r| r.desired_workers),
                workers: s.workers(),
                metric_value: s.metric_value(),
                reason: s.recommendation().map(|r| r.reason.clone()),
                covered_partitions: coverage.covered,
                uncovered_partitions: coverage.uncovered,
                live_pods: s.live_pods(now),
                probe_error,
                limits: s.limits(),
                storage: s.settings().connection.as_ref().map(StorageView::of),
                notes: s
                    .settings()
                    .warnings
                    .iter()
                    .cloned()
                    .chain(s.limits().note())
                    .chain(s.notes(now))
                    .chain(stale)
                    .collect(),
            }
        })
    }

    /// True once the hub was dropped for being idle; its probe loop ends.
    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Runs `f` on the hub's state.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut HubState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Follows the hub's activity.
    pub(crate) fn subscribe_activity(&self) -> watch::Receiver<Activity> {
        self.activity.subscribe()
    }

    /// The ScaledObject that last asked about this hub.
    pub(crate) fn scaled_object(&self) -> Option<ScaledObjectKey> {
        lock(&self.scaled_object).clone()
    }

    /// Records the ScaledObject that asks about this hub.
    pub(crate) fn set_scaled_object(&self, key: ScaledObjectKey) {
        let mut current = lock(&self.scaled_object);
        if current.as_ref() != Some(&key) {
            *current = Some(key);
        }
    }

    /// Marks the probe loop as started; false when it already was.
    pub(crate) fn claim_probe_task(&self) -> bool {
        !std::mem::replace(&mut lock(&self.probe).task_started, true)
    }

    /// Records the latest probe's failure (`None`: it read); returns the one before.
    pub(crate) fn set_probe_error(&self, error: Option<String>) -> Option<String> {
        std::mem::replace(&mut lock(&self.probe).last_error, error)
    }

    /// Records whether the latest probe round left queues it meant to read unread.
    pub(crate) fn set_probe_missed(&self, missed: bool) {
        lock(&self.probe).missed = missed;
    }

    /// Why the picture of an observed hub cannot be answered from at `now`: some queue is
    /// covered by no live sidecar (a sidecar that cannot read storage reports no queues) and
    /// the cold probe failed to read it. The last readings would then be answered without
    /// end, and they decay (work in progress seen before the outage looks like sleeping timers
    /// once the grace period passes without a reading): KEDA is told UNAVAILABLE instead and
    /// keeps the replicas as they are (`keda` module docs).
    pub(crate) fn stale_reason(&self, now: UnixMs) -> Option<String> {
        let probe = lock(&self.probe).clone();
        if !probe.missed {
            return None;
        }
        let coverage = self.with_state(|s| s.coverage(now));
        if coverage.is_complete() {
            return None;
        }
        Some(format!(
            "task hub {}: partitions {:?}{} not read: no live sidecar reads them and the cold probe failed: {}",
            self.key.task_hub,
            coverage.uncovered,
            if coverage.work_item_uncovered { " and the work-item queue" } else { "" },
            probe.last_error.as_deref().unwrap_or("(no error recorded)")
        ))
    }

    /// Why the hub is not observed yet, for UNAVAILABLE.
    pub(crate) fn unavailable_reason(&self) -> String {
        let probe = lock(&self.probe).last_error.clone();
        let connection = self.with_state(|s| s.settings().connection.is_some());
        match (probe, connection) {
            (Some(e), _) => {
                format!("no signals for task hub {} yet: the cold probe failed: {e}", self.key.task_hub)
            }
            (None, true) => format!(
                "no signals for task hub {} yet: the first cold probe is still running",
                self.key.task_hub
            ),
            (None, false) => format!(
                "no signals for task hub {} yet: no sidecar has reported and the trigger has no connection to probe with",
                self.key.task_hub
            ),
        }
    }

    /// Waits up to `limit` for the first report or probe; true when the hub is observed.
    pub(crate) async fn wait_observed(&self, limit: Duration) -> bool {
        let mut rx = self.observed.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|o| *o)).await, Ok(Ok(_)))
    }

    /// Publishes activity after the state changed, and with `gauges` the per-hub gauges too
    /// (coverage looks at every pod of the hub: the sampling loop's job, not each report's).
    fn publish(&self, state: &HubState, now: UnixMs, metrics: &Metrics, gauges: bool) {
        let active = state.is_active(now);
        self.activity.send_if_modified(|a| {
            if a.active == active {
                return false;
            }
            a.active = active;
            if active {
                a.activations += 1;
            }
            true
        });
        // KEDA waits for the whole hub, not a first part of it.
        if state.is_fully_read() {
            self.observed.send_if_modified(|o| !std::mem::replace(o, true));
        }
        if !gauges {
            metrics.active.get_or_create(&self.labels).set(i64::from(active));
            return;
        }
        let coverage = state.coverage(now);
        metrics.active.get_or_create(&self.labels).set(i64::from(active));
        metrics.covered_partitions.get_or_create(&self.labels).set(coverage.covered.len() as i64);
        metrics.uncovered_partitions.get_or_create(&self.labels).set(coverage.uncovered.len() as i64);
        let split = state.split(now);
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.held_messages.get_or_create(&self.labels).set(gauge(split.held));
        metrics.timer_messages.get_or_create(&self.labels).set(gauge(split.timers));
        metrics.invisible_work_items.get_or_create(&self.labels).set(gauge(split.invisible_work_items));
        metrics.set_visible_messages(&self.labels, &state.queue_messages());
        metrics
            .connection_known
            .get_or_create(&self.labels)
            .set(i64::from(state.settings().connection.is_some()));
        if let Some(r) = state.recommendation() {
            metrics.desired_workers.get_or_create(&self.labels).set(i64::from(r.desired_workers));
            metrics.workers.get_or_create(&self.labels).set(i64::from(state.workers()));
        }
    }
}

/// Called when a hub's recommendation changes, with the ScaledObject that asks about it
/// (the Kubernetes side records an Event on it).
pub(crate) type ChangeHook = Arc<dyn Fn(&ScaledObjectKey, &RecommendationChange) + Send + Sync>;

/// A new hub while as many as [`MAX_TRACKED_HUBS`] are tracked and none is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the aggregator tracks {tracked} task hubs, each named by KEDA or a report within the last {} minutes, and takes no more",
    HUB_REPLACEABLE_AFTER_MS / 60_000
)]
pub struct HubsFull {
    /// How many hubs are tracked.
    pub tracked: usize,
}

/// Every tracked hub, with the settings that apply to all of them.
pub struct Registry {
    hubs: RwLock<HashMap<HubKey, Arc<HubEntry>>>,
    /// Pods tracked over all hubs (kept by the report and sampling paths, so no path counts
    /// them by walking every hub).
    pods: AtomicUsize,
    /// The metrics every part updates.
    pub metrics: Arc<Metrics>,
    work_grace_ms: u64,
    on_change: Option<ChangeHook>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("work_grace_ms", &self.work_grace_ms).finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry; `work_grace_ms` as in `hub`'s docs.
    pub fn new(metrics: Arc<Metrics>, work_grace_ms: u64) -> Self {
        Self {
            hubs: RwLock::new(HashMap::new()),
            pods: AtomicUsize::new(0),
            metrics,
            work_grace_ms,
            on_change: None,
        }
    }

    /// Calls `hook` on every recommendation change of a hub a ScaledObject asks about.
    pub(crate) fn with_change_hook(mut self, hook: Option<ChangeHook>) -> Self {
        self.on_change = hook;
        self
    }

    /// The hub, when tracked.
    pub(crate) fn get(&self, key: &HubKey) -> Option<Arc<HubEntry>> {
        self.hubs.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Every tracked hub.
    pub(crate) fn all(&self) -> Vec<Arc<HubEntry>> {
        self.hubs.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The hub, tracked from now on if it was not; `settings` replace the hub's when given
    /// (KEDA calls), else a new hub gets the defaults (reports). At [`MAX_TRACKED_HUBS`] a
    /// new hub takes the place of the least recently named one if that one is idle (see
    /// [`HUB_REPLACEABLE_AFTER_MS`]), else it is refused and counted.
    pub fn track(
        &self,
        key: &HubKey,
        task_hub: &str,
        settings: Option<&HubSettings>,
    ) -> Result<Arc<HubEntry>, HubsFull> {
        if let Some(entry) = self.get(key) {
            return Ok(self.with_settings(entry, settings));
        }
        let now = UnixMs::now();
        let mut hubs = self.hubs.write().unwrap_or_else(|p| p.into_inner());
        if !hubs.contains_key(key) && hubs.len() >= MAX_TRACKED_HUBS {
            // One pass over the hubs, paid only by a new hub at the limit.
            let stalest = hubs
                .values()
                .filter(|e| e.activity.receiver_count() == 0)
                .min_by_key(|e| e.touched_ms.load(Ordering::Relaxed))
                .filter(|e| {
                    now.millis_since(UnixMs(e.touched_ms.load(Ordering::Relaxed))) > HUB_REPLACEABLE_AFTER_MS
                })
                .map(|e| e.key.clone());
            match stalest {
                Some(old) => {
                    self.drop_hub(&mut hubs, &old, "dropped to make room for a new one");
                    self.metrics.count_replaced(Tracked::Hub);
                }
                None => {
                    self.metrics.count_refused(Tracked::Hub);
                    return Err(HubsFull { tracked: hubs.len() });
                }
            }
        }
        let entry = hubs
            .entry(key.clone())
            .or_insert_with(|| {
                let settings = settings.cloned().unwrap_or_else(|| HubSettings::defaults(task_hub));
                Arc::new(HubEntry {
                    key: key.clone(),
                    labels: HubLabels::from(key),
                    state: Mutex::new(HubState::new(settings, self.work_grace_ms)),
                    activity: watch::Sender::new(Activity::default()),
                    observed: watch::Sender::new(false),
                    scaled_object: Mutex::new(None),
                    probe: Mutex::new(ProbeStatus::default()),
                    touched_ms: AtomicI64::new(now.as_millis()),
                    evicted: AtomicBool::new(false),
                })
            })
            .clone();
        self.metrics.hubs_tracked.set(hubs.len() as i64);
        drop(hubs);
        Ok(self.with_settings(entry, settings))
    }

    /// Removes `key` from `hubs`: its probe stops, its series and its pods go.
    fn drop_hub(&self, hubs: &mut HashMap<HubKey, Arc<HubEntry>>, key: &HubKey, why: &str) {
        if let Some(entry) = hubs.remove(key) {
            entry.evicted.store(true, Ordering::Relaxed);
            self.metrics.forget(&entry.labels);
            let pods = entry.with_state(|s| s.tracked_pods());
            self.forget_pods(pods);
            tracing::info!(namespace = %key.namespace, task_hub = %key.task_hub, "task hub {why}");
        }
    }

    fn forget_pods(&self, count: usize) {
        if count > 0 {
            let left = self.pods.fetch_sub(count, Ordering::Relaxed).saturating_sub(count);
            self.metrics.pods_tracked.set(left as i64);
        }
    }

    fn with_settings(&self, entry: Arc<HubEntry>, settings: Option<&HubSettings>) -> Arc<HubEntry> {
        entry.touched_ms.store(UnixMs::now().as_millis(), Ordering::Relaxed);
        if let Some(settings) = settings {
            entry.with_state(|s| {
                if s.settings() != settings {
                    s.update_settings(settings.clone());
                }
            });
        }
        entry
    }

    /// Drops the hubs no KEDA call and no report has named for `idle_ms` (a deleted
    /// ScaledObject, an app gone), so their probes stop costing storage transactions.
    pub(crate) fn evict_idle(&self, now: UnixMs, idle_ms: i64) -> Vec<HubKey> {
        let mut hubs = self.hubs.write().unwrap_or_else(|p| p.into_inner());
        let idle: Vec<HubKey> = hubs
            .values()
            // An open StreamIsActive is KEDA asking all the time.
            .filter(|e| e.activity.receiver_count() == 0)
            .filter(|e| now.millis_since(UnixMs(e.touched_ms.load(Ordering::Relaxed))) > idle_ms)
            .map(|e| e.key.clone())
            .collect();
        for key in &idle {
            self.drop_hub(&mut hubs, key, "no longer asked about: dropped");
        }
        self.metrics.hubs_tracked.set(hubs.len() as i64);
        idle
    }

    /// Merges a report into its hub and publishes the result. A new pod is refused when
    /// its hub tracks [`MAX_PODS_PER_HUB`] live pods, or all hubs [`MAX_TRACKED_PODS`]
    /// (then only a silent pod of the same hub can make room). Costs the same whatever the
    /// number of pods of the hub: no step looks at every pod.
    pub fn apply_report(&self, entry: &HubEntry, report: &ValidReport, now: UnixMs) -> Result<(), PodsFull> {
        let may_add = self.pods.load(Ordering::Relaxed) < MAX_TRACKED_PODS;
        let change = entry.with_state(|s| {
            let first = !s.is_observed();
            let admission = s.apply_report_bounded(report, now, MAX_PODS_PER_HUB, may_add)?;
            let change = if first { s.evaluate(now, None) } else { None };
            // The gauges look at every pod: refreshed by the sampling loop, and here only on a
            // hub's first report and on a pod's last (once per pod, and its partitions are
            // uncovered at once).
            entry.publish(s, now, &self.metrics, first || report.leaving);
            Ok((admission, change))
        });
        let change = match change {
            Ok((PodAdmission::Added, change)) => {
                let tracked = self.pods.fetch_add(1, Ordering::Relaxed) + 1;
                self.metrics.pods_tracked.set(tracked as i64);
                change
            }
            Ok((PodAdmission::Replaced, change)) => {
                self.metrics.count_replaced(Tracked::Pod);
                change
            }
            Ok((PodAdmission::Known, change)) => change,
            Err(full) => {
                self.metrics.count_refused(Tracked::Pod);
                return Err(full);
            }
        };
        self.metrics.reports_received.get_or_create(&entry.labels).inc();
        self.changed(entry, change);
        Ok(())
    }

    /// Merges a probe reading (`None`: the hub is not provisioned) and publishes the result.
    pub fn apply_probe(&self, entry: &HubEntry, reading: Option<&HubReading>, now: UnixMs) {
        let change = entry.with_state(|s| {
            let first = !s.is_observed();
            match reading {
                Some(reading) => s.apply_probe(reading, now),
                None => s.apply_not_provisioned(),
            }
            let change = if first { s.evaluate(now, None) } else { None };
            entry.publish(s, now, &self.metrics, true);
            change
        });
        self.changed(entry, change);
    }

    /// One sampling interval for one hub: rings, decision, activity. A hub nobody can read
    /// now ([`HubEntry::stale_reason`]) is not re-evaluated: its last readings would decay
    /// (work in flight before the outage would read as sleeping timers once the grace period
    /// passed without a reading), so its decision, activity and latency rings are held as
    /// they were until a sidecar or the probe reads it again.
    pub fn evaluate(&self, entry: &HubEntry, workers: Option<u32>, now: UnixMs) {
        let stale = entry.stale_reason(now).is_some();
        let (forgotten, change, fully_read) = entry.with_state(|s| {
            let forgotten = s.forget_silent_pods(now, 10 * 60 * 1000);
            let change = if stale { None } else { s.evaluate(now, workers) };
            entry.publish(s, now, &self.metrics, true);
            (forgotten, change, s.is_fully_read())
        });
        // What KEDA is told (`keda::KedaScaler::answerable`): UNAVAILABLE until the hub was
        // read whole, and while nobody can read it.
        self.metrics.unavailable.get_or_create(&entry.labels).set(i64::from(stale || !fully_read));
        self.forget_pods(forgotten);
        self.changed(entry, change);
    }
}

impl Registry {
    /// One log line per change, and the hook (Kubernetes Event) when a ScaledObject asks.
    fn changed(&self, entry: &HubEntry, change: Option<RecommendationChange>) {
        let Some(c) = change else { return };
        tracing::info!(
            namespace = %entry.key.namespace,
            task_hub = %entry.key.task_hub,
            desired_workers = c.desired_workers,
            previous = ?c.previous,
            workers = c.workers,
            reason = %c.reason,
            "recommendation changed"
        );
        if let (Some(hook), Some(scaled_object)) = (&self.on_change, entry.scaled_object()) {
            hook(&scaled_object, &c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::QueueReading;

    #[test]
    fn hubs_nobody_asks_about_are_dropped_and_their_probe_told_to_stop() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let key = HubKey::new("apps", "IdleHub");
        let entry = registry.track(&key, "IdleHub", None).unwrap();
        let now = UnixMs::now();
        registry.apply_probe(&entry, None, now);
        let active_series = "durable_scaler_aggregator_active{namespace=\"apps\",task_hub=\"idlehub\"}";
        assert!(registry.metrics.encode().contains(active_series));
        assert!(registry.evict_idle(now, 60_000).is_empty(), "just touched");
        assert_eq!(registry.evict_idle(now.plus_ms(60_001), 60_000), vec![key.clone()]);
        assert!(entry.is_evicted());
        assert!(registry.get(&key).is_none());
        assert!(!registry.metrics.encode().contains(active_series), "its gauges are gone");
    }

    #[test]
    fn a_dropped_hub_takes_its_counters_and_its_pods_with_it() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let key = HubKey::new("apps", "GoneHub");
        let entry = registry.track(&key, "GoneHub", None).unwrap();
        let now = UnixMs::now();
        let report = ValidReport {
            pod: "app-1".into(),
            reading: HubReading { partition_count: 1, control: vec![], work_item: None },
            interval_ms: 1000,
            leaving: false,
            sampled_at_unix_ms: now.as_millis(),
            limits: None,
            queue_settings: None,
        };
        registry.apply_report(&entry, &report, now).unwrap();
        registry.metrics.count_probe(&key, super::super::metrics::ProbeOutcome::Ok);
        let text = registry.metrics.encode();
        assert!(text.contains("reports_received_total{namespace=\"apps\",task_hub=\"gonehub\"} 1"), "{text}");
        assert!(text.contains("durable_scaler_aggregator_pods_tracked 1"), "{text}");
        registry.evict_idle(now.plus_ms(60_001), 60_000);
        let text = registry.metrics.encode();
        assert!(!text.contains("gonehub"), "{text}");
        assert!(text.contains("durable_scaler_aggregator_pods_tracked 0"), "{text}");
    }

    #[test]
    fn at_the_hub_limit_a_new_hub_is_refused_while_every_hub_is_in_use() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        for i in 0..MAX_TRACKED_HUBS {
            registry.track(&HubKey::new("apps", &format!("hub{i}")), &format!("Hub{i}"), None).unwrap();
        }
        let refused = registry.track(&HubKey::new("apps", "onemore"), "OneMore", None).unwrap_err();
        assert_eq!(refused.tracked, MAX_TRACKED_HUBS);
        assert!(registry.metrics.encode().contains("tracking_refused_total{kind=\"hub\"} 1"));
        assert!(
            registry.track(&HubKey::new("apps", "hub0"), "Hub0", None).is_ok(),
            "known hubs still answer"
        );
    }

    #[test]
    fn at_the_hub_limit_the_stalest_idle_hub_makes_room() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let stale = registry.track(&HubKey::new("apps", "stale"), "Stale", None).unwrap();
        let long_ago = UnixMs::now().as_millis() - HUB_REPLACEABLE_AFTER_MS - 1;
        stale.touched_ms.store(long_ago, Ordering::Relaxed);
        for i in 1..MAX_TRACKED_HUBS {
            registry.track(&HubKey::new("apps", &format!("hub{i}")), &format!("Hub{i}"), None).unwrap();
        }
        registry.track(&HubKey::new("apps", "fresh"), "Fresh", None).unwrap();
        assert!(stale.is_evicted());
        assert!(registry.get(&HubKey::new("apps", "stale")).is_none());
        assert!(registry.metrics.encode().contains("tracking_replaced_total{kind=\"hub\"} 1"));
    }

    #[test]
    fn a_hub_nobody_can_read_any_more_is_stale_until_a_sidecar_or_the_probe_reads_it() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let entry = registry.track(&HubKey::new("apps", "DarkHub"), "DarkHub", None).unwrap();
        let now = UnixMs::now();
        let signals = QueueReading {
            approximate_count: 3,
            visible_count: 3,
            first_visible_age_ms: 10,
            redelivered_count: 0,
            sampled_at: now,
        };
        let reading = |control| HubReading { partition_count: 1, control, work_item: Some(signals) };
        registry.apply_probe(&entry, Some(&reading(vec![(0, signals)])), now);
        assert_eq!(entry.stale_reason(now), None, "read by the probe");
        entry.set_probe_error(Some("connection refused".into()));
        entry.set_probe_missed(true);
        let reason = entry.stale_reason(now).expect("no sidecar and a failed probe");
        assert!(reason.contains("[0]") && reason.contains("connection refused"), "{reason}");
        // A sidecar that reads the whole hub makes the probe's failure irrelevant.
        let report = ValidReport {
            pod: "app-1".into(),
            reading: HubReading { partition_count: 1, control: vec![(0, signals)], work_item: Some(signals) },
            interval_ms: 1000,
            leaving: false,
            sampled_at_unix_ms: now.as_millis(),
            limits: None,
            queue_settings: None,
        };
        registry.apply_report(&entry, &report, now).unwrap();
        assert_eq!(entry.stale_reason(now), None);
        // The same sidecar cut off from storage reports no queues: stale again.
        let blind = ValidReport { reading: HubReading::default(), ..report };
        registry
            .apply_report(&entry, &ValidReport { sampled_at_unix_ms: now.as_millis() + 1, ..blind }, now)
            .unwrap();
        assert!(entry.stale_reason(now).is_some());
        entry.set_probe_missed(false);
        assert_eq!(entry.stale_reason(now), None, "the probe read it again");
    }

    /// The value of the series `name{labels}` in `text`, when present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn the_unavailable_gauge_is_what_keda_is_told_unread_then_read_then_unreadable() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let entry = registry.track(&HubKey::new("apps", "DarkHub"), "DarkHub", None).unwrap();
        let series = "durable_scaler_aggregator_unavailable{namespace=\"apps\",task_hub=\"darkhub\"}";
        let now = UnixMs::now();
        registry.evaluate(&entry, None, now);
        assert_eq!(sample(&registry.metrics.encode(), series), Some(1.0), "nothing read yet");
        let signals = QueueReading { sampled_at: now, ..QueueReading::default() };
        let reading =
            HubReading { partition_count: 1, control: vec![(0, signals)], work_item: Some(signals) };
        registry.apply_probe(&entry, Some(&reading), now);
        registry.evaluate(&entry, None, now);
        assert_eq!(sample(&registry.metrics.encode(), series), Some(0.0), "read whole");
        entry.set_probe_error(Some("connection refused".into()));
        entry.set_probe_missed(true);
        registry.evaluate(&entry, None, now);
        assert_eq!(sample(&registry.metrics.encode(), series), Some(1.0), "nobody can read it");
    }

    #[test]
    fn visible_message_gauges_sum_the_latest_readings_by_queue() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let entry = registry.track(&HubKey::new("apps", "BusyHub"), "BusyHub", None).unwrap();
        let now = UnixMs::now();
        let signals = |approximate_count, visible_count| QueueReading {
            approximate_count,
            visible_count,
            sampled_at: now,
            ..QueueReading::default()
        };
        let reading = HubReading {
            partition_count: 2,
            control: vec![(0, signals(5, 2)), (1, signals(40, 32))],
            work_item: Some(signals(9, 7)),
        };
        registry.apply_probe(&entry, Some(&reading), now);
        let text = registry.metrics.encode();
        let value = |queue: &str| {
            sample(
                &text,
                &format!(
                    "durable_scaler_aggregator_visible_messages{{namespace=\"apps\",task_hub=\"busyhub\",queue=\"{queue}\"}}"
                ),
            )
        };
        assert_eq!(value("work_item"), Some(7.0), "{text}");
        assert_eq!(value("control"), Some(34.0));
        registry.evict_idle(now.plus_ms(60_001), 60_000);
        assert!(!registry.metrics.encode().contains("busyhub"), "dropped with the hub");
    }

    #[test]
    fn a_hub_nobody_can_read_keeps_its_decision_instead_of_decaying() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let entry = registry.track(&HubKey::new("apps", "DarkHub"), "DarkHub", None).unwrap();
        let t0 = UnixMs::now();
        let signals = |visible: u32, at: UnixMs| QueueReading {
            approximate_count: 1,
            visible_count: visible,
            first_visible_age_ms: if visible > 0 { 50 } else { 0 },
            redelivered_count: 0,
            sampled_at: at,
        };
        let idle = QueueReading { approximate_count: 0, visible_count: 0, ..signals(0, t0) };
        let reading = |work_item| HubReading {
            partition_count: 1,
            control: vec![(0, idle)],
            work_item: Some(work_item),
        };
        // An activity seen queued, then dequeued: one work item in flight.
        registry.apply_probe(&entry, Some(&reading(signals(1, t0))), t0);
        registry.evaluate(&entry, Some(1), t0);
        let t1 = t0.plus_ms(2_000);
        registry.apply_probe(&entry, Some(&reading(signals(0, t1))), t1);
        registry.evaluate(&entry, Some(1), t1);
        let before = entry.status(t1);
        assert!(before.active && before.desired_workers == Some(1), "{before:?}");
        // Storage goes away for longer than the visibility timeout. Evaluated meanwhile, the
        // unchanged invisible message would pass for a stuck work item and the hub go inactive.
        entry.set_probe_error(Some("connection refused".into()));
        entry.set_probe_missed(true);
        for s in 1..=10 {
            registry.evaluate(&entry, Some(1), t1.plus_ms(s * 30_000));
        }
        let held = entry.status(t1.plus_ms(300_000));
        assert!(held.active, "{held:?}");
        assert_eq!(
            (held.desired_workers, held.reason.clone()),
            (before.desired_workers, before.reason.clone())
        );
        assert!(held.notes.iter().any(|n| n.contains("decisions are held")), "{:?}", held.notes);
        // Read again: decisions resume from what storage says now.
        let t2 = t1.plus_ms(301_000);
        entry.set_probe_missed(false);
        registry.apply_probe(
            &entry,
            Some(&reading(QueueReading { approximate_count: 0, ..signals(0, t2) })),
            t2,
        );
        registry.evaluate(&entry, Some(1), t2);
        let after = entry.status(t2);
        assert!(!after.active && after.desired_workers == Some(0), "{after:?}");
        assert!(!after.notes.iter().any(|n| n.contains("decisions are held")));
    }

    #[test]
    fn a_hub_with_an_open_activity_stream_is_kept() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let key = HubKey::new("apps", "PushHub");
        let entry = registry.track(&key, "PushHub", None).unwrap();
        let _stream = entry.subscribe_activity();
        assert!(registry.evict_idle(UnixMs::now().plus_ms(3_600_000), 60_000).is_empty());
    }
}
