//! The contract between the roles and the manifests: every name, port, path and limit that
//! the webhook writes and the sidecar reads, that the sidecar sends and the aggregator
//! checks, or that `manifests/` must spell the same way. One place, so the two sides of a
//! name cannot drift apart; the roles import it and never each other.
//!
//! - [`mod@env`]: the environment variables of the injected sidecar;
//! - annotation and label keys (`durable-scaler.io/...`) a pod opts in and configures with;
//! - the injected container, its token volume, token path and audience;
//! - the ports each role serves on;
//! - [`TaskHub`]: the one task hub name rule, parsed by the webhook, the sidecar and the
//!   aggregator alike;
//! - [`MAX_PARTITIONS`], [`SIDECAR_INTERVAL_RANGE`]: limits both ends of a report agree on;
//! - [`limits`]: the longest name and value the aggregator takes from KEDA or a sidecar, and
//!   how much it tracks; [`quote`]: how an error message shows a value it refused.

use std::ops::RangeInclusive;
use std::time::Duration;

/// The environment variables the webhook sets in the sidecar and the sidecar reads.
pub mod env {
    /// The task hub name (case preserved).
    pub const TASK_HUB: &str = "DURABLE_SCALER_TASK_HUB";
    /// The app's storage connection string, copied from the app container's own variable.
    pub const CONNECTION: &str = "DURABLE_SCALER_CONNECTION";
    /// An identity-based connection's `accountName` (from the app's
    /// `{connection}__accountName`), used when [`CONNECTION`] is unset or empty, as the Functions
    /// host uses the connection's settings when the connection has no string value.
    pub const CONNECTION_ACCOUNT_NAME: &str = "DURABLE_SCALER_CONNECTION__accountName";
    /// An identity-based connection's `blobServiceUri`.
    pub const CONNECTION_BLOB_SERVICE_URI: &str = "DURABLE_SCALER_CONNECTION__blobServiceUri";
    /// An identity-based connection's `queueServiceUri`.
    pub const CONNECTION_QUEUE_SERVICE_URI: &str = "DURABLE_SCALER_CONNECTION__queueServiceUri";
    /// An identity-based connection's `tableServiceUri`.
    pub const CONNECTION_TABLE_SERVICE_URI: &str = "DURABLE_SCALER_CONNECTION__tableServiceUri";
    /// An identity-based connection's `credential` (`managedidentity`, `workloadidentity`).
    pub const CONNECTION_CREDENTIAL: &str = "DURABLE_SCALER_CONNECTION__credential";
    /// An identity-based connection's `clientId`.
    pub const CONNECTION_CLIENT_ID: &str = "DURABLE_SCALER_CONNECTION__clientId";
    /// An identity-based connection's `tenantId`.
    pub const CONNECTION_TENANT_ID: &str = "DURABLE_SCALER_CONNECTION__tenantId";
    /// An identity-based connection's `tokenFilePath`.
    pub const CONNECTION_TOKEN_FILE_PATH: &str = "DURABLE_SCALER_CONNECTION__tokenFilePath";
    /// The identity-based connection's settings: the app's key after its connection name
    /// (`AzureWebJobsStorage__{key}`), and the sidecar variable it is copied to.
    pub const CONNECTION_SETTINGS: [(&str, &str); 8] = [
        ("accountName", CONNECTION_ACCOUNT_NAME),
        ("blobServiceUri", CONNECTION_BLOB_SERVICE_URI),
        ("queueServiceUri", CONNECTION_QUEUE_SERVICE_URI),
        ("tableServiceUri", CONNECTION_TABLE_SERVICE_URI),
        ("credential", CONNECTION_CREDENTIAL),
        ("clientId", CONNECTION_CLIENT_ID),
        ("tenantId", CONNECTION_TENANT_ID),
        ("tokenFilePath", CONNECTION_TOKEN_FILE_PATH),
    ];
    /// The aggregator's report URL.
    pub const AGGREGATOR: &str = "DURABLE_SCALER_AGGREGATOR";
    /// PEM CA of an `https://` aggregator, inline or as a path.
    pub const AGGREGATOR_CA: &str = "DURABLE_SCALER_AGGREGATOR_CA";
    /// Sidecar: fixed report addresses used instead of resolving the aggregator URL's host
    /// (runs outside a cluster, tests); TLS still checks the URL's host name.
    pub const AGGREGATOR_ADDRESSES: &str = "DURABLE_SCALER_AGGREGATOR_ADDRESSES";
    /// The pod's name (downward API `metadata.name`); the DurableTask worker id.
    pub const POD_NAME: &str = "POD_NAME";
    /// The pod's namespace (downward API `metadata.namespace`).
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// The sidecar's poll interval.
    pub const INTERVAL: &str = "DURABLE_SCALER_INTERVAL";
    /// How the app records partition ownership (`table` or `blob`).
    pub const PARTITION_MODE: &str = "DURABLE_SCALER_PARTITION_MODE";
    /// The sidecar's bearer token file.
    pub const TOKEN_FILE: &str = "DURABLE_SCALER_TOKEN_FILE";
    /// The `/healthz` + `/metrics` address of the sidecar and of the aggregator.
    pub const HTTP_ADDR: &str = "DURABLE_SCALER_HTTP_ADDR";
    /// Kubernetes sets it to the pod's name; the aggregator's fallback for [`POD_NAME`].
    pub const HOSTNAME: &str = "HOSTNAME";
    /// The app container's CPU limit in whole CPUs, rounded up (downward API
    /// `resourceFieldRef` `limits.cpu`, divisor 1; the node's allocatable CPUs when the
    /// container has no limit): what .NET's `Environment.ProcessorCount` sees in the app.
    pub const APP_CPUS: &str = "DURABLE_SCALER_APP_CPUS";
    /// The app's `maxConcurrentActivityFunctions` override, copied from
    /// [`super::MAX_ACTIVITIES_ENV`] in the app container when it has one.
    pub const APP_MAX_ACTIVITIES: &str = "DURABLE_SCALER_APP_MAX_ACTIVITIES";
    /// The app's `maxConcurrentOrchestratorFunctions` override, copied from
    /// [`super::MAX_ORCHESTRATIONS_ENV`] in the app container when it has one.
    pub const APP_MAX_ORCHESTRATIONS: &str = "DURABLE_SCALER_APP_MAX_ORCHESTRATIONS";
    /// The app's `controlQueueVisibilityTimeout` (a .NET TimeSpan such as `00:05:00`), copied
    /// from [`super::CONTROL_QUEUE_VISIBILITY_TIMEOUT_ENV`] when the app sets it.
    pub const APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT: &str =
        "DURABLE_SCALER_APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT";
    /// The app's `workItemQueueVisibilityTimeout`, copied from
    /// [`super::WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT_ENV`].
    pub const APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT: &str =
        "DURABLE_SCALER_APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT";
    /// The app's `controlQueueBufferThreshold`, copied from
    /// [`super::CONTROL_QUEUE_BUFFER_THRESHOLD_ENV`].
    pub const APP_CONTROL_QUEUE_BUFFER_THRESHOLD: &str = "DURABLE_SCALER_APP_CONTROL_QUEUE_BUFFER_THRESHOLD";
    /// The app's `maxQueuePollingInterval` (TimeSpan), copied from
    /// [`super::MAX_QUEUE_POLLING_INTERVAL_ENV`].
    pub const APP_MAX_QUEUE_POLLING_INTERVAL: &str = "DURABLE_SCALER_APP_MAX_QUEUE_POLLING_INTERVAL";
    /// Sidecar in plain-container mode: the app container's port, which it listens on until
    /// it stops (the first TCP `containerPort` the app declares).
    pub const APP_PORT: &str = "DURABLE_SCALER_APP_PORT";
    /// Sidecar in plain-container mode: how long it may keep reporting after SIGTERM while
    /// the app still runs (the pod's grace period less time to leave).
    pub const APP_EXIT_WAIT: &str = "DURABLE_SCALER_APP_EXIT_WAIT";
    /// The preStop drain (src/sidecar/drain.rs): the Functions host's base URL on loopback
    /// (`http://127.0.0.1:<the app's port>`).
    pub const HOST_URL: &str = "DURABLE_SCALER_HOST_URL";
    /// The preStop drain: the file holding the host's master key (`host.master`, mounted
    /// from the Secret or ConfigMap the host keeps its keys in).
    pub const HOST_KEY_FILE: &str = "DURABLE_SCALER_HOST_KEY_FILE";
    /// The preStop drain: the per-pod token `/drain` requires in [`super::DRAIN_TOKEN_HEADER`].
    pub const DRAIN_TOKEN: &str = "DURABLE_SCALER_DRAIN_TOKEN";
    /// The preStop drain: how long `/drain` waits for the host's drain to complete.
    pub const DRAIN_WAIT: &str = "DURABLE_SCALER_DRAIN_WAIT";
}

