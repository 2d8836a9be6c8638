"""Training on a text reward, side by side at equal wall-clock, from the same model, on the same prompts, with the
same reward functions (distinct-4 of a 40-token continuation + 0.1 x fluency under the frozen start):

  es           evolution strategies: python -m hf_zoo_rnn.train --config rewards-kjv (greedy members, no gradients)
  grpo         TRL's GRPOTrainer: 8 sampled completions per prompt, backpropagation through them, KL term beta,
               one run per learning rate of --grpo_lrs (the sweep a fair comparison owes it)
  one_step_pg  a group-normalised policy gradient by the one-step gradient (no backpropagation through time)

Each run trains for --seconds of wall-clock (evaluation excluded), in one invocation; each starts in its own process,
one thread each. GRPO's learning rates are swept on the first seed, and the best (by held-out reward) runs the other
seeds. Reported per run, on held-out prompts (Jude, Revelation): greedy distinct-4, mean reward, KL to the start
model along its greedy continuations, validation loss, and peak RSS; samples of greedy text (and of sampled text for
GRPO, the policy it optimises). --memory also measures the peak RSS of one ES step against plain generation, each in
a process of its own, at each of --memory_lengths completion tokens.

    python scripts/benchmark_rewards.py --start outputs/default [--seconds 120] [--seeds 0 1 2]
        [--methods es grpo one_step_pg] [--grpo_lrs 3e-4 1e-4 3e-5] [--memory] [--output_dir outputs/benchmarks]

Writes rewards.csv, rewards.png, rewards_samples.md (and rewards_memory.csv).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainerCallback  # noqa: E402

from hf_zoo_rnn.data import BUILTIN_KJV, PackedStream, open_text_source  # noqa: E402
from hf_zoo_rnn.data.prompts import PromptStream  # noqa: E402
from hf_zoo_rnn.rewards import Fluency, RewardObjective, distinct_4, member_seed  # noqa: E402
from hf_zoo_rnn.training.evaluation import kl_to_reference, language_model_metrics  # noqa: E402
from hf_zoo_rnn.training.policy_gradient import OneStepPolicyGradient  # noqa: E402
from hf_zoo_rnn.training.reporting import write_table  # noqa: E402
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("es", "grpo", "one_step_pg")
WEIGHTS = [1.0, 0.1]  # distinct_4, fluency: as configs/train/rewards-kjv.yaml


@dataclass
class RewardBenchmarkArguments:
    start: str = field(default="outputs/default", metadata={"help": "the trained model every method starts from"})
    seconds: float = field(default=120.0, metadata={"help": "training wall-clock per run"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "one run per seed"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"of {METHODS}"})
    grpo_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-4, 3e-5], metadata={"help": "GRPO lr sweep"})
    grpo_beta: float = field(default=0.04, metadata={"help": "GRPO's KL coefficient"})
    pg_lr: float = field(default=1e-4, metadata={"help": "one-step policy gradient lr"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step (ES, GRPO, PG alike)"})
    group: int = field(default=8, metadata={"help": "GRPO / PG completions per prompt"})
    max_new_tokens: int = field(default=40, metadata={"help": "completion length"})
    eval_prompts: int = field(default=64, metadata={"help": "held-out prompts evaluated"})
    memory: bool = field(default=False, metadata={"help": "also: peak RSS of an ES step against generation"})
    memory_lengths: list[int] = field(default_factory=lambda: [16, 1024], metadata={"help": "completion tokens"})
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where the CSV, PNG, samples and runs go"})
    worker: str | None = field(default=None, metadata={"help": "internal: METHOD:SEED[:LR] in this process"})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reward_functions(start, tokenizer) -> list:
    return [distinct_4, Fluency(start, tokenizer)]


def evaluate(model, start, tokenizer, args: RewardBenchmarkArguments) -> dict:
    """Held-out greedy distinct-4, mean reward and KL to the start; validation loss; three samples."""
    model.eval()
    stream = PromptStream(BUILTIN_KJV, "validation", args.eval_prompts, seed=0)
    batch = stream.batch(0)
    greedy = RewardObjective(tokenizer, reward_functions(start, tokenizer), WEIGHTS, args.max_new_tokens)
    completions = greedy.completions(model, batch.prompts)
    rewards = greedy.scored(batch.prompts, completions, {})
    text = PackedStream(open_text_source(BUILTIN_KJV, "validation"), tokenizer, 128, 16)
    return {
        "distinct_4": statistics.mean(distinct_4(batch.prompts, completions)),
        "reward": statistics.mean(rewards),
        "kl_to_start": kl_to_reference(model, start, tokenizer, batch.prompts, completions),
        "eval_loss": language_model_metrics(model, text, 4)["eval_loss"],
        "samples": [p + " |" + c for p, c in zip(batch.prompts[:3], completions[:3], strict=True)],
    }


def run_es(args: RewardBenchmarkArguments, seed: int, out: Path) -> float:
    command = [sys.executable, "-m", "hf_zoo_rnn.train", "--config", "rewards-kjv", "--init_from", args.start,
               "--output_dir", str(out), "--overwrite_output_dir", "--seed", str(seed), "--max_steps", "100000",
               "--max_train_seconds", str(args.seconds), "--batch_size", str(args.prompts_per_step),
               "--max_new_tokens", str(args.max_new_tokens), "--eval_steps", "0", "--save_steps", "0",
               "--log_with", "none"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in records)


class StopAfter(TrainerCallback):
    """Stop a transformers Trainer once its training steps have taken `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = self.started or time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.started >= self.seconds:
            control.should_training_stop = True


def run_grpo(args: RewardBenchmarkArguments, seed: int, lr: float, out: Path, model, start, tokenizer) -> int:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = PromptStream(BUILTIN_KJV, "train", args.prompts_per_step * 500, seed=seed).batch(0).prompts
    config = GRPOConfig(
        output_dir=str(out), learning_rate=lr, beta=args.grpo_beta, num_generations=args.group,
        per_device_train_batch_size=args.group * args.prompts_per_step, max_completion_length=args.max_new_tokens,
        max_steps=100000, seed=seed, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, reward_weights=WEIGHTS, dataloader_num_workers=0,
    )  # fmt: skip
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_functions(start, tokenizer), args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
        callbacks=[StopAfter(args.seconds)],
    )  # fmt: skip
    trainer.train()
    return trainer.state.global_step


def run_one_step_pg(args: RewardBenchmarkArguments, seed: int, model, start, tokenizer) -> int:
    objective = RewardObjective(tokenizer, reward_functions(start, tokenizer), WEIGHTS, args.max_new_tokens,
                                do_sample=True, samples=args.group)  # fmt: skip
    learner = OneStepPolicyGradient(model, objective, args.pg_lr)
    stream = PromptStream(BUILTIN_KJV, "train", args.prompts_per_step, seed=seed)
    started, steps = time.perf_counter(), 0
    for batch in stream:
        if time.perf_counter() - started >= args.seconds:
            break
        learner.step(batch.prompts, batch.columns, member_seed(seed, steps, 0, 0))
        steps += 1
    return steps


def memory_worker(args: RewardBenchmarkArguments, mode: str, length: int) -> dict:
    """Peak RSS of generating `length` tokens for a batch of prompts, or of one ES step doing so for every member."""
    tokenizer = AutoTokenizer.from_pretrained(args.start)
    model = AutoModelForCausalLM.from_pretrained(args.start).eval().requires_grad_(False)
    prompts = PromptStream(BUILTIN_KJV, "train", args.prompts_per_step, seed=0).batch(0).prompts
    if mode == "generate":
        objective = RewardObjective(tokenizer, [distinct_4], [1.0], length)
        run = partial(objective.completions, model, prompts)
    else:  # with the config's rewards: fluency holds a frozen copy of the start
        start = AutoModelForCausalLM.from_pretrained(args.start).eval().requires_grad_(False)
        objective = RewardObjective(tokenizer, reward_functions(start, tokenizer), WEIGHTS, length)
        config = ZOConfig(num_probes=8, eps=0.01, lr=1e-3, update_rule="adam", loss_shaping="zscore")
        run = partial(ZOOptimizer(model, config).step, partial(objective.loss, model, prompts, {}))
    before, peak = rss_peak_during(run)
    return {"mode": mode, "completion_tokens": length, "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1), "extra_mb": round(peak - before, 1)}  # fmt: skip


def rss_peak_during(run) -> tuple[float, float]:
    """(RSS before, highest RSS while run() ran), sampled every millisecond, in MB."""
    process, peak, done = psutil.Process(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
            time.sleep(0.001)

    before = process.memory_info().rss / 2**20
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return before, max(peak[0], process.memory_info().rss / 2**20)


def worker(args: RewardBenchmarkArguments, spec: str, output_dir: Path) -> dict:
    if spec.startswith("memory-"):
        mode, length = spec.removeprefix("memory-").split(":")
        return memory_worker(args, mode, int(length))
    method, seed, *lr = spec.split(":")
    seed, lr = int(seed), float(lr[0]) if lr else None
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.start)
    start = AutoModelForCausalLM.from_pretrained(args.start).eval().requires_grad_(False)
    out = output_dir / "reward_runs" / spec.replace(":", "-")
    if method == "es":
        steps = run_es(args, seed, out)
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.start)
        if method == "grpo":
            steps = run_grpo(args, seed, lr, out, model, start, tokenizer)
        else:
            steps = run_one_step_pg(args, seed, model, start, tokenizer)
    results = {"method": method if lr is None else f"{method} lr={lr:g}", "seed": seed, "steps": steps,
               **evaluate(model, start, tokenizer, args), "peak_rss_mb": round(peak_rss_mb())}  # fmt: skip
    if method == "grpo":  # the sampled policy GRPO optimises, beside the greedy decoder
        sampled = RewardObjective(tokenizer, reward_functions(start, tokenizer), WEIGHTS, args.max_new_tokens,
                                  do_sample=True)  # fmt: skip
        batch = PromptStream(BUILTIN_KJV, "validation", args.eval_prompts, seed=0).batch(0)
        texts = sampled.completions(model, batch.prompts, seed=seed)
        results["sampled_distinct_4"] = statistics.mean(distinct_4(batch.prompts, texts))
        results["samples"] += [f"(sampled) {p} |{c}" for p, c in zip(batch.prompts[:2], texts[:2], strict=True)]
    return results


def main() -> None:
    (args,) = HfArgumentParser(RewardBenchmarkArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        torch.set_num_threads(1)
        print("RESULT " + json.dumps(worker(args, args.worker, output_dir)))
        return
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"benchmark_rewards.py: unknown method(s) {unknown}; choose from {METHODS}")
    start = AutoModelForCausalLM.from_pretrained(args.start).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.start)
    rows = [{"method": "start", "seed": "", "steps": 0, **evaluate(start, start, tokenizer, args)}]
    first, rest = args.seeds[0], args.seeds[1:]
    for method in args.methods:
        if method != "grpo":
            rows += [run_worker(f"{method}:{seed}") for seed in args.seeds]
            continue
        sweep = [run_worker(f"grpo:{first}:{lr}") for lr in args.grpo_lrs]
        rows += sweep
        best = max((r for r in sweep if "reward" in r), key=lambda r: r["reward"], default=None)
        if best is not None:
            lr = best["method"].split("lr=")[1]
            rows += [run_worker(f"grpo:{seed}:{lr}") for seed in rest]
    if args.memory:
        table = [run_worker(f"memory-{mode}:{length}") for length in args.memory_lengths
                 for mode in ("generate", "es_step")]  # fmt: skip
        write_table(table, output_dir / "rewards_memory.csv")
    samples = ["# Samples (held-out prompts | continuation)", ""]
    for row in rows:
        samples += [f"## {row['method']} seed {row.get('seed', '')}", ""] + [f"- {s}" for s in row.pop("samples", [])]
        samples.append("")
    (output_dir / "rewards_samples.md").write_text("\n".join(samples))
    write_table(rows, output_dir / "rewards.csv")
    plot(rows, output_dir / "rewards.png")


def run_worker(spec: str) -> dict:
    """One measurement in a fresh process (one thread): its result row, or a row naming its error."""
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", spec]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        return {"method": spec, "error": (result.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[0][len("RESULT ") :])


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if "distinct_4" in row:
            ax.scatter(row["eval_loss"], row["distinct_4"], label=f"{row['method']} {row['seed']}".strip())
    ax.set(
        xlabel="validation loss (nats/token)", ylabel="held-out greedy distinct-4", title="training on a text reward"
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
