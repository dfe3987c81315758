//! `certs-gen create`, `patch` and `run` (the renewer loop) against a fake Kubernetes API
//! served over HTTP on loopback, so the real `kube` client (its URL building, serialization,
//! error mapping) runs. Each fake endpoint says which real API behaviour it stands for. The
//! loop's time is a fake [`Clock`]: each sleep moves the wall clock on at once.

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::get,
};
use certs_gen::{
    cluster::{self, Outcome, SecretSpec},
    pki,
    renewer::{self, Clock, Schedule},
};
use serde_json::{Value, json};
use time::OffsetDateTime;

const NS: &str = "durable-scaler";
const SECRET: &str = "durable-scaler-webhook-tls";
const SERVICE: &str = "durable-scaler-webhook";
const CONFIG: &str = "durable-scaler-webhook";
const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Default)]
struct Fake {
    /// Secrets by (namespace, name), as stored (data base64-encoded, as the API returns it).
    secrets: HashMap<(String, String), Value>,
    configs: HashMap<String, Value>,
    resource_version: u64,
    /// Every call, as "METHOD path".
    calls: Vec<String>,
    /// When set, the next Secret create loses a race: this Secret appears first.
    concurrent_create: Option<Value>,
    /// When set, the next Secret replace loses a race: another pod's replace of this Secret
    /// lands first (a new resourceVersion), as when two webhook replicas renew at once.
    concurrent_replace: Option<Value>,
}

type Shared = Arc<Mutex<Fake>>;

/// The API server's Status object for an error (`kind: Status`), which kube maps to
/// `kube::Error::Api` with the code and reason.
fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Json<Value>) {
    (
        code,
        Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": reason, "code": code.as_u16()})),
    )
}

impl Fake {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
}

/// GET /api/v1/namespaces/{ns}/secrets/{name}: the Secret, or 404 NotFound.
async fn get_secret(
    State(fake): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    fake.calls.push(format!("GET secrets/{name}"));
    match fake.secrets.get(&(ns, name.clone())) {
        Some(secret) => (StatusCode::OK, Json(secret.clone())),
        None => status(StatusCode::NOT_FOUND, "NotFound", &format!("secrets \"{name}\" not found")),
    }
}

