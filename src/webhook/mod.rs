//! `durable-scaler webhook`: the mutating admission webhook that injects the sidecar.
//!
//! Layers, outside in: a TCP listener; TLS ([`crate::tls`], certificate reloaded from disk,
//! the accept loop every TLS listener of the project shares); HTTP/1.1
//! and HTTP/2 (hyper); an axum router (`POST /mutate`, `GET /healthz`, `GET /metrics`) that
//! checks size and content type; the pure review ([`review`]) over the pure injection plan
//! ([`inject`]). Only the two outer layers do I/O.

pub mod inject;
pub mod metrics;
pub mod review;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::StreamExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;
use crate::tls::{Alpn, ReloadingConfig, ServerOptions, TlsError, TlsFiles, TlsIncoming};
use inject::InjectionSettings;
use metrics::Metrics;

/// The one image that serves every role; the sidecar's default image.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/durable-scaler/durable-scaler:", env!("CARGO_PKG_VERSION"));
/// The aggregator's report endpoint as installed by `manifests/`.
pub(crate) const DEFAULT_AGGREGATOR: &str = crate::contract::DEFAULT_AGGREGATOR_URL;
/// The webhook's default listen address (the Service maps 443 to it); its port is
/// [`crate::contract::WEBHOOK_PORT`] (checked by a test).
pub const DEFAULT_ADDR: &str = "0.0.0.0:8443";
/// The certificate reload intervals accepted.
const TLS_RELOAD_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// Largest AdmissionReview accepted; the API server's own request limit is larger, but a
/// pod is far smaller than this.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long open connections get to finish after shutdown fires.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `durable-scaler webhook` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// PEM certificate chain (serving certificate first); re-read when it changes.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_TLS_CERT", default_value = "/etc/durable-scaler/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key (ECDSA P-256 or RSA, PKCS#8, SEC1 or PKCS#1); re-read with the certificate.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_TLS_KEY", default_value = "/etc/durable-scaler/tls/tls.key")]
    pub tls_key: PathBuf,
    /// Accept TLS 1.3 only (default: TLS 1.2 and 1.3).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_TLS13_ONLY")]
    pub tls13_only: bool,
    /// How often to look at the certificate files for a renewed pair (1s to 1h).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "5s",
          value_parser = |text: &str| crate::config::parse_duration_within(text, &TLS_RELOAD_RANGE))]
    pub tls_reload_interval: Duration,
    /// Image of the injected sidecar (by default this webhook's own image).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub sidecar_image: String,
    /// Aggregator report URL given to sidecars (annotation durable-scaler.io/aggregator overrides).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_AGGREGATOR", default_value = DEFAULT_AGGREGATOR,
          value_parser = crate::config::parse_http_url)]
    pub aggregator: url::Url,
    /// PEM CA that signed the aggregator's report-port certificate (aggregator
    /// `--report-tls`): needed for an https aggregator URL, read at start and given to each
    /// sidecar inline (`DURABLE_SCALER_AGGREGATOR_CA`). A new CA reaches pods created after
    /// a restart of the webhook.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_AGGREGATOR_CA")]
    pub sidecar_aggregator_ca: Option<PathBuf>,
    /// Inject a native sidecar (init container with restartPolicy Always, Kubernetes 1.29+);
    /// `false` appends a plain container instead (annotation durable-scaler.io/native-sidecar
    /// overrides per pod).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_NATIVE_SIDECAR", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The certificate or key is unusable.
    #[error("TLS (--tls-cert / --tls-key, DURABLE_SCALER_WEBHOOK_TLS_CERT / _KEY): {0}")]
    Tls(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (--addr, DURABLE_SCALER_WEBHOOK_ADDR): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `--sidecar-image` is empty.
    #[error("--sidecar-image (DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE) is empty")]
    Image,
    /// `--sidecar-aggregator-ca` is missing for an https aggregator, or unusable.
    #[error("--sidecar-aggregator-ca (DURABLE_SCALER_WEBHOOK_AGGREGATOR_CA): {0}")]
    AggregatorCa(String),
}

#[derive(Debug, Clone)]
struct AppState {
    settings: Arc<InjectionSettings>,
    metrics: Arc<Metrics>,
}

/// A bound, not yet serving webhook.
#[derive(Debug)]
pub struct Webhook {
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    reload_interval: Duration,
    state: AppState,
}

