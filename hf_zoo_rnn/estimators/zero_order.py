"""Zero-order steps: probes on the next-token loss, and evolution strategies on rewards of generated text.

Every process holds the full model, evaluates its share of the probes (or ES members) on the same batch, all-gathers
only the loss scalars, and applies the identical update: no parameter crosses the wire."""

import math
import time
from functools import partial

import torch

from ..data.prompts import PromptBatch
from ..forwards.population import members_bytes_per_member, members_loss, stacked_bytes_per_model, stacked_loss
from ..modeling_zoo_rnn import ZooRnnForCausalLM
from ..rewards import RewardObjective, member_seed
from ..zo import PopulationLoss, ZOOptimizer
from ..zo.estimator import prompt_means
from ..zo.optimizer import Population, ZOStepStats
from .step import StepReport, check_state_kind


def next_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids, labels=labels, logits_to_keep=1).loss


def population_loss(
    model, names: list[str], input_ids: torch.Tensor, labels: torch.Tensor, members: bool
) -> PopulationLoss:
    """The next-token loss of perturbed copies of `model` on one batch, for the ZO tensors `names` (in the
    optimiser's order): low-rank members sharing the weights (`members`), else stacked copies."""
    if members:
        return PopulationLoss(
            fn=lambda changes: members_loss(model, dict(zip(names, changes, strict=True)), input_ids, labels),
            bytes_per_model=members_bytes_per_member(model, *input_ids.shape),
            members=True,
        )
    return PopulationLoss(
        fn=lambda points: stacked_loss(model, dict(zip(names, points, strict=True)), input_ids, labels),
        bytes_per_model=stacked_bytes_per_model(model, *input_ids.shape),
    )


def gathered(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every process's `values` concatenated in rank order, on the CPU (the collective runs on the processes' device:
    NCCL takes no CPU tensors), so that every process reduces them with the same arithmetic."""
    return accelerator.gather(values.to(accelerator.device)).cpu()


class ZeroOrderStep:
    """Probes alone: CD-RGE (or its guided / low-rank variants) on each batch's next-token loss."""

    train_label = "train (mean perturbed loss)"

    def __init__(self, model, zo: ZOOptimizer, accelerator, batch_copies: int):
        self.model, self.zo, self.accelerator = model, zo, accelerator
        self.batch_copies = batch_copies  # how many processes' batches one step trains on (per_rank_batches)
        self.probes = zo.config.num_probes

    def step(self, batch) -> StepReport:
        input_ids, labels = batch
        report = self.update(
            partial(next_token_loss, self.model, input_ids, labels), self.population(input_ids, labels)
        )
        report.metrics["perturbed_loss"] = report.metrics["train_loss"]
        report.tokens = input_ids.numel() * self.batch_copies
        return report

    def population(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Several probes per forward (probes_per_forward != 1): low-rank members as one batch, else stacked."""
        if self.zo.config.probes_per_forward == 1:
            return None
        model = self.accelerator.unwrap_model(self.model)
        return population_loss(model, self.zo.names, input_ids, labels, self.zo.config.perturbation == "lowrank")

    def update(self, loss_fn, population=None, clean_loss=None, surrogates=()) -> StepReport:
        """One ZO update from `loss_fn` (the loss at the current, perturbed, parameters); with per-process batches
        the probes' base `clean_loss` is each process's own."""
        world_size = self.accelerator.num_processes
        stats = self.zo.step(
            loss_fn,
            rank=self.accelerator.process_index,
            world_size=world_size,
            gather=partial(gathered, self.accelerator),
            population_loss=population,
            clean_loss=clean_loss,
            surrogates=surrogates,
        )
        # per step each process sends its k = K / world_size pairs of float64 losses and receives all 2K
        return self.report(stats, sent=0 if world_size == 1 else 2 * 8 * self.probes)

    @staticmethod
    def report(stats: ZOStepStats, sent: int) -> StepReport:
        """The step's report from the optimiser's statistics."""
        metrics = {
            "train_loss": stats.loss,
            "lr": stats.lr,
            "eps": stats.eps,
            "projected_grad_mean": stats.projected_grad_mean,
            "projected_grad_std": stats.projected_grad_std,
            "snr": stats.snr,
            "update_norm": stats.update_norm,
            "dropped_probes": stats.dropped_probes,
            "skipped_step": int(stats.skipped),
            "seconds_forward": stats.seconds_forward,
            "seconds_update": stats.seconds_update,
        }
        return StepReport(metrics, forward_passes=stats.forward_passes, comm_bytes=sent)

    def state_dict(self) -> dict:
        return self.zo.state_dict()

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, local=False, probes=True)
        self.zo.load_state_dict(state)


class EvolutionStrategiesStep:
    """Evolution strategies on a reward, as ask, score, tell: the optimiser hands out the step's population (this
    process's antithetic members theta +- eps z), every member generates completions for the batch's prompts and
    they are scored, and the optimiser is told every member's reward per prompt (only these numbers cross
    processes), shaped (loss_shaping) into the update. Low-rank members of a ZooRnn model generate as one batch
    (`RewardObjective.population_completions`); full-rank members (the paper's directions), or any other causal LM,
    one at a time through the model's own `generate`, theta perturbed in place and restored exactly. Either way
    each member samples from its own seed and every reward function is called once per step. A decay toward the
    starting weights (`ZOOptimizer.set_anchor`, arXiv 2605.30148: it stops drift in directions the reward does not
    constrain) is part of the update."""

    train_label = "train (minus the mean reward of the members)"

    def __init__(self, model, zo: ZOOptimizer, objective: RewardObjective, accelerator=None, run_seed: int = 0):
        """`accelerator`: the run's, for several processes; None runs every member in this process."""
        self.model, self.zo, self.objective, self.accelerator = model, zo, objective, accelerator
        self.run_seed = run_seed
        self.probes = zo.config.num_probes
        self.batched = zo.config.perturbation == "lowrank" and isinstance(model, ZooRnnForCausalLM)

    def step(self, batch: PromptBatch) -> StepReport:
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
        report = ZeroOrderStep.report(stats, sent=local.numel() * 8 if world_size > 1 else 0)
        first_samples = completions[0][:: self.objective.samples]  # the first member's first sample per prompt
        self.samples = list(zip(batch.prompts, first_samples, strict=True))
        report.tokens = 2 * self.probes * len(batch.prompts) * self.objective.samples * self.objective.max_new_tokens
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
            metrics.update({"completions/mean_length": sum(lengths) / len(lengths),
                            "completions/min_length": min(lengths), "completions/max_length": max(lengths)})  # fmt: skip
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
        return self.zo.state_dict()

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, local=False, probes=True)
        self.zo.load_state_dict(state)
