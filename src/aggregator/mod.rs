//! The aggregator role: merges sidecar reports per task hub, probes what no live sidecar
//! covers, applies the heuristic and serves KEDA's external scaler gRPC API.
//!
//! INTERFACE SKELETON (issue #4 builds the role; issue #5 the Kubernetes sources below).

pub mod sources;
