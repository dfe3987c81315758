//! Kubernetes Events (events.k8s.io/v1) on a ScaledObject when its hub's recommendation
//! changes, so `kubectl describe scaledobject` shows what the aggregator decided and why.
//!
//! Rate-limited per ScaledObject: at most one Event per minimum interval. Changes inside the
//! interval are folded: the latest wins and is recorded when the interval ends, its note
//! saying how many changes it stands for, so a flapping hub cannot flood the API server.
//! Failures are logged and counted, never returned: Events are a courtesy, not a duty.
//!
//! The rate limit is a plain value ([`Limiter`]) that decides on the `now` it is given, so
//! its rules are unit-tested without waiting; only the recorder's entry point reads the clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::metrics::{OutcomeCounter, outcome_labels};
use super::{SCALED_OBJECT_API_VERSION, SCALED_OBJECT_KIND, scaled_objects};
use crate::aggregator::sources::{RecommendationChange, RecommendationRecorder, ScaledObjectKey};
use crate::clock::UnixMs;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use prometheus_client::registry::Registry;

/// The controller name recorded on every Event.
const REPORTING_CONTROLLER: &str = "durable-scaler.io/aggregator";
/// The Event reason (UpperCamelCase, as Kubernetes reasons are).
const REASON: &str = "RecommendationChanged";
/// The Event action.
const ACTION: &str = "Scale";
/// The API server refuses notes longer than 1 kB.
const MAX_NOTE_BYTES: usize = 1024;
/// Beyond this many ScaledObjects remembered, quiet ones are forgotten.
const MAX_ENTRIES: usize = 10_000;

/// What recording one change ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// An Event was created.
    Created,
    /// The change was folded into a later Event (rate limit) or repeated what the last Event
    /// said.
    Suppressed,
    /// Creating the Event failed.
    Failed,
}

outcome_labels!(Outcome { Created => "created", Suppressed => "suppressed", Failed => "failed" });

/// Per-ScaledObject rate-limit state.
#[derive(Debug, Default)]
struct Limiter {
    /// When the last Event was sent and the worker count it said.
    last: Option<(UnixMs, u32)>,
    /// The latest change not yet recorded, and how many changes it stands for.
    pending: Option<(RecommendationChange, u32)>,
    /// Whether a task waits to record `pending` at the end of the interval.
    flush_scheduled: bool,
}

/// What the limiter decided for one change.
#[derive(Debug, PartialEq)]
enum Offer {
    /// Record it now.
    Record,
    /// It waits for the end of the interval, at `due`; schedule the flush.
    Schedule { due: UnixMs },
    /// It replaced the change waiting for the flush already scheduled.
    Folded,
}

/// What the end of an interval records.
#[derive(Debug, PartialEq)]
enum Flush {
    /// This change, standing for this many.
    Record(RecommendationChange, u32),
    /// The waiting change repeats what the last Event said.
    Repeat,
    /// Nothing waits.
    Nothing,
}

impl Limiter {
    /// Decides what to do with `change` at `now`, at most one Event per `min_interval`.
    fn offer(&mut self, change: RecommendationChange, now: UnixMs, min_interval: Duration) -> Offer {
        let quiet = self.last.is_none_or(|(at, _)| now.since(at) >= min_interval);
        if quiet && !self.flush_scheduled {
            self.last = Some((now, change.desired_workers));
            return Offer::Record;
        }
        // Inside the interval: the latest change waits for its end; an earlier waiting one is
        // folded into it.
        let folded = self.pending.take().map_or(1, |(_, folded)| folded + 1);
        self.pending = Some((change, folded));
        if self.flush_scheduled {
            // A change waits only while its flush is scheduled: this one replaced it.
            return Offer::Folded;
        }
        self.flush_scheduled = true;
        Offer::Schedule { due: self.last.map_or(now, |(at, _)| at.plus(min_interval)) }
    }

    /// The end of the interval, at `now`: the waiting change, unless it only repeats what the
    /// last Event said.
    fn flush(&mut self, now: UnixMs) -> Flush {
        self.flush_scheduled = false;
        let Some((change, folded)) = self.pending.take() else { return Flush::Nothing };
        if self.last.is_some_and(|(_, workers)| workers == change.desired_workers) {
            // The hub flapped back to what the last Event already says.
            return Flush::Repeat;
        }
        self.last = Some((now, change.desired_workers));
        Flush::Record(change, folded)
    }

    /// Whether this entry may be forgotten at `now` without losing a rate limit.
    fn idle(&self, now: UnixMs, min_interval: Duration) -> bool {
        !self.flush_scheduled && self.last.is_none_or(|(at, _)| now.since(at) >= min_interval)
    }
}

struct Inner {
    client: kube::Client,
    reporting_instance: String,
    min_interval: Duration,
    limiters: Mutex<HashMap<ScaledObjectKey, Limiter>>,
    outcomes: OutcomeCounter<Outcome>,
}

