# syntax=docker/dockerfile:1

# ---- build -----------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /build

# Cargo features of the binary: "" (default) or "postgres" for the outbox
# relay and the inbox (`docker build --build-arg BURROW_FEATURES=postgres .`).
ARG BURROW_FEATURES=""

# Dependency layer: build every dependency against stub sources so that it is
# cached until Cargo.toml, Cargo.lock or a patched dependency change. Cargo
# refuses a manifest whose declared bench or example targets have no file, so
# those get stubs too. patches/ holds the crates Cargo.toml's
# [patch.crates-io] points at; without them the locked build fails.
COPY Cargo.toml Cargo.lock ./
COPY patches ./patches
RUN mkdir -p src handlers benches/e2e examples \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/pipeline.rs \
    && echo 'fn main() {}' > benches/e2e/main.rs \
    && echo 'fn main() {}' > examples/outbox_latency.rs \
    && touch src/lib.rs handlers/mod.rs \
    && cargo build --release --locked --features "$BURROW_FEATURES"

# The real sources; touch them so cargo rebuilds the crate over the stubs.
COPY src ./src
COPY handlers ./handlers
COPY config ./config
COPY migrations ./migrations
RUN find src handlers -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --features "$BURROW_FEATURES" \
    && strip target/release/burrow

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates for amqps:// brokers. Not version-pinned: the bookworm
# security updates should be picked up on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 burrow \
    && useradd --uid 10001 --gid burrow --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin burrow

WORKDIR /app
COPY --from=builder /build/target/release/burrow /usr/local/bin/burrow
COPY config /app/config

ENV APP_ENV=production
USER 10001:10001
EXPOSE 9090

# `burrow healthcheck` GETs http://127.0.0.1:9090/healthz (no curl in here).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["burrow", "healthcheck"]

ENTRYPOINT ["burrow"]
CMD ["run"]
