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
    webhook::{Args, Webhook, metrics::Metrics},
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
        durable_scaler::telemetry::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let volume = SecretVolume::new(dir.path(), &pki);
        let mut args = Args {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls_cert: volume.cert(),
            tls_key: volume.key(),
            tls13_only: false,
            tls_reload_interval: Duration::from_secs(5),
            sidecar_image: "ghcr.io/durable-scaler/durable-scaler:test".to_owned(),
            aggregator: "http://durable-scaler-aggregator.durable-scaler:4371".parse().unwrap(),
            sidecar_aggregator_ca: None,
            native_sidecar: true,
        };
        configure(&mut args);
        let webhook = Webhook::bind(&args).await.unwrap().with_reload_interval(Duration::from_millis(50));
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
/// with the connection's `secretKeyRef` copied as it stands, the token volume, the status
/// annotation, and nothing else changed.
fn expected_pod() -> Value {
    let mut pod = fixture()["request"]["object"].clone();
    pod["metadata"]["annotations"]["durable-scaler.io/status"] = json!(
        json!({"containers": ["durable-scaler-sidecar"], "mode": "native-sidecar",
               "version": env!("CARGO_PKG_VERSION"), "volumes": ["durable-scaler-token"]})
        .to_string()
    );
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
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
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
    let webhook = Running::start(|args| args.native_sidecar = false).await;
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
async fn a_body_over_one_mebibyte_is_413_whether_its_length_is_declared_or_not() {
    let webhook = Running::start(|_| {}).await;
    let big = Bytes::from(vec![b' '; 1024 * 1024 + 1]);
    let (status, _) = webhook.post(Some("application/json"), full(big.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = big.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
    let (status, _) = webhook.post(Some("application/json"), streamed(chunks)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
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

#[tokio::test]
async fn start_up_names_the_flag_when_the_certificate_is_missing() {
    let args = Args {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: "/nonexistent/tls.crt".into(),
        tls_key: "/nonexistent/tls.key".into(),
        tls13_only: false,
        tls_reload_interval: Duration::from_secs(5),
        sidecar_image: "img".to_owned(),
        aggregator: "http://agg:4371".parse().unwrap(),
        sidecar_aggregator_ca: None,
        native_sidecar: true,
    };
    let error = Webhook::bind(&args).await.unwrap_err().to_string();
    assert!(error.contains("--tls-cert") && error.contains("/nonexistent/tls.crt"), "{error}");
    let parse_error =
        durable_scaler::cli::Cli::try_parse_from(["durable-scaler", "webhook", "--aggregator", "agg:4371"])
            .unwrap_err()
            .to_string();
    assert!(
        parse_error.contains("--aggregator") && parse_error.contains("not an http(s) URL"),
        "{parse_error}"
    );
    let error = Webhook::bind(&Args { aggregator: "https://agg:4371".parse().unwrap(), ..args.clone() })
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("--sidecar-aggregator-ca") && error.contains("https"), "{error}");
    let error = Webhook::bind(&Args {
        aggregator: "https://agg:4371".parse().unwrap(),
        sidecar_aggregator_ca: Some("/nonexistent/ca.crt".into()),
        ..args
    })
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
