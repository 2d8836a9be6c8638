"""Zero-order steps: probes on the next-token loss, and evolution strategies on rewards of generated text.

Every process holds the full model, evaluates its share of the probes (or ES members) on the same batch, all-gathers
only the loss scalars, and applies the identical update: no parameter crosses the wire."""

from functools import partial

import torch

from ..data.prompts import PromptBatch
from ..forwards.population import members_bytes_per_member, members_loss, stacked_bytes_per_model, stacked_loss
from ..rewards import RewardObjective, member_seed
from ..zo import PopulationLoss, ZOOptimizer
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
            gather=self.accelerator.gather,
            population_loss=population,
            clean_loss=clean_loss,
            surrogates=surrogates,
        )
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
        # per step each process sends its k = K / world_size pairs of float64 losses and receives all 2K
        sent = 0 if world_size == 1 else 2 * 8 * self.probes
        return StepReport(metrics, forward_passes=stats.forward_passes, comm_bytes=sent)

    def state_dict(self) -> dict:
        return self.zo.state_dict()

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, local=False, probes=True)
        self.zo.load_state_dict(state)


class EvolutionStrategiesStep:
    """Evolution strategies on a reward: each antithetic member theta +- eps z generates completions for the batch's
    prompts, its loss is minus their mean reward, the population's losses are shaped (loss_shaping) and the update
    is the ZO optimiser's; only the members' rewards cross processes. `anchor` (the starting weights) with
    `anchor_decay` then pulls the weights toward the start (arXiv 2605.30148: it stops drift in directions the
    reward does not constrain)."""

    train_label = "train (minus the mean reward of the members)"

    def __init__(self, zero_order: ZeroOrderStep, objective: RewardObjective, run_seed: int,
                 anchor: list[torch.Tensor], anchor_decay: float):  # fmt: skip
        self.zero_order, self.objective, self.run_seed = zero_order, objective, run_seed
        self.anchor, self.anchor_decay = anchor, anchor_decay
        self.probes = zero_order.probes

    def step(self, batch: PromptBatch) -> StepReport:
        zo = self.zero_order.zo
        model = self.zero_order.accelerator.unwrap_model(self.zero_order.model)

        def loss_fn():
            probe, column = zo.member  # a member's sampling seed: the same whichever process generates it
            seed = member_seed(self.run_seed, zo.step_count, probe, column)
            return self.objective.loss(model, batch.prompts, batch.columns, seed)

        nonfinite = self.objective.nonfinite
        report = self.zero_order.update(loss_fn)
        lr = report.metrics["lr"]
        if self.anchor and lr:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, start in zip(zo.names, self.anchor, strict=True):
                    params[name].sub_(lr * self.anchor_decay * (params[name] - start))
        members = 2 * self.probes
        objective = self.objective
        report.tokens = members * len(batch.prompts) * objective.samples * objective.max_new_tokens
        report.metrics.update(mean_reward=-report.metrics["train_loss"], generated_tokens=report.tokens,
                              nonfinite_rewards=objective.nonfinite - nonfinite)  # fmt: skip
        return report

    def state_dict(self) -> dict:
        return self.zero_order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.zero_order.load_state_dict(state)
