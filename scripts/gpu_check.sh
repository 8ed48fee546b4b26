#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (nothing is downloaded: SD 1.5's architecture is
# built with random weights from livo_core/data/model_configs/sd15.json):
#   1. tests/test_cuda.py: fp16 renders, fp16 training with the value encoder in fp32, gradient checkpointing
#   2. bench/train_step.py at SD 1.5 shape, 512 px, fp16: livo's step vs the official-style loop and the floor
#   3. tests/test_cuda.py also takes SDXL, SD 3.5 Medium and FLUX.1-dev shapes through bf16 training with and without
#      gradient checkpointing; bench/family_step.py times each family's step against its floor on the GPU
# Uses .venv when there is one, else the python on PATH (with livo's dependencies installed). Results go to
# $OUT (or ./gpu-check) as log files and bench JSON; copy the figures into docs/bench.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR=${OUT:-gpu-check}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT_DIR/test_cuda.log"
"$PY" bench/train_step.py --shape sd15 --size 512 --batch 2 --device cuda --steps 10 --warmup 3 --rounds 2 \
  --json "$OUT_DIR/train_step_sd15_512_cuda.json" 2>&1 | tee "$OUT_DIR/train_step.log"
"$PY" bench/family_step.py --device cuda --size 256 --batch 2 --steps 5 --warmup 2 2>&1 | tee "$OUT_DIR/family_step.log"
