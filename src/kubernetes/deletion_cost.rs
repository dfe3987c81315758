//! `controller.kubernetes.io/pod-deletion-cost` on every reporting pod, so that the
//! ReplicaSet removes the pod holding least work first ([`PodDeletionCosts`]).
//!
//! What Kubernetes does with it (KEP-2255, beta and on by default since 1.22): the ReplicaSet
//! controller ranks the pods it may delete with `ActivePodsWithRanks.Less`
//! (kubernetes `pkg/controller/controller_utils.go`; `getPodsToDelete` in
//! `pkg/controller/replicaset/replica_set.go`): unscheduled before scheduled, pending before
//! running, not ready before ready, then the **lower** deletion cost first. The value is a
//! string holding an int32 in decimal (`GetDeletionCostFromPodAnnotations`,
//! `pkg/apis/core/helper/helpers.go`: no `+`, no leading zeros, `strconv.ParseInt(v, 10, 32)`;
//! a missing or invalid value counts as 0). `i32::to_string` writes exactly that form.
//!
//! How it is written: one JSON merge patch (RFC 7386, `application/merge-patch+json`) of
//! `metadata.annotations` per pod, `PATCH /api/v1/namespaces/{ns}/pods/{name}`, which touches
//! nothing else of the pod (the install's ValidatingAdmissionPolicy refuses anything else the
//! aggregator's ServiceAccount would change). A pod is written only when the value it
//! should carry differs from the one last written; the latest value wins while a pod waits
//! its turn, so a pod is never queued twice; and every write takes a token from one bucket
//! ([`TokenBucket`], `--pod-deletion-cost-rate` per second, `--pod-deletion-cost-burst` at
//! once), so a 1,000-pod app whose costs all change costs the API server at most that rate.
//!
//! Outcomes (`durable_scaler_aggregator_pod_deletion_cost_writes_total{outcome}`):
//! - `written`: the pod now carries the value;
//! - `refused` (403 from RBAC, or 422/403 from an admission policy): logged once as a warning
//!   (later ones at debug), counted, the refused value never sent again for that pod, and
//!   every write paused for [`REFUSAL_PAUSE`]: a missing `patch pods` right is a setting of
//!   the cluster, not something a retry fixes, so the API server sees one attempt per pause;
//! - `gone` (404): the pod is forgotten, and not written again for [`GONE_FOR`] while the
//!   aggregator still lists it;
//! - `failed` (anything else: the API server unreachable, 5xx, a timeout): the pod is queued
//!   again and writes pause for [`FAILURE_PAUSE`].
//!
//! [`PodDeletionCosts::update`] never blocks (a short lock and a wake-up); one background task
//! does the writes, one at a time, and ends when the writer is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::{OutcomeCounter, outcome_labels};
use crate::aggregator::sources::{PodCost, PodDeletionCosts};

/// The annotation the ReplicaSet controller reads (k8s.io/api `core/v1/annotation_key_constants.go`,
/// `PodDeletionCost`).
pub const POD_DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The field manager the writes are recorded under in each pod's `managedFields`.
pub const FIELD_MANAGER: &str = "durable-scaler-aggregator";
/// How long every write waits after a refusal (the default of [`WritePace::after_refusal`]).
pub const REFUSAL_PAUSE: Duration = Duration::from_secs(300);
/// How long every write waits after a failure (the API server unreachable or erring).
pub const FAILURE_PAUSE: Duration = Duration::from_secs(5);
/// How long a pod the API server said is gone (404) is not written again, though updates
/// still name it: the aggregator keeps a pod until its sidecar missed three intervals.
const GONE_FOR: Duration = Duration::from_secs(60);
/// A pod no update named for this long is forgotten (it left its hub, or the hub went).
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// The most pods remembered: the aggregator's own limit on tracked pods
/// (`contract::limits`, 20,000 over all hubs).
const MAX_PODS: usize = 20_000;

/// How fast pods may be written: `per_second` on average, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteRate {
    /// Tokens added per second.
    pub per_second: f64,
    /// The bucket's size.
    pub burst: u32,
}

