//! The aggregator's Kubernetes side against a fake API server: a small axum server on
//! loopback that answers the few endpoints the aggregator calls the way kube-apiserver does,
//! so the real `kube` client (HTTP, JSON, error mapping) runs in every test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use durable_scaler::aggregator::sources::{
    AuthError, RecommendationChange, RecommendationRecorder, ReportAuthenticator, ReportIdentity,
    ScaledObjectKey, WorkerCountSource, authorize,
};
use durable_scaler::clock::UnixMs;
use durable_scaler::kubernetes::{
    EventRecorder, KubeArgs, KubeContext, KubeWorkerCount, TokenReviewAuthenticator,
};
use durable_scaler::proto::report::PodRef;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// The fake API server
// ---------------------------------------------------------------------------------------------

/// What a token "is" to the fake API server: the claims kube-apiserver would find in it.
#[derive(Clone)]
struct TokenFacts {
    /// The audiences the token was issued for (`aud`).
    audiences: Vec<String>,
    /// `system:serviceaccount:<namespace>:<name>`.
    username: String,
    /// The pod a projected token is bound to (`kubernetes.io.pod.name`), none for a legacy
    /// secret-based token.
    pod: Option<String>,
    /// That pod's uid (`kubernetes.io.pod.uid`).
    pod_uid: String,
    /// `exp`, seconds since the epoch.
    exp: u64,
}

#[derive(Default)]
struct ApiState {
    /// Every request received: verb and path.
    requests: Vec<(Method, String)>,
    /// ScaledObjects by (namespace, name), as stored objects.
    scaled_objects: HashMap<(String, String), Value>,
    /// `status.replicas` of scale subresources by the resource's path (without `/scale`).
    scales: HashMap<String, i32>,
    /// Tokens the "cluster" issued.
    tokens: HashMap<String, TokenFacts>,
    /// Bodies of the Events created.
    events: Vec<Value>,
    /// Answer every request with 500, as an API server whose etcd is gone does.
    failing: bool,
    /// Pods by (namespace, name), as stored objects.
    pods: HashMap<(String, String), Value>,
    /// Every PATCH of a pod, as received.
    pod_patches: Vec<PodPatch>,
    /// Refuse every pod PATCH with 403, as RBAC does without `patch` on pods.
    refuse_pod_patches: bool,
}

/// One PATCH of a pod, as the fake API server received it.
#[derive(Clone, Debug)]
struct PodPatch {
    /// `/api/v1/namespaces/{ns}/pods/{name}`.
    path: String,
    /// The query string (`fieldManager=...`).
    query: String,
    /// The Content-Type header, which says how the API server reads the body.
    content_type: String,
    /// The body.
    body: Value,
    /// When it arrived.
    at: std::time::Instant,
}

/// A fake kube-apiserver on loopback; stops when dropped.
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
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state, server }
    }

    fn client(&self) -> kube::Client {
        client_for(&format!("http://{}", self.addr))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap()
    }

    fn requests(&self) -> Vec<(Method, String)> {
        self.state().requests.clone()
    }

    fn add_scaled_object(&self, namespace: &str, name: &str, scale_target_ref: Value) {
        let object = json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "resourceVersion": "1"},
            "spec": {"scaleTargetRef": scale_target_ref, "minReplicaCount": 0, "maxReplicaCount": 10,
                     "triggers": [{"type": "external", "metadata": {"taskHubName": "hub"}}]},
        });
        self.state().scaled_objects.insert((namespace.into(), name.into()), object);
    }

    fn set_scale(&self, resource_path: &str, replicas: i32) {
        self.state().scales.insert(resource_path.into(), replicas);
    }

    fn issue_token(&self, facts: TokenFacts) -> String {
        let token = jwt(facts.exp);
        self.state().tokens.insert(token.clone(), facts);
        token
    }

    fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    fn add_pod(&self, namespace: &str, name: &str) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "resourceVersion": "1", "labels": {"app": "orders-func"},
                         "annotations": {"durable-scaler.io/status": "{}"}},
            "spec": {"containers": [{"name": "functions", "image": "orders-func:1"}]},
            "status": {"phase": "Running"},
        });
        self.state().pods.insert((namespace.into(), name.into()), pod);
    }

    fn pod(&self, namespace: &str, name: &str) -> Value {
        self.state().pods[&(namespace.to_owned(), name.to_owned())].clone()
    }

    fn pod_patches(&self) -> Vec<PodPatch> {
        self.state().pod_patches.clone()
    }
}

/// A kube client for `url` with the library's crypto provider, as the aggregator builds it.
fn client_for(url: &str) -> kube::Client {
    durable_scaler::telemetry::install_crypto_provider();
    let config = kube::Config::new(url.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// A client for an API server that is down: nothing listens on its port (connection refused).
async fn client_for_api_down() -> kube::Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    client_for(&format!("http://{addr}"))
}

/// A metav1.Status error body, as kube-apiserver returns with every non-2xx answer.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    (code, axum::Json(body)).into_response()
}

