//! `manifests/`: every Kubernetes object validates against the Kubernetes JSON schemas
//! (kubernetes-validate from PyPI, schemas bundled in the package), KEDA's objects have the
//! shape KEDA reads, the overlays render, and every name, port, label and annotation matches
//! what the code uses by default.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use clap::CommandFactory;
use durable_scaler::webhook::{self, inject};
use serde_json::{Value, json};

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// Every document of one YAML file.
fn documents(relative: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifests_dir().join(relative)).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap().into_iter().filter(|d| !d.is_null()).collect()
}

fn object(relative: &str, kind: &str, name: &str) -> Value {
    documents(relative)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not in {relative}"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

/// Files a kustomization uses as patches (partial objects, validated after rendering).
fn patch_files() -> BTreeSet<PathBuf> {
    let mut out = Vec::new();
    yaml_files(&manifests_dir(), &mut out);
    let mut patches = BTreeSet::new();
    for file in out.iter().filter(|f| f.file_name().is_some_and(|n| n == "kustomization.yaml")) {
        let kustomization: Value = serde_saphyr::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        for patch in kustomization["patches"].as_array().into_iter().flatten() {
            if let Some(path) = patch["path"].as_str() {
                patches.insert(file.parent().unwrap().join(path));
            }
        }
    }
    patches
}

/// Runs kubernetes-validate (strict: unknown fields are errors) on `files` for `version`.
/// Missing validator: a failure under CI, a loud skip elsewhere.
fn kubernetes_validate(files: &[PathBuf], version: &str) -> bool {
    let probe = Command::new("python3").args(["-c", "import kubernetes_validate"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let message = "kubernetes-validate is not installed (scripts/test installs it: \
                       python3 -m pip install kubernetes-validate)";
        assert!(std::env::var("CI").is_err(), "{message}");
        eprintln!("\n*** SKIPPED: {message} ***\n");
        return false;
    }
    let output = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && !report.contains("ERROR"), "against Kubernetes {version}:\n{report}");
    true
}

/// The built-in Kubernetes objects: every YAML file but kustomizations, patches and KEDA's
/// custom resources (their CRDs are not in the bundled schemas; checked structurally below).
fn kubernetes_files() -> Vec<PathBuf> {
    let mut all = Vec::new();
    yaml_files(&manifests_dir(), &mut all);
    let patches = patch_files();
    all.sort();
    all.into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "kustomization.yaml") && !patches.contains(f))
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.contains("apiVersion: keda.sh/")
        })
        .collect()
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = kubernetes_files();
    assert!(files.len() >= 8, "{files:?}");
    // The oldest version with native sidecars, and the newest the package bundles.
    for version in ["1.29.0", "1.37.0"] {
        if !kubernetes_validate(&files, version) {
            return;
        }
    }
}

/// Applies a strategic-merge patch the way kustomize does for a Deployment's pod spec:
/// containers merge by `name`, and their `env`, `volumeMounts` and the pod's `volumes` merge
/// by `name` (appending new entries).
fn merge_deployment(base: &mut Value, patch: &Value) {
    fn merge_named(base: &mut Value, patch: &Value) {
        for item in patch.as_array().into_iter().flatten() {
            let list = base.as_array_mut().unwrap();
            match list.iter_mut().find(|b| b["name"] == item["name"]) {
                Some(existing) => merge_object(existing, item),
                None => list.push(item.clone()),
            }
        }
    }
    fn merge_object(base: &mut Value, patch: &Value) {
        for (key, value) in patch.as_object().unwrap() {
            match (key.as_str(), base.get_mut(key)) {
                ("containers" | "env" | "volumeMounts" | "volumes", Some(existing)) => {
                    merge_named(existing, value)
                }
                (_, Some(existing)) if existing.is_object() && value.is_object() => {
                    merge_object(existing, value)
                }
                _ => {
                    base[key] = value.clone();
                }
            }
        }
    }
    merge_object(base, patch);
}

fn tls_aggregator() -> Value {
    let mut deployment = object("aggregator.yaml", "Deployment", "durable-scaler-aggregator");
    let patch = &documents("tls/aggregator-tls.yaml")[0];
    merge_deployment(&mut deployment, patch);
    deployment
}