/// The writer's pace: its [`WriteRate`] and how long it stops writing after a refusal or a
/// failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WritePace {
    /// The token bucket.
    pub rate: WriteRate,
    /// No write for this long after a refusal ([`REFUSAL_PAUSE`]).
    pub after_refusal: Duration,
    /// No write for this long after a failure ([`FAILURE_PAUSE`]).
    pub after_failure: Duration,
}

impl WritePace {
    /// `rate` with the default pauses.
    pub fn new(rate: WriteRate) -> Self {
        Self { rate, after_refusal: REFUSAL_PAUSE, after_failure: FAILURE_PAUSE }
    }
}

/// A token bucket that decides on the instant it is given: full at start, `per_second`
/// tokens added per second up to `burst`, one token per write.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: WriteRate,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: WriteRate, now: Instant) -> Self {
        Self { rate, tokens: f64::from(rate.burst), at: now }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(missing / self.rate.per_second).max(Duration::from_millis(1)))
    }
}

/// What one write ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Written,
    Refused,
    Gone,
    Failed,
}

outcome_labels!(Outcome { Written => "written", Refused => "refused", Gone => "gone", Failed => "failed" });

/// A pod, by namespace and name.
type PodKey = (String, String);

/// What is known of one pod.
#[derive(Debug)]
struct Entry {
    /// The value it should carry (the latest update).
    wanted: i32,
    /// The value last written to it, if any.
    written: Option<i32>,
    /// A value the API server refused for it: not sent again.
    refused: Option<i32>,
    /// Whether it waits in the queue.
    queued: bool,
    /// When an update last named it.
    seen: Instant,
    /// The API server said it does not exist (404) at this instant.
    gone_at: Option<Instant>,
}

impl Entry {
    fn needs_write(&self) -> bool {
        self.gone_at.is_none() && self.written != Some(self.wanted) && self.refused != Some(self.wanted)
    }
}

#[derive(Debug)]
struct State {
    pods: HashMap<PodKey, Entry>,
    queue: VecDeque<PodKey>,
    bucket: TokenBucket,
    pace: WritePace,
    /// No write before this instant (after a refusal or failure).
    paused_until: Option<Instant>,
    /// Whether a refusal was logged as a warning already.
    refusal_logged: bool,
}

struct Inner {
    client: kube::Client,
    state: Mutex<State>,
    wake: Arc<Notify>,
    outcomes: OutcomeCounter<Outcome>,
    pending: Gauge,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writing task holds only a weak reference and the wake-up: let it see the drop.
        self.wake.notify_one();
    }
}

/// Keeps `controller.kubernetes.io/pod-deletion-cost` on the pods; see the module docs.
/// Cheap to clone; build it inside the Tokio runtime (it starts its writing task).
#[derive(Clone)]
pub struct PodDeletionCostWriter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PodDeletionCostWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDeletionCostWriter").finish_non_exhaustive()
    }
}

impl PodDeletionCostWriter {
    /// A writer using `client` at `pace`. Starts its task on the current runtime.
    pub fn new(client: kube::Client, pace: WritePace) -> Self {
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            client,
            state: Mutex::new(State {
                pods: HashMap::new(),
                queue: VecDeque::new(),
                bucket: TokenBucket::new(pace.rate, Instant::now()),
                pace,
                paused_until: None,
                refusal_logged: false,
            }),
            wake: wake.clone(),
            outcomes: OutcomeCounter::default(),
            pending: Gauge::default(),
        });
        tokio::spawn(write_loop(Arc::downgrade(&inner), wake));
        Self { inner }
    }

    /// Adds `durable_scaler_aggregator_pod_deletion_cost_writes_total{outcome}` and
    /// `durable_scaler_aggregator_pod_deletion_cost_pending` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.inner.outcomes.register(
            registry,
            "durable_scaler_aggregator_pod_deletion_cost_writes",
            "Writes of controller.kubernetes.io/pod-deletion-cost, by outcome (written; refused: \
             403/422, not retried, writes paused; gone: the pod no longer exists; failed: retried \
             after a pause)",
        );
        registry.register(
            "durable_scaler_aggregator_pod_deletion_cost_pending",
            "Pods whose pod-deletion-cost waits to be written",
            self.inner.pending.clone(),
        );
    }

    /// How many pods wait to be written.
    pub fn pending(&self) -> usize {
        self.inner.lock().queue.len()
    }
}

