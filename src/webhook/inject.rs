//! The injection plan: a pod's raw JSON in, a JSON patch and admission warnings out.
//!
//! Pure (no I/O, no clock), so every rule is unit-tested and fuzzed. The pod is read as a
//! `serde_json::Value` and never round-tripped through typed structs: a typed round trip drops
//! fields the structs do not know (newer API fields, alpha features), and a patch computed by
//! diffing such a round trip would remove them from the user's pod. Instead the plan is a list
//! of targeted `add` operations, each pointing at exactly what it adds.

use serde_json::{Map, Value, json};

use crate::contract::{
    AGGREGATOR_ANNOTATION, CPU_LIMIT_ANNOTATION, CPU_REQUEST_ANNOTATION, HUB_NAME_ENV, MAX_ACTIVITIES_ENV,
    MAX_ORCHESTRATIONS_ENV, MEMORY_LIMIT_ANNOTATION, MEMORY_REQUEST_ANNOTATION, NATIVE_SIDECAR_ANNOTATION,
    SIDECAR_CONTAINER, SIDECAR_HTTP_PORT, STATUS_ANNOTATION, TOKEN_AUDIENCE, TOKEN_DIR,
    TOKEN_EXPIRATION_SECONDS, TOKEN_FILE_NAME, TOKEN_VOLUME, TaskHub, env,
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

/// Why a labelled pod got no sidecar; the label of `durable_scaler_webhook_skipped_total`
/// and the first word of the `InjectionSkipped` Event's note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// No container defines the connection variable where the webhook can see it (`env`, or
    /// an `envFrom` source whose prefix fits).
    NoConnectionVariable,
    /// The task hub name is one the sidecar (and the Functions host) would refuse.
    InvalidTaskHub,
    /// The pod shares the node's network: two such pods on a node would clash on the
    /// sidecar's port.
    HostNetwork,
    /// The aggregator URL is https and the webhook has no CA to give the sidecar.
    HttpsWithoutCa,
    /// Any other refusal (a pod without a spec).
    Other,
}

crate::metrics::label_values!(SkipReason {
    NoConnectionVariable => "no_connection_variable",
    InvalidTaskHub => "invalid_task_hub",
    HostNetwork => "host_network",
    HttpsWithoutCa => "https_without_ca",
    Other => "other",
});

/// The injection mode a pod gets unless its annotation says otherwise, and why (recorded in
/// the status annotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeDefault {
    /// Native sidecar (init container with `restartPolicy: Always`) or plain container.
    pub native: bool,
    /// Why, in a few words (e.g. "--native-sidecar=true", "every kubelet is 1.29+").
    pub reason: String,
}

impl NativeDefault {
    /// The mode forced by `--native-sidecar true|false`.
    pub fn forced(native: bool) -> Self {
        Self { native, reason: format!("--native-sidecar={native}") }
    }
}

/// What the webhook answers for one pod: the patch (empty when nothing is injected) and the
/// warnings shown to the user by `kubectl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Injection {
    /// JSON patch operations (RFC 6902), all `add`.
    pub patch: Vec<Value>,
    /// Admission warnings, each saying what was wrong and what was done instead.
    pub warnings: Vec<String>,
    /// Set when the pod opted in but gets no sidecar: why (its warning says more).
    pub skipped: Option<SkipReason>,
}

impl Injection {
    /// True when the plan injects the sidecar.
    pub(crate) fn injects(&self) -> bool {
        !self.patch.is_empty()
    }

    fn skip(reason: SkipReason, mut warnings: Vec<String>, warning: String) -> Self {
        warnings.push(warning);
        Self { patch: Vec::new(), warnings, skipped: Some(reason) }
    }
}

/// True when the pod opted in with the label `durable-scaler.io/inject: "true"`.
pub(crate) fn opted_in(pod: &Value) -> bool {
    pod.pointer("/metadata/labels").and_then(|labels| labels.get(INJECT_LABEL)).and_then(Value::as_str)
        == Some("true")
}

/// Plans the injection into `pod` with the mode `--native-sidecar` forces (see [`plan_with`]).
#[cfg(test)]
pub(crate) fn plan(pod: &Value, settings: &InjectionSettings) -> Injection {
    plan_with(pod, settings, &NativeDefault::forced(settings.native_sidecar))
}

