//! The contract between the roles and the manifests: every name, port, path and limit that
//! the webhook writes and the sidecar reads, that the sidecar sends and the aggregator
//! checks, or that `manifests/` must spell the same way. One place, so the two sides of a
//! name cannot drift apart; the roles import it and never each other.
//!
//! - [`env`]: the environment variables of the injected sidecar;
//! - annotation and label keys (`durable-scaler.io/...`) a pod opts in and configures with;
//! - the injected container, its token volume, token path and audience;
//! - the ports each role serves on;
//! - [`TaskHub`]: the one task hub name rule, parsed by the webhook, the sidecar and the
//!   aggregator alike;
//! - [`MAX_PARTITIONS`], [`SIDECAR_INTERVAL_RANGE`]: limits both ends of a report agree on.

use std::ops::RangeInclusive;
use std::time::Duration;

/// The environment variables the webhook sets in the sidecar and the sidecar reads.
pub(crate) mod env {
    /// The task hub name (case preserved).
    pub(crate) const TASK_HUB: &str = "DURABLE_SCALER_TASK_HUB";
    /// The app's storage connection string, copied from the app container's own variable.
    pub(crate) const CONNECTION: &str = "DURABLE_SCALER_CONNECTION";
    /// The aggregator's report URL.
    pub(crate) const AGGREGATOR: &str = "DURABLE_SCALER_AGGREGATOR";
    /// PEM CA of an `https://` aggregator, inline or as a path.
    pub(crate) const AGGREGATOR_CA: &str = "DURABLE_SCALER_AGGREGATOR_CA";
    /// The pod's name (downward API `metadata.name`); the DurableTask worker id.
    pub(crate) const POD_NAME: &str = "POD_NAME";
    /// The pod's namespace (downward API `metadata.namespace`).
    pub(crate) const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// The sidecar's poll interval.
    pub(crate) const INTERVAL: &str = "DURABLE_SCALER_INTERVAL";
    /// How the app records partition ownership (`table` or `blob`).
    pub(crate) const PARTITION_MODE: &str = "DURABLE_SCALER_PARTITION_MODE";
    /// The sidecar's bearer token file.
    pub(crate) const TOKEN_FILE: &str = "DURABLE_SCALER_TOKEN_FILE";
    /// The `/healthz` + `/metrics` address of the sidecar and of the aggregator.
    pub(crate) const HTTP_ADDR: &str = "DURABLE_SCALER_HTTP_ADDR";
    /// Kubernetes sets it to the pod's name; the aggregator's fallback for [`POD_NAME`].
    pub(crate) const HOSTNAME: &str = "HOSTNAME";
}

/// The label a pod template carries to opt in (filtered by the webhook's objectSelector).
pub const INJECT_LABEL: &str = "durable-scaler.io/inject";
/// Annotation: the task hub name.
pub const TASK_HUB_ANNOTATION: &str = "durable-scaler.io/task-hub";
/// Annotation: the name of the app container's env var that holds the storage connection.
pub const CONNECTION_ENV_ANNOTATION: &str = "durable-scaler.io/connection-env";
/// Annotation: the aggregator's report URL, overriding the webhook's `--aggregator`.
pub(crate) const AGGREGATOR_ANNOTATION: &str = "durable-scaler.io/aggregator";
/// Annotation: `"true"` or `"false"`, overriding the webhook's `--native-sidecar`.
pub(crate) const NATIVE_SIDECAR_ANNOTATION: &str = "durable-scaler.io/native-sidecar";
/// Annotation written by the webhook: what was injected, by which version.
pub(crate) const STATUS_ANNOTATION: &str = "durable-scaler.io/status";
/// Annotation overriding the sidecar's CPU request (a Kubernetes quantity).
pub(crate) const CPU_REQUEST_ANNOTATION: &str = "durable-scaler.io/sidecar-cpu-request";
/// Annotation overriding the sidecar's CPU limit.
pub(crate) const CPU_LIMIT_ANNOTATION: &str = "durable-scaler.io/sidecar-cpu-limit";
/// Annotation overriding the sidecar's memory request.
pub(crate) const MEMORY_REQUEST_ANNOTATION: &str = "durable-scaler.io/sidecar-memory-request";
/// Annotation overriding the sidecar's memory limit.
pub(crate) const MEMORY_LIMIT_ANNOTATION: &str = "durable-scaler.io/sidecar-memory-limit";

/// The injected container's name.
pub const SIDECAR_CONTAINER: &str = "durable-scaler-sidecar";
/// The projected service-account token volume, mounted in the sidecar only.
pub(crate) const TOKEN_VOLUME: &str = "durable-scaler-token";
/// Where the token volume is mounted.
pub(crate) const TOKEN_DIR: &str = "/var/run/secrets/durable-scaler";
/// The token's file name inside [`TOKEN_DIR`] (the projection's `path`).
pub(crate) const TOKEN_FILE_NAME: &str = "token";
/// [`TOKEN_DIR`]/[`TOKEN_FILE_NAME`]: the sidecar's default `--token-file`.
pub(crate) const TOKEN_FILE: &str = "/var/run/secrets/durable-scaler/token";
/// The audience the projected token is issued for; the aggregator's TokenReview accepts
/// only this one.
pub(crate) const TOKEN_AUDIENCE: &str = "durable-scaler";
/// Lifetime asked for the projected token (the kubelet refreshes it at 80 %).
pub(crate) const TOKEN_EXPIRATION_SECONDS: u64 = 3600;
/// The sidecar's user and group: non-root, numeric so the kubelet can check runAsNonRoot.
pub(crate) const SIDECAR_UID: u32 = 65532;