async fn handle(
    State(state): State<Arc<Mutex<ApiState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let mut state = state.lock().unwrap();
    state.requests.push((method.clone(), path.clone()));
    if state.failing {
        // Any endpoint while the server cannot reach its storage: 500 with a Status body.
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "etcdserver: request timed out");
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        // GET /apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects/{name}: 200 with the stored
        // object (apiVersion, kind, metadata with uid, spec.scaleTargetRef), 404 NotFound when
        // absent.
        (Method::GET, ["apis", "keda.sh", "v1alpha1", "namespaces", ns, "scaledobjects", name]) => {
            match state.scaled_objects.get(&(ns.to_string(), name.to_string())) {
                Some(object) => axum::Json(object.clone()).into_response(),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("scaledobjects.keda.sh \"{name}\" not found"),
                ),
            }
        }
        // GET /apis/{group}/{version}/namespaces/{ns}/{resource}/{name}/scale: 200 with an
        // autoscaling/v1 Scale (spec.replicas desired, status.replicas running, status.selector),
        // whatever the kind, as long as it has a scale subresource; 404 NotFound otherwise.
        (Method::GET, ["apis", group, version, "namespaces", ns, resource, name, "scale"]) => {
            let key = format!("/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}");
            match state.scales.get(&key) {
                Some(replicas) => axum::Json(json!({
                    "kind": "Scale", "apiVersion": "autoscaling/v1",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"replicas": replicas},
                    "status": {"replicas": replicas, "selector": format!("app={name}")},
                }))
                .into_response(),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{resource}.{group} \"{name}\" not found"),
                ),
            }
        }
        // POST /apis/authentication.k8s.io/v1/tokenreviews: 201 with the review echoed and its
        // status filled in. As kube-apiserver does: status.audiences is the intersection of
        // spec.audiences and the token's audiences, and an empty intersection, an expired
        // token or an unknown one gives authenticated=false with an error (still 201: the
        // review succeeded, the token did not). The user of a projected token carries the
        // bound pod's name and uid in extra["authentication.kubernetes.io/pod-name"] and
        // ["authentication.kubernetes.io/pod-uid"] (pkg/serviceaccount/util.go, claims.go).
        (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let Ok(review) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "malformed TokenReview");
            };
            let token = review.pointer("/spec/token").and_then(Value::as_str).unwrap_or_default();
            let wanted: Vec<String> = review
                .pointer("/spec/audiences")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let verdict = match state.tokens.get(token) {
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
                Some(facts) if facts.exp <= unix_now() => json!({
                    "authenticated": false,
                    "error": "[invalid bearer token, service account token has expired]",
                }),
                Some(facts) => {
                    let common: Vec<&String> =
                        wanted.iter().filter(|a| facts.audiences.contains(a)).collect();
                    if common.is_empty() {
                        json!({"authenticated": false, "error": format!(
                            "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                            facts.audiences, wanted)})
                    } else {
                        let mut extra = serde_json::Map::new();
                        if let Some(pod) = &facts.pod {
                            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
                            extra.insert(
                                "authentication.kubernetes.io/pod-uid".into(),
                                json!([facts.pod_uid]),
                            );
                        }
                        json!({"authenticated": true, "audiences": common, "user": {
                            "username": facts.username, "uid": "sa-uid",
                            "groups": ["system:serviceaccounts", "system:authenticated"],
                            "extra": extra}})
                    }
                }
            };
            let mut answer = review.clone();
            answer["status"] = verdict;
            (StatusCode::CREATED, axum::Json(answer)).into_response()
        }
        // POST /apis/events.k8s.io/v1/namespaces/{ns}/events: 201 with the stored Event; the
        // server turns metadata.generateName into a name with a random suffix.
        (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let Ok(mut event) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "malformed Event");
            };
            let prefix = event.pointer("/metadata/generateName").and_then(Value::as_str).unwrap_or_default();
            event["metadata"]["name"] = json!(format!("{prefix}{:05}", state.events.len()));
            event["metadata"]["namespace"] = json!(ns);
            state.events.push(event.clone());
            (StatusCode::CREATED, axum::Json(event)).into_response()
        }
        // PATCH /api/v1/namespaces/{ns}/pods/{name}: the body is read as the Content-Type says
        // (application/merge-patch+json: RFC 7386 merge into the stored pod; the other patch
        // types are not what the aggregator sends and get 415), 200 with the patched pod and
        // a new resourceVersion; 404 NotFound for a pod that does not exist; 403 Forbidden
        // with RBAC's message when refusing.
        (Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let parsed = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
            state.pod_patches.push(PodPatch {
                path: path.clone(),
                query: uri.query().unwrap_or_default().to_owned(),
                content_type: content_type.clone(),
                body: parsed.clone(),
                at: std::time::Instant::now(),
            });
            if state.refuse_pod_patches {
                return status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!(
                        "pods \"{name}\" is forbidden: User \"system:serviceaccount:durable-scaler:durable-scaler-aggregator\" \
                         cannot patch resource \"pods\" in API group \"\" in the namespace \"{ns}\""
                    ),
                );
            }
            if content_type != "application/merge-patch+json" {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type}"
                    ),
                );
            }
            let Some(pod) = state.pods.get_mut(&(ns.to_string(), name.to_string())) else {
                return status(StatusCode::NOT_FOUND, "NotFound", &format!("pods \"{name}\" not found"));
            };
            json_patch::merge(pod, &parsed);
            let version = pod["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap() + 1;
            pod["metadata"]["resourceVersion"] = json!(version.to_string());
            axum::Json(pod.clone()).into_response()
        }
        // Anything else: 404 with a Status, as for an unknown path.
        _ => status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource"),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A JWT-shaped token with `exp` (signature not checked: the API server is the verifier).
