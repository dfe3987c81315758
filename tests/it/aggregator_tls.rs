//! TLS on the KEDA port, with a real TLS client (tonic over rustls) and certificates made by
//! rcgen for each test: plaintext refused, client certificates required and checked under
//! `--client-ca`, and certificate files and the client CA reloaded when they change (in
//! place, or by the kubelet's `..data` swap of a Secret volume), without a restart. And the
//! report port under `--report-tls`, with the sidecar's real report client. The files are
//! looked at every 100 ms here (`--tls-reload-interval`), so a rotation shows within a
//! moment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::aggregator_support::*;
use crate::https::{Pki, SecretVolume};
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::sidecar::ReportClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A Secret's worth of files: `server` as tls.crt/tls.key, this CA as ca.crt.
    fn secret(&self, server: &Leaf) -> Pki {
        Pki { ca_pem: self.pem(), cert_pem: server.cert.clone(), key_pem: server.key.clone() }
    }

    fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// The aggregator's TLS files in a temporary directory.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    fn new(server: &Leaf, client_ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = Self {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("ca.crt"),
            _dir: dir,
        };
        files.write_server(server);
        std::fs::write(&files.client_ca, client_ca.pem()).unwrap();
        files
    }

    /// Replaces the serving certificate, as a rotated Secret would.
    fn write_server(&self, server: &Leaf) {
        write_newer(&self.cert, &server.cert);
        write_newer(&self.key, &server.key);
    }
}

/// Writes `path` and moves its modification time forward, so the change is seen even on a
/// file system with coarse timestamps.
fn write_newer(path: &Path, contents: &str) {
    let before = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    std::fs::write(path, contents).unwrap();
    if let Some(before) = before {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(before + Duration::from_secs(2)).unwrap();
    }
}

/// Test arguments with a short reload interval, so rotations are seen within a moment.
fn tls_args() -> durable_scaler::aggregator::Args {
    durable_scaler::aggregator::Args { tls_reload_interval: Duration::from_millis(100), ..args() }
}

async fn start_tls(files: &Files, require_client_cert: bool) -> TestServer {
    let mut a = tls_args();
    a.tls_cert = Some(files.cert.clone());
    a.tls_key = Some(files.key.clone());
    a.client_ca = require_client_cert.then(|| files.client_ca.clone());
    let (shutdown, running) = start_server(a).await.expect("aggregator starts with TLS");
    TestServer { shutdown, running: Some(running) }
}

/// Starts an aggregator serving the files of a Secret volume: the KEDA port with its CA as
/// --client-ca, and the report port over TLS.
async fn start_from_volume(volume: &SecretVolume) -> TestServer {
    let mut a = tls_args();
    a.tls_cert = Some(volume.cert());
    a.tls_key = Some(volume.key());
    a.client_ca = Some(volume.dir.join("ca.crt"));
    a.report_tls = true;
    let (shutdown, running) = start_server(a).await.expect("aggregator starts with TLS");
    TestServer { shutdown, running: Some(running) }
}

struct TestServer {
    shutdown: durable_scaler::shutdown::Shutdown,
    running: Option<durable_scaler::aggregator::RunningAggregator>,
}

impl TestServer {
    fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().expect("running").grpc_addr
    }

    fn running(&self) -> &durable_scaler::aggregator::RunningAggregator {
        self.running.as_ref().expect("running")
    }

    async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(r) = self.running.take() {
            tokio::time::timeout(DEADLINE, r.wait()).await.expect("stops").expect("stops cleanly");
        }
    }
}

/// Calls GetMetricSpec over TLS, trusting `trust` and presenting `identity`.
async fn call_tls(
    addr: std::net::SocketAddr,
    trust: &Ca,
    identity: Option<&Leaf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(trust.pem())).domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = ExternalScalerClient::new(channel);
    let response = tokio::time::timeout(DEADLINE, client.get_metric_spec(scaled_object("TlsHub", &[])))
        .await??
        .into_inner();
    assert_eq!(response.metric_specs[0].metric_name, "durabletask-tlshub");
    Ok(())
}

