"""Which estimator learns most per second: pure CD-RGE, the probe-free baselines (readout only, one-step gradient
only), their hybrids with zero-order probes (plain, guided, forward differences) and BPTT + AdamW, each run as
`scripts/train.py` for the same wall-clock budget on the same model, data and machine.

    python scripts/benchmark_estimators.py                                  # both sections, 150 s per run, 2 at a time
    python scripts/benchmark_estimators.py --sections lm --seconds 600 --jobs 1
    python scripts/benchmark_estimators.py --sections cosine                # only the cosine with the true gradient
    python scripts/benchmark_estimators.py --replot                         # re-tabulate and re-plot finished runs

Sections:
  lm      the embedded default (1-layer LSTM 4 x 64, BPE 512, KJV, 16 x 128 tokens per step): validation loss
  memory  delayed recall (a letter, then up to --recall_length random digits, then the letter): exact match at the
          training delays and at longer ones (out of distribution)
  cosine  each estimator's cosine with the full BPTT gradient, one batch of the lm section at initialisation

Every run gets max_steps from a short timed calibration run, so its cosine schedules span the budget, and stops at
--seconds of training time (evaluation excluded). Each process is pinned to one thread (OMP_NUM_THREADS=1), so
--jobs 2 on 2 cores gives every run one core. The ZO contribution of a hybrid is the metric of the probe-free
baseline it builds on minus its own (loss) or its own minus the baseline's (exact match), at the end of the budget.
Writes <output_dir>/estimators.csv, estimators_<section>.png and each run's own folder.
"""

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from hf_zoo_rnn.training.reporting import logged_metrics, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# every method names its estimator and probe count: none may depend on train.py's defaults. Probes run ZO-Adam at
# lr 0.01, cosine after 20 warm-up steps, as measured in docs/BENCHMARKS.md
ZO_ADAM = ["--zo_lr", "0.01", "--zo_update_rule", "adam", "--zo_lr_schedule", "cosine", "--zo_warmup_steps", "20"]
PURE = ["--estimator", "probes", *ZO_ADAM, "--zo_num_probes"]
READOUT = ["--estimator", "hybrid", "--local_scope", "readout", *ZO_ADAM, "--zo_num_probes", "16"]
ONE_STEP = ["--estimator", "hybrid", "--local_scope", "one_step", *ZO_ADAM]
LOW_RANK = ["--zo_perturbation", "lowrank", "--zo_perturbation_rank"]
FORWARD_8 = ["--zo_num_probes", "8", "--zo_difference", "forward"]
# name -> (train.py arguments, the probe-free baseline it builds on)
METHODS: dict[str, tuple[list[str], str | None]] = {
    "pure_zo": ([*PURE, "16"], None),
    "readout_only": (["--estimator", "readout"], None),
    "one_step_only": (["--estimator", "one_step"], None),
    "readout+zo": (READOUT, "readout_only"),
    "readout+zo_forward": ([*READOUT, "--zo_difference", "forward"], "readout_only"),
    "readout+zo_guided_updates": ([*READOUT, "--zo_guide", "updates"], "readout_only"),
    # the readout kept near its optimum for the current features, so the probes only have to improve the features
    "readout+zo_forward_x16": ([*READOUT, "--zo_difference", "forward", "--local_steps", "16"], "readout_only"),
    "one_step+zo_bias": ([*ONE_STEP, "--zo_parameters", "*.bias", *FORWARD_8], "one_step_only"),
    "one_step+zo_guided": (
        [*ONE_STEP, "--zo_parameters", "model.layers.*", "--zo_guide", "local", *FORWARD_8],
        "one_step_only",
    ),
    "bptt_adamw": (["--estimator", "bptt", "--bptt_lr", "3e-3", "--bptt_truncation", "32"], None),
    # low-rank probes (EGGROLL): rank 1 and 4 at the pure method's K, and rank 1 at 16 x K as one batch per step
    "pure_zo_lowrank_r1": ([*PURE, "16", *LOW_RANK, "1"], None),
    "pure_zo_lowrank_r4": ([*PURE, "16", *LOW_RANK, "4"], None),
    "pure_zo_lowrank_r1_k256": ([*PURE, "256", *LOW_RANK, "1", "--zo_probes_per_forward", "0"], None),
}
OPTIONAL = ("readout+zo_forward_x16", "pure_zo_lowrank_r1", "pure_zo_lowrank_r4", "pure_zo_lowrank_r1_k256")
SECTIONS = {
    "lm": {"arguments": ["--eval_batches", "4"], "metric": "eval_loss"},
    "memory": {
        "arguments": ["--task", "recall", "--tokenizer", "char", "--batch_size", "32", "--task_eval_examples", "64"],
        "metric": "exact_match_in_distribution",
    },
}