/// The header the app container's preStop hook sends to the sidecar's `/drain` with the
/// pod's drain token (the kubelet sends a hook's `httpHeaders` since 1.26's
/// `ConsistentHTTPGetHandlers`, GA in 1.28: kubernetes `pkg/kubelet/lifecycle/handlers.go`
/// `runHTTPHandler` -> `httpprobe.NewRequestForHTTPGetAction`).
pub const DRAIN_TOKEN_HEADER: &str = "x-durable-scaler-drain";
/// The sidecar's path the preStop hook calls.
pub const DRAIN_PATH: &str = "/drain";

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
/// Annotation overriding the sidecar's image.
pub(crate) const SIDECAR_IMAGE_ANNOTATION: &str = "durable-scaler.io/sidecar-image";
/// Annotation setting the sidecar's log level (`error`, `warn`, `info`, `debug`, `trace`).
pub(crate) const SIDECAR_LOG_LEVEL_ANNOTATION: &str = "durable-scaler.io/sidecar-log-level";
/// Annotation: `"false"` leaves the app's shutdown as it is (no drain variable, no longer
/// grace period).
pub(crate) const DRAIN_ANNOTATION: &str = "durable-scaler.io/drain";
/// Annotation: the pod's `terminationGracePeriodSeconds` while draining (never below the
/// pod's own).
pub(crate) const GRACE_ANNOTATION: &str = "durable-scaler.io/termination-grace-period-seconds";
/// The value of [`INJECT_LABEL`] on a namespace that opts all its pods out (the webhook's
/// `namespaceSelector` leaves such a namespace alone).
pub const NAMESPACE_OPT_OUT: &str = "disabled";

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
pub const DEFAULT_AGGREGATOR_URL: &str = "http://durable-scaler-aggregator-reports.durable-scaler:4371";

