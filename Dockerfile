# syntax=docker/dockerfile:1
# The egress-agent image, for deploy/. From the repository root:
#   docker build --build-arg EGRESS_COMMIT=$(git rev-parse --short=12 HEAD) \
#     -t ghcr.io/egress-enforcer/egress-agent:0.1.0 .
# `RUN --mount=type=cache` below needs BuildKit (Docker's default builder since 23.0, or
# DOCKER_BUILDKIT=1; buildx) or podman/buildah; the legacy Docker builder rejects it.
# Without a registry, scripts/image-check.sh --full builds this file with podman on
# stand-in base images and runs the result the way deploy/ does.
# Multi-arch (AKS has arm64 node pools too):
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/egress-agent:TAG --push .
# The build stage uses the same toolchains the repository is built and tested with; the
# runtime image has only glibc and libgcc, all the agent links against. This repository's
# CI builds no image from this file (scripts/image-check.sh checks an image made from the
# binary CI built, on the same runtime base): build it and run image-check --full before
# you push.
#
# Base images by digest: a tag can be moved to other content, a digest cannot. No registry
# was reachable where this file was written, so the defaults below are tags and the digests
# are yours to fill in: look them up (`skopeo inspect --format '{{.Digest}}'
# docker://gcr.io/distroless/cc-debian12:latest`, or `crane digest ...`) and either replace
# the defaults with `NAME@sha256:<digest>` or pass them:
#   --build-arg BUILD_BASE=debian:bookworm-slim@sha256:<digest>
#   --build-arg RUNTIME_BASE=gcr.io/distroless/cc-debian12@sha256:<digest>
ARG BUILD_BASE=debian:bookworm-slim
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:latest

# ---- build ---------------------------------------------------------------------------------
FROM ${BUILD_BASE} AS build

# rustup-init 1.29.0 and its SHA-256 per architecture (as the official rust images pin it).
ARG RUSTUP_VERSION=1.29.0
ARG RUST_STABLE=1.95.0
# The nightly the kernel programs are built with: rustc 1.97.0-nightly (e50aa6fba 2026-05-19),
# LLVM 22.1.4 (README "Toolchain notes"). rustup names a nightly by its publication date, the
# day after the commit date rustc reports, hence 05-20; the build checks the commit below.
ARG RUST_NIGHTLY=nightly-2026-05-20
ARG RUST_NIGHTLY_RUSTC="rustc 1.97.0-nightly (e50aa6fba 2026-05-19)"
ARG BPF_LINKER_VERSION=0.13.0

ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    RUSTUP_AUTO_INSTALL=0

# llvm-22-dev for bpf-linker (LLVM 22 is the nightly's LLVM major). Debian 12 carries it in
# bookworm-security (1:22.1.8-1~deb12u1), which the debian image's sources include; the
# LLVM of bookworm main (14-16) is too old. Should that package ever go, apt.llvm.org's
# llvm-toolchain-bookworm-22 repository provides the same llvm-22-dev. Not version-pinned:
# the security suite keeps only its newest build, so a pin would break with every update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl gcc libc6-dev llvm-22-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A CA certificate (PEM) the downloads below must trust besides the system's, e.g. a
# TLS-intercepting proxy's: --build-arg EXTRA_CA_CERT="$(cat proxy-ca.pem)". curl, rustup
# and cargo all read the system store it is added to. Only in the build stage.
ARG EXTRA_CA_CERT=""
RUN if [ -n "${EXTRA_CA_CERT}" ]; then \
      printf '%s\n' "${EXTRA_CA_CERT}" > /usr/local/share/ca-certificates/extra-ca.crt \
      && update-ca-certificates; \
    fi

# Stable for the agent (the default toolchain; the repository pins none), the dated nightly
# with rust-src for the kernel programs (-Z build-std=core). aya-build runs
# `rustup run nightly ...`, and rustup refuses `toolchain link nightly`, so the dated
# nightly also answers to `nightly` through a symlink in the toolchains directory.
RUN case "$(dpkg --print-architecture)" in \
      amd64) host=x86_64-unknown-linux-gnu; \
             sha=4acc9acc76d5079515b46346a485974457b5a79893cfb01112423c89aeb5aa10 ;; \
      arm64) host=aarch64-unknown-linux-gnu; \
             sha=9732d6c5e2a098d3521fca8145d826ae0aaa067ef2385ead08e6feac88fa5792 ;; \
      *) echo "unsupported architecture: $(dpkg --print-architecture)" >&2; exit 1 ;; \
    esac \
 && curl --proto '=https' --tlsv1.2 -fsSL -o /tmp/rustup-init \
      "https://static.rust-lang.org/rustup/archive/${RUSTUP_VERSION}/${host}/rustup-init" \
 && echo "${sha}  /tmp/rustup-init" | sha256sum -c - \
 && chmod +x /tmp/rustup-init \
 && /tmp/rustup-init -y --no-modify-path --profile minimal \
      --default-toolchain "${RUST_STABLE}" --default-host "${host}" \
 && rm /tmp/rustup-init \
 && rustup toolchain install "${RUST_NIGHTLY}" --profile minimal --component rust-src \
 && ln -s "${RUST_NIGHTLY}-${host}" "${RUSTUP_HOME}/toolchains/nightly-${host}" \
 && rustc --version | grep -F "rustc ${RUST_STABLE} " \
 && rustup run nightly rustc --version | grep -F "${RUST_NIGHTLY_RUSTC}"

# bpf-linker 0.13.0 defaults to LLVM 23; build it against LLVM 22 (as scripts/setup.sh does).
RUN PATH="/usr/lib/llvm-22/bin:${PATH}" cargo install bpf-linker \
      --version "${BPF_LINKER_VERSION}" --locked --no-default-features --features llvm-22 \
 && rm -rf "${CARGO_HOME}/registry"

WORKDIR /src
COPY . .
# The commit `--version` and /metrics report (the context has no .git).
ARG EGRESS_COMMIT=unknown
# build.rs builds the kernel programs with the nightly and bpf-linker and embeds them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p egress-agent \
 && install -D -m 0755 target/release/egress-agent /out/egress-agent

# ---- runtime -------------------------------------------------------------------------------
# distroless/cc: glibc and libgcc_s of Debian 12, the build stage's, and nothing else (no
# shell). It runs as root: the agent needs root with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN
# (deploy/components/least-privilege) or a privileged container. RUNTIME_BASE: see above.
FROM ${RUNTIME_BASE}
LABEL org.opencontainers.image.title="egress-agent" \
      org.opencontainers.image.description="eBPF node egress enforcer for Kubernetes nodes" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=build /out/egress-agent /egress-agent
ENTRYPOINT ["/egress-agent"]
