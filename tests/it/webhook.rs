//! `durable-scaler webhook` over real HTTPS on loopback: AdmissionReviews shaped as the API
//! server sends them, the returned JSON patch applied with the json-patch crate, every kind
//! of bad input, TLS versions and key types, and the certificate reloaded from a Secret
//! volume while connections stay open.

use crate::https;

use std::{sync::Arc, time::Duration};

use base64::Engine;
use clap::Parser as _;
use durable_scaler::{
    shutdown::Shutdown,
    tls::ReloadingConfig,
    webhook::{Args, Webhook, cluster::NativeSidecarMode, metrics::Metrics},
};
use https::{Connection, Http, Pki, SecretVolume, full, streamed};
use hyper::{StatusCode, body::Bytes};
use serde_json::{Value, json};

const FIXTURE: &str = include_str!("../fixtures/admission/replicaset-pod-create.json");

/// A running webhook on 127.0.0.1:0 serving `pki` from a kubelet-style Secret volume.
struct Running {
    addr: std::net::SocketAddr,
    pki: Pki,
    volume: SecretVolume,
    metrics: Arc<Metrics>,
    certs: Arc<ReloadingConfig>,
    shutdown: Shutdown,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(configure: impl FnOnce(&mut Args)) -> Self {
        Self::start_with(Pki::ecdsa("first"), configure).await
    }

    async fn start_with(pki: Pki, configure: impl FnOnce(&mut Args)) -> Self {
        Self::start_full(pki, configure, None).await
    }

    /// A webhook talking to the Kubernetes API at `client` (the fake API server below).
    async fn start_with_api(client: kube::Client, configure: impl FnOnce(&mut Args)) -> Self {
        Self::start_full(Pki::ecdsa("first"), configure, Some(client)).await
    }

    async fn start_full(pki: Pki, configure: impl FnOnce(&mut Args), client: Option<kube::Client>) -> Self {
        durable_scaler::telemetry::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let volume = SecretVolume::new(dir.path(), &pki);
        let mut args = Args {
            addr: Some("127.0.0.1:0".parse().unwrap()),
            tls_cert: volume.cert(),
            tls_key: volume.key(),
            tls13_only: false,
            tls_reload_interval: Duration::from_secs(5),
            sidecar_image: "ghcr.io/durable-scaler/durable-scaler:test".to_owned(),
            aggregator: "http://durable-scaler-aggregator.durable-scaler:4371".parse().unwrap(),
            sidecar_aggregator_ca: None,
            sidecar_aggregator_ca_secret: None,
            sidecar_image_pull_secrets: Vec::new(),
            native_sidecar: NativeSidecarMode::True,
            sidecar_image_from_pod: true,
            webhook_container: "webhook".to_owned(),
            pod_name: None,
            pod_namespace: None,
        };
        configure(&mut args);
        let webhook =
            Webhook::bind_with(&args, client).await.unwrap().with_reload_interval(Duration::from_millis(50));
        let addr = webhook.local_addr().unwrap();
        let metrics = webhook.metrics();
        let certs = webhook.tls_config();
        let shutdown = Shutdown::new();
        let served = Some(tokio::spawn(webhook.serve(shutdown.clone())));
        Self { addr, pki, volume, metrics, certs, shutdown, served, _dir: dir }
    }

    async fn connect(&self, http: Http) -> Connection {
        https::connect(self.addr, &self.pki.ca_pem, http).await.unwrap()
    }

    /// Posts `body` on a fresh HTTP/1.1 connection.
    async fn post(&self, content_type: Option<&str>, body: https::Body) -> (StatusCode, Bytes) {
        self.connect(Http::One).await.post(content_type, body).await.unwrap()
    }

    /// Posts one review and decodes the AdmissionReview answer.
    async fn review(&self, review: &Value) -> (StatusCode, Value) {
        let mut connection = self.connect(Http::Two).await;
        let (status, body) =
            connection.post(Some("application/json"), full(review.to_string())).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

/// The pod after the answer's patch is applied (RFC 6902, by the json-patch crate).
fn patched(pod: &Value, answer: &Value) -> Value {
    let encoded = answer["response"]["patch"].as_str().expect("a patch");
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

/// What the fixture's pod must look like after injection: the sidecar as a native sidecar
/// with the connection's `secretKeyRef` copied as it stands, the token volume, the Functions
/// host's drain switch in the app container (its grace period, the API server's default 30 s,
/// already covers the drain), the status annotation saying so, and nothing else changed.
fn expected_pod() -> Value {
    let mut pod = fixture()["request"]["object"].clone();
    pod["metadata"]["annotations"]["durable-scaler.io/status"] = json!(
        json!({"containers": ["durable-scaler-sidecar"], "mode": "native-sidecar",
               "modeReason": "--native-sidecar=true",
               "version": env!("CARGO_PKG_VERSION"), "volumes": ["durable-scaler-token"],
               "drain": {"env": "FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING=true added",
                         "preStop": "none: the host's keys are not in a Kubernetes Secret \
                                     (AzureWebJobsSecretStorageType is not `kubernetes`; the default store \
                                     is blob storage, which the sidecar does not read keys from)",
                         "terminationGracePeriodSeconds": "30 kept"}})
        .to_string()
    );
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING", "value": "true"}));
    pod["spec"]["initContainers"] = json!([{
        "name": "durable-scaler-sidecar",
        "image": "ghcr.io/durable-scaler/durable-scaler:test",
        "imagePullPolicy": "IfNotPresent",
        "args": ["sidecar"],
        "restartPolicy": "Always",
        "env": [
            {"name": "DURABLE_SCALER_TASK_HUB", "value": "OrdersHub"},
            {"name": "DURABLE_SCALER_CONNECTION",
             "valueFrom": {"secretKeyRef": {"name": "orders-storage", "key": "connection-string"}}},
            {"name": "DURABLE_SCALER_AGGREGATOR", "value": "http://durable-scaler-aggregator.durable-scaler:4371"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
            {"name": "DURABLE_SCALER_APP_CPUS",
             "valueFrom": {"resourceFieldRef": {"containerName": "functions", "resource": "limits.cpu", "divisor": "1"}}}
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "200m", "memory": "64Mi"}},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": 9095, "scheme": "HTTP"},
            "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3
        },
        "securityContext": {
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
        },
        "volumeMounts": [{"name": "durable-scaler-token", "mountPath": "/var/run/secrets/durable-scaler", "readOnly": true}],
        "terminationMessagePolicy": "FallbackToLogsOnError"
    }]);
    pod["spec"]["volumes"].as_array_mut().unwrap().push(json!({
        "name": "durable-scaler-token",
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": "durable-scaler", "expirationSeconds": 3600, "path": "token"}}]}
    }));
    pod
}

#[tokio::test]
async fn a_replicaset_pod_gets_the_native_sidecar_over_https() {
    let webhook = Running::start(|_| {}).await;
    let (status, answer) = webhook.review(&fixture()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], "7f0b2891-916f-4ed6-b7cd-27bff1815a8c");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    assert!(answer["response"].get("warnings").is_none(), "{answer}");
    assert_eq!(patched(&fixture()["request"]["object"], &answer), expected_pod());
    assert_valid_pod(&expected_pod());
}

#[tokio::test]
async fn feeding_the_webhook_its_own_output_changes_nothing() {
    let webhook = Running::start(|_| {}).await;
    let (_, first) = webhook.review(&fixture()).await;
    let mut again = fixture();
    again["request"]["object"] = patched(&fixture()["request"]["object"], &first);
    let (status, second) = webhook.review(&again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["response"]["allowed"], true);
    assert!(second["response"].get("patch").is_none(), "{second}");
}

#[tokio::test]
async fn plain_container_mode_appends_the_sidecar_and_sets_the_default_container() {
    let webhook = Running::start(|args| args.native_sidecar = NativeSidecarMode::False).await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(
        containers.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(),
        ["functions", "durable-scaler-sidecar"]
    );
    assert!(containers[1].get("restartPolicy").is_none());
    assert!(pod["spec"].get("initContainers").is_none());
    assert_eq!(pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], "functions");
}

