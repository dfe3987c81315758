//! AdmissionReview v1 in, AdmissionReview v1 out: the request body's bytes to a status code
//! and a response body, with no I/O (the HTTP layer checks size and content type first).
//!
//! Pure and total, so the fuzz target drives it directly: every input, however broken, gets
//! an answer, and the request's `uid` is echoed whenever the body has one.

use base64::Engine;
use serde_json::{Value, json};

use super::inject::{self, InjectionSettings, NativeDefault, SkipReason};

/// The only AdmissionReview version served (the MutatingWebhookConfiguration asks for v1).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// The answer to one review.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// HTTP status: 200 for every decodable review (allowed, with or without a patch), 400
    /// for an undecodable one.
    pub status: u16,
    /// The AdmissionReview response body.
    pub body: Value,
    /// True when the answer injects the sidecar.
    pub injected: bool,
    /// True when the API server asked for a dry run: the answer is the same, but the caller
    /// must have no side effects (no counters, no "injected" log line).
    pub dry_run: bool,
    /// Set when an opted-in pod gets no sidecar: why, and whom to tell.
    pub skipped: Option<Skipped>,
}

/// An opted-in pod that gets no sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// Why.
    pub reason: SkipReason,
    /// What the admission warning says.
    pub note: String,
    /// The request's namespace (the pod's; a pod's `metadata.namespace` may be empty at
    /// admission).
    pub namespace: String,
    /// The object to record the Event on (see [`regarding`]); `None` when there is none to
    /// name.
    pub regarding: Option<Regarding>,
}

/// The object an `InjectionSkipped` Event is about (an events.k8s.io/v1 `regarding`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Regarding {
    /// `apiVersion` of the object, e.g. `apps/v1`.
    pub api_version: String,
    /// `kind`, e.g. `ReplicaSet`.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`, when known (`kubectl describe` matches Events by it).
    pub uid: Option<String>,
}

/// What the Event on a skipped pod is about: the pod's controller (the `ownerReferences`
/// entry with `controller: true`: a ReplicaSet, Job, StatefulSet...), else the pod itself
/// when it has a name. A controller's pod has no name (only `generateName`) and no uid at
/// admission time, and one Event per owner is what an operator looks at anyway (Linkerd's
/// injector records its `InjectionSkipped` on the owner for the same reason).
pub fn regarding(pod: &Value) -> Option<Regarding> {
    let text = |v: &Value, key: &str| {
        v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
    };
    let owners = pod.pointer("/metadata/ownerReferences").and_then(Value::as_array);
    if let Some(owner) =
        owners.into_iter().flatten().find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
    {
        return Some(Regarding {
            api_version: text(owner, "apiVersion")?,
            kind: text(owner, "kind")?,
            name: text(owner, "name")?,
            uid: text(owner, "uid"),
        });
    }
    let metadata = pod.get("metadata")?;
    Some(Regarding {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: text(metadata, "name")?,
        uid: text(metadata, "uid"),
    })
}

/// Answers one AdmissionReview request body, in the mode `--native-sidecar true|false`
/// forces.
pub fn review(body: &[u8], settings: &InjectionSettings) -> Outcome {
    review_with(body, settings, &NativeDefault::forced(settings.native_sidecar))
}

/// Answers one AdmissionReview request body; pods without the native-sidecar annotation get
/// the mode `native_default` says.
pub fn review_with(body: &[u8], settings: &InjectionSettings, native_default: &NativeDefault) -> Outcome {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return rejected("", &format!("body is not JSON: {e}")),
    };
    let uid = review.pointer("/request/uid").and_then(Value::as_str).unwrap_or_default();
    if review.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return rejected(uid, &format!("expected an AdmissionReview of apiVersion {API_VERSION}"));
    }
    let Some(request) = review.get("request").and_then(Value::as_object) else {
        return rejected(uid, "AdmissionReview has no request object");
    };
    if uid.is_empty() {
        return rejected(uid, "request.uid is missing or not a string");
    }
    let dry_run = request.get("dryRun").and_then(Value::as_bool).unwrap_or(false);
    let is_pod = request.get("kind").is_some_and(|k| {
        k.get("group").and_then(Value::as_str) == Some("")
            && k.get("version").and_then(Value::as_str) == Some("v1")
            && k.get("kind").and_then(Value::as_str) == Some("Pod")
    });
    let is_create = request.get("operation").and_then(Value::as_str) == Some("CREATE");
    let sub_resource = request.get("subResource").and_then(Value::as_str).unwrap_or_default();
    if !is_pod || !is_create || !sub_resource.is_empty() {
        // Not ours (another kind, operation or subresource): admit untouched.
        return allowed(uid, dry_run, inject::Injection::default());
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return rejected(uid, "request.object is not a pod object");
    };
    if !inject::opted_in(pod) {
        return allowed(uid, dry_run, inject::Injection::default());
    }
    let injection = inject::plan_with(pod, settings, native_default);
    let skipped = injection.skipped.map(|reason| Skipped {
        reason,
        note: injection.warnings.last().cloned().unwrap_or_default(),
        namespace: request.get("namespace").and_then(Value::as_str).unwrap_or_default().to_owned(),
        regarding: regarding(pod),
    });
    Outcome { skipped, ..allowed(uid, dry_run, injection) }
}

