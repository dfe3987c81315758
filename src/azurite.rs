//! Azurite, the Azure Storage emulator, as the tests and the demo use it.
//!
//! [`Azurite::shared`] gives every caller in a process the same instance: the one named by
//! `AZURITE_CONNECTION_STRING` when set (for example by `.ci/run`, which starts one for the
//! whole suite), else one this process starts on loopback with ports chosen by the OS,
//! in-memory, and that dies with the process. Azurite comes from the npm registry:
//! `npm ci` in the project root puts it in `node_modules/.bin/`. When it cannot be had,
//! every error says how to get it ([`HOW_TO_GET_IT`]), so a test run on a fresh clone
//! fails with instructions rather than a bare "not found".

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

/// Azurite's well-known account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known account key (public; it only opens the emulator).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// What to do when no Azurite can be had: every [`AzuriteError`] ends with it.
pub(crate) const HOW_TO_GET_IT: &str = "this needs Azurite, the Azure Storage emulator: run ./scripts/test \
(it installs Azurite with npm and starts it), or run `npm ci` in the project root (needs \
Node.js) so node_modules/.bin/azurite exists, or start Azurite yourself and set \
AZURITE_CONNECTION_STRING to its connection string (see scripts/test for the command line); \
AZURITE_BIN may name the azurite binary";

/// How long Azurite may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Azurite: its endpoints, and the process when this process started it.
#[derive(Debug)]
pub struct Azurite {
    /// Blob endpoint, path-style, e.g. `http://127.0.0.1:10000/devstoreaccount1`.
    pub blob_endpoint: String,
    /// Queue endpoint, path-style.
    pub queue_endpoint: String,
    /// Table endpoint, path-style.
    pub table_endpoint: String,
    child: Mutex<Option<Child>>,
}

/// Why Azurite could not be had. Each message ends with [`HOW_TO_GET_IT`].
#[derive(thiserror::Error)]
pub enum AzuriteError {
    /// No `azurite` binary was found.
    #[error("Azurite not found (no node_modules/.bin/azurite under {0}, none on PATH): {HOW_TO_GET_IT}")]
    NotInstalled(String),
    /// The process could not be started or did not come up.
    #[error("Azurite did not start: {0}; {HOW_TO_GET_IT}")]
    Start(String),
    /// `AZURITE_CONNECTION_STRING` lacks an endpoint.
    #[error("AZURITE_CONNECTION_STRING has no {0}; {HOW_TO_GET_IT}")]
    BadConnectionString(&'static str),
}

/// The message, not the variant: tests `.expect()` these, and a panic should read as the
/// instructions it carries.
impl std::fmt::Debug for AzuriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Azurite {
    /// The process-wide instance (see the module docs). Panics with the reason and what to
    /// do ([`HOW_TO_GET_IT`]) when it cannot be had: meant for tests and the demo's set-up,
    /// where there is nothing else to do. The first failure is kept, so every later caller
    /// fails at once with the same message instead of trying (and waiting) again.
    pub fn shared() -> &'static Azurite {
        static SHARED: OnceLock<Result<Azurite, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            match std::env::var("AZURITE_CONNECTION_STRING") {
                Ok(cs) => Self::from_connection_string(&cs),
                Err(_) => Self::start(),
            }
            .map_err(|e| e.to_string())
        });
        match shared {
            Ok(azurite) => azurite,
            Err(message) => panic!("{message}"),
        }
    }

    /// Uses an Azurite that is already running.
    pub(crate) fn from_connection_string(cs: &str) -> Result<Self, AzuriteError> {
        let field = |name: &'static str| {
            cs.split(';')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim_end_matches('/').to_string())
                .ok_or(AzuriteError::BadConnectionString(name))
        };
        Ok(Self {
            blob_endpoint: field("BlobEndpoint")?,
            queue_endpoint: field("QueueEndpoint")?,
            table_endpoint: field("TableEndpoint")?,
            child: Mutex::new(None),
        })
    }

    /// Starts a new in-memory Azurite on loopback, on ports the OS picks. The process is
    /// killed when this value is dropped and, on Linux, when this process dies.
    pub fn start() -> Result<Self, AzuriteError> {
        Self::start_with(&[])
    }

    /// Like [`Azurite::start`], serving HTTPS with the PEM certificate and key given (as
    /// Azure Storage always does): for tests of the TLS path to storage.
    pub fn start_https(cert: &Path, key: &Path) -> Result<Self, AzuriteError> {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        Self::start_with(&["--cert", &cert, "--key", &key])
    }

    fn start_with(extra_args: &[&str]) -> Result<Self, AzuriteError> {
        let bin = find_binary()?;
        let mut command = Command::new(&bin);
        command
            .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .args(["--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1", "--tableHost", "127.0.0.1"])
            .args(["--blobPort", "0", "--queuePort", "0", "--tablePort", "0"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = spawn_tied_to_process(command)
            .map_err(|e| AzuriteError::Start(format!("{}: {e}", bin.display())))?;
        let mut azurite = Self {
            blob_endpoint: String::new(),
            queue_endpoint: String::new(),
            table_endpoint: String::new(),
            child: Mutex::new(Some(child)),
        };
        azurite.wait_until_listening()?;
        Ok(azurite)
    }

    /// Reads Azurite's start-up lines ("Azurite Queue service is successfully listening at
    /// http://127.0.0.1:PORT") until all three services have a port.
    fn wait_until_listening(&mut self) -> Result<(), AzuriteError> {
        let stdout = self
            .child
            .get_mut()
            .ok()
            .and_then(|c| c.as_mut())
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| AzuriteError::Start("no stdout".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining stdout after start-up so Azurite never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        while self.blob_endpoint.is_empty()
            || self.queue_endpoint.is_empty()
            || self.table_endpoint.is_empty()
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).map_err(|e| match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => {
                    AzuriteError::Start(format!("not listening after {}s", START_TIMEOUT.as_secs()))
                }
                // Its stdout closed: it exited (no Node.js on PATH, a port refused ...); its
                // own complaint went to stderr above.
                std::sync::mpsc::RecvTimeoutError::Disconnected => {
                    AzuriteError::Start("it exited before listening (see its output above)".into())
                }
            })?;
            let Some((service, url)) = parse_listening_line(&line) else { continue };
            let endpoint = format!("{}/{ACCOUNT}", url.trim_end_matches('/'));
            match service {
                "Blob" => self.blob_endpoint = endpoint,
                "Queue" => self.queue_endpoint = endpoint,
                "Table" => self.table_endpoint = endpoint,
                _ => {}
            }
        }
        Ok(())
    }

    /// A connection string with explicit path-style endpoints, as an app pointed at this
    /// Azurite would have in `AzureWebJobsStorage`.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol={};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={};QueueEndpoint={};TableEndpoint={};",
            if self.queue_endpoint.starts_with("https:") { "https" } else { "http" },
            self.blob_endpoint,
            self.queue_endpoint,
            self.table_endpoint
        )
    }

    /// Stops Azurite if this process started it.
    pub fn stop(&self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut c) = child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_listening_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("Azurite ")?;
    let (service, rest) = rest.split_once(" service is successfully listening at ")?;
    Some((service, rest.trim()))
}