/// Plans the injection into `pod` (a labelled pod on CREATE), native or not as `native`
/// says unless the pod's annotation overrides it. Never fails: what cannot be done becomes a
/// warning (and a [`SkipReason`] when nothing is injected) and the pod is admitted as it is.
pub(crate) fn plan_with(
    pod: &Value,
    settings: &InjectionSettings,
    native_default: &NativeDefault,
) -> Injection {
    let warnings = Vec::new();
    let Some(spec) = pod.get("spec").and_then(Value::as_object) else {
        let warning = "durable-scaler: the pod has no spec; sidecar not injected".to_owned();
        return Injection::skip(SkipReason::Other, warnings, warning);
    };
    plan_spec(pod, spec, settings, native_default, warnings)
}

fn plan_spec(
    pod: &Value,
    spec: &Map<String, Value>,
    settings: &InjectionSettings,
    native_default: &NativeDefault,
    mut warnings: Vec<String>,
) -> Injection {
    if has_sidecar(spec) {
        // Already injected (by us on an earlier pass, or by hand): idempotent, no second copy.
        return Injection::default();
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        // The sidecar listens on SIDECAR_HTTP_PORT: in the node's network namespace two such
        // pods on one node would clash (Istio and Linkerd skip hostNetwork pods too).
        let warning = format!(
            "durable-scaler: the pod uses hostNetwork; the sidecar's port {SIDECAR_HTTP_PORT} would \
             clash with other pods on the node; sidecar not injected"
        );
        return Injection::skip(SkipReason::HostNetwork, warnings, warning);
    }
    let annotations = pod.pointer("/metadata/annotations").and_then(Value::as_object);
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);

    let connection_env = annotation(CONNECTION_ENV_ANNOTATION).unwrap_or(DEFAULT_CONNECTION_ENV);
    let containers = spec.get("containers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let Some((app, connection)) =
        find_app_container(containers, annotation(DEFAULT_CONTAINER_ANNOTATION), connection_env)
    else {
        let warning = format!(
            "durable-scaler: no container defines the env var {connection_env:?} (named by \
             {CONNECTION_ENV_ANNOTATION}, default {DEFAULT_CONNECTION_ENV}) in `env` or through an \
             `envFrom` Secret or ConfigMap; sidecar not injected"
        );
        return Injection::skip(SkipReason::NoConnectionVariable, warnings, warning);
    };
    let app_name = app.get("name").and_then(Value::as_str).unwrap_or_default();

    let task_hub = match task_hub_env(annotation(TASK_HUB_ANNOTATION), app, &mut warnings) {
        Ok(definitions) => definitions,
        Err(warning) => return Injection::skip(SkipReason::InvalidTaskHub, warnings, warning),
    };
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
        let warning = format!(
            "durable-scaler: the aggregator URL {:?} is https but the webhook has no CA for it \
             (--sidecar-aggregator-ca); sidecar not injected",
            aggregator.as_str()
        );
        return Injection::skip(SkipReason::HttpsWithoutCa, warnings, warning);
    }
    let (native, mode_reason) = match annotation(NATIVE_SIDECAR_ANNOTATION) {
        Some(value @ ("true" | "false")) => {
            (value == "true", format!("annotation {NATIVE_SIDECAR_ANNOTATION}={value}"))
        }
        Some(other) => {
            warnings.push(format!(
                "durable-scaler: annotation {NATIVE_SIDECAR_ANNOTATION}={other:?} is not \"true\" or \"false\"; using {}",
                native_default.native
            ));
            (native_default.native, native_default.reason.clone())
        }
        None => (native_default.native, native_default.reason.clone()),
    };
    let resources = resources(&annotation, guaranteed(spec), &mut warnings);
    let mut task_hub = task_hub.into_iter();
    let mut connection = connection.into_iter();
    let (Some(first_task_hub), Some(first_connection)) = (task_hub.next(), connection.next()) else {
        // Both lists hold at least one definition by construction; stay total anyway.
        let warning = "durable-scaler: internal error planning the sidecar's env; sidecar not injected";
        return Injection::skip(SkipReason::Other, warnings, warning.to_owned());
    };

    let mut sidecar = json!({
        "name": SIDECAR_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["sidecar"],
        "env": [
            first_task_hub,
            renamed_env(env::CONNECTION, &first_connection),
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
        // No runAsUser/runAsGroup: the image's USER is numeric (65532, Dockerfile), which
        // runAsNonRoot accepts, and a fixed UID would be refused where the UID must come from
        // the namespace's range (OpenShift's restricted SCC). The pod's own securityContext
        // or the platform picks the UID.
        "securityContext": {
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Some(env) = sidecar["env"].as_array_mut() {
        // Further definitions of the same two names, after the first ones and in the
        // kubelet's order (see `definitions`): each later one that resolves replaces the value.
        env.extend(task_hub);
        env.extend(connection.map(|definition| renamed_env(env::CONNECTION, &definition)));
    }
    if let (true, Some(ca), Some(env)) = (https, &settings.aggregator_ca, sidecar["env"].as_array_mut()) {
        env.push(json!({"name": env::AGGREGATOR_CA, "value": ca}));
    }
    if let Some(env) = sidecar["env"].as_array_mut() {
        env.extend(limit_env(app, app_name));
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
        "modeReason": mode_reason,
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
    Injection { patch, warnings, skipped: None }
}

/// True when a container named [`SIDECAR_CONTAINER`] is in `containers` or `initContainers`.
fn has_sidecar(spec: &Map<String, Value>) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER))
        })
    })
}

