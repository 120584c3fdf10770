#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 20) from a copy of its seed corpus: the short,
# bounded run scripts/test.sh makes. Longer runs, and replaying a crash: fuzz/README.md.
# Needs cargo-fuzz (scripts/setup.sh installs it) and the nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-20}
declare -A max_len=([dns_answer]=4096 [dns_wire]=2048)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for target in dns_answer dns_wire; do
  echo "== fuzz $target: ${seconds} s from seeds/$target" >&2
  mkdir -p "$work/$target"
  cp "seeds/$target"/* "$work/$target/"
  # A crash fails the run and leaves its input in fuzz/artifacts/$target/.
  cargo +nightly fuzz run "$target" "$work/$target" -- \
    -max_total_time="$seconds" -max_len="${max_len[$target]}"
done
