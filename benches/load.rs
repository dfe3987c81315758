//! Load benchmark (not a test; prints figures, asserts nothing): the aggregator binary under
//! the load of 1,000 sidecars, measured from outside its process.
//!
//! `cargo bench --bench load` (60 s of load), `cargo bench --bench load -- --soak 10m`.
//!
//! One process (this one, tokio) plays every other party, on loopback:
//! - a fake Kubernetes API server answering TokenReviews (as kube-apiserver does: the
//!   service account user, the bound pod in `extra`; tests/it/kubernetes.rs has the same
//!   fake), so each report's bearer token goes through the aggregator's real
//!   `TokenReviewAuthenticator` and its cache;
//! - 1,000 sidecars: 100 task hubs x 10 pods, 16 partitions per hub, each pod on its own
//!   connection sending one report per second with its own token;
//! - a KEDA client calling GetMetrics and IsActive for every hub at KEDA's pace (every 30 s
//!   per hub, KEDA's default polling interval; spread evenly over the 30 s);
//! - then a second KEDA client calling GetMetrics as fast as it can, one call after another.
//!
//! Each KEDA client runs on a thread and tokio runtime of its own, as KEDA is a process of its
//! own; the sidecars share the main runtime.
//!
//! Reported: the aggregator's CPU (share of one core, from `/proc/<pid>/stat`) and RSS
//! (`/proc/<pid>/status`), report submit p50/p99 and KEDA GetMetrics p50/p99 as the clients
//! see them, and the load average of the machine at the time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::proto::report::report_service_client::ReportServiceClient;
use durable_scaler::proto::report::{ControlQueueSignals, PodRef, QueueSignals, Report};
use serde_json::{Value, json};
use tonic::transport::Channel;

const HUBS: usize = 100;
const PODS_PER_HUB: usize = 10;
const PARTITIONS: u32 = 16;
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
const KEDA_INTERVAL: Duration = Duration::from_secs(30);
const NAMESPACE: &str = "bench";
const WARM_UP: Duration = Duration::from_secs(15);
const DEFAULT_LOAD: Duration = Duration::from_secs(60);
const FAST_CLIENT_FOR: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A projected-token look-alike: a JWT whose payload names the pod (for the fake API
/// server) and an expiry an hour away (which the aggregator's cache reads).
fn token(pod: &str) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = now_ms() / 1000 + 3600;
    format!("{}.{}.sig", b64(&json!({"alg": "RS256"})), b64(&json!({"exp": exp, "pod": pod})))
}

/// The fake API server: TokenReviews (authenticated, audience echoed, the pod in `extra`),
/// Events (201), anything else 404 with a Status, as kube-apiserver answers an unknown object.
async fn api(
    method: axum::http::Method,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let not_found = || {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"});
        (StatusCode::NOT_FOUND, axum::Json(status)).into_response()
    };
    match (method.as_str(), uri.path()) {
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let Ok(mut review) = serde_json::from_slice::<Value>(&body) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            let pod = review
                .pointer("/spec/token")
                .and_then(Value::as_str)
                .and_then(|t| t.split('.').nth(1))
                .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|claims| claims.get("pod").and_then(Value::as_str).map(str::to_owned));
            review["status"] = match pod {
                Some(pod) => json!({"authenticated": true, "audiences": ["durable-scaler"], "user": {
                    "username": format!("system:serviceaccount:{NAMESPACE}:default"),
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/pod-name": [pod]}}}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            (StatusCode::CREATED, axum::Json(review)).into_response()
        }
        ("POST", path) if path.ends_with("/events") => {
            (StatusCode::CREATED, axum::body::Bytes::from(body.to_vec())).into_response()
        }
        _ => not_found(),
    }
}

/// The aggregator binary (release, next to this bench) with its Kubernetes configuration
/// pointing at the fake API server; returns it and its KEDA, report and HTTP addresses.
fn start_aggregator(kubeconfig: &std::path::Path, home: &std::path::Path) -> (Child, [SocketAddr; 3]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .args(["aggregator", "--grpc-addr", "127.0.0.1:0", "--report-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0", "--report-auth", "tokenreview"])
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", home)
        .env("POD_NAMESPACE", "durable-scaler")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn,durable_scaler=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the aggregator binary starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("stderr") > 0, "the aggregator exited before listening");
        if line.contains("aggregator listening") {
            break;
        }
    }
    let addr = |key: &str| -> SocketAddr {
        let at = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("{key} in {line}"));
        let rest = &line[at + key.len() + 1..];
        rest.split_whitespace().next().unwrap_or_default().trim_matches('"').parse().expect("an address")
    };
    let addrs = [addr("grpc_addr"), addr("report_addr"), addr("http_addr")];
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    (child, addrs)
}

