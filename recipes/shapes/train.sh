#!/usr/bin/env bash
# Part 1 of the bundled shapes models (dalle/pretrained/shapes-128, then shapes), from scratch with the project's own CLI, on a
# CPU: its dVAE and tokenizer, and the 4-layer transformer bundled until the 5th session. Part 2,
# recipes/shapes/gpu/train.sh, then trains the bundled 8-layer transformer on top of them.
# Usage: recipes/shapes/train.sh [PYTHON]   (run from the repository root; writes runs/ and the model dir)
# Every stage is seeded; on the same machine and torch build the weights come out the same.
set -euo pipefail
PY=${1:-.venv/bin/python}
THREADS=${THREADS:-2}
$PY -m dalle train-dvae --config recipes/shapes/dvae.json --out runs/shapes-dvae --threads "$THREADS" --no-progress
$PY -m dalle encode-dataset --data shapes:1 --dvae runs/shapes-dvae/dvae --out runs/shapes-tokens \
    --limit 30000 --batch-size 64 --threads "$THREADS" --no-progress
$PY -m dalle train --config recipes/shapes/transformer.json --out runs/shapes-transformer --threads "$THREADS" \
    --no-progress
# stage 4: continue from that model on twice the data (the first 30,000 scenes again plus 30,000 new ones)
$PY -m dalle encode-dataset --data shapes:1 --dvae runs/shapes-dvae/dvae --out runs/shapes-tokens-60k \
    --limit 60000 --batch-size 64 --threads "$THREADS" --no-progress
$PY -m dalle train --config recipes/shapes/transformer-finetune.json --out runs/shapes-transformer-ft \
    --threads "$THREADS" --no-progress
rm -rf dalle/pretrained/shapes-128 && cp -r runs/shapes-transformer-ft/model dalle/pretrained/shapes-128
$PY -m dalle evaluate --model shapes-128 --out runs/shapes-eval
