#!/usr/bin/env bash
# One prepared run for a CUDA machine (an H200), at most 8 minutes: CUDA tests, attention TFLOP/s,
# GPT-2-124M pretraining tokens/s and MFU, the fine-tune stage. Writes ONE JSON (default gpu_bench.json).
#   bash benchmarks/gpu.sh              # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run    # on CPU, in seconds: checks the script, prints what it would run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${GPU_BENCH_OUT:-gpu_bench.json}"
if [[ "${1:-}" == "--dry-run" ]]; then
  exec python benchmarks/gpu_bench.py --dry-run --output "$OUT" "${@:2}"
fi
# 480 s hard limit for the whole call; the driver writes the JSON after every section
exec timeout --signal=INT 470 python benchmarks/gpu_bench.py --output "$OUT" "$@"