/// CPU time (user + system) of `pid`, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let total = ticks(11) + ticks(12);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(total * 1000 / hz)
}

/// Resident memory of `pid` in MiB, from /proc/<pid>/status.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Client-side latencies, microseconds.
#[derive(Default)]
struct Latencies(Mutex<Vec<u64>>);

impl Latencies {
    fn record(&self, since: Instant) {
        let us = since.elapsed().as_micros() as u64;
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(us);
    }

    /// p50 and p99 in ms of what was recorded since the last call, and how many.
    fn take(&self) -> (f64, f64, usize) {
        let mut all = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        all.sort_unstable();
        let at =
            |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
        let ms = |v: Option<u64>| v.map_or(f64::NAN, |us| us as f64 / 1000.0);
        (ms(at(0.50)), ms(at(0.99)), all.len())
    }
}

fn hub(h: usize) -> String {
    format!("Load{h:03}")
}

fn pod(h: usize, p: usize) -> String {
    format!("load{h:03}-pod{p}")
}

/// The report of pod `p` of hub `h`: the partitions `i` with `i % PODS_PER_HUB == p`, the
/// work-item queue by the owner of partition 0, a little work everywhere.
fn report(h: usize, p: usize) -> Report {
    let signals = |n: u64| QueueSignals {
        approximate_count: n,
        visible_count: n.min(32) as u32,
        first_visible_age_ms: 50 * n,
        sampled_at_unix_ms: now_ms(),
        redelivered_count: 0,
    };
    Report {
        pod: Some(PodRef { namespace: NAMESPACE.into(), name: pod(h, p) }),
        task_hub: hub(h),
        partition_count: PARTITIONS,
        control_queues: (0..PARTITIONS)
            .filter(|i| *i as usize % PODS_PER_HUB == p)
            .map(|i| ControlQueueSignals { partition: i, signals: Some(signals(u64::from(i % 3))) })
            .collect(),
        work_item: (p == 0).then(|| signals((h % 5) as u64)),
        sampled_at_unix_ms: now_ms(),
        interval_ms: REPORT_INTERVAL.as_millis() as u32,
        sidecar_version: "0.1.0".into(),
        partition_mode: "table".into(),
        ..Default::default()
    }
}

