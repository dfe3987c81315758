//! Patch writing: targeted RFC 6902 `add` operations, each creating its parent first when the
//! pod has none, so the patch applies to the pod exactly as it was sent.

use serde_json::{Map, Value, json};

/// Appends `item` to the array `parent_path/key`, creating the array first when the pod has
/// none and no earlier operation of this patch created it (a second creation would empty it).
pub(super) fn append(
    patch: &mut Vec<Value>,
    parent: &Map<String, Value>,
    parent_path: &str,
    key: &str,
    item: Value,
) {
    let path = format!("{parent_path}/{}", escape(key));
    let created = patch.iter().any(|op| op["path"] == path.as_str());
    if !parent.get(key).is_some_and(Value::is_array) && !created {
        patch.push(add(&path, json!([])));
    }
    patch.push(add(&format!("{path}/-"), item));
}

/// Sets each of `annotations` on `pod`, creating `metadata` and `metadata.annotations` first
/// when the pod has none.
pub(super) fn annotate(patch: &mut Vec<Value>, pod: &Value, annotations: Map<String, Value>) {
    if pod.get("metadata").and_then(Value::as_object).is_none() {
        patch.push(add("/metadata", json!({})));
    }
    if pod.pointer("/metadata/annotations").and_then(Value::as_object).is_none() {
        patch.push(add("/metadata/annotations", json!({})));
    }
    for (key, value) in annotations {
        // `add` on an existing object member replaces it (RFC 6902), so a stale status
        // annotation (the container was removed by hand) is simply rewritten.
        patch.push(add(&format!("/metadata/annotations/{}", escape(&key)), value));
    }
}

/// Merges `secrets` into the pod's `imagePullSecrets` (each a `{"name": ...}` reference),
/// leaving out those it already names; returns the names added. The kubelet tries each
/// listed Secret for every image of the pod, so the sidecar's registry credentials sit beside
/// the app's own.
pub(super) fn merge_pull_secrets(
    patch: &mut Vec<Value>,
    spec: &Map<String, Value>,
    secrets: &[String],
) -> Vec<String> {
    let existing: Vec<&str> = spec
        .get("imagePullSecrets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("name").and_then(Value::as_str))
        .collect();
    let mut added: Vec<String> = Vec::new();
    for secret in secrets {
        if !existing.contains(&secret.as_str()) && !added.contains(secret) {
            append(patch, spec, "/spec", "imagePullSecrets", json!({"name": secret}));
            added.push(secret.clone());
        }
    }
    added
}

/// One `add` operation.
pub(super) fn add(path: &str, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

/// Escapes one JSON pointer token (RFC 6901): `~` as `~0`, then `/` as `~1`.
pub(super) fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_array_is_created_once_however_many_items_go_into_it() {
        let mut patch = Vec::new();
        let parent = Map::new();
        append(&mut patch, &parent, "/spec", "volumes", json!({"name": "a"}));
        append(&mut patch, &parent, "/spec", "volumes", json!({"name": "b"}));
        let mut pod = json!({"spec": {}});
        json_patch::patch(
            &mut pod,
            &serde_json::from_value::<json_patch::Patch>(Value::Array(patch)).unwrap(),
        )
        .unwrap();
        assert_eq!(pod["spec"]["volumes"], json!([{"name": "a"}, {"name": "b"}]));
    }

    #[test]
    fn pointer_tokens_escape_tilde_before_slash() {
        assert_eq!(escape("durable-scaler.io/status"), "durable-scaler.io~1status");
        assert_eq!(escape("a~/b"), "a~0~1b");
    }
}
