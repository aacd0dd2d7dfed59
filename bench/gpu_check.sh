#!/usr/bin/env bash
# One-shot GPU check of the 1.45B training step (eager and torch.compile), JSON to bench/results/.
#   bash bench/gpu_check.sh            # on a GPU machine with the project installed (no network needed)
#   bash bench/gpu_check.sh --dry-run  # tiny config on CPU (CI runs this so the script cannot rot)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ "${1:-}" = "--dry-run" ]; then
  exec "$PY" bench/gpu_check.py --dry-run   # eager only: inductor compiles for minutes on a busy CPU
fi
mkdir -p bench/results
# the preset's planned micro-batch unless MICRO_BATCH is set; the JSON is rewritten after each of the two runs
exec timeout 480 "$PY" bench/gpu_check.py --experiment txt2img_1p45b ${MICRO_BATCH:+--micro-batch "$MICRO_BATCH"} --compile \
  --out "bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).json"
