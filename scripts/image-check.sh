#!/usr/bin/env bash
# Checks the agent's container image by running it the way deploy/ does, without a cluster
# or a registry:
#   scripts/image-check.sh           the fast check (CI, scripts/test.sh): an image made from
#                                    the already-built target/debug/egress-agent on the
#                                    runtime base, then the run-check below;
#   scripts/image-check.sh --full    builds the Dockerfile first (about 10 minutes cold on 2
#                                    cores), then the same run-check on that image.
#   EXTRA_CA=FILE                    (--full) a PEM CA the build's downloads must trust, e.g.
#                                    a TLS-intercepting proxy's: passed as EXTRA_CA_CERT.
# Base images: pulled when a registry answers; otherwise stand-ins are made from Debian
# packages (localhost/egress-standin/...: the runtime base from libc6 and libgcc-s1 as
# distroless/cc has them, the build base with debootstrap --variant=minbase) and passed to
# the Dockerfile as build arguments. Nothing is ever tagged with an upstream name.
#
# The run-check takes the DaemonSet from `kubectl kustomize deploy/` and from
# deploy/overlays/least-privilege and translates it flag by flag into `podman run`
# (privileged or capabilities, host network and PID, the host's cgroup2 read-only at
# /host/sys/fs/cgroup, a bpffs at /sys/fs/bpf with the manifest's propagation, the policy
# as a kubelet-style ConfigMap directory, the args and env), with two changes: --cgroup is
# a test cgroup below the host's, and EGRESS_LISTEN a free loopback port. It checks: the
# privileged agent attaches and is ready; an allowed and a denied destination; a deny
# event; the agent replaced by one on three capabilities (least-privilege), which adopts
# the pins with no wrong verdict while probes run throughout; a ConfigMap-style policy swap
# (the `..data` symlink) applied; a bad policy rejected and counted on /metrics with the
# old one still enforced; `uninstall` from the image under the same capabilities.
# Containers run with runc: crun 1.8 refuses a hybrid (v1 + v2) cgroup layout.
# Needs root. Test addresses only (198.51.100.0/24, 203.0.113.0/24), in namespaces of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
# Never `producer | grep -q`: grep exits at the first match, the producer dies of SIGPIPE,
# and pipefail turns the match into a failure. Matches below read all their input.

FULL=0
case "${1:-}" in
  --full) FULL=1 ;;
  "") ;;
  *) echo "usage: scripts/image-check.sh [--full]" >&2; exit 2 ;;
esac

log() { printf '== image-check: %s\n' "$*" >&2; }
die() { printf 'image-check: FAIL: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages podman runc curl iproute2 python3
[ "$FULL" = 0 ] || ensure_packages debootstrap
PODMAN=(podman --runtime runc)
# Limits podman can set: by default it asks for RLIMIT_NOFILE and RLIMIT_NPROC of 1048576,
# which root without CAP_SYS_RESOURCE (as on this project's machines) cannot raise to, and
# runc fails "setting rlimit type 6/7". This shell's open-file limit, and 16384 processes
# (far above the agent's two threads; values above ~30000 failed here too).
RUN_FLAGS=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit nproc=16384:16384)

CACHE="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/egress-enforcer"
VENV_PY="$CACHE/venv/bin/python"
[ -x "$VENV_PY" ] || scripts/validate-manifests.sh >/dev/null   # creates the venv (PyYAML)

UPSTREAM_RUNTIME=gcr.io/distroless/cc-debian12:latest
UPSTREAM_BUILD=docker.io/library/debian:bookworm-slim
STANDIN_RUNTIME=localhost/egress-standin/distroless-cc:debian12
STANDIN_BUILD=localhost/egress-standin/debian:bookworm-slim
IMAGE=localhost/egress-agent:image-check

