//! `durable-scaler recommend`: one JSON case on stdin, one JSON recommendation on stdout.
//!
//! A tool for users to ask "what would it decide, and why" without running anything. The
//! schema's fixed fields keep their meaning (tests outside the project use them); `samples`,
//! `work_grace_ms`, `worker_startup_ms` and the output's `metric_value` were added:
//!
//! ```text
//! input:  {"algorithm": "durable" | "target" | "latency", "workers": u32, "partitions": u32,
//!          "max_polling_interval_ms": u64 = 30000, "max_activities_per_worker": u32 = 10,
//!          "max_orchestrations_per_worker": u32 = 10, "processor_count": u32 = 1,
//!          "work_item": {"latencies_ms": [u64...], "length": u64 = 0},
//!          "control": [{"latencies_ms": [...], "length": u64 = 0}, ...],
//!          "samples": [{"at_ms": i64,
//!                       "work_item": {"approximate_count": u64 = 0, "visible_count": u64 = 0,
//!                                     "first_visible_age_ms": u64 = 0,
//!                                     "redelivered_count": u64 = 0},
//!                       "control": [{...}, ...]}, ...],
//!          "work_grace_ms": u64 = 300000, "worker_startup_ms": u64 = 20000}
//! output: {"action": "AddWorker" | "RemoveWorker" | "None", "keep_workers_alive": bool,
//!          "desired_workers": u32, "reason": "...", "metric_value": f64}
//! ```
//!
//! One evaluation path: every case is a sequence of timed readings run through the
//! aggregator's own engine ([`crate::heuristic::engine`]): each sample is observed and
//! decided on at its `at_ms` with `workers` running, and the answer is the last decision, so
//! the output is what the aggregator would answer after seeing that sequence. Two ways to
//! write the readings:
//! - **Timed `samples`** (every algorithm; `durable` needs them): readings of the queues, as
//!   a sidecar or the cold probe takes them, oldest first. Missing control queues read empty.
//! - **Fixed fields** (`latency`, `target`), shorthand for samples one second apart: a
//!   queue's latencies, oldest first, are the first-visible ages of its last readings (the
//!   ring gets one sample per reading, as the monitor would have sampled them; random
//!   scale-in off), and its `length` is its message count at every reading, all visible.
//!   Control queues missing from `control` (fewer entries than `partitions`) are idle queues
//!   read as often as the longest given ring.
//!
//! Samples replace `work_item` and `control`; giving both is refused.
//!
//! The per-worker limits are inputs: `max_activities_per_worker` /
//! `max_orchestrations_per_worker` as given; when one is missing, the Durable Functions
//! extension's default for a pod of `processor_count` CPUs (1 when not given): 10 x CPUs
//! ([`crate::contract::WORK_ITEMS_PER_CPU`], the aggregator's own guess too).
//!
//! `metric_value` is what GetMetrics would report to KEDA (target 1, AverageValue).

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;
use crate::heuristic::{
    Algorithm, Recommendation,
    durable::DurableSettings,
    engine::{DEFAULT_WORK_GRACE_MS, Decision, EngineSettings, HubEngine, TriggerInputs},
    latency::DEFAULT_MAX_POLLING_INTERVAL_MS,
    target::TargetSettings,
};
use crate::reading::{PEEK_LIMIT, QueueReading};

use crate::contract::MAX_PARTITIONS;

/// One queue in a case.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct QueueCase {
    /// Latency samples (ms), oldest first.
    #[serde(default)]
    pub latencies_ms: Vec<u64>,
    /// Queue length.
    #[serde(default)]
    pub length: u64,
}

/// One reading of one queue in a timed sample.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct ReadingCase {
    /// `x-ms-approximate-messages-count`: visible, in progress and delayed messages.
    #[serde(default)]
    pub approximate_count: u64,
    /// Messages a Peek of up to 32 returned.
    #[serde(default)]
    pub visible_count: u64,
    /// Age of the first visible message, ms (0 when none is visible).
    #[serde(default)]
    pub first_visible_age_ms: u64,
    /// Of the visible messages peeked, those dequeued before (reappeared).
    #[serde(default)]
    pub redelivered_count: u64,
}

