//! What KEDA and the Kubernetes HPA do with the metric we return (keda-contract.md).
//!
//! The aggregator needs this to know what its answer will become; the simulator and the demo
//! need it to play KEDA and the HPA. All of it is pure arithmetic; time is passed in.

use std::{collections::VecDeque, time::Duration};

use crate::clock::UnixMs;

/// The HPA's default tolerance: a ratio within 10 % of 1 changes nothing.
pub(crate) const TOLERANCE: f64 = 0.1;
/// The HPA's default scale-down stabilization window.
pub const SCALE_DOWN_STABILIZATION: Duration = Duration::from_secs(300);

/// How the HPA reads an external metric (`metricType` of the ScaledObject trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricTargetType {
    /// desired = ceil(value / target) (KEDA's default).
    #[default]
    AverageValue,
    /// desired = ceil(current * value / target).
    Value,
}

/// Negative, NaN and infinite metric values count as 0, as KEDA does.
pub(crate) fn sanitize(value: f64) -> f64 {
    if value.is_finite() && value > 0.0 { value } else { 0.0 }
}

/// A MetricSpec's target: `targetSizeFloat` when positive, else the deprecated `targetSize`.
pub(crate) fn effective_target(target_size: i64, target_size_float: f64) -> f64 {
    if sanitize(target_size_float) > 0.0 { target_size_float } else { sanitize(target_size as f64) }
}

/// A MetricValue's value: `metricValueFloat` when positive, else the deprecated `metricValue`.
pub(crate) fn effective_value(metric_value: i64, metric_value_float: f64) -> f64 {
    if sanitize(metric_value_float) > 0.0 { metric_value_float } else { sanitize(metric_value as f64) }
}

/// The HPA's replica proposal for one external metric, before bounds and behaviour.
///
/// At zero replicas the HPA does nothing (KEDA owns 0 <-> 1), so this returns 0. A ratio
/// within [`TOLERANCE`] of 1 keeps `current`. A non-positive target (which breaks a real
/// HPA) keeps `current` too.
pub fn desired_replicas(current: u32, value: f64, target: f64, kind: MetricTargetType) -> u32 {
    if current == 0 {
        return 0;
    }
    let value = sanitize(value);
    let target = sanitize(target);
    if target == 0.0 {
        return current;
    }
    let current_f = f64::from(current);
    let (ratio, desired) = match kind {
        MetricTargetType::AverageValue => (value / (target * current_f), (value / target).ceil()),
        MetricTargetType::Value => (value / target, (current_f * value / target).ceil()),
    };
    // Written as the HPA writes it (1-t <= ratio <= 1+t), so that a ratio of exactly 1.1
    // counts as within, as it does in the HPA's float arithmetic.
    if (1.0 - TOLERANCE..=1.0 + TOLERANCE).contains(&ratio) {
        return current;
    }
    desired.min(f64::from(u32::MAX)) as u32
}

/// A ScaledObject's `minReplicaCount` / `maxReplicaCount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaBounds {
    /// `minReplicaCount` (KEDA default 0).
    pub min: u32,
    /// `maxReplicaCount` (KEDA default 100).
    pub max: u32,
}

impl Default for ReplicaBounds {
    fn default() -> Self {
        Self { min: 0, max: 100 }
    }
}

impl ReplicaBounds {
    /// The HPA's clamp: [max(min, 1), max].
    pub fn clamp_hpa(&self, desired: u32) -> u32 {
        let low = self.min.max(1);
        desired.clamp(low, self.max.max(low))
    }
}

/// The HPA's default scale-up policy: at most max(+100 %, +4 pods) per period.
pub(crate) fn scale_up_limit(current: u32) -> u32 {
    current.saturating_mul(2).max(current.saturating_add(4))
}

/// The HPA's scale-down stabilization: the applied count is the highest recommendation of
/// the last window, so a brief dip does not remove pods.
#[derive(Debug, Clone)]
pub struct ScaleDownStabilizer {
    window: Duration,
    recent: VecDeque<(UnixMs, u32)>,
}

impl ScaleDownStabilizer {
    /// A stabilizer with a window of `window` (the HPA default is
    /// [`SCALE_DOWN_STABILIZATION`]).
    pub fn new(window: Duration) -> Self {
        Self { window, recent: VecDeque::new() }
    }

