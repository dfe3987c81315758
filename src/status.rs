//! `durable-scaler status` (also `kubectl durable-scaler status`): every aggregator replica's
//! `/hubs`, read through the Kubernetes API server's pod proxy with the user's kubeconfig, as
//! one row per task hub.
//!
//! The replicas are the endpoints of the aggregator's Service: its EndpointSlices (label
//! `kubernetes.io/service-name`, discovery.k8s.io/v1), ready or not, each a Pod with the
//! Service port's number. Each one's `/hubs` is read at
//! `/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/hubs` (kubernetes
//! pkg/registry/core/pod/strategy.go `ResourceLocation`: the id is `name`, `name:port` or
//! `scheme:name:port`), so it needs no port-forward and no Service of type LoadBalancer, only
//! `list` on `endpointslices` and `get` on `pods/proxy` in durable-scaler's namespace. A
//! replica that cannot be read is named with the API server's answer (a pod it cannot dial:
//! 503 "error trying to reach service: ...", k8s.io/apimachinery pkg/util/proxy/transport.go),
//! never left out.
//!
//! Replicas hold no shared state (each hears every sidecar), so they usually agree; a row
//! shows the first replica (by pod name) that tracks the hub, and its notes name every
//! replica that sees it otherwise or not at all. `/hubs` is parsed tolerantly: fields it
//! does not know are ignored, missing ones read as empty, so an aggregator of another version
//! still shows.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;

/// Settings of `durable-scaler status`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Only the task hubs of this (app) namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only this task hub (any case).
    #[arg(long)]
    pub hub: Option<String>,
    /// Output: a table, or JSON (`{"replicas": [...], "hubs": [...]}`).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Read again every --interval and print whenever something changed, until Ctrl-C
    /// (JSON: one document per line).
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// How often --watch reads (`2s`, `500ms`).
    #[arg(long, default_value = "2s", value_parser = crate::config::parse_duration)]
    pub interval: Duration,
    /// The kubeconfig context to use (default: the current one; KUBECONFIG is honoured).
    #[arg(long)]
    pub context: Option<String>,
    /// The namespace durable-scaler is installed in.
    #[arg(long, env = "DURABLE_SCALER_NAMESPACE", default_value = "durable-scaler")]
    pub aggregator_namespace: String,
    /// The aggregator's Service, whose endpoints are the replicas.
    #[arg(long, default_value = "durable-scaler-aggregator")]
    pub aggregator_service: String,
    /// The name of the Service port that serves /hubs (the aggregator's HTTP port).
    #[arg(long, default_value = "http")]
    pub port_name: String,
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One row per task hub, then a line per replica that could not be read.
    Table,
    /// One JSON document.
    Json,
}

/// Where a hub's limit comes from, as `/hubs` says it (`metadata`, `reported`, `guess`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsView {
    /// Activities per worker.
    pub max_activities: u32,
    /// Where `max_activities` comes from.
    pub activities_from: String,
    /// Orchestrations per worker.
    pub max_orchestrations: u32,
    /// Where `max_orchestrations` comes from.
    pub orchestrations_from: String,
}

/// One hub as one replica's `/hubs` shows it (`aggregator::registry::HubStatus`), with what
/// `status` prints of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HubView {
    /// The app's namespace.
    pub namespace: String,
    /// The task hub, as configured.
    pub task_hub: String,
    /// `namespace/name` of the ScaledObject that asks about it, once KEDA called.
    pub scaled_object: Option<String>,
    /// IsActive's answer.
    pub active: bool,
    /// The latest decision's worker count.
    pub desired_workers: Option<u32>,
    /// The worker count that decision was taken from.
    pub workers: u32,
    /// The latest decision's reason.
    pub reason: Option<String>,
    /// Partitions live sidecars cover.
    pub covered_partitions: Vec<u32>,
    /// Partitions no live sidecar covers.
    pub uncovered_partitions: Vec<u32>,
    /// Why KEDA's calls would be refused now, if they would.
    pub probe_error: Option<String>,
    /// The per-worker limits and their sources.
    pub limits: LimitsView,
    /// What the user should know.
    pub notes: Vec<String>,
}

