//! `manifests/`: every kustomization is rendered with the real kustomize (`kubectl kustomize`),
//! the rendered Kubernetes objects validate against the Kubernetes JSON schemas
//! (kubernetes-validate from PyPI, strict), KEDA's objects against a JSON schema written from
//! KEDA's CRDs (tests/fixtures/keda/, python `jsonschema`), and every name, port, image, RBAC
//! rule and certs-gen step matches what the code uses. RBAC is derived per service account
//! from what its containers do (the certs-gen subcommands they run, the webhook server's
//! calls), so a rule nobody uses or a use nobody granted fails.
//!
//! Python's `jsonschema` is used rather than a Rust crate because it is already installed as a
//! dependency of kubernetes-validate (scripts/test pins both), so the KEDA check adds no crate
//! graph to Cargo.lock and runs in the same venv as the Kubernetes check.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use clap::CommandFactory;
use durable_scaler::{contract, webhook};
use serde_json::{Value, json};

/// Every kustomization under manifests/; a new one must be added here (checked below).
const KUSTOMIZATIONS: [&str; 5] = ["base", "default", "plaintext", "example", "example-plaintext"];
/// The installs a user applies (base is shared by both and not applied on its own).
const INSTALLS: [&str; 2] = ["default", "plaintext"];
const KEDA_SCHEMA: &str = "tests/fixtures/keda/keda-v2.20.2.schema.json";

pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// `kubectl kustomize DIR`: the objects kustomize renders, in its order.
pub fn render_path(dir: &Path) -> Vec<Value> {
    let output = Command::new("kubectl").arg("kustomize").arg(dir).output().unwrap_or_else(|e| {
        panic!("cannot run `kubectl kustomize` (kubectl, which bundles kustomize, must be on PATH): {e}")
    });
    assert!(
        output.status.success(),
        "kubectl kustomize {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap().into_iter().filter(|d| !d.is_null()).collect()
}

fn render(name: &str) -> Vec<Value> {
    render_path(&manifests_dir().join(name))
}

/// The install `install` (a directory under manifests/) with the kustomize components
/// `components` (paths under manifests/), rendered from an overlay in a temporary directory
/// (kustomize takes relative paths only), as a user's own kustomization would include them.
pub fn render_with_components(install: &str, components: &[&str]) -> Vec<Value> {
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = |name: &str| relative(overlay.path(), &manifests_dir().join(name)).display().to_string();
    let components: Vec<String> = components.iter().map(|c| format!("  - {}\n", path(c))).collect();
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{}",
            path(install),
            components.concat()
        ),
    )
    .unwrap();
    render_path(overlay.path())
}

pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
}

fn is_keda(object: &Value) -> bool {
    object["apiVersion"].as_str().is_some_and(|v| v.starts_with("keda.sh/"))
}

/// Python from the venv scripts/test puts on PATH, when it has `module`. Missing: a failure
/// under CI, a loud skip elsewhere.
pub(crate) fn python_with(module: &str) -> bool {
    let probe = Command::new("python3").args(["-c", &format!("import {module}")]).output();
    if probe.is_ok_and(|o| o.status.success()) {
        return true;
    }
    let message = format!("python3 cannot import {module} (scripts/test installs it in target/test-venv)");
    assert!(std::env::var("CI").is_err(), "{message}");
    eprintln!("\n*** SKIPPED: {message} ***\n");
    false
}

fn write_yaml(dir: &Path, name: &str, objects: &[&Value]) -> PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = objects.iter().map(|o| serde_json::to_string(o).unwrap()).collect();
    std::fs::write(&path, text.join("\n---\n")).unwrap();
    path
}

/// kubernetes-validate (strict: unknown fields are errors) on the built-in objects.
pub(crate) fn kubernetes_validate(objects: &[&Value], version: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = write_yaml(dir.path(), "rendered.yaml", objects);
    let output = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
        .arg(&file)
        .output()
        .unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // An object whose kind the version lacks is only a warning to kubernetes-validate; to the
    // API server of that version it is an error.
    let unknown_kind = report.contains("Couldn't find schema");
    if output.status.success() && !report.contains("ERROR") && !unknown_kind { Ok(()) } else { Err(report) }
}

/// The admission policy kinds, `admissionregistration.k8s.io/v1` from Kubernetes 1.30 on.
pub(crate) fn is_admission_policy(object: &Value) -> bool {
    object["apiVersion"] == "admissionregistration.k8s.io/v1"
        && object["kind"].as_str().is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
}

/// Validates KEDA objects against tests/fixtures/keda (JSON Schema 2020-12, the definition
/// named by each object's kind).
pub fn keda_validate(objects: &[&Value]) -> Result<(), String> {
    const SCRIPT: &str = r##"
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
errors = []
for obj in json.load(sys.stdin):
    kind = obj.get("kind")
    if kind not in schema["$defs"]:
        errors.append(f"{kind}: no definition in the KEDA schema")
        continue
    validator = jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})
    for e in validator.iter_errors(obj):
        errors.append(f"{kind}/{obj['metadata'].get('name')}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
print("\n".join(errors))
sys.exit(1 if errors else 0)
"##;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(KEDA_SCHEMA))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        serde_json::to_string(objects).unwrap().as_bytes(),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(()) } else { Err(report) }
}

#[test]
fn every_kustomization_under_manifests_is_one_the_tests_render() {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(manifests_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.join("kustomization.yaml").exists() {
            found.insert(path.file_name().unwrap().to_str().unwrap().to_owned());
        }
    }
    assert!(!manifests_dir().join("kustomization.yaml").exists(), "manifests/ itself is not an install");
    assert_eq!(found, KUSTOMIZATIONS.iter().map(|k| (*k).to_owned()).collect());
}

#[test]
fn every_rendered_kubernetes_object_validates_against_the_kubernetes_schemas() {
    if !python_with("kubernetes_validate") {
        return;
    }
    for name in KUSTOMIZATIONS {
        let objects = render(name);
        let builtin: Vec<&Value> = objects.iter().filter(|o| !is_keda(o)).collect();
        assert!(!builtin.is_empty(), "{name}");
        // The oldest version supported (docs/install.md's), the oldest with native sidecars on
        // by default, the first with admissionregistration.k8s.io/v1 admission policies, and the
        // newest the package bundles. Before 1.30 the policy is left out (docs/install.md,
        // "Kubernetes 1.28 and 1.29"), so everything else is checked there.
        for version in ["1.28.0", "1.29.0", "1.30.0", "1.37.0"] {
            let before_policies = matches!(version, "1.28.0" | "1.29.0");
            let objects: Vec<&Value> =
                builtin.iter().copied().filter(|o| !(before_policies && is_admission_policy(o))).collect();
            if let Err(report) = kubernetes_validate(&objects, version) {
                panic!("{name} against Kubernetes {version}:\n{report}");
            }
        }
    }
}

#[test]
fn a_kind_the_kubernetes_version_lacks_fails_the_validation() {
    if !python_with("kubernetes_validate") {
        return;
    }
    let objects = render("default");
    let policy = find(&objects, "ValidatingAdmissionPolicy", "durable-scaler-aggregator-pod-deletion-cost");
    let report = kubernetes_validate(&[policy], "1.29.0").unwrap_err();
    assert!(report.contains("ValidatingAdmissionPolicy"), "{report}");
}

#[test]
fn every_rendered_keda_object_validates_against_the_keda_crd_schema() {
    if !python_with("jsonschema") {
        return;
    }
    let mut seen = BTreeSet::new();
    for name in KUSTOMIZATIONS {
        let objects = render(name);
        let keda: Vec<&Value> = objects.iter().filter(|o| is_keda(o)).collect();
        seen.extend(keda.iter().map(|o| o["kind"].as_str().unwrap().to_owned()));
        if let Err(report) = keda_validate(&keda) {
            panic!("{name} against {KEDA_SCHEMA}:\n{report}");
        }
    }
    assert_eq!(seen, BTreeSet::from(["ScaledObject".to_owned(), "TriggerAuthentication".to_owned()]));
}

