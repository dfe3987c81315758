//! The pure scaling engine: queue signals in, a [`Recommendation`] with its reason out.
//!
//! Nothing here does I/O or reads a clock; time, when a rule needs it, is passed in. That
//! keeps every decision unit-testable and lets the simulator replay the exact code the
//! aggregator runs.
//!
//! - [`latency`]: the Durable Task Framework's latency vote (`DisconnectedPerformanceMonitor`).
//! - [`target`]: the Functions host's target-based formula (`DurableTaskTargetScaler`), run
//!   as `target` on upstream's inputs and as `target-inflight` on lengths that also count
//!   messages in progress ([`engine`]'s docs say which is which).
//! - [`durable`]: the project's default (`scaleAlgorithm: durable`), designed with the simulator.
//! - [`hpa`]: what KEDA and the Kubernetes HPA do with the number we return.
//! - [`engine`]: one task hub's state and the one path from queue readings to the
//!   recommendation and the metric value KEDA gets, whichever [`Algorithm`] runs. The
//!   aggregator keeps one per tracked hub, the simulator one per simulated app, and
//!   `recommend` one per case, so all three run the same code.

pub mod durable;
pub(crate) mod engine;
pub mod hpa;
pub mod latency;
pub(crate) mod target;

use serde::{Deserialize, Serialize};

/// Which heuristic turns a hub's signals into a worker count: the trigger's
/// `scaleAlgorithm`, `recommend`'s `algorithm`, the simulator's `durable-scaler:<algorithm>`
/// and the demo's `--algorithm`. Names are lowercase; parsing ignores case, as the trigger
/// metadata always has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// The project's own ([`durable`]): the default, chosen on simulator evidence
    /// (docs/simulator.md).
    #[default]
    Durable,
    /// The Functions host's target formula ([`target`]) on upstream's inputs: a queue's
    /// approximate count, 0 when its peek returns nothing.
    Target,
    /// The same formula over lengths that also count invisible messages while their queue
    /// shows work in progress (for the visibility timeout): this project's variant, not the
    /// Functions host's.
    TargetInflight,
    /// The DTFx latency vote over 5-sample rings ([`latency`]).
    Latency,
}

impl Algorithm {
    /// Every algorithm, the default first.
    pub const ALL: [Algorithm; 4] =
        [Algorithm::Durable, Algorithm::Target, Algorithm::TargetInflight, Algorithm::Latency];

    /// The name the trigger, the CLI and the JSON use.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Algorithm::Durable => "durable",
            Algorithm::Target => "target",
            Algorithm::TargetInflight => "target-inflight",
            Algorithm::Latency => "latency",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an [`Algorithm`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {0:?}: expected durable, target, target-inflight or latency")]
pub struct UnknownAlgorithm(pub String);

impl std::str::FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownAlgorithm(s.to_string()))
    }
}

/// What a heuristic asks of the worker count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScaleAction {
    /// One more worker is needed.
    AddWorker,
    /// One worker fewer would do.
    RemoveWorker,
    /// Keep the current count.
    None,
}

/// A heuristic's answer for one task hub at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recommendation {
    /// The step the heuristic votes for.
    pub action: ScaleAction,
    /// False when the task hub has no work at all and may scale to zero.
    pub keep_workers_alive: bool,
    /// The worker count the heuristic wants.
    pub desired_workers: u32,
    /// Why, in words a user can act on.
    pub reason: String,
}

impl Recommendation {
    /// A recommendation that steps `workers` by `action` (never below zero), the way the
    /// latency vote is turned into a worker count.
    pub(crate) fn step(workers: u32, action: ScaleAction, keep_workers_alive: bool, reason: String) -> Self {
        let desired_workers = match action {
            ScaleAction::AddWorker => workers.saturating_add(1),
            ScaleAction::RemoveWorker => workers.saturating_sub(1),
            ScaleAction::None => workers,
        };
        Self { action, keep_workers_alive, desired_workers, reason }
    }

    /// A recommendation for an absolute worker count, the action following from comparing
    /// it with the current `workers`.
    pub(crate) fn toward(
        workers: u32,
        desired_workers: u32,
        keep_workers_alive: bool,
        reason: String,
    ) -> Self {
        let action = match desired_workers.cmp(&workers) {
            std::cmp::Ordering::Greater => ScaleAction::AddWorker,
            std::cmp::Ordering::Less => ScaleAction::RemoveWorker,
            std::cmp::Ordering::Equal => ScaleAction::None,
        };
        Self { action, keep_workers_alive, desired_workers, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip_through_every_spelling() {
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
            assert_eq!(a.name().to_uppercase().parse::<Algorithm>(), Ok(a), "case is ignored");
            let json = serde_json::to_string(&a).expect("serializes");
            assert_eq!(json, format!("\"{a}\""));
            assert_eq!(serde_json::from_str::<Algorithm>(&json).expect("deserializes"), a);
            let value = clap::ValueEnum::to_possible_value(&a).expect("not skipped");
            assert_eq!(value.get_name(), a.name(), "the CLI spells it as the trigger does");
        }
        assert_eq!(Algorithm::default(), Algorithm::Durable);
        assert_eq!("cpu".parse::<Algorithm>(), Err(UnknownAlgorithm("cpu".into())));
    }
}
