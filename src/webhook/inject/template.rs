//! The sidecar template: the container the webhook adds (image, env, probe, hardening), the
//! token volume it mounts, and the status annotation that records what was added.

use serde_json::{Value, json};

use super::InjectionSettings;
use super::eligibility::App;
use super::kubelet_env::{Naming, definitions, env_entry, is_optional_reference, renamed_env, spellings};
use crate::contract::{
    CONTROL_QUEUE_BUFFER_THRESHOLD_ENV, CONTROL_QUEUE_VISIBILITY_TIMEOUT_ENV, DEFAULT_TASK_HUB, HUB_NAME_ENV,
    MAX_ACTIVITIES_ENV, MAX_ORCHESTRATIONS_ENV, MAX_QUEUE_POLLING_INTERVAL_ENV, SIDECAR_CONTAINER,
    SIDECAR_HTTP_PORT, TASK_HUB_ANNOTATION, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS,
    TOKEN_FILE_NAME, TOKEN_VOLUME, TaskHub, WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT_ENV, env,
};

/// The volume holding the aggregator's CA when it comes from a Secret in the pod's namespace.
pub(super) const CA_VOLUME: &str = "durable-scaler-aggregator-ca";
/// Where [`CA_VOLUME`] is mounted in the sidecar.
const CA_DIR: &str = "/var/run/secrets/durable-scaler-aggregator-ca";
/// The Secret key (and file) holding the CA, as certs-gen writes it and KEDA's
/// TriggerAuthentication reads it.
const CA_KEY: &str = "ca.crt";
/// How far above [`SIDECAR_HTTP_PORT`] a free port is looked for.
const PORT_SEARCH: u16 = 100;

/// Where the sidecar's CA for an https aggregator comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CaSource<'a> {
    /// An http aggregator: no CA.
    None,
    /// The PEM given inline (`--sidecar-aggregator-ca` without a Secret name): it shows on
    /// many lines in `kubectl describe pod`.
    Inline(&'a str),
    /// Key `ca.crt` of this Secret in the pod's namespace, mounted as a file.
    Secret(&'a str),
}

/// The variable the Durable Functions extension takes its default hub name from.
pub(super) const SITE_NAME_ENV: &str = "WEBSITE_SITE_NAME";

/// The app's settings the sidecar reports, and the sidecar variable each is copied to.
const APP_SETTINGS: [(&str, &str); 6] = [
    (MAX_ACTIVITIES_ENV, env::APP_MAX_ACTIVITIES),
    (MAX_ORCHESTRATIONS_ENV, env::APP_MAX_ORCHESTRATIONS),
    (CONTROL_QUEUE_VISIBILITY_TIMEOUT_ENV, env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT),
    (WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT_ENV, env::APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT),
    (CONTROL_QUEUE_BUFFER_THRESHOLD_ENV, env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD),
    (MAX_QUEUE_POLLING_INTERVAL_ENV, env::APP_MAX_QUEUE_POLLING_INTERVAL),
];

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
    /// The image.
    pub(super) image: &'a str,
    /// `RUST_LOG`, when the pod sets one.
    pub(super) log_level: Option<&'a str>,
    /// The HTTP port (`/healthz`, `/metrics`), one the app does not use ([`free_port`]).
    pub(super) port: u16,
    /// The aggregator's CA.
    pub(super) ca: CaSource<'a>,
    /// For a plain-container sidecar: how it outlives the app ([`AppExit`]); `None` for a
    /// native sidecar, which Kubernetes stops after the app.
    pub(super) app_exit: Option<AppExit>,
    /// The preStop drain the sidecar serves ([`HostDrain`]), if the app gets one.
    pub(super) host_drain: Option<HostDrain<'a>>,
}

/// What the sidecar's `/drain` needs (src/sidecar/drain.rs; the master key comes from the
/// volume [`super::drain::key_volume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HostDrain<'a> {
    /// The host's port on the pod.
    pub(super) app_port: u16,
    /// The pod's drain token.
    pub(super) token: &'a str,
    /// How long `/drain` waits for the host.
    pub(super) wait_seconds: u64,
}

