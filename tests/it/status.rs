//! `durable-scaler status` (and `kubectl durable-scaler status`) end to end: the real binary
//! with a kubeconfig pointing at a fake API server on loopback, in front of real aggregators.
//!
//! The fake answers the two calls `status` makes the way kube-apiserver does, each endpoint
//! saying which behaviour it stands for; the pod proxy forwards to a real aggregator's HTTP
//! port, so the `/hubs` JSON parsed is the one the aggregator really serves.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::aggregator_support::{self as support, DEADLINE, NAMESPACE, TestAggregator};

const SYSTEM: &str = "durable-scaler";
const SERVICE: &str = "durable-scaler-aggregator";
/// The aggregator container's HTTP port, as its Pod declares it and the Service's
/// EndpointSlices carry it.
const HTTP_PORT: u16 = 8080;
const TOKEN: &str = "kubeconfig-user-token";

/// A pod of the fake cluster: where its HTTP port really is (a loopback address standing in
/// for podIP:8080), and its readiness.
#[derive(Clone)]
struct FakePod {
    backend: SocketAddr,
    ready: bool,
}

#[derive(Default)]
struct ApiState {
    /// Every request: method and path with query.
    requests: Vec<(Method, String)>,
    /// The aggregator's pods (the endpoints of its Service), by name.
    pods: HashMap<String, FakePod>,
}

struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeApi {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(ApiState::default()));
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state, server }
    }

    fn add_pod(&self, name: &str, backend: SocketAddr, ready: bool) {
        self.state.lock().unwrap().pods.insert(name.into(), FakePod { backend, ready });
    }

    fn remove_pod(&self, name: &str) {
        self.state.lock().unwrap().pods.remove(name);
    }

    fn requests(&self) -> Vec<(Method, String)> {
        std::mem::take(&mut self.state.lock().unwrap().requests)
    }

    /// A kubeconfig for this server with a bearer token user, written into `dir`.
    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let config = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": format!("http://{}", self.addr)}}],
            "users": [{"name": "tester", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
        });
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }
}

/// A metav1.Status error body, as kube-apiserver returns with every non-2xx answer.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    (code, axum::Json(body)).into_response()
}

/// The EndpointSlice the EndpointSlice controller keeps for the aggregator's Service: one
/// endpoint per selected pod (targetRef kind Pod, conditions.ready), and the Service's ports
/// by name with the target (container) port numbers.
fn endpoint_slice(pods: &HashMap<String, FakePod>) -> Value {
    let mut names: Vec<&String> = pods.keys().collect();
    names.sort();
    let endpoints: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ready = pods[*name].ready;
            json!({
                "addresses": [format!("10.244.0.{}", i + 10)],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "node-1",
                "targetRef": {"kind": "Pod", "name": name, "namespace": SYSTEM, "uid": format!("uid-{name}")},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{SERVICE}-x7k2p"), "namespace": SYSTEM, "resourceVersion": "7",
                     "labels": {"kubernetes.io/service-name": SERVICE,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "keda", "port": 4370, "protocol": "TCP", "appProtocol": "grpc"},
            {"name": "reports", "port": 4371, "protocol": "TCP", "appProtocol": "grpc"},
            {"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
        ],
    })
}

