#!/usr/bin/env bash
# Part 3 of the bundled `shapes` model: the 256-px transformer bundled in the 8th and 9th sessions, which part 4
# (train-dvae-256.sh) moves onto a dVAE of its own; on a CPU (about 75
# minutes on this project's 2-core AMD EPYC, which has native bfloat16). The dVAE and tokenizer are part 1's,
# unchanged; the transformer starts from part 2's 128-px one (bundled as `shapes-128`), its row and column
# position embeddings resampled from 16 to 32 cells, and trains for 70 minutes on 6000 scenes rendered at 256x256
# under bfloat16 autocast (--cpu-bf16; on a CPU without native bfloat16 drop it from the config, or expect it to
# be slow). The time limit ties the number of updates to the machine's speed: part 3's weights are those of
# update 1024. STEPS=1024 runs exactly that many updates instead, with a step-based cosine in place of the
# clock-based one (close to it, not bit-identical).
# Usage: recipes/shapes/train-256.sh [PYTHON]   (run from the repository root; writes runs/ and the model dir)
set -euo pipefail
PY=${1:-.venv/bin/python}
THREADS=${THREADS:-2}
LENGTH=(--time-limit 70)
if [ -n "${STEPS:-}" ]; then LENGTH=(--steps "$STEPS"); fi
$PY -m dalle encode-dataset --data shapes:1 --dvae dalle/pretrained/shapes-128 --image-size 256 --out runs/t256-6k \
    --limit 6000 --batch-size 32 --threads "$THREADS" --no-progress
$PY -m dalle train --config recipes/shapes/transformer-256.json --data runs/t256-6k --out runs/t256-bf16 \
    --threads "$THREADS" --no-progress "${LENGTH[@]}"
rm -rf dalle/pretrained/shapes && cp -r runs/t256-bf16/model dalle/pretrained/shapes
$PY -m dalle evaluate --model shapes --out runs/shapes-eval