/// What a plain-container sidecar needs to stay until its app stopped (src/sidecar/stop.rs):
/// the app's port, and how long it may wait after SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AppExit {
    /// The app container's first TCP `containerPort`, if it declares one.
    pub(super) port: Option<u16>,
    /// The pod's grace period less [`LEAVING_MARGIN_SECONDS`] (at least 1 s).
    pub(super) wait_seconds: u64,
}

/// What a sidecar keeps of the grace period to send its `leaving` report (at most about
/// 1.5 s) before the kubelet's SIGKILL.
pub(super) const LEAVING_MARGIN_SECONDS: u64 = 3;

impl AppExit {
    /// For `app` in a pod whose grace period will be `grace_seconds`.
    pub(super) fn of(app: &Value, grace_seconds: u64) -> Self {
        Self {
            port: app_port(app),
            wait_seconds: grace_seconds.saturating_sub(LEAVING_MARGIN_SECONDS).max(1),
        }
    }
}

/// The app container's first TCP `containerPort` (protocol TCP is the default): the Functions
/// host listens there (Kestrel, `ASPNETCORE_URLS`; the official images' `http://+:80`).
pub(super) fn app_port(app: &Value) -> Option<u16> {
    app.get("ports")?.as_array()?.iter().find_map(|port| {
        let tcp = port.get("protocol").and_then(Value::as_str).is_none_or(|p| p == "TCP");
        let number = port.get("containerPort").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok());
        number.filter(|n| tcp && *n > 0)
    })
}