@dataclass
class EstimatorBenchmarkArguments:
    sections: list[str] = field(
        default_factory=lambda: ["lm", "memory", "cosine"], metadata={"help": "lm, memory, cosine"}
    )
    methods: list[str] = field(
        default_factory=lambda: [m for m in METHODS if m not in OPTIONAL],
        metadata={"help": f"any of {list(METHODS)} (by default all but {list(OPTIONAL)})"},
    )
    seconds: float = field(default=150.0, metadata={"help": "training seconds per run"})
    jobs: int = field(default=2, metadata={"help": "runs at a time, each on one thread"})
    recall_length: int = field(default=30, metadata={"help": "memory section: training delays 2..L, OOD L+1..L+50"})
    evaluations: int = field(default=6, metadata={"help": "evaluations per run"})
    output_dir: str = field(default="outputs/benchmark_estimators", metadata={"help": "runs, CSV and plots"})
    replot: bool = field(default=False, metadata={"help": "train nothing: tabulate and plot the runs in output_dir"})
    train_arguments: str = field(
        default="", metadata={"help": "more scripts/train.py arguments for every run, one string (e.g. a tiny model)"}
    )


def train(arguments: list[str], output_dir: Path) -> list[dict]:
    """One scripts/train.py run on one thread; its logged records."""
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *arguments, "--output_dir", str(output_dir)]
    command += ["--log_with", "none", "--save_steps", "0"]
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return logged_metrics(output_dir)


