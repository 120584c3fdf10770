#!/usr/bin/env bash
# Shows the enforcer at work without touching the host's own network: two network
# namespaces at documentation addresses, a cgroup of the demo's own, the agent in audit mode
# on that cgroup only, a few allowed and would-be-denied connections from inside it, and the
# events the agent printed. With --config FILE it runs FILE on the demo cgroup instead,
# until Ctrl-C. Everything the demo creates is removed when it ends, however it ends.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/demo.sh [--config FILE]

Runs scripts/setup.sh (installs what is missing, builds), then creates two network
namespaces joined by a veth pair (documentation addresses only) and a cgroup of its own,
and runs egress-agent in audit mode on that cgroup only.

  (no options)    Starts echo servers in the server namespace, makes a few allowed and
                  would-be-denied connections from the client namespace inside the
                  cgroup, and prints the agent's events and counters.
  --config FILE   Validates FILE (egress-agent check), then runs it in audit mode on the
                  demo cgroup until Ctrl-C, with events streaming to the terminal. It
                  prints how to move a shell of yours into the cgroup to try your own
                  traffic.
  -h, --help      Prints this help.

Needs root. Everything the demo creates is removed when it ends, also on errors and Ctrl-C;
processes still in the demo cgroup then are killed.
EOF
}

# --- Command line ----------------------------------------------------------------------

config=""
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --config)
      [ $# -ge 2 ] || { echo "demo.sh: --config needs a FILE" >&2; exit 2; }
      config=$2
      shift 2
      ;;
    --config=*)
      config=${1#--config=}
      shift
      ;;
    *)
      echo "demo.sh: unknown argument: $1" >&2
      usage >&2
      exit 2
      ;;
  esac
done
if [ -n "$config" ]; then
  [ -f "$config" ] || { echo "demo.sh: no such file: $config" >&2; exit 2; }
  config=$(realpath -- "$config") # we are about to cd to the repository
fi

cd "$(dirname "$0")/.."

# --- Helpers ---------------------------------------------------------------------------

log() { printf '== %s\n' "$*" >&2; }
die() {
  printf 'demo.sh: %s\n' "$*" >&2
  exit 1
}

# True while the child process $1 runs; a zombie (exited, not yet reaped) counts as gone.
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) } # drop "pid (comm) ", leaving the state letter first
  [ "${stat%% *}" != Z ]
}

# Stops the child process $1: SIGTERM, SIGKILL if it still runs after $2 seconds (default
# 3), then reaps it. Returns its exit status. Only ever called for our own children, which
# cannot be reaped behind our back, so their pids cannot have been reused.
stop_child() {
  local pid=$1 grace=${2:-3} i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    running "$pid" || break
    sleep 0.1
  done
  if running "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid"
}

# The value of the field $2 in the flat JSON object $1 (the agent's and the probe's output
# lines), or "-" if absent. Plain bash, so the demo needs no jq.
json_field() {
  local re="\"$2\":(\"(([^\"\\\\]|\\\\.)*)\"|([^,}]*))"
  if [[ $1 =~ $re ]]; then
    printf '%s' "${BASH_REMATCH[2]}${BASH_REMATCH[4]}"
  else
    printf '%s' -
  fi
}

# Waits until the agent ($agent_pid) has logged "attached:" to $agent_log: only from then on
# is the cgroup's traffic seen. Fails with the agent's log if it exits or hangs first.
wait_attached() {
  local i
  for ((i = 0; ; i++)); do
    grep -q 'attached:' "$agent_log" && return 0
    running "$agent_pid" || die "egress-agent exited before attaching:
$(cat "$agent_log")"
    [ "$i" -lt 300 ] || die "egress-agent did not attach within 30 s:
$(cat "$agent_log")"
    sleep 0.1
  done
}

# --- Cleanup: runs on every exit, whatever created so far is removed --------------------

# Filled in as things are created, so cleanup removes exactly what exists.
agent_pid=""
server_pids=()
cgroup_dir=""
cgfd=""
namespaces=()
tmp=""
pin_root=""

