//! Delivering reports to the aggregator: only ever the latest one, over a lazily
//! (re)connecting gRPC channel, with backoff after failures, never holding up polling.
//!
//! The aggregator runs as several replicas that each need every report (no state is shared
//! between them). The URL's host is a headless Service that resolves to every replica, so
//! [`deliver_to_every_replica`] resolves it every interval and keeps one delivery task per
//! address, each with its own latest-value channel and its own back-off: a replica that is
//! slow or gone costs the others nothing. Addresses that appear are reported to from the next
//! interval on; addresses that go away are dropped with their metric series. Each replica is
//! reached by IP, while TLS checks the certificate against the URL's host name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::metrics::{Metrics, ReplicaLabel};
use crate::{
    proto::report::{Report, ReportAck, report_service_client::ReportServiceClient},
    shutdown::Shutdown,
};

/// First wait after a failed report; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
// Capped well below the aggregator's three-interval staleness horizon at the default 5 s.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why a report was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The aggregator URL cannot make a gRPC endpoint.
    #[error("aggregator endpoint {url}: {message}")]
    Endpoint {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The call failed (connection, status, or timeout).
    #[error("report not delivered: {0}")]
    Call(String),
}

/// Sends reports to one aggregator with the token file as bearer credential.
#[derive(Debug, Clone)]
pub struct ReportClient {
    client: ReportServiceClient<Channel>,
    token_file: PathBuf,
}

impl ReportClient {
    /// A client of `url` that connects on first use and reconnects after failures; an
    /// `https://` URL is verified against `ca` (PEM), and needs it.
    pub fn new(url: &url::Url, ca: Option<&[u8]>, token_file: PathBuf) -> Result<Self, ReportError> {
        Self::connecting_to(url, None, ca, token_file)
    }

    /// As [`ReportClient::new`], but connecting to `address` (one replica) instead of
    /// resolving the URL's host; the certificate is still checked against that host and the
    /// calls still name it as their authority.
    pub fn connecting_to(
        url: &url::Url,
        address: Option<SocketAddr>,
        ca: Option<&[u8]>,
        token_file: PathBuf,
    ) -> Result<Self, ReportError> {
        let endpoint_error = |message: String| ReportError::Endpoint { url: url.to_string(), message };
        let target = match address {
            Some(address) => format!("{}://{address}", url.scheme()),
            None => url.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(target)
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        if address.is_some() {
            let origin = url
                .as_str()
                .parse::<tonic::codegen::http::Uri>()
                .map_err(|e| endpoint_error(e.to_string()))?;
            endpoint = endpoint.origin(origin);
        }
        if url.scheme() == "https" {
            let ca =
                ca.ok_or_else(|| endpoint_error("an https URL needs the CA of its certificate".into()))?;
            let host = url.host_str().ok_or_else(|| endpoint_error("the URL has no host".into()))?;
            // The name the certificate must carry, whatever address the connection goes to.
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
            endpoint = endpoint.tls_config(tls).map_err(|e| endpoint_error(e.to_string()))?;
        }
        Ok(Self { client: ReportServiceClient::new(endpoint.connect_lazy()), token_file })
    }

    /// Submits `report`, giving up after `timeout`.
    pub async fn submit(&self, report: Report, timeout: Duration) -> Result<ReportAck, ReportError> {
        let mut request = tonic::Request::new(report);
        request.set_timeout(timeout);
        if let Some(token) = read_token(&self.token_file).await {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                ReportError::Call("the token file holds characters a header cannot carry".into())
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut client = self.client.clone();
        match tokio::time::timeout(timeout, client.submit(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ReportError::Call(format!("{:?}: {}", status.code(), status.message()))),
            Err(_) => Err(ReportError::Call(format!("no answer within {} ms", timeout.as_millis()))),
        }
    }
}

/// The token file's contents, trimmed; `None` while it does not exist or is unreadable.
/// Read for every report: projected service-account tokens rotate.
async fn read_token(path: &std::path::Path) -> Option<String> {
    match tokio::fs::read_to_string(path).await {
        Ok(token) => Some(token.trim().to_string()).filter(|t| !t.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the token file; reporting without a credential");
            None
        }
    }
}

/// How long one resolution of the aggregator's host may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where reports go: the aggregator URL, and how its replicas are found.
#[derive(Debug, Clone)]
pub struct Replicas {
    url: url::Url,
    ca: Option<Vec<u8>>,
    token_file: PathBuf,
    fixed: Vec<SocketAddr>,
}

impl Replicas {
    /// The replicas behind `url`: every address its host resolves to, or `fixed` when not
    /// empty. Checks once that a client can be made for the URL.
    pub fn new(
        url: &url::Url,
        ca: Option<&[u8]>,
        token_file: PathBuf,
        fixed: Vec<SocketAddr>,
    ) -> Result<Self, ReportError> {
        ReportClient::new(url, ca, token_file.clone())?;
        if url.host_str().is_none() || url.port_or_known_default().is_none() {
            return Err(ReportError::Endpoint { url: url.to_string(), message: "no host or port".into() });
        }
        Ok(Self { url: url.clone(), ca: ca.map(<[u8]>::to_vec), token_file, fixed })
    }

    /// The replicas' addresses now.
    pub async fn resolve(&self) -> Result<BTreeSet<SocketAddr>, String> {
        if !self.fixed.is_empty() {
            return Ok(self.fixed.iter().copied().collect());
        }
        let host = self.url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = self.url.port_or_known_default().unwrap_or(crate::contract::AGGREGATOR_REPORT_PORT);
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addresses)) => Ok(addresses.collect()),
            Ok(Err(e)) => Err(format!("resolving {host}: {e}")),
            Err(_) => Err(format!("resolving {host}: no answer within {} ms", RESOLVE_TIMEOUT.as_millis())),
        }
    }

    /// A client for the replica at `address`.
    pub fn client(&self, address: SocketAddr) -> Result<ReportClient, ReportError> {
        ReportClient::connecting_to(&self.url, Some(address), self.ca.as_deref(), self.token_file.clone())
    }
}

