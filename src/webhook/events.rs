//! `InjectionSkipped` Events: an opted-in pod that gets no sidecar is reported where its
//! operator looks (`kubectl describe replicaset/...`, `kubectl get events`), not only in an
//! admission warning, which goes to whoever created the pod (for a Deployment's pods, the
//! ReplicaSet controller, whose warnings nobody reads).
//!
//! One Event per owner per window ([`SkipLimiter`], deciding on the `now` it is given): a
//! ReplicaSet of 50 pods that are all skipped for the same reason makes one Event, not 50.
//! Every skip is still logged and counted (`durable_scaler_webhook_skipped_total{reason}`).
//! Failures to create the Event are logged, never returned: the pod is admitted either way.
//!
//! The Event follows events.k8s.io/v1 as the API server validates it
//! (kubernetes/kubernetes `pkg/apis/core/validation/events.go`, `ValidateEventCreate`):
//! `eventTime`, `reportingController` (a qualified name), `reportingInstance`, `action` and
//! `reason` set, `note` at most 1 kB, no deprecated fields, and created in the namespace of
//! the object it is about. RBAC: `create` on `events.k8s.io/events` in app namespaces.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

use super::review::{Regarding, Skipped};
use crate::clock::UnixMs;

/// The controller name recorded on every Event.
pub const REPORTING_CONTROLLER: &str = "durable-scaler.io/webhook";
/// The Event reason.
pub const REASON: &str = "InjectionSkipped";
/// The Event action (what was not done).
const ACTION: &str = "InjectSidecar";
/// The API server refuses longer notes.
const MAX_NOTE_BYTES: usize = 1024;
/// The least time between two Events on one owner.
pub const EVENT_WINDOW: Duration = Duration::from_secs(300);
/// Beyond this many owners remembered, those outside the window are forgotten.
const MAX_ENTRIES: usize = 10_000;

/// An owner: namespace and object.
type OwnerKey = (String, Regarding);

/// At most one Event per owner per window.
#[derive(Debug)]
pub struct SkipLimiter {
    window: Duration,
    last: HashMap<OwnerKey, UnixMs>,
}

impl SkipLimiter {
    /// A limiter allowing one Event per owner per `window`.
    pub fn new(window: Duration) -> Self {
        Self { window, last: HashMap::new() }
    }

    /// True when an Event on `owner` in `namespace` may be created at `now` (and remembers
    /// that it was).
    pub fn allow(&mut self, namespace: &str, owner: &Regarding, now: UnixMs) -> bool {
        let key = (namespace.to_owned(), owner.clone());
        if self.last.get(&key).is_some_and(|at| now.since(*at) < self.window) {
            return false;
        }
        if self.last.len() >= MAX_ENTRIES {
            let window = self.window;
            self.last.retain(|_, at| now.since(*at) < window);
        }
        self.last.insert(key, now);
        true
    }
}

/// Creates `InjectionSkipped` Events (when it has a client) through the limiter; cheap to
/// clone.
#[derive(Clone)]
pub struct SkipRecorder {
    client: Option<kube::Client>,
    reporting_instance: String,
    limiter: Arc<Mutex<SkipLimiter>>,
}

impl std::fmt::Debug for SkipRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkipRecorder")
            .field("api", &self.client.is_some())
            .field("reporting_instance", &self.reporting_instance)
            .finish_non_exhaustive()
    }
}

impl SkipRecorder {
    /// A recorder creating Events through `client` (none: log only) as `reporting_instance`
    /// (this pod's name), at most one per owner per `window`.
    pub fn new(client: Option<kube::Client>, reporting_instance: &str, window: Duration) -> Self {
        let mut reporting_instance = reporting_instance.to_owned();
        crate::contract::truncate(&mut reporting_instance, 128);
        Self { client, reporting_instance, limiter: Arc::new(Mutex::new(SkipLimiter::new(window))) }
    }

    /// Logs `skipped` and, unless an Event on the same owner was created within the window,
    /// creates one in the background.
    pub fn skipped(&self, skipped: &Skipped, now: UnixMs) {
        let owner = skipped.regarding.as_ref().map(|r| format!("{}/{}", r.kind, r.name)).unwrap_or_default();
        tracing::info!(
            namespace = %skipped.namespace, %owner, reason = skipped.reason.label(), note = %skipped.note,
            "sidecar injection skipped"
        );
        let (Some(client), Some(regarding)) = (&self.client, &skipped.regarding) else { return };
        let allowed = self.limiter.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).allow(
            &skipped.namespace,
            regarding,
            now,
        );
        if !allowed {
            return;
        }
        let event = event(skipped, regarding, &self.reporting_instance, now);
        let api: Api<Event> = Api::namespaced(client.clone(), &skipped.namespace);
        tokio::spawn(async move {
            if let Err(error) = api.create(&PostParams::default(), &event).await {
                tracing::warn!(%error, "cannot record the skipped injection as a Kubernetes Event");
            }
        });
    }
}

/// The events.k8s.io/v1 Event for `skipped`, about `regarding`, at `now`.
fn event(skipped: &Skipped, regarding: &Regarding, reporting_instance: &str, now: UnixMs) -> Event {
    let mut note = format!("{}: {}", skipped.reason.label(), skipped.note);
    crate::contract::truncate(&mut note, MAX_NOTE_BYTES);
    let event_time = k8s_openapi::jiff::Timestamp::from_millisecond(now.0)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    Event {
        metadata: ObjectMeta {
            // The API server appends a random suffix (and shortens a long prefix).
            generate_name: Some(format!("{}.", regarding.name)),
            namespace: Some(skipped.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(event_time)),
        action: Some(ACTION.to_owned()),
        reason: Some(REASON.to_owned()),
        note: Some(note),
        // Warning: the pod asked for a sidecar and did not get one.
        type_: Some("Warning".to_owned()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(reporting_instance.to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some(regarding.api_version.clone()),
            kind: Some(regarding.kind.clone()),
            name: Some(regarding.name.clone()),
            namespace: Some(skipped.namespace.clone()),
            uid: regarding.uid.clone(),
            ..ObjectReference::default()
        }),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMs = UnixMs(1_700_000_000_000);

    fn owner(name: &str) -> Regarding {
        Regarding { api_version: "apps/v1".into(), kind: "ReplicaSet".into(), name: name.into(), uid: None }
    }

    #[test]
    fn one_event_per_owner_within_the_window() {
        let mut limiter = SkipLimiter::new(EVENT_WINDOW);
        assert!(limiter.allow("apps", &owner("a"), T0));
        assert!(!limiter.allow("apps", &owner("a"), T0.plus_ms(299_999)));
        assert!(limiter.allow("apps", &owner("a"), T0.plus(EVENT_WINDOW)));
    }

    #[test]
    fn owners_are_limited_separately_by_namespace_and_name() {
        let mut limiter = SkipLimiter::new(EVENT_WINDOW);
        assert!(limiter.allow("apps", &owner("a"), T0));
        assert!(limiter.allow("apps", &owner("b"), T0));
        assert!(limiter.allow("other", &owner("a"), T0));
    }

    #[test]
    fn the_note_is_cut_to_the_api_servers_limit() {
        let skipped = Skipped {
            reason: super::super::inject::SkipReason::Other,
            note: "é".repeat(2000),
            namespace: "apps".into(),
            regarding: Some(owner("a")),
        };
        let event = event(&skipped, &owner("a"), "webhook-0", T0);
        assert!(event.note.unwrap().len() <= MAX_NOTE_BYTES);
        assert_eq!(event.metadata.namespace.as_deref(), Some("apps"));
        assert!(event.event_time.is_some());
    }
}
