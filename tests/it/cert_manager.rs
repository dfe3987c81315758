//! manifests/components/cert-manager: rendered onto the TLS install by the real kustomize, its
//! Issuers and Certificates validated against cert-manager v1.21.1's CRDs (tests/fixtures),
//! the rest against the Kubernetes schemas; certs-gen and every right it held are gone, and
//! the Certificates issue exactly the Secrets, keys and names the pods mount and wait for.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::crd_schema;
use crate::manifests::{
    find, kubernetes_validate, manifests_dir, python_with, render_path, render_with_components,
};

const COMPONENT: &str = "components/cert-manager";
const CRDS: [&str; 2] = [
    "tests/fixtures/cert-manager-v1.21.1/cert-manager.io_certificates.yaml",
    "tests/fixtures/cert-manager-v1.21.1/cert-manager.io_issuers.yaml",
];

fn crds() -> Vec<PathBuf> {
    CRDS.iter().map(|c| Path::new(env!("CARGO_MANIFEST_DIR")).join(c)).collect()
}

fn is_cert_manager(object: &Value) -> bool {
    object["apiVersion"].as_str().is_some_and(|v| v.starts_with("cert-manager.io/"))
}

fn rendered() -> Vec<Value> {
    render_with_components("default", &[COMPONENT])
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

#[test]
fn the_component_adds_issuers_and_certificates_that_validate_and_keeps_the_rest_valid() {
    let objects = rendered();
    let custom: Vec<&Value> = objects.iter().filter(|o| is_cert_manager(o)).collect();
    let kinds: BTreeSet<(&str, &str)> = custom
        .iter()
        .map(|o| (o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            ("Certificate", "durable-scaler-aggregator"),
            ("Certificate", "durable-scaler-ca"),
            ("Certificate", "durable-scaler-webhook"),
            ("Issuer", "durable-scaler-ca"),
            ("Issuer", "durable-scaler-selfsigned"),
        ])
    );
    if python_with("jsonschema") {
        let crds = crds();
        let crds: Vec<&Path> = crds.iter().map(PathBuf::as_path).collect();
        crd_schema::validate(&custom, &crds).unwrap_or_else(|e| panic!("{e}"));
        let mut misspelt = find(&objects, "Certificate", "durable-scaler-webhook").clone();
        misspelt["spec"]["dnsName"] = misspelt["spec"]["dnsNames"].clone();
        let report = crd_schema::validate(&[&misspelt], &crds).unwrap_err();
        assert!(report.contains("dnsName"), "{report}");
    }
    if python_with("kubernetes_validate") {
        let builtin: Vec<&Value> = objects.iter().filter(|o| !is_cert_manager(o)).collect();
        for version in ["1.29.0", "1.37.0"] {
            // admissionregistration.k8s.io/v1 policies exist from 1.30 (docs/install.md: 1.28 and 1.29).
            let objects: Vec<&Value> = builtin
                .iter()
                .copied()
                .filter(|o| version != "1.29.0" || !crate::manifests::is_admission_policy(o))
                .collect();
            kubernetes_validate(&objects, version).unwrap_or_else(|e| panic!("{version}:\n{e}"));
        }
    }
}

#[test]
fn certs_gen_and_every_right_on_secrets_or_webhook_configurations_are_gone() {
    let objects = rendered();
    for workload in of_kind(&objects, "Deployment") {
        let spec = &workload["spec"]["template"]["spec"];
        assert_ne!(spec["serviceAccountName"], "durable-scaler-certs-gen");
        for container in spec["containers"].as_array().unwrap() {
            assert_ne!(container["command"][1], "run", "{}: certs-gen run", container["name"]);
        }
    }
    assert!(!objects.iter().any(|o| o["metadata"]["name"].as_str().is_some_and(|n| n.contains("certs-gen"))));
    for role in objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("Role" | "ClusterRole"))) {
        for rule in role["rules"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                assert!(
                    !matches!(resource.as_str(), Some("secrets" | "mutatingwebhookconfigurations")),
                    "{}: {rule}",
                    role["metadata"]["name"]
                );
            }
        }
    }
    // Nothing else of the install changed but the webhook configuration's annotation.
    let install = render_path(&manifests_dir().join("default"));
    for object in objects.iter().filter(|o| !is_cert_manager(o)) {
        let mut original =
            find(&install, object["kind"].as_str().unwrap(), object["metadata"]["name"].as_str().unwrap())
                .clone();
        if object["kind"] == "MutatingWebhookConfiguration" {
            original["metadata"]["annotations"] =
                json!({"cert-manager.io/inject-ca-from": "durable-scaler/durable-scaler-webhook"});
        }
        assert_eq!(object, &original);
    }
}

