//! The aggregator role: merges sidecar reports per task hub, probes what no live sidecar
//! covers, applies the heuristic and serves KEDA's external scaler gRPC API.
//!
//! Data flow, one file each:
//! - [`reports`]: the report port (sidecars) -> validated reports;
//! - [`probe`]: the cold probe (storage, with KEDA's connection) -> probe readings;
//! - [`hub`]: the pure merged view of one hub: coverage, activity, decision;
//! - [`registry`]: the tracked hubs, shared by everything here;
//! - [`keda`]: the KEDA port, answered from the registry's memory;
//! - [`settings`]: KEDA's trigger metadata; [`metrics`]: Prometheus (TLS of the gRPC ports:
//!   the shared [`crate::tls`]);
//! - [`sources`]: worker counts and report authentication from outside (Kubernetes).
//!
//! [`Aggregator::new`] takes the two outside sources (and [`Aggregator::on_recommendation_change`]
//! a hook for Events), defined as traits in [`sources`]; this module never names their
//! implementations. The composition root (`crate::app`) plugs in the Kubernetes ones when it
//! finds a Kubernetes configuration, and [`run`] serves until the shutdown signal.

pub(crate) mod coverage;
pub mod hub;
pub(crate) mod keda;
pub mod metrics;
pub(crate) mod probe;
pub mod registry;
pub(crate) mod reports;
pub mod settings;
pub mod sources;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use futures::future::join_all;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::Routes;

use crate::proto::externalscaler::external_scaler_server::ExternalScalerServer;
use crate::proto::report::report_service_server::ReportServiceServer;
use crate::shutdown::{Shutdown, Supervisor, TaskFailure};
use crate::storage::StorageOptions;
use crate::{listener, tls};

use crate::contract::{AGGREGATOR_HTTP_PORT, AGGREGATOR_KEDA_PORT, AGGREGATOR_REPORT_PORT, env, limits};
pub(crate) use registry::ChangeHook;
pub use reports::ReportCheck;
use sources::WorkerCountSource;

/// A hub no KEDA call and no report named for this long is dropped (and its probe stopped).
/// KEDA calls every polling interval (30 s) and HPA sync (15 s), so this is many misses.
const HUB_IDLE_EVICT_MS: i64 = 15 * 60 * 1000;

/// How long a worker-count source may take before the sampling loop goes on without it.
const WORKER_COUNT_TIMEOUT: Duration = Duration::from_secs(1);

