#!/usr/bin/env bash
# Download here the wheels that scripts/gpu_check.py wants on the lent GPU machine (Python 3.12, x86-64, no
# registry) into .whl/ (ignored through .git/info/exclude), for the device tool's `carry`. gpu_check.py installs
# whatever it finds in .whl/ into a temporary folder before it starts (--wheels).
#
#   scripts/gpu_check_wheels.sh [EXTRA==VERSION ...]
#
# Default: OpenAI's DALL-E (dall_e, pure Python, 6 kB) for the dVAE benchmark and the dall_e parity tests. Its
# imports beyond torch (attrs, requests, numpy) and transformers 5.17 are already on the device image, so
# carrying transformers (and its dependency tree) is only needed for another version.
#
# Then, with the device tool:
#   run(command="PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT", carry=[".whl"],
#       timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .whl
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "DALL-E==0.1" "$@"
ls -l .whl
