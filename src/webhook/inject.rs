//! The injection plan: a pod's raw JSON in, a JSON patch and admission warnings out.
//!
//! Pure (no I/O, no clock), so every rule is unit-tested and fuzzed. The pod is read as a
//! `serde_json::Value` and never round-tripped through typed structs: a typed round trip drops
//! fields the structs do not know (newer API fields, alpha features), and a patch computed by
//! diffing such a round trip would remove them from the user's pod. Instead the plan is a list
//! of targeted `add` operations, each pointing at exactly what it adds.

use serde_json::{Map, Value, json};

use crate::contract::{
    AGGREGATOR_ANNOTATION, CPU_LIMIT_ANNOTATION, CPU_REQUEST_ANNOTATION, HUB_NAME_ENV,
    MEMORY_LIMIT_ANNOTATION, MEMORY_REQUEST_ANNOTATION, NATIVE_SIDECAR_ANNOTATION, SIDECAR_CONTAINER,
    SIDECAR_HTTP_PORT, SIDECAR_UID, STATUS_ANNOTATION, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS,
    TOKEN_FILE_NAME, TOKEN_VOLUME, TaskHub, env,
};
use crate::contract::{
    CONNECTION_ENV_ANNOTATION, DEFAULT_CONNECTION_ENV, DEFAULT_TASK_HUB, INJECT_LABEL, TASK_HUB_ANNOTATION,
};

/// kubectl's annotation naming the container `kubectl logs/exec` picks by default.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Default requests and limits: the sidecar reads a few queues every few seconds.
const DEFAULT_CPU_REQUEST: &str = "10m";
const DEFAULT_CPU_LIMIT: &str = "200m";
const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
const DEFAULT_MEMORY_LIMIT: &str = "64Mi";

/// The webhook's settings that shape every injection (from its command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectionSettings {
    /// The sidecar's image.
    pub image: String,
    /// The aggregator's report URL given to the sidecar.
    pub aggregator: url::Url,
    /// PEM CA for an `https://` aggregator, given to the sidecar inline as
    /// `DURABLE_SCALER_AGGREGATOR_CA`.
    pub aggregator_ca: Option<String>,
    /// Inject as a native sidecar (init container with `restartPolicy: Always`, Kubernetes
    /// 1.29+) unless a pod's annotation says otherwise.
    pub native_sidecar: bool,
    /// Recorded in the status annotation.
    pub version: String,
}

/// What the webhook answers for one pod: the patch (empty when nothing is injected) and the
/// warnings shown to the user by `kubectl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Injection {
    /// JSON patch operations (RFC 6902), all `add`.
    pub patch: Vec<Value>,
    /// Admission warnings, each saying what was wrong and what was done instead.
    pub warnings: Vec<String>,
}

impl Injection {
    /// True when the plan injects the sidecar.
    pub(crate) fn injects(&self) -> bool {
        !self.patch.is_empty()
    }
}

/// True when the pod opted in with the label `durable-scaler.io/inject: "true"`.
pub(crate) fn opted_in(pod: &Value) -> bool {
    pod.pointer("/metadata/labels").and_then(|labels| labels.get(INJECT_LABEL)).and_then(Value::as_str)
        == Some("true")
}

