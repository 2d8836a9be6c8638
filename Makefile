# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# torch is installed first and pinned: an unpinned torch resolved alongside the rest can pull a multi-GB CUDA build
# (on a GPU machine install the CUDA build of torch into .venv first; the pin then finds it already there).
PYTHON ?= python3
ARGS ?=
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install train demo test lint wheel-check
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

# The package as pip users get it: the wheel in a fresh venv, a tiny training and a generation from outside the checkout.
WHEEL_VENV ?= /tmp/hf_zoo_rnn-wheel-venv
wheel-check: install
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(WHEEL_VENV)/bin/python -m pip install --quiet dist/*.whl
	cd "$$(mktemp -d)" && $(WHEEL_VENV)/bin/hf-zoo-rnn-train --model_config tiny --max_steps 2 --batch_size 2 \
		--context_length 32 --eval_batches 1 --log_with none --output_dir run \
		&& test -f run/README.md && test -f run/model.safetensors \
		&& $(WHEEL_VENV)/bin/python -m hf_zoo_rnn.generate --model run --max_new_tokens 5
