//! `certs-gen`: makes the durable-scaler webhook's CA and serving certificate and installs
//! them, so the webhook needs no external certificate manager.
//!
//! - [`pki`]: generating and checking the material (rcgen, rustls' verifier);
//! - [`cluster`]: the TLS Secret and the MutatingWebhookConfiguration's `caBundle` (kube);
//! - [`renewer`]: `certs-gen run`, keeping both good in a loop (the certs-gen Deployment);
//! - [`mounted`]: waiting until a mounted Secret volume shows the material (init containers
//!   of the pods that serve with it, which need no API access);
//! - [`run`]: the command line (`run`, `create`, `create --out-dir`, `patch`, `wait`).

pub mod cluster;
pub mod mounted;
pub mod pki;
pub mod renewer;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

/// Creates the durable-scaler webhook's CA and serving certificate and installs them.
///
/// `run` keeps a Secret (and, with --webhook-config, the caBundle) good for ever: one round
/// every --interval-seconds, stopping on SIGTERM; it is what the manifests deploy.
/// `create` keeps a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) good: it does nothing
/// while the certificate stays valid past the renewal horizon, and renews it otherwise.
/// `patch` writes the Secret's ca.crt into every webhook's caBundle of the
/// MutatingWebhookConfiguration. `create --out-dir DIR` writes the files locally, no cluster.
/// `wait --dir DIR` waits, with no cluster access, until a mounted Secret volume holds valid
/// material (an init container of a pod whose Secret another pod creates); `wait --ca-only`
/// waits for a volume holding only a ca.crt.
/// Every flag can also be set from the environment variable named in its help.
#[derive(Debug, Parser)]
#[command(name = "certs-gen", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Keep the TLS Secret (and the caBundle) good, in a loop, until SIGTERM.
    Run(RunArgs),
    /// Make sure the TLS Secret exists and is valid (or write the files to --out-dir).
    Create(CreateArgs),
    /// Copy the Secret's ca.crt into the MutatingWebhookConfiguration's caBundle.
    Patch(PatchArgs),
    /// Wait until a mounted Secret volume holds material valid for the Service (no cluster).
    Wait(WaitArgs),
}

/// Where the Secret lives.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// Namespace of the webhook's Service and Secret.
    #[arg(long, env = "CERTS_GEN_NAMESPACE", default_value = "durable-scaler")]
    pub namespace: String,
    /// Name of the TLS Secret.
    #[arg(long, env = "CERTS_GEN_SECRET", default_value = "durable-scaler-webhook-tls")]
    pub secret: String,
}

/// What certificate to make and when to renew it.
#[derive(Debug, Clone, Args)]
pub struct CertArgs {
    /// Name of the Service (the webhook's, or the aggregator's for its TLS): the certificate
    /// is for <service>.<namespace>.svc, <service>.<namespace>.svc.cluster.local and
    /// <service>.<namespace>.
    #[arg(long, env = "CERTS_GEN_SERVICE", default_value = "durable-scaler-webhook")]
    pub service: String,
    /// Further DNS names or IP addresses for the certificate (repeatable; comma-separated in
    /// the env var), e.g. `localhost` for local use.
    #[arg(long = "extra-name", env = "CERTS_GEN_EXTRA_NAMES", value_delimiter = ',')]
    pub extra_names: Vec<String>,
    /// Validity of new certificates, in days.
    #[arg(long, env = "CERTS_GEN_VALIDITY_DAYS", default_value_t = 365,
          value_parser = clap::value_parser!(u64).range(2..=3650))]
    pub validity_days: u64,
    /// Validity of a new CA, in days (at least --validity-days). Certificates are renewed
    /// under the same CA, so every copy of it stays valid, while the CA is valid for a whole
    /// new certificate; then a new CA is made (the old one stays in ca.crt while certificates
    /// it signed are valid).
    #[arg(long, env = "CERTS_GEN_CA_VALIDITY_DAYS", default_value_t = 3650,
          value_parser = clap::value_parser!(u64).range(2..=36500))]
    pub ca_validity_days: u64,
    /// Renew when the certificate would be invalid within this many days.
    #[arg(long, env = "CERTS_GEN_RENEW_BEFORE_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3649))]
    pub renew_before_days: u64,
}

