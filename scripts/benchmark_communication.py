"""Bytes communicated per optimisation step with 2 processes, for each of the paper's shapes.

  zo_scalars      ours: all-gather of the K (L+, L-) float64 pairs, 16 * K bytes received per process
                  (the trainer counts the same figure in `comm_bytes`; tests/test_distributed.py checks it on a
                  real 2-process gloo run)
  ddp_allreduce   a data-parallel gradient all-reduce of fp32 parameters (ring, 2 processes): 4 * d bytes per process
  paper_code      the official code: rank 0 broadcasts all parameters and every update buffer is reduced to rank 0,
                  2 * d elements in bf16 = 4 * d bytes
Writes <output_dir>/communication.csv and prints a table.

    python scripts/benchmark_communication.py [--num_probes 96] [--output_dir outputs/benchmarks]
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_zoo_rnn import ZooRnnForCausalLM
from hf_zoo_rnn.config_files import load_model_config

SHAPES = ["tiny", "small", "medium", "large", "xlarge", "xxlarge"]


@dataclass
class CommunicationArguments:
    num_probes: int = field(default=96, metadata={"help": "probes K per step"})
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where communication.csv goes"})


def main() -> None:
    (args,) = HfArgumentParser(CommunicationArguments).parse_args_into_dataclasses()
    rows = []
    for name in SHAPES:
        with torch.device("meta"):  # count parameters without allocating them
            parameters = ZooRnnForCausalLM(load_model_config(f"configs/model/{name}.yaml")).num_parameters()
        ours = 16 * args.num_probes
        rows.append(
            {
                "shape": name,
                "parameters": parameters,
                "zo_scalars_bytes": ours,
                "ddp_allreduce_bytes": 4 * parameters,
                "paper_code_bytes": 4 * parameters,
                "reduction": 4 * parameters / ours,
            }
        )
        print(
            f"{name:>8} {parameters:>15,} params: ours {ours:>6,} B   all-reduce / paper code {4 * parameters:>17,} B"
            f"   ({4 * parameters / ours:,.0f}x less)"
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "communication.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
