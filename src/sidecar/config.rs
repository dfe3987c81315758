//! The sidecar's settings: flags with environment fallbacks, parsed once at start into a
//! typed [`Config`]; every bad or missing value is reported with its variable's name.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::storage::{PartitionMode, StorageAccount, TaskHub};

/// `durable-scaler sidecar`: reads the queues of the partitions this pod owns and reports
/// them to the aggregator. Every flag can be set from the environment variable in its help
/// (the webhook sets the `DURABLE_SCALER_*` and `POD_*` ones).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The task hub name as the app configures it (case preserved).
    #[arg(long, env = "DURABLE_SCALER_TASK_HUB")]
    pub task_hub: Option<String>,
    /// The app's storage connection string (`AzureWebJobsStorage`); `AccountName=x` alone
    /// means Entra ID (workload or managed identity).
    #[arg(long, env = "DURABLE_SCALER_CONNECTION", hide_env_values = true)]
    pub connection: Option<String>,
    /// The aggregator's report endpoint, e.g. `http://durable-scaler-aggregator:4371`, or
    /// `https://...` when the aggregator runs with `--report-tls`.
    #[arg(long, env = "DURABLE_SCALER_AGGREGATOR")]
    pub aggregator: Option<String>,
    /// For an `https://` aggregator: the CA certificate(s) its certificate must chain to, as
    /// a PEM file's path or as the PEM text itself (the webhook injects it inline). The
    /// host name of the URL must be in the certificate.
    #[arg(long, env = "DURABLE_SCALER_AGGREGATOR_CA")]
    pub aggregator_ca: Option<String>,
    /// This pod's name (downward API); also the DurableTask worker id that owns partitions.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// How often to read storage and report: `5s`, `500ms`, `1m`, or plain seconds.
    #[arg(long, env = "DURABLE_SCALER_INTERVAL", default_value = "5s")]
    pub interval: String,
    /// Where the app records partition ownership: `auto` detects it per hub as DurableTask
    /// does (the `{hub}Partitions` table, else `taskhub.json` with safe or legacy lease
    /// blobs); `table` or `blob` (safe or legacy lease blobs) only override it.
    #[arg(long, env = "DURABLE_SCALER_PARTITION_MODE", default_value = "auto")]
    pub partition_mode: String,
    /// The projected service-account token sent as the bearer credential of every report;
    /// re-read for each report (it rotates). No credential is sent while it does not exist.
    #[arg(long, env = "DURABLE_SCALER_TOKEN_FILE", default_value = "/var/run/secrets/durable-scaler/token")]
    pub token_file: PathBuf,
    /// Where `/healthz` and `/metrics` are served.
    #[arg(long, env = "DURABLE_SCALER_HTTP_ADDR", default_value = "0.0.0.0:9095")]
    pub http_addr: String,
}

/// The poll intervals the sidecar accepts, from its settings or from the aggregator.
pub const INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// The sidecar's validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The task hub.
    pub task_hub: TaskHub,
    /// The storage account.
    pub account: StorageAccount,
    /// The aggregator's report endpoint URL (http or https).
    pub aggregator: String,
    /// PEM CA certificates the aggregator's certificate must chain to (https only).
    pub aggregator_ca: Option<Vec<u8>>,
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

fn required(
    value: Option<String>,
    variable: &'static str,
    flag: &'static str,
) -> Result<String, ConfigError> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| error(variable, flag, "is not set"))
}

impl Config {
    /// Validates `args`; the first problem found is returned.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let hub = required(args.task_hub, "DURABLE_SCALER_TASK_HUB", "task-hub")?;
        let task_hub =
            TaskHub::parse(&hub).map_err(|e| error("DURABLE_SCALER_TASK_HUB", "task-hub", e.to_string()))?;
        let connection = required(args.connection, "DURABLE_SCALER_CONNECTION", "connection")?;
        let account = StorageAccount::from_connection_string(&connection)
            .map_err(|e| error("DURABLE_SCALER_CONNECTION", "connection", e.to_string()))?;
        let aggregator = required(args.aggregator, "DURABLE_SCALER_AGGREGATOR", "aggregator")?;
        let Some(url) = crate::config::http_url(&aggregator) else {
            return Err(error(
                "DURABLE_SCALER_AGGREGATOR",
                "aggregator",
                format!("{aggregator:?} is not an http(s) URL like http://host:4371"),
            ));
        };
        let aggregator_ca = aggregator_ca(args.aggregator_ca, url.scheme() == "https")?;
        let pod_name = required(args.pod_name, "POD_NAME", "pod-name")?;
        let pod_namespace = required(args.pod_namespace, "POD_NAMESPACE", "pod-namespace")?;
        let interval = crate::config::parse_duration(&args.interval)
            .map_err(|p| error("DURABLE_SCALER_INTERVAL", "interval", p))?;
        if !INTERVAL_RANGE.contains(&interval) {
            return Err(error("DURABLE_SCALER_INTERVAL", "interval", "must be between 100ms and 10m"));
        }
        let partition_mode = PartitionMode::parse(&args.partition_mode).ok_or_else(|| {
            error(
                "DURABLE_SCALER_PARTITION_MODE",
                "partition-mode",
                format!("{:?} is none of `auto`, `table`, `blob`", args.partition_mode.trim()),
            )
        })?;
        let http_addr = args.http_addr.trim().parse().map_err(|_| {
            error(
                "DURABLE_SCALER_HTTP_ADDR",
                "http-addr",
                format!("{:?} is not an address like 0.0.0.0:9095", args.http_addr),
            )
        })?;
        Ok(Self {
            task_hub,
            account,
            aggregator,
            aggregator_ca,
            pod_name,
            pod_namespace,
            interval,
            partition_mode,
            token_file: args.token_file,
            http_addr,
        })
    }
}

