//! The sidecar's settings: flags with environment fallbacks, parsed once at start into a
//! typed [`Config`]; every bad or missing value is reported with its variable's name.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::config::naming;
use crate::contract::{
    SIDECAR_HTTP_PORT, SIDECAR_INTERVAL_RANGE, TOKEN_FILE, TaskHub, WORK_ITEMS_PER_CPU, env,
};
use crate::proto::report::WorkerLimits;
use crate::storage::{AppIdentity, PartitionMode, StorageAccount};

/// `durable-scaler sidecar`: reads the queues of the partitions this pod owns and reports
/// them to the aggregator. Every flag can be set from the environment variable in its help
/// (the webhook sets the `DURABLE_SCALER_*` and `POD_*` ones). Values are parsed here, at
/// start; a bad one stops the sidecar with exit status 2 and a message naming its variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The task hub name as the app configures it (case preserved).
    #[arg(long, env = env::TASK_HUB, value_parser = naming(env::TASK_HUB, TaskHub::parse))]
    pub task_hub: Option<TaskHub>,
    /// The app's storage connection string (`AzureWebJobsStorage`); `AccountName=x` alone
    /// means Entra ID (workload or managed identity). Unset or empty: the identity-based
    /// connection below.
    #[arg(long, env = env::CONNECTION, hide_env_values = true)]
    pub connection: Option<String>,
    /// An identity-based connection, as the app's `AzureWebJobsStorage__*` settings give it.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// The aggregator's report endpoint, e.g. `http://durable-scaler-aggregator:4371`, or
    /// `https://...` when the aggregator runs with `--report-tls`.
    #[arg(long, env = env::AGGREGATOR, value_parser = naming(env::AGGREGATOR, crate::config::parse_http_url))]
    pub aggregator: Option<url::Url>,
    /// For an `https://` aggregator: the CA certificate(s) its certificate must chain to, as
    /// a PEM file's path or as the PEM text itself (the webhook injects it inline). The
    /// host name of the URL must be in the certificate.
    #[arg(long, env = env::AGGREGATOR_CA)]
    pub aggregator_ca: Option<String>,
    /// Report to these addresses (comma-separated `ip:port`) instead of every address the
    /// aggregator URL's host resolves to (each interval); for runs without cluster DNS. The
    /// URL's host name is still what the certificate is checked against.
    #[arg(long, env = env::AGGREGATOR_ADDRESSES, value_delimiter = ',')]
    pub aggregator_addresses: Vec<SocketAddr>,
    /// This pod's name (downward API); also the DurableTask worker id that owns partitions.
    #[arg(long, env = env::POD_NAME)]
    pub pod_name: Option<String>,
    /// This pod's namespace (downward API).
    #[arg(long, env = env::POD_NAMESPACE)]
    pub pod_namespace: Option<String>,
    /// How often to read storage and report: `5s`, `500ms`, `1m`, or plain seconds
    /// (100ms to 10m).
    #[arg(long, env = env::INTERVAL, default_value = crate::contract::SIDECAR_DEFAULT_INTERVAL_TEXT,
          value_parser = naming(env::INTERVAL, |text: &str| crate::config::parse_duration_within(text, &SIDECAR_INTERVAL_RANGE)))]
    pub interval: Duration,
    /// Where the app records partition ownership: `auto` detects it per hub as DurableTask
    /// does (the `{hub}Partitions` table, else `taskhub.json` with safe or legacy lease
    /// blobs); `table` or `blob` (safe or legacy lease blobs) only override it.
    #[arg(long, env = env::PARTITION_MODE, default_value = "auto",
          value_parser = naming(env::PARTITION_MODE, parse_partition_mode))]
    pub partition_mode: PartitionMode,
    /// The projected service-account token sent as the bearer credential of every report;
    /// re-read for each report (it rotates). No credential is sent while it does not exist.
    #[arg(long, env = env::TOKEN_FILE, default_value = TOKEN_FILE)]
    pub token_file: PathBuf,
    /// Where `/healthz` and `/metrics` are served.
    #[arg(long, env = env::HTTP_ADDR, default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, SIDECAR_HTTP_PORT)),
          value_parser = naming(env::HTTP_ADDR, |text: &str| text.trim().parse::<SocketAddr>()
              .map_err(|_| format!("`{text}` is not an address like 0.0.0.0:{SIDECAR_HTTP_PORT}"))))]
    pub http_addr: SocketAddr,
    /// What decides the app's per-pod limits (reported to the aggregator).
    #[command(flatten)]
    pub app_limits: AppLimitArgs,
    /// The app container's port on this pod: once the app has listened there, its closing
    /// (with the pod's partitions released) tells that the app stopped. Without it, after
    /// SIGTERM the sidecar keeps reporting for all of `--app-exit-wait`.
    #[arg(long, env = env::APP_PORT, value_parser = naming(env::APP_PORT, |text: &str| text.trim().parse::<u16>()
        .ok().filter(|port| *port > 0).ok_or_else(|| format!("`{text}` is not a port (1 to 65535)"))))]
    pub app_port: Option<u16>,
    /// After SIGTERM, keep polling and reporting (marked draining) until the app stopped, for
    /// at most this long, then send the `leaving` report. 0s (the default, and what a native
    /// sidecar needs: Kubernetes stops it after the app) leaves at once. The webhook sets it
    /// for a plain-container sidecar to the pod's grace period less 3 s.
    #[arg(long, env = env::APP_EXIT_WAIT, default_value = "0s",
          value_parser = naming(env::APP_EXIT_WAIT, crate::config::parse_duration))]
    pub app_exit_wait: Duration,
    /// The preStop drain ([`crate::sidecar::drain`]): the Functions host's base URL on this
    /// pod (`http://127.0.0.1:<app port>`). With `--host-key-file` and `--drain-token` it
    /// turns on `GET /drain`; the webhook sets all three where the app keeps its keys in a
    /// Kubernetes Secret or ConfigMap.
    #[arg(long, env = env::HOST_URL, value_parser = naming(env::HOST_URL, crate::config::parse_http_url))]
    pub host_url: Option<url::Url>,
    /// The preStop drain: the file holding the host's master key (read at each drain, so a
    /// key the host writes after the sidecar started is found).
    #[arg(long, env = env::HOST_KEY_FILE)]
    pub host_key_file: Option<PathBuf>,
    /// The preStop drain: the token `/drain` requires in its `x-durable-scaler-drain` header
    /// (the port is reachable from the pod network).
    #[arg(long, env = env::DRAIN_TOKEN, hide_env_values = true)]
    pub drain_token: Option<String>,
    /// The preStop drain: how long `/drain` waits for the host's drain to complete before it
    /// answers anyway (the webhook sets the pod's grace period less 15 s).
    #[arg(long, env = env::DRAIN_WAIT, default_value = "30m",
          value_parser = naming(env::DRAIN_WAIT, crate::config::parse_duration))]
    pub drain_wait: Duration,
}

