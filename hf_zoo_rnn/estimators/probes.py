"""Zero-order probes on the next-token loss: the paper's CD-RGE (estimator `probes`), and its guided and low-rank
variants (the `zo_` options, hf_zoo_rnn.zo.ZOConfig's).

Every process holds the full model, evaluates its share of the probes on the same batch, all-gathers only the loss
scalars, and applies the identical update: no parameter crosses the wire."""

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch

from ..config_files import ConfigFileError
from ..forwards.population import members_bytes_per_member, members_loss, stacked_bytes_per_model, stacked_loss
from ..zo import PopulationLoss, ZOOptimizer
from ..zo.optimizer import ZOStepStats
from .local import partition, roles
from .protocol import BuiltEstimator, EstimatorInputs, EstimatorSpec, RunArguments, StepReport, parts_of, tagged


@dataclass
class ProbeArguments:
    """Which parameters the probes train (estimators probes and hybrid); how is the `zo_` options'."""

    zo_parameters: str = field(
        default="auto",
        metadata={
            "help": "parameters trained by the probes: comma-separated name globs (e.g. '*.bias'), or auto: every "
            "parameter (probes), those the local gradient does not train (hybrid)"
        },
    )


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


class ProbeEstimator:
    """Probes alone: CD-RGE (or its guided / low-rank variants) on each batch's next-token loss."""

    kind = "probes"
    train_label = "train (mean perturbed loss)"

    def __init__(self, model, zo: ZOOptimizer, accelerator, batch_copies: int):
        self.model, self.zo, self.accelerator = model, zo, accelerator
        self.batch_copies = batch_copies  # how many processes' batches one step trains on (per_rank_batches)

    def train_step(self, batch) -> StepReport:
        input_ids, labels = batch
        report = self.update(
            partial(next_token_loss, self.model, input_ids, labels), self.population(input_ids, labels)
        )
        report.metrics["perturbed_loss"] = report.loss
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
        num_probes = self.zo.config.num_probes
        return zo_report(stats, probes=num_probes, sent=0 if world_size == 1 else 2 * 8 * num_probes)

    def state_dict(self) -> dict:
        return tagged(self.kind, zo=self.zo.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.zo.load_state_dict(parts_of(state, self.kind)["zo"])


def zo_report(stats: ZOStepStats, probes: int, sent: int) -> StepReport:
    """A zero-order step's report from the optimiser's statistics."""
    metrics = {
        "lr": stats.lr,
        "eps": stats.eps,
        "projected_grad_mean": stats.projected_grad_mean,
        "projected_grad_std": stats.projected_grad_std,
        "snr": stats.snr,
        "update_norm": stats.update_norm,
        "dropped_probes": stats.dropped_probes,
        "seconds_forward": stats.seconds_forward,
        "seconds_update": stats.seconds_update,
    }
    return StepReport(
        stats.loss,
        skipped=stats.skipped,
        probes=probes,
        forward_passes=stats.forward_passes,
        comm_bytes=sent,
        metrics=metrics,
    )


def zo_optimizer(inputs: EstimatorInputs, names: list[str]) -> ZOOptimizer:
    """The run's ZO optimiser over `names`; its schedules span the run, as in transformers' Trainer."""
    config, train = inputs.args.zo, inputs.args.train
    world_size = inputs.accelerator.num_processes
    if config.num_probes % world_size:
        raise ConfigFileError(
            f"zo_num_probes={config.num_probes} is not divisible by the {world_size} processes: each "
            "process evaluates an equal share of the probes"
        )
    if config.total_steps is None:
        config = dataclasses.replace(config, total_steps=train.max_steps)
    return ZOOptimizer(inputs.model, config, names)


def build_probes(inputs: EstimatorInputs) -> BuiltEstimator:
    model = inputs.model.eval().requires_grad_(False)
    names = partition(model, "none", inputs.args.train.zo_parameters)[0]
    estimator = ProbeEstimator(model, zo_optimizer(inputs, names), inputs.accelerator, inputs.batch_copies)
    return BuiltEstimator(estimator, model, roles(names, "zero-order"))


def check_zero_order(args: RunArguments) -> None:
    """What every estimator with probes (or members) needs of the zo_ options."""
    zo = args.zo
    if zo.num_probes < 1:
        raise ConfigFileError(f"--estimator {args.train.estimator} needs zo_num_probes >= 1, got {zo.num_probes}")
    if not zo.tied and zo.lr is None:
        raise ConfigFileError("zo_lr is required (or zo_tied true: the paper's update, lr = eps)")
    if zo.lr is not None and zo.lr <= 0:
        raise ConfigFileError(f"zo_lr must be positive (a ZO step moves against the estimated gradient), got {zo.lr}")


def check_next_token_probes(args: RunArguments) -> None:
    """What probes on the next-token loss (estimators probes and hybrid) need of the zo_ options."""
    check_zero_order(args)
    if args.zo.loss_shaping == "per_prompt":
        raise ConfigFileError("zo_loss_shaping=per_prompt shapes rewards per prompt: it needs --estimator es")


def check_probes(args: RunArguments) -> None:
    check_next_token_probes(args)
    if args.zo.guided_by_local_gradient:
        raise ConfigFileError(
            f"zo_guide={args.zo.guide!r} uses the one-step gradient of the ZO parameters: it needs --estimator hybrid "
            "with local_scope one_step"
        )


def probe_rows(args: RunArguments) -> list[tuple[str, str]]:
    zo = args.zo
    kind = f"{zo.distribution}, {zo.difference} difference"
    if zo.perturbation == "lowrank":
        kind += f", low-rank matrices r = {zo.perturbation_rank}"
    if zo.guide != "none":
        kind += f", guided by {zo.guide}, α = {zo.guide_alpha}"
    lr = "tied to ε (the paper's update)" if zo.tied else f"{zo.lr} ({zo.lr_schedule} schedule)"
    return [
        ("probes per step", f"{zo.num_probes} ({kind})"),
        ("ε", f"{zo.eps} ({zo.eps_schedule} schedule)"),
        ("lr", lr),
        ("update rule", zo.update_rule),
    ]


PROBES = EstimatorSpec(
    name="probes",
    build=build_probes,
    describe=lambda args: (
        "**zero-order** central-difference random-vector gradient estimation (CD-RGE), forward passes only"
    ),
    check=check_probes,
    card_rows=probe_rows,
    arguments=(ProbeArguments,),
)
