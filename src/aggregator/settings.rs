//! The trigger metadata KEDA sends in `scalerMetadata`, parsed into typed settings.
//!
//! Keys are compatible with wsugarman/durabletask-azurestorage-scaler (architecture.md);
//! unknown keys (such as `scalerAddress`) are ignored. A bad value is refused with an error
//! naming the key and the value expected, which the KEDA service turns into INVALID_ARGUMENT.

use std::collections::HashMap;

use crate::contract::limits::{CONNECTION_MAX_LEN, METADATA_MAX_ENTRIES, METADATA_VALUE_MAX_LEN};
use crate::contract::{DEFAULT_TASK_HUB, TaskHub, WORK_ITEMS_PER_CPU, quote};
use crate::heuristic::Algorithm;
use crate::heuristic::durable::DurableSettings;
use crate::storage::{
    AzureCloud, Connection, ConnectionString, IdentityAccount, PartitionMode, StorageError,
};

/// What one ScaledObject's trigger metadata says about its task hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// `taskHubName`, case preserved ([`DEFAULT_TASK_HUB`] when unset, with a warning).
    pub task_hub: String,
    /// Where the cold probe finds the storage account: the connection string
    /// (`connectionFromEnv`'s resolved value, or `connection`), or `accountName` with
    /// workload identity; `None` when the trigger gives none of them.
    pub connection: Option<Connection>,
    /// `maxActivitiesPerWorker` / `maxOrchestrationsPerWorker` when the trigger sets them:
    /// they win over what the pods report.
    pub limits: LimitOverrides,
    /// `useTablePartitionManagement`: an override; unset, the layout is detected.
    pub partition_mode: PartitionMode,
    /// `scaleAlgorithm`.
    pub algorithm: Algorithm,
    /// `maxPollingIntervalMs` when the trigger sets it (it wins over the app's reported
    /// `maxQueuePollingInterval`; neither: DTFx's default, 30 s).
    pub max_polling_interval_ms: Option<u64>,
    /// `workerStartupMs`: how long a new worker pod takes to take work (durable algorithm).
    pub worker_startup_ms: u64,
    /// What the metadata left to a default the user should know about (shown on `/hubs`).
    pub warnings: Vec<String>,
    /// `randomScaleIn`: the latency vote's random scale-in, on unless `"false"` (upstream's
    /// `EnableRandomScaleDownOnLowLatency` defaults to true).
    pub random_scale_in: bool,
}

/// The per-worker limits a trigger sets explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitOverrides {
    /// `maxActivitiesPerWorker`.
    pub max_activities: Option<u32>,
    /// `maxOrchestrationsPerWorker`.
    pub max_orchestrations: Option<u32>,
}

/// Per-worker limits a hub's decisions divide by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WorkerLimits {
    /// Activities one worker runs at once.
    pub max_activities: u32,
    /// Orchestrations one worker runs at once.
    pub max_orchestrations: u32,
}

impl WorkerLimits {
    /// A 1-CPU pod's limits with the extension's defaults outside the Consumption plan
    /// ([`WORK_ITEMS_PER_CPU`] x 1 of each): the guess when nothing better is known.
    pub const ONE_CPU: Self =
        Self { max_activities: WORK_ITEMS_PER_CPU, max_orchestrations: WORK_ITEMS_PER_CPU };
}

/// What a pod reported about its app's limits (report field `limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedLimits {
    /// The limits in force in the app.
    pub limits: WorkerLimits,
    /// The CPUs the app sees; 0 when the sidecar could not tell.
    pub processor_count: u32,
}

/// The app's storage-provider queue settings as a pod last reported them (report field
/// `queue_settings`; `None`: the app leaves the extension's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ReportedQueueSettings {
    /// `controlQueueVisibilityTimeout`, ms.
    pub control_queue_visibility_timeout_ms: Option<u64>,
    /// `workItemQueueVisibilityTimeout`, ms.
    pub work_item_queue_visibility_timeout_ms: Option<u64>,
    /// `controlQueueBufferThreshold`.
    pub control_queue_buffer_threshold: Option<u32>,
    /// `maxQueuePollingInterval`, ms.
    pub max_queue_polling_interval_ms: Option<u64>,
}

/// Where a hub's limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitSource {
    /// The trigger's `maxActivitiesPerWorker` / `maxOrchestrationsPerWorker`.
    Metadata,
    /// What the hub's pods last reported (kept while the app is scaled to zero).
    Reported,
    /// Nothing known: [`WorkerLimits::ONE_CPU`].
    Guess,
}

