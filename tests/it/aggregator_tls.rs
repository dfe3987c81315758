//! TLS on the KEDA port, with a real TLS client (tonic over rustls) and certificates made by
//! rcgen for each test: plaintext refused, client certificates required and checked under
//! `--client-ca`, and certificate files reloaded when they change, without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::aggregator_support::*;
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
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

async fn start_tls(files: &Files, require_client_cert: bool) -> TestServer {
    let mut a = args();
    a.tls_cert = Some(files.cert.clone());
    a.tls_key = Some(files.key.clone());
    a.client_ca = require_client_cert.then(|| files.client_ca.clone());
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
    call_tls(server.addr(), &new_ca, None).await.expect("new certificate served after the files changed");
    assert!(call_tls(server.addr(), &old_ca, None).await.is_err(), "the old one is gone");
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
