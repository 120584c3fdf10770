#!/usr/bin/env bash
# The enforcer against what a platform team would run instead, in one run on one machine:
# TCP throughput (iperf3) and connection rate from a client namespace, inside a cgroup of
# the benchmark's own, to a server namespace, with no filter (the baseline, measured again
# at every size), with egress-agent enforcing N allowed addresses, and with nftables (a
# set), iptables + ipset and iptables with one rule per address holding the same N
# addresses. Every figure is also given as a ratio to the baseline of the same size
# (part "network"). Small packets: UDP datagrams of 64 bytes per second, on the sender's
# cgroup path and forwarded through a router namespace with the agent's TC program on its
# link, against the same peers (part "udp"). Then the per-packet cost of the kernel program alone, through
# BPF_PROG_TEST_RUN (`egress-bench verdict`, part "verdict"), and the agent itself: time
# from start to enforcing, RSS and CPU idle with 1k name patterns and 100,000 learned
# addresses, and DNS answers per second learned under a flood (part "agent"). Part "load"
# loads N addresses into each peer and nothing else: the agent from the YAML and from a
# `cidrs_from` list, nftables and ipset, with their load time and memory.
#
# Everything it creates (namespaces, cgroup, processes, files) is removed when it ends,
# also on errors and Ctrl-C. Documentation addresses only; traffic never leaves the
# benchmark's namespaces; the agent is attached to the benchmark's child cgroup, never to the root.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benches/run.sh [--quick] [--parts "network udp verdict agent load"] [--sizes "10 1000 ..."]
                      [--seconds S] [--reps R] [--idle S] [--out FILE] [--keep DIR]
                      [--profile] [--no-build]

  --quick        smoke run: sizes 10 and 1000, 2 s per measurement, one run each, idle 3 s,
                 a short verdict run (a few minutes on a warm machine)
  --sizes LIST   allowed-address counts (default: 10 1000 65536 100000 1000000, and
                 10 100000 1000000 for part udp; the agent's CIDR map holds 2097152)
  --seconds S    length of each iperf3 run, connection-rate run and UDP flood (default 5)
  --reps R       iperf3 runs or UDP floods per measurement; the median is reported (default 3)
  --parts LIST   which parts to run (default: network udp verdict agent; "load" times
                 loading each size into each peer, with the agent's peak and steady RSS)
  --idle S       seconds over which the agent's idle CPU is measured (default 30)
  --out FILE     also write the report (Markdown) to FILE
  --no-build     use the binaries in target/release as they are
  --keep DIR     keep the work files (policies, logs, raw results) in DIR
  --profile      record the agent with `perf record -g` during the fastest DNS flood and add
                 the top of `perf report` to the report (needs perf)

Needs root. Installs iperf3, nftables, ipset, iptables and jq with apt if missing.
EOF
}

quick=0
sizes="10 1000 65536 100000 1000000"
seconds=5
reps=3
idle=30
parts="network udp verdict agent"
out=""
keep_dir=""
sizes_given=0
profile=0
build=1
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --quick) quick=1 ;;
    --sizes)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      sizes=$2
      sizes_given=1
      shift
      ;;
    --seconds)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      seconds=$2
      shift
      ;;
    --reps)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      reps=$2
      shift
      ;;
    --out)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      out=$(realpath -m -- "$2")
      shift
      ;;
    --parts)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      parts=$2
      shift
      ;;
    --idle)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      idle=$2
      shift
      ;;
    --no-build) build=0 ;;
    --profile) profile=1 ;;
    --keep)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      keep_dir=$(realpath -m -- "$2")
      shift
      ;;
    *)
      echo "run.sh: unknown argument: $1" >&2
      usage >&2
      exit 2
      ;;
  esac
  shift
done
omit=1
if [ "$quick" = 1 ]; then
  [ "$sizes_given" = 1 ] || sizes="10 1000"
  seconds=2
  reps=1
  omit=0
  idle=3
fi
for p in $parts; do
  case $p in network | udp | verdict | agent | load) ;; *) echo "run.sh: unknown part $p" >&2; exit 2 ;; esac
done
has_part() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
case $idle in '' | *[!0-9]* | 0) echo "run.sh: --idle must be a positive number" >&2; exit 2 ;; esac
[ "$idle" -le 300 ] || { echo "run.sh: --idle must be at most 300" >&2; exit 2; }
case $seconds in '' | *[!0-9]*) echo "run.sh: --seconds must be a whole number" >&2; exit 2 ;; esac
case $reps in '' | *[!0-9]* | 0) echo "run.sh: --reps must be a positive number" >&2; exit 2 ;; esac
if [ "$seconds" -lt 1 ] || [ "$seconds" -gt 60 ]; then
  echo "run.sh: --seconds must be 1..60" >&2
  exit 2
fi
for n in $sizes; do
  case $n in '' | *[!0-9]* | 0) echo "run.sh: bad size $n" >&2; exit 2 ;; esac
  [ "$n" -le 2000000 ] || { echo "run.sh: sizes above 2000000 are not supported" >&2; exit 2; }
done

cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }
die() {
  printf 'run.sh: %s\n' "$*" >&2
  exit 1
}
now_ns() {
  local t=${EPOCHREALTIME/./}
  echo "${t}000"
}
ms_since() { echo $((($(now_ns) - $1) / 1000000)); }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, cgroups, eBPF, nftables)"

# --- What the benchmark needs ---------------------------------------------------------------

# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages iperf3 nftables ipset iptables jq iproute2 bpftool
if [ "$build" = 1 ]; then
  log "building egress-agent and egress-bench (release)"
  cargo build --release -p egress-agent -p egress-bench
fi
agent=$PWD/target/release/egress-agent
bench=$PWD/target/release/egress-bench
if [ ! -x "$agent" ] || [ ! -x "$bench" ]; then
  die "missing $agent or $bench (drop --no-build)"
fi

cgroot=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
if [ -z "$cgroot" ] || [ ! -d "$cgroot" ]; then
  die "no cgroup2 mount in /proc/mounts"
fi

# --- Names, addresses, and the guard that removes everything -----------------------------

id=$$
ns_c=egb-c-$id
ns_s=egb-s-$id
cg=$cgroot/egress-bench-$id
# A sibling the agent is never attached to: the agent's rows alternate their runs between
# the two, for a ratio to a baseline taken in the same minute (see `measure_paired`).
cg_free=$cgroot/egress-bench-$id-free
# Restored on exit: `prog_cost` turns the kernel's per-program run statistics on briefly.
bpf_stats_was=$(cat /proc/sys/kernel/bpf_stats_enabled)
work=$(mktemp -d /tmp/egress-bench.XXXXXX)
# The agent's own pin root on a bpffs it mounts here, away from /sys/fs/bpf.
mkdir "$work/bpf"
# The topology's link, then the traffic target: the LAST address of every allowed list
# (`egress-bench addresses N` ends with it), so a rule list is walked to its end.
link_c=2001:db8:ffff::1
link_s=2001:db8:ffff::2
target=2001:db8::10
# On the server too, but in no allowed list: checks that each filter really filters.
denied=2001:db8:ffff:1::20
# IPv4, for part udp's IPv4 rows (see `udp_v4_setup`): the client's link, the target and
# the denied address.
link_c4=203.0.113.1
link_s4=203.0.113.2
target4=203.0.113.100
denied4=203.0.113.101
iperf_port=5201
conn_port=5301
conn_ports=8
pids=()

