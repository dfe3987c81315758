//! Admission latency and throughput of `durable-scaler webhook` over loopback HTTPS: the real
//! server (rustls, hyper, axum) and a real load generator (tokio-rustls + hyper clients),
//! posting the API-server-shaped ReplicaSet pod review of tests/fixtures. A benchmark, not a
//! test: it prints figures and asserts only that every answer was a 200 with a patch.
//!
//! `cargo bench --bench webhook_admission` (env BENCH_SECONDS per scenario, default 5).
//! Client and server share the machine's cores, so the figures are a floor.

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/it/https.rs"]
mod https;

use std::time::{Duration, Instant};

use durable_scaler::{
    shutdown::Shutdown,
    webhook::{Args, Webhook},
};
use https::{Http, Pki, SecretVolume, full};

const FIXTURE: &str = include_str!("../tests/fixtures/admission/replicaset-pod-create.json");

struct Figures {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Figures {
    fn print(mut self, scenario: &str) {
        self.latencies.sort();
        let at = |q: f64| {
            let index = ((self.latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
            self.latencies[index.min(self.latencies.len() - 1)]
        };
        let micros = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{scenario:<48} {:>8} req  {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  max {:>7.0} us",
            self.latencies.len(),
            self.latencies.len() as f64 / self.elapsed.as_secs_f64(),
            micros(at(0.50)),
            micros(at(0.99)),
            micros(at(1.0)),
        );
    }
}

/// `workers` concurrent clients for `duration`; each keeps one connection open, or opens a
/// new one (full TLS handshake) for every request when `reconnect`.
async fn run(
    addr: std::net::SocketAddr,
    ca: &str,
    workers: usize,
    http: Http,
    reconnect: bool,
    duration: Duration,
) -> Figures {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let ca = ca.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut connection = https::connect(addr, &ca, http).await.unwrap();
            while Instant::now() < deadline {
                let sent = Instant::now();
                if reconnect {
                    connection = https::connect(addr, &ca, http).await.unwrap();
                }
                let (status, body) = connection.post(Some("application/json"), full(FIXTURE)).await.unwrap();
                latencies.push(sent.elapsed());
                assert!(status.is_success() && body.windows(5).any(|w| w == b"patch"), "{status}");
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    Figures { latencies, elapsed: start.elapsed() }
}

#[tokio::main]
async fn main() {
    durable_scaler::telemetry::install_crypto_provider();
    let seconds = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ecdsa("bench");
    let volume = SecretVolume::new(dir.path(), &pki);
    let args = Args {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: volume.cert(),
        tls_key: volume.key(),
        tls13_only: false,
        tls_reload_interval: std::time::Duration::from_secs(5),
        sidecar_image: "ghcr.io/durable-scaler/durable-scaler:bench".to_owned(),
        aggregator: "http://durable-scaler-aggregator.durable-scaler:4371".parse().expect("a URL"),
        sidecar_aggregator_ca: None,
        sidecar_aggregator_ca_secret: None,
        sidecar_image_pull_secrets: Vec::new(),
        native_sidecar: durable_scaler::webhook::cluster::NativeSidecarMode::True,
        sidecar_image_from_pod: false,
        webhook_container: "webhook".to_owned(),
        pod_name: None,
        pod_namespace: None,
    };
    let webhook = Webhook::bind_with(&args, None).await.unwrap();
    let addr = webhook.local_addr().unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(webhook.serve(shutdown.clone()));

    println!(
        "webhook admission over loopback HTTPS (ECDSA P-256, TLS 1.3), {} cores, {seconds} s per scenario",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    run(addr, &pki.ca_pem, 1, Http::One, false, duration).await.print("HTTP/1.1 keep-alive, 1 client");
    run(addr, &pki.ca_pem, 16, Http::One, false, duration).await.print("HTTP/1.1 keep-alive, 16 clients");
    run(addr, &pki.ca_pem, 16, Http::Two, false, duration).await.print("HTTP/2, 16 clients (16 connections)");
    run(addr, &pki.ca_pem, 4, Http::One, true, duration)
        .await
        .print("new TLS connection per request, 4 clients");
    shutdown.trigger();
}