/// The sidecar's HTTP port (`/healthz`, `/metrics`), probed by the injected liveness probe.
pub(crate) const SIDECAR_HTTP_PORT: u16 = 9095;
/// The aggregator's KEDA port (externalscaler.ExternalScaler gRPC).
pub(crate) const AGGREGATOR_KEDA_PORT: u16 = 4370;
/// The aggregator's report port (the sidecars' gRPC).
pub(crate) const AGGREGATOR_REPORT_PORT: u16 = 4371;
/// The aggregator's HTTP port (`/healthz`, `/readyz`, `/metrics`, `/hubs`).
pub(crate) const AGGREGATOR_HTTP_PORT: u16 = 8080;
/// The webhook's HTTPS port (its Service maps 443 to it).
pub const WEBHOOK_PORT: u16 = 8443;
/// The aggregator's report URL as `manifests/` install it: the `durable-scaler-aggregator`
/// Service in the `durable-scaler` namespace, report port.
pub const DEFAULT_AGGREGATOR_URL: &str = "http://durable-scaler-aggregator.durable-scaler:4371";

/// The connection env var the webhook copies when the pod names none.
pub const DEFAULT_CONNECTION_ENV: &str = "AzureWebJobsStorage";
/// The Functions host's setting for the task hub name, copied when no annotation names one.
pub(crate) const HUB_NAME_ENV: &str = "AzureFunctionsJobHost__extensions__durableTask__hubName";
/// The Durable Functions extension's default task hub when nothing names one.
pub const DEFAULT_TASK_HUB: &str = "TestHubName";

/// DurableTask's upper bound on the partition count (azure-functions-durable-extension
/// `AzureStorageOptions.Validate`: "PartitionCount must be an integer value between 1 and
/// 16"). Reports, the probe, `recommend` and the simulator all stay within it.
pub(crate) const MAX_PARTITIONS: u32 = 16;

/// The poll intervals a sidecar accepts, from its own settings or suggested by the
/// aggregator (which therefore suggests nothing outside it).
pub(crate) const SIDECAR_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// A task hub name, checked once as the Durable Functions extension checks it: 3 to 50
/// ASCII letters and digits, starting with a letter.
///
/// Upstream: `ValidateHubName` in azure-functions-durable-extension
/// `src/WebJobs.Extensions.DurableTask/Options/AzureStorageOptions.cs` refuses names over 50
/// characters and names that fail the storage SDK's `NameValidator` for the blob, container,
/// table and queue names derived from the hub; of those the table rule is the tightest
/// (alphanumeric, 3 to 63, not starting with a digit), hence this rule and its error text.
/// DurableTask.AzureStorage (Azure/durabletask) itself checks nothing and relies on the
/// extension. The names of the hub's queues, tables and containers are derived in
/// [`crate::storage`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskHub {
    name: String,
}

/// A task hub name the Durable Functions extension would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task hub name {0:?}: 3 to 50 ASCII letters and digits, starting with a letter")]
pub struct InvalidTaskHubName(pub String);

impl TaskHub {
    /// The shortest name accepted.
    pub(crate) const MIN_LEN: usize = 3;
    /// The longest name accepted.
    pub(crate) const MAX_LEN: usize = 50;

    /// Checks `name` (case preserved, no trimming).
    pub fn parse(name: &str) -> Result<Self, InvalidTaskHubName> {
        let valid = (Self::MIN_LEN..=Self::MAX_LEN).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric())
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
        if valid { Ok(Self { name: name.to_owned() }) } else { Err(InvalidTaskHubName(name.to_owned())) }
    }

    /// The name as configured.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::str::FromStr for TaskHub {
    type Err = InvalidTaskHubName;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::parse(name)
    }
}

impl std::fmt::Display for TaskHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_hub_names_are_letters_and_digits_starting_with_a_letter() {
        for good in ["abc", "MyHub1", "TestHubName", &"a".repeat(50)] {
            assert_eq!(TaskHub::parse(good).map(|h| h.name().to_owned()), Ok(good.to_owned()));
        }
    }

    #[test]
    fn task_hub_names_outside_the_rule_are_refused_with_the_rule() {
        for bad in ["", "ab", "1Hub", "my-hub", "my_hub", "Hüb1", " MyHub", &"a".repeat(51)] {
            let error = TaskHub::parse(bad).unwrap_err();
            assert!(error.to_string().contains("starting with a letter"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_token_file_is_inside_the_token_dir() {
        assert_eq!(TOKEN_FILE, format!("{TOKEN_DIR}/{TOKEN_FILE_NAME}"));
    }

    #[test]
    fn the_default_aggregator_url_is_the_report_port() {
        let url = url::Url::parse(DEFAULT_AGGREGATOR_URL).unwrap();
        assert_eq!(url.port(), Some(AGGREGATOR_REPORT_PORT));
    }
}
