# syntax=docker/dockerfile:1
#
# oci-proxy container image: a static-ish Rust binary on distroless (glibc, CA certificates,
# no shell), running as the distroless "nonroot" user 65532.
#
#   docker build -t oci-proxy .
#   docker run --rm -p 127.0.0.1:5000:5000 -v oci-proxy-cache:/var/cache/oci-proxy oci-proxy
#
# Read-only root friendly: the proxy writes only to its cache volume (/var/cache/oci-proxy).
# Kubernetes manifests: deploy/ (they mount the config at /etc/oci-proxy/config.yaml).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# The cargo registry and target dir live in BuildKit cache mounts, so a source change rebuilds
# only this crate, not its dependencies. The binary is copied out of the mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin oci-proxy \
 && install -D -m 0755 target/release/oci-proxy /out/oci-proxy
# The cache directory, owned by the runtime user (distroless has no shell to create it).
RUN install -d -m 0755 -o 65532 -g 65532 /out/cache

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/oci-proxy /usr/local/bin/oci-proxy
COPY --from=builder --chown=65532:65532 /out/cache /var/cache/oci-proxy
COPY deploy/docker/config.yaml /etc/oci-proxy/config.yaml
USER 65532:65532
EXPOSE 5000
VOLUME ["/var/cache/oci-proxy"]
ENTRYPOINT ["oci-proxy"]
CMD ["serve", "--config", "/etc/oci-proxy/config.yaml"]