impl ReadingCase {
    /// The reading taken `at` (a visible count above the peek limit is a full peek).
    fn at(self, at: UnixMs) -> QueueReading {
        QueueReading {
            approximate_count: self.approximate_count.max(self.visible_count),
            visible_count: u32::try_from(self.visible_count.min(u64::from(PEEK_LIMIT))).unwrap_or(PEEK_LIMIT),
            first_visible_age_ms: self.first_visible_age_ms,
            redelivered_count: u32::try_from(
                self.redelivered_count.min(self.visible_count).min(u64::from(PEEK_LIMIT)),
            )
            .unwrap_or(PEEK_LIMIT),
            sampled_at: at,
        }
    }
}

/// One timed sample of every queue.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SampleCase {
    /// When it was taken (ms on any clock; only differences matter).
    pub at_ms: i64,
    /// The work-item queue.
    #[serde(default)]
    pub work_item: ReadingCase,
    /// The control queues, partition 0 first; missing ones read empty.
    #[serde(default)]
    pub control: Vec<ReadingCase>,
}

/// One case, as read from stdin.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Case {
    /// Which heuristic decides.
    pub algorithm: Algorithm,
    /// The current worker count.
    pub workers: u32,
    /// The task hub's partition count (1..16).
    pub partitions: u32,
    /// DTFx's maximum polling interval (latency vote).
    #[serde(default = "default_max_poll")]
    pub max_polling_interval_ms: u64,
    /// Activities per worker (module docs for the default).
    #[serde(default)]
    pub max_activities_per_worker: Option<u32>,
    /// Orchestrations per worker (module docs for the default).
    #[serde(default)]
    pub max_orchestrations_per_worker: Option<u32>,
    /// The app's CPUs: sets the limits not given to the extension's default for them.
    #[serde(default)]
    pub processor_count: Option<u32>,
    /// The work-item queue.
    #[serde(default)]
    pub work_item: QueueCase,
    /// The control queues, partition 0 first.
    #[serde(default)]
    pub control: Vec<QueueCase>,
    /// Timed readings, oldest first, run through the engine (module docs).
    #[serde(default)]
    pub samples: Vec<SampleCase>,
    /// How long invisible messages count as work after their queue moved (timed samples).
    #[serde(default = "default_work_grace")]
    pub work_grace_ms: u64,
    /// How long a new worker takes to take work (`durable`; the trigger's `workerStartupMs`).
    #[serde(default = "default_worker_startup")]
    pub worker_startup_ms: u64,
}

/// What the subcommand prints: the recommendation and the metric value KEDA would get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Answer {
    /// The algorithm's answer.
    #[serde(flatten)]
    pub recommendation: Recommendation,
    /// What GetMetrics would report (target 1, AverageValue).
    pub metric_value: f64,
}

fn default_max_poll() -> u64 {
    DEFAULT_MAX_POLLING_INTERVAL_MS
}
fn default_work_grace() -> u64 {
    DEFAULT_WORK_GRACE_MS
}
fn default_worker_startup() -> u64 {
    DurableSettings::default().startup_ms
}

