#!/bin/bash
# GPU check of issue 14 on a machine with one NVIDIA GPU, in under 8 minutes: tokens/s and MFU
# of a ~1B model, our step (fast paths on, bf16) vs a plain compiled PyTorch model of the same
# shapes, and the fast-path step against the plain path on a tiny model (losses within 2%).
# Prints a table; writes runs/gpu_check/figures.json (OUT= to change).
#
#   bash benchmarks/gpu_check.sh [section.key=value ...]
#
# Environment: PYTHON (default .venv/bin/python), OUT, CACHE (prepared corpus, default
# ~/.cache/ofs_scale), TIMEOUT_S (default 480: the whole check).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi fails); the CPU form is:" \
    "$PYTHON benchmarks/gpu_check.py --cpu-tiny" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout "${TIMEOUT_S:-480}" "$PYTHON" benchmarks/gpu_check.py --json "$OUT/figures.json" \
  ${CACHE:+data.cache_dir=$CACHE} "$@" 2>&1 | tee "$OUT/gpu_check.log"
