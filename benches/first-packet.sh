#!/usr/bin/env bash
# First-packet benchmark for DNS learning: does the first SYN to a freshly resolved address
# pass, with both cores busy?
#
# A client namespace in an enforced cgroup resolves N fresh names (AAAA over UDP, from
# dnsmasq in a server namespace) and connects to each answer at once; the agent enforces
# `*.bench.example.com: [TCP:443]`, so every address is allowed only through what the
# kernel learned from the answer. A SYN sent before the address is learned is dropped and
# retransmitted by Linux after 1 s: such connects take > 900 ms, and each dropped SYN is
# also a deny event of the agent. No timing is asserted; the script prints a table.
#
# usage: benches/first-packet.sh [--names N] [--busy N]
#   --names N  fresh names to resolve and connect to (default 2000)
#   --busy N   busy loops competing for the CPUs meanwhile (default 2)
# Needs root, iproute2, dnsmasq (/usr/sbin/dnsmasq) and jq. Builds the agent and the probe
# unless EGRESS_AGENT_BIN and EGRESS_PROBE_BIN point at built ones. Everything it creates
# (namespaces, cgroup, processes, files) is removed when it ends, also on failure or Ctrl-C.
set -euo pipefail

names=2000
busy=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --names) names=$2; shift 2 ;;
        --busy) busy=$2; shift 2 ;;
        *) echo "usage: $0 [--names N] [--busy N]" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly ROOT
readonly DNSMASQ=/usr/sbin/dnsmasq
readonly ZONE=bench.example.com
readonly CLIENT_V6=2001:db8:1::1
readonly SERVER_V6=2001:db8:1::2
# Name K resolves to ${PREFIX}K (hex); the whole /64 is local to the server namespace.
readonly PREFIX=2001:db8:100::
readonly PORT=443
readonly SLOW_US=900000
readonly ATTACH_TIMEOUT=60

[[ $EUID -eq 0 ]] || { echo "$0: needs root" >&2; exit 1; }
for tool in ip jq "$DNSMASQ"; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found" >&2; exit 1; }
done

if [[ -n ${EGRESS_AGENT_BIN:-} && -n ${EGRESS_PROBE_BIN:-} ]]; then
    agent_bin=$EGRESS_AGENT_BIN
    probe_bin=$EGRESS_PROBE_BIN
else
    (cd "$ROOT" && cargo build --quiet -p egress-agent -p egress-tests --bins)
    agent_bin=$ROOT/target/debug/egress-agent
    probe_bin=$ROOT/target/debug/egress-probe
fi

readonly ID=$$
readonly CLIENT_NS=efp-$ID-c SERVER_NS=efp-$ID-s
cgroup2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[[ -n $cgroup2 ]] || { echo "$0: no cgroup2 filesystem is mounted" >&2; exit 1; }
readonly CGROUP=$cgroup2/egress-first-packet-$ID
work=$(mktemp -d /tmp/egress-first-packet.XXXXXX)
# The agent's own pin root on a bpffs it mounts here, away from /sys/fs/bpf.
mkdir "$work/bpf"
pids=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -d $CGROUP ]]; then
        echo 1 >"$CGROUP/cgroup.kill" 2>/dev/null || true
        for _ in $(seq 100); do
            rmdir "$CGROUP" 2>/dev/null && break
            sleep 0.05
        done
    fi
    ip netns delete "$CLIENT_NS" 2>/dev/null || true
    ip netns delete "$SERVER_NS" 2>/dev/null || true
    [[ -d $work/bpf/egress-enforcer ]] && "$agent_bin" uninstall --pin-root "$work/bpf/egress-enforcer" >/dev/null
    mountpoint -q "$work/bpf" && umount -l "$work/bpf"
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits up to $2 seconds for a line matching $3 in file $1.
wait_for_line() {
    local file=$1 timeout=$2 pattern=$3
    for _ in $(seq $((timeout * 20))); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$0: no \"$pattern\" in $file after ${timeout}s:" >&2
    cat "$file" >&2
    return 1
}

# Waits until veth $2 in namespace $1 carries traffic: carrier changes apply
# asynchronously, and until then the link may have the noop qdisc or no ff00::/8 route.
wait_link_ready() {
    local ns=$1 dev=$2
    for _ in $(seq 100); do
        if ip -n "$ns" link show dev "$dev" | grep -q 'state UP' &&
            ! ip -n "$ns" link show dev "$dev" | grep -q 'qdisc noop' &&
            [[ -n $(ip -n "$ns" -6 route show table local type multicast dev "$dev") ]]; then
            return 0
        fi
        sleep 0.05
    done
    echo "$0: $dev in $ns is not ready" >&2
    return 1
}