/// `durable-scaler aggregator`: merges sidecar reports, probes what they miss, serves KEDA.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address of the KEDA port: externalscaler.ExternalScaler, grpc.health.v1, reflection.
    #[arg(long, env = "DURABLE_SCALER_GRPC_ADDR", default_value_t = any_address(AGGREGATOR_KEDA_PORT))]
    pub grpc_addr: SocketAddr,
    /// Address of the report port the sidecars send to.
    #[arg(long, env = "DURABLE_SCALER_REPORT_ADDR", default_value_t = any_address(AGGREGATOR_REPORT_PORT))]
    pub report_addr: SocketAddr,
    /// Address of the HTTP port: /healthz, /readyz, /metrics.
    #[arg(long, env = env::HTTP_ADDR, default_value_t = any_address(AGGREGATOR_HTTP_PORT))]
    pub http_addr: SocketAddr,
    /// How sidecar reports are authenticated: `tokenreview` (Kubernetes TokenReview of the
    /// sidecar's projected token; needs a Kubernetes configuration) or `none` (accept every
    /// report, with a warning at start).
    #[arg(long, env = "DURABLE_SCALER_REPORT_AUTH", value_enum, default_value = "tokenreview")]
    pub report_auth: ReportAuth,
    /// PEM certificate chain: turns on TLS on the KEDA port (reloaded when the file changes).
    #[arg(long, env = "DURABLE_SCALER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DURABLE_SCALER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: KEDA must present a client certificate signed by it (needs --tls-cert).
    #[arg(long, env = "DURABLE_SCALER_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Serve the report port over TLS too, with --tls-cert/--tls-key (sidecars then use an
    /// https:// URL and DURABLE_SCALER_AGGREGATOR_CA), so their bearer tokens never cross
    /// the pod network in clear. No client certificates are asked for there: sidecars
    /// authenticate with their token.
    #[arg(long, env = "DURABLE_SCALER_REPORT_TLS", requires = "tls_cert")]
    pub report_tls: bool,
    /// How often the TLS files (--tls-cert, --tls-key, --client-ca) are looked at for a
    /// rotated Secret (e.g. 5s, 500ms).
    #[arg(long, env = "DURABLE_SCALER_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = interval)]
    pub tls_reload_interval: Duration,
    /// How often the cold probe reads what no live sidecar covers (e.g. 2s, 500ms).
    #[arg(long, env = "DURABLE_SCALER_PROBE_INTERVAL", default_value = "2s", value_parser = interval)]
    pub probe_interval: Duration,
    /// How often the merged view becomes one latency sample per queue and a decision.
    #[arg(long, env = "DURABLE_SCALER_SAMPLE_INTERVAL", default_value = "2s", value_parser = interval)]
    pub sample_interval: Duration,
    /// How long invisible messages count as work after the last sign of work in their queue
    /// (a visible message, a moving count); after that they count as sleeping durable timers.
    #[arg(long, env = "DURABLE_SCALER_WORK_GRACE", default_value = "5m", value_parser = crate::config::parse_duration)]
    pub work_grace: Duration,
    /// Let trigger metadata name plain-http storage endpoints (a development emulator such as
    /// Azurite on another host). Off, only https endpoints are probed, and
    /// `UseDevelopmentStorage=true` on its default loopback address: whoever reaches the
    /// KEDA port chooses the connection, and the probe sends requests signed with its key to
    /// the endpoints it names.
    #[arg(long, env = "DURABLE_SCALER_ALLOW_HTTP_STORAGE")]
    pub allow_http_storage: bool,
    /// How long after start `/readyz` says ready even if no sidecar reported and no tracked
    /// hub was read whole yet (two default sidecar intervals: any sidecar that exists has
    /// reported by then). Readiness comes earlier with the first sidecar report or once every
    /// tracked hub was read; it goes at once when a server stops.
    #[arg(long, env = "DURABLE_SCALER_READY_AFTER", default_value = "10s", value_parser = crate::config::parse_duration)]
    pub ready_after: Duration,
    /// Keep `controller.kubernetes.io/pod-deletion-cost` on every reporting pod (needs the
    /// Kubernetes API and `patch` on pods), so the ReplicaSet removes the pod holding least
    /// work first; `--pod-deletion-cost=false` turns it off.
    #[arg(long, env = "DURABLE_SCALER_POD_DELETION_COST", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_deletion_cost: bool,
}

/// How the aggregator authenticates sidecar reports (`--report-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReportAuth {
    /// Check each report's bearer token (the sidecar's projected service-account token,
    /// audience `durable-scaler`) with a [`sources::ReportAuthenticator`] and accept reports
    /// only for the pod the token names.
    #[default]
    Tokenreview,
    /// Accept every report unauthenticated (for runs outside a cluster).
    None,
}

/// `0.0.0.0:port`.
fn any_address(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))
}

impl Args {
    /// The defaults of every flag, but loopback ports chosen by the OS, `--report-auth
    /// none` and `--allow-http-storage` (Azurite serves plain http): for tests, benchmarks
    /// and local runs.
    pub fn loopback() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            grpc_addr: any,
            report_addr: any,
            http_addr: any,
            report_auth: ReportAuth::None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            report_tls: false,
            tls_reload_interval: Duration::from_secs(5),
            probe_interval: Duration::from_secs(2),
            sample_interval: Duration::from_secs(2),
            work_grace: Duration::from_secs(300),
            allow_http_storage: true,
            ready_after: Duration::ZERO,
            pod_deletion_cost: true,
        }
    }
}

/// An interval flag: a duration of at least 100 ms (less would only burn CPU and storage).
fn interval(text: &str) -> Result<Duration, String> {
    let d = crate::config::parse_duration(text)?;
    if d < Duration::from_millis(100) {
        Err(format!("`{text}` is below the minimum of 100ms"))
    } else {
        Ok(d)
    }
}

