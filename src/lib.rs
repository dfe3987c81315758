//! durable-scaler: autoscaling for Azure Durable Functions apps (Durable Task Framework,
//! Azure Storage backend) on Kubernetes, driven by KEDA.
//!
//! The three roles live in their own modules over a shared pure engine:
//! - [`heuristic`]: scaling decisions from queue signals (pure, no I/O, no clock);
//! - [`recommend`]: the `recommend` tool over the heuristics;
//! - [`proto`]: KEDA's external scaler contract and the sidecar report protocol;
//! - [`webhook`]: the admission webhook that injects the sidecar into opted-in pods;
//! - [`shutdown`], [`telemetry`]: process plumbing every role shares.

pub mod aggregator;
pub mod azurite;
pub mod cli;
pub mod heuristic;
pub mod proto;
pub mod recommend;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
pub mod webhook;