# --- base images -------------------------------------------------------------------------
# pull_or_standin UPSTREAM STANDIN MAKER: prints the reference to build on.
pull_or_standin() {
  if timeout 60 "${PODMAN[@]}" pull -q "$1" >/dev/null 2>&1; then
    echo "$1"
    return
  fi
  if ! "${PODMAN[@]}" image exists "$2"; then
    log "no registry answers for $1: making the stand-in $2"
    "$3" "$2"
  fi
  echo "$2"
}

# The runtime base as distroless/cc-debian12 has it: glibc and libgcc_s of Debian 12, no
# shell, root's passwd entry.
make_runtime_standin() {
  local dir
  dir="$(mktemp -d)"
  (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root libc6 libgcc-s1 >/dev/null)
  mkdir "$dir/root"
  for deb in "$dir"/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
  mkdir -p "$dir/root/etc" "$dir/root/tmp"
  echo 'root:x:0:0:root:/root:/sbin/nologin' > "$dir/root/etc/passwd"
  echo 'root:x:0:' > "$dir/root/etc/group"
  tar -C "$dir/root" -c . | "${PODMAN[@]}" import -q - "$1" >/dev/null
  rm -rf "$dir"
}

# debian:bookworm-slim: a minbase bookworm with the image's apt sources (bookworm,
# bookworm-updates, bookworm-security: the Dockerfile installs llvm-22-dev from the last).
make_build_standin() {
  local dir
  dir="$(mktemp -d)"
  debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian >/dev/null
  rm -f "$dir/etc/apt/sources.list"
  cat > "$dir/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  tar -C "$dir" -c . | "${PODMAN[@]}" import -q - "$1" >/dev/null
  rm -rf "$dir"
}

RUNTIME_BASE="$(pull_or_standin "$UPSTREAM_RUNTIME" "$STANDIN_RUNTIME" make_runtime_standin)"
if [ "$FULL" = 1 ]; then
  BUILD_BASE="$(pull_or_standin "$UPSTREAM_BUILD" "$STANDIN_BUILD" make_build_standin)"
  ca_args=()
  [ -z "${EXTRA_CA:-}" ] || ca_args=(--build-arg "EXTRA_CA_CERT=$(cat "$EXTRA_CA")")
  log "building the Dockerfile on $BUILD_BASE and $RUNTIME_BASE (about 10 minutes cold)"
  # Docker's image format: OCI has no SHELL, and the Dockerfile's RUNs rely on pipefail.
  "${PODMAN[@]}" build --pull=never --format docker -q -t "$IMAGE" \
    --build-arg "BUILD_BASE=$BUILD_BASE" --build-arg "RUNTIME_BASE=$RUNTIME_BASE" \
    --build-arg "EGRESS_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
    "${ca_args[@]}" . >/dev/null
else
  [ -x target/debug/egress-agent ] || die "build target/debug/egress-agent first (cargo build -p egress-agent)"
  ctx="$(mktemp -d)"
  cp target/debug/egress-agent "$ctx/"
  # The Dockerfile's runtime stage, with the binary already built.
  printf 'FROM %s\nCOPY egress-agent /egress-agent\nENTRYPOINT ["/egress-agent"]\n' \
    "$RUNTIME_BASE" > "$ctx/Containerfile"
  "${PODMAN[@]}" build --pull=never -q -t "$IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
fi
log "image $IMAGE: $("${PODMAN[@]}" run --rm "${RUN_FLAGS[@]}" "$IMAGE" --version)"

# --- the world: namespaces, servers, a test cgroup, a bpffs, a ConfigMap directory -------
TAG="eic$$"
CG2="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)"
TESTCG="$TAG"
WORK="$(mktemp -d)"
PINS="$WORK/bpffs"
CM="$WORK/configmap"
PORT=$((20000 + $$ % 10000))
CONTAINERS=()
SERVER_PID=
PROBER=

