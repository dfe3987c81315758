//! The trigger metadata KEDA sends in `scalerMetadata`, parsed into typed settings.
//!
//! Keys are compatible with wsugarman/durabletask-azurestorage-scaler (architecture.md);
//! unknown keys (such as `scalerAddress`) are ignored. A bad value is refused with an error
//! naming the key and the value expected, which the KEDA service turns into INVALID_ARGUMENT.

use std::collections::HashMap;

use crate::contract::TaskHub;
use crate::heuristic::Algorithm;
use crate::heuristic::durable::DurableSettings;
use crate::heuristic::latency::DEFAULT_MAX_POLLING_INTERVAL_MS;
use crate::heuristic::target::TargetSettings;
use crate::storage::PartitionMode;

/// What one ScaledObject's trigger metadata says about its task hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// `taskHubName`, case preserved.
    pub task_hub: String,
    /// The storage connection string (`connectionFromEnv`'s resolved value, else
    /// `connection`); `None` when the trigger gives neither.
    pub connection: Option<String>,
    /// `maxActivitiesPerWorker` and `maxOrchestrationsPerWorker`.
    pub target: TargetSettings,
    /// `useTablePartitionManagement`: an override; unset, the layout is detected.
    pub partition_mode: PartitionMode,
    /// `scaleAlgorithm`.
    pub algorithm: Algorithm,
    /// `maxPollingIntervalMs`.
    pub max_polling_interval_ms: u64,
    /// `workerStartupMs`: how long a new worker pod takes to take work (durable algorithm).
    pub worker_startup_ms: u64,
    /// `randomScaleIn`: the latency vote's random scale-in, on unless `"false"` (upstream's
    /// `EnableRandomScaleDownOnLowLatency` defaults to true).
    pub random_scale_in: bool,
}

/// A metadata key with a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scalerMetadata.{key}: expected {expected}, got {got:?}")]
pub struct MetadataError {
    /// The offending key.
    pub key: &'static str,
    /// What the key accepts.
    pub expected: &'static str,
    /// What was sent (`<missing>` when absent); never a connection string.
    pub got: String,
}

impl HubSettings {
    /// The defaults for a hub only sidecars have told about (no KEDA call yet).
    pub fn defaults(task_hub: &str) -> Self {
        Self {
            task_hub: task_hub.to_string(),
            connection: None,
            target: TargetSettings::default(),
            partition_mode: PartitionMode::Auto,
            algorithm: Algorithm::default(),
            max_polling_interval_ms: DEFAULT_MAX_POLLING_INTERVAL_MS,
            worker_startup_ms: DurableSettings::default().startup_ms,
            random_scale_in: true,
        }
    }

    /// Parses the metadata map. No I/O: it is called on every KEDA call.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Result<Self, MetadataError> {
        let get = |key: &str| metadata.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
        let task_hub = match get("taskHubName") {
            // The one rule (crate::contract::TaskHub); the hub is kept by name here.
            Some(name) if TaskHub::parse(name).is_ok() => name.to_string(),
            other => {
                return Err(MetadataError {
                    key: "taskHubName",
                    expected: "a task hub name of 3 to 50 letters or digits, starting with a letter",
                    got: other.unwrap_or("<missing>").to_string(),
                });
            }
        };
        let connection = get("connectionFromEnv").or_else(|| get("connection")).map(str::to_string);
        let positive = |key: &'static str, default: u32| -> Result<u32, MetadataError> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| MetadataError {
                    key,
                    expected: "a whole number of at least 1",
                    got: v.to_string(),
                }),
            }
        };
        let defaults = TargetSettings::default();
        let target = TargetSettings {
            max_activities_per_worker: positive(
                "maxActivitiesPerWorker",
                defaults.max_activities_per_worker,
            )?,
            max_orchestrations_per_worker: positive(
                "maxOrchestrationsPerWorker",
                defaults.max_orchestrations_per_worker,
            )?,
        };
        // Unset: detected per hub, as DurableTask decides it; true or false overrides.
        let partition_mode = match get("useTablePartitionManagement") {
            None => PartitionMode::Auto,
            Some(v) if v.eq_ignore_ascii_case("true") => PartitionMode::Table,
            Some(v) if v.eq_ignore_ascii_case("false") => PartitionMode::Blob,
            Some(v) => {
                return Err(MetadataError {
                    key: "useTablePartitionManagement",
                    expected: "true or false",
                    got: v.to_string(),
                });
            }
        };
        let algorithm = match get("scaleAlgorithm") {
            None => Algorithm::default(),
            Some(v) => v.parse::<Algorithm>().map_err(|_| MetadataError {
                key: "scaleAlgorithm",
                expected: "durable, target, target-inflight or latency",
                got: v.to_string(),
            })?,
        };
        let max_polling_interval_ms = match get("maxPollingIntervalMs") {
            None => DEFAULT_MAX_POLLING_INTERVAL_MS,
            Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| MetadataError {
                key: "maxPollingIntervalMs",
                expected: "a whole number of milliseconds, at least 1",
                got: v.to_string(),
            })?,
        };
        let worker_startup_ms = match get("workerStartupMs") {
            None => DurableSettings::default().startup_ms,
            Some(v) => v.parse::<u64>().map_err(|_| MetadataError {
                key: "workerStartupMs",
                expected: "a whole number of milliseconds",
                got: v.to_string(),
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
            target,
            partition_mode,
            algorithm,
            max_polling_interval_ms,
            worker_startup_ms,
            random_scale_in,
        })
    }
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
        assert_eq!(s.target, TargetSettings::default());
        assert_eq!(s.partition_mode, PartitionMode::Auto);
        assert_eq!(s.algorithm, Algorithm::Durable);
        assert_eq!(s.max_polling_interval_ms, 30_000);
        assert_eq!(s.worker_startup_ms, 20_000);
        assert!(s.random_scale_in, "on, as upstream");
    }

    #[test]
    fn random_scale_in_false_turns_the_latency_dice_off() {
        assert!(!parse(&[("taskHubName", "MyHub"), ("randomScaleIn", "False")]).unwrap().random_scale_in);
        assert!(parse(&[("taskHubName", "MyHub"), ("randomScaleIn", "true")]).unwrap().random_scale_in);
    }

    #[test]
    fn the_resolved_connection_from_env_wins_over_connection() {
        let s = parse(&[("taskHubName", "MyHub"), ("connectionFromEnv", "A"), ("connection", "B")]).unwrap();
        assert_eq!(s.connection.as_deref(), Some("A"));
        let s = parse(&[("taskHubName", "MyHub"), ("connection", "B")]).unwrap();
        assert_eq!(s.connection.as_deref(), Some("B"));
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
        assert_eq!(parse(&[]).unwrap_err().key, "taskHubName");
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
}
