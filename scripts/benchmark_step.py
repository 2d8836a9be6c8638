"""Cost of one zero-order step, split into forward passes, perturbation/restore and update.

For each model config: one warm-up step, then `--steps` timed steps on a random batch. Reports the time of a step
against 2K clean forward passes (the ideal: a step is nothing but its forwards), the share of the step spent
outside its forwards (perturbation and update, timed within the same steps, so free of the drift between two
measurement windows on a shared machine), probes * tokens per second, and peak RSS against the fp32 bytes of the
weights. Writes <output_dir>/step.csv and step.png.

    python scripts/benchmark_step.py [--model_configs configs/model/tiny.yaml configs/model/small.yaml]
        [--dtype float32] [--num_probes 8] [--batch_size 16] [--seq_len 64] [--update_mode replay]
        [--probes_per_forward 1 4 16]      # 1: one perturbed model per forward; P: P probes stacked (2P models)
        [--perturbations full lowrank]     # lowrank with P != 1: 2P members of one batch sharing the weights
    python scripts/benchmark_step.py --model_configs configs/model/small.yaml --perturbations lowrank \
        --num_probes 1024 --probes_per_forward 0 --stacked_memory_mb 1000   # the largest K in a memory budget
    python scripts/benchmark_step.py --model_configs configs/model/xlarge.yaml --dtype bfloat16 \\
        --num_probes 2 --batch_size 1 --seq_len 8 --steps 1          # a 1.16B-parameter step on a CPU
"""

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, HfArgumentParser  # noqa: E402

import hf_zoo_rnn  # noqa: E402, F401  (registers the Auto classes)
from hf_zoo_rnn.config_files import load_model_config  # noqa: E402
from hf_zoo_rnn.estimators.probes import population_loss  # noqa: E402
from hf_zoo_rnn.training.reporting import peak_memory_mb  # noqa: E402
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer  # noqa: E402
from hf_zoo_rnn.zo.optimizer import probes_per_forward  # noqa: E402


@dataclass
class StepBenchmarkArguments:
    model_configs: list[str] = field(
        default_factory=lambda: ["configs/model/tiny.yaml", "configs/model/small.yaml"], metadata={"help": "YAMLs"}
    )
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 weights"})
    num_probes: int = field(default=8, metadata={"help": "probes K per step"})
    batch_size: int = field(default=16, metadata={"help": "sequences per batch"})
    seq_len: int = field(default=64, metadata={"help": "tokens per sequence"})
    update_mode: str = field(default="replay", metadata={"help": "replay or buffer"})
    probes_per_forward: list[int] = field(
        default_factory=lambda: [1], metadata={"help": "probes per stacked forward, one row each (0: automatic)"}
    )
    perturbations: list[str] = field(
        default_factory=lambda: ["full"], metadata={"help": "full and/or lowrank (EGGROLL), one row each"}
    )
    perturbation_rank: int = field(default=1, metadata={"help": "r of lowrank perturbations"})
    stacked_memory_mb: float = field(default=1024.0, metadata={"help": "budget of probes_per_forward 0"})
    steps: int = field(default=2, metadata={"help": "timed steps after one warm-up step"})
    replot: bool = field(default=False, metadata={"help": "measure nothing: plot output_dir/step.csv again"})
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where step.csv and step.png go"})