#[test]
fn the_keda_schema_refuses_a_field_keda_does_not_have() {
    if !python_with("jsonschema") {
        return;
    }
    let mut scaled = find(&render("example"), "ScaledObject", "orders-func").clone();
    scaled["spec"]["minReplicas"] = json!(0);
    let report = keda_validate(&[&scaled]).unwrap_err();
    assert!(report.contains("minReplicas"), "{report}");
    let mut auth = find(&render("example"), "TriggerAuthentication", "durable-scaler-tls").clone();
    auth["spec"]["secretTargetRef"][0].as_object_mut().unwrap().remove("key");
    assert!(keda_validate(&[&auth]).unwrap_err().contains("'key' is a required property"));
    // The HPA refuses a scaling period over 30 minutes (validateScalingRules).
    let mut scaled = find(&render("example"), "ScaledObject", "orders-func").clone();
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0]["periodSeconds"] =
        json!(3600);
    assert!(keda_validate(&[&scaled]).unwrap_err().contains("periodSeconds"));
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn all_containers(workload: &Value) -> Vec<&Value> {
    ["initContainers", "containers"].iter().flat_map(|list| containers(workload, list)).collect()
}

/// The certs-gen subcommand a container runs (`certs-gen <subcommand> ...`), if any.
fn certs_gen_subcommand(container: &Value) -> Option<&str> {
    (container["command"][0] == "certs-gen").then(|| container["command"][1].as_str()).flatten()
}

fn containers<'a>(workload: &'a Value, list: &str) -> Vec<&'a Value> {
    pod_spec(workload)[list].as_array().into_iter().flatten().collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|list| containers(workload, list))
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// `name`'s value as the kubelet gives it to the process: each `$(VAR)` replaced by VAR's
/// value when VAR is defined earlier in the container's env (kubernetes
/// `third_party/forked/golang/expansion`, used by `makeEnvironmentVariables`); a
/// `metadata.namespace` field reference is `namespace`.
fn expanded_env(container: &Value, name: &str, namespace: &str) -> String {
    let mut known: Vec<(String, String)> = Vec::new();
    for entry in container["env"].as_array().unwrap() {
        let value = match (entry["value"].as_str(), entry["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(value), _) => {
                let mut value = value.to_owned();
                for (var, resolved) in &known {
                    value = value.replace(&format!("$({var})"), resolved);
                }
                value
            }
            (None, Some("metadata.namespace")) => namespace.to_owned(),
            _ => continue,
        };
        if entry["name"] == name {
            return value;
        }
        known.push((entry["name"].as_str().unwrap().to_owned(), value));
    }
    panic!("{name} not set in {}", container["name"])
}

fn env(container: &Value, name: &str) -> String {
    env_value(container, name).unwrap_or_else(|| panic!("{} has no {name}", container["name"])).to_owned()
}

/// The environment variables `durable-scaler <subcommand>` reads.
fn cli_env(subcommand: &str) -> BTreeSet<String> {
    let cli = durable_scaler::cli::Cli::command();
    let subcommand = cli.find_subcommand(subcommand).unwrap();
    subcommand.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect()
}

fn port_of(address: &str) -> u64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

fn service_port(service: &Value, name: &str) -> u64 {
    service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["port"]
        .as_u64()
        .unwrap()
}

/// The volume of `pod` mounted at the directory of `path` in `container`.
fn volume_of<'a>(workload: &'a Value, container: &Value, path: &str) -> &'a Value {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{path} is in no volume of {}", container["name"]));
    pod_spec(workload)["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap()
}

#[test]
fn the_aggregator_ports_match_the_code_defaults_in_every_install() {
    for install in INSTALLS {
        let objects = render(install);
        let deployment = find(&objects, "Deployment", "durable-scaler-aggregator");
        let aggregator = container(deployment, "aggregator");
        assert_eq!(aggregator["args"], json!(["aggregator"]));
        let ports: Vec<(String, u64)> = aggregator["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_owned(), p["containerPort"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            ports,
            [("keda".to_owned(), 4370), ("reports".to_owned(), 4371), ("http".to_owned(), 8080)]
        );
        for (variable, port) in [
            ("DURABLE_SCALER_GRPC_ADDR", 4370),
            ("DURABLE_SCALER_REPORT_ADDR", 4371),
            ("DURABLE_SCALER_HTTP_ADDR", 8080),
        ] {
            assert_eq!(port_of(&env(aggregator, variable)), port, "{install}: {variable}");
        }
        let known = cli_env("aggregator");
        for variable in aggregator["env"].as_array().unwrap() {
            assert!(
                known.contains(variable["name"].as_str().unwrap()),
                "aggregator does not read {variable}"
            );
        }
        let service = find(&objects, "Service", "durable-scaler-aggregator");
        let service_ports: Vec<u64> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        assert_eq!(service_ports, [4370, 4371, 8080]);
    }
}

#[test]
fn the_default_install_serves_tls_on_the_keda_and_report_ports_with_the_certs_gen_certificate() {
    let objects = render("default");
    let deployment = find(&objects, "Deployment", "durable-scaler-aggregator");
    let aggregator = container(deployment, "aggregator");
    assert_eq!(env(aggregator, "DURABLE_SCALER_REPORT_TLS"), "true");
    let cert = env(aggregator, "DURABLE_SCALER_TLS_CERT");
    let volume = volume_of(deployment, aggregator, &cert);
    assert!(env(aggregator, "DURABLE_SCALER_TLS_KEY").starts_with(cert.rsplit_once('/').unwrap().0));
    assert_eq!(volume["secret"]["secretName"], "durable-scaler-aggregator-tls");

    // The aggregator starts only once the mounted Secret holds a certificate for its Service.
    let wait = container(deployment, "wait-for-certificate");
    assert_eq!(wait["command"], json!(["certs-gen", "wait"]));
    assert_eq!(env(wait, "CERTS_GEN_SERVICE"), "durable-scaler-aggregator");
    assert_eq!(volume_of(deployment, wait, &env(wait, "CERTS_GEN_DIR"))["name"], volume["name"]);

    // The certs-gen Deployment keeps that Secret for the aggregator's Service.
    let keeper = find(&objects, "Deployment", "durable-scaler-certs-gen");
    let maker = container(keeper, "aggregator-certificate");
    assert_eq!(maker["command"], json!(["certs-gen", "run"]));
    assert_eq!(env(maker, "CERTS_GEN_SECRET"), "durable-scaler-aggregator-tls");
    assert_eq!(env(maker, "CERTS_GEN_EXTRA_NAMES"), env(wait, "CERTS_GEN_EXTRA_NAMES"));
    let service = find(&objects, "Service", "durable-scaler-aggregator");
    assert_eq!(env(maker, "CERTS_GEN_SERVICE"), service["metadata"]["name"].as_str().unwrap());
}

