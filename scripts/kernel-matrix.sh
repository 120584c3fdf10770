#!/usr/bin/env bash
# Runs the kernel programs on other kernels: Debian's generic 5.10 (bullseye), 6.1
# (bookworm) and 6.12 (bookworm-security) images under qemu (TCG), each booting this
# machine's root file system read-only (virtio-9p, under a tmpfs overlay). In each VM: load
# and attach (cgroup, and TC on a veth) with an enforcement smoke test, the BPF_PROG_TEST_RUN
# suites `verdict` and `dns_kernel`, and with --e2e the end-to-end suites of tests/. Prints
# one table, kernel x suite, with each program's verifier figures; exits non-zero on any
# failure.
#
# usage: scripts/kernel-matrix.sh [--kernels 5.10,6.1,6.12] [--e2e[=5.10,...]]
#                                 [--e2e-tests FILTER] [--timeout MINUTES]
#
# Kernel packages come from Debian through a private APT configuration (its own sources,
# lists and archive cache under the cache directory); the machine's APT sources are not
# touched. Downloads, unpacked kernels and initramfs images are kept in
# $EGRESS_KMATRIX_CACHE (default ~/.cache/egress-kernel-matrix): a warm run only boots.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { printf '== %s\n' "$*" >&2; }
die() {
  printf 'kernel-matrix: %s\n' "$*" >&2
  exit 2
}

kernels=5.10,6.1,6.12
e2e=
e2e_filter=
timeout_min=40
while [ $# -gt 0 ]; do
  case $1 in
    --kernels) kernels=${2:?--kernels needs a list}; shift ;;
    --kernels=*) kernels=${1#*=} ;;
    --e2e) e2e=all ;;
    --e2e=*) e2e=${1#*=} ;;
    --e2e-tests) e2e_filter=${2:?--e2e-tests needs a filter}; shift ;;
    --timeout) timeout_min=${2:?--timeout needs minutes}; shift ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "run as root (it installs qemu and busybox-static)"

cache=${EGRESS_KMATRIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/egress-kernel-matrix}
mkdir -p "$cache"

# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages qemu-system-x86 busybox-static xz-utils iproute2 bpftool jq

# The package each kernel comes from: the newest of the pattern that APT lists.
declare -A kernel_pattern=(
  [5.10]='^linux-image-5\.10\.0-[0-9]+-amd64$'
  [6.1]='^linux-image-6\.1\.0-[0-9]+-amd64$'
  [6.12]='^linux-image-6\.12\.[0-9]+\+deb12-amd64$'
)

# A private APT: its own sources (bookworm, bookworm-security, bullseye, bullseye-security
# from the Debian mirror, signed by the archive keyring already on the machine), lists and
# archives; the machine's dpkg status is only read.
apt_dir=$cache/apt
export APT_CONFIG=$apt_dir/apt.conf
setup_apt() {
  mkdir -p "$apt_dir"/{etc/apt.conf.d,etc/preferences.d,state/lists/partial,archives/partial}
  local key=/usr/share/keyrings/debian-archive-keyring.gpg
  cat >"$apt_dir/etc/sources.list" <<EOF
deb [signed-by=$key] http://deb.debian.org/debian bookworm main
deb [signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=$key] http://deb.debian.org/debian bullseye main
deb [signed-by=$key] http://deb.debian.org/debian-security bullseye-security main
EOF
  cat >"$APT_CONFIG" <<EOF
Dir::Etc "$apt_dir/etc/";
Dir::Etc::SourceList "sources.list";
Dir::Etc::SourceParts "$apt_dir/etc/sources.list.d/";
Dir::Etc::Parts "apt.conf.d/";
Dir::Etc::Preferences "preferences";
Dir::Etc::PreferencesParts "preferences.d/";
Dir::State "$apt_dir/state/";
Dir::State::status "/var/lib/dpkg/status";
Dir::Cache "$apt_dir/";
Dir::Cache::archives "archives/";
APT::Architecture "amd64";
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
  mkdir -p "$apt_dir/etc/sources.list.d"
}

# The package name of kernel $1, refreshing the private lists when they are a day old or
# list no such package.
kernel_package() {
  local pattern=${kernel_pattern[$1]:-} lists=$apt_dir/state/lists pkg
  [ -n "$pattern" ] || die "no kernel $1 (known: ${!kernel_pattern[*]})"
  if [ -z "$(find "$lists" -maxdepth 1 -name '*_Packages' -mmin -1440 2>/dev/null)" ]; then
    log "updating the private APT lists ($apt_dir)"
    apt-get update -q >&2
  fi
  pkg=$(apt-cache search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n1)
  [ -n "$pkg" ] || die "APT lists no package matching $pattern"
  echo "$pkg"
}

