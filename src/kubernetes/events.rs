//! Kubernetes Events (events.k8s.io/v1) on a ScaledObject when its hub's recommendation
//! changes, so `kubectl describe scaledobject` shows what the aggregator decided and why.
//!
//! Rate-limited per ScaledObject: at most one Event per minimum interval. Changes inside the
//! interval are folded: the latest wins and is recorded when the interval ends, its note
//! saying how many changes it stands for, so a flapping hub cannot flood the API server.
//! Failures are logged and counted, never returned: Events are a courtesy, not a duty.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::metrics::{OutcomeCounter, outcome_labels};
use super::{SCALED_OBJECT_API_VERSION, SCALED_OBJECT_KIND, scaled_objects};
use crate::aggregator::sources::ScaledObjectKey;

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

/// A hub's new recommendation, as the aggregator logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecommendationChange {
    /// The previous desired worker count, when there was one.
    pub previous: Option<u32>,
    /// The new desired worker count.
    pub workers: u32,
    /// The heuristic's reason, in words.
    pub reason: String,
}

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
    last: Option<(Instant, u32)>,
    /// The latest change not yet recorded, and how many changes it stands for.
    pending: Option<(RecommendationChange, u32)>,
    /// Whether a task waits to record `pending` at the end of the interval.
    flush_scheduled: bool,
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
/// [`EventRecorder::recommendation_changed`] from inside the Tokio runtime.
#[derive(Clone)]
pub struct EventRecorder {
    inner: Arc<Inner>,
}

impl EventRecorder {
    /// A recorder reporting as `reporting_instance` (this pod's name), at most one Event per
    /// ScaledObject per `min_interval` (30 s is a good value).
    pub fn new(client: kube::Client, reporting_instance: impl Into<String>, min_interval: Duration) -> Self {
        let mut reporting_instance: String = reporting_instance.into();
        truncate(&mut reporting_instance, 128);
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

    /// Records that `scaled_object`'s recommendation changed. Never blocks and never fails:
    /// the Event is created in the background, or folded into the next one when the last
    /// Event on this ScaledObject is younger than the minimum interval.
    pub fn recommendation_changed(&self, scaled_object: &ScaledObjectKey, change: RecommendationChange) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("EventRecorder used outside the Tokio runtime; no Event recorded");
            self.inner.outcomes.inc(Outcome::Failed);
            return;
        };
        let now = Instant::now();
        let mut limiters = self.inner.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if limiters.len() >= MAX_ENTRIES && !limiters.contains_key(scaled_object) {
            let min_interval = self.inner.min_interval;
            limiters.retain(|_, limiter| {
                limiter.flush_scheduled
                    || limiter.last.is_some_and(|(at, _)| now.duration_since(at) < min_interval)
            });
        }
        let limiter = limiters.entry(scaled_object.clone()).or_default();
        let quiet = limiter.last.is_none_or(|(at, _)| now.duration_since(at) >= self.inner.min_interval);
        if quiet && !limiter.flush_scheduled {
            limiter.last = Some((now, change.workers));
            let inner = self.inner.clone();
            let key = scaled_object.clone();
            runtime.spawn(async move { inner.record(&key, &change, 1).await });
            return;
        }
        // Inside the interval: the latest change waits for its end; an earlier waiting one is
        // folded into it.
        let folded = match limiter.pending.take() {
            Some((_, folded)) => {
                self.inner.outcomes.inc(Outcome::Suppressed);
                folded + 1
            }
            None => 1,
        };
        limiter.pending = Some((change, folded));
        if !limiter.flush_scheduled {
            limiter.flush_scheduled = true;
            let due = limiter.last.map_or(now, |(at, _)| at + self.inner.min_interval);
            let inner = self.inner.clone();
            let key = scaled_object.clone();
            runtime.spawn(async move {
                tokio::time::sleep_until(due).await;
                inner.flush(&key).await;
            });
        }
    }
}

impl Inner {
    /// Records the change waiting for `key` at the end of its interval, unless it only
    /// repeats what the last Event said.
    async fn flush(&self, key: &ScaledObjectKey) {
        let pending = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(limiter) = limiters.get_mut(key) else { return };
            limiter.flush_scheduled = false;
            let Some((change, folded)) = limiter.pending.take() else { return };
            if limiter.last.is_some_and(|(_, workers)| workers == change.workers) {
                // The hub flapped back to what the last Event already says.
                self.outcomes.inc(Outcome::Suppressed);
                return;
            }
            limiter.last = Some((Instant::now(), change.workers));
            (change, folded)
        };
        self.record(key, &pending.0, pending.1).await;
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
            Some(previous) => format!("desired workers {previous} -> {}: {}", change.workers, change.reason),
            None => format!("desired workers {}: {}", change.workers, change.reason),
        };
        if folded > 1 {
            note = format!(
                "{note} (latest of {folded} changes within {:?}; the earlier ones were not recorded)",
                self.min_interval
            );
        }
        truncate(&mut note, MAX_NOTE_BYTES);
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

/// Shortens `text` to at most `max` bytes on a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_whole_characters() {
        let mut text = "aé".repeat(600);
        truncate(&mut text, MAX_NOTE_BYTES);
        assert!(text.len() <= MAX_NOTE_BYTES);
        assert!(text.ends_with('a') || text.ends_with('é'));
    }
}
