//! `durable-scaler recommend` from the command line: every conformance case of
//! durabletask-facts.md, answered by the real binary, and malformed input rejected.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use serde_json::{Value, json};

fn recommend(input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .arg("recommend")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn durable-scaler");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn answer(case: Value) -> Value {
    let out = recommend(&case.to_string());
    assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// A latency case on P = 4: the named queues get their samples, every other queue as many
/// zeros.
fn latency_case(workers: u32, work_item: &[u64], control: &[(usize, &[u64])]) -> Value {
    let n = control.iter().map(|(_, s)| s.len()).chain([work_item.len()]).max().unwrap();
    let zeros = vec![0u64; n];
    let wi = if work_item.is_empty() { zeros.clone() } else { work_item.to_vec() };
    let cq: Vec<Value> = (0..4)
        .map(|i| {
            let s = control.iter().find(|(q, _)| *q == i).map(|(_, s)| s.to_vec()).unwrap_or(zeros.clone());
            json!({"latencies_ms": s})
        })
        .collect();
    json!({"algorithm": "latency", "workers": workers, "partitions": 4,
           "max_polling_interval_ms": 30000, "work_item": {"latencies_ms": wi}, "control": cq})
}

fn expect(case: Value, action: &str, keep: Option<bool>) {
    let a = answer(case.clone());
    assert_eq!(a["action"], action, "{case} -> {a}");
    if let Some(keep) = keep {
        assert_eq!(a["keep_workers_alive"], keep, "{case} -> {a}");
    }
    let workers = case["workers"].as_u64().unwrap();
    let desired = a["desired_workers"].as_u64().unwrap();
    let step = match action {
        "AddWorker" => workers + 1,
        "RemoveWorker" => workers.saturating_sub(1),
        _ => workers,
    };
    assert_eq!(desired, step, "{case} -> {a}");
    assert!(a["reason"].as_str().is_some_and(|r| !r.is_empty()));
}

#[test]
fn latency_conformance_cases() {
    let rising: &[u64] = &[600, 700, 800, 900, 1000];
    let all_rising = [(0, rising), (1, rising), (2, rising), (3, rising)];
    let fives: &[u64] = &[500; 5];
    let ones: &[u64] = &[1; 6];

    expect(latency_case(1, &[500, 600, 700, 800, 900, 1000], &[]), "AddWorker", Some(true));
    expect(latency_case(1, &[500, 600, 700, 800, 900], &[]), "None", Some(true));
    expect(latency_case(1, &[30000, 0, 0, 0, 0, 0], &[]), "RemoveWorker", Some(false));
    expect(latency_case(1, &[1, 0, 0, 0, 0], &[]), "None", Some(true));
    expect(latency_case(1, &[30000, 30000, 30000, 30000, 3], &[]), "None", Some(true));
    expect(latency_case(1, &[], &[(3, rising)]), "None", Some(true));
    expect(latency_case(1, &[], &[(2, rising), (3, rising)]), "AddWorker", None);
    expect(latency_case(2, &[], &[(2, rising), (3, rising)]), "None", None);
    expect(latency_case(3, &[], &all_rising), "AddWorker", None);
    expect(latency_case(4, &[], &all_rising), "None", None);
    expect(latency_case(5, &[], &all_rising), "RemoveWorker", Some(true));
    for w in 1..=4 {
        expect(latency_case(w, &[], &[(0, fives), (1, fives), (2, fives), (3, fives)]), "None", Some(true));
    }
    for w in 5..=9 {
        expect(
            latency_case(w, &[], &[(0, fives), (1, fives), (2, fives), (3, fives)]),
            "RemoveWorker",
            Some(true),
        );
    }
    let one_quiet = [(0, &[1u64, 0, 0, 0, 0, 0][..]), (1, ones), (2, ones), (3, ones)];
    for w in 1..=3 {
        expect(latency_case(w, &[], &one_quiet), "None", None);
    }
    for w in 4..=8 {
        expect(latency_case(w, &[], &one_quiet), "RemoveWorker", Some(true));
    }
    expect(latency_case(1, &[], &[(3, &[1, 0, 0, 0, 0, 0])]), "RemoveWorker", Some(false));
    expect(latency_case(1, &[], &[(3, &[1, 0, 0, 0, 0])]), "None", Some(true));
}

#[test]
fn latency_reason_is_upstreams_text() {
    let a = answer(latency_case(1, &[500, 600, 700, 800, 900, 1000], &[]));
    assert_eq!(a["reason"], "Work-item queue latency: 1000 > 1000");
}

#[test]
fn target_conformance_cases() {
    let cases = [
        (1, 10, 10, [1, 1, 1, 1], 10),
        (1, 10, 0, [0, 0, 0, 0], 0),
        (1, 10, 0, [2, 2, 3, 3], 1),
        (10, 10, 10, [2, 2, 3, 3], 1),
    ];
    for (max_act, max_orch, wi, control, target) in cases {
        let case = json!({"algorithm": "target", "workers": 1, "partitions": 4,
            "max_activities_per_worker": max_act, "max_orchestrations_per_worker": max_orch,
            "work_item": {"length": wi},
            "control": control.iter().map(|l| json!({"length": l})).collect::<Vec<_>>()});
        let a = answer(case.clone());
        assert_eq!(a["desired_workers"], target, "{case} -> {a}");
        let action = match target {
            0 => "RemoveWorker",
            1 => "None",
            _ => "AddWorker",
        };
        assert_eq!(a["action"], action, "{case} -> {a}");
        assert_eq!(a["keep_workers_alive"], target > 0, "{case} -> {a}");
    }
}

#[test]
fn defaults_apply_when_fields_are_omitted() {
    // Defaults: 10 activities per worker, 5 orchestrations per worker, lengths 0.
    let a = answer(json!({"algorithm": "target", "workers": 0, "partitions": 2,
        "work_item": {"length": 25}, "control": [{"length": 11}]}));
    assert_eq!(a["desired_workers"], 3);
    assert_eq!(a["action"], "AddWorker");
}

fn rejected(input: &str) -> String {
    let out = recommend(input);
    assert_eq!(out.status.code(), Some(2), "{input}: status");
    assert!(out.stdout.is_empty(), "{input}: nothing on stdout");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{input}: one line on stderr, got {stderr:?}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    stderr
}

#[test]
fn malformed_input_exits_2_naming_the_field() {
    assert!(rejected("").contains("EOF"));
    assert!(rejected("not json").contains("expected"));
    assert!(rejected(r#"{"workers": 1, "partitions": 4}"#).contains("algorithm"));
    assert!(rejected(r#"{"algorithm": "latency", "partitions": 4}"#).contains("workers"));
    assert!(rejected(r#"{"algorithm": "latency", "workers": -1, "partitions": 4}"#).contains("workers"));
    assert!(rejected(r#"{"algorithm": "sideways", "workers": 1, "partitions": 4}"#).contains("algorithm"));
    assert!(rejected(r#"{"algorithm": "latency", "workers": 1, "partitions": 0}"#).contains("partitions"));
    assert!(
        rejected(
            r#"{"algorithm": "latency", "workers": 1, "partitions": 4, "work_item": {"latencies_ms": ["x"]}}"#
        )
        .contains("work_item.latencies_ms[0]")
    );
    assert!(
        rejected(r#"{"algorithm": "target", "workers": 1, "partitions": 1, "control": [{}, {}]}"#)
            .contains("control")
    );
}

#[test]
fn the_example_in_examples_answers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/recommend-burst.json");
    let a = answer(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap());
    assert_eq!(a["action"], "AddWorker");
    assert_eq!(a["desired_workers"], 2);
}