/// POST /api/v1/namespaces/{ns}/secrets: 201 with the stored object (a resourceVersion
/// assigned), or 409 AlreadyExists when the name is taken.
async fn create_secret(
    State(fake): State<Shared>,
    Path(ns): Path<String>,
    Json(mut secret): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    let name = secret["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    fake.calls.push(format!("POST secrets/{name}"));
    if let Some(mut winner) = fake.concurrent_create.take() {
        winner["metadata"]["resourceVersion"] = json!(fake.next_version());
        fake.secrets.insert((ns.clone(), name.clone()), winner);
    }
    if fake.secrets.contains_key(&(ns.clone(), name.clone())) {
        return status(StatusCode::CONFLICT, "AlreadyExists", &format!("secrets \"{name}\" already exists"));
    }
    secret["metadata"]["resourceVersion"] = json!(fake.next_version());
    fake.secrets.insert((ns, name), secret.clone());
    (StatusCode::CREATED, Json(secret))
}

/// PUT /api/v1/namespaces/{ns}/secrets/{name}: replaces when the body's resourceVersion is
/// the stored one (optimistic concurrency), else 409 Conflict.
async fn replace_secret(
    State(fake): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    Json(mut secret): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    fake.calls.push(format!("PUT secrets/{name}"));
    let key = (ns, name.clone());
    if let Some(mut winner) = fake.concurrent_replace.take() {
        winner["metadata"]["resourceVersion"] = json!(fake.next_version());
        fake.secrets.insert(key.clone(), winner);
    }
    let Some(stored) = fake.secrets.get(&key) else {
        return status(StatusCode::NOT_FOUND, "NotFound", &format!("secrets \"{name}\" not found"));
    };
    if stored["metadata"]["resourceVersion"] != secret["metadata"]["resourceVersion"] {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    secret["metadata"]["resourceVersion"] = json!(fake.next_version());
    fake.secrets.insert(key, secret.clone());
    (StatusCode::OK, Json(secret))
}

/// GET /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}
/// (cluster-scoped): the object, or 404 NotFound.
async fn get_config(State(fake): State<Shared>, Path(name): Path<String>) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    fake.calls.push(format!("GET mutatingwebhookconfigurations/{name}"));
    match fake.configs.get(&name) {
        Some(config) => (StatusCode::OK, Json(config.clone())),
        None => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
    }
}

/// PATCH of the same path with `application/strategic-merge-patch+json`: `webhooks` is a
/// list merged by its `name` key, so each patch entry merges into the webhook of that name
/// and the other fields stay. Other patch types are answered 415 as the API server would
/// for a type this fake does not stand in for.
async fn patch_config(
    State(fake): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(patch): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    fake.calls.push(format!("PATCH mutatingwebhookconfigurations/{name}"));
    if headers.get("content-type").and_then(|v| v.to_str().ok())
        != Some("application/strategic-merge-patch+json")
    {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", "unsupported patch type");
    }
    let version = fake.next_version();
    let Some(config) = fake.configs.get_mut(&name) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "not found");
    };
    for entry in patch["webhooks"].as_array().cloned().unwrap_or_default() {
        let webhooks = config["webhooks"].as_array_mut().unwrap();
        let Some(target) = webhooks.iter_mut().find(|w| w["name"] == entry["name"]) else {
            webhooks.push(entry);
            continue;
        };
        for (key, value) in entry["clientConfig"].as_object().unwrap() {
            target["clientConfig"][key] = value.clone();
        }
    }
    config["metadata"]["resourceVersion"] = json!(version);
    (StatusCode::OK, Json(config.clone()))
}

struct Api {
    fake: Shared,
    client: kube::Client,
}

async fn fake_api() -> Api {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake: Shared = Arc::default();
    let app = Router::new()
        .route("/api/v1/namespaces/{ns}/secrets", axum::routing::post(create_secret))
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret).put(replace_secret))
        .route(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
            get(get_config).patch(patch_config),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    Api { fake, client: kube::Client::try_from(config).unwrap() }
}

impl Api {
    fn calls(&self) -> Vec<String> {
        self.fake.lock().unwrap().calls.clone()
    }

    fn stored_secret(&self) -> Value {
        self.fake.lock().unwrap().secrets[&(NS.to_owned(), SECRET.to_owned())].clone()
    }

    fn put_secret(&self, material: &pki::Material) {
        let mut fake = self.fake.lock().unwrap();
        let version = fake.next_version();
        fake.secrets.insert((NS.to_owned(), SECRET.to_owned()), stored(material, &version));
    }
}

/// A Secret as the API server returns it: `data` values base64-encoded.
fn stored(material: &pki::Material, version: &str) -> Value {
    let data = serde_json::to_value(k8s_openapi::api::core::v1::Secret {
        data: Some(
            [("ca.crt", &material.ca_pem), ("tls.crt", &material.cert_pem), ("tls.key", &material.key_pem)]
                .into_iter()
                .chain(material.ca_key_pem.iter().map(|key| ("ca.key", key)))
                .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    })
    .unwrap()["data"]
        .clone();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
           "metadata": {"name": SECRET, "namespace": NS, "resourceVersion": version}, "data": data})
}

fn material_of(secret: &Value) -> pki::Material {
    let parsed: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret.clone()).unwrap();
    let data = parsed.data.unwrap();
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    pki::Material {
        ca_pem: text("ca.crt"),
        cert_pem: text("tls.crt"),
        key_pem: text("tls.key"),
        ca_key_pem: data.get("ca.key").map(|key| String::from_utf8(key.0.clone()).unwrap()),
    }
}

