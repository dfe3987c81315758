//! The per-worker limits and the storage account a hub is scaled with, through a real
//! aggregator: limits reported by pods, set by the trigger, or guessed; and wsugarman's
//! account-name metadata turned into the cold probe's endpoints and credential.
//!
//! Azurite cannot check Entra ID tokens, so the account-name test checks what the probe is
//! configured with (endpoints, authority, credential kind) and that, without a workload
//! identity in the process, it says so instead of reading; nothing leaves loopback.

use durable_scaler::proto::report::WorkerLimits;
use serde_json::Value;

use crate::aggregator_support::{args, eventually, scaled_object, signals, start, whole_hub_report};

/// A report of a whole hub (P = 4) with `work_items` queued, from a pod whose app sees `cpus`.
fn report_with_cpus(
    pod: &str,
    hub: &str,
    work_items: u64,
    cpus: Option<u32>,
) -> durable_scaler::proto::report::Report {
    let mut r = whole_hub_report(pod, hub, 0);
    r.work_item = Some(signals(work_items, 32, 50));
    r.limits = cpus.map(|cpus| WorkerLimits {
        processor_count: cpus,
        max_activities: 10 * cpus,
        max_orchestrations: 10 * cpus,
        ..Default::default()
    });
    r
}

/// The `/hubs` entry of `hub`, once listed.
async fn hub_status(aggregator: &crate::aggregator_support::TestAggregator, hub: &str) -> Option<Value> {
    let (_, body) = aggregator.http_get("/hubs").await;
    let hubs: Value = serde_json::from_str(&body).ok()?;
    hubs.as_array()?.iter().find(|h| h["task_hub"] == hub).cloned()
}

/// Waits until `hub`'s decision asks for `workers`; returns its status.
async fn decided(aggregator: &crate::aggregator_support::TestAggregator, hub: &str, workers: u64) -> Value {
    eventually(&format!("{hub} asks for {workers} workers"), || async {
        hub_status(aggregator, hub).await.is_some_and(|h| h["desired_workers"] == workers)
    })
    .await;
    hub_status(aggregator, hub).await.expect("listed")
}

#[tokio::test]
async fn a_pod_with_two_cpus_halves_the_workers_asked_for_200_activities() {
    let aggregator = start(args()).await;
    for hub in ["OneCpuHub", "TwoCpuHub"] {
        aggregator
            .keda
            .clone()
            .get_metric_spec(scaled_object(hub, &[("scaleAlgorithm", "target")]))
            .await
            .unwrap();
    }
    aggregator.submit(report_with_cpus("one-0", "OneCpuHub", 200, Some(1))).await;
    aggregator.submit(report_with_cpus("two-0", "TwoCpuHub", 200, Some(2))).await;
    let one = decided(&aggregator, "OneCpuHub", 20).await;
    let two = decided(&aggregator, "TwoCpuHub", 10).await;
    assert_eq!(two["limits"]["max_activities"], 20, "{two}");
    assert_eq!(two["limits"]["activities_from"], "reported", "{two}");
    assert_eq!(two["limits"]["processor_count"], 2, "{two}");
    assert_eq!(one["limits"]["max_activities"], 10, "{one}");
    aggregator.stop().await;
}

#[tokio::test]
async fn explicit_metadata_wins_over_the_reported_limits() {
    let aggregator = start(args()).await;
    let so = scaled_object("ExplicitHub", &[("scaleAlgorithm", "target"), ("maxActivitiesPerWorker", "5")]);
    aggregator.keda.clone().get_metric_spec(so).await.unwrap();
    aggregator.submit(report_with_cpus("pod-0", "ExplicitHub", 200, Some(2))).await;
    let hub = decided(&aggregator, "ExplicitHub", 40).await;
    assert_eq!(hub["limits"]["max_activities"], 5, "{hub}");
    assert_eq!(hub["limits"]["activities_from"], "metadata", "{hub}");
    assert_eq!(hub["limits"]["orchestrations_from"], "reported", "{hub}");
    aggregator.stop().await;
}