/// The limits a hub's decisions divide by, and where each comes from (shown on `/hubs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EffectiveLimits {
    /// Activities per worker.
    pub max_activities: u32,
    /// Where `max_activities` comes from.
    pub activities_from: LimitSource,
    /// Orchestrations per worker.
    pub max_orchestrations: u32,
    /// Where `max_orchestrations` comes from.
    pub orchestrations_from: LimitSource,
    /// The CPUs the reporting pod's app sees, when a pod told.
    pub processor_count: Option<u32>,
}

impl EffectiveLimits {
    /// Per limit: the trigger's explicit value, else the pods' last report, else the guess.
    pub fn resolve(overrides: LimitOverrides, reported: Option<ReportedLimits>) -> Self {
        let pick = |explicit: Option<u32>, reported: Option<u32>, guess: u32| match (explicit, reported) {
            (Some(v), _) => (v, LimitSource::Metadata),
            (None, Some(v)) => (v, LimitSource::Reported),
            (None, None) => (guess, LimitSource::Guess),
        };
        let (max_activities, activities_from) = pick(
            overrides.max_activities,
            reported.map(|r| r.limits.max_activities),
            WorkerLimits::ONE_CPU.max_activities,
        );
        let (max_orchestrations, orchestrations_from) = pick(
            overrides.max_orchestrations,
            reported.map(|r| r.limits.max_orchestrations),
            WorkerLimits::ONE_CPU.max_orchestrations,
        );
        Self {
            max_activities,
            activities_from,
            max_orchestrations,
            orchestrations_from,
            processor_count: reported.map(|r| r.processor_count).filter(|n| *n > 0),
        }
    }

    /// The two limits.
    pub fn limits(&self) -> WorkerLimits {
        WorkerLimits { max_activities: self.max_activities, max_orchestrations: self.max_orchestrations }
    }

    /// The `/hubs` note when a limit is guessed.
    pub fn note(&self) -> Option<String> {
        let guessed = [
            (self.activities_from, "maxActivitiesPerWorker"),
            (self.orchestrations_from, "maxOrchestrationsPerWorker"),
        ]
        .into_iter()
        .filter(|(from, _)| *from == LimitSource::Guess)
        .map(|(_, key)| key)
        .collect::<Vec<_>>();
        (!guessed.is_empty()).then(|| {
            format!(
                "per-worker limits are a guess: no pod has reported its app's limits and the trigger \
                 sets no {}; assuming a 1-CPU pod's defaults ({WORK_ITEMS_PER_CPU} x 1 CPU)",
                guessed.join(" or ")
            )
        })
    }
}

/// A metadata key with a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scalerMetadata.{key}: expected {expected}, got {got}")]
pub struct MetadataError {
    /// The offending key (`*` for the map as a whole or a key it does not know).
    pub key: &'static str,
    /// What the key accepts.
    pub expected: &'static str,
    /// What was sent, quoted and cut short ([`quote`]; `<missing>` when absent); never a
    /// connection string.
    pub got: String,
}

/// Which storage endpoints a trigger's connection string may name. Whoever reaches the KEDA
/// port chooses the connection, and the cold probe sends requests signed with its key to
/// the endpoints it names: over plain http those go to a host of the caller's choice in
/// clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointRule {
    /// https only, but for `UseDevelopmentStorage=true` on its default loopback address
    /// (the aggregator's own emulator): the default.
    #[default]
    HttpsOnly,
    /// http too (the aggregator's `--allow-http-storage`: a development emulator elsewhere).
    AllowHttp,
}

/// Every key [`HubSettings::from_metadata`] reads; two of them differing only in case are
/// refused rather than one picked at random.
const KNOWN_KEYS: [&str; 16] = [
    "taskHubName",
    "connection",
    "connectionFromEnv",
    "maxActivitiesPerWorker",
    "maxOrchestrationsPerWorker",
    "useTablePartitionManagement",
    "scaleAlgorithm",
    "maxPollingIntervalMs",
    "workerStartupMs",
    "randomScaleIn",
    "accountName",
    "useManagedIdentity",
    "clientId",
    "cloud",
    "endpointSuffix",
    "entraEndpoint",
];

/// The keys of an account reached by name (wsugarman's "service URI only" properties).
const ACCOUNT_NAME_ONLY: [&str; 4] = ["clientId", "cloud", "endpointSuffix", "entraEndpoint"];

/// The keys whose value is a storage connection string: longer, and never quoted.
const CONNECTION_KEYS: [&str; 2] = ["connectionFromEnv", "connection"];