#[test]
fn the_default_install_gives_sidecars_an_https_aggregator_and_its_ca() {
    let objects = render("default");
    let deployment = find(&objects, "Deployment", "durable-scaler-webhook");
    let webhook = container(deployment, "webhook");
    let known = cli_env("webhook");
    for variable in webhook["env"].as_array().unwrap() {
        assert!(known.contains(variable["name"].as_str().unwrap()), "webhook does not read {variable}");
    }
    // https, a name certs-gen puts in the certificate (<service>.<namespace>.svc), the
    // report port of the aggregator's Service.
    let service = find(&objects, "Service", "durable-scaler-aggregator-reports");
    assert_eq!(
        expanded_env(
            webhook,
            "DURABLE_SCALER_WEBHOOK_AGGREGATOR",
            deployment["metadata"]["namespace"].as_str().unwrap()
        ),
        format!(
            "https://{}.{}.svc:{}",
            service["metadata"]["name"].as_str().unwrap(),
            service["metadata"]["namespace"].as_str().unwrap(),
            service_port(service, "reports")
        )
    );
    // The CA file lies in a volume of the aggregator's TLS Secret that holds ca.crt alone
    // (never the aggregator's key), the one the init container waits on.
    let ca = env(webhook, "DURABLE_SCALER_WEBHOOK_AGGREGATOR_CA");
    let volume = volume_of(deployment, webhook, &ca);
    assert_eq!(volume["secret"]["secretName"], "durable-scaler-aggregator-tls");
    assert_eq!(volume["secret"]["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]));
    let wait = container(deployment, "wait-for-aggregator-ca");
    assert_eq!(wait["command"], json!(["certs-gen", "wait", "--ca-only"]));
    assert_eq!(volume_of(deployment, wait, &env(wait, "CERTS_GEN_DIR"))["name"], volume["name"]);
}

#[test]
fn the_plaintext_install_has_no_tls_on_the_aggregator_and_the_default_report_url() {
    let objects = render("plaintext");
    let aggregator = container(find(&objects, "Deployment", "durable-scaler-aggregator"), "aggregator");
    for variable in ["DURABLE_SCALER_TLS_CERT", "DURABLE_SCALER_REPORT_TLS"] {
        assert_eq!(env_value(aggregator, variable), None, "{variable}");
    }
    let deployment = find(&objects, "Deployment", "durable-scaler-webhook");
    let webhook = container(deployment, "webhook");
    assert_eq!(
        expanded_env(
            webhook,
            "DURABLE_SCALER_WEBHOOK_AGGREGATOR",
            deployment["metadata"]["namespace"].as_str().unwrap()
        ),
        contract::DEFAULT_AGGREGATOR_URL
    );
    let service = find(&objects, "Service", "durable-scaler-aggregator-reports");
    assert_eq!(
        contract::DEFAULT_AGGREGATOR_URL,
        format!(
            "http://{}.{}:{}",
            service["metadata"]["name"].as_str().unwrap(),
            service["metadata"]["namespace"].as_str().unwrap(),
            service_port(service, "reports")
        )
    );
}

#[test]
fn the_webhook_deployment_uses_the_code_defaults() {
    for install in INSTALLS {
        let objects = render(install);
        let deployment = find(&objects, "Deployment", "durable-scaler-webhook");
        assert_eq!(deployment["spec"]["replicas"], 2);
        let webhook = container(deployment, "webhook");
        assert_eq!(webhook["args"], json!(["webhook"]));
        assert_eq!(webhook["image"], webhook::DEFAULT_IMAGE);
        assert_eq!(env(webhook, "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE"), webhook::DEFAULT_IMAGE);
        // The port is set in one place, the `https` containerPort, which the server reads from
        // its pod (it has `get` on its own pods): no address in its env.
        assert_eq!(env_value(webhook, "DURABLE_SCALER_WEBHOOK_ADDR"), None);
        assert_eq!(webhook["ports"][0]["name"], "https");
        assert_eq!(webhook["ports"][0]["containerPort"].as_u64(), Some(u64::from(contract::WEBHOOK_PORT)));
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(webhook[probe]["httpGet"]["port"], "https", "{probe}");
        }
        let service = find(&objects, "Service", "durable-scaler-webhook");
        assert_eq!(service["spec"]["ports"][0]["port"], 443);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], webhook["ports"][0]["name"]);
        let pdb = find(&objects, "PodDisruptionBudget", "durable-scaler-webhook");
        assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    }
}

#[test]
fn the_webhook_server_starts_only_after_a_certificate_whose_ca_certs_gen_puts_in_the_ca_bundle_is_mounted() {
    for install in INSTALLS {
        let objects = render(install);
        let deployment = find(&objects, "Deployment", "durable-scaler-webhook");
        let webhook = container(deployment, "webhook");
        // Every init container only waits for mounted files (plain init containers: each
        // finishes before the next and before the server).
        for init in containers(deployment, "initContainers") {
            assert_eq!(certs_gen_subcommand(init), Some("wait"), "{install}: {}", init["name"]);
            assert!(init.get("restartPolicy").is_none(), "{install}: {}", init["name"]);
        }
        let wait = container(deployment, "wait-for-certificate");
        let served = volume_of(deployment, webhook, &env(webhook, "DURABLE_SCALER_WEBHOOK_TLS_CERT"));
        assert_eq!(
            volume_of(deployment, webhook, &env(webhook, "DURABLE_SCALER_WEBHOOK_TLS_KEY"))["name"],
            served["name"]
        );
        assert_eq!(volume_of(deployment, wait, &env(wait, "CERTS_GEN_DIR"))["name"], served["name"]);
        // Optional: the init container runs (and says what it waits for) before the Secret exists.
        assert_eq!(served["secret"]["optional"], true);
        let service = find(&objects, "Service", "durable-scaler-webhook");
        assert_eq!(env(wait, "CERTS_GEN_SERVICE"), service["metadata"]["name"].as_str().unwrap());

        // The keeper of that Secret makes it for the same Service and writes its CA into the
        // caBundle of the configuration that routes to this Service (before the Secret:
        // certs-gen/src/cluster.rs `reconcile`, tested in certs-gen/tests/cluster.rs).
        let keeper = find(&objects, "Deployment", "durable-scaler-certs-gen");
        let secret = served["secret"]["secretName"].as_str().unwrap();
        let maker = all_containers(keeper)
            .into_iter()
            .find(|c| env_value(c, "CERTS_GEN_SECRET") == Some(secret))
            .unwrap_or_else(|| panic!("{install}: nobody keeps {secret}"));
        assert_eq!(maker["command"], json!(["certs-gen", "run"]));
        assert_eq!(env(maker, "CERTS_GEN_SERVICE"), env(wait, "CERTS_GEN_SERVICE"));
        let config = find(&objects, "MutatingWebhookConfiguration", "durable-scaler-webhook");
        assert_eq!(env(maker, "CERTS_GEN_WEBHOOK_CONFIG"), config["metadata"]["name"].as_str().unwrap());
        assert_eq!(config["webhooks"][0]["clientConfig"]["service"]["name"], service["metadata"]["name"]);
    }
}

/// True when `container` calls the Kubernetes API: the webhook server, the aggregator, and
/// certs-gen's `run`, `create` and `patch` (`wait` reads mounted files only).
fn calls_the_api(container: &Value) -> bool {
    match certs_gen_subcommand(container) {
        Some(subcommand) => subcommand != "wait",
        None => matches!(container["args"][0].as_str(), Some("webhook" | "aggregator")),
    }
}

/// The containers of `workload` that get a service-account token: every one when the pod
/// mounts it automatically, else those mounting a projected volume with a token.
fn containers_with_a_token<'a>(objects: &[Value], workload: &'a Value) -> Vec<&'a Value> {
    let spec = pod_spec(workload);
    let account = find(objects, "ServiceAccount", spec["serviceAccountName"].as_str().unwrap());
    let automount = spec["automountServiceAccountToken"]
        .as_bool()
        .or(account["automountServiceAccountToken"].as_bool())
        .unwrap_or(true);
    if automount {
        return all_containers(workload);
    }
    let token_volumes: BTreeSet<&str> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| {
            v["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s.get("serviceAccountToken").is_some())
        })
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    all_containers(workload)
        .into_iter()
        .filter(|c| {
            c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| token_volumes.contains(m["name"].as_str().unwrap()))
        })
        .collect()
}

#[test]
fn in_every_pod_only_the_containers_that_call_the_api_get_a_service_account_token() {
    for install in INSTALLS {
        let objects = render(install);
        for workload in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let with_token: BTreeSet<&str> = containers_with_a_token(&objects, workload)
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            let calling: BTreeSet<&str> = all_containers(workload)
                .into_iter()
                .filter(|c| calls_the_api(c))
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            assert_eq!(with_token, calling, "{install}: {}", workload["metadata"]["name"]);
        }
        // The init containers that wait for certificates read files only.
        let aggregator = find(&objects, "Deployment", "durable-scaler-aggregator");
        assert!(containers_with_a_token(&objects, aggregator).iter().all(|c| c["name"] == "aggregator"));
    }
}

/// The NetworkPolicy selecting `workload`'s pods (exactly one does).
fn policy_of<'a>(objects: &'a [Value], workload: &Value) -> &'a Value {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    let selecting: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .filter(|p| {
            p["spec"]["podSelector"]["matchLabels"].as_object().unwrap().iter().all(|(k, v)| &labels[k] == v)
        })
        .collect();
    assert_eq!(selecting.len(), 1, "{}", workload["metadata"]["name"]);
    selecting[0]
}