cleanup() {
  set +e
  if [ -n "$PROBER" ]; then touch "$WORK/stop-probes"; wait "$PROBER"; fi
  for c in "${CONTAINERS[@]}"; do "${PODMAN[@]}" rm -f -t 0 "$c" >/dev/null 2>&1; done
  if mountpoint -q "$PINS"; then
    "${PODMAN[@]}" run --rm "${RUN_FLAGS[@]}" --privileged -v "$PINS:/sys/fs/bpf" "$IMAGE" uninstall \
      --pin-root /sys/fs/bpf/egress-enforcer >/dev/null 2>&1
    umount "$PINS"
  fi
  [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null
  ip netns del "$TAG-c" 2>/dev/null
  ip netns del "$TAG-s" 2>/dev/null
  rmdir "$CG2/$TESTCG" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

ALLOWED=203.0.113.10
DENIED=203.0.113.20
ip netns add "$TAG-c"
ip netns add "$TAG-s"
ip link add "$TAG-c" netns "$TAG-c" type veth peer name "$TAG-s" netns "$TAG-s"
ip -n "$TAG-c" addr add 198.51.100.2/24 dev "$TAG-c"
ip -n "$TAG-s" addr add 198.51.100.1/24 dev "$TAG-s"
ip -n "$TAG-s" addr add "$ALLOWED/32" dev lo
ip -n "$TAG-s" addr add "$DENIED/32" dev lo
for ns in c s; do ip -n "$TAG-$ns" link set lo up; ip -n "$TAG-$ns" link set "$TAG-$ns" up; done
ip -n "$TAG-c" route add 203.0.113.0/24 via 198.51.100.1
# A server on both addresses, port 443: accepts and closes.
nsenter --net="/run/netns/$TAG-s" python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 443)); s.listen(64)
while True: s.accept()[0].close()' &
SERVER_PID=$!
mkdir "$CG2/$TESTCG" "$PINS" "$CM"
mount -t bpf bpf "$PINS"
mount --make-shared "$PINS"

# The policy as the kubelet lays out a ConfigMap volume: policy.yaml -> ..data/policy.yaml,
# ..data -> ..<timestamp>/; an update writes a new directory and renames a new ..data link
# over the old one.
configmap() {
  local dir="..$(date +%Y_%m_%d_%H_%M_%S.%N)"
  mkdir "$CM/$dir"
  printf '%s' "$1" > "$CM/$dir/policy.yaml"
  ln -sfn "$dir" "$CM/..data_tmp"
  mv -T "$CM/..data_tmp" "$CM/..data"
  [ -L "$CM/policy.yaml" ] || ln -s ..data/policy.yaml "$CM/policy.yaml"
}
allow_only() { printf 'mode: audit\nallow:\n  - cidr: %s/32\n    ports: [HTTPS:443]\n' "$1"; }
configmap "$(allow_only "$ALLOWED")"

