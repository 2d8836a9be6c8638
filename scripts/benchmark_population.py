"""The ES population as one batch: completions per second of an evolution-strategies step, its members generating in
one batched forward per token (low-rank members sharing the base weights) against one member at a time, and against
plain batched `generate` of the same number of rows; and the peak RSS of each.

    python scripts/benchmark_population.py --model outputs/default [--members 16 64 256] [--ranks 1 4]
        [--prompts 8] [--max_new_tokens 40] [--output_dir outputs/benchmarks]

Each measurement runs in a fresh process with one thread (so peak RSS is its own). The ES step is the trainer's
(`EvolutionStrategies`: ask, generate, score, update) with a reward that holds no model (distinct-4), so the
figures are generation and the update, not a reward model. A last row is ESTrainer's overhead over the bare step at
the rewards-kjv shape (--api_steps). Writes population.csv and population.png.
"""

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: E402

from hf_zoo_rnn.data import BUILTIN_KJV  # noqa: E402
from hf_zoo_rnn.data.prompts import PromptStream  # noqa: E402
from hf_zoo_rnn.estimators.evolution import EvolutionStrategies  # noqa: E402
from hf_zoo_rnn.rewards import RewardObjective, distinct_4  # noqa: E402
from hf_zoo_rnn.training.reporting import RESULT, run_worker, write_table  # noqa: E402
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer  # noqa: E402