impl CertArgs {
    /// The names the certificate is for: the Service's, then the extra ones.
    fn names(&self, namespace: &str) -> Vec<String> {
        let mut names = pki::dns_names(&self.service, namespace);
        names.extend(self.extra_names.iter().cloned());
        names
    }

    /// The Secret to keep, after checking the renewal window fits in the validity.
    fn spec(&self, secret: SecretArgs) -> Result<cluster::SecretSpec, Error> {
        if self.renew_before_days >= self.validity_days {
            return Err(Error::RenewWindow { renew: self.renew_before_days, validity: self.validity_days });
        }
        if self.ca_validity_days < self.validity_days {
            return Err(Error::CaValidity { ca: self.ca_validity_days, validity: self.validity_days });
        }
        Ok(cluster::SecretSpec {
            namespace: secret.namespace,
            secret: secret.secret,
            service: self.service.clone(),
            extra_names: self.extra_names.clone(),
            validity: days(self.validity_days),
            ca_validity: days(self.ca_validity_days),
            renew_before: days(self.renew_before_days),
        })
    }
}

/// `certs-gen run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    #[allow(missing_docs, reason = "a flattened group's help is its own type's doc comments")]
    pub secret: SecretArgs,
    /// The certificate to make.
    #[command(flatten)]
    pub cert: CertArgs,
    /// The MutatingWebhookConfiguration whose webhooks must trust the Secret's CA (for the
    /// webhook's Secret; leave unset for the aggregator's). Its caBundle is written before
    /// the Secret, so a pod serving the Secret's certificate is trusted from its start.
    #[arg(long, env = "CERTS_GEN_WEBHOOK_CONFIG")]
    pub webhook_config: Option<String>,
    /// Seconds between two rounds (each round reads the Secret and the configuration, and
    /// writes only what is not good: a re-created configuration is repaired within this).
    #[arg(long, env = "CERTS_GEN_INTERVAL_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub interval_seconds: u64,
}

/// `certs-gen create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    #[allow(missing_docs, reason = "a flattened group's help is its own type's doc comments")]
    pub secret: SecretArgs,
    /// The certificate to make.
    #[command(flatten)]
    pub cert: CertArgs,
    /// Write ca.crt, tls.crt and tls.key into this directory instead of a Secret (no cluster).
    #[arg(long, env = "CERTS_GEN_OUT_DIR")]
    pub out_dir: Option<PathBuf>,
    /// After making sure of the Secret, wait until this directory (where the pod mounts the
    /// Secret, `optional: true`) holds the Secret's current ca.crt, so the container that
    /// starts next finds the files (an init container's last step).
    #[arg(long, env = "CERTS_GEN_WAIT_MOUNTED", conflicts_with = "out_dir")]
    pub wait_mounted: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs, reason = "a flattened group's help is its own type's doc comments")]
    pub wait: WaitTimeout,
}

/// How long to wait for a mounted Secret.
#[derive(Debug, Clone, Args)]
pub struct WaitTimeout {
    /// Give up waiting for the mounted Secret after this many seconds (the kubelet refreshes a
    /// Secret volume on its pod sync, about a minute); the kubelet then restarts the init
    /// container.
    #[arg(long, env = "CERTS_GEN_WAIT_TIMEOUT_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub wait_timeout_seconds: u64,
}