/// The CA PEM for an https aggregator: inline PEM or a file, checked to hold certificates.
/// An https URL needs one (there is no system trust store in the sidecar's image, and the
/// aggregator's certificate comes from the cluster's own CA); an http URL must not have one,
/// since it would silently go unused.
fn aggregator_ca(value: Option<String>, https: bool) -> Result<Option<Vec<u8>>, ConfigError> {
    const VAR: &str = "DURABLE_SCALER_AGGREGATOR_CA";
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

    /// Changes one setting of [`args`].
    type Edit = fn(&mut Args);

    fn args() -> Args {
        Args {
            task_hub: Some("MyHub".into()),
            connection: Some("UseDevelopmentStorage=true".into()),
            aggregator: Some("http://aggregator:4371".into()),
            aggregator_ca: None,
            pod_name: Some("app-7d9f-x2".into()),
            pod_namespace: Some("apps".into()),
            interval: "5s".into(),
            partition_mode: "auto".into(),
            token_file: "/var/run/secrets/durable-scaler/token".into(),
            http_addr: "0.0.0.0:9095".into(),
        }
    }

    #[test]
    fn the_defaults_make_a_valid_config() {
        let config = Config::from_args(args()).unwrap();
        assert_eq!(config.interval, Duration::from_secs(5));
        assert_eq!(config.partition_mode, PartitionMode::Auto);
        assert_eq!(config.http_addr.port(), 9095);
    }

    #[test]
    fn each_missing_setting_is_named_by_its_variable() {
        let cases: [(Edit, &str); 5] = [
            (|a| a.task_hub = None, "DURABLE_SCALER_TASK_HUB"),
            (|a| a.connection = Some(" ".into()), "DURABLE_SCALER_CONNECTION"),
            (|a| a.aggregator = None, "DURABLE_SCALER_AGGREGATOR"),
            (|a| a.pod_name = None, "POD_NAME"),
            (|a| a.pod_namespace = None, "POD_NAMESPACE"),
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
    fn each_invalid_setting_is_named_by_its_variable() {
        let cases: [(Edit, &str); 7] = [
            (|a| a.task_hub = Some("my-hub".into()), "DURABLE_SCALER_TASK_HUB"),
            (|a| a.connection = Some("AccountName=x;AccountKey=***".into()), "DURABLE_SCALER_CONNECTION"),
            (|a| a.aggregator = Some("aggregator:4371".into()), "DURABLE_SCALER_AGGREGATOR"),
            (|a| a.interval = "fast".into(), "DURABLE_SCALER_INTERVAL"),
            (|a| a.interval = "0s".into(), "DURABLE_SCALER_INTERVAL"),
            (|a| a.partition_mode = "sql".into(), "DURABLE_SCALER_PARTITION_MODE"),
            (|a| a.http_addr = "9095".into(), "DURABLE_SCALER_HTTP_ADDR"),
        ];
        for (spoil, variable) in cases {
            let mut a = args();
            spoil(&mut a);
            assert_eq!(Config::from_args(a).unwrap_err().variable, variable);
        }
    }

    #[test]
    fn an_https_aggregator_takes_its_ca_inline_or_from_a_file_and_needs_one() {
        let ca = rcgen::generate_simple_self_signed(vec!["aggregator".to_owned()]).unwrap().cert.pem();
        let https = |ca: Option<String>| Args {
            aggregator: Some("https://aggregator:4371".into()),
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
            assert_eq!(e.variable, "DURABLE_SCALER_AGGREGATOR_CA");
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
}
