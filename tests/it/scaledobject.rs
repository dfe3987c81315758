//! `durable-scaler scaledobject` as a user runs it: the real binary on the example app, a
//! `func kubernetes deploy --dry-run`-shaped manifest and a StatefulSet, its objects validated
//! against KEDA v2.20.2's CRD schema (tests/fixtures/keda), its patch applied by the real
//! kubectl (`kubectl patch --local`, strategic merge, no cluster) and the patched workload
//! validated against the Kubernetes schemas.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::manifests::{keda_validate, kubernetes_validate, python_with};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const EXAMPLE: &str = "manifests/example/function-app.yaml";
const FUNC: &str = "tests/fixtures/scaledobject/func-kubernetes-deploy-dry-run.yaml";
const STATEFULSET: &str = "tests/fixtures/scaledobject/statefulset-sidecar-first.yaml";

/// `durable-scaler scaledobject ARGS` with `stdin`: (exit status, stdout, stderr).
fn scaledobject(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .arg("scaledobject")
        .args(args)
        .current_dir(repo("."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn objects(file: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![file, "--print", "objects"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = scaledobject(&args, None);
    assert_eq!(code, 0, "{stderr}");
    serde_saphyr::from_multiple::<Value>(&stdout).unwrap().into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn the_objects_validate_against_the_keda_crd_schema_for_every_input_and_install() {
    if !python_with("jsonschema") {
        return;
    }
    for file in [EXAMPLE, FUNC, STATEFULSET] {
        for install in ["default", "plaintext"] {
            let objects = objects(file, &["--install", install]);
            let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
            let expected: &[&str] = if install == "default" {
                &["ScaledObject", "TriggerAuthentication"]
            } else {
                &["ScaledObject"]
            };
            assert_eq!(kinds, expected, "{file} {install}");
            let refs: Vec<&Value> = objects.iter().collect();
            keda_validate(&refs).unwrap_or_else(|e| panic!("{file} {install}:\n{e}"));
            let spec = &objects[0]["spec"];
            // KEDA's x-kubernetes-validations rule, which JSON Schema cannot say.
            assert!(spec["minReplicaCount"].as_u64() <= spec["maxReplicaCount"].as_u64());
        }
    }
}

#[test]
fn the_example_apps_scaled_object_is_the_one_manifests_example_ships() {
    let generated = objects(EXAMPLE, &[]);
    let shipped: Vec<Value> = serde_saphyr::from_multiple(
        &std::fs::read_to_string(repo("manifests/example/scaled-object.yaml")).unwrap(),
    )
    .unwrap();
    let (ours, theirs) = (&generated[0]["spec"], &shipped[0]["spec"]);
    assert_eq!(ours["scaleTargetRef"], theirs["scaleTargetRef"]);
    // The scale-in pace from the app's grace period (60 s + 40 s).
    assert_eq!(ours["advanced"], theirs["advanced"]);
    let trigger = &ours["triggers"][0];
    let shipped_trigger = &theirs["triggers"][0];
    assert_eq!(trigger["type"], shipped_trigger["type"]);
    assert_eq!(trigger["authenticationRef"], shipped_trigger["authenticationRef"]);
    for key in ["scalerAddress", "enableTLS", "taskHubName", "connectionFromEnv"] {
        assert_eq!(trigger["metadata"][key], shipped_trigger["metadata"][key], "{key}");
    }
    let shipped_auth: Vec<Value> = serde_saphyr::from_multiple(
        &std::fs::read_to_string(repo("manifests/example/trigger-authentication.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(generated[1]["spec"], shipped_auth[0]["spec"]);
}

#[test]
fn a_statefulset_whose_app_is_not_the_first_container_names_it_for_keda() {
    let objects = objects(STATEFULSET, &["--install", "plaintext", "--trigger", "external"]);
    let spec = &objects[0]["spec"];
    assert_eq!(spec["scaleTargetRef"]["kind"], "StatefulSet");
    assert_eq!(spec["scaleTargetRef"]["apiVersion"], "apps/v1");
    assert_eq!(spec["scaleTargetRef"]["envSourceContainerName"], "functions");
    let trigger = &spec["triggers"][0];
    assert_eq!(trigger["type"], "external");
    assert_eq!(trigger["metadata"]["connectionFromEnv"], "BillingStorage");
    assert_eq!(trigger["metadata"]["taskHubName"], "BillingHub");
    assert!(trigger["metadata"].get("enableTLS").is_none() && trigger.get("authenticationRef").is_none());
}

/// The workload document of `file`, written alone into `dir`.
fn workload_file(dir: &Path, file: &str) -> PathBuf {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(repo(file)).unwrap()).unwrap();
    let workload = documents
        .into_iter()
        .find(|d| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        .unwrap();
    let path = dir.join("workload.json");
    std::fs::write(&path, workload.to_string()).unwrap();
    path
}

#[test]
fn kubectl_applies_the_patch_and_the_patched_workload_opts_in_and_stays_valid() {
    if !crate::tools::available("kubectl", &["version", "--client"], "scripts/test asks for kubectl") {
        return;
    }
    for file in [EXAMPLE, FUNC, STATEFULSET] {
        let dir = tempfile::tempdir().unwrap();
        let (code, patch, stderr) = scaledobject(&[file, "--print", "patch"], None);
        assert_eq!(code, 0, "{stderr}");
        std::fs::write(dir.path().join("patch.yaml"), &patch).unwrap();
        // --local: kubectl patches the file's object itself, no API server involved.
        let output = Command::new("kubectl")
            .args(["patch", "--local", "--type", "strategic", "-o", "json", "-f"])
            .arg(workload_file(dir.path(), file))
            .arg("--patch-file")
            .arg(dir.path().join("patch.yaml"))
            .env("KUBECONFIG", dir.path().join("no-cluster"))
            .output()
            .unwrap();
        assert!(output.status.success(), "{file}: {}", String::from_utf8_lossy(&output.stderr));
        let patched: Value = serde_json::from_slice(&output.stdout).unwrap();
        let template = &patched["spec"]["template"]["metadata"];
        assert_eq!(template["labels"][durable_scaler::contract::INJECT_LABEL], "true", "{file}");
        let so = &objects(file, &[])[0];
        let metadata = &so["spec"]["triggers"][0]["metadata"];
        assert_eq!(
            template["annotations"][durable_scaler::contract::TASK_HUB_ANNOTATION],
            metadata["taskHubName"]
        );
        assert_eq!(
            template["annotations"][durable_scaler::contract::CONNECTION_ENV_ANNOTATION],
            metadata["connectionFromEnv"]
        );
        // The app's own labels and containers are kept: a merge, not a replacement.
        let original: Value =
            serde_json::from_str(&std::fs::read_to_string(workload_file(dir.path(), file)).unwrap()).unwrap();
        assert_eq!(patched["spec"]["template"]["spec"], original["spec"]["template"]["spec"], "{file}");
        if python_with("kubernetes_validate") {
            for version in ["1.29.0", "1.37.0"] {
                kubernetes_validate(&[&patched], version)
                    .unwrap_or_else(|e| panic!("{file} {version}:\n{e}"));
            }
        }
    }
}

#[test]
fn stdin_and_json_output_work_and_what_cannot_be_scaled_exits_2_saying_why() {
    let example = std::fs::read_to_string(repo(EXAMPLE)).unwrap();
    let (code, stdout, _) = scaledobject(&["-o", "json"], Some(&example));
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&stdout).unwrap();
    let kinds: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ScaledObject", "TriggerAuthentication", "Deployment"]);

    let no_connection = example.replace("- name: AzureWebJobsStorage", "- name: SomeOtherVariable");
    let (code, stdout, stderr) = scaledobject(&["-"], Some(&no_connection));
    assert_eq!((code, stdout.as_str()), (2, ""));
    assert!(stderr.contains("no_connection_variable") && stderr.contains("AzureWebJobsStorage"), "{stderr}");

    let (code, _, stderr) = scaledobject(&[], Some("kind: Service\napiVersion: v1\nmetadata: {name: x}\n"));
    assert_eq!(code, 2);
    assert!(stderr.contains("no apps/v1 Deployment or StatefulSet"), "{stderr}");

    let (code, _, stderr) = scaledobject(&[FUNC, "--task-hub", "no way"], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("--task-hub"), "{stderr}");
}