/// One aggregator replica and what reading it came to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replica {
    /// Its pod.
    pub pod: String,
    /// Its EndpointSlice condition `ready` (an unknown state counts as ready, as the API says).
    pub ready: bool,
    /// Why its `/hubs` could not be read; `None` when it was.
    pub error: Option<String>,
    /// How many hubs it tracks (when read).
    pub hubs: usize,
}

/// One task hub over every replica: the view of the first replica that tracks it, with notes
/// where the others differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HubRow {
    /// What the first replica (by pod name) that tracks it shows.
    #[serde(flatten)]
    pub view: HubView,
    /// The replicas that track the hub.
    pub seen_by: Vec<String>,
}

/// What one round of reading found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Every replica of the Service, read or not.
    pub replicas: Vec<Replica>,
    /// One row per task hub, by namespace then hub.
    pub hubs: Vec<HubRow>,
}

/// Why no snapshot could be taken.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No kubeconfig, or a broken one.
    #[error("no usable Kubernetes configuration (KUBECONFIG, ~/.kube/config, or in a pod): {0}")]
    Config(String),
    /// The Service's EndpointSlices could not be listed.
    #[error(
        "cannot list the endpoints of Service {namespace}/{service} (needs `list` on endpointslices.discovery.k8s.io in {namespace}): {source}"
    )]
    Endpoints {
        /// durable-scaler's namespace.
        namespace: String,
        /// The aggregator's Service.
        service: String,
        /// The API's answer.
        source: kube::Error,
    },
    /// The Service has no endpoint with the port.
    #[error(
        "Service {namespace}/{service} has no pod endpoints with a port named {port:?}: is durable-scaler installed there (--aggregator-namespace, --aggregator-service, --port-name)?"
    )]
    NoReplicas {
        /// durable-scaler's namespace.
        namespace: String,
        /// The aggregator's Service.
        service: String,
        /// The port name looked for.
        port: String,
    },
}

/// A replica to read: its pod and the port number of its HTTP port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    pod: String,
    port: i32,
    ready: bool,
}

/// The pods behind `args`' Service, each once, by name.
async fn endpoints(client: &kube::Client, args: &Args) -> Result<Vec<Endpoint>, StatusError> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &args.aggregator_namespace);
    // discovery.k8s.io/v1 LabelServiceName: every slice of a Service carries this label.
    let selector = format!("kubernetes.io/service-name={}", args.aggregator_service);
    let slices = api.list(&ListParams::default().labels(&selector)).await.map_err(|source| {
        StatusError::Endpoints {
            namespace: args.aggregator_namespace.clone(),
            service: args.aggregator_service.clone(),
            source,
        }
    })?;
    let mut found = BTreeMap::new();
    for slice in slices.items {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(args.port_name.as_str()))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in slice.endpoints.into_iter().flatten() {
            let Some(target) = endpoint.target_ref.filter(|t| t.kind.as_deref() == Some("Pod")) else {
                continue;
            };
            let Some(pod) = target.name else { continue };
            let ready = endpoint.conditions.and_then(|c| c.ready).unwrap_or(true);
            // A dual-stack Service has a slice per address family: the pod once.
            found.entry(pod.clone()).or_insert(Endpoint { pod, port, ready });
        }
    }
    if found.is_empty() {
        return Err(StatusError::NoReplicas {
            namespace: args.aggregator_namespace.clone(),
            service: args.aggregator_service.clone(),
            port: args.port_name.clone(),
        });
    }
    Ok(found.into_values().collect())
}

/// The API server's pod proxy path of `path` on `pod`'s `port`.
fn proxy_path(namespace: &str, pod: &str, port: i32, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/{path}")
}

