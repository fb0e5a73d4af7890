#!/usr/bin/env bash
# Benchmark: the whole `ptqlab ppl` process against its own forward pass (issue 14, docs/benchmarks.md
# "Whole-process perplexity"). Writes a 2-layer LLaMA-7B-shaped F32 checkpoint (hidden 4096, vocab
# 32000, 2.6 GB), then runs `ptqlab ppl --seq-len 512 --max-windows 4` (2048 tokens) on WikiText-2
# test (1.3 MB of text) while sampling the process's memory every 0.1 s. Prints, from one run:
#   forward rate    tokens / evaluation seconds (the forward passes alone, reported by ptqlab)
#   process rate    tokens / wall seconds of the whole process (start, map, tokenize, evaluate, exit)
#   peak RssAnon    the process's own memory; peak VmHWM also counts the mapped checkpoint pages
# Usage: tests/bench/bench_ppl_process.sh [WORKDIR]    (BENCH_KEEP=1 keeps the checkpoint)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ptqlab="${PTQLAB_BUILD_DIR:-$root/build}/bin/ptqlab"
work="${1:-$(mktemp -d /tmp/ptqlab-bench-ppl.XXXXXX)}"
text="$root/../shared/data/wikitext-2-raw/wiki.test.raw"
tokenizer="$root/../shared/models/stories260K/tokenizer.model"
model="$work/llama2-7b-2layers-f32"
mkdir -p "$work"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$model"' EXIT

[ -f "$model/config.json" ] ||
  "$ptqlab" synth-model --like llama-2-7b --layers 2 --dtype f32 --shards 1 --tokenizer "$tokenizer" --out "$model" >/dev/null
bytes=$(du -sb "$model" | cut -f1)
echo "ptqlab $("$ptqlab" --version 2>/dev/null || true) on $(nproc) cores; checkpoint $(awk -v b="$bytes" 'BEGIN{printf "%.2f GB", b/1e9}')"

for round in 1 2; do  # the first round may read the checkpoint from disk, the second from the page cache
  log="$work/ppl-$round.json"
  start=$(date +%s.%N)
  "$ptqlab" ppl --model "$model" --text "$text" --seq-len 512 --max-windows 4 --json >"$log" 2>/dev/null &
  pid=$!
  anon=0 hwm=0
  while kill -0 "$pid" 2>/dev/null; do
    a=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    h=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$a" ] && [ "$a" -gt "$anon" ] && anon=$a
    [ -n "$h" ] && [ "$h" -gt "$hwm" ] && hwm=$h
    sleep 0.1
  done
  wait "$pid"
  end=$(date +%s.%N)
  json=$(cat "$log")
  field() { echo "$json" | sed -E "s/.*\"$1\":([0-9.e+-]+).*/\1/"; }
  awk -v s="$start" -v e="$end" -v n="$(field tokens)" -v ev="$(field eval_s)" -v tk="$(field tokenize_s)" \
      -v a="$anon" -v h="$hwm" -v b="$bytes" -v r="$round" -v ppl="$(field ppl)" \
    'BEGIN { w = e - s;
             printf "round %d: ppl %.4f, %d tokens; wall %.2f s (evaluation %.2f s, tokenizing %.2f s, rest %.2f s)\n",
                    r, ppl, n, w, ev, tk, w - ev - tk;
             printf "  forward rate %.1f tokens/s, process rate %.1f tokens/s = %.0f%% of it\n", n / ev, n / w, 100 * ev / w;
             printf "  peak RssAnon %.3f GB, peak VmHWM %.3f GB = %.2f x the checkpoint\n",
                    a * 1024 / 1e9, h * 1024 / 1e9, h * 1024 / b }'
done