/// Records recommendation changes as Events on the ScaledObject; see the module docs.
/// Cheap to clone. Build it with [`EventRecorder::new`] (or
/// [`super::KubeContext::event_recorder`]) and call
/// [`RecommendationRecorder::recommendation_changed`] from inside the Tokio runtime.
#[derive(Clone)]
pub struct EventRecorder {
    inner: Arc<Inner>,
}

impl EventRecorder {
    /// A recorder reporting as `reporting_instance` (this pod's name), at most one Event per
    /// ScaledObject per `min_interval` (30 s is a good value).
    pub fn new(client: kube::Client, reporting_instance: impl Into<String>, min_interval: Duration) -> Self {
        let mut reporting_instance: String = reporting_instance.into();
        crate::contract::truncate(&mut reporting_instance, 128);
        Self {
            inner: Arc::new(Inner {
                client,
                reporting_instance,
                min_interval,
                limiters: Mutex::new(HashMap::new()),
                outcomes: OutcomeCounter::default(),
            }),
        }
    }

    /// Adds `durable_scaler_aggregator_kube_events_total{outcome}` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.inner.outcomes.register(
            registry,
            "durable_scaler_aggregator_kube_events",
            "Recommendation changes recorded as Kubernetes Events, by outcome (created, \
             suppressed: folded into a later Event by the rate limit, failed)",
        );
    }

    /// Records that `scaled_object`'s recommendation changed at `now`. Never blocks and never
    /// fails: the Event is created in the background, or folded into the next one when the
    /// last Event on this ScaledObject is younger than the minimum interval.
    pub fn recommendation_changed_at(
        &self,
        scaled_object: &ScaledObjectKey,
        change: &RecommendationChange,
        now: UnixMs,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("EventRecorder used outside the Tokio runtime; no Event recorded");
            self.inner.outcomes.inc(Outcome::Failed);
            return;
        };
        let min_interval = self.inner.min_interval;
        let mut limiters = self.inner.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if limiters.len() >= MAX_ENTRIES && !limiters.contains_key(scaled_object) {
            limiters.retain(|_, limiter| !limiter.idle(now, min_interval));
        }
        let limiter = limiters.entry(scaled_object.clone()).or_default();
        let inner = self.inner.clone();
        let key = scaled_object.clone();
        match limiter.offer(change.clone(), now, min_interval) {
            Offer::Record => {
                let change = change.clone();
                runtime.spawn(async move { inner.record(&key, &change, 1).await });
            }
            Offer::Schedule { due } => {
                let wait = due.since(now);
                runtime.spawn(async move {
                    tokio::time::sleep(wait).await;
                    inner.flush(&key, due).await;
                });
            }
            Offer::Folded => self.inner.outcomes.inc(Outcome::Suppressed),
        }
    }
}

impl RecommendationRecorder for EventRecorder {
    fn recommendation_changed(&self, scaled_object: &ScaledObjectKey, change: &RecommendationChange) {
        self.recommendation_changed_at(scaled_object, change, UnixMs::now());
    }
}