#[tokio::test]
async fn a_plain_container_sidecar_is_told_the_apps_port_and_how_long_it_may_wait_for_the_app() {
    let webhook = Running::start(|args| args.native_sidecar = NativeSidecarMode::False).await;
    let sidecar = |pod: &Value| {
        pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "durable-scaler-sidecar")
            .cloned()
            .unwrap()
    };
    let env = |container: &Value, name: &str| {
        container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).map(|e| e["value"].clone())
    };
    // The fixture's app declares containerPort 80 and takes the API server's 30 s grace.
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_valid_pod(&pod);
    let plain = sidecar(&pod);
    assert_eq!(env(&plain, "DURABLE_SCALER_APP_PORT"), Some(json!("80")));
    assert_eq!(
        env(&plain, "DURABLE_SCALER_APP_EXIT_WAIT"),
        Some(json!("27s")),
        "the grace less 3 s to leave"
    );
    assert_eq!(
        status_annotation(&fixture(), &answer)["sidecarStop"],
        "after the app (port 80), at most 27 s after SIGTERM"
    );

    // A longer grace asked for the drain, and an app that declares no port: a bounded wait.
    let mut review = fixture();
    review["request"]["object"]["metadata"]["annotations"]["durable-scaler.io/termination-grace-period-seconds"] =
        json!("120");
    review["request"]["object"]["spec"]["containers"][0].as_object_mut().unwrap().remove("ports");
    let (_, answer) = webhook.review(&review).await;
    let pod = patched(&review["request"]["object"], &answer);
    assert_valid_pod(&pod);
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 120);
    let plain = sidecar(&pod);
    assert_eq!(env(&plain, "DURABLE_SCALER_APP_PORT"), None);
    assert_eq!(env(&plain, "DURABLE_SCALER_APP_EXIT_WAIT"), Some(json!("117s")));

    // A native sidecar is stopped after the app by Kubernetes: it gets neither.
    let native = Running::start(|_| {}).await;
    let (_, answer) = native.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(env(sidecar, "DURABLE_SCALER_APP_EXIT_WAIT"), None);
    assert_eq!(env(sidecar, "DURABLE_SCALER_APP_PORT"), None);
}

#[tokio::test]
async fn an_unlabelled_pod_is_admitted_untouched() {
    let webhook = Running::start(|_| {}).await;
    let mut review = fixture();
    review["request"]["object"]["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("durable-scaler.io/inject");
    let (status, answer) = webhook.review(&review).await;
    assert_eq!((status, &answer["response"]["allowed"]), (StatusCode::OK, &json!(true)));
    assert!(answer["response"].get("patch").is_none());
}

#[tokio::test]
async fn a_pod_without_the_connection_env_is_admitted_with_a_warning_that_says_why() {
    let webhook = Running::start(|_| {}).await;
    let mut review = fixture();
    review["request"]["object"]["spec"]["containers"][0]["env"] =
        json!([{"name": "FUNCTIONS_WORKER_RUNTIME", "value": "node"}]);
    let (status, answer) = webhook.review(&review).await;
    assert_eq!((status, &answer["response"]["allowed"]), (StatusCode::OK, &json!(true)));
    assert!(answer["response"].get("patch").is_none());
    let warning = answer["response"]["warnings"][0].as_str().unwrap();
    assert!(warning.contains("AzureWebJobsStorage") && warning.contains("not injected"), "{warning}");
}

#[tokio::test]
async fn dry_run_gets_the_same_patch_and_counts_no_injection() {
    let webhook = Running::start(|_| {}).await;
    let mut review = fixture();
    review["request"]["dryRun"] = json!(true);
    let (status, answer) = webhook.review(&review).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched(&fixture()["request"]["object"], &answer), expected_pod());
    assert_eq!(webhook.metrics.injections.get(), 0);
    let (_, metrics) = webhook.connect(Http::One).await.get("/metrics").await.unwrap();
    assert!(String::from_utf8_lossy(&metrics).contains("durable_scaler_webhook_injections_total 0"));
}

#[tokio::test]
async fn a_body_over_three_mebibytes_is_a_413_the_client_receives_whether_its_length_is_declared_or_not() {
    // The client is still sending when the webhook decides; it must read the 413, not a reset
    // (`post` fails on a reset). The larger body is past what the webhook drains: it answers
    // and then closes, after the request, so the answer still arrives.
    let webhook = Running::start(|_| {}).await;
    for size in [3 * 1024 * 1024 + 1, 8 * 1024 * 1024] {
        let big = Bytes::from(vec![b' '; size]);
        let (status, body) = webhook.post(Some("application/json"), full(big.clone())).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{size} declared");
        assert!(String::from_utf8_lossy(&body).contains("body over"), "{size}");
        let chunks = big.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
        let (status, _) = webhook.post(Some("application/json"), streamed(chunks)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{size} streamed");
    }
    let (status, _) = webhook
        .connect(Http::Two)
        .await
        .post(Some("application/json"), full(vec![b' '; 3 * 1024 * 1024 + 1]))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "HTTP/2");
}

