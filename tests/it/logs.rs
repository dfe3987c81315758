//! The binary's log output when it does not go to a terminal: plain text, as the demo's
//! child log files and log collectors need it.

use std::process::Command;

#[test]
fn logs_written_to_a_file_carry_no_colour_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("webhook.log");
    let file = std::fs::File::create(&log).unwrap();
    // A start-up error is logged at once and ends the process (exit status 2).
    let status = Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .args(["webhook", "--addr", "127.0.0.1:0", "--tls-cert", "/nonexistent/tls.crt"])
        .args(["--tls-key", "/nonexistent/tls.key"])
        .env_remove("NO_COLOR")
        .env_remove("DURABLE_SCALER_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("ERROR") && text.contains("/nonexistent/tls.crt"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a log file: {text:?}");
}
