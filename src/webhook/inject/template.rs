//! The sidecar template: the container the webhook adds (image, env, probe, hardening), the
//! token volume it mounts, and the status annotation that records what was added.

use serde_json::{Value, json};

use super::InjectionSettings;
use super::eligibility::App;
use super::kubelet_env::{definitions, env_entry, is_optional_reference, renamed_env};
use crate::contract::{
    DEFAULT_TASK_HUB, HUB_NAME_ENV, MAX_ACTIVITIES_ENV, MAX_ORCHESTRATIONS_ENV, SIDECAR_CONTAINER,
    SIDECAR_HTTP_PORT, TASK_HUB_ANNOTATION, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS,
    TOKEN_FILE_NAME, TOKEN_VOLUME, TaskHub, env,
};

/// What the sidecar is made from, decided before the template is filled in.
#[derive(Debug)]
pub(super) struct Sidecar<'a> {
    /// The app container and its connection definitions.
    pub(super) app: &'a App<'a>,
    /// [`env::TASK_HUB`]'s definitions ([`task_hub_env`]), never empty.
    pub(super) task_hub: Vec<Value>,
    /// The aggregator's report URL.
    pub(super) aggregator: &'a url::Url,
    /// Requests and limits.
    pub(super) resources: Value,
    /// Native sidecar (init container with `restartPolicy: Always`) or plain container.
    pub(super) native: bool,
}

/// The sidecar container; `None` only if a list that is never empty is (the caller skips
/// the pod rather than panic).
pub(super) fn container(settings: &InjectionSettings, sidecar: Sidecar<'_>) -> Option<Value> {
    let mut task_hub = sidecar.task_hub.into_iter();
    let mut connection = sidecar.app.connection.iter();
    let (first_task_hub, first_connection) = (task_hub.next()?, connection.next()?);
    let https = sidecar.aggregator.scheme() == "https";

    let mut env = vec![
        first_task_hub,
        renamed_env(env::CONNECTION, first_connection),
        json!({"name": env::AGGREGATOR, "value": url_text(sidecar.aggregator)}),
        json!({"name": env::POD_NAME, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
        json!({"name": env::POD_NAMESPACE, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}}),
    ];
    // Further definitions of the same two names, after the first ones and in the kubelet's
    // order (see `definitions`): each later one that resolves replaces the value.
    env.extend(task_hub);
    env.extend(connection.map(|definition| renamed_env(env::CONNECTION, definition)));
    if let (true, Some(ca)) = (https, &settings.aggregator_ca) {
        env.push(json!({"name": env::AGGREGATOR_CA, "value": ca}));
    }
    env.extend(limit_env(sidecar.app.container, sidecar.app.name));

    let mut container = json!({
        "name": SIDECAR_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["sidecar"],
        "env": env,
        "resources": sidecar.resources,
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
    if sidecar.native {
        container["restartPolicy"] = json!("Always");
    }
    Some(container)
}

/// The projected service-account token the sidecar authenticates its reports with.
pub(super) fn token_volume() -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
            "path": TOKEN_FILE_NAME,
        }}]},
    })
}

/// The status annotation's value: what was injected, how, and by which version.
pub(super) fn status(settings: &InjectionSettings, native: bool, mode_reason: &str) -> Value {
    json!({
        "version": settings.version,
        "containers": [SIDECAR_CONTAINER],
        "volumes": [TOKEN_VOLUME],
        "mode": if native { "native-sidecar" } else { "container" },
        "modeReason": mode_reason,
    })
}

/// `DURABLE_SCALER_TASK_HUB`'s definitions: the annotation, else the app's hub-name setting
/// (copied as it stands, `valueFrom` and `envFrom` too; the extension's default first when
/// only optional sources may set it), else the extension's default with a warning. A name
/// the sidecar would refuse (the same [`TaskHub`] rule; the sidecar exits at start on it) is
/// an error: the pod is not injected.
pub(super) fn task_hub_env(
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

/// The URL as written, without the `/` path the parser adds to `http://host:port`.
pub(super) fn url_text(url: &url::Url) -> &str {
    let text = url.as_str();
    if url.path() == "/" && url.query().is_none() && url.fragment().is_none() {
        text.strip_suffix('/').unwrap_or(text)
    } else {
        text
    }
}
