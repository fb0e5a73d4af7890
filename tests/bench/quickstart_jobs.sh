#!/usr/bin/env bash
# Benchmark: the quickstart experiment with --jobs 1 and --jobs 2 (and more if given), side by side,
# wall time and CPU time (user + sys of the whole process tree). No on-disk cache, --force, fresh
# output directories, so every run does the same work.
# Usage: tests/bench/quickstart_jobs.sh [JOBS...]   (default: 1 2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ptqlab="${PTQLAB_BUILD_DIR:-$root/build}/bin/ptqlab"
exp="$root/experiments/quickstart.yaml"
jobs_list=("$@")
[ ${#jobs_list[@]} -gt 0 ] || jobs_list=(1 2)
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
printf '%-6s %10s %10s %12s\n' jobs "wall (s)" "CPU (s)" "CPU/wall"
for j in "${jobs_list[@]}"; do
  TIMEFORMAT="%R %U %S"
  t=$( { time "$ptqlab" run "$exp" --out "$out/j$j" --jobs "$j" --force --no-cache >/dev/null 2>&1; } 2>&1 )
  read -r wall user sys <<<"$t"
  awk -v j="$j" -v w="$wall" -v u="$user" -v s="$sys" 'BEGIN { printf "%-6s %10.2f %10.2f %12.2f\n", j, w, u + s, (u + s) / w }'
done
