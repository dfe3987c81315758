//! Delivering reports to the aggregator: only ever the latest one, over a lazily
//! (re)connecting gRPC channel, with backoff after failures, never holding up polling.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::metrics::Metrics;
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
        let endpoint_error = |message: String| ReportError::Endpoint { url: url.to_string(), message };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        if url.scheme() == "https" {
            let ca =
                ca.ok_or_else(|| endpoint_error("an https URL needs the CA of its certificate".into()))?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                .map_err(|e| endpoint_error(e.to_string()))?;
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

/// Delivers whatever report is latest in `latest` until `shutdown`. Reports that arrive
/// while a call is in flight or during backoff replace each other: at most one is kept.
/// The interval each answer suggests (0: keep the sidecar's own) goes to `suggested_interval_ms`.
pub(crate) async fn deliver_latest(
    client: ReportClient,
    mut latest: watch::Receiver<Option<Report>>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    suggested_interval_ms: Arc<AtomicU32>,
    shutdown: Shutdown,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = shutdown.wait() => return,
        }
        let Some(report) = latest.borrow_and_update().clone() else { continue };
        let outcome = tokio::select! {
            outcome = client.submit(report, timeout) => outcome,
            _ = shutdown.wait() => return,
        };
        match outcome {
            Ok(ack) => {
                suggested_interval_ms.store(ack.suggested_interval_ms, Ordering::Relaxed);
                metrics.reports_sent.inc();
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                metrics.report_failures.inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "report failed");
                tokio::select! {
                    _ = tokio::time::sleep(jittered(backoff)) => {},
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// `base` scaled by a factor in [0.5, 1.5), so that sidecars restarted together do not
/// retry in step.
fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
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
