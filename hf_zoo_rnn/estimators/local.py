"""Exact local gradients (no backpropagation through time), stepped by AdamW: `one_step` trains every parameter by
its gradient through one recurrent step, `readout` only the readout (the rest stays frozen). forwards/local.py
computes the gradient chunk by chunk; here are its options, the AdamW half and the estimator."""

from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import partial

import torch
from transformers import get_scheduler

from ..config_files import ConfigFileError
from ..forwards.local import SCOPES, accumulate_local_gradients, readout_parameter_names
from ..modeling_zoo_rnn import ZooRnnForCausalLM
from ..zo.optimizer import LR_SCHEDULES
from .protocol import BuiltEstimator, EstimatorInputs, EstimatorSpec, RunArguments, StepReport, parts_of, tagged


@dataclass
class LocalArguments:
    """The local gradient's options (estimators one_step, readout and hybrid)."""

    local_lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the local gradient"})
    local_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 of the local gradient"})
    local_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 of the local gradient"})
    local_weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay of the local gradient (matrices)"})
    local_lr_schedule: str = field(
        default="cosine", metadata={"help": "constant, constant_with_warmup, linear, cosine"}
    )
    local_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps of the local lr schedule"})
    local_steps: int = field(
        default=1, metadata={"help": "local-gradient steps per training step (the extra ones on fresh batches)"}
    )
    local_scope: str = field(
        default="readout",
        metadata={
            "help": "estimator=hybrid: the local gradient it takes, readout or one_step (the probes train the rest)"
        },
    )


def partition_parameters(model: ZooRnnForCausalLM, scope: str, zo_patterns: str) -> tuple[list[str], list[str]]:
    """(names trained by ZO, names trained by the local gradient of `scope`: none, readout or one_step), in
    registration order; the rest stays frozen.

    zo_patterns "auto" gives ZO every parameter the local gradient does not train: all of them without one, all
    but the readout with "readout", none with "one_step" (which trains everything). Globs move the named
    parameters to ZO. A tied embedding is refused by "readout": the tied matrix is also the input embedding,
    whose gradient needs more than the readout ("one_step" covers both roles, as both act within one step).
    """
    names = [name for name, _ in model.named_parameters()]
    readout = readout_parameter_names(model)
    if scope == "readout" and model.config.tie_word_embeddings:
        raise ValueError(
            "the readout's gradient cannot train a tied readout (tie_word_embeddings): the tied matrix is also the "
            "input embedding; untie it or use the one_step gradient"
        )
    if zo_patterns == "auto":
        zo = [] if scope == "one_step" else [n for n in names if scope == "none" or n not in readout]
    else:
        globs = [glob.strip() for glob in zo_patterns.split(",") if glob.strip()]
        unmatched = [glob for glob in globs if not any(fnmatch(name, glob) for name in names)]
        if unmatched or not globs:
            raise ValueError(f"zo_parameters {zo_patterns!r}: {unmatched or 'no glob'} matches none of {names}")
        zo = [name for name in names if any(fnmatch(name, glob) for glob in globs)]
    if scope == "none":
        return zo, []
    reached = readout if scope == "readout" else names
    return zo, [name for name in reached if name not in zo]