/// Plans the injection into `pod` (a labelled pod on CREATE). Never fails: what cannot be
/// done becomes a warning and the pod is admitted as it is.
pub(crate) fn plan(pod: &Value, settings: &InjectionSettings) -> Injection {
    let mut warnings = Vec::new();
    let Some(spec) = pod.get("spec").and_then(Value::as_object) else {
        warnings.push("durable-scaler: the pod has no spec; sidecar not injected".to_owned());
        return Injection { patch: Vec::new(), warnings };
    };
    if has_sidecar(spec) {
        // Already injected (by us on an earlier pass, or by hand): idempotent, no second copy.
        return Injection::default();
    }
    let annotations = pod.pointer("/metadata/annotations").and_then(Value::as_object);
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);

    let connection_env = annotation(CONNECTION_ENV_ANNOTATION).unwrap_or(DEFAULT_CONNECTION_ENV);
    let containers = spec.get("containers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let Some((app, connection)) =
        find_app_container(containers, annotation(DEFAULT_CONTAINER_ANNOTATION), connection_env)
    else {
        warnings.push(format!(
            "durable-scaler: no container defines the env var {connection_env:?} (named by \
             {CONNECTION_ENV_ANNOTATION}, default {DEFAULT_CONNECTION_ENV}) in `env`; sidecar not injected"
        ));
        return Injection { patch: Vec::new(), warnings };
    };
    let app_name = app.get("name").and_then(Value::as_str).unwrap_or_default();

    let task_hub = task_hub_env(annotation(TASK_HUB_ANNOTATION), app, &mut warnings);
    let aggregator = match annotation(AGGREGATOR_ANNOTATION) {
        Some(url) => crate::config::http_url(url).unwrap_or_else(|| {
            warnings.push(format!(
                "durable-scaler: annotation {AGGREGATOR_ANNOTATION}={url:?} is not an http(s) URL; using {}",
                settings.aggregator
            ));
            settings.aggregator.clone()
        }),
        None => settings.aggregator.clone(),
    };
    let https = aggregator.scheme() == "https";
    if https && settings.aggregator_ca.is_none() {
        warnings.push(format!(
            "durable-scaler: the aggregator URL {:?} is https but the webhook has no CA for it \
             (--sidecar-aggregator-ca); sidecar not injected",
            aggregator.as_str()
        ));
        return Injection { patch: Vec::new(), warnings };
    }
    let native = match annotation(NATIVE_SIDECAR_ANNOTATION) {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            warnings.push(format!(
                "durable-scaler: annotation {NATIVE_SIDECAR_ANNOTATION}={other:?} is not \"true\" or \"false\"; using {}",
                settings.native_sidecar
            ));
            settings.native_sidecar
        }
        None => settings.native_sidecar,
    };
    let resources = resources(&annotation, &mut warnings);

    let mut sidecar = json!({
        "name": SIDECAR_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["sidecar"],
        "env": [
            task_hub,
            renamed_env(env::CONNECTION, connection),
            {"name": env::AGGREGATOR, "value": url_text(&aggregator)},
            {"name": env::POD_NAME, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
            {"name": env::POD_NAMESPACE, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
        ],
        "resources": resources,
        // Liveness only: a readiness probe on a sidecar would take the app out of its Service
        // whenever the sidecar (not the app) is unwell.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": SIDECAR_HTTP_PORT, "scheme": "HTTP"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let (true, Some(ca), Some(env)) = (https, &settings.aggregator_ca, sidecar["env"].as_array_mut()) {
        env.push(json!({"name": env::AGGREGATOR_CA, "value": ca}));
    }
    if native {
        sidecar["restartPolicy"] = json!("Always");
    }

    let mut patch = Vec::new();
    let list = if native { "initContainers" } else { "containers" };
    append(&mut patch, spec, "/spec", list, sidecar);

    let has_token_volume = spec.get("volumes").and_then(Value::as_array).is_some_and(|volumes| {
        volumes.iter().any(|v| v.get("name").and_then(Value::as_str) == Some(TOKEN_VOLUME))
    });
    if has_token_volume {
        warnings.push(format!(
            "durable-scaler: the pod already has a volume named {TOKEN_VOLUME}; the sidecar mounts it as it is"
        ));
    } else {
        let volume = json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": TOKEN_FILE_NAME,
            }}]},
        });
        append(&mut patch, spec, "/spec", "volumes", volume);
    }

    let mut new_annotations = Map::new();
    let status = json!({
        "version": settings.version,
        "containers": [SIDECAR_CONTAINER],
        "volumes": [TOKEN_VOLUME],
        "mode": if native { "native-sidecar" } else { "container" },
    });
    new_annotations.insert(STATUS_ANNOTATION.to_owned(), Value::String(status.to_string()));
    if !native && annotation(DEFAULT_CONTAINER_ANNOTATION).is_none() && !app_name.is_empty() {
        // The sidecar now sits in `containers`; keep `kubectl logs/exec` on the app.
        new_annotations.insert(DEFAULT_CONTAINER_ANNOTATION.to_owned(), Value::String(app_name.to_owned()));
    }
    let metadata = pod.get("metadata").and_then(Value::as_object);
    if metadata.is_none() {
        patch.push(add("/metadata", json!({})));
    }
    if annotations.is_none() {
        patch.push(add("/metadata/annotations", json!({})));
    }
    for (key, value) in new_annotations {
        // `add` on an existing object member replaces it (RFC 6902), so a stale status
        // annotation (the container was removed by hand) is simply rewritten.
        patch.push(add(&format!("/metadata/annotations/{}", escape(&key)), value));
    }
    Injection { patch, warnings }
}

