//! The injection plan: a pod's raw JSON in, a JSON patch and admission warnings out.
//!
//! Pure (no I/O, no clock), so every rule is unit-tested and fuzzed. The pod is read as a
//! `serde_json::Value` and never round-tripped through typed structs: a typed round trip drops
//! fields the structs do not know (newer API fields, alpha features), and a patch computed by
//! diffing such a round trip would remove them from the user's pod. Instead the plan is a list
//! of targeted `add` operations, each pointing at exactly what it adds.
//!
//! One file per concern, in the order a pod meets them:
//! - [`eligibility`]: who gets a sidecar (not already injected, not hostNetwork, an app
//!   container that defines the connection);
//! - [`kubelet_env`]: the kubelet's env rules (`env` over `envFrom`, optional references),
//!   turned into env definitions for the sidecar;
//! - [`annotations`]: the pod's `durable-scaler.io/*` settings, parsed into typed values;
//! - [`template`]: the sidecar container, its volumes and the status annotation;
//! - [`drain`]: the app's drain on stop (its variable, the pod's grace period);
//! - [`patch`]: the JSON patch operations that add them.

mod annotations;
mod drain;
mod eligibility;
mod kubelet_env;
mod patch;
mod template;

use serde_json::{Map, Value, json};

use crate::contract::{
    CONNECTION_ENV_ANNOTATION, DEFAULT_CONNECTION_ENV, DRAIN_ANNOTATION, INJECT_LABEL, SIDECAR_HTTP_PORT,
    STATUS_ANNOTATION, TASK_HUB_ANNOTATION, TOKEN_VOLUME,
};
use annotations::{Annotations, DEFAULT_CONTAINER_ANNOTATION, guaranteed};

/// The webhook's settings that shape every injection (from its command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectionSettings {
    /// The sidecar's image.
    pub image: String,
    /// The aggregator's report URL given to the sidecar.
    pub aggregator: url::Url,
    /// PEM CA for an `https://` aggregator, given to the sidecar inline as
    /// `DURABLE_SCALER_AGGREGATOR_CA` when `aggregator_ca_secret` names no Secret.
    pub aggregator_ca: Option<String>,
    /// A Secret in each app namespace whose key `ca.crt` is the aggregator's CA: mounted into
    /// the sidecar as a file instead of the PEM inline (no multi-line value in the pod).
    pub aggregator_ca_secret: Option<String>,
    /// Secrets (in each app namespace) for pulling the sidecar's image, merged into the pod's
    /// `imagePullSecrets`.
    pub image_pull_secrets: Vec<String>,
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
    /// The task hub is the extension's default, the sanitised `WEBSITE_SITE_NAME`, which the
    /// app sets from a reference the webhook cannot read.
    UnknownTaskHub,
    /// The pod shares the node's network: two such pods on a node would clash on the
    /// sidecar's port.
    HostNetwork,
    /// The aggregator URL is https and the webhook has no CA to give the sidecar.
    HttpsWithoutCa,
    /// The pod runs on Windows; the sidecar's image is Linux-only.
    Windows,
    /// A pod that must complete (`restartPolicy` `Never`/`OnFailure`) would get a plain
    /// container that never exits.
    NeverCompletes,
    /// No port near the sidecar's is free of the app's declared ports.
    NoFreePort,
    /// The app's identity-based connection uses a credential the sidecar cannot (a client
    /// secret or certificate).
    UnsupportedCredential,
    /// Any other refusal (a pod without a spec).
    Other,
}

crate::metrics::label_values!(SkipReason {
    NoConnectionVariable => "no_connection_variable",
    InvalidTaskHub => "invalid_task_hub",
    UnknownTaskHub => "unknown_task_hub",
    HostNetwork => "host_network",
    HttpsWithoutCa => "https_without_ca",
    Windows => "windows",
    NeverCompletes => "never_completes",
    NoFreePort => "no_free_port",
    UnsupportedCredential => "unsupported_credential",
    Other => "other",
});

/// The injection mode a pod gets unless its annotation says otherwise, and why (recorded in
/// the status annotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeDefault {
    /// Native sidecar (init container with `restartPolicy: Always`) or plain container.
    pub native: bool,
    /// Why, in a few words (e.g. "--native-sidecar=true", "every kubelet is 1.33+").
    pub reason: String,
    /// Set when native sidecars certainly cannot run on this cluster (an API server or a
    /// kubelet before 1.29): why. A pod's annotation asking for one then gets a plain
    /// container, since the API server would refuse the pod ([`super::cluster`]).
    pub cannot_run: Option<String>,
}

