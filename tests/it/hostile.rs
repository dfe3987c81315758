//! Hostile and broken peers against the real binaries (issue 23): each test runs a role of
//! `durable-scaler` on loopback, sends one attack bounded in count and time (a raw HTTP/2
//! client that starves flow control, silent connections, stalled bodies, unread answers, a
//! storage endpoint that answers too much or the wrong thing), and checks the process's
//! resident memory against its manifest's limit (aggregator 256 MiB, webhook 128 MiB,
//! sidecar 64 MiB, with room to spare), its answers to a normal call during and after, and
//! that nothing a peer sent comes back in a status, a log line or `/hubs`.
//!
//! Each test prints its figures (peak resident memory, how long a connection was held).
//! `DURABLE_SCALER_BIN_UNDER_TEST` runs them against another build of the binary, to measure
//! the same figures before a change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use durable_scaler::azurite::ACCOUNT_KEY;
use durable_scaler::proto::externalscaler::ScaledObjectRef;
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::aggregator_support::{http_get, whole_hub_report};
use crate::https::{self, Http, Pki};

/// Resident memory the aggregator must stay under (its manifest's limit is 256 MiB; it idles
/// at about 15 MiB).
const AGGREGATOR_RSS_MIB: f64 = 120.0;
/// The webhook's bound (limit 128 MiB).
const WEBHOOK_RSS_MIB: f64 = 96.0;
/// The sidecar's bound (limit 64 MiB).
const SIDECAR_RSS_MIB: f64 = 48.0;
/// How long anything that must happen may take before a test gives up (a loaded machine).
const DEADLINE: Duration = Duration::from_secs(60);
/// Marks what a hostile peer sends, to look for it where it must not come back.
const MARKER: &str = "HOSTILE-PEER-MARKER-7f3c";

/// The binary under test.
fn binary() -> PathBuf {
    std::env::var_os("DURABLE_SCALER_BIN_UNDER_TEST")
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_durable-scaler")), PathBuf::from)
}

/// `--allow-http-storage` when the binary under test has it (the hostile storage endpoints
/// here are plain http on loopback); an earlier build without it took http anyway.
fn allow_http_storage() -> Vec<String> {
    let help = Command::new(binary()).args(["aggregator", "--help"]).output().expect("--help");
    if String::from_utf8_lossy(&help.stdout).contains("--allow-http-storage") {
        vec!["--allow-http-storage".into()]
    } else {
        Vec::new()
    }
}

/// One role of the binary, its output in a log file, killed when dropped.
struct Role {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Role {
    /// Starts `args` with `envs`, under a descriptor limit of `nofile` when given, and waits
    /// for a log line containing `ready`.
    fn start(args: &[String], envs: &[(&str, String)], nofile: Option<u64>, ready: &str) -> Self {
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
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut role = Self { child: command.spawn().unwrap(), log, _dir: dir };
        let started = Instant::now();
        while !role.output().contains(ready) {
            assert!(role.alive(), "exited before {ready:?}:\n{}", role.output());
            assert!(started.elapsed() < DEADLINE, "no {ready:?} in:\n{}", role.output());
            std::thread::sleep(Duration::from_millis(20));
        }
        role
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address logged as `key=...` on the ready line.
    fn addr(&self, key: &str) -> SocketAddr {
        let output = self.output();
        let at = output.find(&format!(" {key}=")).unwrap_or_else(|| panic!("{key} in {output}"));
        let rest = &output[at + key.len() + 2..];
        rest.split_whitespace().next().unwrap().trim_matches('"').parse().unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_mib(&self) -> f64 {
        rss_mib(self.pid())
    }

    /// Open descriptors of the process.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Samples resident memory until the returned sampler is stopped.
    fn sample_rss(&self) -> RssSampler {
        RssSampler::start(self.pid())
    }

    /// Fails if the log holds `MARKER`, or a line longer than `max` bytes.
    fn assert_log_clean(&self, max: usize) {
        let output = self.output();
        assert!(!output.contains(MARKER), "what a peer sent reached the log");
        let longest = output.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < max, "a {longest}-byte log line");
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The highest resident memory seen by a thread looking every 20 ms.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0f64;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(rss_mib(pid))
        });
        Self { stop, thread }
    }