/// True when a container named [`SIDECAR_CONTAINER`] is in `containers` or `initContainers`.
fn has_sidecar(spec: &Map<String, Value>) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER))
        })
    })
}

/// The app container and its connection env entry: the default-container annotation's
/// container when it defines the env var, else the first container that does.
fn find_app_container<'a>(
    containers: &'a [Value],
    default_container: Option<&str>,
    connection_env: &str,
) -> Option<(&'a Value, &'a Value)> {
    let with_env = |c: &'a Value| env_entry(c, connection_env).map(|entry| (c, entry));
    default_container
        .and_then(|name| containers.iter().find(|c| c.get("name").and_then(Value::as_str) == Some(name)))
        .and_then(with_env)
        .or_else(|| containers.iter().find_map(with_env))
}

/// The container's `env` entry named `name` (the last one wins, as in Kubernetes).
fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container
        .get("env")
        .and_then(Value::as_array)?
        .iter()
        .rev()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
        .filter(|e| e.get("value").is_some() || e.get("valueFrom").is_some())
}

/// An env entry's definition (`value` or `valueFrom`, as it stands) under a new name.
fn renamed_env(name: &str, entry: &Value) -> Value {
    let mut copy = Map::new();
    copy.insert("name".to_owned(), Value::String(name.to_owned()));
    for key in ["value", "valueFrom"] {
        if let Some(v) = entry.get(key) {
            copy.insert(key.to_owned(), v.clone());
        }
    }
    Value::Object(copy)
}

/// `DURABLE_SCALER_TASK_HUB`: the annotation, else the app's hub-name setting (copied as it
/// stands, so a `valueFrom` works too), else the extension's default with a warning.
fn task_hub_env(annotation: Option<&str>, app: &Value, warnings: &mut Vec<String>) -> Value {
    const NAME: &str = env::TASK_HUB;
    if let Some(hub) = annotation {
        // The sidecar parses the same rule and would exit at start on a name it refuses.
        match TaskHub::parse(hub) {
            Ok(hub) => return json!({"name": NAME, "value": hub.name()}),
            Err(e) => {
                warnings.push(format!("durable-scaler: annotation {TASK_HUB_ANNOTATION}: {e}; ignored"))
            }
        }
    }
    if let Some(entry) = env_entry(app, HUB_NAME_ENV) {
        return renamed_env(NAME, entry);
    }
    warnings.push(format!(
        "durable-scaler: no task hub named (annotation {TASK_HUB_ANNOTATION} or env {HUB_NAME_ENV}); \
         assuming the Durable Functions default {DEFAULT_TASK_HUB}"
    ));
    json!({"name": NAME, "value": DEFAULT_TASK_HUB})
}

