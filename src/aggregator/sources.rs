//! What the aggregator needs from outside storage and the reports, as traits it owns: how
//! many workers a hub's scale target runs ([`WorkerCountSource`]), who a report's bearer
//! token belongs to ([`ReportAuthenticator`]), where a recommendation change is recorded
//! ([`RecommendationRecorder`]), and where each pod's scale-in rank is kept
//! ([`PodDeletionCosts`]). `crate::kubernetes` implements them against the API
//! server and depends on this module, never the reverse; the composition root
//! (`crate::app`) plugs them in. The stand-alone worker count ([`LiveReportingPods`]) lives
//! here.

use std::future::Future;
use std::pin::Pin;

pub use super::hub::RecommendationChange;
use crate::proto::report::PodRef;

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The ScaledObject KEDA asks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScaledObjectKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Where the worker count comes from.
pub trait WorkerCountSource: Send + Sync + 'static {
    /// The number of replicas the ScaledObject's scale target runs now, or `None` when this
    /// source cannot tell (the caller then falls back to the live reporting pods).
    fn worker_count<'a>(&'a self, scaled_object: &'a ScaledObjectKey) -> BoxFuture<'a, Option<u32>>;
}

/// Who a report may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportIdentity {
    /// The namespace the token was issued in.
    pub namespace: String,
    /// The pod the token is bound to.
    pub pod_name: String,
}

/// Why a report's credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No or unreadable credentials (gRPC UNAUTHENTICATED).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials for someone else (gRPC PERMISSION_DENIED).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

/// Checks a report's bearer token.
pub trait ReportAuthenticator: Send + Sync + 'static {
    /// Checks `bearer_token` (without the `Bearer ` prefix; `None` when the call had none)
    /// and returns whose it is. Implementations never accept on error.
    fn authenticate<'a>(
        &'a self,
        bearer_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<ReportIdentity, AuthError>>;
}

/// The stand-alone worker count: this source never knows, so the aggregator counts the pods
/// whose sidecars report live for the hub (fresh reports, not leaving). Used until the
/// Kubernetes source (which reads the scale target's replicas) is plugged in.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveReportingPods;

impl WorkerCountSource for LiveReportingPods {
    fn worker_count<'a>(&'a self, _scaled_object: &'a ScaledObjectKey) -> BoxFuture<'a, Option<u32>> {
        Box::pin(async { None })
    }
}

/// Records a hub's recommendation changes somewhere people look (Kubernetes Events on the
/// ScaledObject). Called synchronously on the sampling path: implementations must not block
/// and never fail (they log and count instead).
pub trait RecommendationRecorder: Send + Sync + 'static {
    /// `scaled_object`'s hub now recommends `change.desired_workers`.
    fn recommendation_changed(&self, scaled_object: &ScaledObjectKey, change: &RecommendationChange);
}

/// One reporting pod's scale-in rank: the value of its `controller.kubernetes.io/pod-deletion-cost`
/// annotation (KEP-2255: the ReplicaSet removes the pod with the lowest cost first).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodCost {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// Its cost: the more work it holds, the higher (the pod holding least goes first).
    pub cost: i32,
}

/// Keeps each reporting pod's deletion cost on the pod. Called by the sampling loop with the
/// whole picture of one hub's live pods each time; implementations write only what changed,
/// rate-limited, never block the caller, and never fail (they log and count instead).
pub trait PodDeletionCosts: Send + Sync + 'static {
    /// The costs the live pods of one hub should carry now.
    fn update(&self, costs: Vec<PodCost>);
}

/// Checks that a report from `identity` speaks for `report_pod`: a pod may only report for
/// itself (PERMISSION_DENIED otherwise).
pub fn authorize(identity: &ReportIdentity, report_pod: &PodRef) -> Result<(), AuthError> {
    if identity.namespace == report_pod.namespace && identity.pod_name == report_pod.name {
        Ok(())
    } else {
        Err(AuthError::PermissionDenied(format!(
            "the token belongs to pod {}/{} but the report is for pod {}/{}",
            identity.namespace, identity.pod_name, report_pod.namespace, report_pod.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_accepts_only_the_pod_the_token_names() {
        let identity = ReportIdentity { namespace: "apps".into(), pod_name: "worker-1".into() };
        let pod = |namespace: &str, name: &str| PodRef { namespace: namespace.into(), name: name.into() };
        assert_eq!(authorize(&identity, &pod("apps", "worker-1")), Ok(()));
        assert!(matches!(
            authorize(&identity, &pod("other", "worker-1")),
            Err(AuthError::PermissionDenied(_))
        ));
        assert!(matches!(
            authorize(&identity, &pod("apps", "worker-2")),
            Err(AuthError::PermissionDenied(_))
        ));
    }
}