/// Checks the size of the map, of every key and of every value before anything is parsed
/// or kept: KEDA passes what the ScaledObject says, and anyone who reaches the KEDA port can
/// send anything.
fn check_sizes(metadata: &HashMap<String, String>) -> Result<(), MetadataError> {
    if metadata.len() > METADATA_MAX_ENTRIES {
        return Err(MetadataError {
            key: "*",
            expected: "at most 32 entries",
            got: format!("{} entries", metadata.len()),
        });
    }
    for (key, value) in metadata {
        if key.len() > METADATA_VALUE_MAX_LEN {
            return Err(MetadataError {
                key: "*",
                expected: "keys of at most 256 bytes",
                got: format!("the key {}", quote(key)),
            });
        }
        if let Some(connection_key) = CONNECTION_KEYS.iter().find(|k| **k == key) {
            if value.len() > CONNECTION_MAX_LEN {
                return Err(MetadataError {
                    key: connection_key,
                    expected: "a connection string of at most 4096 bytes",
                    got: format!("{} bytes", value.len()),
                });
            }
        } else if value.len() > METADATA_VALUE_MAX_LEN {
            return Err(MetadataError {
                key: "*",
                expected: "values of at most 256 bytes",
                got: format!("{} for the key {}", quote(value), quote(key)),
            });
        }
    }
    Ok(())
}

impl HubSettings {
    /// The defaults for a hub only sidecars have told about (no KEDA call yet).
    pub(crate) fn defaults(task_hub: &str) -> Self {
        Self {
            task_hub: task_hub.to_string(),
            connection: None,
            limits: LimitOverrides::default(),
            partition_mode: PartitionMode::Auto,
            algorithm: Algorithm::default(),
            max_polling_interval_ms: None,
            worker_startup_ms: DurableSettings::default().startup_ms,
            warnings: Vec::new(),
            random_scale_in: true,
        }
    }

    /// Parses the metadata map (keys in any case, as wsugarman's configuration binding
    /// reads them), with the default [`EndpointRule`]. No I/O: it is called on every KEDA
    /// call.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Result<Self, MetadataError> {
        Self::from_metadata_with(metadata, EndpointRule::default())
    }

    /// [`Self::from_metadata`] with the storage endpoints `rule` allows.
    pub fn from_metadata_with(
        metadata: &HashMap<String, String>,
        rule: EndpointRule,
    ) -> Result<Self, MetadataError> {
        check_sizes(metadata)?;
        check_case_conflicts(metadata)?;
        let get = |key: &str| {
            metadata
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let mut warnings = Vec::new();
        let task_hub = match get("taskHubName") {
            // The one rule (crate::contract::TaskHub); the hub is kept by name here.
            Some(name) if TaskHub::parse(name).is_ok() => name.to_string(),
            None => {
                // wsugarman's ScalerOptions.TaskHubName defaults so, as the extension does.
                warnings.push(format!(
                    "taskHubName is not set: assuming the Durable Functions default {DEFAULT_TASK_HUB}; \
                     set it to the app's task hub"
                ));
                DEFAULT_TASK_HUB.to_string()
            }
            Some(other) => {
                return Err(MetadataError {
                    key: "taskHubName",
                    expected: "a task hub name of 3 to 50 letters or digits, starting with a letter",
                    got: quote(other),
                });
            }
        };
        let connection = connection(&get, rule)?;
        let positive = |key: &'static str| -> Result<Option<u32>, MetadataError> {
            get(key)
                .map(|v| {
                    v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| MetadataError {
                        key,
                        expected: "a whole number of at least 1",
                        got: quote(v),
                    })
                })
                .transpose()
        };
        let limits = LimitOverrides {
            max_activities: positive("maxActivitiesPerWorker")?,
            max_orchestrations: positive("maxOrchestrationsPerWorker")?,
        };
        // Unset: detected per hub, as DurableTask decides it; true or false overrides.
        let partition_mode = match boolean(&get, "useTablePartitionManagement")? {
            None => PartitionMode::Auto,
            Some(true) => PartitionMode::Table,
            Some(false) => PartitionMode::Blob,
        };
        let algorithm = match get("scaleAlgorithm") {
            None => Algorithm::default(),
            Some(v) => v.parse::<Algorithm>().map_err(|_| MetadataError {
                key: "scaleAlgorithm",
                expected: "durable, target, target-inflight or latency",
                got: quote(v),
            })?,
        };
        let max_polling_interval_ms = get("maxPollingIntervalMs")
            .map(|v| {
                v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| MetadataError {
                    key: "maxPollingIntervalMs",
                    expected: "a whole number of milliseconds, at least 1",
                    got: quote(v),
                })
            })
            .transpose()?;
        let worker_startup_ms = match get("workerStartupMs") {
            None => DurableSettings::default().startup_ms,
            Some(v) => v.parse::<u64>().map_err(|_| MetadataError {
                key: "workerStartupMs",
                expected: "a whole number of milliseconds",
                got: quote(v),
            })?,
        };
        let random_scale_in = match get("randomScaleIn") {
            None => true,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(MetadataError {
                    key: "randomScaleIn",
                    expected: "true or false",
                    got: v.to_string(),
                });
            }
        };
        Ok(Self {
            task_hub,
            connection,
            limits,
            partition_mode,
            algorithm,
            max_polling_interval_ms,
            worker_startup_ms,
            warnings,
            random_scale_in,
        })
    }
}

