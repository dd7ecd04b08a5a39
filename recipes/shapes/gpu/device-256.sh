#!/usr/bin/env bash
# One call of the workplace's GPU tool (`device` run: the project's source tree, Python 3.12, no youtokentome,
# results under $OUT): train-256.sh, then the evaluation on the GPU. Eight files come back: the transformer and
# its config.json (put both into a copy of dalle/pretrained/shapes to use it: the config says 256 px), the
# training metrics, loss curve and log, the evaluation log (plain, guidance 3, rerank 8), its results.json and
# example grid. Training gets MINUTES=4 by default, so that the call fits the tool's 10 minutes with encoding
# (about a minute, estimated) and the three evaluations around it (estimated, not yet measured); the logs are
# written as they go, so a call stopped at its limit still returns what was done. Give the run tool
# timeout_s 600.
# Usage (from the repository root): OUT=/some/dir recipes/shapes/gpu/device-256.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PY:-python3}
export MINUTES=${MINUTES:-4}
rm -rf runs/g256-*  # a warm machine keeps ignored folders between calls: never report an earlier call's model
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/train.log"
recipes/shapes/gpu/train-256.sh "$PY" cuda runs 2>&1 | tee -a "$OUT/train.log"
M=runs/g256-tf/model
cp "$M/transformer.safetensors" "$M/config.json" runs/g256-tf/metrics.jsonl "$OUT/"
cp runs/g256-tf/loss.png "$OUT/" 2>/dev/null || true  # needs matplotlib there
"$PY" -m dalle evaluate --model "$M" --out runs/g256-eval --device cuda --batch-size 128 --psnr-images 900 --quiet 2>&1 | tee "$OUT/eval.log"
cp runs/g256-eval/results.json runs/g256-eval/examples.png "$OUT/"
"$PY" -m dalle evaluate --model "$M" --out runs/g256-eval-g --device cuda --batch-size 128 --guidance 3 --psnr-images 0 --quiet 2>&1 \
    | tee -a "$OUT/eval.log"
"$PY" -m dalle evaluate --model "$M" --out runs/g256-eval-r --device cuda --batch-size 128 --rerank 8 --psnr-images 0 --quiet 2>&1 \
    | tee -a "$OUT/eval.log"