fn jwt(exp: u64) -> String {
    let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let nonce = rand_suffix();
    format!(
        "{}.{}.sig{nonce}",
        encode(r#"{"alg":"RS256","kid":"k"}"#),
        encode(&format!(
            r#"{{"aud":["durable-scaler"],"exp":{exp},"iss":"https://kubernetes.default.svc"}}"#
        ))
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn key(namespace: &str, name: &str) -> ScaledObjectKey {
    ScaledObjectKey { namespace: namespace.into(), name: name.into() }
}

fn pod_token(namespace: &str, pod: &str, audience: &str, exp: u64) -> TokenFacts {
    TokenFacts {
        audiences: vec![audience.into()],
        username: format!("system:serviceaccount:{namespace}:functions-app"),
        pod: Some(pod.into()),
        pod_uid: format!("uid-of-{pod}"),
        exp,
    }
}

/// The value of `name{outcome="..."}` in the registry's text exposition (0 when absent).
fn counter(registry: &Registry, name: &str, outcome: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let prefix = format!("{name}{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)).map_or(0, |value| value.parse().unwrap())
}

/// Polls `condition` until it holds, failing after a generous deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const LONG: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Worker count
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn worker_count_follows_scale_target_ref_to_a_deployments_scale() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 3);
    let source = KubeWorkerCount::new(api.client(), LONG);

    assert_eq!(source.worker_count(&key("apps", "orders")).await, Some(3));
    assert_eq!(
        api.requests(),
        vec![
            (Method::GET, "/apis/keda.sh/v1alpha1/namespaces/apps/scaledobjects/orders".into()),
            (Method::GET, "/apis/apps/v1/namespaces/apps/deployments/orders-func/scale".into()),
        ]
    );
}

#[tokio::test]
async fn worker_count_follows_scale_target_ref_to_a_statefulsets_scale() {
    let api = FakeApi::start().await;
    api.add_scaled_object(
        "apps",
        "ledger",
        json!({"name": "ledger", "kind": "StatefulSet", "apiVersion": "apps/v1"}),
    );
    api.set_scale("/apis/apps/v1/namespaces/apps/statefulsets/ledger", 2);
    let source = KubeWorkerCount::new(api.client(), LONG);

    assert_eq!(source.worker_count(&key("apps", "ledger")).await, Some(2));
}

#[tokio::test]
async fn worker_count_reads_any_kind_with_a_scale_subresource() {
    let api = FakeApi::start().await;
    api.add_scaled_object(
        "apps",
        "web",
        json!({"name": "web", "kind": "Rollout", "apiVersion": "argoproj.io/v1alpha1"}),
    );
    api.set_scale("/apis/argoproj.io/v1alpha1/namespaces/apps/rollouts/web", 7);
    let source = KubeWorkerCount::new(api.client(), LONG);

    assert_eq!(source.worker_count(&key("apps", "web")).await, Some(7));
}

#[tokio::test]
async fn worker_count_within_the_ttl_is_answered_from_the_cache() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 3);
    let source = KubeWorkerCount::new(api.client(), LONG);
    let mut registry = Registry::default();
    source.register(&mut registry);

    source.worker_count(&key("apps", "orders")).await;
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 9);
    assert_eq!(source.worker_count(&key("apps", "orders")).await, Some(3));
    assert_eq!(api.requests().len(), 2, "the second call must make no request");
    assert_eq!(
        counter(&registry, "durable_scaler_aggregator_kube_worker_count_lookups_total", "cache_hit"),
        1
    );
    assert_eq!(counter(&registry, "durable_scaler_aggregator_kube_worker_count_lookups_total", "fetched"), 1);
}

#[tokio::test]
async fn worker_count_after_the_ttl_rereads_only_the_scale() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 3);
    let ttl = Duration::from_secs(5);
    let source = KubeWorkerCount::new(api.client(), ttl);
    let asked_at = UnixMs::now();

    source.worker_count_at(&key("apps", "orders"), asked_at).await;
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 4);
    assert_eq!(source.worker_count_at(&key("apps", "orders"), asked_at.plus(ttl)).await, Some(4));
    let requests = api.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert_eq!(requests[2].1, "/apis/apps/v1/namespaces/apps/deployments/orders-func/scale");
}

#[tokio::test]
async fn worker_count_is_none_and_counted_when_the_api_errors() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 3);
    api.state().failing = true;
    let source = KubeWorkerCount::new(api.client(), LONG);
    let mut registry = Registry::default();
    source.register(&mut registry);

    assert_eq!(source.worker_count(&key("apps", "orders")).await, None);
    assert_eq!(counter(&registry, "durable_scaler_aggregator_kube_worker_count_lookups_total", "failed"), 1);
}

#[tokio::test]
async fn worker_count_failure_is_remembered_for_the_ttl() {
    let api = FakeApi::start().await;
    api.state().failing = true;
    let source = KubeWorkerCount::new(api.client(), LONG);

    assert_eq!(source.worker_count(&key("apps", "orders")).await, None);
    assert_eq!(source.worker_count(&key("apps", "orders")).await, None);
    assert_eq!(api.requests().len(), 1, "a broken API is asked once per TTL");
}

#[tokio::test]
async fn worker_count_is_none_when_the_scaled_object_does_not_exist() {
    let api = FakeApi::start().await;
    let source = KubeWorkerCount::new(api.client(), LONG);

    assert_eq!(source.worker_count(&key("apps", "missing")).await, None);
}

#[tokio::test]
async fn worker_count_is_none_when_the_scale_target_does_not_exist() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "gone"}));
    let source = KubeWorkerCount::new(api.client(), LONG);

    assert_eq!(source.worker_count(&key("apps", "orders")).await, None);
}

#[tokio::test]
async fn worker_count_is_none_when_the_api_server_is_down() {
    let source = KubeWorkerCount::new(client_for_api_down().await, LONG);

    assert_eq!(source.worker_count(&key("apps", "orders")).await, None);
}

// ---------------------------------------------------------------------------------------------
// Report authentication
// ---------------------------------------------------------------------------------------------

fn identity(namespace: &str, pod: &str) -> ReportIdentity {
    ReportIdentity { namespace: namespace.into(), pod_name: pod.into() }
}

fn pod_ref(namespace: &str, name: &str) -> PodRef {
    PodRef { namespace: namespace.into(), name: name.into() }
}

