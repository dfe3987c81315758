//! Drain on stop: the app container gets the Functions host's drain switch and the pod a grace
//! period long enough for what the host waits for on SIGTERM, so a scale-in stops the app the
//! way the host means to be stopped rather than by SIGKILL in the middle of it.
//!
//! What upstream does on SIGTERM (azure-functions-host, PR #7262):
//! - `WebJobsScriptHostService.RegisterApplicationLifetimeEvents`: on `ApplicationStopping`,
//!   when `EnvironmentExtensions.DrainOnApplicationStoppingEnabled` (the variable
//!   `FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING` is `true`, **or** `KUBERNETES_SERVICE_HOST` is set,
//!   which the kubelet sets in every pod), it calls `IDrainModeManager.EnableDrainModeAsync`
//!   (azure-webjobs-sdk `src/Microsoft.Azure.WebJobs.Host/Hosting/DrainModeManager.cs`), which
//!   stops every listener: no new work is taken, and the Durable extension stops its task hub
//!   worker (azure-functions-durable-extension `DurableTaskExtension.StopTaskHubWorkerIfIdleAsync`;
//!   graceful only with `useGracefulShutdown`, when DTFx's `WorkItemDispatcher.StopAsync` waits
//!   up to 8 x 1 s for running work items).
//! - `WebJobsScriptHostService.StopAsync` waits at most 10 s for the script host to stop, the
//!   language worker process gets `WorkerProcessCountOptions.ProcessShutdownTimeout` (10 s) and
//!   the gRPC server `RpcInitializationService`'s 5 s: about 25 s in all, after which the
//!   process exits whatever is still running.
//!
//! That drain lasts about 10 s and, with the official images, never starts: their PID 1 is
//! bash running the host without `exec` (azure-functions-docker
//! `host/4/*/start_nonappservice.sh`), so SIGTERM does not reach the host at all. What lets a
//! running activity finish is a **preStop drain**: where the app keeps its host keys in a
//! Kubernetes Secret or ConfigMap (`AzureWebJobsSecretStorageType=kubernetes`, with
//! `AzureWebJobsKubernetesSecretName` or a volume at `/run/secrets/functions-keys`:
//! azure-functions-host `Security/KeyManagement/DefaultSecretManagerProvider.cs`,
//! `SimpleKubernetesClient.cs`, `KubernetesSecretsRepository.cs`, key `host.master`), the
//! webhook mounts that one key into the sidecar and gives the app container a preStop
//! `httpGet` on the sidecar's `/drain` (src/sidecar/drain.rs), which calls the host's
//! `POST /admin/host/drain` and answers once `GET /admin/host/drain/status` says `Completed`.
//! The kubelet runs the hook before SIGTERM and waits for it within the grace period, which
//! then defaults to the app's function timeout ([`FUNCTION_TIMEOUT_ENV`], else upstream's
//! 30 min, [`crate::contract::DEFAULT_FUNCTION_TIMEOUT`]) and
//! [`crate::contract::DRAIN_GRACE_MARGIN`]: no invocation runs longer than the timeout.
//! Apps on the default key store (blob storage, which `func kubernetes deploy` uses for
//! worker deployments) get no preStop drain: the sidecar does not read keys out of the
//! storage account; the status annotation says why.
//!
//! So the variable is set explicitly (it is what the host documents, and it keeps drain on
//! should the Kubernetes rule ever change), and the grace period is at least
//! [`DRAIN_GRACE_SECONDS`]: upstream's 25 s and 5 s for the process to flush and exit, which
//! equals Kubernetes' default; a pod whose own grace is shorter gets it raised, a longer one is
//! kept.

use serde_json::{Value, json};

use super::eligibility::App;
use super::kubelet_env::{Naming, env_entries};
use super::patch;
use crate::contract::{DEFAULT_FUNCTION_TIMEOUT, DRAIN_GRACE_MARGIN, DRAIN_PATH, DRAIN_TOKEN_HEADER};