/// A case that cannot be answered, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaseError {
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
    /// The per-worker limits the case runs with (module docs).
    pub(crate) fn limits(&self) -> TargetSettings {
        let by_cpu = self.processor_count.unwrap_or(1).saturating_mul(crate::contract::WORK_ITEMS_PER_CPU);
        TargetSettings {
            max_activities_per_worker: self.max_activities_per_worker.unwrap_or(by_cpu),
            max_orchestrations_per_worker: self.max_orchestrations_per_worker.unwrap_or(by_cpu),
        }
    }

    /// Parses and validates a case.
    pub(crate) fn parse(json: &str) -> Result<Self, CaseError> {
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
        for (field, value) in [
            ("max_activities_per_worker", case.max_activities_per_worker),
            ("max_orchestrations_per_worker", case.max_orchestrations_per_worker),
            ("processor_count", case.processor_count),
        ] {
            if value == Some(0) {
                return Err(CaseError::Invalid { field, message: "expected a value above 0".into() });
            }
        }
        if case.algorithm == Algorithm::Latency && case.max_polling_interval_ms == 0 {
            return Err(CaseError::Invalid {
                field: "max_polling_interval_ms",
                message: "expected a value above 0".into(),
            });
        }
        let fixed =
            !case.control.is_empty() || !case.work_item.latencies_ms.is_empty() || case.work_item.length > 0;
        if case.samples.is_empty() && case.algorithm == Algorithm::Durable {
            return Err(CaseError::Invalid {
                field: "samples",
                message: "the durable algorithm reads timed samples: expected at least one".into(),
            });
        }
        if !case.samples.is_empty() && fixed {
            return Err(CaseError::Invalid {
                field: "samples",
                message: "give either samples or work_item/control, not both".into(),
            });
        }
        if let Some(sample) = case.samples.iter().find(|s| s.control.len() > case.partitions as usize) {
            return Err(CaseError::Invalid {
                field: "samples",
                message: format!(
                    "expected at most {} control readings (partitions) per sample, got {} at {} ms",
                    case.partitions,
                    sample.control.len(),
                    sample.at_ms
                ),
            });
        }
        if case.samples.windows(2).any(|w| w[1].at_ms < w[0].at_ms) {
            return Err(CaseError::Invalid {
                field: "samples",
                message: "expected at_ms in order, oldest first".into(),
            });
        }
        Ok(case)
    }

    /// The settings the engine would run this case with.
    fn engine_settings(&self) -> EngineSettings {
        EngineSettings::for_trigger(&TriggerInputs {
            worker_startup_ms: self.worker_startup_ms,
            max_polling_interval_ms: Some(self.max_polling_interval_ms),
            work_grace_ms: self.work_grace_ms,
            // One case, one answer: the latency vote's dice stay out of it.
            random_scale_in: false,
            ..TriggerInputs::new(self.algorithm, self.limits())
        })
    }

    /// The fixed fields as timed samples, one second apart (module docs): as many as the
    /// longest latency ring (at least one); a queue's latencies are its last readings' ages,
    /// and a queue is read only from its first latency on (an omitted control queue is idle
    /// and read every time).
    fn fixed_fields_as_samples(&self) -> Vec<(SampleCase, Vec<bool>)> {
        let rings = std::iter::once(&self.work_item).chain(&self.control);
        let n = rings.map(|q| q.latencies_ms.len()).max().unwrap_or(0).max(1);
        let reading = |q: &QueueCase, i: usize| -> Option<ReadingCase> {
            let skipped = n - q.latencies_ms.len();
            let read = q.latencies_ms.is_empty() && i + 1 == n || i >= skipped;
            read.then(|| ReadingCase {
                approximate_count: q.length,
                visible_count: q.length,
                first_visible_age_ms: q.latencies_ms.get(i.wrapping_sub(skipped)).copied().unwrap_or(0),
                redelivered_count: 0,
            })
        };
        (0..n)
            .map(|i| {
                let work_item = reading(&self.work_item, i);
                let mut read = vec![work_item.is_some()];
                let mut control = Vec::new();
                for p in 0..self.partitions as usize {
                    let r = match self.control.get(p) {
                        Some(q) => reading(q, i),
                        None => Some(ReadingCase::default()),
                    };
                    read.push(r.is_some());
                    control.push(r.unwrap_or_default());
                }
                let at_ms = i64::try_from(i).unwrap_or(i64::MAX).saturating_mul(1_000);
                (SampleCase { at_ms, work_item: work_item.unwrap_or_default(), control }, read)
            })
            .collect()
    }

    /// The answer for this case: the recommendation and the metric value, from the engine's
    /// last decision over the case's samples (module docs).
    pub(crate) fn answer(&self) -> Answer {
        let timeline: Vec<(SampleCase, Vec<bool>)> = if self.samples.is_empty() {
            self.fixed_fields_as_samples()
        } else {
            let every = vec![true; self.partitions as usize + 1];
            self.samples.iter().map(|s| (s.clone(), every.clone())).collect()
        };
        let mut engine = HubEngine::new(self.engine_settings(), self.partitions as usize);
        let mut decision: Option<Decision> = None;
        for (sample, read) in &timeline {
            let at = UnixMs(sample.at_ms);
            if read.first().copied().unwrap_or(true) {
                engine.observe_work_item(sample.work_item.at(at), at);
            }
            for p in 0..self.partitions as usize {
                if read.get(p + 1).copied().unwrap_or(true) {
                    let reading = sample.control.get(p).copied().unwrap_or_default();
                    engine.observe_control(p, reading.at(at), at);
                }
            }
            decision = Some(engine.evaluate(at, self.workers).clone());
        }
        // `timeline` is never empty: samples as given (parse refuses none for durable), or at
        // least one made of the fixed fields.
        let d = decision.unwrap_or_else(|| engine.evaluate(UnixMs(0), self.workers).clone());
        Answer { recommendation: d.recommendation, metric_value: d.metric_value }
    }
}

