#!/usr/bin/env bash
# Runs inside a kernel matrix VM as PID 1, on the host's root (read-only, under a tmpfs
# overlay): readies the system (mounts, this kernel's modules), then runs the plan the host
# wrote to OUT/plan: the load-and-attach smoke test, then each suite ("name=dir command...",
# run in dir). Writes OUT/<step>.log and OUT/<step>.rc, and powers off.
set -uo pipefail
out=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export CI=true RUST_BACKTRACE=1 TMPDIR=/tmp LANG=C.UTF-8
# shellcheck source=/dev/null
source "$out/plan"

power_off() {
  sync
  echo o >/proc/sysrq-trigger
  sleep 60
}
trap power_off EXIT

ready_system() {
  mount -t proc proc /proc
  mount -t sysfs sysfs /sys
  mount -t tmpfs tmpfs /run
  # A fresh /tmp, unless the checkout is in it (a CI clone under /tmp): the host's /tmp,
  # under the overlay, is writable as it is.
  case "$agent_bin" in
    /tmp/*) ;;
    *) mount -t tmpfs tmpfs /tmp ;;
  esac
  mkdir -p /dev/pts /dev/shm
  mount -t devpts devpts /dev/pts
  mount -t tmpfs tmpfs /dev/shm
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
  mount -t bpf bpf /sys/fs/bpf
  mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
  local ver
  ver=$(uname -r)
  mkdir -p "/lib/modules/$ver"
  mount --bind "$modules" "/lib/modules/$ver"
  # No kmod here: the kernel's own module requests (nftables, ...) go to busybox.
  printf '#!/bin/sh\nexec /bin/busybox modprobe "$@"\n' >/run/modprobe
  chmod +x /run/modprobe
  echo /run/modprobe >/proc/sys/kernel/modprobe
  local m
  for m in veth dummy sch_ingress cls_bpf; do
    grep -q "/$m.ko:" "/lib/modules/$ver/modules.dep" && busybox modprobe "$m"
  done
  ip link set lo up
  # BPF_PROG_TEST_RUN's packets go on the first interface other than loopback (the VM has
  # no network card): nothing is sent on it.
  ip link add kmatrix0 type dummy
  ip link set kmatrix0 up
  hostname kmatrix
  echo "$ver" >"$out/kernel"
}

# The agent on a cgroup of its own and a veth, with RUST_LOG=debug for the per-program
# load lines; `status` while it runs says what is attached, a probe from the cgroup to a
# denied address fails, and SIGTERM detaches everything.
smoke() {
  local cg=/sys/fs/cgroup/kmatrix-smoke pins=/run/kmatrix-bpf/egress-enforcer
  local policy=/run/kmatrix-policy.yaml rc=0 agent i
  mkdir -p "$cg" /run/kmatrix-bpf
  ip link add kmx0 type veth peer name kmx1
  ip link set kmx0 up
  ip link set kmx1 up
  ip addr add 198.51.100.254/24 dev kmx0
  printf 'mode: enforce\nallow:\n  - cidr: 203.0.113.0/24\n' >"$policy"
  RUST_LOG=debug "$agent_bin" run --config "$policy" --cgroup "$cg" --interface kmx0 \
    --listen 127.0.0.1:0 --pin-root "$pins" >"$out/smoke.events" 2>"$out/smoke.agent" &
  agent=$!
  # Ready once it says so: "attached: ..." follows the last attachment (the TC programs
  # are attached after the cgroup's, and verified slowly under emulation).
  for ((i = 0; i < 600; i++)); do
    grep -q "INFO  egress_agent::run\] attached: " "$out/smoke.agent" && break
    kill -0 "$agent" 2>/dev/null || break
    sleep 0.5
  done
  "$agent_bin" status --pin-root "$pins" >"$out/smoke.status" 2>&1
  cat "$out/smoke.status"
  grep -q "^attached   cgroup" "$out/smoke.status" || { echo "not attached"; rc=1; }
  if grep -q "kmx0" "$out/smoke.status"; then
    echo TCX >"$out/tc-path"
  elif tc filter show dev kmx0 egress | grep -q bpf; then
    echo "netlink clsact" >"$out/tc-path"
  else
    echo "TC programs not attached to kmx0"
    rc=1
  fi
  # Denied: a datagram from the cgroup to an address the policy does not allow fails with
  # EPERM at once.
  "$probe_bin" --cgroup "$cg" udp-send 198.51.100.1 53 >"$out/smoke.probe" 2>&1
  cat "$out/smoke.probe"
  grep -qi "eperm\|not permitted" "$out/smoke.probe" || { echo "denied probe not refused"; rc=1; }
  kill -TERM "$agent"
  wait "$agent" || { echo "agent exited with $?"; rc=1; }
  cat "$out/smoke.agent"
  local links
  links=$(bpftool -j link show | jq --argjson id "$(stat -c %i "$cg")" '[.[] | select(.cgroup_id == $id)] | length')
  if [ "$links" != 0 ] || tc filter show dev kmx0 egress | grep -q bpf; then
    echo "left attached after SIGTERM: $links cgroup links; TC: $(tc filter show dev kmx0 egress)"
    rc=1
  fi
  ip link del kmx0
  rmdir "$cg"
  return "$rc"
}

ready_system >"$out/ready.log" 2>&1
echo $? >"$out/ready.rc"
smoke >"$out/smoke.log" 2>&1
echo $? >"$out/smoke.rc"
for suite in "${suites[@]}"; do
  name=${suite%%=*}
  read -r -a cmd <<<"${suite#*=}"
  (cd "${cmd[0]}" && timeout -k 10 "$suite_timeout" "${cmd[@]:1}") >"$out/$name.log" 2>&1
  echo $? >"$out/$name.rc"
done