/// The connection env var the webhook copies when the pod names none.
pub const DEFAULT_CONNECTION_ENV: &str = "AzureWebJobsStorage";
/// The Functions host's setting for the task hub name, copied when no annotation names one.
pub const HUB_NAME_ENV: &str = "AzureFunctionsJobHost__extensions__durableTask__hubName";
/// The Functions host's setting for `maxConcurrentActivityFunctions` (host.json's
/// `extensions.durableTask.maxConcurrentActivityFunctions` as an app setting).
pub const MAX_ACTIVITIES_ENV: &str =
    "AzureFunctionsJobHost__extensions__durableTask__maxConcurrentActivityFunctions";
/// The Functions host's setting for `maxConcurrentOrchestratorFunctions`.
pub const MAX_ORCHESTRATIONS_ENV: &str =
    "AzureFunctionsJobHost__extensions__durableTask__maxConcurrentOrchestratorFunctions";
/// The Functions host's setting for the Azure Storage provider's
/// `controlQueueVisibilityTimeout` (host.json `extensions.durableTask.storageProvider.*`;
/// azure-functions-durable-extension `Options/AzureStorageOptions.cs`, default 5 minutes, 1 to
/// 60 minutes allowed).
pub const CONTROL_QUEUE_VISIBILITY_TIMEOUT_ENV: &str =
    "AzureFunctionsJobHost__extensions__durableTask__storageProvider__controlQueueVisibilityTimeout";
/// The storage provider's `workItemQueueVisibilityTimeout` (default 5 minutes).
pub const WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT_ENV: &str =
    "AzureFunctionsJobHost__extensions__durableTask__storageProvider__workItemQueueVisibilityTimeout";