#[tokio::test]
async fn a_two_mebibyte_pod_is_reviewed_and_injected() {
    // Large env values (inline configuration) make a pod of 2 MiB, within the API server's
    // 3 MiB request limit; built here rather than stored as a 2 MiB file.
    let webhook = Running::start(|_| {}).await;
    let mut review = fixture();
    let env = review["request"]["object"]["spec"]["containers"][0]["env"].as_array_mut().unwrap();
    for i in 0..32 {
        env.push(json!({"name": format!("INLINE_CONFIG_{i}"), "value": "x".repeat(64 * 1024)}));
    }
    let size = review.to_string().len();
    assert!((2 * 1024 * 1024..3 * 1024 * 1024).contains(&size), "{size}");
    let (status, answer) = webhook.review(&review).await;
    assert_eq!(status, StatusCode::OK);
    let pod = patched(&review["request"]["object"], &answer);
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "durable-scaler-sidecar");
}

#[tokio::test]
async fn a_wrong_or_missing_content_type_is_415() {
    let webhook = Running::start(|_| {}).await;
    for content_type in [Some("text/plain"), Some("application/yaml"), None] {
        let (status, _) = webhook.post(content_type, full(FIXTURE)).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type:?}");
    }
    let (status, _) = webhook.post(Some("application/json; charset=utf-8"), full(FIXTURE)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_undecodable_review_is_400_with_the_reason_and_the_uid() {
    let webhook = Running::start(|_| {}).await;
    let (status, body) = webhook.post(Some("application/json"), full("{\"request\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("not JSON"), "{answer}");

    let mut wrong_version = fixture();
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, answer) = webhook.review(&wrong_version).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["response"]["uid"], "7f0b2891-916f-4ed6-b7cd-27bff1815a8c");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("admission.k8s.io/v1"));
}

#[tokio::test]
async fn healthz_answers_ok() {
    let webhook = Running::start(|_| {}).await;
    let (status, body) = webhook.connect(Http::One).await.get("/healthz").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
}

#[tokio::test]
async fn tls_1_2_is_accepted_by_default_and_refused_with_the_1_3_only_flag() {
    let tls12 = |pki: &Pki| https::client_config(&pki.ca_pem, &[&rustls::version::TLS12], Http::One);
    let webhook = Running::start(|_| {}).await;
    let connection = https::connect_with(webhook.addr, tls12(&webhook.pki), Http::One).await.unwrap();
    assert_eq!(connection.version, rustls::ProtocolVersion::TLSv1_2);

    let strict = Running::start(|args| args.tls13_only = true).await;
    assert!(https::connect_with(strict.addr, tls12(&strict.pki), Http::One).await.is_err());
    assert_eq!(strict.connect(Http::One).await.version, rustls::ProtocolVersion::TLSv1_3);
}

#[tokio::test]
async fn an_rsa_key_serves_as_well_as_ecdsa() {
    let webhook = Running::start_with(Pki::rsa_fixture(), |_| {}).await;
    let mut connection = webhook.connect(Http::Two).await;
    assert_eq!(connection.peer_certificates[0], webhook.pki.cert_der());
    let (status, _) = connection.post(Some("application/json"), full(FIXTURE)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_renewed_secret_is_served_to_new_connections_while_open_ones_keep_working() {
    let mut webhook = Running::start(|_| {}).await;
    let mut open = webhook.connect(Http::One).await;
    assert_eq!(open.peer_certificates[0], webhook.pki.cert_der());

    // The renewal keeps the CA bundle trusted by clients: the new pair comes from a new CA,
    // and the client trusts both (as certs-gen's caBundle does during a rotation).
    let renewed = Pki::ecdsa("second");
    let both_cas = format!("{}{}", webhook.pki.ca_pem, renewed.ca_pem);
    webhook.volume.update(&renewed);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let fresh = https::connect(webhook.addr, &both_cas, Http::One).await.unwrap();
        if fresh.peer_certificates[0] == renewed.cert_der() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = open.get("/healthz").await.unwrap();
    assert_eq!(status, StatusCode::OK, "the connection opened before the renewal still works");
    webhook.pki = renewed;
}

#[tokio::test]
async fn a_mismatched_pair_is_refused_and_the_old_certificate_kept() {
    let mut webhook = Running::start(|_| {}).await;
    let broken = Pki { key_pem: Pki::ecdsa("other").key_pem, ..Pki::ecdsa("broken") };
    webhook.volume.update(&broken);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while webhook.certs.reload_failures() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the broken pair was never looked at");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = webhook.connect(Http::One).await.peer_certificates[0].clone();
    assert_eq!(served, webhook.pki.cert_der(), "the previous certificate is still served");
    assert_eq!(webhook.certs.reloads(), 0);
}

#[tokio::test]
async fn plain_http_and_garbage_on_the_port_leave_the_server_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let webhook = Running::start(|_| {}).await;
    for junk in
        [&b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..]]
    {
        let mut tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut sink)).await;
    }
    let (status, _) = webhook.connect(Http::One).await.get("/healthz").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_stops_accepting() {
    let mut webhook = Running::start(|_| {}).await;
    let mut idle = webhook.connect(Http::One).await;
    assert_eq!(idle.get("/healthz").await.unwrap().0, StatusCode::OK);
    webhook.shutdown.trigger();
    let served = webhook.served.take().unwrap();
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(idle.get("/healthz").await.is_err(), "the idle keep-alive connection was closed");
    assert!(https::connect(webhook.addr, &webhook.pki.ca_pem, Http::One).await.is_err());
}

/// Arguments that cannot start (no certificate files): for start-up checks that come first.
fn test_args() -> Args {
    Args {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: "/nonexistent/tls.crt".into(),
        tls_key: "/nonexistent/tls.key".into(),
        tls13_only: false,
        tls_reload_interval: Duration::from_secs(5),
        sidecar_image: "img".to_owned(),
        aggregator: "http://agg:4371".parse().unwrap(),
        sidecar_aggregator_ca: None,
        sidecar_aggregator_ca_secret: None,
        sidecar_image_pull_secrets: Vec::new(),
        native_sidecar: NativeSidecarMode::True,
        sidecar_image_from_pod: true,
        webhook_container: "webhook".to_owned(),
        pod_name: None,
        pod_namespace: None,
    }
}

