//! The webhook's serving certificate, reloaded from disk while the server runs.
//!
//! Kubernetes updates a mounted Secret by writing a new timestamped directory and swapping
//! the `..data` symlink to it, so `tls.crt` and `tls.key` change together, atomically, under
//! the same paths. [`CertStore`] re-reads both paths on an interval (reading through the
//! symlinks sees the swap; an inotify watch on the files would be left watching the old
//! inode) and swaps the [`CertifiedKey`] that every new handshake gets. Open connections keep
//! the session they negotiated, so nothing is dropped and nothing restarts. A half-updated
//! pair (a certificate that does not match the key, as a non-atomic copy can produce for a
//! moment) is refused and the old pair kept until the next look.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{shutdown::Shutdown, tls as pem, tls::PemError};

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM material.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the pair (unsupported key type, key does not match the certificate) or
    /// the configuration.
    #[error("certificate {cert} with key {key}: {source}")]
    Rustls {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' error.
        source: rustls::Error,
    },
}

/// The current certificate and key, shared by every handshake, swapped on reload.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents the current pair was built from, to skip re-parsing unchanged files.
    loaded_from: Mutex<(Vec<u8>, Vec<u8>)>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl CertStore {
    /// Loads the pair once; an error here is a start-up error.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = certified_key(cert_path, key_path, &cert_pem, &key_pem, &provider)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: RwLock::new(Arc::new(key)),
            loaded_from: Mutex::new((cert_pem, key_pem)),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }))
    }

    /// Pairs swapped in since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Looks at changed files that were refused (unreadable, unparsable, mismatched).
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Re-reads the files; swaps in the new pair when they changed and are valid. Returns
    /// whether it swapped. On error the old pair stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let result = self.try_reload();
        match result {
            Ok(true) => self.reloads.fetch_add(1, Ordering::Relaxed),
            Ok(false) => 0,
            Err(_) => self.failures.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn try_reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = read_pair(&self.cert_path, &self.key_path)?;
        let mut loaded_from = self.loaded_from.lock().unwrap_or_else(PoisonError::into_inner);
        if loaded_from.0 == cert_pem && loaded_from.1 == key_pem {
            return Ok(false);
        }
        let key = certified_key(&self.cert_path, &self.key_path, &cert_pem, &key_pem, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        *loaded_from = (cert_pem, key_pem);
        Ok(true)
    }

    /// Reloads every `interval` until `shutdown` fires, logging swaps and failures.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.tick(&mut ticker).await {
            let store = self.clone();
            // File reads and PEM parsing are blocking work: keep them off the async threads.
            match tokio::task::spawn_blocking(move || store.reload()).await {
                Ok(Ok(true)) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the previous one")
                }
                Err(e) => tracing::warn!(error = %e, "certificate reload task failed"),
            }
        }
    }

    /// A rustls server configuration that takes its certificate from this store: TLS 1.2 and
    /// 1.3, or 1.3 only; ALPN h2 and http/1.1 (the API server speaks HTTP/2 when offered).
    pub fn server_config(self: &Arc<Self>, tls13_only: bool) -> Result<ServerConfig, TlsError> {
        let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions)
            .map_err(|source| TlsError::Rustls {
                cert: self.cert_path.clone(),
                key: self.key_path.clone(),
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((pem::read(cert_path)?, pem::read(key_path)?))
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = pem::certificates(cert_path, cert_pem)?;
    let key = pem::private_key(key_path, key_pem)?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Rustls {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    })
}