impl PodDeletionCosts for PodDeletionCostWriter {
    fn update(&self, costs: Vec<PodCost>) {
        let now = Instant::now();
        let mut queued_any = false;
        {
            let mut state = self.inner.lock();
            let State { pods, queue, .. } = &mut *state;
            for cost in costs {
                let key = (cost.namespace, cost.pod);
                if !pods.contains_key(&key) && pods.len() >= MAX_PODS {
                    pods.retain(|_, entry| now.saturating_duration_since(entry.seen) < FORGET_AFTER);
                    queue.retain(|key| pods.contains_key(key));
                    if pods.len() >= MAX_PODS {
                        tracing::debug!(pod = %format!("{}/{}", key.0, key.1), "too many pods remembered; its deletion cost is not kept");
                        continue;
                    }
                }
                let entry = pods.entry(key.clone()).or_insert(Entry {
                    wanted: cost.cost,
                    written: None,
                    refused: None,
                    queued: false,
                    seen: now,
                    gone_at: None,
                });
                entry.wanted = cost.cost;
                entry.seen = now;
                if entry.gone_at.is_some_and(|at| now.saturating_duration_since(at) >= GONE_FOR) {
                    // Long enough: a pod of that name now is a new one (a StatefulSet's).
                    (entry.written, entry.refused, entry.gone_at) = (None, None, None);
                }
                if entry.needs_write() && !entry.queued {
                    entry.queued = true;
                    queue.push_back(key);
                    queued_any = true;
                }
            }
            self.inner.pending.set(i64::try_from(queue.len()).unwrap_or(i64::MAX));
        }
        if queued_any {
            self.inner.wake.notify_one();
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What to do next at `now`: wait (for how long, or for a wake-up), or write a pod.
    fn next(&self, now: Instant) -> Next {
        let mut state = self.lock();
        if let Some(until) = state.paused_until {
            if now < until {
                return Next::Wait(Some(until - now));
            }
            state.paused_until = None;
        }
        // Skip pods that no longer need a write (their value went back to the written one).
        while let Some(key) = state.queue.front() {
            match state.pods.get(key) {
                Some(entry) if entry.needs_write() => break,
                _ => {
                    if let Some(key) = state.queue.pop_front()
                        && let Some(entry) = state.pods.get_mut(&key)
                    {
                        entry.queued = false;
                    }
                }
            }
        }
        if state.queue.is_empty() {
            self.pending.set(0);
            return Next::Wait(None);
        }
        if let Err(wait) = state.bucket.take(now) {
            return Next::Wait(Some(wait));
        }
        let Some(key) = state.queue.pop_front() else { return Next::Wait(None) };
        self.pending.set(i64::try_from(state.queue.len()).unwrap_or(i64::MAX));
        let Some(entry) = state.pods.get_mut(&key) else { return Next::Wait(Some(Duration::ZERO)) };
        entry.queued = false;
        Next::Write(key, entry.wanted)
    }

    /// Writes `cost` to the pod `key` and records the outcome.
    async fn write(&self, key: PodKey, cost: i32) {
        let (namespace, name) = &key;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({"metadata": {"annotations": {POD_DELETION_COST_ANNOTATION: cost.to_string()}}});
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() };
        let result = api.patch(name, &params, &Patch::Merge(&body)).await;
        let now = Instant::now();
        let mut state = self.lock();
        let outcome = match result {
            Ok(_) => {
                if let Some(entry) = state.pods.get_mut(&key) {
                    entry.written = Some(cost);
                }
                requeue_if_needed(&mut state, &key);
                Outcome::Written
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                if let Some(entry) = state.pods.get_mut(&key) {
                    entry.gone_at = Some(now);
                }
                tracing::debug!(pod = %format!("{namespace}/{name}"), "pod gone; its deletion cost is forgotten");
                Outcome::Gone
            }
            Err(kube::Error::Api(status)) if matches!(status.code, 403 | 422) => {
                if let Some(entry) = state.pods.get_mut(&key) {
                    entry.refused = Some(cost);
                }
                state.paused_until = Some(now + state.pace.after_refusal);
                if std::mem::replace(&mut state.refusal_logged, true) {
                    tracing::debug!(pod = %format!("{namespace}/{name}"), code = status.code, message = %status.message, "pod-deletion-cost refused again");
                } else {
                    tracing::warn!(
                        pod = %format!("{namespace}/{name}"),
                        code = status.code,
                        message = %status.message,
                        "the API server refused to set controller.kubernetes.io/pod-deletion-cost: the \
                         aggregator's ServiceAccount needs `patch` on pods (the install's ClusterRole), and \
                         only that annotation may change (the install's ValidatingAdmissionPolicy); writes \
                         pause {} s after each refusal and the refused value is not sent again \
                         (--pod-deletion-cost=false turns the feature off). Further refusals are logged at debug level",
                        state.pace.after_refusal.as_secs()
                    );
                }
                Outcome::Refused
            }
            Err(error) => {
                state.paused_until = Some(now + state.pace.after_failure);
                if let Some(entry) = state.pods.get_mut(&key)
                    && !entry.queued
                {
                    entry.queued = true;
                    state.queue.push_back(key.clone());
                }
                tracing::debug!(pod = %format!("{namespace}/{name}"), %error, "cannot set pod-deletion-cost; retrying after a pause");
                Outcome::Failed
            }
        };
        self.pending.set(i64::try_from(state.queue.len()).unwrap_or(i64::MAX));
        drop(state);
        self.outcomes.inc(outcome);
    }
}

/// Queues `key` again when an update changed its value while it was being written.
fn requeue_if_needed(state: &mut State, key: &PodKey) {
    if let Some(entry) = state.pods.get_mut(key)
        && entry.needs_write()
        && !entry.queued
    {
        entry.queued = true;
        state.queue.push_back(key.clone());
    }
}

/// The writing task's next step.
enum Next {
    /// Wait this long, or until woken when `None`.
    Wait(Option<Duration>),
    /// Write this cost to this pod.
    Write(PodKey, i32),
}

/// Writes what the queue holds, at the bucket's pace, until the writer is dropped.
async fn write_loop(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = match inner.upgrade() {
            Some(inner) => inner.next(Instant::now()),
            None => return,
        };
        match next {
            Next::Write(key, cost) => match inner.upgrade() {
                Some(inner) => inner.write(key, cost).await,
                None => return,
            },
            Next::Wait(Some(wait)) => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = wake.notified() => {}
                }
            }
            Next::Wait(None) => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: WriteRate = WriteRate { per_second: 2.0, burst: 3 };

