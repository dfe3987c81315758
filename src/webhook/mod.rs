//! `durable-scaler webhook`: the mutating admission webhook that injects the sidecar.
//!
//! Layers, outside in: a TCP listener; TLS ([`crate::tls`], certificate reloaded from disk,
//! the accept loop every TLS listener of the project shares); HTTP/1.1
//! and HTTP/2 (hyper); an axum router (`POST /mutate`, `GET /healthz`, `GET /metrics`) that
//! checks size and content type; the pure review ([`review`]) over the pure injection plan
//! ([`inject`]). Only the outer layers do I/O, and the Kubernetes side: the cluster's
//! versions for `--native-sidecar auto` ([`cluster`]), `InjectionSkipped` Events
//! ([`events`]) and, once at start, this pod's own image (the sidecar's default).
//!
//! # RBAC: what the webhook server's service account needs
//!
//! | apiGroups | resources | verbs | used by |
//! |---|---|---|---|
//! | `""` | `nodes` | `list` (cluster) | [`cluster`]: each kubelet's version |
//! | `events.k8s.io` | `events` | `create` (app namespaces) | [`events`] |
//! | `""` | `pods` | `get` (its own namespace) | its own pod's image, at start |
//!
//! `/version` needs no rule (the `system:public-info-viewer` role every client has). [`RBAC`]
//! is this table as data; the manifests test holds `manifests/` to it.

pub mod cluster;
pub mod events;
pub mod inject;
pub mod metrics;
pub mod review;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use http_body_util::BodyExt;

use axum::{
    Router,
    body::Body,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::TcpListener;

use k8s_openapi::api::core::v1::Container;

use crate::clock::UnixMs;
use crate::contract::env;
use crate::listener;
use crate::shutdown::{Shutdown, TaskFailure};
use crate::tls::{Alpn, ReloadingConfig, ServerOptions, TlsError, TlsFiles};
use cluster::{NativeSidecarDetector, NativeSidecarMode};
use events::SkipRecorder;
use inject::{InjectionSettings, NativeDefault};
use metrics::Metrics;

/// The webhook server's RBAC (the table in the module docs).
pub const RBAC: [crate::contract::RbacRule; 3] = [
    crate::contract::RbacRule { api_group: "", resource: "nodes", verb: "list", cluster_wide: true },
    crate::contract::RbacRule {
        api_group: "events.k8s.io",
        resource: "events",
        verb: "create",
        cluster_wide: true,
    },
    crate::contract::RbacRule { api_group: "", resource: "pods", verb: "get", cluster_wide: false },
];

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
/// Largest AdmissionReview accepted: 3 MiB, the API server's own limit on a request body
/// (`MaxRequestBodyBytes`, k8s.io/apiserver `pkg/server/config.go` `NewConfig`: etcd takes
/// 1.5 MB, doubled for JSON), so any pod a client could send fits. The review wraps the pod
/// in a small envelope; a pod near 3 MiB is far past what etcd stores (1.5 MiB by default),
/// so it would fail at storage anyway. Istio reads up to 6 MiB (`pkg/kube/util.go`, "an
/// additional 2x buffer"); we stay at 3 MiB because a parsed JSON document takes several
/// times its size in memory and the webhook runs in a 128 MiB limit.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// How much of an over-size body is read and thrown away so that the client, still sending,
/// receives the 413 instead of a reset; beyond it the connection is closed.
const MAX_DISCARD_BYTES: u64 = 4 * MAX_BODY_BYTES as u64;
/// How long one call to the Kubernetes API may take.
const KUBE_API_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 streams open at once on one connection: the API server sends a few at a time.
const HTTP_MAX_CONCURRENT_STREAMS: u32 = 64;
/// Connections open at once (the API server keeps a few; lowered to what the descriptor
/// limit allows).
const MAX_CONNECTIONS: usize = 1024;
/// Bytes of answers (JSON patches, a few KiB each) not yet read by their clients.
const ANSWER_BUDGET_BYTES: usize = 16 * 1024 * 1024;
/// The first bytes of every admission body are charged to the budget of small bodies (a pod
/// is a few KiB), the rest to the budget of large ones, so that clients sending large bodies
/// slowly cannot take the room of ordinary reviews.
const SMALL_BODY_BYTES: usize = 64 * 1024;
/// Bytes of small bodies (or first parts) being read at once: 128 of them.
const SMALL_BODIES_BUDGET_BYTES: usize = 128 * SMALL_BODY_BYTES;
/// Bytes beyond [`SMALL_BODY_BYTES`] being read at once: eight of the largest bodies. Each
/// body read lives on in its parsed form a while, so the two budgets keep the webhook well
/// inside its 128 MiB limit whatever clients send and however slowly.
const LARGE_BODIES_BUDGET_BYTES: usize = 8 * MAX_BODY_BYTES;

/// What the admission bodies being read may hold at once ([`SMALL_BODY_BYTES`]).
#[derive(Debug)]
struct BodyBudget {
    small: Arc<tokio::sync::Semaphore>,
    large: Arc<tokio::sync::Semaphore>,
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self {
            small: Arc::new(tokio::sync::Semaphore::new(SMALL_BODIES_BUDGET_BYTES)),
            large: Arc::new(tokio::sync::Semaphore::new(LARGE_BODIES_BUDGET_BYTES)),
        }
    }
}