/// Where the host looks for its key store's type (azure-functions-host
/// `src/WebJobs.Script/Environment/EnvironmentSettingNames.cs`, read with
/// `GetEnvironmentVariable`: exact name).
pub(super) const SECRET_STORAGE_TYPE_ENV: &str = "AzureWebJobsSecretStorageType";
/// The Secret (`name`, `secrets/name`) or ConfigMap (`configmaps/name`) of the Kubernetes key
/// store (`SimpleKubernetesClient.GetObjectUrl`).
pub(super) const KUBERNETES_SECRET_NAME_ENV: &str = "AzureWebJobsKubernetesSecretName";
/// Where the Kubernetes key store reads mounted keys when no object is named
/// (`SimpleKubernetesClient.KubernetesSecretsDir`).
pub(super) const MOUNTED_KEYS_DIR: &str = "/run/secrets/functions-keys";
/// The master key's name in the store (`KubernetesSecretsRepository.MasterKey`).
pub(super) const MASTER_KEY: &str = "host.master";
/// The app's function timeout as configuration reads it (`AzureFunctionsJobHost:functionTimeout`,
/// bound by `ScriptJobHostOptionsSetup`; host.json's value is not visible to the webhook).
pub(super) const FUNCTION_TIMEOUT_ENV: &str = "AzureFunctionsJobHost__functionTimeout";
/// The sidecar's volume with the master key, and where it is mounted.
pub(super) const HOST_KEY_VOLUME: &str = "durable-scaler-host-key";
pub(super) const HOST_KEY_DIR: &str = "/var/run/durable-scaler/host-key";
/// What `/drain` keeps of the grace period after the host drained: SIGTERM, the host's own
/// stop (about 10 s, module docs) and the sidecar's `leaving` report.
pub(super) const DRAIN_WAIT_MARGIN_SECONDS: u64 = 15;

/// The Secret or ConfigMap holding the host's master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeySource {
    /// `secret` or `configMap` (the volume source's field).
    pub(super) kind: &'static str,
    /// The object's name.
    pub(super) name: String,
    /// The key holding `host.master`.
    pub(super) key: String,
}

/// The preStop drain the app gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PreStop {
    /// Where the master key comes from.
    pub(super) key: KeySource,
    /// The host's port (the app container's first TCP port).
    pub(super) app_port: u16,
    /// The app's function timeout, in seconds.
    pub(super) function_timeout: u64,
    /// The per-pod token the hook sends.
    pub(super) token: String,
    /// The sidecar's HTTP port, which the hook calls.
    pub(super) sidecar_port: u16,
}

/// The preStop drain for `app`, or why it gets none (the status annotation says it). A
/// function timeout that cannot be read adds a warning and counts as the default.
pub(super) fn pre_stop(
    spec: &serde_json::Map<String, Value>,
    app: &App<'_>,
    sidecar_port: u16,
    warnings: &mut Vec<String>,
) -> Result<PreStop, String> {
    let container = app.container;
    if container.pointer("/lifecycle/preStop").is_some() {
        return Err("the app container has a preStop hook of its own".to_owned());
    }
    let key = key_source(spec, container)?;
    let Some(app_port) = super::template::app_port(container) else {
        return Err("the app container declares no port, where the host's admin API would be".to_owned());
    };
    let function_timeout = function_timeout(container, warnings);
    Ok(PreStop { key, app_port, function_timeout, token: new_token(), sidecar_port })
}

/// A literal `value` of the last entry setting `name`; `Err` when one sets it otherwise.
fn literal<'a>(container: &'a Value, name: &str, naming: Naming) -> Option<Result<&'a str, ()>> {
    let entry = env_entries(container, name, naming).last()?;
    Some(entry.get("value").and_then(Value::as_str).ok_or(()))
}

