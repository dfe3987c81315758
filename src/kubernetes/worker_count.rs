//! How many workers a hub runs, as Kubernetes sees it: the ScaledObject's
//! `spec.scaleTargetRef` names the scale target, whose `/scale` subresource says
//! `status.replicas`. Works for Deployments, StatefulSets and any kind with a scale
//! subresource, without CRD types (the ScaledObject is read as a dynamic object).
//!
//! The cache decides on the `now` it is given ([`KubeWorkerCount::worker_count_at`]), so its
//! TTL is tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::metrics::{OutcomeCounter, outcome_labels};
use super::{Error, scaled_objects};
use crate::aggregator::sources::{BoxFuture, ScaledObjectKey, WorkerCountSource};
use crate::clock::UnixMs;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::{GroupVersion, GroupVersionKind};
use prometheus_client::registry::Registry;

/// The default TTL of a ScaledObject's `scaleTargetRef`, which changes far more rarely than
/// the replica count.
const DEFAULT_TARGET_TTL: Duration = Duration::from_secs(60);
/// Beyond this many ScaledObjects remembered, expired entries are dropped.
const MAX_ENTRIES: usize = 10_000;

/// What a worker-count lookup ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Answered from the cache (a remembered failure is a `cache_hit` too).
    CacheHit,
    /// Read from the API server.
    Fetched,
    /// The API server could not tell; the caller falls back to the live reporting pods.
    Failed,
}

outcome_labels!(Lookup { CacheHit => "cache_hit", Fetched => "fetched", Failed => "failed" });

/// The scale target a ScaledObject names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScaleTarget {
    api_version: String,
    kind: String,
    name: String,
}

/// What is remembered per ScaledObject.
#[derive(Debug, Default)]
struct Entry {
    target: Option<(ScaleTarget, UnixMs)>,
    /// The last answer (`None` after a failure) and when it was asked for.
    replicas: Option<(Option<u32>, UnixMs)>,
    /// Whether the last read failed, so a lasting failure is logged once, not every TTL.
    failing: bool,
}

/// [`WorkerCountSource`] over the Kubernetes API; see the module docs.
///
/// Plug it in as `Arc::new(KubeWorkerCount::new(client, ttl)) as Arc<dyn WorkerCountSource>`
/// (or [`super::KubeContext::worker_count`]).
pub struct KubeWorkerCount {
    client: kube::Client,
    ttl: Duration,
    target_ttl: Duration,
    /// One lock per ScaledObject so concurrent askers of one hub wait for a single read.
    entries: Mutex<HashMap<ScaledObjectKey, Arc<tokio::sync::Mutex<Entry>>>>,
    lookups: OutcomeCounter<Lookup>,
}