/// Why the aggregator could not run.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// A port could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which port.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS files do not load.
    #[error("--tls-cert/--tls-key/--client-ca: {0}")]
    Tls(#[from] tls::TlsError),
    /// A server failed.
    #[error("{what} server failed: {message}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// The error.
        message: String,
    },
    /// A configuration this build cannot serve.
    #[error("{0}")]
    Config(String),
    /// A server or loop stopped before the shutdown signal, or failed.
    #[error("{0}")]
    Task(#[from] TaskFailure),
}

/// How long the servers may take to finish their open calls after the shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A configured aggregator, not yet listening.
pub struct Aggregator {
    args: Args,
    check: ReportCheck,
    workers: Arc<dyn WorkerCountSource>,
    storage: StorageOptions,
    metrics: metrics::Metrics,
    probe_metrics: probe::ProbeMetrics,
    on_change: Option<ChangeHook>,
    deletion_costs: Option<Arc<dyn sources::PodDeletionCosts>>,
}

/// A listening aggregator: its bound addresses and the task that serves.
#[derive(Debug)]
pub struct RunningAggregator {
    /// Where the KEDA port listens.
    pub grpc_addr: SocketAddr,
    /// Where the report port listens.
    pub report_addr: SocketAddr,
    /// Where the HTTP port listens.
    pub http_addr: SocketAddr,
    /// The shared state (for benchmarks and diagnostics).
    pub registry: Arc<registry::Registry>,
    task: JoinHandle<Result<(), AggregatorError>>,
}

