#!/usr/bin/env bash
# The GPU check on the GPU machine (Python 3.12 with torch, transformers and accelerate; no package registry), from
# the repository root: install the wheels `make gpu-wheelhouse` put in .whl/ where Python finds them, then run every
# part of scripts/gpu_check.py. Results go to $OUT (the device tool's folder) or outputs/gpu_check.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 scripts/gpu_check.py --output_dir "${OUT:-outputs/gpu_check}" "$@"
