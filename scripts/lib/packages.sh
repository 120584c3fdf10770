# shellcheck shell=bash
# ensure_packages PKG...: installs the Debian packages that are not installed yet (one
# apt-get call, none at all on a warm machine). Sourced by scripts/setup.sh and benches/run.sh.
ensure_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    printf '== installing %s\n' "${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}