#[tokio::test]
async fn start_up_names_the_flag_when_the_certificate_is_missing() {
    let args = Args {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        tls_cert: "/nonexistent/tls.crt".into(),
        tls_key: "/nonexistent/tls.key".into(),
        tls13_only: false,
        tls_reload_interval: Duration::from_secs(5),
        sidecar_image: "img".to_owned(),
        aggregator: "http://agg:4371".parse().unwrap(),
        sidecar_aggregator_ca: None,
        sidecar_aggregator_ca_secret: None,
        sidecar_image_pull_secrets: Vec::new(),
        native_sidecar: NativeSidecarMode::True,
        sidecar_image_from_pod: true,
        webhook_container: "webhook".to_owned(),
        pod_name: None,
        pod_namespace: None,
    };
    let error = Webhook::bind_with(&args, None).await.unwrap_err().to_string();
    assert!(error.contains("--tls-cert") && error.contains("/nonexistent/tls.crt"), "{error}");
    let parse_error =
        durable_scaler::cli::Cli::try_parse_from(["durable-scaler", "webhook", "--aggregator", "agg:4371"])
            .unwrap_err()
            .to_string();
    assert!(
        parse_error.contains("--aggregator") && parse_error.contains("not an http(s) URL"),
        "{parse_error}"
    );
    let error =
        Webhook::bind_with(&Args { aggregator: "https://agg:4371".parse().unwrap(), ..args.clone() }, None)
            .await
            .unwrap_err()
            .to_string();
    assert!(error.contains("--sidecar-aggregator-ca") && error.contains("https"), "{error}");
    let error = Webhook::bind_with(
        &Args {
            aggregator: "https://agg:4371".parse().unwrap(),
            sidecar_aggregator_ca: Some("/nonexistent/ca.crt".into()),
            ..args
        },
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("--sidecar-aggregator-ca") && error.contains("/nonexistent/ca.crt"), "{error}");
}

#[tokio::test]
async fn an_https_aggregator_reaches_the_sidecar_with_a_ca_it_accepts() {
    let aggregator = Pki::ecdsa("aggregator");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("aggregator-ca.crt");
    std::fs::write(&ca_file, &aggregator.ca_pem).unwrap();
    let url = "https://durable-scaler-aggregator.durable-scaler:4371";
    let webhook = Running::start(|args| {
        args.aggregator = url.parse().unwrap();
        args.sidecar_aggregator_ca = Some(ca_file.clone());
    })
    .await;
    let (_, answer) = webhook.review(&fixture()).await;
    assert!(answer["response"].get("warnings").is_none(), "{answer}");
    let pod = patched(&fixture()["request"]["object"], &answer);
    let env = pod["spec"]["initContainers"][0]["env"].as_array().unwrap().clone();
    let value = |name: &str| {
        env.iter().find(|e| e["name"] == name).and_then(|e| e["value"].as_str()).map(str::to_owned)
    };
    assert_eq!(value("DURABLE_SCALER_AGGREGATOR").as_deref(), Some(url));
    assert_eq!(value("DURABLE_SCALER_AGGREGATOR_CA").as_deref(), Some(aggregator.ca_pem.trim()));

    // The sidecar's own command line takes the injected values as they are (the connection
    // is a secretKeyRef in the pod; any valid one stands in for it here).
    let mut command_line: Vec<String> = vec!["durable-scaler".into(), "sidecar".into()];
    for (flag, variable) in [
        ("--task-hub", "DURABLE_SCALER_TASK_HUB"),
        ("--aggregator", "DURABLE_SCALER_AGGREGATOR"),
        ("--aggregator-ca", "DURABLE_SCALER_AGGREGATOR_CA"),
    ] {
        // `--flag=value`: the inline PEM starts with dashes.
        command_line
            .push(format!("{flag}={}", value(variable).unwrap_or_else(|| panic!("{variable} injected"))));
    }
    command_line.extend(
        [
            "--connection",
            "UseDevelopmentStorage=true",
            "--pod-name",
            "orders-7d9f-x2",
            "--pod-namespace",
            "apps",
        ]
        .map(str::to_owned),
    );
    let parsed = durable_scaler::cli::Cli::try_parse_from(&command_line)
        .expect("the sidecar parses what was injected");
    let durable_scaler::cli::Command::Sidecar(args) = parsed.command else { panic!("not the sidecar") };
    let sidecar = durable_scaler::sidecar::Config::from_args(args)
        .expect("the sidecar accepts what the webhook injected");
    assert_eq!(sidecar.aggregator_ca.as_deref(), Some(aggregator.ca_pem.trim().as_bytes()));
}

#[tokio::test]
async fn a_ca_from_a_secret_is_mounted_as_the_file_the_sidecar_reads_and_no_env_value_spans_lines() {
    let aggregator = Pki::ecdsa("aggregator");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("aggregator-ca.crt");
    std::fs::write(&ca_file, &aggregator.ca_pem).unwrap();
    let webhook = Running::start(|args| {
        args.aggregator = "https://durable-scaler-aggregator.durable-scaler:4371".parse().unwrap();
        args.sidecar_aggregator_ca = Some(ca_file.clone());
        args.sidecar_aggregator_ca_secret = Some("durable-scaler-aggregator-ca".to_owned());
    })
    .await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_valid_pod(&pod);
    let sidecar = &pod["spec"]["initContainers"][0];
    let ca = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DURABLE_SCALER_AGGREGATOR_CA")
        .unwrap();
    let path = ca["value"].as_str().unwrap();
    // The file the kubelet writes: the mount of the volume that projects the Secret's ca.crt.
    let mount = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())));
    let volume_name = mount.expect("the CA path is inside a mount")["name"].clone();
    let volume =
        pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == volume_name).unwrap();
    assert_eq!(volume["secret"]["secretName"], "durable-scaler-aggregator-ca");
    assert_eq!(
        format!(
            "{}/{}",
            mount.unwrap()["mountPath"].as_str().unwrap(),
            volume["secret"]["items"][0]["path"].as_str().unwrap()
        ),
        path
    );
    for container in pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["spec"]["initContainers"].as_array().unwrap())
    {
        for entry in container["env"].as_array().into_iter().flatten() {
            assert!(!entry["value"].as_str().unwrap_or_default().contains('\n'), "{entry}");
        }
    }
}

#[tokio::test]
async fn the_sidecars_pull_secrets_join_the_pods_own_once() {
    let webhook = Running::start(|args| {
        args.sidecar_image_pull_secrets = vec!["private-registry".to_owned(), "app-registry".to_owned()];
    })
    .await;
    let mut review = fixture();
    review["request"]["object"]["spec"]["imagePullSecrets"] = json!([{"name": "app-registry"}]);
    let (_, answer) = webhook.review(&review).await;
    let pod = patched(&review["request"]["object"], &answer);
    assert_valid_pod(&pod);
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "app-registry"}, {"name": "private-registry"}])
    );
    assert_eq!(status_annotation(&review, &answer)["imagePullSecrets"], json!(["private-registry"]));

    let error = Webhook::bind_with(
        &Args { sidecar_image_pull_secrets: vec!["Not A Name".to_owned()], ..test_args() },
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("--sidecar-image-pull-secrets") && error.contains("Not A Name"), "{error}");
}

