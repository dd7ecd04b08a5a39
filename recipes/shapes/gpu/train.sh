#!/usr/bin/env bash
# Part 2: reproduces the bundled `shapes-128` transformer (dalle/pretrained/shapes-128/transformer.safetensors,
# the default model until the 8th session; part 3, recipes/shapes/train-256.sh, starts from it), trained on one
# NVIDIA H200 in 4.5 minutes, on top of the dVAE and tokenizer of the CPU recipe (recipes/shapes/train.sh,
# whose dVAE and tokenizer are the bundled ones).
# Usage: recipes/shapes/gpu/train.sh [PYTHON] [DEVICE]   (run from the repository root; DEVICE defaults to cuda)
# The same commands run on a CPU (DEVICE=cpu), only far slower. youtokentome is not needed: without it dalle
# encodes captions with its own pure-Python reader of the tokenizer file (same ids).
set -euo pipefail
PY=${1:-.venv/bin/python}
DEV=${2:-cuda}
$PY -m dalle encode-dataset --data shapes:1 --dvae dalle/pretrained/shapes-128 --out runs/g-tokens-a --limit 200000 \
    --batch-size 512 --device "$DEV" --no-progress
$PY -m dalle train --config recipes/shapes/gpu/transformer.json --data runs/g-tokens-a --dvae dalle/pretrained/shapes-128 \
    --tokenizer dalle/pretrained/shapes-128/tokenizer.model --out runs/g-tf-a1 --device "$DEV" --no-progress
cp runs/g-tf-a1/model/config.json runs/g-tf-a1/model/transformer.safetensors dalle/pretrained/shapes-128/
$PY -m dalle evaluate --model shapes-128 --out runs/shapes-eval
