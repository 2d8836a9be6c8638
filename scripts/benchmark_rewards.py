"""Training on rewards, side by side at equal wall-clock, from the same model, on the same prompts, with the same
reward functions. Three settings (--prompts):

  kjv       the `make train` model continues held-out KJV verse openings; reward: distinct-4 of a 40-token greedy
            continuation + 0.1 x its fluency under the frozen start
  add       a cross-entropy checkpoint of the `add` task at partial competence; reward: exact match (add_exact)
  reverse   the same for `reverse` (reverse_exact)

Methods (--methods):
  es           evolution strategies: python -m hf_zoo_rnn.train --config rewards-kjv (greedy members, no gradients),
               once per --es_populations entry MEMBERSxRANK (rank "full": the paper's full-rank directions, members
               one at a time; a number: low-rank members generating as one batch)
  es_pass4     the same with pass@4 as the reward: 4 sampled completions per prompt and member, the best one counts
               (a reward GRPO cannot express: its advantage is per completion)
  grpo         TRL's GRPOTrainer: 8 sampled completions per prompt, backpropagation through them, KL term beta,
               one run per learning rate of --grpo_lrs (the sweep a fair comparison owes it)
  one_step_pg  a group-normalised policy gradient by the one-step gradient (no backpropagation through time)
  ce           tasks only, the reference ceiling: cross-entropy with the labels (BPTT + AdamW), as the start was trained

Each run trains for --seconds of wall-clock (evaluation excluded), in one invocation; each starts in its own process,
one thread each. GRPO's learning rates are swept on the first seed, and the best (by held-out reward) runs the other
seeds. Reported per run, on held-out prompts: for kjv (Jude, Revelation) greedy distinct-4, mean reward, KL to the
start model along its greedy continuations, validation loss; for a task greedy exact match in distribution (fresh
prompts of the training lengths) and out of distribution (longer), and pass@4 in distribution. Also steps,
rollouts (completions generated in training), generations per second and peak RSS; samples of greedy text (and of sampled text for GRPO, the policy it optimises).
--memory also measures the peak RSS of one ES step against plain generation, each in a process of its own, at each
of --memory_lengths completion tokens.

    python scripts/benchmark_rewards.py --start outputs/default [--prompts kjv] [--seconds 120] [--seeds 0 1 2]
        [--methods es grpo one_step_pg] [--grpo_lrs 3e-4 1e-4 3e-5] [--memory] [--output_dir outputs/benchmarks]

Writes rewards_<prompts>.csv, rewards_<prompts>.png, rewards_<prompts>_samples.md (and rewards_memory.csv).
"""

import json
import math
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
from hf_zoo_rnn.data.prompts import PROMPT_TASKS, PromptBatch, PromptStream  # noqa: E402
from hf_zoo_rnn.data.tasks import answer_batch, prompt_completion_ids  # noqa: E402
from hf_zoo_rnn.estimators.evolution import EvolutionStrategies  # noqa: E402
from hf_zoo_rnn.forwards.local import accumulate_local_gradients  # noqa: E402
from hf_zoo_rnn.rewards import (  # noqa: E402
    Fluency,
    RewardObjective,
    add_exact,
    distinct_3,
    distinct_4,
    member_seed,
    per_sample,
    reverse_exact,
)
from hf_zoo_rnn.training.evaluation import kl_to_reference, language_model_metrics  # noqa: E402
from hf_zoo_rnn.training.reporting import RESULT, run_worker, write_table  # noqa: E402
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("es", "es_pass4", "grpo", "one_step_pg", "ce")
SETTINGS = (BUILTIN_KJV, *PROMPT_TASKS)
TASK_REWARDS = {"add": add_exact, "reverse": reverse_exact}
PASS_K = 4