    #[test]
    fn a_full_bucket_gives_its_burst_at_once_then_waits_for_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RATE, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        assert_eq!(bucket.take(start), Err(Duration::from_millis(500)));
        assert_eq!(bucket.take(start + Duration::from_millis(499)), Err(Duration::from_millis(1)));
        assert_eq!(bucket.take(start + Duration::from_millis(500)), Ok(()));
    }

    #[test]
    fn a_bucket_never_holds_more_than_its_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RATE, start);
        let later = start + Duration::from_secs(3600);
        let taken = (0..10).filter(|_| bucket.take(later).is_ok()).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn over_any_span_a_bucket_gives_at_most_burst_plus_rate_times_the_span() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RATE, start);
        let mut given = 0;
        for step in 0..=1000u64 {
            let now = start + Duration::from_millis(step * 10);
            while bucket.take(now).is_ok() {
                given += 1;
            }
            let span = (step * 10) as f64 / 1000.0;
            assert!(f64::from(given) <= 3.0 + 2.0 * span + 1e-9, "{given} tokens after {span} s");
        }
        assert_eq!(given, 3 + 20, "the rate is reached, not only bounded");
    }

    #[test]
    fn the_annotation_value_is_kubernetes_int32_decimal_form() {
        // GetDeletionCostFromPodAnnotations: no '+', no leading zeros, ParseInt(v, 10, 32).
        for (cost, text) in
            [(0, "0"), (17, "17"), (-5, "-5"), (i32::MAX, "2147483647"), (i32::MIN, "-2147483648")]
        {
            assert_eq!(cost.to_string(), text);
        }
    }
}