/// The sidecar container; `None` only if the task hub's definitions, never empty, are (the
/// caller skips the pod rather than panic).
pub(super) fn container(sidecar: Sidecar<'_>, warnings: &mut Vec<String>) -> Option<Value> {
    let mut task_hub = sidecar.task_hub.into_iter();
    let mut connection = sidecar.app.connection.iter();
    let mut env = vec![task_hub.next()?];
    if let Some(first) = connection.next() {
        env.push(renamed_env(env::CONNECTION, first));
    }
    env.extend([
        json!({"name": env::AGGREGATOR, "value": url_text(sidecar.aggregator)}),
        json!({"name": env::POD_NAME, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
        json!({"name": env::POD_NAMESPACE, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}}),
    ]);
    // Further definitions of the same two names, after the first ones and in the kubelet's
    // order (see `definitions`): each later one that resolves replaces the value.
    env.extend(task_hub);
    env.extend(connection.map(|definition| renamed_env(env::CONNECTION, definition)));
    for (ours, definitions) in &sidecar.app.identity {
        env.extend(definitions.iter().map(|definition| renamed_env(ours, definition)));
    }
    let identity_mount = if sidecar.app.identity.is_empty() {
        None
    } else {
        let (copies, mount) = workload_identity(sidecar.app.container);
        env.extend(copies);
        mount
    };
    let mut mounts = vec![json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true})];
    mounts.extend(identity_mount);
    match sidecar.ca {
        CaSource::None => {}
        CaSource::Inline(pem) => env.push(json!({"name": env::AGGREGATOR_CA, "value": pem})),
        CaSource::Secret(_) => {
            env.push(json!({"name": env::AGGREGATOR_CA, "value": format!("{CA_DIR}/{CA_KEY}")}));
            mounts.push(json!({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": true}));
        }
    }
    env.extend(limit_env(sidecar.app.container, sidecar.app.name, warnings));
    if sidecar.port != SIDECAR_HTTP_PORT {
        env.push(json!({"name": env::HTTP_ADDR, "value": format!("0.0.0.0:{}", sidecar.port)}));
    }
    if let Some(exit) = sidecar.app_exit {
        if let Some(port) = exit.port {
            env.push(json!({"name": env::APP_PORT, "value": port.to_string()}));
        }
        env.push(json!({"name": env::APP_EXIT_WAIT, "value": format!("{}s", exit.wait_seconds)}));
    }
    if let Some(drain) = sidecar.host_drain {
        use super::drain::{HOST_KEY_DIR, HOST_KEY_VOLUME, MASTER_KEY};
        env.extend([
            json!({"name": env::HOST_URL, "value": format!("http://127.0.0.1:{}", drain.app_port)}),
            json!({"name": env::HOST_KEY_FILE, "value": format!("{HOST_KEY_DIR}/{MASTER_KEY}")}),
            json!({"name": env::DRAIN_TOKEN, "value": drain.token}),
            json!({"name": env::DRAIN_WAIT, "value": format!("{}s", drain.wait_seconds)}),
        ]);
        mounts.push(json!({"name": HOST_KEY_VOLUME, "mountPath": HOST_KEY_DIR, "readOnly": true}));
    }
    if let Some(level) = sidecar.log_level {
        env.push(json!({"name": "RUST_LOG", "value": level}));
    }

    let mut container = json!({
        "name": SIDECAR_CONTAINER,
        "image": sidecar.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["sidecar"],
        "env": env,
        "resources": sidecar.resources,
        // Liveness only: a readiness probe on a sidecar would take the app out of its Service
        // whenever the sidecar (not the app) is unwell.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": sidecar.port, "scheme": "HTTP"},
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
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if sidecar.native {
        container["restartPolicy"] = json!("Always");
    }
    Some(container)
}

/// The variables the AKS workload identity webhook gives each container it mutates
/// (Azure/azure-workload-identity `pkg/webhook/consts.go`; `webhook.go`
/// `addEnvironmentVariables`), which Azure's `WorkloadIdentityCredential` reads. Its
/// `AZURE_KUBERNETES_*` variables (a custom token endpoint, one a multi-line PEM) are left
/// out: the sidecar's credential does not use them.
const WORKLOAD_IDENTITY_ENV: [&str; 4] =
    ["AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST"];

/// The app container's workload identity, for a sidecar that reads storage as the app does:
/// copies of its [`WORKLOAD_IDENTITY_ENV`] entries, and the mount of the projected token
/// volume that holds `AZURE_FEDERATED_TOKEN_FILE` (its name and path as the app has them:
/// the webhook names the volume per pod, `addProjectedVolumeMount`).
///
/// The workload identity webhook may have run before this one, and then the app container
/// has them and the sidecar gets copies; or after it, or again on reinvocation (its
/// configuration says `reinvocationPolicy: IfNeeded`, `deploy/azure-wi-webhook.yaml`), and then
/// it mutates the sidecar like every other container, adding only what is not there yet.
fn workload_identity(app: &Value) -> (Vec<Value>, Option<Value>) {
    let copies: Vec<Value> =
        WORKLOAD_IDENTITY_ENV.iter().filter_map(|name| env_entry(app, name)).cloned().collect();
    let token_file =
        env_entry(app, "AZURE_FEDERATED_TOKEN_FILE").and_then(|e| e.get("value")).and_then(Value::as_str);
    // The most specific mount holding the file is the one the file lives on.
    let mount = token_file.and_then(|file| {
        app.get("volumeMounts")
            .and_then(Value::as_array)?
            .iter()
            .filter_map(|m| {
                let path = m.get("mountPath").and_then(Value::as_str)?;
                let name = m.get("name").and_then(Value::as_str)?;
                file.starts_with(&format!("{}/", path.trim_end_matches('/'))).then_some((path, name))
            })
            .max_by_key(|(path, _)| path.len())
            .map(|(path, name)| json!({"name": name, "mountPath": path, "readOnly": true}))
    });
    (copies, mount)
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

/// The Secret volume with the aggregator's CA (key `ca.crt` only). Not optional: without
/// it the sidecar could not verify the aggregator and would not start, and a pod waiting
/// for a missing Secret says so in `kubectl describe pod` (the same Secret KEDA's
/// TriggerAuthentication reads in that namespace).
pub(super) fn ca_volume(secret: &str) -> Value {
    json!({
        "name": CA_VOLUME,
        "secret": {"secretName": secret, "items": [{"key": CA_KEY, "path": CA_KEY}]},
    })
}

/// The first port from [`SIDECAR_HTTP_PORT`] up that no container or init container of the
/// pod declares (`containerPort` or `hostPort`): containers of a pod share one network
/// namespace, so the sidecar must not listen where the app does. An app listening on a port
/// it does not declare cannot be seen.
pub(super) fn free_port(spec: &serde_json::Map<String, Value>) -> Option<u16> {
    let used: std::collections::BTreeSet<u64> = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| spec.get(*list).and_then(Value::as_array).into_iter().flatten())
        .flat_map(|c| c.get("ports").and_then(Value::as_array).into_iter().flatten())
        .flat_map(|p| ["containerPort", "hostPort"].map(|key| p.get(key).and_then(Value::as_u64)))
        .flatten()
        .collect();
    (SIDECAR_HTTP_PORT..SIDECAR_HTTP_PORT.saturating_add(PORT_SEARCH))
        .find(|port| !used.contains(&u64::from(*port)))
}

/// The status annotation's value: what was injected, how, by which version, and what else
/// of the pod was changed (`changes`).
pub(super) fn status(
    settings: &InjectionSettings,
    native: bool,
    mode_reason: &str,
    volumes: &[&str],
    changes: serde_json::Map<String, Value>,
) -> Value {
    let mut status = json!({
        "version": settings.version,
        "containers": [SIDECAR_CONTAINER],
        "volumes": volumes,
        "mode": if native { "native-sidecar" } else { "container" },
        "modeReason": mode_reason,
    });
    if let Some(object) = status.as_object_mut() {
        object.extend(changes);
    }
    status
}

/// `DURABLE_SCALER_TASK_HUB`'s definitions: the annotation, else the app's hub-name setting
/// (matched as .NET configuration reads it, [`Naming::DotnetConfiguration`]; copied as it
/// stands, `valueFrom` and `envFrom` too; the extension's default first when only optional
/// sources may set it), else the extension's default ([`default_hub`]) with a warning. A
/// name the sidecar would refuse (the same [`TaskHub`] rule; the sidecar exits at start on
/// it) is an error: the pod is not injected, and so is a default the webhook cannot know.
pub(super) fn task_hub_env(
    annotation: Option<&str>,
    app: &Value,
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>, HubError> {
    const NAME: &str = env::TASK_HUB;
    let invalid = |source: &str, e: crate::contract::InvalidTaskHubName| {
        HubError::Invalid(format!(
            "durable-scaler: {source}: {e}; the sidecar would refuse it; sidecar not injected"
        ))
    };
    if let Some(hub) = annotation {
        let hub =
            TaskHub::parse(hub).map_err(|e| invalid(&format!("annotation {TASK_HUB_ANNOTATION}"), e))?;
        return Ok(vec![json!({"name": NAME, "value": hub.name()})]);
    }
    let default = default_hub(app);
    let Some(found) = definitions(app, HUB_NAME_ENV, Naming::DotnetConfiguration) else {
        let default = default?;
        TaskHub::parse(&default.name).map_err(|e| invalid(&default.source, e))?;
        warnings.push(format!(
            "durable-scaler: no task hub named (annotation {TASK_HUB_ANNOTATION} or env {HUB_NAME_ENV}); \
             assuming the Durable Functions default {} ({})",
            default.name, default.source
        ));
        return Ok(vec![json!({"name": NAME, "value": default.name})]);
    };
    warn_on_spellings(app, HUB_NAME_ENV, warnings);
    let mut copies = Vec::new();
    for definition in &found {
        match definition.get("value").and_then(Value::as_str) {
            Some(literal) => {
                // A configured name equal to the default (ignoring case) is sanitised like the
                // default rather than validated (azure-functions-durable-extension
                // `AzureStorageDurabilityProviderFactory.EnsureDefaultClientSettingsInitialized`,
                // `DurableTaskOptions.IsDefaultHubName`).
                let hub = match &default {
                    Ok(default) if default.raw.eq_ignore_ascii_case(literal) => default.name.clone(),
                    _ => literal.to_owned(),
                };
                TaskHub::parse(&hub).map_err(|e| invalid(&format!("env {HUB_NAME_ENV}"), e))?;
                copies.push(json!({"name": NAME, "value": hub}));
            }
            None => copies.push(renamed_env(NAME, definition)),
        }
    }
    if found.first().is_some_and(|d| !is_optional_reference(d)) {
        return Ok(copies);
    }
    let default = default?;
    TaskHub::parse(&default.name).map_err(|e| invalid(&default.source, e))?;
    Ok(std::iter::once(json!({"name": NAME, "value": default.name})).chain(copies).collect())
}

/// Why no sidecar env for the task hub could be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HubError {
    /// A name the sidecar would refuse; the warning says which and where from.
    Invalid(String),
    /// The hub is the extension's default, which the webhook cannot compute.
    Unknown(String),
}

/// The extension's default hub: the raw value it starts from, the sanitised name it uses and
/// where it came from, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DefaultHub {
    raw: String,
    name: String,
    source: String,
}

/// The Durable Functions extension's default task hub for this app: `WEBSITE_SITE_NAME` when
/// set (read with `Environment.GetEnvironmentVariable`, so by its exact name), sanitised
/// ([`sanitized_hub_name`]), else `TestHubName` (azure-functions-durable-extension
/// `src/WebJobs.Extensions.DurableTask/Options/DurableTaskOptions.cs`, `HubName`'s getter).
///
/// Only the app container's `env` is read for it: a literal is sanitised here; a reference
/// (`valueFrom`) the webhook cannot resolve, and since the sanitised name cannot be built by
/// the kubelet, such an app must name its hub. `envFrom` sources are taken not to set
/// `WEBSITE_SITE_NAME` (the webhook cannot see their keys; on Kubernetes the variable is set by
/// hand, if at all).
pub(super) fn default_hub(app: &Value) -> Result<DefaultHub, HubError> {
    let entries: Vec<&Value> = app
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("name").and_then(Value::as_str) == Some(SITE_NAME_ENV))
        .filter(|e| e.get("value").is_some() || e.get("valueFrom").is_some())
        .collect();
    let Some(last) = entries.last() else {
        return Ok(DefaultHub {
            raw: DEFAULT_TASK_HUB.to_owned(),
            name: DEFAULT_TASK_HUB.to_owned(),
            source: format!("no {SITE_NAME_ENV} in the app container"),
        });
    };
    match last.get("value").and_then(Value::as_str) {
        Some(site) => Ok(DefaultHub {
            raw: site.to_owned(),
            name: sanitized_hub_name(site),
            source: format!("{SITE_NAME_ENV}={site:?}, sanitised as the extension does"),
        }),
        None => Err(HubError::Unknown(format!(
            "durable-scaler: the task hub is the Durable Functions default, the sanitised value of \
             {SITE_NAME_ENV}, which the app sets from a reference the webhook cannot read; name the \
             hub with annotation {TASK_HUB_ANNOTATION}; sidecar not injected"
        ))),
    }
}

/// The extension's sanitising of a default hub name (azure-functions-durable-extension
/// `src/WebJobs.Extensions.DurableTask/Options/AzureStorageOptions.cs`, `IsSanitizedHubName`):
/// keep the letters and digits (`char.IsLetterOrDigit`), put `t` before a leading digit, keep
/// the first 45 characters, pad a name shorter than 3 with `Hub`; nothing left gives
/// `DefaultTaskHub`. Upstream's test cases (`TaskHubName_DefaultHubName_UseSanitized`) are
/// this function's unit tests. Non-ASCII letters are kept as upstream keeps them; the
/// [`TaskHub`] rule then refuses the name, as storage would.
pub(super) fn sanitized_hub_name(site_name: &str) -> String {
    const MAX: usize = 45;
    let mut kept: Vec<char> = site_name.chars().filter(|c| c.is_alphanumeric()).collect();
    let Some(first) = kept.first() else { return "DefaultTaskHub".to_owned() };
    if first.is_numeric() {
        kept.insert(0, 't');
    }
    let mut name: String = kept.into_iter().take(MAX).collect();
    if name.chars().count() < TaskHub::MIN_LEN {
        name.push_str("Hub");
    }
    name
}

/// Warns when the app spells `setting` more than one way: .NET then takes one of them in an
/// order it does not define, and the sidecar may see another.
fn warn_on_spellings(app: &Value, setting: &str, warnings: &mut Vec<String>) {
    let spelled = spellings(app, setting, Naming::DotnetConfiguration);
    if spelled.len() > 1 {
        warnings.push(format!(
            "durable-scaler: the app container sets {setting} under {} spellings ({}); .NET reads \
             them in no defined order, so the sidecar may see another value than the app",
            spelled.len(),
            spelled.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
}

/// What decides the app's per-pod limits, for the sidecar to report: the app container's CPU
/// limit through the downward API, and the app's own settings ([`APP_SETTINGS`]: the two
/// concurrency limits and the four storage-provider settings) copied as they stand (literal
/// or `valueFrom`, and one optional key reference per `envFrom` source, like the
/// connection), matched as .NET configuration reads them ([`Naming::DotnetConfiguration`]).
///
/// Divisor `1` rounds the limit up to whole CPUs, as .NET's `Environment.ProcessorCount` does
/// with a CPU quota; with no CPU limit the kubelet gives the node's allocatable CPUs instead
/// (kubernetes `pkg/kubelet/kubelet_resources.go` `defaultPodLimitsForDownwardAPI`,
/// `pkg/api/v1/resource/helpers.go` `ExtractContainerResourceValue`; research-injectors.md
/// item 4), which is what .NET sees then too. `containerName` points at the app container,
/// since the sidecar's own limit says nothing about the app.
fn limit_env(app: &Value, app_name: &str, warnings: &mut Vec<String>) -> Vec<Value> {
    let mut entries = Vec::new();
    if !app_name.is_empty() {
        entries.push(json!({"name": env::APP_CPUS, "valueFrom": {"resourceFieldRef": {
            "containerName": app_name,
            "resource": "limits.cpu",
            "divisor": "1",
        }}}));
    }
    for (setting, ours) in APP_SETTINGS {
        if let Some(found) = definitions(app, setting, Naming::DotnetConfiguration) {
            warn_on_spellings(app, setting, warnings);
            entries.extend(found.iter().map(|definition| renamed_env(ours, definition)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_name_is_sanitised_as_the_extensions_own_tests_expect() {
        // azure-functions-durable-extension test/Common/DurableTaskEndToEndTests.cs,
        // TaskHubName_DefaultHubName_UseSanitized and TaskHubName_HappyPath.
        for (site, hub) in [
            ("Task-Hub-Name-Test", "TaskHubNameTest"),
            ("1TaskHubNameTest", "t1TaskHubNameTest"),
            ("-taskhubnametest", "taskhubnametest"),
            ("-1taskhubnametest", "t1taskhubnametest"),
            ("--------", "DefaultTaskHub"),
            ("bb", "bbHub"),
            ("TestSiteName", "TestSiteName"),
        ] {
            assert_eq!(sanitized_hub_name(site), hub, "{site}");
        }
        assert_eq!(sanitized_hub_name(&"a".repeat(100)), "a".repeat(45));
    }
}
