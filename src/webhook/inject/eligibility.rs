//! Who gets a sidecar: an opted-in pod that has none yet, does not share the node's network,
//! and has a container that defines the storage connection where the webhook can see it
//! (that container is the app).

use serde_json::{Map, Value};

use super::kubelet_env::{Naming, definitions, env_entry, is_optional_reference, spellings};
use crate::contract::{SIDECAR_CONTAINER, SIDECAR_HTTP_PORT, env};

/// The app container and how its connection variable is defined.
#[derive(Debug)]
pub(super) struct App<'a> {
    /// The container as it stands in the pod.
    pub(super) container: &'a Value,
    /// Its index in `spec.containers`.
    pub(super) index: usize,
    /// Its `name` (empty when it has none; the API server refuses such a pod anyway).
    pub(super) name: &'a str,
    /// The definitions of the connection string ([`definitions`]); empty for an app that
    /// connects with an identity only.
    pub(super) connection: Vec<Value>,
    /// The identity-based connection's settings the app defines: the sidecar variable and
    /// the definitions to copy there (empty when a connection string is always set, since
    /// the string then wins).
    pub(super) identity: IdentitySettings,
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

/// The identity-based settings an app defines: the sidecar variable and the definitions to
/// copy there.
pub(super) type IdentitySettings = Vec<(&'static str, Vec<Value>)>;

/// The identity-based connection's settings that locate the account: one of them (or a
/// connection string) makes a container the app.
const LOCATING_SETTINGS: [&str; 4] = ["accountName", "blobServiceUri", "queueServiceUri", "tableServiceUri"];

/// How `container` defines the storage connection named `connection_env`: the connection
/// string's definitions ([`definitions`], exact name, as today), and, unless a string is
/// always set, the identity-based settings `{connection_env}__{key}` (matched as .NET
/// configuration reads them) with the sidecar variable each goes to. `None` when the
/// container defines neither a string nor a locating setting.
fn connection_of(container: &Value, connection_env: &str) -> Option<(Vec<Value>, IdentitySettings)> {
    let string = definitions(container, connection_env, Naming::Exact).unwrap_or_default();
    let string_always_set = string.first().is_some_and(|d| !is_optional_reference(d));
    let identity: IdentitySettings = if string_always_set {
        Vec::new()
    } else {
        env::CONNECTION_SETTINGS
            .iter()
            .filter_map(|(key, ours)| {
                definitions(container, &format!("{connection_env}__{key}"), Naming::DotnetConfiguration)
                    .map(|found| (*ours, found))
            })
            .collect()
    };
    let locates = identity.iter().any(|(ours, _)| {
        LOCATING_SETTINGS.iter().any(|key| env::CONNECTION_SETTINGS.contains(&(*key, *ours)))
    });
    (!string.is_empty() || locates).then_some((string, identity))
}

/// True when `container` names the connection in its `env` (the string or a locating
/// setting), rather than only possibly through `envFrom`.
fn names_connection_in_env(container: &Value, connection_env: &str) -> bool {
    env_entry(container, connection_env).is_some()
        || LOCATING_SETTINGS.iter().any(|key| {
            !spellings(container, &format!("{connection_env}__{key}"), Naming::DotnetConfiguration).is_empty()
        })
}

/// The app container: the default-container annotation's container when it defines the
/// connection ([`connection_of`]), else the first container that names it in `env`, else
/// the first whose `envFrom` may.
pub(super) fn app_container<'a>(
    spec: &'a Map<String, Value>,
    default_container: Option<&str>,
    connection_env: &str,
) -> Option<App<'a>> {
    let containers = spec.get("containers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let defines = |(i, c): (usize, &'a Value)| connection_of(c, connection_env).map(|d| (i, c, d));
    let (index, container, (connection, identity)) = default_container
        .and_then(|name| {
            containers.iter().enumerate().find(|(_, c)| c.get("name").and_then(Value::as_str) == Some(name))
        })
        .and_then(defines)
        .or_else(|| {
            containers
                .iter()
                .enumerate()
                .filter(|(_, c)| names_connection_in_env(c, connection_env))
                .find_map(defines)
        })
        .or_else(|| containers.iter().enumerate().find_map(defines))?;
    let name = container.get("name").and_then(Value::as_str).unwrap_or_default();
    Some(App { container, index, name, connection, identity })
}

/// Why an app whose identity-based connection the sidecar cannot use gets no sidecar, or
/// `None`: a client secret or certificate (`ClientFactory.CreateCredential`'s
/// `clientSecret`, `clientCertificate`), which the sidecar is never given, or a literal
/// `credential` other than `managedidentity` and `workloadidentity`.
pub(super) fn unsupported_credential(app: &App<'_>, connection_env: &str) -> Option<String> {
    if app.identity.is_empty() {
        return None;
    }
    let secret = ["clientSecret", "clientCertificate"].into_iter().find(|key| {
        !spellings(app.container, &format!("{connection_env}__{key}"), Naming::DotnetConfiguration).is_empty()
    });
    if let Some(key) = secret {
        return Some(format!(
            "durable-scaler: the app connects to storage with {connection_env}__{key}; the sidecar reads \
             storage with a managed or workload identity only; sidecar not injected"
        ));
    }
    let literal = app
        .identity
        .iter()
        .filter(|(ours, _)| *ours == env::CONNECTION_CREDENTIAL)
        .flat_map(|(_, found)| found.iter().filter_map(|d| d.get("value").and_then(Value::as_str)))
        .find(|value| {
            !["managedidentity", "workloadidentity"].iter().any(|ok| ok.eq_ignore_ascii_case(value))
        });
    literal.map(|value| {
        format!(
            "durable-scaler: {connection_env}__credential is {value:?}; the sidecar reads storage with \
             managedidentity, workloadidentity or the default credential only; sidecar not injected"
        )
    })
}