impl Inner {
    /// Records the change waiting for `key` at the end of its interval, unless it only
    /// repeats what the last Event said.
    /// `now` is when the interval ended (the flush was due).
    async fn flush(&self, key: &ScaledObjectKey, now: UnixMs) {
        let flushed = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(limiter) = limiters.get_mut(key) else { return };
            limiter.flush(now)
        };
        match flushed {
            Flush::Record(change, folded) => self.record(key, &change, folded).await,
            Flush::Repeat => self.outcomes.inc(Outcome::Suppressed),
            Flush::Nothing => {}
        }
    }

    /// Creates one Event for `change`, which stands for `folded` changes.
    async fn record(&self, key: &ScaledObjectKey, change: &RecommendationChange, folded: u32) {
        let event = self.event(key, change, folded, self.uid(key).await);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &key.namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => self.outcomes.inc(Outcome::Created),
            Err(error) => {
                self.outcomes.inc(Outcome::Failed);
                tracing::warn!(
                    scaled_object = %format!("{}/{}", key.namespace, key.name), %error,
                    "cannot record the recommendation change as a Kubernetes Event"
                );
            }
        }
    }

    /// The ScaledObject's uid, without which `kubectl describe` does not list the Event; an
    /// Event without it is still better than none.
    async fn uid(&self, key: &ScaledObjectKey) -> Option<String> {
        let api = scaled_objects(&self.client, &key.namespace);
        match api.get(&key.name).await {
            Ok(object) => object.metadata.uid,
            Err(error) => {
                tracing::debug!(%error, "cannot read the ScaledObject's uid for its Event");
                None
            }
        }
    }

    fn event(
        &self,
        key: &ScaledObjectKey,
        change: &RecommendationChange,
        folded: u32,
        uid: Option<String>,
    ) -> Event {
        let mut note = match change.previous {
            Some(previous) => {
                format!("desired workers {previous} -> {}: {}", change.desired_workers, change.reason)
            }
            None => format!("desired workers {}: {}", change.desired_workers, change.reason),
        };
        if folded > 1 {
            note = format!(
                "{note} (latest of {folded} changes within {:?}; the earlier ones were not recorded)",
                self.min_interval
            );
        }
        crate::contract::truncate(&mut note, MAX_NOTE_BYTES);
        Event {
            metadata: ObjectMeta {
                // The API server appends a random suffix (and shortens a long prefix).
                generate_name: Some(format!("{}.", key.name)),
                namespace: Some(key.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            action: Some(ACTION.to_owned()),
            reason: Some(REASON.to_owned()),
            note: Some(note),
            type_: Some("Normal".to_owned()),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.reporting_instance.clone()),
            regarding: Some(ObjectReference {
                api_version: Some(SCALED_OBJECT_API_VERSION.to_owned()),
                kind: Some(SCALED_OBJECT_KIND.to_owned()),
                name: Some(key.name.clone()),
                namespace: Some(key.namespace.clone()),
                uid,
                ..ObjectReference::default()
            }),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(30);
    const T0: UnixMs = UnixMs(1_700_000_000_000);

    fn change(previous: u32, desired_workers: u32) -> RecommendationChange {
        RecommendationChange {
            previous: Some(previous),
            desired_workers,
            workers: previous,
            reason: "r".into(),
        }
    }

    #[test]
    fn the_first_change_is_recorded_at_once() {
        assert_eq!(Limiter::default().offer(change(1, 2), T0, INTERVAL), Offer::Record);
    }

    #[test]
    fn a_change_after_the_interval_is_recorded_at_once() {
        let mut limiter = Limiter::default();
        limiter.offer(change(1, 2), T0, INTERVAL);
        assert_eq!(limiter.offer(change(2, 3), T0.plus(INTERVAL), INTERVAL), Offer::Record);
    }

    #[test]
    fn a_change_inside_the_interval_waits_for_its_end() {
        let mut limiter = Limiter::default();
        limiter.offer(change(1, 2), T0, INTERVAL);
        let offered = limiter.offer(change(2, 3), T0.plus_ms(1_000), INTERVAL);
        assert_eq!(offered, Offer::Schedule { due: T0.plus(INTERVAL) });
    }

    #[test]
    fn changes_inside_the_interval_fold_into_the_latest() {
        let mut limiter = Limiter::default();
        limiter.offer(change(1, 2), T0, INTERVAL);
        limiter.offer(change(2, 3), T0.plus_ms(1_000), INTERVAL);
        assert_eq!(limiter.offer(change(3, 4), T0.plus_ms(2_000), INTERVAL), Offer::Folded);
        assert_eq!(limiter.offer(change(4, 5), T0.plus_ms(3_000), INTERVAL), Offer::Folded);
        assert_eq!(limiter.flush(T0.plus(INTERVAL)), Flush::Record(change(4, 5), 3));
    }

    #[test]
    fn a_change_back_to_the_recorded_count_records_nothing_at_the_end() {
        let mut limiter = Limiter::default();
        limiter.offer(change(1, 2), T0, INTERVAL);
        limiter.offer(change(2, 3), T0.plus_ms(1_000), INTERVAL);
        limiter.offer(change(3, 2), T0.plus_ms(2_000), INTERVAL);
        assert_eq!(limiter.flush(T0.plus(INTERVAL)), Flush::Repeat);
    }

    #[test]
    fn a_flush_starts_the_next_interval() {
        let mut limiter = Limiter::default();
        limiter.offer(change(1, 2), T0, INTERVAL);
        limiter.offer(change(2, 3), T0.plus_ms(1_000), INTERVAL);
        let flushed_at = T0.plus(INTERVAL);
        limiter.flush(flushed_at);
        let offered = limiter.offer(change(3, 4), flushed_at.plus_ms(1_000), INTERVAL);
        assert_eq!(offered, Offer::Schedule { due: flushed_at.plus(INTERVAL) });
    }

    #[test]
    fn only_quiet_entries_may_be_forgotten() {
        let mut limiter = Limiter::default();
        limiter.offer(change(1, 2), T0, INTERVAL);
        assert!(!limiter.idle(T0.plus_ms(1_000), INTERVAL));
        assert!(limiter.idle(T0.plus(INTERVAL), INTERVAL));
        limiter.offer(change(2, 3), T0.plus(INTERVAL).plus_ms(1), INTERVAL);
        limiter.offer(change(3, 4), T0.plus(INTERVAL).plus_ms(2), INTERVAL);
        assert!(!limiter.idle(T0.plus(INTERVAL).plus(INTERVAL).plus(INTERVAL), INTERVAL));
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        let mut text = "aé".repeat(600);
        crate::contract::truncate(&mut text, MAX_NOTE_BYTES);
        assert!(text.len() <= MAX_NOTE_BYTES);
        assert!(text.ends_with('a') || text.ends_with('é'));
    }
}