/// The app container and the definitions of its connection variable (see [`definitions`]):
/// the default-container annotation's container when it defines the variable, else the first
/// container that defines it in `env`, else the first whose `envFrom` may.
fn find_app_container<'a>(
    containers: &'a [Value],
    default_container: Option<&str>,
    connection_env: &str,
) -> Option<(&'a Value, Vec<Value>)> {
    let defines = |c: &'a Value| definitions(c, connection_env).map(|d| (c, d));
    default_container
        .and_then(|name| containers.iter().find(|c| c.get("name").and_then(Value::as_str) == Some(name)))
        .and_then(defines)
        .or_else(|| containers.iter().filter(|c| env_entry(c, connection_env).is_some()).find_map(defines))
        .or_else(|| containers.iter().find_map(defines))
}

/// The container's last `env` entry named `name` that defines a value.
fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    env_entries(container, name).last()
}

/// The container's `env` entries named `name` that define a value, in order.
fn env_entries<'a>(container: &'a Value, name: &str) -> impl Iterator<Item = &'a Value> {
    container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("name").and_then(Value::as_str) == Some(name))
        .filter(|e| e.get("value").is_some() || e.get("valueFrom").is_some())
}

/// How the kubelet may set `name` in `container`, as env definitions (`value` or `valueFrom`)
/// listed so that giving all of them to the sidecar, in this order and under one name,
/// yields the value the app sees; `None` when nothing the webhook can see defines it.
///
/// The kubelet (kubernetes/kubernetes `pkg/kubelet/kubelet_pods.go`,
/// `makeEnvironmentVariables`) writes every `envFrom` source in list order into one map (a
/// later source replaces an earlier one's key; a `prefix` is put before each key), then each
/// `env` entry in order, so `env` wins over all of `envFrom`. A `secretKeyRef` or
/// `configMapKeyRef` with `optional: true` whose object or key is missing is skipped
/// (`continue`): the variable keeps what it had. So an `envFrom` source becomes one
/// `optional: true` key reference for just this key (the sidecar sees that one key of the
/// Secret and nothing else, and a source without it changes nothing), and the app's own
/// `env` entries follow. Everything before the last `env` entry that always sets a value
/// (a literal, a field reference, a required key reference) can never show, and is dropped.
fn definitions(container: &Value, name: &str) -> Option<Vec<Value>> {
    let entries: Vec<&Value> = env_entries(container, name).collect();
    let always_sets = |entry: &&Value| {
        let Some(source) = entry.get("valueFrom") else { return true };
        let optional_ref = ["secretKeyRef", "configMapKeyRef"]
            .iter()
            .any(|kind| source.pointer(&format!("/{kind}/optional")).and_then(Value::as_bool) == Some(true));
        !optional_ref
    };
    if let Some(last) = entries.iter().rposition(always_sets) {
        return Some(entries[last..].iter().map(|e| (*e).clone()).collect());
    }
    let mut out: Vec<Value> = container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|source| {
            let prefix = source.get("prefix").and_then(Value::as_str).unwrap_or_default();
            let key = name.strip_prefix(prefix).filter(|key| is_config_key(key))?;
            let (kind, object) = match (source.get("secretRef"), source.get("configMapRef")) {
                (Some(secret), _) => ("secretKeyRef", secret),
                (None, Some(config_map)) => ("configMapKeyRef", config_map),
                (None, None) => return None,
            };
            let object_name = object.get("name").and_then(Value::as_str)?;
            Some(json!({"valueFrom": {kind: {"name": object_name, "key": key, "optional": true}}}))
        })
        .collect();
    out.extend(entries.into_iter().cloned());
    (!out.is_empty()).then_some(out)
}

