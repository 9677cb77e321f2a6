#!/usr/bin/env bash
# The project's GPU check: the paper's path on one CUDA GPU (NCCL, bf16, the RegNetY teacher on the
# GPU, sharded evaluation, checkpoint + resume) and the training benchmark on engine.fit, in under
# 8 minutes on one H200. Usage: bash bench/gpu_check.sh OUT_DIR (writes OUT_DIR/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "$PY" bench/gpu_check.py --out "$OUT"
