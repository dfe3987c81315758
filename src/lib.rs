//! durable-scaler: autoscaling for Azure Durable Functions apps (Durable Task Framework,
//! Azure Storage backend) on Kubernetes, driven by KEDA.
//!
//! The three roles live in their own modules over a shared pure engine:
//! - [`heuristic`]: scaling decisions from queue signals (pure, no I/O, no clock);
//! - [`storage`]: read-only Azure Storage access to a task hub (sidecar and cold probe);
//! - [`sidecar`]: the sidecar role, reporting its pod's partitions to the aggregator;
//! - [`aggregator`]: the aggregator role, serving KEDA;
//! - [`recommend`]: the `recommend` tool over the heuristics;
//! - [`emulator`]: the Durable Task side's storage writes, for tests and the demo only;
//! - [`kubernetes`]: the aggregator's Kubernetes side (worker count, TokenReview, Events);
//! - [`simulate`]: the `simulate` tool that races the scalers on simulated workloads;
//! - [`proto`]: KEDA's external scaler contract and the sidecar report protocol;
//! - [`webhook`]: the admission webhook that injects the sidecar into opted-in pods;
//! - [`contract`]: the names, ports, limits and task hub rule the roles and manifests share;
//! - [`clock`]: the one Unix-milliseconds type; decisions take `now` as a value;
//! - [`cli`], [`app`]: the command line and the composition root, the only places that
//!   know every role (no role imports another);
//! - [`config`], [`shutdown`], [`telemetry`], [`azurite`]: plumbing every role shares.

pub mod aggregator;
pub(crate) mod app;
pub mod azurite;
pub mod cli;
pub mod clock;
pub mod config;
pub mod contract;
pub(crate) mod demo;
pub mod emulator;
pub mod heuristic;
pub mod kubernetes;
pub(crate) mod metrics;
pub mod proto;
pub(crate) mod recommend;
pub mod shutdown;
pub mod sidecar;
pub mod simulate;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod webhook;