    /// Records `recommended` at `now` and returns the highest recommendation within the
    /// window ending now.
    pub(crate) fn stabilize(&mut self, now: UnixMs, recommended: u32) -> u32 {
        while let Some(&(t, _)) = self.recent.front() {
            if now.since(t) > self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back((now, recommended));
        self.recent.iter().map(|&(_, r)| r).max().unwrap_or(recommended)
    }
}

/// One HPA sync: the proposal for `value` against `target`, then scale-down stabilization,
/// the scale-up limit and the bounds. `current` must be at least 1 (KEDA owns zero).
pub fn hpa_sync(
    current: u32,
    value: f64,
    target: f64,
    kind: MetricTargetType,
    bounds: ReplicaBounds,
    stabilizer: &mut ScaleDownStabilizer,
    now: UnixMs,
) -> u32 {
    if current == 0 {
        return 0;
    }
    let proposed = bounds.clamp_hpa(desired_replicas(current, value, target, kind));
    let stabilized = stabilizer.stabilize(now, proposed).min(proposed.max(current));
    bounds.clamp_hpa(stabilized.min(scale_up_limit(current)))
}

/// KEDA's own part: 0 -> max(min, 1) when the trigger turns active, and -> 0 once it has
/// been inactive for the cooldown period (only when `min` is 0). Otherwise the HPA's
/// `hpa_replicas` stand.
pub(crate) fn keda_replicas(
    current: u32,
    active: bool,
    cooldown_elapsed: bool,
    hpa_replicas: u32,
    bounds: ReplicaBounds,
) -> u32 {
    match (current, active) {
        (0, true) => bounds.min.max(1).min(bounds.max.max(1)),
        (0, false) => bounds.min,
        (_, false) if cooldown_elapsed && bounds.min == 0 => 0,
        _ => hpa_replicas,
    }
}

/// The metric value (target 1, AverageValue) that makes the HPA, running `current` replicas,
/// land on `desired`, or as near as its tolerance allows in the right direction.
///
/// The HPA computes `ceil(value / 1)` but only acts when `value / current` is outside
/// `1 ± 0.1`; a plain `desired` would swallow every +/-1 step at 10 replicas or more (and the
/// latency vote only ever steps by one). Going up, the value is the smallest whole count whose
/// ratio clears the tolerance; going down, a fraction just above the next lower whole count,
/// so `ceil` still gives that count while the ratio clears the tolerance. At 0 replicas the
/// HPA is idle (KEDA does 0 -> 1), so the value is `desired` itself.
pub(crate) fn metric_value(desired: u32, current: u32) -> f64 {
    const JUST_ABOVE: f64 = 0.001;
    let c = f64::from(current);
    if current == 0 || desired == current {
        return f64::from(desired);
    }
    if desired > current {
        let mut r = desired;
        while f64::from(r) / c <= 1.0 + TOLERANCE {
            r += 1;
        }
        f64::from(r)
    } else {
        let mut r = desired;
        while r > 0 && (f64::from(r) - 1.0 + JUST_ABOVE) / c >= 1.0 - TOLERANCE {
            r -= 1;
        }
        if r == 0 { 0.0 } else { f64::from(r) - 1.0 + JUST_ABOVE }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MetricTargetType::{AverageValue, Value};

    #[test]
    fn average_value_divides_by_the_target() {
        assert_eq!(desired_replicas(1, 7.0, 1.0, AverageValue), 7);
        assert_eq!(desired_replicas(4, 10.0, 5.0, AverageValue), 2);
        assert_eq!(desired_replicas(2, 2.5, 1.0, AverageValue), 3);
    }

    #[test]
    fn value_scales_the_current_count() {
        assert_eq!(desired_replicas(2, 3.0, 1.0, Value), 6);
        assert_eq!(desired_replicas(4, 0.5, 1.0, Value), 2);
    }

    #[test]
    fn tolerance_swallows_a_plus_one_step_at_ten_replicas() {
        assert_eq!(desired_replicas(10, 11.0, 1.0, AverageValue), 10);
        assert_eq!(desired_replicas(9, 10.0, 1.0, AverageValue), 10);
        assert_eq!(desired_replicas(10, 12.0, 1.0, AverageValue), 12);
        assert_eq!(desired_replicas(10, 1.1, 1.0, Value), 10);
    }

    #[test]
    fn zero_replicas_are_left_to_keda() {
        assert_eq!(desired_replicas(0, 50.0, 1.0, AverageValue), 0);
    }

    #[test]
    fn bad_values_count_as_zero_and_bad_targets_change_nothing() {
        assert_eq!(sanitize(f64::NAN), 0.0);
        assert_eq!(sanitize(-3.0), 0.0);
        assert_eq!(sanitize(f64::INFINITY), 0.0);
        assert_eq!(desired_replicas(3, f64::NAN, 1.0, AverageValue), 0);
        assert_eq!(desired_replicas(3, 10.0, 0.0, AverageValue), 3);
    }

    #[test]
    fn float_fields_win_when_positive() {
        assert_eq!(effective_target(5, 2.5), 2.5);
        assert_eq!(effective_target(5, 0.0), 5.0);
        assert_eq!(effective_value(3, -1.0), 3.0);
        assert_eq!(effective_value(-3, 0.0), 0.0);
    }

    #[test]
    fn hpa_clamps_to_at_least_one_and_at_most_max() {
        let b = ReplicaBounds { min: 0, max: 10 };
        assert_eq!(b.clamp_hpa(0), 1);
        assert_eq!(b.clamp_hpa(25), 10);
        assert_eq!(ReplicaBounds { min: 3, max: 10 }.clamp_hpa(1), 3);
    }

    #[test]
    fn scale_up_doubles_or_adds_four() {
        assert_eq!(scale_up_limit(1), 5);
        assert_eq!(scale_up_limit(4), 8);
        assert_eq!(scale_up_limit(10), 20);
    }

    #[test]
    fn stabilization_keeps_the_window_maximum() {
        let mut s = ScaleDownStabilizer::new(SCALE_DOWN_STABILIZATION);
        assert_eq!(s.stabilize(UnixMs(0), 8), 8);
        assert_eq!(s.stabilize(UnixMs(15_000), 2), 8);
        assert_eq!(s.stabilize(UnixMs(300_000), 2), 8);
        assert_eq!(s.stabilize(UnixMs(300_001), 2), 2);
    }

    #[test]
    fn hpa_sync_limits_scale_up_and_damps_scale_down() {
        let b = ReplicaBounds::default();
        let mut s = ScaleDownStabilizer::new(SCALE_DOWN_STABILIZATION);
        assert_eq!(hpa_sync(1, 50.0, 1.0, AverageValue, b, &mut s, UnixMs(0)), 5);
        assert_eq!(hpa_sync(5, 50.0, 1.0, AverageValue, b, &mut s, UnixMs(15_000)), 10);
        assert_eq!(hpa_sync(10, 1.0, 1.0, AverageValue, b, &mut s, UnixMs(30_000)), 10);
        assert_eq!(hpa_sync(10, 1.0, 1.0, AverageValue, b, &mut s, UnixMs(400_000)), 1);
    }

    #[test]
    fn keda_owns_zero_to_one_and_back() {
        let b = ReplicaBounds { min: 0, max: 10 };
        assert_eq!(keda_replicas(0, true, false, 0, b), 1);
        assert_eq!(keda_replicas(0, false, true, 0, b), 0);
        assert_eq!(keda_replicas(3, false, false, 3, b), 3);
        assert_eq!(keda_replicas(3, false, true, 3, b), 0);
        assert_eq!(keda_replicas(3, true, true, 6, b), 6);
        let floor = ReplicaBounds { min: 2, max: 10 };
        assert_eq!(keda_replicas(0, true, false, 0, floor), 2);
        assert_eq!(keda_replicas(3, false, true, 3, floor), 3);
    }

    /// What the HPA does with the value, by `heuristic::hpa`'s arithmetic.
    fn hpa(desired: u32, current: u32) -> u32 {
        desired_replicas(current, metric_value(desired, current), 1.0, AverageValue)
    }

    #[test]
    fn the_metric_value_lands_the_hpa_on_the_desired_count_below_ten() {
        for current in 1..10 {
            for desired in 1..40 {
                assert_eq!(hpa(desired, current), desired, "current {current} desired {desired}");
            }
        }
    }

    #[test]
    fn the_metric_value_clears_the_tolerance_at_ten_and_more() {
        for current in 10..60 {
            for desired in 1..120 {
                let got = hpa(desired, current);
                match desired.cmp(&current) {
                    std::cmp::Ordering::Greater => {
                        assert!(got >= desired && got > current, "{current}->{desired}: {got}")
                    }
                    std::cmp::Ordering::Less => {
                        assert!(got <= desired && got < current, "{current}->{desired}: {got}")
                    }
                    std::cmp::Ordering::Equal => assert_eq!(got, current),
                }
                // Never more than the tolerance beyond what was asked.
                assert!(f64::from(got.abs_diff(desired)) <= (f64::from(current) * TOLERANCE).ceil() + 1.0);
            }
        }
    }

    #[test]
    fn at_zero_replicas_the_value_is_the_desired_count() {
        assert_eq!(metric_value(3, 0), 3.0);
        assert_eq!(metric_value(0, 5), 0.0);
    }
}
