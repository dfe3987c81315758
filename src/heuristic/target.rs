//! The Functions host's target-based formula (`DurableTaskTargetScaler`,
//! durabletask-facts.md "Heuristic 2"): enough workers for the queued activities at
//! `maxConcurrentActivityFunctions` each, and for the queued orchestration messages at
//! `maxConcurrentOrchestratorFunctions` each, but never more orchestration workers than
//! partitions that have messages (a partition is processed by one worker at a time).

use super::Recommendation;

/// Per-worker concurrency limits the formula divides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TargetSettings {
    /// Activities one worker runs at once (`maxActivitiesPerWorker`).
    pub max_activities_per_worker: u32,
    /// Orchestrations one worker runs at once (`maxOrchestrationsPerWorker`).
    pub max_orchestrations_per_worker: u32,
}

impl Default for TargetSettings {
    /// A 1-CPU pod's limits, [`crate::contract::WORK_ITEMS_PER_CPU`] of each kind: the
    /// extension's default outside the Consumption plan, and the aggregator's guess when
    /// neither the trigger nor a sidecar says more.
    fn default() -> Self {
        Self {
            max_activities_per_worker: crate::contract::WORK_ITEMS_PER_CPU,
            max_orchestrations_per_worker: crate::contract::WORK_ITEMS_PER_CPU,
        }
    }
}

/// The parts of the target, kept so the reason can show its arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TargetBreakdown {
    /// ceil(work-item length / max activities per worker).
    pub activity_workers: u64,
    /// Sum of the control queue lengths.
    pub orchestration_messages: u64,
    /// Control queues with at least one message.
    pub active_partitions: u64,
    /// min(active partitions, ceil(messages / max orchestrations per worker)).
    pub orchestration_workers: u64,
    /// max(activity workers, orchestration workers).
    pub target: u64,
}

/// Computes the target worker count from queue lengths.
pub(crate) fn target_workers(
    settings: TargetSettings,
    work_item_length: u64,
    control_lengths: &[u64],
) -> TargetBreakdown {
    let activity_workers = work_item_length.div_ceil(u64::from(settings.max_activities_per_worker.max(1)));
    let orchestration_messages: u64 = control_lengths.iter().sum();
    let active_partitions = control_lengths.iter().filter(|&&l| l > 0).count() as u64;
    let orchestration_workers = active_partitions
        .min(orchestration_messages.div_ceil(u64::from(settings.max_orchestrations_per_worker.max(1))));
    TargetBreakdown {
        activity_workers,
        orchestration_messages,
        active_partitions,
        orchestration_workers,
        target: activity_workers.max(orchestration_workers),
    }
}

/// The target formula as a [`Recommendation`] for a hub currently at `workers`.
pub(crate) fn recommend(
    settings: TargetSettings,
    workers: u32,
    work_item_length: u64,
    control_lengths: &[u64],
) -> Recommendation {
    let b = target_workers(settings, work_item_length, control_lengths);
    let desired = u32::try_from(b.target).unwrap_or(u32::MAX);
    let reason = format!(
        "Target {} workers: activities ceil({}/{}) = {}, orchestrations min({} active partitions, ceil({}/{})) = {}",
        b.target,
        work_item_length,
        settings.max_activities_per_worker.max(1),
        b.activity_workers,
        b.active_partitions,
        b.orchestration_messages,
        settings.max_orchestrations_per_worker.max(1),
        b.orchestration_workers,
    );
    Recommendation::toward(workers, desired, desired > 0, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heuristic::ScaleAction;

    fn target(max_act: u32, max_orch: u32, wi: u64, control: &[u64]) -> u64 {
        let settings =
            TargetSettings { max_activities_per_worker: max_act, max_orchestrations_per_worker: max_orch };
        target_workers(settings, wi, control).target
    }

    #[test]
    fn activities_dominate_when_each_worker_runs_one() {
        assert_eq!(target(1, 10, 10, &[1, 1, 1, 1]), 10);
    }

    #[test]
    fn empty_queues_want_no_workers() {
        assert_eq!(target(1, 10, 0, &[0, 0, 0, 0]), 0);
    }

    #[test]
    fn orchestration_messages_pack_into_workers() {
        assert_eq!(target(1, 10, 0, &[2, 2, 3, 3]), 1);
    }

    #[test]
    fn both_parts_take_the_larger() {
        assert_eq!(target(10, 10, 10, &[2, 2, 3, 3]), 1);
    }

    #[test]
    fn orchestration_workers_are_capped_by_active_partitions() {
        assert_eq!(target(10, 1, 0, &[100, 0, 0, 0]), 1);
        assert_eq!(target(10, 1, 0, &[100, 100, 0, 0]), 2);
    }

    #[test]
    fn zero_limits_are_treated_as_one() {
        assert_eq!(target(0, 0, 3, &[1]), 3);
    }

    #[test]
    fn recommendation_compares_with_current_workers() {
        let s = TargetSettings { max_activities_per_worker: 1, max_orchestrations_per_worker: 10 };
        let r = recommend(s, 4, 10, &[1, 1, 1, 1]);
        assert_eq!((r.action, r.desired_workers, r.keep_workers_alive), (ScaleAction::AddWorker, 10, true));
        let r = recommend(s, 4, 0, &[0, 0, 0, 0]);
        assert_eq!(
            (r.action, r.desired_workers, r.keep_workers_alive),
            (ScaleAction::RemoveWorker, 0, false)
        );
        assert_eq!(recommend(s, 1, 0, &[2, 2, 3, 3]).action, ScaleAction::None);
        assert!(r.reason.starts_with("Target 0 workers"), "{}", r.reason);
    }
}
