# Every target sets up .venv on first use, so `make demo` and `make test` work on a fresh machine. `make demo`
# installs what generating needs; `make test` (and setup, lint, bench) adds the development tools and the
# test-only reference implementations.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
OUT    ?= outputs
# Where torch comes from. Empty: pip's default (PyPI's build, which carries the CUDA libraries: several GB).
# By default, on a machine without an NVIDIA driver (no nvidia-smi) that can reach PyTorch's CPU index, the
# CPU-only build from there (a few hundred MB). Set TORCH_INDEX=URL to choose an index, TORCH_INDEX= for PyPI.
ifeq ($(origin TORCH_INDEX),undefined)
TORCH_INDEX := $(shell if ! command -v nvidia-smi >/dev/null 2>&1 && \
	curl -fsI --max-time 5 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then \
	echo https://download.pytorch.org/whl/cpu; fi)
endif

.PHONY: setup test test-fast test-all demo lint bench clean

setup: $(DEV)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch torchvision $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	# youtokentome has no wheel for Python 3.11 and needs Cython outside pip's build isolation.
	$(PIP) install cython setuptools wheel
	$(PIP) install --no-build-isolation youtokentome
	$(PIP) install -e '.[dev]'
	# test-only references for the ruDALL-E / taming VQGAN parity tests; their own pins (transformers 4.10,
	# opencv 4.5, ...) no longer install, and the tests import only their model modules
	$(PIP) install --no-deps rudalle==1.1.3 taming-transformers==0.0.1
	# A source build that cannot even be imported (one crashed at start-up on a Python 3.12 machine) is removed:
	# dalle then encodes with its pure-Python BPE (same ids); only training a tokenizer needs youtokentome.
	$(PY) -c "import youtokentome" || { echo "youtokentome does not load here: uninstalling it"; \
		$(PIP) uninstall -y youtokentome; }
	touch $(DEV)

test: $(DEV)
	$(PY) -m pytest -q

# the inner loop: everything but the end-to-end runs marked `integration` (about a minute)
test-fast: $(DEV)
	$(PY) -m pytest -q -m 'not slow and not integration'

test-all: $(DEV)
	$(PY) -m pytest -q -m ''

demo: $(STAMP)
	$(PY) -m dalle demo --output-dir $(OUT)

lint: $(DEV)
	$(VENV)/bin/ruff check dalle tests benchmarks scripts
	$(VENV)/bin/ruff format --check dalle tests benchmarks scripts
	$(PY) -m mypy dalle

# The figures of BENCHMARKS.md (CPU; tens of minutes on a 2-core machine). The references: OpenAI's dall_e
# for the dVAE (it imports attrs without declaring it), transformers and DALLE-pytorch for sampling, rudalle
# (installed by setup) with transformers and more_itertools for ruDALL-E generation.
bench: $(DEV)
	$(PIP) install DALL-E attrs transformers more_itertools dalle-pytorch "pytorch-lightning<2" "setuptools<81"
	$(PY) benchmarks/bench_peers.py --threads 2
	$(PY) benchmarks/bench_peers.py --threads 2 --batch 4 --repeats 2
	$(PY) benchmarks/bench_dvae.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_memory.py --batch 4
	$(PY) benchmarks/bench_transformer.py --points 6 --threads 1
	$(PY) benchmarks/bench_transformer.py --points 6 --threads 2
	$(PY) benchmarks/bench_tokenizer.py --repeats 51
	$(PY) benchmarks/bench_train.py --image-size 256 --batch 8 16
	$(PY) benchmarks/bench_rudalle.py --depth 2 --threads 2

# One-shot GPU check (issue 20): report in $(OUT)/gpu-check/gpu-check.md (without CUDA: a CPU smoke run on tiny
# configurations). On the lent device: see scripts/gpu_check_wheels.sh for the command and the wheels to carry.
.PHONY: gpu-check
gpu-check: $(DEV)
	PYTHONPATH=. $(PY) scripts/gpu_check.py --out $(OUT)/gpu-check

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