fn is_unauthenticated(result: &Result<ReportIdentity, AuthError>) -> bool {
    matches!(result, Err(AuthError::Unauthenticated(_)))
}

#[tokio::test]
async fn a_pod_bound_token_for_our_audience_names_its_namespace_and_pod() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "orders-7d9f-x2", "durable-scaler", unix_now() + 3600));
    let authenticator = TokenReviewAuthenticator::new(api.client());

    let who = authenticator.authenticate(Some(&token)).await.unwrap();
    assert_eq!(who, identity("apps", "orders-7d9f-x2"));
    assert_eq!(authorize(&who, &pod_ref("apps", "orders-7d9f-x2")), Ok(()));
}

#[tokio::test]
async fn the_token_review_asks_for_the_durable_scaler_audience() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "p", "durable-scaler", unix_now() + 3600));
    let authenticator = TokenReviewAuthenticator::new(api.client());

    authenticator.authenticate(Some(&token)).await.unwrap();
    assert_eq!(api.requests(), vec![(Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews".into())]);
}

#[tokio::test]
async fn a_report_for_another_namespace_is_permission_denied() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "orders-1", "durable-scaler", unix_now() + 3600));
    let authenticator = TokenReviewAuthenticator::new(api.client());

    let who = authenticator.authenticate(Some(&token)).await.unwrap();
    assert!(matches!(authorize(&who, &pod_ref("payments", "orders-1")), Err(AuthError::PermissionDenied(_))));
    assert!(matches!(authorize(&who, &pod_ref("apps", "orders-2")), Err(AuthError::PermissionDenied(_))));
}

#[tokio::test]
async fn a_token_for_another_audience_is_unauthenticated() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "p", "https://kubernetes.default.svc", unix_now() + 3600));
    let authenticator = TokenReviewAuthenticator::new(api.client());

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&token)).await));
}

#[tokio::test]
async fn an_expired_token_is_unauthenticated() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "p", "durable-scaler", unix_now() - 60));
    let authenticator = TokenReviewAuthenticator::new(api.client());

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&token)).await));
}

#[tokio::test]
async fn an_unknown_token_is_unauthenticated() {
    let api = FakeApi::start().await;
    let authenticator = TokenReviewAuthenticator::new(api.client());

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&jwt(unix_now() + 3600))).await));
}

#[tokio::test]
async fn a_service_account_token_not_bound_to_a_pod_is_unauthenticated() {
    let api = FakeApi::start().await;
    let mut facts = pod_token("apps", "p", "durable-scaler", unix_now() + 3600);
    facts.pod = None;
    let token = api.issue_token(facts);
    let authenticator = TokenReviewAuthenticator::new(api.client());

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&token)).await));
}

#[tokio::test]
async fn a_missing_token_is_unauthenticated_without_asking_the_api() {
    let api = FakeApi::start().await;
    let authenticator = TokenReviewAuthenticator::new(api.client());
    let mut registry = Registry::default();
    authenticator.register(&mut registry);

    assert!(is_unauthenticated(&authenticator.authenticate(None).await));
    assert!(is_unauthenticated(&authenticator.authenticate(Some("")).await));
    assert!(api.requests().is_empty());
    assert_eq!(
        counter(&registry, "durable_scaler_aggregator_report_authentications_total", "missing_token"),
        2
    );
}

#[tokio::test]
async fn a_token_is_rejected_when_the_api_server_is_down() {
    let authenticator = TokenReviewAuthenticator::new(client_for_api_down().await);
    let mut registry = Registry::default();
    authenticator.register(&mut registry);

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&jwt(unix_now() + 3600))).await));
    assert_eq!(counter(&registry, "durable_scaler_aggregator_report_authentications_total", "api_error"), 1);
}

#[tokio::test]
async fn a_good_token_is_rejected_when_the_api_server_errors() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "p", "durable-scaler", unix_now() + 3600));
    api.state().failing = true;
    let authenticator = TokenReviewAuthenticator::new(api.client());

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&token)).await));
}

#[tokio::test]
async fn a_checked_token_is_answered_from_the_cache() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "p", "durable-scaler", unix_now() + 3600));
    let authenticator = TokenReviewAuthenticator::new(api.client());
    let mut registry = Registry::default();
    authenticator.register(&mut registry);

    authenticator.authenticate(Some(&token)).await.unwrap();
    assert_eq!(authenticator.authenticate(Some(&token)).await.unwrap(), identity("apps", "p"));
    assert_eq!(api.requests().len(), 1, "the second check must make no request");
    assert_eq!(counter(&registry, "durable_scaler_aggregator_report_authentications_total", "cache_hit"), 1);
}

#[tokio::test]
async fn a_token_of_an_older_pod_of_the_same_name_is_checked_again_once_a_newer_one_is_seen() {
    let api = FakeApi::start().await;
    let exp = unix_now() + 3600;
    let old = api.issue_token(TokenFacts {
        pod_uid: "first".into(),
        ..pod_token("apps", "worker-0", "durable-scaler", exp)
    });
    let new = api.issue_token(TokenFacts {
        pod_uid: "second".into(),
        ..pod_token("apps", "worker-0", "durable-scaler", exp + 1)
    });
    let authenticator = TokenReviewAuthenticator::new(api.client());

    authenticator.authenticate(Some(&old)).await.unwrap();
    authenticator.authenticate(Some(&old)).await.unwrap();
    assert_eq!(api.requests().len(), 1, "the old pod's token is answered from the cache");
    // The re-created pod's token: its review names another uid for the same name, so the old
    // pod's cached answer goes, and its token must be reviewed again (here the fake API server
    // still accepts it; a real one refuses a deleted pod's token).
    authenticator.authenticate(Some(&new)).await.unwrap();
    authenticator.authenticate(Some(&old)).await.unwrap();
    assert_eq!(api.requests().len(), 3, "{:?}", api.requests());
}