/// A body's share of the [`BodyBudget`]; given back when dropped.
#[derive(Debug, Default)]
struct BodyCharge {
    bytes: usize,
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
}

impl BodyCharge {
    /// Charges `more` bytes of the body, its first [`SMALL_BODY_BYTES`] to the small budget;
    /// [`BodyError::Busy`] when either is spent.
    fn charge(&mut self, budget: &BodyBudget, more: usize) -> Result<(), BodyError> {
        let small = more.min(SMALL_BODY_BYTES.saturating_sub(self.bytes));
        for (semaphore, n) in [(&budget.small, small), (&budget.large, more - small)] {
            if n == 0 {
                continue;
            }
            let permit = u32::try_from(n)
                .ok()
                .and_then(|n| semaphore.clone().try_acquire_many_owned(n).ok())
                .ok_or(BodyError::Busy)?;
            self.permits.push(permit);
        }
        self.bytes += more;
        Ok(())
    }
}

/// `durable-scaler webhook` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve HTTPS on. Unset: all interfaces, on the port of this pod's container
    /// port named `https` (read once from its Pod, so that the Deployment's containerPort is
    /// the one place the install sets it), else 8443.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_ADDR")]
    pub addr: Option<SocketAddr>,
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
    /// Image of the injected sidecar when it does not follow this webhook's own image (see
    /// --sidecar-image-from-pod).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub sidecar_image: String,
    /// Use this webhook's own image (read once at start from its Pod, container
    /// --webhook-container) as the sidecar's, so `kubectl set image` on the webhook changes
    /// the injected sidecar too; --sidecar-image is used when the Pod cannot be read.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE_FROM_POD", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub sidecar_image_from_pod: bool,
    /// The name of this webhook's container in its Pod.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_CONTAINER", default_value = "webhook")]
    pub webhook_container: String,
    /// This pod's name (downward API): its image, and the reporting instance of its Events.
    #[arg(long, env = env::POD_NAME)]
    pub pod_name: Option<String>,
    /// This pod's namespace (downward API).
    #[arg(long, env = env::POD_NAMESPACE)]
    pub pod_namespace: Option<String>,
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
    /// A Secret, present in each app namespace, whose key `ca.crt` is the aggregator's CA
    /// (the one KEDA's TriggerAuthentication reads there): mounted into the sidecar as a file
    /// instead of the PEM inline, so the pod holds no multi-line value. Needs
    /// --sidecar-aggregator-ca too (checked at start).
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_AGGREGATOR_CA_SECRET")]
    pub sidecar_aggregator_ca_secret: Option<String>,
    /// Image pull Secrets (comma-separated names, present in each app namespace) added to the
    /// `imagePullSecrets` of every injected pod that does not name them already, for a sidecar
    /// image in a private registry.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    pub sidecar_image_pull_secrets: Vec<String>,
    /// Inject a native sidecar (init container with restartPolicy Always): `auto` when the
    /// API server and every node's kubelet are 1.33+, where the feature cannot be turned off
    /// (read from the cluster every few minutes; needs `list` on nodes); `true` unless the
    /// API server or a kubelet is before 1.29, where the pod would be refused; `false` never
    /// (a plain container). The annotation durable-scaler.io/native-sidecar overrides per pod.
    #[arg(long, env = "DURABLE_SCALER_WEBHOOK_NATIVE_SIDECAR", value_enum, default_value = "auto")]
    pub native_sidecar: NativeSidecarMode,
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
    /// A name in `--sidecar-image-pull-secrets` is not a Secret name.
    #[error(
        "--sidecar-image-pull-secrets (DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS): {0:?} is not a Secret name"
    )]
    PullSecret(String),
}