#[tokio::test]
async fn plaintext_is_refused_when_tls_is_on() {
    let ca = Ca::new("server ca");
    let files = Files::new(&ca.leaf("localhost"), &ca);
    let server = start_tls(&files, false).await;
    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{}", server.addr()))?.connect().await?;
        ExternalScalerClient::new(channel).get_metric_spec(scaled_object("TlsHub", &[])).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let result = tokio::time::timeout(DEADLINE, plaintext).await.expect("refused, not hung");
    assert!(result.is_err(), "a plaintext call must not be served");
    call_tls(server.addr(), &ca, None).await.expect("a TLS client is served");
    server.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_under_client_ca() {
    let ca = Ca::new("shared ca");
    let files = Files::new(&ca.leaf("localhost"), &ca);
    let server = start_tls(&files, true).await;
    assert!(call_tls(server.addr(), &ca, None).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let ca = Ca::new("shared ca");
    let stranger = Ca::new("stranger ca");
    let files = Files::new(&ca.leaf("localhost"), &ca);
    let server = start_tls(&files, true).await;
    assert!(call_tls(server.addr(), &ca, Some(&stranger.leaf("keda"))).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn a_client_certificate_from_the_client_ca_is_served() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let files = Files::new(&server_ca.leaf("localhost"), &client_ca);
    let server = start_tls(&files, true).await;
    call_tls(server.addr(), &server_ca, Some(&client_ca.leaf("keda"))).await.expect("served");
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_restart() {
    let old_ca = Ca::new("old ca");
    let new_ca = Ca::new("new ca");
    let files = Files::new(&old_ca.leaf("localhost"), &old_ca);
    let server = start_tls(&files, false).await;
    call_tls(server.addr(), &old_ca, None).await.expect("old certificate served");
    assert!(call_tls(server.addr(), &new_ca, None).await.is_err(), "not yet rotated");

    files.write_server(&new_ca.leaf("localhost"));
    eventually("the new certificate is served after the files changed", || async {
        call_tls(server.addr(), &new_ca, None).await.is_ok()
    })
    .await;
    assert!(call_tls(server.addr(), &old_ca, None).await.is_err(), "the old one is gone");
    server.stop().await;
}

#[tokio::test]
async fn a_secret_swapped_under_the_keda_port_brings_a_new_certificate_and_client_ca_without_restart() {
    let (old_server_ca, new_server_ca) = (Ca::new("old server ca"), Ca::new("new server ca"));
    let (old_client_ca, new_client_ca) = (Ca::new("old client ca"), Ca::new("new client ca"));
    let (old_keda, new_keda) = (old_client_ca.leaf("keda"), new_client_ca.leaf("keda"));
    let dir = tempfile::tempdir().unwrap();
    let mut volume = SecretVolume::new(dir.path(), &old_client_ca.secret(&old_server_ca.leaf("localhost")));
    let server = start_from_volume(&volume).await;
    call_tls(server.addr(), &old_server_ca, Some(&old_keda)).await.expect("served before the rotation");
    assert!(call_tls(server.addr(), &old_server_ca, Some(&new_keda)).await.is_err(), "not yet rotated");

    volume.update(&new_client_ca.secret(&new_server_ca.leaf("localhost")));
    eventually("the new certificate and client CA are in use", || async {
        call_tls(server.addr(), &new_server_ca, Some(&new_keda)).await.is_ok()
    })
    .await;
    assert!(
        call_tls(server.addr(), &new_server_ca, Some(&old_keda)).await.is_err(),
        "a client certificate of the old client CA is refused"
    );
    let (_, metrics) = http_get(server.running().http_addr, "/metrics").await;
    let reloaded =
        "durable_scaler_aggregator_certificate_reloads_total{port=\"keda\",outcome=\"reloaded\"} 1\n";
    assert!(metrics.contains(reloaded), "{reloaded} in\n{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn a_secret_swapped_under_the_report_port_brings_a_new_certificate_without_restart() {
    let (old_ca, new_ca) = (Ca::new("old aggregator ca"), Ca::new("new aggregator ca"));
    let dir = tempfile::tempdir().unwrap();
    let mut volume = SecretVolume::new(dir.path(), &old_ca.secret(&old_ca.leaf("localhost")));
    let server = start_from_volume(&volume).await;
    let https: url::Url =
        format!("https://localhost:{}", server.running().report_addr.port()).parse().expect("a URL");
    let no_token = dir.path().join("no-token");
    let submit = |ca: &Ca, pod: &'static str| {
        let client =
            ReportClient::new(&https, Some(ca.pem().as_bytes()), no_token.clone()).expect("a client");
        async move { client.submit(whole_hub_report(pod, "RotatedReports", 1), Duration::from_secs(5)).await }
    };
    submit(&old_ca, "worker-1").await.expect("a report over the first certificate is accepted");
    assert!(submit(&new_ca, "worker-2").await.is_err(), "not yet rotated");

    volume.update(&new_ca.secret(&new_ca.leaf("localhost")));
    eventually("the report port serves the new certificate", || async {
        submit(&new_ca, "worker-3").await.is_ok()
    })
    .await;
    assert!(submit(&old_ca, "worker-4").await.is_err(), "the old certificate is gone");
    server.stop().await;
}

#[tokio::test]
async fn tls_files_that_do_not_load_stop_the_start_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.tls_cert = Some(dir.path().join("missing.crt"));
    a.tls_key = Some(dir.path().join("missing.key"));
    let error = start_server(a).await.expect_err("missing files refused").to_string();
    assert!(error.contains("--tls-cert") && error.contains("missing.crt"), "{error}");
}

#[tokio::test]
async fn reports_over_tls_are_accepted_only_by_a_sidecar_that_trusts_the_aggregators_ca() {
    let ca = Ca::new("aggregator ca");
    let stranger = Ca::new("stranger ca");
    let files = Files::new(&ca.leaf("localhost"), &ca);
    let mut a = args();
    a.tls_cert = Some(files.cert.clone());
    a.tls_key = Some(files.key.clone());
    // KEDA's client-certificate rule stays on the KEDA port: sidecars bring tokens, not certificates.
    a.client_ca = Some(files.client_ca.clone());
    a.report_tls = true;
    let (shutdown, running) = start_server(a).await.expect("aggregator starts with report TLS");
    let (report_addr, http_addr) = (running.report_addr, running.http_addr);
    let server = TestServer { shutdown, running: Some(running) };
    let no_token = files._dir.path().join("no-token");
    let https = format!("https://localhost:{}", report_addr.port());
    let client = |url: &str, ca: Option<&Ca>| {
        let pem = ca.map(Ca::pem);
        ReportClient::new(&url.parse().expect("a URL"), pem.as_deref().map(str::as_bytes), no_token.clone())
            .expect("a valid client")
    };

    client(&https, Some(&ca))
        .submit(whole_hub_report("worker-1", "TlsReports", 3), DEADLINE)
        .await
        .expect("a report over TLS is accepted");
    let (status, hubs) = http_get(http_addr, "/hubs").await;
    assert_eq!(status, 200);
    assert!(hubs.contains(r#""task_hub":"TlsReports""#) && hubs.contains(r#""live_pods":1"#), "{hubs}");

    let refused = |what| move |r: Result<_, _>| assert!(r.is_err(), "{what} must not be served");
    let short = Duration::from_secs(5);
    refused("a client trusting another CA")(
        client(&https, Some(&stranger)).submit(whole_hub_report("worker-2", "TlsReports", 1), short).await,
    );
    refused("plaintext")(
        client(&format!("http://{report_addr}"), None)
            .submit(whole_hub_report("worker-3", "TlsReports", 1), short)
            .await,
    );
    let (_, hubs) = http_get(http_addr, "/hubs").await;
    assert!(hubs.contains(r#""live_pods":1"#), "no refused report reached the registry: {hubs}");
    assert!(
        ReportClient::new(&https.parse().expect("a URL"), None, no_token.clone()).is_err(),
        "an https client without a CA is refused at construction"
    );
    server.stop().await;
}

#[tokio::test]
async fn report_tls_without_a_certificate_is_a_start_error() {
    let mut a = args();
    a.report_tls = true;
    let error = start_server(a).await.expect_err("refused").to_string();
    assert!(error.contains("--report-tls"), "{error}");
}