/// The storage provider's `controlQueueBufferThreshold`: control messages one pod prefetches
/// (default 256 outside the Consumption plan, 1 to 1000 allowed).
pub const CONTROL_QUEUE_BUFFER_THRESHOLD_ENV: &str =
    "AzureFunctionsJobHost__extensions__durableTask__storageProvider__controlQueueBufferThreshold";
/// The storage provider's `maxQueuePollingInterval` (default 30 s): how long an idle worker
/// waits at most between two polls of an empty queue.
pub const MAX_QUEUE_POLLING_INTERVAL_ENV: &str =
    "AzureFunctionsJobHost__extensions__durableTask__storageProvider__maxQueuePollingInterval";
/// What one pod runs at once of each kind per CPU when the app sets no limit: the Durable
/// Functions extension's default outside the Consumption plan is `10 *
/// Environment.ProcessorCount` for both (azure-functions-durable-extension
/// `src/WebJobs.Extensions.DurableTask/AzureStorageDurabilityProviderFactory.cs`; the
/// Consumption plan, detected by `DefaultPlatformInformation.IsInConsumptionPlan` from
/// `WEBSITE_SKU=Dynamic` or a `CONTAINER_NAME` outside App Service, gets 10 and 5, which a
/// Kubernetes pod never is).
pub const WORK_ITEMS_PER_CPU: u32 = 10;

/// The Functions host's `functionTimeout` when `host.json` sets none, off the Consumption
/// plan (azure-functions-host `src/WebJobs.Script/Config/ScriptJobHostOptionsSetup.cs`
/// `DefaultFunctionTimeout`; Consumption gets 5 minutes, which a Kubernetes pod never is): the
/// longest an activity runs, so what a drain may have to wait for.
pub const DEFAULT_FUNCTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// What a pod that drains gets beyond the function timeout for its grace period: the drain
/// request, the last status polls and the process's own stop after it.
pub const DRAIN_GRACE_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The Durable Functions extension's default task hub when nothing names one.
pub const DEFAULT_TASK_HUB: &str = "TestHubName";

/// DurableTask's upper bound on the partition count (azure-functions-durable-extension
/// `AzureStorageOptions.Validate`: "PartitionCount must be an integer value between 1 and
/// 16"). Reports, the probe, `recommend` and the simulator all stay within it.
pub(crate) const MAX_PARTITIONS: u32 = 16;

/// A sidecar's poll and report interval unless `--interval` says otherwise; also what the
/// aggregator assumes of a report that does not say (`interval_ms` 0), so the two ends agree
/// on when a pod has gone silent.
pub(crate) const SIDECAR_DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// [`SIDECAR_DEFAULT_INTERVAL`] as the sidecar's `--help` shows it.
pub(crate) const SIDECAR_DEFAULT_INTERVAL_TEXT: &str = "5s";