#[derive(Debug, Clone)]
struct AppState {
    /// Bytes of admission bodies being read, over all requests.
    bodies: Arc<BodyBudget>,
    settings: Arc<InjectionSettings>,
    metrics: Arc<Metrics>,
    native: NativeSource,
    skips: SkipRecorder,
}

/// Where a review's default injection mode comes from.
#[derive(Debug, Clone)]
enum NativeSource {
    /// Fixed: `--native-sidecar true|false`, or `auto` without an API to ask.
    Fixed(NativeDefault),
    /// `auto`: the cluster's versions, cached.
    Detected(NativeSidecarDetector),
}

impl NativeSource {
    fn at(&self, now: UnixMs) -> NativeDefault {
        match self {
            Self::Fixed(decided) => decided.clone(),
            Self::Detected(detector) => detector.decision(now),
        }
    }
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
    /// Validates `args`, connects to the Kubernetes API when there is one (in a pod, or
    /// KUBECONFIG), loads the certificate and binds the listener.
    pub async fn bind(args: &Args) -> Result<Self, Error> {
        Self::bind_with(args, kube_client().await).await
    }

    /// [`Self::bind`] with the Kubernetes client given (`None`: no API; tests pass a client
    /// for a fake API server).
    pub async fn bind_with(args: &Args, client: Option<kube::Client>) -> Result<Self, Error> {
        let image_pull_secrets = args
            .sidecar_image_pull_secrets
            .iter()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect::<Vec<_>>();
        if let Some(bad) = image_pull_secrets.iter().find(|name| {
            crate::contract::check_name("an image pull Secret", name, crate::contract::NameRule::Subdomain)
                .is_err()
        }) {
            return Err(Error::PullSecret(bad.clone()));
        }
        let aggregator_ca_secret =
            args.sidecar_aggregator_ca_secret.as_deref().map(str::trim).filter(|s| !s.is_empty());
        if let Some(secret) = aggregator_ca_secret {
            crate::contract::check_name(
                "--sidecar-aggregator-ca-secret",
                secret,
                crate::contract::NameRule::Subdomain,
            )
            .map_err(Error::AggregatorCa)?;
        }
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
        let own = own_container(args, client.as_ref()).await;
        let addr = listen_addr(args.addr, own.as_ref());
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let image = sidecar_image(args, own.as_ref());
        let native = match (args.native_sidecar, &client) {
            (NativeSidecarMode::True, None) => NativeSource::Fixed(NativeDefault::forced(true)),
            (NativeSidecarMode::False, _) => NativeSource::Fixed(NativeDefault::forced(false)),
            (mode @ (NativeSidecarMode::Auto | NativeSidecarMode::True), Some(client)) => {
                let detector = NativeSidecarDetector::new(client.clone(), mode, cluster::REFRESH_INTERVAL);
                let decided = detector.refresh(UnixMs::now()).await;
                tracing::info!(native = decided.native, reason = %decided.reason, "native sidecars");
                NativeSource::Detected(detector)
            }
            (NativeSidecarMode::Auto, None) => NativeSource::Fixed(NativeDefault {
                native: false,
                reason: "auto: no Kubernetes API to read versions from; a plain container works everywhere"
                    .to_owned(),
                cannot_run: None,
            }),
        };
        let instance = args.pod_name.clone().unwrap_or_else(|| "durable-scaler-webhook".to_owned());
        let skips = SkipRecorder::new(client, &instance, events::EVENT_WINDOW);
        let settings = InjectionSettings {
            image,
            aggregator: args.aggregator.clone(),
            aggregator_ca,
            aggregator_ca_secret: aggregator_ca_secret.map(str::to_owned),
            image_pull_secrets,
            native_sidecar: args.native_sidecar == NativeSidecarMode::True,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        Ok(Self {
            listener,
            tls,
            reload_interval: args.tls_reload_interval,
            state: AppState {
                bodies: Arc::new(BodyBudget::default()),
                settings: Arc::new(settings),
                metrics,
                native,
                skips,
            },
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

    /// The sidecar image this webhook injects.
    pub fn sidecar_image(&self) -> &str {
        &self.state.settings.image
    }

    /// The counters this webhook serves on `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// The serving certificate's reloading configuration (its reload counters).
    pub fn tls_config(&self) -> Arc<ReloadingConfig> {
        self.tls.clone()
    }

    /// Serves until `shutdown` fires, then lets open connections finish (bounded); a failure
    /// ([`Webhook::try_serve`]) is logged.
    pub async fn serve(self, shutdown: Shutdown) {
        if let Err(e) = self.try_serve(shutdown).await {
            tracing::error!(task = %e.task, "{e}");
        }
    }

    /// As [`Webhook::serve`]; stopping to accept connections before the signal is a failure
    /// (`run` exits non-zero so that Kubernetes restarts the pod, rather than the API server
    /// failing its calls against a pod that looks alive). Stopping because of the signal
    /// is not, however the two race.
    pub async fn try_serve(self, shutdown: Shutdown) -> Result<(), TaskFailure> {
        let failure = |message: String| TaskFailure { task: "webhook HTTPS server".into(), message };
        let settings = listener::Listener {
            name: "webhook HTTPS",
            protocol: listener::Protocol::Http,
            max_concurrent_streams: HTTP_MAX_CONCURRENT_STREAMS,
            max_connections: listener::connection_limit(MAX_CONNECTIONS, 1),
            answer_budget_bytes: ANSWER_BUDGET_BYTES,
            tls: Some((self.tls, self.reload_interval)),
            long_request: None,
        };
        let served = listener::serve(self.listener, settings, router(self.state), shutdown.clone()).await;
        match served {
            // The loop ends only once the signal fired, or when it could not go on.
            Ok(()) if shutdown.is_triggered() => Ok(()),
            Ok(()) => Err(failure("stopped accepting connections before the shutdown signal".into())),
            Err(e) => Err(failure(format!("failed: {e}"))),
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

async fn mutate(State(state): State<AppState>, version: Version, headers: HeaderMap, body: Body) -> Response {
    let refuse = |status: StatusCode, reason: String| {
        state.metrics.refused.inc();
        tracing::debug!(%status, %reason, "review refused");
        (status, reason).into_response()
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if !media_type.eq_ignore_ascii_case("application/json") {
        let mut response = refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected Content-Type application/json, got {content_type:?}\n"),
        );
        // The body is not read: close rather than leave it in the connection.
        close_after(&mut response, version, declared != Some(0));
        return response;
    }
    // The budget's share stays held until the review is answered.
    let (bytes, _budget) = match read_body(body, declared, &state.bodies).await {
        Ok(read) => read,
        Err(BodyError::Busy) => {
            let mut response = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: too many admission bodies being read at once; retry\n".into(),
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            close_after(&mut response, version, true);
            return response;
        }
        Err(BodyError::TooLarge { drained }) => {
            let mut response =
                refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {MAX_BODY_BYTES} bytes\n"));
            close_after(&mut response, version, !drained);
            return response;
        }
        Err(BodyError::Read(e)) => {
            return refuse(StatusCode::BAD_REQUEST, format!("cannot read body: {e}\n"));
        }
    };
    let now = UnixMs::now();
    let outcome = review::review_with(&bytes, &state.settings, &state.native.at(now));
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
    if let (Some(skipped), false) = (&outcome.skipped, outcome.dry_run) {
        // A dry run creates no pod: nothing to tell anyone about.
        state.metrics.skip(skipped.reason);
        state.skips.skipped(skipped, now);
    }
    (status, axum::Json(outcome.body)).into_response()
}

/// Why a body was not read.
enum BodyError {
    /// Over [`MAX_BODY_BYTES`]; `drained` when the rest was read and discarded (the
    /// connection can stay open), else the connection must close.
    TooLarge { drained: bool },
    /// The client's stream failed.
    Read(axum::Error),
    /// The bodies being read at once are over their [`BodyBudget`].
    Busy,
}

/// Reads at most [`MAX_BODY_BYTES`]. An over-size body is read on and discarded up to
/// [`MAX_DISCARD_BYTES`] so that the client, which may still be sending when we decide,
/// gets to read our 413: answering while it sends and then closing makes its TCP stack
/// see a reset, and the client reports that instead of the status. What is kept is charged
/// to `budget` as it arrives (the charge is returned with the bytes and given back when
/// dropped); a body that does not fit is [`BodyError::Busy`]. How long reading may take is the
/// listener's request deadline (`crate::listener`).
async fn read_body(
    mut body: Body,
    declared: Option<u64>,
    budget: &BodyBudget,
) -> Result<(Bytes, BodyCharge), BodyError> {
    if declared.is_some_and(|n| n > MAX_DISCARD_BYTES) {
        return Err(BodyError::TooLarge { drained: false });
    }
    let mut charged = BodyCharge::default();
    let initial = declared.map_or(0, |n| n.min(MAX_BODY_BYTES as u64) as usize);
    charged.charge(budget, initial)?;
    let mut kept = Vec::with_capacity(initial);
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len() as u64;
        if seen > MAX_DISCARD_BYTES {
            return Err(BodyError::TooLarge { drained: false });
        }
        if seen <= MAX_BODY_BYTES as u64 {
            let needed = kept.len() + data.len();
            if needed > kept.capacity() {
                charged.charge(budget, needed - kept.capacity())?;
                kept.reserve_exact(data.len());
            }
            kept.extend_from_slice(&data);
        } else if !kept.is_empty() {
            kept = Vec::new();
        }
    }
    if seen > MAX_BODY_BYTES as u64 {
        return Err(BodyError::TooLarge { drained: true });
    }
    Ok((Bytes::from(kept), charged))
}

/// Asks hyper to close an HTTP/1 connection after `response` when `close` (the request body
/// was left unread); HTTP/2 ends just the stream.
fn close_after(response: &mut Response, version: Version, close: bool) {
    if close && version < Version::HTTP_2 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A client for the API server, or `None` (logged) outside a cluster without KUBECONFIG.
async fn kube_client() -> Option<kube::Client> {
    crate::telemetry::install_crypto_provider();
    let mut config = match kube::Config::infer().await {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(
                %error,
                "no Kubernetes configuration: no InjectionSkipped Events, --native-sidecar auto \
                 means plain containers, the sidecar image is --sidecar-image"
            );
            return None;
        }
    };
    config.connect_timeout = Some(KUBE_API_TIMEOUT);
    config.read_timeout = Some(KUBE_API_TIMEOUT);
    kube::Client::try_from(config)
        .inspect_err(|error| tracing::warn!(%error, "the Kubernetes configuration found cannot be used"))
        .ok()
}

/// This webhook's own container (`--webhook-container` of its Pod, read once at start), when
/// something needs it (the sidecar image follows it, or the listen port comes from it) and
/// the Pod can be read. The downward API has no field for a container's image or ports,
/// hence the one `get` of this pod.
async fn own_container(args: &Args, client: Option<&kube::Client>) -> Option<Container> {
    if !args.sidecar_image_from_pod && args.addr.is_some() {
        return None;
    }
    let (Some(client), Some(name), Some(namespace)) = (client, &args.pod_name, &args.pod_namespace) else {
        return None;
    };
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), namespace);
    match pods.get(name).await {
        Ok(pod) => {
            let own = pod
                .spec
                .into_iter()
                .flat_map(|spec| spec.containers)
                .find(|c| c.name == args.webhook_container);
            if own.is_none() {
                tracing::warn!(container = %args.webhook_container, "no such container in this pod");
            }
            own
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read this pod: the sidecar image is --sidecar-image, the port 8443 unless --addr says otherwise");
            None
        }
    }
}

/// Where to listen: `--addr`, else all interfaces on the port of `own`'s container port named
/// `https` (what the Service's `targetPort: https` and the probes reach), else [`DEFAULT_ADDR`].
fn listen_addr(addr: Option<SocketAddr>, own: Option<&Container>) -> SocketAddr {
    let from_pod = own
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some("https")))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .map(|port| SocketAddr::from(([0, 0, 0, 0], port)));
    addr.or(from_pod).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], crate::contract::WEBHOOK_PORT)))
}

