//! The aggregator's Kubernetes side: the worker count read from a ScaledObject's scale
//! target, the TokenReview check of the sidecars' report tokens, Events on the
//! ScaledObject when a hub's recommendation changes, and each reporting pod's
//! `controller.kubernetes.io/pod-deletion-cost`.
//!
//! Each part implements a trait the aggregator defines in `crate::aggregator::sources`
//! ([`KubeWorkerCount`]: `WorkerCountSource`, [`TokenReviewAuthenticator`]:
//! `ReportAuthenticator`, [`EventRecorder`]: `RecommendationRecorder`,
//! [`PodDeletionCostWriter`]: `PodDeletionCosts`); this module depends
//! on that trait module and nothing else of the aggregator, and the aggregator does not know
//! this module. The composition root (`crate::app`) plugs them in.
//!
//! Everything here talks to the API server through a `kube::Client` built once by
//! [`KubeContext::try_default`]; without any Kubernetes configuration the aggregator runs
//! without this module (worker count from the live reporting pods, `--report-auth none`).
//!
//! The caches and the Event rate limit decide on a `now` they are given
//! ([`crate::clock::UnixMs`]); only the trait entry points read the clock.
//!
//! # RBAC: exactly what the aggregator's service account needs
//!
//! The manifests (`manifests/`) grant these rules and nothing more: nothing cluster-admin,
//! nothing on secrets, no list or watch.
//!
//! | apiGroups | resources | verbs | used by |
//! |---|---|---|---|
//! | `keda.sh` | `scaledobjects` | `get` | [`KubeWorkerCount`] (scaleTargetRef), [`EventRecorder`] (the ScaledObject's uid) |
//! | `apps` | `deployments/scale`, `statefulsets/scale` | `get` | [`KubeWorkerCount`] (`status.replicas`) |
//! | `authentication.k8s.io` | `tokenreviews` | `create` | [`TokenReviewAuthenticator`] |
//! | `events.k8s.io` | `events` | `create` | [`EventRecorder`] (creates only) |
//! | `""` (core) | `pods` | `patch` | [`PodDeletionCostWriter`] (a merge patch of one annotation; the install's ValidatingAdmissionPolicy refuses any other change by this ServiceAccount) |
//!
//! [`RBAC`] is this table as data; the manifests test holds `manifests/` to it.
//!
//! `scaledobjects`, `*/scale` and `events` are namespaced: a ClusterRole bound with a
//! ClusterRoleBinding serves ScaledObjects in every namespace; RoleBindings per namespace
//! restrict the aggregator to those namespaces. `tokenreviews` is cluster-scoped and needs
//! the ClusterRole. A scale target of another kind (anything with a `/scale` subresource)
//! works once its `<resource>/scale` `get` is added to the list.
//!
//! # API calls per hub
//!
//! - Worker count: on a cache miss one `GET` of the target's `/scale`; the ScaledObject's
//!   `scaleTargetRef` is re-read (one more `GET`) only when its own, longer cache expires or
//!   the `/scale` read failed. Hits and misses are cached alike for the TTL, so a hub costs at
//!   most one `/scale` read per TTL however often it is asked, and a broken API costs at most
//!   one attempt per TTL.
//! - Report tokens: one TokenReview `POST` per distinct token, then none until the token
//!   expires (or the cache's maximum age passes).
//! - Events: at most one `GET` of the ScaledObject and one `POST` of an Event per
//!   ScaledObject per minimum event interval.
//! - Pod deletion costs: one `PATCH` per pod whose cost changed, at most
//!   `--pod-deletion-cost-rate` per second over all hubs (`--pod-deletion-cost-burst` at once);
//!   none for a pod whose cost did not change.

mod deletion_cost;
mod events;
mod metrics;
mod token_review;
mod worker_count;

use std::time::Duration;

use crate::contract::env;

