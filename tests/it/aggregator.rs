//! The aggregator's KEDA and report ports, end to end: a real aggregator on loopback, the real
//! tonic clients generated from proto/externalscaler.proto and proto/report.proto, sidecar
//! reports submitted over the report port, no storage (no connection in the metadata).

use crate::aggregator_support::*;
use durable_scaler::aggregator::ReportCheck;
use durable_scaler::aggregator::sources::{
    AuthError, BoxFuture, ReportAuthenticator, ReportIdentity, ScaledObjectKey, WorkerCountSource,
};
use durable_scaler::heuristic::hpa::{MetricTargetType, desired_replicas};
use durable_scaler::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use durable_scaler::proto::report::Report;
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::Code;

/// The services reflection `version` (`v1` or `v1alpha`, the same messages in two generated
/// modules) lists on `addr`, as `grpcurl list` asks.
macro_rules! list_services {
    ($version:ident, $addr:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

        let mut client = ServerReflectionClient::new(channel($addr).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses =
            client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        let response = responses.next().await.expect("one response").unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("expected a service list, got {:?}", response.message_response);
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
    }};
}

#[tokio::test]
async fn reflection_lists_the_keda_service() {
    let aggregator = start(args()).await;
    let names = list_services!(v1, aggregator.grpc_addr);
    assert!(names.iter().any(|n| n == "externalscaler.ExternalScaler"), "{names:?}");
    aggregator.stop().await;
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_keda_service_for_older_grpcurl() {
    let aggregator = start(args()).await;
    let names = list_services!(v1alpha, aggregator.grpc_addr);
    assert!(names.iter().any(|n| n == "externalscaler.ExternalScaler"), "{names:?}");
    aggregator.stop().await;
}

#[tokio::test]
async fn health_says_the_keda_service_is_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let aggregator = start(args()).await;
    let mut client = HealthClient::new(channel(aggregator.grpc_addr).await);
    let request = HealthCheckRequest { service: "externalscaler.ExternalScaler".into() };
    let status = client.check(request).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    aggregator.stop().await;
}

#[tokio::test]
async fn metric_spec_names_the_lowercased_hub_with_target_one() {
    let aggregator = start(args()).await;
    let spec =
        aggregator.keda.clone().get_metric_spec(scaled_object("MyHubSpec", &[])).await.unwrap().into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let m = &spec.metric_specs[0];
    assert_eq!(m.metric_name, "durabletask-myhubspec");
    #[allow(deprecated)]
    let target = m.target_size;
    assert_eq!((target, m.target_size_float), (1, 1.0));
    aggregator.stop().await;
}

#[tokio::test]
async fn every_metadata_error_is_invalid_argument_naming_the_key() {
    let aggregator = start(args()).await;
    let cases = [
        ("taskHubName", "x"),
        ("taskHubName", "has-dash"),
        ("maxActivitiesPerWorker", "0"),
        ("maxActivitiesPerWorker", "ten"),
        ("maxOrchestrationsPerWorker", "-5"),
        ("useTablePartitionManagement", "maybe"),
        ("scaleAlgorithm", "cpu"),
        ("maxPollingIntervalMs", "soon"),
    ];
    for (key, value) in cases {
        let so = scaled_object("MetaHub", &[(key, value)]);
        let mut keda = aggregator.keda.clone();
        let metrics = GetMetricsRequest {
            scaled_object_ref: Some(so.clone()),
            metric_name: "durabletask-metahub".into(),
        };
        let errors = [
            keda.get_metric_spec(so.clone()).await.unwrap_err(),
            keda.is_active(so.clone()).await.unwrap_err(),
            keda.get_metrics(metrics).await.unwrap_err(),
            keda.stream_is_active(so.clone()).await.unwrap_err(),
        ];
        for status in errors {
            assert_eq!(status.code(), Code::InvalidArgument, "{key}={value}: {status:?}");
            assert!(status.message().contains(key), "{key}={value}: {}", status.message());
        }
    }
    // A missing taskHubName is wsugarman's default TestHubName (with a note on /hubs), not an error.
    let mut missing = scaled_object("MetaHub", &[]);
    missing.scaler_metadata.remove("taskHubName");
    let spec = aggregator.keda.clone().get_metric_spec(missing).await.expect("TestHubName assumed");
    assert_eq!(spec.into_inner().metric_specs[0].metric_name, "durabletask-testhubname");
    aggregator.stop().await;
}