/// `certs-gen wait`.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// The directory where the Secret is mounted (ca.crt, tls.crt, tls.key).
    #[arg(long, env = "CERTS_GEN_DIR")]
    pub dir: PathBuf,
    /// Namespace of the Service.
    #[arg(long, env = "CERTS_GEN_NAMESPACE", default_value = "durable-scaler")]
    pub namespace: String,
    /// Name of the Service the certificate must be valid for (its names as for `create`).
    #[arg(long, env = "CERTS_GEN_SERVICE", required_unless_present = "ca_only")]
    pub service: Option<String>,
    /// The volume holds only ca.crt (a CA to give to clients, e.g. the aggregator's CA in the
    /// webhook pod): wait until it holds a CA certificate valid now.
    #[arg(long, env = "CERTS_GEN_CA_ONLY", conflicts_with_all = ["service", "extra_names"])]
    pub ca_only: bool,
    /// Further DNS names or IP addresses the certificate must carry.
    #[arg(long = "extra-name", env = "CERTS_GEN_EXTRA_NAMES", value_delimiter = ',')]
    pub extra_names: Vec<String>,
    #[command(flatten)]
    #[allow(missing_docs, reason = "a flattened group's help is its own type's doc comments")]
    pub wait: WaitTimeout,
}

/// `certs-gen patch`.
#[derive(Debug, Clone, Args)]
pub struct PatchArgs {
    #[command(flatten)]
    #[allow(missing_docs, reason = "a flattened group's help is its own type's doc comments")]
    pub secret: SecretArgs,
    /// Name of the MutatingWebhookConfiguration whose webhooks get the CA.
    #[arg(long, env = "CERTS_GEN_WEBHOOK_CONFIG", default_value = "durable-scaler-webhook")]
    pub webhook_config: String,
}

const DAY: Duration = Duration::from_secs(24 * 3600);
/// How often a mounted Secret volume is looked at while waiting.
const WAIT_POLL: Duration = Duration::from_secs(1);
/// The first retry of a failed `run` round (doubling up to the interval): at install the
/// MutatingWebhookConfiguration may be applied a moment after the Deployment.
const FIRST_RETRY: Duration = Duration::from_secs(5);

