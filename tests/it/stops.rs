//! A clean stop is clean (issue 22 item 7): every role, stopped with SIGTERM as Kubernetes
//! stops a container, exits 0 and logs no ERROR, stop after stop. The webhook used to lose
//! one stop in five to a race between the signal and its accept loop ending.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::https::Pki;

/// Stops per role.
const STOPS: usize = 20;
/// How long one start or one stop may take before the test gives up.
const DEADLINE: Duration = Duration::from_secs(30);

/// The binary under test (see `hostile.rs`).
fn binary() -> std::path::PathBuf {
    std::env::var_os("DURABLE_SCALER_BIN_UNDER_TEST")
        .filter(|path| !path.is_empty())
        .map_or_else(|| env!("CARGO_BIN_EXE_durable-scaler").into(), Into::into)
}

/// Starts `args` with `envs` until its log shows `ready`, sends SIGTERM, and returns the exit
/// code and the whole log.
fn start_and_stop(args: &[String], envs: &[(&str, String)], ready: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("role.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut command = Command::new(binary());
    command
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .env("HOME", dir.path())
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("DURABLE_SCALER_REPORT_AUTH")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    durable_scaler::shutdown::kill_child_with_parent(&mut command);
    let mut child = command.spawn().unwrap();
    let output = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    while !output().contains(ready) {
        assert!(child.try_wait().unwrap().is_none(), "exited before {ready:?}:\n{}", output());
        assert!(started.elapsed() < DEADLINE, "no {ready:?} in:\n{}", output());
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("still running {DEADLINE:?} after SIGTERM:\n{}", output());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), output())
}

/// Stops `args` [`STOPS`] times; returns the stops that were not clean, with why.
fn stop_repeatedly(role: &str, args: &[String], envs: &[(&str, String)], ready: &str) -> Vec<String> {
    (0..STOPS)
        .filter_map(|i| {
            let (code, output) = start_and_stop(args, envs, ready);
            let errors: Vec<&str> = output.lines().filter(|l| l.contains(" ERROR ")).collect();
            (code != Some(0) || !errors.is_empty())
                .then(|| format!("{role} stop {i}: exit {code:?}, {errors:?}"))
        })
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_role_exits_zero_without_an_error_on_sigterm_stop_after_stop() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ecdsa("stops");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let webhook = vec![
        "webhook".to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    let aggregator = strings(&[
        "aggregator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--report-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--report-auth",
        "none",
    ]);
    // The sidecar reports to a port that refuses connections and reads an emulator that is
    // not there: it runs, fails to read and report (warnings), and must still stop cleanly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let sidecar = strings(&["sidecar", "--interval", "200ms", "--http-addr", "127.0.0.1:0"]);
    let sidecar_env = [
        ("DURABLE_SCALER_TASK_HUB", "StopHub".to_string()),
        (
            "DURABLE_SCALER_CONNECTION",
            "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.2".into(),
        ),
        ("DURABLE_SCALER_AGGREGATOR", format!("http://{closed}")),
        ("DURABLE_SCALER_TOKEN_FILE", "/nonexistent/token".to_string()),
        ("POD_NAME", "stop-pod".to_string()),
        ("POD_NAMESPACE", "apps".to_string()),
    ];
    let started = Instant::now();
    let unclean: Vec<String> = std::thread::scope(|scope| {
        let roles = [
            scope.spawn(|| stop_repeatedly("webhook", &webhook, &[], "webhook serving")),
            scope.spawn(|| stop_repeatedly("aggregator", &aggregator, &[], "aggregator listening")),
            scope.spawn(|| stop_repeatedly("sidecar", &sidecar, &sidecar_env, "sidecar started")),
        ];
        roles.into_iter().flat_map(|role| role.join().unwrap()).collect()
    });
    eprintln!(
        "figure: {} stops in {:?}, {} not clean: {unclean:?}",
        3 * STOPS,
        started.elapsed(),
        unclean.len()
    );
    assert!(unclean.is_empty(), "{unclean:#?}");
}