running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Stops our child $1: SIGTERM, SIGKILL after $2 seconds (default 3), then reaps it.
stop_pid() {
  local pid=$1 grace=${2:-3} i
  running "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 20; i++)); do
    running "$pid" || break
    sleep 0.05
  done
  running "$pid" && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

# Forgets a child that has been stopped and reaped, so its pid, once reused by an
# unrelated process, is never signalled.
forget_pid() {
  local keep=() pid
  for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  pids=("${keep[@]}")
}

cleanup() {
  local rc=$? pid i c ns
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do stop_pid "$pid" 2; done
  for c in "$cg" "$cg_free"; do
    [ -d "$c" ] || continue
    echo 1 >"$c/cgroup.kill" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      [ -z "$(cat "$c/cgroup.procs" 2>/dev/null)" ] && break
      sleep 0.05
    done
    for ((i = 0; i < 100; i++)); do
      rmdir "$c" 2>/dev/null && break
      sleep 0.05
    done
    [ -d "$c" ] && echo "run.sh: could not remove cgroup $c" >&2
  done
  ip netns delete "$ns_c" 2>/dev/null || true
  ip netns delete "$ns_s" 2>/dev/null || true
  for ns in "${ns_t:-}" "${ns_tf:-}" "${ns_r:-}"; do [ -n "$ns" ] && ip netns delete "$ns" 2>/dev/null || true; done
  echo "$bpf_stats_was" >/proc/sys/kernel/bpf_stats_enabled 2>/dev/null || true
  [ -d "$work/bpf/egress-enforcer" ] && "$agent" uninstall --pin-root "$work/bpf/egress-enforcer" >/dev/null
  mountpoint -q "$work/bpf" && umount -l "$work/bpf"
  if [ -n "$keep_dir" ]; then
    mkdir -p "$keep_dir" && cp -r "$work/." "$keep_dir/" || echo "run.sh: could not keep $work in $keep_dir" >&2
  fi
  rm -rf -- "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case $cg in "$cgroot"/egress-bench-*) ;; *) die "refusing cgroup $cg" ;; esac
mkdir "$cg" "$cg_free"

# Runs a command in the client namespace, inside cgroup $1 (joined before `ip netns exec`,
# which hides the cgroup2 mount behind a fresh /sys).
in_cgroup() {
  # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
  sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec ip netns exec "$@"' sh "$1" "$ns_c" "${@:2}"
}
# ... inside the benchmark cgroup, the one the agent is attached to.
in_client() { in_cgroup "$cg" "$@"; }

log "topology: $ns_c ($link_c) <-> $ns_s ($link_s, $target), cgroup $cg"
ip netns add "$ns_c"
ip netns add "$ns_s"
ip -n "$ns_c" link set lo up
ip -n "$ns_s" link set lo up
ip link add egbc$id netns "$ns_c" type veth peer name egbs$id netns "$ns_s"
ip -n "$ns_c" link set "egbc$id" up
ip -n "$ns_s" link set "egbs$id" up
ip -n "$ns_c" -6 addr add "$link_c/64" dev "egbc$id" nodad
ip -n "$ns_s" -6 addr add "$link_s/64" dev "egbs$id" nodad
ip -n "$ns_s" -6 addr add "$target/128" dev lo nodad
ip -n "$ns_s" -6 addr add "$denied/128" dev lo nodad
ip -n "$ns_c" -6 route add default via "$link_s"
ip netns exec "$ns_s" iperf3 -s -B "$target" -p "$iperf_port" >"$work/iperf3-server.log" 2>&1 &
pids+=($!)
ip netns exec "$ns_s" "$bench" serve "$target" "$conn_port" "$conn_ports" >"$work/serve.log" 2>&1 &
pids+=($!)
ip netns exec "$ns_s" "$bench" serve "$denied" "$conn_port" 1 >"$work/serve-denied.log" 2>&1 &
pids+=($!)
for ((i = 0; i < 100; i++)); do
  grep -q listening "$work/serve.log" && grep -q listening "$work/serve-denied.log" &&
    ip netns exec "$ns_s" ss -Hltn "sport = :$iperf_port" | grep -q . && break
  sleep 0.05
done
# The link carries traffic once a connection from the client gets through (carrier and
# neighbour discovery settle asynchronously).
reachable() {
  ip netns exec "$ns_c" "$bench" conn-rate "$1" "$conn_port" 1 --seconds 0.2 --threads 1 \
    --timeout-ms 200 2>/dev/null | jq -e '.connections > 0' >/dev/null
}
for ((i = 0; i < 50; i++)); do
  reachable "$target" && reachable "$denied" && break
  sleep 0.1
done
if ! reachable "$target" || ! reachable "$denied"; then
  die "the topology carries no traffic"
fi

# --- Measurements ----------------------------------------------------------------------------

# One line per (size, peer): size peer load_ms gbit conn_per_s conn_failed enforced spread note
results=$work/results.tsv
: >"$results"
paired=$work/paired.tsv
: >"$paired"
progcost=$work/progcost.tsv
: >"$progcost"

median() {
  sort -g | awk '{ v[NR] = $1 } END { if (!NR) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# One iperf3 run from cgroup $1: Gbit/s (0 if it failed).
iperf_once() {
  local json
  if json=$(in_cgroup "$1" timeout $((seconds + 20)) iperf3 -6 -c "$target" -p "$iperf_port" \
    -t "$seconds" -O "$omit" -J 2>/dev/null); then
    jq -r '.end.sum_received.bits_per_second / 1e9' <<<"$json"
  else
    echo 0
  fi
}

# One connection-rate run from cgroup $1: "conn_per_s failed".
conn_once() {
  local conn
  conn=$(in_cgroup "$1" timeout $((seconds + 20)) "$bench" conn-rate "$target" "$conn_port" \
    "$conn_ports" --seconds "$seconds" --threads 2 --timeout-ms 1000 2>>"$work/conn.err") ||
    conn='{"per_sec":0,"failed":-1}'
  jq -r '"\(.per_sec) \(.failed)"' <<<"$conn"
}

# Min-max of the numbers on stdin, for the report; $1: their printf format (default %.2f).
spread() { sort -g | awk -v f="${1:-%.2f}" 'NR == 1 { lo = $1 } { hi = $1 } END { printf f "-" f, lo, hi }'; }

# Whether a connection to the denied address ($2, default: the IPv6 one) fails from cgroup
# $1 (default: the benchmark's): a filter that filters lets none through.
enforced() {
  in_cgroup "${1:-$cg}" timeout 10 "$bench" conn-rate "${2:-$denied}" "$conn_port" 1 --seconds 0.5 \
    --threads 1 --timeout-ms 200 2>/dev/null | jq -r 'if .connections == 0 then "yes" else "no" end' ||
    echo error
}

# Throughput (Gbit/s, median of $reps iperf3 runs), connection rate (conn/s) and whether a
# connection to the denied address fails; prints "gbit conn failed enforced spread".
measure() {
  local r gbits=() conn
  for ((r = 0; r < reps; r++)); do gbits+=("$(iperf_once "$cg")"); done
  conn=$(conn_once "$cg")
  printf '%s %s %s %s\n' "$(printf '%s\n' "${gbits[@]}" | median)" "$conn" "$(enforced)" \
    "$(printf '%s\n' "${gbits[@]}" | spread)"
}

# `measure` for the agent of size $1, each run paired with one from the sibling cgroup the
# agent is not attached to, taken right before or after it (the order alternates). The
# baseline row of a size is minutes older than the peers' rows, and the machine drifts by
# more than the targets in that time; a pair's ratio does not. Appends "size free_gbit
# agent_gbit gbit_ratio ratio_spread free_conn agent_conn conn_ratio free_filtered" to
# $paired.
measure_paired() {
  local r g_free=() g_agent=() ratios=() c_free=() c_agent=() conn failed a b
  for ((r = 0; r < reps; r++)); do
    if ((r % 2)); then
      a=$(iperf_once "$cg"); b=$(iperf_once "$cg_free")
    else
      b=$(iperf_once "$cg_free"); a=$(iperf_once "$cg")
    fi
    g_agent+=("$a")
    g_free+=("$b")
    ratios+=("$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.4f", a / b; else print 0 }')")
  done
  # Connection rate: the agent's runs right before and after one free run.
  read -r conn failed < <(conn_once "$cg")
  c_agent+=("$conn")
  c_free+=("$(conn_once "$cg_free" | cut -d' ' -f1)")
  read -r conn _ < <(conn_once "$cg")
  c_agent+=("$conn")
  conn=$(printf '%s\n' "${c_agent[@]}" | median)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" \
    "$(printf '%s\n' "${g_free[@]}" | median)" "$(printf '%s\n' "${g_agent[@]}" | median)" \
    "$(printf '%s\n' "${ratios[@]}" | median)" "$(printf '%s\n' "${ratios[@]}" | spread)" \
    "${c_free[0]}" "$conn" \
    "$(awk -v a="$conn" -v b="${c_free[0]}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }')" \
    "$(enforced "$cg_free")" >>"$paired"
  printf '%s %s %s %s %s\n' "$(printf '%s\n' "${g_agent[@]}" | median)" "$conn" "$failed" \
    "$(enforced)" "$(printf '%s\n' "${g_agent[@]}" | spread)"
}

# The ids of the programs attached to the benchmark cgroup.
cgroup_prog_ids() { bpftool cgroup show "$cg" -j | jq -r '.[].id'; }

# "name run_time_ns run_cnt" of each program whose id function $1 prints.
prog_stats() {
  local id
  for id in $("$1"); do
    bpftool prog show id "$id" -j | jq -r '"\(.name) \(.run_time_ns // 0) \(.run_cnt // 0)"'
  done
}

# The cost of the programs whose ids function $1 prints while the command after it runs:
# `kernel.bpf_stats_enabled` makes the kernel count each program's runs and run time. On
# for this run only (it adds two clock reads to every run), so the paired runs do not pay
# for it. Prints "program runs_per_s ns_per_run percent_of_a_core" lines, per second of
# the command's own run time.
programs_cost() {
  local ids=$1 before after t0 t1
  shift
  echo 1 >/proc/sys/kernel/bpf_stats_enabled
  before=$(prog_stats "$ids")
  t0=$(now_ns)
  "$@" >/dev/null
  t1=$(now_ns)
  after=$(prog_stats "$ids")
  echo "$bpf_stats_was" >/proc/sys/kernel/bpf_stats_enabled
  awk -v ms="$(((t1 - t0) / 1000000))" '
    NR == FNR { t[$1] = $2; c[$1] = $3; next }
    { dt = $2 - t[$1]; dc = $3 - c[$1]; s = ms / 1000
      printf "%s\t%.0f\t%.0f\t%.2f\n", $1, dc / s, (dc > 0 ? dt / dc : 0), dt / s / 1e7 }
  ' <(echo "$before") <(echo "$after")
}

# The agent's programs' own cost during one iperf3 run from the enforced cgroup, for size
# $1. Appends "size program runs_per_s ns_per_run percent_of_a_core" to $progcost.
prog_cost() { programs_cost cgroup_prog_ids iperf_once "$cg" | sed "s/^/$1\t/" >>"$progcost"; }

record() { # size peer load_ms "measure output" note...
  local size=$1 peer=$2 load=$3 m=$4
  shift 4
  printf '%s\t%s\t%s\t%s\t%s\n' "$size" "$peer" "$load" "${m// /$'\t'}" "$*" >>"$results"
  log "$size $peer: load ${load} ms, $m ${*}"
}

# Unusable peers are not tried at larger sizes.
declare -A unusable=()
# Loading longer than this makes a peer unusable.
load_limit=60

# What part "udp" runs the agent under (`nsenter` into the router namespace) and adds
# (`--interface`) on its TC path; empty elsewhere.
agent_prefix=()
agent_extra=()
# Starts the agent on policy $1; sets agent_pid, and attach_ms (start to the `attached:`
# line) or agent_error. Stderr lines are stamped with the time they arrived. Metrics are
# served on a free port: another agent on this machine may hold the default one.
start_agent() {
  local policy=$1 log_file=$2 t0 i line
  agent_error=""
  attach_ms=""
  t0=$(now_ns)
  RUST_LOG=info,egress_agent::loader=debug "${agent_prefix[@]}" "$agent" run --config "$policy" \
    --mode enforce --cgroup "$cg" --pin-root "$work/bpf/egress-enforcer" --listen 127.0.0.1:0 "${agent_extra[@]}" \
    >"$work/agent.out" 2> >(while IFS= read -r line; do printf '%s000 %s\n' "${EPOCHREALTIME/./}" "$line"; done >"$log_file") &
  agent_pid=$!
  pids+=("$agent_pid")
  for ((i = 0; i < load_limit * 50; i++)); do
    if line=$(grep -m1 ' attached: ' "$log_file" 2>/dev/null); then
      attach_ms=$(((${line%% *} - t0) / 1000000))
      start_phases "$log_file" "$t0"
      return 0
    fi
    if ! running "$agent_pid"; then
      wait "$agent_pid" 2>/dev/null || true
      forget_pid "$agent_pid"
      sleep 0.2 # let the stamping reader drain
      agent_error=$(grep -m1 'egress-agent:' "$log_file" | cut -d' ' -f2- || true)
      agent_error="${agent_error:-exited} after $(ms_since "$t0") ms"
      return 1
    fi
    sleep 0.02
  done
  agent_error="not attached after ${load_limit} s"
  stop_pid "$agent_pid" 5
  forget_pid "$agent_pid"
  return 1
}

# Milliseconds in a Rust Duration's Debug form (1.2s, 228.3ms, 950µs).
duration_ms() {
  awk '{ v = $1; if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 } else if (v ~ /µs$/) { sub(/µs$/, "", v); print v / 1000 } else if (v ~ /ns$/) { print 0 } else { sub(/s$/, "", v); print v * 1000 } }'
}

# From a stamped agent log: verify_eg, verify_in (verifier ms), pre_ms (start to the first
# program's verification: reading, parsing and compiling the policy, parsing the object),
# post_ms (the last verification to `attached:`: filling the maps and attaching).
start_phases() {
  local log_file=$1 t0=$2 le li la
  le=$(grep -m1 'egress_cgroup verified and loaded in' "$log_file" || true)
  li=$(grep -m1 'ingress_cgroup verified and loaded in' "$log_file" || true)
  la=$(grep -m1 ' attached: ' "$log_file" || true)
  verify_eg=$(duration_ms <<<"${le##* loaded in }")
  verify_in=$(duration_ms <<<"${li##* loaded in }")
  pre_ms=nan
  post_ms=nan
  if [ -n "$le" ] && [ -n "$li" ] && [ -n "$la" ]; then
    pre_ms=$(awk -v t="${le%% *}" -v t0="$t0" -v v="$verify_eg" 'BEGIN { printf "%.0f", (t - t0) / 1e6 - v }')
    post_ms=$(awk -v a="${la%% *}" -v i="${li%% *}" 'BEGIN { printf "%.0f", (a - i) / 1e6 }')
  fi
}

agent_rss() { # pid -> "VmRSS VmHWM RssAnon" in KiB
  awk '/^VmRSS:/ { r = $2 } /^VmHWM:/ { h = $2 } /^RssAnon:/ { a = $2 } END { print r + 0, h + 0, a + 0 }' "/proc/$1/status" 2>/dev/null || echo "0 0 0"
}

nft_clean() { ip netns exec "$ns_c" nft flush ruleset 2>/dev/null || true; }
ipt_clean() {
  ip netns exec "$ns_c" ip6tables -P OUTPUT ACCEPT 2>/dev/null || true
  ip netns exec "$ns_c" ip6tables -F OUTPUT 2>/dev/null || true
  ip netns exec "$ns_c" ipset destroy 2>/dev/null || true
  nft_clean
}

# The addresses of file $1 of one family ($2: 4 or 6).
family_addrs() { if [ "$2" = 4 ]; then grep -v : "$1" || true; else grep : "$1" || true; fi; }

# The peers' rule sets for the N addresses of file $2, on hook $1 (output: the client's
# own packets, with loopback let through; forward: a router's), written to $3:
# nftables, one set and one chain (and a set for the IPv4 addresses, if there are any).
nft_rules() {
  local hook=$1 addrs=$2 n n4 family
  n=$(wc -l <"$addrs")
  n4=$(family_addrs "$addrs" 4 | wc -l)
  {
    echo "table inet egbench {"
    echo "  set allowed { type ipv6_addr; size $((n + 1024)); }"
    [ "$n4" -gt 0 ] && echo "  set allowed4 { type ipv4_addr; size $((n4 + 1024)); }"
    echo "  chain $hook {"
    echo "    type filter hook $hook priority 0; policy drop;"
    echo "    ct state established,related accept"
    [ "$hook" = output ] && echo "    oifname \"lo\" accept"
    echo "    meta l4proto ipv6-icmp accept"
    echo "    ip6 daddr @allowed accept"
    [ "$n4" -gt 0 ] && echo "    ip daddr @allowed4 accept"
    echo "  }"
    echo "}"
    for family in 6 4; do
      family_addrs "$addrs" "$family" | awk -v chunk=10000 -v set="allowed${family/6/}" '
        (NR - 1) % chunk == 0 { if (NR > 1) print " }"; printf "add element inet egbench %s {", set; sep = " " }
        { printf "%s%s", sep, $1; sep = ", " }
        END { if (NR) print " }" }'
    done
  } >"$3"
}
# ... iptables + ipset: the set to $3, the rules to $3.rules.
# For IPv4 addresses in the list, a second set (`egbench4`) and iptables rules to $3.rules4.
ipset_rules() {
  local chain=${1^^} addrs=$2 n n4 hashsize=1024
  n=$(wc -l <"$addrs")
  n4=$(family_addrs "$addrs" 4 | wc -l)
  while [ "$hashsize" -lt "$n" ] && [ "$hashsize" -lt 1048576 ]; do hashsize=$((hashsize * 2)); done
  {
    echo "create egbench hash:ip family inet6 hashsize $hashsize maxelem $((n + 1024))"
    family_addrs "$addrs" 6 | sed 's/^/add egbench /'
    if [ "$n4" -gt 0 ]; then
      echo "create egbench4 hash:ip family inet hashsize 1024 maxelem $((n4 + 1024))"
      family_addrs "$addrs" 4 | sed 's/^/add egbench4 /'
    fi
  } >"$3"
  {
    echo "*filter"
    echo ":$chain DROP [0:0]"
    echo "-A $chain -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    [ "$chain" = OUTPUT ] && echo "-A $chain -o lo -j ACCEPT"
    echo "-A $chain -p ipv6-icmp -j ACCEPT"
    echo "-A $chain -m set --match-set egbench dst -j ACCEPT"
    echo "COMMIT"
  } >"$3.rules"
  rm -f "$3.rules4"
  [ "$n4" -gt 0 ] || return 0
  {
    echo "*filter"
    echo ":$chain DROP [0:0]"
    echo "-A $chain -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    [ "$chain" = OUTPUT ] && echo "-A $chain -o lo -j ACCEPT"
    echo "-A $chain -m set --match-set egbench4 dst -j ACCEPT"
    echo "COMMIT"
  } >"$3.rules4"
}

# Starts `egress-bench $1 ARGS...` in the server namespace (log: $work/$1.log) and
# returns once it says it is listening.
start_server() {
  local what=$1 log_file=$work/$1.log i
  ip netns exec "$ns_s" "$bench" "$@" >"$log_file" 2>&1 &
  pids+=($!)
  for ((i = 0; i < 100; i++)); do
    grep -qs listening "$log_file" && return 0
    sleep 0.05
  done
  die "egress-bench $what did not start: $(cat "$log_file")"
}

uptime_before=$(uptime)
run_started=$(now_ns)
if has_part network; then
  for n in $sizes; do
    addrs=$work/addrs-$n
    "$bench" addresses "$n" >"$addrs"
    [ "$(tail -n1 "$addrs")" = "$target" ] || die "the address list does not end with $target"

    # Baseline: no filter at all.
    record "$n" baseline 0 "$(measure)"

    # The enforcer: the agent with a policy of N single-host CIDR entries, every port.
    policy=$work/policy-$n.yaml
    { echo "mode: enforce"; echo "allow:"; sed 's/^/  - cidr: /' "$addrs"; } >"$policy"
    if [ -n "${unusable[agent]:-}" ]; then
      record "$n" agent - "- - - - -" "not tried: ${unusable[agent]}"
    elif start_agent "$policy" "$work/agent-$n.log"; then
      read -r rss hwm _ < <(agent_rss "$agent_pid")
      m=$(measure_paired "$n")
      prog_cost "$n"
      record "$n" agent "$attach_ms" "$m" \
        "start: policy+object ${pre_ms} ms, verifier ${verify_eg%.*}+${verify_in%.*} ms, maps+attach ${post_ms} ms; RSS $((rss / 1024)) MiB, peak $((hwm / 1024)) MiB"
      stop_pid "$agent_pid" 10
      forget_pid "$agent_pid"
    else
      record "$n" agent - "- - - - -" "refused: $agent_error"
    fi

    # nftables: an output chain in the client namespace, the addresses in a set.
    if [ -n "${unusable[nft]:-}" ]; then
      record "$n" nft - "- - - - -" "not tried: ${unusable[nft]}"
    else
      f=$work/nft-$n.nft
      nft_rules output "$addrs" "$f"
      t0=$(now_ns)
      if timeout "$load_limit" ip netns exec "$ns_c" nft -f "$f" 2>"$work/nft.err"; then
        load=$(ms_since "$t0")
        record "$n" nft "$load" "$(measure)"
      else
        unusable[nft]="loading $n elements failed or took over ${load_limit} s ($(head -c 200 "$work/nft.err"))"
        record "$n" nft - "- - - - -" "${unusable[nft]}"
      fi
      nft_clean
    fi

    # iptables + ipset: one hash:ip set, one rule that matches it.
    if [ -n "${unusable[ipset]:-}" ]; then
      record "$n" ipset - "- - - - -" "not tried: ${unusable[ipset]}"
    else
      f=$work/ipset-$n
      ipset_rules output "$addrs" "$f"
      t0=$(now_ns)
      if timeout "$load_limit" ip netns exec "$ns_c" ipset restore -f "$f" 2>"$work/ipset.err" &&
        timeout "$load_limit" ip netns exec "$ns_c" ip6tables-restore "$f.rules" 2>>"$work/ipset.err"; then
        load=$(ms_since "$t0")
        record "$n" ipset "$load" "$(measure)"
      else
        unusable[ipset]="loading $n elements failed or took over ${load_limit} s ($(head -c 200 "$work/ipset.err"))"
        record "$n" ipset - "- - - - -" "${unusable[ipset]}"
      fi
      ipt_clean
    fi

    # iptables with one rule per address, the traffic's address last.
    if [ -n "${unusable[iptables]:-}" ]; then
      record "$n" iptables - "- - - - -" "not tried: ${unusable[iptables]}"
    else
      f=$work/ip6tables-$n
      {
        echo "*filter"
        echo ":OUTPUT DROP [0:0]"
        echo "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        echo "-A OUTPUT -o lo -j ACCEPT"
        echo "-A OUTPUT -p ipv6-icmp -j ACCEPT"
        sed 's|^\(.*\)$|-A OUTPUT -d \1/128 -j ACCEPT|' "$addrs"
        echo "COMMIT"
      } >"$f"
      t0=$(now_ns)
      if timeout "$load_limit" ip netns exec "$ns_c" ip6tables-restore "$f" 2>"$work/ipt.err"; then
        load=$(ms_since "$t0")
        m=$(measure)
        record "$n" iptables "$load" "$m"
        # A connection rate under 1% of the baseline's is unusable: larger sizes only get worse.
        base_conn=$(awk -F'\t' -v n="$n" '$1 == n && $2 == "baseline" { print $5 }' "$results")
        read -r _ conn _ _ _ <<<"$m"
        if awk -v c="$conn" -v b="$base_conn" 'BEGIN { exit !(c < b / 100) }'; then
          unusable[iptables]="at $n rules the connection rate fell below 1 % of the baseline"
        fi
      else
        unusable[iptables]="loading $n rules failed or took over ${load_limit} s ($(head -c 200 "$work/ipt.err"))"
        record "$n" iptables - "- - - - -" "${unusable[iptables]}"
      fi
      ipt_clean
    fi
  done
fi
# --- Loading N addresses: load time of each peer, the agent's memory ----------------------

load_md=$work/load.md
: >"$load_md"

# Runs "$@" under GNU time; prints "ms peak_KiB" (peak "-" without /usr/bin/time), or fails.
timed_load() {
  local t0 ms
  t0=$(now_ns)
  if [ -x /usr/bin/time ]; then
    timeout "$load_limit" /usr/bin/time -f '%M' -o "$work/time.out" "$@" 2>>"$work/load.err" || return 1
    ms=$(ms_since "$t0")
    echo "$ms $(tail -n1 "$work/time.out")"
  else
    timeout "$load_limit" "$@" 2>>"$work/load.err" || return 1
    echo "$(ms_since "$t0") -"
  fi
}

if has_part load; then
  log "loading N addresses into each peer"
  loads=$work/loads.tsv
  : >"$loads"
  for n in $sizes; do
    addrs=$work/addrs-$n
    [ -f "$addrs" ] || "$bench" addresses "$n" >"$addrs"
    # The agent, from the YAML (one `- cidr:` entry an address) and from a list file.
    { echo "mode: enforce"; echo "allow:"; sed 's/^/  - cidr: /' "$addrs"; } >"$work/load-yaml-$n.yaml"
    cp "$addrs" "$work/load-list-$n.txt"
    { echo "mode: enforce"; echo "allow:"; echo "  - cidrs_from: load-list-$n.txt"; } >"$work/load-list-$n.yaml"
    for form in yaml list; do
      if start_agent "$work/load-$form-$n.yaml" "$work/agent-load-$form-$n.log"; then
        read -r _ hwm _ < <(agent_rss "$agent_pid")
        # Steady: once the start's buffers are freed and the policy watcher has read the
        # list files once.
        sleep 5
        read -r rss _ _ < <(agent_rss "$agent_pid")
        printf '%s\tagent (%s)\t%s\t%s\t%s\t%s\t%s\n' "$n" "$form" "$attach_ms" "$((hwm / 1024))" \
          "$((rss / 1024))" "$(enforced)" \
          "policy+object ${pre_ms} ms, verifier ${verify_eg%.*}+${verify_in%.*} ms, maps+attach ${post_ms} ms" >>"$loads"
        stop_pid "$agent_pid" 10
        forget_pid "$agent_pid"
      else
        printf '%s\tagent (%s)\t-\t-\t-\t-\trefused: %s\n' "$n" "$form" "$agent_error" >>"$loads"
      fi
    done
    # nftables: the set the network part loads, in one `nft -f`.
    nft_rules output "$addrs" "$work/load-$n.nft"
    if r=$(timed_load ip netns exec "$ns_c" nft -f "$work/load-$n.nft"); then
      read -r ms peak <<<"$r"
      printf '%s\tnft\t%s\t%s\t-\t%s\tnft -f\n' "$n" "$ms" "$([ "$peak" = - ] && echo - || echo $((peak / 1024)))" "$(enforced)" >>"$loads"
    else
      printf '%s\tnft\t-\t-\t-\t-\tfailed: %s\n' "$n" "$(tail -c 200 "$work/load.err")" >>"$loads"
    fi
    nft_clean
    # iptables + ipset: a hash:ip set and the rule matching it.
    ipset_rules output "$addrs" "$work/load-$n.ipset"
    if r=$(timed_load ip netns exec "$ns_c" ipset restore -f "$work/load-$n.ipset") &&
      r2=$(timed_load ip netns exec "$ns_c" ip6tables-restore "$work/load-$n.ipset.rules"); then
      read -r ms peak <<<"$r"
      read -r ms2 _ <<<"$r2"
      printf '%s\tipset\t%s\t%s\t-\t%s\tipset restore %s ms + ip6tables-restore %s ms\n' "$n" "$((ms + ms2))" \
        "$([ "$peak" = - ] && echo - || echo $((peak / 1024)))" "$(enforced)" "$ms" "$ms2" >>"$loads"
    else
      printf '%s\tipset\t-\t-\t-\t-\tfailed: %s\n' "$n" "$(tail -c 200 "$work/load.err")" >>"$loads"
    fi
    ipt_clean
    log "$n loaded: $(awk -F'\t' -v n="$n" '$1 == n { printf "%s %s ms; ", $2, $3 }' "$loads")"
  done
  {
    echo
    echo "### Loading N addresses"
    echo
    echo "Load: the agent from process start to the \`attached:\` line (reading and compiling the"
    echo "policy, the verifier, filling the maps, attaching); nft and ipset the command's wall time."
    echo "Peak RSS (MiB): the agent's VmHWM once attached, the command's maximum RSS (GNU time) for"
    echo "the others; steady RSS: the agent's VmRSS 5 s after attaching. \"filters\": a connection"
    echo "to an address in no list fails."
    echo
    echo "| N | peer | load (ms) | peak RSS | steady RSS | filters | note |"
    echo "|---:|---|---:|---:|---:|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7 }' "$loads"
  } >>"$load_md"
fi

# --- Small packets: UDP, 64-byte payloads (part "udp") --------------------------------------

# Packets per second that reach the server, from one sender thread per core
# (`egress-bench udp-flood`: connected sockets, sendmmsg), counted by the server's
# namespace (Udp6InDatagrams, or Udp InDatagrams for IPv4; `egress-bench udp-sink` drains
# the socket). Two paths: "cgroup", the agent attached to the sender's cgroup as in part
# "network"; "tc", the agent's TC program on a router namespace's link to the server,
# deciding forwarded packets (`--interface`), with no socket and no GSO in the way. Each
# path in both families (`udp_family`), labelled e.g. "cgroup IPv4".
udp_md=$work/udp.md
: >"$udp_md"
udp_results=$work/udp.tsv
: >"$udp_results"
udp_paired=$work/udp-paired.tsv
: >"$udp_paired"
udp_progcost=$work/udp-progcost.tsv
: >"$udp_progcost"
udp_port=5401
# TC path: two clients, "on" routed over the router's link with the agent, "free" over
# a second link to the same server that nothing filters, for the agent's paired runs.
ns_t=egb-t-$id
ns_tf=egb-tf-$id
ns_r=egb-r-$id
tc_dev=egbra$id

# The family the floods use: 6 or 4.
udp_family=6
udp_target() { if [ "$udp_family" = 4 ]; then echo "$target4"; else echo "$target"; fi; }
udp_denied() { if [ "$udp_family" = 4 ]; then echo "$denied4"; else echo "$denied"; fi; }
# Path $1 as the report names it.
udp_label() { echo "$1 IPv$udp_family"; }

# Datagrams received in the server namespace, of the family floods use.
udp_rx() {
  if [ "$udp_family" = 4 ]; then
    ip netns exec "$ns_s" awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print $2 }' /proc/net/snmp
  else
    ip netns exec "$ns_s" awk '$1 == "Udp6InDatagrams" { print $2 }' /proc/net/snmp6
  fi
}

# The allowed list of the IPv4 rows at size $1, like the IPv6 one of N entries: half
# of them IPv4 (at most 300, from the documentation ranges: 198.51.100.0-255, then
# 203.0.113.160-203, the target last), then IPv6 fillers ending with the IPv6 target.
udp_addrs4() {
  local n=$1 k j
  k=$((n / 2))
  [ "$k" -gt 300 ] && k=300
  [ "$k" -lt 1 ] && k=1
  for ((j = 0; j < k - 1; j++)); do
    if ((j < 256)); then echo "198.51.100.$j"; else echo "203.0.113.$((160 + j - 256))"; fi
  done
  echo "$target4"
  [ "$n" -gt "$k" ] && "$bench" addresses $((n - k))
  return 0
}

# IPv4 for the IPv4 rows: the client's link (203.0.113.0/30), the target and the denied
# address on the server's loopback, a TCP server on each (reachability and "filters") and a
# sink on the target.
udp_v4_setup() {
  local i
  ip -n "$ns_c" addr add "$link_c4/30" dev "egbc$id"
  ip -n "$ns_s" addr add "$link_s4/30" dev "egbs$id"
  ip -n "$ns_s" addr add "$target4/32" dev lo
  ip -n "$ns_s" addr add "$denied4/32" dev lo
  ip -n "$ns_c" route add default via "$link_s4"
  ip netns exec "$ns_s" "$bench" serve "$target4" "$conn_port" 1 >"$work/serve4.log" 2>&1 &
  pids+=($!)
  ip netns exec "$ns_s" "$bench" serve "$denied4" "$conn_port" 1 >"$work/serve4-denied.log" 2>&1 &
  pids+=($!)
  ip netns exec "$ns_s" "$bench" udp-sink "$target4" "$udp_port" --threads "$(nproc)" >"$work/udp-sink4.log" 2>&1 &
  pids+=($!)
  for ((i = 0; i < 100; i++)); do
    grep -qs listening "$work/serve4.log" && grep -qs listening "$work/serve4-denied.log" &&
      grep -qs listening "$work/udp-sink4.log" && return 0
    sleep 0.05
  done
  die "the IPv4 servers did not start"
}

# One flood from path $1 (cgroup|tc), side $2 (on|free): "rx_per_s tx_per_s errors
# sender_cpu_ns_per_datagram".
udp_once() {
  local r0 r1 json run
  if [ "$1" = cgroup ]; then
    run=(in_cgroup "$cg")
    [ "$2" = free ] && run=(in_cgroup "$cg_free")
  else
    run=(ip netns exec "$ns_t")
    [ "$2" = free ] && run=(ip netns exec "$ns_tf")
  fi
  r0=$(udp_rx)
  json=$("${run[@]}" timeout $((seconds + 20)) "$bench" udp-flood "$(udp_target)" "$udp_port" \
    --seconds "$seconds" --payload 64 2>>"$work/udp.err") ||
    json='{"per_sec":0,"errors":-1,"seconds":1,"cpu_ns_per_datagram":0}'
  sleep 0.2 # what is still queued on the way
  r1=$(udp_rx)
  jq -r --argjson rx $((r1 - r0)) \
    '"\($rx / .seconds | floor) \(.per_sec) \(.errors) \(.cpu_ns_per_datagram)"' <<<"$json"
}

# The ids of the agent's programs on each path (for `programs_cost`).
udp_prog_ids_cgroup() { cgroup_prog_ids; }
# TC: from the agent's pinned TCX links (`tc-<interface>-<direction>@<link id>`); kernels
# before 6.6 attach netlink filters, which are not pinned, and show no TC rows.
udp_prog_ids_tc() {
  local l
  for l in "$work"/bpf/egress-enforcer/v*/links/tc-"$tc_dev"-*@*; do
    [ -e "$l" ] && bpftool link show id "${l##*@}" -j | jq -r .prog_id
  done
}

# Whether a TCP connection to the denied address fails from path $1, side "on".
udp_enforced() {
  if [ "$1" = cgroup ]; then
    enforced "$cg" "$(udp_denied)"
  else
    ip netns exec "$ns_t" timeout 10 "$bench" conn-rate "$(udp_denied)" "$conn_port" 1 --seconds 0.5 \
      --threads 1 --timeout-ms 200 2>/dev/null | jq -r 'if .connections == 0 then "yes" else "no" end' ||
      echo error
  fi
}

# $reps floods from path $1, side "on": "rx tx rx_spread enforced cpu_ns".
udp_measure() {
  local r rx=() tx=() cpu=() a b c
  for ((r = 0; r < reps; r++)); do
    read -r a b _ c < <(udp_once "$1" on)
    rx+=("$a")
    tx+=("$b")
    cpu+=("$c")
  done
  printf '%s %s %s %s %s\n' "$(printf '%s\n' "${rx[@]}" | median)" "$(printf '%s\n' "${tx[@]}" | median)" \
    "$(printf '%s\n' "${rx[@]}" | spread %.0f)" "$(udp_enforced "$1")" "$(printf '%s\n' "${cpu[@]}" | median)"
}

# `udp_measure` for the agent on path $1 at size $2, each flood paired with one from the
# free side right before or after it (the order alternates), as `measure_paired` does.
# Appends "path size free_rx agent_rx rx_ratio ratio_spread free_cpu agent_cpu
# cpu_added cpu_added_spread" to $udp_paired (cpu: the sender's ns per datagram; added:
# the median of the pairs' differences).
udp_measure_paired() {
  local r a b a_rx a_tx a_cpu b_rx b_tx b_cpu ratios=() added=() rx=() tx=() frx=() cpu=() fcpu=()
  for ((r = 0; r < reps; r++)); do
    if ((r % 2)); then
      a=$(udp_once "$1" on); b=$(udp_once "$1" free)
    else
      b=$(udp_once "$1" free); a=$(udp_once "$1" on)
    fi
    read -r a_rx a_tx _ a_cpu <<<"$a"
    read -r b_rx b_tx _ b_cpu <<<"$b"
    rx+=("$a_rx"); tx+=("$a_tx"); cpu+=("$a_cpu"); frx+=("$b_rx"); fcpu+=("$b_cpu")
    ratios+=("$(awk -v a="$a_rx" -v b="$b_rx" 'BEGIN { if (b > 0) printf "%.4f", a / b; else print 0 }')")
    added+=("$((a_cpu - b_cpu))")
  done
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(udp_label "$1")" "$2" \
    "$(printf '%s\n' "${frx[@]}" | median)" "$(printf '%s\n' "${rx[@]}" | median)" \
    "$(printf '%s\n' "${ratios[@]}" | median)" "$(printf '%s\n' "${ratios[@]}" | spread %.3f)" \
    "$(printf '%s\n' "${fcpu[@]}" | median)" "$(printf '%s\n' "${cpu[@]}" | median)" \
    "$(printf '%s\n' "${added[@]}" | median)" "$(printf '%s\n' "${added[@]}" | spread %.0f)" >>"$udp_paired"
  printf '%s %s %s %s %s\n' "$(printf '%s\n' "${rx[@]}" | median)" "$(printf '%s\n' "${tx[@]}" | median)" \
    "$(printf '%s\n' "${rx[@]}" | spread %.0f)" "$(udp_enforced "$1")" "$(printf '%s\n' "${cpu[@]}" | median)"
}

udp_record() { # path size peer load_ms "udp_measure output" note...
  local path size=$2 peer=$3 load=$4 m=$5
  path=$(udp_label "$1")
  shift 5
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$path" "$size" "$peer" "$load" "${m// /$'\t'}" "$*" >>"$udp_results"
  log "udp $path $size $peer: load ${load} ms, $m ${*}"
}

# The namespace a peer's rules go into, and the hook: the client's output on the cgroup
# path, the router's forward chain on the TC path.
udp_filter_ns() { if [ "$1" = cgroup ]; then echo "$ns_c"; else echo "$ns_r"; fi; }

udp_filters_clean() {
  local ns
  ns=$(udp_filter_ns "$1")
  ip netns exec "$ns" ip6tables -P OUTPUT ACCEPT 2>/dev/null || true
  ip netns exec "$ns" ip6tables -P FORWARD ACCEPT 2>/dev/null || true
  ip netns exec "$ns" ip6tables -F 2>/dev/null || true
  ip netns exec "$ns" iptables -P OUTPUT ACCEPT 2>/dev/null || true
  ip netns exec "$ns" iptables -P FORWARD ACCEPT 2>/dev/null || true
  ip netns exec "$ns" iptables -F 2>/dev/null || true
  ip netns exec "$ns" ipset destroy 2>/dev/null || true
  ip netns exec "$ns" nft flush ruleset 2>/dev/null || true
}

# The router and the two TC-path clients. Links: on-client fffe::/64, free-client
# fffc::/64, router to server over the agent's link fffd::/64 and the free one fffb::/64;
# the router sends what arrives from each client over its own link (tables 100, 101).
# Whether a TCP connection from namespace $1 to $2 gets through.
udp_reach() {
  ip netns exec "$1" "$bench" conn-rate "$2" "$conn_port" 1 --seconds 0.2 --threads 1 \
    --timeout-ms 200 2>/dev/null | jq -e '.connections > 0' >/dev/null
}

udp_tc_topology() {
  local ns dev i
  for ns in "$ns_t" "$ns_tf" "$ns_r"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  ip link add "egbt$id" netns "$ns_t" type veth peer name "egbrt$id" netns "$ns_r"
  ip link add "egbf$id" netns "$ns_tf" type veth peer name "egbrf$id" netns "$ns_r"
  ip link add "$tc_dev" netns "$ns_r" type veth peer name "egbsa$id" netns "$ns_s"
  ip link add "egbrb$id" netns "$ns_r" type veth peer name "egbsb$id" netns "$ns_s"
  ip -n "$ns_t" -6 addr add 2001:db8:fffe::1/64 dev "egbt$id" nodad
  ip -n "$ns_r" -6 addr add 2001:db8:fffe::2/64 dev "egbrt$id" nodad
  ip -n "$ns_tf" -6 addr add 2001:db8:fffc::1/64 dev "egbf$id" nodad
  ip -n "$ns_r" -6 addr add 2001:db8:fffc::2/64 dev "egbrf$id" nodad
  ip -n "$ns_r" -6 addr add 2001:db8:fffd::1/64 dev "$tc_dev" nodad
  ip -n "$ns_s" -6 addr add 2001:db8:fffd::2/64 dev "egbsa$id" nodad
  ip -n "$ns_r" -6 addr add 2001:db8:fffb::1/64 dev "egbrb$id" nodad
  ip -n "$ns_s" -6 addr add 2001:db8:fffb::2/64 dev "egbsb$id" nodad
  ip -n "$ns_t" link set "egbt$id" up
  ip -n "$ns_tf" link set "egbf$id" up
  for dev in "egbrt$id" "egbrf$id" "$tc_dev" "egbrb$id"; do ip -n "$ns_r" link set "$dev" up; done
  ip -n "$ns_s" link set "egbsa$id" up
  ip -n "$ns_s" link set "egbsb$id" up
  ip netns exec "$ns_r" sysctl -qw net.ipv6.conf.all.forwarding=1
  ip -n "$ns_t" -6 route add default via 2001:db8:fffe::2
  ip -n "$ns_tf" -6 route add default via 2001:db8:fffc::2
  # One policy rule for each client, the free one first: its packets are not routed
  # more cheaply than the agent's.
  ip -n "$ns_r" -6 route add default via 2001:db8:fffb::2 table 100
  ip -n "$ns_r" -6 route add default via 2001:db8:fffd::2 table 101
  ip -n "$ns_r" -6 rule add iif "egbrf$id" lookup 100 pref 100
  ip -n "$ns_r" -6 rule add iif "egbrt$id" lookup 101 pref 101
  ip -n "$ns_s" -6 route add 2001:db8:fffe::/64 via 2001:db8:fffd::1
  ip -n "$ns_s" -6 route add 2001:db8:fffc::/64 via 2001:db8:fffb::1
  # IPv4 the same way, in 203.0.113.0/27: on-client .4/30, free-client .8/30, the agent's
  # link .12/30, the free one .16/30.
  ip -n "$ns_t" addr add 203.0.113.5/30 dev "egbt$id"
  ip -n "$ns_r" addr add 203.0.113.6/30 dev "egbrt$id"
  ip -n "$ns_tf" addr add 203.0.113.9/30 dev "egbf$id"
  ip -n "$ns_r" addr add 203.0.113.10/30 dev "egbrf$id"
  ip -n "$ns_r" addr add 203.0.113.13/30 dev "$tc_dev"
  ip -n "$ns_s" addr add 203.0.113.14/30 dev "egbsa$id"
  ip -n "$ns_r" addr add 203.0.113.17/30 dev "egbrb$id"
  ip -n "$ns_s" addr add 203.0.113.18/30 dev "egbsb$id"
  ip netns exec "$ns_r" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$ns_t" route add default via 203.0.113.6
  ip -n "$ns_tf" route add default via 203.0.113.10
  ip -n "$ns_r" route add default via 203.0.113.18 table 100
  ip -n "$ns_r" route add default via 203.0.113.14 table 101
  ip -n "$ns_r" rule add iif "egbrf$id" lookup 100 pref 100
  ip -n "$ns_r" rule add iif "egbrt$id" lookup 101 pref 101
  ip -n "$ns_s" route add 203.0.113.4/30 via 203.0.113.13
  ip -n "$ns_s" route add 203.0.113.8/30 via 203.0.113.17
  for ((i = 0; i < 50; i++)); do
    udp_reach "$ns_t" "$target" && udp_reach "$ns_tf" "$target" && udp_reach "$ns_t" "$denied" &&
      udp_reach "$ns_t" "$target4" && udp_reach "$ns_tf" "$target4" && udp_reach "$ns_t" "$denied4" && return 0
    sleep 0.1
  done
  die "the TC-path topology carries no traffic"
}

# One path ($1: cgroup|tc) in family $udp_family at every size: baseline, the agent
# (paired), nftables, ipset.
udp_path() {
  local path=$1 n addrs policy f t0 load hook ns v=$udp_family
  ns=$(udp_filter_ns "$path")
  hook=output
  [ "$path" = tc ] && hook=forward
  for n in $udp_sizes; do
    if [ "$v" = 4 ]; then
      addrs=$work/addrs4-$n
      [ -s "$addrs" ] || udp_addrs4 "$n" >"$addrs"
      policy=$work/policy4-$n.yaml
    else
      addrs=$work/addrs-$n
      [ -s "$addrs" ] || "$bench" addresses "$n" >"$addrs"
      policy=$work/policy-$n.yaml
    fi
    udp_record "$path" "$n" baseline 0 "$(udp_measure "$path")"

    [ -s "$policy" ] || { echo "mode: enforce"; echo "allow:"; sed 's/^/  - cidr: /' "$addrs"; } >"$policy"
    agent_prefix=()
    agent_extra=()
    if [ "$path" = tc ]; then
      agent_prefix=(nsenter "--net=/run/netns/$ns_r")
      agent_extra=(--interface "$tc_dev")
    fi
    if start_agent "$policy" "$work/agent-udp-$path-$n-v$v.log"; then
      udp_record "$path" "$n" agent "$attach_ms" "$(udp_measure_paired "$path" "$n")"
      programs_cost "udp_prog_ids_$path" udp_once "$path" on | sed "s/^/$(udp_label "$path")\t$n\t/" >>"$udp_progcost"
      stop_pid "$agent_pid" 10
      forget_pid "$agent_pid"
    else
      udp_record "$path" "$n" agent - "- - - - -" "refused: $agent_error"
    fi
    agent_prefix=()
    agent_extra=()

    f=$work/udp-nft-$path-$n-v$v.nft
    nft_rules "$hook" "$addrs" "$f"
    t0=$(now_ns)
    if timeout "$load_limit" ip netns exec "$ns" nft -f "$f" 2>"$work/udp-nft.err"; then
      load=$(ms_since "$t0")
      udp_record "$path" "$n" nft "$load" "$(udp_measure "$path")"
    else
      udp_record "$path" "$n" nft - "- - - - -" "loading failed or took over ${load_limit} s ($(head -c 200 "$work/udp-nft.err"))"
    fi
    udp_filters_clean "$path"

    f=$work/udp-ipset-$path-$n-v$v
    ipset_rules "$hook" "$addrs" "$f"
    t0=$(now_ns)
    if timeout "$load_limit" ip netns exec "$ns" ipset restore -f "$f" 2>"$work/udp-ipset.err" &&
      timeout "$load_limit" ip netns exec "$ns" ip6tables-restore "$f.rules" 2>>"$work/udp-ipset.err" &&
      { [ ! -e "$f.rules4" ] || timeout "$load_limit" ip netns exec "$ns" iptables-restore "$f.rules4" 2>>"$work/udp-ipset.err"; }; then
      load=$(ms_since "$t0")
      udp_record "$path" "$n" ipset "$load" "$(udp_measure "$path")"
    else
      udp_record "$path" "$n" ipset - "- - - - -" "loading failed or took over ${load_limit} s ($(head -c 200 "$work/udp-ipset.err"))"
    fi
    udp_filters_clean "$path"
  done
}

if has_part udp; then
  udp_sizes=$sizes
  [ "$sizes_given" = 1 ] || [ "$quick" = 1 ] || udp_sizes="10 100000 1000000"
  log "small packets (UDP, 64 bytes): sizes $udp_sizes"
  start_server udp-sink "$target" "$udp_port" --threads "$(nproc)"
  udp_v4_setup
  udp_tc_topology
  for path in cgroup tc; do
    for udp_family in 6 4; do udp_path "$path"; done
  done
  udp_family=6
  {
    echo
    echo "### Small packets: UDP, 64-byte payloads"
    echo
    echo "\`egress-bench udp-flood\` from $(nproc) threads (one per core, a connected socket each,"
    echo "sendmmsg), $seconds s per flood, median of $reps; \"rx/s\" is what reached the server's socket"
    echo "(its namespace's Udp6InDatagrams, Udp InDatagrams for IPv4), \"tx/s\" what the sender's calls"
    echo "accepted. IPv4 rows: the list of N holds half IPv4 addresses (at most 300, the documentation"
    echo "ranges), the target among them, and IPv6 ones for the rest. Path \"cgroup\":"
    echo "the filters on the sender's own path (the agent on its cgroup; nftables and ipset in its"
    echo "namespace's output hook). Path \"tc\": forwarded through a router namespace (the agent's TC"
    echo "program on the router's link to the server, \`--interface\`; nftables and ipset in its forward"
    echo "hook). \"filters\": a TCP connection to an address in no list failed, as it must."
    echo
    echo "| path | N | peer | load (ms) | rx/s | runs rx/s | × baseline | tx/s | sender CPU ns / datagram | filters | note |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"
    awk -F'\t' '
      $3 == "baseline" { b[$1 " " $2] = $5 }
      { row[NR] = $0 }
      END {
        for (i = 1; i <= NR; i++) {
          split(row[i], f, "\t")
          k = f[1] " " f[2]
          r = (f[5] ~ /^[0-9.]+$/ && b[k] > 0) ? sprintf("%.3f", f[5] / b[k]) : "-"
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[1], f[2], f[3], f[4], f[5], f[7], r, f[6], f[9], f[8], f[10]
        }
      }' "$udp_results"
    echo
    echo "The agent against its free side in the same minute (cgroup path: the sibling cgroup it is"
    echo "not attached to; tc path: a second client the router sends over a link without the agent);"
    echo "the ratio is the median of the pairs' ratios. The sender's CPU time per datagram (its"
    echo "threads' CPU clock, which includes the veth's receive path run in their context) moves far"
    echo "less with other load than the rate: \"added\" is the median of the pairs' differences, what"
    echo "the agent costs a datagram; \"× free (CPU)\" is the rate that cost alone leaves."
    echo
    echo "| path | N | free rx/s | agent rx/s | × free | pairs' ratios | free CPU ns | agent CPU ns | added ns | pairs' added | × free (CPU) |"
    echo "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %.3f | %s | %s | %s | %s | %s | %.3f |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, ($7 > 0 && $7 + $9 > 0) ? $7 / ($7 + $9) : 0 }' "$udp_paired"
    echo
    echo "The agent's programs during one more flood with \`kernel.bpf_stats_enabled\` on (run count"
    echo "and run time per program, clock reads included); CPU in % of one core. Set against the"
    echo "sender's CPU ns per datagram above, ns per run is the share of the rate the programs take:"
    echo
    echo "| path | N | program | runs /s | ns / run | CPU % |"
    echo "|---|---:|---|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }' "$udp_progcost"
  } >>"$udp_md"
fi
# --- The agent: start to enforcing, resources, DNS learning --------------------------------

agent_md=$work/agent.md
: >"$agent_md"

cpu_ticks() { # pid -> utime + stime, in clock ticks
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  # shellcheck disable=SC2086 # split the fields on purpose
  set -- $stat
  echo $((${12} + ${13}))
}
clk_tck=$(getconf CLK_TCK)

# "cpu% rss_MiB hwm_MiB anon_MiB" of the agent over $2 seconds.
agent_usage() {
  local pid=$1 secs=$2 t0 c0 c1 t1 rss hwm anon
  t0=$(now_ns)
  c0=$(cpu_ticks "$pid")
  sleep "$secs"
  c1=$(cpu_ticks "$pid")
  t1=$(now_ns)
  read -r rss hwm anon < <(agent_rss "$pid")
  awk -v c=$((c1 - c0)) -v hz="$clk_tck" -v ns=$((t1 - t0)) -v r="$rss" -v h="$hwm" -v a="$anon" \
    'BEGIN { printf "%.2f %.1f %.1f %.1f\n", 100 * c / hz / (ns / 1e9), r / 1024, h / 1024, a / 1024 }'
}

# Stops the agent and prints its DNS counters: agent answers, agent learned, kernel
# answers, kernel learned, kernel unmatched, kernel ring lost, agent evicted.
stop_agent_counters() {
  local log_file=$1 line i
  stop_pid "$agent_pid" 10
  forget_pid "$agent_pid"
  for ((i = 0; i < 50; i++)); do
    line=$(grep -m1 ' dns: answers ' "$log_file" 2>/dev/null) && break
    sleep 0.1
  done
  sed -E 's/.*dns: answers ([0-9]+) learned ([0-9]+) \(kernel: answers ([0-9]+) learned ([0-9]+) untrusted [0-9]+ unsolicited [0-9]+ unmatched ([0-9]+) malformed [0-9]+ lost ([0-9]+)\).* evicted ([0-9]+).*/\1 \2 \3 \4 \5 \6 \7/' <<<"${line:-}"
}

if has_part agent; then
  log "the agent: start to enforcing, resources, DNS learning"
  start_server dns-serve "$link_s" 53

  names=6250 # answers of 16 addresses each: 100,000 learned addresses
  zones=1000
  dns_policy=$work/policy-dns.yaml
  {
    echo "mode: enforce"
    echo "dns:"
    echo "  resolvers: [$link_s]"
    echo "  max_ips: 131072"
    echo "  max_ips_per_name: 65536"
    echo "allow:"
    for ((z = 0; z < zones; z++)); do
      echo "  - fqdn: \"*.z$z.bench.test\""
      echo "    ports: [HTTPS:443]"
    done
  } >"$dns_policy"
  cidr_policy=$work/policy-cidr-65536.yaml
  { echo "mode: enforce"; echo "allow:"; "$bench" addresses 65536 | sed 's/^/  - cidr: /'; } >"$cidr_policy"

  # Start to enforcing: repeated starts of the 1k-pattern policy.
  starts=5
  [ "$quick" = 1 ] && starts=2
  : >"$work/starts"
  for ((k = 0; k < starts; k++)); do
    start_agent "$dns_policy" "$work/agent-start-$k.log" || die "the agent did not start: $agent_error"
    echo "$attach_ms $pre_ms ${verify_eg:-nan} ${verify_in:-nan} $post_ms" >>"$work/starts"
    stop_pid "$agent_pid" 10
    forget_pid "$agent_pid"
  done
  # Idle with the largest CIDR policy the agent takes.
  start_agent "$cidr_policy" "$work/agent-start-cidr.log" || die "the agent did not start: $agent_error"
  cidr_start="$attach_ms ms (policy and object $pre_ms ms, verifier ${verify_eg%.*}+${verify_in%.*} ms, maps and attach $post_ms ms)"
  read -r cidr_cpu cidr_rss cidr_hwm cidr_anon < <(agent_usage "$agent_pid" "$idle")
  stop_pid "$agent_pid" 10
  forget_pid "$agent_pid"

  # Idle with 1k patterns, nothing learned; then with 100,000 learned addresses.
  start_agent "$dns_policy" "$work/agent-idle.log" || die "the agent did not start: $agent_error"
  read -r idle0_cpu idle0_rss idle0_hwm idle0_anon < <(agent_usage "$agent_pid" "$idle")
  fill=$(in_client timeout 60 "$bench" dns-flood "$link_s" 53 --names "$names" --zones "$zones" \
    --count "$names" --rate 2000 --seconds 30)
  sleep 2
  read -r idle1_cpu idle1_rss idle1_hwm idle1_anon < <(agent_usage "$agent_pid" "$idle")
  read -r fa_ans fa_learned fk_ans fk_learned _ fk_lost fa_evicted < <(stop_agent_counters "$work/agent-idle.log")

  # The flood: answers for allowed names at a given rate (0: as fast as the client and
  # server go), through the real path; the agent's CPU over the flood.
  if [ "$quick" = 1 ]; then rates="5000 0"; else rates="2000 3000 5000 10000 25000 50000 0"; fi
  : >"$work/flood"
  for rate in $rates; do
    start_agent "$dns_policy" "$work/agent-flood-$rate.log" || die "the agent did not start: $agent_error"
    c0=$(cpu_ticks "$agent_pid")
    t0=$(now_ns)
    perf_pid=""
    if [ "$profile" = 1 ] && [ "$rate" = 0 ] && command -v perf >/dev/null; then
      perf record -q -F 997 -g -p "$agent_pid" -o "$work/perf-flood.data" -- sleep "$seconds" \
        >/dev/null 2>&1 &
      perf_pid=$!
      pids+=("$perf_pid")
    fi
    f=$(in_client timeout $((seconds + 30)) "$bench" dns-flood "$link_s" 53 --names "$names" \
      --zones "$zones" --rate "$rate" --seconds "$seconds" --window 512)
    if [ -n "$perf_pid" ]; then
      wait "$perf_pid" 2>/dev/null || true
      forget_pid "$perf_pid"
    fi
    c1=$(cpu_ticks "$agent_pid")
    t1=$(now_ns)
    read -r _ rss hwm anon < <(agent_usage "$agent_pid" 0)
    cpu=$(awk -v c=$((c1 - c0)) -v hz="$clk_tck" -v ns=$((t1 - t0)) 'BEGIN { printf "%.1f", 100 * c / hz / (ns / 1e9) }')
    cpu_ms=$(((c1 - c0) * 1000 / clk_tck))
    counters=$(stop_agent_counters "$work/agent-flood-$rate.log")
    echo "$rate $(jq -r '"\(.sent_per_sec) \(.answers_per_sec) \(.answers)"' <<<"$f") $counters $cpu $rss $hwm $anon $cpu_ms" >>"$work/flood"
    log "flood $rate: $f / $counters / cpu $cpu%"
  done

  {
    echo
    echo "### The agent"
    echo
    echo "Policy: $zones wildcard name patterns (\`*.z<i>.bench.test\`, TCP 443), trusted resolver $link_s;"
    echo "answers carry 16 AAAA records each, for $names names: $((names * 16)) distinct addresses."
    echo
    echo "Start to enforcing (process start to the \`attached:\` line), 1k patterns, $starts starts:"
    echo
    echo "| | median | min | max |"
    echo "|---|---:|---:|---:|"
    for col in 1 2 3 4 5; do
      case $col in
        1) what="start to attached (ms)" ;;
        2) what="… reading and compiling the policy, parsing the object (ms)" ;;
        3) what="… egress_cgroup verifier (ms)" ;;
        4) what="… ingress_cgroup verifier (ms)" ;;
        5) what="… filling the maps and attaching (ms)" ;;
      esac
      awk -v c="$col" '{ print $c }' "$work/starts" | sort -g | awk -v w="$what" '{ v[NR] = $1 } END { printf "| %s | %.0f | %.0f | %.0f |\n", w, v[int((NR + 1) / 2)], v[1], v[NR] }'
    done
    echo
    echo "With 65,536 CIDR entries instead: start to attached $cidr_start."
    echo
    echo "Resources (CPU in % of one core over the interval; RSS, peak RSS and anonymous RSS in MiB;"
    echo "RSS also counts the binary and the ring buffers, which the agent maps twice each):"
    echo
    echo "| state | CPU % | RSS | HWM | anon |"
    echo "|---|---:|---:|---:|---:|"
    echo "| idle ${idle} s, 1k patterns, nothing learned | $idle0_cpu | $idle0_rss | $idle0_hwm | $idle0_anon |"
    echo "| idle ${idle} s, 1k patterns, after learning (agent: ${fa_learned:-?} addresses from ${fa_ans:-?} answers; kernel: ${fk_learned:-?} from ${fk_ans:-?}, ring lost ${fk_lost:-?}, agent evicted ${fa_evicted:-?}) | $idle1_cpu | $idle1_rss | $idle1_hwm | $idle1_anon |"
    echo "| idle ${idle} s, 65,536 CIDR entries | $cidr_cpu | $cidr_rss | $cidr_hwm | $cidr_anon |"
    while read -r rate _ aps _ _ _ _ _ _ _ _ cpu rss hwm anon _; do
      echo "| DNS flood at $([ "$rate" = 0 ] && echo "full speed" || echo "$rate/s") ($aps answers/s) | $cpu | $rss | $hwm | $anon |"
    done <"$work/flood"
    echo
    echo "Fill: \`$(tr -d '\n' <<<"$fill")\`"
    echo
    echo "DNS flood ($seconds s each; an agent started afresh for each rate; counters from its exit log):"
    echo
    echo "| offered /s | sent /s | answers /s (client) | answers (client) | kernel answers | kernel learned | kernel unmatched | ring lost | agent answers | agent learned | agent evicted | agent CPU µs / answer | none lost |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    while read -r rate sps aps answers a_ans a_learned k_ans k_learned k_unm k_lost a_ev _ _ _ _ cpu_ms; do
      ok=no
      if [ "${k_lost:-1}" = 0 ] && [ "${a_ans:-0}" = "$((k_ans - k_unm))" ] && [ "$k_ans" -ge "$answers" ]; then ok=yes; fi
      per=$(awk -v c="$cpu_ms" -v a="$a_ans" 'BEGIN { if (a > 0) printf "%.0f", c * 1000 / a; else print "-" }')
      echo "| $([ "$rate" = 0 ] && echo "max" || echo "$rate") | $sps | $aps | $answers | $k_ans | $k_learned | $k_unm | $k_lost | $a_ans | $a_learned | $a_ev | $per | $ok |"
    done <"$work/flood"
    echo
    echo "The learner alone, on the real maps, without the network (\`egress-bench learn\`: the same"
    echo "answers through BPF_PROG_TEST_RUN of the kernel program, then the learner; its thread's CPU time):"
    echo
    "$bench" learn --names "$names" --zones "$zones" --rounds 3
    if [ -f "$work/perf-flood.data" ]; then
      echo
      echo "Profile of the agent during the fastest flood (\`perf report --no-children\`, top entries):"
      echo
      echo '```text'
      perf report -i "$work/perf-flood.data" --no-children --stdio --percent-limit 1.5 -g none \
        2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40
      echo '```'
    fi
  } >>"$agent_md"