#[tokio::test]
async fn a_short_grace_is_raised_for_the_drain_and_the_annotation_turns_it_off() {
    let webhook = Running::start(|_| {}).await;
    let mut review = fixture();
    review["request"]["object"]["spec"]["terminationGracePeriodSeconds"] = json!(5);
    let (_, answer) = webhook.review(&review).await;
    let pod = patched(&review["request"]["object"], &answer);
    assert_valid_pod(&pod);
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
    let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING", "value": "true"})));
    assert_eq!(status_annotation(&review, &answer)["drain"]["terminationGracePeriodSeconds"], "5 -> 30");

    review["request"]["object"]["metadata"]["annotations"]["durable-scaler.io/drain"] = json!("false");
    let (_, answer) = webhook.review(&review).await;
    let pod = patched(&review["request"]["object"], &answer);
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 5);
    assert_eq!(pod["spec"]["containers"][0], review["request"]["object"]["spec"]["containers"][0]);
}

/// The fixture's app with its host keys in a Kubernetes Secret (`AzureWebJobsSecretStorageType`
/// and `AzureWebJobsKubernetesSecretName`, as azure-functions-host's
/// `DefaultSecretManagerProvider` and `SimpleKubernetesClient` read them) and its port.
fn keyed_review() -> Value {
    let mut review = fixture();
    let app = &mut review["request"]["object"]["spec"]["containers"][0];
    app["ports"] = json!([{"name": "http", "containerPort": 80, "protocol": "TCP"}]);
    let env = app["env"].as_array_mut().unwrap();
    env.push(json!({"name": "AzureWebJobsSecretStorageType", "value": "kubernetes"}));
    env.push(json!({"name": "AzureWebJobsKubernetesSecretName", "value": "secrets/orders-func-keys"}));
    review
}

#[tokio::test]
async fn an_app_with_its_keys_in_a_secret_gets_a_prestop_drain_the_api_server_accepts() {
    for native in [true, false] {
        let webhook = Running::start(|args| {
            args.native_sidecar = if native { NativeSidecarMode::True } else { NativeSidecarMode::False }
        })
        .await;
        let review = keyed_review();
        let (status, answer) = webhook.review(&review).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let pod = patched(&review["request"]["object"], &answer);
        assert_valid_pod(&pod);
        let hook = &pod["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"];
        assert_eq!(hook["path"], "/drain");
        assert_eq!(hook["port"], 9095);
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 1830);
        let sidecar = pod["spec"][if native { "initContainers" } else { "containers" }]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "durable-scaler-sidecar")
            .cloned()
            .unwrap();
        let env = |name: &str| sidecar["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
        assert_eq!(env("DURABLE_SCALER_DRAIN_TOKEN").unwrap()["value"], hook["httpHeaders"][0]["value"]);
        assert_eq!(env("DURABLE_SCALER_HOST_URL").unwrap()["value"], "http://127.0.0.1:80");
        assert_eq!(env("DURABLE_SCALER_DRAIN_WAIT").unwrap()["value"], "1815s");
        assert!(
            sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "durable-scaler-host-key")
        );
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "durable-scaler-host-key");
        assert_eq!(volume.unwrap()["secret"]["secretName"], "orders-func-keys");
        let said = status_annotation(&review, &answer)["drain"]["preStop"].as_str().unwrap().to_owned();
        assert!(said.contains("orders-func-keys") && said.contains("port 80"), "{said}");
        if !native {
            // The plain sidecar stays as long as the hook may run.
            assert_eq!(env("DURABLE_SCALER_APP_EXIT_WAIT").unwrap()["value"], "1827s");
        }
    }
}

