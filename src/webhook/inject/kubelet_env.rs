//! The kubelet's env rules: how a container's `env` and `envFrom` decide what value a
//! variable has, turned into env definitions the sidecar can be given so that it sees the
//! value the app sees, without being given anything else of the app's Secrets.

use serde_json::{Map, Value, json};

/// The container's last `env` entry named `name` that defines a value.
pub(super) fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    env_entries(container, name).last()
}

/// The container's `env` entries named `name` that define a value, in order.
fn env_entries<'a>(container: &'a Value, name: &str) -> impl Iterator<Item = &'a Value> {
    container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("name").and_then(Value::as_str) == Some(name))
        .filter(|e| e.get("value").is_some() || e.get("valueFrom").is_some())
}

/// How the kubelet may set `name` in `container`, as env definitions (`value` or `valueFrom`)
/// listed so that giving all of them to the sidecar, in this order and under one name,
/// yields the value the app sees; `None` when nothing the webhook can see defines it.
///
/// The kubelet (kubernetes/kubernetes `pkg/kubelet/kubelet_pods.go`,
/// `makeEnvironmentVariables`) writes every `envFrom` source in list order into one map (a
/// later source replaces an earlier one's key; a `prefix` is put before each key), then each
/// `env` entry in order, so `env` wins over all of `envFrom`. A `secretKeyRef` or
/// `configMapKeyRef` with `optional: true` whose object or key is missing is skipped
/// (`continue`): the variable keeps what it had. So an `envFrom` source becomes one
/// `optional: true` key reference for just this key (the sidecar sees that one key of the
/// Secret and nothing else, and a source without it changes nothing), and the app's own
/// `env` entries follow. Everything before the last `env` entry that always sets a value
/// (a literal, a field reference, a required key reference) can never show, and is dropped.
pub(super) fn definitions(container: &Value, name: &str) -> Option<Vec<Value>> {
    let entries: Vec<&Value> = env_entries(container, name).collect();
    if let Some(last) = entries.iter().rposition(|entry| !is_optional_reference(entry)) {
        return Some(entries[last..].iter().map(|e| (*e).clone()).collect());
    }
    let mut out: Vec<Value> = container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|source| {
            let prefix = source.get("prefix").and_then(Value::as_str).unwrap_or_default();
            let key = name.strip_prefix(prefix).filter(|key| is_config_key(key))?;
            let (kind, object) = match (source.get("secretRef"), source.get("configMapRef")) {
                (Some(secret), _) => ("secretKeyRef", secret),
                (None, Some(config_map)) => ("configMapKeyRef", config_map),
                (None, None) => return None,
            };
            let object_name = object.get("name").and_then(Value::as_str)?;
            Some(json!({"valueFrom": {kind: {"name": object_name, "key": key, "optional": true}}}))
        })
        .collect();
    out.extend(entries.into_iter().cloned());
    (!out.is_empty()).then_some(out)
}

/// True for an env entry or definition whose `valueFrom` is a `secretKeyRef` or
/// `configMapKeyRef` with `optional: true`: it may set nothing, and what came before it may
/// show. Everything else (a literal, a field or resource reference, a required key
/// reference) always sets the value.
pub(super) fn is_optional_reference(definition: &Value) -> bool {
    ["secretKeyRef", "configMapKeyRef"].iter().any(|kind| {
        definition.pointer(&format!("/valueFrom/{kind}/optional")).and_then(Value::as_bool) == Some(true)
    })
}

/// A valid Secret or ConfigMap data key (`[-._a-zA-Z0-9]+`, not `.` or `..`; the API
/// server's `IsConfigMapKey`): only such a key can be what an `envFrom` source supplies.
fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// An env entry's definition (`value` or `valueFrom`, as it stands) under a new name.
pub(super) fn renamed_env(name: &str, entry: &Value) -> Value {
    let mut copy = Map::new();
    copy.insert("name".to_owned(), Value::String(name.to_owned()));
    for key in ["value", "valueFrom"] {
        if let Some(v) = entry.get(key) {
            copy.insert(key.to_owned(), v.clone());
        }
    }
    Value::Object(copy)
}
