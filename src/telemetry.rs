//! Logging set-up shared by every role: `tracing` to stderr, human-readable by default or
//! JSON lines with `DURABLE_SCALER_LOG_FORMAT=json`, filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber once; later calls (for example from tests) do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("DURABLE_SCALER_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Installs rustls' `ring` crypto provider as the process default. The Azure SDK's reqwest
/// client is built without a provider of its own (Cargo.toml) and takes this one; kube and
/// the servers name ring themselves. Call at start-up, before any TLS is used (storage
/// accounts call it when they are made); later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