fn spec() -> SecretSpec {
    SecretSpec {
        namespace: NS.to_owned(),
        secret: SECRET.to_owned(),
        service: SERVICE.to_owned(),
        extra_names: Vec::new(),
        validity: DAY * 365,
        ca_validity: DAY * 3650,
        renew_before: DAY * 30,
    }
}

fn names() -> Vec<String> {
    pki::dns_names(SERVICE, NS)
}

#[tokio::test]
async fn create_makes_a_tls_secret_for_the_service_names() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    assert_eq!(cluster::create(api.client.clone(), &spec(), now).await.unwrap(), Outcome::Created);
    let secret = api.stored_secret();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(pki::check(&material_of(&secret), &names(), now + DAY * 300), Ok(()));
    assert_eq!(
        api.calls(),
        ["GET secrets/durable-scaler-webhook-tls", "POST secrets/durable-scaler-webhook-tls"]
    );
}

#[tokio::test]
async fn create_leaves_a_valid_secret_alone() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    cluster::create(api.client.clone(), &spec(), now).await.unwrap();
    let before = api.stored_secret();
    assert_eq!(cluster::create(api.client.clone(), &spec(), now).await.unwrap(), Outcome::Unchanged);
    assert_eq!(api.stored_secret(), before);
    assert!(
        !api.calls()[2..].iter().any(|c| c.starts_with("PUT") || c.starts_with("POST")),
        "{:?}",
        api.calls()
    );
}

#[tokio::test]
async fn create_renews_near_expiry_and_keeps_trusting_the_old_ca_meanwhile() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    let old = pki::generate(&names(), now - DAY * 350, DAY * 365).unwrap(); // 15 days left
    api.put_secret(&old);
    let outcome = cluster::create(api.client.clone(), &spec(), now).await.unwrap();
    assert!(matches!(outcome, Outcome::Renewed { .. }), "{outcome:?}");
    let renewed = material_of(&api.stored_secret());
    assert_eq!(pki::check(&renewed, &names(), now + DAY * 300), Ok(()));
    assert!(
        renewed.ca_pem.ends_with(&old.ca_pem),
        "the old CA stays in the bundle while its certificate is valid"
    );
    let old_served = pki::Material { ca_pem: renewed.ca_pem.clone(), ..old };
    assert_eq!(
        pki::check(&old_served, &names(), now),
        Ok(()),
        "the bundle still verifies the old certificate"
    );
}

#[tokio::test]
async fn create_renews_under_the_same_ca_so_every_copy_of_ca_crt_stays_valid() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        cluster::create(api.client.clone(), &spec(), now - DAY * 340).await.unwrap(),
        Outcome::Created
    );
    let first = api.stored_secret();
    assert!(first["data"].get("ca.key").is_some(), "the CA's key is kept for the next renewal");
    let Outcome::Renewed { reason } = cluster::create(api.client.clone(), &spec(), now).await.unwrap() else {
        panic!("not renewed 25 days before expiry");
    };
    assert!(reason.contains("same CA"), "{reason}");
    let renewed = api.stored_secret();
    assert_eq!(renewed["data"]["ca.crt"], first["data"]["ca.crt"]);
    assert_ne!(renewed["data"]["tls.crt"], first["data"]["tls.crt"]);
    // What KEDA's TriggerAuthentication copied at install still verifies the new certificate.
    let copied = material_of(&first).ca_pem;
    let served = pki::Material { ca_pem: copied, ..material_of(&renewed) };
    assert_eq!(pki::check(&served, &names(), now + DAY * 300), Ok(()));
}