#[tokio::test]
async fn an_unseen_hub_with_nothing_to_probe_is_unavailable_with_the_reason() {
    let aggregator = start(args()).await;
    let status = aggregator.is_active("NobodyHub").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("no connection"), "{}", status.message());
    assert_eq!(aggregator.metric("NobodyHub").await.unwrap_err().code(), Code::Unavailable);
    aggregator.stop().await;
}

#[tokio::test]
async fn a_reported_hub_is_answered_from_memory() {
    let aggregator = start(args()).await;
    aggregator.submit(whole_hub_report("app-1", "BusyHub", 25)).await;
    assert!(aggregator.is_active("BusyHub").await.unwrap());
    // Target formula: ceil(25 / 10) = 3 workers; one worker runs, so the HPA must see 3.
    eventually("desired 3 workers", || async { aggregator.metric("BusyHub").await.unwrap() == 3.0 }).await;
    aggregator.stop().await;
}

#[tokio::test]
async fn metric_names_match_case_insensitively_and_others_are_refused() {
    let aggregator = start(args()).await;
    aggregator.submit(whole_hub_report("app-1", "CaseHub", 5)).await;
    let ask = |name: &str| {
        let request = GetMetricsRequest {
            scaled_object_ref: Some(scaled_object("CaseHub", &[])),
            metric_name: name.to_string(),
        };
        let mut keda = aggregator.keda.clone();
        async move { keda.get_metrics(request).await }
    };
    let response = ask("DurableTask-CASEHUB").await.unwrap().into_inner();
    assert_eq!(response.metric_values[0].metric_name, "DurableTask-CASEHUB");
    let status = ask("durabletask-otherhub").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    aggregator.stop().await;
}

#[tokio::test]
async fn stream_is_active_sends_the_state_at_open_then_true_on_each_activation_only() {
    let aggregator = start(args()).await;
    let hub = "StreamHub";
    aggregator.submit(whole_hub_report("app-1", hub, 0)).await;
    let mut stream =
        aggregator.keda.clone().stream_is_active(scaled_object(hub, &[])).await.unwrap().into_inner();
    assert!(!next(&mut stream).await, "inactive at open");

    aggregator.submit(whole_hub_report("app-1", hub, 3)).await;
    assert!(next(&mut stream).await, "true on activation");
    // Still active: nothing is sent; going inactive: nothing is sent (KEDA ignores false).
    // The second reading is a millisecond later whatever the clock: the aggregator takes
    // one reading per timestamp, and two made at once would be one.
    let busy = whole_hub_report("app-1", hub, 4);
    let idle = later_than(&busy, whole_hub_report("app-1", hub, 0));
    aggregator.submit(busy).await;
    aggregator.submit(idle).await;
    eventually("inactive again", || async { !aggregator.is_active(hub).await.unwrap() }).await;
    aggregator.submit(whole_hub_report("app-1", hub, 1)).await;
    assert!(next(&mut stream).await, "true on the second activation");

    // Shutdown ends the stream; nothing else was queued in between.
    aggregator.shutdown.trigger();
    let rest: Vec<_> = tokio::time::timeout(DEADLINE, async {
        let mut rest = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            rest.push(m.result);
        }
        rest
    })
    .await
    .expect("the stream ends on shutdown");
    assert!(rest.is_empty(), "unexpected messages {rest:?}");
    aggregator.stop().await;
}

#[tokio::test]
async fn fifty_hubs_are_tracked_at_once() {
    let aggregator = start(args()).await;
    let hubs: Vec<String> = (0..50).map(|i| format!("Fifty{i:02}")).collect();
    for (i, hub) in hubs.iter().enumerate() {
        aggregator.submit(whole_hub_report(&format!("{}-pod", hub.to_lowercase()), hub, i as u32 * 10)).await;
    }
    let answers = futures::future::join_all(hubs.iter().enumerate().map(|(i, hub)| {
        let aggregator = &aggregator;
        async move {
            let active = aggregator.is_active(hub).await.unwrap();
            assert_eq!(active, i > 0, "{hub}");
            eventually(&format!("{hub} desired {i}"), || async {
                aggregator.metric(hub).await.unwrap() == i as f64
            })
            .await;
        }
    }));
    answers.await;
    let (_, metrics) = aggregator.http_get("/metrics").await;
    assert!(metrics.contains("durable_scaler_aggregator_hubs_tracked 50"), "{metrics}");
    aggregator.stop().await;
}