impl NativeDefault {
    /// The mode forced by `--native-sidecar true|false`, with nothing known of the cluster.
    pub fn forced(native: bool) -> Self {
        Self { native, reason: format!("--native-sidecar={native}"), cannot_run: None }
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
    if eligibility::has_sidecar(spec) {
        // Already injected (by us on an earlier pass, or by hand): idempotent, no second copy.
        return Injection::default();
    }
    if let Some(warning) = eligibility::host_network(spec) {
        return Injection::skip(SkipReason::HostNetwork, warnings, warning);
    }
    if let Some(warning) = eligibility::windows(spec) {
        return Injection::skip(SkipReason::Windows, warnings, warning);
    }
    let annotations = Annotations::of(pod);
    let connection_env = annotations.connection_env();
    let Some(app) = eligibility::app_container(spec, annotations.default_container(), connection_env) else {
        let warning = format!(
            "durable-scaler: no container defines the env var {connection_env:?} (named by \
             {CONNECTION_ENV_ANNOTATION}, default {DEFAULT_CONNECTION_ENV}) or an identity-based \
             {connection_env}__accountName / __queueServiceUri (and the rest) in `env` or through an \
             `envFrom` Secret or ConfigMap; sidecar not injected"
        );
        return Injection::skip(SkipReason::NoConnectionVariable, warnings, warning);
    };
    if let Some(warning) = eligibility::unsupported_credential(&app, connection_env) {
        return Injection::skip(SkipReason::UnsupportedCredential, warnings, warning);
    }

    let task_hub =
        match template::task_hub_env(annotations.get(TASK_HUB_ANNOTATION), app.container, &mut warnings) {
            Ok(definitions) => definitions,
            Err(template::HubError::Invalid(warning)) => {
                return Injection::skip(SkipReason::InvalidTaskHub, warnings, warning);
            }
            Err(template::HubError::Unknown(warning)) => {
                return Injection::skip(SkipReason::UnknownTaskHub, warnings, warning);
            }
        };
    let aggregator = annotations.aggregator(&settings.aggregator, &mut warnings);
    let ca = match (aggregator.scheme() == "https", &settings.aggregator_ca_secret, &settings.aggregator_ca) {
        (false, _, _) => template::CaSource::None,
        (true, Some(secret), _) => template::CaSource::Secret(secret),
        (true, None, Some(pem)) => template::CaSource::Inline(pem),
        (true, None, None) => {
            let warning = format!(
                "durable-scaler: the aggregator URL {:?} is https but the webhook has no CA for it \
                 (--sidecar-aggregator-ca); sidecar not injected",
                aggregator.as_str()
            );
            return Injection::skip(SkipReason::HttpsWithoutCa, warnings, warning);
        }
    };
    let (native, mode_reason) = annotations.native(native_default, &mut warnings);
    if let Some(warning) = eligibility::never_completes(spec, native) {
        return Injection::skip(SkipReason::NeverCompletes, warnings, warning);
    }
    let Some(port) = template::free_port(spec) else {
        let warning = "durable-scaler: the pod declares every port the sidecar could listen on; \
                       sidecar not injected";
        return Injection::skip(SkipReason::NoFreePort, warnings, warning.to_owned());
    };
    let resources = annotations.resources(guaranteed(spec), &mut warnings);
    let drain = annotations.drain(&mut warnings);
    let grace_annotation = if drain { annotations.grace_seconds(&mut warnings) } else { None };
    let pre_stop = if drain {
        drain::pre_stop(spec, &app, port, &mut warnings)
    } else {
        Err(format!("drain is off (annotation {DRAIN_ANNOTATION}=false)"))
    };
    let grace = drain::final_grace(spec, drain, grace_annotation, pre_stop.as_ref().ok());
    // A plain container gets SIGTERM with the app: it waits for the app (src/sidecar/stop.rs).
    let app_exit = (!native).then(|| template::AppExit::of(app.container, grace));
    let host_drain = pre_stop.as_ref().ok().map(|pre_stop| template::HostDrain {
        app_port: pre_stop.app_port,
        token: &pre_stop.token,
        wait_seconds: drain::drain_wait(grace),
    });
    let sidecar = template::Sidecar {
        app: &app,
        task_hub,
        aggregator: &aggregator,
        resources,
        native,
        image: annotations.image(&settings.image, &mut warnings),
        log_level: annotations.log_level(&mut warnings),
        port,
        ca,
        app_exit,
        host_drain,
    };
    let Some(sidecar) = template::container(sidecar, &mut warnings) else {
        // Both lists hold at least one definition by construction; stay total anyway.
        let warning = "durable-scaler: internal error planning the sidecar's env; sidecar not injected";
        return Injection::skip(SkipReason::Other, warnings, warning.to_owned());
    };

    let mut patch = Vec::new();
    let mut changes = Map::new();
    let list = if native { "initContainers" } else { "containers" };
    patch::append(&mut patch, spec, "/spec", list, sidecar);

    let mut volumes = vec![TOKEN_VOLUME];
    if let template::CaSource::Secret(secret) = ca {
        volumes.push(template::CA_VOLUME);
        patch::append(&mut patch, spec, "/spec", "volumes", template::ca_volume(secret));
    }
    if let Ok(pre_stop) = &pre_stop {
        volumes.push(drain::HOST_KEY_VOLUME);
        patch::append(&mut patch, spec, "/spec", "volumes", drain::key_volume(&pre_stop.key));
    }
    let has_token_volume = spec.get("volumes").and_then(Value::as_array).is_some_and(|volumes| {
        volumes.iter().any(|v| v.get("name").and_then(Value::as_str) == Some(TOKEN_VOLUME))
    });
    if has_token_volume {
        warnings.push(format!(
            "durable-scaler: the pod already has a volume named {TOKEN_VOLUME}; the sidecar mounts it as it is"
        ));
    } else {
        patch::append(&mut patch, spec, "/spec", "volumes", template::token_volume());
    }
    let pull_secrets = patch::merge_pull_secrets(&mut patch, spec, &settings.image_pull_secrets);
    if !pull_secrets.is_empty() {
        changes.insert("imagePullSecrets".to_owned(), json!(pull_secrets));
    }
    if port != SIDECAR_HTTP_PORT {
        changes.insert("port".to_owned(), json!(port));
    }
    if !app.identity.is_empty() {
        changes.insert("connection".to_owned(), json!("identity-based"));
    }
    if let Some(exit) = app_exit {
        let port = exit.port.map_or_else(|| "no port declared".to_owned(), |port| format!("port {port}"));
        changes.insert(
            "sidecarStop".to_owned(),
            json!(format!("after the app ({port}), at most {} s after SIGTERM", exit.wait_seconds)),
        );
    }
    let drain = if drain {
        drain::plan(spec, &app, grace_annotation, &pre_stop, grace, &mut patch, &mut warnings)
    } else {
        json!(format!("off (annotation {DRAIN_ANNOTATION}=false)"))
    };
    changes.insert("drain".to_owned(), drain);

    let mut new_annotations = Map::new();
    let status = template::status(settings, native, &mode_reason, &volumes, changes);
    new_annotations.insert(STATUS_ANNOTATION.to_owned(), Value::String(status.to_string()));
    if !native && annotations.default_container().is_none() && !app.name.is_empty() {
        // The sidecar now sits in `containers`; keep `kubectl logs/exec` on the app.
        new_annotations.insert(DEFAULT_CONTAINER_ANNOTATION.to_owned(), Value::String(app.name.to_owned()));
    }
    patch::annotate(&mut patch, pod, new_annotations);
    Injection { patch, warnings, skipped: None }
}

#[cfg(test)]
mod tests {
    use super::annotations::{
        DEFAULT_CPU_LIMIT, DEFAULT_CPU_REQUEST, DEFAULT_MEMORY_LIMIT, DEFAULT_MEMORY_REQUEST,
    };
    use super::template::url_text;
    use super::*;
    use crate::contract::{
        AGGREGATOR_ANNOTATION, CPU_LIMIT_ANNOTATION, CPU_REQUEST_ANNOTATION, DEFAULT_TASK_HUB, HUB_NAME_ENV,
        MAX_ACTIVITIES_ENV, MAX_ORCHESTRATIONS_ENV, MEMORY_LIMIT_ANNOTATION, MEMORY_REQUEST_ANNOTATION,
        NATIVE_SIDECAR_ANNOTATION, SIDECAR_CONTAINER, TOKEN_AUDIENCE, TOKEN_DIR, env,
    };
    use serde_json::json;

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "example.test/durable-scaler:1".to_owned(),
            aggregator: "http://aggregator.test:4371".parse().unwrap(),
            aggregator_ca: None,
            aggregator_ca_secret: None,
            image_pull_secrets: Vec::new(),
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
    fn only_the_literal_true_label_opts_in() {
        assert!(opted_in(&json!({"metadata": {"labels": {INJECT_LABEL: "true"}}})));
        assert!(!opted_in(&json!({"metadata": {"labels": {INJECT_LABEL: "True"}}})));
        assert!(!opted_in(&json!({"metadata": {"labels": {INJECT_LABEL: true}}})));
        assert!(!opted_in(&json!({"metadata": {}})));
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

    const ALL_SETTINGS: [(&str, &str); 6] = [
        (MAX_ACTIVITIES_ENV, env::APP_MAX_ACTIVITIES),
        (MAX_ORCHESTRATIONS_ENV, env::APP_MAX_ORCHESTRATIONS),
        (crate::contract::CONTROL_QUEUE_VISIBILITY_TIMEOUT_ENV, env::APP_CONTROL_QUEUE_VISIBILITY_TIMEOUT),
        (
            crate::contract::WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT_ENV,
            env::APP_WORK_ITEM_QUEUE_VISIBILITY_TIMEOUT,
        ),
        (crate::contract::CONTROL_QUEUE_BUFFER_THRESHOLD_ENV, env::APP_CONTROL_QUEUE_BUFFER_THRESHOLD),
        (crate::contract::MAX_QUEUE_POLLING_INTERVAL_ENV, env::APP_MAX_QUEUE_POLLING_INTERVAL),
    ];

    #[test]
    fn every_app_setting_reaches_the_sidecar_through_each_env_from_source_as_one_optional_key() {
        let pod = env_from_pod(
            json!([
                {"secretRef": {"name": "func-secrets"}},
                {"prefix": "AzureFunctionsJobHost__extensions__", "configMapRef": {"name": "durable"}},
            ]),
            json!([]),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        for (setting, ours) in ALL_SETTINGS {
            let key = setting.strip_prefix("AzureFunctionsJobHost__extensions__").unwrap();
            assert_eq!(
                sidecar_env_all(&out, ours),
                [
                    json!({"name": ours, "valueFrom": {"secretKeyRef":
                        {"name": "func-secrets", "key": setting, "optional": true}}}),
                    json!({"name": ours, "valueFrom": {"configMapKeyRef":
                        {"name": "durable", "key": key, "optional": true}}}),
                ],
                "{setting}"
            );
        }
    }

    #[test]
    fn every_app_setting_is_copied_verbatim_literal_or_value_from() {
        let mut env = vec![storage_env()[0].clone()];
        for (i, (setting, _)) in ALL_SETTINGS.iter().enumerate() {
            env.push(if i % 2 == 0 {
                json!({"name": setting, "value": format!("00:0{i}:30")})
            } else {
                json!({"name": setting, "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": format!("k{i}")}}})
            });
        }
        let pod = pod(json!({TASK_HUB_ANNOTATION: "Hub1"}), Value::Array(env.clone()));
        let injection = plan(&pod, &settings());
        let out = applied(&pod, &injection);
        for (i, (_, ours)) in ALL_SETTINGS.iter().enumerate() {
            assert_eq!(sidecar_env_all(&out, ours), [kubelet_env::renamed_env(ours, &env[i + 1])], "{ours}");
        }
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    }

