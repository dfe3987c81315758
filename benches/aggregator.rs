//! Benchmark (not a test): GetMetrics and IsActive latency (p50/p99) and throughput over
//! loopback, with 100 task hubs tracked. Run with `cargo bench --bench aggregator`; prints
//! figures, asserts nothing.
//!
//! Latency: one client, calls one after another, each hub in turn. Throughput: 32 concurrent
//! callers on one HTTP/2 connection (as KEDA multiplexes), for 3 seconds per method.

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use durable_scaler::aggregator::sources::LiveReportingPods;
use durable_scaler::aggregator::{Aggregator, Args, ReportCheck};
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::proto::report::report_service_client::ReportServiceClient;
use durable_scaler::proto::report::{ControlQueueSignals, PodRef, QueueSignals, Report};
use durable_scaler::shutdown::Shutdown;
use tonic::transport::Channel;

const HUBS: usize = 100;
const LATENCY_CALLS: usize = 20_000;
const THROUGHPUT_CALLERS: usize = 32;
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);

fn scaled_object(hub: usize) -> ScaledObjectRef {
    ScaledObjectRef {
        name: format!("bench{hub:03}"),
        namespace: "bench".into(),
        scaler_metadata: HashMap::from([("taskHubName".into(), format!("Bench{hub:03}"))]),
    }
}

fn metrics_request(hub: usize) -> GetMetricsRequest {
    GetMetricsRequest {
        scaled_object_ref: Some(scaled_object(hub)),
        metric_name: format!("durabletask-bench{hub:03}"),
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn report(hub: usize) -> Report {
    let signals = |n: u64| QueueSignals {
        approximate_count: n,
        visible_count: n as u32,
        first_visible_age_ms: 100,
        sampled_at_unix_ms: now_ms(),
        redelivered_count: 0,
    };
    Report {
        pod: Some(PodRef { namespace: "bench".into(), name: format!("bench{hub:03}-pod") }),
        task_hub: format!("Bench{hub:03}"),
        partition_count: 4,
        control_queues: (0..4)
            .map(|p| ControlQueueSignals { partition: p, signals: Some(signals(p as u64)) })
            .collect(),
        work_item: Some(signals(hub as u64)),
        sampled_at_unix_ms: now_ms(),
        interval_ms: 60_000,
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency<F, Fut>(name: &str, mut call: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(LATENCY_CALLS);
    for i in 0..LATENCY_CALLS {
        let start = Instant::now();
        call(i % HUBS).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "{name:<11} latency over {LATENCY_CALLS} sequential calls: p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us",
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples[samples.len() - 1].as_secs_f64() * 1e6,
    );
}

async fn throughput(name: &str, channel: Channel, metrics: bool) {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + THROUGHPUT_FOR;
    let callers: Vec<_> = (0..THROUGHPUT_CALLERS)
        .map(|c| {
            let mut client = ExternalScalerClient::new(channel.clone());
            let done = done.clone();
            tokio::spawn(async move {
                let mut i = c;
                while Instant::now() < deadline {
                    let hub = i % HUBS;
                    if metrics {
                        client.get_metrics(metrics_request(hub)).await.expect("GetMetrics");
                    } else {
                        client.is_active(scaled_object(hub)).await.expect("IsActive");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += THROUGHPUT_CALLERS;
                }
            })
        })
        .collect();
    for c in callers {
        c.await.expect("caller");
    }
    let calls = done.load(Ordering::Relaxed);
    println!(
        "{name:<11} throughput with {THROUGHPUT_CALLERS} concurrent callers: {:>8.0} calls/s",
        calls as f64 / THROUGHPUT_FOR.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    durable_scaler::telemetry::install_crypto_provider();
    let args = Args::loopback();
    let shutdown = Shutdown::new();
    let running = Aggregator::new(args, ReportCheck::AcceptAny, Arc::new(LiveReportingPods))
        .start(shutdown.clone())
        .await
        .expect("aggregator starts");
    let mut reports =
        ReportServiceClient::connect(format!("http://{}", running.report_addr)).await.expect("report port");
    for hub in 0..HUBS {
        reports.submit(report(hub)).await.expect("report accepted");
    }
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("KEDA port");
    let client = ExternalScalerClient::new(channel.clone());
    for hub in 0..HUBS {
        client.clone().is_active(scaled_object(hub)).await.expect("tracked");
    }
    println!("aggregator benchmark: {HUBS} task hubs tracked, loopback, plaintext, one HTTP/2 connection");
    latency("GetMetrics", |hub| {
        let mut c = client.clone();
        async move {
            c.get_metrics(metrics_request(hub)).await.expect("GetMetrics");
        }
    })
    .await;
    latency("IsActive", |hub| {
        let mut c = client.clone();
        async move {
            c.is_active(scaled_object(hub)).await.expect("IsActive");
        }
    })
    .await;
    throughput("GetMetrics", channel.clone(), true).await;
    throughput("IsActive", channel, false).await;
    shutdown.trigger();
    running.wait().await.expect("clean shutdown");
}