/// A valid Secret or ConfigMap data key (`[-._a-zA-Z0-9]+`, not `.` or `..`; the API
/// server's `IsConfigMapKey`): only such a key can be what an `envFrom` source supplies.
fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
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

/// `DURABLE_SCALER_TASK_HUB`'s definitions: the annotation, else the app's hub-name setting
/// (copied as it stands, `valueFrom` and `envFrom` too; the extension's default first when
/// only optional sources may set it), else the extension's default with a warning. A name
/// the sidecar would refuse (the same [`TaskHub`] rule; the sidecar exits at start on it) is
/// an error: the pod is not injected.
fn task_hub_env(
    annotation: Option<&str>,
    app: &Value,
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    const NAME: &str = env::TASK_HUB;
    let invalid = |source: &str, e: crate::contract::InvalidTaskHubName| {
        format!("durable-scaler: {source}: {e}; the sidecar would refuse it; sidecar not injected")
    };
    if let Some(hub) = annotation {
        let hub =
            TaskHub::parse(hub).map_err(|e| invalid(&format!("annotation {TASK_HUB_ANNOTATION}"), e))?;
        return Ok(vec![json!({"name": NAME, "value": hub.name()})]);
    }
    let default = json!({"name": NAME, "value": DEFAULT_TASK_HUB});
    if let Some(found) = definitions(app, HUB_NAME_ENV) {
        for literal in found.iter().filter_map(|d| d.get("value").and_then(Value::as_str)) {
            TaskHub::parse(literal).map_err(|e| invalid(&format!("env {HUB_NAME_ENV}"), e))?;
        }
        let always_set = found.first().is_some_and(|d| !is_optional_reference(d));
        let copies = found.iter().map(|d| renamed_env(NAME, d));
        return Ok(if always_set {
            copies.collect()
        } else {
            std::iter::once(default).chain(copies).collect()
        });
    }
    warnings.push(format!(
        "durable-scaler: no task hub named (annotation {TASK_HUB_ANNOTATION} or env {HUB_NAME_ENV}); \
         assuming the Durable Functions default {DEFAULT_TASK_HUB}"
    ));
    Ok(vec![default])
}

/// True for a `secretKeyRef` / `configMapKeyRef` with `optional: true` (may set nothing).
fn is_optional_reference(definition: &Value) -> bool {
    ["secretKeyRef", "configMapKeyRef"].iter().any(|kind| {
        definition.pointer(&format!("/valueFrom/{kind}/optional")).and_then(Value::as_bool) == Some(true)
    })
}

/// True when the pod's QoS class is Guaranteed: every container and init container has cpu
/// and memory limits, and requests (when given) equal to them. The rule of
/// kubernetes/kubernetes `pkg/apis/core/v1/helper/qos/qos.go` (`GetPodQOS`; requests left
/// out default to the limits, as the API server's defaulting does before admission). A pod
/// with pod-level `resources` (PodLevelResources) is judged on those instead.
fn guaranteed(spec: &Map<String, Value>) -> bool {
    let equal_limits = |resources: Option<&Value>| {
        ["cpu", "memory"].iter().all(|name| {
            let limit = resources.and_then(|r| r.pointer(&format!("/limits/{name}"))).and_then(Value::as_str);
            let request =
                resources.and_then(|r| r.pointer(&format!("/requests/{name}"))).and_then(Value::as_str);
            match (limit.and_then(parse_quantity), request.map(parse_quantity)) {
                (Some(limit), None) => limit > 0.0,
                (Some(limit), Some(Some(request))) => limit > 0.0 && limit == request,
                _ => false,
            }
        })
    };
    if let Some(pod_level) = spec.get("resources").filter(|r| r.get("limits").is_some()) {
        return equal_limits(Some(pod_level));
    }
    let mut all = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| spec.get(*list).and_then(Value::as_array).into_iter().flatten())
        .peekable();
    all.peek().is_some() && all.all(|c| equal_limits(c.get("resources")))
}