@dataclass
class RewardBenchmarkArguments:
    start: str = field(default="outputs/default", metadata={"help": "the trained model every method starts from"})
    prompts: str = field(default=BUILTIN_KJV, metadata={"help": f"the setting: one of {SETTINGS}"})
    seconds: float = field(default=120.0, metadata={"help": "training wall-clock per run"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "one run per seed"})
    methods: list[str] = field(
        default_factory=lambda: ["es", "grpo", "one_step_pg"], metadata={"help": f"of {METHODS}"}
    )
    es_populations: list[str] = field(
        default_factory=lambda: ["64x1"],
        metadata={"help": "ES members x rank per run (rank 'full' or a number; @N: stop at N rollouts)"},
    )
    grpo_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-4, 3e-5], metadata={"help": "GRPO lr sweep"})
    grpo_beta: float = field(default=0.04, metadata={"help": "GRPO's KL coefficient"})
    pg_lr: float = field(default=1e-4, metadata={"help": "one-step policy gradient lr"})
    ce_lr: float = field(default=3e-3, metadata={"help": "ce: the AdamW lr (the start's own, for a task)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step (ES, GRPO, PG alike)"})
    group: int = field(default=8, metadata={"help": "GRPO / PG completions per prompt"})
    max_new_tokens: int = field(default=160, metadata={"help": "completion length (kjv; a task's is its answer's)"})
    read_lengths: list[int] = field(
        default_factory=lambda: [40, 120, 400], metadata={"help": "kjv: held-out greedy distinct-3 at these lengths"}
    )
    task_max_length: int = field(default=10, metadata={"help": "a task's training lengths U[2, L]"})
    eval_prompts: int = field(default=64, metadata={"help": "held-out prompts evaluated"})
    memory: bool = field(default=False, metadata={"help": "also: peak RSS of an ES step against generation"})
    memory_lengths: list[int] = field(default_factory=lambda: [16, 1024], metadata={"help": "completion tokens"})
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where the CSV, PNG, samples and runs go"})
    worker: str | None = field(default=None, metadata={"help": "internal: METHOD:SEED[:LR] in this process"})

    @property
    def is_task(self) -> bool:
        return self.prompts in PROMPT_TASKS

    @property
    def completion_tokens(self) -> int:
        """kjv: --max_new_tokens; a task: its longest answer at the training lengths and the end marker."""
        return self.task_max_length + 2 if self.is_task else self.max_new_tokens


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rewards_of(args: RewardBenchmarkArguments, start, tokenizer) -> tuple[list, list[float]]:
    """The setting's reward functions and weights (as configs/train/rewards-kjv.yaml for kjv)."""
    if args.is_task:
        return [TASK_REWARDS[args.prompts]], [1.0]
    return [distinct_3, Fluency(start, tokenizer)], [1.0, 0.1]


def held_out(args: RewardBenchmarkArguments, split: str = "validation", count: int | None = None):
    return PromptStream(args.prompts, split, count or args.eval_prompts, seed=0, max_task_length=args.task_max_length)


def evaluate(model, start, tokenizer, args: RewardBenchmarkArguments) -> dict:
    """kjv: held-out greedy distinct-4, reward, KL to the start and validation loss. A task: greedy exact match in
    distribution (fresh prompts of the training lengths) and out of distribution, pass@4 in distribution. Samples."""
    model.eval()
    functions, weights = rewards_of(args, start, tokenizer)
    greedy = RewardObjective(tokenizer, functions, weights, args.completion_tokens)
    if args.is_task:
        seen = PromptStream(args.prompts, "train", args.eval_prompts, seed=12345, max_task_length=args.task_max_length)
        batch, longer = seen.batch(0), held_out(args).batch(0)
        completions = greedy.completions(model, batch.prompts)
        ood = RewardObjective(tokenizer, functions, weights, args.task_max_length + 52)
        best_of = RewardObjective(
            tokenizer, functions, weights, args.completion_tokens, do_sample=True, samples=PASS_K, aggregation="best"
        )
        results = {
            "exact_match": statistics.mean(greedy.scored(batch.prompts, completions, batch.columns)),
            "exact_match_ood": statistics.mean(ood.prompt_rewards(model, longer.prompts, longer.columns)),
            f"pass@{PASS_K}": statistics.mean(best_of.prompt_rewards(model, batch.prompts, batch.columns, seed=0)),
        }
    else:
        batch = held_out(args).batch(0)
        completions = greedy.completions(model, batch.prompts)
        text = PackedStream(open_text_source(BUILTIN_KJV, "validation"), tokenizer, 128, 16)
        results = {
            "distinct_4": statistics.mean(distinct_4(batch.prompts, completions)),
            "reward": statistics.mean(greedy.scored(batch.prompts, completions, batch.columns)),
            "eval_loss": language_model_metrics(model, text, 4)["eval_loss"],
        }
        for length in args.read_lengths:  # repetition at the lengths people read, beyond the reward's window
            texts = RewardObjective(tokenizer, [distinct_3], [1.0], length).completions(model, batch.prompts)
            results[f"distinct_3@{length}"] = statistics.mean(distinct_3(batch.prompts, texts))
        long_samples = [p + " |" + c for p, c in zip(batch.prompts[:2], texts[:2], strict=True)]
    results["kl_to_start"] = kl_to_reference(model, start, tokenizer, batch.prompts, completions)
    results["samples"] = [p + " |" + c for p, c in zip(batch.prompts[:3], completions[:3], strict=True)]
    if not args.is_task:
        results["samples"] += [f"({args.read_lengths[-1]} tokens) {sample}" for sample in long_samples]
    return results