/// An identity-based connection (the app's `{connection}__accountName` and the rest, copied by
/// the webhook), used when no connection string is set; the storage layer's [`AppIdentity`]
/// says how each is read.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IdentityArgs {
    /// The storage account's name (`accountName`).
    #[arg(long = "connection-account-name", env = env::CONNECTION_ACCOUNT_NAME)]
    pub account_name: Option<String>,
    /// The Blob service URI (`blobServiceUri`).
    #[arg(long = "connection-blob-service-uri", env = env::CONNECTION_BLOB_SERVICE_URI)]
    pub blob_service_uri: Option<String>,
    /// The Queue service URI (`queueServiceUri`).
    #[arg(long = "connection-queue-service-uri", env = env::CONNECTION_QUEUE_SERVICE_URI)]
    pub queue_service_uri: Option<String>,
    /// The Table service URI (`tableServiceUri`).
    #[arg(long = "connection-table-service-uri", env = env::CONNECTION_TABLE_SERVICE_URI)]
    pub table_service_uri: Option<String>,
    /// `managedidentity`, `workloadidentity`, or unset (`credential`).
    #[arg(long = "connection-credential", env = env::CONNECTION_CREDENTIAL)]
    pub credential: Option<String>,
    /// The identity's client id (`clientId`).
    #[arg(long = "connection-client-id", env = env::CONNECTION_CLIENT_ID)]
    pub client_id: Option<String>,
    /// The tenant (`tenantId`; workload identity).
    #[arg(long = "connection-tenant-id", env = env::CONNECTION_TENANT_ID)]
    pub tenant_id: Option<String>,
    /// The federated token file (`tokenFilePath`; workload identity).
    #[arg(long = "connection-token-file-path", env = env::CONNECTION_TOKEN_FILE_PATH)]
    pub token_file_path: Option<String>,
}

impl IdentityArgs {
    fn is_empty(&self) -> bool {
        [&self.account_name, &self.blob_service_uri, &self.queue_service_uri, &self.table_service_uri]
            .iter()
            .all(|v| v.as_deref().is_none_or(|v| v.trim().is_empty()))
    }
}