impl KubeWorkerCount {
    /// A source that reuses each answer (and each failure) for `ttl`.
    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            target_ttl: DEFAULT_TARGET_TTL.max(ttl),
            entries: Mutex::new(HashMap::new()),
            lookups: OutcomeCounter::default(),
        }
    }

    /// Adds `durable_scaler_aggregator_kube_worker_count_lookups_total{outcome}` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.lookups.register(
            registry,
            "durable_scaler_aggregator_kube_worker_count_lookups",
            "Worker-count lookups through the Kubernetes API by outcome (cache_hit, fetched, failed: \
             the aggregator fell back to the live reporting pods)",
        );
    }

    fn entry(&self, key: &ScaledObjectKey, now: UnixMs) -> Arc<tokio::sync::Mutex<Entry>> {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(key) {
            let ttl = self.ttl;
            entries.retain(|_, entry| {
                entry
                    .try_lock()
                    .map_or(true, |entry| entry.replicas.is_some_and(|(_, read_at)| now.since(read_at) < ttl))
            });
        }
        entries.entry(key.clone()).or_default().clone()
    }

    /// The worker count as [`WorkerCountSource::worker_count`] answers it, at `now`: a
    /// remembered answer (or failure) is reused while `now` is within the TTL of when it was
    /// asked for.
    pub async fn worker_count_at(&self, key: &ScaledObjectKey, now: UnixMs) -> Option<u32> {
        let entry = self.entry(key, now);
        let mut entry = entry.lock().await;
        if let Some((replicas, read_at)) = entry.replicas
            && now.since(read_at) < self.ttl
        {
            self.lookups.inc(Lookup::CacheHit);
            return replicas;
        }
        let result = self.read(key, &mut entry, now).await;
        let replicas = match result {
            Ok(replicas) => {
                if entry.failing {
                    tracing::info!(scaled_object = %so_name(key), replicas, "worker count readable again");
                }
                entry.failing = false;
                self.lookups.inc(Lookup::Fetched);
                Some(replicas)
            }
            Err(error) => {
                if !entry.failing {
                    tracing::warn!(
                        scaled_object = %so_name(key), %error,
                        "cannot read the worker count from Kubernetes; using the live reporting pods"
                    );
                }
                entry.failing = true;
                // The target may have been renamed or replaced: read the ScaledObject again.
                entry.target = None;
                self.lookups.inc(Lookup::Failed);
                None
            }
        };
        entry.replicas = Some((replicas, now));
        replicas
    }

    async fn read(&self, key: &ScaledObjectKey, entry: &mut Entry, now: UnixMs) -> Result<u32, Error> {
        let target = match &entry.target {
            Some((target, read_at)) if now.since(*read_at) < self.target_ttl => target.clone(),
            _ => {
                let target = self.read_target(key).await?;
                entry.target = Some((target.clone(), now));
                target
            }
        };
        let what = || format!("scale of {} {}/{}", target.kind, key.namespace, target.name);
        let group_version: GroupVersion = target.api_version.parse().map_err(|_| Error::Shape {
            what: format!("ScaledObject {}", so_name(key)),
            detail: format!("spec.scaleTargetRef.apiVersion {:?} is not group/version", target.api_version),
        })?;
        let gvk = GroupVersionKind::gvk(&group_version.group, &group_version.version, &target.kind);
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &ApiResource::from_gvk(&gvk));
        let scale = api.get_scale(&target.name).await.map_err(|source| Error::api(what(), source))?;
        let replicas = scale.status.map(|status| status.replicas).unwrap_or(0);
        u32::try_from(replicas)
            .map_err(|_| Error::Shape { what: what(), detail: format!("status.replicas is {replicas}") })
    }

    async fn read_target(&self, key: &ScaledObjectKey) -> Result<ScaleTarget, Error> {
        let what = || format!("ScaledObject {}", so_name(key));
        let api = scaled_objects(&self.client, &key.namespace);
        let object = api.get(&key.name).await.map_err(|source| Error::api(what(), source))?;
        scale_target(&object.data).map_err(|detail| Error::Shape { what: what(), detail: detail.to_owned() })
    }
}

/// Reads `spec.scaleTargetRef` with KEDA's defaults (kind Deployment, apiVersion apps/v1).
fn scale_target(data: &serde_json::Value) -> Result<ScaleTarget, &'static str> {
    let reference = data.pointer("/spec/scaleTargetRef").ok_or("spec.scaleTargetRef is missing")?;
    let field =
        |name: &str| reference.get(name).and_then(serde_json::Value::as_str).filter(|s| !s.is_empty());
    let name = field("name").ok_or("spec.scaleTargetRef.name is missing")?;
    Ok(ScaleTarget {
        api_version: field("apiVersion").unwrap_or("apps/v1").to_owned(),
        kind: field("kind").unwrap_or("Deployment").to_owned(),
        name: name.to_owned(),
    })
}

fn so_name(key: &ScaledObjectKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

impl WorkerCountSource for KubeWorkerCount {
    fn worker_count<'a>(&'a self, scaled_object: &'a ScaledObjectKey) -> BoxFuture<'a, Option<u32>> {
        Box::pin(self.worker_count_at(scaled_object, UnixMs::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scale_target_ref_defaults_to_an_apps_v1_deployment() {
        let target = scale_target(&json!({"spec": {"scaleTargetRef": {"name": "app"}}})).unwrap();
        assert_eq!(
            target,
            ScaleTarget { api_version: "apps/v1".into(), kind: "Deployment".into(), name: "app".into() }
        );
    }

    #[test]
    fn scale_target_ref_keeps_an_explicit_kind_and_api_version() {
        let data = json!({"spec": {"scaleTargetRef": {"name": "db", "kind": "StatefulSet", "apiVersion": "apps/v1"}}});
        assert_eq!(scale_target(&data).unwrap().kind, "StatefulSet");
    }

    #[test]
    fn scale_target_ref_without_a_name_is_refused() {
        assert!(scale_target(&json!({"spec": {"scaleTargetRef": {}}})).is_err());
        assert!(scale_target(&json!({"spec": {}})).is_err());
    }
}
