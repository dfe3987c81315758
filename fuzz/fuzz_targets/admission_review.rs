//! libFuzzer target: any bytes as an AdmissionReview body, through the same review function
//! the webhook's `POST /mutate` calls, every answer checked by the invariants shared with the
//! stable harness (tests/it/review_fuzz.rs). Seed corpus: corpus/admission_review/.

#![no_main]

#[path = "../../tests/it/review_invariants.rs"]
mod review_invariants;

use std::sync::LazyLock;

use durable_scaler::webhook::inject::InjectionSettings;
use libfuzzer_sys::fuzz_target;

static SETTINGS: LazyLock<InjectionSettings> = LazyLock::new(review_invariants::settings);

fuzz_target!(|data: &[u8]| {
    review_invariants::check(data, &SETTINGS);
});