#[tokio::test]
async fn create_replaces_a_secret_made_for_another_service() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    api.put_secret(&pki::generate(&pki::dns_names("other", NS), now, DAY * 365).unwrap());
    let Outcome::Renewed { reason } = cluster::create(api.client.clone(), &spec(), now).await.unwrap() else {
        panic!("not renewed");
    };
    assert!(reason.contains("durable-scaler-webhook.durable-scaler.svc"), "{reason}");
    assert_eq!(pki::check(&material_of(&api.stored_secret()), &names(), now), Ok(()));
}

#[tokio::test]
async fn create_that_loses_the_race_to_another_pod_keeps_the_winners_secret() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    let winner = pki::generate(&names(), now, DAY * 365).unwrap();
    api.fake.lock().unwrap().concurrent_create = Some(stored(&winner, "0"));
    assert_eq!(cluster::create(api.client.clone(), &spec(), now).await.unwrap(), Outcome::Unchanged);
    assert_eq!(material_of(&api.stored_secret()), winner);
}

#[tokio::test]
async fn a_renewal_that_loses_the_race_to_another_pod_keeps_the_winners_secret() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    api.put_secret(&pki::generate(&names(), now - DAY * 350, DAY * 365).unwrap()); // 15 days left
    let winner = pki::generate(&names(), now, DAY * 365).unwrap();
    api.fake.lock().unwrap().concurrent_replace = Some(stored(&winner, "0"));
    assert_eq!(cluster::create(api.client.clone(), &spec(), now).await.unwrap(), Outcome::Unchanged);
    assert_eq!(material_of(&api.stored_secret()), winner);
    assert_eq!(
        api.calls(),
        [
            "GET secrets/durable-scaler-webhook-tls",
            "PUT secrets/durable-scaler-webhook-tls",
            "GET secrets/durable-scaler-webhook-tls"
        ]
    );
}

#[tokio::test]
async fn two_replicas_creating_at_once_make_one_secret_and_agree_on_its_ca() {
    let api = fake_api().await;
    let now = OffsetDateTime::now_utc();
    let spec = spec();
    let (a, b) = tokio::join!(
        cluster::create(api.client.clone(), &spec, now),
        cluster::create(api.client.clone(), &spec, now)
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Created).count(), 1, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Unchanged), "{outcomes:?}");
    let stored = material_of(&api.stored_secret());
    assert_eq!(pki::check(&stored, &names(), now), Ok(()));
    // What each replica's init container then waits to see mounted: the one stored CA.
    let ca = cluster::read_ca(api.client.clone(), NS, SECRET).await.unwrap();
    assert_eq!(ca.0, stored.ca_pem.into_bytes());
}

fn webhook_config() -> Value {
    let webhook = |name: &str| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"name": SERVICE, "namespace": NS, "path": "/mutate", "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG, "resourceVersion": "1"},
        "webhooks": [webhook("inject.durable-scaler.io"), webhook("second.durable-scaler.io")],
    })
}

#[tokio::test]
async fn patch_writes_the_ca_into_every_webhook_and_touches_nothing_else() {
    let api = fake_api().await;
    let material = pki::generate(&names(), OffsetDateTime::now_utc(), DAY * 365).unwrap();
    api.put_secret(&material);
    api.fake.lock().unwrap().configs.insert(CONFIG.to_owned(), webhook_config());
    assert_eq!(cluster::patch(api.client.clone(), NS, SECRET, CONFIG).await.unwrap(), 2);
    let config = api.fake.lock().unwrap().configs[CONFIG].clone();
    let parsed: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration =
        serde_json::from_value(config.clone()).unwrap();
    for webhook in parsed.webhooks.unwrap() {
        assert_eq!(webhook.client_config.ca_bundle.unwrap().0, material.ca_pem.as_bytes());
        assert_eq!(webhook.client_config.service.unwrap().path.as_deref(), Some("/mutate"));
    }
    assert_eq!(config["webhooks"][1]["rules"], webhook_config()["webhooks"][1]["rules"]);
}