/// `true` or `false` in any case; `None` when unset.
fn boolean<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    key: &'static str,
) -> Result<Option<bool>, MetadataError> {
    match get(key) {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(MetadataError { key, expected: "true or false", got: quote(v) }),
    }
}

/// The storage account, validated as wsugarman's `ValidateScalerOptions.cs` does: a
/// connection string (`connection` or `connectionFromEnv`, not both) and none of the
/// account-name keys, or `accountName` with `useManagedIdentity: true` and no connection;
/// `cloud` one of wsugarman's names, `endpointSuffix` and `entraEndpoint` both given for a
/// `Private` cloud and neither for another.
fn connection<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    rule: EndpointRule,
) -> Result<Option<Connection>, MetadataError> {
    let managed_identity = boolean(get, "useManagedIdentity")?;
    let strings = (get("connection"), get("connectionFromEnv"));
    let Some(account_name) = get("accountName") else {
        if let Some(key) = ACCOUNT_NAME_ONLY.into_iter().find(|key| get(key).is_some()) {
            return Err(MetadataError {
                key,
                expected: "to be set only with accountName",
                got: quote(get(key).unwrap_or_default()),
            });
        }
        if managed_identity == Some(true) {
            return Err(MetadataError {
                key: "useManagedIdentity",
                expected: "true only with accountName (a connection string carries its own credential)",
                got: "true".into(),
            });
        }
        return match strings {
            (Some(_), Some(_)) => Err(MetadataError {
                key: "connection",
                expected: "either connection or connectionFromEnv, not both",
                got: "<both set>".into(),
            }),
            (Some(text), None) => connection_string("connection", text, rule).map(Some),
            (None, Some(text)) => connection_string("connectionFromEnv", text, rule).map(Some),
            (None, None) => Ok(None),
        };
    };
    if strings.0.is_some() || strings.1.is_some() {
        return Err(MetadataError {
            key: "accountName",
            expected: "either accountName or a connection (connection, connectionFromEnv), not both",
            got: quote(account_name),
        });
    }
    // Storage account names: 3 to 24 lowercase letters and digits. Checked here because the
    // name becomes part of the endpoints' host.
    if !(3..=24).contains(&account_name.len())
        || !account_name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(MetadataError {
            key: "accountName",
            expected: "a storage account name of 3 to 24 lowercase letters and digits",
            got: quote(account_name),
        });
    }
    if managed_identity != Some(true) {
        return Err(MetadataError {
            key: "useManagedIdentity",
            expected: "true with accountName (the account is reached with workload identity)",
            got: quote(get("useManagedIdentity").unwrap_or("<missing>")),
        });
    }
    let (suffix, entra) = (get("endpointSuffix"), get("entraEndpoint"));
    let named = AzureCloud::parse_named(get("cloud")).map_err(|e| MetadataError {
        key: "cloud",
        expected: "AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud or Private",
        got: e.0,
    })?;
    let cloud = match named {
        Some(cloud) => {
            if let Some((key, value)) = [("endpointSuffix", suffix), ("entraEndpoint", entra)]
                .into_iter()
                .find_map(|(k, v)| v.map(|v| (k, v)))
            {
                return Err(MetadataError {
                    key,
                    expected: "to be set only with cloud: Private",
                    got: quote(value),
                });
            }
            cloud
        }
        None => {
            let endpoint_suffix = suffix.filter(|s| valid_suffix(s)).ok_or_else(|| MetadataError {
                key: "endpointSuffix",
                expected: "a DNS suffix such as core.windows.net (required with cloud: Private)",
                got: quote(suffix.unwrap_or("<missing>")),
            })?;
            let entra_endpoint = entra
                .and_then(crate::config::http_url)
                .filter(|u| u.scheme() == "https")
                .ok_or_else(|| MetadataError {
                    key: "entraEndpoint",
                    expected: "an https URL of the Entra ID authority (required with cloud: Private)",
                    got: quote(entra.unwrap_or("<missing>")),
                })?;
            AzureCloud::Private { endpoint_suffix: endpoint_suffix.to_string(), entra_endpoint }
        }
    };
    Ok(Some(Connection::Identity(IdentityAccount {
        account_name: account_name.to_string(),
        cloud,
        client_id: get("clientId").map(str::to_string),
    })))
}