#[tokio::test]
async fn invalid_reports_are_refused_with_the_reason_and_counted() {
    let aggregator = start(args()).await;
    let mut out_of_range = whole_hub_report("app-1", "BadHub", 0);
    out_of_range.control_queues[0].partition = 9;
    let status = aggregator.reports.clone().submit(out_of_range).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("partition 9"), "{}", status.message());

    let mut future = whole_hub_report("app-1", "BadHub", 0);
    future.sampled_at_unix_ms = now_ms() + 3_600_000;
    let status = aggregator.reports.clone().submit(future).await.unwrap_err();
    assert!(
        status.message().contains("future") || status.message().contains("ahead"),
        "{}",
        status.message()
    );

    let mut shape = whole_hub_report("app-1", "BadHub", 0);
    shape.partition_count = 40;
    assert_eq!(aggregator.reports.clone().submit(shape).await.unwrap_err().code(), Code::InvalidArgument);

    let (_, metrics) = aggregator.http_get("/metrics").await;
    for kind in ["partition_out_of_range", "future_timestamp", "unknown_hub_shape"] {
        let line = format!("durable_scaler_aggregator_reports_rejected_total{{reason=\"{kind}\"}} 1");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    aggregator.stop().await;
}

#[tokio::test]
async fn a_leaving_sidecar_uncovers_its_partitions_in_the_metrics() {
    let aggregator = start(args()).await;
    let hub = "LeaveHub";
    aggregator.submit(whole_hub_report("app-1", hub, 0)).await;
    let covered = "durable_scaler_aggregator_covered_partitions{namespace=\"apps\",task_hub=\"leavehub\"} 4";
    eventually("4 covered", || async { aggregator.http_get("/metrics").await.1.contains(covered) }).await;
    let mut last = whole_hub_report("app-1", hub, 0);
    last.leaving = true;
    aggregator.submit(last).await;
    let uncovered =
        "durable_scaler_aggregator_uncovered_partitions{namespace=\"apps\",task_hub=\"leavehub\"} 4";
    eventually("4 uncovered", || async { aggregator.http_get("/metrics").await.1.contains(uncovered) }).await;
    let (_, metrics) = aggregator.http_get("/metrics").await;
    assert!(
        metrics.contains(
            "durable_scaler_aggregator_connection_known{namespace=\"apps\",task_hub=\"leavehub\"} 0"
        ),
        "a hub without a connection says so: {metrics}"
    );
    aggregator.stop().await;
}

#[tokio::test]
async fn keda_calls_are_timed_in_the_metrics_whatever_their_answer() {
    let aggregator = start(args()).await;
    aggregator.submit(whole_hub_report("app-1", "TimedHub", 0)).await;
    aggregator.metric("TimedHub").await.unwrap();
    aggregator.metric("TimedHub").await.unwrap();
    aggregator.is_active("TimedHub").await.unwrap();
    // Refused calls are answers too (an invalid hub name: INVALID_ARGUMENT).
    aggregator.is_active("1nvalid").await.unwrap_err();
    let (_, metrics) = aggregator.http_get("/metrics").await;
    let name = "durable_scaler_aggregator_keda_call_duration_seconds";
    for line in [
        format!("{name}_count{{method=\"get_metrics\"}} 2"),
        format!("{name}_count{{method=\"is_active\"}} 2"),
        format!("{name}_bucket{{le=\"+Inf\",method=\"get_metrics\"}} 2"),
    ] {
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    aggregator.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer_over_http() {
    let aggregator = start(args()).await;
    assert_eq!(aggregator.http_get("/healthz").await.0, 200);
    assert_eq!(aggregator.http_get("/readyz").await.0, 200);
    let (status, body) = aggregator.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("durable_scaler_aggregator_hubs_tracked"), "{body}");
    aggregator.stop().await;
}

#[tokio::test]
async fn the_latency_algorithm_adds_a_worker_when_work_items_wait() {
    let aggregator = start(args()).await;
    let hub = "SlowHub";
    let so: ScaledObjectRef = scaled_object(hub, &[("scaleAlgorithm", "latency")]);
    aggregator.keda.clone().get_metric_spec(so).await.unwrap();
    // One pod, work items waiting 5 s: after five samples the vote adds a worker. Each report
    // is a fresh reading of every queue (a reading re-sent with its old sampled_at is one
    // sample, as upstream adds one per read).
    eventually("two workers wanted", || async {
        let empty: Vec<_> = (0..4).map(|p| (p, signals(0, 0, 0))).collect();
        aggregator.submit(report("app-1", hub, &empty, Some(signals(8, 8, 5_000)))).await;
        let request = GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(hub, &[("scaleAlgorithm", "latency")])),
            metric_name: "durabletask-slowhub".into(),
        };
        let value = aggregator.keda.clone().get_metrics(request).await.unwrap().into_inner().metric_values[0]
            .metric_value_float;
        value == 2.0
    })
    .await;
    aggregator.stop().await;
}