cleanup() {
  local status=$? pid ns i
  trap '' INT TERM # a second Ctrl-C must not cut the cleanup short
  set +e
  log "cleaning up"
  # The agent first: SIGTERM makes it detach its programs and remove its pins; uninstall
  # removes them if it could not (killed); then the bpffs it mounted goes.
  [ -n "$agent_pid" ] && stop_child "$agent_pid" 5 >/dev/null 2>&1
  if [ -n "$tmp" ] && [ -d "$tmp/bpf" ]; then
    [ -d "$pin_root" ] && "$agent" uninstall --pin-root "$pin_root" >/dev/null
    mountpoint -q "$tmp/bpf" && umount -l "$tmp/bpf"
  fi
  for pid in "${server_pids[@]}"; do
    stop_child "$pid" 1 >/dev/null 2>&1
  done
  if [ -n "$cgfd" ]; then
    exec {cgfd}<&-
  fi
  if [ -n "$cgroup_dir" ] && [ -d "$cgroup_dir" ]; then
    # Kill whatever still runs in the cgroup (cgroup.kill: kernel 5.14+), wait until it is
    # empty, then remove it; rmdir may report EBUSY for a moment after the last exit.
    for ((i = 0; i < 50; i++)); do
      if [ -e "$cgroup_dir/cgroup.kill" ]; then
        echo 1 >"$cgroup_dir/cgroup.kill"
      else
        while read -r pid; do kill -KILL "$pid"; done <"$cgroup_dir/cgroup.procs"
      fi 2>/dev/null
      rmdir "$cgroup_dir" 2>/dev/null && break
      sleep 0.1
    done
    [ -d "$cgroup_dir" ] && echo "demo.sh: could not remove cgroup $cgroup_dir" >&2
  fi
  # Deleting a namespace also deletes the veth end inside it (and so the pair).
  for ns in "${namespaces[@]}"; do
    ip netns delete "$ns" || echo "demo.sh: could not delete network namespace $ns" >&2
  done
  [ -n "$tmp" ] && rm -rf -- "$tmp"
  exit "$status"
}
trap cleanup EXIT
# Signals end the script through the EXIT trap, with the usual 128+N status.
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. Install and build ----------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "run as root (namespaces, cgroups and eBPF need it)"
scripts/setup.sh
bin=${CARGO_TARGET_DIR:-target}/release
agent=$bin/egress-agent
probe=$bin/egress-probe
[ -x "$agent" ] || die "$agent is missing after scripts/setup.sh"
if [ -z "$config" ]; then
  [ -x "$probe" ] || die "$probe is missing after scripts/setup.sh"
fi

# With --config, check the policy before creating anything: a bad file changes nothing.
if [ -n "$config" ]; then
  log "checking $config"
  "$agent" check --config "$config"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/egress-demo.XXXXXX")
# The demo's own pin root: the agent mounts bpffs on $tmp/bpf, so nothing lands under
# /sys/fs/bpf and a real agent's pinned state on this machine is never touched.
mkdir "$tmp/bpf"
pin_root=$tmp/bpf/egress-enforcer
agent_log=$tmp/agent.log # the agent's stderr
events=$tmp/events.jsonl # the agent's stdout (not in --config mode)
: >"$agent_log"          # exists before the agent starts, for wait_attached

# --- 2. Network namespaces ---------------------------------------------------------------

# client (198.51.100.1, 2001:db8:1::1) --veth-- server (198.51.100.2, 2001:db8:1::2)
# The server's lo holds the "remote" addresses 203.0.113.10, 203.0.113.20 and 2001:db8:2::10,
# which the client reaches only through its default routes, as a pod reaches the Internet.
cli_ns=egress-demo-cli-$$
srv_ns=egress-demo-srv-$$
log "creating network namespaces $cli_ns and $srv_ns"
for ns in "$cli_ns" "$srv_ns"; do
  ip netns add "$ns"
  namespaces+=("$ns")
  ip -n "$ns" link set lo up
done
# Both ends are created directly inside their namespaces, never in the host's.
ip link add veth-cli netns "$cli_ns" type veth peer name veth-srv netns "$srv_ns"
ip -n "$cli_ns" link set veth-cli up
ip -n "$srv_ns" link set veth-srv up
# nodad: the IPv6 addresses are usable at once, without duplicate address detection.
ip -n "$cli_ns" addr add 198.51.100.1/24 dev veth-cli
ip -n "$cli_ns" -6 addr add 2001:db8:1::1/64 dev veth-cli nodad
ip -n "$srv_ns" addr add 198.51.100.2/24 dev veth-srv
ip -n "$srv_ns" -6 addr add 2001:db8:1::2/64 dev veth-srv nodad
ip -n "$srv_ns" addr add 203.0.113.10/32 dev lo
ip -n "$srv_ns" addr add 203.0.113.20/32 dev lo
ip -n "$srv_ns" -6 addr add 2001:db8:2::10/128 dev lo nodad
ip -n "$cli_ns" route add default via 198.51.100.2
ip -n "$cli_ns" -6 route add default via 2001:db8:1::2