/// The ingress rules of `policy` that open `port` (a container port's name).
fn ingress_for<'a>(policy: &'a Value, port: &str) -> Vec<&'a Value> {
    policy["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rule| rule["ports"].as_array().unwrap().iter().any(|p| p["port"] == port))
        .collect()
}

#[test]
fn network_policies_keep_the_keda_port_to_keda_and_the_report_port_to_pods() {
    for install in INSTALLS {
        let objects = render(install);
        for workload in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let policy = policy_of(&objects, workload);
            assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]), "{install}");
            // Every port a policy opens is a port the pod declares.
            let declared: BTreeSet<&str> = all_containers(workload)
                .iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
                for port in rule["ports"].as_array().unwrap() {
                    assert!(declared.contains(port["port"].as_str().unwrap()), "{install}: {port}");
                }
            }
        }
        let aggregator = policy_of(&objects, find(&objects, "Deployment", "durable-scaler-aggregator"));
        let keda = ingress_for(aggregator, "keda");
        assert_eq!(keda.len(), 1);
        assert_eq!(
            keda[0]["from"],
            json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}])
        );
        let reports = ingress_for(aggregator, "reports");
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0]["from"],
            json!([{"namespaceSelector": {}}]),
            "pods of any namespace, no ipBlock"
        );
        assert_eq!(ingress_for(aggregator, "http").len(), 1);
        // The webhook takes the API server's calls on its admission port and nothing else;
        // certs-gen takes none.
        let webhook = policy_of(&objects, find(&objects, "Deployment", "durable-scaler-webhook"));
        assert_eq!(webhook["spec"]["ingress"], json!([{"ports": [{"port": "https", "protocol": "TCP"}]}]));
        let certs_gen = policy_of(&objects, find(&objects, "Deployment", "durable-scaler-certs-gen"));
        assert!(certs_gen["spec"].get("ingress").is_none());
        // Egress: DNS and HTTPS (the API server, Azure Storage) only.
        for policy in [aggregator, webhook, certs_gen] {
            let ports: BTreeSet<u64> = policy["spec"]["egress"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|rule| rule["ports"].as_array().unwrap())
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            assert_eq!(ports, BTreeSet::from([53, 443, 6443]), "{install}");
        }
    }
}

/// Renders `install` under an overlay that moves it to namespace `namespace`.
fn render_in_namespace(install: &str, namespace: &str) -> Vec<Value> {
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = relative(overlay.path(), &manifests_dir().join(install));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {namespace}\nresources:\n  - {}\n",
            base.display()
        ),
    )
    .unwrap();
    render_path(overlay.path())
}