/// The poll intervals a sidecar accepts (`--interval`); the aggregator caps what a report
/// claims at its end.
pub(crate) const SIDECAR_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// How long each name and value the aggregator accepts may be, and how much it keeps. Every
/// string that arrives on the KEDA or the report port is checked against one of these before
/// it is stored, used as a map key or a metric label, or quoted in an error.
pub mod limits {
    /// A Kubernetes namespace: a DNS label (RFC 1123), at most 63 characters.
    /// Upstream: kubernetes `staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go`
    /// (`DNS1123LabelMaxLength`), which `ValidateNamespaceName` applies.
    pub const NAMESPACE_MAX_LEN: usize = 63;
    /// A pod or ScaledObject name: a DNS subdomain (RFC 1123), at most 253 characters
    /// (`DNS1123SubdomainMaxLength` in the same file; `ValidatePodName` applies it).
    pub const OBJECT_NAME_MAX_LEN: usize = 253;
    /// A storage connection string. Azure's longest (account name, a 88-character key, and
    /// every endpoint spelled out) is well under 1 KiB; 4 KiB leaves room for SAS tokens.
    pub const CONNECTION_MAX_LEN: usize = 4096;
    /// Any other `scalerMetadata` key or value (numbers, booleans, algorithm names, and
    /// the keys KEDA adds itself such as `scalerAddress`).
    pub const METADATA_VALUE_MAX_LEN: usize = 256;
    /// Entries in `scalerMetadata`: the trigger's own keys are a dozen.
    pub const METADATA_MAX_ENTRIES: usize = 32;
    /// A metric name in GetMetrics (`durabletask-` and a task hub name fit easily).
    pub const METRIC_NAME_MAX_LEN: usize = 256;
    /// Free text a sidecar sends (its version, its error message, the partition mode).
    pub const REPORT_TEXT_MAX_LEN: usize = 1024;
    /// The largest KEDA request the KEDA port decodes: the metadata as bounded above (32
    /// entries of 256-byte keys and values, one connection string) and two names. tonic
    /// reserves the length a message announces before the bytes arrive (`codec/decode.rs`),
    /// so this is also what one stalled stream can hold.
    pub const KEDA_MESSAGE_MAX_BYTES: usize = 32 * 1024;
    /// The largest report the report port decodes: 16 partitions' signals, two names and
    /// three short texts take under 5 KiB.
    pub const REPORT_MESSAGE_MAX_BYTES: usize = 16 * 1024;
    /// HTTP/2 streams open at once on one KEDA connection. KEDA keeps one connection per
    /// scaler address for all its ScaledObjects (kedacore/keda
    /// `pkg/scalers/external_scaler.go`, `connectionPool`), and each push ScaledObject holds
    /// a StreamIsActive stream on it: a limit below the hub limit would stall KEDA's calls.
    pub const KEDA_MAX_CONCURRENT_STREAMS: u32 = MAX_TRACKED_HUBS as u32 + 512;
    /// HTTP/2 streams open at once on one report connection: a sidecar sends one unary
    /// report at a time.
    pub const REPORT_MAX_CONCURRENT_STREAMS: u32 = 16;
    /// The largest HTTP/2 header block (or HTTP/1 head) a listener takes: a bearer token
    /// (a projected service-account JWT, 1-2 KiB) and gRPC's own headers fit many times.
    pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
    /// A request not read and answered within this is cut off (tonic's request timeout,
    /// which covers reading the request body): a client that announces a message and stalls
    /// holds its buffer this long at most. The first call about a hub waits one second.
    pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    /// A client that has not sent a complete HTTP/1 request head by then is dropped.
    pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    /// Task hubs tracked at once. Each costs a few KiB and a few metric series; a cluster
    /// with more Durable Functions apps than this runs more than one aggregator.
    pub const MAX_TRACKED_HUBS: usize = 2_000;
    /// Pods tracked per task hub. A pod that owns no partition still reports (and counts as
    /// a worker when the worker count comes from reports), so this is well above the 16
    /// partitions.
    pub const MAX_PODS_PER_HUB: usize = 1_000;
    /// Pods tracked over all task hubs, so hubs times pods stays bounded too.
    pub const MAX_TRACKED_PODS: usize = 20_000;
    /// At the hub limit, the least recently seen hub makes room for a new one only when no
    /// KEDA call and no report has named it for this long (and no StreamIsActive is open):
    /// KEDA asks every polling interval (30 s by default) and every HPA sync (15 s), so a
    /// flood of made-up hubs cannot push out hubs in use.
    pub const HUB_REPLACEABLE_AFTER_MS: i64 = 5 * 60 * 1000;
    /// How many characters of a refused value an error message quotes.
    pub const QUOTE_MAX_CHARS: usize = 64;
}

/// One RBAC permission a role's code needs, declared beside the calls that need it so that the
/// manifests test can hold `manifests/` to exactly these (tests/it/manifests.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RbacRule {
    /// The API group (`""` for the core group).
    pub api_group: &'static str,
    /// The resource (or `resource/subresource`).
    pub resource: &'static str,
    /// The verb.
    pub verb: &'static str,
    /// Granted cluster-wide (a ClusterRole), or in the role's own namespace only (a Role).
    pub cluster_wide: bool,
}

/// Shortens `text` (an Event note, say) to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// `value` for an error message: debug-quoted, cut after [`limits::QUOTE_MAX_CHARS`]
/// characters (then `...` and the full length), so a refused multi-megabyte value does not
/// come back whole in a gRPC status or a log line.
pub fn quote(value: &str) -> String {
    let mut chars = value.char_indices();
    match chars.nth(limits::QUOTE_MAX_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &value[..cut], value.len()),
    }
}

