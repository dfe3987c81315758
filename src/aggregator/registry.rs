//! The task hubs the aggregator tracks, shared by the KEDA service, the report service, the
//! cold probes and the sampling loop. One lock per hub: its whole [`HubState`] sits behind
//! one short-held mutex, and every change to it returns what changed (`hub::Outcome`), which
//! is published from here without reading the state back: the activity on a watch channel
//! (StreamIsActive follows it), the hub being answerable on another (the first KEDA call
//! waits on it), and the gauges. Beside the lock only the registry's own bookkeeping lives:
//! when a KEDA call or a report last named the hub, and whether it was dropped (atomics, so
//! the registry can pick an idle hub to drop without locking every hub).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::UnixMs;
use crate::contract::limits::{
    HUB_REPLACEABLE_AFTER_MS, MAX_PODS_PER_HUB, MAX_TRACKED_HUBS, MAX_TRACKED_PODS,
};

pub(crate) use super::hub::HubStatus;
use super::hub::{
    Answer, HubKey, HubState, Outcome, PodAdmission, PodsFull, RecommendationChange, Unanswerable,
    ValidReport,
};
use super::metrics::{HubLabels, Metrics, Tracked};
use super::settings::HubSettings;
use super::sources::{PodDeletionCosts, ScaledObjectKey};
use crate::reading::HubReading;

/// A hub's activity as StreamIsActive follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Activity {
    /// IsActive's answer now.
    pub active: bool,
    /// How many inactive -> active transitions there were; a stream sends `true` whenever it
    /// grows, so a short burst between two looks is not lost.
    pub activations: u64,
}

/// One tracked task hub.
#[derive(Debug)]
pub struct HubEntry {
    /// Its key.
    pub key: HubKey,
    labels: HubLabels,
    state: Mutex<HubState>,
    activity: watch::Sender<Activity>,
    /// Every queue was read: KEDA may be answered.
    answerable: watch::Sender<bool>,
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

impl HubEntry {
    /// This hub's status at `now`, for `/hubs` (one lock).
    pub(crate) fn status(&self, now: UnixMs) -> HubStatus {
        self.with_state(|s| s.status(&self.key, now))
    }

    /// KEDA's answer at `now` (one lock).
    pub(crate) fn answer(&self, now: UnixMs) -> Result<Answer, Unanswerable> {
        self.with_state(|s| s.answer(&self.key, now))
    }

    /// True once the hub was dropped for being idle; its probe loop ends.
    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Runs `f` on the hub's state, under its one lock.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut HubState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Follows the hub's activity.
    pub(crate) fn subscribe_activity(&self) -> watch::Receiver<Activity> {
        self.activity.subscribe()
    }