#[test]
fn a_kustomize_namespace_override_reaches_every_name_that_embeds_the_namespace() {
    const MOVED: &str = "ops-scaler";
    for install in INSTALLS {
        let objects = render_in_namespace(install, MOVED);
        // No leftover of the original namespace where a namespace goes: metadata, binding
        // subjects, the webhook's Service reference, selectors, or a Service's DNS name
        // (`.durable-scaler` followed by `.svc`, `:`, `,` or the end; `inject.durable-scaler.io`
        // is the webhook's own name, not a namespace).
        fn leftovers(value: &Value, path: &str, out: &mut Vec<String>) {
            match value {
                Value::String(text) => {
                    let key = path.rsplit('/').next().unwrap_or_default();
                    let as_namespace = text == "durable-scaler"
                        && (key == "namespace" || path.contains("namespaceSelector"));
                    let in_a_name = text.match_indices(".durable-scaler").any(|(i, m)| {
                        let rest = &text[i + m.len()..];
                        rest.is_empty() || rest.starts_with([':', ',']) || rest.starts_with(".svc")
                    });
                    if as_namespace || in_a_name {
                        out.push(format!("{path}: {text}"));
                    }
                }
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        leftovers(item, &format!("{path}/{i}"), out);
                    }
                }
                Value::Object(map) => {
                    for (k, v) in map {
                        leftovers(v, &format!("{path}/{k}"), out);
                    }
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        for object in &objects {
            leftovers(
                object,
                &format!(
                    "{}/{}",
                    object["kind"].as_str().unwrap(),
                    object["metadata"]["name"].as_str().unwrap()
                ),
                &mut found,
            );
        }
        assert!(found.is_empty(), "{install}: the original namespace is left in:\n{}", found.join("\n"));

        let namespace = objects.iter().find(|o| o["kind"] == "Namespace").unwrap();
        assert_eq!(namespace["metadata"]["name"], MOVED, "{install}");
        let webhook_deployment = find(&objects, "Deployment", "durable-scaler-webhook");
        let url = expanded_env(
            container(webhook_deployment, "webhook"),
            "DURABLE_SCALER_WEBHOOK_AGGREGATOR",
            MOVED,
        );
        assert!(url.contains(&format!("durable-scaler-aggregator-reports.{MOVED}")), "{install}: {url}");
        let config = find(&objects, "MutatingWebhookConfiguration", "durable-scaler-webhook");
        assert_eq!(config["webhooks"][0]["clientConfig"]["service"]["namespace"], MOVED, "{install}");
        for binding in objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding")))
        {
            for subject in binding["subjects"].as_array().unwrap() {
                assert_eq!(subject["namespace"], MOVED, "{install}: {}", binding["metadata"]["name"]);
            }
        }
        if install == "default" {
            let keeper = find(&objects, "Deployment", "durable-scaler-certs-gen");
            let names =
                expanded_env(container(keeper, "aggregator-certificate"), "CERTS_GEN_EXTRA_NAMES", MOVED);
            assert!(names.split(',').all(|name| name.contains(&format!(".{MOVED}"))), "{names}");
        }
    }
}

/// The rules bound to a service account (Role and ClusterRole bindings), as (kind of role,
/// rule) pairs.
fn rules_of(objects: &[Value], account: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for binding in
        objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding")))
    {
        let bound = binding["subjects"].as_array().unwrap().iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == "durable-scaler"
        });
        if !bound {
            continue;
        }
        let role = find(
            objects,
            binding["roleRef"]["kind"].as_str().unwrap(),
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        for rule in role["rules"].as_array().unwrap() {
            let names = rule.get("resourceNames").map_or_else(|| json!(["*any*"]), Clone::clone);
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        for name in names.as_array().unwrap() {
                            let (group, resource) = (group.as_str().unwrap(), resource.as_str().unwrap());
                            let (verb, name) = (verb.as_str().unwrap(), name.as_str().unwrap());
                            let kind = role["kind"].as_str().unwrap().to_owned();
                            out.insert((kind, format!("{verb} {group}/{resource} {name}")));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What the certs-gen commands in `workload`'s pod need: `run` and `create` read, create and
/// replace their Secret (cluster.rs: get, create on 404, update when renewing), and `run`
/// with a webhook configuration also reads and patches it (get, strategic-merge patch of
/// `caBundle`); `patch` reads the Secret and does the same to the configuration; `wait` reads
/// mounted files and needs nothing.
fn certs_gen_needs(workload: &Value) -> BTreeSet<(String, String)> {
    let mut needs = BTreeSet::new();
    let role = |rule: String| ("Role".to_owned(), rule);
    for c in all_containers(workload) {
        let subcommand = certs_gen_subcommand(c);
        if matches!(subcommand, Some("run" | "create")) {
            let secret = env(c, "CERTS_GEN_SECRET");
            needs.insert(role("create /secrets *any*".to_owned()));
            needs.insert(role(format!("get /secrets {secret}")));
            needs.insert(role(format!("update /secrets {secret}")));
        }
        let config = match subcommand {
            Some("run") => env_value(c, "CERTS_GEN_WEBHOOK_CONFIG").map(str::to_owned),
            Some("patch") => {
                needs.insert(role(format!("get /secrets {}", env(c, "CERTS_GEN_SECRET"))));
                Some(env(c, "CERTS_GEN_WEBHOOK_CONFIG"))
            }
            _ => None,
        };
        if let Some(config) = config {
            for verb in ["get", "patch"] {
                needs.insert((
                    "ClusterRole".to_owned(),
                    format!("{verb} admissionregistration.k8s.io/mutatingwebhookconfigurations {config}"),
                ));
            }
        }
    }
    needs
}

/// The rules a role's code declares (`RBAC` beside its calls), as [`rules_of`] lists them: a
/// cluster-wide rule in a ClusterRole, an own-namespace rule in a Role, never by name.
fn needs_of(rbac: &[contract::RbacRule]) -> BTreeSet<(String, String)> {
    rbac.iter()
        .map(|r| {
            let kind = if r.cluster_wide { "ClusterRole" } else { "Role" };
            (kind.to_owned(), format!("{} {}/{} *any*", r.verb, r.api_group, r.resource))
        })
        .collect()
}

/// What the webhook server needs: `durable_scaler::webhook::RBAC` (the kubelets' versions,
/// InjectionSkipped Events in any app namespace, its own pod's image in its namespace).
fn webhook_server_needs() -> BTreeSet<(String, String)> {
    let needs = needs_of(&webhook::RBAC);
    assert_eq!(needs.len(), webhook::RBAC.len(), "no rule declared twice");
    needs
}

#[test]
fn the_webhook_server_has_exactly_list_nodes_create_events_and_get_pods() {
    for install in INSTALLS {
        let objects = render(install);
        let webhook = find(&objects, "Deployment", "durable-scaler-webhook");
        assert_eq!(pod_spec(webhook)["serviceAccountName"], "durable-scaler-webhook");
        assert!(certs_gen_needs(webhook).is_empty(), "{install}: certs-gen in the webhook pod needs the API");
        assert_eq!(rules_of(&objects, "durable-scaler-webhook"), webhook_server_needs(), "{install}");
    }
}

#[test]
fn certs_gen_runs_under_its_own_service_account_with_exactly_the_rules_its_containers_need() {
    for install in INSTALLS {
        let objects = render(install);
        let keeper = find(&objects, "Deployment", "durable-scaler-certs-gen");
        assert_eq!(pod_spec(keeper)["serviceAccountName"], "durable-scaler-certs-gen");
        let needs = certs_gen_needs(keeper);
        // The webhook's Secret and caBundle in every install; the aggregator's Secret with TLS.
        assert!(
            needs.contains(&(
                "ClusterRole".to_owned(),
                "patch admissionregistration.k8s.io/mutatingwebhookconfigurations durable-scaler-webhook"
                    .to_owned()
            ))
        );
        assert_eq!(
            needs.contains(&("Role".to_owned(), "update /secrets durable-scaler-aggregator-tls".to_owned())),
            install == "default"
        );
        assert_eq!(rules_of(&objects, "durable-scaler-certs-gen"), needs, "{install}");
        // Every rule on Secrets is namespaced: a Role in durable-scaler, never a ClusterRole.
        for (kind, rule) in &needs {
            assert!(!rule.contains("/secrets ") || kind == "Role", "{rule}");
        }
    }
}

#[test]
fn only_the_certs_gen_containers_get_rights_on_secrets_or_webhook_configurations() {
    for install in INSTALLS {
        let objects = render(install);
        let sensitive =
            |rule: &String| rule.contains("/secrets ") || rule.contains("/mutatingwebhookconfigurations ");
        for workload in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let account = pod_spec(workload)["serviceAccountName"].as_str().unwrap();
            let rights = rules_of(&objects, account).into_iter().any(|(_, rule)| sensitive(&rule));
            let only_certs_gen =
                all_containers(workload).iter().all(|c| matches!(certs_gen_subcommand(c), Some("run")));
            assert_eq!(rights, only_certs_gen, "{install}: {}", workload["metadata"]["name"]);
        }
    }
}

#[test]
fn the_aggregator_has_exactly_the_rules_its_code_declares_and_nothing_on_secrets() {
    let needs = needs_of(&durable_scaler::kubernetes::RBAC);
    assert_eq!(needs.len(), durable_scaler::kubernetes::RBAC.len(), "no rule declared twice");
    // Events through events.k8s.io, created only: the recorder never patches or uses core/v1.
    assert!(needs.contains(&("ClusterRole".to_owned(), "create events.k8s.io/events *any*".to_owned())));
    for install in INSTALLS {
        let objects = render(install);
        let all = rules_of(&objects, "durable-scaler-aggregator");
        assert_eq!(all, needs, "{install}");
        assert!(all.iter().all(|(_, rule)| !rule.contains("/secrets ")), "{all:?}");
    }
}

#[test]
fn no_rbac_rule_uses_a_wildcard() {
    for install in INSTALLS {
        for role in
            render(install).iter().filter(|o| matches!(o["kind"].as_str(), Some("Role" | "ClusterRole")))
        {
            for rule in role["rules"].as_array().unwrap() {
                for key in ["apiGroups", "resources", "verbs"] {
                    assert!(!rule[key].as_array().unwrap().contains(&json!("*")), "{install}: {rule}");
                }
            }
        }
    }
}

#[test]
fn no_pod_mounts_the_ca_key_of_a_certs_gen_secret() {
    for install in INSTALLS {
        let objects = render(install);
        let keeper = find(&objects, "Deployment", "durable-scaler-certs-gen");
        let kept: BTreeSet<String> =
            all_containers(keeper).iter().map(|c| env(c, "CERTS_GEN_SECRET")).collect();
        let mut mounts = 0;
        for workload in objects.iter().filter(|o| o["kind"] == "Deployment") {
            for volume in pod_spec(workload)["volumes"].as_array().into_iter().flatten() {
                let Some(secret) = volume["secret"]["secretName"].as_str() else { continue };
                if !kept.contains(secret) {
                    continue;
                }
                mounts += 1;
                // Without `items` the kubelet writes every key, ca.key (certs-gen's) included.
                let keys: BTreeSet<&str> = volume["secret"]["items"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{install}: {} mounts all of {secret}", volume["name"]))
                    .iter()
                    .map(|item| item["key"].as_str().unwrap())
                    .collect();
                assert!(!keys.contains("ca.key"), "{install}: {}", volume["name"]);
                assert!(keys.is_subset(&BTreeSet::from(["ca.crt", "tls.crt", "tls.key"])), "{keys:?}");
            }
        }
        // The webhook's own, plus in the TLS install the aggregator's and the webhook's copy of its CA.
        assert_eq!(mounts, if install == "default" { 3 } else { 1 }, "{install}");
    }
}

#[test]
fn no_install_renders_a_job_whose_template_would_block_a_reapply_and_one_certificate_keeper_runs() {
    for install in INSTALLS {
        let objects = render(install);
        assert!(!objects.iter().any(|o| matches!(o["kind"].as_str(), Some("Job" | "CronJob"))), "{install}");
        let keeper = find(&objects, "Deployment", "durable-scaler-certs-gen");
        assert_eq!(keeper["spec"]["replicas"], 1);
        // Recreate: the old keeper stops before the new one starts, never two at once.
        assert_eq!(keeper["spec"]["strategy"]["type"], "Recreate");
    }
}

#[test]
fn the_mutating_webhook_configuration_routes_opted_in_pods_to_the_webhook_service() {
    let objects = render("default");
    let config = find(&objects, "MutatingWebhookConfiguration", "durable-scaler-webhook");
    let hook = &config["webhooks"][0];
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    // Its one side effect, the InjectionSkipped Event, is never recorded for a dry run.
    assert_eq!(hook["sideEffects"], "NoneOnDryRun");
    assert!((1..=30).contains(&hook["timeoutSeconds"].as_u64().unwrap()));
    assert_eq!(hook["objectSelector"]["matchLabels"], json!({contract::INJECT_LABEL: "true"}));
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"],
        json!([
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "kube-node-lease"]},
            {"key": contract::INJECT_LABEL, "operator": "NotIn", "values": [contract::NAMESPACE_OPT_OUT]},
        ])
    );
    // durable-scaler's own namespace opts out by the same label, so the webhook never
    // depends on itself, whatever the namespace is called.
    let namespace = objects.iter().find(|o| o["kind"] == "Namespace").unwrap();
    assert_eq!(namespace["metadata"]["labels"][contract::INJECT_LABEL], contract::NAMESPACE_OPT_OUT);
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));
    assert!(hook["clientConfig"].get("caBundle").is_none(), "certs-gen owns caBundle; apply must not set it");
    let service = find(&objects, "Service", "durable-scaler-webhook");
    let client = &hook["clientConfig"]["service"];
    assert_eq!(client["name"], service["metadata"]["name"]);
    assert_eq!(client["namespace"], service["metadata"]["namespace"]);
    assert_eq!(client["port"], service["spec"]["ports"][0]["port"]);
    assert_eq!(client["path"], "/mutate");
}

