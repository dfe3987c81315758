//! The two things the aggregator may learn from outside storage and the reports: how many
//! workers a hub's scale target runs, and who a report's bearer token belongs to. Each has a
//! Kubernetes implementation (issue #5) and a stand-alone one (live reporting pods; no
//! authentication).

use std::future::Future;
use std::pin::Pin;

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
