#!/usr/bin/env bash
# Benchmark: real LLaMA-2 sizes on one machine (issue 13, docs/benchmarks.md "Real scale").
# Writes synthetic checkpoints at LLaMA-2-7B (32 layers, F16, 3 shards, 13.5 GB) and, with
# BENCH_13B=1, LLaMA-2-13B (40 layers, F16, 26 GB) shapes; runs ptqlab on them while sampling the
# process's anonymous resident memory (RssAnon, /proc/PID/status) every 0.2 s; prints wall time,
# peak RssAnon and, where ptqlab predicts one, the predicted peak. Checkpoints are deleted at the end.
#
# The experiment runs also write a RssAnon timeline by stage (--memory-trace) to WORKDIR/memory-trace *.tsv.
#
# Usage: tests/bench/bench_scale.sh [WORKDIR]        (default: a fresh directory under /tmp)
#   BENCH_STEPS="info ppl rtn gptq resume export-ppl"
#                                     what to run on the 7B checkpoint (default: info ppl rtn);
#                                     gptq: RTN 4-bit + GPTQ 2-bit arms, --jobs 2, exported (F16);
#                                     resume: the GPTQ arm alone, SIGKILLed after BENCH_KILL_AT
#                                     layers (default half), rerun, compared with gptq's result;
#                                     export-ppl: `ptqlab ppl` on gptq's export vs the arm's ppl
#   BENCH_LAYERS=32                   decoder layers of the 7B checkpoint (fewer: a labelled partial run)
#   BENCH_13B=1                       also the 13B checkpoint (ppl --max-windows 1 and an RTN arm)
#   BENCH_KEEP=1                      keep the checkpoints
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ptqlab="${PTQLAB_BUILD_DIR:-$root/build}/bin/ptqlab"
work="${1:-$(mktemp -d /tmp/ptqlab-bench-scale.XXXXXX)}"
steps="${BENCH_STEPS:-info ppl rtn}"
layers="${BENCH_LAYERS:-32}"
text="$root/../shared/data/tinystories/valid.txt"
calib="$root/../shared/data/tinystories/calib.txt"
tokenizer="$root/../shared/models/stories260K/tokenizer.model"
mkdir -p "$work"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$work"/llama2-*' EXIT

# sample_peak PID [DIR N]: samples RssAnon of PID every 0.2 s until it exits, into $peak (kB);
# with DIR and N it SIGKILLs PID once DIR holds N layer files.
sample_peak() {
  local pid="$1" dir="${2:-}" n="${3:-0}" rss
  peak=0
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$rss" ] && [ "$rss" -gt "$peak" ] && peak=$rss
    if [ -n "$dir" ] && [ "$(ls "$dir" 2>/dev/null | grep -c '^layer-.*safetensors$')" -ge "$n" ]; then
      kill -KILL "$pid"; break
    fi
    sleep 0.2
  done
}

# measure LABEL CMD...: runs CMD, samples RssAnon of its process every 0.2 s, prints one line.
measure() {
  local label="$1"; shift
  local log="$work/$label.log" start end
  start=$(date +%s.%N)
  "$@" >"$log" 2>&1 &
  local pid=$!
  sample_peak "$pid"
  local rc=0
  wait "$pid" || rc=$?
  end=$(date +%s.%N)
  local predicted
  predicted=$(grep -o 'predicted peak memory [0-9.]* [kMG]B' "$log" | head -1 | sed 's/predicted peak memory //' || true)
  awk -v l="$label" -v p="$peak" -v s="$start" -v e="$end" -v rc="$rc" -v pr="${predicted:--}" \
    'BEGIN { printf "%-34s rc %d  wall %8.1f s  peak RssAnon %7.3f GB  predicted %s\n", l, rc, e - s, p * 1024 / 1e9, pr }'
  [ "$rc" = 0 ] || { echo "  (log: $log)"; tail -3 "$log" | sed 's/^/  /'; }
}

# measure_until_layer LABEL DIR N CMD...: as measure, but SIGKILLs CMD once DIR holds N layer files.
measure_until_layer() {
  local label="$1" dir="$2" n="$3"; shift 3
  local log="$work/$label.log"
  "$@" >"$log" 2>&1 &
  local pid=$!
  sample_peak "$pid" "$dir" "$n"
  wait "$pid" 2>/dev/null || true
  awk -v l="$label" -v p="$peak" -v n="$n" \
    'BEGIN { printf "%-34s SIGKILLed with %d layer files  peak RssAnon %7.3f GB\n", l, n, p * 1024 / 1e9 }'
}

# same_results A.h5 B.h5: metrics, bit ledgers and per-linear records bit-identical (h5diff, exact).
same_results() {
  local what rc=0
  for what in /metrics /bits /linears/layer /linears/linear /linears/weight_error /linears/output_error \
              /linears/bits_payload /linears/bits_scales /linears/bits_zeros /linears/bits_masks /linears/bits_paper; do
    h5diff -r "$1" "$2" "$what" >/dev/null 2>&1 || { echo "  differs: $what"; rc=1; }
  done
  [ "$rc" = 0 ] && echo "  $(basename "$1") and $(basename "$2"): metrics, bits and per-linear records bit-identical"
  return 0
}

