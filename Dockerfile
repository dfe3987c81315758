# One image for every role (webhook, sidecar, aggregator) and certs-gen.
# Not built in this project's CI (its machines have no container engine); see the README:
#   docker build -t registry.example.com/team/durable-scaler:0.1.0 .
# The build stage has no --platform=$BUILDPLATFORM, so it runs on the platform the image is for
# (`docker buildx build --platform linux/arm64` builds arm64 binaries under emulation) and the
# binaries always match the runtime stage. Bookworm matches distroless cc-debian12's glibc.
# --locked: exactly the versions in Cargo.lock.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p durable-scaler -p certs-gen

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/durable-scaler /usr/local/bin/durable-scaler
COPY --from=build /src/target/release/certs-gen /usr/local/bin/certs-gen
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/durable-scaler"]
