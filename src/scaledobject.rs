//! `durable-scaler scaledobject`: a Functions app's Deployment or StatefulSet manifest in
//! (a file or stdin; e.g. what `func kubernetes deploy --dry-run` writes, whose own
//! ScaledObject's triggers are not KEDA scalers: kedacore/keda#5627), out the KEDA
//! ScaledObject that scales it with durable-scaler, the TriggerAuthentication the TLS install
//! needs, and the strategic-merge patch that opts its pod template in.
//!
//! The task hub and the connection variable are what the webhook would find: the pod
//! template is planned by the webhook's own `inject::plan_with` (the same rules for the
//! annotations, the app container, `env` and `envFrom`, and the skips), and the sidecar env
//! it would get is read back. A definition the webhook copies as a reference (a Secret or
//! ConfigMap key) is resolved from the objects in the same input, in the kubelet's order;
//! one whose object is not there needs `--task-hub`. KEDA resolves `connectionFromEnv` from
//! the target's first container unless `envSourceContainerName` names another
//! (kedacore/keda pkg/scaling/resolver/scale_resolvers.go `ResolveContainerEnv`), so that is
//! set when the app container is not the first.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::contract::{
    CONNECTION_ENV_ANNOTATION, DEFAULT_AGGREGATOR_URL, DEFAULT_CONNECTION_ENV, INJECT_LABEL,
    SIDECAR_CONTAINER, TASK_HUB_ANNOTATION, TaskHub, env,
};
use crate::webhook::inject::{self, InjectionSettings, NativeDefault};

/// The annotation `kubectl` and the webhook read to pick a pod's main container.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Settings of `durable-scaler scaledobject`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The manifest (YAML or JSON, several documents or a `List`); `-` or nothing: stdin.
    pub file: Option<PathBuf>,
    /// The Deployment or StatefulSet to scale, when the input holds more than one.
    #[arg(long)]
    pub name: Option<String>,
    /// Its namespace, when the manifest names none.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// The task hub, when the app takes it from a Secret or ConfigMap not in the input.
    #[arg(long)]
    pub task_hub: Option<String>,
    /// The install the app scales with: `default` (TLS: enableTLS and a TriggerAuthentication
    /// with the aggregator's CA) or `plaintext`.
    #[arg(long, value_enum, default_value_t = Install::Default)]
    pub install: Install,
    /// KEDA's `scalerAddress`: the aggregator's Service and KEDA port.
    #[arg(long, default_value = "durable-scaler-aggregator.durable-scaler:4370")]
    pub scaler_address: String,
    /// The Secret in the app's namespace that holds the aggregator's CA as `ca.crt`.
    #[arg(long, default_value = "durable-scaler-aggregator-ca")]
    pub ca_secret: String,
    /// `external-push` (StreamIsActive wakes an app at zero at once) or `external`.
    #[arg(long, value_enum, default_value_t = Trigger::ExternalPush)]
    pub trigger: Trigger,
    /// The ScaledObject's minReplicaCount.
    #[arg(long, default_value_t = 0)]
    pub min_replicas: u32,
    /// The ScaledObject's maxReplicaCount.
    #[arg(long, default_value_t = 10)]
    pub max_replicas: u32,
    /// KEDA's pollingInterval, seconds.
    #[arg(long, default_value_t = 30)]
    pub polling_interval: u32,
    /// KEDA's cooldownPeriod, seconds.
    #[arg(long, default_value_t = 300)]
    pub cooldown_period: u32,
    /// What to print: everything, the objects to apply (ScaledObject, TriggerAuthentication),
    /// or the patch alone.
    #[arg(long, value_enum, default_value_t = Print::All)]
    pub print: Print,
    /// YAML documents, or one JSON document (a `List` under `--print all`).
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
}

/// The durable-scaler install the app's ScaledObject talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Install {
    /// manifests/default: TLS on the KEDA port.
    Default,
    /// manifests/plaintext.
    Plaintext,
}

/// The KEDA trigger type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trigger {
    /// `external-push`.
    ExternalPush,
    /// `external`.
    External,
}

/// What `scaledobject` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Print {
    /// The objects, then the patch.
    All,
    /// The ScaledObject and, for the TLS install, the TriggerAuthentication.
    Objects,
    /// The strategic-merge patch that opts the pod template in.
    Patch,
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// YAML documents.
    Yaml,
    /// JSON.
    Json,
}

