//! The terminal table, the JSON report, and the verdict on the goal: per scenario, the
//! lowest pod-seconds among the scalers within 10 % of the best p95 latency, and the fastest
//! wake from zero.

use std::fmt::Write;

use serde::Serialize;

use super::metrics::RunResult;

/// How far from the best p95 a scaler may be and still count as "as fast".
pub const P95_SLACK: f64 = 0.10;

/// The verdict for one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Scenario name.
    pub scenario: String,
    /// The best p95 (s).
    pub best_p95_s: f64,
    /// Scalers within [`P95_SLACK`] of it.
    pub within_p95: Vec<String>,
    /// The lowest pod-seconds among those.
    pub winner: String,
    /// The scaler with the shortest mean wake from zero, when any woke.
    pub fastest_wake: Option<String>,
}

/// The verdict over one scenario's results.
pub fn verdict(results: &[RunResult]) -> Option<Verdict> {
    let first = results.first()?;
    let best = results.iter().map(|r| r.latency_p95_s).fold(f64::INFINITY, f64::min);
    let within: Vec<&RunResult> =
        results.iter().filter(|r| r.latency_p95_s <= best * (1.0 + P95_SLACK) + 1e-9).collect();
    let winner = within.iter().min_by(|a, b| a.pod_seconds.total_cmp(&b.pod_seconds))?;
    let fastest_wake = results
        .iter()
        .filter(|r| r.wakes > 0)
        .min_by(|a, b| a.wake_mean_s.total_cmp(&b.wake_mean_s))
        .map(|r| r.scaler.clone());
    Some(Verdict {
        scenario: first.scenario.clone(),
        best_p95_s: best,
        within_p95: within.iter().map(|r| r.scaler.clone()).collect(),
        winner: winner.scaler.clone(),
        fastest_wake,
    })
}

/// The whole report as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report<'a> {
    /// Every run.
    pub results: &'a [RunResult],
    /// Per-scenario verdicts.
    pub verdicts: &'a [Verdict],
    /// Simulated hours per wall-clock second.
    pub simulated_hours_per_second: f64,
    /// The seed used.
    pub seed: u64,
}

/// The terminal table: one row per scenario and scaler; `*` marks the goal's winner (lowest
/// pod-seconds within 10 % of the best p95), `~` the others within 10 %, `w` the fastest wake.
pub fn table(results: &[RunResult], verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<22} {:>7} {:>7} {:>7} {:>7} {:>9} {:>5} {:>6} {:>11} {:>6} {:>11}  goal",
        "scenario",
        "scaler",
        "p50 s",
        "p95 s",
        "p99 s",
        "drain s",
        "pod-s",
        "peak",
        "scales",
        "wake s m/max",
        "zero%",
        "done"
    );
    for r in results {
        let v = verdicts.iter().find(|v| v.scenario == r.scenario);
        let mut mark = String::new();
        if let Some(v) = v {
            if v.winner == r.scaler {
                mark.push('*');
            } else if v.within_p95.contains(&r.scaler) {
                mark.push('~');
            }
            if v.fastest_wake.as_deref() == Some(r.scaler.as_str()) {
                mark.push('w');
            }
        }
        let wake =
            if r.wakes > 0 { format!("{:.0}/{:.0}", r.wake_mean_s, r.wake_max_s) } else { "-".to_string() };
        let _ = writeln!(
            out,
            "{:<10} {:<22} {:>7.1} {:>7.1} {:>7.1} {:>7.0} {:>9.0} {:>5} {:>6} {:>11} {:>6.1} {:>11}  {}",
            r.scenario,
            r.scaler,
            r.latency_p50_s,
            r.latency_p95_s,
            r.latency_p99_s,
            r.drain_s,
            r.pod_seconds,
            r.peak_pods,
            r.scale_changes,
            wake,
            if r.duration_s > 0.0 { r.zero_s / r.duration_s * 100.0 } else { 0.0 },
            format!("{}/{}", r.completed, r.orchestrations),
            mark
        );
    }
    out
}

/// The table as Markdown, for the README.
pub fn markdown(results: &[RunResult], verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "| scenario | scaler | p50 s | p95 s | p99 s | drain s | pod-s | peak | scale changes | wake s mean/max | at zero | done | goal |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        let v = verdicts.iter().find(|v| v.scenario == r.scenario);
        let mut mark = Vec::new();
        if let Some(v) = v {
            if v.winner == r.scaler {
                mark.push("**winner**");
            } else if v.within_p95.contains(&r.scaler) {
                mark.push("within 10 %");
            }
            if v.fastest_wake.as_deref() == Some(r.scaler.as_str()) {
                mark.push("fastest wake");
            }
        }
        let wake =
            if r.wakes > 0 { format!("{:.0}/{:.0}", r.wake_mean_s, r.wake_max_s) } else { "-".to_string() };
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {} | {} | {:.0} % | {}/{} | {} |",
            r.scenario,
            r.scaler,
            r.latency_p50_s,
            r.latency_p95_s,
            r.latency_p99_s,
            r.drain_s,
            r.pod_seconds,
            r.peak_pods,
            r.scale_changes,
            wake,
            if r.duration_s > 0.0 { r.zero_s / r.duration_s * 100.0 } else { 0.0 },
            r.completed,
            r.orchestrations,
            mark.join(", ")
        );
    }
    out
}
