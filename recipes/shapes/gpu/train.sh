#!/usr/bin/env bash
# Reproduces the bundled `shapes` transformer (dalle/pretrained/shapes/transformer.safetensors), trained on one
# NVIDIA H200 in 4.5 minutes, on top of the dVAE and tokenizer of the CPU recipe (recipes/shapes/train.sh,
# whose dVAE and tokenizer are the bundled ones).
# Usage: recipes/shapes/gpu/train.sh [PYTHON] [DEVICE]   (run from the repository root; DEVICE defaults to cuda)
# The same commands run on a CPU (DEVICE=cpu), only far slower. youtokentome is not needed: without it dalle
# encodes captions with its own pure-Python reader of the tokenizer file (same ids).
set -euo pipefail
PY=${1:-.venv/bin/python}
DEV=${2:-cuda}
$PY -m dalle encode-dataset --data shapes:1 --dvae dalle/pretrained/shapes --out runs/g-tokens-a --limit 200000 \
    --batch-size 512 --device "$DEV" --no-progress
$PY -m dalle train --config recipes/shapes/gpu/transformer.json --data runs/g-tokens-a --dvae dalle/pretrained/shapes \
    --tokenizer dalle/pretrained/shapes/tokenizer.model --out runs/g-tf-a1 --device "$DEV" --no-progress
cp runs/g-tf-a1/model/config.json runs/g-tf-a1/model/transformer.safetensors dalle/pretrained/shapes/
$PY -m dalle evaluate --model shapes --out runs/shapes-eval