def score(row: dict) -> float:
    """What a run is ranked by: held-out reward (kjv) or exact match in distribution (a task)."""
    return row.get("reward", row.get("exact_match", float("-inf")))


def train_command(args: RewardBenchmarkArguments, seed: int, out: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hf_zoo_rnn.train",
        *options,
        "--init_from",
        args.start,
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "--seed",
        str(seed),
        "--max_steps",
        "1000000",
        "--max_train_seconds",
        str(args.seconds),
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--log_with",
        "none",
    ]


def run_trainer(command: list[str], out: Path) -> int:
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in records)


def run_es(args: RewardBenchmarkArguments, seed: int, out: Path, pass_k: bool, population: str) -> int:
    population, _, cap = population.partition("@")
    members, rank = population.split("x")
    options = [
        "--config",
        "rewards-kjv",
        "--batch_size",
        str(args.prompts_per_step),
        "--max_new_tokens",
        str(args.completion_tokens),
        "--zo_num_probes",
        str(int(members) // 2),
    ]
    if rank == "full":
        options += ["--zo_perturbation", "full"]
    else:
        options += ["--zo_perturbation", "lowrank", "--zo_perturbation_rank", rank]
    if args.is_task:
        options += [
            "--prompts",
            args.prompts,
            "--rewards",
            TASK_REWARDS[args.prompts].__name__,
            "--reward_weights",
            "1",
            "--task_max_length",
            str(args.task_max_length),
        ]
    if pass_k:
        options += ["--do_sample", "--reward_samples", str(PASS_K), "--reward_aggregation", "best"]
    command = train_command(args, seed, out, *options)
    if cap:  # stop at that many rollouts (the later --max_steps wins): a comparison at equal rollouts
        per_step = int(members) * args.prompts_per_step * (PASS_K if pass_k else 1)
        command += ["--max_steps", str(max(1, int(cap) // per_step))]
    return run_trainer(command, out)


def run_ce(args: RewardBenchmarkArguments, seed: int, out: Path) -> int:
    options = [
        "--task",
        args.prompts,
        "--task_max_length",
        str(args.task_max_length),
        "--estimator",
        "bptt",
        "--bptt_lr",
        str(args.ce_lr),
        "--batch_size",
        str(args.prompts_per_step * args.group),
    ]
    return run_trainer(train_command(args, seed, out, *options), out)


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

    batch = PromptStream(
        args.prompts, "train", args.prompts_per_step * 500, seed=seed, max_task_length=args.task_max_length
    ).batch(0)
    functions, weights = rewards_of(args, start, tokenizer)
    config = GRPOConfig(
        output_dir=str(out),
        learning_rate=lr,
        beta=args.grpo_beta,
        num_generations=args.group,
        per_device_train_batch_size=args.group * args.prompts_per_step,
        max_completion_length=args.completion_tokens,
        max_steps=100000,
        seed=seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        reward_weights=weights,
        dataloader_num_workers=0,
    )
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=functions,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": batch.prompts, **batch.columns}),
        callbacks=[StopAfter(args.seconds)],
    )
    trainer.train()
    return trainer.state.global_step


# -- the one-step policy gradient: the no-BPTT baseline of training on rewards (this benchmark's only user) ----------
# Per step, `group` completions are sampled for each prompt; their rewards, normalised within the group (GRPO's
# advantage), weigh each completion's one-step gradient of its log-likelihood (forwards/local.py: each position's
# loss through the layers and one recurrent step), and AdamW steps. No KL term, no reference model.


def group_advantages(rewards: list[float], group: int) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4), 0 for a non-finite reward, per completion."""
    values = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    finite = torch.isfinite(values)
    filled = torch.where(finite, values, torch.zeros_like(values))
    count = finite.sum(1, keepdim=True).clamp(min=1)
    mean = filled.sum(1, keepdim=True) / count
    spread = (((filled - mean) * finite) ** 2).sum(1, keepdim=True).div(count).sqrt()
    return torch.where(finite, (values - mean) / (spread + 1e-4), torch.zeros_like(values)).flatten()


class OneStepPolicyGradient:
    """Sample, score, weigh the one-step gradient by the advantages, step AdamW."""

    def __init__(self, model, objective: RewardObjective, lr: float):
        self.model, self.objective = model, objective
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def update(self, prompts: list[str], columns: dict, seed: int) -> float:
        """One update; returns the mean reward of the sampled completions."""
        objective, tokenizer = self.objective, self.objective.tokenizer
        self.model.eval()
        completions = objective.completions(self.model, prompts, seed)
        group = objective.samples
        expanded, expanded_columns = per_sample(prompts, columns, group)
        rewards = objective.scored(expanded, completions, expanded_columns)
        advantages = group_advantages(rewards, group)
        pairs = [prompt_completion_ids(tokenizer, p, c) for p, c in zip(expanded, completions, strict=True)]
        # an empty completion scores the end token, so every row has a position that learns
        ids, labels = answer_batch([(p, c or [tokenizer.eos_token_id]) for p, c in pairs], tokenizer.pad_token_id)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device = self.model.device
        accumulate_local_gradients(self.model, ids.to(device), labels.to(device), "one_step", advantages.to(device))
        self.optimizer.step()
        finite = [r for r in rewards if not math.isnan(r)]
        return sum(finite) / len(finite) if finite else math.nan


def run_one_step_pg(args: RewardBenchmarkArguments, seed: int, model, start, tokenizer) -> int:
    functions, weights = rewards_of(args, start, tokenizer)
    objective = RewardObjective(
        tokenizer, functions, weights, args.completion_tokens, do_sample=True, samples=args.group
    )
    learner = OneStepPolicyGradient(model, objective, args.pg_lr)
    stream = PromptStream(args.prompts, "train", args.prompts_per_step, seed=seed, max_task_length=args.task_max_length)
    started, steps = time.perf_counter(), 0
    for batch in stream:
        if time.perf_counter() - started >= args.seconds:
            break
        learner.update(batch.prompts, batch.columns, member_seed(seed, steps, 0, 0))
        steps += 1
    return steps


def generations_per_step(args: RewardBenchmarkArguments, method: str, population: str | None) -> int:
    """Completions a step generates: ES, every member for every prompt (and every sample of pass@4)."""
    if method in ("es", "es_pass4"):
        members = int(population.partition("@")[0].split("x")[0])
        return members * args.prompts_per_step * (PASS_K if method == "es_pass4" else 1)
    return 0 if method == "ce" else args.group * args.prompts_per_step


def memory_worker(args: RewardBenchmarkArguments, mode: str, length: int) -> dict:
    """Peak RSS of generating `length` tokens for a batch of prompts, or of one ES step doing so for every member."""
    tokenizer = AutoTokenizer.from_pretrained(args.start)
    model = AutoModelForCausalLM.from_pretrained(args.start).eval().requires_grad_(False)
    prompts = PromptStream(BUILTIN_KJV, "train", args.prompts_per_step, seed=0).batch(0).prompts
    if mode == "generate":
        objective = RewardObjective(tokenizer, [distinct_4], [1.0], length)
        run = partial(objective.completions, model, prompts * 64)  # as many rows as the ES step's members
    else:  # with the config's rewards (fluency holds a frozen copy of the start) and population (64 low-rank members)
        start = AutoModelForCausalLM.from_pretrained(args.start).eval().requires_grad_(False)
        objective = RewardObjective(tokenizer, *rewards_of(args, start, tokenizer), length)
        config = ZOConfig(
            num_probes=32, eps=0.01, lr=1e-3, update_rule="adam", loss_shaping="zscore", perturbation="lowrank"
        )
        step = EvolutionStrategies(model, ZOOptimizer(model, config), objective, run_seed=0)
        run = partial(step.train_step, PromptBatch(prompts))
    before, peak = rss_peak_during(run)
    return {
        "mode": mode,
        "completion_tokens": length,
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "extra_mb": round(peak - before, 1),
    }


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
    method, seed, *option = spec.split(":")
    seed = int(seed)
    lr = float(option[0]) if option and method == "grpo" else None
    population = option[0] if option and method.startswith("es") else None
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.start)
    start = AutoModelForCausalLM.from_pretrained(args.start).eval().requires_grad_(False)
    out = output_dir / f"reward_runs_{args.prompts}" / spec.replace(":", "-")
    if method in ("es", "es_pass4", "ce"):
        if method == "ce":
            steps = run_ce(args, seed, out)
        else:
            steps = run_es(args, seed, out, method == "es_pass4", population)
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.start)
        if method == "grpo":
            steps = run_grpo(args, seed, lr, out, model, start, tokenizer)
        else:
            steps = run_one_step_pg(args, seed, model, start, tokenizer)
    name = f"{method} lr={lr:g}" if lr is not None else f"{method} {population}" if population else method
    rollouts = steps * generations_per_step(args, method, population)
    seconds = args.seconds
    if method in ("es", "es_pass4", "ce"):  # the trainer's own count (a run capped at N rollouts stops early)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds = max(r.get("training_seconds", 0.0) for r in records) or args.seconds
    results = {
        "method": name,
        "seed": seed,
        "steps": steps,
        "rollouts": rollouts,
        "train_seconds": round(seconds, 1),
        "generations_per_s": round(rollouts / seconds, 1),
        **evaluate(model, start, tokenizer, args),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    if method == "grpo":  # the sampled policy GRPO optimises, beside the greedy decoder
        functions, weights = rewards_of(args, start, tokenizer)
        sampled = RewardObjective(tokenizer, functions, weights, args.completion_tokens, do_sample=True)
        batch = held_out(args, "train" if args.is_task else "validation").batch(0)
        texts = sampled.completions(model, batch.prompts, seed=seed)
        results["sampled_reward"] = statistics.mean(sampled.scored(batch.prompts, texts, batch.columns))
        results["samples"] += [f"(sampled) {p} |{c}" for p, c in zip(batch.prompts[:2], texts[:2], strict=True)]
    return results


def main() -> None:
    (args,) = HfArgumentParser(RewardBenchmarkArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        torch.set_num_threads(1)
        print(RESULT + json.dumps(worker(args, args.worker, output_dir)))
        return
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or args.prompts not in SETTINGS:
        raise SystemExit(f"benchmark_rewards.py: choose --methods from {METHODS} and --prompts from {SETTINGS}")
    if "ce" in args.methods and not args.is_task:
        raise SystemExit("benchmark_rewards.py: ce (training on labels) needs a task: --prompts add or reverse")
    start = AutoModelForCausalLM.from_pretrained(args.start).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.start)
    rows = [{"method": "start", "seed": "", "steps": 0, **evaluate(start, start, tokenizer, args)}]
    first, rest = args.seeds[0], args.seeds[1:]
    for method in args.methods:
        if method in ("es", "es_pass4"):
            rows += [
                run_in_worker(f"{method}:{seed}:{population}")
                for population in args.es_populations
                for seed in args.seeds
            ]
            continue
        if method != "grpo":
            rows += [run_in_worker(f"{method}:{seed}") for seed in args.seeds]
            continue
        sweep = [run_in_worker(f"grpo:{first}:{lr}") for lr in args.grpo_lrs]
        rows += sweep
        best = max((r for r in sweep if "error" not in r), key=score, default=None)
        if best is not None:
            lr = best["method"].split("lr=")[1]
            rows += [run_in_worker(f"grpo:{seed}:{lr}") for seed in rest]
    if args.memory:
        table = [
            run_in_worker(f"memory-{mode}:{length}")
            for length in args.memory_lengths
            for mode in ("generate", "es_step")
        ]
        write_table(table, output_dir / "rewards_memory.csv")
    samples = ["# Samples (held-out prompts | continuation)", ""]
    for row in rows:
        samples += [f"## {row['method']} seed {row.get('seed', '')}", ""] + [f"- {s}" for s in row.pop("samples", [])]
        samples.append("")
    (output_dir / f"rewards_{args.prompts}_samples.md").write_text("\n".join(samples))
    write_table(rows, output_dir / f"rewards_{args.prompts}.csv")
    plot(rows, output_dir / f"rewards_{args.prompts}.png", args)


def plot(rows: list[dict], path: Path, args: RewardBenchmarkArguments) -> None:
    """kjv: distinct-4 against validation loss per run; a task: exact match in and out of distribution per run. One
    colour per method (and learning rate), one marker per seed."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = ("eval_loss", "distinct_4") if not args.is_task else ("exact_match_ood", "exact_match")
    methods = list(dict.fromkeys(row["method"] for row in rows if y in row))
    for row in rows:
        if y in row:
            color = plt.cm.tab10(methods.index(row["method"]) % 10)
            marker = "*" if row["method"] == "start" else "osD^v"[int(row["seed"] or 0) % 5]
            label = row["method"] if row["seed"] in ("", args.seeds[0]) else None
            ax.scatter(float(row[x]), float(row[y]), color=color, marker=marker, s=60, label=label)
    labels = {
        "eval_loss": "validation loss (nats/token)",
        "distinct_4": "held-out greedy distinct-4",
        "exact_match": "greedy exact match, training lengths",
        "exact_match_ood": "exact match, longer",
    }
    ax.set(xlabel=labels[x], ylabel=labels[y], title=f"training on rewards: {args.prompts} (marker: seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_in_worker(spec: str) -> dict:
    """One measurement in a fresh process (one thread): its row, or a row naming its error."""
    return run_worker(__file__, spec, "method")


if __name__ == "__main__":
    main()
