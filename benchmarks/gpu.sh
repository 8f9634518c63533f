#!/usr/bin/env bash
# One prepared run for a CUDA machine (an H200), at most 8 minutes: CUDA tests, attention TFLOP/s,
# GPT-2-124M pretraining tokens/s and MFU, the fine-tune on CUDA. Writes ONE JSON: $GPU_BENCH_OUT,
# else $OUT/gpu_bench.json where $OUT is set (the device tool's folder that comes back), else ./gpu_bench.json.
#   bash benchmarks/gpu_prepare.sh      # first, on a machine with PyPI: wheels the device lacks, the data link
#   bash benchmarks/gpu.sh              # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run    # anywhere, in seconds: preflight (what is missing) and the plan
#   bash benchmarks/gpu.sh --rehearse   # on CPU, ~1-2 min: every section at toy sizes, the same JSON
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# wheels for what the device image lacks (gpu_prepare.sh puts them in .whl/): installed off-line
# into a private folder, ahead of nothing the image has (the image keeps its own torch)
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/selfattn-gpu-site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else  # wheels for another Python (prepared for the device, run here): the preflight names what is missing
    echo "gpu.sh: the wheels in .whl/ do not install on $("$PY" --version); going on without them" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the data that travelled with the call (gpu_prepare.sh links .gpu_data to the shared data)
if [[ -z "${SELFATTN_DATA_DIR:-}" && -f .gpu_data/sst2/train.tsv ]]; then
  export SELFATTN_DATA_DIR="$PWD/.gpu_data"
fi
RESULT="${GPU_BENCH_OUT:-${OUT:+$OUT/}gpu_bench.json}"
if [[ "${1:-}" == "--dry-run" || "${1:-}" == "--rehearse" ]]; then
  exec "$PY" benchmarks/gpu_bench.py "$1" --output "$RESULT" "${@:2}"
fi
# 480 s hard limit for the whole call; each section has its own budget inside (gpu_bench.BUDGET)
exec timeout --signal=INT 470 "$PY" benchmarks/gpu_bench.py --output "$RESULT" "$@"
