//! The pure scaling engine: queue signals in, a [`Recommendation`] with its reason out.
//!
//! Nothing here does I/O or reads a clock; time, when a rule needs it, is passed in. That
//! keeps every decision unit-testable and lets the simulator replay the exact code the
//! aggregator runs.
//!
//! - [`latency`]: the Durable Task Framework's latency vote (`DisconnectedPerformanceMonitor`).
//! - [`target`]: the Functions host's target-based formula (`DurableTaskTargetScaler`).
//! - [`durable`]: the project's default (`scaleAlgorithm: durable`), designed with the simulator.
//! - [`hpa`]: what KEDA and the Kubernetes HPA do with the number we return.

pub mod durable;
pub mod hpa;
pub mod latency;
pub mod target;

use serde::{Deserialize, Serialize};

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
    pub fn step(workers: u32, action: ScaleAction, keep_workers_alive: bool, reason: String) -> Self {
        let desired_workers = match action {
            ScaleAction::AddWorker => workers.saturating_add(1),
            ScaleAction::RemoveWorker => workers.saturating_sub(1),
            ScaleAction::None => workers,
        };
        Self { action, keep_workers_alive, desired_workers, reason }
    }

    /// A recommendation for an absolute worker count, the action following from comparing
    /// it with the current `workers`.
    pub fn toward(workers: u32, desired_workers: u32, keep_workers_alive: bool, reason: String) -> Self {
        let action = match desired_workers.cmp(&workers) {
            std::cmp::Ordering::Greater => ScaleAction::AddWorker,
            std::cmp::Ordering::Less => ScaleAction::RemoveWorker,
            std::cmp::Ordering::Equal => ScaleAction::None,
        };
        Self { action, keep_workers_alive, desired_workers, reason }
    }
}