/// Which Kubernetes name rule a name follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// A DNS label (namespaces): lowercase letters, digits and `-`, starting and ending
    /// with a letter or digit, at most [`limits::NAMESPACE_MAX_LEN`].
    Label,
    /// A DNS subdomain (pods, ScaledObjects): DNS labels joined by `.`, at most
    /// [`limits::OBJECT_NAME_MAX_LEN`].
    Subdomain,
}

/// Checks `value` against `rule` as the Kubernetes API server does for the objects it
/// names (upstream: `IsDNS1123Label` and `IsDNS1123Subdomain` in apimachinery's
/// `pkg/util/validation/validation.go`); the error names `field` and quotes a short prefix.
pub fn check_name(field: &str, value: &str, rule: NameRule) -> Result<(), String> {
    let (max, what) = match rule {
        NameRule::Label => (limits::NAMESPACE_MAX_LEN, "a DNS label"),
        NameRule::Subdomain => (limits::OBJECT_NAME_MAX_LEN, "a DNS subdomain"),
    };
    if value.is_empty() {
        return Err(format!("{field} is required"));
    }
    if value.len() > max {
        return Err(format!("{field} {} is longer than {max} characters", quote(value)));
    }
    let label_ok = |label: &str| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    let valid = match rule {
        NameRule::Label => label_ok(value),
        NameRule::Subdomain => value.split('.').all(label_ok),
    };
    if valid {
        Ok(())
    } else {
        Err(format!("{field} {} is not {what} (lowercase letters, digits and '-')", quote(value)))
    }
}

/// Checks that `value` is at most `max` bytes long; the error names `field`.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        Err(format!("{field} {} is longer than {max} bytes", quote(value)))
    } else {
        Ok(())
    }
}

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
/// It holds the name as [`quote`] shows it, not the whole of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task hub name {0}: 3 to 50 ASCII letters and digits, starting with a letter")]
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
        if valid { Ok(Self { name: name.to_owned() }) } else { Err(InvalidTaskHubName(quote(name))) }
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
    fn quotes_cut_long_values_and_keep_short_ones_whole() {
        assert_eq!(quote("MyHub"), "\"MyHub\"");
        let long = "x".repeat(4_000_000);
        let quoted = quote(&long);
        assert!(quoted.len() < 100, "{quoted}");
        assert!(quoted.ends_with("... (4000000 bytes)"), "{quoted}");
        let wide = "ü".repeat(100);
        assert_eq!(
            quote(&wide),
            format!("{:?}... (200 bytes)", "ü".repeat(64)),
            "cut at a character boundary"
        );
    }

    #[test]
    fn kubernetes_names_follow_the_api_servers_rules() {
        assert_eq!(check_name("pod.namespace", "apps-1", NameRule::Label), Ok(()));
        assert_eq!(check_name("pod.name", "app-7d9f.x-1", NameRule::Subdomain), Ok(()));
        assert_eq!(check_name("pod.namespace", &"a".repeat(63), NameRule::Label), Ok(()));
        assert_eq!(check_name("pod.name", &"a".repeat(253), NameRule::Subdomain), Ok(()));
        for (value, rule) in [
            ("", NameRule::Label),
            ("Apps", NameRule::Label),
            ("-apps", NameRule::Label),
            ("a.b", NameRule::Label),
            ("a..b", NameRule::Subdomain),
            ("app_1", NameRule::Subdomain),
        ] {
            let e = check_name("pod.namespace", value, rule).unwrap_err();
            assert!(e.starts_with("pod.namespace"), "{value}: {e}");
        }
        let e = check_name("pod.namespace", &"a".repeat(64), NameRule::Label).unwrap_err();
        assert!(e.contains("longer than 63"), "{e}");
        let e = check_name("pod.name", &"a".repeat(4_000_000), NameRule::Subdomain).unwrap_err();
        assert!(e.len() < 200 && e.contains("longer than 253"), "{e}");
    }

    #[test]
    fn a_refused_task_hub_name_is_quoted_short() {
        let error = TaskHub::parse(&"a".repeat(1_000_000)).unwrap_err().to_string();
        assert!(error.len() < 200, "{error}");
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
