//! The task hubs the aggregator tracks, shared by the KEDA service, the report service, the
//! cold probes and the sampling loop. Each hub's [`HubState`] sits behind a short-held mutex;
//! its activity is also published on a watch channel so StreamIsActive can follow it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::UnixMs;

use super::hub::{HubKey, HubState, ProbeReading, RecommendationChange, ValidReport};
use super::metrics::{HubLabels, Metrics};
use super::settings::HubSettings;
use super::sources::ScaledObjectKey;

/// A hub's activity as StreamIsActive follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
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
pub struct HubStatus {
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
    /// What the user should know about this hub now (`HubState::notes`).
    pub notes: Vec<String>,
}

impl HubEntry {
    /// This hub's status at `now`, for `/hubs`.
    pub fn status(&self, now: UnixMs) -> HubStatus {
        let scaled_object = self.scaled_object().map(|so| format!("{}/{}", so.namespace, so.name));
        let probe_error = lock(&self.probe).last_error.clone();
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
                notes: s.notes(now),
            }
        })
    }

    /// True once the hub was dropped for being idle; its probe loop ends.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Runs `f` on the hub's state.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut HubState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Follows the hub's activity.
    pub fn subscribe_activity(&self) -> watch::Receiver<Activity> {
        self.activity.subscribe()
    }

    /// The ScaledObject that last asked about this hub.
    pub fn scaled_object(&self) -> Option<ScaledObjectKey> {
        lock(&self.scaled_object).clone()
    }

    /// Records the ScaledObject that asks about this hub.
    pub fn set_scaled_object(&self, key: ScaledObjectKey) {
        let mut current = lock(&self.scaled_object);
        if current.as_ref() != Some(&key) {
            *current = Some(key);
        }
    }

    /// Marks the probe loop as started; false when it already was.
    pub fn claim_probe_task(&self) -> bool {
        !std::mem::replace(&mut lock(&self.probe).task_started, true)
    }

    /// Records the latest probe's failure (`None`: it read); returns the one before.
    pub fn set_probe_error(&self, error: Option<String>) -> Option<String> {
        std::mem::replace(&mut lock(&self.probe).last_error, error)
    }

    /// Why the hub is not observed yet, for UNAVAILABLE.
    pub fn unavailable_reason(&self) -> String {
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
    pub async fn wait_observed(&self, limit: Duration) -> bool {
        let mut rx = self.observed.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|o| *o)).await, Ok(Ok(_)))
    }

    /// Publishes activity and gauges after the state changed.
    fn publish(&self, state: &HubState, now: UnixMs, metrics: &Metrics) {
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
        if state.is_observed() {
            self.observed.send_if_modified(|o| !std::mem::replace(o, true));
        }
        let coverage = state.coverage(now);
        metrics.active.get_or_create(&self.labels).set(i64::from(active));
        metrics.covered_partitions.get_or_create(&self.labels).set(coverage.covered.len() as i64);
        metrics.uncovered_partitions.get_or_create(&self.labels).set(coverage.uncovered.len() as i64);
        let stuck = i64::try_from(state.stuck_work_items(now)).unwrap_or(i64::MAX);
        metrics.stuck_work_items.get_or_create(&self.labels).set(stuck);
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
pub type ChangeHook = Arc<dyn Fn(&ScaledObjectKey, &RecommendationChange) + Send + Sync>;

/// Every tracked hub, with the settings that apply to all of them.
pub struct Registry {
    hubs: RwLock<HashMap<HubKey, Arc<HubEntry>>>,
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
        Self { hubs: RwLock::new(HashMap::new()), metrics, work_grace_ms, on_change: None }
    }

    /// Calls `hook` on every recommendation change of a hub a ScaledObject asks about.
    pub fn with_change_hook(mut self, hook: Option<ChangeHook>) -> Self {
        self.on_change = hook;
        self
    }

    /// The hub, when tracked.
    pub fn get(&self, key: &HubKey) -> Option<Arc<HubEntry>> {
        self.hubs.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Every tracked hub.
    pub fn all(&self) -> Vec<Arc<HubEntry>> {
        self.hubs.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The hub, tracked from now on if it was not; `settings` replace the hub's when given
    /// (KEDA calls), else a new hub gets the defaults (reports).
    pub fn track(&self, key: &HubKey, task_hub: &str, settings: Option<&HubSettings>) -> Arc<HubEntry> {
        let entry = match self.get(key) {
            Some(entry) => entry,
            None => {
                let mut hubs = self.hubs.write().unwrap_or_else(|p| p.into_inner());
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
                            touched_ms: AtomicI64::new(UnixMs::now().as_millis()),
                            evicted: AtomicBool::new(false),
                        })
                    })
                    .clone();
                self.metrics.hubs_tracked.set(hubs.len() as i64);
                return self.with_settings(entry, settings);
            }
        };
        self.with_settings(entry, settings)
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
    pub fn evict_idle(&self, now: UnixMs, idle_ms: i64) -> Vec<HubKey> {
        let mut hubs = self.hubs.write().unwrap_or_else(|p| p.into_inner());
        let idle: Vec<HubKey> = hubs
            .values()
            // An open StreamIsActive is KEDA asking all the time.
            .filter(|e| e.activity.receiver_count() == 0)
            .filter(|e| now.millis_since(UnixMs(e.touched_ms.load(Ordering::Relaxed))) > idle_ms)
            .map(|e| e.key.clone())
            .collect();
        for key in &idle {
            if let Some(entry) = hubs.remove(key) {
                entry.evicted.store(true, Ordering::Relaxed);
                self.metrics.forget(&entry.labels);
                tracing::info!(namespace = %key.namespace, task_hub = %key.task_hub, "task hub no longer asked about: dropped");
            }
        }
        self.metrics.hubs_tracked.set(hubs.len() as i64);
        idle
    }

    /// Merges a report into its hub and publishes the result.
    pub fn apply_report(&self, entry: &HubEntry, report: &ValidReport, now: UnixMs) {
        let change = entry.with_state(|s| {
            let first = !s.is_observed();
            s.apply_report(report, now);
            let change = if first { s.evaluate(now, None) } else { None };
            entry.publish(s, now, &self.metrics);
            change
        });
        self.metrics.reports_received.get_or_create(&entry.labels).inc();
        self.changed(entry, change);
    }

    /// Merges a probe reading (`None`: the hub is not provisioned) and publishes the result.
    pub fn apply_probe(&self, entry: &HubEntry, reading: Option<&ProbeReading>, now: UnixMs) {
        let change = entry.with_state(|s| {
            let first = !s.is_observed();
            match reading {
                Some(reading) => s.apply_probe(reading, now),
                None => s.apply_not_provisioned(),
            }
            let change = if first { s.evaluate(now, None) } else { None };
            entry.publish(s, now, &self.metrics);
            change
        });
        self.changed(entry, change);
    }

    /// One sampling interval for one hub: rings, decision, activity.
    pub fn evaluate(&self, entry: &HubEntry, workers: Option<u32>, now: UnixMs) {
        let change = entry.with_state(|s| {
            s.forget_silent_pods(now, 10 * 60 * 1000);
            let change = s.evaluate(now, workers);
            entry.publish(s, now, &self.metrics);
            change
        });
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

    #[test]
    fn hubs_nobody_asks_about_are_dropped_and_their_probe_told_to_stop() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let key = HubKey::new("apps", "IdleHub");
        let entry = registry.track(&key, "IdleHub", None);
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
    fn a_hub_with_an_open_activity_stream_is_kept() {
        let registry = Registry::new(Arc::new(Metrics::new()), 60_000);
        let key = HubKey::new("apps", "PushHub");
        let entry = registry.track(&key, "PushHub", None);
        let _stream = entry.subscribe_activity();
        assert!(registry.evict_idle(UnixMs::now().plus_ms(3_600_000), 60_000).is_empty());
    }
}