/// What the app's per-pod concurrency limits depend on, as the webhook hands it over from the
/// app container (its CPU limit through the downward API, its own overrides copied).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AppLimitArgs {
    /// The app container's CPUs as .NET's `Environment.ProcessorCount` sees them: its CPU
    /// limit rounded up, or the node's allocatable CPUs without one (downward API
    /// `limits.cpu`, divisor 1). Unset or 0: unknown.
    #[arg(long, env = env::APP_CPUS, value_parser = naming(env::APP_CPUS, parse_count))]
    pub app_cpus: Option<u32>,
    /// The app's `maxConcurrentActivityFunctions` setting, when it has one.
    #[arg(long, env = env::APP_MAX_ACTIVITIES, value_parser = naming(env::APP_MAX_ACTIVITIES, parse_positive))]
    pub app_max_activities: Option<u32>,
    /// The app's `maxConcurrentOrchestratorFunctions` setting, when it has one.
    #[arg(long, env = env::APP_MAX_ORCHESTRATIONS, value_parser = naming(env::APP_MAX_ORCHESTRATIONS, parse_positive))]
    pub app_max_orchestrations: Option<u32>,
    /// The app's `controlQueueVisibilityTimeout` (a .NET TimeSpan, e.g. `00:05:00`), when it
    /// sets one: how long a message a pod dequeued stays hidden without renewal.
    #[arg(long, env = env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT,
          value_parser = naming(env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT, parse_visibility_timeout))]
    pub app_control_queue_visibility_timeout: Option<Duration>,
    /// The app's `workItemQueueVisibilityTimeout` (TimeSpan), when it sets one.
    #[arg(long, env = env::APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT,
          value_parser = naming(env::APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT, parse_positive_timespan))]
    pub app_work_item_queue_visibility_timeout: Option<Duration>,
    /// The app's `controlQueueBufferThreshold`, when it sets one: control messages one pod
    /// prefetches.
    #[arg(long, env = env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD,
          value_parser = naming(env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD, parse_buffer_threshold))]
    pub app_control_queue_buffer_threshold: Option<u32>,
    /// The app's `maxQueuePollingInterval` (TimeSpan), when it sets one.
    #[arg(long, env = env::APP_MAX_QUEUE_POLLING_INTERVAL,
          value_parser = naming(env::APP_MAX_QUEUE_POLLING_INTERVAL, parse_positive_timespan))]
    pub app_max_queue_polling_interval: Option<Duration>,
}

/// A .NET `TimeSpan` as configuration binding reads it (`TimeSpan.Parse`, invariant
/// culture): `[-][d.]hh:mm[:ss[.fffffff]]`, or a whole number of days.
pub(crate) fn parse_timespan(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("{t:?} is not a .NET TimeSpan such as 00:05:00 ([d.]hh:mm[:ss[.fffffff]])");
    if t.starts_with('-') {
        return Err(format!("{t:?} is negative"));
    }
    let number = |part: &str, max: u64| -> Result<u64, String> {
        if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(bad)
    };
    if !t.contains(':') {
        return Ok(Duration::from_secs(number(t, 10_675_199)? * 86_400));
    }
    let (days, clock) = match t.split_once(':').and_then(|(head, _)| head.split_once('.')) {
        Some((d, _)) => (number(d, 10_675_199)?, &t[d.len() + 1..]),
        None => (0, t),
    };
    let mut parts = clock.split(':');
    let hours = number(parts.next().unwrap_or_default(), 23)?;
    let minutes = number(parts.next().ok_or_else(bad)?, 59)?;
    let (seconds, nanos) = match parts.next() {
        None => (0, 0),
        Some(sec) => {
            let (whole, fraction) = sec.split_once('.').unwrap_or((sec, ""));
            if fraction.len() > 7
                || !fraction.bytes().all(|b| b.is_ascii_digit())
                || (sec.contains('.') && fraction.is_empty())
            {
                return Err(bad());
            }
            let nanos = format!("{fraction:0<9}").parse::<u32>().map_err(|_| bad())?;
            (number(whole, 59)?, nanos)
        }
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(Duration::new(((days * 24 + hours) * 60 + minutes) * 60 + seconds, nanos))
}

/// A TimeSpan above zero (`AzureStorageOptions.Validate` refuses `MaxQueuePollingInterval <=
/// TimeSpan.Zero`; a zero visibility timeout would make no message invisible).
fn parse_positive_timespan(text: &str) -> Result<Duration, String> {
    parse_timespan(text)
        .and_then(|d| if d.is_zero() { Err(format!("{:?} is zero", text.trim())) } else { Ok(d) })
}

/// A control-queue visibility timeout as the extension accepts it: 1 to 60 minutes
/// (azure-functions-durable-extension `Options/AzureStorageOptions.cs` `Validate`; the host
/// does not start otherwise).
fn parse_visibility_timeout(text: &str) -> Result<Duration, String> {
    let d = parse_timespan(text)?;
    if (Duration::from_secs(60)..=Duration::from_secs(3_600)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{:?} is outside 1 to 60 minutes, which the Durable extension requires", text.trim()))
    }
}

/// A buffer threshold as the extension accepts it: 1 to 1000 (`AzureStorageOptions.Validate`).
fn parse_buffer_threshold(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=1_000).contains(n))
        .ok_or_else(|| format!("{:?} is not a whole number from 1 to 1000", text.trim()))
}

/// A whole number (the downward API writes `limits.cpu` with divisor 1 as one).
fn parse_count(text: &str) -> Result<u32, String> {
    text.trim().parse::<u32>().map_err(|_| format!("{:?} is not a whole number of CPUs", text.trim()))
}

