//! `durable-scaler aggregator` as a process: its command line, its refusal to run token-checked
//! report authentication without Kubernetes, and its graceful stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

/// The binary with loopback ports chosen by the OS and no Kubernetes configuration to find.
fn aggregator(home: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_durable-scaler"));
    command
        .args([
            "aggregator",
            "--grpc-addr",
            "127.0.0.1:0",
            "--report-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", home.join("no-such-kubeconfig"))
        .env("HOME", home)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("DURABLE_SCALER_REPORT_AUTH")
        .env("NO_COLOR", "1");
    command
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_durable-scaler")).args(["aggregator", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--grpc-addr", "DURABLE_SCALER_GRPC_ADDR"),
        ("--report-addr", "DURABLE_SCALER_REPORT_ADDR"),
        ("--http-addr", "DURABLE_SCALER_HTTP_ADDR"),
        ("--report-auth", "DURABLE_SCALER_REPORT_AUTH"),
        ("--tls-cert", "DURABLE_SCALER_TLS_CERT"),
        ("--tls-key", "DURABLE_SCALER_TLS_KEY"),
        ("--client-ca", "DURABLE_SCALER_CLIENT_CA"),
        ("--probe-interval", "DURABLE_SCALER_PROBE_INTERVAL"),
        ("--sample-interval", "DURABLE_SCALER_SAMPLE_INTERVAL"),
        ("--work-grace", "DURABLE_SCALER_WORK_GRACE"),
    ] {
        assert!(help.contains(flag) && help.contains(env), "{flag} / {env} missing from\n{help}");
    }
}

#[test]
fn tokenreview_without_kubernetes_refuses_to_start_naming_the_flag() {
    let home = tempfile::tempdir().unwrap();
    let out = aggregator(home.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--report-auth none"), "{stderr}");
}

#[test]
fn a_bad_interval_is_refused_naming_the_flag() {
    let home = tempfile::tempdir().unwrap();
    let out =
        aggregator(home.path()).args(["--report-auth", "none", "--probe-interval", "10ms"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--probe-interval") && stderr.contains("100ms"), "{stderr}");
}

#[test]
fn sigterm_stops_the_aggregator_gracefully() {
    let home = tempfile::tempdir().unwrap();
    let mut child = aggregator(home.path())
        .args(["--report-auth", "none"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited before listening");
        if line.contains("aggregator listening") {
            break;
        }
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(start.elapsed() < DEADLINE, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    assert!(rest.contains("shutting down"), "{rest}");
}
