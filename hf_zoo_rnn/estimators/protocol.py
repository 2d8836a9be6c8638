"""The one interface every estimator trains through, and what it builds from.

`train_step(batch) -> StepReport` turns a batch into an update; `state_dict()` / `load_state_dict()` carry its state
through checkpoints as a dict that names its kind (the estimator's registry name) and nests its parts. The trainer's
loop calls these without knowing which estimator it holds, and adds each report's costs to the run's counters in one
place."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch


@dataclass
class StepReport:
    """What one training step did. `loss` is what the loss curve plots (the estimator's `train_label` says which
    loss); `skipped`: no update was applied (every loss, or the gradient, was non-finite); `probes`: perturbed models
    evaluated (the progress bar's rate). `metrics` are the estimator's own diagnostics, logged as they are."""

    loss: float
    skipped: bool = False
    probes: int = 0
    forward_passes: int = 0
    tokens: int = 0  # trained on (next-token objectives) or generated (rewards), over every process
    comm_bytes: int = 0  # sent by this process
    metrics: dict = field(default_factory=dict)

    def add_costs(self, other: "StepReport") -> "StepReport":
        """This report with another's costs added (forward passes, tokens, bytes)."""
        self.forward_passes += other.forward_passes
        self.tokens += other.tokens
        self.comm_bytes += other.comm_bytes
        return self

    def logged(self) -> dict:
        """The record the run logs for this step (before the loop adds its own timings and counters)."""
        return {"train_loss": self.loss, "skipped_step": int(self.skipped), **self.metrics}


class Estimator(Protocol):
    kind: str  # its name in the registry; its state dicts carry it
    train_label: str  # what its loss is, for the loss curve

    def train_step(self, batch) -> StepReport: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunArguments(NamedTuple):
    """A run's parsed arguments (scripts/train.py's, or ESTrainer's translated ESConfig)."""

    model: Any  # ModelArguments
    data: Any  # DataArguments
    train: Any  # TrainArguments
    zo: Any  # ZOConfig


@dataclass
class EstimatorInputs:
    """What an estimator is built from: the run's arguments and the objects set up before it."""

    args: RunArguments
    model: torch.nn.Module
    tokenizer: Any
    accelerator: Any
    next_batch: Callable  # a further training batch (local_steps > 1)
    reward_functions: list | None = None  # ESTrainer's callables, in place of --rewards
    start_model: torch.nn.Module | None = None  # ESTrainer's starting weights, frozen
    trainer_state: Any = None  # transformers' TrainerState of the run: what reward functions get, as in TRL

    @property
    def batch_copies(self) -> int:
        """How many processes' batches one step trains on (per_rank_batches: each its own)."""
        return self.accelerator.num_processes if self.args.data.per_rank_batches else 1


@dataclass
class BuiltEstimator:
    estimator: Estimator
    model: torch.nn.Module  # the model it trains (BPTT: as accelerate prepared it)
    parameter_roles: dict[str, str]  # parameter name -> how it is trained (the model card's table; BPTT: none)
    objective: Any = None  # the RewardObjective of evolution strategies: what evaluation scores too


def tagged(kind: str, **parts) -> dict:
    """An estimator's state: its kind and its parts, nested."""
    return {"kind": kind, **parts}


def parts_of(state: dict, kind: str) -> dict:
    """The parts of a state saved by estimator `kind` (or by a version before states named their kind); another
    estimator's state is one error naming both."""
    saved = state.get("kind")
    parts = legacy_parts(state, kind) if saved is None else state if saved == kind else None
    if parts is None:
        trained = f"--estimator {saved}" if saved else "another method, by an hf_zoo_rnn older than --estimator"
        raise ValueError(f"it was trained with {trained}; this run uses --estimator {kind}")
    return parts


ZO_STATE_KEYS = {"step", "config", "parameter_names", "buffers"}  # ZOOptimizer.state_dict's


def legacy_parts(state: dict, kind: str) -> dict | None:
    """A state saved before states named their kind, as the parts of `kind` (None when it was another estimator's):
    flat, the local gradient's under "local", the ZO optimiser's keys beside it, or BPTT's torch optimizer state."""
    local, zo = state.get("local"), {key: value for key, value in state.items() if key != "local"}
    probes = set(zo) == ZO_STATE_KEYS
    if kind in ("one_step", "readout") and local is not None and not zo:
        return {"local": local}
    if kind == "hybrid" and local is not None and probes:  # each part in its own old layout
        return {"local": {"local": local}, "probes": zo}
    if kind in ("probes", "es") and local is None and probes:
        return {"zo": zo}
    if kind == "bptt" and set(state) == {"state", "param_groups"}:
        return {"optimizer": state}
    return None


@dataclass(frozen=True)
class EstimatorSpec:
    """One `--estimator` choice: how it is built from the run, the checks its options must pass (one ConfigFileError
    each), the sentence the model card says about it, and the rows it adds to the card's training table."""

    name: str
    build: Callable[[EstimatorInputs], BuiltEstimator]
    describe: Callable[[RunArguments], str]
    check: Callable[[RunArguments], None] = lambda args: None
    card_rows: Callable[[RunArguments], list[tuple[str, str]]] = lambda args: []
    arguments: tuple[type, ...] = ()  # the dataclasses of the options it reads (they join TrainArguments)
    objective: str = "lm"  # what it trains on: lm (next-token loss of the data) or reward (rewards of prompts)