/// A whole number of at least 1, as the extension requires (`DurableTaskOptions.Validate`:
/// "must be a positive integer value").
fn parse_positive(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{:?} is not a whole number of at least 1", text.trim()))
}

/// The app's per-pod limits as far as the sidecar can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppLimits {
    /// The CPUs the app sees, when known.
    pub processor_count: Option<u32>,
    /// The app's `maxConcurrentActivityFunctions` override.
    pub max_activities: Option<u32>,
    /// The app's `maxConcurrentOrchestratorFunctions` override.
    pub max_orchestrations: Option<u32>,
    /// The app's storage-provider queue settings it overrides (the rest are the extension's
    /// defaults).
    pub queues: AppQueueSettings,
}

/// The storage-provider settings an app may set that decide how long dequeued messages stay
/// hidden and how many one pod prefetches (azure-functions-durable-extension
/// `Options/AzureStorageOptions.cs`); `None`: the extension's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppQueueSettings {
    /// `controlQueueVisibilityTimeout`.
    pub control_queue_visibility_timeout: Option<Duration>,
    /// `workItemQueueVisibilityTimeout`.
    pub work_item_queue_visibility_timeout: Option<Duration>,
    /// `controlQueueBufferThreshold`.
    pub control_queue_buffer_threshold: Option<u32>,
    /// `maxQueuePollingInterval`.
    pub max_queue_polling_interval: Option<Duration>,
}

impl AppQueueSettings {
    /// The report protocol's form: only what the app sets, 0 for the rest.
    pub fn to_proto(&self) -> crate::proto::report::AppQueueSettings {
        let ms = |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        crate::proto::report::AppQueueSettings {
            control_queue_visibility_timeout_ms: ms(self.control_queue_visibility_timeout),
            work_item_queue_visibility_timeout_ms: ms(self.work_item_queue_visibility_timeout),
            control_queue_buffer_threshold: self.control_queue_buffer_threshold.unwrap_or(0),
            max_queue_polling_interval_ms: ms(self.max_queue_polling_interval),
        }
    }
}

impl AppLimits {
    /// The limits in force, as the extension computes them (an override, else
    /// [`WORK_ITEMS_PER_CPU`] x ProcessorCount, upstream's default outside the Consumption
    /// plan); `None` when one of the two cannot be told (no CPU count and no override).
    pub fn worker_limits(&self) -> Option<WorkerLimits> {
        let by_cpu = self.processor_count.map(|cpus| cpus.saturating_mul(WORK_ITEMS_PER_CPU));
        Some(WorkerLimits {
            processor_count: self.processor_count.unwrap_or(0),
            max_activities: self.max_activities.or(by_cpu)?,
            max_orchestrations: self.max_orchestrations.or(by_cpu)?,
            activities_overridden: self.max_activities.is_some(),
            orchestrations_overridden: self.max_orchestrations.is_some(),
        })
    }
}

/// `auto`, `table` or `blob`, any case.
fn parse_partition_mode(text: &str) -> Result<PartitionMode, String> {
    PartitionMode::parse(text).ok_or_else(|| format!("{:?} is none of `auto`, `table`, `blob`", text.trim()))
}

/// The sidecar's validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The task hub.
    pub task_hub: TaskHub,
    /// The storage account.
    pub account: StorageAccount,
    /// The aggregator's report endpoint URL (http or https).
    pub aggregator: url::Url,
    /// PEM CA certificates the aggregator's certificate must chain to (https only).
    pub aggregator_ca: Option<Vec<u8>>,
    /// Fixed report addresses instead of resolving the URL's host (empty: resolve).
    pub aggregator_addresses: Vec<SocketAddr>,
    /// This pod's name (the worker id that owns partitions).
    pub pod_name: String,
    /// This pod's namespace.
    pub pod_namespace: String,
    /// The poll interval.
    pub interval: Duration,
    /// How partition ownership is read.
    pub partition_mode: PartitionMode,
    /// The bearer token file.
    pub token_file: PathBuf,
    /// The HTTP listen address.
    pub http_addr: SocketAddr,
    /// What decides the app's per-pod limits.
    pub app_limits: AppLimits,
    /// The app container's port, whose closing tells that the app stopped.
    pub app_port: Option<u16>,
    /// How long to keep reporting after SIGTERM while the app runs (zero: leave at once).
    pub app_exit_wait: Duration,
    /// The preStop drain, when configured.
    pub drain: Option<DrainConfig>,
}

/// What `GET /drain` needs ([`crate::sidecar::drain`]).
#[derive(Clone)]
pub struct DrainConfig {
    /// The Functions host's base URL.
    pub host: url::Url,
    /// The file holding the host's master key.
    pub key_file: PathBuf,
    /// The token the request must carry.
    pub token: String,
    /// How long to wait for the drain to complete.
    pub wait: Duration,
}

impl std::fmt::Debug for DrainConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainConfig")
            .field("host", &self.host.as_str())
            .field("key_file", &self.key_file)
            .field("token", &"<redacted>")
            .field("wait", &self.wait)
            .finish()
    }
}