/// One sidecar: its own connection and token, one report per interval until `until`.
async fn sidecar(addr: SocketAddr, h: usize, p: usize, until: Instant, latencies: Arc<Latencies>) {
    let Ok(channel) = Channel::from_shared(format!("http://{addr}")).map(|e| e.connect_lazy()) else {
        return;
    };
    let mut client = ReportServiceClient::new(channel);
    let bearer: tonic::metadata::MetadataValue<_> = match format!("Bearer {}", token(&pod(h, p))).parse() {
        Ok(v) => v,
        Err(_) => return,
    };
    // Spread over the interval, as sidecars started at different times are.
    let offset = REPORT_INTERVAL.mul_f64(((h * PODS_PER_HUB + p) % 1000) as f64 / 1000.0);
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(REPORT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until {
        ticker.tick().await;
        let mut request = tonic::Request::new(report(h, p));
        request.metadata_mut().insert("authorization", bearer.clone());
        let started = Instant::now();
        match client.submit(request).await {
            Ok(_) => latencies.record(started),
            Err(status) => eprintln!("report refused: {status:?}"),
        }
    }
}

fn scaled_object(h: usize) -> ScaledObjectRef {
    ScaledObjectRef {
        name: format!("load{h:03}"),
        namespace: NAMESPACE.into(),
        scaler_metadata: HashMap::from([("taskHubName".into(), hub(h))]),
    }
}

async fn get_metrics(client: &mut ExternalScalerClient<Channel>, h: usize) -> bool {
    let request = GetMetricsRequest {
        scaled_object_ref: Some(scaled_object(h)),
        metric_name: format!("durabletask-{}", hub(h).to_lowercase()),
    };
    client.get_metrics(request).await.is_ok()
}

/// KEDA's pace: every hub's IsActive and GetMetrics once per [`KEDA_INTERVAL`], the hubs
/// spread evenly over it, on one connection (KEDA pools one per scaler address).
async fn keda_paced(mut client: ExternalScalerClient<Channel>, until: Instant, latencies: Arc<Latencies>) {
    let mut ticker = tokio::time::interval(KEDA_INTERVAL / HUBS as u32);
    let mut h = 0;
    while Instant::now() < until {
        ticker.tick().await;
        let _ = client.is_active(scaled_object(h)).await;
        let started = Instant::now();
        if get_metrics(&mut client, h).await {
            latencies.record(started);
        }
        h = (h + 1) % HUBS;
    }
}

/// GetMetrics one call after another, every hub in turn, until `until`.
async fn keda_fast(mut client: ExternalScalerClient<Channel>, until: Instant, latencies: Arc<Latencies>) {
    let mut h = 0;
    while Instant::now() < until {
        let started = Instant::now();
        if get_metrics(&mut client, h).await {
            latencies.record(started);
        }
        h = (h + 1) % HUBS;
    }
}

/// The aggregator's own histogram of GetMetrics durations
/// (`durable_scaler_aggregator_keda_call_duration_seconds`), cumulative count per bucket
/// bound, read from its `/metrics`.
async fn server_get_metrics_buckets(http: SocketAddr) -> Vec<(f64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(http).await else { return Vec::new() };
    // HTTP/1.0: the body comes whole, not chunked, and the connection closes after it.
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n");
    let mut body = String::new();
    if stream.write_all(request.as_bytes()).await.is_err() || stream.read_to_string(&mut body).await.is_err()
    {
        return Vec::new();
    }
    body.lines()
        .filter(|l| {
            l.starts_with("durable_scaler_aggregator_keda_call_duration_seconds_bucket")
                && l.contains("method=\"get_metrics\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// Of the GetMetrics calls between two bucket readings: how many, the share answered within
/// 2 ms, and the smallest bucket bound under which 99 % were answered (the server-side p99 at
/// the histogram's resolution).
fn server_side(before: &[(f64, u64)], after: &[(f64, u64)]) -> (u64, f64, f64) {
    let window: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| (*le, n - before.iter().find(|(b, _)| b == le).map_or(0, |(_, m)| *m)))
        .collect();
    let total = window.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let within =
        |bound: f64| window.iter().filter(|(le, _)| *le <= bound).map(|(_, n)| *n).max().unwrap_or(0);
    let p99 = window
        .iter()
        .filter(|(_, n)| *n as f64 >= 0.99 * total as f64)
        .map(|(le, _)| *le)
        .fold(f64::INFINITY, f64::min);
    (total, within(0.002) as f64 / total.max(1) as f64, p99)
}

/// `--soak 10m` / `--soak 90s`: how long to run the load (default one minute).
fn load_duration() -> Duration {
    let args: Vec<String> = std::env::args().collect();
    let Some(value) = args.iter().position(|a| a == "--soak").and_then(|i| args.get(i + 1)) else {
        return DEFAULT_LOAD;
    };
    let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len()));
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("--soak {value}: expected e.g. 10m or 90s"));
    match unit {
        "m" => Duration::from_secs(n * 60),
        "s" | "" => Duration::from_secs(n),
        _ => panic!("--soak {value}: expected e.g. 10m or 90s"),
    }
}

struct Window {
    at: Instant,
    cpu: Duration,
}

impl Window {
    fn start(pid: u32) -> Self {
        Self { at: Instant::now(), cpu: cpu_time(pid) }
    }

    /// CPU share of one core since the start.
    fn cpu_share(&self, pid: u32) -> f64 {
        (cpu_time(pid) - self.cpu).as_secs_f64() / self.at.elapsed().as_secs_f64()
    }
}

/// Runs a KEDA client on a thread and runtime of its own: KEDA is a process of its own, and
/// on the load generator's runtime the 1,000 sidecar tasks' scheduling would be counted as
/// the aggregator's latency (the first measurement's KEDA-paced p99 was partly that). The
/// thread ends with `client`'s loop; the process does not wait for it.
fn keda_process<F, Fut>(grpc: SocketAddr, client: F)
where
    F: FnOnce(ExternalScalerClient<Channel>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let channel =
                Channel::from_shared(format!("http://{grpc}")).expect("KEDA channel").connect_lazy();
            client(ExternalScalerClient::new(channel)).await;
        });
    });
}

