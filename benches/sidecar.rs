//! Sidecar benchmark: runs the real `durable-scaler sidecar` binary against Azurite with a
//! 16-partition task hub whose partitions are all owned by the benchmarked pod, and prints
//! its resident memory, CPU time per poll and storage calls per poll (from its own
//! `/metrics`, where a counting pipeline policy counts every HTTP call), once per ownership
//! layout (table, safe, legacy; the sidecar detects it, as it would in a real pod). Not a
//! test: it asserts nothing about speed, it prints figures.
//!
//! `cargo bench --bench sidecar` (needs Azurite: `npm install`, or AZURITE_CONNECTION_STRING).

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use durable_scaler::{
    azurite::Azurite,
    emulator::TaskHubEmulator,
    proto::report::{
        Report, ReportAck,
        report_service_server::{ReportService, ReportServiceServer},
    },
    storage::{Layout, QueueRef, StorageAccount, TaskHub},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARTITIONS: u32 = 16;
const POD: &str = "bench-pod";
const INTERVAL_MS: u64 = 500;
const WARM_UP_POLLS: u64 = 5;
const MEASURED_POLLS: u64 = 40;

/// Accepts and counts reports: the benchmark measures the sidecar, not an aggregator.
#[derive(Debug, Default, Clone)]
struct CountingAggregator(Arc<AtomicU64>);

#[tonic::async_trait]
impl ReportService for CountingAggregator {
    async fn submit(&self, _: tonic::Request<Report>) -> Result<tonic::Response<ReportAck>, tonic::Status> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ReportAck::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    durable_scaler::telemetry::install_crypto_provider();
    let azurite = Azurite::shared();
    let account = StorageAccount::from_connection_string(&azurite.connection_string())
        .expect("Azurite connection string");
    let aggregator = CountingAggregator::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let aggregator_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReportServiceServer::new(aggregator.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    println!(
        "sidecar benchmark: {PARTITIONS} partitions owned by one pod, interval {INTERVAL_MS} ms, {MEASURED_POLLS} measured polls"
    );
    for layout in [Layout::Table, Layout::Safe, Layout::Legacy] {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let hub = TaskHub::parse(&format!("Bench{}{nanos}", layout.as_str())).unwrap();
        lay_out(&account, &hub, layout).await;
        measure(&hub, layout, &azurite.connection_string(), &aggregator_url).await;
    }
    println!("reports received by the test aggregator: {}", aggregator.0.load(Ordering::Relaxed));
}

/// 16 partitions owned by the benchmarked pod; each control queue holds two visible
/// messages and a durable timer, the work-item queue ten messages.
async fn lay_out(account: &StorageAccount, hub: &TaskHub, layout: Layout) {
    let emulator = TaskHubEmulator::new(account, hub.clone(), layout);
    emulator.create(PARTITIONS).await.expect("create the hub");
    for partition in 0..PARTITIONS {
        emulator.claim(partition, POD, Duration::from_secs(60)).await.expect("claim");
        for (text, delay) in [("a", 0), ("b", 0), ("timer", 3600)] {
            emulator
                .enqueue(QueueRef::Control(partition), text, Duration::from_secs(delay))
                .await
                .expect("enqueue");
        }
    }
    for _ in 0..10 {
        emulator.enqueue(QueueRef::WorkItem, "activity", Duration::ZERO).await.expect("enqueue");
    }
}

async fn measure(hub: &TaskHub, layout: Layout, connection: &str, aggregator: &str) {
    let http: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .arg("sidecar")
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("DURABLE_SCALER_TASK_HUB", hub.name())
        .env("DURABLE_SCALER_CONNECTION", connection)
        .env("DURABLE_SCALER_AGGREGATOR", aggregator)
        .env("POD_NAME", POD)
        .env("POD_NAMESPACE", "bench")
        .env("DURABLE_SCALER_INTERVAL", format!("{INTERVAL_MS}ms"))
        .env("DURABLE_SCALER_HTTP_ADDR", http.to_string())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sidecar binary");
    let pid = child.id().expect("pid");

    let start = wait_for_polls(http, WARM_UP_POLLS).await;
    let cpu_start = cpu_ms(pid);
    let end = wait_for_polls(http, start.polls + MEASURED_POLLS).await;
    let cpu_end = cpu_ms(pid);
    let polls = (end.polls - start.polls) as f64;
    let memory = memory_kib(pid);
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{:6} layout: RSS {:.1} MiB (peak {:.1} MiB; anonymous {:.1} MiB, file-backed {:.1} MiB), CPU {:.2} ms/poll, storage calls/poll {:.1}, owned partitions {}, poll p50 bucket <= {}",
        layout.as_str(),
        mib(memory.rss),
        mib(memory.peak),
        mib(memory.anon),
        mib(memory.file),
        (cpu_end - cpu_start) as f64 / polls,
        (end.storage_requests - start.storage_requests) as f64 / polls,
        end.owned,
        end.poll_p50,
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

#[derive(Debug, Default)]
struct Scrape {
    polls: u64,
    storage_requests: u64,
    owned: u64,
    poll_p50: String,
}

/// Scrapes `/metrics` until `polls` polls are done.
async fn wait_for_polls(http: SocketAddr, polls: u64) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(scrape) = scrape(http).await
            && scrape.polls >= polls
        {
            return scrape;
        }
        assert!(Instant::now() < deadline, "the sidecar did not reach {polls} polls");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(http: SocketAddr) -> Option<Scrape> {
    let mut stream = tokio::net::TcpStream::connect(http).await.ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let count = value("durable_scaler_sidecar_poll_duration_seconds_count");
    let poll_p50 = text
        .lines()
        .filter_map(|l| l.strip_prefix("durable_scaler_sidecar_poll_duration_seconds_bucket{le=\""))
        .filter_map(|l| l.split_once("\"} "))
        .find(|(_, n)| n.parse::<f64>().unwrap_or(0.0) as u64 * 2 >= count)
        .map(|(le, _)| format!("{le} s"))
        .unwrap_or_default();
    Some(Scrape {
        polls: value("durable_scaler_sidecar_polls_total"),
        storage_requests: value("durable_scaler_sidecar_storage_requests_total"),
        owned: value("durable_scaler_sidecar_owned_partitions"),
        poll_p50,
    })
}

/// User + system CPU time of `pid`, ms (/proc/PID/stat fields 14 and 15, in clock ticks).
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is parenthesised and may contain spaces.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 =
        fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1000 / per_second
}

/// Resident memory of a process, KiB (/proc/PID/status).
struct Memory {
    /// VmRSS.
    rss: u64,
    /// VmHWM: the peak of VmRSS.
    peak: u64,
    /// RssAnon: heap and stacks, the process's own memory.
    anon: u64,
    /// RssFile: pages of the binary and libraries, shared and reclaimable.
    file: u64,
}

fn memory_kib(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss: field("VmRSS:"), peak: field("VmHWM:"), anon: field("RssAnon:"), file: field("RssFile:") }
}