#[tokio::test]
async fn a_cached_token_is_checked_again_once_past_its_expiry() {
    let api = FakeApi::start().await;
    // Valid for ten minutes of real time, so the API server accepts it throughout; the
    // authenticator is asked as if that time had passed.
    let exp = unix_now() + 600;
    let token = api.issue_token(pod_token("apps", "p", "durable-scaler", exp));
    let authenticator =
        TokenReviewAuthenticator::new(api.client()).with_cache_max_age(Duration::from_secs(3600));
    let expiry = UnixMs(i64::try_from(exp).unwrap() * 1000);

    authenticator.authenticate_at(Some(&token), expiry.plus_ms(-60_000)).await.unwrap();
    authenticator.authenticate_at(Some(&token), expiry.plus_ms(-1)).await.unwrap();
    assert_eq!(api.requests().len(), 1, "before its expiry the cached answer is used");
    authenticator.authenticate_at(Some(&token), expiry).await.unwrap();
    assert_eq!(api.requests().len(), 2, "at its expiry the token is reviewed again");
}

#[tokio::test]
async fn a_cached_token_is_checked_again_after_the_cache_max_age() {
    let api = FakeApi::start().await;
    let token = api.issue_token(pod_token("apps", "p", "durable-scaler", unix_now() + 3600));
    let max_age = Duration::from_secs(60);
    let authenticator = TokenReviewAuthenticator::new(api.client()).with_cache_max_age(max_age);
    let checked_at = UnixMs::now();

    authenticator.authenticate_at(Some(&token), checked_at).await.unwrap();
    authenticator.authenticate_at(Some(&token), checked_at.plus(max_age).plus_ms(-1)).await.unwrap();
    assert_eq!(api.requests().len(), 1);
    authenticator.authenticate_at(Some(&token), checked_at.plus(max_age)).await.unwrap();
    assert_eq!(api.requests().len(), 2, "the cache's maximum age bounds trust in a checked token");
}

#[tokio::test]
async fn a_rejected_token_is_not_cached() {
    let api = FakeApi::start().await;
    let token = jwt(unix_now() + 3600);
    let authenticator = TokenReviewAuthenticator::new(api.client());

    assert!(is_unauthenticated(&authenticator.authenticate(Some(&token)).await));
    api.issue_token_as(&token, pod_token("apps", "p", "durable-scaler", unix_now() + 3600));
    assert_eq!(authenticator.authenticate(Some(&token)).await.unwrap(), identity("apps", "p"));
}

#[tokio::test]
async fn the_token_cache_is_bounded() {
    let api = FakeApi::start().await;
    let first = api.issue_token(pod_token("apps", "a", "durable-scaler", unix_now() + 3600));
    let second = api.issue_token(pod_token("apps", "b", "durable-scaler", unix_now() + 3600));
    let authenticator = TokenReviewAuthenticator::new(api.client()).with_cache_size(1);

    authenticator.authenticate(Some(&first)).await.unwrap();
    authenticator.authenticate(Some(&second)).await.unwrap();
    authenticator.authenticate(Some(&first)).await.unwrap();
    assert_eq!(api.requests().len(), 3, "the first token was evicted to make room for the second");
}

impl FakeApi {
    fn issue_token_as(&self, token: &str, facts: TokenFacts) {
        self.state().tokens.insert(token.into(), facts);
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

fn change(previous: u32, workers: u32) -> RecommendationChange {
    RecommendationChange {
        previous: Some(previous),
        desired_workers: workers,
        workers: previous,
        reason: format!("work-item queue latency rising, {workers} workers"),
    }
}

#[tokio::test]
async fn a_recommendation_change_becomes_an_event_on_the_scaled_object() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);

    recorder.recommendation_changed(&key("apps", "orders"), &change(2, 5));
    eventually("one Event", || api.events().len() == 1).await;
    let event = &api.events()[0];
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "orders",
               "namespace": "apps", "uid": "uid-orders"})
    );
    assert_eq!(event["reason"], "RecommendationChanged");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reportingController"], "durable-scaler.io/aggregator");
    assert_eq!(event["reportingInstance"], "aggregator-0");
    assert_eq!(event["note"], "desired workers 2 -> 5: work-item queue latency rising, 5 workers");
    assert!(event["eventTime"].is_string(), "events.k8s.io/v1 requires eventTime");
    assert_eq!(
        api.requests().last().unwrap(),
        &(Method::POST, "/apis/events.k8s.io/v1/namespaces/apps/events".to_owned())
    );
}

#[tokio::test]
async fn each_change_after_the_interval_is_recorded_once() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);
    let mut registry = Registry::default();
    recorder.register(&mut registry);

    let first_at = UnixMs::now();
    recorder.recommendation_changed_at(&key("apps", "orders"), &change(2, 5), first_at);
    eventually("the first Event", || api.events().len() == 1).await;
    recorder.recommendation_changed_at(&key("apps", "orders"), &change(5, 3), first_at.plus(LONG));
    // Counted when the API server's answer arrives, just after the server stored the Event.
    eventually("the second Event counted", || {
        counter(&registry, "durable_scaler_aggregator_kube_events_total", "created") == 2
    })
    .await;

    assert_eq!(api.events()[1]["note"], "desired workers 5 -> 3: work-item queue latency rising, 3 workers");
    assert_eq!(counter(&registry, "durable_scaler_aggregator_kube_events_total", "suppressed"), 0);
}