/// What `scaledobject` makes of one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The ScaledObject.
    pub scaled_object: Value,
    /// The TriggerAuthentication (TLS install only).
    pub trigger_authentication: Option<Value>,
    /// The strategic-merge patch of the workload that opts its pod template in.
    pub patch: Value,
    /// What the user should know (assumed names, a `replicas` KEDA will fight, a ScaledObject
    /// of the input this one replaces).
    pub notes: Vec<String>,
}

/// Why no ScaledObject could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GenerateError {
    /// The input is not YAML or JSON.
    #[error("the input is not YAML or JSON: {0}")]
    Parse(String),
    /// No Deployment or StatefulSet (of that name).
    #[error("the input holds no apps/v1 Deployment or StatefulSet{}", .0.as_deref().map(|n| format!(" named {n}")).unwrap_or_default())]
    NoWorkload(Option<String>),
    /// Several, and no `--name`.
    #[error("the input holds several workloads ({0}); choose one with --name")]
    Ambiguous(String),
    /// The webhook would not inject the app's pods.
    #[error("the webhook would not inject this app's pods, so durable-scaler could not scale it: {0}")]
    NotInjectable(String),
    /// The task hub comes from somewhere the input does not show.
    #[error(
        "the app takes its task hub from {0}, which the input does not hold: pass --task-hub, or put that object in the input"
    )]
    UnresolvedTaskHub(String),
    /// `--task-hub` is not a name DurableTask would make.
    #[error("--task-hub: {0}")]
    InvalidTaskHub(String),
}

/// The Deployments and StatefulSets, Secrets and ConfigMaps of an input of several documents.
fn documents(text: &str) -> Result<Vec<Value>, GenerateError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| GenerateError::Parse(e.to_string()))?;
    Ok(docs
        .into_iter()
        .flat_map(|d| match d.get("items").and_then(Value::as_array) {
            Some(items) if d["kind"].as_str().is_some_and(|k| k.ends_with("List")) => items.clone(),
            _ => vec![d],
        })
        .filter(|d| d.is_object())
        .collect())
}

fn is_workload(object: &Value) -> bool {
    object["apiVersion"] == "apps/v1" && matches!(object["kind"].as_str(), Some("Deployment" | "StatefulSet"))
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// The value a Secret or ConfigMap of `objects` in `namespace` holds at `key`: `Some(None)`
/// when the object is there without the key, `None` when the object is not in the input.
fn lookup(objects: &[Value], kind: &str, name: &str, namespace: &str, key: &str) -> Option<Option<String>> {
    let object = objects.iter().find(|o| {
        o["kind"] == kind
            && name_of(o) == name
            && o["metadata"]["namespace"].as_str().unwrap_or(namespace) == namespace
    })?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let decoded = |v: &Value| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str()?).ok()?;
        String::from_utf8(bytes).ok()
    };
    Some(match kind {
        "Secret" => {
            object["stringData"].get(key).and_then(text).or_else(|| object["data"].get(key).and_then(decoded))
        }
        _ => object["data"].get(key).and_then(text),
    })
}