/// Knows one token, `token-for-app-1`, bound to pod apps/app-1: answers as the Kubernetes
/// TokenReview authenticator does (the identity of the token's pod, or a refusal).
struct OneTokenAuthenticator;

impl ReportAuthenticator for OneTokenAuthenticator {
    fn authenticate<'a>(
        &'a self,
        token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<ReportIdentity, AuthError>> {
        Box::pin(async move {
            match token {
                None => Err(AuthError::Unauthenticated("no bearer token".into())),
                Some("token-for-app-1") => {
                    Ok(ReportIdentity { namespace: NAMESPACE.into(), pod_name: "app-1".into() })
                }
                Some(_) => Err(AuthError::Unauthenticated("token not recognised".into())),
            }
        })
    }
}

fn with_token(
    report: durable_scaler::proto::report::Report,
    token: &str,
) -> tonic::Request<durable_scaler::proto::report::Report> {
    let mut request = tonic::Request::new(report);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn reports_are_checked_by_the_plugged_in_authenticator() {
    let aggregator =
        start_with(args(), ReportCheck::Token(Arc::new(OneTokenAuthenticator)), Arc::new(LivePods)).await;
    let mut client = aggregator.reports.clone();
    let status = client.submit(whole_hub_report("app-1", "AuthHub", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .submit(with_token(whole_hub_report("app-2", "AuthHub", 1), "token-for-app-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "a token may only report for its own pod");
    assert!(status.message().contains("app-2"), "{}", status.message());
    client
        .submit(with_token(whole_hub_report("app-1", "AuthHub", 1), "token-for-app-1"))
        .await
        .expect("accepted");
    assert!(aggregator.is_active("AuthHub").await.unwrap());
    let (_, metrics) = aggregator.http_get("/metrics").await;
    // Refusals are counted by reason alone (no series at the sender's will).
    for kind in ["unauthenticated", "permission_denied"] {
        let line = format!("durable_scaler_aggregator_reports_rejected_total{{reason=\"{kind}\"}} 1");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    aggregator.stop().await;
}

/// The stand-alone worker-count source, by name.
use durable_scaler::aggregator::sources::LiveReportingPods as LivePods;

/// Says every scale target runs ten replicas, as the Kubernetes source would read them.
struct TenReplicas;

impl WorkerCountSource for TenReplicas {
    fn worker_count<'a>(&'a self, _scaled_object: &'a ScaledObjectKey) -> BoxFuture<'a, Option<u32>> {
        Box::pin(async { Some(10) })
    }
}

#[tokio::test]
async fn a_plugged_in_worker_count_source_sets_the_current_count_the_metric_is_worked_out_from() {
    let aggregator = start_with(args(), ReportCheck::AcceptAny, Arc::new(TenReplicas)).await;
    // 25 work items want 3 workers; the HPA runs 10, so the value must take it down to 3.
    aggregator.submit(whole_hub_report("app-1", "TenHub", 25)).await;
    let workers_line = "durable_scaler_aggregator_workers{namespace=\"apps\",task_hub=\"tenhub\"} 10";
    // GetMetrics names the ScaledObject, whose worker count the source then gives.
    eventually("the HPA lands on 3 from the source's 10 replicas", || async {
        let value = aggregator.metric("TenHub").await.unwrap();
        desired_replicas(10, value, 1.0, MetricTargetType::AverageValue) == 3
            && aggregator.http_get("/metrics").await.1.contains(workers_line)
    })
    .await;
    aggregator.stop().await;
}

#[tokio::test]
async fn a_recommendation_change_reaches_the_hook_with_the_scaled_object_asking() {
    use durable_scaler::aggregator::Aggregator;
    use durable_scaler::aggregator::hub::RecommendationChange;
    use std::sync::Mutex;

    durable_scaler::telemetry::install_crypto_provider();
    let seen: Arc<Mutex<Vec<(ScaledObjectKey, RecommendationChange)>>> = Arc::default();
    let record = seen.clone();
    let shutdown = durable_scaler::shutdown::Shutdown::new();
    let running = Aggregator::new(args(), ReportCheck::AcceptAny, Arc::new(LivePods))
        .on_recommendation_change(Arc::new(move |so, change| {
            record.lock().unwrap().push((so.clone(), change.clone()));
        }))
        .start(shutdown.clone())
        .await
        .unwrap();
    let mut keda = durable_scaler::proto::externalscaler::external_scaler_client::ExternalScalerClient::new(
        channel(running.grpc_addr).await,
    );
    let mut reports = durable_scaler::proto::report::report_service_client::ReportServiceClient::new(
        channel(running.report_addr).await,
    );
    keda.get_metric_spec(scaled_object("HookHub", &[("scaleAlgorithm", "target")])).await.unwrap();
    reports.submit(whole_hub_report("app-1", "HookHub", 25)).await.unwrap();
    eventually("the change reached the hook", || async { !seen.lock().unwrap().is_empty() }).await;
    let (so, change) = seen.lock().unwrap()[0].clone();
    assert_eq!(so, ScaledObjectKey { namespace: NAMESPACE.into(), name: "hookhub-so".into() });
    assert_eq!((change.previous, change.desired_workers), (None, 3));
    assert!(change.reason.starts_with("Target 3 workers"), "{}", change.reason);
    shutdown.trigger();
    running.wait().await.unwrap();
}

/// `report` with every reading at least a millisecond after those of `before`.
fn later_than(before: &Report, mut report: Report) -> Report {
    let at = before.sampled_at_unix_ms + 1;
    report.sampled_at_unix_ms = report.sampled_at_unix_ms.max(at);
    for signals in
        report.control_queues.iter_mut().filter_map(|c| c.signals.as_mut()).chain(report.work_item.as_mut())
    {
        signals.sampled_at_unix_ms = signals.sampled_at_unix_ms.max(at);
    }
    report
}

#[tokio::test]
async fn an_unusable_connection_is_invalid_argument_naming_its_key() {
    let aggregator = start(args()).await;
    let so = scaled_object("BrokenHub", &[("connection", "this is not a connection string")]);
    let status = aggregator.keda.clone().is_active(so).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("scalerMetadata.connection:"), "{}", status.message());
    assert!(!status.message().contains("this is not a connection string"), "secrets stay out of answers");
    aggregator.stop().await;
}

#[tokio::test]
async fn hubs_shows_each_hubs_decision_and_its_reason() {
    let aggregator = start(args()).await;
    aggregator.submit(whole_hub_report("app-1", "StatusHub", 25)).await;
    eventually("a decision for StatusHub", || async {
        aggregator.metric("StatusHub").await.is_ok_and(|v| v >= 3.0)
    })
    .await;
    let (status, body) = aggregator.http_get("/hubs").await;
    assert_eq!(status, 200);
    let hubs: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let hub = hubs.as_array().unwrap().iter().find(|h| h["task_hub"] == "StatusHub").expect("listed");
    assert_eq!(hub["namespace"], NAMESPACE);
    assert_eq!(hub["algorithm"], "durable");
    assert_eq!(hub["active"], true);
    assert_eq!(hub["desired_workers"], 3, "25 work items at 10 per worker: {hub}");
    assert_eq!(hub["live_pods"], 1);
    assert_eq!(hub["covered_partitions"], serde_json::json!([0, 1, 2, 3]));
    assert!(hub["reason"].as_str().is_some_and(|r| r.contains("25")), "{hub}");
    aggregator.stop().await;
}
