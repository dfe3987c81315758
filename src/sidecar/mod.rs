//! The `durable-scaler sidecar` role: runs next to a Durable Functions app in its pod, reads
//! the control queues of the partitions this pod owns (and the work-item queue when it owns
//! partition 0) every interval, and reports them to the aggregator.
//!
//! Data flow: [`poll::poll`] (storage, read-only) -> a `Report` -> a one-slot watch channel ->
//! [`report::deliver_to_every_replica`] -> one [`report::deliver_latest`] per aggregator
//! replica (gRPC). Polling never waits on the aggregator, and a slow or absent replica only
//! ever costs its own latest report. On shutdown a final `leaving` report tells every
//! replica to probe this pod's partitions itself; a plain-container sidecar sends it only
//! after its app stopped, reporting `draining` until then ([`stop`]).
//!
//! The HTTP server, the poll loop and the delivery run under a
//! [`crate::shutdown::Supervisor`]: if one of them stops before SIGTERM, the sidecar exits
//! with status 1 naming it, and Kubernetes restarts the container.
//!
//! - [`config`]: flags and environment, validated once;
//! - [`poll`]: one poll and its translation into the report protocol;
//! - [`report`]: the gRPC client and the latest-only delivery loop;
//! - [`stop`]: when a plain-container sidecar leaves (after its app);
//! - [`drain`]: `GET /drain`, the app container's preStop hook: drains the Functions host;
//! - [`metrics`]: Prometheus metrics and the `/healthz` + `/metrics` server.

pub(crate) mod config;
pub(crate) mod drain;
pub(crate) mod metrics;
pub(crate) mod poll;
pub(crate) mod report;
pub(crate) mod stop;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

pub use config::{AppLimitArgs, AppLimits, AppQueueSettings, Args, Config, ConfigError};
pub use metrics::Metrics;
pub use report::{Replicas, ReportClient};

use crate::{
    clock::UnixMs,
    proto::report as proto,
    shutdown::{Shutdown, Supervisor, TaskFailure},
    storage::{HubRead, StorageErrorKind, StorageOptions, TaskHubReader},
};

/// How long the final `leaving` report may take: the whole shutdown must fit in 2 s.
const LEAVING_TIMEOUT: Duration = Duration::from_millis(1200);
/// How long the tasks may take to stop after the signal (the HTTP server's connections).
const DRAIN_TIMEOUT: Duration = Duration::from_millis(300);
/// HTTP/2 streams open at once on one connection of the HTTP port (probes, Prometheus).
const HTTP_MAX_CONCURRENT_STREAMS: u32 = 16;
/// Connections open at once on the HTTP port.
const HTTP_MAX_CONNECTIONS: usize = 64;
/// Bytes of `/metrics` and `/healthz` answers not yet read by their clients (`/metrics` is
/// a few KiB).
const HTTP_ANSWER_BUDGET_BYTES: usize = 1024 * 1024;

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr} (DURABLE_SCALER_HTTP_ADDR): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The aggregator URL cannot make a gRPC endpoint.
    #[error("DURABLE_SCALER_AGGREGATOR: {0}")]
    Aggregator(#[from] report::ReportError),
}

/// A sidecar with its HTTP port bound, ready to run.
#[derive(Debug)]
pub struct Sidecar {
    config: Config,
    listener: tokio::net::TcpListener,
    replicas: Replicas,
    metrics: Arc<Metrics>,
}

/// Binds the health/metrics listener. The default `0.0.0.0:port` ("every address") binds
/// `[::]:port` with `IPV6_V6ONLY` off instead, which takes IPv4 (as mapped addresses) and
/// IPv6 alike, so the kubelet's probe reaches it on IPv4, IPv6 and dual-stack clusters; where
/// the node has no IPv6 at all it falls back to `0.0.0.0`. Any other address is bound as given.
fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listen = |addr: SocketAddr, dual_stack: bool| -> std::io::Result<tokio::net::TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        if dual_stack {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        tokio::net::TcpListener::from_std(socket.into())
    };
    if addr.ip() == std::net::Ipv4Addr::UNSPECIFIED {
        let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
        match listen(any, true) {
            Ok(listener) => return Ok(listener),
            Err(error) => tracing::debug!(%error, "no IPv6 here; serving on IPv4 only"),
        }
    }
    listen(addr, false)
}