fn key_source(spec: &serde_json::Map<String, Value>, container: &Value) -> Result<KeySource, String> {
    match literal(container, SECRET_STORAGE_TYPE_ENV, Naming::Exact) {
        Some(Ok(kind)) if kind.trim().eq_ignore_ascii_case("kubernetes") => {}
        Some(Err(())) => {
            return Err(format!("{SECRET_STORAGE_TYPE_ENV} is not a literal value the webhook can read"));
        }
        _ => {
            return Err(format!(
                "the host's keys are not in a Kubernetes Secret ({SECRET_STORAGE_TYPE_ENV} is not `kubernetes`; \
                 the default store is blob storage, which the sidecar does not read keys from)"
            ));
        }
    }
    match literal(container, KUBERNETES_SECRET_NAME_ENV, Naming::Exact) {
        Some(Ok(name)) if !name.trim().is_empty() => {
            let name = name.trim();
            let (kind, name) = match (name.strip_prefix("configmaps/"), name.strip_prefix("secrets/")) {
                (Some(name), _) => ("configMap", name),
                (None, Some(name)) => ("secret", name),
                (None, None) => ("secret", name),
            };
            return Ok(KeySource { kind, name: name.to_owned(), key: MASTER_KEY.to_owned() });
        }
        Some(Err(())) => {
            return Err(format!("{KUBERNETES_SECRET_NAME_ENV} is not a literal value the webhook can read"));
        }
        _ => {}
    }
    mounted_keys(spec, container).ok_or_else(|| {
        format!(
            "the Kubernetes key store names no object ({KUBERNETES_SECRET_NAME_ENV}) and no Secret or \
             ConfigMap is mounted at {MOUNTED_KEYS_DIR} with a {MASTER_KEY} key"
        )
    })
}

/// The Secret or ConfigMap volume mounted at [`MOUNTED_KEYS_DIR`], and its key that becomes
/// the file `host.master` (`items` remap keys to paths; without them every key is a file).
fn mounted_keys(spec: &serde_json::Map<String, Value>, container: &Value) -> Option<KeySource> {
    let mount = container.get("volumeMounts")?.as_array()?.iter().find(|mount| {
        let path = mount.get("mountPath").and_then(Value::as_str).unwrap_or_default();
        path.trim_end_matches('/') == MOUNTED_KEYS_DIR
            && mount.get("subPath").and_then(Value::as_str).is_none_or(str::is_empty)
    })?;
    let name = mount.get("name").and_then(Value::as_str)?;
    let volume = spec
        .get("volumes")?
        .as_array()?
        .iter()
        .find(|volume| volume.get("name").and_then(Value::as_str) == Some(name))?;
    let (kind, source, object) = if let Some(source) = volume.get("secret") {
        ("secret", source, source.get("secretName"))
    } else if let Some(source) = volume.get("configMap") {
        ("configMap", source, source.get("name"))
    } else {
        return None;
    };
    let object = object.and_then(Value::as_str).filter(|name| !name.is_empty())?;
    let key = match source.get("items").and_then(Value::as_array) {
        None => MASTER_KEY,
        Some(items) => items
            .iter()
            .find(|item| item.get("path").and_then(Value::as_str) == Some(MASTER_KEY))?
            .get("key")
            .and_then(Value::as_str)?,
    };
    Some(KeySource { kind, name: object.to_owned(), key: key.to_owned() })
}

/// The sidecar's volume with the master key only (`optional`: a store the host has not
/// written its key to yet must not keep the pod from starting; the sidecar reads the file
/// at each drain, and the kubelet refreshes such a volume as the object changes).
pub(super) fn key_volume(key: &KeySource) -> Value {
    let name_field = if key.kind == "secret" { "secretName" } else { "name" };
    json!({
        "name": HOST_KEY_VOLUME,
        key.kind: {name_field: key.name, "optional": true, "items": [{"key": key.key, "path": MASTER_KEY}]},
    })
}

/// The app container's preStop hook: the sidecar's `/drain` with the pod's token. The port is
/// a number: a named port would be looked up in the app container's own ports
/// (`resolvePort` in kubernetes `pkg/kubelet/lifecycle/handlers.go`).
pub(super) fn hook(sidecar_port: u16, token: &str) -> Value {
    json!({"httpGet": {
        "path": DRAIN_PATH,
        "port": sidecar_port,
        "scheme": "HTTP",
        "httpHeaders": [{"name": DRAIN_TOKEN_HEADER, "value": token}],
    }})
}

/// The app's function timeout in whole seconds: its `AzureFunctionsJobHost__functionTimeout`
/// (a .NET TimeSpan, `[-][d.]hh:mm[:ss[.fffffff]]` or whole days), else upstream's default.
fn function_timeout(container: &Value, warnings: &mut Vec<String>) -> u64 {
    let default = DEFAULT_FUNCTION_TIMEOUT.as_secs();
    let Some(value) = literal(container, FUNCTION_TIMEOUT_ENV, Naming::DotnetConfiguration) else {
        return default;
    };
    let parsed =
        value.ok().map(str::trim).and_then(|text| parse_timespan(text).map(|seconds| (text, seconds)));
    match parsed {
        Some((_, seconds)) if seconds > 0 => seconds as u64,
        Some((text, _)) => {
            warnings.push(format!(
                "durable-scaler: {FUNCTION_TIMEOUT_ENV}={text:?} is unbounded; the drain waits for the \
                 default {} s (set durable-scaler.io/termination-grace-period-seconds for longer)",
                default
            ));
            default
        }
        None => {
            warnings.push(format!(
                "durable-scaler: {FUNCTION_TIMEOUT_ENV} is not a time span the webhook can read; the drain \
                 waits for the default {default} s"
            ));
            default
        }
    }
}

