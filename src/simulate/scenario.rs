//! The workloads: the built-in scenarios, and user traces of arrivals from CSV or JSON.
//!
//! Arrival times come from a generator seeded with `--seed`; activity durations are drawn
//! inside the model from a hash of the seed, so one seed gives one workload for every scaler.

use std::path::Path;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Deserialize;

use super::Error;
use super::model::{Arrival, Duration, Script, Step, Workload};

/// The built-in scenario names, in suite order.
pub const BUILTIN: [&str; 9] = [
    "burst",
    "steady",
    "diurnal",
    "spiky",
    "timers",
    "trickle",
    "long-activities",
    "deep-backlog",
    "scale-in",
];

/// The longest a scenario may run, simulated: a week (the built-in ones run two days at most).
pub const MAX_DURATION_MS: u64 = 7 * 24 * HOUR;
/// The longest activity, timer or delay a trace may ask for: a day.
pub const MAX_STEP_MS: u64 = 24 * HOUR;
/// Rows a trace may have.
pub const MAX_TRACE_ROWS: usize = 100_000;
/// The largest trace file read.
pub const MAX_TRACE_BYTES: u64 = 16 * 1024 * 1024;
/// Orchestrations a trace may start in all: each is state the model keeps.
pub const MAX_ORCHESTRATIONS: u64 = 1_000_000;
/// Activities one orchestration of a trace may fan out to.
pub const MAX_FAN_OUT: u32 = 10_000;
/// Activities a trace may run in all.
pub const MAX_ACTIVITIES: u64 = 10_000_000;

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// A named workload and how long to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Its name (a built-in's, or the trace file's stem).
    pub name: String,
    /// One line on what it stands for.
    pub description: String,
    /// Simulated run time.
    pub duration_ms: u64,
    /// The arrivals.
    pub workload: Workload,
    /// The app's `functionTimeout` (`host.json`) when it sets one; `None`: the host's
    /// default off Consumption, 30 minutes ([`crate::contract::DEFAULT_FUNCTION_TIMEOUT`]).
    /// A drained pod may run this long (our webhook's grace period is derived from it).
    pub function_timeout_ms: Option<u64>,
}

fn fan_out(count: u32, min_ms: u64, max_ms: u64) -> Step {
    Step::Activities { count, duration: Duration { min_ms, max_ms } }
}

/// Poisson arrivals of one orchestration each between `from_ms` and `to_ms` at `rate(t)` per
/// second, by thinning against `max_rate`.
fn poisson(
    rng: &mut StdRng,
    from_ms: u64,
    to_ms: u64,
    max_rate: f64,
    rate: impl Fn(u64) -> f64,
) -> Vec<Arrival> {
    let mut out = Vec::new();
    let mut t = from_ms as f64;
    if max_rate <= 0.0 {
        return out;
    }
    loop {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        t += -u.ln() / max_rate * 1_000.0;
        if t >= to_ms as f64 {
            return out;
        }
        let at_ms = t as u64;
        if rng.random::<f64>() * max_rate <= rate(at_ms) {
            out.push(Arrival { at_ms, count: 1, script: 0 });
        }
    }
}

