#!/usr/bin/env bash
# usage: kernel-matrix-report.sh RESULTS KERNEL...
# Prints the kernel matrix's table (Markdown) from RESULTS/KERNEL/ as the VMs left it: one
# row a kernel with its VM's wall time, one column a step (libtest's passed/total), then
# each program's verifier figures from the smoke test's agent log. Exits 1 if any step
# failed or did not run.
set -uo pipefail
results=$1
shift

# "passed/total" of a libtest log, from its "test result:" lines.
counts() {
  awk '/^test result:/ { for (i = 1; i < NF; i++) {
         if ($(i + 1) ~ /^passed/) p += $i
         if ($(i + 1) ~ /^failed/) f += $i } }
       END { if (p + f) printf "%d/%d", p, p + f }' "$1" 2>/dev/null
}

# The steps the host planned for the VM of $1: ready, smoke and each suite of its plan.
planned() {
  local suites=() s
  # shellcheck source=/dev/null
  source "$1/plan" 2>/dev/null
  printf '%s\n' ready smoke
  for s in "${suites[@]}"; do echo "${s%%=*}"; done
}

# The cell of step $2 in $1: "13/13", "12/13 FAILED", "timed out", "not run" (planned, but
# the VM ended first), "-" (not planned); status 1 unless the step passed or was not planned.
cell() {
  local rc n
  if [ ! -e "$1/$2.rc" ]; then
    if planned "$1" | grep -qx "$2"; then
      echo "not run"
      return 1
    fi
    echo "-"
    return 0
  fi
  rc=$(cat "$1/$2.rc")
  n=$(counts "$1/$2.log")
  case $rc in
    0) echo "${n:-yes}" ;;
    124 | 137) echo "${n:+$n, }timed out" && return 1 ;;
    *) echo "${n:+$n, }FAILED" && return 1 ;;
  esac
}

# "56300 insns, 1.2 s" for program $2 from agent log $1 ("? insns" before kernel 5.16).
program_figures() {
  sed -n "s/.*$2 verified and loaded in \([0-9.]*\)\([µnm]*s\) (\([a-z0-9]*\) instructions.*/\1 \2 \3/p" "$1" \
    2>/dev/null | head -n1 |
    awk '{ t = $1; if ($2 == "ms") t /= 1000; else if ($2 == "µs") t /= 1e6; else if ($2 == "ns") t /= 1e9
           n = ($3 == "unknown") ? "?" : $3
           printf "%s insns, %.1f s", n, t }'
}

steps=()
programs=()
for k in "$@"; do
  while read -r step; do
    case " ready smoke ${steps[*]} " in *" $step "*) ;; *) steps+=("$step") ;; esac
  done < <(planned "$results/$k")
  while read -r p; do
    case " ${programs[*]} " in *" $p "*) ;; *) programs+=("$p") ;; esac
  done < <(grep -o '[a-z_]* verified and loaded' "$results/$k/smoke.agent" 2>/dev/null | cut -d' ' -f1)
done

[ "${#programs[@]}" = 0 ] || mapfile -t programs < <(printf '%s\n' "${programs[@]}" | sort)

header="| kernel | VM time | TC path | load, attach, enforce |"
rule="|---|---|---|---|"
for s in "${steps[@]}" "${programs[@]}"; do
  header+=" $s |"
  rule+="---|"
done
echo "$header"
echo "$rule"
failed=0
for k in "$@"; do
  dir=$results/$k
  cell "$dir" ready >/dev/null || failed=1
  seconds=$(cat "$dir/seconds" 2>/dev/null || echo 0)
  row="| $(cat "$dir/kernel" 2>/dev/null || echo "$k: no boot") | $((seconds / 60)) min $((seconds % 60)) s"
  row+=" | $(cat "$dir/tc-path" 2>/dev/null || echo -) |"
  row+=" $(cell "$dir" smoke) |" || failed=1
  for s in "${steps[@]}"; do
    row+=" $(cell "$dir" "$s") |" || failed=1
  done
  for p in "${programs[@]}"; do
    row+=" $(program_figures "$dir/smoke.agent" "$p") |"
  done
  echo "$row"
done
exit "$failed"