#[tokio::test]
async fn a_flapping_hub_gets_one_event_per_interval() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);
    let mut registry = Registry::default();
    recorder.register(&mut registry);

    recorder.recommendation_changed(&key("apps", "orders"), &change(1, 2));
    eventually("the first Event", || api.events().len() == 1).await;
    for workers in 3..23 {
        recorder.recommendation_changed(&key("apps", "orders"), &change(workers - 1, workers));
    }

    // The 20 changes wait for the end of the hour-long interval: the latest is pending, the 19
    // before it are already folded away; nothing more reached the API.
    assert_eq!(counter(&registry, "durable_scaler_aggregator_kube_events_total", "suppressed"), 19);
    assert_eq!(api.events().len(), 1);
}

#[tokio::test]
async fn changes_within_the_interval_are_folded_into_one_event_with_the_latest() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);
    let first_at = UnixMs::now();
    // The later changes come a millisecond before the hour-long interval ends, so the folded
    // Event is due a millisecond later.
    let late = first_at.plus(LONG).plus_ms(-1);

    recorder.recommendation_changed_at(&key("apps", "orders"), &change(1, 2), first_at);
    recorder.recommendation_changed_at(&key("apps", "orders"), &change(2, 4), late);
    recorder.recommendation_changed_at(&key("apps", "orders"), &change(4, 6), late);
    eventually("the folded Event", || api.events().len() == 2).await;

    let note = api.events()[1]["note"].as_str().unwrap().to_owned();
    assert!(note.starts_with("desired workers 4 -> 6: "), "{note}");
    assert!(note.contains("latest of 2 changes"), "{note}");
}

#[tokio::test]
async fn a_change_back_to_the_recorded_count_within_the_interval_records_nothing() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);
    let mut registry = Registry::default();
    recorder.register(&mut registry);
    let first_at = UnixMs::now();
    let late = first_at.plus(LONG).plus_ms(-1);

    recorder.recommendation_changed_at(&key("apps", "orders"), &change(1, 2), first_at);
    recorder.recommendation_changed_at(&key("apps", "orders"), &change(2, 3), late);
    recorder.recommendation_changed_at(&key("apps", "orders"), &change(3, 2), late);
    eventually("both changes suppressed", || {
        counter(&registry, "durable_scaler_aggregator_kube_events_total", "suppressed") == 2
    })
    .await;
    eventually("the first Event counted", || {
        counter(&registry, "durable_scaler_aggregator_kube_events_total", "created") == 1
    })
    .await;
    assert_eq!(api.events().len(), 1);
}

#[tokio::test]
async fn event_failures_are_counted_not_returned() {
    let api = FakeApi::start().await;
    api.state().failing = true;
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);
    let mut registry = Registry::default();
    recorder.register(&mut registry);

    recorder.recommendation_changed(&key("apps", "orders"), &change(1, 2));
    eventually("the failure counted", || {
        counter(&registry, "durable_scaler_aggregator_kube_events_total", "failed") == 1
    })
    .await;
}

#[tokio::test]
async fn rate_limits_are_per_scaled_object() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    api.add_scaled_object("apps", "billing", json!({"name": "billing-func"}));
    let recorder = EventRecorder::new(api.client(), "aggregator-0", LONG);

    recorder.recommendation_changed(&key("apps", "orders"), &change(1, 2));
    recorder.recommendation_changed(&key("apps", "billing"), &change(1, 2));
    eventually("one Event per ScaledObject", || api.events().len() == 2).await;
}

#[tokio::test]
async fn concurrent_askers_of_one_hub_share_one_read() {
    let api = FakeApi::start().await;
    api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
    api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 3);
    let source = KubeWorkerCount::new(api.client(), LONG);
    let key = key("apps", "orders");

    // Joined on one task: every lookup starts before the first read can finish.
    let answers = futures::future::join_all((0..10).map(|_| source.worker_count(&key))).await;
    assert!(answers.iter().all(|answer| *answer == Some(3)), "{answers:?}");
    assert_eq!(api.requests().len(), 2, "one ScaledObject read and one scale read in all");
}

// ---------------------------------------------------------------------------------------------
// Finding the API server (in a child process, so the environment can differ safely)
// ---------------------------------------------------------------------------------------------

/// Set in the child process a test starts; says which scenario the child runs.
const CHILD_ENV: &str = "DURABLE_SCALER_TEST_KUBE_CHILD";

/// Runs this test binary's test `name` as a child with `envs`, without any ambient
/// Kubernetes configuration, and returns its combined output (failing when the child fails).
fn run_child(name: &str, envs: &[(&str, String)]) -> String {
    let home = tempfile::tempdir().unwrap();
    let run = crate::child::run_test(module_path!(), name, |command| {
        command
            .env(CHILD_ENV, "1")
            .env("HOME", home.path())
            .env("KUBECONFIG", home.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env("RUST_LOG", "warn")
            .env_remove("DURABLE_SCALER_LOG_FORMAT")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    });
    assert!(run.passed, "child {name} failed or ran no test:\n{}", run.output);
    run.output
}

#[tokio::test]
async fn without_any_kubernetes_config_there_is_no_context_and_one_warning() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let output = run_child("without_any_kubernetes_config_there_is_no_context_and_one_warning", &[]);
        assert_eq!(output.matches("no Kubernetes configuration found").count(), 1, "{output}");
        return;
    }
    durable_scaler::telemetry::init();
    assert!(KubeContext::try_default(KubeArgs::default()).await.is_none());
}