@dataclass
class PopulationBenchmarkArguments:
    model: str = field(default="outputs/default", metadata={"help": "the model the members perturb"})
    members: list[int] = field(default_factory=lambda: [16, 64, 256], metadata={"help": "members (2 per probe)"})
    ranks: list[int] = field(default_factory=lambda: [1, 4], metadata={"help": "low-rank members' r"})
    prompts: int = field(default=8, metadata={"help": "prompts per step (rewards-kjv: 8)"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens per completion (rewards-kjv: 40)"})
    min_seconds: float = field(default=6.0, metadata={"help": "repeat each measurement for at least this long"})
    sequential_max_members: int = field(default=64, metadata={"help": "one-at-a-time only up to this many members"})
    api_steps: int = field(default=40, metadata={"help": "steps of the ESTrainer overhead row (0: none)"})
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where population.csv/png go"})
    worker: str | None = field(default=None, metadata={"help": "internal: MODE:MEMBERS:RANK in this process"})


def repeated(run, min_seconds: float) -> tuple[float, int]:
    """(seconds per call, calls): run() once to warm up, then until `min_seconds` have passed."""
    run()
    calls, started = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - started < min_seconds:
        run()
        calls += 1
    return (time.perf_counter() - started) / calls, calls


def measure(args: PopulationBenchmarkArguments, mode: str, members: int, rank: int) -> dict:
    """One row: `generate` (plain batched generation of members x prompts rows), `batched` or `sequential` ES steps."""
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval().requires_grad_(False)
    prompts = PromptStream(BUILTIN_KJV, "train", args.prompts, seed=0, prompt_words=4).batch(0)
    objective = RewardObjective(tokenizer, [distinct_4], [1.0], args.max_new_tokens)
    if mode == "generate":
        rows = prompts.prompts * members
        seconds, calls = repeated(lambda: objective.completions(model, rows), args.min_seconds)
    else:
        perturbation = {"perturbation": "lowrank", "perturbation_rank": rank} if rank else {}
        config = ZOConfig(
            num_probes=members // 2, eps=0.01, lr=1e-3, update_rule="adam", loss_shaping="zscore", **perturbation
        )
        step = EvolutionStrategies(model, ZOOptimizer(model, config), objective, run_seed=0)
        step.batched = mode == "batched"
        seconds, calls = repeated(lambda: step.train_step(prompts), args.min_seconds)
    completions = members * args.prompts
    return {
        "mode": mode,
        "members": members,
        "rank": rank if mode != "generate" else "",
        "rows": completions,
        "seconds_per_step": round(seconds, 4),
        "completions_per_s": round(completions / seconds, 1),
        "tokens_per_s": round(completions * args.max_new_tokens / seconds),
        "calls": calls,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def api_overhead(args: PopulationBenchmarkArguments) -> dict:
    """The Python API's cost over the bare ES step at the rewards-kjv shape (64 rank-1 members): the mean wall time
    between ESTrainer's on_step_end callbacks (logging, progress bar, callbacks included) against the step alone."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_zoo_rnn import ESConfig, ESTrainer
    from hf_zoo_rnn.data.prompts import kjv_openings

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = kjv_openings("train", 4)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval().requires_grad_(False)
    config = ZOConfig(
        num_probes=32, eps=0.01, lr=1e-3, update_rule="adam", loss_shaping="zscore", perturbation="lowrank"
    )
    objective = RewardObjective(tokenizer, [distinct_4], [1.0], args.max_new_tokens)
    step = EvolutionStrategies(model, ZOOptimizer(model, config), objective, run_seed=0)
    stream = iter(PromptStream("rows", "train", args.prompts, seed=0, rows=rows))
    bare = []
    for _ in range(args.api_steps):
        batch = next(stream)
        started = time.perf_counter()
        step.train_step(batch)
        bare.append(time.perf_counter() - started)

    class Clock(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    es_args = ESConfig(
        output_dir=str(Path(args.output_dir) / "api_overhead_run"),
        max_steps=args.api_steps,
        per_device_train_batch_size=args.prompts,
        max_completion_length=args.max_new_tokens,
        population_size=64,
        logging_steps=5,
        eval_strategy="no",
        save_strategy="no",
        overwrite_output_dir=True,
        use_cpu=True,
        seed=0,
    )
    clock = Clock()
    trainer = ESTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model),
        reward_funcs=distinct_4,
        args=es_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    skip = min(5, args.api_steps // 2)  # warm-up steps
    bare_s = sum(bare[skip:]) / len(bare[skip:])
    gaps = [b - a for a, b in zip(clock.ends[skip:], clock.ends[skip + 1 :], strict=False)]
    api_s = sum(gaps) / len(gaps)
    return {
        "mode": "ESTrainer (Python API)",
        "members": 64,
        "rank": 1,
        "rows": 64 * args.prompts,
        "seconds_per_step": round(api_s, 4),
        "bare_step_seconds": round(bare_s, 4),
        "api_overhead": round(api_s / bare_s - 1, 4),
    }


def main() -> None:
    (args,) = HfArgumentParser(PopulationBenchmarkArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        if args.worker == "api":
            print(RESULT + json.dumps(api_overhead(args)))
            return
        mode, members, rank = args.worker.split(":")
        print(RESULT + json.dumps(measure(args, mode, int(members), int(rank))))
        return
    rows = []
    for members in args.members:
        plain = run_in_worker(f"generate:{members}:0")
        group = [plain]
        for rank in args.ranks:
            group.append(run_in_worker(f"batched:{members}:{rank}"))
            if members <= args.sequential_max_members:
                group.append(run_in_worker(f"sequential:{members}:{rank}"))
        if members <= args.sequential_max_members:
            group.append(run_in_worker(f"sequential:{members}:0"))  # full-rank members: the paper's directions
        for row in group[1:]:
            if "error" not in row and "error" not in plain:
                row["share_of_generate"] = round(row["completions_per_s"] / plain["completions_per_s"], 3)
                row["rss_vs_generate"] = round(row["peak_rss_mb"] / plain["peak_rss_mb"], 3)
        batched = {r["rank"]: r for r in group if r.get("mode") == "batched"}
        for row in group:
            if row.get("mode") == "sequential" and row["rank"] in batched:
                batched[row["rank"]]["speedup_vs_sequential"] = round(
                    batched[row["rank"]]["completions_per_s"] / row["completions_per_s"], 2
                )
        rows += group
    if args.api_steps:
        rows.append(run_in_worker("api"))
    write_table(rows, output_dir / "population.csv")
    plot(rows, output_dir / "population.png", args)


def plot(rows: list[dict], path: Path, args: PopulationBenchmarkArguments) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for row in rows:
        if "error" not in row and row["mode"] in ("generate", "batched", "sequential"):
            label = (
                "plain generate"
                if row["mode"] == "generate"
                else f"ES step, {row['mode']}, rank {row['rank'] or 'full'}"
            )
            series.setdefault(label, []).append((row["members"], row["completions_per_s"]))
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label, linestyle="--" if "generate" in label else "-")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="members (rows = members x prompts)",
        ylabel="completions / s",
        title=f"{args.prompts} prompts x {args.max_new_tokens} tokens, one thread",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_in_worker(spec: str) -> dict:
    """One measurement in a fresh process (one thread): its row, or a row naming its error."""
    return run_worker(__file__, spec, "mode")


if __name__ == "__main__":
    main()