async fn handle(
    State(state): State<Arc<Mutex<ApiState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default().to_owned();
    let pods = {
        let mut state = state.lock().unwrap();
        let logged = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
        state.requests.push((method.clone(), logged));
        state.pods.clone()
    };
    // Authentication: the kubeconfig user's bearer token, else 401 with a Status.
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        // GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=k=v:
        // 200 with an EndpointSliceList of the slices whose labels match (the selector this
        // server understands: one equality, as `status` sends).
        (Method::GET, ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"]) => {
            let selector = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "labelSelector")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let items: Vec<Value> = if *ns == SYSTEM && !pods.is_empty() {
                let slice = endpoint_slice(&pods);
                let matches =
                    selector.split_once('=').is_some_and(|(k, v)| slice["metadata"]["labels"][k] == v);
                if matches { vec![slice] } else { vec![] }
            } else {
                vec![]
            };
            axum::Json(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                              "metadata": {"resourceVersion": "7"}, "items": items}))
            .into_response()
        }
        // GET /api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/{path}: the pod proxy
        // (pkg/registry/core/pod/strategy.go `ResourceLocation`: the id is name, name:port or
        // scheme:name:port). An unknown pod: 404 NotFound. A pod whose port does not answer:
        // 503 ServiceUnavailable "error trying to reach service: <dial error>"
        // (k8s.io/apimachinery pkg/util/proxy/transport.go). Otherwise the pod's answer,
        // status and body as they are.
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", id, "proxy", rest @ ..]) => {
            let (name, port) = match id.rsplit_once(':') {
                Some((name, port)) => (name.rsplit(':').next().unwrap_or(name), port.parse::<u16>().ok()),
                None => (*id, None),
            };
            let Some(pod) = pods.get(name).filter(|_| *ns == SYSTEM) else {
                return status(StatusCode::NOT_FOUND, "NotFound", &format!("pods \"{name}\" not found"));
            };
            let dial = format!("10.244.0.1:{}", port.unwrap_or(HTTP_PORT));
            if port != Some(HTTP_PORT) {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("error trying to reach service: dial tcp {dial}: connect: connection refused"),
                );
            }
            let url = format!("http://{}/{}", pod.backend, rest.join("/"));
            match reqwest::Client::new().get(url).send().await {
                Ok(answer) => {
                    let code = StatusCode::from_u16(answer.status().as_u16()).unwrap();
                    (code, answer.bytes().await.unwrap_or_default()).into_response()
                }
                Err(e) if e.is_connect() => status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("error trying to reach service: dial tcp {dial}: connect: connection refused"),
                ),
                Err(e) => status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("error trying to reach service: {e}"),
                ),
            }
        }
        _ => status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource"),
    }
}

/// A port nothing listens on: a pod whose aggregator is down.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// Two replicas that hear the same sidecar of OrdersHub (asked about by KEDA), replica a also
/// a sidecar of OtherHub in another namespace, and a third pod that does not answer.
struct Cluster {
    api: FakeApi,
    /// Replica a, kept for the test's length (its servers run until the process ends).
    _a: TestAggregator,
    b: TestAggregator,
    reporting: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.reporting.abort();
    }
}

fn other_hub_report() -> durable_scaler::proto::report::Report {
    let mut report = support::whole_hub_report("other-func-1", "OtherHub", 0);
    report.pod.as_mut().unwrap().namespace = "billing".into();
    report
}

