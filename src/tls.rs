//! TLS for every listener of the project that serves it (the webhook's HTTPS port, the
//! aggregator's KEDA and report ports): PEM files read with errors that name the file, and
//! one reloading server configuration. The accept loop and the bounds every listener shares
//! are [`crate::listener`]'s.
//!
//! Reloading is off the accept path. [`ReloadingConfig::spawn_watcher`] re-reads the
//! certificate, the key and the client CA on a timer, in a blocking task, and when their
//! bytes changed builds a new [`rustls::ServerConfig`] and publishes it through a
//! [`tokio::sync::watch`] channel; the accept loop only clones the current `Arc`. Kubernetes updates a mounted Secret by writing a new timestamped directory
//! and renaming the `..data` symlink over the old one, so the file names stay and their
//! contents change at once: reading through the paths sees the swap (an inotify watch on
//! the files would keep watching the old inodes), and comparing bytes catches it whatever
//! the file system's timestamps say. Files that do not load (a half-written pair, a key that
//! does not match) are refused, counted, and the previous configuration kept. Open
//! connections keep the session they negotiated.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::shutdown::Shutdown;

/// Why a PEM file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate, or a broken one.
    #[error("{path} holds no usable PEM certificate{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// The PEM parser's complaint, if any.
        reason: Option<String>,
    },
    /// The file holds no PEM private key, or a broken one.
    #[error("{path} holds no usable PEM private key: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
}

/// Reads `path` whole.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read { path: path.to_owned(), source })
}

/// The certificates in `pem` (read from `path`), at least one.
pub(crate) fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Certificate { path: path.to_owned(), reason: Some(e.to_string()) })?;
    if chain.is_empty() {
        return Err(PemError::Certificate { path: path.to_owned(), reason: None });
    }
    Ok(chain)
}

/// The PEM text of the CA file `path`, checked to hold at least one certificate: for CA
/// bundles that are passed on as they are (to a TLS client, or into a sidecar's env).
pub(crate) fn read_ca_pem(path: &Path) -> Result<Vec<u8>, PemError> {
    let pem = read(path)?;
    certificates(path, &pem)?;
    Ok(pem)
}

/// The first private key in `pem` (read from `path`).
pub(crate) fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| PemError::Key { path: path.to_owned(), reason: e.to_string() })
}

/// Why a server configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM material.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the certificate and key (unsupported key type, a key that does not
    /// match the certificate) or the client CA.
    #[error("certificate {cert} with key {key}: {source}")]
    Rustls {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' error.
        source: rustls::Error,
    },
    /// The client CA does not make a certificate verifier.
    #[error("client CA {path}: {reason}")]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The TLS material of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// PEM certificate chain, serving certificate first.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA that client certificates must chain to; none: no client certificates asked for.
    pub client_ca: Option<PathBuf>,
}

/// The application protocols a listener offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// HTTPS for the Kubernetes API server: HTTP/2 (which it speaks when offered) and
    /// HTTP/1.1.
    Https,
}

/// What a listener offers besides its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerOptions {
    /// TLS 1.3 only; otherwise TLS 1.2 and 1.3.
    pub tls13_only: bool,
    /// Application protocols.
    pub alpn: Alpn,
}

/// The bytes a configuration was built from, to tell a changed file from an unchanged one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Self, PemError> {
        Ok(Self {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
        })
    }
}

/// What became of changed TLS files, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReloadOutcome {
    /// Taken into use.
    Reloaded,
    /// Refused; the previous configuration stayed in use.
    Refused,
}

crate::metrics::label_values!(ReloadOutcome { Reloaded => "reloaded", Refused => "refused" });