/// Requests and limits from the annotations, each invalid one replaced by its default with a
/// warning; a request above its limit (which the API server would reject, failing the pod)
/// falls back to both defaults.
fn resources<'a>(annotation: &impl Fn(&str) -> Option<&'a str>, warnings: &mut Vec<String>) -> Value {
    let mut pick = |key: &str, default: &str| -> (String, f64) {
        let fallback = (default.to_owned(), parse_quantity(default).unwrap_or_default());
        match annotation(key) {
            None => fallback,
            Some(raw) => match parse_quantity(raw) {
                Some(value) => (raw.to_owned(), value),
                None => {
                    warnings.push(format!(
                        "durable-scaler: annotation {key}={raw:?} is not a Kubernetes quantity; using {default}"
                    ));
                    fallback
                }
            },
        }
    };
    let mut cpu =
        (pick(CPU_REQUEST_ANNOTATION, DEFAULT_CPU_REQUEST), pick(CPU_LIMIT_ANNOTATION, DEFAULT_CPU_LIMIT));
    let mut memory = (
        pick(MEMORY_REQUEST_ANNOTATION, DEFAULT_MEMORY_REQUEST),
        pick(MEMORY_LIMIT_ANNOTATION, DEFAULT_MEMORY_LIMIT),
    );
    for (what, pair, defaults) in [
        ("cpu", &mut cpu, (DEFAULT_CPU_REQUEST, DEFAULT_CPU_LIMIT)),
        ("memory", &mut memory, (DEFAULT_MEMORY_REQUEST, DEFAULT_MEMORY_LIMIT)),
    ] {
        if pair.0.1 > pair.1.1 {
            warnings.push(format!(
                "durable-scaler: sidecar {what} request {} is above its limit {}; using {} and {}",
                pair.0.0, pair.1.0, defaults.0, defaults.1
            ));
            pair.0.0 = defaults.0.to_owned();
            pair.1.0 = defaults.1.to_owned();
        }
    }
    json!({
        "requests": {"cpu": cpu.0.0, "memory": memory.0.0},
        "limits": {"cpu": cpu.1.0, "memory": memory.1.0},
    })
}

/// Parses a non-negative Kubernetes quantity (`100m`, `0.5`, `64Mi`, `1e3`) into its value,
/// or `None` when the API server would reject it.
pub(crate) fn parse_quantity(raw: &str) -> Option<f64> {
    let split = raw.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || unsigned.len() > 3 || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(digits.parse().ok()?)
        }
    };
    Some(value * scale).filter(|v| v.is_finite())
}

/// The URL as written, without the `/` path the parser adds to `http://host:port`.
fn url_text(url: &url::Url) -> &str {
    let text = url.as_str();
    if url.path() == "/" && url.query().is_none() && url.fragment().is_none() {
        text.strip_suffix('/').unwrap_or(text)
    } else {
        text
    }
}

/// Appends `item` to the array `parent_path/key`, creating the array first when absent.
fn append(patch: &mut Vec<Value>, parent: &Map<String, Value>, parent_path: &str, key: &str, item: Value) {
    let path = format!("{parent_path}/{}", escape(key));
    if !parent.get(key).is_some_and(Value::is_array) {
        patch.push(add(&path, json!([])));
    }
    patch.push(add(&format!("{path}/-"), item));
}

