//! Who gets a sidecar: an opted-in pod that has none yet, does not share the node's network,
//! and has a container that defines the storage connection where the webhook can see it
//! (that container is the app).

use serde_json::{Map, Value};

use super::kubelet_env::{Naming, definitions, env_entry};
use crate::contract::{SIDECAR_CONTAINER, SIDECAR_HTTP_PORT};

/// The app container and how its connection variable is defined.
#[derive(Debug)]
pub(super) struct App<'a> {
    /// The container as it stands in the pod.
    pub(super) container: &'a Value,
    /// Its index in `spec.containers`.
    pub(super) index: usize,
    /// Its `name` (empty when it has none; the API server refuses such a pod anyway).
    pub(super) name: &'a str,
    /// The definitions of the connection variable ([`definitions`]), never empty.
    pub(super) connection: Vec<Value>,
}

/// True when a container named [`SIDECAR_CONTAINER`] is in `containers` or `initContainers`.
pub(super) fn has_sidecar(spec: &Map<String, Value>) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER))
        })
    })
}

/// Why a pod sharing the node's network gets no sidecar, or `None` for any other pod. The
/// sidecar listens on [`SIDECAR_HTTP_PORT`]: in the node's network namespace two such pods on
/// one node would clash (Istio and Linkerd skip hostNetwork pods too).
pub(super) fn host_network(spec: &Map<String, Value>) -> Option<String> {
    (spec.get("hostNetwork").and_then(Value::as_bool) == Some(true)).then(|| {
        format!(
            "durable-scaler: the pod uses hostNetwork; the sidecar's port {SIDECAR_HTTP_PORT} would \
             clash with other pods on the node; sidecar not injected"
        )
    })
}

/// Why a Windows pod gets no sidecar, or `None` for any other pod: the sidecar's image is
/// built for Linux only. A pod is a Windows pod when it says so in `spec.os.name` (the field
/// the API server validates Windows pods by, `pkg/apis/core/validation`) or asks for Windows
/// nodes in its `nodeSelector` (`kubernetes.io/os`, the label every kubelet sets).
pub(super) fn windows(spec: &Map<String, Value>) -> Option<String> {
    let os = spec.get("os").and_then(|os| os.get("name")).and_then(Value::as_str);
    let selected = spec.get("nodeSelector").and_then(|s| s.get("kubernetes.io/os")).and_then(Value::as_str);
    (os == Some("windows") || selected == Some("windows")).then(|| {
        "durable-scaler: the pod runs on Windows and the sidecar's image is Linux-only; sidecar not injected"
            .to_owned()
    })
}

/// Why a pod that must run to completion gets no plain-container sidecar, or `None`: with
/// `restartPolicy` `Never` or `OnFailure` (a Job's pod) a sidecar in `containers` never
/// exits, so the pod would never complete. A native sidecar is stopped by the kubelet once
/// the other containers are done, so such a pod may have one.
pub(super) fn never_completes(spec: &Map<String, Value>, native: bool) -> Option<String> {
    let policy = spec.get("restartPolicy").and_then(Value::as_str).unwrap_or("Always");
    (!native && policy != "Always").then(|| {
        format!(
            "durable-scaler: the pod's restartPolicy is {policy} and the sidecar would be a plain \
             container, which never exits: the pod would never complete; sidecar not injected"
        )
    })
}

/// The app container: the default-container annotation's container when it defines the
/// connection variable, else the first container that defines it in `env`, else the first
/// whose `envFrom` may.
pub(super) fn app_container<'a>(
    spec: &'a Map<String, Value>,
    default_container: Option<&str>,
    connection_env: &str,
) -> Option<App<'a>> {
    let containers = spec.get("containers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let defines =
        |(i, c): (usize, &'a Value)| definitions(c, connection_env, Naming::Exact).map(|d| (i, c, d));
    let (index, container, connection) = default_container
        .and_then(|name| {
            containers.iter().enumerate().find(|(_, c)| c.get("name").and_then(Value::as_str) == Some(name))
        })
        .and_then(defines)
        .or_else(|| {
            containers
                .iter()
                .enumerate()
                .filter(|(_, c)| env_entry(c, connection_env).is_some())
                .find_map(defines)
        })
        .or_else(|| containers.iter().enumerate().find_map(defines))?;
    let name = container.get("name").and_then(Value::as_str).unwrap_or_default();
    Some(App { container, index, name, connection })
}