#[tokio::main]
async fn main() {
    let load_for = load_duration();
    let home = tempfile::tempdir().expect("a temporary directory");
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback");
    let api_addr = api_listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(api_listener, axum::Router::new().fallback(api)).await });
    let kubeconfig = home.path().join("kubeconfig");
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": format!("http://{api_addr}")}}],
        "users": [{"name": "bench", "user": {}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench", "namespace": NAMESPACE}}],
    });
    std::fs::write(&kubeconfig, config.to_string()).expect("kubeconfig written");
    let (mut child, [grpc, report_addr, http]) = start_aggregator(&kubeconfig, home.path());
    let pid = child.id();
    println!("aggregator pid {pid}; idle RSS {:.1} MiB", rss_mib(pid));

    let reports = Arc::new(Latencies::default());
    let keda_paced_latencies = Arc::new(Latencies::default());
    let keda_fast_latencies = Arc::new(Latencies::default());
    let until = Instant::now() + WARM_UP + load_for + FAST_CLIENT_FOR;
    let mut tasks = Vec::new();
    for h in 0..HUBS {
        for p in 0..PODS_PER_HUB {
            tasks.push(tokio::spawn(sidecar(report_addr, h, p, until, reports.clone())));
        }
    }
    let latencies = keda_paced_latencies.clone();
    keda_process(grpc, move |client| keda_paced(client, until, latencies));

    tokio::time::sleep(WARM_UP).await;
    reports.take();
    keda_paced_latencies.take();
    let server_before = server_get_metrics_buckets(http).await;
    let window = Window::start(pid);
    let mut rss_at_one_minute = None;
    let load_started = Instant::now();
    while load_started.elapsed() < load_for {
        tokio::time::sleep(Duration::from_secs(5).min(load_for - load_started.elapsed())).await;
        // The soak compares RSS after one minute with the end: only a longer run has both.
        if load_for > Duration::from_secs(60)
            && rss_at_one_minute.is_none()
            && load_started.elapsed() >= Duration::from_secs(60)
        {
            rss_at_one_minute = Some(rss_mib(pid));
        }
    }
    let cpu = window.cpu_share(pid);
    let rss_end = rss_mib(pid);
    let load = load_average();
    let (r50, r99, rn) = reports.take();
    let (k50, k99, kn) = keda_paced_latencies.take();
    println!(
        "{HUBS} hubs x {PODS_PER_HUB} pods, 1 report/s each, TokenReview fake + cache; KEDA every 30 s per hub"
    );
    println!("  load average at the end (1/5/15 min): {load}");
    println!(
        "  over {:.0} s: aggregator CPU {:.1} % of one core, RSS {rss_end:.1} MiB",
        load_for.as_secs_f64(),
        cpu * 100.0
    );
    println!("  report submit: p50 {r50:.2} ms, p99 {r99:.2} ms ({rn} reports)");
    println!("  KEDA GetMetrics at KEDA's pace: p50 {k50:.2} ms, p99 {k99:.2} ms ({kn} calls)");
    let (sn, s2, s99) = server_side(&server_before, &server_get_metrics_buckets(http).await);
    println!(
        "    inside the aggregator (its histogram): {:.2} % of {sn} answered within 2 ms, p99 <= {:.2} ms",
        s2 * 100.0,
        s99 * 1000.0
    );
    if let Some(at_one) = rss_at_one_minute {
        println!(
            "  soak: RSS after 1 min {at_one:.1} MiB, after {:.0} min {rss_end:.1} MiB",
            load_for.as_secs_f64() / 60.0
        );
    }

    let window = Window::start(pid);
    let server_before = server_get_metrics_buckets(http).await;
    let latencies = keda_fast_latencies.clone();
    keda_process(grpc, move |client| keda_fast(client, until, latencies));
    tokio::time::sleep(FAST_CLIENT_FOR).await;
    let cpu = window.cpu_share(pid);
    let (f50, f99, fnum) = keda_fast_latencies.take();
    let (r50, r99, _) = reports.take();
    println!("  plus a KEDA client as fast as it can ({:.0} s):", FAST_CLIENT_FOR.as_secs_f64());
    println!(
        "    GetMetrics p50 {f50:.3} ms, p99 {f99:.3} ms ({:.0} calls/s); report submit p50 {r50:.2} ms, p99 {r99:.2} ms",
        fnum as f64 / FAST_CLIENT_FOR.as_secs_f64()
    );
    println!("    aggregator CPU {:.1} % of one core; load average {}", cpu * 100.0, load_average());
    let (sn, s2, s99) = server_side(&server_before, &server_get_metrics_buckets(http).await);
    println!(
        "    inside the aggregator: {:.2} % of {sn} answered within 2 ms, p99 <= {:.2} ms",
        s2 * 100.0,
        s99 * 1000.0
    );

    for task in tasks {
        task.abort();
    }
    let _ = child.kill();
    let _ = child.wait();
}