class LocalGradient:
    """The first-order half of every local estimator: the scope's exact local gradient of `trained` (plus, not
    stepped, of `surrogate` for guided probes), averaged over processes by `reduce` when each has its own batch, and
    applied by AdamW (decay on matrices only) under a transformers schedule."""

    def __init__(
        self,
        model: ZooRnnForCausalLM,
        scope: str,
        *,
        trained: list[str],
        surrogate: list[str],
        args,
        total_steps: int,
        reduce=None,
    ):
        self.model, self.scope, self.reduce = model, scope, reduce
        params = dict(model.named_parameters())
        self.trained = [params[name] for name in trained]
        self.surrogate = [params[name] for name in surrogate]
        model.requires_grad_(False)
        for param in self.trained + self.surrogate:
            param.requires_grad_(True)
        self.optimizer, self.scheduler = None, None
        if self.trained:
            groups = [
                {"params": [p for p in self.trained if p.ndim >= 2], "weight_decay": args.local_weight_decay},
                {"params": [p for p in self.trained if p.ndim < 2], "weight_decay": 0.0},
            ]
            self.optimizer = torch.optim.AdamW(
                [group for group in groups if group["params"]],
                lr=args.local_lr,
                betas=(args.local_beta1, args.local_beta2),
            )
            self.scheduler = get_scheduler(
                args.local_lr_schedule, self.optimizer, args.local_warmup_steps, total_steps * args.local_steps
            )

    def accumulate(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """Fill .grad with this batch's local gradient (process mean); returns the clean loss of this process's
        batch and the bytes this process sent to average the gradient."""
        self.drop_gradients()
        loss = accumulate_local_gradients(self.model, input_ids, labels, self.scope)
        if self.reduce is None:
            return loss, 0
        grads = [param.grad for param in self.trained + self.surrogate]
        flat = self.reduce(torch.cat([g.reshape(-1) for g in grads]))
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(piece.view_as(grad))
        return loss, flat.numel() * flat.element_size()

    def surrogates(self) -> list[list[torch.Tensor]]:
        """The guide direction for the ZO parameters: their local gradient (one surrogate), or none."""
        return [[param.grad.detach().clone() for param in self.surrogate]] if self.surrogate else []

    def apply(self) -> float | None:
        """One AdamW update of the trained parameters from .grad; returns the learning rate it used. A non-finite
        gradient is dropped instead (it would poison AdamW's moments) and None returned; after averaging the gradient
        is the same on every process, and so is that decision."""
        finite = all(bool(torch.isfinite(p.grad).all()) for p in self.trained + self.surrogate if p.grad is not None)
        lr = None
        if finite:
            lr = 0.0
            if self.optimizer is not None:
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
        self.drop_gradients()
        return lr

    def drop_gradients(self) -> None:
        for param in self.trained + self.surrogate:
            param.grad = None

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


class LocalEstimator:
    """Exact local gradients alone (the default, one_step, trains every parameter): this batch's gradient and AdamW
    update, then local_steps - 1 more on fresh batches. A non-finite gradient is dropped (the step is skipped)."""

    train_label = "train (clean loss of each step's batch)"

    def __init__(
        self, kind: str, gradient: LocalGradient, *, next_batch, local_steps: int, accelerator, batch_copies: int
    ):
        self.kind, self.gradient, self.next_batch, self.local_steps = kind, gradient, next_batch, local_steps
        self.accelerator, self.batch_copies = accelerator, batch_copies

    def train_step(self, batch) -> StepReport:
        return self.finish(self.accumulate(batch), probes_skipped=True)

    def accumulate(self, batch) -> StepReport:
        """Fill .grad with the batch's local gradient; the report of what it cost, its loss this process's clean loss
        of the batch."""
        input_ids, labels = batch
        clean_loss, sent = self.gradient.accumulate(input_ids, labels)
        return StepReport(clean_loss, forward_passes=1, tokens=input_ids.numel() * self.batch_copies, comm_bytes=sent)

    def finish(self, report: StepReport, probes_skipped: bool) -> StepReport:
        """The AdamW update from this batch's gradient and the further local steps; the loss stays this batch's clean
        loss, before the updates (the mean over processes when each has its own batch). A dropped gradient skips the
        step when the probes (if any) skipped theirs too."""
        local_lr = self.gradient.apply()
        if local_lr is None:
            report.skipped = probes_skipped
        else:
            report.metrics["local_lr"] = local_lr
        for _ in range(self.local_steps - 1):
            extra_ids, extra_labels = self.next_batch()
            loss, sent = self.gradient.accumulate(extra_ids, extra_labels)
            self.gradient.apply()
            extra_tokens = extra_ids.numel() * self.batch_copies
            report.add_costs(StepReport(loss, forward_passes=1, tokens=extra_tokens, comm_bytes=sent))
        if self.batch_copies > 1:  # each process has its own batch: log the mean over processes, as BPTT does
            device = self.accelerator.device
            report.loss = self.accelerator.reduce(torch.tensor(report.loss, device=device), "mean").item()
        return report

    def state_dict(self) -> dict:
        return tagged(self.kind, local=self.gradient.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.gradient.load_state_dict(parts_of(state, self.kind)["local"])


def local_gradient(inputs: EstimatorInputs, scope: str, trained: list[str], surrogate: list[str]) -> LocalGradient:
    """The run's local gradient of `trained` (and `surrogate`, for guided probes) by `scope`."""
    train = inputs.args.train
    reduce = partial(inputs.accelerator.reduce, reduction="mean") if inputs.batch_copies > 1 else None
    return LocalGradient(
        inputs.model,
        scope,
        trained=trained,
        surrogate=surrogate,
        args=train,
        total_steps=train.max_steps,
        reduce=reduce,
    )


def roles(names: list[str], role: str) -> dict[str, str]:
    return dict.fromkeys(names, role)


def build_local(scope: str):
    """The builder of estimator `scope` (one_step or readout): its local gradient alone; the rest stays frozen."""

    def build(inputs: EstimatorInputs) -> BuiltEstimator:
        model = inputs.model.eval().requires_grad_(False)
        names = partition(model, scope, "auto")[1]
        gradient = local_gradient(inputs, scope, names, [])
        estimator = LocalEstimator(
            scope,
            gradient,
            next_batch=inputs.next_batch,
            local_steps=inputs.args.train.local_steps,
            accelerator=inputs.accelerator,
            batch_copies=inputs.batch_copies,
        )
        return BuiltEstimator(estimator, model, roles(names, f"{scope} gradient"))

    return build


def partition(model, scope: str, zo_patterns: str) -> tuple[list[str], list[str]]:
    """partition_parameters, its refusal as one ConfigFileError."""
    try:
        return partition_parameters(model, scope, zo_patterns)
    except ValueError as error:
        raise ConfigFileError(str(error)) from error


def check_local(args: RunArguments) -> None:
    train = args.train
    if train.local_lr_schedule not in LR_SCHEDULES:
        raise ConfigFileError(f"local_lr_schedule must be one of {LR_SCHEDULES}, got {train.local_lr_schedule!r}")
    if train.local_steps < 1 or train.local_lr <= 0:
        raise ConfigFileError(
            f"local_steps must be >= 1 and local_lr positive, got {train.local_steps} and {train.local_lr}"
        )
    if train.local_scope not in SCOPES:
        raise ConfigFileError(f"local_scope must be one of {SCOPES}, got {train.local_scope!r}")


def local_rows(args: RunArguments, scope: str) -> list[tuple[str, str]]:
    train = args.train
    schedule = f"AdamW lr {train.local_lr} ({train.local_lr_schedule}), {train.local_steps} step(s) per step"
    return [("local gradient", f"{scope}: {schedule}")]


ONE_STEP = EstimatorSpec(
    name="one_step",
    build=build_local("one_step"),
    describe=lambda args: (
        "**an exact local gradient (one_step) alone**, no probes: every parameter's gradient "
        "through one recurrent step, no backpropagation through time, memory constant in context length"
    ),
    check=check_local,
    card_rows=lambda args: local_rows(args, "one_step"),
    arguments=(LocalArguments,),
)
READOUT = EstimatorSpec(
    name="readout",
    build=build_local("readout"),
    describe=lambda args: (
        "**the readout's exact gradient alone** (the other parameters keep their initial values): "
        "no backpropagation through time, memory constant in context length"
    ),
    check=check_local,
    card_rows=lambda args: local_rows(args, "readout"),
    arguments=(LocalArguments,),
)