#[test]
fn the_example_app_opts_in_and_leaves_the_replica_count_to_keda() {
    for example in ["example", "example-plaintext"] {
        let objects = render(example);
        let app = find(&objects, "Deployment", "orders-func");
        assert!(app["spec"].get("replicas").is_none(), "{example}: replicas fights KEDA on every apply");
        let template = &app["spec"]["template"];
        assert_eq!(template["metadata"]["labels"][contract::INJECT_LABEL], "true");
        let annotations = template["metadata"]["annotations"].as_object().unwrap();
        assert!(annotations.keys().all(|k| {
            [contract::TASK_HUB_ANNOTATION, contract::CONNECTION_ENV_ANNOTATION].contains(&k.as_str())
        }));
        let connection = annotations[contract::CONNECTION_ENV_ANNOTATION].as_str().unwrap();
        assert_eq!(connection, contract::DEFAULT_CONNECTION_ENV);
        let secret = find(&objects, "Secret", "orders-storage");
        let variables = template["spec"]["containers"][0]["env"].as_array().unwrap();
        let reference =
            &variables.iter().find(|e| e["name"] == connection).unwrap()["valueFrom"]["secretKeyRef"];
        assert_eq!(reference["name"], secret["metadata"]["name"]);
        assert!(secret["stringData"].get(reference["key"].as_str().unwrap()).is_some());

        let scaled = find(&objects, "ScaledObject", "orders-func");
        assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], app["metadata"]["name"]);
        assert_eq!(scaled["metadata"]["namespace"], app["metadata"]["namespace"]);
        // KEDA's x-kubernetes-validations rule, which JSON Schema cannot say.
        assert!(scaled["spec"]["minReplicaCount"].as_u64() <= scaled["spec"]["maxReplicaCount"].as_u64());
        assert!(objects.iter().all(|o| o["kind"] != "HorizontalPodAutoscaler"), "KEDA makes the HPA");
        let metadata = &scaled["spec"]["triggers"][0]["metadata"];
        assert_eq!(
            metadata["taskHubName"],
            template["metadata"]["annotations"][contract::TASK_HUB_ANNOTATION]
        );
        assert!(
            variables.iter().any(|e| e["name"] == metadata["connectionFromEnv"]),
            "connectionFromEnv must name an env var of the scale target's container"
        );
    }
}

/// DurableTask.AzureStorage's partition lease timings (AzureStorageOrchestrationServiceSettings.cs:
/// `LeaseInterval` 30 s, `LeaseAcquireInterval` 10 s), which the Durable extension leaves at
/// their defaults.
const LEASE_INTERVAL_S: u64 = 30;
const LEASE_ACQUIRE_INTERVAL_S: u64 = 10;

#[test]
fn the_example_scales_in_one_pod_at_a_time_no_faster_than_its_partitions_can_move() {
    for example in ["example", "example-plaintext"] {
        let objects = render(example);
        let app = find(&objects, "Deployment", "orders-func");
        let grace = pod_spec(app)["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let scaled = find(&objects, "ScaledObject", "orders-func");
        let down = &scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"];
        let policies = down["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 1, "{example}: one policy, so selectPolicy cannot pick a faster one");
        assert_eq!(policies[0]["type"], "Pods");
        assert_eq!(policies[0]["value"], 1, "{example}: one pod per period");
        let period = policies[0]["periodSeconds"].as_u64().unwrap();
        assert!(
            period >= grace + LEASE_INTERVAL_S + LEASE_ACQUIRE_INTERVAL_S,
            "{example}: {period} s is shorter than the grace period ({grace} s) plus a lease's expiry and takeover"
        );
        assert_eq!(down["stabilizationWindowSeconds"], 300);
        assert!(
            scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"].get("scaleUp").is_none()
        );
    }
}

#[test]
fn the_example_scaled_objects_point_at_the_aggregator_with_tls_matching_the_install() {
    let install = render("default");
    let service = find(&install, "Service", "durable-scaler-aggregator");
    let address = format!(
        "{}.{}:{}",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap(),
        service_port(service, "keda")
    );
    // The metadata keys KEDA's external scaler reads itself (pkg/scalers/external_scaler.go:
    // scalerAddress, enableTLS, unsafeSsl; caCert, tlsClientCert, tlsClientKey come from
    // the TriggerAuthentication), the rest passed on to us.
    let ours = ["taskHubName", "connectionFromEnv", "maxActivitiesPerWorker", "maxOrchestrationsPerWorker"];

    let tls = render("example");
    let scaled = find(&tls, "ScaledObject", "orders-func");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "external-push");
    assert_eq!(trigger["metadata"]["scalerAddress"], address.as_str());
    assert_eq!(trigger["metadata"]["enableTLS"], "true");
    let keys: BTreeSet<&str> = trigger["metadata"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ours.iter().copied().chain(["scalerAddress", "enableTLS"]).collect());
    let auth = find(&tls, "TriggerAuthentication", trigger["authenticationRef"]["name"].as_str().unwrap());
    assert_eq!(auth["metadata"]["namespace"], scaled["metadata"]["namespace"]);
    assert_eq!(
        auth["spec"]["secretTargetRef"],
        json!([{"parameter": "caCert", "name": "durable-scaler-aggregator-ca", "key": "ca.crt"}])
    );

    let plain = render("example-plaintext");
    let scaled = find(&plain, "ScaledObject", "orders-func");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["scalerAddress"], address.as_str());
    assert!(trigger.get("authenticationRef").is_none());
    let keys: BTreeSet<&str> = trigger["metadata"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ours.iter().copied().chain(["scalerAddress"]).collect());
    assert!(!plain.iter().any(|o| o["kind"] == "TriggerAuthentication"));
}

#[test]
fn every_image_of_the_installs_is_the_one_project_image() {
    for install in INSTALLS {
        let objects = render(install);
        let mut images = BTreeSet::new();
        for workload in objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("Deployment"))) {
            for c in all_containers(workload) {
                images.insert(c["image"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(images, BTreeSet::from([webhook::DEFAULT_IMAGE.to_owned()]), "{install}");
    }
}

/// `to` relative to the directory `from` (both absolute).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in from.components().skip(common) {
        out.push("..");
    }
    out.extend(to.components().skip(common));
    out
}

#[test]
fn an_images_override_in_an_overlay_also_changes_the_injected_sidecar_image() {
    // kustomize takes bases by relative path only, so the overlay lives in a temporary
    // directory under target/ and names manifests/default relatively.
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = relative(overlay.path(), &manifests_dir().join("default"));
    let image = webhook::DEFAULT_IMAGE.rsplit_once(':').unwrap().0;
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n\
             images:\n  - name: {image}\n    newName: registry.example.com/team/durable-scaler\n    newTag: \"1.2.3\"\n",
            base.display()
        ),
    )
    .unwrap();
    let objects = render_path(overlay.path());
    let webhook = container(find(&objects, "Deployment", "durable-scaler-webhook"), "webhook");
    let wanted = "registry.example.com/team/durable-scaler:1.2.3";
    assert_eq!(webhook["image"], wanted);
    assert_eq!(env(webhook, "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE"), wanted);
    // Every other image follows too, and no other env value was taken for an image.
    for workload in objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("Deployment"))) {
        for c in all_containers(workload) {
            assert_eq!(c["image"], wanted, "{}", c["name"]);
        }
    }
    assert_eq!(env_value(webhook, "DURABLE_SCALER_WEBHOOK_ADDR"), None);
}

/// The first ```yaml block of docs/install.md's section headed `## heading`, its base path
/// pointed at `install` from `overlay`: the overlays the install guide shows are rendered by
/// the real kustomize.
fn documented_overlay(heading: &str, overlay: &Path, install: &str) -> String {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/install.md")).unwrap();
    let section = guide
        .split_once(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("docs/install.md has no section {heading}"))
        .1;
    let block = section.split_once("```yaml\n").unwrap().1.split_once("```").unwrap().0;
    let base = relative(overlay, &manifests_dir().join(install));
    block.replace("../durable-scaler/manifests/default", &base.display().to_string())
}

