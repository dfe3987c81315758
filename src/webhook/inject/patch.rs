//! Patch writing: targeted RFC 6902 `add` operations, each creating its parent first when the
//! pod has none, so the patch applies to the pod exactly as it was sent.

use serde_json::{Map, Value, json};

/// Appends `item` to the array `parent_path/key`, creating the array first when absent.
pub(super) fn append(
    patch: &mut Vec<Value>,
    parent: &Map<String, Value>,
    parent_path: &str,
    key: &str,
    item: Value,
) {
    let path = format!("{parent_path}/{}", escape(key));
    if !parent.get(key).is_some_and(Value::is_array) {
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
    fn pointer_tokens_escape_tilde_before_slash() {
        assert_eq!(escape("durable-scaler.io/status"), "durable-scaler.io~1status");
        assert_eq!(escape("a~/b"), "a~0~1b");
    }
}
