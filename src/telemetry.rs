//! Logging set-up shared by every role: `tracing` to stderr, human-readable by default or
//! JSON lines with `DURABLE_SCALER_LOG_FORMAT=json`, filtered by `RUST_LOG` (default `info`).
//! Colours only when stderr is a terminal and `NO_COLOR` is unset: log files (the demo's
//! children write to files) and log collectors get plain text, not ANSI escapes.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber once; later calls (for example from tests) do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("DURABLE_SCALER_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let ansi = colours(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Whether to colour the output: on a terminal, unless `NO_COLOR` is set to anything but the
/// empty string (<https://no-color.org>).
fn colours(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs rustls' `ring` crypto provider as the process default. The Azure SDK's reqwest
/// client is built without a provider of its own (Cargo.toml) and takes this one; kube and
/// the servers name ring themselves. Call at start-up, before any TLS is used (storage
/// accounts call it when they are made); later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some(OsStr::new(""))));
        assert!(!colours(true, Some(OsStr::new("1"))));
        assert!(!colours(false, None), "a file or a pipe gets no escapes");
    }
}