    fn peak(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The aggregator on loopback ports chosen by the OS, without Kubernetes.
fn aggregator(extra: &[String], nofile: Option<u64>) -> Role {
    let mut args = strings(&[
        "aggregator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--report-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--report-auth",
        "none",
        "--probe-interval",
        "300ms",
    ]);
    args.extend_from_slice(extra);
    Role::start(&args, &[], nofile, "aggregator listening")
}

/// The webhook on a loopback port with `pki`'s certificate (files in `dir`).
fn webhook(pki: &Pki, dir: &std::path::Path, nofile: Option<u64>) -> Role {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let args = vec![
        "webhook".to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    Role::start(&args, &[], nofile, "webhook serving")
}

/// A sidecar for `hub` reading storage through `connection`, reporting to `report`.
fn sidecar(hub: &str, connection: &str, report: SocketAddr, pod: &str) -> Role {
    let args = strings(&["sidecar", "--interval", "300ms", "--http-addr", "127.0.0.1:0"]);
    let envs = [
        ("DURABLE_SCALER_TASK_HUB", hub.to_string()),
        ("DURABLE_SCALER_CONNECTION", connection.to_string()),
        ("DURABLE_SCALER_AGGREGATOR", format!("http://{report}")),
        ("DURABLE_SCALER_TOKEN_FILE", "/nonexistent/token".to_string()),
        ("POD_NAME", pod.to_string()),
        ("POD_NAMESPACE", "apps".to_string()),
    ];
    Role::start(&args, &envs, None, "sidecar started")
}

fn scaled_object(hub: &str, extra: &[(&str, &str)]) -> ScaledObjectRef {
    let mut metadata = HashMap::from([("taskHubName".to_string(), hub.to_string())]);
    for (k, v) in extra {
        metadata.insert(k.to_string(), v.to_string());
    }
    ScaledObjectRef {
        name: format!("{}-so", hub.to_lowercase()),
        namespace: "apps".into(),
        scaler_metadata: metadata,
    }
}

async fn keda(addr: SocketAddr) -> ExternalScalerClient<tonic::transport::Channel> {
    ExternalScalerClient::connect(format!("http://{addr}")).await.expect("KEDA port")
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/2 client: frames written by hand, so that it can do what no well-behaved
// client does (never grant flow-control window, reset every stream).

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a raw HTTP/2 client connects: plain, or TLS with ALPN `h2` trusting `ca_pem`.
#[derive(Clone)]
struct H2Target {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl H2Target {
    fn plain(addr: SocketAddr) -> Self {
        Self { addr, tls: None }
    }

    fn tls(addr: SocketAddr, ca_pem: &str) -> Self {
        let config = https::client_config(ca_pem, rustls::DEFAULT_VERSIONS, Http::Two);
        Self { addr, tls: Some(Arc::new(config)) }
    }

    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await?;
                Ok(Box::new(tls))
            }
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// What each stream of a flood asks.
#[derive(Clone)]
enum Ask {
    Get(&'static str),
    Grpc(&'static str, Vec<u8>),
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, plain strings (RFC 7541 section 6.2.2).
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The frames that open a stream asking `ask`, with the stream id left to [`with_id`] (the
/// header block is built once per flood, not once per stream).
fn request_template(target: &H2Target, ask: &Ask) -> Vec<Vec<u8>> {
    let authority = target.addr.to_string();
    match ask {
        Ask::Get(path) => {
            let block = hpack(&[
                (":method", "GET"),
                (":scheme", target.scheme()),
                (":path", path),
                (":authority", &authority),
            ]);
            vec![frame(HEADERS, END_HEADERS | END_STREAM, 0, &block)]
        }
        Ask::Grpc(path, message) => {
            let block = hpack(&[
                (":method", "POST"),
                (":scheme", target.scheme()),
                (":path", path),
                (":authority", &authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]);
            let mut body = vec![0];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(message);
            vec![frame(HEADERS, END_HEADERS, 0, &block), frame(DATA, END_STREAM, 0, &body)]
        }
    }
}

/// `template`'s frames on stream `id`, appended to `out`.
fn with_id(out: &mut Vec<u8>, template: &[Vec<u8>], id: u32) {
    for frame in template {
        let at = out.len();
        out.extend_from_slice(frame);
        out[at + 5..at + 9].copy_from_slice(&id.to_be_bytes());
    }
}

/// The frames that open stream `id` with `ask`.
fn request(target: &H2Target, ask: &Ask, id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    with_id(&mut out, &request_template(target, ask), id);
    out
}

/// One raw HTTP/2 connection: the writer, and whether the server asked it to go or closed it.
struct RawH2 {
    writer: Arc<Mutex<tokio::io::WriteHalf<Box<dyn Io>>>>,
    gone: Arc<AtomicBool>,
    /// HEADERS frames the server sent (answer heads and trailers).
    headers: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
}

impl RawH2 {
    /// Connects and sends the preface and empty SETTINGS; with `answer`, a reader task
    /// acknowledges SETTINGS and PINGs and reads (and drops) everything else, without ever
    /// granting flow-control window; without, nothing is read at all.
    async fn open(target: &H2Target, answer: bool) -> std::io::Result<Self> {
        let io = target.connect().await?;
        let (mut read, write) = tokio::io::split(io);
        let writer = Arc::new(Mutex::new(write));
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        writer.lock().await.write_all(&hello).await?;
        let gone = Arc::new(AtomicBool::new(false));
        let headers = Arc::new(AtomicU64::new(0));
        let (w, g, h) = (writer.clone(), gone.clone(), headers.clone());
        let reader = tokio::spawn(async move {
            if !answer {
                return std::future::pending().await;
            }
            let mut header = [0u8; 9];
            loop {
                if read.read_exact(&mut header).await.is_err() {
                    break;
                }
                let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                let mut payload = vec![0u8; len];
                if read.read_exact(&mut payload).await.is_err() {
                    break;
                }
                if header[3] == HEADERS {
                    h.fetch_add(1, Ordering::Relaxed);
                }
                let reply = match (header[3], header[4] & ACK) {
                    (SETTINGS, 0) => Some(frame(SETTINGS, ACK, 0, &[])),
                    (PING, 0) => Some(frame(PING, ACK, 0, &payload)),
                    (GOAWAY, _) => break,
                    _ => None,
                };
                if let Some(reply) = reply
                    && w.lock().await.write_all(&reply).await.is_err()
                {
                    break;
                }
            }
            g.store(true, Ordering::Relaxed);
        });
        Ok(Self { writer, gone, headers, reader })
    }

    async fn send(&self, bytes: &[u8]) -> bool {
        let write = async { self.writer.lock().await.write_all(bytes).await };
        matches!(tokio::time::timeout(Duration::from_secs(2), write).await, Ok(Ok(())))
    }

    fn gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// Waits until the server has sent `count` HEADERS frames in all (true), or `limit`
    /// passed or the server asked the connection to go (false).
    async fn headers_seen(&self, count: u64, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while self.headers.load(Ordering::Relaxed) < count {
            if Instant::now() >= until || self.gone() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Streams and connections a flood used.
#[derive(Default)]
struct FloodCount {
    streams: AtomicU64,
    connections: AtomicU64,
    /// The most streams the server answered on one connection, each then reset, before it
    /// asked the connection to go.
    most_on_one_connection: AtomicU64,
}

/// One flood: where, what each stream asks (`prime` for the first [`PRIME_STREAMS`] of each
/// connection: an answer large enough to use up the connection's window quickly, after which
/// every answer waits for window), and how many streams at a time.
#[derive(Clone)]
struct Flood {
    target: H2Target,
    prime: Option<Ask>,
    ask: Ask,
    batch: u32,
}

/// Streams of each flood connection that ask `Flood::prime`.
const PRIME_STREAMS: u32 = 64;

/// Until `until`: on a connection that never grants window, opens streams in batches,
/// resets each once the server has answered it (its answer head came; its body waits for
/// window that never comes), and opens a new connection whenever the server asks the old
/// one to go or closes it.
async fn flood(spec: Flood, until: Instant, count: Arc<FloodCount>) {
    let Flood { target, prime, ask, batch } = spec;
    let template = request_template(&target, &ask);
    let prime = prime.map(|prime| request_template(&target, &prime));
    while Instant::now() < until {
        let Ok(connection) = RawH2::open(&target, true).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        count.connections.fetch_add(1, Ordering::Relaxed);
        let mut next = 1u32;
        let mut sent = 0u64;
        while !connection.gone() && Instant::now() < until && next < u32::MAX / 4 {
            let ids: Vec<u32> = (0..batch).map(|i| next + 2 * i).collect();
            next += 2 * batch;
            let mut opens = Vec::new();
            for id in &ids {
                let primed = prime.as_ref().filter(|_| *id < 2 * PRIME_STREAMS);
                with_id(&mut opens, primed.unwrap_or(&template), *id);
            }
            let answered = connection.headers.load(Ordering::Relaxed) + u64::from(batch);
            if !connection.send(&opens).await {
                break;
            }
            let accepted = connection.headers_seen(answered, Duration::from_millis(200)).await;
            let resets: Vec<u8> =
                ids.iter().flat_map(|id| frame(RST_STREAM, 0, *id, &8u32.to_be_bytes())).collect();
            if !connection.send(&resets).await {
                break;
            }
            count.streams.fetch_add(u64::from(batch), Ordering::Relaxed);
            // What the server answered is what it accepted: a batch it let go unanswered
            // (too busy, or already asking the connection to go) is not counted against it.
            if accepted {
                sent += u64::from(batch);
            }
        }
        count.most_on_one_connection.fetch_max(sent, Ordering::Relaxed);
    }
}

/// A valid report message (a whole hub, for a hub of its own).
fn report_message() -> Vec<u8> {
    whole_hub_report("flood-pod", "FloodHub", 1).encode_to_vec()
}

/// Runs `check` every 300 ms until `stop`; returns its failures.
fn keep_checking<F, Fut>(stop: Arc<AtomicBool>, check: F) -> tokio::task::JoinHandle<Vec<String>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut calls = 0;
        while !stop.load(Ordering::Relaxed) {
            calls += 1;
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), check())
                .await
                .unwrap_or(Err("no answer in 10 s".into()))
            {
                failures.push(e);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(calls > 0);
        failures
    })
}

async fn healthz(addr: SocketAddr) -> Result<(), String> {
    let (status, _) = http_get(addr, "/healthz").await;
    if status == 200 { Ok(()) } else { Err(format!("/healthz answered {status}")) }
}

async fn webhook_healthz(addr: SocketAddr, ca_pem: String) -> Result<(), String> {
    let mut connection = https::connect(addr, &ca_pem, Http::One).await?;
    match connection.get("/healthz").await? {
        (status, _) if status == 200 => Ok(()),
        (status, _) => Err(format!("/healthz answered {status}")),
    }
}

/// How long each flood runs.
const FLOOD: Duration = Duration::from_secs(5);
/// Connections each flood keeps busy at once (the issue measured four).
const FLOOD_CONNECTIONS: usize = 4;

/// Floods each of `targets` from [`FLOOD_CONNECTIONS`] connections for [`FLOOD`] while
/// `check` runs; returns the peak resident memory of `role`, the streams sent, and the
/// check's failures.
async fn flood_all<F, Fut>(role: &Role, floods: Vec<Flood>, check: F) -> Flooded
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let sampler = role.sample_rss();
    let stop = Arc::new(AtomicBool::new(false));
    let checker = keep_checking(stop.clone(), check);
    let until = Instant::now() + FLOOD;
    let count = Arc::new(FloodCount::default());
    let floods: Vec<_> = floods
        .into_iter()
        .flat_map(|spec| {
            let count = count.clone();
            (0..FLOOD_CONNECTIONS).map(move |_| tokio::spawn(flood(spec.clone(), until, count.clone())))
        })
        .collect();
    for flood in floods {
        flood.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let failures = checker.await.unwrap();
    let peak = sampler.peak();
    Flooded {
        peak,
        streams: count.streams.load(Ordering::Relaxed),
        connections: count.connections.load(Ordering::Relaxed),
        most_on_one_connection: count.most_on_one_connection.load(Ordering::Relaxed),
        failures,
    }
}

/// What [`flood_all`] saw.
struct Flooded {
    /// Peak resident memory, MiB.
    peak: f64,
    streams: u64,
    connections: u64,
    most_on_one_connection: u64,
    /// Normal calls that failed meanwhile.
    failures: Vec<String>,
}

impl Flooded {
    /// Checks what every flood must leave: normal calls answered, memory under `bound`, and
    /// no connection answering more reset streams than the server's budget (plus the few
    /// batches already in its read buffer when the budget ran out).
    fn assert_bounded(&self, bound: f64, batch: u64) {
        assert!(self.failures.is_empty(), "normal calls failed during the flood: {:?}", self.failures);
        assert!(self.peak < bound, "peak RSS {:.1} MiB", self.peak);
        assert!(
            self.most_on_one_connection <= 512 + 4 * batch,
            "one connection reset {} streams and kept going",
            self.most_on_one_connection
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_on_a_starved_connection_are_bounded_on_every_aggregator_port() {
    let mut aggregator = aggregator(&[], None);
    let (grpc, report, http) =
        (aggregator.addr("grpc_addr"), aggregator.addr("report_addr"), aggregator.addr("http_addr"));
    let idle = aggregator.rss_mib();
    let metric_spec = scaled_object("FloodHub", &[]).encode_to_vec();
    let floods = vec![
        Flood {
            target: H2Target::plain(http),
            prime: Some(Ask::Get("/metrics")),
            ask: Ask::Get("/healthz"),
            batch: 32,
        },
        // About 80 bytes an answer: the window is used up after some 800 streams.
        Flood {
            target: H2Target::plain(grpc),
            prime: None,
            ask: Ask::Grpc("/externalscaler.ExternalScaler/GetMetricSpec", metric_spec),
            batch: 32,
        },
        Flood {
            target: H2Target::plain(report),
            prime: None,
            ask: Ask::Grpc("/durablescaler.report.v1.ReportService/Submit", report_message()),
            batch: 8,
        },
    ];
    let flooded = flood_all(&aggregator, floods, move || async move {
        healthz(http).await?;
        let mut keda = keda(grpc).await;
        keda.get_metric_spec(scaled_object("NormalHub", &[])).await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    let after = aggregator.rss_mib();
    eprintln!(
        "figure: aggregator, {} streams reset on starved connections over {} connections \
         in {FLOOD:?} (3 ports x {FLOOD_CONNECTIONS} at once): RSS {idle:.1} MiB idle, {:.1} peak, {after:.1} after; at most {} streams on one connection",
        flooded.streams, flooded.connections, flooded.peak, flooded.most_on_one_connection
    );
    assert!(aggregator.alive(), "{}", aggregator.output());
    flooded.assert_bounded(AGGREGATOR_RSS_MIB, 32);
    healthz(http).await.unwrap();
    keda(grpc).await.get_metric_spec(scaled_object("NormalHub", &[])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_on_a_starved_connection_are_bounded_on_the_webhook_and_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ecdsa("flood");
    let mut webhook = webhook(&pki, dir.path(), None);
    let addr = webhook.addr("addr");
    let idle = webhook.rss_mib();
    let ca = pki.ca_pem.clone();
    let flood = Flood {
        target: H2Target::tls(addr, &pki.ca_pem),
        prime: Some(Ask::Get("/metrics")),
        ask: Ask::Get("/healthz"),
        batch: 32,
    };
    let flooded = flood_all(&webhook, vec![flood], move || webhook_healthz(addr, ca.clone())).await;
    let after = webhook.rss_mib();
    eprintln!(
        "figure: webhook, {} streams reset on starved connections over {} connections in \
         {FLOOD:?}: RSS {idle:.1} MiB idle, {:.1} peak, {after:.1} after; at most {} streams on one connection",
        flooded.streams, flooded.connections, flooded.peak, flooded.most_on_one_connection
    );
    assert!(webhook.alive(), "{}", webhook.output());
    flooded.assert_bounded(WEBHOOK_RSS_MIB, 32);
    webhook_healthz(addr, pki.ca_pem.clone()).await.unwrap();

    let storage = HostileStorage::start(Storage::Quiet, "FloodSideHub", None).await;
    let mut sidecar =
        sidecar("FloodSideHub", &storage.connection(), "127.0.0.1:9".parse().unwrap(), "flood-pod");
    let http = sidecar.addr("http");
    let idle = sidecar.rss_mib();
    let flooded = flood_all(
        &sidecar,
        vec![Flood {
            target: H2Target::plain(http),
            prime: Some(Ask::Get("/metrics")),
            ask: Ask::Get("/healthz"),
            batch: 8,
        }],
        move || healthz(http),
    )
    .await;
    let after = sidecar.rss_mib();
    eprintln!(
        "figure: sidecar, {} streams reset on starved connections over {} connections in \
         {FLOOD:?}: RSS {idle:.1} MiB idle, {:.1} peak, {after:.1} after; at most {} streams on one connection",
        flooded.streams, flooded.connections, flooded.peak, flooded.most_on_one_connection
    );
    assert!(sidecar.alive(), "{}", sidecar.output());
    flooded.assert_bounded(SIDECAR_RSS_MIB, 8);
    healthz(http).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_its_answers_keeps_its_connection_through_many_calls() {
    let aggregator = aggregator(&[], None);
    let target = H2Target::plain(aggregator.addr("http_addr"));
    let connection = RawH2::open(&target, true).await.unwrap();
    // Twice the reset budget, each stream answered and never reset, 32 at a time (half the
    // stream limit): the connection stays.
    for batch in 0..32u32 {
        let streams: Vec<u8> =
            (0..32).flat_map(|i| request(&target, &Ask::Get("/healthz"), 64 * batch + 2 * i + 1)).collect();
        assert!(connection.send(&streams).await, "batch {batch}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!connection.gone(), "the connection was asked to go");
}

// ---------------------------------------------------------------------------------------
// A hostile storage endpoint: a small HTTP/1.1 server answering as the test says.

/// How the endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// A task hub with one partition, empty.
    Quiet,
    /// A peek answer of 100 MB (declared).
    HugePeek,
    /// A peek answer without end (chunked).
    EndlessPeek,
    /// 55 MB of valid Partitions rows.
    HugeTable,
    /// The hub's table, then an HTML page with status 200 for every queue call (a proxy's
    /// or a portal's page).
    HtmlQueues,
    /// Status 500 to every call, with a 10 KB error code and a body naming it.
    ErrorEcho,
}

struct HostileStorage {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileStorage {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileStorage {
    /// Serves `hub` as `mode` says; `owner` holds partition 0 when given.
    async fn start(mode: Storage, hub: &str, owner: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let (hub, owner, counter) =
            (hub.to_lowercase(), owner.unwrap_or_default().to_string(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (hub, owner, counter) = (hub.clone(), owner.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = answer(stream, mode, &hub, &owner, &counter).await;
                });
            }
        });
        Self { addr, requests, task }
    }

    /// A connection string naming this endpoint for every service (Azurite's account).
    fn connection(&self) -> String {
        let base = format!("http://{}", self.addr);
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};\
             BlobEndpoint={base}/blob;QueueEndpoint={base}/queue;TableEndpoint={base}/table"
        )
    }
}

fn partition_row(hub: &str, owner: &str) -> String {
    let expires =
        if owner.is_empty() { "2020-01-01T00:00:00.0000000Z" } else { "2099-01-01T00:00:00.0000000Z" };
    format!(
        r#"{{"PartitionKey":"","RowKey":"{hub}-control-00","CurrentOwner":"{owner}","ExpiresAt":"{expires}","IsDraining":false}}"#
    )
}

/// Reads one request head and answers it, then closes.
async fn answer(
    mut stream: TcpStream,
    mode: Storage,
    hub: &str,
    owner: &str,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut byte).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&byte[..n]);
    }
    requests.fetch_add(1, Ordering::Relaxed);
    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
    let target = line.split_whitespace().nth(1).unwrap_or_default().to_string();
    let html =
        format!("<html><body><h1>Sign in</h1><p>{MARKER}</p>{}</body></html>", "<p>filler</p>".repeat(200));
    let table = target.contains("Partitions()");
    let metadata = target.contains("comp=metadata");
    let peek = target.contains("peekonly=true");
    let ok = |content_type: &str, length: usize| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\nx-ms-request-id: 1\r\n\
             x-ms-version: 2026-04-06\r\nconnection: close\r\n"
        )
    };
    match mode {
        Storage::ErrorEcho => {
            // Within every cap, so that the status and its code are what is read; the
            // marker lies past what a short quote of either shows.
            let filler = "E".repeat(100);
            let body = format!(r#"{{"error":{{"code":"{filler}{MARKER}","message":"{filler}{MARKER}"}}}}"#);
            let code = format!("{filler}{MARKER}{}", "E".repeat(10_000));
            let headers = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\nx-ms-error-code: {code}\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(headers.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
        }
        Storage::HtmlQueues if !table => {
            stream.write_all(format!("{}\r\n{html}", ok("text/html", html.len())).as_bytes()).await?;
        }
        _ if table && mode == Storage::HugeTable => {
            let row = partition_row(hub, owner);
            let rows = 55_000_000 / (row.len() + 1);
            let length = r#"{"value":["#.len() + rows * (row.len() + 1) - 1 + 2;
            stream
                .write_all(format!("{}\r\n{{\"value\":[", ok("application/json", length)).as_bytes())
                .await?;
            let mut chunk = String::new();
            for i in 0..rows {
                if i > 0 {
                    chunk.push(',');
                }
                chunk.push_str(&row);
                if chunk.len() > 64 * 1024 {
                    stream.write_all(chunk.as_bytes()).await?;
                    chunk.clear();
                }
            }
            chunk.push_str("]}");
            stream.write_all(chunk.as_bytes()).await?;
        }
        _ if table => {
            let body = format!(r#"{{"value":[{}]}}"#, partition_row(hub, owner));
            stream.write_all(format!("{}\r\n{body}", ok("application/json", body.len())).as_bytes()).await?;
        }
        _ if metadata => {
            let head = ok("application/xml", 0).replace("content-type: application/xml\r\n", "");
            stream.write_all(format!("{head}x-ms-approximate-messages-count: 0\r\n\r\n").as_bytes()).await?;
        }
        _ if peek && mode == Storage::HugePeek => {
            let length = 100_000_000usize;
            let start =
                "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessagesList><QueueMessage><MessageText>";
            stream.write_all(format!("{}\r\n{start}", ok("application/xml", length)).as_bytes()).await?;
            let chunk = vec![b'A'; 64 * 1024];
            let mut sent = start.len();
            while sent < length {
                let n = chunk.len().min(length - sent);
                stream.write_all(&chunk[..n]).await?;
                sent += n;
            }
        }
        _ if peek && mode == Storage::EndlessPeek => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await?;
            let chunk = format!("10000\r\n{}\r\n", "A".repeat(0x10000));
            // Without end for the reader; 4 GB at most for this writer.
            for _ in 0..65_536 {
                stream.write_all(chunk.as_bytes()).await?;
            }
        }
        _ if peek => {
            let body = "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessagesList></QueueMessagesList>";
            stream.write_all(format!("{}\r\n{body}", ok("application/xml", body.len())).as_bytes()).await?;
        }
        _ => {
            let head = "HTTP/1.1 404 Not Found\r\nx-ms-error-code: ResourceNotFound\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await?;
        }
    }
    stream.flush().await
}

/// The value of the series `name` with label text `labels` in a `/metrics` text.
fn series(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_answers_too_large_or_of_the_wrong_kind_are_capped_classified_and_never_echoed() {
    let mut aggregator = aggregator(&allow_http_storage(), None);
    let (grpc, http) = (aggregator.addr("grpc_addr"), aggregator.addr("http_addr"));
    let idle = aggregator.rss_mib();
    let mut keda = keda(grpc).await;
    for (i, mode) in
        [Storage::HugePeek, Storage::EndlessPeek, Storage::HugeTable, Storage::HtmlQueues, Storage::ErrorEcho]
            .into_iter()
            .enumerate()
    {
        let hub = format!("HostileHub{i}");
        let storage = HostileStorage::start(mode, &hub, None).await;
        let so = scaled_object(&hub, &[("connectionFromEnv", &storage.connection())]);
        let sampler = aggregator.sample_rss();
        let started = Instant::now();
        let mut statuses = Vec::new();
        // Several probe rounds (300 ms apart), each reading what the endpoint sends.
        while started.elapsed() < Duration::from_secs(3) {
            statuses.push(keda.is_active(so.clone()).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let peak = sampler.peak();
        let (_, hubs) = http_get(http, "/hubs").await;
        let metrics = http_get(http, "/metrics").await.1;
        let entry: serde_json::Value = serde_json::from_str::<serde_json::Value>(&hubs)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["task_hub"] == hub.as_str())
            .cloned()
            .unwrap();
        let longest =
            statuses.iter().filter_map(|s| s.as_ref().err()).map(|s| s.message().len()).max().unwrap_or(0);
        eprintln!(
            "figure: aggregator probe against {mode:?}: RSS {idle:.1} MiB idle, {peak:.1} peak; {} storage requests; \
             longest status {longest} bytes; /hubs {} bytes; probe error: {}",
            storage.requests.load(Ordering::Relaxed),
            hubs.len(),
            entry["probe_error"]
        );
        assert!(aggregator.alive(), "{}", aggregator.output());
        assert!(peak < AGGREGATOR_RSS_MIB, "{mode:?}: peak RSS {peak:.1} MiB");
        for status in &statuses {
            let status = status.as_ref().expect_err("no answer from what is no hub");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{mode:?}: {status:?}");
            assert!(!status.message().contains(MARKER), "{mode:?}: the endpoint's answer came back to KEDA");
        }
        assert!(longest < 1024, "{mode:?}: a {longest}-byte status");
        assert!(!hubs.contains(MARKER) && hubs.len() < 64 * 1024, "{mode:?}: /hubs is {} bytes", hubs.len());
        // None of these is storage answering as storage: each is an unexpected answer.
        let labels = [format!("task_hub=\"{}\"", hub.to_lowercase()), "outcome=\"unexpected\"".to_string()];
        let counted = series(&metrics, "durable_scaler_aggregator_probes_total", &[&labels[0], &labels[1]]);
        assert!(counted > 0.0, "{mode:?}: no probe counted unexpected:\n{metrics}");
    }
    aggregator.assert_log_clean(4096);
    healthz(http).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_against_a_broken_storage_endpoint_stays_bounded_and_names_the_kind() {
    let aggregator = aggregator(&[], None);
    let report = aggregator.addr("report_addr");
    for mode in [Storage::HugePeek, Storage::EndlessPeek, Storage::HugeTable, Storage::HtmlQueues] {
        let hub = format!("SideHostile{}", mode as u8);
        let storage = HostileStorage::start(mode, &hub, Some("pod-a")).await;
        let mut sidecar = sidecar(&hub, &storage.connection(), report, "pod-a");
        let http = sidecar.addr("http");
        let idle = sidecar.rss_mib();
        let sampler = sidecar.sample_rss();
        let started = Instant::now();
        let metrics = loop {
            let (_, metrics) = http_get(http, "/metrics").await;
            let errors =
                series(&metrics, "durable_scaler_sidecar_storage_errors_total", &["kind=\"unexpected\""]);
            if errors >= 3.0 {
                break metrics;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{mode:?}: no storage errors counted:\n{metrics}\n{}",
                sidecar.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let peak = sampler.peak();
        eprintln!(
            "figure: sidecar against {mode:?}: RSS {idle:.1} MiB idle, {peak:.1} peak over {:?}; {} storage requests",
            started.elapsed(),
            storage.requests.load(Ordering::Relaxed)
        );
        assert!(sidecar.alive(), "{}", sidecar.output());
        assert!(peak < SIDECAR_RSS_MIB, "{mode:?}: peak RSS {peak:.1} MiB");
        for kind in ["not_provisioned", "authentication", "unreachable"] {
            let wrong = series(
                &metrics,
                "durable_scaler_sidecar_storage_errors_total",
                &[&format!("kind=\"{kind}\"")],
            );
            assert_eq!(wrong, 0.0, "{mode:?}: counted as {kind}");
        }
        sidecar.assert_log_clean(4096);
        healthz(http).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Descriptors, bodies, unread answers.

/// Opens `count` TCP connections to `addr` that never send a byte (those the kernel does
/// not complete within a second are left out).
async fn silent_connections(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        let connects =
            chunk.iter().map(|_| tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)));
        for connected in futures::future::join_all(connects).await {
            if let Ok(Ok(stream)) = connected {
                open.push(stream);
            }
        }
    }
    open
}

/// Waits until the server has closed every one of `connections` (a read ends), and returns
/// how long the last took.
async fn closed_by_the_server(connections: Vec<TcpStream>) -> Duration {
    let started = Instant::now();
    let reads = connections.into_iter().map(|mut stream| async move {
        let mut byte = [0u8; 1];
        let _ = tokio::time::timeout(DEADLINE, stream.read(&mut byte)).await.expect("closed by the server");
    });
    futures::future::join_all(reads).await;
    started.elapsed()
}

/// What `/proc/<pid>/limits` says of open files: (soft, hard).
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_never_take_every_descriptor() {
    const LIMIT: u64 = 1024;
    let mut aggregator = aggregator(&allow_http_storage(), Some(LIMIT));
    let (grpc, report, http) =
        (aggregator.addr("grpc_addr"), aggregator.addr("report_addr"), aggregator.addr("http_addr"));
    // KEDA's connection, open before the flood.
    let mut keda = keda(grpc).await;
    let idle_fds = aggregator.fds();
    let mut silent = Vec::new();
    for addr in [grpc, report, http] {
        silent.extend(silent_connections(addr, 400).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = aggregator.fds();
    // A new hub with a connection: the probe needs a storage client now.
    let storage = HostileStorage::start(Storage::Quiet, "SilentHub", None).await;
    let so = scaled_object("SilentHub", &[("connectionFromEnv", &storage.connection())]);
    let answer = keda.is_active(so.clone()).await;
    let during = aggregator.fds();
    let alive_during = aggregator.alive();
    let last_closed = closed_by_the_server(silent).await;
    let alive_after = aggregator.alive();
    eprintln!(
        "figure: aggregator under {LIMIT} descriptors, 1,200 silent connections (400 a port): {idle_fds} open \
         before, {held} held, {during} after a new hub's first KEDA call ({:?}), alive: {alive_during} then \
         {alive_after}; the last silent connection closed after {last_closed:?}",
        answer.as_ref().map(|a| a.get_ref().result).map_err(|s| s.message().to_string())
    );
    assert!(alive_during && alive_after, "{}", aggregator.output());
    assert!(held < LIMIT as usize - 64 && during < LIMIT as usize - 64, "{held} / {during} descriptors");
    let answer = answer.expect("the new hub's first call answered");
    assert!(!answer.into_inner().result, "an empty hub is inactive");
    healthz(http).await.unwrap();
    keda.is_active(so).await.unwrap();
    assert_eq!(open_file_limits(aggregator.pid()).0, LIMIT);
}

#[tokio::test]
async fn the_soft_descriptor_limit_is_raised_to_the_hard_one_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary());
    command
        .args(["aggregator", "--grpc-addr", "127.0.0.1:0", "--report-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0", "--report-auth", "none"])
        .env("KUBECONFIG", dir.path().join("none"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // A hard limit this process may set (4,096, or its own when lower), the soft one half.
    let hard = open_file_limits(std::process::id()).1.min(4096);
    let soft = hard / 2;
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("aggregator listening") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0, "exited before listening");
    }
    let limits = open_file_limits(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(limits, (hard, hard), "started under {soft} of {hard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_to_the_webhook_are_closed_below_its_descriptor_limit() {
    const LIMIT: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ecdsa("silent");
    let mut webhook = webhook(&pki, dir.path(), Some(LIMIT));
    let addr = webhook.addr("addr");
    let silent = silent_connections(addr, 1_100).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = webhook.fds();
    let opened = silent.len();
    let last_closed = closed_by_the_server(silent).await;
    eprintln!(
        "figure: webhook under {LIMIT} descriptors, {opened} silent connections: {held} descriptors held; the last \
         closed after {last_closed:?}"
    );
    assert!(webhook.alive(), "{}", webhook.output());
    assert!(held < LIMIT as usize - 64, "{held} descriptors");
    review(addr, &pki.ca_pem).await.unwrap();
}

/// An AdmissionReview of an ordinary pod.
const REVIEW: &str = include_str!("../fixtures/admission/replicaset-pod-create.json");

/// `POST /mutate` of [`REVIEW`] on a new connection: Ok when answered 200.
async fn review(addr: SocketAddr, ca_pem: &str) -> Result<(), String> {
    let mut connection = https::connect(addr, ca_pem, Http::One).await?;
    match connection.post(Some("application/json"), https::full(REVIEW)).await? {
        (status, _) if status == 200 => Ok(()),
        (status, body) => Err(format!("review answered {status}: {body:?}")),
    }
}

/// A TLS connection to the webhook speaking HTTP/1.1 by hand.
async fn raw_https(
    addr: SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = https::client_config(ca_pem, rustls::DEFAULT_VERSIONS, Http::One);
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_that_stop_short_are_cut_off_and_bounded() {
    const CONNECTIONS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ecdsa("bodies");
    let mut webhook = webhook(&pki, dir.path(), None);
    let addr = webhook.addr("addr");
    let idle = webhook.rss_mib();
    let sampler = webhook.sample_rss();
    let started = Instant::now();
    // Each declares 3 MiB, sends all but the last byte, and waits for what the server does.
    let attackers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let ca = pki.ca_pem.clone();
            tokio::spawn(async move {
                let stream = raw_https(addr, &ca).await.ok()?;
                let length = 3 * 1024 * 1024;
                let head = format!(
                    "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                     content-length: {length}\r\n\r\n"
                );
                let mut body = head.into_bytes();
                body.resize(body.len() + length - 1, b' ');
                let (mut read, mut write) = tokio::io::split(stream);
                let writer = tokio::spawn(async move {
                    let _ = write.write_all(&body).await;
                    // Never the last byte; held open until the server ends it.
                    std::future::pending::<()>().await;
                    drop(write);
                });
                let mut answer = vec![0u8; 256];
                let outcome = match tokio::time::timeout(DEADLINE, read.read(&mut answer)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => "closed".to_string(),
                    Ok(Ok(n)) => {
                        String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_string()
                    }
                    Err(_) => "still open".to_string(),
                };
                writer.abort();
                Some((outcome, started.elapsed()))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = review(addr, &pki.ca_pem).await;
    let mut outcomes = Vec::new();
    for attacker in attackers {
        outcomes.push(attacker.await.unwrap());
    }
    let peak = sampler.peak();
    let last = outcomes.iter().flatten().map(|(_, at)| *at).max().unwrap_or_default();
    let mut tally: HashMap<String, usize> = HashMap::new();
    for (outcome, _) in outcomes.iter().flatten() {
        *tally.entry(outcome.clone()).or_default() += 1;
    }
    eprintln!(
        "figure: webhook, {CONNECTIONS} bodies of 3 MiB - 1 byte: RSS {idle:.1} MiB idle, {peak:.1} peak; the \
         last ended after {last:?}; {tally:?}; a review during: {during:?}"
    );
    assert!(webhook.alive(), "{}", webhook.output());
    assert!(peak < WEBHOOK_RSS_MIB, "peak RSS {peak:.1} MiB");
    assert!(!tally.contains_key("still open"), "{tally:?}");
    during.unwrap();
    review(addr, &pki.ca_pem).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_hubs_answers_hold_a_bounded_amount_for_a_bounded_time() {
    let mut aggregator = aggregator(&[], None);
    let (report, http) = (aggregator.addr("report_addr"), aggregator.addr("http_addr"));
    let mut reports = durable_scaler::proto::report::report_service_client::ReportServiceClient::connect(
        format!("http://{report}"),
    )
    .await
    .unwrap();
    for i in 0..1_000 {
        reports.submit(whole_hub_report(&format!("pod-{i}"), &format!("Unread{i}"), 1)).await.unwrap();
    }
    let (_, hubs) = http_get(http, "/hubs").await;
    let (idle, idle_fds) = (aggregator.rss_mib(), aggregator.fds());
    let sampler = aggregator.sample_rss();
    let stop = Arc::new(AtomicBool::new(false));
    let checker = keep_checking(stop.clone(), move || healthz(http));
    // Four connections x 64 /hubs, never read: not a byte of the answers is taken.
    let target = H2Target::plain(http);
    let mut unread = Vec::new();
    for _ in 0..4 {
        let connection = RawH2::open(&target, false).await.unwrap();
        let streams: Vec<u8> =
            (0..64).flat_map(|i| request(&target, &Ask::Get("/hubs"), 2 * i + 1)).collect();
        assert!(connection.send(&streams).await);
        unread.push(connection);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_unread = aggregator.rss_mib();
    // Each answer not taken within its deadline closes its connection (an answer refused
    // for being late or over the budget has a deadline of its own).
    let started = Instant::now();
    while aggregator.fds() > idle_fds + 1 {
        assert!(
            started.elapsed() < DEADLINE,
            "the unread connections are still open: {} descriptors",
            aggregator.fds()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = started.elapsed() + Duration::from_secs(3);
    stop.store(true, Ordering::Relaxed);
    let failures = checker.await.unwrap();
    let peak = sampler.peak();
    let after = aggregator.rss_mib();
    eprintln!(
        "figure: aggregator, 1,000 hubs (/hubs {} bytes), 4 connections x 64 /hubs never read: RSS {idle:.1} MiB \
         idle, {while_unread:.1} after 3 s, {peak:.1} peak, {after:.1} once the server closed them, {closed_after:?} on",
        hubs.len()
    );
    assert!(aggregator.alive(), "{}", aggregator.output());
    assert!(failures.is_empty(), "normal calls failed meanwhile: {failures:?}");
    assert!(peak < AGGREGATOR_RSS_MIB, "peak RSS {peak:.1} MiB");
    drop(unread);
    let (status, body) = http_get(http, "/hubs").await;
    assert_eq!((status, body.len() > 100_000), (200, true));
}

// ---------------------------------------------------------------------------------------
// What trigger metadata may say.

#[tokio::test]
async fn a_bad_connection_string_is_invalid_argument_naming_its_key_at_once() {
    let aggregator = aggregator(&[], None);
    let mut keda = keda(aggregator.addr("grpc_addr")).await;
    let so = scaled_object("BadConnHub", &[("connectionFromEnv", "AccountName=orders;this-is-the-secret")]);
    let started = Instant::now();
    let status = keda.is_active(so).await.unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "figure: a bad connection string answered {:?} after {took:?}: {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("scalerMetadata.connectionFromEnv:"), "{}", status.message());
    assert!(!status.message().contains("the-secret"), "{}", status.message());
}

#[tokio::test]
async fn metadata_keys_differing_only_in_case_are_refused_not_picked_at_random() {
    let aggregator = aggregator(&[], None);
    let mut keda = keda(aggregator.addr("grpc_addr")).await;
    let mut tally: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let so = scaled_object("HubOne", &[("TaskHubName", "HubTwo")]);
        let answer = match keda.get_metric_spec(so).await {
            Ok(spec) => spec.into_inner().metric_specs[0].metric_name.clone(),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        *tally.entry(answer).or_default() += 1;
    }
    eprintln!("figure: 40 calls with taskHubName and TaskHubName: {tally:?}");
    assert_eq!(tally.len(), 1, "{tally:?}");
    let (answer, _) = tally.into_iter().next().unwrap();
    assert!(answer.starts_with("InvalidArgument: scalerMetadata.taskHubName:"), "{answer}");
}

#[tokio::test]
async fn plain_http_storage_endpoints_are_refused_unless_the_aggregator_allows_them() {
    let storage = HostileStorage::start(Storage::Quiet, "PlainHttpHub", None).await;
    let refusing = aggregator(&[], None);
    let mut keda = keda(refusing.addr("grpc_addr")).await;
    let so = scaled_object("PlainHttpHub", &[("connectionFromEnv", &storage.connection())]);
    let refused = keda.is_active(so.clone()).await;
    let sent = storage.requests.load(Ordering::Relaxed);
    eprintln!(
        "figure: an http connection without --allow-http-storage: {:?}; {sent} signed requests reached the endpoint",
        refused.as_ref().map(|a| a.get_ref().result).map_err(|s| format!("{:?} {}", s.code(), s.message()))
    );
    let status = refused.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("connectionFromEnv") && status.message().contains("BlobEndpoint"),
        "{status:?}"
    );
    assert_eq!(sent, 0, "a signed request went to the plain-http endpoint");
    // The emulator on the aggregator's own loopback needs no opt-in (nothing listens there
    // in this test: the hub is just unreadable).
    let development = scaled_object("DevHub", &[("connection", "UseDevelopmentStorage=true")]);
    let answer = keda.is_active(development).await;
    assert!(!matches!(&answer, Err(s) if s.code() == tonic::Code::InvalidArgument), "{answer:?}");

    let allowing = aggregator(&allow_http_storage(), None);
    let mut allowed = self::keda(allowing.addr("grpc_addr")).await;
    assert!(!allowed.is_active(so).await.unwrap().into_inner().result);
    assert!(storage.requests.load(Ordering::Relaxed) > 0);
}

/// A storage endpoint that accepts connections and reads requests but never answers.
struct BlackHole {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BlackHole {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (a, o) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                o.fetch_add(1, Ordering::Relaxed);
                let o = o.clone();
                tokio::spawn(async move {
                    let mut sink = [0u8; 4096];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Self { addr, accepted, open, task }
    }

    fn connection(&self) -> String {
        let base = format!("http://{}", self.addr);
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};\
             BlobEndpoint={base}/blob;QueueEndpoint={base}/queue;TableEndpoint={base}/table"
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_connection_is_read_at_once_and_the_round_with_the_old_one_dropped() {
    let aggregator = aggregator(&allow_http_storage(), None);
    let mut keda = keda(aggregator.addr("grpc_addr")).await;
    let hole = BlackHole::start().await;
    let wrong = scaled_object("CorrectedHub", &[("connectionFromEnv", &hole.connection())]);
    let _ = keda.is_active(wrong).await;
    let waiting = Instant::now();
    while hole.open.load(Ordering::Relaxed) == 0 {
        assert!(waiting.elapsed() < DEADLINE, "the probe never reached the black hole");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first attempt hangs (the next would come 5 s later): correct the connection now.
    let storage = HostileStorage::start(Storage::Quiet, "CorrectedHub", None).await;
    let right = scaled_object("CorrectedHub", &[("connectionFromEnv", &storage.connection())]);
    let corrected = Instant::now();
    let accepted_then = hole.accepted.load(Ordering::Relaxed);
    let answered = loop {
        if let Ok(answer) = keda.is_active(right.clone()).await {
            break answer.into_inner().result;
        }
        assert!(corrected.elapsed() < DEADLINE, "never answered after the correction");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovered = corrected.elapsed();
    while hole.open.load(Ordering::Relaxed) > 0 {
        assert!(corrected.elapsed() < DEADLINE, "the old round's request was never dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = corrected.elapsed();
    // Past when the old round's next attempt would have connected.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(corrected.elapsed())).await;
    let accepted_after = hole.accepted.load(Ordering::Relaxed) - accepted_then;
    eprintln!(
        "figure: a corrected connection answered after {recovered:?}; the old round's request dropped after \
         {dropped:?}; {accepted_after} new connections reached the old endpoint"
    );
    assert!(!answered, "an empty hub is inactive");
    assert_eq!(accepted_after, 0, "the round with the old connection went on");
}

// ---------------------------------------------------------------------------------------
// simulate's input.

/// `durable-scaler simulate` with `args`: its exit status and stderr, or None when it ran
/// on past `limit` (then killed).
fn simulate(args: &[&str], limit: Duration) -> Option<(Option<i32>, String)> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .arg("simulate")
        .args(args)
        .args(["--no-svg", "--svg-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    Some((output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

#[test]
fn simulate_refuses_runaway_inputs_naming_the_flag_or_row() {
    let dir = tempfile::tempdir().unwrap();
    let trace = |name: &str, csv: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, csv).unwrap();
        path.display().to_string()
    };
    let huge_count = trace("count.csv", "at_s,count,activities\n0,4000000000,1\n");
    let far = trace("far.csv", "at_s,count\n1e15,1\n");
    let long = trace("long.csv", "at_s,count,activity_s\n0,1,1e12\n");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--scenarios", "burst", "--duration-s", "99999999999"], "--duration-s"),
        (vec!["--scenarios", "burst", "--startup-s", "1e12"], "--startup-s"),
        (vec!["--scenarios", "burst", "--cooldown-s", "1e9"], "--cooldown-s"),
        (vec!["--scenarios", "burst", "--max-replicas", "4000000000"], "--max-replicas"),
        (vec!["--scenarios", "burst", "--max-activities", "4000000000"], "--max-activities"),
        (vec!["--scenarios", "burst", "--duration-s", "604800", "--tick-ms", "10"], "--tick-ms"),
        (vec!["--trace", &huge_count], "orchestrations"),
        (vec!["--trace", &far], "at_s"),
        (vec!["--trace", &long], "activity_s"),
    ];
    for (args, named) in cases {
        let outcome = simulate(&args, Duration::from_secs(30));
        eprintln!("figure: simulate {args:?}: {outcome:?}");
        let (status, stderr) = outcome.unwrap_or_else(|| panic!("{args:?} still running after 30 s"));
        assert_eq!(status, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}