/// One replica's `/hubs`, or why it could not be read.
async fn read_hubs(
    client: &kube::Client,
    namespace: &str,
    endpoint: &Endpoint,
) -> Result<Vec<HubView>, String> {
    let request = axum::http::Request::get(proxy_path(namespace, &endpoint.pod, endpoint.port, "hubs"))
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client.request_text(request).await.map_err(|e| match e {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => other.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| format!("its /hubs is not the JSON expected: {e}"))
}

/// Reads every replica and merges their hubs, filtered by `args`.
pub async fn snapshot(client: &kube::Client, args: &Args) -> Result<Snapshot, StatusError> {
    let endpoints = endpoints(client, args).await?;
    let read =
        futures::future::join_all(endpoints.iter().map(|e| read_hubs(client, &args.aggregator_namespace, e)))
            .await;
    let wanted = |hub: &HubView| {
        args.namespace.as_deref().is_none_or(|n| n == hub.namespace)
            && args.hub.as_deref().is_none_or(|h| h.eq_ignore_ascii_case(&hub.task_hub))
    };
    let mut replicas = Vec::new();
    let mut by_hub: BTreeMap<(String, String), Vec<(String, HubView)>> = BTreeMap::new();
    for (endpoint, result) in endpoints.iter().zip(read) {
        let (error, hubs) = match result {
            Ok(hubs) => (None, hubs),
            Err(e) => (Some(e), Vec::new()),
        };
        replicas.push(Replica { pod: endpoint.pod.clone(), ready: endpoint.ready, error, hubs: hubs.len() });
        for hub in hubs.into_iter().filter(wanted) {
            let key = (hub.namespace.clone(), hub.task_hub.to_lowercase());
            by_hub.entry(key).or_default().push((endpoint.pod.clone(), hub));
        }
    }
    let read_ok: Vec<&str> = replicas.iter().filter(|r| r.error.is_none()).map(|r| r.pod.as_str()).collect();
    let hubs = by_hub.into_values().filter_map(|views| merge(views, &read_ok)).collect();
    Ok(Snapshot { replicas, hubs })
}

/// One row from the replicas' views of a hub (in pod order): the first view, with a note
/// for each replica that decided otherwise and each readable replica that does not track it.
fn merge(views: Vec<(String, HubView)>, readable: &[&str]) -> Option<HubRow> {
    let seen_by: Vec<String> = views.iter().map(|(pod, _)| pod.clone()).collect();
    let mut views = views.into_iter();
    let (_, mut view) = views.next()?;
    for (pod, other) in views {
        if (other.desired_workers, other.active, other.workers)
            != (view.desired_workers, view.active, view.workers)
        {
            view.notes.push(format!(
                "replica {pod} sees it otherwise: {} workers -> {}, active {}",
                other.workers,
                desired(other.desired_workers),
                other.active
            ));
        }
    }
    for pod in readable.iter().filter(|p| !seen_by.iter().any(|s| s == *p)) {
        view.notes.push(format!("replica {pod} does not track this hub (no report or KEDA call reached it)"));
    }
    Some(HubRow { view, seen_by })
}

fn desired(value: Option<u32>) -> String {
    value.map_or_else(|| "?".to_owned(), |d| d.to_string())
}

/// The snapshot as the table `status` prints: a header, a row per hub, then a line per
/// replica that could not be read.
pub fn table(snapshot: &Snapshot) -> String {
    const HEADER: [&str; 9] =
        ["NAMESPACE", "HUB", "SCALEDOBJECT", "WORKERS", "ACTIVE", "PARTITIONS", "LIMITS", "REASON", "NOTES"];
    let rows: Vec<[String; 9]> = snapshot
        .hubs
        .iter()
        .map(|row| {
            let hub = &row.view;
            let total = hub.covered_partitions.len() + hub.uncovered_partitions.len();
            let mut partitions = format!("{}/{total}", hub.covered_partitions.len());
            if !hub.uncovered_partitions.is_empty() {
                let list: Vec<String> = hub.uncovered_partitions.iter().map(u32::to_string).collect();
                partitions.push_str(&format!(" (uncovered {})", list.join(",")));
            }
            let limits = format!(
                "act {} ({}), orch {} ({})",
                hub.limits.max_activities,
                hub.limits.activities_from,
                hub.limits.max_orchestrations,
                hub.limits.orchestrations_from
            );
            let mut notes = hub.notes.clone();
            if let Some(error) = &hub.probe_error {
                notes.insert(0, format!("probe: {error}"));
            }
            [
                hub.namespace.clone(),
                hub.task_hub.clone(),
                hub.scaled_object.clone().unwrap_or_else(|| "-".to_owned()),
                format!("{} -> {}", hub.workers, desired(hub.desired_workers)),
                if hub.active { "yes" } else { "no" }.to_owned(),
                partitions,
                limits,
                hub.reason.clone().unwrap_or_else(|| "-".to_owned()),
                if notes.is_empty() { "-".to_owned() } else { notes.join("; ") },
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&HEADER.map(str::to_owned));
    for row in &rows {
        out.push_str(&line(row));
    }
    if rows.is_empty() {
        out.push_str("(no task hubs tracked");
        out.push_str(if snapshot.replicas.iter().any(|r| r.error.is_none()) {
            ")\n"
        } else {
            ": no replica could be read)\n"
        });
    }
    for replica in &snapshot.replicas {
        if let Some(error) = &replica.error {
            let ready = if replica.ready { "" } else { " (not ready)" };
            out.push_str(&format!("replica {}{ready}: unreachable: {error}\n", replica.pod));
        }
    }
    out
}

/// The snapshot as `-o json` prints it (compact under --watch: one document per line).
fn json(snapshot: &Snapshot, compact: bool) -> String {
    let text = if compact { serde_json::to_string(snapshot) } else { serde_json::to_string_pretty(snapshot) };
    text.unwrap_or_default() + "\n"
}

async fn client(context: Option<&str>) -> Result<kube::Client, StatusError> {
    let mut config = match context {
        Some(context) => {
            let options =
                kube::config::KubeConfigOptions { context: Some(context.to_owned()), ..Default::default() };
            kube::Config::from_kubeconfig(&options).await.map_err(|e| StatusError::Config(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| StatusError::Config(e.to_string()))?,
    };
    // A 503 from the pod proxy is a replica's answer ("error trying to reach service"), to be
    // shown at once: kube retries 429/503/504 with back-off by default.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| StatusError::Config(e.to_string()))
}

/// `durable-scaler status` from the command line, on a runtime of its own. Without the
/// roles' log subscriber: it prints its own errors, and a client library's log lines (kube
/// logs every non-2xx answer, such as the 503 of a replica it reports anyway) are not for the
/// user.
pub(crate) fn main(args: Args) -> ExitCode {
    crate::telemetry::install_crypto_provider();
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => {
            eprintln!("durable-scaler status: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `durable-scaler status`: exit status 0 when every replica was read, 1 when one could
/// not be (it is named) or nothing could be listed.
async fn run(args: Args) -> ExitCode {
    let client = match client(args.context.as_deref()).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("durable-scaler status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let render = |snapshot: &Snapshot| match args.output {
        Output::Table => table(snapshot),
        Output::Json => json(snapshot, args.watch),
    };
    if !args.watch {
        return match snapshot(&client, &args).await {
            Ok(snapshot) => {
                print!("{}", render(&snapshot));
                exit_status(&snapshot)
            }
            Err(e) => {
                eprintln!("durable-scaler status: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let shutdown = Shutdown::on_signal();
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    while shutdown.tick(&mut ticker).await {
        let text = match snapshot(&client, &args).await {
            Ok(snapshot) => render(&snapshot),
            Err(e) => format!("durable-scaler status: {e}\n"),
        };
        if last.as_ref() != Some(&text) {
            if args.output == Output::Table {
                let now = time::OffsetDateTime::now_utc();
                let stamp = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
                print!("\n# {stamp}\n");
            }
            print!("{text}");
            last = Some(text);
        }
    }
    ExitCode::SUCCESS
}

fn exit_status(snapshot: &Snapshot) -> ExitCode {
    if snapshot.replicas.iter().all(|r| r.error.is_none()) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pod_desired: Option<u32>, active: bool) -> HubView {
        HubView {
            namespace: "orders".into(),
            task_hub: "OrdersHub".into(),
            scaled_object: Some("orders/orders-func".into()),
            active,
            desired_workers: pod_desired,
            workers: 2,
            reason: Some("2 workers: activities ceil(30/20) = 2".into()),
            covered_partitions: vec![0, 1, 3],
            uncovered_partitions: vec![2],
            limits: LimitsView {
                max_activities: 20,
                activities_from: "reported".into(),
                max_orchestrations: 10,
                orchestrations_from: "metadata".into(),
            },
            ..HubView::default()
        }
    }

    #[test]
    fn hubs_json_with_fields_this_version_does_not_know_or_lacks_still_parses() {
        let text = r#"[{"namespace": "orders", "task_hub": "OrdersHub", "active": true, "workers": 1,
            "desired_workers": 3, "limits": {"max_activities": 20, "activities_from": "reported",
            "processor_count": 2, "future_field": 1}, "storage": {"credential": "connection string"},
            "some_new_field": [1, 2]}]"#;
        let hubs: Vec<HubView> = serde_json::from_str(text).unwrap();
        assert_eq!(hubs[0].desired_workers, Some(3));
        assert_eq!(hubs[0].limits.max_activities, 20);
        assert_eq!(hubs[0].limits.orchestrations_from, "", "missing reads as empty");
    }

    #[test]
    fn a_row_shows_the_first_replica_and_notes_where_the_others_differ_or_are_missing() {
        let views =
            vec![("agg-a".to_owned(), view(Some(3), true)), ("agg-b".to_owned(), view(Some(4), true))];
        let row = merge(views, &["agg-a", "agg-b", "agg-c"]).unwrap();
        assert_eq!(row.view.desired_workers, Some(3));
        assert_eq!(row.seen_by, ["agg-a", "agg-b"]);
        assert_eq!(
            row.view.notes,
            [
                "replica agg-b sees it otherwise: 2 workers -> 4, active true",
                "replica agg-c does not track this hub (no report or KEDA call reached it)",
            ]
        );
        let agreeing =
            vec![("agg-a".to_owned(), view(Some(3), true)), ("agg-b".to_owned(), view(Some(3), true))];
        assert!(merge(agreeing, &["agg-a", "agg-b"]).unwrap().view.notes.is_empty());
    }

    #[test]
    fn the_table_has_a_row_per_hub_and_names_each_unreachable_replica() {
        let snapshot = Snapshot {
            replicas: vec![
                Replica { pod: "agg-a".into(), ready: true, error: None, hubs: 1 },
                Replica {
                    pod: "agg-b".into(),
                    ready: false,
                    error: Some("error trying to reach service: dial tcp 10.0.0.7:8080: connect: connection refused (HTTP 503)".into()),
                    hubs: 0,
                },
            ],
            hubs: vec![HubRow { view: view(Some(3), true), seen_by: vec!["agg-a".into()] }],
        };
        let text = table(&snapshot);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   HUB         SCALEDOBJECT"), "{text}");
        assert!(
            lines[1].contains("orders/orders-func   2 -> 3    yes      3/4 (uncovered 2)   act 20 (reported), orch 10 (metadata)"),
            "{text}"
        );
        assert_eq!(
            lines[2],
            "replica agg-b (not ready): unreachable: error trying to reach service: dial tcp 10.0.0.7:8080: connect: connection refused (HTTP 503)"
        );
        assert_eq!(
            proxy_path("durable-scaler", "agg-a", 8080, "hubs"),
            "/api/v1/namespaces/durable-scaler/pods/agg-a:8080/proxy/hubs"
        );
    }
}
