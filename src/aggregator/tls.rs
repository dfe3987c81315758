//! TLS for the KEDA port (and the report port under `--report-tls`), with certificate files
//! reloaded when they change.
//!
//! tonic's built-in TLS reads its certificate once, so these ports are served over our own
//! listener instead: every accepted connection checks the files' modification times and
//! lengths, rebuilds the rustls configuration when they changed (a rotated Secret), and keeps
//! the previous configuration, with a warning, when the new files do not load. Handshakes run
//! in their own tasks so one slow client cannot hold up the others.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::{shutdown::Shutdown, tls as pem, tls::PemError};

/// The TLS material of one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM private key (`--tls-key`).
    pub key: PathBuf,
    /// PEM CA that client certificates must chain to (`--client-ca`); none: no client auth.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM material.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Config(String),
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    std::iter::once(&files.cert)
        .chain(std::iter::once(&files.key))
        .chain(files.client_ca.as_ref())
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    Ok(pem::certificates(path, &pem::read(path)?)?)
}

/// Builds the server configuration from the files as they are now.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = pem::private_key(&files.key, &pem::read(&files.key)?)?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| PemError::Certificate { path: ca.clone(), reason: Some(e.to_string()) })?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS acceptor that follows its files.
#[derive(Debug)]
pub struct ReloadingAcceptor {
    files: TlsFiles,
    current: Mutex<(Stamp, Arc<rustls::ServerConfig>)>,
}

impl ReloadingAcceptor {
    /// Loads the files; fails when they do not make a configuration.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let config = server_config(&files)?;
        Ok(Self { files, current: Mutex::new((stamp, config)) })
    }

    /// The acceptor for the next connection, reloaded first when a file changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let now = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != now {
            match server_config(&self.files) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed: reloaded");
                    current.1 = config;
                }
                Err(e) => tracing::warn!(
                    "TLS certificate files changed but do not load, keeping the previous ones: {e}"
                ),
            }
            // Remember this stamp either way so a broken file is not retried on every accept.
            current.0 = now;
        }
        TlsAcceptor::from(current.1.clone())
    }
}

/// Accepts TCP connections on `listener`, completes TLS handshakes, and yields the streams
/// for tonic's `serve_with_incoming`; ends with the shutdown signal.
pub fn incoming(
    listener: TcpListener,
    acceptor: Arc<ReloadingAcceptor>,
    shutdown: Shutdown,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Transient (for example out of file descriptors): log and keep serving.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small gRPC frames must not wait for Nagle's algorithm (40 ms with delayed ACKs).
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await;
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake refused: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
