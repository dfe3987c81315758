//! The terminal table, the JSON report, and the verdict on the goal: per scenario, the
//! lowest pod-seconds among the scalers within 10 % of the best p95 latency, and the fastest
//! wake from zero.

use std::fmt::Write;

use serde::Serialize;

use super::metrics::RunResult;

/// How far from the best p95 a scaler may be and still count as "as fast".
pub(crate) const P95_SLACK: f64 = 0.10;

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
pub(crate) struct Report<'a> {
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
/// `intr` and `lost s` are the work items scale-ins interrupted and the seconds of work lost.
pub fn table(results: &[RunResult], verdicts: &[Verdict]) -> String {
    const WIDTHS: [usize; 14] = [15, 22, 7, 7, 7, 7, 9, 5, 6, 11, 6, 11, 5, 7];
    let header = [
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
        "done",
        "intr",
        "lost s",
    ];
    let line = |cells: &[String], mark: &str| {
        let mut l = String::new();
        for (i, (cell, width)) in cells.iter().zip(WIDTHS).enumerate() {
            // Names left-aligned, numbers right-aligned.
            let _ = if i < 2 { write!(l, "{cell:<width$} ") } else { write!(l, "{cell:>width$} ") };
        }
        format!("{} {mark}", l.trim_end())
    };
    let mut out = line(&header.map(String::from), " goal");
    out.push('\n');
    for r in results {
        let standing = Standing::of(r, verdicts);
        let mark = format!(
            "{}{}",
            match (standing.winner, standing.within) {
                (true, _) => "*",
                (false, true) => "~",
                _ => "",
            },
            if standing.fastest_wake { "w" } else { "" }
        );
        out.push_str(line(&standing.cells(r), &format!(" {mark}")).trim_end());
        out.push('\n');
    }
    out
}

/// How one result stands in its scenario's verdict, and its derived cells.
struct Standing {
    winner: bool,
    within: bool,
    fastest_wake: bool,
    wake: String,
    zero_percent: f64,
}

impl Standing {
    fn of(r: &RunResult, verdicts: &[Verdict]) -> Self {
        let v = verdicts.iter().find(|v| v.scenario == r.scenario);
        Self {
            winner: v.is_some_and(|v| v.winner == r.scaler),
            within: v.is_some_and(|v| v.within_p95.contains(&r.scaler)),
            fastest_wake: v.is_some_and(|v| v.fastest_wake.as_deref() == Some(r.scaler.as_str())),
            wake: if r.wakes > 0 {
                format!("{:.0}/{:.0}", r.wake_mean_s, r.wake_max_s)
            } else {
                "-".to_string()
            },
            zero_percent: if r.duration_s > 0.0 { r.zero_s / r.duration_s * 100.0 } else { 0.0 },
        }
    }

    /// The row's cells, as both tables show them.
    fn cells(&self, r: &RunResult) -> Vec<String> {
        vec![
            r.scenario.clone(),
            r.scaler.clone(),
            format!("{:.1}", r.latency_p50_s),
            format!("{:.1}", r.latency_p95_s),
            format!("{:.1}", r.latency_p99_s),
            format!("{:.0}", r.drain_s),
            format!("{:.0}", r.pod_seconds),
            r.peak_pods.to_string(),
            r.scale_changes.to_string(),
            self.wake.clone(),
            format!("{:.0}", self.zero_percent),
            format!("{}/{}", r.completed, r.orchestrations),
            r.interrupted_work_items.to_string(),
            format!("{:.0}", r.lost_work_s),
        ]
    }
}

/// The table as Markdown, for the README.
pub(crate) fn markdown(results: &[RunResult], verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "| scenario | scaler | p50 s | p95 s | p99 s | drain s | pod-s | peak | scale changes | wake s mean/max | at zero | done | interrupted | lost s | goal |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        let standing = Standing::of(r, verdicts);
        let mut mark = Vec::new();
        if standing.winner {
            mark.push("**winner**");
        } else if standing.within {
            mark.push("within 10 %");
        }
        if standing.fastest_wake {
            mark.push("fastest wake");
        }
        let mut cells = standing.cells(r);
        cells[10].push_str(" %");
        cells.push(mark.join(", "));
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}