/// Seconds of a .NET `TimeSpan.Parse` text (`[-][d.]hh:mm[:ss[.fraction]]`, or whole days),
/// fractions dropped; negative for a negative span.
pub(super) fn parse_timespan(text: &str) -> Option<i64> {
    let (sign, text) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text),
    };
    let number = |part: &str| -> Option<i64> {
        (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())).then(|| part.parse().ok()).flatten()
    };
    if !text.contains(':') {
        return number(text).map(|days| sign * days * 86_400);
    }
    let mut parts = text.split(':');
    let first = parts.next()?;
    let (days, hours) = match first.split_once('.') {
        Some((days, hours)) => (number(days)?, number(hours)?),
        None => (0, number(first)?),
    };
    let minutes = number(parts.next()?)?;
    let seconds = match parts.next() {
        None => 0,
        Some(seconds) => number(seconds.split_once('.').map_or(seconds, |(whole, _)| whole))?,
    };
    if parts.next().is_some() || hours > 23 || minutes > 59 || seconds > 59 {
        return None;
    }
    Some(sign * (((days * 24 + hours) * 60 + minutes) * 60 + seconds))
}

/// 32 random bytes in hex: the pod's drain token.
fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Functions host's drain switch (azure-functions-host
/// `src/WebJobs.Script/Environment/EnvironmentSettingNames.cs`, `DrainOnApplicationStopping`).
pub(super) const DRAIN_ENV: &str = "FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING";
/// The shortest grace period a draining pod gets: what the host waits for on SIGTERM (25 s,
/// module docs) and 5 s to flush and exit.
pub(super) const DRAIN_GRACE_SECONDS: u64 = 30;
/// What the API server fills in when a pod names no grace period (`DefaultTerminationGracePeriodSeconds`).
const API_DEFAULT_GRACE_SECONDS: u64 = 30;

/// Adds to `patch` the drain variable (unless the app sets it, or an `envFrom` source may),
/// the preStop hook (with `pre_stop`) and the grace period `grace` ([`final_grace`], decided
/// once for the pod; a warning when `annotation` asked for less than the pod's own); returns
/// what was done, for the status annotation.
pub(super) fn plan(
    spec: &serde_json::Map<String, Value>,
    app: &App<'_>,
    annotation: Option<u64>,
    pre_stop: &Result<PreStop, String>,
    grace: u64,
    patch: &mut Vec<Value>,
    warnings: &mut Vec<String>,
) -> Value {
    let mut status = serde_json::Map::new();
    let container_path = format!("/spec/containers/{}", app.index);
    match pre_stop {
        Ok(pre_stop) => {
            let hook = hook(pre_stop.sidecar_port, &pre_stop.token);
            if app.container.get("lifecycle").is_some_and(Value::is_object) {
                patch.push(patch::add(&format!("{container_path}/lifecycle/preStop"), hook));
            } else {
                patch.push(patch::add(&format!("{container_path}/lifecycle"), json!({"preStop": hook})));
            }
            status.insert(
                "preStop".to_owned(),
                json!(format!(
                    "GET {DRAIN_PATH} on the sidecar: drains the host (port {}) with {} from {} {}, \
                     until nothing runs",
                    pre_stop.app_port, pre_stop.key.key, pre_stop.key.kind, pre_stop.key.name
                )),
            );
        }
        Err(why) => {
            status.insert("preStop".to_owned(), json!(format!("none: {why}")));
        }
    }
    let env_is_a_list = app.container.get("env").is_none_or(Value::is_array);
    if !env_is_a_list {
        // Not a pod the API server would take; leave what it has alone.
        status.insert("env".to_owned(), json!("not changed: the app container's env is not a list"));
    } else if app_may_set(app.container) {
        status.insert("env".to_owned(), json!(format!("{DRAIN_ENV} left as the app sets it")));
    } else {
        let entry = json!({"name": DRAIN_ENV, "value": "true"});
        match app.container.as_object() {
            Some(container) => patch::append(patch, container, &container_path, "env", entry),
            None => return json!("not changed: the app container is not an object"),
        }
        status.insert("env".to_owned(), json!(format!("{DRAIN_ENV}=true added")));
    }
    let own = match spec.get("terminationGracePeriodSeconds") {
        None => None,
        Some(seconds) => match seconds.as_u64() {
            Some(seconds) => Some(seconds),
            None => {
                status.insert(
                    "terminationGracePeriodSeconds".to_owned(),
                    json!("not changed: the pod's is not a number of seconds"),
                );
                return Value::Object(status);
            }
        },
    };
    let current = own.unwrap_or(API_DEFAULT_GRACE_SECONDS);
    if let Some(asked) = annotation.filter(|asked| *asked < current) {
        warnings.push(format!(
            "durable-scaler: the grace period asked for ({asked} s) is below the pod's own ({current} s); \
             keeping {current} s"
        ));
    }
    if grace > current || own.is_none() {
        patch.push(patch::add("/spec/terminationGracePeriodSeconds", json!(grace)));
        status.insert("terminationGracePeriodSeconds".to_owned(), json!(format!("{current} -> {grace}")));
    } else {
        status.insert("terminationGracePeriodSeconds".to_owned(), json!(format!("{current} kept")));
    }
    Value::Object(status)
}