#[tokio::test]
async fn a_kubeconfig_is_found_and_its_client_reads_the_worker_count() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let api = FakeApi::start().await;
        api.add_scaled_object("apps", "orders", json!({"name": "orders-func"}));
        api.set_scale("/apis/apps/v1/namespaces/apps/deployments/orders-func", 3);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("config");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]\n\
                 users: [{{name: fake, user: {{token: fake-token}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: apps}}}}]\n",
                api.addr
            ),
        )
        .unwrap();
        // The child's blocking run keeps this runtime busy; serve the fake from another thread.
        let name = "a_kubeconfig_is_found_and_its_client_reads_the_worker_count";
        let envs = vec![("KUBECONFIG", kubeconfig.display().to_string())];
        let output = tokio::task::spawn_blocking(move || run_child(name, &envs)).await.unwrap();
        assert!(!output.contains("no Kubernetes configuration found"), "{output}");
        assert_eq!(api.requests().len(), 2);
        return;
    }
    let context = KubeContext::try_default(KubeArgs::default()).await.expect("the kubeconfig is found");
    assert_eq!(context.worker_count().worker_count(&key("apps", "orders")).await, Some(3));
}

// ---------------------------------------------------------------------------------------------
// Pod deletion cost
// ---------------------------------------------------------------------------------------------

use durable_scaler::aggregator::sources::{PodCost, PodDeletionCosts};
use durable_scaler::kubernetes::{
    FIELD_MANAGER, POD_DELETION_COST_ANNOTATION, PodDeletionCostWriter, WritePace, WriteRate,
};

/// Fast enough for a test, slow enough that the bucket, not the server, sets the pace.
const TEST_RATE: WriteRate = WriteRate { per_second: 200.0, burst: 20 };

fn writer(api: &FakeApi, pace: WritePace) -> (PodDeletionCostWriter, Registry) {
    let writer = PodDeletionCostWriter::new(api.client(), pace);
    let mut registry = Registry::default();
    writer.register(&mut registry);
    (writer, registry)
}

fn cost(pod: &str, cost: i32) -> PodCost {
    PodCost { namespace: "orders".into(), pod: pod.into(), cost }
}

fn annotation(pod: &Value) -> Option<&str> {
    pod["metadata"]["annotations"][POD_DELETION_COST_ANNOTATION].as_str()
}

/// The pod the ReplicaSet removes first among equally ready pods: the lowest cost, read as
/// `GetDeletionCostFromPodAnnotations` reads it (missing or invalid: 0).
fn first_to_go<'a>(api: &FakeApi, pods: &[&'a str]) -> &'a str {
    let read =
        |pod: &str| annotation(&api.pod("orders", pod)).and_then(|v| v.parse::<i32>().ok()).unwrap_or(0);
    pods.iter().copied().min_by_key(|pod| read(pod)).unwrap()
}

#[tokio::test]
async fn a_cost_is_written_as_one_json_merge_patch_of_the_pod_annotation() {
    let api = FakeApi::start().await;
    api.add_pod("orders", "orders-func-1");
    let (writer, registry) = writer(&api, WritePace::new(TEST_RATE));
    writer.update(vec![cost("orders-func-1", 17)]);
    eventually("the write", || {
        counter(&registry, "durable_scaler_aggregator_pod_deletion_cost_writes_total", "written") == 1
    })
    .await;

    let patches = api.pod_patches();
    assert_eq!(patches.len(), 1);
    let patch = &patches[0];
    assert_eq!(patch.path, "/api/v1/namespaces/orders/pods/orders-func-1");
    assert_eq!(
        patch.content_type, "application/merge-patch+json",
        "RFC 7386, which replaces only the keys it names"
    );
    let query: Vec<&str> = patch.query.split('&').filter(|pair| !pair.is_empty()).collect();
    assert_eq!(query, [format!("fieldManager={FIELD_MANAGER}")]);
    assert_eq!(patch.body, json!({"metadata": {"annotations": {POD_DELETION_COST_ANNOTATION: "17"}}}));
    let pod = api.pod("orders", "orders-func-1");
    assert_eq!(annotation(&pod), Some("17"));
    assert_eq!(pod["metadata"]["annotations"]["durable-scaler.io/status"], "{}", "other annotations kept");
    assert_eq!(pod["metadata"]["labels"], json!({"app": "orders-func"}));
}

#[tokio::test]
async fn an_unchanged_cost_is_not_written_again_and_a_changed_one_is() {
    let api = FakeApi::start().await;
    api.add_pod("orders", "orders-func-1");
    let (writer, registry) = writer(&api, WritePace::new(TEST_RATE));
    let written =
        || counter(&registry, "durable_scaler_aggregator_pod_deletion_cost_writes_total", "written");
    writer.update(vec![cost("orders-func-1", 3)]);
    eventually("the first write", || written() == 1).await;
    for _ in 0..50 {
        writer.update(vec![cost("orders-func-1", 3)]);
        assert_eq!(writer.pending(), 0, "an unchanged cost is not queued");
    }
    writer.update(vec![cost("orders-func-1", -2)]);
    eventually("the second write", || written() == 2).await;
    assert_eq!(api.pod_patches().len(), 2);
    assert_eq!(annotation(&api.pod("orders", "orders-func-1")), Some("-2"));
}

#[tokio::test]
async fn the_pods_carry_the_latest_ranking_so_the_replicaset_removes_the_idlest_first() {
    let api = FakeApi::start().await;
    let pods = ["orders-func-a", "orders-func-b", "orders-func-c", "orders-func-d"];
    for pod in pods {
        api.add_pod("orders", pod);
    }
    let (writer, _registry) = writer(&api, WritePace::new(TEST_RATE));
    // Three samples of the hub: the idlest pod changes as work moves.
    let rankings = [[40, 0, 17, 35], [40, 51, 0, 35], [0, 51, 68, 2]];
    for ranking in rankings {
        writer.update(pods.iter().zip(ranking).map(|(pod, c)| cost(pod, c)).collect());
    }
    let last = rankings[2];
    eventually("every pod carries its latest cost", || {
        pods.iter()
            .zip(last)
            .all(|(pod, c)| annotation(&api.pod("orders", pod)) == Some(c.to_string().as_str()))
    })
    .await;
    assert_eq!(first_to_go(&api, &pods), "orders-func-a");
    // Each pod was written at most once per value it was given.
    assert!(api.pod_patches().len() <= pods.len() * rankings.len());
    writer.update(vec![cost("orders-func-a", 90), cost("orders-func-d", 1)]);
    eventually("the new idlest pod", || first_to_go(&api, &pods) == "orders-func-d").await;
}