/// The built-in scenario `name` for `seed`, or None for an unknown name.
pub fn builtin(name: &str, seed: u64) -> Option<Scenario> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5CE7_A210);
    // Activities of up to 40 minutes need a function timeout above the default 30.
    let function_timeout_ms = (name == "long-activities").then_some(HOUR);
    let (description, duration_ms, scripts, arrivals) = match name {
        "burst" => (
            "1,000 orchestrations at once, each fanning out 10 activities of 1-5 s",
            40 * MINUTE,
            vec![Script { steps: vec![fan_out(10, SECOND, 5 * SECOND)] }],
            vec![Arrival { at_ms: 10 * SECOND, count: 1_000, script: 0 }],
        ),
        "steady" => (
            "2 orchestrations a second (Poisson) for an hour, 10 activities of 1-3 s then one of 2 s",
            70 * MINUTE,
            vec![Script { steps: vec![fan_out(10, SECOND, 3 * SECOND), fan_out(1, 2 * SECOND, 2 * SECOND)] }],
            poisson(&mut rng, 10 * SECOND, HOUR, 2.0, |_| 2.0),
        ),
        "diurnal" => (
            "a day: arrivals follow (1 - cos)/2 from 0 at midnight to 2/s at noon, 5 activities of 1-3 s",
            24 * HOUR,
            vec![Script { steps: vec![fan_out(5, SECOND, 3 * SECOND)] }],
            poisson(&mut rng, 0, 24 * HOUR, 2.0, |t| {
                let phase = t as f64 / (24 * HOUR) as f64 * std::f64::consts::TAU;
                1.0 - phase.cos()
            }),
        ),
        "spiky" => {
            let mut arrivals = poisson(&mut rng, 0, 2 * HOUR, 1.0 / 60.0, |_| 1.0 / 60.0);
            let mut at = 5 * MINUTE;
            while at < 2 * HOUR - 10 * MINUTE {
                arrivals.push(Arrival { at_ms: at, count: 300, script: 0 });
                at += 10 * MINUTE + rng.random_range(0..10 * MINUTE);
            }
            arrivals.sort_by_key(|a| a.at_ms);
            (
                "one orchestration a minute, and spikes of 300 every 10-20 min; 5 activities of 1-3 s",
                2 * HOUR + 10 * MINUTE,
                vec![Script { steps: vec![fan_out(5, SECOND, 3 * SECOND)] }],
                arrivals,
            )
        }
        "timers" => (
            "100 orchestrations that run a short activity, sleep an hour, twice, then finish",
            2 * HOUR + 20 * MINUTE,
            vec![Script {
                steps: vec![
                    fan_out(1, SECOND, 2 * SECOND),
                    Step::Timer { delay_ms: HOUR },
                    fan_out(1, SECOND, 2 * SECOND),
                    Step::Timer { delay_ms: HOUR },
                    fan_out(1, SECOND, 2 * SECOND),
                ],
            }],
            vec![Arrival { at_ms: 10 * SECOND, count: 100, script: 0 }],
        ),
        "trickle" => (
            "one orchestration every 5 minutes, one activity of 1 s: time to first worker from zero",
            2 * HOUR,
            vec![Script { steps: vec![fan_out(1, SECOND, SECOND)] }],
            (0..24).map(|i| Arrival { at_ms: 10 * SECOND + i * 5 * MINUTE, count: 1, script: 0 }).collect(),
        ),
        "long-activities" => (
            "every 15 min for 2 h, 3 orchestrations fanning out 10 activities of 10-40 min",
            3 * HOUR + 30 * MINUTE,
            vec![Script { steps: vec![fan_out(10, 10 * MINUTE, 40 * MINUTE)] }],
            (0..8).map(|i| Arrival { at_ms: 10 * SECOND + i * 15 * MINUTE, count: 3, script: 0 }).collect(),
        ),
        "deep-backlog" => (
            "10,000 orchestrations at once (about 2,500 start messages per partition), 2 activities of 1-3 s",
            HOUR,
            vec![Script { steps: vec![fan_out(2, SECOND, 3 * SECOND)] }],
            vec![Arrival { at_ms: 10 * SECOND, count: 10_000, script: 0 }],
        ),
        "scale-in" => {
            let mut arrivals = poisson(&mut rng, 0, 2 * HOUR, 0.2, |_| 0.2);
            let mut at = 5 * MINUTE;
            while at < 2 * HOUR - 10 * MINUTE {
                arrivals.push(Arrival { at_ms: at, count: 300, script: 0 });
                at += 15 * MINUTE;
            }
            arrivals.extend((0..12).map(|i| Arrival {
                at_ms: 2 * MINUTE + i * 10 * MINUTE,
                count: 1,
                script: 1,
            }));
            arrivals.sort_by_key(|a| (a.at_ms, a.script));
            (
                "short work with spikes every 15 min, and every 10 min 5 activities of 15 min: which pods a scale-in removes",
                2 * HOUR + 30 * MINUTE,
                vec![
                    Script { steps: vec![fan_out(4, 2 * SECOND, 6 * SECOND)] },
                    Script { steps: vec![fan_out(5, 15 * MINUTE, 15 * MINUTE)] },
                ],
                arrivals,
            )
        }
        _ => return None,
    };
    Some(Scenario {
        name: name.to_string(),
        description: description.to_string(),
        duration_ms,
        workload: Workload { scripts, arrivals },
        function_timeout_ms,
    })
}

