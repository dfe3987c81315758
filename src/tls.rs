//! PEM material for the project's two TLS servers (the webhook and the aggregator's KEDA
//! port): reading certificate chains and private keys, with errors that name the file.
//! Each server keeps its own reload mechanism; what they read is read here.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

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
pub fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read { path: path.to_owned(), source })
}

/// The certificates in `pem` (read from `path`), at least one.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
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
pub fn read_ca_pem(path: &Path) -> Result<Vec<u8>, PemError> {
    let pem = read(path)?;
    certificates(path, &pem)?;
    Ok(pem)
}

/// The first private key in `pem` (read from `path`).
pub fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| PemError::Key { path: path.to_owned(), reason: e.to_string() })
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
}