#[test]
fn the_documented_private_registry_overlay_gives_every_pod_and_the_sidecars_the_pull_secret() {
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        documented_overlay("Private registries", overlay.path(), "default"),
    )
    .unwrap();
    let objects = render_path(overlay.path());
    for workload in objects.iter().filter(|o| o["kind"] == "Deployment") {
        assert_eq!(pod_spec(workload)["imagePullSecrets"], json!([{"name": "registry-credentials"}]));
        for c in all_containers(workload) {
            assert!(
                c["image"].as_str().unwrap().starts_with("registry.example.com/team/durable-scaler"),
                "{c}"
            );
        }
    }
    let webhook = container(find(&objects, "Deployment", "durable-scaler-webhook"), "webhook");
    assert_eq!(env(webhook, "DURABLE_SCALER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS"), "registry-credentials");
    if python_with("kubernetes_validate") {
        let builtin: Vec<&Value> = objects.iter().filter(|o| !is_keda(o)).collect();
        kubernetes_validate(&builtin, "1.37.0").unwrap();
    }
}

#[test]
fn the_webhook_port_changes_in_one_place_for_a_private_cluster() {
    // GKE private clusters let the control plane reach nodes on 443 and 10250 only: an overlay
    // moves the webhook to 10250 by patching its containerPort, and nothing else.
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = relative(overlay.path(), &manifests_dir().join("default"));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\npatches:\n  \
             - target: {{kind: Deployment, name: durable-scaler-webhook}}\n    patch: |-\n      \
             - op: replace\n        path: /spec/template/spec/containers/0/ports/0/containerPort\n        value: 10250\n",
            base.display()
        ),
    )
    .unwrap();
    let objects = render_path(overlay.path());
    let deployment = find(&objects, "Deployment", "durable-scaler-webhook");
    let webhook = container(deployment, "webhook");
    assert_eq!(webhook["ports"], json!([{"name": "https", "containerPort": 10250, "protocol": "TCP"}]));
    assert_eq!(
        env_value(webhook, "DURABLE_SCALER_WEBHOOK_ADDR"),
        None,
        "the server follows the containerPort"
    );
    let service = find(&objects, "Service", "durable-scaler-webhook");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "https");
    let policy = policy_of(&objects, deployment);
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "https");
}

// ---------------------------------------------------------------------------------------------
// The ValidatingAdmissionPolicy that bounds the aggregator's `patch pods`
// ---------------------------------------------------------------------------------------------

/// Evaluates a rendered ValidatingAdmissionPolicy and its binding on admission requests with
/// cel-python (a CEL implementation), the way the API server does
/// (kubernetes staging/src/k8s.io/apiserver/pkg/admission/plugin/policy/validating: the
/// binding names the policy and its actions; `matchConstraints.resourceRules` select the
/// request by group, version, operation and resource or `resource/subresource`; every
/// `matchConditions` expression must be true, else the policy does not apply; then every
/// validation must be true; an expression that errors counts as `failurePolicy` says, Fail:
/// refused). The variables are the ones the API server binds: `object` and `oldObject` (the
/// objects as JSON; null where the operation has none: no oldObject on CREATE, no object on
/// DELETE) and `request` (admission/v1 AdmissionRequest as JSON, empty fields left out as its
/// `omitempty` tags say, so `has(request.subResource)` is false on the pod itself).
/// Prints one verdict per case: "allowed", "not matched" or "refused: <message>".
const VAP_HARNESS: &str = r#"
import json, sys
import celpy

policy, binding, cases = json.load(sys.stdin)
assert binding["spec"]["policyName"] == policy["metadata"]["name"]
assert binding["spec"]["validationActions"] == ["Deny"]
spec = policy["spec"]
env = celpy.Environment()
def program(expression):
    return env.program(env.compile(expression))
conditions = [program(c["expression"]) for c in spec.get("matchConditions", [])]
validations = [(program(v["expression"]), v.get("message", v["expression"])) for v in spec["validations"]]

def rule_matches(rule, request):
    resource = request["resource"]["resource"]
    sub = request.get("subResource")
    wanted = resource + ("/" + sub if sub else "")
    def has(key, value):
        return "*" in rule[key] or value in rule[key]
    resources = rule["resources"]
    return (has("apiGroups", request["resource"]["group"]) and has("apiVersions", request["resource"]["version"])
            and has("operations", request["operation"])
            and (wanted in resources or "*" in resources or (sub and resource + "/*" in resources)))

def truth(prog, activation):
    try:
        return prog.evaluate(activation) == celpy.celtypes.BoolType(True), None
    except celpy.CELEvalError as e:
        return False, f"expression resulted in error: {e}"

for case in cases:
    request = case["request"]
    if not any(rule_matches(r, request) for r in spec["matchConstraints"]["resourceRules"]):
        print("not matched"); continue
    activation = {name: celpy.json_to_cel(case.get(name)) for name in ("object", "oldObject", "request")}
    met = [truth(c, activation) for c in conditions]
    if any(error for _, error in met):
        print("refused: match condition error" if spec.get("failurePolicy", "Fail") == "Fail" else "allowed"); continue
    if not all(ok for ok, _ in met):
        print("not matched"); continue
    refusals = []
    for prog, message in validations:
        ok, error = truth(prog, activation)
        if not ok:
            refusals.append(error if error and spec.get("failurePolicy", "Fail") == "Fail" else message)
    print("refused: " + refusals[0] if refusals else "allowed")
"#;

const AGGREGATOR_USER: &str = "system:serviceaccount:durable-scaler:durable-scaler-aggregator";

/// A pod as kube-apiserver stores and serves it, made by a ReplicaSet and injected.
fn stored_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "orders-func-7d9c-x2v4q", "generateName": "orders-func-7d9c-", "namespace": "orders",
            "uid": "5f6a6c2e-1d1b-4f5e-9d7e-0c1f3a2b4c5d", "resourceVersion": "48213",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"app": "orders-func", "durable-scaler.io/inject": "true", "pod-template-hash": "7d9c"},
            "annotations": {"durable-scaler.io/task-hub": "OrdersHub", "durable-scaler.io/status": "{\"version\":\"0.1.0\"}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-func-7d9c",
                                 "uid": "0b1c2d3e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
        },
        "spec": {
            "containers": [{"name": "functions", "image": "example.azurecr.io/orders-func:1.0.0",
                            "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "250m", "memory": "256Mi"}}}],
            "initContainers": [{"name": "durable-scaler-sidecar", "image": "ghcr.io/durable-scaler/durable-scaler:0.1.0", "restartPolicy": "Always"}],
            "nodeName": "aks-nodepool1-0", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
        },
        "status": {"phase": "Running", "podIP": "10.244.1.17", "qosClass": "Burstable"},
    })
}

/// `pod` after the aggregator's merge patch of the annotation to `value` (None: removed), as
/// the API server hands it to admission: the patch applied to the stored object, and the
/// field manager's entry added to managedFields (resourceVersion unchanged until stored).
fn patched_by_the_aggregator(pod: &Value, value: Option<&str>) -> Value {
    let mut out = pod.clone();
    let patch = json!({"metadata": {"annotations": {durable_scaler::kubernetes::POD_DELETION_COST_ANNOTATION: value}}});
    json_patch::merge(&mut out, &patch);
    out["metadata"]["managedFields"].as_array_mut().unwrap().push(json!({
        "manager": durable_scaler::kubernetes::FIELD_MANAGER, "operation": "Update", "apiVersion": "v1",
        "time": "2026-12-01T10:05:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {"f:controller.kubernetes.io/pod-deletion-cost": {}}}},
    }));
    out
}

