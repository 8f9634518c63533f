#!/usr/bin/env bash
# Prepares the H200 run on a machine that reaches PyPI (the device machine reaches nothing):
#   .whl/       wheels for the packages the device image lacks (pydantic and its parts, datasets and
#               its parts), for the device's Python (3.12, x86-64), at the versions installed here
#   .gpu_data   a link to the shared data; the device call carries the two SST-2 files through it
# Both are git-ignored and never committed. Then it prints the device call to make.
#   bash benchmarks/gpu_prepare.sh                 # GPU_PY_VERSION=3.12 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${GPU_PY_VERSION:-3.12}"
DATA="${SELFATTN_DATA_DIR:-$(cd .. && pwd)/shared/data}"
if [[ ! -f "$DATA/sst2/train.tsv" ]]; then
  echo "SST-2 not found under $DATA: set SELFATTN_DATA_DIR" >&2
  exit 2
fi
# missing from the device image (.library/device/KINDS.md lists what it has): pinned to what is installed here
pins=$(python3 - <<'PY'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "datasets", "dill", "multiprocess"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ln -sfn "$DATA" .gpu_data
echo "wheels in .whl/ ($(du -sh .whl | cut -f1)): $(cd .whl && ls | tr '\n' ' ')"
echo "data: .gpu_data -> $DATA"
echo "device call: command 'bash benchmarks/gpu.sh', timeout_s 540,"
echo "  carry [\".whl\", \".gpu_data/sst2/train.tsv\", \".gpu_data/sst2/dev.tsv\"]; the JSON comes back as \$OUT/gpu_bench.json"