# --- the DaemonSet, translated ------------------------------------------------------------
# podman_flags KUSTOMIZATION: the `podman run` arguments (flags, image, args), one per line.
podman_flags() {
  kubectl kustomize "$1" > "$WORK/render.yaml"
  "$VENV_PY" - "$WORK/render.yaml" "$IMAGE" "$CG2" "$PINS" "$CM" "$TESTCG" "$PORT" <<'EOF'
import os, sys, yaml
render, image, cg2, pins, cm, testcg, port = sys.argv[1:]
with open(render) as f:
    ds = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
(c,) = pod["containers"]
out = []
if pod.get("hostNetwork"): out.append("--network=host")
if pod.get("hostPID"): out.append("--pid=host")
sc = c.get("securityContext", {})
if sc.get("privileged"):
    out.append("--privileged")
caps = sc.get("capabilities", {})
out += [f"--cap-drop={x}" for x in caps.get("drop", [])]
out += [f"--cap-add={x}" for x in caps.get("add", [])]
if sc.get("seccompProfile", {}).get("type") == "Unconfined": out.append("--security-opt=seccomp=unconfined")
if sc.get("appArmorProfile", {}).get("type") == "Unconfined": out.append("--security-opt=apparmor=unconfined")
if sc.get("readOnlyRootFilesystem"): out.append("--read-only")
if sc.get("allowPrivilegeEscalation") is False: out.append("--security-opt=no-new-privileges")
if "runAsUser" in sc: out.append(f"--user={sc['runAsUser']}")
volumes = {v["name"]: v for v in pod["volumes"]}
propagation = {"Bidirectional": "rshared", "HostToContainer": "rslave", None: "rprivate"}
for m in c["volumeMounts"]:
    v = volumes[m["name"]]
    if "configMap" in v: src = cm
    elif v.get("hostPath", {}).get("path") == "/sys/fs/cgroup": src = cg2
    elif v.get("hostPath", {}).get("path") == "/sys/fs/bpf": src = pins
    elif "hostPath" in v:
        # The node's files the agent only reads (the kubelet's kubeconfig, the pods' log
        # directories): empty stand-ins of the same kind, under the check's own directory.
        host = v["hostPath"]
        src = os.path.join(os.path.dirname(cm), "host" + host["path"])
        if host.get("type") == "File":
            os.makedirs(os.path.dirname(src), exist_ok=True)
            open(src, "a").close()
        else:
            os.makedirs(src, exist_ok=True)
    else: sys.exit(f"image-check: no translation for volume {m['name']}")
    opts = ["ro"] if m.get("readOnly") else []
    opts.append(propagation[m.get("mountPropagation")])
    out.append(f"--volume={src}:{m['mountPath']}:{','.join(opts)}")
for e in c.get("env", []):
    if e["name"] == "EGRESS_LISTEN": value = f"127.0.0.1:{port}"
    elif "value" in e: value = e["value"]
    elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.hostIP": value = "127.0.0.1"
    else: sys.exit(f"image-check: no translation for env {e['name']}")
    out.append(f"--env={e['name']}={value}")
args = list(c["args"])
i = args.index("--cgroup")
args[i + 1] = args[i + 1].rstrip("/") + "/" + testcg
if any(a.startswith("--listen") for a in args): sys.exit("image-check: --listen in args; check the loopback base")
print("\n".join(out + [image] + args))
EOF
}
mapfile -t PRIVILEGED < <(podman_flags deploy)
mapfile -t LEAST < <(podman_flags deploy/overlays/least-privilege)
[ "${#PRIVILEGED[@]}" -gt 5 ] && [ "${#LEAST[@]}" -gt 5 ] || die "translating the DaemonSet failed"

# --- probes ------------------------------------------------------------------------------
# probe ADDR SECONDS: connect to ADDR:443 from the client namespace, inside the test cgroup.
probe() {
  bash -c "echo \$\$ > '$CG2/$TESTCG/cgroup.procs' && exec nsenter --net='/run/netns/$TAG-c' \
    timeout $2 bash -c '</dev/tcp/$1/443'" 2>/dev/null
}
expect() { # expect allowed|denied ADDR WHAT
  if [ "$1" = allowed ]; then probe "$2" 5 || die "$3: $2 should be allowed"
  else ! probe "$2" 2 || die "$3: $2 should be denied"; fi
}
wait_ready() { # wait_ready CONTAINER
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && return
    "${PODMAN[@]}" container exists "$1" && [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$1")" = true ] ||
      { "${PODMAN[@]}" logs "$1" >&2; die "$1 exited before it was ready"; }
    sleep 0.5
  done
  "${PODMAN[@]}" logs "$1" >&2
  die "$1 not ready within 60 s"
}
wait_log() { # wait_log CONTAINER REGEX
  for _ in $(seq 120); do
    "${PODMAN[@]}" logs "$1" 2>&1 | grep -E -- "$2" >/dev/null && return
    sleep 0.5
  done
  "${PODMAN[@]}" logs "$1" >&2
  die "$1 never logged: $2"
}
start() { # start NAME FLAGS...
  local name="$1"
  shift
  CONTAINERS+=("$name")
  "${PODMAN[@]}" run -d "${RUN_FLAGS[@]}" --name "$name" "$@" >/dev/null
}