/// An admission/v1 AdmissionRequest as JSON, as the API server builds it
/// (`CreateAdmissionRequest`): empty fields left out.
fn admission_request(operation: &str, user: &str, sub_resource: Option<&str>) -> Value {
    let mut request = json!({
        "uid": "b9e7c6d2-3c4a-4b8e-9a1f-2d3e4f5a6b7c",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "orders-func-7d9c-x2v4q", "namespace": "orders", "operation": operation,
        "userInfo": {"username": user, "uid": "2c7b1f0e-aaaa-4bbb-8ccc-000000000002",
                     "groups": ["system:serviceaccounts", "system:serviceaccounts:durable-scaler", "system:authenticated"]},
        "dryRun": false,
    });
    if let Some(sub) = sub_resource {
        request["subResource"] = json!(sub);
        request["requestSubResource"] = json!(sub);
    }
    request
}

fn case(request: Value, object: Option<Value>, old: Option<Value>) -> Value {
    json!({"request": request, "object": object, "oldObject": old})
}

#[test]
fn the_pod_deletion_cost_policy_lets_the_aggregator_change_that_one_annotation_and_nothing_else() {
    if !python_with("celpy") {
        return;
    }
    let objects = render("default");
    let policy = find(&objects, "ValidatingAdmissionPolicy", "durable-scaler-aggregator-pod-deletion-cost");
    let binding =
        find(&objects, "ValidatingAdmissionPolicyBinding", "durable-scaler-aggregator-pod-deletion-cost");
    let key = durable_scaler::kubernetes::POD_DELETION_COST_ANNOTATION;
    let update = |user: &str| admission_request("UPDATE", user, None);
    let aggregator = || update(AGGREGATOR_USER);
    let pod = stored_pod();
    let mut with_cost = pod.clone();
    with_cost["metadata"]["annotations"][key] = json!("17");
    let mut bare = pod.clone();
    bare["metadata"].as_object_mut().unwrap().remove("annotations");
    let changed = |edit: &dyn Fn(&mut Value)| {
        let mut object = patched_by_the_aggregator(&pod, Some("4"));
        edit(&mut object);
        object
    };

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "the aggregator sets the cost",
            case(aggregator(), Some(patched_by_the_aggregator(&pod, Some("4"))), Some(pod.clone())),
            "allowed",
        ),
        (
            "the aggregator changes the cost",
            case(
                aggregator(),
                Some(patched_by_the_aggregator(&with_cost, Some("-3"))),
                Some(with_cost.clone()),
            ),
            "allowed",
        ),
        (
            "the aggregator removes the cost",
            case(aggregator(), Some(patched_by_the_aggregator(&with_cost, None)), Some(with_cost.clone())),
            "allowed",
        ),
        (
            "the aggregator sets the cost on a pod without annotations",
            case(aggregator(), Some(patched_by_the_aggregator(&bare, Some("0"))), Some(bare.clone())),
            "allowed",
        ),
        (
            "the same account in a namespace moved by kustomize",
            case(
                update("system:serviceaccount:ops-scaler:durable-scaler-aggregator"),
                Some(patched_by_the_aggregator(&pod, Some("4"))),
                Some(pod.clone()),
            ),
            "allowed",
        ),
        (
            "another user changes labels",
            case(
                update("system:serviceaccount:kube-system:replicaset-controller"),
                Some(changed(&|p| p["metadata"]["labels"]["extra"] = json!("x"))),
                Some(pod.clone()),
            ),
            "not matched",
        ),
        (
            "the aggregator changes another annotation",
            case(
                aggregator(),
                Some(changed(&|p| {
                    p["metadata"]["annotations"]["durable-scaler.io/task-hub"] = json!("Other")
                })),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change the controller.kubernetes.io/pod-deletion-cost annotation",
        ),
        (
            "the aggregator adds another annotation",
            case(
                aggregator(),
                Some(changed(&|p| p["metadata"]["annotations"]["prometheus.io/scrape"] = json!("true"))),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change the controller.kubernetes.io/pod-deletion-cost annotation",
        ),
        (
            "the aggregator removes another annotation",
            case(
                aggregator(),
                Some(changed(&|p| {
                    p["metadata"]["annotations"].as_object_mut().unwrap().remove("durable-scaler.io/status");
                })),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change the controller.kubernetes.io/pod-deletion-cost annotation",
        ),
        (
            "the aggregator adds a label",
            case(
                aggregator(),
                Some(changed(&|p| p["metadata"]["labels"]["evil"] = json!("1"))),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change a pod's controller.kubernetes.io/pod-deletion-cost annotation, not its spec",
        ),
        (
            "the aggregator changes the image",
            case(
                aggregator(),
                Some(changed(&|p| p["spec"]["containers"][0]["image"] = json!("evil:1"))),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change a pod's controller.kubernetes.io/pod-deletion-cost annotation, not its spec",
        ),
        (
            "the aggregator drops the owner reference",
            case(
                aggregator(),
                Some(changed(&|p| {
                    p["metadata"].as_object_mut().unwrap().remove("ownerReferences");
                })),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change a pod's controller.kubernetes.io/pod-deletion-cost annotation, not its spec",
        ),
        (
            "the aggregator adds a finalizer",
            case(
                aggregator(),
                Some(changed(&|p| p["metadata"]["finalizers"] = json!(["example.com/hold"]))),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only change a pod's controller.kubernetes.io/pod-deletion-cost annotation, not its spec",
        ),
        (
            "the aggregator updates pods/status",
            case(
                admission_request("UPDATE", AGGREGATOR_USER, Some("status")),
                Some(changed(&|p| p["status"]["phase"] = json!("Failed"))),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only update a pod's controller.kubernetes.io/pod-deletion-cost annotation: no create, delete or subresource",
        ),
        (
            "the aggregator adds an ephemeral container",
            case(
                admission_request("UPDATE", AGGREGATOR_USER, Some("ephemeralcontainers")),
                Some(changed(&|p| {
                    p["spec"]["ephemeralContainers"] = json!([{"name": "debug", "image": "busybox"}])
                })),
                Some(pod.clone()),
            ),
            "refused: durable-scaler-aggregator may only update a pod's controller.kubernetes.io/pod-deletion-cost annotation: no create, delete or subresource",
        ),
        (
            "the aggregator deletes a pod",
            case(admission_request("DELETE", AGGREGATOR_USER, None), None, Some(pod.clone())),
            "refused: durable-scaler-aggregator may only update a pod's controller.kubernetes.io/pod-deletion-cost annotation: no create, delete or subresource",
        ),
        (
            "the aggregator creates a pod",
            case(admission_request("CREATE", AGGREGATOR_USER, None), Some(pod.clone()), None),
            "refused: durable-scaler-aggregator may only update a pod's controller.kubernetes.io/pod-deletion-cost annotation: no create, delete or subresource",
        ),
    ];
    let input = json!([policy, binding, cases.iter().map(|(_, c, _)| c).collect::<Vec<_>>()]);
    let mut child = Command::new("python3")
        .args(["-c", VAP_HARNESS])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let verdicts: Vec<String> =
        String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(verdicts.len(), cases.len());
    let mut wrong = Vec::new();
    for ((name, _, expected), verdict) in cases.iter().zip(&verdicts) {
        if !verdict.starts_with(expected) {
            wrong.push(format!("{name}: expected {expected:?}, got {verdict:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_documented_overlay_for_1_28_and_1_29_leaves_out_the_policy_the_right_and_the_feature() {
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        documented_overlay("Kubernetes 1.28 and 1.29", overlay.path(), "default"),
    )
    .unwrap();
    let objects = render_path(overlay.path());
    assert!(!objects.iter().any(is_admission_policy));
    let rules = rules_of(&objects, "durable-scaler-aggregator");
    let without_patch: BTreeSet<_> = needs_of(&durable_scaler::kubernetes::RBAC)
        .into_iter()
        .filter(|(_, r)| !r.contains("/pods "))
        .collect();
    assert_eq!(rules, without_patch);
    let aggregator = container(find(&objects, "Deployment", "durable-scaler-aggregator"), "aggregator");
    assert_eq!(env(aggregator, "DURABLE_SCALER_POD_DELETION_COST"), "false");
    // The variable is the flag's (clap reads it), so the aggregator really stops writing.
    assert!(cli_env("aggregator").contains("DURABLE_SCALER_POD_DELETION_COST"));
    if python_with("kubernetes_validate") {
        let builtin: Vec<&Value> = objects.iter().filter(|o| !is_keda(o)).collect();
        kubernetes_validate(&builtin, "1.28.0").unwrap();
    }
}
