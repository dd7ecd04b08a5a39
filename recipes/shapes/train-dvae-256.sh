#!/usr/bin/env bash
# Part 4 of the bundled `shapes` model (10th session, CPU, about 95 minutes on this project's 2-core AMD EPYC): a
# dVAE trained from scratch on dense scenes rendered at 256x256 (part 1's recipe at the side the model works
# at), then part 3's transformer moved onto its codes and fine-tuned for 75 minutes. `dalle remap` starts
# each new code's embedding and output row from the old code it most often replaces (matched on 500 rendered
# scenes), so the fine-tuning starts from a transformer that already draws the right layouts. The time limit
# ties the number of updates to the machine's speed (see train-256.sh): the bundled weights are those of update 1114.
# Usage: recipes/shapes/train-dvae-256.sh [PYTHON] [PART3_MODEL]   (from the repository root; writes runs/ and
# dalle/pretrained/shapes). PART3_MODEL is part 3's model (default runs/t256-bf16/model, as train-256.sh leaves it).
set -euo pipefail
PY=${1:-.venv/bin/python}
PART3=${2:-runs/t256-bf16/model}
THREADS=${THREADS:-2}
$PY -m dalle train-dvae --config recipes/shapes/dvae.json --image-size 256 --out runs/dvs256 --threads "$THREADS" \
    --no-progress
$PY -m dalle remap "$PART3" runs/dvs256/dvae runs/remap256 --scenes 500 --seed 7
$PY -m dalle encode-dataset --data shapes:1 --dvae runs/remap256 --image-size 256 --out runs/t256n-8k --limit 8000 \
    --batch-size 32 --threads "$THREADS" --no-progress
$PY -m dalle train --config recipes/shapes/transformer-256.json --init runs/remap256 --dvae runs/remap256 \
    --tokenizer runs/remap256/tokenizer.model --data runs/t256n-8k --out runs/t256n --threads "$THREADS" \
    --no-progress --time-limit 75
rm -rf dalle/pretrained/shapes && cp -r runs/t256n/model dalle/pretrained/shapes
$PY -m dalle evaluate --model shapes --out runs/shapes-eval