/// The connection string `text` of metadata key `key`, parsed now (so a bad one is refused
/// at once, naming the key, rather than failing the probe on every round) and held to
/// `rule`. Errors name the connection string's offending key, never a value of it.
fn connection_string(key: &'static str, text: &str, rule: EndpointRule) -> Result<Connection, MetadataError> {
    let parsed = ConnectionString::parse(text).map_err(|e| MetadataError {
        key,
        expected: "a storage connection string",
        got: match e {
            StorageError::Unexpected { message, .. } => format!("one where {message}"),
            other => other.to_string(),
        },
    })?;
    if let (EndpointRule::HttpsOnly, Some(http_key)) = (rule, parsed.plain_http_key()) {
        return Err(MetadataError {
            key,
            expected: "https storage endpoints (plain http only for UseDevelopmentStorage=true, or when the \
                       aggregator runs with --allow-http-storage)",
            got: format!("http in {http_key}"),
        });
    }
    Ok(Connection::String(text.to_string()))
}

/// Refuses two keys [`HubSettings::from_metadata`] reads that differ only in case
/// (`taskHubName` and `TaskHubName`): which one a lookup found would depend on the map's
/// order, and so change from call to call.
fn check_case_conflicts(metadata: &HashMap<String, String>) -> Result<(), MetadataError> {
    for known in KNOWN_KEYS {
        let mut spellings: Vec<&str> =
            metadata.keys().filter(|k| k.eq_ignore_ascii_case(known)).map(String::as_str).collect();
        if spellings.len() > 1 {
            spellings.sort_unstable();
            return Err(MetadataError {
                key: known,
                expected: "one entry whatever its case (keys are read in any case)",
                got: spellings.iter().map(|k| quote(k)).collect::<Vec<_>>().join(" and "),
            });
        }
    }
    Ok(())
}

