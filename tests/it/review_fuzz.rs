//! A stable-toolchain fuzz harness for the review handler (the cargo-fuzz target in fuzz/
//! needs nightly): random bytes, truncated reviews and randomly mutated API-server-shaped
//! reviews, every answer checked by the same invariants as the cargo-fuzz target.
//!
//! Deterministic by default (fixed seed, a few thousand cases, a second or two). Run it
//! longer with `DURABLE_SCALER_FUZZ_CASES=1000000 DURABLE_SCALER_FUZZ_SEED=7 cargo test
//! --release --test it review_fuzz -- --nocapture`.

use crate::review_invariants;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::{Map, Value, json};

const FIXTURE: &str = include_str!("../fixtures/admission/replicaset-pod-create.json");

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Values that stress the injection rules: pointer-special characters, wrong types, the
/// names the webhook looks for.
fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    const STRINGS: &[&str] = &[
        "",
        "true",
        "false",
        "durable-scaler-sidecar",
        "AzureWebJobsStorage",
        "OrdersHub",
        "a/b~c",
        "~1",
        "/",
        "-",
        "100m",
        "64Mi",
        "-1",
        "1e99",
        "http://x:1",
        "app",
        "é\u{0}\u{ffff}",
    ];
    match rng.random_range(0..if depth > 2 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!(*STRINGS.choose(rng).unwrap_or(&"")),
        4 => json!(rng.random::<f64>()),
        5 => Value::Array((0..rng.random_range(0..3)).map(|_| random_value(rng, depth + 1)).collect()),
        6 => json!({"name": *STRINGS.choose(rng).unwrap_or(&""), "value": random_value(rng, depth + 1)}),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.random_range(0..3) {
                map.insert(STRINGS.choose(rng).unwrap_or(&"").to_string(), random_value(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

/// Every JSON pointer into `value`.
fn pointers(value: &Value, prefix: String, out: &mut Vec<String>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(v, format!("{prefix}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{prefix}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The fixture with a few random edits: replace a node, delete a key, or add a key.
fn mutated_review(rng: &mut StdRng, base: &Value) -> Value {
    let mut review = base.clone();
    for _ in 0..rng.random_range(1..4) {
        let mut all = Vec::new();
        pointers(&review, String::new(), &mut all);
        // Bias towards the pod, where the rules are.
        let in_pod: Vec<&String> = all.iter().filter(|p| p.starts_with("/request/object")).collect();
        let target = if rng.random_bool(0.8) && !in_pod.is_empty() {
            (*in_pod.choose(rng).unwrap()).clone()
        } else {
            all.choose(rng).cloned().unwrap_or_default()
        };
        let replacement = random_value(rng, 0);
        match rng.random_range(0..3) {
            0 => {
                if let Some(node) = review.pointer_mut(&target) {
                    *node = replacement;
                }
            }
            1 => {
                if let Some((parent, key)) = target.rsplit_once('/') {
                    let key = key.replace("~1", "/").replace("~0", "~");
                    if let Some(map) = review.pointer_mut(parent).and_then(Value::as_object_mut) {
                        map.remove(&key);
                    }
                }
            }
            _ => {
                if let Some(map) = review.pointer_mut(&target).and_then(Value::as_object_mut) {
                    let key = [
                        "annotations",
                        "durable-scaler.io/task-hub",
                        "initContainers",
                        "volumes",
                        "env",
                        "x",
                    ]
                    .choose(rng)
                    .unwrap_or(&"x")
                    .to_string();
                    map.insert(key, replacement);
                }
            }
        }
    }
    review
}

#[test]
fn every_review_answer_keeps_the_invariants() {
    let seed = env_number("DURABLE_SCALER_FUZZ_SEED", 0x5eed);
    let cases = env_number("DURABLE_SCALER_FUZZ_CASES", 3000);
    let mut rng = StdRng::seed_from_u64(seed);
    let settings = review_invariants::settings();
    let base: Value = serde_json::from_str(FIXTURE).unwrap();
    let mut patched = 0u64;
    for case in 0..cases {
        let input: Vec<u8> = match case % 4 {
            0 => (0..rng.random_range(0..256)).map(|_| rng.random()).collect(),
            1 => {
                let text = FIXTURE.as_bytes();
                text[..rng.random_range(0..text.len())].to_vec()
            }
            _ => mutated_review(&mut rng, &base).to_string().into_bytes(),
        };
        let result = std::panic::catch_unwind(|| review_invariants::check(&input, &settings));
        match result {
            Ok(true) => patched += 1,
            Ok(false) => {}
            Err(_) => panic!(
                "case {case} (seed {seed}) broke an invariant; input:\n{}",
                String::from_utf8_lossy(&input)
            ),
        }
    }
    eprintln!("review fuzz: {cases} cases, seed {seed}, {patched} answered with a patch");
    assert!(patched > cases / 10, "the mutations should still reach the injection path often");
}