impl RunningAggregator {
    /// Waits until every server has stopped (after the shutdown signal).
    pub async fn wait(self) -> Result<(), AggregatorError> {
        self.task.await.map_err(|e| AggregatorError::Serve { what: "aggregator", message: e.to_string() })?
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, AggregatorError> {
    TcpListener::bind(addr).await.map_err(|source| AggregatorError::Bind { addr, what, source })
}

fn local(
    listener: &TcpListener,
    addr: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr, AggregatorError> {
    listener.local_addr().map_err(|source| AggregatorError::Bind { addr, what, source })
}

impl Aggregator {
    /// An aggregator for `args`, checking reports with `check` and asking `workers` for
    /// worker counts (`sources::LiveReportingPods` when nothing better is available).
    pub fn new(args: Args, check: ReportCheck, workers: Arc<dyn WorkerCountSource>) -> Self {
        let mut metrics = metrics::Metrics::new();
        let probe_metrics = probe::ProbeMetrics::register(metrics.registry_mut());
        // The probe's per-hub series go with their hub too.
        let ownership = probe_metrics.ownership_reads.clone();
        metrics.on_forget(Box::new(move |hub| {
            use crate::storage::Layout;
            use probe::OwnershipFound as Found;
            for layout in [
                Found::Layout(Layout::Table),
                Found::Layout(Layout::Safe),
                Found::Layout(Layout::Legacy),
                Found::Nowhere,
            ] {
                let (namespace, task_hub) = (hub.namespace.clone(), hub.task_hub.clone());
                ownership.remove(&probe::OwnershipLabels { namespace, task_hub, layout });
            }
        }));
        Self {
            args,
            check,
            workers,
            storage: StorageOptions::default(),
            metrics,
            probe_metrics,
            on_change: None,
            deletion_costs: None,
        }
    }

    /// Calls `hook` whenever a hub's recommendation changes (after the log line).
    pub fn on_recommendation_change(mut self, hook: ChangeHook) -> Self {
        self.on_change = Some(hook);
        self
    }

    /// Hands every sampling round's deletion costs of each hub's live pods to `costs`
    /// (`sources::PodDeletionCosts`; the Kubernetes side keeps them on the pods).
    pub fn keep_deletion_costs(mut self, costs: Arc<dyn sources::PodDeletionCosts>) -> Self {
        self.deletion_costs = Some(costs);
        self
    }

    /// The Prometheus registry `/metrics` serves, for the outside sources' own metrics.
    pub(crate) fn metrics_registry(&mut self) -> &mut prometheus_client::registry::Registry {
        self.metrics.registry_mut()
    }

    /// Binds every port and starts serving until `shutdown` fires.
    pub async fn start(self, shutdown: Shutdown) -> Result<RunningAggregator, AggregatorError> {
        let args = &self.args;
        let (acceptor, report_acceptor) = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let files = |client_ca| tls::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca };
                let grpc = tls::ServerOptions { tls13_only: false, alpn: tls::Alpn::Grpc };
                let counters = |port| self.metrics.certificate_reloads(port);
                let keda = tls::ReloadingConfig::load_counted(
                    files(args.client_ca.clone()),
                    grpc,
                    counters(metrics::Port::Keda),
                )?;
                let report = match args.report_tls {
                    true => Some(tls::ReloadingConfig::load_counted(
                        files(None),
                        grpc,
                        counters(metrics::Port::Report),
                    )?),
                    false => None,
                };
                (Some(keda), report)
            }
            (None, None) if args.client_ca.is_none() && !args.report_tls => (None, None),
            _ => {
                return Err(AggregatorError::Config(
                    "--tls-cert and --tls-key go together, and --client-ca and --report-tls need them".into(),
                ));
            }
        };
        let grpc = bind(args.grpc_addr, "KEDA gRPC").await?;
        let report = bind(args.report_addr, "report gRPC").await?;
        let http = bind(args.http_addr, "HTTP").await?;
        let (grpc_addr, report_addr, http_addr) = (
            local(&grpc, args.grpc_addr, "KEDA gRPC")?,
            local(&report, args.report_addr, "report gRPC")?,
            local(&http, args.http_addr, "HTTP")?,
        );
        if matches!(self.check, ReportCheck::AcceptAny) {
            tracing::warn!(
                "--report-auth none: every report on {report_addr} is accepted unauthenticated; anyone \
                 who can reach that port can steer the scaling"
            );
        }

        let metrics = Arc::new(self.metrics);
        let grace_ms = u64::try_from(args.work_grace.as_millis()).unwrap_or(u64::MAX);
        let registry = Arc::new(
            registry::Registry::new(metrics.clone(), grace_ms)
                .with_change_hook(self.on_change.clone())
                .with_deletion_costs(self.deletion_costs.clone()),
        );
        let mut supervisor = Supervisor::new(shutdown.clone());
        let prober =
            probe::Prober::new(registry.clone(), args.probe_interval, self.storage, shutdown.clone())
                .with_metrics(self.probe_metrics.clone())
                .with_failures(supervisor.reporter());
        let endpoints = match args.allow_http_storage {
            true => settings::EndpointRule::AllowHttp,
            false => settings::EndpointRule::HttpsOnly,
        };
        let keda = keda::KedaScaler::new(registry.clone(), prober, endpoints, shutdown.clone());
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ExternalScalerServer<keda::KedaScaler>>().await;
        // Both reflection versions: grpcurl before 1.8.8 (and other older tools) only speak
        // v1alpha.
        let reflection_error = |e: tonic_reflection::server::Error| AggregatorError::Serve {
            what: "reflection",
            message: e.to_string(),
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(reflection_error)?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(reflection_error)?;
        let keda_routes = Routes::new(
            ExternalScalerServer::new(keda).max_decoding_message_size(limits::KEDA_MESSAGE_MAX_BYTES),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha);
        let keda_port = listener::Listener {
            name: "KEDA gRPC",
            protocol: listener::Protocol::Grpc,
            max_concurrent_streams: limits::KEDA_MAX_CONCURRENT_STREAMS,
            max_connections: listener::connection_limit(KEDA_MAX_CONNECTIONS, LISTENERS),
            answer_budget_bytes: 0,
            tls: acceptor.map(|config| (config, args.tls_reload_interval)),
            long_request: None,
        };
        let keda_task = serve(grpc, keda_port, keda_routes.prepare().into_axum_router(), shutdown.clone());

        let reports = reports::Reports::new(registry.clone(), self.check.clone());
        let report_routes = Routes::new(
            ReportServiceServer::new(reports).max_decoding_message_size(limits::REPORT_MESSAGE_MAX_BYTES),
        );
        let report_port = listener::Listener {
            name: "report gRPC",
            protocol: listener::Protocol::Grpc,
            max_concurrent_streams: limits::REPORT_MAX_CONCURRENT_STREAMS,
            max_connections: listener::connection_limit(REPORT_MAX_CONNECTIONS, LISTENERS),
            answer_budget_bytes: 0,
            tls: report_acceptor.map(|config| (config, args.tls_reload_interval)),
            long_request: None,
        };
        let report_task =
            serve(report, report_port, report_routes.prepare().into_axum_router(), shutdown.clone());

        let readiness = Arc::new(Readiness::new(args.ready_after));
        let http_task = serve(
            http,
            http_listener(),
            http_router(metrics, registry.clone(), readiness.clone()),
            shutdown.clone(),
        );
        supervisor.spawn("KEDA gRPC server", joined(keda_task));
        supervisor.spawn("report gRPC server", joined(report_task));
        supervisor.spawn("HTTP server", joined(http_task));
        supervisor.spawn(
            "sample loop",
            sample_loop(registry.clone(), self.workers.clone(), args.sample_interval, shutdown.clone()),
        );
        tracing::info!(
            %grpc_addr,
            %report_addr,
            %http_addr,
            tls = args.tls_cert.is_some(),
            report_tls = args.report_tls,
            "aggregator listening"
        );

        let task = tokio::spawn(async move {
            // Not ready from the moment anything stops serving (a failure fires the signal).
            let unready = async {
                shutdown.wait().await;
                readiness.serving.store(false, Ordering::Relaxed);
            };
            let (outcome, ()) = tokio::join!(supervisor.supervise(DRAIN_TIMEOUT), unready);
            outcome.map_err(AggregatorError::from)
        });
        Ok(RunningAggregator { grpc_addr, report_addr, http_addr, registry, task })
    }
}

/// Every interval: asks the worker-count source about every hub (concurrently, bounded by
/// [`WORKER_COUNT_TIMEOUT`]), then samples and decides.
async fn sample_loop(
    registry: Arc<registry::Registry>,
    workers: Arc<dyn WorkerCountSource>,
    interval: Duration,
    shutdown: Shutdown,
) -> Result<(), String> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shutdown.tick(&mut ticker).await {
        registry.evict_idle(crate::clock::UnixMs::now(), HUB_IDLE_EVICT_MS);
        let hubs = registry.all();
        let counts = join_all(hubs.iter().map(|entry| {
            let workers = workers.clone();
            async move {
                let scaled_object = entry.with_state(|s| s.scaled_object().cloned())?;
                tokio::time::timeout(WORKER_COUNT_TIMEOUT, workers.worker_count(&scaled_object))
                    .await
                    .ok()
                    .flatten()
            }
        }))
        .await;
        let now = crate::clock::UnixMs::now();
        for (entry, count) in hubs.iter().zip(counts) {
            registry.evaluate(entry, count, now);
        }
    }
    Ok(())
}