# Enforce mode: EGRESS_MODE as deploy/overlays/enforce sets it.
ENFORCE=(--env=EGRESS_MODE=enforce)

# 1. The base's privileged agent: attach, verdicts, an event, /readyz.
A="$TAG-privileged"
start "$A" "${ENFORCE[@]}" "${PRIVILEGED[@]}"
wait_ready "$A"
log "privileged agent ready: $("${PODMAN[@]}" logs "$A" 2>&1 | grep -o 'attached: .*' | head -1)"
expect allowed "$ALLOWED" "privileged agent"
expect denied "$DENIED" "privileged agent"
wait_log "$A" "^\\{.*\"action\":\"deny\".*\"dst\":\"${DENIED//./\\.}\""
log "allowed $ALLOWED, denied $DENIED, deny event logged"

# 2. Replaced by an agent on capabilities only, with probes throughout.
PROBES="$WORK/probes"
(
  while [ ! -e "$WORK/stop-probes" ]; do
    if probe "$ALLOWED" 5; then echo ok; else echo "WRONG: $ALLOWED refused"; fi
    if probe "$DENIED" 1; then echo "WRONG: $DENIED allowed"; else echo ok; fi
  done
) > "$PROBES" &
PROBER=$!
sleep 2
"${PODMAN[@]}" stop -t 15 "$A" >/dev/null
"${PODMAN[@]}" logs "$A" 2>&1 | grep "left the pinned programs enforcing" >/dev/null || die "$A did not leave its programs pinned"
sleep 2
B="$TAG-least-privilege"
start "$B" "${ENFORCE[@]}" "${LEAST[@]}"
wait_ready "$B"
wait_log "$B" '"event":"took_over"'
sleep 2
touch "$WORK/stop-probes"
wait "$PROBER"
PROBER=
grep -q WRONG "$PROBES" && die "wrong verdicts during the handover: $(grep -c WRONG "$PROBES") of $(wc -l < "$PROBES")"
log "handover to the least-privilege agent ($(grep -o 'cap-add=[A-Z_]*' <<< "${LEAST[*]}" | cut -d= -f2 | tr '\n' ' ')): $(wc -l < "$PROBES") probes, no wrong verdict"

# 3. A ConfigMap-style swap.
configmap "$(allow_only "$DENIED")"
wait_log "$B" '"event":"policy_reloaded"'
expect allowed "$DENIED" "after the policy swap"
expect denied "$ALLOWED" "after the policy swap"
log "ConfigMap swap applied"

# 4. A bad policy: rejected, counted, the running one stays.
configmap "$(printf 'mode: audit\nallow:\n  - cidr: 203.0.113.21/24\n')"
wait_log "$B" '"event":"policy_reload_rejected"'
reloads="$(curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^egress_policy_reloads_total')" ||
  die "no egress_policy_reloads_total on /metrics"
grep -qx 'egress_policy_reloads_total{result="rejected"} 1' <<< "$reloads" ||
  { "${PODMAN[@]}" logs "$B" 2>&1 | grep -i reload >&2; die "not one rejected reload on /metrics: $reloads"; }
expect allowed "$DENIED" "after the bad policy"
expect denied "$ALLOWED" "after the bad policy"
log "bad policy rejected, counted on /metrics, the running one stays"

# 5. Uninstall from the image, on the same capabilities.
"${PODMAN[@]}" stop -t 15 "$B" >/dev/null
uninstall=("${LEAST[@]}")
n=$(printf '%s\n' "${uninstall[@]}" | grep -nx "$IMAGE" | cut -d: -f1)
uninstall=("${uninstall[@]:0:n}" uninstall --pin-root /sys/fs/bpf/egress-enforcer)
"${PODMAN[@]}" run --rm "${RUN_FLAGS[@]}" "${uninstall[@]}" | grep "^removed " >/dev/null ||
  die "uninstall failed"
expect allowed "$ALLOWED" "after uninstall"
expect allowed "$DENIED" "after uninstall"
log "uninstalled: nothing enforced"
log "passed"