impl Sidecar {
    /// Binds the HTTP address and prepares the aggregator client (which connects lazily).
    pub async fn bind(config: Config) -> Result<Self, SidecarError> {
        let listener = bind_http(config.http_addr)
            .map_err(|source| SidecarError::Bind { addr: config.http_addr, source })?;
        let replicas = Replicas::new(
            &config.aggregator,
            config.aggregator_ca.as_deref(),
            config.token_file.clone(),
            config.aggregator_addresses.clone(),
        )?;
        Ok(Self { config, listener, replicas, metrics: Arc::new(Metrics::new()) })
    }

    /// The address `/healthz` and `/metrics` are served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.http_addr)
    }

    /// The sidecar's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Polls and reports every interval until `shutdown`, then sends a `leaving` report and
    /// returns (within about 1.5 s of the signal). A failure is logged and the sidecar stops.
    pub async fn run(self, shutdown: Shutdown) {
        if let Err(e) = self.serve(shutdown).await {
            tracing::error!("{e}");
        }
    }

    /// As [`Sidecar::run`], returning the task that stopped before the signal, if one did
    /// (it fires `shutdown` for the others; the leaving report still goes out). With
    /// `app_exit_wait` set, the tasks go on after `shutdown`, reporting `draining`, until the
    /// app stopped or the wait ran out ([`stop`]).
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), TaskFailure> {
        let Self { config, listener, replicas, metrics } = self;
        // What ends the tasks: the signal itself, or, for a sidecar that must outlive its app,
        // the app's stop after the signal (`draining` is the signal then).
        let outlive_app = !config.app_exit_wait.is_zero();
        let (stop, draining) =
            if outlive_app { (Shutdown::new(), Some(shutdown.clone())) } else { (shutdown.clone(), None) };
        let app = stop::AppWatch::new(config.app_port.filter(|_| outlive_app));
        let (progress, polls) = watch::channel(stop::PollProgress::default());
        if let Some(sigterm) = &draining {
            tokio::spawn(stop::stop_after_app(
                sigterm.clone(),
                stop.clone(),
                app.clone(),
                polls,
                config.app_exit_wait,
            ));
        }
        let mut supervisor = Supervisor::new(stop.clone());
        let router =
            metrics::router(metrics.clone(), drain::Drainer::new(config.drain.clone(), metrics.clone()));
        let http = crate::listener::Listener {
            name: "sidecar HTTP",
            protocol: crate::listener::Protocol::Http,
            max_concurrent_streams: HTTP_MAX_CONCURRENT_STREAMS,
            max_connections: crate::listener::connection_limit(HTTP_MAX_CONNECTIONS, 1),
            answer_budget_bytes: HTTP_ANSWER_BUDGET_BYTES,
            tls: None,
            // The preStop hook's answer waits for the host's drain.
            long_request: Some((
                crate::contract::DRAIN_PATH,
                config.drain.as_ref().map_or(Duration::ZERO, |d| d.wait) + drain::STATUS_EVERY * 5,
            )),
        };
        let http_stop = stop.clone();
        supervisor.spawn("sidecar HTTP server", async move {
            crate::listener::serve(listener, http, router, http_stop).await.map_err(|e| e.to_string())
        });
        let (latest, receiver) = watch::channel(None);
        let settings = report::DeliverySettings {
            timeout: config.interval.clamp(Duration::from_secs(2), Duration::from_secs(10)),
            // Half an interval late: a poll that ends a little late is not sent twice, and the
            // aggregator hears twice within its staleness horizon of three intervals.
            resend_after: config.interval + config.interval / 2,
            metrics: metrics.clone(),
        };
        let clients = Arc::new(std::sync::Mutex::new(Vec::new()));
        supervisor.spawn(
            "report delivery",
            report::deliver_to_every_replica(
                replicas,
                receiver,
                config.interval,
                settings,
                clients.clone(),
                stop.clone(),
            ),
        );
        let partition_count = Arc::new(AtomicU32::new(0));
        let poll = PollLoop {
            config: config.clone(),
            metrics: metrics.clone(),
            latest,
            stop: stop.clone(),
            draining,
            app,
            progress,
        };
        let count = partition_count.clone();
        supervisor.spawn("poll loop", async move {
            count.store(poll.run().await, Ordering::Relaxed);
            Ok(())
        });
        let outcome = supervisor.supervise(DRAIN_TIMEOUT).await;

        let leaving =
            leaving_report(&config, config.interval, partition_count.load(Ordering::Relaxed), UnixMs::now());
        let clients: Vec<ReportClient> = clients.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent =
            futures::future::join_all(clients.iter().map(|c| c.submit(leaving.clone(), LEAVING_TIMEOUT)))
                .await;
        let delivered = sent.iter().filter(|r| r.is_ok()).count();
        match sent.iter().find_map(|r| r.as_ref().err()) {
            None => tracing::info!(replicas = delivered, "sent the leaving report"),
            Some(e) => {
                tracing::warn!(delivered, of = sent.len(), error = %e, "could not send the leaving report to every replica")
            }
        }
        outcome
    }
}

