//! Code generated from `proto/` by `build.rs`: KEDA's external scaler contract and the
//! project's own sidecar report protocol.

/// KEDA's `externalscaler` package (proto/externalscaler.proto).
#[allow(missing_docs, clippy::all)]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// The sidecar -> aggregator report protocol (proto/report.proto).
#[allow(missing_docs, clippy::all)]
pub mod report {
    tonic::include_proto!("durablescaler.report.v1");
}

/// The encoded `FileDescriptorSet` of every file in `proto/`, for gRPC server reflection.
pub(crate) const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