#[tokio::test]
async fn patch_writes_nothing_when_every_ca_bundle_is_current() {
    let api = fake_api().await;
    api.put_secret(&pki::generate(&names(), OffsetDateTime::now_utc(), DAY * 365).unwrap());
    api.fake.lock().unwrap().configs.insert(CONFIG.to_owned(), webhook_config());
    cluster::patch(api.client.clone(), NS, SECRET, CONFIG).await.unwrap();
    assert_eq!(cluster::patch(api.client.clone(), NS, SECRET, CONFIG).await.unwrap(), 0);
    assert_eq!(api.calls().iter().filter(|c| c.starts_with("PATCH")).count(), 1);
}

#[tokio::test]
async fn patch_without_the_secret_fails_naming_it() {
    let api = fake_api().await;
    api.fake.lock().unwrap().configs.insert(CONFIG.to_owned(), webhook_config());
    let error = cluster::patch(api.client.clone(), NS, SECRET, CONFIG).await.unwrap_err().to_string();
    assert!(error.contains("durable-scaler/durable-scaler-webhook-tls"), "{error}");
}

/// The loop's clock: every sleep is recorded and moves `now` on by its length at once; after
/// each sleep `on_sleep` may change the fake API (what happens in the cluster meanwhile);
/// after `rounds` sleeps it stops the loop (as SIGTERM would) and never wakes.
struct FakeClock {
    now: OffsetDateTime,
    sleeps: Vec<Duration>,
    rounds: usize,
    fake: Shared,
    on_sleep: fn(usize, &mut Fake),
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Clock for FakeClock {
    fn now(&self) -> OffsetDateTime {
        self.now
    }

    fn sleep(&mut self, duration: Duration) -> impl std::future::Future<Output = ()> + Send {
        self.sleeps.push(duration);
        self.now += duration;
        (self.on_sleep)(self.sleeps.len(), &mut self.fake.lock().unwrap());
        let last = self.sleeps.len() >= self.rounds;
        if last && let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        async move {
            if last {
                std::future::pending::<()>().await;
            }
        }
    }
}

const SCHEDULE: Schedule =
    Schedule { interval: Duration::from_secs(12 * 3600), first_retry: Duration::from_secs(5) };

/// Runs the loop for `rounds` rounds from `now`; returns the clock (sleeps, final time).
async fn run_loop(
    api: &Api,
    now: OffsetDateTime,
    rounds: usize,
    on_sleep: fn(usize, &mut Fake),
) -> FakeClock {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let mut clock =
        FakeClock { now, sleeps: Vec::new(), rounds, fake: api.fake.clone(), on_sleep, stop: Some(stop) };
    let shutdown = async {
        let _ = stopped.await;
    };
    let ran = renewer::run(api.client.clone(), &spec(), Some(CONFIG), SCHEDULE, &mut clock, shutdown).await;
    assert_eq!(ran, rounds as u64);
    clock
}

fn ca_bundle(api: &Api, index: usize) -> Option<Vec<u8>> {
    let config = api.fake.lock().unwrap().configs[CONFIG].clone();
    let parsed: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration =
        serde_json::from_value(config).unwrap();
    parsed.webhooks.unwrap()[index].client_config.ca_bundle.clone().map(|b| b.0)
}

#[tokio::test]
async fn run_writes_the_ca_bundle_before_the_secret_that_carries_it() {
    let api = fake_api().await;
    api.fake.lock().unwrap().configs.insert(CONFIG.to_owned(), webhook_config());
    run_loop(&api, OffsetDateTime::now_utc(), 1, |_, _| {}).await;
    let calls = api.calls();
    let patched = calls.iter().position(|c| c.starts_with("PATCH mutatingwebhookconfigurations/")).unwrap();
    let created = calls.iter().position(|c| c.starts_with("POST secrets/")).unwrap();
    assert!(patched < created, "a pod mounting the Secret must find its CA trusted already: {calls:?}");
    let stored = material_of(&api.stored_secret());
    for webhook in 0..2 {
        assert_eq!(ca_bundle(&api, webhook), Some(stored.ca_pem.clone().into_bytes()));
    }
}

#[tokio::test]
async fn run_writes_no_secret_until_the_webhook_configuration_exists_and_retries_with_back_off() {
    let api = fake_api().await;
    // The configuration is applied while the loop is in its third pause.
    let clock = run_loop(&api, OffsetDateTime::now_utc(), 4, |sleeps, fake| {
        if sleeps == 3 {
            fake.configs.insert(CONFIG.to_owned(), webhook_config());
        }
    })
    .await;
    let secs: Vec<u64> = clock.sleeps.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [5, 10, 20, 12 * 3600], "back-off while failing, then the interval");
    let calls = api.calls();
    let first_write = calls.iter().position(|c| c.starts_with("POST")).unwrap();
    let config_found = calls.iter().position(|c| c.starts_with("PATCH")).unwrap();
    assert!(config_found < first_write, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| c.starts_with("POST")).count(), 1, "{calls:?}");
    assert_eq!(ca_bundle(&api, 0), Some(material_of(&api.stored_secret()).ca_pem.into_bytes()));
}