/// The three drain settings together, or none of them.
fn drain_config(
    host: Option<url::Url>,
    key_file: Option<PathBuf>,
    token: Option<String>,
    wait: Duration,
) -> Result<Option<DrainConfig>, ConfigError> {
    let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    match (host, key_file, token) {
        (None, None, None) => Ok(None),
        (Some(host), Some(key_file), Some(token)) => Ok(Some(DrainConfig { host, key_file, token, wait })),
        (host, key_file, _) => {
            let (variable, flag) = if host.is_none() {
                (env::HOST_URL, "host-url")
            } else if key_file.is_none() {
                (env::HOST_KEY_FILE, "host-key-file")
            } else {
                (env::DRAIN_TOKEN, "drain-token")
            };
            Err(error(
                variable,
                flag,
                "is not set, and the other preStop drain settings are: set all three or none",
            ))
        }
    }
}

/// A missing or invalid setting, named by its environment variable and flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable} (--{flag}): {problem}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: &'static str,
    /// The flag, without `--`.
    pub flag: &'static str,
    /// What is wrong (never the value of a secret).
    pub problem: String,
}

fn error(variable: &'static str, flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { variable, flag, problem: problem.into() }
}

fn required<T>(value: Option<T>, variable: &'static str, flag: &'static str) -> Result<T, ConfigError> {
    value.ok_or_else(|| error(variable, flag, "is not set"))
}

fn required_text(
    value: Option<String>,
    variable: &'static str,
    flag: &'static str,
) -> Result<String, ConfigError> {
    required(value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()), variable, flag)
}

impl Config {
    /// Checks what clap could not: the settings that must be present, the connection string
    /// and the CA that goes with an https aggregator. The first problem found is returned.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let task_hub = required(args.task_hub, env::TASK_HUB, "task-hub")?;
        let connection = args.connection.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        // A connection string wins over the settings, as in the Durable extension
        // (`AzureStorageAccountProvider.GetStorageAccountDetails`).
        let account = match (connection, args.identity.is_empty()) {
            (Some(connection), _) => StorageAccount::from_connection_string(&connection)
                .map_err(|e| error(env::CONNECTION, "connection", e.to_string()))?,
            (None, false) => {
                let i = args.identity;
                StorageAccount::from_app_identity(&AppIdentity {
                    account_name: i.account_name,
                    blob_service_uri: i.blob_service_uri,
                    queue_service_uri: i.queue_service_uri,
                    table_service_uri: i.table_service_uri,
                    credential: i.credential,
                    client_id: i.client_id,
                    tenant_id: i.tenant_id,
                    token_file_path: i.token_file_path,
                })
                .map_err(|e| error(env::CONNECTION_ACCOUNT_NAME, "connection-account-name", e.to_string()))?
            }
            (None, true) => {
                return Err(error(
                    env::CONNECTION,
                    "connection",
                    format!(
                        "is not set, and neither is an identity-based connection ({})",
                        env::CONNECTION_ACCOUNT_NAME
                    ),
                ));
            }
        };
        let aggregator = required(args.aggregator, env::AGGREGATOR, "aggregator")?;
        let aggregator_ca = aggregator_ca(args.aggregator_ca, aggregator.scheme() == "https")?;
        let pod_name = required_text(args.pod_name, env::POD_NAME, "pod-name")?;
        let pod_namespace = required_text(args.pod_namespace, env::POD_NAMESPACE, "pod-namespace")?;
        Ok(Self {
            task_hub,
            account,
            aggregator,
            aggregator_ca,
            aggregator_addresses: args.aggregator_addresses,
            pod_name,
            pod_namespace,
            interval: args.interval,
            partition_mode: args.partition_mode,
            token_file: args.token_file,
            http_addr: args.http_addr,
            app_limits: AppLimits {
                processor_count: args.app_limits.app_cpus.filter(|n| *n > 0),
                max_activities: args.app_limits.app_max_activities,
                max_orchestrations: args.app_limits.app_max_orchestrations,
                queues: AppQueueSettings {
                    control_queue_visibility_timeout: args.app_limits.app_control_queue_visibility_timeout,
                    work_item_queue_visibility_timeout: args
                        .app_limits
                        .app_work_item_queue_visibility_timeout,
                    control_queue_buffer_threshold: args.app_limits.app_control_queue_buffer_threshold,
                    max_queue_polling_interval: args.app_limits.app_max_queue_polling_interval,
                },
            },
            app_port: args.app_port,
            app_exit_wait: args.app_exit_wait,
            drain: drain_config(args.host_url, args.host_key_file, args.drain_token, args.drain_wait)?,
        })
    }
}