/// The aggregator's RBAC (the table above): every rule cluster-wide, since the apps live in
/// any namespace.
pub const RBAC: [crate::contract::RbacRule; 6] = {
    use crate::contract::RbacRule;
    const fn rule(api_group: &'static str, resource: &'static str, verb: &'static str) -> RbacRule {
        RbacRule { api_group, resource, verb, cluster_wide: true }
    }
    [
        rule("keda.sh", "scaledobjects", "get"),
        rule("apps", "deployments/scale", "get"),
        rule("apps", "statefulsets/scale", "get"),
        rule("authentication.k8s.io", "tokenreviews", "create"),
        rule("events.k8s.io", "events", "create"),
        rule("", "pods", "patch"),
    ]
};

pub use deletion_cost::{
    FAILURE_PAUSE, FIELD_MANAGER, POD_DELETION_COST_ANNOTATION, PodDeletionCostWriter, REFUSAL_PAUSE,
    TokenBucket, WritePace, WriteRate,
};
pub use events::EventRecorder;
pub use token_review::TokenReviewAuthenticator;
pub use worker_count::KubeWorkerCount;

/// The API version of KEDA's ScaledObject, read as a dynamic object (no CRD types).
pub(crate) const SCALED_OBJECT_API_VERSION: &str = "keda.sh/v1alpha1";
/// The kind of KEDA's ScaledObject.
pub(crate) const SCALED_OBJECT_KIND: &str = "ScaledObject";

/// What went wrong at this module's boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A call to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being read or written, with the object's namespace and name.
        what: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// An object the API server returned lacks a field this module needs.
    #[error("{what}: {detail}")]
    Shape {
        /// Which object.
        what: String,
        /// What is missing or wrong.
        detail: String,
    },
}

/// KEDA's ScaledObjects in `namespace`, read as dynamic objects (no CRD types needed).
fn scaled_objects(client: &kube::Client, namespace: &str) -> kube::Api<kube::api::DynamicObject> {
    let gvk = kube::core::GroupVersionKind::gvk("keda.sh", "v1alpha1", SCALED_OBJECT_KIND);
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, "scaledobjects");
    kube::Api::namespaced_with(client.clone(), namespace, &resource)
}

impl Error {
    fn api(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Api { what: what.into(), source: Box::new(source) }
    }
}

/// Settings of the Kubernetes side, for the aggregator's command line
/// (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// How long a worker count read from a scale target's `/scale` is reused (failures are
    /// remembered as long, so a broken API is asked once per TTL).
    #[arg(long, env = "DURABLE_SCALER_WORKER_COUNT_TTL", default_value = "5s", value_parser = positive_duration)]
    pub worker_count_ttl: Duration,
    /// The longest a checked report token is trusted without asking the API server again;
    /// never beyond the token's own expiry. 0s checks every report's token.
    #[arg(long, env = "DURABLE_SCALER_TOKEN_CACHE_MAX_AGE", default_value = "5m", value_parser = crate::config::parse_duration)]
    pub token_cache_max_age: Duration,
    /// How many checked report tokens are remembered at most.
    #[arg(long, env = "DURABLE_SCALER_TOKEN_CACHE_SIZE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub token_cache_size: u64,
    /// The least time between two Events on one ScaledObject; changes in between are folded
    /// into the next Event (the latest wins, the others are counted in its note).
    #[arg(long, env = "DURABLE_SCALER_EVENT_MIN_INTERVAL", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub event_min_interval: Duration,
    /// How long one call to the Kubernetes API may take before it counts as failed.
    #[arg(long, env = "DURABLE_SCALER_KUBE_API_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub kube_api_timeout: Duration,
    /// The most `controller.kubernetes.io/pod-deletion-cost` writes per second, over all pods
    /// (with `--pod-deletion-cost` on).
    #[arg(long, env = "DURABLE_SCALER_POD_DELETION_COST_RATE", default_value_t = 5.0, value_parser = positive_rate)]
    pub pod_deletion_cost_rate: f64,
    /// The most pod-deletion-cost writes at once, before the rate applies.
    #[arg(long, env = "DURABLE_SCALER_POD_DELETION_COST_BURST", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_deletion_cost_burst: u32,
    /// This pod's name (downward API), recorded as the `reportingInstance` of every Event;
    /// when unset the start-up code takes `HOSTNAME`, which Kubernetes sets to it too.
    #[arg(long, env = env::POD_NAME)]
    pub pod_name: Option<String>,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
        .and_then(|d| if d.is_zero() { Err(format!("`{text}` must be above zero")) } else { Ok(d) })
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("`{text}` must be a number of writes per second above zero")),
    }
}

