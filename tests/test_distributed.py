"""Two real processes (accelerate launch, gloo on CPU): probes split over ranks, only loss scalars exchanged."""

import json
import os
import subprocess
import sys

import torch
from accelerate.state import AcceleratorState
from conftest import FAST_TRAINING, ROOT
from safetensors.torch import load_file

from hf_zoo_rnn.training import ZooTrainer, parse_arguments

ARGS = [*FAST_TRAINING, "--max_steps", "3", "--eval_steps", "0", "--save_steps", "0", "--log_with", "none"]


def test_two_processes_match_one_process_and_guard_their_replicas(tmp_path):
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "distributed_check.py"),
        str(tmp_path),
        *ARGS,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)  # really two processes, not two independent runs
    assert all(r["mismatch_detected"] for r in ranks)
    assert all("num_probes=3 is not divisible by the 2 processes" in r["odd_probes_error"] for r in ranks)
    # 3 steps x 2K float64 scalars, plus the 8-byte checksums; never a parameter
    assert ranks[0]["comm_bytes"] == 3 * 2 * 8 * 4 + 4 * 8 * 2
    assert ranks[0]["per_rank_tokens"] == 2 * 2 * 64  # each process its own batch
    # per step: the 2K loss scalars and one fp32 all-reduce of the local gradient; 3 replica checks
    assert ranks[0]["hybrid_comm_bytes"] == 2 * (2 * 8 * 4 + 4 * ranks[0]["hybrid_gradient_elements"]) + 3 * 8 * 2
    assert ranks[0]["hybrid_shared_comm_bytes"] == 3 * 2 * 8 * 4 + 4 * 8 * 2  # a shared batch: scalars only

    # the same run in one process with the same arithmetic (one thread) gives bitwise the same weights
    torch.set_num_threads(1)
    try:
        for name, extra in (("split", []), ("hybrid_shared", ["--estimator", "hybrid"])):
            AcceleratorState._reset_state(reset_partial_state=True)
            ZooTrainer(*parse_arguments(["--output_dir", str(tmp_path / f"single_{name}"), *ARGS, *extra])).train()
            two = load_file(tmp_path / name / "model.safetensors")
            one = load_file(tmp_path / f"single_{name}" / "model.safetensors")
            assert all(torch.equal(two[k], one[k]) for k in one), name
    finally:
        torch.set_num_threads(2)