def inference_seconds(model, ids, repeats: int = 2) -> float:
    """One plain forward (no probes) over `ids`, best of `repeats`."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids, labels=ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def measure(path: str, perturbation: str, per_forward: int, args: StepBenchmarkArguments) -> dict:
    config = load_model_config(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    parameters = model.num_parameters()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))

    def loss_fn():
        return model(ids, labels=ids, logits_to_keep=1).loss

    with torch.inference_mode():  # the ideal step: 2K forwards and nothing else
        loss_fn()
        start = time.perf_counter()
        for _ in range(2 * args.num_probes):
            loss_fn()
        clean_forward = (time.perf_counter() - start) / (2 * args.num_probes)
    config = ZOConfig(
        num_probes=args.num_probes,
        lr=1e-4,
        eps=1e-3,
        update_mode=args.update_mode,
        probes_per_forward=per_forward,
        perturbation=perturbation,
        perturbation_rank=args.perturbation_rank,
        stacked_memory_mb=args.stacked_memory_mb,
    )
    zo = ZOOptimizer(model, config)
    stacked = population_loss(model, zo.names, ids, ids, members=perturbation == "lowrank")
    group = probes_per_forward(
        per_forward,
        probes=args.num_probes,
        models_per_probe=2,
        bytes_per_model=stacked.bytes_per_model,
        budget_mb=args.stacked_memory_mb,
    )
    zo.step(loss_fn, population_loss=stacked)  # warm-up
    stats = [zo.step(loss_fn, population_loss=stacked) for _ in range(args.steps)]
    total = sum(s.seconds_total for s in stats) / len(stats)
    forward = sum(s.seconds_forward for s in stats) / len(stats)
    update = sum(s.seconds_update for s in stats) / len(stats)
    tokens = args.batch_size * args.seq_len
    # plain inference over the batch one forward of the step sees: 2 models per probe, `group` probes
    same_batch = ids.repeat(2 * group, 1)
    inference_tokens_per_second = same_batch.numel() / inference_seconds(model, same_batch)
    member_tokens_per_second = 2 * args.num_probes * tokens / total
    return {
        "config": Path(path).stem,
        "parameters": parameters,
        "dtype": args.dtype,
        "perturbation": perturbation if perturbation == "full" else f"lowrank-r{args.perturbation_rank}",
        "num_probes": args.num_probes,
        "update_mode": args.update_mode,
        "probes_per_forward": group,
        "step_seconds": total,
        "forward_seconds": forward,
        "perturb_seconds": total - forward - update,
        "update_seconds": update,
        "clean_forward_seconds": clean_forward,
        "step_over_2k_forwards": total / (2 * args.num_probes * clean_forward),
        "overhead_share": (total - forward) / total,  # perturbation + update, measured in the same steps
        "probe_tokens_per_second": args.num_probes * tokens / total,
        "member_tokens_per_second": member_tokens_per_second,  # 2K perturbed models' tokens
        "inference_tokens_per_second": inference_tokens_per_second,
        "member_over_inference": member_tokens_per_second / inference_tokens_per_second,
        "peak_rss_gb": peak_memory_mb(torch.device("cpu")) / 1024,
        "peak_rss_over_fp32_weights": peak_memory_mb(torch.device("cpu")) * 2**20 / (4 * parameters),
    }


def plot(rows: list[dict], num_probes: int, dtype: str, path: Path) -> None:
    """Seconds per step by part, one bar per row."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4))
    names = [f"{r['config']}\n{r['perturbation']}\n{r['probes_per_forward']}/fwd" for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("forward_seconds", "perturb_seconds", "update_seconds"):
        values = [float(r[part]) for r in rows]
        ax.bar(names, values, bottom=bottom, label=part.removesuffix("_seconds"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(ylabel="seconds per ZO step", yscale="log", title=f"ZO step, K={num_probes}, {dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    (args,) = HfArgumentParser(StepBenchmarkArguments).parse_args_into_dataclasses()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        with open(out / "step.csv", newline="") as handle:
            plot(list(csv.DictReader(handle)), args.num_probes, args.dtype, out / "step.png")
        return
    rows = []
    runs = [
        (path, kind, per)
        for path in args.model_configs
        for kind in args.perturbations
        for per in args.probes_per_forward
    ]
    for path, perturbation, per_forward in runs:
        row = measure(path, perturbation, per_forward, args)
        rows.append(row)
        print(
            f"{row['config']:>8} {row['parameters']:>13,} params {row['dtype']} {row['perturbation']}, "
            f"{row['probes_per_forward']} probes/forward: "
            f"step {row['step_seconds']:.3f} s = "
            f"forward {row['forward_seconds']:.3f} + perturb {row['perturb_seconds']:.3f} + update "
            f"{row['update_seconds']:.3f}; step / 2K forwards {row['step_over_2k_forwards']:.2f} "
            f"(outside the forwards {row['overhead_share']:.1%}); "
            f"{row['probe_tokens_per_second']:,.3g} probe-tokens/s ({row['member_over_inference']:.0%} of "
            f"inference at the same batch); peak RSS {row['peak_rss_gb']:.2f} GB "
            f"({row['peak_rss_over_fp32_weights']:.2f}x fp32 weights)"
        )
    with open(out / "step.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.num_probes, args.dtype, out / "step.png")
    print(f"wrote {out / 'step.csv'} and {out / 'step.png'}")


if __name__ == "__main__":
    main()