    /// Waits up to `limit` until every queue of the hub was read; true when it was.
    pub(crate) async fn wait_answerable(&self, limit: Duration) -> bool {
        let mut rx = self.answerable.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|read| *read)).await, Ok(Ok(_)))
    }

    /// Publishes what a change did: activity, answerability, and the gauges when it
    /// refreshed them.
    fn publish(&self, outcome: &Outcome, metrics: &Metrics) {
        let active = outcome.active;
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
        if outcome.fully_read {
            self.answerable.send_if_modified(|o| !std::mem::replace(o, true));
        }
        metrics.active.get_or_create(&self.labels).set(i64::from(active));
        let Some(g) = &outcome.gauges else { return };
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.covered_partitions.get_or_create(&self.labels).set(g.covered as i64);
        metrics.uncovered_partitions.get_or_create(&self.labels).set(g.uncovered as i64);
        metrics.held_messages.get_or_create(&self.labels).set(gauge(g.held));
        metrics.timer_messages.get_or_create(&self.labels).set(gauge(g.timers));
        metrics.invisible_work_items.get_or_create(&self.labels).set(gauge(g.invisible_work_items));
        metrics.set_visible_messages(&self.labels, &g.visible);
        metrics.unavailable.get_or_create(&self.labels).set(i64::from(g.unavailable));
        metrics.connection_known.get_or_create(&self.labels).set(i64::from(g.connection_known));
        if let Some((desired, workers)) = g.decision {
            metrics.desired_workers.get_or_create(&self.labels).set(i64::from(desired));
            metrics.workers.get_or_create(&self.labels).set(i64::from(workers));
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
    deletion_costs: Option<Arc<dyn PodDeletionCosts>>,
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
            deletion_costs: None,
        }
    }

    /// Calls `hook` on every recommendation change of a hub a ScaledObject asks about.
    pub(crate) fn with_change_hook(mut self, hook: Option<ChangeHook>) -> Self {
        self.on_change = hook;
        self
    }

    /// Keeps each live pod's deletion cost through `costs` (issue 20), from every sampling
    /// round.
    pub(crate) fn with_deletion_costs(mut self, costs: Option<Arc<dyn PodDeletionCosts>>) -> Self {
        self.deletion_costs = costs;
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

    /// The hub, tracked from now on if it was not; a new hub starts with `settings` when given
    /// (a KEDA call, which then takes them with `HubState::keda_call`), else with the
    /// defaults (a report). At [`MAX_TRACKED_HUBS`] a new hub takes the place of the least
    /// recently named one if that one is idle (see [`HUB_REPLACEABLE_AFTER_MS`]), else it is
    /// refused and counted. Takes no hub's lock.
    pub fn track(
        &self,
        key: &HubKey,
        task_hub: &str,
        settings: Option<&HubSettings>,
    ) -> Result<Arc<HubEntry>, HubsFull> {
        let now = UnixMs::now();
        if let Some(entry) = self.get(key) {
            entry.touched_ms.store(now.as_millis(), Ordering::Relaxed);
            return Ok(entry);
        }
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
                    answerable: watch::Sender::new(false),
                    touched_ms: AtomicI64::new(now.as_millis()),
                    evicted: AtomicBool::new(false),
                })
            })
            .clone();
        entry.touched_ms.store(now.as_millis(), Ordering::Relaxed);
        self.metrics.hubs_tracked.set(hubs.len() as i64);
        Ok(entry)
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

    /// Merges a report into its hub (one lock) and publishes what changed. A new pod is
    /// refused when its hub tracks [`MAX_PODS_PER_HUB`] live pods, or all hubs
    /// [`MAX_TRACKED_PODS`] (then only a silent pod of the same hub can make room). Costs
    /// the same whatever the number of pods of the hub: no step looks at every pod.
    pub fn apply_report(&self, entry: &HubEntry, report: &ValidReport, now: UnixMs) -> Result<(), PodsFull> {
        let may_add = self.pods.load(Ordering::Relaxed) < MAX_TRACKED_PODS;
        let outcome = entry.with_state(|s| s.apply_report_bounded(report, now, MAX_PODS_PER_HUB, may_add));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(full) => {
                self.metrics.count_refused(Tracked::Pod);
                return Err(full);
            }
        };
        match outcome.admission {
            PodAdmission::Added => {
                let tracked = self.pods.fetch_add(1, Ordering::Relaxed) + 1;
                self.metrics.pods_tracked.set(tracked as i64);
            }
            PodAdmission::Replaced => self.metrics.count_replaced(Tracked::Pod),
            PodAdmission::Known | PodAdmission::OutOfOrder => {}
        }
        self.metrics.reports_received.get_or_create(&entry.labels).inc();
        self.published(entry, outcome);
        Ok(())
    }

    /// Merges a probe reading (`None`: the hub is not provisioned) and publishes what changed.
    pub fn apply_probe(&self, entry: &HubEntry, reading: Option<&HubReading>, now: UnixMs) {
        let outcome = entry.with_state(|s| s.apply_probe(reading, now));
        self.published(entry, outcome);
    }

    /// One sampling interval for one hub (one lock): rings, decision, activity, deletion
    /// costs (`HubState::evaluate`; a hub nobody can read now is not re-decided).
    pub fn evaluate(&self, entry: &HubEntry, workers: Option<u32>, now: UnixMs) {
        let mut outcome = entry.with_state(|s| s.evaluate(&entry.key, now, workers));
        self.forget_pods(outcome.forgotten_pods);
        if let (Some(costs), Some(sink)) = (outcome.costs.take(), &self.deletion_costs) {
            sink.update(costs);
        }
        self.published(entry, outcome);
    }

    /// Publishes `outcome`, logs a recommendation change once and hands it to the hook
    /// (Kubernetes Event) when a ScaledObject asks about the hub.
    fn published(&self, entry: &HubEntry, outcome: Outcome) {
        entry.publish(&outcome, &self.metrics);
        let Some(c) = &outcome.change else { return };
        self.changed(entry, c, outcome.scaled_object.as_ref());
    }
}

impl Registry {
    /// One log line per change, and the hook (Kubernetes Event) when a ScaledObject asks.
    fn changed(&self, entry: &HubEntry, c: &RecommendationChange, scaled_object: Option<&ScaledObjectKey>) {
        tracing::info!(
            namespace = %entry.key.namespace,
            task_hub = %entry.key.task_hub,
            desired_workers = c.desired_workers,
            previous = ?c.previous,
            workers = c.workers,
            reason = %c.reason,
            "recommendation changed"
        );
        if let (Some(hook), Some(scaled_object)) = (&self.on_change, scaled_object) {
            hook(scaled_object, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::hub::SidecarNotes;

    /// The probe bookkeeping and the stale check, as the probe and KEDA see them.
    impl HubEntry {
        fn stale_reason(&self, now: UnixMs) -> Option<String> {
            self.with_state(|s| s.stale_reason(&self.key, now))
        }

        fn set_probe_error(&self, error: Option<String>) {
            self.with_state(|s| s.record_probe(error));
        }

        fn set_probe_missed(&self, missed: bool) {
            self.with_state(|s| s.record_probe_missed(missed));
        }
    }
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
            sidecar: SidecarNotes::default(),
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
            sidecar: SidecarNotes::default(),
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
