//! The aggregator stays bounded under bad or excessive input (issue 14): each test runs the
//! binary on loopback with `--report-auth none`, sends one of the attacks that used to hold
//! memory or CPU without limit through a real tonic client or a raw HTTP/2 client, and
//! checks the answers and the process's resident memory (`/proc/<pid>/status`) and
//! `/metrics`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use durable_scaler::contract::limits;
use durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::proto::report::Report;
use durable_scaler::proto::report::report_service_client::ReportServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::aggregator_support::{http_get, whole_hub_report};

/// Generous: the binary idles at ~15 MiB; the attacks below took it to 345 MiB - 1.4 GiB.
const RSS_BOUND_MIB: u64 = 120;

/// The longest status message a refusal may carry (a field name, a rule, a short quote).
const SHORT_MESSAGE: usize = 300;

/// The aggregator binary, killed when dropped.
struct Aggregator {
    child: Child,
    grpc: SocketAddr,
    report: SocketAddr,
    http: SocketAddr,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Aggregator {
    fn start() -> Self {
        let home = std::env::temp_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
            .args(["aggregator", "--grpc-addr", "127.0.0.1:0", "--report-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0", "--report-auth", "none"])
            .env("KUBECONFIG", home.join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("DURABLE_SCALER_REPORT_AUTH")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("the aggregator starts");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stderr.read_line(&mut line).expect("stderr") > 0, "exited before listening");
            if line.contains("aggregator listening") {
                break;
            }
        }
        let addr = |key: &str| -> SocketAddr {
            let at = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("{key} in {line}"));
            let rest = &line[at + key.len() + 1..];
            rest.split_whitespace().next().unwrap_or_default().trim_matches('"').parse().expect("address")
        };
        let (grpc, report, http) = (addr("grpc_addr"), addr("report_addr"), addr("http_addr"));
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Self { child, grpc, report, http }
    }

    fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kib / 1024
    }

    async fn keda(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.grpc)).await.expect("KEDA port")
    }

    async fn reports(&self) -> ReportServiceClient<Channel> {
        ReportServiceClient::connect(format!("http://{}", self.report)).await.expect("report port")
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.http, "/metrics").await;
        assert_eq!(status, 200);
        body
    }

    fn assert_rss_bounded(&self, after: &str) {
        let rss = self.rss_mib();
        assert!(rss < RSS_BOUND_MIB, "RSS {rss} MiB after {after}");
    }
}

fn scaled_object(namespace: &str, hub: &str) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "app-so".into(),
        namespace: namespace.into(),
        scaler_metadata: HashMap::from([("taskHubName".into(), hub.into())]),
    }
}

fn assert_short_refusal(status: &tonic::Status, code: Code, field: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().len() < SHORT_MESSAGE, "a {}-byte message", status.message().len());
    assert!(status.message().contains(field), "{}", status.message());
}

#[tokio::test]
async fn a_huge_namespace_on_the_keda_port_is_refused_before_it_is_held() {
    let aggregator = Aggregator::start();
    let mut keda = aggregator.keda().await;
    let huge = "a".repeat(3_900_000);
    for _ in 0..10 {
        let status = keda.get_metric_spec(scaled_object(&huge, "MyHub")).await.unwrap_err();
        // Beyond the KEDA port's message limit: refused by the decoder, the message short.
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(status.message().len() < SHORT_MESSAGE, "{}", status.message());
    }
    aggregator.assert_rss_bounded("10 GetMetricSpec calls with a 3.9 MB namespace");
}

#[tokio::test]
async fn an_overlong_namespace_within_the_message_limit_is_invalid_argument_quoted_short() {
    let aggregator = Aggregator::start();
    let mut keda = aggregator.keda().await;
    let long = "a".repeat(20_000);
    let status = keda.get_metric_spec(scaled_object(&long, "MyHub")).await.unwrap_err();
    assert_short_refusal(&status, Code::InvalidArgument, "scaledObjectRef.namespace");
    let request =
        GetMetricsRequest { scaled_object_ref: Some(scaled_object("apps", "MyHub")), metric_name: long };
    let status = keda.get_metrics(request).await.unwrap_err();
    assert_short_refusal(&status, Code::InvalidArgument, "metricName");
    let mut metadata = scaled_object("apps", "MyHub");
    metadata.scaler_metadata.insert("scaleAlgorithm".into(), "x".repeat(20_000));
    let status = keda.get_metric_spec(metadata).await.unwrap_err();
    assert_short_refusal(&status, Code::InvalidArgument, "scaleAlgorithm");
    assert!(!aggregator.metrics().await.contains("aaaa"), "nothing of it reached /metrics");
}