# The kernel brings a new link up asynchronously: until it has a real qdisc and its
# multicast route, ARP and neighbour discovery packets vanish and a first connection stalls.
link_ready() {
  local link
  link=$(ip -n "$1" link show dev "$2")
  [[ $link == *"state UP"* && $link != *"qdisc noop"* ]] &&
    [ -n "$(ip -n "$1" -6 route show table local type multicast dev "$2")" ]
}
for ((i = 0; ; i++)); do
  link_ready "$cli_ns" veth-cli && link_ready "$srv_ns" veth-srv && break
  [ "$i" -lt 50 ] || die "the veth pair did not come up within 5 s"
  sleep 0.1
done

# --- 3. The demo cgroup ------------------------------------------------------------------

# Where cgroup v2 is mounted differs between hosts (/sys/fs/cgroup, /sys/fs/cgroup/unified):
# take it from /proc/mounts, undoing its octal escapes (\040 for a space).
cgroup_mount=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$cgroup_mount" ] || die "no cgroup2 filesystem is mounted (see /proc/mounts)"
cgroup_mount=$(printf '%b' "${cgroup_mount//\\/\\0}")
cg=$cgroup_mount/egress-demo-$$
log "creating cgroup $cg"
mkdir "$cg"
cgroup_dir=$cg

# --- --config FILE: the user's own policy, until Ctrl-C ----------------------------------

if [ -n "$config" ]; then
  # Not under ip netns exec: that mounts a fresh /sys, hiding the cgroup2 mount from the
  # agent. Events (stdout) stream to the terminal; its log (stderr) too, through tee, which
  # also keeps a copy to tell when it has attached. tee ignores Ctrl-C, so that it still
  # passes on the counters the agent logs when Ctrl-C stops it; it ends with the agent.
  log "starting egress-agent (audit mode, cgroup $cg)"
  "$agent" run --config "$config" --mode audit --cgroup "$cg" --listen 127.0.0.1:0 \
    --pin-root "$pin_root" \
    2> >(trap '' INT && exec tee "$agent_log" >&2) &
  agent_pid=$!
  wait_attached
  cat <<EOF

The agent runs $config in audit mode on the cgroup
  $cg
and only there. To try your own traffic, put a shell into it from another terminal:

  echo \$\$ > $cg/cgroup.procs

Everything that shell runs from then on is covered. To keep your tries off the real
network, enter the demo's client namespace from it:

  ip netns exec $cli_ns bash
  curl --max-time 2 http://203.0.113.20:8080/

Its default routes lead to the server namespace, which holds 203.0.113.10, 203.0.113.20
and 2001:db8:2::10 (documentation addresses) but runs no servers: a connection is refused
or times out, and a flow your policy does not allow shows up below all the same.
Would-be-denied flows appear below as JSON lines. Ctrl-C stops the agent and removes the
namespaces and the cgroup, killing whatever still runs in it.

EOF
  # Until Ctrl-C, which also reaches the agent (it is in our process group): it detaches and
  # logs its counters. The trap only interrupts the wait; then the agent is stopped for sure.
  interrupted=0
  trap 'interrupted=1' INT
  status=0
  wait "$agent_pid" || status=$?
  if [ "$interrupted" = 1 ]; then
    stop_child "$agent_pid" 10 || true
    agent_pid=""
    exit 0
  fi
  agent_pid=""
  die "egress-agent exited with status $status"
fi

# --- 4. Echo servers in the server namespace (outside the cgroup) -------------------------

