#!/usr/bin/env bash
# End-to-end figure for small-model sweeps: wall and CPU time of `ptqlab ppl` on both shipped eval
# files (about 1.1M tokens), with all threads and with one. Usage: tests/bench/ppl_wall_time.sh [MODEL_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shared="${PTQLAB_SHARED_DIR:-$root/../shared}"
model="${1:-$shared/models/stories260K}"
ptqlab="${PTQLAB_BUILD_DIR:-$root/build}/bin/ptqlab"
files=("$shared/data/tinystories/valid.txt" "$shared/data/wikitext-2-raw/wiki.test.raw")

for threads in 0 1; do
  start=$(date +%s.%N)
  cpu_before=$(awk '{print $14+$15+$16+$17}' /proc/$$/stat)
  tokens=0
  for f in "${files[@]}"; do
    json=$("$ptqlab" ppl --model "$model" --text "$f" --threads "$threads" --json 2>/dev/null)
    t=$(echo "$json" | sed -E 's/.*"tokens":([0-9]+).*/\1/')
    p=$(echo "$json" | sed -E 's/.*"ppl":([0-9.]+).*/\1/')
    printf '  %-16s ppl %-10.4f tokens %s\n' "$(basename "$f")" "$p" "$t"
    tokens=$((tokens + t))
  done
  end=$(date +%s.%N)
  cpu_after=$(awk '{print $14+$15+$16+$17}' /proc/$$/stat)
  ticks=$(getconf CLK_TCK)
  awk -v s="$start" -v e="$end" -v c0="$cpu_before" -v c1="$cpu_after" -v hz="$ticks" -v n="$tokens" -v th="$threads" \
    'BEGIN { w = e - s; c = (c1 - c0) / hz;
             printf "threads=%s  wall %.2f s  cpu %.2f s  %d tokens  %.0f tokens/s (wall, incl. load and tokenization)\n",
                    (th == 0 ? "all" : th), w, c, n, n / w }'
done