/// What decides the app's per-pod limits, for the sidecar to report: the app container's CPU
/// limit through the downward API, and the app's own limit settings copied as they stand
/// (literal or `valueFrom`, like the connection).
///
/// Divisor `1` rounds the limit up to whole CPUs, as .NET's `Environment.ProcessorCount` does
/// with a CPU quota; with no CPU limit the kubelet gives the node's allocatable CPUs instead
/// (kubernetes `pkg/kubelet/kubelet_resources.go` `defaultPodLimitsForDownwardAPI`,
/// `pkg/api/v1/resource/helpers.go` `ExtractContainerResourceValue`; research-injectors.md
/// item 4), which is what .NET sees then too. `containerName` points at the app container,
/// since the sidecar's own limit says nothing about the app.
fn limit_env(app: &Value, app_name: &str) -> Vec<Value> {
    let mut entries = Vec::new();
    if !app_name.is_empty() {
        entries.push(json!({"name": env::APP_CPUS, "valueFrom": {"resourceFieldRef": {
            "containerName": app_name,
            "resource": "limits.cpu",
            "divisor": "1",
        }}}));
    }
    for (setting, ours) in
        [(MAX_ACTIVITIES_ENV, env::APP_MAX_ACTIVITIES), (MAX_ORCHESTRATIONS_ENV, env::APP_MAX_ORCHESTRATIONS)]
    {
        if let Some(entry) = env_entry(app, setting) {
            entries.push(renamed_env(ours, entry));
        }
    }
    entries
}