/// `AZURITE_BIN`, else `node_modules/.bin/azurite` in this crate's directory or any parent of
/// the current directory, else `azurite` on PATH.
fn find_binary() -> Result<PathBuf, AzuriteError> {
    if let Ok(bin) = std::env::var("AZURITE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut roots: Vec<PathBuf> = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    // Run from the crate's directory, the first ancestor is the crate's directory again.
    roots.dedup();
    let local = roots.iter().map(|r| r.join("node_modules/.bin/azurite")).find(|p| p.exists());
    if let Some(bin) = local {
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("azurite"))
        .find(|p| p.exists());
    on_path.ok_or_else(|| {
        AzuriteError::NotInstalled(
            roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
        )
    })
}

/// Spawns `command` so that it dies with this process: from a thread that lives as long as
/// the process, because the kill-with-parent signal follows the spawning thread.
fn spawn_tied_to_process(mut command: Command) -> std::io::Result<Child> {
    crate::shutdown::kill_child_with_parent(&mut command);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("azurite-parent".into()).spawn(move || {
        let _ = tx.send(command.spawn());
        loop {
            std::thread::park();
        }
    })?;
    rx.recv().map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_name_service_and_url() {
        assert_eq!(
            parse_listening_line("Azurite Queue service is successfully listening at http://127.0.0.1:34481"),
            Some(("Queue", "http://127.0.0.1:34481"))
        );
        assert_eq!(parse_listening_line("Azurite Queue service is starting at http://127.0.0.1:0"), None);
    }

    #[test]
    fn connection_string_endpoints_are_read_back() {
        let a = Azurite::from_connection_string(
            "AccountName=devstoreaccount1;BlobEndpoint=http://h:1/a/;QueueEndpoint=http://h:2/a;TableEndpoint=http://h:3/a",
        )
        .unwrap();
        assert_eq!((a.blob_endpoint.as_str(), a.queue_endpoint.as_str()), ("http://h:1/a", "http://h:2/a"));
        assert!(Azurite::from_connection_string("AccountName=x").is_err());
    }

    #[test]
    fn every_error_says_how_to_get_azurite() {
        let errors = [
            AzuriteError::NotInstalled("/src".into()),
            AzuriteError::Start("exited".into()),
            AzuriteError::BadConnectionString("QueueEndpoint"),
        ];
        for error in errors {
            let (display, debug) = (error.to_string(), format!("{error:?}"));
            assert!(display.ends_with(HOW_TO_GET_IT), "{display}");
            assert!(display.contains("./scripts/test") && display.contains("AZURITE_CONNECTION_STRING"));
            assert_eq!(debug, display, "an .expect() shows the instructions");
        }
    }
}
