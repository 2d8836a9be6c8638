"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes; writes rank<N>.json.

One launch checks everything that needs real processes (each launch costs ~12 s of imports).
"""

import json
import sys
from pathlib import Path

import torch

from hf_zoo_rnn.training import ReplicaMismatchError, ZooTrainer, parse_arguments

out = Path(sys.argv[1])
common = sys.argv[2:]
results = {}

trainer = ZooTrainer(*parse_arguments(["--output_dir", str(out / "split"), *common]))
trainer.train()
results["world_size"] = trainer.world_size
results["comm_bytes"] = trainer.counters["comm_bytes"]

per_rank = ZooTrainer(
    *parse_arguments(["--output_dir", str(out / "per_rank"), *common, "--per_rank_batches", "--max_steps", "2"])
)
per_rank.train()
results["per_rank_tokens"] = per_rank.counters["tokens"]

# hybrids: with per-process batches the one-step gradient is averaged (the run's final replica check would stop a
# disagreement); with a shared batch no gradient crosses the wire and the run must equal one process's
hybrid_args = ["--output_dir", str(out / "hybrid"), *common, "--per_rank_batches", "--max_steps", "2"]
hybrid_args += ["--estimator", "hybrid", "--local_scope", "one_step"]
hybrid_args += ["--zo_parameters", "*.bias", "--zo_guide", "local"]
hybrid = ZooTrainer(*parse_arguments(hybrid_args))
hybrid.train()
results["hybrid_comm_bytes"] = hybrid.counters["comm_bytes"]
results["hybrid_gradient_elements"] = sum(
    p.numel() for p in hybrid.estimator.local.gradient.trained + hybrid.estimator.local.gradient.surrogate
)
shared = ZooTrainer(*parse_arguments(["--output_dir", str(out / "hybrid_shared"), *common, "--estimator", "hybrid"]))
shared.train()
results["hybrid_shared_comm_bytes"] = shared.counters["comm_bytes"]

if trainer.rank == 1:  # corrupt one replica: the checksum must stop the run
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] += 1.0
try:
    trainer.check_replicas()
    results["mismatch_detected"] = False
except ReplicaMismatchError as error:
    results["mismatch_detected"] = "processes hold different weights" in str(error)

odd = ZooTrainer(*parse_arguments(["--output_dir", str(out / "odd"), *common, "--zo_num_probes", "3"]))
try:
    odd.train()
    results["odd_probes_error"] = ""
except ValueError as error:
    results["odd_probes_error"] = str(error)

(out / f"rank{trainer.rank}.json").write_text(json.dumps(results))