async fn cluster() -> Cluster {
    durable_scaler::telemetry::install_crypto_provider();
    let a = support::start(support::args()).await;
    let b = support::start(support::args()).await;
    let api = FakeApi::start().await;
    api.add_pod("durable-scaler-aggregator-a", a.http_addr, true);
    api.add_pod("durable-scaler-aggregator-b", b.http_addr, true);
    api.add_pod("durable-scaler-aggregator-c", closed_port().await, false);
    // Sidecars report every 300 ms (their reports say 1 s), so coverage stays whole.
    let (reports_a, reports_b) = (a.reports.clone(), b.reports.clone());
    let reporting = tokio::spawn(async move {
        loop {
            let report = support::whole_hub_report("orders-func-1", "OrdersHub", 5);
            reports_a.clone().submit(report.clone()).await.unwrap();
            reports_b.clone().submit(report).await.unwrap();
            reports_a.clone().submit(other_hub_report()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    for replica in [&a, &b] {
        support::eventually("KEDA's call answered", || async {
            replica.is_active("OrdersHub").await.is_ok()
        })
        .await;
        support::eventually("a decision on /hubs", || async {
            let (_, body) = replica.http_get("/hubs").await;
            let hubs: Value = serde_json::from_str(&body).unwrap();
            hubs.as_array()
                .unwrap()
                .iter()
                .any(|h| h["task_hub"] == "OrdersHub" && h["desired_workers"].is_u64())
        })
        .await;
    }
    Cluster { api, _a: a, b, reporting }
}

/// `durable-scaler status ARGS` with `kubeconfig`: exit status, stdout, stderr.
async fn status_command(
    program: &Path,
    path_env: Option<&str>,
    kubeconfig: &Path,
    args: &[&str],
) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(program);
    command.args(args).env("KUBECONFIG", kubeconfig).env_remove("DURABLE_SCALER_NAMESPACE");
    if let Some(path) = path_env {
        command.env("PATH", path);
    }
    let output = command.output().await.unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn status_of(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    status_command(Path::new(env!("CARGO_BIN_EXE_durable-scaler")), None, kubeconfig, &all).await
}

const UNREACHABLE: &str = "replica durable-scaler-aggregator-c (not ready): unreachable: error trying to reach service: \
     dial tcp 10.244.0.1:8080: connect: connection refused (HTTP 503)";

#[tokio::test(flavor = "multi_thread")]
async fn the_table_has_a_row_per_hub_from_every_replica_and_names_the_one_that_cannot_be_reached() {
    let cluster = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.api.kubeconfig(dir.path());
    cluster.api.requests();
    let (code, stdout, stderr) = status_of(&kubeconfig, &[]).await;
    assert_eq!(code, 1, "a replica could not be read:\n{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE   HUB"), "{stdout}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAMESPACE", "HUB", "SCALEDOBJECT", "WORKERS", "ACTIVE", "PARTITIONS", "LIMITS", "REASON", "NOTES"]
    );
    // Sorted by namespace: billing/OtherHub (replica a only, no ScaledObject), apps/OrdersHub.
    let orders =
        lines.iter().find(|l| l.starts_with(&format!("{NAMESPACE} "))).unwrap_or_else(|| panic!("{stdout}"));
    let columns: Vec<&str> = orders.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(&columns[..3], [NAMESPACE, "OrdersHub", "apps/ordershub-so"], "{orders}");
    assert!(columns[3].starts_with("1 -> "), "one live sidecar pod is the worker count: {orders}");
    assert_eq!(columns[4], "yes", "5 work items are visible: {orders}");
    assert_eq!(columns[5], "4/4", "{orders}");
    assert_eq!(columns[6], "act 10 (guess), orch 10 (guess)", "{orders}");
    let other = lines.iter().find(|l| l.starts_with("billing ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(other.contains("OtherHub") && other.contains("   -   "), "no ScaledObject asked: {other}");
    assert!(
        other.contains("replica durable-scaler-aggregator-b does not track this hub"),
        "replica b heard no sidecar of it: {other}"
    );
    assert_eq!(*lines.last().unwrap(), UNREACHABLE, "{stdout}");

    // Exactly the calls `status` is meant to make: the Service's EndpointSlices, then each
    // pod's /hubs through the pod proxy on the slice's http port.
    let requests: BTreeSet<String> =
        cluster.api.requests().into_iter().map(|(m, p)| format!("{m} {p}")).collect();
    assert_eq!(
        requests,
        BTreeSet::from([
            format!(
                "GET /apis/discovery.k8s.io/v1/namespaces/{SYSTEM}/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3D{SERVICE}"
            ),
            format!("GET /api/v1/namespaces/{SYSTEM}/pods/durable-scaler-aggregator-a:8080/proxy/hubs"),
            format!("GET /api/v1/namespaces/{SYSTEM}/pods/durable-scaler-aggregator-b:8080/proxy/hubs"),
            format!("GET /api/v1/namespaces/{SYSTEM}/pods/durable-scaler-aggregator-c:8080/proxy/hubs"),
        ])
    );

    // All replicas read: exit status 0, no unreachable line.
    cluster.api.remove_pod("durable-scaler-aggregator-c");
    let (code, stdout, _) = status_of(&kubeconfig, &[]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(!stdout.contains("unreachable"), "{stdout}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_output_filters_by_namespace_and_hub_and_lists_every_replica() {
    let cluster = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.api.kubeconfig(dir.path());
    let (code, stdout, stderr) = status_of(&kubeconfig, &["-o", "json"]).await;
    assert_eq!(code, 1, "{stderr}");
    let all: Value = serde_json::from_str(&stdout).unwrap();
    let replicas = all["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{all}");
    assert_eq!(
        replicas[0],
        json!({"pod": "durable-scaler-aggregator-a", "ready": true, "error": null, "hubs": 2})
    );
    assert_eq!(replicas[1]["hubs"], 1);
    assert_eq!(replicas[2]["ready"], false);
    assert!(replicas[2]["error"].as_str().unwrap().contains("connection refused"), "{all}");
    let hubs: Vec<(&str, &str)> = all["hubs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["namespace"].as_str().unwrap(), h["task_hub"].as_str().unwrap()))
        .collect();
    assert_eq!(hubs, [(NAMESPACE, "OrdersHub"), ("billing", "OtherHub")]);
    let orders = &all["hubs"][0];
    assert_eq!(orders["seen_by"], json!(["durable-scaler-aggregator-a", "durable-scaler-aggregator-b"]));
    assert_eq!(orders["covered_partitions"], json!([0, 1, 2, 3]));
    assert!(orders["reason"].as_str().is_some_and(|r| !r.is_empty()), "{orders}");

    let (_, stdout, _) = status_of(&kubeconfig, &["-o", "json", "--namespace", "billing"]).await;
    let only: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(only["hubs"].as_array().unwrap().len(), 1);
    assert_eq!(only["hubs"][0]["task_hub"], "OtherHub");
    let (_, stdout, _) = status_of(&kubeconfig, &["-o", "json", "--hub", "ordershub"]).await;
    let only: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(only["hubs"].as_array().unwrap().len(), 1, "any case: {only}");
    assert_eq!(only["hubs"][0]["task_hub"], "OrdersHub");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_cannot_be_listed_is_an_error_naming_what_to_check() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let (code, stdout, stderr) = status_of(&kubeconfig, &[]).await;
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.contains(
            "Service durable-scaler/durable-scaler-aggregator has no pod endpoints with a port named \"http\""
        ),
        "{stderr}"
    );
    // Credentials the API server refuses: the error says which permission is needed.
    std::fs::write(&kubeconfig, std::fs::read_to_string(&kubeconfig).unwrap().replace(TOKEN, "wrong"))
        .unwrap();
    let (code, _, stderr) = status_of(&kubeconfig, &[]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot list the endpoints of Service durable-scaler/durable-scaler-aggregator"),
        "{stderr}"
    );
    assert!(stderr.contains("Unauthorized"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_prints_again_when_a_replica_learns_of_a_new_hub() {
    let cluster = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.api.kubeconfig(dir.path());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .args(["status", "-o", "json", "--watch", "--interval", "200ms"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["hubs"].as_array().unwrap().len(), 2);
    cluster.b.submit(support::whole_hub_report("late-func-1", "LateHub", 1)).await;
    loop {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("a new document within the deadline")
            .unwrap()
            .unwrap();
        let snapshot: Value = serde_json::from_str(&line).unwrap();
        if snapshot["hubs"].as_array().unwrap().iter().any(|h| h["task_hub"] == "LateHub") {
            break;
        }
    }
    child.kill().await.unwrap();
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_runs_it_as_the_durable_scaler_plugin() {
    if !crate::tools::available("kubectl", &["version", "--client"], "scripts/test asks for kubectl") {
        return;
    }
    let cluster = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.api.kubeconfig(dir.path());
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_durable-scaler"),
        bin.join(durable_scaler::cli::KUBECTL_PLUGIN),
    )
    .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let kubectl = Path::new("kubectl");

    let (_, listed, _) = status_command(kubectl, Some(&path), &kubeconfig, &["plugin", "list"]).await;
    assert!(listed.contains(&bin.join("kubectl-durable_scaler").display().to_string()), "{listed}");

    let (code, stdout, stderr) =
        status_command(kubectl, Some(&path), &kubeconfig, &["durable-scaler", "status", "-o", "json"]).await;
    assert_eq!(code, 1, "exit status passed through kubectl: {stderr}");
    let through_kubectl: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    let hubs: Vec<&Value> =
        through_kubectl["hubs"].as_array().unwrap().iter().map(|h| &h["task_hub"]).collect();
    assert_eq!(hubs, [&json!("OrdersHub"), &json!("OtherHub")]);
    assert_eq!(through_kubectl["replicas"].as_array().unwrap().len(), 3);

    let (_, help, _) =
        status_command(kubectl, Some(&path), &kubeconfig, &["durable-scaler", "status", "--help"]).await;
    assert!(help.contains("Usage: kubectl durable-scaler status"), "{help}");
    drop(cluster);
}
