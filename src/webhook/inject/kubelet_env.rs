//! The kubelet's env rules: how a container's `env` and `envFrom` decide what value a
//! variable has, turned into env definitions the sidecar can be given so that it sees the
//! value the app sees, without being given anything else of the app's Secrets.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// How the app looks a variable up by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Naming {
    /// Exactly as written: the process environment on Linux is case-sensitive, and the
    /// Functions host reads some variables straight from it (`WEBSITE_SITE_NAME`, through
    /// `Environment.GetEnvironmentVariable`).
    Exact,
    /// As .NET configuration reads the environment (dotnet/runtime
    /// `Microsoft.Extensions.Configuration.EnvironmentVariables`:
    /// `EnvironmentVariablesConfigurationSource.DefaultTransformation` turns every `__` into
    /// the section delimiter `:`, and `EnvironmentVariablesConfigurationProvider.Load` keys
    /// its data `StringComparer.OrdinalIgnoreCase`), which is how the Functions host binds
    /// `AzureFunctionsJobHost:extensions:durableTask:*` (azure-functions-host
    /// `src/WebJobs.Script/Config/ConfigurationSectionNames.cs`, `JobHost`). So
    /// `azurefunctionsjobhost__Extensions__durableTask__HubName` and
    /// `AzureFunctionsJobHost:extensions:durableTask:hubName` both set the hub name.
    DotnetConfiguration,
}

impl Naming {
    /// True when a variable called `candidate` sets what the app reads as `wanted`.
    pub(super) fn matches(self, candidate: &str, wanted: &str) -> bool {
        match self {
            Self::Exact => candidate == wanted,
            Self::DotnetConfiguration => {
                candidate.replace("__", ":").eq_ignore_ascii_case(&wanted.replace("__", ":"))
            }
        }
    }

    /// The data key an `envFrom` source with `prefix` must hold to set `wanted` (the kubelet
    /// names each variable prefix + key). Only `wanted`'s own spelling after the prefix is
    /// looked for: a Secret key spelled in another case would set the setting too, but the
    /// webhook cannot see a Secret's keys, and a key reference is case-sensitive.
    fn key_after<'a>(self, wanted: &'a str, prefix: &str) -> Option<&'a str> {
        let head = wanted.get(..prefix.len())?;
        let fits = match self {
            Self::Exact => head == prefix,
            Self::DotnetConfiguration => head.eq_ignore_ascii_case(prefix),
        };
        fits.then(|| &wanted[prefix.len()..])
    }
}

/// The container's last `env` entry named exactly `name` that defines a value.
pub(super) fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    env_entries(container, name, Naming::Exact).last()
}

/// The container's `env` entries that set `name` as `naming` reads it and define a value,
/// in order.
pub(super) fn env_entries<'a>(
    container: &'a Value,
    name: &str,
    naming: Naming,
) -> impl Iterator<Item = &'a Value> {
    container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("name").and_then(Value::as_str).is_some_and(|n| naming.matches(n, name)))
        .filter(|e| e.get("value").is_some() || e.get("valueFrom").is_some())
}

/// The distinct spellings of `name` among the container's `env` entries (as `naming` reads
/// them). More than one means the app's value depends on an order .NET does not define
/// (`Environment.GetEnvironmentVariables` is a hash table).
pub(super) fn spellings<'a>(container: &'a Value, name: &str, naming: Naming) -> BTreeSet<&'a str> {
    env_entries(container, name, naming).filter_map(|e| e.get("name").and_then(Value::as_str)).collect()
}

/// How the kubelet may set `name` (as `naming` reads it) in `container`, as env definitions (`value` or `valueFrom`)
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
/// Entries spelled differently but read alike ([`Naming::DotnetConfiguration`]) are taken as
/// one variable in list order; see [`spellings`].
pub(super) fn definitions(container: &Value, name: &str, naming: Naming) -> Option<Vec<Value>> {
    let entries: Vec<&Value> = env_entries(container, name, naming).collect();
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
            let key = naming.key_after(name, prefix).filter(|key| is_config_key(key))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: &str = "AzureFunctionsJobHost__extensions__durableTask__hubName";

    #[test]
    fn dotnet_configuration_reads_names_case_insensitively_with_double_underscore_as_colon() {
        let dotnet = Naming::DotnetConfiguration;
        for alike in [
            HUB,
            "azurefunctionsjobhost__EXTENSIONS__durabletask__HUBNAME",
            "AzureFunctionsJobHost:extensions:durableTask:hubName",
            "AzureFunctionsJobHost__extensions:durableTask__hubName",
        ] {
            assert!(dotnet.matches(alike, HUB), "{alike}");
        }
        for other in [
            "AzureFunctionsJobHost_extensions_durableTask_hubName",
            "AzureFunctionsJobHost___extensions__durableTask__hubName",
            "AzureFunctionsJobHost__extensions__durableTask__hubName2",
        ] {
            assert!(!dotnet.matches(other, HUB), "{other}");
        }
        assert!(!Naming::Exact.matches("azurefunctionsjobhost__extensions__durabletask__hubname", HUB));
    }

    #[test]
    fn an_env_from_prefix_in_another_case_still_reaches_a_dotnet_setting() {
        let container =
            json!({"envFrom": [{"prefix": "AZUREFUNCTIONSJOBHOST__", "secretRef": {"name": "s"}}]});
        assert_eq!(
            definitions(&container, HUB, Naming::DotnetConfiguration),
            Some(vec![json!({"valueFrom": {"secretKeyRef":
                {"name": "s", "key": "extensions__durableTask__hubName", "optional": true}}})])
        );
        assert_eq!(definitions(&container, HUB, Naming::Exact), None);
    }

    #[test]
    fn entries_spelled_differently_but_read_alike_are_one_variable_in_list_order() {
        let container = json!({"env": [
            {"name": HUB, "value": "First"},
            {"name": "azurefunctionsjobhost__extensions__durabletask__hubname", "value": "Second"},
        ]});
        let found = definitions(&container, HUB, Naming::DotnetConfiguration).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["value"], "Second");
        assert_eq!(spellings(&container, HUB, Naming::DotnetConfiguration).len(), 2);
    }
}