/// The sidecar's image: this webhook's own (`own`), so that whatever changed the webhook's
/// image (`kubectl set image`, a kustomize `images:` entry, a Helm value) changes the
/// sidecar's too; `--sidecar-image` when following is off or the Pod could not be read.
fn sidecar_image(args: &Args, own: Option<&Container>) -> String {
    let fallback = args.sidecar_image.clone();
    if !args.sidecar_image_from_pod {
        return fallback;
    }
    match own.and_then(|c| c.image.clone()).filter(|image| !image.trim().is_empty()) {
        Some(image) => {
            if image != fallback {
                tracing::info!(%image, flag = %fallback, "sidecar image follows this webhook's own image");
            }
            image
        }
        None => fallback,
    }
}

async fn serve_metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.encode())
}

/// Runs `durable-scaler webhook` until SIGTERM or Ctrl-C; exit status 2 when it cannot
/// start (the certificate, the CA, the address).
pub(crate) async fn run(args: Args) -> ExitCode {
    // Installed first: a SIGTERM that comes while the webhook starts (a rollout, say) stops
    // it cleanly rather than killing it with the signal's default action.
    let shutdown = Shutdown::on_signal();
    let webhook = match Webhook::bind(&args).await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let addr = webhook.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, native_sidecar = ?args.native_sidecar, image = %webhook.sidecar_image(), "webhook serving");
    match webhook.try_serve(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(task = %e.task, "{e}; stopping the process so that it is restarted");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_cannot_take_the_room_of_small_ones() {
        let budget = BodyBudget::default();
        let mut large: Vec<BodyCharge> = Vec::new();
        loop {
            let mut charge = BodyCharge::default();
            match charge.charge(&budget, MAX_BODY_BYTES) {
                Ok(()) => large.push(charge),
                Err(BodyError::Busy) => break,
                Err(_) => unreachable!("charging only fails busy"),
            }
        }
        assert_eq!(large.len(), LARGE_BODIES_BUDGET_BYTES / (MAX_BODY_BYTES - SMALL_BODY_BYTES));
        let mut pod = BodyCharge::default();
        assert!(pod.charge(&budget, 4096).is_ok(), "a pod of a few KiB still fits");
        assert!(pod.charge(&budget, MAX_BODY_BYTES / 2).is_err(), "but not a large body");
        drop(large);
        let mut again = BodyCharge::default();
        assert!(again.charge(&budget, MAX_BODY_BYTES).is_ok(), "the budget comes back with the bodies");
    }

    #[test]
    fn the_default_address_is_the_contract_port() {
        let addr: SocketAddr = DEFAULT_ADDR.parse().unwrap();
        assert_eq!(addr.port(), crate::contract::WEBHOOK_PORT);
        assert_eq!(listen_addr(None, None), addr);
    }

    #[test]
    fn the_listen_port_is_the_pods_https_container_port_unless_addr_is_given() {
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "webhook",
            "ports": [{"name": "metrics", "containerPort": 9000}, {"name": "https", "containerPort": 10250}],
        }))
        .unwrap();
        assert_eq!(listen_addr(None, Some(&container)), "0.0.0.0:10250".parse().unwrap());
        let given: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        assert_eq!(listen_addr(Some(given), Some(&container)), given);
        let unnamed: Container = serde_json::from_value(serde_json::json!({"name": "webhook"})).unwrap();
        assert_eq!(listen_addr(None, Some(&unnamed)), DEFAULT_ADDR.parse().unwrap());
    }
}