echo "topology: $CLIENT_NS -> $SERVER_NS, $names names under $ZONE" >&2
ip netns add "$CLIENT_NS"
ip netns add "$SERVER_NS"
ip -n "$CLIENT_NS" link set lo up
ip -n "$SERVER_NS" link set lo up
ip link add "efp${ID}a" netns "$CLIENT_NS" type veth peer name "efp${ID}b" netns "$SERVER_NS"
ip -n "$CLIENT_NS" link set "efp${ID}a" up
ip -n "$SERVER_NS" link set "efp${ID}b" up
ip -n "$CLIENT_NS" -6 addr add "$CLIENT_V6/64" dev "efp${ID}a" nodad
ip -n "$SERVER_NS" -6 addr add "$SERVER_V6/64" dev "efp${ID}b" nodad
ip -n "$CLIENT_NS" -6 route add default via "$SERVER_V6"
ip -n "$SERVER_NS" -6 route add local "${PREFIX}/64" dev lo
wait_link_ready "$CLIENT_NS" "efp${ID}a"
wait_link_ready "$SERVER_NS" "efp${ID}b"

# A configuration file, not a hosts file: dnsmasq reads it before it drops root.
for k in $(seq "$names"); do
    printf 'host-record=name%d.%s,%s%x\n' "$k" "$ZONE" "$PREFIX" "$k"
done >"$work/records.conf"
sed 's/^host-record=\([^,]*\),.*/\1/' "$work/records.conf" >"$work/names"

ip netns exec "$SERVER_NS" "$DNSMASQ" --keep-in-foreground --no-resolv --no-hosts \
    --conf-file="$work/records.conf" --pid-file --bind-interfaces \
    --listen-address="$SERVER_V6" --local-ttl=300 --cache-size=0 --log-facility=- \
    2>"$work/dnsmasq.log" &
pids+=($!)
wait_for_line "$work/dnsmasq.log" 10 "started, version"

ip netns exec "$SERVER_NS" "$probe_bin" serve-tcp :: "$PORT" >"$work/server.out" &
pids+=($!)
wait_for_line "$work/server.out" 10 listening

cat >"$work/policy.yaml" <<EOF
mode: enforce
allow:
  - fqdn: "*.$ZONE"
    ports: [TCP:$PORT]
dns:
  resolvers: [$SERVER_V6]
EOF
mkdir "$CGROUP"
RUST_LOG=info "$agent_bin" run --config "$work/policy.yaml" --cgroup "$CGROUP" --listen 127.0.0.1:0 \
    --pin-root "$work/bpf/egress-enforcer" \
    >"$work/events.jsonl" 2>"$work/agent.log" &
agent_pid=$!
pids+=("$agent_pid")
wait_for_line "$work/agent.log" "$ATTACH_TIMEOUT" "attached:"

for _ in $(seq "$busy"); do
    sh -c 'while :; do :; done' &
    pids+=($!)
done

echo "running: $names resolve-and-connects, $busy busy loops" >&2
# The probe joins the cgroup through an inherited descriptor: inside `ip netns exec` the
# cgroup2 mount is hidden.
exec {cgroup_fd}<"$CGROUP"
started=$EPOCHREALTIME
ip netns exec "$CLIENT_NS" "$probe_bin" --cgroup "/proc/self/fd/$cgroup_fd" resolve-connect \
    --names-file "$work/names" "$PORT" --server "$SERVER_V6" --type AAAA >"$work/results.jsonl"
elapsed=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
exec {cgroup_fd}<&-

kill -TERM "$agent_pid"
wait "$agent_pid" || true
dns_line=$(grep -o 'dns: answers.*' "$work/agent.log" || echo "(no dns counters line)")
denied=$(jq -s '[.[] | select(.action == "deny")] | length' "$work/events.jsonl")

# Nearest-rank percentile $2 (0-100) of the numbers on stdin.
percentile() {
    sort -n | awk -v p="$1" 'NF { v[++n] = $1 } END {
        if (n == 0) { print "-"; exit }
        i = int((p * n + 99) / 100); if (i < 1) i = 1; print v[i] }'
}
stats_row() {
    local field=$1 values
    values=$(jq -r --arg f "$field" 'select(.[$f] != null) | .[$f]' "$work/results.jsonl")
    printf '| %-10s | %9s | %9s | %9s |\n' "$field" \
        "$(percentile 50 <<<"$values")" "$(percentile 99 <<<"$values")" \
        "$(percentile 100 <<<"$values")"
}

iterations=$(wc -l <"$work/results.jsonl")
failures=$(jq -s '[.[] | select(.ok != true)] | length' "$work/results.jsonl")
slow=$(jq -s --argjson slow "$SLOW_US" '[.[] | select((.connect_us // 0) > $slow)] | length' \
    "$work/results.jsonl")
cat <<EOF

First-packet benchmark: $names fresh names under *.$ZONE, AAAA over UDP, $busy busy loops on $(nproc) CPUs, $(uname -r)

| metric                                  | value |
|-----------------------------------------|-------|
| iterations                              | $iterations |
| connect failures                        | $failures |
| connects slower than 900 ms (SYN lost)  | $slow |
| packets the enforcer denied             | $denied |
| wall time (s)                           | $elapsed |

| microseconds | p50 | p99 | max |
|------------|-----------|-----------|-----------|
$(stats_row resolve_us)
$(stats_row connect_us)

agent: $dns_line
EOF
if [[ $failures -gt 0 ]]; then
    echo
    echo "failures (first 5):"
    jq -c 'select(.ok != true)' "$work/results.jsonl" | head -5
fi
