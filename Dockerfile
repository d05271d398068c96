# syntax=docker/dockerfile:1
# spirekeep container image: a release build of the `spirekeep` binary on Debian bookworm, run as a
# non-root user. Used by docker-compose.yml and the manifests in deploy/kubernetes/.
#
#   docker build -t spirekeep:dev .
#   docker run --rm spirekeep:dev --help
#
# The builder is the bookworm variant of rust:1.95 on purpose: the plain rust:1.95 tag follows
# Debian's newest release, whose glibc is newer than the bookworm-slim runtime's, and a binary built
# there would not start here.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# rust-toolchain.toml pins the toolchain; rustup installs it (and its components) if the image's
# differs. The cache mounts keep the registry and target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin spirekeep \
    && install -D -m 0755 target/release/spirekeep /out/spirekeep

FROM debian:bookworm-slim
# ca-certificates: TLS to object stores and to PostgreSQL/MySQL servers with sslmode=require/verify-*.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root UID/GID (65532, as in distroless "nonroot"), matching runAsUser in
# deploy/kubernetes. SQLite sidecars must instead run as the SPIRE server's user (see its README).
RUN groupadd --system --gid 65532 spirekeep \
    && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/spirekeep --create-home \
       --shell /usr/sbin/nologin spirekeep
COPY --from=build /out/spirekeep /usr/local/bin/spirekeep
USER 65532:65532
WORKDIR /var/lib/spirekeep
# `spirekeep agent --listen 0.0.0.0:9898` serves /metrics and /healthz here.
EXPOSE 9898
ENTRYPOINT ["/usr/local/bin/spirekeep"]
CMD ["--help"]
