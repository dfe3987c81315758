//! `durable-scaler recommend`: one JSON case on stdin, one JSON recommendation on stdout.
//!
//! A tool for users to ask "what would it decide, and why" without running anything. The
//! schema is fixed (tests outside the project use it):
//!
//! ```text
//! input:  {"algorithm": "latency" | "target", "workers": u32, "partitions": u32,
//!          "max_polling_interval_ms": u64 = 30000, "max_activities_per_worker": u32 = 10,
//!          "max_orchestrations_per_worker": u32 = 5,
//!          "work_item": {"latencies_ms": [u64...], "length": u64 = 0},
//!          "control": [{"latencies_ms": [...], "length": u64 = 0}, ...]}
//! output: {"action": "AddWorker" | "RemoveWorker" | "None", "keep_workers_alive": bool,
//!          "desired_workers": u32, "reason": "..."}
//! ```
//!
//! Latency samples are oldest first and fed into the rings in order, as the monitor would
//! have sampled them (random scale-in off). Control queues missing from `control` (fewer
//! entries than `partitions`) are idle queues sampled as often as the longest given ring.

use std::io::Read;

use serde::Deserialize;

use crate::heuristic::{
    Recommendation,
    latency::{DEFAULT_MAX_POLLING_INTERVAL_MS, LatencyHistory, LatencyVoter, TaskHubLatencies},
    target::{self, TargetSettings},
};

use crate::contract::MAX_PARTITIONS;

/// Which heuristic to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// The DTFx latency vote.
    Latency,
    /// The Functions host's target formula.
    Target,
}

/// One queue in a case.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct QueueCase {
    /// Latency samples (ms), oldest first.
    #[serde(default)]
    pub latencies_ms: Vec<u64>,
    /// Queue length.
    #[serde(default)]
    pub length: u64,
}

/// One case, as read from stdin.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    /// Which heuristic decides.
    pub algorithm: Algorithm,
    /// The current worker count.
    pub workers: u32,
    /// The task hub's partition count (1..16).
    pub partitions: u32,
    /// DTFx's maximum polling interval (latency vote).
    #[serde(default = "default_max_poll")]
    pub max_polling_interval_ms: u64,
    /// Activities per worker (target formula).
    #[serde(default = "default_max_activities")]
    pub max_activities_per_worker: u32,
    /// Orchestrations per worker (target formula).
    #[serde(default = "default_max_orchestrations")]
    pub max_orchestrations_per_worker: u32,
    /// The work-item queue.
    #[serde(default)]
    pub work_item: QueueCase,
    /// The control queues, partition 0 first.
    #[serde(default)]
    pub control: Vec<QueueCase>,
}

fn default_max_poll() -> u64 {
    DEFAULT_MAX_POLLING_INTERVAL_MS
}
fn default_max_activities() -> u32 {
    TargetSettings::default().max_activities_per_worker
}
fn default_max_orchestrations() -> u32 {
    TargetSettings::default().max_orchestrations_per_worker
}

/// A case that cannot be answered, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// Not JSON, or a field of the wrong type or missing.
    #[error("{path}: {message}")]
    Malformed {
        /// Where in the document (e.g. `control[1].latencies_ms[0]`, `.` for the top level).
        path: String,
        /// What was wrong and what was expected.
        message: String,
    },
    /// Well-formed but out of range.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What was expected.
        message: String,
    },
}