#[tokio::test]
async fn without_reports_of_limits_or_metadata_the_limits_are_a_noted_guess() {
    let aggregator = start(args()).await;
    aggregator
        .keda
        .clone()
        .get_metric_spec(scaled_object("GuessHub", &[("scaleAlgorithm", "target")]))
        .await
        .unwrap();
    // An older sidecar: no limits field.
    aggregator.submit(report_with_cpus("pod-0", "GuessHub", 200, None)).await;
    let hub = decided(&aggregator, "GuessHub", 20).await;
    assert_eq!(
        (hub["limits"]["max_activities"].clone(), hub["limits"]["max_orchestrations"].clone()),
        (10.into(), 10.into())
    );
    assert_eq!(hub["limits"]["activities_from"], "guess", "{hub}");
    let notes = hub["notes"].as_array().expect("notes");
    assert!(notes.iter().any(|n| n.as_str().is_some_and(|n| n.contains("a guess"))), "{hub}");
    aggregator.stop().await;
}

#[tokio::test]
async fn an_account_name_only_scaled_object_gets_a_probe_for_its_cloud_with_workload_identity() {
    let aggregator = start(args()).await;
    let mut so = scaled_object("Unused", &[("accountName", "ordersprod"), ("useManagedIdentity", "true")]);
    // wsugarman's minimal ScaledObject names no task hub either.
    so.scaler_metadata.remove("taskHubName");
    aggregator.keda.clone().get_metric_spec(so).await.unwrap();
    eventually("the probe's failure to get a credential on /hubs", || async {
        hub_status(&aggregator, "TestHubName").await.is_some_and(|h| h["probe_error"].is_string())
    })
    .await;
    let hub = hub_status(&aggregator, "TestHubName").await.expect("listed");
    assert_eq!(hub["storage"]["credential"], "workload identity", "{hub}");
    assert_eq!(
        hub["storage"]["endpoints"],
        serde_json::json!([
            "https://ordersprod.blob.core.windows.net",
            "https://ordersprod.queue.core.windows.net",
            "https://ordersprod.table.core.windows.net"
        ])
    );
    assert_eq!(hub["storage"]["authority_host"], "https://login.microsoftonline.com/", "{hub}");
    // This test process has no AZURE_FEDERATED_TOKEN_FILE: the probe says what it lacks.
    let error = hub["probe_error"].as_str().unwrap_or_default();
    assert!(error.contains("accountName ordersprod needs a workload identity"), "{hub}");
    let notes = hub["notes"].as_array().expect("notes");
    assert!(notes.iter().any(|n| n.as_str().is_some_and(|n| n.contains("TestHubName"))), "{hub}");
    aggregator.stop().await;
}

#[tokio::test]
async fn a_government_cloud_account_uses_its_suffix_authority_and_client_id() {
    let aggregator = start(args()).await;
    let so = scaled_object(
        "GovHub",
        &[
            ("accountName", "ordersgov"),
            ("useManagedIdentity", "true"),
            ("cloud", "AzureUSGovernmentCloud"),
            ("clientId", "11111111-2222-3333-4444-555555555555"),
        ],
    );
    aggregator.keda.clone().get_metric_spec(so).await.unwrap();
    let hub = hub_status(&aggregator, "GovHub").await.expect("listed after the KEDA call");
    assert_eq!(hub["storage"]["endpoints"][1], "https://ordersgov.queue.core.usgovcloudapi.net", "{hub}");
    assert_eq!(hub["storage"]["authority_host"], "https://login.microsoftonline.us/", "{hub}");
    assert_eq!(hub["storage"]["client_id"], "11111111-2222-3333-4444-555555555555", "{hub}");
    aggregator.stop().await;
}

#[tokio::test]
async fn a_conflicting_account_is_refused_with_invalid_argument_naming_the_key() {
    let aggregator = start(args()).await;
    let so = scaled_object(
        "BadHub",
        &[("accountName", "orders"), ("useManagedIdentity", "true"), ("connection", "x")],
    );
    let status = aggregator.keda.clone().get_metric_spec(so).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("accountName"), "{}", status.message());
    aggregator.stop().await;
}
