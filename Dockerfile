# One image for every role (webhook, sidecar, aggregator) and certs-gen.
# Not built in this project's CI (its machines have no container engine); see the README.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p durable-scaler -p certs-gen

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/durable-scaler /usr/local/bin/durable-scaler
COPY --from=build /src/target/release/certs-gen /usr/local/bin/certs-gen
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/durable-scaler"]
