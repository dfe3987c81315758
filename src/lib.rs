//! durable-scaler: autoscaling for Azure Durable Functions apps (Durable Task Framework,
//! Azure Storage backend) on Kubernetes, driven by KEDA.
//!
//! The three roles live in their own modules over a shared pure engine, and no role imports
//! another (docs/architecture.md, "The code's layout", lists where this differs from
//! `architecture.md`):
//! - [`webhook`]: the admission webhook that injects the sidecar into opted-in pods;
//! - [`sidecar`]: the sidecar role, reporting its pod's partitions to the aggregator;
//! - [`aggregator`]: the aggregator role, serving KEDA; it defines the traits
//!   ([`aggregator::sources`]) that [`kubernetes`] implements;
//! - [`heuristic`]: scaling decisions from queue signals (pure, no I/O, no clock), with
//!   `heuristic::engine::HubEngine`, the one engine the aggregator, `simulate` and
//!   `recommend` all run;
//! - [`storage`]: read-only Azure Storage access to a task hub (sidecar and cold probe),
//!   detecting the ownership layout ([`storage::Layout`]: table, safe or legacy);
//! - [`kubernetes`]: the aggregator's Kubernetes side (worker count, TokenReview, Events);
//! - [`contract`]: the names, ports, limits and task hub rule the roles and manifests share;
//! - [`clock`]: the one Unix-milliseconds type; decisions take `now` as a value;
//! - `tls`: one reloading TLS configuration and accept loop for every listener; `metrics`:
//!   the typed label values of every role's Prometheus series;
//! - [`cli`] and `app`: the command line and the composition root, the only places that
//!   know every role;
//! - tools, not roles: `demo` (the whole path on one machine), [`simulate`] (races the
//!   scalers on simulated workloads), `recommend` (evaluates each algorithm on samples),
//!   [`status`] (every aggregator replica's `/hubs` through the API server's pod proxy),
//!   [`scaledobject`] (a workload manifest in, its ScaledObject and opt-in patch out),
//!   [`emulator`] (the Durable Task side's storage writes, for tests and the demo);
//! - [`proto`]: KEDA's external scaler contract and the sidecar report protocol;
//! - [`reading`]: what one read of a hub's queues shows, the one type from storage to the
//!   engine;
//! - [`config`], [`shutdown`], [`telemetry`], [`azurite`]: plumbing every role shares.
//!
//! Only what the binary, `tests/it` and `benches/` use is `pub`; the rest is `pub(crate)`.

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
pub(crate) mod listener;
pub(crate) mod metrics;
pub mod proto;
pub mod reading;
pub(crate) mod recommend;
pub mod scaledobject;
pub mod shutdown;
pub mod sidecar;
pub mod simulate;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod webhook;