/// One row of a trace: `count` orchestrations at `at_s`, each fanning out `activities`
/// activities of `activity_s` seconds, then, when `timer_s` > 0, sleeping that long and
/// running one more activity; when `poison` is 1, they end with a poison activity of
/// `activity_s` seconds that fails every time (DTFx retries it for ever).
#[derive(Debug, Clone, Deserialize)]
pub struct TraceRow {
    /// Arrival time, seconds from the start.
    pub at_s: f64,
    /// Orchestrations arriving then (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// Activities in the fan-out (default 1).
    #[serde(default = "one")]
    pub activities: u32,
    /// Each activity's duration in seconds (default 1).
    #[serde(default = "one_f")]
    pub activity_s: f64,
    /// A durable timer after the fan-out, seconds (default 0: none).
    #[serde(default)]
    pub timer_s: f64,
    /// 1: the orchestrations end with a poison activity (default 0: none).
    #[serde(default)]
    pub poison: u32,
}

fn one() -> u32 {
    1
}

fn one_f() -> f64 {
    1.0
}

fn ms(seconds: f64, what: &str, line: usize, max_ms: u64) -> Result<u64, String> {
    if seconds.is_finite() && seconds >= 0.0 && seconds * 1_000.0 <= max_ms as f64 {
        Ok((seconds * 1_000.0).round() as u64)
    } else {
        Err(format!(
            "row {line}: {what} must be a number of seconds from 0 to {}, got {seconds}",
            max_ms / 1_000
        ))
    }
}

/// Builds a scenario from trace rows; it runs until 30 minutes after the last arrival (so
/// cooldowns show), or `duration_ms` when given.
pub fn from_rows(name: &str, rows: &[TraceRow], duration_ms: Option<u64>) -> Result<Scenario, String> {
    if rows.len() > MAX_TRACE_ROWS {
        return Err(format!("{} rows, more than the {MAX_TRACE_ROWS} a trace may have", rows.len()));
    }
    let mut scripts: Vec<Script> = Vec::new();
    let mut arrivals = Vec::new();
    let (mut orchestrations, mut activities) = (0u64, 0u64);
    for (i, row) in rows.iter().enumerate() {
        let line = i + 1;
        let activity_ms = ms(row.activity_s, "activity_s", line, MAX_STEP_MS)?;
        let timer_ms = ms(row.timer_s, "timer_s", line, MAX_STEP_MS)?;
        if row.activities > MAX_FAN_OUT {
            return Err(format!(
                "row {line}: activities must be at most {MAX_FAN_OUT}, got {}",
                row.activities
            ));
        }
        orchestrations += u64::from(row.count);
        activities += u64::from(row.count) * (u64::from(row.activities) + u64::from(timer_ms > 0));
        if orchestrations > MAX_ORCHESTRATIONS {
            return Err(format!(
                "row {line}: the trace starts more than {MAX_ORCHESTRATIONS} orchestrations (count)"
            ));
        }
        if activities > MAX_ACTIVITIES {
            return Err(format!(
                "row {line}: the trace runs more than {MAX_ACTIVITIES} activities (count x activities)"
            ));
        }
        let mut steps =
            vec![Step::Activities { count: row.activities, duration: Duration::fixed(activity_ms) }];
        if timer_ms > 0 {
            steps.push(Step::Timer { delay_ms: timer_ms });
            steps.push(Step::Activities { count: 1, duration: Duration::fixed(activity_ms) });
        }
        match row.poison {
            0 => {}
            1 => steps.push(Step::Poison { duration: Duration::fixed(activity_ms) }),
            other => return Err(format!("row {line}: poison must be 0 or 1, got {other}")),
        }
        let script = Script { steps };
        let index = scripts.iter().position(|s| *s == script).unwrap_or_else(|| {
            scripts.push(script);
            scripts.len() - 1
        });
        arrivals.push(Arrival {
            at_ms: ms(row.at_s, "at_s", line, MAX_DURATION_MS)?,
            count: row.count,
            script: index,
        });
    }
    if arrivals.is_empty() {
        return Err("the trace has no rows".to_string());
    }
    arrivals.sort_by_key(|a| a.at_ms);
    let last = arrivals.last().map_or(0, |a| a.at_ms);
    Ok(Scenario {
        name: name.to_string(),
        description: format!(
            "trace: {} orchestrations",
            arrivals.iter().map(|a| u64::from(a.count)).sum::<u64>()
        ),
        duration_ms: duration_ms.unwrap_or(last + 30 * MINUTE),
        workload: Workload { scripts, arrivals },
        function_timeout_ms: None,
    })
}

