#!/usr/bin/env bash
# A shapes model at 256x256 (a 32x32 token grid) on one GPU: the bundled dVAE and tokenizer, unchanged, and an
# 8-layer transformer over 16 + 1024 tokens, trained for a fixed time. By default it continues the bundled 256-px
# transformer (INIT=dalle/pretrained/shapes: since the 10th session, part 4 of the recipe,
# recipes/shapes/train-dvae-256.sh, on its own dVAE trained at 256 px) at lr 5e-4. INIT=dalle/pretrained/shapes-128
# starts from the 128-px one (its row and column embeddings resampled from 16 to 32 cells), which speaks the codes
# of shapes-128's dVAE: give it DVAE=dalle/pretrained/shapes-128 too. INIT= (empty) trains from scratch at lr 1e-3.
# Why 256 px: the checker reads the bundled dVAE's reconstructions of 900 rendered scenes right 97% / 95% / 97% of
# the time (one object / two objects / held-out pairs), shapes-128's at 128 px 79.7% / 66.3% / 87.7% (CPU).
# Usage: recipes/shapes/gpu/train-256.sh [PYTHON] [DEVICE] [RUNS_DIR]   (run from the repository root)
# Settings from the environment: MINUTES (training time, default 5), LIMIT (scenes encoded, default 200000),
# WORKERS (rendering processes, default 12), DVAE and INIT (default the bundled model), EXTRA (more `dalle train`
# flags).
# The same commands run on a CPU (DEVICE=cpu), only far slower.
set -euo pipefail
PY=${1:-.venv/bin/python}
DEV=${2:-cuda}
RUNS=${3:-runs}
MINUTES=${MINUTES:-5}
LIMIT=${LIMIT:-200000}
WORKERS=${WORKERS:-12}
DVAE=${DVAE:-dalle/pretrained/shapes}
INIT=${INIT-dalle/pretrained/shapes}
HERE=$(dirname "$0")
START=()
if [ -n "$INIT" ]; then START=(--init "$INIT" --lr 0.0005); fi
"$PY" -m dalle encode-dataset --data shapes:1 --dvae "$DVAE" --image-size 256 --out "$RUNS/g256-tokens" \
    --limit "$LIMIT" --batch-size 256 --workers "$WORKERS" --device "$DEV" --no-progress
# shellcheck disable=SC2086  # EXTRA is a list of flags
"$PY" -m dalle train --config "$HERE/transformer-256.json" --data "$RUNS/g256-tokens" --dvae "$DVAE" \
    --tokenizer dalle/pretrained/shapes/tokenizer.model --image-size 256 --time-limit "$MINUTES" \
    --out "$RUNS/g256-tf" --device "$DEV" --no-progress "${START[@]}" ${EXTRA:-}
echo "model: $RUNS/g256-tf/model"