#[test]
fn the_tls_overlay_renders_a_valid_aggregator_with_tls_on_the_keda_port() {
    let deployment = tls_aggregator();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = |name: &str| container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    let cert = env("DURABLE_SCALER_TLS_CERT").unwrap()["value"].as_str().unwrap().to_owned();
    let mount =
        container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "keda-tls").unwrap();
    assert!(cert.starts_with(mount["mountPath"].as_str().unwrap()));
    assert!(env("DURABLE_SCALER_TLS_KEY").is_some());
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("aggregator-tls-rendered.yaml");
    std::fs::write(&rendered, serde_json::to_string(&deployment).unwrap()).unwrap();
    kubernetes_validate(&[rendered], "1.29.0");
}

#[test]
fn the_tls_overlay_gives_sidecars_an_https_aggregator_and_its_ca() {
    let aggregator = tls_aggregator();
    let container = &aggregator["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(container, "DURABLE_SCALER_REPORT_TLS"), "true");
    let known = cli_env("aggregator");
    for env in container["env"].as_array().unwrap() {
        assert!(known.contains(env["name"].as_str().unwrap()), "aggregator does not read {}", env["name"]);
    }

    let mut webhook = object("webhook.yaml", "Deployment", "durable-scaler-webhook");
    merge_deployment(&mut webhook, &documents("tls/webhook-tls.yaml")[0]);
    let pod = &webhook["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let known = cli_env("webhook");
    for env in container["env"].as_array().unwrap() {
        assert!(known.contains(env["name"].as_str().unwrap()), "webhook does not read {}", env["name"]);
    }

    // The URL: https, a name certs-gen puts in the certificate (<service>.<namespace>.svc),
    // the report port of the aggregator's Service.
    let service = object("aggregator.yaml", "Service", "durable-scaler-aggregator");
    let reports =
        service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "reports").unwrap();
    assert_eq!(
        env_value(container, "DURABLE_SCALER_WEBHOOK_AGGREGATOR"),
        format!(
            "https://{}.{}.svc:{}",
            service["metadata"]["name"].as_str().unwrap(),
            service["metadata"]["namespace"].as_str().unwrap(),
            reports["port"]
        )
    );
    // The CA file lies in a volume of the aggregator's TLS Secret that holds ca.crt alone.
    let ca = env_value(container, "DURABLE_SCALER_WEBHOOK_AGGREGATOR_CA");
    let mount =
        container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "aggregator-ca").unwrap();
    assert_eq!(ca, format!("{}/ca.crt", mount["mountPath"].as_str().unwrap()));
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "aggregator-ca").unwrap();
    let aggregator_volume = aggregator["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "keda-tls")
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], aggregator_volume["secret"]["secretName"]);
    assert_eq!(volume["secret"]["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]));

    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("webhook-tls-rendered.yaml");
    std::fs::write(&rendered, serde_json::to_string(&webhook).unwrap()).unwrap();
    kubernetes_validate(&[rendered], "1.29.0");
}

fn string_map(value: &Value) -> bool {
    value.as_object().is_some_and(|m| m.values().all(Value::is_string))
}

/// KEDA's ScaledObject as KEDA v2 reads it (keda-contract.md), checked against the target it
/// scales.
fn check_scaled_object(scaled: &Value, target: &Value) {
    assert_eq!(scaled["apiVersion"], "keda.sh/v1alpha1");
    let spec = &scaled["spec"];
    assert_eq!(spec["scaleTargetRef"]["name"], target["metadata"]["name"]);
    assert_eq!(scaled["metadata"]["namespace"], target["metadata"]["namespace"]);
    let (min, max) = (spec["minReplicaCount"].as_u64().unwrap(), spec["maxReplicaCount"].as_u64().unwrap());
    assert!(min <= max && max > 0);
    assert!(spec["pollingInterval"].as_u64().unwrap() > 0 && spec["cooldownPeriod"].is_u64());
    let known = BTreeSet::from([
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "minReplicaCount",
        "maxReplicaCount",
        "triggers",
    ]);
    assert!(spec.as_object().unwrap().keys().all(|k| known.contains(k.as_str())), "{spec}");

    let trigger = &spec["triggers"][0];
    assert!(matches!(trigger["type"].as_str(), Some("external" | "external-push")));
    let metadata = &trigger["metadata"];
    assert!(string_map(metadata), "trigger metadata values must all be strings: {metadata}");
    let aggregator = object("aggregator.yaml", "Service", "durable-scaler-aggregator");
    let keda_port =
        aggregator["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "keda").unwrap();
    assert_eq!(
        metadata["scalerAddress"].as_str().unwrap(),
        format!(
            "{}.{}:{}",
            aggregator["metadata"]["name"].as_str().unwrap(),
            aggregator["metadata"]["namespace"].as_str().unwrap(),
            keda_port["port"]
        )
    );
    let template = &target["spec"]["template"];
    assert_eq!(metadata["taskHubName"], template["metadata"]["annotations"][inject::TASK_HUB_ANNOTATION]);
    let connection = metadata["connectionFromEnv"].as_str().unwrap();
    let app = &template["spec"]["containers"][0];
    assert!(
        app["env"].as_array().unwrap().iter().any(|e| e["name"] == connection),
        "connectionFromEnv {connection} must name an env var of the scale target's container"
    );
    if let Some(auth) = trigger.get("authenticationRef") {
        assert!(auth["name"].is_string());
        assert_eq!(metadata["enableTLS"], "true");
    }
}

#[test]
fn the_example_scaled_object_has_keda_shape_and_points_at_the_aggregator() {
    let scaled = object("example/scaled-object.yaml", "ScaledObject", "orders-func");
    let target = object("example/function-app.yaml", "Deployment", "orders-func");
    check_scaled_object(&scaled, &target);
    assert_eq!(scaled["spec"]["triggers"][0]["type"], "external-push");
}

#[test]
fn the_tls_example_renders_a_scaled_object_that_uses_its_trigger_authentication() {
    let kustomization: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(manifests_dir().join("tls/example/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let ops: Value = serde_saphyr::from_str(kustomization["patches"][0]["patch"].as_str().unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_value(ops).unwrap();
    let mut scaled = object("example/scaled-object.yaml", "ScaledObject", "orders-func");
    json_patch::patch(&mut scaled, &patch).unwrap();
    let target = object("example/function-app.yaml", "Deployment", "orders-func");
    check_scaled_object(&scaled, &target);

    let auth =
        object("tls/example/trigger-authentication.yaml", "TriggerAuthentication", "durable-scaler-tls");
    assert_eq!(auth["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(scaled["spec"]["triggers"][0]["authenticationRef"]["name"], auth["metadata"]["name"]);
    assert_eq!(auth["metadata"]["namespace"], scaled["metadata"]["namespace"]);
    for reference in auth["spec"]["secretTargetRef"].as_array().unwrap() {
        // KEDA forwards only TLS material from a TriggerAuthentication to external scalers.
        assert!(matches!(reference["parameter"].as_str(), Some("caCert" | "tlsClientCert" | "tlsClientKey")));
        assert!(reference["name"].is_string() && reference["key"].is_string());
    }
}

#[test]
fn kustomizations_list_every_manifest_in_their_directory() {
    for dir in ["", "example", "tls", "tls/example"] {
        let path = manifests_dir().join(dir);
        let kustomization: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(path.join("kustomization.yaml")).unwrap())
                .unwrap();
        let listed: BTreeSet<String> = kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        for resource in &listed {
            assert!(path.join(resource).exists(), "{dir}/kustomization.yaml lists missing {resource}");
        }
        let patches = patch_files();
        for entry in std::fs::read_dir(&path).unwrap() {
            let file = entry.unwrap().path();
            let name = file.file_name().unwrap().to_str().unwrap().to_owned();
            if file.is_file()
                && name.ends_with(".yaml")
                && name != "kustomization.yaml"
                && !patches.contains(&file)
            {
                assert!(listed.contains(&name), "{dir}/{name} is not in its kustomization.yaml");
            }
        }
    }
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The environment variables `durable-scaler <subcommand>` reads.
fn cli_env(subcommand: &str) -> BTreeSet<String> {
    let cli = durable_scaler::cli::Cli::command();
    let subcommand = cli.find_subcommand(subcommand).unwrap();
    subcommand.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap()["value"]
        .as_str()
        .unwrap()
}

fn port_of(address: &str) -> u64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_aggregator_ports_match_the_architecture_defaults() {
    let deployment = object("aggregator.yaml", "Deployment", "durable-scaler-aggregator");
    let aggregator = container(&deployment, "aggregator");
    assert_eq!(aggregator["args"], json!(["aggregator"]));
    let ports: Vec<(String, u64)> = aggregator["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("keda".to_owned(), 4370), ("reports".to_owned(), 4371), ("http".to_owned(), 8080)]);
    for (env, port) in [
        ("DURABLE_SCALER_GRPC_ADDR", 4370),
        ("DURABLE_SCALER_REPORT_ADDR", 4371),
        ("DURABLE_SCALER_HTTP_ADDR", 8080),
    ] {
        assert_eq!(port_of(env_value(aggregator, env)), port, "{env}");
    }
    let service = object("aggregator.yaml", "Service", "durable-scaler-aggregator");
    let service_ports: Vec<u64> =
        service["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert_eq!(service_ports, [4370, 4371, 8080]);
    // The report URL the webhook gives sidecars is this Service's report port.
    assert_eq!(webhook::DEFAULT_AGGREGATOR, "http://durable-scaler-aggregator.durable-scaler:4371");
}

#[test]
fn the_aggregator_has_exactly_the_least_privilege_rules() {
    let role = object("aggregator.yaml", "ClusterRole", "durable-scaler-aggregator");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["get"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale", "statefulsets/scale"], "verbs": ["get"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ])
    );
}

#[test]
fn no_rbac_rule_uses_a_wildcard_and_only_certs_gen_touches_secrets() {
    let mut files = Vec::new();
    yaml_files(&manifests_dir(), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let Ok(docs) = serde_saphyr::from_multiple::<Value>(&text) else { continue };
        for doc in docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole"))) {
            for rule in doc["rules"].as_array().unwrap() {
                let all: Vec<&Value> = ["apiGroups", "resources", "verbs"]
                    .iter()
                    .flat_map(|k| rule[*k].as_array().unwrap())
                    .collect();
                assert!(!all.contains(&&json!("*")), "wildcard in {}: {rule}", file.display());
                if rule["resources"].as_array().unwrap().contains(&json!("secrets")) {
                    assert_eq!(doc["metadata"]["name"], "durable-scaler-certs-gen", "{rule}");
                    assert_eq!(doc["kind"], "Role", "secrets only in certs-gen's own namespace");
                }
            }
        }
    }
}

#[test]
fn the_webhook_deployment_uses_the_code_defaults_and_only_flags_it_knows() {
    let deployment = object("webhook.yaml", "Deployment", "durable-scaler-webhook");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = container(&deployment, "webhook");
    assert_eq!(container["args"], json!(["webhook"]));
    assert_eq!(container["image"], webhook::DEFAULT_IMAGE);
    assert_eq!(env_value(container, "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE"), webhook::DEFAULT_IMAGE);
    assert_eq!(env_value(container, "DURABLE_SCALER_WEBHOOK_AGGREGATOR"), webhook::DEFAULT_AGGREGATOR);
    assert_eq!(env_value(container, "DURABLE_SCALER_WEBHOOK_ADDR"), webhook::DEFAULT_ADDR);
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(port_of(webhook::DEFAULT_ADDR)));

    // Every env var set is one the webhook subcommand reads.
    let known = cli_env("webhook");
    for env in container["env"].as_array().unwrap() {
        assert!(known.contains(env["name"].as_str().unwrap()), "webhook does not read {}", env["name"]);
    }

    // The certificate paths lie in the Secret volume that certs-gen writes.
    let mount = &container["volumeMounts"][0];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    for (env, file) in
        [("DURABLE_SCALER_WEBHOOK_TLS_CERT", "tls.crt"), ("DURABLE_SCALER_WEBHOOK_TLS_KEY", "tls.key")]
    {
        assert_eq!(env_value(container, env), format!("{}/{file}", mount["mountPath"].as_str().unwrap()));
    }
    let certs_gen = object("certs-gen.yaml", "Job", "durable-scaler-certs-gen");
    let create = &certs_gen["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(volume["secret"]["secretName"].as_str(), Some(env_value(create, "CERTS_GEN_SECRET")));

    let service = object("webhook.yaml", "Service", "durable-scaler-webhook");
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], container["ports"][0]["name"]);
    assert_eq!(env_value(create, "CERTS_GEN_SERVICE"), "durable-scaler-webhook");
    let pdb = object("webhook.yaml", "PodDisruptionBudget", "durable-scaler-webhook");
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
}

#[test]
fn the_mutating_webhook_configuration_routes_opted_in_pods_to_the_webhook_service() {
    let config = object(
        "mutating-webhook-configuration.yaml",
        "MutatingWebhookConfiguration",
        "durable-scaler-webhook",
    );
    let hook = &config["webhooks"][0];
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["sideEffects"], "None");
    assert!(matches!(hook["failurePolicy"].as_str(), Some("Ignore" | "Fail")));
    assert!((1..=30).contains(&hook["timeoutSeconds"].as_u64().unwrap()));
    assert_eq!(hook["objectSelector"]["matchLabels"], json!({inject::INJECT_LABEL: "true"}));
    let excluded = &hook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(
        (excluded["key"].as_str(), excluded["operator"].as_str()),
        (Some("kubernetes.io/metadata.name"), Some("NotIn"))
    );
    assert_eq!(excluded["values"], json!(["kube-system", "kube-node-lease", "durable-scaler"]));
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));

    let service = object("webhook.yaml", "Service", "durable-scaler-webhook");
    let client = &hook["clientConfig"]["service"];
    assert_eq!(client["name"], service["metadata"]["name"]);
    assert_eq!(client["namespace"], service["metadata"]["namespace"]);
    assert_eq!(client["port"], service["spec"]["ports"][0]["port"]);
    assert_eq!(client["path"], "/mutate");

    let job = object("certs-gen.yaml", "Job", "durable-scaler-certs-gen");
    let patch = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(patch, "CERTS_GEN_WEBHOOK_CONFIG"), config["metadata"]["name"].as_str().unwrap());
    let role = object("certs-gen.yaml", "ClusterRole", "durable-scaler-certs-gen");
    assert_eq!(role["rules"][0]["resourceNames"], json!([config["metadata"]["name"]]));
}

#[test]
fn the_example_app_opts_in_with_the_fixed_label_and_annotations() {
    let app = object("example/function-app.yaml", "Deployment", "orders-func");
    let template = &app["spec"]["template"];
    assert_eq!(template["metadata"]["labels"][inject::INJECT_LABEL], "true");
    let annotations = template["metadata"]["annotations"].as_object().unwrap();
    assert!(
        annotations
            .keys()
            .all(|k| [inject::TASK_HUB_ANNOTATION, inject::CONNECTION_ENV_ANNOTATION].contains(&k.as_str()))
    );
    let connection = annotations[inject::CONNECTION_ENV_ANNOTATION].as_str().unwrap();
    assert_eq!(connection, inject::DEFAULT_CONNECTION_ENV);
    let secret = object("example/storage-secret.yaml", "Secret", "orders-storage");
    let env = template["spec"]["containers"][0]["env"].as_array().unwrap();
    let reference = &env.iter().find(|e| e["name"] == connection).unwrap()["valueFrom"]["secretKeyRef"];
    assert_eq!(reference["name"], secret["metadata"]["name"]);
    assert!(secret["stringData"].get(reference["key"].as_str().unwrap()).is_some());
}

#[test]
fn every_image_is_the_one_project_image() {
    let mut files = Vec::new();
    yaml_files(&manifests_dir(), &mut files);
    let mut images = BTreeSet::new();
    for file in files.iter().filter(|f| !f.starts_with(manifests_dir().join("example"))) {
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines() {
            if let Some(image) = line.trim().strip_prefix("image: ") {
                images.insert(image.to_owned());
            }
        }
    }
    assert_eq!(images, BTreeSet::from([webhook::DEFAULT_IMAGE.to_owned()]));
}