    #[test]
    fn settings_are_matched_as_dotnet_configuration_reads_the_environment() {
        let pod = pod(
            json!({TASK_HUB_ANNOTATION: "Hub1"}),
            with_limits_env(json!([
                {"name": "azurefunctionsjobhost__EXTENSIONS__durabletask__MAXCONCURRENTACTIVITYFUNCTIONS", "value": "7"},
                {"name": "AzureFunctionsJobHost:extensions:durableTask:maxConcurrentOrchestratorFunctions", "value": "3"},
            ])),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            sidecar_env(&out, env::APP_MAX_ACTIVITIES),
            json!({"name": env::APP_MAX_ACTIVITIES, "value": "7"})
        );
        assert_eq!(
            sidecar_env(&out, env::APP_MAX_ORCHESTRATIONS),
            json!({"name": env::APP_MAX_ORCHESTRATIONS, "value": "3"})
        );
    }

    #[test]
    fn a_setting_spelled_two_ways_is_copied_in_order_with_a_warning() {
        let pod = pod(
            json!({TASK_HUB_ANNOTATION: "Hub1"}),
            with_limits_env(json!([
                {"name": MAX_ACTIVITIES_ENV, "value": "7"},
                {"name": MAX_ACTIVITIES_ENV.to_lowercase(), "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": true}}},
            ])),
        );
        let injection = plan(&pod, &settings());
        let out = applied(&pod, &injection);
        assert_eq!(sidecar_env_all(&out, env::APP_MAX_ACTIVITIES).len(), 2);
        assert!(injection.warnings.iter().any(|w| w.contains("2 spellings")), "{:?}", injection.warnings);
    }

    #[test]
    fn a_hub_name_in_another_case_is_the_hub_name() {
        let hub = json!({"name": HUB_NAME_ENV.to_uppercase(), "value": "OrdersHub"});
        let pod = pod(json!({}), json!([storage_env()[0], hub]));
        let injection = plan(&pod, &settings());
        assert_eq!(
            sidecar_env_all(&applied(&pod, &injection), env::TASK_HUB),
            [json!({"name": env::TASK_HUB, "value": "OrdersHub"})]
        );
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    }

    #[test]
    fn without_a_hub_name_the_default_is_the_sanitised_site_name() {
        let site = json!({"name": "WEBSITE_SITE_NAME", "value": "orders-func-2"});
        let pod = pod(json!({}), json!([storage_env()[0], site]));
        let injection = plan(&pod, &settings());
        assert_eq!(
            sidecar_env_all(&applied(&pod, &injection), env::TASK_HUB),
            [json!({"name": env::TASK_HUB, "value": "ordersfunc2"})]
        );
        assert!(
            injection.warnings.iter().any(|w| w.contains("ordersfunc2") && w.contains("WEBSITE_SITE_NAME"))
        );
    }

    #[test]
    fn an_optional_hub_name_falls_back_to_the_sanitised_site_name() {
        let site = json!({"name": "WEBSITE_SITE_NAME", "value": "9lives"});
        let pod = env_from_pod(json!([{"secretRef": {"name": "func-secrets"}}]), json!([site]));
        let out = applied(&pod, &plan(&pod, &settings()));
        let hub = sidecar_env_all(&out, env::TASK_HUB);
        assert_eq!(hub[0], json!({"name": env::TASK_HUB, "value": "t9lives"}));
        assert_eq!(hub[1]["valueFrom"]["secretKeyRef"]["key"], HUB_NAME_ENV);
    }

    #[test]
    fn a_hub_name_equal_to_the_site_name_is_sanitised_as_the_default_is() {
        let env = json!([
            storage_env()[0],
            {"name": "WEBSITE_SITE_NAME", "value": "orders-func"},
            {"name": HUB_NAME_ENV, "value": "Orders-Func"},
        ]);
        let pod = pod(json!({}), env);
        let injection = plan(&pod, &settings());
        assert_eq!(sidecar_env(&applied(&pod, &injection), env::TASK_HUB)["value"], "ordersfunc");
    }

    #[test]
    fn a_site_name_the_webhook_cannot_read_skips_the_pod_when_it_would_name_the_hub() {
        let site = json!({"name": "WEBSITE_SITE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}});
        let unnamed = pod(json!({}), json!([storage_env()[0], site]));
        let injection = plan(&unnamed, &settings());
        assert_eq!(injection.skipped, Some(SkipReason::UnknownTaskHub));
        assert!(
            injection.warnings.iter().any(|w| w.contains(TASK_HUB_ANNOTATION)),
            "{:?}",
            injection.warnings
        );

        // A hub named by the app itself does not depend on the default.
        let named = pod(json!({}), json!([storage_env()[0], site, {"name": HUB_NAME_ENV, "value": "Hub1"}]));
        assert!(plan(&named, &settings()).injects());
    }

    fn status_of(out: &Value) -> Value {
        serde_json::from_str(out["metadata"]["annotations"][STATUS_ANNOTATION].as_str().unwrap()).unwrap()
    }

    #[test]
    fn image_pull_secrets_are_merged_into_the_pods_without_duplicates() {
        let with_secrets =
            InjectionSettings { image_pull_secrets: vec!["regcred".into(), "app-cred".into()], ..settings() };
        let mut pod = pod(json!({}), storage_env());
        pod["spec"]["imagePullSecrets"] = json!([{"name": "app-cred"}]);
        let out = applied(&pod, &plan(&pod, &with_secrets));
        assert_eq!(out["spec"]["imagePullSecrets"], json!([{"name": "app-cred"}, {"name": "regcred"}]));
        assert_eq!(status_of(&out)["imagePullSecrets"], json!(["regcred"]));

        let bare = super::tests::pod(json!({}), storage_env());
        let out = applied(&bare, &plan(&bare, &with_secrets));
        assert_eq!(out["spec"]["imagePullSecrets"], json!([{"name": "regcred"}, {"name": "app-cred"}]));
    }

    #[test]
    fn the_sidecar_image_and_log_level_follow_the_pods_annotations() {
        let pod = pod(
            json!({"durable-scaler.io/sidecar-image": "registry.example/ds:2", "durable-scaler.io/sidecar-log-level": "DEBUG"}),
            storage_env(),
        );
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(out["spec"]["initContainers"][0]["image"], "registry.example/ds:2");
        assert_eq!(sidecar_env(&out, "RUST_LOG"), json!({"name": "RUST_LOG", "value": "debug"}));

        let bad = super::tests::pod(
            json!({"durable-scaler.io/sidecar-image": "two words", "durable-scaler.io/sidecar-log-level": "loud"}),
            storage_env(),
        );
        let injection = plan(&bad, &settings());
        let out = applied(&bad, &injection);
        assert_eq!(out["spec"]["initContainers"][0]["image"], settings().image);
        assert_eq!(sidecar_env(&out, "RUST_LOG"), Value::Null);
        assert!(injection.warnings.iter().any(|w| w.contains("\"two words\"")), "{:?}", injection.warnings);
        assert!(injection.warnings.iter().any(|w| w.contains("\"loud\"")), "{:?}", injection.warnings);
    }

    #[test]
    fn windows_pods_are_skipped_whichever_way_they_say_so() {
        for (field, value) in
            [("os", json!({"name": "windows"})), ("nodeSelector", json!({"kubernetes.io/os": "windows"}))]
        {
            let mut pod = pod(json!({}), storage_env());
            pod["spec"][field] = value;
            let injection = plan(&pod, &settings());
            assert_eq!(injection.skipped, Some(SkipReason::Windows), "{field}");
        }
        let mut linux = pod(json!({}), storage_env());
        linux["spec"]["os"] = json!({"name": "linux"});
        assert!(plan(&linux, &settings()).injects());
    }

    #[test]
    fn a_pod_that_must_complete_gets_a_native_sidecar_but_never_a_plain_one() {
        for policy in ["Never", "OnFailure"] {
            let mut native = pod(json!({}), storage_env());
            native["spec"]["restartPolicy"] = json!(policy);
            assert!(plan(&native, &settings()).injects(), "{policy}");
            let mut plain = pod(json!({NATIVE_SIDECAR_ANNOTATION: "false"}), storage_env());
            plain["spec"]["restartPolicy"] = json!(policy);
            let injection = plan(&plain, &settings());
            assert_eq!(injection.skipped, Some(SkipReason::NeverCompletes), "{policy}");
            assert!(injection.warnings.iter().any(|w| w.contains(policy)), "{:?}", injection.warnings);
        }
    }

    #[test]
    fn the_sidecar_listens_on_a_port_no_container_declares() {
        let mut pod = pod(json!({}), storage_env());
        pod["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9095}, {"containerPort": 9096}]);
        pod["spec"]["initContainers"] =
            json!([{"name": "init", "image": "i", "ports": [{"containerPort": 9097}]}]);
        let out = applied(&pod, &plan(&pod, &settings()));
        let sidecar = &out["spec"]["initContainers"][1];
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], 9098);
        assert_eq!(
            sidecar_env(&out, env::HTTP_ADDR),
            json!({"name": env::HTTP_ADDR, "value": "0.0.0.0:9098"})
        );
        assert_eq!(status_of(&out)["port"], 9098);

        // The default port needs no variable: the sidecar listens there by itself.
        let plain = super::tests::pod(json!({}), storage_env());
        assert_eq!(sidecar_env(&applied(&plain, &plan(&plain, &settings())), env::HTTP_ADDR), Value::Null);
    }

    #[test]
    fn an_https_aggregators_ca_from_a_secret_is_mounted_and_no_value_in_the_pod_spans_lines() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let mounted = InjectionSettings {
            aggregator: "https://aggregator.test:4371".parse().unwrap(),
            aggregator_ca: Some(ca.to_owned()),
            aggregator_ca_secret: Some("durable-scaler-aggregator-ca".to_owned()),
            ..settings()
        };
        let pod = pod(json!({}), storage_env());
        let out = applied(&pod, &plan(&pod, &mounted));
        let sidecar = &out["spec"]["initContainers"][0];
        assert_eq!(
            sidecar_env(&out, env::AGGREGATOR_CA)["value"],
            "/var/run/secrets/durable-scaler-aggregator-ca/ca.crt"
        );
        assert!(
            sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "durable-scaler-aggregator-ca")
        );
        let volume = out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "durable-scaler-aggregator-ca");
        assert_eq!(
            volume.unwrap()["secret"],
            json!({"secretName": "durable-scaler-aggregator-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]})
        );
        assert_eq!(
            status_of(&out)["volumes"],
            json!(["durable-scaler-token", "durable-scaler-aggregator-ca"])
        );
        fn multi_line(value: &Value) -> bool {
            match value {
                Value::String(s) => s.contains('\n'),
                Value::Array(items) => items.iter().any(multi_line),
                Value::Object(map) => map.values().any(multi_line),
                _ => false,
            }
        }
        assert!(!multi_line(&out), "{out:#}");
    }

    fn app_env(out: &Value, name: &str) -> Vec<Value> {
        out["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .cloned()
            .collect()
    }

    #[test]
    fn the_app_drains_on_stop_with_a_grace_period_that_covers_the_hosts_waits() {
        let mut pod = pod(json!({}), storage_env());
        pod["spec"]["terminationGracePeriodSeconds"] = json!(10);
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(app_env(&out, drain::DRAIN_ENV), [json!({"name": drain::DRAIN_ENV, "value": "true"})]);
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], drain::DRAIN_GRACE_SECONDS);
        assert_eq!(status_of(&out)["drain"]["terminationGracePeriodSeconds"], "10 -> 30");
    }

    #[test]
    fn the_apps_own_drain_setting_and_longer_grace_are_kept() {
        let mut env = storage_env();
        env.as_array_mut().unwrap().push(json!({"name": drain::DRAIN_ENV, "value": "false"}));
        let mut pod = pod(json!({}), env);
        pod["spec"]["terminationGracePeriodSeconds"] = json!(600);
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(app_env(&out, drain::DRAIN_ENV), [json!({"name": drain::DRAIN_ENV, "value": "false"})]);
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 600);
        assert_eq!(status_of(&out)["drain"]["terminationGracePeriodSeconds"], "600 kept");

        // An envFrom source may set it: the webhook does not override what it cannot see.
        let from = env_from_pod(json!([{"secretRef": {"name": "func-secrets"}}]), json!([]));
        assert!(app_env(&applied(&from, &plan(&from, &settings())), drain::DRAIN_ENV).is_empty());
    }

    #[test]
    fn one_annotation_sets_the_grace_never_below_the_pods_and_one_turns_the_drain_off() {
        let mut pod =
            pod(json!({"durable-scaler.io/termination-grace-period-seconds": "120"}), storage_env());
        pod["spec"]["terminationGracePeriodSeconds"] = json!(30);
        assert_eq!(applied(&pod, &plan(&pod, &settings()))["spec"]["terminationGracePeriodSeconds"], 120);

        pod["spec"]["terminationGracePeriodSeconds"] = json!(300);
        let injection = plan(&pod, &settings());
        assert_eq!(applied(&pod, &injection)["spec"]["terminationGracePeriodSeconds"], 300);
        assert!(injection.warnings.iter().any(|w| w.contains("keeping 300 s")), "{:?}", injection.warnings);

        let mut off = super::tests::pod(json!({"durable-scaler.io/drain": "false"}), storage_env());
        off["spec"]["terminationGracePeriodSeconds"] = json!(5);
        let out = applied(&off, &plan(&off, &settings()));
        assert!(app_env(&out, drain::DRAIN_ENV).is_empty());
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 5);
        assert!(status_of(&out)["drain"].as_str().unwrap().starts_with("off"));
    }

    /// An app that keeps its host keys in a Kubernetes Secret and declares its port.
    fn keyed_pod(extra_env: Value) -> Value {
        let mut env = storage_env();
        env.as_array_mut()
            .unwrap()
            .push(json!({"name": "AzureWebJobsSecretStorageType", "value": "kubernetes"}));
        env.as_array_mut().unwrap().extend(extra_env.as_array().unwrap().iter().cloned());
        let mut pod = pod(json!({}), env);
        pod["spec"]["containers"][0]["ports"] = json!([{"containerPort": 8080}]);
        pod
    }

    #[test]
    fn an_app_with_its_keys_in_a_secret_drains_in_a_prestop_hook_for_its_function_timeout() {
        let pod =
            keyed_pod(json!([{"name": "AzureWebJobsKubernetesSecretName", "value": "secrets/func-keys"}]));
        let injection = plan(&pod, &settings());
        let out = applied(&pod, &injection);
        let hook = &out["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"];
        assert_eq!(hook["path"], "/drain");
        assert_eq!(hook["port"], SIDECAR_HTTP_PORT);
        assert_eq!(hook["httpHeaders"][0]["name"], crate::contract::DRAIN_TOKEN_HEADER);
        let token = hook["httpHeaders"][0]["value"].as_str().unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(sidecar_env(&out, env::DRAIN_TOKEN)["value"], token);
        assert_eq!(sidecar_env(&out, env::HOST_URL)["value"], "http://127.0.0.1:8080");
        assert_eq!(
            sidecar_env(&out, env::HOST_KEY_FILE)["value"],
            "/var/run/durable-scaler/host-key/host.master"
        );
        // Upstream's 30 min and 30 s, and /drain answers 15 s before the grace runs out.
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 1830);
        assert_eq!(sidecar_env(&out, env::DRAIN_WAIT)["value"], "1815s");
        let volume =
            out["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == drain::HOST_KEY_VOLUME);
        assert_eq!(
            volume.unwrap()["secret"],
            json!({"secretName": "func-keys", "optional": true, "items": [{"key": "host.master", "path": "host.master"}]})
        );
        assert!(status_of(&out)["drain"]["preStop"].as_str().unwrap().contains("func-keys"));
        // A second pod gets a token of its own.
        let again = applied(&pod, &plan(&pod, &settings()));
        assert_ne!(
            again["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"]["httpHeaders"][0]["value"],
            token
        );
    }

    #[test]
    fn the_key_store_may_be_a_configmap_or_a_mounted_volume_and_the_timeout_comes_from_the_apps_settings() {
        let pod = keyed_pod(json!([
            {"name": "AzureWebJobsKubernetesSecretName", "value": "configmaps/keys"},
            {"name": "azurefunctionsjobhost__FunctionTimeout", "value": "01:00:00"},
        ]));
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(volume_named(&out, drain::HOST_KEY_VOLUME)["configMap"]["name"], "keys");
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 3630);
        // A function timeout the webhook cannot read: the default, and a warning that says so.
        let unreadable = keyed_pod(json!([
            {"name": "AzureWebJobsKubernetesSecretName", "value": "k"},
            {"name": "AzureFunctionsJobHost__functionTimeout", "value": "soon"},
        ]));
        let injection = plan(&unreadable, &settings());
        assert_eq!(applied(&unreadable, &injection)["spec"]["terminationGracePeriodSeconds"], 1830);
        let warning = injection.warnings.iter().find(|w| w.contains("functionTimeout")).unwrap();
        assert!(warning.contains("waits for the default 1800 s") && !warning.contains("  "), "{warning}");
        // Ten days of function timeout: a day of grace at most.
        let long = keyed_pod(json!([
            {"name": "AzureWebJobsKubernetesSecretName", "value": "k"},
            {"name": "AzureFunctionsJobHost__functionTimeout", "value": "10.00:00:00"},
        ]));
        assert_eq!(
            applied(&long, &plan(&long, &settings()))["spec"]["terminationGracePeriodSeconds"],
            86_400
        );

        let mut mounted = keyed_pod(json!([]));
        mounted["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "keys", "mountPath": "/run/secrets/functions-keys/"}]);
        mounted["spec"]["volumes"] = json!([{"name": "keys", "secret": {"secretName": "fk", "items": [{"key": "master", "path": "host.master"}]}}]);
        let out = applied(&mounted, &plan(&mounted, &settings()));
        assert_eq!(
            volume_named(&out, drain::HOST_KEY_VOLUME)["secret"]["items"],
            json!([{"key": "master", "path": "host.master"}])
        );
        assert_eq!(volume_named(&out, "keys")["secret"]["secretName"], "fk");
    }

    fn volume_named(out: &Value, name: &str) -> Value {
        out["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).cloned().unwrap()
    }

    #[test]
    fn no_prestop_drain_without_a_readable_key_store_a_port_or_where_the_app_has_its_own_hook() {
        let why = |pod: &Value| {
            let out = applied(pod, &plan(pod, &settings()));
            assert!(
                out["spec"]["containers"][0]
                    .pointer("/lifecycle/preStop/httpGet")
                    .is_none_or(|h| h["path"] != "/drain")
            );
            assert_eq!(sidecar_env(&out, env::DRAIN_TOKEN), Value::Null);
            assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 30);
            status_of(&out)["drain"]["preStop"].as_str().unwrap().to_owned()
        };
        // The default key store: blob storage.
        let mut blob = pod(json!({}), storage_env());
        blob["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80}]);
        assert!(why(&blob).contains("not in a Kubernetes Secret"), "{}", why(&blob));
        // Kubernetes store, but no object named and nothing mounted.
        let unnamed = why(&keyed_pod(json!([])));
        assert!(unnamed.contains("names no object") && !unnamed.contains("  "), "{unnamed}");
        // No port.
        let mut portless = keyed_pod(json!([{"name": "AzureWebJobsKubernetesSecretName", "value": "k"}]));
        portless["spec"]["containers"][0].as_object_mut().unwrap().remove("ports");
        assert!(why(&portless).contains("declares no port"));
        // The app's own preStop hook is kept.
        let mut hooked = keyed_pod(json!([{"name": "AzureWebJobsKubernetesSecretName", "value": "k"}]));
        hooked["spec"]["containers"][0]["lifecycle"] =
            json!({"preStop": {"exec": {"command": ["sleep", "5"]}}});
        assert!(why(&hooked).contains("of its own"));
        // A secret reference the webhook cannot read.
        let referenced = keyed_pod(json!([{"name": "AzureWebJobsKubernetesSecretName",
            "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]));
        assert!(why(&referenced).contains("not a literal"));
    }

    #[test]
    fn a_prestop_hook_joins_an_existing_lifecycle_and_drain_off_adds_none() {
        let mut pod = keyed_pod(json!([{"name": "AzureWebJobsKubernetesSecretName", "value": "k"}]));
        pod["spec"]["containers"][0]["lifecycle"] = json!({"postStart": {"exec": {"command": ["true"]}}});
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(
            out["spec"]["containers"][0]["lifecycle"]["postStart"],
            json!({"exec": {"command": ["true"]}})
        );
        assert_eq!(out["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"]["path"], "/drain");

        pod["metadata"]["annotations"] = json!({"durable-scaler.io/drain": "false"});
        let out = applied(&pod, &plan(&pod, &settings()));
        assert!(out["spec"]["containers"][0]["lifecycle"].get("preStop").is_none());
        assert!(
            out["spec"]["volumes"].as_array().unwrap().iter().all(|v| v["name"] != drain::HOST_KEY_VOLUME)
        );
    }

    #[test]
    fn dotnet_time_spans_read_as_the_host_reads_them() {
        for (text, seconds) in [
            ("00:30:00", 1800),
            ("1.02:03:04", 93784),
            ("2", 172_800),
            ("-1", -86_400),
            ("00:10", 600),
            ("00:00:05.5", 5),
        ] {
            assert_eq!(drain::parse_timespan(text), Some(seconds), "{text}");
        }
        for text in ["", "ab", "25:00:00", "00:60:00", "1:2:3:4"] {
            assert_eq!(drain::parse_timespan(text), None, "{text}");
        }
    }

    #[test]
    fn a_plain_container_sidecar_waits_as_long_as_the_prestop_drain_may() {
        let mut pod = keyed_pod(json!([{"name": "AzureWebJobsKubernetesSecretName", "value": "k"}]));
        pod["metadata"]["annotations"] = json!({NATIVE_SIDECAR_ANNOTATION: "false"});
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 1830);
        assert_eq!(sidecar_env(&out, env::APP_EXIT_WAIT)["value"], "1827s");
    }

    fn identity_pod(env: Value) -> Value {
        pod(json!({TASK_HUB_ANNOTATION: "Hub1"}), env)
    }

    #[test]
    fn an_identity_based_app_gets_its_connection_settings_under_the_sidecars_names() {
        // The shapes the Functions host reads (AzureWebJobsStorage__*, .NET configuration keys).
        let pod = identity_pod(json!([
            {"name": "AzureWebJobsStorage__accountName", "value": "orders"},
            {"name": "azurewebjobsstorage__CREDENTIAL", "value": "managedidentity"},
            {"name": "AzureWebJobsStorage:clientId", "value": "00000000-0000-0000-0000-000000000001"},
        ]));
        let injection = plan(&pod, &settings());
        let out = applied(&pod, &injection);
        assert_eq!(sidecar_env(&out, env::CONNECTION), Value::Null, "no connection string to copy");
        assert_eq!(sidecar_env(&out, env::CONNECTION_ACCOUNT_NAME)["value"], "orders");
        assert_eq!(sidecar_env(&out, env::CONNECTION_CREDENTIAL)["value"], "managedidentity");
        assert_eq!(
            sidecar_env(&out, env::CONNECTION_CLIENT_ID)["value"],
            "00000000-0000-0000-0000-000000000001"
        );
        assert_eq!(status_of(&out)["connection"], "identity-based");
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    }

    #[test]
    fn service_uris_alone_locate_the_account() {
        let pod = identity_pod(json!([
            {"name": "AzureWebJobsStorage__blobServiceUri", "value": "https://o.blob.core.windows.net"},
            {"name": "AzureWebJobsStorage__queueServiceUri", "value": "https://o.queue.core.windows.net"},
            {"name": "AzureWebJobsStorage__tableServiceUri", "value": "https://o.table.core.windows.net"},
        ]));
        let out = applied(&pod, &plan(&pod, &settings()));
        for (ours, host) in [
            (env::CONNECTION_BLOB_SERVICE_URI, "https://o.blob.core.windows.net"),
            (env::CONNECTION_QUEUE_SERVICE_URI, "https://o.queue.core.windows.net"),
            (env::CONNECTION_TABLE_SERVICE_URI, "https://o.table.core.windows.net"),
        ] {
            assert_eq!(sidecar_env(&out, ours)["value"], host);
        }
    }

    #[test]
    fn a_credential_or_client_id_alone_is_no_connection() {
        let pod = identity_pod(json!([{"name": "AzureWebJobsStorage__clientId", "value": "x"}]));
        assert_eq!(plan(&pod, &settings()).skipped, Some(SkipReason::NoConnectionVariable));
    }

    #[test]
    fn an_always_set_connection_string_wins_and_no_identity_setting_is_copied() {
        let pod = identity_pod(json!([
            storage_env()[0],
            {"name": "AzureWebJobsStorage__accountName", "value": "orders"},
        ]));
        let out = applied(&pod, &plan(&pod, &settings()));
        assert_eq!(sidecar_env(&out, env::CONNECTION_ACCOUNT_NAME), Value::Null);
        assert!(status_of(&out).get("connection").is_none());
    }

    #[test]
    fn a_client_secret_or_a_foreign_credential_skips_the_pod() {
        for extra in [
            json!({"name": "AzureWebJobsStorage__clientSecret", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}),
            json!({"name": "AzureWebJobsStorage__credential", "value": "azurepipelines"}),
        ] {
            let pod =
                identity_pod(json!([{"name": "AzureWebJobsStorage__accountName", "value": "orders"}, extra]));
            assert_eq!(plan(&pod, &settings()).skipped, Some(SkipReason::UnsupportedCredential), "{extra}");
        }
    }

    #[test]
    fn the_workload_identity_the_app_was_given_is_given_to_the_sidecar() {
        let mut pod = identity_pod(json!([
            {"name": "AzureWebJobsStorage__accountName", "value": "orders"},
            {"name": "AZURE_CLIENT_ID", "value": "c"},
            {"name": "AZURE_TENANT_ID", "value": "t"},
            {"name": "AZURE_FEDERATED_TOKEN_FILE", "value": "/var/run/secrets/azure/tokens/azure-identity-token"},
            {"name": "AZURE_AUTHORITY_HOST", "value": "https://login.microsoftonline.com/"},
            {"name": "AZURE_KUBERNETES_CA_DATA", "value": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----"},
        ]));
        pod["spec"]["containers"][0]["volumeMounts"] = json!([
            {"name": "data", "mountPath": "/var/run/secrets/azure"},
            {"name": "azure-identity-token", "mountPath": "/var/run/secrets/azure/tokens", "readOnly": true},
        ]);
        let out = applied(&pod, &plan(&pod, &settings()));
        for (name, value) in [
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
        ] {
            assert_eq!(sidecar_env(&out, name)["value"], value);
        }
        assert_eq!(sidecar_env(&out, "AZURE_KUBERNETES_CA_DATA"), Value::Null);
        let mounts = out["spec"]["initContainers"][0]["volumeMounts"].as_array().unwrap().clone();
        // The first mount holding the token file by path: `data` is a parent directory of it
        // too, and is what the kubelet would show there only without the nested mount; the
        // copy takes the first that holds it, in the app's order.
        assert!(
            mounts.iter().any(|m| m["mountPath"].as_str().unwrap().starts_with("/var/run/secrets/azure")),
            "{mounts:?}"
        );
    }
}