/// A spawned server's outcome as the supervisor takes it (a panic comes back as the error).
async fn joined<E: std::fmt::Display>(task: JoinHandle<Result<(), E>>) -> Result<(), String> {
    match task.await {
        Ok(outcome) => outcome.map_err(|e| e.to_string()),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(e.to_string()),
    }
}

/// What `/readyz` answers: every server serving, and the replica warm: it heard from a
/// sidecar, or read every hub it tracks, or `--ready-after` passed since start. A replica
/// that is not warm would answer KEDA UNAVAILABLE for most hubs (safe, but noisy), so the
/// Service sends KEDA elsewhere meanwhile; the headless report Service publishes unready
/// replicas, so sidecars reach a replica before it is ready.
#[derive(Debug)]
struct Readiness {
    serving: AtomicBool,
    warm: AtomicBool,
    started: std::time::Instant,
    ready_after: Duration,
}

impl Readiness {
    fn new(ready_after: Duration) -> Self {
        Self {
            serving: AtomicBool::new(true),
            warm: AtomicBool::new(false),
            started: std::time::Instant::now(),
            ready_after,
        }
    }

    /// `None` when ready, else why not. Warmth is kept once reached.
    fn check(&self, registry: &registry::Registry) -> Option<&'static str> {
        if !self.serving.load(Ordering::Relaxed) {
            return Some("not serving: shutting down or a server stopped");
        }
        if self.warm.load(Ordering::Relaxed) {
            return None;
        }
        let now = crate::clock::UnixMs::now();
        let hubs = registry.all();
        let heard = hubs.iter().any(|e| e.with_state(|s| s.live_pods(now) > 0));
        let all_read = !hubs.is_empty() && hubs.iter().all(|e| e.with_state(|s| s.is_fully_read()));
        if heard || all_read || self.started.elapsed() >= self.ready_after {
            self.warm.store(true, Ordering::Relaxed);
            return None;
        }
        Some("warming up: no sidecar has reported yet and no hub was read whole")
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<metrics::Metrics>,
    registry: Arc<registry::Registry>,
    readiness: Arc<Readiness>,
    /// Turns to render `/metrics` or `/hubs` ([`RENDERS_AT_ONCE`]).
    renders: Arc<tokio::sync::Semaphore>,
}