/// The CA PEM for an https aggregator: inline PEM or a file, checked to hold certificates.
/// An https URL needs one (there is no system trust store in the sidecar's image, and the
/// aggregator's certificate comes from the cluster's own CA); an http URL must not have one,
/// since it would silently go unused.
fn aggregator_ca(value: Option<String>, https: bool) -> Result<Option<Vec<u8>>, ConfigError> {
    const VAR: &str = env::AGGREGATOR_CA;
    const FLAG: &str = "aggregator-ca";
    let value = value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    match (value, https) {
        (None, false) => Ok(None),
        (None, true) => Err(error(
            VAR,
            FLAG,
            "is not set, and the aggregator URL is https: give the CA that signed its certificate",
        )),
        (Some(_), false) => {
            Err(error(VAR, FLAG, "is set, but the aggregator URL is http: use https:// with it, or unset it"))
        }
        (Some(value), true) => {
            let pem = if value.starts_with("-----BEGIN") {
                let pem = value.into_bytes();
                crate::tls::certificates(Path::new("the inline PEM"), &pem).map(|_| pem)
            } else {
                crate::tls::read_ca_pem(Path::new(&value))
            };
            pem.map(Some).map_err(|e| error(VAR, FLAG, e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Changes one setting of [`args`].
    type Edit = fn(&mut Args);

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args() -> Args {
        Args {
            task_hub: Some(TaskHub::parse("MyHub").unwrap()),
            connection: Some("UseDevelopmentStorage=true".into()),
            identity: IdentityArgs::default(),
            aggregator: Some("http://aggregator:4371".parse().unwrap()),
            aggregator_ca: None,
            aggregator_addresses: Vec::new(),
            pod_name: Some("app-7d9f-x2".into()),
            pod_namespace: Some("apps".into()),
            interval: Duration::from_secs(5),
            partition_mode: PartitionMode::Auto,
            token_file: TOKEN_FILE.into(),
            http_addr: SocketAddr::from(([0, 0, 0, 0], SIDECAR_HTTP_PORT)),
            app_limits: AppLimitArgs::default(),
            app_port: None,
            app_exit_wait: Duration::ZERO,
            host_url: None,
            host_key_file: None,
            drain_token: None,
            drain_wait: Duration::from_secs(1800),
        }
    }

    #[test]
    fn the_prestop_drain_takes_all_three_settings_or_none() {
        assert!(Config::from_args(args()).unwrap().drain.is_none());
        let mut all = args();
        all.host_url = Some("http://127.0.0.1:8080".parse().unwrap());
        all.host_key_file = Some("/keys/host.master".into());
        all.drain_token = Some("t0k3n".into());
        let drain = Config::from_args(all).unwrap().drain.unwrap();
        assert_eq!(drain.host.as_str(), "http://127.0.0.1:8080/");
        assert!(!format!("{drain:?}").contains("t0k3n"), "the token stays out of logs");
        let mut partial = args();
        partial.host_url = Some("http://127.0.0.1:8080".parse().unwrap());
        assert_eq!(Config::from_args(partial).unwrap_err().variable, env::HOST_KEY_FILE);
        assert!(Cli::try_parse_from(["sidecar", "--host-url", "ftp://x"]).is_err());
        let parsed = Cli::try_parse_from(["sidecar", "--drain-wait", "90s"]).unwrap().args;
        assert_eq!(parsed.drain_wait, Duration::from_secs(90));
    }

    #[test]
    fn by_default_the_sidecar_leaves_at_once_and_knows_no_app_port() {
        let parsed = Cli::try_parse_from(["sidecar"]).unwrap().args;
        assert_eq!((parsed.app_port, parsed.app_exit_wait), (None, Duration::ZERO));
        let set =
            Cli::try_parse_from(["sidecar", "--app-port", "80", "--app-exit-wait", "27s"]).unwrap().args;
        assert_eq!((set.app_port, set.app_exit_wait), (Some(80), Duration::from_secs(27)));
        assert!(Cli::try_parse_from(["sidecar", "--app-port", "0"]).is_err());
    }

    #[test]
    fn the_command_line_defaults_are_the_contract() {
        let parsed = Cli::try_parse_from(["sidecar"]).unwrap().args;
        assert_eq!(parsed.interval, crate::contract::SIDECAR_DEFAULT_INTERVAL);
        assert_eq!(parsed.partition_mode, PartitionMode::Auto);
        assert_eq!(parsed.http_addr.port(), SIDECAR_HTTP_PORT);
        assert_eq!(parsed.token_file, Path::new(TOKEN_FILE));
    }

    #[test]
    fn each_missing_setting_is_named_by_its_variable() {
        let cases: [(Edit, &str); 5] = [
            (|a| a.task_hub = None, env::TASK_HUB),
            (|a| a.connection = Some(" ".into()), env::CONNECTION),
            (|a| a.aggregator = None, env::AGGREGATOR),
            (|a| a.pod_name = None, env::POD_NAME),
            (|a| a.pod_namespace = None, env::POD_NAMESPACE),
        ];
        for (unset, variable) in cases {
            let mut a = args();
            unset(&mut a);
            let err = Config::from_args(a).unwrap_err();
            assert_eq!(err.variable, variable);
            assert!(err.to_string().starts_with(variable) && err.to_string().contains("is not set"), "{err}");
        }
    }

    #[test]
    fn without_a_connection_string_the_identity_based_settings_name_the_account() {
        let identity = IdentityArgs {
            account_name: Some("orders".into()),
            credential: Some("managedidentity".into()),
            ..Default::default()
        };
        let config = Config::from_args(Args { connection: Some(String::new()), identity, ..args() }).unwrap();
        assert_eq!(
            config.account.endpoint(crate::storage::Service::Queue).as_str(),
            "https://orders.queue.core.windows.net/"
        );

        // A connection string wins, as in the Durable extension.
        let identity = IdentityArgs { account_name: Some("orders".into()), ..Default::default() };
        let config = Config::from_args(Args { identity, ..args() }).unwrap();
        assert!(
            config
                .account
                .endpoint(crate::storage::Service::Queue)
                .as_str()
                .starts_with("http://127.0.0.1:10001/")
        );

        let identity =
            IdentityArgs { queue_service_uri: Some("https://q.example.net".into()), ..Default::default() };
        let err = Config::from_args(Args { connection: None, identity, ..args() }).unwrap_err();
        assert_eq!(err.variable, env::CONNECTION_ACCOUNT_NAME);
        assert!(err.to_string().contains("blobServiceUri"), "{err}");
    }

    #[test]
    fn an_invalid_connection_string_is_named_by_its_variable() {
        let a = Args { connection: Some("AccountName=x;AccountKey=***".into()), ..args() };
        assert_eq!(Config::from_args(a).unwrap_err().variable, env::CONNECTION);
    }

    #[test]
    fn each_invalid_value_is_refused_at_parse_time_naming_its_variable() {
        for (flag, value, variable) in [
            ("--task-hub", "my-hub", env::TASK_HUB),
            ("--task-hub", "1Hub", env::TASK_HUB),
            ("--aggregator", "aggregator:4371", env::AGGREGATOR),
            ("--interval", "fast", env::INTERVAL),
            ("--interval", "0s", env::INTERVAL),
            ("--partition-mode", "sql", env::PARTITION_MODE),
            ("--http-addr", "9095", env::HTTP_ADDR),
            ("--app-cpus", "1.5", env::APP_CPUS),
            ("--app-max-activities", "0", env::APP_MAX_ACTIVITIES),
            ("--app-max-orchestrations", "many", env::APP_MAX_ORCHESTRATIONS),
        ] {
            let error = Cli::try_parse_from(["sidecar", flag, value]).err().unwrap();
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation, "{flag} {value}");
            assert!(error.to_string().contains(&format!("{variable}: ")), "{flag} {value}: {error}");
        }
    }

    #[test]
    fn good_values_are_typed_at_parse_time() {
        let parsed = Cli::try_parse_from([
            "sidecar",
            "--task-hub",
            "OrdersHub",
            "--aggregator",
            "https://agg:4371",
            "--interval",
            "500ms",
            "--partition-mode",
            "Blob",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .unwrap()
        .args;
        assert_eq!(parsed.task_hub.as_ref().map(TaskHub::name), Some("OrdersHub"));
        assert_eq!(parsed.aggregator.as_ref().map(url::Url::scheme), Some("https"));
        assert_eq!(parsed.interval, Duration::from_millis(500));
        assert_eq!(parsed.partition_mode, PartitionMode::Blob);
        assert_eq!(parsed.http_addr, SocketAddr::from(([127, 0, 0, 1], 0)));
    }

    #[test]
    fn an_https_aggregator_takes_its_ca_inline_or_from_a_file_and_needs_one() {
        let ca = rcgen::generate_simple_self_signed(vec!["aggregator".to_owned()]).unwrap().cert.pem();
        let https = |ca: Option<String>| Args {
            aggregator: Some("https://aggregator:4371".parse().unwrap()),
            aggregator_ca: ca,
            ..args()
        };

        let inline = Config::from_args(https(Some(ca.clone()))).unwrap();
        assert_eq!(inline.aggregator_ca.as_deref(), Some(ca.trim().as_bytes()));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &ca).unwrap();
        let from_file = Config::from_args(https(Some(file.path().display().to_string()))).unwrap();
        assert_eq!(from_file.aggregator_ca.as_deref(), Some(ca.as_bytes()));

        let problem = |a: Args| {
            let e = Config::from_args(a).unwrap_err();
            assert_eq!(e.variable, env::AGGREGATOR_CA);
            e.problem
        };
        assert!(problem(https(None)).contains("aggregator URL is https"));
        assert!(problem(https(Some("/no/such/ca.crt".into()))).starts_with("cannot read /no/such/ca.crt"));
        assert!(
            problem(https(Some("-----BEGIN CERTIFICATE-----\nnot base64".into()))).contains("inline PEM")
        );
        let http_with_ca = Args { aggregator_ca: Some(ca), ..args() };
        assert!(problem(http_with_ca).contains("the aggregator URL is http"));
    }

    fn limits(
        cpus: Option<u32>,
        activities: Option<u32>,
        orchestrations: Option<u32>,
    ) -> Option<WorkerLimits> {
        let args = Args {
            app_limits: AppLimitArgs {
                app_cpus: cpus,
                app_max_activities: activities,
                app_max_orchestrations: orchestrations,
                ..AppLimitArgs::default()
            },
            ..args()
        };
        Config::from_args(args).unwrap().app_limits.worker_limits()
    }

    #[test]
    fn timespans_read_as_dotnet_configuration_binds_them() {
        let secs = |t: &str| parse_timespan(t).map(|d| d.as_secs_f64());
        assert_eq!(secs("00:05:00"), Ok(300.0));
        assert_eq!(secs("00:01"), Ok(60.0), "hh:mm");
        assert_eq!(secs("1.02:03:04"), Ok(93_784.0), "d.hh:mm:ss");
        assert_eq!(secs("00:00:30.5"), Ok(30.5));
        assert_eq!(secs(" 2 "), Ok(172_800.0), "a bare number is days, as TimeSpan.Parse reads it");
        for bad in ["", "5m", "00:60:00", "24:00:00", "-00:05:00", "00:05:00.", "00:05:00:00", "1.2.3:00"] {
            assert!(parse_timespan(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_apps_queue_settings_are_taken_within_what_the_extension_accepts() {
        let parsed = |variable: &str, value: &str| {
            let flag = match variable {
                env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT => "--app-control-queue-visibility-timeout",
                env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD => "--app-control-queue-buffer-threshold",
                _ => "--app-max-queue-polling-interval",
            };
            Cli::try_parse_from(["sidecar", flag, value]).map(|c| c.args.app_limits)
        };
        let ok = parsed(env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT, "00:10:00").unwrap();
        assert_eq!(ok.app_control_queue_visibility_timeout, Some(Duration::from_secs(600)));
        let err = parsed(env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT, "00:00:30").unwrap_err().to_string();
        assert!(
            err.contains(env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT) && err.contains("1 to 60 minutes"),
            "{err}"
        );
        let ok = parsed(env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD, "64").unwrap();
        assert_eq!(ok.app_control_queue_buffer_threshold, Some(64));
        assert!(parsed(env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD, "1001").is_err());
        let ok = parsed(env::APP_MAX_QUEUE_POLLING_INTERVAL, "00:00:05").unwrap();
        assert_eq!(ok.app_max_queue_polling_interval, Some(Duration::from_secs(5)));
        assert!(parsed(env::APP_MAX_QUEUE_POLLING_INTERVAL, "00:00:00").is_err());
        let settings = AppQueueSettings {
            control_queue_visibility_timeout: Some(Duration::from_secs(600)),
            control_queue_buffer_threshold: Some(64),
            ..AppQueueSettings::default()
        }
        .to_proto();
        assert_eq!(
            (settings.control_queue_visibility_timeout_ms, settings.work_item_queue_visibility_timeout_ms),
            (600_000, 0),
            "0: the app leaves the extension's default"
        );
        assert_eq!(settings.control_queue_buffer_threshold, 64);
    }

    #[test]
    fn without_overrides_both_limits_are_ten_per_cpu() {
        let l = limits(Some(2), None, None).unwrap();
        assert_eq!((l.processor_count, l.max_activities, l.max_orchestrations), (2, 20, 20));
        assert!(!l.activities_overridden && !l.orchestrations_overridden);
    }

    #[test]
    fn the_apps_own_settings_win_over_the_cpu_default() {
        let l = limits(Some(4), Some(7), None).unwrap();
        assert_eq!((l.max_activities, l.max_orchestrations), (7, 40));
        assert!(l.activities_overridden && !l.orchestrations_overridden);
    }

    #[test]
    fn limits_are_reported_only_when_both_can_be_told() {
        assert_eq!(limits(None, None, None), None);
        assert_eq!(limits(None, Some(5), None), None);
        assert_eq!(limits(Some(0), None, Some(5)), None, "0 CPUs is unknown");
        let l = limits(None, Some(5), Some(6)).unwrap();
        assert_eq!((l.processor_count, l.max_activities, l.max_orchestrations), (0, 5, 6));
    }

    #[test]
    fn the_injected_variables_are_read_from_the_command_line() {
        let parsed = Cli::try_parse_from([
            "sidecar",
            "--app-cpus",
            "3",
            "--app-max-activities",
            "12",
            "--app-max-orchestrations",
            " 8 ",
        ])
        .unwrap()
        .args;
        assert_eq!(
            (
                parsed.app_limits.app_cpus,
                parsed.app_limits.app_max_activities,
                parsed.app_limits.app_max_orchestrations
            ),
            (Some(3), Some(12), Some(8))
        );
    }
}