# Unpacks kernel package $1 into $cache/kernels/$1 (vmlinuz, modules uncompressed and
# indexed by busybox depmod), once.
unpack_kernel() {
  local pkg=$1 dir=$cache/kernels/$1 ver deb
  [ -e "$dir/.done" ] && return
  log "fetching $pkg"
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$apt_dir/archives" && apt-get download -q "$pkg" >&2)
  deb=$(find "$apt_dir/archives" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1)
  [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $apt_dir/archives"
  dpkg-deb -x "$deb" "$dir/root"
  ver=$(ls "$dir/root/lib/modules")
  find "$dir/root/lib/modules/$ver" -name '*.ko.xz' -print0 | xargs -0 -r -P2 -n64 xz -d
  busybox depmod -b "$dir/root" "$ver"
  ln -s "root/boot/vmlinuz-$ver" "$dir/vmlinuz"
  echo "$ver" >"$dir/version"
  rm -f "$deb"
  touch "$dir/.done"
}

# Builds $cache/kernels/$1/initrd: busybox, the modules 9p and overlay need (with their
# dependencies from modules.dep) and scripts/lib/kernel-matrix-init.sh as /init. Rebuilt when
# the init script changes.
build_initrd() {
  local dir=$cache/kernels/$1 ver stamp work m dep
  ver=$(cat "$dir/version")
  stamp=$(sha256sum scripts/lib/kernel-matrix-init.sh /bin/busybox | sha256sum | cut -c1-16)
  [ "$(cat "$dir/initrd.stamp" 2>/dev/null)" = "$stamp" ] && return
  work=$(mktemp -d)
  mkdir -p "$work"/{bin,proc,sys,dev,lib/modules/"$ver"}
  cp /bin/busybox "$work/bin/busybox"
  cp scripts/lib/kernel-matrix-init.sh "$work/init"
  chmod +x "$work/init"
  local mods=$dir/root/lib/modules/$ver
  cp "$mods"/modules.* "$work/lib/modules/$ver/"
  for m in virtio_pci 9pnet_virtio 9p overlay; do
    dep=$(grep -E "/$m\.ko:" "$mods/modules.dep" || true)
    for f in $(echo "$dep" | tr -d ':'); do
      mkdir -p "$work/lib/modules/$ver/$(dirname "$f")"
      cp "$mods/$f" "$work/lib/modules/$ver/$f"
    done
  done
  (cd "$work" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$dir/initrd"
  rm -rf "$work"
  echo "$stamp" >"$dir/initrd.stamp"
}

# The test executables of `cargo test --no-run ARGS` as "name=path" lines.
test_executables() {
  cargo test -q --no-run --message-format=json "$@" |
    jq -r 'select(.reason == "compiler-artifact" and .target.kind == ["test"] and .executable)
           | "\(.target.name)=\(.executable)"'
}

# Boots kernel $1 (package dir $2) with the plan in $3; its results land in $3.
boot() {
  local name=$1 dir=$2 out=$3
  cat >"$out/start" <<EOF
exec /bin/bash $repo/scripts/lib/kernel-matrix-guest.sh /kmatrix-out
EOF
  timeout -k 10 "$((timeout_min * 60))" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 3G -nographic -no-reboot \
    -kernel "$dir/vmlinuz" -initrd "$dir/initrd" \
    -append "console=ttyS0 panic=-1 quiet" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$out",mount_tag=results,security_model=none \
    -nic none </dev/null >"$out/console.log" 2>&1 || true
  [ -e "$out/smoke.rc" ] || log "$name: the VM ended before the smoke test (see $out/console.log)"
}

started=$SECONDS
setup_apt
IFS=, read -r -a kernel_list <<<"$kernels"
declare -A kernel_dir
for k in "${kernel_list[@]}"; do
  pkg=$(kernel_package "$k")
  unpack_kernel "$pkg"
  build_initrd "$pkg"
  kernel_dir[$k]=$cache/kernels/$pkg
done

log "building the agent, egress-probe and the test executables"
cargo build -q -p egress-agent -p egress-tests --bins
agent_bin=$repo/target/debug/egress-agent
probe_bin=$repo/target/debug/egress-probe
mapfile -t program_suites < <(test_executables -p egress-agent --test verdict --test dns_kernel)
[ "${#program_suites[@]}" = 2 ] || die "building the verdict and dns_kernel tests failed"
e2e_suites=()
if [ -n "$e2e" ]; then
  mapfile -t e2e_suites < <(test_executables -p egress-tests --tests)
  [ "${#e2e_suites[@]}" -gt 0 ] || die "building the end-to-end tests failed"
fi

results=$cache/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results"
# Each run's logs stay for a look; the ten newest are kept.
find "$cache/results" -mindepth 1 -maxdepth 1 -type d | sort | head -n -10 | xargs -r rm -rf
for k in "${kernel_list[@]}"; do
  dir=${kernel_dir[$k]}
  pkg=$(basename "$dir")
  out=$results/$k
  mkdir -p "$out"
  suites=()
  for s in "${program_suites[@]}"; do
    suites+=("${s%%=*}=$repo/egress-agent ${s#*=}")
  done
  if [ "$e2e" = all ] || [[ ",$e2e," == *",$k,"* ]]; then
    for s in "${e2e_suites[@]}"; do
      suites+=("${s%%=*}=$repo/tests ${s#*=} $e2e_filter")
    done
  fi
  {
    printf 'modules=%q\nagent_bin=%q\nprobe_bin=%q\nsuite_timeout=%q\n' \
      "$dir/root/lib/modules/$(cat "$dir/version")" "$agent_bin" "$probe_bin" \
      "$((timeout_min * 60))"
    printf 'suites=('
    printf '%q ' "${suites[@]}"
    printf ')\n'
  } >"$out/plan"
  log "$k: booting $pkg ($(date -u +%H:%M:%S))"
  t0=$SECONDS
  boot "$k" "$dir" "$out"
  echo "$((SECONDS - t0))" >"$out/seconds"
done

status=0
scripts/lib/kernel-matrix-report.sh "$results" "${kernel_list[@]}" || status=1
log "results in $results; $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s"
exit "$status"
