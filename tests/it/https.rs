//! Test support: throwaway PKI, a kubelet-style Secret volume, and a real HTTPS client
//! (tokio-rustls + hyper) for the webhook's tests and benchmark.

#![allow(dead_code)] // the tests and the webhook benchmark each use a different part

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A CA and a serving certificate for `localhost` and `127.0.0.1`, all PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A fresh ECDSA P-256 CA and serving certificate.
    pub fn ecdsa(label: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {label}"));
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name.push(rcgen::DnType::CommonName, format!("webhook {label}"));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Self { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// The RSA-2048 fixture made with openssl (tests/fixtures/rsa/README.md).
    pub fn rsa_fixture() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        Self { ca_pem: read("ca.crt"), cert_pem: read("tls.crt"), key_pem: read("tls.key") }
    }

    /// The serving certificate's DER, to compare with what a handshake presented.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }
}

/// A directory laid out as the kubelet lays out a Secret volume: the files live in a
/// timestamped directory, `..data` links to it, and `tls.crt` / `tls.key` link through
/// `..data`. An update writes a new directory and renames a new `..data` link over the old
/// one, which is atomic.
pub struct SecretVolume {
    pub dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    pub fn new(dir: &Path, pki: &Pki) -> Self {
        let mut volume = Self { dir: dir.to_owned(), generation: 0 };
        volume.update(pki);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        volume
    }

    pub fn update(&mut self, pki: &Pki) {
        self.generation += 1;
        let data = format!("..2026_11_29_00_00_{:02}.{}", self.generation, self.generation);
        let data_dir = self.dir.join(&data);
        std::fs::create_dir(&data_dir).unwrap();
        std::fs::write(data_dir.join("tls.crt"), &pki.cert_pem).unwrap();
        std::fs::write(data_dir.join("tls.key"), &pki.key_pem).unwrap();
        std::fs::write(data_dir.join("ca.crt"), &pki.ca_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&data, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

/// Which HTTP version the client speaks over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http {
    One,
    Two,
}

pub type Body = BoxBody<Bytes, Infallible>;

enum Sender {
    One(conn::http1::SendRequest<Body>),
    Two(conn::http2::SendRequest<Body>),
}

/// One open HTTPS connection to the webhook.
pub struct Connection {
    sender: Sender,
    /// The certificate chain the server presented in this connection's handshake.
    pub peer_certificates: Vec<CertificateDer<'static>>,
    /// The negotiated TLS version.
    pub version: rustls::ProtocolVersion,
}

/// A client configuration trusting `ca_pem`, limited to `versions`.
pub fn client_config(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    http: Http,
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![match http {
        Http::One => b"http/1.1".to_vec(),
        Http::Two => b"h2".to_vec(),
    }];
    config
}

/// Connects with TLS 1.2 or 1.3, verifying the server as `localhost` against `ca_pem`.
pub async fn connect(addr: SocketAddr, ca_pem: &str, http: Http) -> Result<Connection, String> {
    connect_with(addr, client_config(ca_pem, rustls::DEFAULT_VERSIONS, http), http).await
}

pub async fn connect_with(addr: SocketAddr, config: ClientConfig, http: Http) -> Result<Connection, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    let peer_certificates = session.peer_certificates().unwrap_or_default().to_vec();
    let version = session.protocol_version().unwrap();
    let io = TokioIo::new(tls);
    let sender = match http {
        Http::One => {
            let (sender, connection) = conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            Sender::One(sender)
        }
        Http::Two => {
            let (sender, connection) =
                conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            Sender::Two(sender)
        }
    };
    Ok(Connection { sender, peer_certificates, version })
}

/// A body of known length (sent with Content-Length).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A body of unknown length (sent chunked over HTTP/1.1).
pub fn streamed(chunks: Vec<Bytes>) -> Body {
    let frames = futures::stream::iter(chunks.into_iter().map(|c| Ok(hyper::body::Frame::data(c))));
    http_body_util::StreamBody::new(frames).boxed()
}

impl Connection {
    /// Sends one request and reads the whole answer.
    pub async fn send(&mut self, request: Request<Body>) -> Result<(StatusCode, Bytes), String> {
        let response = match &mut self.sender {
            Sender::One(s) => s.send_request(request).await,
            Sender::Two(s) => s.send_request(request).await,
        }
        .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, body))
    }

    /// `POST /mutate` with the given content type.
    pub async fn post(
        &mut self,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::post("https://localhost/mutate");
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        self.send(request.body(body).unwrap()).await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.send(Request::get(format!("https://localhost{path}")).body(full(Bytes::new())).unwrap()).await
    }
}