/// One listener's certificate metrics: its reloads and when the served certificate expires,
/// shared with whoever serves them on `/metrics` (prometheus-client metrics are handles to
/// one shared value).
#[derive(Debug, Clone, Default)]
pub(crate) struct ReloadCounters {
    /// New files taken into use.
    pub reloaded: Counter,
    /// Changed files refused (unreadable, unparsable, a mismatched pair); the previous
    /// configuration stayed in use.
    pub refused: Counter,
    /// The notAfter of the certificate served now (its first one), in seconds since the Unix
    /// epoch; set at load and at every reload, so a renewal that never reached the process
    /// shows as an expiry coming closer (the near-expiry alert of the monitoring component).
    pub expires_at: Gauge,
}

/// The notAfter of the first certificate in `chain`, in seconds since the Unix epoch; `None`
/// when it does not parse as X.509 (rustls checks the chain itself; this only feeds a gauge).
fn not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    let (_, certificate) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    Some(certificate.validity().not_after.timestamp())
}

impl ReloadCounters {
    /// Sets [`ReloadCounters::expires_at`] from the certificate PEM `pem` (read from `path`)
    /// just taken into use.
    fn record_expiry(&self, path: &Path, pem: &[u8]) {
        if let Some(seconds) = certificates(path, pem).ok().as_deref().and_then(not_after) {
            self.expires_at.set(seconds);
        }
    }
}

/// One listener's server configuration, rebuilt by a watcher when its files change.
#[derive(Debug)]
pub struct ReloadingConfig {
    files: TlsFiles,
    options: ServerOptions,
    provider: Arc<CryptoProvider>,
    current: watch::Sender<Arc<ServerConfig>>,
    /// What the files held at the last look, loaded or refused: a refused change is counted
    /// and logged once, not at every look.
    last_seen: Mutex<Material>,
    counters: ReloadCounters,
}

impl ReloadingConfig {
    /// Loads the files once, with reloads counted nowhere (the tests' constructor).
    #[cfg(test)]
    pub(crate) fn load(files: TlsFiles, options: ServerOptions) -> Result<Arc<Self>, TlsError> {
        Self::load_counted(files, options, ReloadCounters::default())
    }

    /// Reads the certificate and key once and builds the config, counting reloads in
    /// `counters`.
    pub(crate) fn load_counted(
        files: TlsFiles,
        options: ServerOptions,
        counters: ReloadCounters,
    ) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let material = Material::read(&files)?;
        let config = build(&files, options, &provider, &material)?;
        counters.record_expiry(&files.cert, &material.cert);
        Ok(Arc::new(Self {
            files,
            options,
            provider,
            current: watch::Sender::new(Arc::new(config)),
            last_seen: Mutex::new(material),
            counters,
        }))
    }

    /// The configuration new connections get.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.current.borrow().clone()
    }

    /// New files taken into use since start.
    pub fn reloads(&self) -> u64 {
        self.counters.reloaded.get()
    }

    /// Changed files refused since start.
    pub fn reload_failures(&self) -> u64 {
        self.counters.refused.get()
    }

    /// Reads the files and, when they changed, builds and publishes a new configuration.
    /// Returns whether it published one; on error the previous one stays in use. Blocking
    /// (file reads, PEM parsing): the watcher runs it on the blocking pool.
    pub(crate) fn reload(&self) -> Result<bool, TlsError> {
        let result = self.try_reload();
        match &result {
            Ok(true) => self.counters.reloaded.inc(),
            Ok(false) => 0,
            Err(_) => self.counters.refused.inc(),
        };
        result
    }

    fn try_reload(&self) -> Result<bool, TlsError> {
        let material = Material::read(&self.files)?;
        let mut last_seen = self.last_seen.lock().unwrap_or_else(PoisonError::into_inner);
        if *last_seen == material {
            return Ok(false);
        }
        let built = build(&self.files, self.options, &self.provider, &material);
        // Remembered either way, so a refused change is not retried (and counted) at every look.
        *last_seen = material;
        self.current.send_replace(Arc::new(built?));
        self.counters.record_expiry(&self.files.cert, &last_seen.cert);
        Ok(true)
    }

    /// Looks at the files every `interval` until `shutdown` fires, logging reloads and
    /// refusals.
    pub(crate) fn spawn_watcher(self: &Arc<Self>, interval: Duration, shutdown: Shutdown) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick completes at once; the files were read a moment ago by `load`.
            ticker.tick().await;
            while shutdown.tick(&mut ticker).await {
                let config = this.clone();
                match tokio::task::spawn_blocking(move || config.reload()).await {
                    Ok(Ok(true)) => {
                        tracing::info!(cert = %this.files.cert.display(), "TLS files changed: reloaded")
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!("TLS files changed but do not load, keeping the previous ones: {e}")
                    }
                    Err(e) => tracing::warn!("TLS reload task failed: {e}"),
                }
            }
        })
    }
}