#[tokio::test]
async fn reports_with_huge_names_are_refused_and_leave_no_series() {
    let aggregator = Aggregator::start();
    let mut reports = aggregator.reports().await;
    let mut huge = whole_hub_report("app-1", "MyHub", 0);
    huge.pod.as_mut().expect("pod").namespace = "n".repeat(3_900_000);
    for _ in 0..20 {
        let status = reports.submit(huge.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    }
    let mut long = whole_hub_report("app-1", "MyHub", 0);
    long.pod.as_mut().expect("pod").namespace = "n".repeat(10_000);
    let status = reports.submit(long).await.unwrap_err();
    assert_short_refusal(&status, Code::InvalidArgument, "pod.namespace");
    let mut long = whole_hub_report(&"p".repeat(254), "MyHub", 0);
    long.task_hub = "MyHub".into();
    let status = reports.submit(long).await.unwrap_err();
    assert_short_refusal(&status, Code::InvalidArgument, "pod.name");
    aggregator.assert_rss_bounded("20 reports with a 3.9 MB namespace");
    let metrics = aggregator.metrics().await;
    assert!(metrics.len() < 64 * 1024, "/metrics is {} bytes", metrics.len());
    assert!(!metrics.contains("nnnn"));
}

fn count_lines(metrics: &str, series: &str) -> usize {
    metrics.lines().filter(|l| l.starts_with(series)).count()
}

fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn hubs_beyond_the_limit_are_refused_counted_and_bounded_in_metrics() {
    let aggregator = Aggregator::start();
    let mut reports = aggregator.reports().await;
    let extra = 300;
    let mut refused = 0;
    for i in 0..limits::MAX_TRACKED_HUBS + extra {
        match reports.submit(whole_hub_report("app-1", &format!("Hub{i}"), 0)).await {
            Ok(_) => {}
            Err(status) => {
                assert_short_refusal(&status, Code::ResourceExhausted, "task hubs");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, extra, "every hub beyond the limit, and only those, is refused");
    let metrics = aggregator.metrics().await;
    assert_eq!(
        value(&metrics, "durable_scaler_aggregator_hubs_tracked "),
        Some(limits::MAX_TRACKED_HUBS as f64)
    );
    assert_eq!(
        value(&metrics, "durable_scaler_aggregator_tracking_refused_total{kind=\"hub\"} "),
        Some(extra as f64)
    );
    // A handful of series per tracked hub (13 for a reporting hub: 9 gauges of its decision
    // and coverage, 2 of visible messages, `unavailable`, `reports_received`), none for the
    // refused ones.
    let lines = metrics.lines().count();
    assert!(lines < 14 * limits::MAX_TRACKED_HUBS, "{lines} lines");
    assert_eq!(
        count_lines(&metrics, "durable_scaler_aggregator_reports_received_total{"),
        limits::MAX_TRACKED_HUBS
    );
    aggregator.assert_rss_bounded("2,300 hubs");
}

#[tokio::test]
async fn rejected_reports_are_counted_by_reason_only() {
    let aggregator = Aggregator::start();
    let mut reports = aggregator.reports().await;
    for i in 0..2_000 {
        let mut bad = whole_hub_report(&format!("app-{i}"), &format!("Hub{i}"), 0);
        bad.control_queues[0].partition = 99;
        assert_eq!(reports.submit(bad).await.unwrap_err().code(), Code::InvalidArgument);
    }
    let metrics = aggregator.metrics().await;
    assert_eq!(count_lines(&metrics, "durable_scaler_aggregator_reports_rejected_total{"), 1, "{metrics}");
    assert_eq!(
        value(
            &metrics,
            "durable_scaler_aggregator_reports_rejected_total{reason=\"partition_out_of_range\"} "
        ),
        Some(2_000.0)
    );
}

#[tokio::test]
async fn pods_beyond_the_limit_of_a_hub_are_refused_and_never_count_as_workers() {
    let aggregator = Aggregator::start();
    let mut reports = aggregator.reports().await;
    let extra = 200;
    let mut refused = 0;
    for i in 0..limits::MAX_PODS_PER_HUB + extra {
        let mut report: Report = whole_hub_report(&format!("app-{i}"), "PodHub", 0);
        report.control_queues.clear();
        report.work_item = None;
        // Every pod stays live through the test: none can make room for another.
        report.interval_ms = 600_000;
        if let Err(status) = reports.submit(report).await {
            assert_short_refusal(&status, Code::ResourceExhausted, "pods");
            refused += 1;
        }
    }
    assert_eq!(refused, extra);
    let metrics = aggregator.metrics().await;
    assert_eq!(
        value(&metrics, "durable_scaler_aggregator_pods_tracked "),
        Some(limits::MAX_PODS_PER_HUB as f64)
    );
    assert_eq!(
        value(&metrics, "durable_scaler_aggregator_tracking_refused_total{kind=\"pod\"} "),
        Some(extra as f64)
    );
    let (_, hubs) = http_get(aggregator.http, "/hubs").await;
    let hubs: serde_json::Value = serde_json::from_str(&hubs).expect("JSON");
    let live = hubs[0]["live_pods"].as_u64().expect("live_pods");
    assert!(live <= limits::MAX_PODS_PER_HUB as u64, "{live} live pods");
}

/// A raw HTTP/2 connection to `addr`, driven in the background.
async fn h2_connection(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// Opens a gRPC call to `path` that announces a message of `announced` bytes, sends 5 bytes
/// of it and stalls; returns the response future.
async fn stalled_call(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    announced: u32,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = axum::http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut ready = send.clone().ready().await.expect("ready");
    let (response, mut body) = ready.send_request(request, false).expect("stream");
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&announced.to_be_bytes());
    prefix.extend_from_slice(&[0x0a, 0x03, b'a', b'b', b'c']);
    body.send_data(Bytes::from(prefix), false).expect("data");
    *send = ready;
    (response, body)
}

/// The gRPC status of a response (in the headers of a trailers-only answer, or in the
/// trailers), or `refused` when the server reset the stream as beyond its stream limit.
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<String> {
    let response = match response.await {
        Ok(response) => response,
        Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => return Some("refused".into()),
        Err(_) => return None,
    };
    if let Some(s) = response.headers().get("grpc-status") {
        return s.to_str().ok().map(str::to_owned);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.ok()?;
    }
    let trailers = body.trailers().await.ok()??;
    trailers.get("grpc-status").and_then(|s| s.to_str().ok()).map(str::to_owned)
}

#[tokio::test]
async fn streams_that_announce_large_messages_and_stall_are_refused_at_once() {
    let aggregator = Aggregator::start();
    let path = "/durablescaler.report.v1.ReportService/Submit";
    let mut pending = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut send = h2_connection(aggregator.report).await;
        for _ in 0..100 {
            let (response, body) = stalled_call(&mut send, aggregator.report, path, 4_000_000).await;
            pending.push(response);
            streams.push(body);
        }
    }
    let mut out_of_range = 0;
    for response in pending {
        // OUT_OF_RANGE (11): the announced length is beyond the port's message limit. Streams
        // opened before the client read the server's SETTINGS, beyond its limit of 16, are
        // refused outright.
        match grpc_status(response).await.as_deref() {
            Some("11") => out_of_range += 1,
            Some("refused") => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(out_of_range >= 3 * limits::REPORT_MAX_CONCURRENT_STREAMS as usize, "{out_of_range}");
    aggregator.assert_rss_bounded("3 connections x 100 streams announcing 4 MB");
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_at_the_deadline() {
    let aggregator = Aggregator::start();
    let path = "/externalscaler.ExternalScaler/GetMetricSpec";
    let mut send = h2_connection(aggregator.grpc).await;
    let mut calls = Vec::new();
    for _ in 0..50 {
        // Within the message limit, so the server waits for the rest, up to its deadline.
        calls.push(
            stalled_call(&mut send, aggregator.grpc, path, limits::KEDA_MESSAGE_MAX_BYTES as u32).await,
        );
    }
    let answers = tokio::time::timeout(limits::REQUEST_TIMEOUT * 3, async {
        let mut statuses = Vec::new();
        for (response, _body) in calls {
            statuses.push(grpc_status(response).await);
        }
        statuses
    })
    .await
    .expect("every stalled call is answered once its deadline passes");
    assert!(answers.iter().all(|s| s.as_deref().is_some_and(|s| s != "0")), "{answers:?}");
    aggregator.assert_rss_bounded("50 stalled KEDA calls");
}

#[tokio::test]
async fn every_listener_announces_a_stream_limit() {
    let aggregator = Aggregator::start();
    for (addr, expected) in [
        (aggregator.report, limits::REPORT_MAX_CONCURRENT_STREAMS as usize),
        (aggregator.grpc, limits::KEDA_MAX_CONCURRENT_STREAMS as usize),
        (aggregator.http, 64),
    ] {
        let send = h2_connection(addr).await;
        // The server's SETTINGS arrive with the handshake; one request round trip makes sure
        // they were read.
        let mut ready = send.ready().await.expect("ready");
        let request = axum::http::Request::get(format!("http://{addr}/healthz")).body(()).expect("request");
        let (response, _) = ready.send_request(request, true).expect("stream");
        let _ = response.await;
        assert_eq!(ready.current_max_send_streams(), expected, "{addr}");
    }
}