impl Case {
    /// Parses and validates a case.
    pub fn parse(json: &str) -> Result<Self, CaseError> {
        let deserializer = &mut serde_json::Deserializer::from_str(json);
        let case: Case = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            CaseError::Malformed { path: e.path().to_string(), message: e.inner().to_string() }
        })?;
        if !(1..=MAX_PARTITIONS).contains(&case.partitions) {
            return Err(CaseError::Invalid {
                field: "partitions",
                message: format!("expected 1..={MAX_PARTITIONS}, got {}", case.partitions),
            });
        }
        if case.control.len() > case.partitions as usize {
            return Err(CaseError::Invalid {
                field: "control",
                message: format!(
                    "expected at most {} entries (partitions), got {}",
                    case.partitions,
                    case.control.len()
                ),
            });
        }
        if case.algorithm == Algorithm::Latency && case.max_polling_interval_ms == 0 {
            return Err(CaseError::Invalid {
                field: "max_polling_interval_ms",
                message: "expected a value above 0".into(),
            });
        }
        Ok(case)
    }

    /// The control queues, padded with idle queues to `partitions`.
    fn control_queues(&self) -> Vec<QueueCase> {
        let samples = std::iter::once(&self.work_item)
            .chain(&self.control)
            .map(|q| q.latencies_ms.len())
            .max()
            .unwrap_or(0);
        let idle = QueueCase { latencies_ms: vec![0; samples], length: 0 };
        let mut queues = self.control.clone();
        queues.resize(self.partitions as usize, idle);
        queues
    }

    /// The recommendation for this case.
    pub fn recommend(&self) -> Recommendation {
        let control = self.control_queues();
        match self.algorithm {
            Algorithm::Latency => {
                let hub = TaskHubLatencies {
                    work_item: LatencyHistory::from_samples(self.work_item.latencies_ms.iter().copied()),
                    control: control
                        .iter()
                        .map(|q| LatencyHistory::from_samples(q.latencies_ms.iter().copied()))
                        .collect(),
                };
                LatencyVoter::new(self.max_polling_interval_ms).vote(&hub, self.workers)
            }
            Algorithm::Target => {
                let settings = TargetSettings {
                    max_activities_per_worker: self.max_activities_per_worker,
                    max_orchestrations_per_worker: self.max_orchestrations_per_worker,
                };
                let lengths: Vec<u64> = control.iter().map(|q| q.length).collect();
                target::recommend(settings, self.workers, self.work_item.length, &lengths)
            }
        }
    }
}

/// Runs the subcommand: reads stdin, writes the answer to stdout. Exit status 2 with one
/// line on stderr for a malformed case.
pub fn run() -> std::process::ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read stdin: {e}");
        return std::process::ExitCode::from(2);
    }
    match Case::parse(&input) {
        Ok(case) => {
            let recommendation = case.recommend();
            // Serializing a struct of plain fields cannot fail.
            println!("{}", serde_json::to_string(&recommendation).unwrap_or_default());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heuristic::ScaleAction;

    #[test]
    fn latency_desired_workers_steps_by_one() {
        let case = Case::parse(
            r#"{"algorithm":"latency","workers":1,"partitions":4,
            "work_item":{"latencies_ms":[500,600,700,800,900,1000]}}"#,
        )
        .unwrap();
        let r = case.recommend();
        assert_eq!((r.action, r.desired_workers), (ScaleAction::AddWorker, 2));
    }

    #[test]
    fn missing_control_queues_are_idle_with_as_many_samples() {
        let case = Case::parse(
            r#"{"algorithm":"latency","workers":1,"partitions":4,
            "control":[{"latencies_ms":[]},{"latencies_ms":[]},{"latencies_ms":[]},{"latencies_ms":[1,0,0,0,0]}]}"#,
        );
        // Explicit empty rings are "not enough samples"; omitted ones are padded.
        assert_eq!(case.unwrap().recommend().reason, "Not enough samples");
        let padded = Case::parse(
            r#"{"algorithm":"latency","workers":1,"partitions":4,
            "work_item":{"latencies_ms":[1,0,0,0,0]}}"#,
        )
        .unwrap();
        assert_eq!(padded.recommend().reason, "Queue latencies are healthy");
    }

    #[test]
    fn errors_name_the_field() {
        let e = Case::parse(r#"{"algorithm":"latency","workers":"two","partitions":4}"#).unwrap_err();
        assert!(e.to_string().starts_with("workers: invalid type"), "{e}");
        let e = Case::parse(
            r#"{"algorithm":"latency","workers":1,"partitions":4,"control":[{"latencies_ms":[1,-2]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("control[0].latencies_ms[1]:"), "{e}");
        let e = Case::parse(r#"{"algorithm":"fastest","workers":1,"partitions":4}"#).unwrap_err();
        assert!(e.to_string().starts_with("algorithm: unknown variant"), "{e}");
        let e = Case::parse(r#"{"algorithm":"target","workers":1,"partitions":17}"#).unwrap_err();
        assert_eq!(e.to_string(), "partitions: expected 1..=16, got 17");
        let e = Case::parse(r#"{"algorithm":"target","partitions":1}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `workers`"), "{e}");
    }
}