#[tokio::test]
async fn windows_pods_and_plain_sidecars_in_pods_that_must_complete_are_skipped_and_counted() {
    let webhook = Running::start(|args| args.native_sidecar = NativeSidecarMode::False).await;
    let mut windows = fixture();
    windows["request"]["object"]["spec"]["os"] = json!({"name": "windows"});
    let mut job = fixture();
    job["request"]["object"]["spec"]["restartPolicy"] = json!("OnFailure");
    for review in [&windows, &job] {
        let (status, answer) = webhook.review(review).await;
        assert_eq!(status, StatusCode::OK);
        assert!(answer["response"].get("patch").is_none(), "{answer}");
    }
    let (_, metrics) = webhook.connect(Http::One).await.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics).into_owned();
    for reason in ["windows", "never_completes"] {
        assert!(
            text.contains(&format!("durable_scaler_webhook_skipped_total{{reason=\"{reason}\"}} 1")),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures: envFrom, hostNetwork, Guaranteed QoS, invalid task hub
// ---------------------------------------------------------------------------------------------

fn load(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/admission/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The sidecar's env entries named `name`, in order, after the answer's patch is applied.
fn sidecar_env(review: &Value, answer: &Value, name: &str) -> Vec<Value> {
    let pod = patched(&review["request"]["object"], answer);
    let sidecar = pod["spec"]["initContainers"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(sidecar["name"], "durable-scaler-sidecar");
    assert!(sidecar.get("envFrom").is_none(), "the sidecar never gets a whole Secret");
    sidecar["env"].as_array().unwrap().iter().filter(|e| e["name"] == name).cloned().collect()
}

#[tokio::test]
async fn an_env_from_secret_app_gets_the_sidecar_with_only_that_key() {
    let webhook = Running::start(|_| {}).await;
    let review = load("envfrom-secret-pod-create.json");
    let (_, answer) = webhook.review(&review).await;
    assert_eq!(
        sidecar_env(&review, &answer, "DURABLE_SCALER_CONNECTION"),
        [json!({"name": "DURABLE_SCALER_CONNECTION", "valueFrom": {"secretKeyRef":
            {"name": "orders-func-settings", "key": "AzureWebJobsStorage", "optional": true}}})]
    );
}

#[tokio::test]
async fn an_env_from_config_map_with_a_prefix_gives_the_key_without_it_in_source_order() {
    let webhook = Running::start(|_| {}).await;
    let review = load("envfrom-configmap-prefix-pod-create.json");
    let (_, answer) = webhook.review(&review).await;
    assert_eq!(
        sidecar_env(&review, &answer, "DURABLE_SCALER_CONNECTION"),
        [
            json!({"name": "DURABLE_SCALER_CONNECTION", "valueFrom": {"configMapKeyRef":
                {"name": "orders-func-config", "key": "AzureWebJobsStorage", "optional": true}}}),
            json!({"name": "DURABLE_SCALER_CONNECTION", "valueFrom": {"configMapKeyRef":
                {"name": "orders-func-storage", "key": "Storage", "optional": true}}}),
        ]
    );
}

/// The oldest Kubernetes the install supports and the newest kubernetes-validate bundles.
const SCHEMA_VERSIONS: [&str; 2] = ["1.28.0", "1.37.0"];

/// Validates a patched pod against the Kubernetes JSON schemas (strict: an unknown field is
/// an error) of [`SCHEMA_VERSIONS`].
fn assert_valid_pod(pod: &Value) {
    if !crate::manifests::python_with("kubernetes_validate") {
        return;
    }
    for version in SCHEMA_VERSIONS {
        if let Err(report) = crate::manifests::kubernetes_validate(&[pod], version) {
            panic!("the patched pod against Kubernetes {version}:\n{report}\n{pod:#}");
        }
    }
}

#[tokio::test]
async fn the_apps_settings_reach_the_sidecar_from_env_and_env_from_as_dotnet_reads_them() {
    let webhook = Running::start(|_| {}).await;
    let review = load("envfrom-settings-pod-create.json");
    let (_, answer) = webhook.review(&review).await;
    assert_valid_pod(&patched(&review["request"]["object"], &answer));
    // No hub named: the extension's default, WEBSITE_SITE_NAME sanitised, then what the
    // envFrom sources may set, in the kubelet's order.
    let hub = sidecar_env(&review, &answer, "DURABLE_SCALER_TASK_HUB");
    assert_eq!(hub[0], json!({"name": "DURABLE_SCALER_TASK_HUB", "value": "ordersfunc"}));
    assert_eq!(
        hub[1..],
        [
            json!({"name": "DURABLE_SCALER_TASK_HUB", "valueFrom": {"secretKeyRef": {"name": "orders-func-settings",
                "key": "AzureFunctionsJobHost__extensions__durableTask__hubName", "optional": true}}}),
            json!({"name": "DURABLE_SCALER_TASK_HUB", "valueFrom": {"configMapKeyRef": {"name": "orders-durable-config",
                "key": "hubName", "optional": true}}}),
        ]
    );
    // A lowercase literal in env wins over both sources, as in the kubelet and in .NET.
    assert_eq!(
        sidecar_env(&review, &answer, "DURABLE_SCALER_APP_MAX_ACTIVITIES"),
        [json!({"name": "DURABLE_SCALER_APP_MAX_ACTIVITIES", "value": "40"})]
    );
    for (ours, key) in [
        ("DURABLE_SCALER_APP_MAX_ORCHESTRATIONS", "maxConcurrentOrchestratorFunctions"),
        (
            "DURABLE_SCALER_APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT",
            "storageProvider__controlQueueVisibilityTimeout",
        ),
        (
            "DURABLE_SCALER_APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT",
            "storageProvider__workItemQueueVisibilityTimeout",
        ),
        ("DURABLE_SCALER_APP_CONTROL_QUEUE_BUFFER_THRESHOLD", "storageProvider__controlQueueBufferThreshold"),
        ("DURABLE_SCALER_APP_MAX_QUEUE_POLLING_INTERVAL", "storageProvider__maxQueuePollingInterval"),
    ] {
        assert_eq!(
            sidecar_env(&review, &answer, ours),
            [
                json!({"name": ours, "valueFrom": {"secretKeyRef": {"name": "orders-func-settings",
                    "key": format!("AzureFunctionsJobHost__extensions__durableTask__{key}"), "optional": true}}}),
                json!({"name": ours, "valueFrom": {"configMapKeyRef": {"name": "orders-durable-config",
                    "key": key, "optional": true}}}),
            ],
            "{ours}"
        );
    }
    assert!(answer["response"].get("warnings").is_none(), "{answer}");
}

#[tokio::test]
async fn a_site_name_from_a_reference_with_no_hub_named_is_skipped_with_a_reason() {
    let webhook = Running::start(|_| {}).await;
    let mut review = load("envfrom-settings-pod-create.json");
    review["request"]["object"]["spec"]["containers"][0]["env"][1] = json!({"name": "WEBSITE_SITE_NAME", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "name"}}});
    let (_, answer) = webhook.review(&review).await;
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    let (_, metrics) = webhook.connect(Http::One).await.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics).into_owned();
    assert!(text.contains("durable_scaler_webhook_skipped_total{reason=\"unknown_task_hub\"} 1"), "{text}");
}

#[tokio::test]
async fn an_aks_workload_identity_app_gets_a_sidecar_that_reads_storage_with_the_same_identity() {
    let webhook = Running::start(|_| {}).await;
    let review = load("identity-workload-pod-create.json");
    let (_, answer) = webhook.review(&review).await;
    let pod = patched(&review["request"]["object"], &answer);
    assert_valid_pod(&pod);
    let sidecar = pod["spec"]["initContainers"][0].clone();
    let entry = |name: &str| sidecar_env(&review, &answer, name);
    assert!(entry("DURABLE_SCALER_CONNECTION").is_empty());
    assert_eq!(
        entry("DURABLE_SCALER_CONNECTION__accountName"),
        [json!({"name": "DURABLE_SCALER_CONNECTION__accountName", "value": "ordersfuncstorage"})]
    );
    assert_eq!(
        entry("DURABLE_SCALER_CONNECTION__clientId"),
        [
            json!({"name": "DURABLE_SCALER_CONNECTION__clientId", "valueFrom": {"configMapKeyRef": {"name": "orders-identity", "key": "client-id"}}})
        ]
    );
    let app = &pod["spec"]["containers"][0];
    for name in ["AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST"] {
        let original = app["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap();
        assert_eq!(entry(name), std::slice::from_ref(original), "{name}");
    }
    let token_mount = app["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/run/secrets/azure/wi")
        .unwrap();
    assert!(sidecar["volumeMounts"].as_array().unwrap().contains(token_mount), "{sidecar}");

    // The sidecar's own command line takes what was injected (the clientId reference
    // resolved by the kubelet; any id stands in for it here).
    let parsed = durable_scaler::cli::Cli::try_parse_from([
        "durable-scaler",
        "sidecar",
        "--task-hub",
        "OrdersHub",
        "--connection-account-name",
        "ordersfuncstorage",
        "--connection-client-id",
        "5f6a7b8c-0000-4000-8000-1a2b3c4d5e6f",
        "--aggregator",
        "http://agg:4371",
        "--pod-name",
        "orders-7d9f-x2",
        "--pod-namespace",
        "orders",
    ])
    .expect("the sidecar parses the identity settings");
    let durable_scaler::cli::Command::Sidecar(args) = parsed.command else { panic!("not the sidecar") };
    durable_scaler::sidecar::Config::from_args(args).expect("the sidecar builds the identity-based account");
}

#[tokio::test]
async fn a_host_network_pod_is_admitted_without_a_sidecar_and_counted() {
    let webhook = Running::start(|_| {}).await;
    let (status, answer) = webhook.review(&load("hostnetwork-pod-create.json")).await;
    assert_eq!((status, &answer["response"]["allowed"]), (StatusCode::OK, &json!(true)));
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert!(answer["response"]["warnings"][0].as_str().unwrap().contains("hostNetwork"));
    let (_, metrics) = webhook.connect(Http::One).await.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics).into_owned();
    assert!(text.contains("durable_scaler_webhook_skipped_total{reason=\"host_network\"} 1"), "{text}");
}

#[tokio::test]
async fn a_guaranteed_pod_stays_guaranteed() {
    let webhook = Running::start(|_| {}).await;
    let review = load("guaranteed-pod-create.json");
    let (_, answer) = webhook.review(&review).await;
    let pod = patched(&review["request"]["object"], &answer);
    let resources = &pod["spec"]["initContainers"][0]["resources"];
    assert_eq!(resources["requests"], resources["limits"], "{resources}");
    assert_eq!(resources["limits"], json!({"cpu": "200m", "memory": "64Mi"}));
}

#[tokio::test]
async fn an_invalid_task_hub_name_is_never_injected() {
    let webhook = Running::start(|_| {}).await;
    let (_, answer) = webhook.review(&load("invalid-task-hub-pod-create.json")).await;
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    let warning = answer["response"]["warnings"][0].as_str().unwrap();
    assert!(warning.contains("\"orders-hub\"") && warning.contains("not injected"), "{warning}");
}

// ---------------------------------------------------------------------------------------------
// Against a fake API server: native-sidecar auto, InjectionSkipped Events, the own image
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ApiState {
    /// `gitVersion` answered on /version.
    api_server: String,
    /// Node name and kubelet version of every node.
    nodes: Vec<(String, String)>,
    /// Bodies of the Events created, with the namespace of the request path.
    events: Vec<(String, Value)>,
    /// The webhook's own pod: (namespace, name, its `webhook` container's image).
    own_pod: Option<(String, String, String)>,
    /// Every request: method and path.
    requests: Vec<String>,
}

/// A fake kube-apiserver on loopback answering the calls the webhook makes; stops when
/// dropped. Shapes follow kubernetes/api (`core/v1/types.go` Node, NodeSystemInfo, Pod;
/// `events/v1/types.go` Event) and apimachinery `pkg/version/types.go` Info.
struct FakeApi {
    addr: std::net::SocketAddr,
    state: Arc<std::sync::Mutex<ApiState>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeApi {
    async fn start(api_server: &str, kubelets: &[&str]) -> Self {
        let state = Arc::new(std::sync::Mutex::new(ApiState {
            api_server: api_server.to_owned(),
            nodes: kubelets.iter().enumerate().map(|(i, v)| (format!("node-{i}"), (*v).to_owned())).collect(),
            ..ApiState::default()
        }));
        let app = axum::Router::new().fallback(fake_api).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state, server }
    }

    fn client(&self) -> kube::Client {
        durable_scaler::telemetry::install_crypto_provider();
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap()
    }
}

async fn fake_api(
    axum::extract::State(state): axum::extract::State<Arc<std::sync::Mutex<ApiState>>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut state = state.lock().unwrap();
    let path = uri.path().to_owned();
    state.requests.push(format!("{method} {path}"));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        // GET /version: kube-apiserver's version.Info (every field is always present).
        ("GET", ["version"]) => {
            let minor = state.api_server.split('.').nth(1).unwrap_or_default().to_owned();
            axum::Json(json!({
                "major": "1", "minor": minor, "gitVersion": state.api_server,
                "gitCommit": "0000000", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24.0", "compiler": "gc", "platform": "linux/amd64",
            }))
            .into_response()
        }
        // GET /api/v1/nodes?limit=N: a NodeList, one page (no `continue` token), each node with
        // status.nodeInfo (NodeSystemInfo, whose fields are all required strings).
        ("GET", ["api", "v1", "nodes"]) => {
            let items: Vec<Value> = state
                .nodes
                .iter()
                .map(|(name, kubelet)| {
                    json!({"metadata": {"name": name}, "status": {"nodeInfo": {
                        "kubeletVersion": kubelet, "kubeProxyVersion": "", "machineID": "m",
                        "systemUUID": "u", "bootID": "b", "kernelVersion": "6.8.0",
                        "osImage": "Ubuntu", "containerRuntimeVersion": "containerd://2.0.0",
                        "operatingSystem": "linux", "architecture": "amd64"}}})
                })
                .collect();
            axum::Json(json!({"kind": "NodeList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": "1"}, "items": items}))
            .into_response()
        }
        // POST /apis/events.k8s.io/v1/namespaces/{ns}/events: 201 with the stored Event (a name
        // made from generateName, as the API server does).
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let mut event: Value = serde_json::from_slice(&body).unwrap();
            state.events.push((ns.to_string(), event.clone()));
            let name = format!("{}abcde", event["metadata"]["generateName"].as_str().unwrap_or_default());
            event["metadata"]["name"] = json!(name);
            (axum::http::StatusCode::CREATED, axum::Json(event)).into_response()
        }
        // GET /api/v1/namespaces/{ns}/pods/{name}: the pod, or 404 with a Status body.
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => match &state.own_pod {
            Some((pod_ns, pod_name, image)) if pod_ns == ns && pod_name == name => axum::Json(json!({
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"containers": [{"name": "webhook", "image": image}]},
            }))
            .into_response(),
            _ => (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": format!("pods \"{name}\" not found"), "reason": "NotFound", "code": 404})),
            )
                .into_response(),
        },
        _ => (axum::http::StatusCode::NOT_FOUND, "not faked").into_response(),
    }
}