fn days(days: u64) -> Duration {
    DAY * u32::try_from(days).unwrap_or(u32::MAX)
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--renew-before-days` is not below `--validity-days`.
    #[error(
        "--renew-before-days (CERTS_GEN_RENEW_BEFORE_DAYS) {renew} must be below --validity-days \
         (CERTS_GEN_VALIDITY_DAYS) {validity}, or every run would renew"
    )]
    RenewWindow {
        /// Renewal window in days.
        renew: u64,
        /// Validity in days.
        validity: u64,
    },
    /// `--ca-validity-days` is below `--validity-days`.
    #[error(
        "--ca-validity-days (CERTS_GEN_CA_VALIDITY_DAYS) {ca} must be at least --validity-days \
         (CERTS_GEN_VALIDITY_DAYS) {validity}: a certificate cannot outlive its CA"
    )]
    CaValidity {
        /// CA validity in days.
        ca: u64,
        /// Certificate validity in days.
        validity: u64,
    },
    /// Writing the files failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No Kubernetes configuration was found.
    #[error("no Kubernetes configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(kube::Error),
    /// Generating material failed.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The cluster side failed.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The mounted Secret did not show the material in time.
    #[error(transparent)]
    Wait(#[from] mounted::WaitError),
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` (mode 0600) into `dir`, creating it.
pub fn write_files(dir: &std::path::Path, material: &pki::Material) -> Result<(), Error> {
    let write = |name: &str, contents: &str, private: bool| -> Result<(), Error> {
        let path = dir.join(name);
        let result = (|| {
            std::fs::create_dir_all(dir)?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            if private {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            std::io::Write::write_all(&mut options.open(&path)?, contents.as_bytes())
        })();
        result.map_err(|source| Error::Write { path, source })
    };
    write("ca.crt", &material.ca_pem, false)?;
    write("tls.crt", &material.cert_pem, false)?;
    write("tls.key", &material.key_pem, true)
}

/// Runs one command with `client` (made on demand from the environment when `None`).
pub async fn execute(command: Command, client: Option<kube::Client>) -> Result<String, Error> {
    let client = || async {
        match client {
            Some(c) => Ok(c),
            None => kube::Client::try_default().await.map_err(Error::Config),
        }
    };
    let now = time::OffsetDateTime::now_utc();
    match command {
        Command::Run(args) => {
            let spec = args.cert.spec(args.secret)?;
            let schedule = renewer::Schedule {
                interval: Duration::from_secs(args.interval_seconds),
                first_retry: FIRST_RETRY,
            };
            let client = client().await?;
            let config = args.webhook_config.as_deref();
            let rounds = renewer::run(
                client,
                &spec,
                config,
                schedule,
                &mut renewer::SystemClock,
                renewer::terminated(),
            )
            .await;
            Ok(format!("stopped after {rounds} round(s) keeping Secret {}/{}", spec.namespace, spec.secret))
        }
        Command::Create(args) => {
            if let Some(dir) = &args.out_dir {
                let spec = args.cert.spec(args.secret.clone())?;
                let names = args.cert.names(&spec.namespace);
                write_files(dir, &pki::generate_with_ca(&names, now, spec.validity, spec.ca_validity)?)?;
                return Ok(format!(
                    "wrote ca.crt, tls.crt and tls.key for {} into {}",
                    names.join(", "),
                    dir.display()
                ));
            }
            let spec = args.cert.spec(args.secret)?;
            let client = client().await?;
            let outcome = cluster::create(client.clone(), &spec, now).await?;
            if let Some(dir) = &args.wait_mounted {
                // Read back rather than use what this run wrote: another pod may have won.
                let ca = cluster::read_ca(client, &spec.namespace, &spec.secret).await?;
                let timeout = Duration::from_secs(args.wait.wait_timeout_seconds);
                mounted::wait_for(dir, timeout, WAIT_POLL, |dir| mounted::holds_ca(dir, &ca.0)).await?;
            }
            Ok(match outcome {
                cluster::Outcome::Created => format!("created Secret {}/{}", spec.namespace, spec.secret),
                cluster::Outcome::Renewed { reason } => {
                    format!("renewed Secret {}/{} ({reason})", spec.namespace, spec.secret)
                }
                cluster::Outcome::Unchanged => {
                    format!("Secret {}/{} is valid; nothing to do", spec.namespace, spec.secret)
                }
            })
        }
        Command::Patch(args) => {
            let changed = cluster::patch(
                client().await?,
                &args.secret.namespace,
                &args.secret.secret,
                &args.webhook_config,
            )
            .await?;
            Ok(format!("MutatingWebhookConfiguration {}: {changed} caBundle(s) updated", args.webhook_config))
        }
        Command::Wait(args) => {
            let timeout = Duration::from_secs(args.wait.wait_timeout_seconds);
            let Some(service) = args.service.filter(|_| !args.ca_only) else {
                mounted::wait_for(&args.dir, timeout, WAIT_POLL, |dir| {
                    mounted::holds_ca_certificate(dir, time::OffsetDateTime::now_utc())
                })
                .await?;
                return Ok(format!("{} holds a CA certificate", args.dir.display()));
            };
            let mut names = pki::dns_names(&service, &args.namespace);
            names.extend(args.extra_names.iter().cloned());
            mounted::wait_for(&args.dir, timeout, WAIT_POLL, |dir| {
                mounted::holds_valid_material(dir, &names, time::OffsetDateTime::now_utc())
            })
            .await?;
            Ok(format!("{} holds a certificate for {}", args.dir.display(), names.join(", ")))
        }
    }
}

/// Parses the command line and runs it.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // kube links rustls; install ring explicitly so no provider ambiguity can arise.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("certs-gen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, None)) {
        Ok(message) => {
            tracing::info!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
