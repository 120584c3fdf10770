#!/usr/bin/env bash
# Installs what building and testing the enforcer needs, skipping what is already there,
# then builds the agent. Idempotent: a warm machine takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs packages; the agent needs CAP_BPF and CAP_NET_ADMIN)" >&2
  exit 1
fi

# Debian packages: LLVM 22 for bpf-linker (the nightly's LLVM major), iproute2/bpftool for
# namespaces and inspection, util-linux (unshare, nsenter, setpriv) and procps (sysctl) for
# the attack tests, and the real peers the tests use (dnsmasq, dig, curl).
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages llvm-22-dev iproute2 bpftool util-linux procps dnsmasq-base dnsutils curl \
  iperf3 nftables

# The kernel side builds with the nightly toolchain and needs core's source.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker 0.13.0 defaults to LLVM 23; build it against Debian's LLVM 22.
if ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
  log "building bpf-linker 0.13.0 against LLVM 22 (about a minute)"
  PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version 0.13.0 --locked \
    --no-default-features --features llvm-22
fi

# cargo-fuzz, for the fuzz targets' short runs in scripts/test.sh (scripts/fuzz.sh).
if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13\.2'; then
  log "installing cargo-fuzz 0.13.2 (a few minutes)"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

log "building egress-agent and egress-probe"
cargo build --release -p egress-agent -p egress-tests --bins
log "ready: target/release/egress-agent, target/release/egress-probe"
