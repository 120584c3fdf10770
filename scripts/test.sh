#!/usr/bin/env bash
# The whole test suite: formatting, lints (userspace and kernel crate), unit tests, the
# BPF_PROG_TEST_RUN verdict tests, the image check's fast part, the end-to-end tests in
# network namespaces and a short run of each fuzz target.
# Needs root; with CI=true nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== deploy/ manifests (kustomize, Kubernetes schemas, the shipped policy)" >&2
scripts/validate-manifests.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== clippy (userspace)" >&2
cargo clippy --workspace --exclude egress-ebpf --all-targets -- -D warnings
echo "== clippy (kernel crate, nightly, BPF target)" >&2
cargo +nightly clippy -p egress-ebpf --target bpfel-unknown-none -Z build-std=core --release \
  -- -D warnings
echo "== tests" >&2
# The end-to-end tests run target/debug/egress-agent: build it first.
cargo build -p egress-agent
echo "== image check (an image of that binary, run as deploy/ runs it)" >&2
scripts/image-check.sh
cargo test --workspace --exclude egress-ebpf "$@"
echo "== fuzz (each target 20 s from its seed corpus)" >&2
scripts/fuzz.sh 20
# The kernel programs on kernels around those nodes run (5.10, 6.1, 6.12 under qemu; the
# end-to-end suites too on 6.1, before TCX): about 15 minutes on 2 cores.
# EGRESS_KERNEL_MATRIX=skip leaves it out of a local run.
if [ "${EGRESS_KERNEL_MATRIX:-}" != skip ]; then
  echo "== kernel matrix" >&2
  scripts/kernel-matrix.sh --e2e=6.1
fi