#[test]
fn cainjector_writes_the_ca_of_the_certificate_the_webhook_serves_into_the_ca_bundle() {
    let objects = rendered();
    let config = find(&objects, "MutatingWebhookConfiguration", "durable-scaler-webhook");
    let reference = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str().unwrap();
    let (namespace, name) = reference.split_once('/').expect("namespace/name, as cainjector requires");
    let certificate = find(&objects, "Certificate", name);
    assert_eq!(certificate["metadata"]["namespace"], namespace);
    let webhook = find(&objects, "Deployment", "durable-scaler-webhook");
    let volumes = webhook["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let served = volumes.iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(certificate["spec"]["secretName"], served["secret"]["secretName"]);
    assert!(config["webhooks"][0]["clientConfig"].get("caBundle").is_none(), "cainjector owns caBundle");
    // The Service the API server calls is the one the certificate names.
    let service = &config["webhooks"][0]["clientConfig"]["service"];
    let host =
        format!("{}.{}.svc", service["name"].as_str().unwrap(), service["namespace"].as_str().unwrap());
    assert!(certificate["spec"]["dnsNames"].as_array().unwrap().contains(&json!(host)));
}

/// The names `certs-gen wait` requires of a certificate for `service` in `namespace` plus
/// `extra` (certs-gen `pki::dns_names`: `<service>.<namespace>.svc`, `.svc.cluster.local`
/// and `<service>.<namespace>`), with `$(CERTS_GEN_NAMESPACE)` in `extra` expanded as the
/// kubelet expands a reference to an earlier env var of the container.
fn waited_for(service: &str, namespace: &str, extra: Option<&str>) -> BTreeSet<String> {
    let mut names = BTreeSet::from([
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
    ]);
    names.extend(
        extra.into_iter().flat_map(|e| e.split(',')).map(|n| n.replace("$(CERTS_GEN_NAMESPACE)", namespace)),
    );
    names
}

#[test]
fn every_secret_a_pod_mounts_is_issued_by_a_certificate_for_the_names_its_init_container_waits_for() {
    let objects = rendered();
    let certificates = of_kind(&objects, "Certificate");
    let issued_into = |secret: &str| certificates.iter().find(|c| c["spec"]["secretName"] == secret).copied();
    let mut checked = 0;
    for workload in of_kind(&objects, "Deployment") {
        let spec = &workload["spec"]["template"]["spec"];
        let volumes = spec["volumes"].as_array().unwrap();
        for init in spec["initContainers"].as_array().into_iter().flatten() {
            let dir = env(init, "CERTS_GEN_DIR").unwrap();
            let mount =
                init["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == dir).unwrap();
            let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
            let secret = volume["secret"]["secretName"].as_str().unwrap();
            let certificate = issued_into(secret).unwrap_or_else(|| panic!("no Certificate issues {secret}"));
            // The keys the pods mount are the ones cert-manager writes (tls.crt, tls.key, and
            // ca.crt from the CA issuer).
            for item in volume["secret"]["items"].as_array().unwrap() {
                assert!(["ca.crt", "tls.crt", "tls.key"].contains(&item["key"].as_str().unwrap()), "{item}");
            }
            if init["command"] == json!(["certs-gen", "wait", "--ca-only"]) {
                checked += 1;
                continue;
            }
            let service = env(init, "CERTS_GEN_SERVICE").unwrap();
            let wanted = waited_for(service, "durable-scaler", env(init, "CERTS_GEN_EXTRA_NAMES"));
            let names: BTreeSet<String> = certificate["spec"]["dnsNames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect();
            assert!(wanted.is_subset(&names), "{secret}: {wanted:?} not all in {names:?}");
            checked += 1;
        }
    }
    // The webhook's certificate and the aggregator's CA in its pods, the aggregator's own.
    assert_eq!(checked, 3);
    // KEDA's scalerAddress host is in the aggregator's certificate (KEDA checks it).
    let example = render_path(&manifests_dir().join("example"));
    let address =
        find(&example, "ScaledObject", "orders-func")["spec"]["triggers"][0]["metadata"]["scalerAddress"]
            .as_str()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .0
            .to_owned();
    let aggregator = issued_into("durable-scaler-aggregator-tls").unwrap();
    assert!(aggregator["spec"]["dnsNames"].as_array().unwrap().contains(&json!(address)));
}

#[test]
fn the_serving_certificates_are_signed_by_a_ca_of_the_install_own_and_renewed_like_certs_gen_renews() {
    let objects = rendered();
    let issuer = |reference: &Value| {
        assert_eq!(reference["kind"], "Issuer");
        find(&objects, "Issuer", reference["name"].as_str().unwrap())
    };
    let ca = find(&objects, "Certificate", "durable-scaler-ca");
    assert_eq!(ca["spec"]["isCA"], true);
    assert!(issuer(&ca["spec"]["issuerRef"])["spec"].get("selfSigned").is_some());
    for name in ["durable-scaler-webhook", "durable-scaler-aggregator"] {
        let certificate = find(&objects, "Certificate", name);
        let signer = issuer(&certificate["spec"]["issuerRef"]);
        assert_eq!(signer["spec"]["ca"]["secretName"], ca["spec"]["secretName"], "{name}");
        assert!(certificate["spec"].get("isCA").is_none(), "{name}");
        // A year, renewed 30 days before the end (certs-gen's CERTS_GEN_VALIDITY_DAYS and its
        // renewal horizon; the monitoring component's alert fires at 14 days left).
        assert_eq!(certificate["spec"]["duration"], "8760h", "{name}");
        assert_eq!(certificate["spec"]["renewBefore"], "720h", "{name}");
    }
    // The CA is renewed a year before its end, so each certificate it signs gets its year.
    assert_eq!(
        ca["spec"]["renewBefore"],
        find(&objects, "Certificate", "durable-scaler-webhook")["spec"]["duration"]
    );
}

#[test]
fn the_monitoring_and_cert_manager_components_compose() {
    let objects = render_with_components("default", &["components/monitoring", COMPONENT]);
    let webhook_monitor = find(&objects, "ServiceMonitor", "durable-scaler-webhook");
    let secret = &webhook_monitor["spec"]["endpoints"][0]["tlsConfig"]["ca"]["secret"]["name"];
    assert!(of_kind(&objects, "Certificate").iter().any(|c| &c["spec"]["secretName"] == secret));
    assert!(!objects.iter().any(|o| o["metadata"]["name"] == "durable-scaler-certs-gen"));
}