#[tokio::test]
async fn run_renews_once_the_certificate_comes_within_the_renewal_window_and_keeps_the_old_ca_trusted() {
    let api = fake_api().await;
    let start = OffsetDateTime::now_utc();
    // 40 days and 6 hours left: the 30-day renewal window opens on day 10.25.
    let old = pki::generate(&names(), start - DAY * 325 + Duration::from_secs(6 * 3600), DAY * 365).unwrap();
    api.put_secret(&old);
    api.fake.lock().unwrap().configs.insert(CONFIG.to_owned(), webhook_config());
    // 24 rounds 12 hours apart: day 0 to day 11.5.
    let clock = run_loop(&api, start, 24, |_, _| {}).await;
    let puts: Vec<usize> = api
        .calls()
        .iter()
        .filter(|c| c.starts_with("GET secrets/") || c.starts_with("PUT secrets/"))
        .scan(0usize, |round, c| {
            *round += usize::from(c.starts_with("GET"));
            Some((*round, c.starts_with("PUT")))
        })
        .filter_map(|(round, put)| put.then_some(round))
        .collect();
    // Reads per round: the check in `create` and the read in `patch`; round N starts at GET 2N-1.
    assert_eq!(puts.len(), 1, "renewed once: {:?}", api.calls());
    let renewed_in_round = puts[0].div_ceil(2);
    assert_eq!(renewed_in_round, 22, "day 10.5, the 22nd round, is the first in the window");
    let renewed = material_of(&api.stored_secret());
    assert_eq!(pki::check(&renewed, &names(), clock.now + DAY * 300), Ok(()));
    assert!(renewed.ca_pem.ends_with(&old.ca_pem) && renewed.ca_pem != old.ca_pem, "new CA, then the old");
    assert_eq!(ca_bundle(&api, 0), Some(renewed.ca_pem.into_bytes()));
}

#[tokio::test]
async fn run_repairs_a_ca_bundle_cleared_by_a_reapply_in_the_next_round() {
    let api = fake_api().await;
    api.fake.lock().unwrap().configs.insert(CONFIG.to_owned(), webhook_config());
    run_loop(&api, OffsetDateTime::now_utc(), 2, |sleeps, fake| {
        if sleeps == 1 {
            // `kubectl replace` or a delete and re-create: the object without caBundle.
            fake.configs.insert(CONFIG.to_owned(), webhook_config());
        }
    })
    .await;
    assert_eq!(ca_bundle(&api, 1), Some(material_of(&api.stored_secret()).ca_pem.into_bytes()));
    assert_eq!(api.calls().iter().filter(|c| c.starts_with("POST")).count(), 1, "the Secret was kept");
}
