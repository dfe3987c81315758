//! `durable-scaler webhook`: the mutating admission webhook that injects the sidecar.
//!
//! Layers, outside in: a TCP listener; TLS ([`tls`], certificate reloaded from disk); HTTP/1.1
//! and HTTP/2 (hyper); an axum router (`POST /mutate`, `GET /healthz`, `GET /metrics`) that
//! checks size and content type; the pure review ([`review`]) over the pure injection plan
//! ([`inject`]). Only the two outer layers do I/O.

pub mod inject;
pub mod review;
pub mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::shutdown::Shutdown;
use inject::InjectionSettings;
use tls::{CertStore, TlsError};

/// The one image that serves every role; the sidecar's default image.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/durable-scaler/durable-scaler:", env!("CARGO_PKG_VERSION"));
/// The aggregator's report endpoint as installed by `manifests/`.
pub const DEFAULT_AGGREGATOR: &str = crate::contract::DEFAULT_AGGREGATOR_URL;
/// The webhook's default listen address (the Service maps 443 to it); its port is
/// [`crate::contract::WEBHOOK_PORT`] (checked by a test).
pub const DEFAULT_ADDR: &str = "0.0.0.0:8443";
/// The certificate reload intervals accepted.
const TLS_RELOAD_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// Largest AdmissionReview accepted; the API server's own request limit is larger, but a
/// pod is far smaller than this.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Counters served on `/metrics`. Dry-run reviews count in `reviews` only.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reviews answered with 200 (allowed), including dry runs.
    pub reviews: AtomicU64,
    /// Sidecars injected (dry runs excluded: they create no pod).
    pub injections: AtomicU64,
    /// Requests refused (400, 413, 415).
    pub refused: AtomicU64,
}

#[derive(Debug, Clone)]
struct AppState {
    settings: Arc<InjectionSettings>,
    stats: Arc<Stats>,
    certs: Arc<CertStore>,
}

/// A bound, not yet serving webhook.
#[derive(Debug)]
pub struct Webhook {
    listener: TcpListener,
    certs: Arc<CertStore>,
    tls: Arc<rustls::ServerConfig>,
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
        let certs = CertStore::load(&args.tls_cert, &args.tls_key)?;
        let tls = Arc::new(certs.server_config(args.tls13_only)?);
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
            certs: certs.clone(),
            tls,
            reload_interval: args.tls_reload_interval,
            state: AppState { settings: Arc::new(settings), stats: Arc::default(), certs: certs.clone() },
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
    pub fn stats(&self) -> Arc<Stats> {
        self.state.stats.clone()
    }

    /// The certificate store (its reload counters).
    pub fn cert_store(&self) -> Arc<CertStore> {
        self.certs.clone()
    }

    /// Serves until `shutdown` fires, then lets open connections finish (bounded).
    pub async fn serve(self, shutdown: Shutdown) {
        let watcher = tokio::spawn(self.certs.clone().watch(self.reload_interval, shutdown.clone()));
        let acceptor = TlsAcceptor::from(self.tls);
        let app = router(self.state);
        let graceful = GracefulShutdown::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.wait() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Answers are small single writes: without this, Nagle's algorithm holds the last
            // segment of a handshake or response until the peer's delayed ACK (~40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(app.clone());
            let connection_watcher = graceful.watcher();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // With a timer, HTTP/1 drops a client that sends no complete header within
                // 30 s (hyper's default header read timeout), so idle sockets cannot pile up.
                builder.http1().timer(TokioTimer::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection_watcher.watch(connection.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
            tracing::warn!("connections still open after the drain timeout; closing them");
        }
        watcher.abort();
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn mutate(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let refuse = |status: StatusCode, reason: String| {
        state.stats.refused.fetch_add(1, Ordering::Relaxed);
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
        state.stats.reviews.fetch_add(1, Ordering::Relaxed);
    } else {
        state.stats.refused.fetch_add(1, Ordering::Relaxed);
    }
    let uid = outcome.body.pointer("/response/uid").and_then(|u| u.as_str()).unwrap_or_default();
    if outcome.injected && !outcome.dry_run {
        state.stats.injections.fetch_add(1, Ordering::Relaxed);
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

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let stats = &state.stats;
    let body = format!(
        "# TYPE durable_scaler_webhook_reviews_total counter\ndurable_scaler_webhook_reviews_total {}\n\
         # TYPE durable_scaler_webhook_injections_total counter\ndurable_scaler_webhook_injections_total {}\n\
         # TYPE durable_scaler_webhook_refused_total counter\ndurable_scaler_webhook_refused_total {}\n\
         # TYPE durable_scaler_webhook_certificate_reloads_total counter\n\
         durable_scaler_webhook_certificate_reloads_total {}\n\
         # TYPE durable_scaler_webhook_certificate_reload_failures_total counter\n\
         durable_scaler_webhook_certificate_reload_failures_total {}\n",
        stats.reviews.load(Ordering::Relaxed),
        stats.injections.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        state.certs.reloads(),
        state.certs.reload_failures(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Runs `durable-scaler webhook` until SIGTERM or Ctrl-C; exit status 2 when it cannot
/// start (the certificate, the CA, the address).
pub async fn run(args: Args) -> ExitCode {
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