fn add(path: &str, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

/// Escapes one JSON pointer token (RFC 6901): `~` as `~0`, then `/` as `~1`.
pub(crate) fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "example.test/durable-scaler:1".to_owned(),
            aggregator: "http://aggregator.test:4371".parse().unwrap(),
            aggregator_ca: None,
            native_sidecar: true,
            version: "9.9.9".to_owned(),
        }
    }

    fn pod(annotations: Value, env: Value) -> Value {
        json!({
            "metadata": {"labels": {INJECT_LABEL: "true"}, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "app:1", "env": env}]},
        })
    }

    fn storage_env() -> Value {
        json!([{"name": "AzureWebJobsStorage", "value": "UseDevelopmentStorage=true"}])
    }

    fn applied(pod: &Value, injection: &Injection) -> Value {
        let mut out = pod.clone();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(injection.patch.clone())).unwrap();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    fn sidecar_env(pod: &Value, name: &str) -> Value {
        let sidecar = pod["spec"]["initContainers"]
            .as_array()
            .or(pod["spec"]["containers"].as_array())
            .and_then(|cs| cs.iter().find(|c| c["name"] == SIDECAR_CONTAINER))
            .cloned()
            .unwrap();
        sidecar["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or(Value::Null)
    }

    #[test]
    fn pointer_tokens_escape_tilde_before_slash() {
        assert_eq!(escape("durable-scaler.io/status"), "durable-scaler.io~1status");
        assert_eq!(escape("a~/b"), "a~0~1b");
    }

    #[test]
    fn only_the_literal_true_label_opts_in() {
        assert!(opted_in(&json!({"metadata": {"labels": {INJECT_LABEL: "true"}}})));
        assert!(!opted_in(&json!({"metadata": {"labels": {INJECT_LABEL: "True"}}})));
        assert!(!opted_in(&json!({"metadata": {"labels": {INJECT_LABEL: true}}})));
        assert!(!opted_in(&json!({"metadata": {}})));
    }

    #[test]
    fn quantities_follow_kubernetes_syntax() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("0.5"), Some(0.5));
        for bad in ["", "-1", "lots", "1.2.3", "10 m", "1Mb", ".", "1e", "1e99999"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn task_hub_comes_from_the_annotation_first() {
        let pod = pod(json!({TASK_HUB_ANNOTATION: "OrdersHub"}), storage_env());
        let injection = plan(&pod, &settings());
        assert_eq!(sidecar_env(&applied(&pod, &injection), "DURABLE_SCALER_TASK_HUB")["value"], "OrdersHub");
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    }

    #[test]
    fn task_hub_setting_is_copied_with_its_value_from() {
        let hub =
            json!({"name": HUB_NAME_ENV, "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "hub"}}});
        let pod = pod(json!({}), json!([storage_env()[0], hub]));
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env(&out, "DURABLE_SCALER_TASK_HUB"),
            json!({"name": "DURABLE_SCALER_TASK_HUB", "valueFrom": hub["valueFrom"]})
        );
    }

    #[test]
    fn missing_task_hub_defaults_with_a_warning() {
        let pod = pod(json!({}), storage_env());
        let injection = plan(&pod, &settings());
        assert_eq!(
            sidecar_env(&applied(&pod, &injection), "DURABLE_SCALER_TASK_HUB")["value"],
            DEFAULT_TASK_HUB
        );
        assert!(injection.warnings.iter().any(|w| w.contains(DEFAULT_TASK_HUB)), "{:?}", injection.warnings);
    }

    #[test]
    fn invalid_task_hub_annotation_is_ignored_with_a_warning() {
        let pod = pod(json!({TASK_HUB_ANNOTATION: "no-dashes"}), storage_env());
        let injection = plan(&pod, &settings());
        assert_eq!(
            sidecar_env(&applied(&pod, &injection), "DURABLE_SCALER_TASK_HUB")["value"],
            DEFAULT_TASK_HUB
        );
        assert!(injection.warnings.iter().any(|w| w.contains("no-dashes")));
    }

    #[test]
    fn a_task_hub_starting_with_a_digit_is_not_injected_since_the_sidecar_would_refuse_it() {
        // The sidecar parses DURABLE_SCALER_TASK_HUB with the same TaskHub rule and would
        // exit at start (a crash-looping pod); the webhook falls back with a warning instead.
        let pod = pod(json!({TASK_HUB_ANNOTATION: "1Hub"}), storage_env());
        let injection = plan(&pod, &settings());
        let injected = sidecar_env(&applied(&pod, &injection), "DURABLE_SCALER_TASK_HUB")["value"].clone();
        assert_ne!(injected, "1Hub");
        assert!(TaskHub::parse(injected.as_str().unwrap_or_default()).is_ok(), "{injected}");
        let says_why = |w: &String| w.contains("\"1Hub\"") && w.contains("starting with a letter");
        assert!(injection.warnings.iter().any(says_why), "{:?}", injection.warnings);
    }

    #[test]
    fn connection_env_named_by_annotation_is_copied_and_nothing_else() {
        let env = json!([
            {"name": "Other", "value": "secret-ish"},
            {"name": "MyConn", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ]);
        let pod = pod(json!({CONNECTION_ENV_ANNOTATION: "MyConn"}), env);
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env(&out, "DURABLE_SCALER_CONNECTION"),
            json!({"name": "DURABLE_SCALER_CONNECTION", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
        );
        assert_eq!(sidecar_env(&out, "Other"), Value::Null);
    }

    #[test]
    fn no_connection_env_means_no_injection_and_a_warning() {
        let pod = pod(json!({}), json!([{"name": "Unrelated", "value": "x"}]));
        let injection = plan(&pod, &settings());
        assert!(!injection.injects());
        assert!(injection.warnings[0].contains("AzureWebJobsStorage"), "{:?}", injection.warnings);
    }

    #[test]
    fn a_pod_with_the_sidecar_in_either_list_gets_no_patch() {
        for list in ["containers", "initContainers"] {
            let mut pod = pod(json!({}), storage_env());
            pod["spec"][list] =
                json!([{"name": SIDECAR_CONTAINER, "image": "x"}, {"name": "app", "env": storage_env()}]);
            assert_eq!(plan(&pod, &settings()), Injection::default(), "{list}");
        }
    }

    #[test]
    fn absent_parents_are_created_before_they_are_used() {
        let pod = json!({"metadata": {"labels": {INJECT_LABEL: "true"}}, "spec": {"containers": [{"name": "app", "env": storage_env()}]}});
        let injection = plan(&pod, &settings());
        let paths: Vec<&str> = injection.patch.iter().map(|op| op["path"].as_str().unwrap()).collect();
        let position = |p: &str| paths.iter().position(|x| *x == p).unwrap();
        assert!(position("/spec/initContainers") < position("/spec/initContainers/-"));
        assert!(position("/spec/volumes") < position("/spec/volumes/-"));
        assert!(
            position("/metadata/annotations") < position("/metadata/annotations/durable-scaler.io~1status")
        );
        assert!(injection.patch.iter().all(|op| op["op"] == "add"));
        applied(&pod, &injection);
    }

    #[test]
    fn existing_lists_and_fields_the_structs_do_not_know_are_kept() {
        let mut pod = pod(json!({"keep": "me"}), storage_env());
        pod["spec"]["initContainers"] = json!([{"name": "init", "image": "i", "futureField": {"x": 1}}]);
        pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        pod["spec"]["someAlphaField"] = json!(true);
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(out["spec"]["initContainers"][0]["futureField"], json!({"x": 1}));
        assert_eq!(out["spec"]["initContainers"][1]["name"], SIDECAR_CONTAINER);
        assert_eq!(out["spec"]["volumes"][0]["name"], "data");
        assert_eq!(out["spec"]["someAlphaField"], true);
        assert_eq!(out["metadata"]["annotations"]["keep"], "me");
    }

    #[test]
    fn the_annotation_switches_to_a_plain_container_with_kubectl_default() {
        let pod = pod(json!({NATIVE_SIDECAR_ANNOTATION: "false"}), storage_env());
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(out["spec"]["containers"][1]["name"], SIDECAR_CONTAINER);
        assert!(out["spec"]["containers"][1].get("restartPolicy").is_none());
        assert!(out["spec"].get("initContainers").is_none());
        assert_eq!(out["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION], "app");
    }

    #[test]
    fn an_existing_default_container_annotation_is_left_alone() {
        let pod = pod(
            json!({NATIVE_SIDECAR_ANNOTATION: "false", DEFAULT_CONTAINER_ANNOTATION: "other"}),
            storage_env(),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(out["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION], "other");
    }

    #[test]
    fn invalid_switch_annotation_warns_and_uses_the_flag() {
        let pod = pod(json!({NATIVE_SIDECAR_ANNOTATION: "yes"}), storage_env());
        let injection = plan(&pod, &settings());
        assert_eq!(applied(&pod, &injection)["spec"]["initContainers"][0]["restartPolicy"], "Always");
        assert!(injection.warnings.iter().any(|w| w.contains("\"yes\"")));
    }

    #[test]
    fn resource_annotations_override_and_invalid_ones_fall_back() {
        let pod = pod(
            json!({CPU_REQUEST_ANNOTATION: "50m", MEMORY_LIMIT_ANNOTATION: "lots", CPU_LIMIT_ANNOTATION: "1"}),
            storage_env(),
        );
        let injection = plan(&pod, &settings());
        let resources = &applied(&pod, &injection)["spec"]["initContainers"][0]["resources"];
        assert_eq!(resources["requests"]["cpu"], "50m");
        assert_eq!(resources["limits"]["cpu"], "1");
        assert_eq!(resources["limits"]["memory"], DEFAULT_MEMORY_LIMIT);
        assert_eq!(injection.warnings.len(), 2, "{:?}", injection.warnings); // "lots" + TestHubName
    }

    #[test]
    fn a_request_above_its_limit_falls_back_to_the_defaults() {
        let pod = pod(json!({MEMORY_REQUEST_ANNOTATION: "1Gi", TASK_HUB_ANNOTATION: "Hub1"}), storage_env());
        let injection = plan(&pod, &settings());
        let resources = &applied(&pod, &injection)["spec"]["initContainers"][0]["resources"];
        assert_eq!(resources["requests"]["memory"], DEFAULT_MEMORY_REQUEST);
        assert_eq!(injection.warnings.len(), 1);
    }

    #[test]
    fn aggregator_annotation_overrides_the_flag_when_it_is_a_url() {
        let pod = pod(json!({AGGREGATOR_ANNOTATION: "http://agg.example:4371"}), storage_env());
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(sidecar_env(&out, "DURABLE_SCALER_AGGREGATOR")["value"], "http://agg.example:4371");
        let pod = pod_with_bad_aggregator();
        let injection = plan(&pod, &settings());
        assert_eq!(
            sidecar_env(&applied(&pod, &injection), "DURABLE_SCALER_AGGREGATOR")["value"],
            url_text(&settings().aggregator)
        );
    }

    #[test]
    fn an_https_aggregator_gets_the_ca_inline_and_is_not_injected_without_one() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let with_ca = InjectionSettings { aggregator_ca: Some(ca.to_owned()), ..settings() };
        let https = pod(json!({AGGREGATOR_ANNOTATION: "https://agg.example:4371"}), storage_env());
        let out = applied(&https, &plan(&https, &with_ca));
        assert_eq!(sidecar_env(&out, "DURABLE_SCALER_AGGREGATOR")["value"], "https://agg.example:4371");
        assert_eq!(sidecar_env(&out, "DURABLE_SCALER_AGGREGATOR_CA")["value"], ca);

        // An http aggregator gets no CA: the sidecar would refuse one it cannot use.
        let http = pod(json!({}), storage_env());
        let out = applied(&http, &plan(&http, &with_ca));
        assert!(sidecar_env(&out, "DURABLE_SCALER_AGGREGATOR_CA").is_null(), "{out}");

        // Without a CA the sidecar could not verify the aggregator and would not start.
        let injection = plan(&https, &settings());
        assert!(!injection.injects());
        let says_why = |w: &String| w.contains("is https") && w.contains("--sidecar-aggregator-ca");
        assert!(injection.warnings.iter().any(says_why), "{:?}", injection.warnings);
    }

    fn pod_with_bad_aggregator() -> Value {
        pod(json!({AGGREGATOR_ANNOTATION: "not a url"}), storage_env())
    }

    #[test]
    fn the_sidecar_is_hardened_and_probed_for_liveness_only() {
        let pod = pod(json!({}), storage_env());
        let sidecar = &applied(&pod, &plan(&pod, &settings()))["spec"]["initContainers"][0];
        let security = &sidecar["securityContext"];
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], SIDECAR_HTTP_PORT);
        assert!(sidecar.get("readinessProbe").is_none());
        assert_eq!(sidecar["args"], json!(["sidecar"]));
    }

    #[test]
    fn the_token_volume_is_mounted_in_the_sidecar_only() {
        let pod = pod(json!({}), storage_env());
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            TOKEN_AUDIENCE
        );
        assert_eq!(out["spec"]["initContainers"][0]["volumeMounts"][0]["mountPath"], TOKEN_DIR);
        assert!(out["spec"]["containers"][0].get("volumeMounts").is_none());
    }
}