/// The value the definitions give in the kubelet's order (each one that resolves replaces
/// the one before; an optional reference whose key is missing is skipped). `Err` names a
/// reference to an object the input does not hold.
fn resolve(definitions: &[&Value], objects: &[Value], namespace: &str) -> Result<Option<String>, String> {
    let mut value = None;
    for definition in definitions {
        if let Some(literal) = definition.get("value").and_then(Value::as_str) {
            value = Some(literal.to_owned());
            continue;
        }
        let reference = [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")]
            .into_iter()
            .find_map(|(field, kind)| definition.pointer(&format!("/valueFrom/{field}")).map(|r| (kind, r)));
        let Some((kind, reference)) = reference else {
            return Err(format!("{definition} (only literals and Secret or ConfigMap keys are read here)"));
        };
        let name = reference["name"].as_str().unwrap_or_default();
        let key = reference["key"].as_str().unwrap_or_default();
        match lookup(objects, kind, name, namespace, key) {
            Some(Some(found)) => value = Some(found),
            Some(None) if reference["optional"] == true => {}
            Some(None) => return Err(format!("{kind} {namespace}/{name}, which has no key {key}")),
            None => return Err(format!("key {key} of {kind} {namespace}/{name}")),
        }
    }
    Ok(value)
}

/// The settings the plan runs with: only the sidecar's env matters here; a plain container
/// (not native) so the plan names the app container in `kubectl.kubernetes.io/default-container`.
fn plan_settings(aggregator: url::Url) -> InjectionSettings {
    InjectionSettings {
        image: crate::webhook::DEFAULT_IMAGE.to_owned(),
        aggregator,
        aggregator_ca: None,
        aggregator_ca_secret: None,
        image_pull_secrets: Vec::new(),
        native_sidecar: false,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Makes the ScaledObject, TriggerAuthentication and patch for the one workload of `text`
/// (or the one named by `args.name`).
pub fn generate(text: &str, args: &Args) -> Result<Generated, GenerateError> {
    let objects = documents(text)?;
    let workloads: Vec<&Value> = objects
        .iter()
        .filter(|o| is_workload(o))
        .filter(|o| args.name.as_deref().is_none_or(|n| n == name_of(o)))
        .collect();
    let workload = match workloads.as_slice() {
        [] => return Err(GenerateError::NoWorkload(args.name.clone())),
        [one] => *one,
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|w| format!("{} {}", w["kind"].as_str().unwrap_or_default(), name_of(w)))
                .collect();
            return Err(GenerateError::Ambiguous(names.join(", ")));
        }
    };
    let name = name_of(workload).to_owned();
    let kind = workload["kind"].as_str().unwrap_or("Deployment").to_owned();
    let mut notes = Vec::new();
    let namespace = match (workload["metadata"]["namespace"].as_str(), &args.namespace) {
        (Some(ns), _) => ns.to_owned(),
        (None, Some(ns)) => ns.clone(),
        (None, None) => {
            notes.push("the manifest names no namespace: `default` assumed (--namespace)".to_owned());
            "default".to_owned()
        }
    };

    // The pod the workload's template makes, planned as the webhook plans it.
    let template = &workload["spec"]["template"];
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "labels": template["metadata"]["labels"], "annotations": template["metadata"]["annotations"]},
        "spec": template["spec"],
    });
    let pod = strip_nulls(pod);
    let aggregator =
        crate::config::parse_http_url(DEFAULT_AGGREGATOR_URL).map_err(GenerateError::NotInjectable)?;
    let plan = inject::plan_with(&pod, &plan_settings(aggregator), &NativeDefault::forced(false));
    if let Some(reason) = plan.skipped {
        return Err(GenerateError::NotInjectable(format!(
            "{}: {}",
            reason.label(),
            plan.warnings.join("; ")
        )));
    }
    let mut injected = pod.clone();
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(plan.patch.clone()))
        .map_err(|e| GenerateError::NotInjectable(format!("the webhook's plan is not a JSON patch: {e}")))?;
    json_patch::patch(&mut injected, &patch)
        .map_err(|e| GenerateError::NotInjectable(format!("the webhook's plan does not apply: {e}")))?;
    let sidecar = injected["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == SIDECAR_CONTAINER))
        .cloned()
        .unwrap_or(Value::Null);
    let sidecar_env: Vec<&Value> = sidecar["env"].as_array().map(|e| e.iter().collect()).unwrap_or_default();
    let named = |wanted: &str| -> Vec<&Value> {
        sidecar_env.iter().copied().filter(|e| e["name"] == wanted).collect()
    };

    let task_hub = match &args.task_hub {
        Some(hub) => {
            TaskHub::parse(hub).map_err(|e| GenerateError::InvalidTaskHub(e.to_string()))?.name().to_owned()
        }
        None => {
            let resolved = resolve(&named(env::TASK_HUB), &objects, &namespace)
                .map_err(GenerateError::UnresolvedTaskHub)?;
            let hub = resolved.unwrap_or_else(|| crate::contract::DEFAULT_TASK_HUB.to_owned());
            TaskHub::parse(&hub).map_err(|e| GenerateError::NotInjectable(e.to_string()))?.name().to_owned()
        }
    };
    notes.extend(plan.warnings.iter().cloned());

    let annotations = &template["metadata"]["annotations"];
    let connection_env =
        annotations[CONNECTION_ENV_ANNOTATION].as_str().unwrap_or(DEFAULT_CONNECTION_ENV).to_owned();
    let app = annotations[DEFAULT_CONTAINER_ANNOTATION]
        .as_str()
        .or_else(|| injected["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION].as_str())
        .unwrap_or_default()
        .to_owned();
    let first = template["spec"]["containers"][0]["name"].as_str().unwrap_or_default();

    let mut scale_target = json!({"name": name});
    if kind == "StatefulSet" {
        scale_target["apiVersion"] = json!("apps/v1");
        scale_target["kind"] = json!("StatefulSet");
    }
    if !app.is_empty() && app != first {
        // KEDA resolves connectionFromEnv from the first container unless told otherwise.
        scale_target["envSourceContainerName"] = json!(app);
    }
    let tls = args.install == Install::Default;
    let mut metadata = BTreeMap::from([
        ("scalerAddress", args.scaler_address.clone()),
        ("taskHubName", task_hub.clone()),
        ("connectionFromEnv", connection_env.clone()),
    ]);
    if tls {
        metadata.insert("enableTLS", "true".to_owned());
    }
    let mut trigger = json!({
        "type": match args.trigger { Trigger::ExternalPush => "external-push", Trigger::External => "external" },
        "metadata": metadata,
    });
    if tls {
        trigger["authenticationRef"] = json!({"name": "durable-scaler-tls"});
    }
    let scaled_object = json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "scaleTargetRef": scale_target,
            "pollingInterval": args.polling_interval,
            "cooldownPeriod": args.cooldown_period,
            "minReplicaCount": args.min_replicas,
            "maxReplicaCount": args.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": scale_in_pace(&template["spec"])}}},
            "triggers": [trigger],
        },
    });
    let trigger_authentication = tls.then(|| {
        json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "durable-scaler-tls", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "caCert", "name": args.ca_secret, "key": "ca.crt"}]},
        })
    });
    let patch = json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"metadata": {
            "labels": {INJECT_LABEL: "true"},
            "annotations": {TASK_HUB_ANNOTATION: task_hub, CONNECTION_ENV_ANNOTATION: connection_env},
        }}},
    });

    if workload["spec"].get("replicas").is_some() {
        notes.push(format!(
            "{kind} {name} sets spec.replicas: KEDA owns the count now; remove it from your manifest, or every apply scales the app back to it"
        ));
    }
    for other in
        objects.iter().filter(|o| o["kind"] == "ScaledObject" && o["apiVersion"] == "keda.sh/v1alpha1")
    {
        if other["spec"]["scaleTargetRef"]["name"] == name.as_str() {
            notes.push(format!(
                "the input's ScaledObject {} scales {name} too; apply this one in its place (two ScaledObjects on one target fight)",
                name_of(other)
            ));
        }
    }
    if tls {
        notes.push(format!(
            "KEDA needs the aggregator's CA in Secret {namespace}/{}: kubectl -n {namespace} create secret generic {} \
             --from-literal=ca.crt=\"$(kubectl -n durable-scaler get secret durable-scaler-aggregator-tls -o jsonpath='{{.data.ca\\.crt}}' | base64 -d)\"",
            args.ca_secret, args.ca_secret
        ));
    }
    Ok(Generated { scaled_object, trigger_authentication, patch, notes })
}