fn build(
    files: &TlsFiles,
    options: ServerOptions,
    provider: &Arc<CryptoProvider>,
    material: &Material,
) -> Result<ServerConfig, TlsError> {
    let rustls_error = |source| TlsError::Rustls { cert: files.cert.clone(), key: files.key.clone(), source };
    let chain = certificates(&files.cert, &material.cert)?;
    let key = private_key(&files.key, &material.key)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if options.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(rustls_error)?;
    let builder = match (&files.client_ca, &material.client_ca) {
        (Some(path), Some(pem)) => {
            let ca_error = |reason: String| TlsError::ClientCa { path: path.clone(), reason };
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, pem)? {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| ca_error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // Checks that the key matches the certificate (rustls' CertifiedKey::from_der).
    let mut config = builder.with_single_cert(chain, key).map_err(rustls_error)?;
    config.alpn_protocols = match options.alpn {
        Alpn::Grpc => vec![b"h2".to_vec()],
        Alpn::Https => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let path = Path::new("/tls/tls.crt");
        let e = certificates(path, b"not pem").unwrap_err();
        assert_eq!(e.to_string(), "/tls/tls.crt holds no usable PEM certificate");
        let e = private_key(Path::new("/tls/tls.key"), b"").unwrap_err();
        assert!(e.to_string().starts_with("/tls/tls.key holds no usable PEM private key"), "{e}");
        let e = read(Path::new("/nonexistent/tls.crt")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read /nonexistent/tls.crt"), "{e}");
        let e = read_ca_pem(Path::new("/nonexistent/ca.crt")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read /nonexistent/ca.crt"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "no certificate here").unwrap();
        let e = read_ca_pem(file.path()).unwrap_err();
        assert!(e.to_string().ends_with("holds no usable PEM certificate"), "{e}");
    }

    /// A self-signed certificate for `localhost` and its key, PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A kubelet-style Secret volume: `tls.crt`/`tls.key`/`ca.crt` link through `..data`
    /// to a timestamped directory; an update renames a new `..data` link over the old one.
    struct Volume {
        dir: tempfile::TempDir,
        generation: u32,
    }

    impl Volume {
        fn new(cert: &str, key: &str, ca: &str) -> Self {
            let mut volume = Self { dir: tempfile::tempdir().unwrap(), generation: 0 };
            volume.update(cert, key, ca);
            for name in ["tls.crt", "tls.key", "ca.crt"] {
                std::os::unix::fs::symlink(format!("..data/{name}"), volume.dir.path().join(name)).unwrap();
            }
            volume
        }

        fn update(&mut self, cert: &str, key: &str, ca: &str) {
            self.generation += 1;
            let data = format!("..2026_01_01_00_00_00.{}", self.generation);
            let data_dir = self.dir.path().join(&data);
            std::fs::create_dir(&data_dir).unwrap();
            for (name, text) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)] {
                std::fs::write(data_dir.join(name), text).unwrap();
            }
            let tmp = self.dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(&data, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        }

        fn files(&self, client_ca: bool) -> TlsFiles {
            let path = |name| self.dir.path().join(name);
            TlsFiles {
                cert: path("tls.crt"),
                key: path("tls.key"),
                client_ca: client_ca.then(|| path("ca.crt")),
            }
        }
    }

    const HTTPS: ServerOptions = ServerOptions { tls13_only: false, alpn: Alpn::Https };

    #[test]
    fn unchanged_files_publish_nothing() {
        let (cert, key) = pair();
        let volume = Volume::new(&cert, &key, &cert);
        let config = ReloadingConfig::load(volume.files(true), HTTPS).unwrap();
        let before = config.current();
        assert!(!config.reload().unwrap());
        assert!(Arc::ptr_eq(&before, &config.current()));
        assert_eq!((config.reloads(), config.reload_failures()), (0, 0));
    }

    #[test]
    fn a_swapped_data_link_publishes_a_new_configuration() {
        let (cert, key) = pair();
        let mut volume = Volume::new(&cert, &key, &cert);
        let config = ReloadingConfig::load(volume.files(false), HTTPS).unwrap();
        let before = config.current();
        let (cert, key) = pair();
        volume.update(&cert, &key, &cert);
        assert!(config.reload().unwrap());
        assert!(!Arc::ptr_eq(&before, &config.current()));
        assert_eq!(config.reloads(), 1);
    }

    #[test]
    fn a_rotated_client_ca_alone_publishes_a_new_configuration() {
        let (cert, key) = pair();
        let mut volume = Volume::new(&cert, &key, &cert);
        let config = ReloadingConfig::load(volume.files(true), HTTPS).unwrap();
        let (other_ca, _) = pair();
        volume.update(&cert, &key, &other_ca);
        assert!(config.reload().unwrap());
        assert_eq!(config.reloads(), 1);
    }

    #[test]
    fn a_mismatched_pair_is_refused_once_and_the_previous_configuration_kept() {
        let (cert, key) = pair();
        let mut volume = Volume::new(&cert, &key, &cert);
        let config = ReloadingConfig::load(volume.files(false), HTTPS).unwrap();
        let before = config.current();
        let (new_cert, _) = pair();
        volume.update(&new_cert, &key, &cert);
        let error = config.reload().unwrap_err();
        assert!(matches!(error, TlsError::Rustls { .. }), "{error}");
        assert!(Arc::ptr_eq(&before, &config.current()));
        assert!(!config.reload().unwrap(), "the same refused files are not looked at again");
        assert_eq!((config.reloads(), config.reload_failures()), (0, 1));
    }

    /// A self-signed certificate for `localhost` valid until `not_after`, and its key, PEM.
    fn pair_until(not_after: time::OffsetDateTime) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = not_after;
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn the_expiry_gauge_follows_the_certificate_in_use_and_not_a_refused_one() {
        let first = time::macros::datetime!(2031-05-01 12:00 UTC);
        let (cert, key) = pair_until(first);
        let mut volume = Volume::new(&cert, &key, &cert);
        let counters = ReloadCounters::default();
        let config = ReloadingConfig::load_counted(volume.files(false), HTTPS, counters.clone()).unwrap();
        assert_eq!(counters.expires_at.get(), first.unix_timestamp());

        let renewed = time::macros::datetime!(2032-05-01 12:00 UTC);
        let (cert, key) = pair_until(renewed);
        volume.update(&cert, &key, &cert);
        assert!(config.reload().unwrap());
        assert_eq!(counters.expires_at.get(), renewed.unix_timestamp());

        // A renewal whose key does not match is refused: the gauge keeps the one served.
        let (refused, _) = pair_until(time::macros::datetime!(2033-05-01 12:00 UTC));
        volume.update(&refused, &key, &cert);
        assert!(config.reload().is_err());
        assert_eq!(counters.expires_at.get(), renewed.unix_timestamp());
    }

    #[test]
    fn alpn_follows_the_kind_of_listener() {
        let (cert, key) = pair();
        let volume = Volume::new(&cert, &key, &cert);
        let grpc = ServerOptions { tls13_only: true, alpn: Alpn::Grpc };
        let config = ReloadingConfig::load(volume.files(false), grpc).unwrap().current();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let https = ReloadingConfig::load(volume.files(false), HTTPS).unwrap().current();
        assert_eq!(https.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