/// `/metrics` and `/hubs` rendered at once: each walks every tracked hub (a few MiB of text
/// and a few hundred milliseconds of CPU for 2,000 hubs in a debug build), so requests for
/// them take turns, off the async workers, and `/healthz` and the gRPC ports keep answering
/// however many arrive.
const RENDERS_AT_ONCE: usize = 2;
/// How long a request waits for its turn to render before it is answered 503.
const RENDER_WAIT: Duration = Duration::from_secs(2);

/// `render`'s answer, made on the blocking pool when a turn comes within [`RENDER_WAIT`].
async fn render(
    renders: &Arc<tokio::sync::Semaphore>,
    render: impl FnOnce() -> axum::response::Response + Send + 'static,
) -> axum::response::Response {
    let Ok(Ok(turn)) = tokio::time::timeout(RENDER_WAIT, renders.clone().acquire_owned()).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "busy: other renderings of /metrics and /hubs are running; retry\n",
        )
            .into_response();
    };
    let rendered = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        render()
    })
    .await;
    rendered.unwrap_or_else(|e| {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {e}\n")).into_response()
    })
}

/// The aggregator's listeners: the KEDA, report and HTTP ports.
const LISTENERS: usize = 3;
/// Connections open at once on the KEDA port: KEDA keeps one per scaler address and
/// operator replica (the metrics server another).
const KEDA_MAX_CONNECTIONS: usize = 1024;
/// Connections open at once on the report port: one per sidecar (each reports to every
/// replica).
const REPORT_MAX_CONNECTIONS: usize = 16_384;
/// Connections open at once on the HTTP port: probes and Prometheus.
const HTTP_MAX_CONNECTIONS: usize = 256;
/// HTTP/2 streams open at once on one connection of the HTTP port.
const HTTP_MAX_CONCURRENT_STREAMS: u32 = 64;
/// Bytes of HTTP-port answers not yet read by their clients: a few `/hubs` of 2,000 hubs
/// (about 1.5 MiB each) and `/metrics` at once.
const HTTP_ANSWER_BUDGET_BYTES: usize = 32 * 1024 * 1024;

/// The HTTP port's listener settings (plain HTTP/1 and HTTP/2).
fn http_listener() -> listener::Listener {
    listener::Listener {
        name: "HTTP",
        protocol: listener::Protocol::Http,
        max_concurrent_streams: HTTP_MAX_CONCURRENT_STREAMS,
        max_connections: listener::connection_limit(HTTP_MAX_CONNECTIONS, LISTENERS),
        answer_budget_bytes: HTTP_ANSWER_BUDGET_BYTES,
        tls: None,
        long_request: None,
    }
}

/// Serves `router` on `socket` with `settings` (the bounds every listener has, the gRPC
/// ports' message sizes set per service) until `shutdown`.
fn serve(
    socket: TcpListener,
    settings: listener::Listener,
    router: axum::Router,
    shutdown: Shutdown,
) -> JoinHandle<Result<(), std::io::Error>> {
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let served = listener::serve(socket, settings, router, shutdown).await;
        match served {
            // Ending before the signal is the supervisor's to report; ending after it is
            // the stop asked for, whatever came first.
            Ok(()) if !stop.is_triggered() => {
                Err(std::io::Error::other("stopped accepting connections before the shutdown signal"))
            }
            other => other,
        }
    })
}