fn status_annotation(review: &Value, answer: &Value) -> Value {
    let pod = patched(&review["request"]["object"], answer);
    serde_json::from_str(pod["metadata"]["annotations"]["durable-scaler.io/status"].as_str().unwrap())
        .unwrap()
}

#[tokio::test]
async fn auto_chooses_a_native_sidecar_when_the_api_server_and_every_kubelet_are_1_33_or_newer() {
    let api = FakeApi::start("v1.33.4", &["v1.33.1", "v1.34.0"]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.native_sidecar = NativeSidecarMode::Auto).await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_valid_pod(&pod);
    assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");
    let status = status_annotation(&fixture(), &answer);
    assert_eq!(status["mode"], "native-sidecar");
    assert!(status["modeReason"].as_str().unwrap().contains("1.33+"), "{status}");
}

#[tokio::test]
async fn auto_chooses_a_plain_container_where_an_admin_may_have_turned_the_gate_off() {
    let api = FakeApi::start("v1.32.4", &["v1.32.4", "v1.32.4"]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.native_sidecar = NativeSidecarMode::Auto).await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert!(pod["spec"].get("initContainers").is_none(), "{pod}");
    let status = status_annotation(&fixture(), &answer);
    assert!(status["modeReason"].as_str().unwrap().contains("before 1.33"), "{status}");
}

