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
//! So the variable is set explicitly (it is what the host documents, and it keeps drain on
//! should the Kubernetes rule ever change), and the grace period is at least
//! [`DRAIN_GRACE_SECONDS`]: upstream's 25 s and 5 s for the process to flush and exit, which
//! equals Kubernetes' default; a pod whose own grace is shorter gets it raised, a longer one is
//! kept.

use serde_json::{Value, json};

use super::eligibility::App;
use super::patch;

/// The Functions host's drain switch (azure-functions-host
/// `src/WebJobs.Script/Environment/EnvironmentSettingNames.cs`, `DrainOnApplicationStopping`).
pub(super) const DRAIN_ENV: &str = "FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING";
/// The shortest grace period a draining pod gets: what the host waits for on SIGTERM (25 s,
/// module docs) and 5 s to flush and exit.
pub(super) const DRAIN_GRACE_SECONDS: u64 = 30;
/// What the API server fills in when a pod names no grace period (`DefaultTerminationGracePeriodSeconds`).
const API_DEFAULT_GRACE_SECONDS: u64 = 30;

/// Adds to `patch` the drain variable (unless the app sets it, or an `envFrom` source may) and
/// the grace period (`annotation`, else [`DRAIN_GRACE_SECONDS`], never below the pod's own);
/// returns what was done, for the status annotation.
pub(super) fn plan(
    spec: &serde_json::Map<String, Value>,
    app: &App<'_>,
    annotation: Option<u64>,
    patch: &mut Vec<Value>,
    warnings: &mut Vec<String>,
) -> Value {
    let mut status = serde_json::Map::new();
    let env_is_a_list = app.container.get("env").is_none_or(Value::is_array);
    if !env_is_a_list {
        // Not a pod the API server would take; leave what it has alone.
        status.insert("env".to_owned(), json!("not changed: the app container's env is not a list"));
    } else if app_may_set(app.container) {
        status.insert("env".to_owned(), json!(format!("{DRAIN_ENV} left as the app sets it")));
    } else {
        let entry = json!({"name": DRAIN_ENV, "value": "true"});
        let container_path = format!("/spec/containers/{}", app.index);
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
    let wanted = annotation.unwrap_or(DRAIN_GRACE_SECONDS);
    let current = own.unwrap_or(API_DEFAULT_GRACE_SECONDS);
    if let Some(asked) = annotation.filter(|asked| *asked < current) {
        warnings.push(format!(
            "durable-scaler: the grace period asked for ({asked} s) is below the pod's own ({current} s); \
             keeping {current} s"
        ));
    }
    if wanted > current || own.is_none() {
        let grace = wanted.max(current);
        patch.push(patch::add("/spec/terminationGracePeriodSeconds", json!(grace)));
        status.insert("terminationGracePeriodSeconds".to_owned(), json!(format!("{current} -> {grace}")));
    } else {
        status.insert("terminationGracePeriodSeconds".to_owned(), json!(format!("{current} kept")));
    }
    Value::Object(status)
}

/// The grace period the pod will have once [`plan`] ran (with `drain` on) or as it stands
/// (off): what a plain-container sidecar may spend waiting for the app after SIGTERM.
pub(super) fn final_grace(
    spec: &serde_json::Map<String, Value>,
    drain: bool,
    annotation: Option<u64>,
) -> u64 {
    let own = spec.get("terminationGracePeriodSeconds").map(Value::as_u64);
    let current = match own {
        None => API_DEFAULT_GRACE_SECONDS,
        Some(Some(seconds)) => seconds,
        // Not a number: plan leaves it alone, and the API server will refuse the pod anyway.
        Some(None) => return API_DEFAULT_GRACE_SECONDS,
    };
    if drain { annotation.unwrap_or(DRAIN_GRACE_SECONDS).max(current) } else { current }
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