experiment() {  # experiment FILE MODEL ARMS
  cat >"$1" <<YAML
name: bench-scale
model: $2
seed: 0
calibration:
  text: $calib
  nsamples: 4
  seq_len: 512
eval:
  - evaluator: perplexity
    params: {seq_len: 512, max_windows: 2}
    datasets:
      tinystories: $text
arms:
$3
YAML
}

echo "ptqlab $("$ptqlab" --version 2>/dev/null || true) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GB", $2*1024/1e9}' /proc/meminfo) RAM," \
  "transparent huge pages: $(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown)"
m7="$work/llama2-7b"
if [ ! -f "$m7/config.json" ]; then
  measure "synth-model 7B ($layers layers)" "$ptqlab" synth-model --like llama-2-7b --layers "$layers" --dtype f16 \
    --shards 3 --tokenizer "$tokenizer" --out "$m7"
fi
echo "7B checkpoint: $(du -sh "$m7" | cut -f1) on disk, $layers layers"
for step in $steps; do
  case "$step" in
    info) measure "info 7B" "$ptqlab" info --model "$m7" ;;
    ppl) measure "ppl 7B --seq-len 512 --max-windows 2" "$ptqlab" ppl --model "$m7" --text "$text" --seq-len 512 \
           --max-windows 2 ;;
    rtn)
      experiment "$work/rtn7.yaml" "$m7" "  - name: rtn4
    quantizer: {name: rtn, params: {bits: 4, group_size: 128}}"
      measure "run 7B rtn4 (layer-store f16)" "$ptqlab" run "$work/rtn7.yaml" --out "$work/rtn7" --no-cache --force \
        --layer-store f16 ;;
    gptq)
      experiment "$work/both7.yaml" "$m7" "  - name: rtn4
    quantizer: {name: rtn, params: {bits: 4, group_size: 128}}
  - name: gptq2
    quantizer: {name: gptq, params: {bits: 2, group_size: 128}}"
      measure "run 7B rtn4+gptq2 --jobs 2 (f16 store)" "$ptqlab" run "$work/both7.yaml" --out "$work/both7" --no-cache \
        --force --jobs 2 --layer-store f16 --export-dir "$work/export7" --export-dtype f16 \
        --memory-trace "$work/memory-trace 7B rtn4+gptq2.tsv"
      grep -h "predicted peak memory\|^memory\|measured peak RssAnon" "$work/run 7B rtn4+gptq2 --jobs 2 (f16 store).log" \
        | head -12 | sed 's/^/  /'
      rm -rf "$work/export7/rtn4" ;;   # disk: only the GPTQ export is read back
    resume)
      experiment "$work/both7.yaml" "$m7" "  - name: rtn4
    quantizer: {name: rtn, params: {bits: 4, group_size: 128}}
  - name: gptq2
    quantizer: {name: gptq, params: {bits: 2, group_size: 128}}"
      kill_at="${BENCH_KILL_AT:-$((layers / 2))}"
      rm -rf "$work/resume7"
      measure_until_layer "run 7B gptq2 (killed)" "$work/resume7/.gptq2.layers" "$kill_at" \
        "$ptqlab" run "$work/both7.yaml" --out "$work/resume7" --arms gptq2 --no-cache --layer-store f16
      measure "run 7B gptq2 (resumed)" "$ptqlab" run "$work/both7.yaml" --out "$work/resume7" --arms gptq2 --no-cache \
        --layer-store f16
      grep -h "resuming at layer" "$work/run 7B gptq2 (resumed).log" | head -1 | sed 's/^/  log: /'
      [ -d "$work/resume7/.gptq2.layers" ] && echo "  checkpoint left behind" || echo "  checkpoint removed"
      same_results "$work/both7/gptq2.h5" "$work/resume7/gptq2.h5" ;;
    export-ppl)
      measure "ppl 7B export (gptq2, F16)" "$ptqlab" ppl --model "$work/export7/gptq2" --text "$text" --seq-len 512 \
        --max-windows 2 --json
      echo "  export: $(tail -1 "$work/ppl 7B export (gptq2, F16).log")"
      echo "  arm:    ppl $(h5dump -a /metrics/perplexity/tinystories/ppl "$work/both7/gptq2.h5" | grep -A1 DATA | tail -1)" ;;
  esac
done
for f in "$work"/*/rtn4.h5 "$work"/*/gptq2.h5; do [ -f "$f" ] && echo "result $f"; done
grep -h "ppl\b\|PPL" "$work"/*.log 2>/dev/null | grep -v "^memory" | head -6 || true
[ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$m7"

if [ "${BENCH_13B:-0}" = 1 ]; then
  m13="$work/llama2-13b"
  measure "synth-model 13B" "$ptqlab" synth-model --like llama-2-13b --dtype f16 --shards 6 --tokenizer "$tokenizer" \
    --out "$m13"
  measure "ppl 13B --seq-len 512 --max-windows 1" "$ptqlab" ppl --model "$m13" --text "$text" --seq-len 512 --max-windows 1
  experiment "$work/rtn13.yaml" "$m13" "  - name: rtn4
    quantizer: {name: rtn, params: {bits: 4, group_size: 128}}"
  measure "run 13B rtn4 (layer-store f16)" "$ptqlab" run "$work/rtn13.yaml" --out "$work/rtn13" --no-cache --force \
    --layer-store f16 --memory-trace "$work/memory-trace 13B rtn4.tsv"
  grep -h "measured peak RssAnon" "$work/run 13B rtn4 (layer-store f16).log" | sed 's/^/  /'
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$m13"
fi