impl Default for KubeArgs {
    fn default() -> Self {
        Self {
            worker_count_ttl: Duration::from_secs(5),
            token_cache_max_age: Duration::from_secs(300),
            token_cache_size: 10_000,
            event_min_interval: Duration::from_secs(30),
            kube_api_timeout: Duration::from_secs(5),
            pod_deletion_cost_rate: 5.0,
            pod_deletion_cost_burst: 10,
            pod_name: None,
        }
    }
}

/// A connection to the API server, from which the aggregator builds its Kubernetes sources.
#[derive(Clone)]
pub struct KubeContext {
    client: kube::Client,
    args: KubeArgs,
}

impl std::fmt::Debug for KubeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeContext").field("args", &self.args).finish_non_exhaustive()
    }
}

impl KubeContext {
    /// Connects with the usual inference (KUBECONFIG or `~/.kube/config`, else the pod's
    /// service account). Without any configuration it logs one warning and returns `None`,
    /// and the aggregator falls back to the live reporting pods.
    pub async fn try_default(args: KubeArgs) -> Option<Self> {
        crate::telemetry::install_crypto_provider();
        let mut config = match kube::Config::infer().await {
            Ok(config) => config,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "no Kubernetes configuration found: worker counts come from the live reporting \
                     pods and no Events are recorded"
                );
                return None;
            }
        };
        let timeout = args.kube_api_timeout;
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        match kube::Client::try_from(config) {
            Ok(client) => Some(Self { client, args }),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "the Kubernetes configuration found cannot be used: worker counts come from \
                     the live reporting pods and no Events are recorded"
                );
                None
            }
        }
    }

    /// The worker-count source with the configured TTL.
    pub fn worker_count(&self) -> KubeWorkerCount {
        KubeWorkerCount::new(self.client.clone(), self.args.worker_count_ttl)
    }

    /// The report authenticator with the configured cache bounds.
    pub(crate) fn authenticator(&self) -> TokenReviewAuthenticator {
        TokenReviewAuthenticator::new(self.client.clone())
            .with_cache_max_age(self.args.token_cache_max_age)
            .with_cache_size(usize::try_from(self.args.token_cache_size).unwrap_or(usize::MAX))
    }

    /// The pod-deletion-cost writer at the configured rate (starts its task: call it inside
    /// the Tokio runtime).
    pub fn pod_deletion_costs(&self) -> PodDeletionCostWriter {
        let rate = WriteRate {
            per_second: self.args.pod_deletion_cost_rate,
            burst: self.args.pod_deletion_cost_burst,
        };
        PodDeletionCostWriter::new(self.client.clone(), WritePace::new(rate))
    }

    /// The Event recorder, reporting as `--pod-name` (read at start, see [`KubeArgs`]), else
    /// as `durable-scaler-aggregator`.
    pub(crate) fn event_recorder(&self) -> EventRecorder {
        let instance = self.args.pod_name.clone().unwrap_or_else(|| "durable-scaler-aggregator".to_owned());
        EventRecorder::new(self.client.clone(), instance, self.args.event_min_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_args_defaults_match_the_command_line_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            kube: KubeArgs,
        }
        let parsed = Cli::try_parse_from(["test"]).unwrap().kube;
        let default = KubeArgs::default();
        assert_eq!(parsed.worker_count_ttl, default.worker_count_ttl);
        assert_eq!(parsed.token_cache_max_age, default.token_cache_max_age);
        assert_eq!(parsed.token_cache_size, default.token_cache_size);
        assert_eq!(parsed.event_min_interval, default.event_min_interval);
        assert_eq!(parsed.kube_api_timeout, default.kube_api_timeout);
        assert_eq!(parsed.pod_deletion_cost_rate, default.pod_deletion_cost_rate);
        assert_eq!(parsed.pod_deletion_cost_burst, default.pod_deletion_cost_burst);
    }
}