#[tokio::test]
async fn auto_chooses_a_plain_container_when_one_kubelet_is_older() {
    let api = FakeApi::start("v1.33.4", &["v1.33.4", "v1.30.15"]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.native_sidecar = NativeSidecarMode::Auto).await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_valid_pod(&pod);
    assert!(pod["spec"].get("initContainers").is_none());
    assert_eq!(pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], "functions");
    let status = status_annotation(&fixture(), &answer);
    assert_eq!(status["mode"], "container");
    assert!(status["modeReason"].as_str().unwrap().contains("node-1"), "{status}");
}

#[tokio::test]
async fn auto_chooses_a_plain_container_when_the_api_server_is_older() {
    let api = FakeApi::start("v1.28.9", &["v1.28.9"]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.native_sidecar = NativeSidecarMode::Auto).await;
    let (_, answer) = webhook.review(&fixture()).await;
    let status = status_annotation(&fixture(), &answer);
    assert_eq!(status["mode"], "container");
    assert!(status["modeReason"].as_str().unwrap().contains("API server is 1.28"), "{status}");
}

#[tokio::test]
async fn a_forced_native_sidecar_is_kept_on_1_29_and_made_plain_where_1_28_would_refuse_the_pod() {
    let api = FakeApi::start("v1.30.2", &["v1.29.8"]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.native_sidecar = NativeSidecarMode::True).await;
    let (_, answer) = webhook.review(&fixture()).await;
    assert_eq!(
        patched(&fixture()["request"]["object"], &answer)["spec"]["initContainers"][0]["restartPolicy"],
        "Always"
    );

    let api = FakeApi::start("v1.28.9", &["v1.28.9"]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.native_sidecar = NativeSidecarMode::True).await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_valid_pod(&pod);
    assert!(pod["spec"].get("initContainers").is_none(), "{pod}");
    let status = status_annotation(&fixture(), &answer);
    assert!(status["modeReason"].as_str().unwrap().contains("refused"), "{status}");

    // A pod's own annotation asking for native gets the same protection, with a warning.
    let mut review = fixture();
    review["request"]["object"]["metadata"]["annotations"]["durable-scaler.io/native-sidecar"] =
        json!("true");
    let (_, answer) = webhook.review(&review).await;
    assert!(patched(&review["request"]["object"], &answer)["spec"].get("initContainers").is_none());
    let warnings = answer["response"]["warnings"].to_string();
    assert!(warnings.contains("refuse the pod"), "{warnings}");
}

#[tokio::test]
async fn a_skipped_pod_gets_one_event_on_its_replica_set_within_the_window() {
    let api = FakeApi::start("v1.30.4", &[]).await;
    let webhook =
        Running::start_with_api(api.client(), |args| args.pod_name = Some("webhook-0".into())).await;
    let review = load("hostnetwork-pod-create.json");
    for _ in 0..3 {
        let (status, _) = webhook.review(&review).await;
        assert_eq!(status, StatusCode::OK);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.state().events.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no Event was created");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give any (wrong) further Events time to arrive before counting them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = api.state().events.clone();
    assert_eq!(events.len(), 1, "{events:?}");
    let (namespace, event) = &events[0];
    assert_eq!(namespace, "orders");
    assert_eq!(event["reason"], "InjectionSkipped");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reportingController"], "durable-scaler.io/webhook");
    assert_eq!(event["reportingInstance"], "webhook-0");
    assert!(event["eventTime"].is_string());
    assert!(event["note"].as_str().unwrap().starts_with("host_network: "), "{event}");
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-func-7d9f8c6b5d",
               "namespace": "orders", "uid": "0b6a3e7c-2f4d-4c1e-8e9b-5a6b7c8d9e0f"})
    );
    assert_eq!(webhook.metrics.encode().matches("reason=\"host_network\"} 3").count(), 1);
}

#[tokio::test]
async fn a_dry_run_skip_records_no_event() {
    let api = FakeApi::start("v1.30.4", &[]).await;
    let webhook = Running::start_with_api(api.client(), |_| {}).await;
    let mut review = load("hostnetwork-pod-create.json");
    review["request"]["dryRun"] = json!(true);
    webhook.review(&review).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(api.state().events.is_empty());
}

#[tokio::test]
async fn the_sidecar_image_follows_the_webhooks_own_pod_image() {
    let api = FakeApi::start("v1.30.4", &[]).await;
    // As after `kubectl set image deployment/durable-scaler-webhook webhook=...`: the
    // container's image changed, the env var (--sidecar-image) did not.
    api.state().own_pod = Some((
        "durable-scaler".into(),
        "webhook-0".into(),
        "registry.example.com/team/durable-scaler:0.2.0".into(),
    ));
    let webhook = Running::start_with_api(api.client(), |args| {
        args.pod_name = Some("webhook-0".into());
        args.pod_namespace = Some("durable-scaler".into());
    })
    .await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_eq!(pod["spec"]["initContainers"][0]["image"], "registry.example.com/team/durable-scaler:0.2.0");
}

#[tokio::test]
async fn without_its_pod_the_sidecar_image_is_the_flag() {
    let api = FakeApi::start("v1.30.4", &[]).await;
    let webhook = Running::start_with_api(api.client(), |args| {
        args.pod_name = Some("gone".into());
        args.pod_namespace = Some("durable-scaler".into());
    })
    .await;
    let (_, answer) = webhook.review(&fixture()).await;
    let pod = patched(&fixture()["request"]["object"], &answer);
    assert_eq!(pod["spec"]["initContainers"][0]["image"], "ghcr.io/durable-scaler/durable-scaler:test");
}
