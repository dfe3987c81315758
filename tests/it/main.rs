//! Every integration test of the crate, in one test binary.
//!
//! Each file directly under tests/ would be a binary of its own that links the whole crate
//! graph (tonic, kube, azure_core, rustls ...): thirteen of them made target/ several GB and
//! spent most of the test build in the linker. One binary links once. Run one area with a
//! name filter, e.g. `cargo test --test it sidecar::`.

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod aggregator_support;
mod child;
mod common;
mod crd_schema;
mod forwarder;
mod https;
mod processes;
mod review_invariants;
mod tools;

mod aggregator;
mod aggregator_cli;
mod aggregator_storage;
mod aggregator_tls;
mod bounds;
mod cert_manager;
mod demo;
mod dispatch;
mod engine_equivalence;
mod faults;
mod hostile;
mod in_flight;
mod kubernetes;
mod latency_feed;
mod limits;
mod logs;
mod manifests;
mod monitoring;
mod readme;
mod recommend_cli;
mod release;
mod review_fuzz;
mod scaledobject;
mod sidecar;
mod simulate;
mod status;
mod stops;
mod storage;
mod webhook;
