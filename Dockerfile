# syntax=docker/dockerfile:1
#
# segment-sync: a multi-stage build. The builder compiles librdkafka from source (hence
# cmake and a C toolchain) and links OpenSSL dynamically; the runtime image carries only the
# binary, OpenSSL and the CA bundle, and runs as an unprivileged user.
#
#   docker build -t segment-sync .
#   docker run --rm -v "$PWD/docker/segment-sync.toml:/etc/segment-sync/segment-sync.toml:ro" \
#       -e BRAZE_API_KEY=... -p 9464:9464 segment-sync

FROM rust:1-bookworm AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, against stub sources: this layer (librdkafka's C build included, the
# slow part) is reused as long as Cargo.toml, Cargo.lock and benches/ do not change. The
# benches come in as they are because cargo refuses a manifest whose declared [[bench]]
# file is missing; a release build does not compile them.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The sources, and every file they include at compile time.
COPY schemas ./schemas
COPY segment-sync.example.toml ./
COPY src ./src
# COPY keeps the files' modification times, which may be older than the stub build's:
# touching them makes cargo rebuild the crate itself instead of keeping the stubs.
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked \
    && cp target/release/segment-sync /usr/local/bin/segment-sync

FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 segment-sync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin segment-sync \
    && mkdir -p /etc/segment-sync

COPY --from=builder /usr/local/bin/segment-sync /usr/local/bin/segment-sync

USER 10001:10001
# /metrics, /healthz and /readyz, when server.listen is 0.0.0.0:9464.
EXPOSE 9464
ENTRYPOINT ["segment-sync"]
CMD ["run", "--config", "/etc/segment-sync/segment-sync.toml"]