fi
run_ms=$(ms_since "$run_started")
uptime_after=$(uptime)

# --- Report ------------------------------------------------------------------------------

report=$work/report.md
{
  echo "## Run $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
  else
    commit=${EGRESS_BENCH_COMMIT:-unknown}
  fi
  echo "- commit: $commit"
  echo "- peers: $(iperf3 --version | head -n1 | cut -d' ' -f1-2), $(nft --version), $(ipset --version | head -n1), $(ip6tables --version)"
  echo "- load before: ${uptime_before#*load average: }; after: ${uptime_after#*load average: }"
  echo "- settings: parts $parts; sizes $sizes; iperf3 -t $seconds -O $omit (median of $reps); connection rate $seconds s, 2 threads, $conn_ports server ports; idle $idle s; network, udp and agent parts took $((run_ms / 1000)) s"
  echo
  if has_part network; then
    echo "### Throughput and connection rate"
    echo
    echo "| N | peer | load (ms) | Gbit/s | runs (Gbit/s) | × baseline | conn/s | × baseline | failed | filters | note |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    awk -F'\t' '
      $2 == "baseline" { bg[$1] = $4; bc[$1] = $5 }
      { row[NR] = $0 }
      END {
        for (i = 1; i <= NR; i++) {
          split(row[i], f, "\t")
          g = f[4]; c = f[5]
          rg = (g ~ /^[0-9.]+$/ && bg[f[1]] > 0) ? sprintf("%.3f", g / bg[f[1]]) : "-"
          rc = (c ~ /^[0-9.]+$/ && bc[f[1]] > 0) ? sprintf("%.3f", c / bc[f[1]]) : "-"
          gs = (g ~ /^[0-9.]+$/) ? sprintf("%.2f", g) : g
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[1], f[2], f[3], gs, f[8], rg, c, rc, f[6], f[7], f[9]
        }
      }' "$results"
    echo
    echo "\"filters\": a connection to an address on the server that is in no allowed list failed (yes),"
    echo "as it must under every filter and must not under the baseline."
    if [ -s "$paired" ]; then
      echo
      echo "### The agent against a baseline in the same minute"
      echo
      echo "While the agent runs, each of its iperf3 runs above is paired with one from a sibling cgroup"
      echo "it is not attached to, right before or after it (the order alternates); the ratio is the"
      echo "median of the pairs' ratios. Connection rate: the agent's two runs around one free run."
      echo "\"free filters\" must be no: the sibling reaches the address no list allows."
      echo
      echo "| N | free Gbit/s | agent Gbit/s | × free | pairs' ratios | free conn/s | agent conn/s | × free | free filters |"
      echo "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
      awk -F'\t' '{ printf "| %s | %.2f | %.2f | %.3f | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }' "$paired"
    fi
    if [ -s "$progcost" ]; then
      echo
      echo "### The agent's programs during one iperf3 run"
      echo
      echo "One more iperf3 run from the enforced cgroup with \`kernel.bpf_stats_enabled\` on (run"
      echo "count and run time per program, clock reads included); CPU in % of one core."
      echo
      echo "| N | program | runs /s | ns / run | CPU % |"
      echo "|---:|---|---:|---:|---:|"
      awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$progcost"
    fi
  fi
} >"$report"
cat "$udp_md" >>"$report"

if has_part verdict; then
  log "per-packet cost (BPF_PROG_TEST_RUN)"
  if [ "$quick" = 1 ]; then
    vargs=(--sizes "10,1000" --repeat 200000 --flows 5000 --trials 3)
  else
    vargs=(--sizes "$(echo "$sizes" | tr ' ' ',')" --repeat 1000000 --flows 20000 --trials 5)
  fi
  {
    echo
    echo "### Per-packet cost: \`egress-bench verdict ${vargs[*]}\`"
    echo
    "$bench" verdict "${vargs[@]}"
  } >>"$report"
fi

cat "$agent_md" >>"$report"
cat "$load_md" >>"$report"

cat "$report"
if [ -n "$out" ]; then
  cp "$report" "$out"
  log "report written to $out"
fi