/// A host-name suffix: dot-separated labels of letters, digits and hyphens.
fn valid_suffix(suffix: &str) -> bool {
    suffix
        .split('.')
        .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<HubSettings, MetadataError> {
        HubSettings::from_metadata(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn only_the_task_hub_is_required_and_defaults_fill_the_rest() {
        let s = parse(&[("taskHubName", "MyHub"), ("scalerAddress", "x:4370")]).unwrap();
        assert_eq!(s.task_hub, "MyHub");
        assert_eq!(s.connection, None);
        assert_eq!(s.limits, LimitOverrides::default());
        assert!(s.warnings.is_empty());
        assert_eq!(s.partition_mode, PartitionMode::Auto);
        assert_eq!(s.algorithm, Algorithm::Durable);
        assert_eq!(s.max_polling_interval_ms, None, "DTFx's 30 s unless the app or the trigger says");
        assert_eq!(s.worker_startup_ms, 20_000);
        assert!(s.random_scale_in, "on, as upstream");
    }

    #[test]
    fn random_scale_in_false_turns_the_latency_dice_off() {
        assert!(!parse(&[("taskHubName", "MyHub"), ("randomScaleIn", "False")]).unwrap().random_scale_in);
        assert!(parse(&[("taskHubName", "MyHub"), ("randomScaleIn", "true")]).unwrap().random_scale_in);
    }

    const KEYED: &str = "DefaultEndpointsProtocol=https;AccountName=orders;AccountKey=a2V5";

    #[test]
    fn connection_or_the_resolved_connection_from_env_is_the_connection_string() {
        let s = parse(&[("taskHubName", "MyHub"), ("connectionFromEnv", KEYED)]).unwrap();
        assert_eq!(s.connection, Some(Connection::String(KEYED.into())));
        let s = parse(&[("taskHubName", "MyHub"), ("connection", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(s.connection, Some(Connection::String("UseDevelopmentStorage=true".into())));
    }

    #[test]
    fn a_bad_connection_string_is_refused_naming_its_key_and_never_echoed() {
        for (key, value, problem) in [
            ("connectionFromEnv", "AccountName=orders;justasecretvalue", "segment 2"),
            ("connection", "AccountName=orders;AccountKey=not*base64*secret", "AccountKey"),
            ("connectionFromEnv", "AccountKey=c2VjcmV0c2VjcmV0", "AccountName"),
            ("connection", "AccountName=orders;AccountKey=a2V5;QueueEndpoint=not a url", "QueueEndpoint"),
        ] {
            let err = parse(&[("taskHubName", "MyHub"), (key, value)]).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            let text = err.to_string();
            assert!(text.contains(problem), "{text}");
            assert!(!text.contains("secret") && !text.contains("c2VjcmV0"), "{text}");
        }
    }

    #[test]
    fn plain_http_endpoints_are_refused_naming_the_key_unless_allowed() {
        for (connection, http_key) in [
            ("DefaultEndpointsProtocol=http;AccountName=orders;AccountKey=a2V5", "DefaultEndpointsProtocol"),
            ("AccountName=orders;AccountKey=a2V5;QueueEndpoint=http://10.0.0.5:8080/orders", "QueueEndpoint"),
            (
                "BlobEndpoint=https://x.blob.core.windows.net;QueueEndpoint=https://x.queue.core.windows.net;\
                 TableEndpoint=HTTP://internal.example:80;SharedAccessSignature=sv=1&sig=abc",
                "TableEndpoint",
            ),
            (
                "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://10.0.0.5",
                "DevelopmentStorageProxyUri",
            ),
        ] {
            let metadata = [("taskHubName", "MyHub"), ("connectionFromEnv", connection)];
            let err = parse(&metadata).unwrap_err();
            assert_eq!(err.key, "connectionFromEnv");
            assert!(err.to_string().contains(http_key) && err.to_string().contains("https"), "{err}");
            let map: HashMap<String, String> =
                metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let allowed = HubSettings::from_metadata_with(&map, EndpointRule::AllowHttp).unwrap();
            assert_eq!(allowed.connection, Some(Connection::String(connection.into())));
        }
    }

    #[test]
    fn development_storage_on_its_loopback_default_and_https_endpoints_need_no_opt_in() {
        for connection in [
            "UseDevelopmentStorage=true",
            KEYED,
            "AccountName=orders;AccountKey=a2V5;QueueEndpoint=https://queue.example/orders",
        ] {
            assert!(parse(&[("taskHubName", "MyHub"), ("connection", connection)]).is_ok(), "{connection}");
        }
    }

    #[test]
    fn keys_differing_only_in_case_are_refused_as_a_conflict() {
        let err = parse(&[("taskHubName", "HubOne"), ("TaskHubName", "HubTwo")]).unwrap_err();
        assert_eq!(err.key, "taskHubName");
        assert!(err.to_string().contains("\"TaskHubName\" and \"taskHubName\""), "{err}");
        let err =
            parse(&[("taskHubName", "MyHub"), ("connection", KEYED), ("CONNECTION", KEYED)]).unwrap_err();
        assert_eq!(err.key, "connection");
        assert!(!err.to_string().contains("a2V5"), "values are not quoted: {err}");
        // Keys the trigger does not use are not ours to judge.
        assert!(parse(&[("taskHubName", "MyHub"), ("foo", "1"), ("FOO", "2")]).is_ok());
    }

    #[test]
    fn connection_and_connection_from_env_together_are_refused_as_wsugarman_does() {
        let err =
            parse(&[("taskHubName", "MyHub"), ("connectionFromEnv", "A"), ("connection", "B")]).unwrap_err();
        assert_eq!(err.key, "connection");
        assert!(!err.to_string().contains("\"A\"") && !err.to_string().contains("\"B\""), "{err}");
    }

    #[test]
    fn a_missing_task_hub_is_test_hub_name_with_a_warning() {
        let s = parse(&[("connection", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(s.task_hub, "TestHubName");
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("taskHubName is not set") && s.warnings[0].contains("TestHubName"));
    }

    #[test]
    fn explicit_limits_are_kept_and_unset_ones_left_to_the_pods() {
        let s = parse(&[("taskHubName", "MyHub"), ("maxActivitiesPerWorker", "30")]).unwrap();
        assert_eq!(s.limits, LimitOverrides { max_activities: Some(30), max_orchestrations: None });
    }

    #[test]
    fn keys_are_read_in_any_case_as_wsugarmans_binding_does() {
        let s = parse(&[("TASKHUBNAME", "MyHub"), ("maxorchestrationsperworker", "3")]).unwrap();
        assert_eq!((s.task_hub.as_str(), s.limits.max_orchestrations), ("MyHub", Some(3)));
    }

    fn identity(pairs: &[(&str, &str)]) -> IdentityAccount {
        let mut all =
            vec![("taskHubName", "MyHub"), ("accountName", "orders"), ("useManagedIdentity", "true")];
        all.extend_from_slice(pairs);
        match parse(&all).unwrap().connection {
            Some(Connection::Identity(identity)) => identity,
            other => panic!("not an identity account: {other:?}"),
        }
    }

    fn refused(pairs: &[(&str, &str)]) -> &'static str {
        let mut all = vec![("taskHubName", "MyHub")];
        all.extend_from_slice(pairs);
        parse(&all).unwrap_err().key
    }

    #[test]
    fn account_name_with_managed_identity_is_the_public_cloud_by_default() {
        let a = identity(&[]);
        assert_eq!((a.account_name.as_str(), &a.cloud, a.client_id), ("orders", &AzureCloud::Public, None));
    }

    #[test]
    fn client_id_picks_the_identity() {
        assert_eq!(identity(&[("clientId", "0000-1111")]).client_id.as_deref(), Some("0000-1111"));
    }

    #[test]
    fn each_named_cloud_is_taken_in_any_case() {
        assert_eq!(identity(&[("cloud", "AzurePublicCloud")]).cloud, AzureCloud::Public);
        assert_eq!(identity(&[("cloud", "azureusgovernmentcloud")]).cloud, AzureCloud::UsGovernment);
        assert_eq!(identity(&[("cloud", "AzureChinaCloud")]).cloud, AzureCloud::China);
    }

    #[test]
    fn a_private_cloud_takes_its_suffix_and_entra_endpoint() {
        let a = identity(&[
            ("cloud", "Private"),
            ("endpointSuffix", "storage.stack.local"),
            ("entraEndpoint", "https://login.stack.local/"),
        ]);
        assert_eq!(a.cloud.storage_suffix(), "storage.stack.local");
        assert_eq!(a.cloud.authority_host(), "https://login.stack.local/");
    }

    #[test]
    fn a_private_cloud_needs_both_of_its_values() {
        let base = [("accountName", "orders"), ("useManagedIdentity", "true"), ("cloud", "Private")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            refused(&all)
        };
        assert_eq!(with(&[("entraEndpoint", "https://login.stack.local/")]), "endpointSuffix");
        assert_eq!(with(&[("endpointSuffix", "stack.local")]), "entraEndpoint");
        assert_eq!(
            with(&[("endpointSuffix", "stack.local"), ("entraEndpoint", "http://login")]),
            "entraEndpoint"
        );
        assert_eq!(with(&[("endpointSuffix", "a/b"), ("entraEndpoint", "https://login")]), "endpointSuffix");
    }

    #[test]
    fn suffix_and_entra_endpoint_belong_to_a_private_cloud_only() {
        let base = [("accountName", "orders"), ("useManagedIdentity", "true")];
        for (key, value) in [("endpointSuffix", "core.windows.net"), ("entraEndpoint", "https://login")] {
            let mut all = base.to_vec();
            all.push((key, value));
            assert_eq!(refused(&all), key);
            all.push(("cloud", "AzureChinaCloud"));
            assert_eq!(refused(&all), key);
        }
    }

    #[test]
    fn an_unknown_cloud_is_refused() {
        assert_eq!(
            refused(&[("accountName", "orders"), ("useManagedIdentity", "true"), ("cloud", "Mars")]),
            "cloud"
        );
    }

    #[test]
    fn account_name_needs_managed_identity() {
        assert_eq!(refused(&[("accountName", "orders")]), "useManagedIdentity");
        assert_eq!(
            refused(&[("accountName", "orders"), ("useManagedIdentity", "false")]),
            "useManagedIdentity"
        );
        assert_eq!(
            refused(&[("accountName", "orders"), ("useManagedIdentity", "yes")]),
            "useManagedIdentity"
        );
    }

    #[test]
    fn account_name_and_a_connection_string_conflict() {
        for key in ["connection", "connectionFromEnv"] {
            assert_eq!(
                refused(&[("accountName", "orders"), ("useManagedIdentity", "true"), (key, "x")]),
                "accountName"
            );
        }
    }

    #[test]
    fn an_account_name_that_is_no_storage_account_name_is_refused() {
        for bad in ["ab", "Orders", "orders.evil.example", &"a".repeat(25)] {
            assert_eq!(
                refused(&[("accountName", bad), ("useManagedIdentity", "true")]),
                "accountName",
                "{bad}"
            );
        }
    }

    #[test]
    fn account_name_keys_without_an_account_name_are_refused() {
        for (key, value) in [
            ("clientId", "0000"),
            ("cloud", "AzureChinaCloud"),
            ("endpointSuffix", "core.windows.net"),
            ("entraEndpoint", "https://login"),
            ("useManagedIdentity", "true"),
        ] {
            assert_eq!(refused(&[("connection", "UseDevelopmentStorage=true"), (key, value)]), key);
        }
        let s = parse(&[("taskHubName", "MyHub"), ("useManagedIdentity", "false")]).unwrap();
        assert_eq!(s.connection, None);
    }

    #[test]
    fn every_bad_value_names_its_key() {
        for (key, value) in [
            ("taskHubName", "ab"),
            ("taskHubName", "1hub"),
            ("maxActivitiesPerWorker", "0"),
            ("maxOrchestrationsPerWorker", "many"),
            ("useTablePartitionManagement", "yes"),
            ("scaleAlgorithm", "cpu"),
            ("maxPollingIntervalMs", "-1"),
            ("workerStartupMs", "soon"),
            ("randomScaleIn", "sometimes"),
        ] {
            let mut pairs = vec![("taskHubName", "MyHub")];
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            let err = parse(&pairs).unwrap_err();
            assert_eq!(err.key, key);
            assert!(err.to_string().contains(key) && err.to_string().contains(value), "{err}");
        }
        assert_eq!(parse(&[]).map(|s| s.task_hub).ok().as_deref(), Some("TestHubName"));
    }

    #[test]
    fn oversized_metadata_is_refused_naming_the_key_and_quoting_a_prefix() {
        let huge = "x".repeat(4_000_000);
        for key in ["taskHubName", "scaleAlgorithm", "someKey"] {
            let err = parse(&[("taskHubName", "MyHub"), (key, &huge)]).unwrap_err();
            assert!(err.to_string().len() < 300, "{} bytes", err.to_string().len());
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = parse(&[("taskHubName", "MyHub"), ("connection", &"k".repeat(4097))]).unwrap_err();
        assert_eq!(err.key, "connection");
        assert!(!err.to_string().contains("kkk"), "a connection string is never quoted: {err}");
        let padding = "k".repeat(4096 - "UseDevelopmentStorage=true;Pad=".len());
        let connection = format!("UseDevelopmentStorage=true;Pad={padding}");
        assert_eq!(connection.len(), 4096);
        assert!(parse(&[("taskHubName", "MyHub"), ("connection", &connection)]).is_ok());
        let many: HashMap<String, String> =
            (0..=METADATA_MAX_ENTRIES).map(|i| (format!("k{i}"), "v".into())).collect();
        let err = HubSettings::from_metadata(&many).unwrap_err();
        assert!(err.to_string().contains(&format!("at most {METADATA_MAX_ENTRIES} entries")), "{err}");
    }

    #[test]
    fn algorithm_and_booleans_ignore_case() {
        let s = parse(&[
            ("taskHubName", "MyHub"),
            ("scaleAlgorithm", "Latency"),
            ("useTablePartitionManagement", "FALSE"),
        ])
        .unwrap();
        assert_eq!((s.algorithm, s.partition_mode), (Algorithm::Latency, PartitionMode::Blob));
        let s = parse(&[("taskHubName", "MyHub"), ("scaleAlgorithm", "TARGET"), ("workerStartupMs", "2000")])
            .unwrap();
        assert_eq!((s.algorithm, s.worker_startup_ms), (Algorithm::Target, 2000));
        let s = parse(&[("taskHubName", "MyHub"), ("scaleAlgorithm", "Durable")]).unwrap();
        assert_eq!(s.algorithm, Algorithm::Durable);
    }

    fn reported(activities: u32, orchestrations: u32, cpus: u32) -> Option<ReportedLimits> {
        Some(ReportedLimits {
            limits: WorkerLimits { max_activities: activities, max_orchestrations: orchestrations },
            processor_count: cpus,
        })
    }

    #[test]
    fn nothing_known_is_ten_and_ten_with_a_note() {
        let l = EffectiveLimits::resolve(LimitOverrides::default(), None);
        assert_eq!((l.max_activities, l.max_orchestrations), (10, 10));
        assert_eq!((l.activities_from, l.orchestrations_from), (LimitSource::Guess, LimitSource::Guess));
        assert!(l.note().is_some_and(|n| n.contains("guess")));
    }

    #[test]
    fn reported_limits_are_used_when_the_trigger_sets_none() {
        let l = EffectiveLimits::resolve(LimitOverrides::default(), reported(20, 20, 2));
        assert_eq!((l.max_activities, l.max_orchestrations, l.processor_count), (20, 20, Some(2)));
        assert_eq!(l.note(), None);
    }

    #[test]
    fn explicit_metadata_wins_over_reports_per_limit() {
        let overrides = LimitOverrides { max_activities: Some(4), max_orchestrations: None };
        let l = EffectiveLimits::resolve(overrides, reported(20, 20, 2));
        assert_eq!((l.max_activities, l.activities_from), (4, LimitSource::Metadata));
        assert_eq!((l.max_orchestrations, l.orchestrations_from), (20, LimitSource::Reported));
    }

    #[test]
    fn one_guessed_limit_is_named_in_the_note() {
        let overrides = LimitOverrides { max_activities: Some(4), max_orchestrations: None };
        let note = EffectiveLimits::resolve(overrides, None).note().unwrap();
        assert!(
            note.contains("maxOrchestrationsPerWorker") && !note.contains("maxActivitiesPerWorker"),
            "{note}"
        );
    }
}