/// Loads a trace: `.json` is an array of rows, anything else CSV with a header naming the
/// row fields (`at_s` required; `count`, `activities`, `activity_s`, `timer_s`, `poison`
/// optional).
pub fn load_trace(path: &Path, duration_ms: Option<u64>) -> Result<Scenario, Error> {
    let bad = |reason: String| Error::BadTrace { path: path.into(), reason };
    let size =
        std::fs::metadata(path).map_err(|source| Error::ReadTrace { path: path.into(), source })?.len();
    if size > MAX_TRACE_BYTES {
        return Err(bad(format!("{size} bytes, more than the {MAX_TRACE_BYTES} a trace may have")));
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::ReadTrace { path: path.into(), source })?;
    let rows: Vec<TraceRow> = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        parse_csv(&text).map_err(bad)?
    };
    let name = path.file_stem().map_or_else(|| "trace".to_string(), |s| s.to_string_lossy().into_owned());
    from_rows(&name, &rows, duration_ms).map_err(bad)
}

/// A small CSV reader for traces: a header line, comma-separated numbers, `#` comments.
pub fn parse_csv(text: &str) -> Result<Vec<TraceRow>, String> {
    let mut lines =
        text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((_, header)) = lines.next() else { return Err("empty trace".to_string()) };
    let columns: Vec<String> = header.split(',').map(|c| c.trim().to_ascii_lowercase()).collect();
    let known = ["at_s", "count", "activities", "activity_s", "timer_s", "poison"];
    if let Some(unknown) = columns.iter().find(|c| !known.contains(&c.as_str())) {
        return Err(format!("unknown column {unknown:?}; expected some of {}", known.join(", ")));
    }
    if !columns.iter().any(|c| c == "at_s") {
        return Err("the header must name an at_s column".to_string());
    }
    let mut rows = Vec::new();
    for (index, line) in lines {
        let mut row =
            TraceRow { at_s: 0.0, count: 1, activities: 1, activity_s: 1.0, timer_s: 0.0, poison: 0 };
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != columns.len() {
            return Err(format!(
                "line {}: {} cells, the header has {}",
                index + 1,
                cells.len(),
                columns.len()
            ));
        }
        for (column, cell) in columns.iter().zip(cells) {
            let number: f64 = cell
                .parse()
                .map_err(|_| format!("line {}: {column} = {cell:?} is not a number", index + 1))?;
            let whole = |n: f64| {
                if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) {
                    Ok(n as u32)
                } else {
                    Err(format!("line {}: {column} must be a whole number, got {cell}", index + 1))
                }
            };
            match column.as_str() {
                "at_s" => row.at_s = number,
                "count" => row.count = whole(number)?,
                "activities" => row.activities = whole(number)?,
                "activity_s" => row.activity_s = number,
                "poison" => row.poison = whole(number)?,
                _ => row.timer_s = number,
            }
        }
        rows.push(row);
    }
    Ok(rows)
}
