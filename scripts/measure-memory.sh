#!/usr/bin/env bash
# Measures the memory an agent is charged for, as a pod's memory limit sees it: the agent
# runs in a memory cgroup of its own (cgroup v2 `memory.current`, or v1 `memory.usage_in_bytes`
# on a hybrid host), first on an empty pin root (it creates the maps: their kernel memory is
# charged to its cgroup, and stays there after it exits), then a second one that adopts the
# pins. The policy defaults to deploy/base/policy.yaml (dns.max_ips at its default).
# Needs root; touches only a temp bpffs, a test cgroup and memory cgroups of its own.
#   scripts/measure-memory.sh [POLICY]
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY="${1:-deploy/base/policy.yaml}"
AGENT="${AGENT:-target/debug/egress-agent}"
[ -x "$AGENT" ] || { echo "measure-memory: build $AGENT first (cargo build -p egress-agent)" >&2; exit 1; }
PORT=19979

CG2="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)"
if grep -qw memory "$CG2/cgroup.controllers" 2>/dev/null; then
  MEMROOT="$CG2" CURRENT=memory.current PEAK=memory.peak
  echo +memory > "$CG2/cgroup.subtree_control"
else
  MEMROOT="$(awk '$3 == "cgroup" && $4 ~ /(^|,)memory(,|$)/ { print $2; exit }' /proc/mounts)"
  CURRENT=memory.usage_in_bytes PEAK=memory.max_usage_in_bytes
fi
[ -n "$MEMROOT" ] || { echo "measure-memory: no memory cgroup controller" >&2; exit 1; }

TAG="egress-measure-$$"
TARGET="$CG2/$TAG-target"
PINS="$(mktemp -d)"
cleanup() {
  "$AGENT" uninstall --pin-root "$PINS/egress" >/dev/null 2>&1 || true
  umount "$PINS" 2>/dev/null || true
  rmdir "$PINS" "$TARGET" "$MEMROOT/$TAG-first" "$MEMROOT/$TAG-second" 2>/dev/null || true
}
trap cleanup EXIT
mkdir "$TARGET"
mount -t bpf bpf "$PINS"

mib() { awk '{ printf "%.1f MiB", $1 / 1048576 }' "$1"; }

# measure NAME: starts an agent in memory cgroup NAME, reports once it is ready and after it
# exits (--on-exit keep: the pins stay for the next one).
measure() {
  local cg="$MEMROOT/$TAG-$1"
  mkdir "$cg"
  bash -c "echo \$\$ > '$cg/cgroup.procs'; exec '$AGENT' run --config '$POLICY' --cgroup '$TARGET' \
    --pin-root '$PINS/egress' --listen 127.0.0.1:$PORT --on-exit keep" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
    sleep 0.5
  done
  sleep 2
  echo "$1 agent, running: $(mib "$cg/$CURRENT") (peak $(mib "$cg/$PEAK"))"
  kill "$pid"
  wait "$pid" || true
  sleep 1
  echo "$1 agent, exited:  $(mib "$cg/$CURRENT") still charged to its cgroup"
}

echo "policy $POLICY; memory cgroups under $MEMROOT ($CURRENT)"
measure first
measure second