# ip netns exec execs the probe in place, so $! is the server's own pid.
start_server() { # serve-tcp|serve-udp ADDR PORT
  local out=$tmp/server-${#server_pids[@]}.out i
  : >"$out" # exists before the server opens it, for the grep below
  ip netns exec "$srv_ns" "$probe" "$1" "$2" "$3" >"$out" 2>&1 &
  server_pids+=($!)
  # The server prints {"listening":true} once it is bound.
  for ((i = 0; i < 50; i++)); do
    grep -q '"listening":true' "$out" && return 0
    running "$!" || break
    sleep 0.1
  done
  die "$1 $2 $3 did not start: $(cat "$out")"
}
log "starting echo servers in $srv_ns"
start_server serve-tcp 203.0.113.10 443
start_server serve-tcp 203.0.113.20 443
start_server serve-tcp 203.0.113.10 8080
start_server serve-tcp 2001:db8:2::10 443
start_server serve-udp 203.0.113.10 123

# --- 5. The agent, in the host's namespaces ----------------------------------------------

# Not under ip netns exec: that mounts a fresh /sys, hiding the cgroup2 mount from the agent.
log "starting egress-agent (audit mode, cgroup $cg)"
"$agent" run --config scripts/demo-policy.yaml --mode audit --cgroup "$cg" --listen 127.0.0.1:0 \
  --pin-root "$pin_root" \
  >"$events" 2>"$agent_log" &
agent_pid=$!
wait_attached
sed -n 's/.*\(attached: .*\)/  agent: \1/p' "$agent_log"

# --- 6. Probes from the client namespace, inside the cgroup -------------------------------

# ip netns exec also hides the cgroup2 mount from the probe, so hand it the cgroup as an
# open directory instead: the probe joins it through /proc/self/fd/N (as the tests do).
exec {cgfd}<"$cg"

unexpected=0
run_probe() { # tcp|udp ADDR PORT "allowed"|"would be denied"
  local proto=$1 addr=$2 port=$3 policy=$4 mode dest out status result
  case $proto in
    tcp) mode=tcp-connect ;;
    udp) mode=udp-send ;;
  esac
  if [[ $addr == *:* ]]; then dest="[$addr]:$port"; else dest="$addr:$port"; fi
  status=0
  out=$(ip netns exec "$cli_ns" "$probe" --cgroup "/proc/self/fd/$cgfd" "$mode" "$addr" "$port" \
    2>&1) || status=$?
  case $status in
    0) result="ok: the echo came back" ;;
    1)
      result="failed: $(json_field "$out" error)"
      unexpected=1 # audit mode drops nothing
      ;;
    *) die "egress-probe $mode $addr $port broke: $out" ;;
  esac
  printf '  %-5s %-22s %-16s %s\n' "$proto" "$dest" "$policy" "$result"
}

echo
echo "Probes from $cli_ns, inside the cgroup (policy: scripts/demo-policy.yaml, audit mode):"
printf '  %-5s %-22s %-16s %s\n' proto destination policy result
run_probe tcp 203.0.113.10 443 allowed
run_probe tcp 203.0.113.10 8080 "would be denied"
run_probe tcp 203.0.113.20 443 "would be denied"
run_probe udp 203.0.113.10 123 allowed
run_probe tcp 2001:db8:2::10 443 allowed
denied_probes=2

# --- 7. Stop the agent, show what it saw ---------------------------------------------------

# Events travel through a ring buffer: give the agent a moment to print the would-drops
# (the lines with an action; its own events, such as "attached", have none).
for ((i = 0; i < 30; i++)); do
  [ "$(grep -c '"action":' "$events")" -ge "$denied_probes" ] && break
  sleep 0.1
done
log "stopping egress-agent (SIGTERM)"
status=0
stop_child "$agent_pid" 10 || status=$?
agent_pid=""
[ "$status" = 0 ] || die "egress-agent exited with status $status:
$(cat "$agent_log")"

echo
echo "Events (the JSON lines egress-agent wrote to stdout):"
printf '  %-6s %-5s %-22s %-26s %s\n' action proto destination cgroup comm
while IFS= read -r line; do
  [[ $line == *'"action":'* ]] || continue
  dst=$(json_field "$line" dst)
  [[ $dst == *:* ]] && dst="[$dst]"
  printf '  %-6s %-5s %-22s %-26s %s\n' "$(json_field "$line" action)" \
    "$(json_field "$line" proto)" "$dst:$(json_field "$line" dport)" \
    "$(json_field "$line" cgroup)" "$(json_field "$line" comm)"
done <"$events"
grep -q '"action":' "$events" || echo "  (none)"
echo
echo "Counters (stderr of egress-agent):"
sed -n 's/.*\(SIGTERM: detached.*\)/  \1/p' "$agent_log"
echo
echo "In enforce mode (--mode enforce) the agent would drop the packets of the two"
echo "would-be-denied probes, and their connections would time out."

[ "$unexpected" = 0 ] || die "a probe failed, though audit mode drops nothing"