/// Requests and limits from the annotations, each invalid one replaced by its default with a
/// warning; a request above its limit (which the API server would reject, failing the pod)
/// falls back to both defaults. In a Guaranteed pod (`guaranteed`) the requests are set to
/// the limits: a container whose requests differ from its limits would make the pod Burstable
/// (`GetPodQOS`), taking away the QoS class its owner chose.
fn resources<'a>(
    annotation: &impl Fn(&str) -> Option<&'a str>,
    guaranteed: bool,
    warnings: &mut Vec<String>,
) -> Value {
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
        if guaranteed {
            if annotation(if what == "cpu" { CPU_REQUEST_ANNOTATION } else { MEMORY_REQUEST_ANNOTATION })
                .is_some()
                && pair.0.0 != pair.1.0
            {
                warnings.push(format!(
                    "durable-scaler: the pod's QoS class is Guaranteed; the sidecar's {what} request is \
                     set to its limit {} to keep it so",
                    pair.1.0
                ));
            }
            pair.0 = pair.1.clone();
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
    fn a_task_hub_annotation_the_sidecar_would_refuse_skips_the_pod() {
        // The sidecar parses DURABLE_SCALER_TASK_HUB with the same TaskHub rule and would
        // exit at start (a crash-looping pod); monitoring another hub would be wrong too.
        for bad in ["no-dashes", "1Hub"] {
            let pod = pod(json!({TASK_HUB_ANNOTATION: bad}), storage_env());
            let injection = plan(&pod, &settings());
            assert!(!injection.injects(), "{bad}");
            assert_eq!(injection.skipped, Some(SkipReason::InvalidTaskHub));
            let says_why =
                |w: &String| w.contains(&format!("{bad:?}")) && w.contains("starting with a letter");
            assert!(injection.warnings.iter().any(says_why), "{:?}", injection.warnings);
        }
    }

    #[test]
    fn a_literal_hub_name_setting_the_sidecar_would_refuse_skips_the_pod() {
        let hub = json!({"name": HUB_NAME_ENV, "value": "my_hub"});
        let pod = pod(json!({}), json!([storage_env()[0], hub]));
        assert_eq!(plan(&pod, &settings()).skipped, Some(SkipReason::InvalidTaskHub));
    }

    fn env_from_pod(env_from: Value, env: Value) -> Value {
        json!({
            "metadata": {"labels": {INJECT_LABEL: "true"}},
            "spec": {"containers": [{"name": "app", "image": "app:1", "envFrom": env_from, "env": env}]},
        })
    }

    fn sidecar_env_all(pod: &Value, name: &str) -> Vec<Value> {
        let sidecar = pod["spec"]["initContainers"][0].clone();
        sidecar["env"].as_array().unwrap().iter().filter(|e| e["name"] == name).cloned().collect()
    }

    #[test]
    fn an_env_from_secret_gives_the_sidecar_that_one_key_optionally() {
        let pod = env_from_pod(json!([{"secretRef": {"name": "func-secrets"}}]), json!([]));
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env_all(&out, env::CONNECTION),
            [json!({"name": env::CONNECTION, "valueFrom": {"secretKeyRef":
                {"name": "func-secrets", "key": "AzureWebJobsStorage", "optional": true}}})]
        );
        assert!(out["spec"]["initContainers"][0].get("envFrom").is_none(), "no whole Secret");
    }

    #[test]
    fn an_env_from_prefix_is_taken_off_the_key_and_unfitting_prefixes_are_passed_over() {
        let pod = env_from_pod(
            json!([
                {"prefix": "Other_", "secretRef": {"name": "unrelated"}},
                {"prefix": "AzureWebJobs", "configMapRef": {"name": "cfg"}},
            ]),
            json!([]),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env_all(&out, env::CONNECTION),
            [json!({"name": env::CONNECTION, "valueFrom": {"configMapKeyRef":
                {"name": "cfg", "key": "Storage", "optional": true}}})]
        );
    }

    #[test]
    fn later_env_from_sources_come_later_so_they_win_as_in_the_kubelet() {
        let pod = env_from_pod(
            json!([{"configMapRef": {"name": "first"}}, {"secretRef": {"name": "second"}}]),
            json!([]),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        let names: Vec<Value> = sidecar_env_all(&out, env::CONNECTION)
            .iter()
            .map(|e| e["valueFrom"].as_object().unwrap().values().next().unwrap()["name"].clone())
            .collect();
        assert_eq!(names, [json!("first"), json!("second")]);
    }

    #[test]
    fn an_env_entry_wins_over_every_env_from_source() {
        let pod = env_from_pod(json!([{"secretRef": {"name": "func-secrets"}}]), storage_env());
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env_all(&out, env::CONNECTION),
            [json!({"name": env::CONNECTION, "value": "UseDevelopmentStorage=true"})]
        );
    }

    #[test]
    fn an_optional_env_entry_follows_the_env_from_sources_it_may_not_replace() {
        let optional = json!({"name": "AzureWebJobsStorage",
            "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": true}}});
        let pod = env_from_pod(json!([{"secretRef": {"name": "func-secrets"}}]), json!([optional]));
        let out = applied(&pod, &plan(&pod, &settings()));
        let refs: Vec<Value> = sidecar_env_all(&out, env::CONNECTION)
            .iter()
            .map(|e| e["valueFrom"]["secretKeyRef"]["name"].clone())
            .collect();
        assert_eq!(refs, [json!("func-secrets"), json!("s")]);
    }

    #[test]
    fn a_hub_name_from_env_from_comes_after_the_default() {
        let pod = env_from_pod(json!([{"secretRef": {"name": "func-secrets"}}]), json!([]));
        let injection = plan(&pod, &settings());
        let out = applied(&pod, &injection);
        let hub = sidecar_env_all(&out, env::TASK_HUB);
        assert_eq!(hub[0], json!({"name": env::TASK_HUB, "value": DEFAULT_TASK_HUB}));
        assert_eq!(hub[1]["valueFrom"]["secretKeyRef"]["key"], HUB_NAME_ENV);
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    }

    #[test]
    fn a_host_network_pod_is_skipped() {
        let mut pod = pod(json!({}), storage_env());
        pod["spec"]["hostNetwork"] = json!(true);
        let injection = plan(&pod, &settings());
        assert!(!injection.injects());
        assert_eq!(injection.skipped, Some(SkipReason::HostNetwork));
    }

    #[test]
    fn a_guaranteed_pod_gets_requests_equal_to_limits() {
        let mut pod = pod(json!({}), storage_env());
        pod["spec"]["containers"][0]["resources"] =
            json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1000m", "memory": "1Gi"}});
        let resources = &applied(&pod, &plan(&pod, &settings()))["spec"]["initContainers"][0]["resources"];
        assert_eq!(resources["requests"], resources["limits"]);
        assert_eq!(resources["limits"]["cpu"], DEFAULT_CPU_LIMIT);
    }

    #[test]
    fn a_burstable_pod_keeps_the_default_requests() {
        let mut pod = pod(json!({}), storage_env());
        pod["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "1"}, "requests": {"cpu": "1"}});
        let resources = &applied(&pod, &plan(&pod, &settings()))["spec"]["initContainers"][0]["resources"];
        assert_eq!(resources["requests"]["cpu"], DEFAULT_CPU_REQUEST);
    }

    #[test]
    fn the_guaranteed_rule_looks_at_every_container_and_init_container() {
        let full = json!({"limits": {"cpu": "1", "memory": "1Gi"}});
        let spec = |init: Value| {
            json!({"containers": [{"name": "a", "resources": full}], "initContainers": [init]})
                .as_object()
                .unwrap()
                .clone()
        };
        assert!(guaranteed(&spec(json!({"name": "i", "resources": full}))));
        assert!(!guaranteed(&spec(json!({"name": "i"}))));
        let unequal = json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}});
        assert!(!guaranteed(&spec(json!({"name": "i", "resources": unequal}))));
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
        assert!(security.get("runAsUser").is_none() && security.get("runAsGroup").is_none(), "{security}");
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

    fn with_limits_env(extra: Value) -> Value {
        let mut env = storage_env();
        env.as_array_mut().unwrap().extend(extra.as_array().unwrap().iter().cloned());
        env
    }

    #[test]
    fn the_app_containers_cpus_reach_the_sidecar_through_the_downward_api() {
        let pod = pod(json!({}), storage_env());
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env(&out, env::APP_CPUS),
            json!({"name": env::APP_CPUS, "valueFrom": {"resourceFieldRef": {
                "containerName": "app", "resource": "limits.cpu", "divisor": "1"}}})
        );
    }

    #[test]
    fn a_cpu_limit_on_the_app_container_changes_nothing_in_the_reference() {
        // The kubelet resolves the reference: the limit when there is one, the node's
        // allocatable CPUs otherwise; the entry is the same either way.
        let mut limited = pod(json!({}), storage_env());
        limited["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "1500m"}});
        let unlimited = pod(json!({}), storage_env());
        let entry = |p: &Value| sidecar_env(&applied(p, &plan(p, &settings())), env::APP_CPUS);
        assert_eq!(entry(&limited), entry(&unlimited));
        assert_eq!(entry(&limited)["valueFrom"]["resourceFieldRef"]["containerName"], "app");
    }

    #[test]
    fn the_apps_limit_settings_are_copied_literal_or_value_from() {
        let pod = pod(
            json!({}),
            with_limits_env(json!([
                {"name": MAX_ACTIVITIES_ENV, "value": "25"},
                {"name": MAX_ORCHESTRATIONS_ENV, "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "orch"}}},
            ])),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env(&out, env::APP_MAX_ACTIVITIES),
            json!({"name": env::APP_MAX_ACTIVITIES, "value": "25"})
        );
        assert_eq!(
            sidecar_env(&out, env::APP_MAX_ORCHESTRATIONS),
            json!({"name": env::APP_MAX_ORCHESTRATIONS, "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "orch"}}})
        );
    }

    #[test]
    fn without_limit_settings_in_the_app_none_are_invented() {
        let pod = pod(json!({}), storage_env());
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(sidecar_env(&out, env::APP_MAX_ACTIVITIES), Value::Null);
        assert_eq!(sidecar_env(&out, env::APP_MAX_ORCHESTRATIONS), Value::Null);
    }

    #[test]
    fn the_limit_entries_come_after_the_existing_ones() {
        let pod = pod(json!({}), with_limits_env(json!([{"name": MAX_ACTIVITIES_ENV, "value": "25"}])));
        let out = applied(&pod, &plan(&pod, &settings()));
        let names: Vec<String> = out["spec"]["initContainers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect();
        let first_limit = names.iter().position(|n| n == env::APP_CPUS).unwrap();
        assert_eq!(&names[first_limit..], [env::APP_CPUS, env::APP_MAX_ACTIVITIES]);
        assert_eq!(names[..first_limit][0], env::TASK_HUB);
    }
}