impl Webhook {
    /// Validates `args`, loads the certificate and binds the listener.
    pub async fn bind(args: &Args) -> Result<Self, Error> {
        let aggregator_ca = match &args.sidecar_aggregator_ca {
            Some(path) => {
                let pem = crate::tls::read_ca_pem(path).map_err(|e| Error::AggregatorCa(e.to_string()))?;
                let text = String::from_utf8(pem)
                    .map_err(|_| Error::AggregatorCa(format!("{} is not PEM text", path.display())))?;
                Some(text.trim().to_owned())
            }
            None if args.aggregator.scheme() == "https" => {
                return Err(Error::AggregatorCa(format!(
                    "not set, and --aggregator {:?} is https: sidecars need the CA of its certificate",
                    args.aggregator.as_str()
                )));
            }
            None => None,
        };
        if args.sidecar_image.trim().is_empty() {
            return Err(Error::Image);
        }
        let metrics = Arc::new(Metrics::new());
        let tls = ReloadingConfig::load_counted(
            TlsFiles { cert: args.tls_cert.clone(), key: args.tls_key.clone(), client_ca: None },
            ServerOptions { tls13_only: args.tls13_only, alpn: Alpn::Https },
            metrics.certificate_reload_counters(),
        )?;
        let listener =
            TcpListener::bind(args.addr).await.map_err(|source| Error::Bind { addr: args.addr, source })?;
        let settings = InjectionSettings {
            image: args.sidecar_image.clone(),
            aggregator: args.aggregator.clone(),
            aggregator_ca,
            native_sidecar: args.native_sidecar,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        Ok(Self {
            listener,
            tls,
            reload_interval: args.tls_reload_interval,
            state: AppState { settings: Arc::new(settings), metrics },
        })
    }

    /// Overrides the certificate reload interval (tests use a short one).
    pub fn with_reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = interval;
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The counters this webhook serves on `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// The serving certificate's reloading configuration (its reload counters).
    pub fn tls_config(&self) -> Arc<ReloadingConfig> {
        self.tls.clone()
    }

    /// Serves until `shutdown` fires, then lets open connections finish (bounded).
    pub async fn serve(self, shutdown: Shutdown) {
        let mut incoming = TlsIncoming::new(self.listener, self.tls, self.reload_interval, shutdown.clone());
        let app = router(self.state);
        let graceful = GracefulShutdown::new();
        loop {
            let stream = tokio::select! {
                _ = shutdown.wait() => break,
                next = incoming.next() => match next {
                    Some(Ok(stream)) => stream,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "connection not served");
                        continue;
                    }
                    None => break,
                },
            };
            let peer = stream.get_ref().0.peer_addr().ok();
            let service = TowerToHyperService::new(app.clone());
            let connection_watcher = graceful.watcher();
            tokio::spawn(async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // With a timer, HTTP/1 drops a client that sends no complete header within
                // 30 s (hyper's default header read timeout), so idle sockets cannot pile up.
                builder.http1().timer(TokioTimer::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection_watcher.watch(connection.into_owned()).await {
                    tracing::debug!(?peer, error = %e, "connection ended with an error");
                }
            });
        }
        // No new connections from here on; open ones get the drain timeout.
        incoming.close().await;
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(serve_metrics))
        .with_state(state)
}

async fn mutate(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let refuse = |status: StatusCode, reason: String| {
        state.metrics.refused.inc();
        tracing::debug!(%status, %reason, "review refused");
        (status, reason).into_response()
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected Content-Type application/json, got {content_type:?}\n"),
        );
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {MAX_BODY_BYTES} bytes\n"));
    }
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(e) if is_length_limit(&e) => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {MAX_BODY_BYTES} bytes\n"));
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("cannot read body: {e}\n")),
    };
    let outcome = review::review(&bytes, &state.settings);
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        state.metrics.reviews.inc();
    } else {
        state.metrics.refused.inc();
    }
    let uid = outcome.body.pointer("/response/uid").and_then(|u| u.as_str()).unwrap_or_default();
    if outcome.injected && !outcome.dry_run {
        state.metrics.injections.inc();
        tracing::info!(uid, "sidecar injected");
    } else if !status.is_success() {
        tracing::info!(uid, reason = ?outcome.body.pointer("/response/status/message"), "review rejected");
    }
    (status, axum::Json(outcome.body)).into_response()
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

async fn serve_metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.encode())
}

/// Runs `durable-scaler webhook` until SIGTERM or Ctrl-C; exit status 2 when it cannot
/// start (the certificate, the CA, the address).
pub(crate) async fn run(args: Args) -> ExitCode {
    let webhook = match Webhook::bind(&args).await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let addr = webhook.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, native_sidecar = args.native_sidecar, image = %args.sidecar_image, "webhook serving");
    webhook.serve(Shutdown::on_signal()).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_address_is_the_contract_port() {
        let addr: SocketAddr = DEFAULT_ADDR.parse().unwrap();
        assert_eq!(addr.port(), crate::contract::WEBHOOK_PORT);
    }
}
