# nearcache container image.
#
#   docker build -t nearcache .                       # builds from source (Rust >= 1.85)
#   docker run --rm -p 6380:6380 -p 9180:9180 \
#       -e NEARCACHE_UPSTREAM=redis://redis:6379 nearcache
#
# Stages:
#   builder           rust image; dependencies are compiled in their own layer
#                     (a dummy main built from Cargo.toml + Cargo.lock alone), so
#                     a source change rebuilds only nearcache itself.
#   runtime           debian:bookworm-slim + the binary from `builder` (default).
#   runtime-prebuilt  the same runtime with a binary taken from the build context
#                     (`--build-arg BINARY=target/release/nearcache`): what
#                     scripts/test-container.sh builds where no Rust image can be
#                     pulled. `--build-arg BASE=...` swaps the base image.
#
# Configuration: /etc/nearcache/config.toml (deploy/container/config.toml; mount
# your own over it, or override single fields with NEARCACHE_* variables:
# NEARCACHE_UPSTREAM, NATS_URL, NEARCACHE_LISTEN, NEARCACHE_ADMIN, ...).
# Ports: 6380 (Redis protocol), 9180 (admin HTTP: /healthz, /readyz, /metrics, /stats).

ARG RUST_VERSION=1.85
ARG BASE=debian:bookworm-slim

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Dependencies first: this layer is reused until Cargo.toml or Cargo.lock changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs benches/protocol.rs benches/routing.rs benches/cache.rs \
 && cargo build --release --locked --bin nearcache \
 && rm -rf src
COPY src ./src
# touch: the dummy build left a newer nearcache artefact behind.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin nearcache \
 && strip target/release/nearcache \
 && cp target/release/nearcache /usr/local/bin/nearcache

# The runtime, shared by both final stages.
FROM ${BASE} AS runtime-base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nearcache" \
      org.opencontainers.image.description="Redis-protocol caching proxy: L1 cache, NATS-coherent invalidation" \
      org.opencontainers.image.source="https://github.com/nearcache/nearcache" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Non-root, fixed uid/gid so volume and secret permissions are predictable.
RUN groupadd --system --gid 10001 nearcache \
 && useradd --system --uid 10001 --gid nearcache --no-create-home --shell /usr/sbin/nologin nearcache \
 && mkdir -p /etc/nearcache
COPY deploy/container/config.toml /etc/nearcache/config.toml
# The health probe is bash's /dev/tcp (bash is in every Debian image): no curl,
# no extra package, no Rust change. It asks the admin listener's /readyz.
COPY deploy/container/healthcheck.sh /usr/local/bin/nearcache-healthcheck
RUN chmod 0755 /usr/local/bin/nearcache-healthcheck && chmod 0644 /etc/nearcache/config.toml
USER nearcache:nearcache
EXPOSE 6380 9180
ENV NEARCACHE_HEALTH_ADDR=127.0.0.1:9180
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/nearcache-healthcheck"]
# SIGTERM: stop accepting, finish in-flight requests (server.shutdown_timeout), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/nearcache"]
CMD ["--config", "/etc/nearcache/config.toml"]

# A binary from the build context instead of the builder stage.
FROM runtime-base AS runtime-prebuilt
ARG BINARY=target/release/nearcache
COPY --chmod=0755 ${BINARY} /usr/local/bin/nearcache

# Default target (last stage): the binary built above.
FROM runtime-base AS runtime
COPY --from=builder /usr/local/bin/nearcache /usr/local/bin/nearcache
