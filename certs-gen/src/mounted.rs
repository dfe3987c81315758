//! Waiting until a Secret volume shows the material, so the container that starts next finds
//! its certificate in place.
//!
//! certs-gen runs as an init container of the pods that serve with these certificates. The
//! pod mounts the TLS Secret as an `optional` volume, because the kubelet mounts every volume
//! before the first init container runs and a missing non-optional Secret would keep the pod
//! in `ContainerCreating` for ever (the init container that creates the Secret could never
//! run). The kubelet fills an optional Secret volume once the Secret exists, on a later sync
//! of the pod (Kubernetes documents this as "Mounted Secrets are updated automatically":
//! kubelet sync period plus cache propagation delay, about a minute). Until then the directory
//! is empty, so the init container waits here for the files; the server starting after it
//! reads them at start.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use time::OffsetDateTime;

use crate::pki::{self, Material};

/// The material did not appear in the directory in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "{dir}: the mounted Secret did not show the expected material within {timeout:?} (last: {last}); \
     is the Secret volume mounted there?"
)]
pub struct WaitError {
    /// The directory waited on.
    pub dir: PathBuf,
    /// How long was waited.
    pub timeout: Duration,
    /// Why the last look was not good enough.
    pub last: String,
}

/// Looks at `dir` every `poll` until `ready` accepts it, for at most `timeout` (tokio time,
/// so tests can run it on a paused clock).
pub async fn wait_for(
    dir: &Path,
    timeout: Duration,
    poll: Duration,
    mut ready: impl FnMut(&Path) -> Result<(), String>,
) -> Result<(), WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match ready(dir) {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(WaitError { dir: dir.to_owned(), timeout, last });
        }
        tracing::debug!(dir = %dir.display(), "waiting for the mounted Secret: {last}");
        tokio::time::sleep(poll).await;
    }
}

/// Accepts `dir` when its `ca.crt` holds exactly `expected` (the Secret's `ca.crt` as just
/// read from the API). The kubelet writes a Secret volume atomically (all keys switch
/// together), so the other files mounted beside it are of the same Secret version.
pub fn holds_ca(dir: &Path, expected: &[u8]) -> Result<(), String> {
    let path = dir.join("ca.crt");
    match std::fs::read(&path) {
        Ok(found) if found == expected => Ok(()),
        Ok(_) => Err(format!("{} differs from the Secret's ca.crt", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Accepts `dir` when its `ca.crt`, `tls.crt` and `tls.key` can serve `names` at `now`
/// ([`pki::check`]): for a pod that only waits for material another pod creates.
pub fn holds_valid_material(dir: &Path, names: &[String], now: OffsetDateTime) -> Result<(), String> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let material = Material {
        ca_pem: read("ca.crt")?,
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
        ca_key_pem: None,
    };
    pki::check(&material, names, now)
}

/// Accepts `dir` when its `ca.crt` holds at least one certificate that is a CA valid at
/// `now` ([`pki::check_ca`]): for a pod that mounts only the CA of a Secret another pod
/// creates (to give it to clients), not its key.
pub fn holds_ca_certificate(dir: &Path, now: OffsetDateTime) -> Result<(), String> {
    let path = dir.join("ca.crt");
    let bundle = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    pki::check_ca(&bundle, now).map_err(|reason| format!("{}: {reason}", path.display()))
}