/// `value` without the `null`s a template without labels or annotations would put in.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect(),
        ),
        other => other,
    }
}

/// The output `args.print` and `args.output` ask for.
pub fn render(generated: &Generated, args: &Args) -> Result<String, String> {
    let objects: Vec<&Value> =
        std::iter::once(&generated.scaled_object).chain(generated.trigger_authentication.as_ref()).collect();
    let documents: Vec<&Value> = match args.print {
        Print::All => objects.iter().copied().chain(std::iter::once(&generated.patch)).collect(),
        Print::Objects => objects,
        Print::Patch => vec![&generated.patch],
    };
    if args.output == Format::Json {
        let out = match documents.as_slice() {
            [one] => (*one).clone(),
            many => json!({"apiVersion": "v1", "kind": "List", "items": many}),
        };
        return serde_json::to_string_pretty(&out).map(|s| s + "\n").map_err(|e| e.to_string());
    }
    let mut out = String::new();
    for (i, document) in documents.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        if std::ptr::eq(*document, &generated.patch) {
            out.push_str(&format!(
                "# The patch that opts {name}'s pod template in (not an object to apply):\n\
                 #   kubectl -n {ns} patch {kind} {name} --patch-file PATCH.yaml   (or a kustomize `patches:` entry)\n",
                name = name_of(&generated.patch),
                ns = generated.patch["metadata"]["namespace"].as_str().unwrap_or_default(),
                kind = generated.patch["kind"].as_str().unwrap_or_default().to_lowercase(),
            ));
        }
        let yaml = serde_saphyr::to_string(document).map_err(|e| e.to_string())?;
        out.push_str(yaml.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// Runs `durable-scaler scaledobject`: the output on stdout, the notes on stderr; exit status
/// 2 when no ScaledObject could be made (the message says why).
pub(crate) fn run(args: &Args) -> ExitCode {
    let mut text = String::new();
    let read = match args.file.as_deref().filter(|f| f.as_os_str() != "-") {
        Some(path) => {
            std::fs::read_to_string(path).map(|t| text = t).map_err(|e| format!("{}: {e}", path.display()))
        }
        None => std::io::stdin().read_to_string(&mut text).map(|_| ()).map_err(|e| format!("stdin: {e}")),
    };
    if let Err(e) = read {
        eprintln!("durable-scaler scaledobject: cannot read {e}");
        return ExitCode::from(2);
    }
    let generated = match generate(&text, args) {
        Ok(generated) => generated,
        Err(e) => {
            eprintln!("durable-scaler scaledobject: {e}");
            return ExitCode::from(2);
        }
    };
    match render(&generated, args) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("durable-scaler scaledobject: {e}");
            return ExitCode::FAILURE;
        }
    }
    for note in &generated.notes {
        eprintln!("note: {note}");
    }
    ExitCode::SUCCESS
}