/// The poll loop and what it shares.
struct PollLoop {
    config: Config,
    metrics: Arc<Metrics>,
    latest: watch::Sender<Option<proto::Report>>,
    /// Ends the loop.
    stop: Shutdown,
    /// Once fired (SIGTERM, for a sidecar that outlives its app), reports say `draining`
    /// and one poll is made at once.
    draining: Option<Shutdown>,
    app: Arc<stop::AppWatch>,
    progress: watch::Sender<stop::PollProgress>,
}

impl PollLoop {
    /// Polls every interval (and at once when draining starts or the stop logic asks) until
    /// `stop`; returns the last partition count seen.
    async fn run(self) -> u32 {
        let Self { config, metrics, latest, stop, draining, app, progress } = self;
        let reader = TaskHubReader::new(
            &config.account,
            config.task_hub.clone(),
            config.partition_mode,
            storage_options(&config),
        );
        let interval = config.interval;
        let mut ticker = new_ticker(interval, Duration::ZERO);
        let mut partition_count = 0;
        let mut last_error_kind: Option<StorageErrorKind> = None;
        let mut draining_seen = false;
        let mut polls = 0;
        loop {
            let draining_now = async {
                match &draining {
                    Some(signal) if !draining_seen => signal.wait().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.wait() => break,
                _ = ticker.tick() => {}
                () = draining_now => draining_seen = true,
                () = app.poll_now.notified() => {}
            }
            if stop.is_triggered() {
                break;
            }
            let started = Instant::now();
            let requests_before = reader.account().request_count();
            let now = UnixMs::now();
            let result = tokio::select! {
                result = poll::poll(&reader, &config.pod_name, now) => result,
                () = stop.wait() => break,
            };
            app.look().await;
            let kinds: Vec<StorageErrorKind> = result.errors.iter().map(|e| e.kind()).collect();
            let owned = poll::owned_partitions(&result.leases, &config.pod_name);
            metrics.record_poll(
                started.elapsed(),
                owned.len(),
                &kinds,
                reader.account().request_count() - requests_before,
            );
            // Log a storage problem when it starts or changes, not on every poll.
            let kind = kinds.first().copied();
            if kind != last_error_kind {
                match result.errors.first() {
                    Some(e) => tracing::warn!(error = %e, "storage read failed"),
                    None => {
                        let layout = result.layout.map(|l| l.as_str());
                        tracing::info!(
                            ?owned,
                            partitions = result.reading.partition_count,
                            ?layout,
                            "storage reads healthy"
                        )
                    }
                }
                last_error_kind = kind;
            }
            if result.reading.partition_count > 0 {
                partition_count = result.reading.partition_count;
            }
            let mut report = report_of(&config, interval, &result, now);
            report.draining = draining.as_ref().is_some_and(Shutdown::is_triggered);
            latest.send_replace(Some(report));
            polls += 1;
            // Only after the report is out, so the stop logic's "a poll after" has been sent.
            progress.send_replace(stop::PollProgress { polls, owned: owned.len() });
        }
        partition_count
    }
}

/// A ticker of `period` whose first tick comes after `first`; a late tick delays the next.
fn new_ticker(period: Duration, first: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// Per-attempt timeouts sized to the interval: a poll must not outlast several intervals.
fn storage_options(config: &Config) -> StorageOptions {
    StorageOptions {
        attempt_timeout: config.interval.clamp(Duration::from_secs(2), Duration::from_secs(10)),
        max_retries: 2,
    }
}

fn base_report(config: &Config, interval: Duration, sampled_at: UnixMs) -> proto::Report {
    proto::Report {
        pod: Some(proto::PodRef { namespace: config.pod_namespace.clone(), name: config.pod_name.clone() }),
        task_hub: config.task_hub.name().to_string(),
        sampled_at_unix_ms: sampled_at.as_millis(),
        interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        sidecar_version: env!("CARGO_PKG_VERSION").to_string(),
        partition_mode: config.partition_mode.as_str().to_string(),
        // Every report carries them, so the aggregator's last known value is fresh.
        limits: config.app_limits.worker_limits(),
        queue_settings: Some(config.app_limits.queues.to_proto()),
        ..Default::default()
    }
}

/// The report of one poll made at `interval`.
pub(crate) fn report_of(
    config: &Config,
    interval: Duration,
    result: &HubRead,
    sampled_at: UnixMs,
) -> proto::Report {
    proto::Report {
        partition_count: result.reading.partition_count,
        control_queues: result
            .reading
            .control
            .iter()
            .map(|(partition, reading)| proto::ControlQueueSignals {
                partition: *partition,
                signals: Some(poll::reading_to_proto(reading)),
            })
            .collect(),
        work_item: result.reading.work_item.as_ref().map(poll::reading_to_proto),
        error: result.errors.first().map(poll::error_to_proto),
        // The layout detected (or the override's name until one is).
        partition_mode: result.layout.map_or(config.partition_mode.as_str(), |l| l.as_str()).to_string(),
        ..base_report(config, interval, sampled_at)
    }
}

/// The last report before the pod goes: no queues, `leaving` set.
pub(crate) fn leaving_report(
    config: &Config,
    interval: Duration,
    partition_count: u32,
    sampled_at: UnixMs,
) -> proto::Report {
    proto::Report { partition_count, leaving: true, ..base_report(config, interval, sampled_at) }
}

/// `durable-scaler sidecar`: checks the settings clap could not (exit status 2 naming the
/// bad variable), then runs until SIGTERM or Ctrl-C. The caller provides the runtime: one
/// thread is enough, since the work is a few HTTP calls per interval and every pod of the
/// app carries a sidecar, so memory matters more than parallelism.
pub(crate) async fn run(args: Args) -> std::process::ExitCode {
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("durable-scaler sidecar: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = Shutdown::on_signal();
    let sidecar = match Sidecar::bind(config.clone()).await {
        Ok(sidecar) => sidecar,
        Err(e) => {
            eprintln!("durable-scaler sidecar: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing::info!(
        task_hub = config.task_hub.name(),
        pod = config.pod_name,
        mode = config.partition_mode.as_str(),
        interval_ms = config.interval.as_millis() as u64,
        http = %sidecar.http_addr(),
        "sidecar started"
    );
    match sidecar.serve(shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Already logged by the supervisor, naming the task.
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_default_address_takes_ipv4_and_ipv6_clients() {
        let listener = bind_http(SocketAddr::from(([0, 0, 0, 0], 0))).unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("IPv4 client");
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            // This machine has IPv6: the same socket serves it.
            assert!(listener.local_addr().unwrap().is_ipv6());
            tokio::net::TcpStream::connect(("::1", port)).await.expect("IPv6 client");
        }
    }
}