fn http_router(
    metrics: Arc<metrics::Metrics>,
    registry: Arc<registry::Registry>,
    readiness: Arc<Readiness>,
) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(|State(s): State<HttpState>| async move {
                match s.readiness.check(&s.registry) {
                    None => (StatusCode::OK, "ready"),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(|State(s): State<HttpState>| async move {
                let metrics = s.metrics.clone();
                render(&s.renders, move || {
                    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], metrics.encode()).into_response()
                })
                .await
            }),
        )
        .route(
            "/hubs",
            axum::routing::get(|State(s): State<HttpState>| async move {
                let registry = s.registry.clone();
                render(&s.renders, move || {
                    let now = crate::clock::UnixMs::now();
                    let mut hubs: Vec<registry::HubStatus> =
                        registry.all().iter().map(|e| e.status(now)).collect();
                    hubs.sort_by(|a, b| (&a.namespace, &a.task_hub).cmp(&(&b.namespace, &b.task_hub)));
                    axum::Json(hubs).into_response()
                })
                .await
            }),
        )
        .with_state(HttpState {
            metrics,
            registry,
            readiness,
            renders: Arc::new(tokio::sync::Semaphore::new(RENDERS_AT_ONCE)),
        })
}

/// Starts `aggregator` and serves until `shutdown`: exit status 2 when it cannot start (a
/// port, the TLS files), 1 when a server or loop stops or fails (logged by name).
pub async fn run(aggregator: Aggregator, shutdown: Shutdown) -> std::process::ExitCode {
    let running = match aggregator.start(shutdown).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match running.wait().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use super::hub::HubKey;
    use super::settings::HubSettings;
    use super::sources::ScaledObjectKey;
    use super::*;

    /// A worker-count source in memory: answers 3 for every ScaledObject but `stuck`, for
    /// which it never answers (an API server that hangs); counts every question.
    struct Counting {
        stuck: String,
        asked: Mutex<HashMap<String, u32>>,
    }

    impl WorkerCountSource for Counting {
        fn worker_count<'a>(&'a self, scaled_object: &'a ScaledObjectKey) -> BoxFuture<'a, Option<u32>> {
            *self.asked.lock().unwrap().entry(scaled_object.name.clone()).or_default() += 1;
            let stuck = scaled_object.name == self.stuck;
            Box::pin(async move {
                if stuck {
                    std::future::pending::<()>().await;
                }
                Some(3)
            })
        }
    }

    /// On paused time (tokio's clock only moves when every task waits): the loop asks about
    /// every hub once per interval, a source that never answers costs one
    /// [`WORKER_COUNT_TIMEOUT`] and holds no other hub back, and shutdown ends the loop at
    /// once rather than at the next tick.
    #[tokio::test(start_paused = true)]
    async fn the_sample_loop_asks_once_an_interval_and_a_hung_source_costs_one_timeout() {
        let registry = Arc::new(registry::Registry::new(Arc::new(metrics::Metrics::new()), 60_000));
        for name in ["healthy", "stuck"] {
            let entry = registry.track(&HubKey::new("apps", name), name, None).unwrap();
            let settings =
                HubSettings::from_metadata(&HashMap::from([("taskHubName".to_string(), name.to_string())]))
                    .unwrap();
            let scaled_object = ScaledObjectKey { namespace: "apps".into(), name: name.into() };
            entry.with_state(|s| s.keda_call(&settings, scaled_object));
        }
        let source = Arc::new(Counting { stuck: "stuck".into(), asked: Mutex::new(HashMap::new()) });
        let shutdown = Shutdown::new();
        let interval = Duration::from_secs(5);
        let looping = tokio::spawn(sample_loop(registry.clone(), source.clone(), interval, shutdown.clone()));

        // Rounds start at 0, 5, ..., 60 s; each waits one timeout for the stuck hub, which
        // the interval (Delay) absorbs.
        tokio::time::sleep(Duration::from_secs(60) + WORKER_COUNT_TIMEOUT / 2).await;
        let asked = source.asked.lock().unwrap().clone();
        assert_eq!(asked.get("healthy"), Some(&13), "{asked:?}");
        assert_eq!(asked.get("stuck"), Some(&13), "{asked:?}");

        let stopped_at = tokio::time::Instant::now();
        shutdown.trigger();
        looping.await.unwrap().unwrap();
        assert!(
            stopped_at.elapsed() <= WORKER_COUNT_TIMEOUT,
            "stopped {:?} after the signal",
            stopped_at.elapsed()
        );
    }
}