/// Runs the subcommand: reads stdin, writes the answer to stdout. Exit status 2 with one
/// line on stderr for a malformed case.
pub(crate) fn run() -> std::process::ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read stdin: {e}");
        return std::process::ExitCode::from(2);
    }
    match Case::parse(&input) {
        Ok(case) => {
            // Serializing a struct of plain fields cannot fail.
            println!("{}", serde_json::to_string(&case.answer()).unwrap_or_default());
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
        let r = case.answer().recommendation;
        assert_eq!((r.action, r.desired_workers), (ScaleAction::AddWorker, 2));
    }

    #[test]
    fn missing_control_queues_are_idle_with_as_many_samples() {
        let case = Case::parse(
            r#"{"algorithm":"latency","workers":1,"partitions":4,
            "control":[{"latencies_ms":[]},{"latencies_ms":[]},{"latencies_ms":[]},{"latencies_ms":[1,0,0,0,0]}]}"#,
        );
        // Explicit empty rings are "not enough samples"; omitted ones are padded.
        assert_eq!(case.unwrap().answer().recommendation.reason, "Not enough samples");
        let padded = Case::parse(
            r#"{"algorithm":"latency","workers":1,"partitions":4,
            "work_item":{"latencies_ms":[1,0,0,0,0]}}"#,
        )
        .unwrap();
        assert_eq!(padded.answer().recommendation.reason, "Queue latencies are healthy");
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

    /// A durable case: `at_ms`, then (approximate, visible) of control queue 0 per sample.
    fn durable_case(workers: u32, control0: &[(i64, u64, u64)]) -> String {
        let samples: Vec<String> = control0
            .iter()
            .map(|(at, a, v)| {
                format!(r#"{{"at_ms":{at},"control":[{{"approximate_count":{a},"visible_count":{v}}}]}}"#)
            })
            .collect();
        format!(
            r#"{{"algorithm":"durable","workers":{workers},"partitions":4,"samples":[{}]}}"#,
            samples.join(",")
        )
    }

    #[test]
    fn durable_reads_timed_samples_and_lets_sleeping_timers_sleep() {
        let timers: Vec<(i64, u64, u64)> = (0..=12).map(|i| (i * 5_000, 3, 0)).collect();
        let a = Case::parse(&durable_case(1, &timers)).unwrap().answer();
        assert_eq!((a.recommendation.desired_workers, a.recommendation.keep_workers_alive), (0, false));
        assert!(a.recommendation.reason.contains("sleeping timers"), "{}", a.recommendation.reason);
        let waiting = r#"{"algorithm":"durable","workers":1,"partitions":4,"samples":[
            {"at_ms":0},{"at_ms":5000,"work_item":{"approximate_count":25,"visible_count":25}}]}"#;
        let a = Case::parse(waiting).unwrap().answer();
        assert_eq!(
            (a.recommendation.desired_workers, a.metric_value),
            (3, 3.0),
            "{}",
            a.recommendation.reason
        );
    }

    #[test]
    fn durable_without_samples_and_samples_beside_fixed_fields_are_refused() {
        let e = Case::parse(r#"{"algorithm":"durable","workers":1,"partitions":4}"#).unwrap_err();
        assert!(e.to_string().starts_with("samples: the durable algorithm reads timed samples"), "{e}");
        let e = Case::parse(
            r#"{"algorithm":"target","workers":1,"partitions":4,"work_item":{"length":3},"samples":[{"at_ms":0}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "samples: give either samples or work_item/control, not both");
        let e = Case::parse(
            r#"{"algorithm":"target","workers":1,"partitions":4,"samples":[{"at_ms":5},{"at_ms":1}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "samples: expected at_ms in order, oldest first");
    }

    #[test]
    fn timed_samples_run_the_target_formula_on_what_the_engine_counts_as_work() {
        // Three messages never seen visible and never moving for longer than the settle
        // window: sleeping, length 0.
        let case = r#"{"algorithm":"target","workers":1,"partitions":4,"samples":[
            {"at_ms":0,"control":[{"approximate_count":3}]},
            {"at_ms":40000,"control":[{"approximate_count":3}]}]}"#;
        assert_eq!(Case::parse(case).unwrap().answer().recommendation.desired_workers, 0);
        // The same count on the fixed fields is taken as given.
        let fixed = r#"{"algorithm":"target","workers":1,"partitions":4,"control":[{"length":3}]}"#;
        assert_eq!(Case::parse(fixed).unwrap().answer().recommendation.desired_workers, 1);
    }

    #[test]
    fn the_answer_carries_the_metric_value_keda_would_get() {
        // 12 workers wanting 20: the value that moves the HPA there, not a plain 20.
        let case =
            Case::parse(r#"{"algorithm":"target","workers":12,"partitions":4,"work_item":{"length":200}}"#)
                .unwrap();
        let a = case.answer();
        assert_eq!(a.recommendation.desired_workers, 20);
        assert_eq!(a.metric_value, crate::heuristic::hpa::metric_value(20, 12));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["desired_workers"], 20, "the recommendation's fields stay at the top level");
    }

    fn target_case(extra: &str) -> Case {
        Case::parse(&format!(
            r#"{{"algorithm": "target", "workers": 1, "partitions": 4, "work_item": {{"length": 200}}{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn processor_count_sets_the_limits_not_given() {
        let one = target_case(r#", "processor_count": 1"#).answer().recommendation;
        let two = target_case(r#", "processor_count": 2"#).answer().recommendation;
        assert_eq!((one.desired_workers, two.desired_workers), (20, 10));
        let explicit = target_case(r#", "processor_count": 2, "max_activities_per_worker": 40"#);
        assert_eq!(explicit.limits().max_activities_per_worker, 40);
        assert_eq!(explicit.limits().max_orchestrations_per_worker, 20);
    }

    #[test]
    fn without_limits_or_cpus_a_one_cpu_pods_limits_hold() {
        let limits = target_case("").limits();
        assert_eq!((limits.max_activities_per_worker, limits.max_orchestrations_per_worker), (10, 10));
        assert_eq!(limits, TargetSettings::default(), "the same default as the aggregator's guess");
    }

    #[test]
    fn zero_limits_or_cpus_are_refused_naming_the_field() {
        for field in ["max_activities_per_worker", "max_orchestrations_per_worker", "processor_count"] {
            let json = format!(r#"{{"algorithm": "target", "workers": 1, "partitions": 4, "{field}": 0}}"#);
            match Case::parse(&json) {
                Err(CaseError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
