"""Evolution strategies on rewards of generated text (estimator `es`): its options, the estimator, and the reward
objective it is built with. A ZooRnn model's low-rank members generate as one batch; only rewards cross processes."""

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from ..config_files import ConfigFileError
from ..data.prompts import PromptBatch
from ..modeling_zoo_rnn import ZooRnnForCausalLM
from ..rewards import Fluency, RewardError, RewardObjective, load_reward_function, member_seed
from ..zo import ZOOptimizer
from ..zo.estimator import prompt_means
from ..zo.optimizer import Population
from .local import partition, roles
from .probes import ProbeArguments, check_zero_order, gathered, probe_rows, zo_optimizer, zo_report
from .protocol import BuiltEstimator, EstimatorInputs, EstimatorSpec, RunArguments, StepReport, parts_of, tagged

REWARD_AGGREGATIONS = ("mean", "best")


@dataclass
class RewardArguments:
    """What evolution strategies train on: the rewards of completions of prompts (estimator es)."""

    rewards: str = field(
        default="",
        metadata={
            "help": "estimator=es: comma-separated add_exact, reverse_exact, distinct_3, distinct_4, fluency or module:function"
        },
    )
    reward_weights: str = field(default="", metadata={"help": "one weight per reward (default: 1 each)"})
    reward_timeout: float = field(
        default=300.0,
        metadata={
            "help": "seconds one reward function's call (every member's completions of a step) may take before the "
            "run stops with an error (0: none)"
        },
    )
    reward_samples: int = field(default=1, metadata={"help": "completions per prompt and member (sampled when > 1)"})
    reward_aggregation: str = field(
        default="mean", metadata={"help": "a prompt's reward over its samples: mean, or best (pass@k)"}
    )
    max_new_tokens: int = field(default=20, metadata={"help": "estimator=es: tokens each completion generates"})
    do_sample: bool = field(default=False, metadata={"help": "estimator=es: sample completions (default greedy)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    anchor_decay: float = field(
        default=0.0, metadata={"help": "estimator=es: each step pulls the weights toward the start by lr x this"}
    )


class EvolutionStrategies:
    """Evolution strategies on a reward, as ask, score, tell: the optimiser hands out the step's population (this
    process's antithetic members theta +- eps z), every member generates completions for the batch's prompts and
    they are scored, and the optimiser is told every member's reward per prompt (only these numbers cross
    processes), shaped (loss_shaping) into the update. Low-rank members of a ZooRnn model generate as one batch
    (`RewardObjective.population_completions`); full-rank members (the paper's directions), or any other causal LM,
    one at a time through the model's own `generate`, theta perturbed in place and restored exactly. Either way
    each member samples from its own seed and every reward function is called once per step. A decay toward the
    starting weights (`ZOOptimizer.set_anchor`, arXiv 2605.30148: it stops drift in directions the reward does not
    constrain) is part of the update."""

    kind = "es"
    train_label = "train (minus the mean reward of the members)"

    def __init__(self, model, zo: ZOOptimizer, objective: RewardObjective, accelerator=None, run_seed: int = 0):
        """`accelerator`: the run's, for several processes; None runs every member in this process."""
        self.model, self.zo, self.objective, self.accelerator = model, zo, objective, accelerator
        self.run_seed = run_seed
        self.batched = zo.config.perturbation == "lowrank" and isinstance(model, ZooRnnForCausalLM)

    def train_step(self, batch: PromptBatch) -> StepReport:
        accelerator = self.accelerator
        rank, world_size = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
        population = self.zo.ask(rank, world_size)
        started = time.perf_counter()
        with torch.inference_mode():
            completions = self.completions(population, batch.prompts)
        nonfinite = self.objective.nonfinite
        rewards = self.objective.member_rewards(batch.prompts, completions, batch.columns)  # [members, P]
        seconds = time.perf_counter() - started
        local = -rewards.view(len(population.probes), len(population.scales), -1)  # losses [k, 2, P]
        losses = gathered(accelerator, local) if world_size > 1 else local
        stats = self.zo.tell(population, losses, rank=rank, seconds_forward=seconds)
        members = 2 * self.zo.config.num_probes
        report = zo_report(stats, probes=members // 2, sent=local.numel() * 8 if world_size > 1 else 0)
        first_samples = completions[0][:: self.objective.samples]  # the first member's first sample per prompt
        self.samples = list(zip(batch.prompts, first_samples, strict=True))
        report.tokens = members * len(batch.prompts) * self.objective.samples * self.objective.max_new_tokens
        report.metrics.update(self.reward_metrics(losses, nonfinite), generated_tokens=report.tokens)
        return report

    def reward_metrics(self, losses: torch.Tensor, nonfinite_before: int) -> dict:
        """TRL's names for what the step's completions scored: `reward` (the members' mean reward), `reward_std` (over
        members and prompts), `rewards/<function>/mean` and `/std` and `completions/*_length` (this process's
        completions), `frac_reward_zero_std` (prompts on which every member scored the same: nothing to learn)."""
        objective = self.objective
        rewards = -losses.flatten(0, 1)  # [members, prompts], every process's
        finite = rewards[torch.isfinite(rewards)]
        same = [bool(column[torch.isfinite(column)].unique().numel() <= 1) for column in rewards.T]
        metrics = {
            "reward": -prompt_means(losses).nanmean().item(),
            "reward_std": finite.std().item() if finite.numel() > 1 else 0.0,
            "frac_reward_zero_std": sum(same) / len(same),
            "nonfinite_rewards": objective.nonfinite - nonfinite_before,
        }
        for name, values in objective.function_values.items():
            tensor = torch.tensor(values, dtype=torch.float64)
            tensor = tensor[torch.isfinite(tensor)]
            metrics[f"rewards/{name}/mean"] = tensor.mean().item() if tensor.numel() else math.nan
            metrics[f"rewards/{name}/std"] = tensor.std().item() if tensor.numel() > 1 else 0.0
        lengths = objective.completion_lengths
        if lengths:
            metrics["completions/mean_length"] = sum(lengths) / len(lengths)
            metrics["completions/min_length"], metrics["completions/max_length"] = min(lengths), max(lengths)
        return metrics

    def completions(self, population: Population, prompts: list[str]) -> list[list[str]]:
        """Every member's completions of `prompts`, in the population's member order."""
        seeds = [
            member_seed(self.run_seed, population.step, probe, column) for probe, column, _ in population.members()
        ]
        if self.batched:
            changes = self.zo.perturber.members(population.probes, population.scales)
            return self.objective.population_completions(
                self.model, dict(zip(self.zo.names, changes, strict=True)), prompts, seeds
            )
        perturber, texts = self.zo.perturber, []
        perturber.snapshot()
        try:
            for (probe, _, scale), seed in zip(population.members(), seeds, strict=True):
                perturber.perturb(probe, scale)
                texts.append(self.objective.completions(self.model, prompts, seed))
        finally:
            perturber.restore()
            perturber.release()
        return texts

    def state_dict(self) -> dict:
        return tagged(self.kind, zo=self.zo.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.zo.load_state_dict(parts_of(state, self.kind)["zo"])


def build_es(inputs: EstimatorInputs) -> BuiltEstimator:
    """Every parameter perturbed by the members; reward functions from `--rewards` or ESTrainer's callables; the
    frozen starting model (what fluency scores by and the anchor decays toward) from `--init_from` or ESTrainer."""
    args, accelerator = inputs.args, inputs.accelerator
    model = inputs.model.eval().requires_grad_(False)
    names = partition(model, "none", args.train.zo_parameters)[0]
    zo = zo_optimizer(inputs, names)
    start = inputs.start_model
    wants_fluency = "fluency" in (name.strip() for name in args.train.rewards.split(","))
    needs_start = inputs.reward_functions is None and wants_fluency
    if start is None and (args.train.anchor_decay or needs_start):
        start = AutoModelForCausalLM.from_pretrained(args.model.init_from).to(accelerator.device)
    if start is not None:
        start.eval().requires_grad_(False)
    objective = reward_objective(args.train, start, inputs.tokenizer, inputs.reward_functions)
    objective.trainer_state = inputs.trainer_state
    if args.train.anchor_decay:
        zo.set_anchor([dict(start.named_parameters())[name] for name in names], args.train.anchor_decay)
    estimator = EvolutionStrategies(accelerator.unwrap_model(model), zo, objective, accelerator, args.train.seed)
    return BuiltEstimator(estimator, model, roles(names, "zero-order"), objective)


def reward_objective(train_args, start, tokenizer, functions: list | None = None) -> RewardObjective:
    """The reward functions (given, or named by train_args.rewards: fluency scored by `start`, the frozen starting
    model), their weights, and how completions are drawn and scored."""
    named = functions is None
    functions = [] if named else list(functions)
    for spec in (name.strip() for name in train_args.rewards.split(",") if named):
        if spec == "fluency":
            functions.append(Fluency(start, tokenizer))
        else:
            try:
                functions.append(load_reward_function(spec))
            except RewardError as error:
                raise ConfigFileError(str(error)) from None
    weights = [float(w) for w in train_args.reward_weights.split(",") if w.strip()] or [1.0] * len(functions)
    objective = RewardObjective(
        tokenizer,
        functions,
        weights,
        train_args.max_new_tokens,
        do_sample=train_args.do_sample,
        temperature=train_args.temperature,
        samples=train_args.reward_samples,
        aggregation=train_args.reward_aggregation,
    )
    objective.timeout = train_args.reward_timeout
    return objective


def check_es(args: RunArguments) -> None:
    """Training on rewards: evolution strategies from a trained model, on prompts, scored by reward functions."""
    train = args.train
    check_zero_order(args)
    if args.model.init_from is None:
        raise ConfigFileError("--estimator es trains a trained model further: give it with --init_from")
    if not args.data.prompts or not train.rewards:
        raise ConfigFileError("--estimator es needs --prompts (add, reverse, kjv or a dataset) and --rewards")
    weights = [w for w in train.reward_weights.split(",") if w.strip()]
    for weight in weights:
        try:
            if not math.isfinite(float(weight)):
                raise ValueError
        except ValueError:
            raise ConfigFileError(
                f"reward_weights must be numbers separated by commas, got {train.reward_weights!r}"
            ) from None
    if train.reward_timeout < 0:
        raise ConfigFileError(f"reward_timeout must be >= 0 seconds (0: none), got {train.reward_timeout}")
    if weights and len(weights) != len(train.rewards.split(",")):
        raise ConfigFileError(
            f"reward_weights gives {len(weights)} weights for {len(train.rewards.split(','))} rewards"
        )
    if train.reward_aggregation not in REWARD_AGGREGATIONS:
        raise ConfigFileError(
            f"reward_aggregation must be one of {REWARD_AGGREGATIONS}, got {train.reward_aggregation!r}"
        )
    if train.reward_samples < 1 or train.max_new_tokens < 1:
        raise ConfigFileError("reward_samples and max_new_tokens must be at least 1")
    if train.reward_samples > 1 and not train.do_sample:
        raise ConfigFileError("reward_samples > 1 draws several completions per prompt: add --do_sample")


def es_rows(args: RunArguments) -> list[tuple[str, str]]:
    train, zo = args.train, args.zo
    weights = f" (weights {train.reward_weights})" if train.reward_weights else ""
    if train.do_sample:
        drawn = (
            f"{train.reward_samples} sampled completion(s) per prompt, T = {train.temperature}, scored by their "
            f"{train.reward_aggregation}"
        )
    else:
        drawn = "greedy completions"
    rank = f"rank-{zo.perturbation_rank} " if zo.perturbation == "lowrank" else ""
    anchor = f", decay toward the starting weights {train.anchor_decay}" if train.anchor_decay else ""
    return [
        (
            "objective",
            f"**rewards of generated text**: {train.rewards}{weights}, on prompts from {args.data.prompts}; "
            f"{drawn} of {train.max_new_tokens} tokens",
        ),
        ("starting model", str(args.model.init_from)),
        (
            "evolution strategies",
            f"{2 * zo.num_probes} antithetic {rank}members per step, σ = ε, rewards shaped by "
            f"{zo.loss_shaping}{anchor}",
        ),
        *probe_rows(args),
    ]


ES = EstimatorSpec(
    name="es",
    build=build_es,
    describe=lambda args: (
        "**evolution strategies** on rewards of generated text: antithetic perturbed copies of the "
        "model generate, their rewards weigh the update, forward passes only"
    ),
    check=check_es,
    card_rows=es_rows,
    arguments=(RewardArguments, ProbeArguments),
    objective="reward",
)