#[tokio::test]
async fn a_thousand_pods_are_written_no_faster_than_the_bucket_allows_and_once_each() {
    const PODS: usize = 1000;
    let api = FakeApi::start().await;
    let names: Vec<String> = (0..PODS).map(|i| format!("orders-func-{i:04}")).collect();
    for name in &names {
        api.add_pod("orders", name);
    }
    let (writer, registry) = writer(&api, WritePace::new(TEST_RATE));
    let start = std::time::Instant::now();
    let costs =
        || names.iter().enumerate().map(|(i, n)| cost(n, i32::try_from(i).unwrap())).collect::<Vec<_>>();
    writer.update(costs());
    eventually("every pod written", || {
        counter(&registry, "durable_scaler_aggregator_pod_deletion_cost_writes_total", "written")
            == PODS as u64
    })
    .await;
    let patches = api.pod_patches();
    assert_eq!(patches.len(), PODS, "one write per pod");
    // The bucket's bound at every arrival: never more than burst + rate x time since start.
    for (i, patch) in patches.iter().enumerate() {
        let elapsed = patch.at.duration_since(start).as_secs_f64();
        let allowed = f64::from(TEST_RATE.burst) + TEST_RATE.per_second * elapsed;
        assert!(
            (i + 1) as f64 <= allowed + 1e-6,
            "write {} arrived {elapsed:.3} s after the start: more than {allowed:.1} allowed",
            i + 1
        );
    }
    // The sampling loop names every pod again and again: nothing more is queued.
    for _ in 0..5 {
        writer.update(costs());
        assert_eq!(writer.pending(), 0);
    }
    assert_eq!(api.pod_patches().len(), PODS);
}

/// Captures this thread's log lines (a current-thread runtime runs the writer's task here).
fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(buffer.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn a_refused_patch_is_logged_once_counted_and_never_retried_in_a_loop() {
    let (logs, _guard) = capture_logs();
    let api = FakeApi::start().await;
    for pod in ["orders-func-1", "orders-func-2", "orders-func-3"] {
        api.add_pod("orders", pod);
    }
    api.state().refuse_pod_patches = true;
    let pause = Duration::from_millis(100);
    let pace = WritePace { rate: TEST_RATE, after_refusal: pause, after_failure: pause };
    let (writer, registry) = writer(&api, pace);
    let refused =
        || counter(&registry, "durable_scaler_aggregator_pod_deletion_cost_writes_total", "refused");
    writer.update(vec![cost("orders-func-1", 1), cost("orders-func-2", 2), cost("orders-func-3", 3)]);
    eventually("each pod tried once", || refused() == 3).await;
    // The refused values are never sent again, however often the sampling loop names them.
    for _ in 0..20 {
        writer.update(vec![cost("orders-func-1", 1), cost("orders-func-2", 2), cost("orders-func-3", 3)]);
        assert_eq!(writer.pending(), 0);
    }
    // A new value is tried, once, after the pause.
    writer.update(vec![cost("orders-func-1", 5)]);
    eventually("the new value tried", || refused() == 4).await;

    let patches = api.pod_patches();
    assert_eq!(patches.len(), 4);
    for pair in patches.windows(2) {
        assert!(pair[1].at.duration_since(pair[0].at) >= pause, "a refused write is followed by a pause");
    }
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("patch") && warnings[0].contains("--pod-deletion-cost=false"),
        "{}",
        warnings[0]
    );
    assert_eq!(text.lines().filter(|l| l.contains("refused again")).count(), 3, "{text}");
}

#[tokio::test]
async fn a_pod_that_is_gone_is_forgotten_and_not_written_again() {
    let api = FakeApi::start().await;
    let (writer, registry) = writer(&api, WritePace::new(TEST_RATE));
    writer.update(vec![cost("orders-func-gone", 4)]);
    eventually("the 404", || {
        counter(&registry, "durable_scaler_aggregator_pod_deletion_cost_writes_total", "gone") == 1
    })
    .await;
    // The aggregator still lists it for a few intervals: no more calls for it.
    for c in [4, 5, 6] {
        writer.update(vec![cost("orders-func-gone", c)]);
        assert_eq!(writer.pending(), 0);
    }
    assert_eq!(api.pod_patches().len(), 1);
}

#[tokio::test]
async fn a_failed_write_is_retried_after_a_pause() {
    let api = FakeApi::start().await;
    api.add_pod("orders", "orders-func-1");
    api.state().failing = true;
    let pause = Duration::from_millis(50);
    let pace = WritePace { rate: TEST_RATE, after_refusal: pause, after_failure: pause };
    let (writer, registry) = writer(&api, pace);
    let outcome = |o| counter(&registry, "durable_scaler_aggregator_pod_deletion_cost_writes_total", o);
    writer.update(vec![cost("orders-func-1", 8)]);
    eventually("a failure", || outcome("failed") >= 1).await;
    api.state().failing = false;
    eventually("the retry", || outcome("written") == 1).await;
    assert_eq!(annotation(&api.pod("orders", "orders-func-1")), Some("8"));
}