/// One replica's delivery task.
struct Delivery {
    client: ReportClient,
    stop: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// What every delivery task shares.
#[derive(Clone)]
pub(crate) struct DeliverySettings {
    /// Per-call timeout.
    pub timeout: Duration,
    /// With no newer report for this long (a poll running long), the latest one goes again.
    pub resend_after: Duration,
    /// The sidecar's metrics.
    pub metrics: Arc<Metrics>,
}

/// Resolves the replicas every `every` and keeps one [`deliver_latest`] task per address
/// until `shutdown`; `current` holds a client per replica reported to (for the leaving
/// report). A failed resolution keeps the replicas known before.
pub(crate) async fn deliver_to_every_replica(
    replicas: Replicas,
    latest: watch::Receiver<Option<Report>>,
    every: Duration,
    settings: DeliverySettings,
    current: Arc<Mutex<Vec<ReportClient>>>,
    shutdown: Shutdown,
) -> Result<(), String> {
    let mut running: BTreeMap<SocketAddr, Delivery> = BTreeMap::new();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    while shutdown.tick(&mut ticker).await {
        let resolved = tokio::select! {
            resolved = replicas.resolve() => resolved,
            _ = shutdown.wait() => break,
        };
        let addresses = match resolved {
            Ok(addresses) if !addresses.is_empty() => addresses,
            outcome => {
                let error =
                    outcome.err().unwrap_or_else(|| "the aggregator host resolved to no address".into());
                if last_error.as_ref() != Some(&error) {
                    tracing::warn!(error = %error, kept = running.len(), "cannot resolve the aggregator replicas");
                    last_error = Some(error);
                }
                continue;
            }
        };
        last_error = None;
        running.retain(|address, delivery| {
            let keep = addresses.contains(address);
            if !keep {
                tracing::info!(%address, "aggregator replica gone; no longer reporting to it");
                delivery.stop.trigger();
                settings.metrics.forget_replica(&ReplicaLabel { address: address.to_string() });
            }
            keep
        });
        for address in addresses {
            if running.contains_key(&address) {
                continue;
            }
            let client = match replicas.client(address) {
                Ok(client) => client,
                Err(e) => {
                    tracing::warn!(%address, error = %e, "cannot report to this aggregator replica");
                    continue;
                }
            };
            tracing::info!(%address, "reporting to aggregator replica");
            let stop = Shutdown::new();
            let label = ReplicaLabel { address: address.to_string() };
            let task = tokio::spawn(deliver_latest(
                client.clone(),
                latest.clone(),
                label,
                settings.clone(),
                stop.clone(),
            ));
            running.insert(address, Delivery { client, stop, task });
        }
        settings.metrics.replicas.set(running.len() as i64);
        *current.lock().unwrap_or_else(|p| p.into_inner()) =
            running.values().map(|d| d.client.clone()).collect();
    }
    for delivery in running.values() {
        delivery.stop.trigger();
    }
    for (_, delivery) in running {
        let _ = delivery.task.await;
    }
    Ok(())
}

/// Delivers whatever report is latest in `latest` to one replica until `stop`. Reports that
/// arrive while a call is in flight or during backoff replace each other: at most one is
/// kept. When no newer report comes for [`DeliverySettings::resend_after`] (a storage read
/// running long), the latest goes again: the aggregator then keeps the pod live, a worker and
/// the holder of its partitions, and reads what its readings no longer tell through its probe
/// (`aggregator::coverage` module docs), instead of taking a slow sidecar for a dead pod.
pub(crate) async fn deliver_latest(
    client: ReportClient,
    mut latest: watch::Receiver<Option<Report>>,
    replica: ReplicaLabel,
    settings: DeliverySettings,
    stop: Shutdown,
) {
    let metrics = &settings.metrics;
    let mut backoff = FIRST_BACKOFF;
    // The report already there when a replica is found goes out at once.
    latest.mark_changed();
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(settings.resend_after) => {}
            _ = stop.wait() => return,
        }
        let Some(report) = latest.borrow_and_update().clone() else { continue };
        let outcome = tokio::select! {
            outcome = client.submit(report, settings.timeout) => outcome,
            _ = stop.wait() => return,
        };
        match outcome {
            Ok(_) => {
                metrics.reports_sent.inc();
                metrics.replica_reports_sent.get_or_create(&replica).inc();
                metrics.replica_reachable.get_or_create(&replica).set(1);
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                metrics.report_failures.inc();
                metrics.replica_report_failures.get_or_create(&replica).inc();
                metrics.replica_reachable.get_or_create(&replica).set(0);
                tracing::warn!(address = %replica.address, error = %e, retry_in_ms = backoff.as_millis() as u64, "report failed");
                tokio::select! {
                    _ = tokio::time::sleep(jittered(backoff)) => {},
                    _ = stop.wait() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// `base` scaled by a factor in [0.5, 1.5), so that sidecars restarted together do not
/// retry in step.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half_times() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(d >= Duration::from_secs(1) && d < Duration::from_secs(3), "{d:?}");
        }
    }

    #[tokio::test]
    async fn the_token_is_trimmed_and_absent_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert_eq!(read_token(&path).await, None);
        std::fs::write(&path, "abc.def\n").unwrap();
        assert_eq!(read_token(&path).await.as_deref(), Some("abc.def"));
    }
}