/// The HPA's scale-in pace for a Durable Functions app (docs/scale-in.md, section 5): one pod
/// at a time, each once the last one's partitions are served again: its grace period (the
/// pod's own, at least the 30 s the webhook's drain switch gives it) until it is killed, plus
/// DurableTask.AzureStorage's `LeaseInterval` (30 s) until its leases expire, plus one
/// `LeaseAcquireInterval` (10 s) until a live pod takes them
/// (`AzureStorageOrchestrationServiceSettings.cs`). The HPA allows periods up to 1800 s
/// (kubernetes `pkg/apis/autoscaling/validation`); its default 300 s stabilization window is kept.
fn scale_in_pace(pod_spec: &Value) -> Value {
    const LEASE_EXPIRY_AND_TAKEOVER_S: u64 = 30 + 10;
    const HPA_MAX_PERIOD_S: u64 = 1800;
    let grace = pod_spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30).max(30);
    let period = (grace + LEASE_EXPIRY_AND_TAKEOVER_S).min(HPA_MAX_PERIOD_S);
    json!({
        "stabilizationWindowSeconds": 300,
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": period}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str]) -> Args {
        Cli::parse_from(std::iter::once("scaledobject").chain(extra.iter().copied())).args
    }

    fn example() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/example/function-app.yaml"))
            .unwrap()
    }

    /// The pod the patched template makes, planned by the webhook as it admits it: the
    /// sidecar's env.
    fn sidecar_env_after_patch(workload: &Value, patch: &Value) -> Vec<Value> {
        let mut template = workload["spec"]["template"].clone();
        json_patch::merge(&mut template["metadata"], &patch["spec"]["template"]["metadata"]);
        let pod = json!({"metadata": template["metadata"], "spec": template["spec"]});
        let aggregator = url::Url::parse(DEFAULT_AGGREGATOR_URL).unwrap();
        let mut settings = plan_settings(aggregator);
        settings.native_sidecar = true;
        let plan = inject::plan_with(&pod, &settings, &NativeDefault::forced(true));
        assert!(plan.injects(), "{:?}", plan.warnings);
        let mut injected = pod.clone();
        let operations: json_patch::Patch = serde_json::from_value(Value::Array(plan.patch)).unwrap();
        json_patch::patch(&mut injected, &operations).unwrap();
        let sidecar = injected["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == SIDECAR_CONTAINER)
            .unwrap()
            .clone();
        sidecar["env"].as_array().unwrap().clone()
    }

    #[test]
    fn the_webhook_gives_the_patched_pods_the_task_hub_and_connection_the_trigger_names() {
        let workload: Value = serde_saphyr::from_str(&example()).unwrap();
        let generated = generate(&example(), &args(&[])).unwrap();
        let metadata = &generated.scaled_object["spec"]["triggers"][0]["metadata"];
        let env = sidecar_env_after_patch(&workload, &generated.patch);
        let of = |name: &str| env.iter().filter(|e| e["name"] == name).cloned().collect::<Vec<_>>();
        assert_eq!(of(env::TASK_HUB), [json!({"name": env::TASK_HUB, "value": metadata["taskHubName"]})]);
        // The sidecar copies the definition of the variable the trigger's connectionFromEnv names.
        let app = &workload["spec"]["template"]["spec"]["containers"][0];
        let defined = app["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == metadata["connectionFromEnv"])
            .unwrap();
        assert_eq!(
            of(env::CONNECTION),
            [json!({"name": env::CONNECTION, "valueFrom": defined["valueFrom"]})]
        );
    }

    #[test]
    fn a_task_hub_from_an_env_from_secret_is_read_from_that_secret_in_the_input() {
        let text = include_str!("../tests/fixtures/scaledobject/func-kubernetes-deploy-dry-run.yaml");
        let generated = generate(text, &args(&[])).unwrap();
        assert_eq!(generated.scaled_object["spec"]["triggers"][0]["metadata"]["taskHubName"], "OrdersHub");
        assert!(generated.notes.iter().any(|n| n.contains("spec.replicas")), "{:?}", generated.notes);
        assert!(
            generated.notes.iter().any(|n| n.contains("apply this one in its place")),
            "{:?}",
            generated.notes
        );
        // Without the Secret the hub cannot be known here: --task-hub is asked for.
        let without: String = text.split("\n---\n").skip(1).collect::<Vec<_>>().join("\n---\n");
        let error = generate(&without, &args(&[])).unwrap_err();
        assert!(
            matches!(&error, GenerateError::UnresolvedTaskHub(from) if from.contains("Secret orders/orders-func")),
            "{error}"
        );
        let given = generate(&without, &args(&["--task-hub", "OrdersHub"])).unwrap();
        assert_eq!(given.scaled_object["spec"]["triggers"][0]["metadata"]["taskHubName"], "OrdersHub");
    }

    #[test]
    fn the_kubelet_order_decides_between_definitions_and_optional_misses_are_skipped() {
        let objects = vec![
            json!({"kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "ns"}, "data": {"hub": "FromConfig"}}),
        ];
        let literal = json!({"value": "Literal"});
        let from_config = json!({"valueFrom": {"configMapKeyRef": {"name": "settings", "key": "hub"}}});
        let missing_optional =
            json!({"valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nope", "optional": true}}});
        assert_eq!(resolve(&[&literal, &from_config], &objects, "ns"), Ok(Some("FromConfig".into())));
        assert_eq!(resolve(&[&from_config, &literal], &objects, "ns"), Ok(Some("Literal".into())));
        assert_eq!(resolve(&[&literal, &missing_optional], &objects, "ns"), Ok(Some("Literal".into())));
        let field = json!({"valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}});
        assert!(resolve(&[&field], &objects, "ns").is_err());
    }

    #[test]
    fn what_the_webhook_would_skip_is_refused_with_its_reason() {
        let text = example().replace("AzureWebJobsStorage", "SomethingElse");
        let text = text.replace(
            "durable-scaler.io/connection-env: SomethingElse",
            "durable-scaler.io/connection-env: AzureWebJobsStorage",
        );
        let error = generate(&text, &args(&[])).unwrap_err();
        assert!(
            matches!(&error, GenerateError::NotInjectable(why) if why.starts_with("no_connection_variable")),
            "{error}"
        );
    }

    #[test]
    fn several_workloads_need_a_name() {
        let text = format!(
            "{}\n---\n{}",
            example(),
            example().replace("name: orders-func\n  namespace", "name: orders-func-http\n  namespace")
        );
        assert!(matches!(generate(&text, &args(&[])), Err(GenerateError::Ambiguous(_))));
        let chosen = generate(&text, &args(&["--name", "orders-func-http"])).unwrap();
        assert_eq!(chosen.scaled_object["metadata"]["name"], "orders-func-http");
        assert_eq!(
            generate(&text, &args(&["--name", "nope"])),
            Err(GenerateError::NoWorkload(Some("nope".into())))
        );
    }

    #[test]
    fn the_scale_in_pace_follows_the_grace_period_within_the_hpas_bounds() {
        let period = |spec: Value| scale_in_pace(&spec)["policies"][0]["periodSeconds"].as_u64().unwrap();
        assert_eq!(period(json!({})), 70);
        assert_eq!(period(json!({"terminationGracePeriodSeconds": 5})), 70);
        assert_eq!(period(json!({"terminationGracePeriodSeconds": 60})), 100);
        assert_eq!(period(json!({"terminationGracePeriodSeconds": 3600})), 1800);
    }
}
