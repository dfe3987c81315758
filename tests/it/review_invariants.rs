//! What must hold for every answer of the webhook's review handler, whatever the input:
//! shared by the cargo-fuzz target (fuzz/) and the stable random harness
//! (tests/it/review_fuzz.rs). Panics on a violation, which both report as a finding.

use base64::Engine;
use durable_scaler::webhook::{
    inject::InjectionSettings,
    review::{self, API_VERSION},
};
use serde_json::Value;

/// The settings every fuzz run uses.
pub fn settings() -> InjectionSettings {
    InjectionSettings {
        image: "ghcr.io/durable-scaler/durable-scaler:fuzz".to_owned(),
        aggregator: "http://durable-scaler-aggregator.durable-scaler:4371".parse().unwrap(),
        aggregator_ca: None,
        aggregator_ca_secret: None,
        image_pull_secrets: Vec::new(),
        native_sidecar: true,
        version: "fuzz".to_owned(),
    }
}

/// Reviews `data` and checks the answer; returns true when the answer carried a patch.
pub fn check(data: &[u8], settings: &InjectionSettings) -> bool {
    let outcome = review::review(data, settings);
    let body = &outcome.body;
    assert_eq!(body["apiVersion"], API_VERSION);
    assert_eq!(body["kind"], "AdmissionReview");
    let response = &body["response"];
    let uid = response["uid"].as_str().expect("response.uid is always a string");
    let input: Option<Value> = serde_json::from_slice(data).ok();
    if let Some(sent) = input.as_ref().and_then(|v| v.pointer("/request/uid")).and_then(Value::as_str) {
        assert_eq!(uid, sent, "the request uid is echoed");
    }
    match outcome.status {
        200 => assert_eq!(response["allowed"], true),
        400 => {
            assert_eq!(response["allowed"], false);
            assert!(response["status"]["message"].is_string());
            assert!(response.get("patch").is_none());
            return false;
        }
        other => panic!("unexpected status {other}"),
    }
    let Some(encoded) = response.get("patch") else {
        assert!(!outcome.injected);
        return false;
    };
    assert!(outcome.injected);
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_str().expect("patch is a string"))
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&bytes).expect("patch is a JSON array");
    assert!(ops.iter().all(|op| op["op"] == "add"), "only add operations");
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).expect("a valid RFC 6902 patch");

    let mut review_in = input.expect("a patch answers only a decodable review");
    let original = review_in["request"]["object"].clone();
    let mut pod = original.clone();
    json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("the patch applies to the pod: {e}"));

    let sidecars = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod["spec"][*list].as_array().cloned().unwrap_or_default())
        .filter(|c| c["name"] == durable_scaler::contract::SIDECAR_CONTAINER)
        .count();
    assert_eq!(sidecars, 1, "exactly one sidecar after injection");
    // The one change to an existing container: the app container may gain the Functions
    // host's drain switch as its last env entry and, where it had none, a preStop hook on the
    // sidecar's /drain (src/webhook/inject/drain.rs).
    let drain = serde_json::json!({"name": "FUNCTIONS_ENABLE_DRAIN_ON_APP_STOPPING", "value": "true"});
    let mut drained = 0;
    for list in ["containers", "initContainers", "volumes"] {
        if let Some(before) = original["spec"][list].as_array() {
            let after = pod["spec"][list].as_array().expect("lists stay lists");
            assert!(after.len() >= before.len(), "existing {list} are kept");
            for (was, is) in before.iter().zip(after) {
                let mut is = is.clone();
                let grew = is["env"].as_array().is_some_and(|env| {
                    env.last() == Some(&drain) && env.len() == was["env"].as_array().map_or(0, Vec::len) + 1
                });
                if list == "containers" && grew {
                    drained += 1;
                    let env = is["env"].as_array_mut().expect("env is a list");
                    env.pop();
                    if env.is_empty() && was.get("env").is_none() {
                        is.as_object_mut().expect("a container is an object").remove("env");
                    }
                }
                let hooked = list == "containers"
                    && was.pointer("/lifecycle/preStop").is_none()
                    && is.pointer("/lifecycle/preStop/httpGet/path").and_then(Value::as_str)
                        == Some(durable_scaler::contract::DRAIN_PATH);
                if hooked {
                    let lifecycle = is["lifecycle"].as_object_mut().expect("lifecycle is an object");
                    lifecycle.remove("preStop");
                    if lifecycle.is_empty() && was.get("lifecycle").is_none() {
                        is.as_object_mut().expect("a container is an object").remove("lifecycle");
                    }
                }
                assert_eq!(&is, was, "existing {list} are untouched");
            }
        }
    }
    assert!(drained <= 1, "only the app container gets the drain switch");
    if let Some(before) = original["metadata"]["annotations"].as_object() {
        let after = pod["metadata"]["annotations"].as_object().unwrap();
        for (key, value) in before {
            if key != "durable-scaler.io/status" && key != "kubectl.kubernetes.io/default-container" {
                assert_eq!(after.get(key), Some(value), "annotation {key} untouched");
            }
        }
    }

    // Feeding the webhook its own output changes nothing.
    review_in["request"]["object"] = pod;
    let again = review::review(review_in.to_string().as_bytes(), settings);
    assert_eq!(again.status, 200);
    assert!(again.body["response"].get("patch").is_none(), "a second pass injects nothing");
    true
}