fn allowed(uid: &str, dry_run: bool, injection: inject::Injection) -> Outcome {
    let mut response = json!({"uid": uid, "allowed": true});
    let injected = injection.injects();
    if injected {
        let patch = Value::Array(injection.patch).to_string();
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    if !injection.warnings.is_empty() {
        response["warnings"] = json!(injection.warnings);
    }
    Outcome { status: 200, body: envelope(response), injected, dry_run, skipped: None }
}

/// A 400 answer that still names the request (by `uid`) and says why, so the API server's
/// log and the user's error message carry the reason.
fn rejected(uid: &str, reason: &str) -> Outcome {
    let response = json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 400, "message": format!("durable-scaler webhook: {reason}")},
    });
    Outcome { status: 400, body: envelope(response), injected: false, dry_run: false, skipped: None }
}

fn envelope(response: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "img".to_owned(),
            aggregator: "http://agg:4371".parse().unwrap(),
            aggregator_ca: None,
            aggregator_ca_secret: None,
            image_pull_secrets: Vec::new(),
            native_sidecar: true,
            version: "0".to_owned(),
        }
    }

    fn request(request: Value) -> Vec<u8> {
        json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request})
            .to_string()
            .into_bytes()
    }

    fn labelled_pod() -> Value {
        json!({
            "metadata": {"labels": {crate::contract::INJECT_LABEL: "true"}},
            "spec": {"containers": [{"name": "app", "env": [{"name": "AzureWebJobsStorage", "value": "x"}]}]},
        })
    }

    fn pod_request(operation: &str, object: Value) -> Value {
        json!({"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": operation, "object": object})
    }

    #[test]
    fn non_json_is_a_400_with_the_reason() {
        let out = review(b"{not json", &settings());
        assert_eq!(out.status, 400);
        assert!(out.body["response"]["status"]["message"].as_str().unwrap().contains("not JSON"));
    }

    #[test]
    fn the_uid_is_echoed_even_when_the_review_is_rejected() {
        let body = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "abc"}});
        let out = review(body.to_string().as_bytes(), &settings());
        assert_eq!((out.status, out.body["response"]["uid"].as_str()), (400, Some("abc")));
    }

    #[test]
    fn updates_and_other_kinds_are_allowed_without_patch() {
        let mut other = pod_request("CREATE", json!({}));
        other["kind"]["kind"] = json!("Service");
        for req in [pod_request("UPDATE", labelled_pod()), other] {
            let out = review(&request(req), &settings());
            assert_eq!(out.status, 200);
            assert_eq!(out.body["response"]["allowed"], true);
            assert!(out.body["response"].get("patch").is_none());
        }
    }

    #[test]
    fn a_labelled_pod_create_gets_a_base64_json_patch() {
        let out = review(&request(pod_request("CREATE", labelled_pod())), &settings());
        assert!(out.injected);
        assert_eq!(out.body["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out.body["response"]["patch"].as_str().unwrap())
            .unwrap();
        assert!(serde_json::from_slice::<Vec<Value>>(&patch).unwrap().len() > 2);
    }

    #[test]
    fn a_create_without_a_pod_object_is_rejected() {
        let out = review(&request(pod_request("CREATE", json!("pod"))), &settings());
        assert_eq!(out.status, 400);
        assert_eq!(out.body["response"]["uid"], "u-1");
    }

    #[test]
    fn dry_run_is_reported_to_the_caller() {
        let mut req = pod_request("CREATE", labelled_pod());
        req["dryRun"] = json!(true);
        let out = review(&request(req), &settings());
        assert!(out.dry_run && out.injected);
    }
}