/// The grace period a draining pod asks for: the annotation's, else the function timeout and
/// [`DRAIN_GRACE_MARGIN`] with a preStop drain, else [`DRAIN_GRACE_SECONDS`].
fn wanted_grace(annotation: Option<u64>, pre_stop: Option<&PreStop>) -> u64 {
    annotation.unwrap_or_else(|| match pre_stop {
        // A day at most, as the annotation: a pod that cannot be stopped for days blocks node drains.
        Some(pre_stop) => (pre_stop.function_timeout + DRAIN_GRACE_MARGIN.as_secs())
            .min(super::annotations::MAX_GRACE_SECONDS),
        None => DRAIN_GRACE_SECONDS,
    })
}

/// How long the sidecar's `/drain` waits for the host in a pod of `grace_seconds`.
pub(super) fn drain_wait(grace_seconds: u64) -> u64 {
    grace_seconds.saturating_sub(DRAIN_WAIT_MARGIN_SECONDS).max(1)
}

/// The grace period the pod will have once [`plan`] ran (with `drain` on) or as it stands
/// (off): what a plain-container sidecar may spend waiting for the app after SIGTERM.
pub(super) fn final_grace(
    spec: &serde_json::Map<String, Value>,
    drain: bool,
    annotation: Option<u64>,
    pre_stop: Option<&PreStop>,
) -> u64 {
    let own = spec.get("terminationGracePeriodSeconds").map(Value::as_u64);
    let current = match own {
        None => API_DEFAULT_GRACE_SECONDS,
        Some(Some(seconds)) => seconds,
        // Not a number: plan leaves it alone, and the API server will refuse the pod anyway.
        Some(None) => return API_DEFAULT_GRACE_SECONDS,
    };
    if drain { wanted_grace(annotation, pre_stop).max(current) } else { current }
}

/// True when the app container sets [`DRAIN_ENV`] itself (an `env` entry, even an empty
/// one) or an `envFrom` source may (its prefix fits the name; the webhook cannot see the
/// source's keys). The host reads it with `Environment.GetEnvironmentVariable`, so by its
/// exact name.
fn app_may_set(container: &Value) -> bool {
    let in_env = container
        .get("env")
        .and_then(Value::as_array)
        .is_some_and(|env| env.iter().any(|e| e.get("name").and_then(Value::as_str) == Some(DRAIN_ENV)));
    let in_env_from = container.get("envFrom").and_then(Value::as_array).is_some_and(|sources| {
        sources.iter().any(|source| {
            let prefix = source.get("prefix").and_then(Value::as_str).unwrap_or_default();
            DRAIN_ENV.starts_with(prefix)
        })
    });
    in_env || in_env_from
}