def budgeted_run(name: str, section: str, args: EstimatorBenchmarkArguments) -> list[dict]:
    """Time a few steps, then train for args.seconds with schedules spanning the steps that fit."""
    method, _ = METHODS[name]
    base = [*SECTIONS[section]["arguments"], *shlex.split(args.train_arguments), *method]  # the method wins
    if section == "memory":
        base += ["--task_max_length", str(args.recall_length)]
    folder = Path(args.output_dir) / section / name
    calibration = train(
        [*base, "--max_steps", "12", "--eval_steps", "0", "--logging_steps", "1"], folder / "calibration"
    )
    seconds_per_step = statistics.median(
        r["step_seconds"] for r in calibration if "step_seconds" in r and r["step"] > 2
    )
    steps = max(int(args.seconds / seconds_per_step), args.evaluations)
    return train(
        [
            *base,
            "--max_steps",
            str(steps),
            "--eval_steps",
            str(max(steps // args.evaluations, 1)),
            "--logging_steps",
            str(max(steps // 50, 1)),
            "--max_train_seconds",
            str(args.seconds),
        ],
        folder,
    )


def final_row(section: str, name: str, records: list[dict]) -> dict:
    final = records[-1]
    steps = [r for r in records if "forward_passes" in r]
    return {
        "section": section,
        "method": name,
        "steps": final["step"],
        "training_seconds": round(final["training_seconds"], 1),
        "forward_passes": steps[-1]["forward_passes"] if steps else None,
        "eval_loss": round(final["eval_loss"], 4) if "eval_loss" in final else None,
        "exact_match_in_distribution": final.get("exact_match_in_distribution"),
        "exact_match_out_of_distribution": final.get("exact_match_out_of_distribution"),
        "peak_memory_mb": round(max(r.get("peak_memory_mb", 0.0) for r in steps)) if steps else None,
    }


def zo_contributions(rows: list[dict]) -> None:
    """Add each hybrid's ZO contribution: how much better it ends than the probe-free baseline it builds on."""
    by_name = {(row["section"], row["method"]): row for row in rows}
    for row in rows:
        baseline = METHODS[row["method"]][1]
        if baseline is None or (row["section"], baseline) not in by_name:
            continue
        other = by_name[row["section"], baseline]
        if row["section"] == "lm":
            row["zo_contribution"] = round(other["eval_loss"] - row["eval_loss"], 4)
        else:
            for key in ("exact_match_in_distribution", "exact_match_out_of_distribution"):
                row[f"zo_contribution_{key.removeprefix('exact_match_')}"] = round(row[key] - other[key], 4)


def plot(section: str, runs: dict[str, list[dict]], path: Path) -> None:
    metric = SECTIONS[section]["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, records in runs.items():
        points = [r for r in records if metric in r and "forward_passes" in r]
        style = "--" if METHODS[name][1] is None else "-"
        for ax, key in zip(axes, ("training_seconds", "step", "forward_passes"), strict=True):
            ax.plot([r[key] for r in points], [r[metric] for r in points], style, marker=".", label=name)
    for ax, key in zip(axes, ("training seconds", "steps", "forward passes"), strict=True):
        ax.set(xlabel=key, ylabel=metric.replace("_", " "), xscale="log" if key != "training seconds" else "linear")
    axes[0].set_title(f"{section}: equal wall-clock (dashed: no probes, or BPTT)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradient_cosines(train_arguments: list[str], probes: tuple[int, ...] = (16, 256), seeds: int = 3) -> list[dict]:
    """Cosine of each estimator with the full BPTT gradient, on one batch of the default run at initialisation
    (fp64, so the finite differences measure the estimator, not rounding)."""
    from hf_zoo_rnn.forwards.local import accumulate_local_gradients
    from hf_zoo_rnn.training import ZooTrainer, parse_arguments
    from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer

    with tempfile.TemporaryDirectory() as scratch:
        trainer = ZooTrainer(*parse_arguments(["--output_dir", scratch, "--log_with", "none", *train_arguments]))
        trainer.setup()
        input_ids, labels = trainer.batches.next_batch()
    model = trainer.model.double().train().requires_grad_(True)

    def flat_grad(fill) -> torch.Tensor:
        model.zero_grad(set_to_none=False)
        fill()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    true = flat_grad(lambda: model(input_ids, labels=labels).loss.backward())
    one_step = flat_grad(lambda: accumulate_local_gradients(model, input_ids, labels, "one_step"))

    def readout_only():
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("lm_head."))
        accumulate_local_gradients(model, input_ids, labels, "readout")
        model.requires_grad_(True)

    readout = flat_grad(readout_only)
    rows = [
        {"estimator": "readout gradient (zero elsewhere)", "probes": 0, "cosine": cosine(readout, true)},
        {"estimator": "one-step gradient", "probes": 0, "cosine": cosine(one_step, true)},
    ]
    model.requires_grad_(False)
    split = [p.numel() for p in model.parameters()]
    variants = {
        "CD-RGE, isotropic": {},
        "CD-RGE, guided by the one-step gradient (alpha 0.5)": {"guide": "local"},
        "CD-RGE, low-rank r=1 (EGGROLL)": {"perturbation": "lowrank", "perturbation_rank": 1},
        "CD-RGE, low-rank r=4 (EGGROLL)": {"perturbation": "lowrank", "perturbation_rank": 4},
    }
    for name, options in variants.items():
        for k in probes:
            values = []
            for seed in range(seeds):
                config = ZOConfig(num_probes=k, eps=1e-4, lr=1.0, seed=seed, **options)
                zo = ZOOptimizer(model, config)
                before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
                surrogates = [list(one_step.split(split))] if config.guide == "local" else ()
                zo.step(lambda: model(input_ids, labels=labels, logits_to_keep=1).loss, surrogates=surrogates)
                after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                values.append(cosine(before - after, true))
                with torch.no_grad():  # back to theta for the next estimate
                    for param, piece in zip(model.parameters(), before.split(split), strict=True):
                        param.copy_(piece.view_as(param))
            rows.append({"estimator": name, "probes": k, "cosine": statistics.mean(values)})
    for row in rows:
        row["cosine"] = round(row["cosine"], 4)
        row["section"] = "cosine"
    return rows


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    (args,) = HfArgumentParser(EstimatorBenchmarkArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.methods) - set(METHODS)) + sorted(set(args.sections) - {*SECTIONS, "cosine"})
    if unknown:
        raise SystemExit(f"unknown method(s) or section(s) {unknown}; methods: {list(METHODS)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for section in [s for s in args.sections if s in SECTIONS]:
        if args.replot:
            runs = {name: logged_metrics(out / section / name) for name in args.methods}
        else:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {name: pool.submit(budgeted_run, name, section, args) for name in args.methods}
                runs = {name: future.result() for name, future in futures.items()}
        rows += [final_row(section, name, records) for name, records in runs.items()]
        plot(section, runs, out / f"estimators_{section}.png")
    zo_contributions(rows)
    if "cosine" in args.sections:
        rows += gradient_cosines(shlex.split(args.train_arguments))
    write_table(rows, out / "estimators.csv")
    print(
        f"wrote {out / 'estimators.csv'} and estimators_<section>.png ({args.seconds:.0f} s per run, {args.jobs} at a time)"
    )


if __name__ == "__main__":
    main()
