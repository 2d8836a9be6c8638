"""The BPTT baselines (estimator `bptt`): truncated backpropagation through time on the same model and data, by SGD
or AdamW."""

from dataclasses import dataclass, field

import torch

from ..config_files import ConfigFileError
from ..forwards import next_token_losses
from ..modeling_zoo_rnn import IGNORE_INDEX
from .protocol import BuiltEstimator, EstimatorInputs, EstimatorSpec, RunArguments, StepReport, parts_of, tagged

BPTT_OPTIMIZERS = ("sgd", "adamw")


@dataclass
class BPTTArguments:
    """The BPTT baseline's options (estimator bptt)."""

    bptt_optimizer: str = field(default="adamw", metadata={"help": "sgd, or adamw (the paper's betas 0.99, 0.999)"})
    bptt_lr: float = field(default=1e-3, metadata={"help": "learning rate of the BPTT baselines"})
    bptt_truncation: int | None = field(
        default=None, metadata={"help": "time steps per backward (default: the model's chunk_size)"}
    )


class BPTTEstimator:
    """Backward per segment with the state detached between segments, one optimizer step."""

    kind = "bptt"
    train_label = "train (clean loss of each step's batch)"

    def __init__(self, model, optimizer, accelerator, *, truncation: int, lr: float, batch_copies: int):
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.truncation, self.lr, self.batch_copies = truncation, lr, batch_copies

    def train_step(self, batch) -> StepReport:
        input_ids, labels = batch
        count = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
        self.optimizer.zero_grad()
        state, total = None, 0.0
        for start in range(0, input_ids.shape[1], self.truncation):
            end = min(start + self.truncation, input_ids.shape[1])
            out = self.model(input_ids[:, start:end], state=state, use_cache=True)
            state = tuple(s.detach() for s in out.state)
            loss_sum, _ = next_token_losses(out.logits, labels, start, end)
            loss = loss_sum / count
            self.accelerator.backward(loss)
            total += loss.item()
        self.optimizer.step()
        if self.accelerator.num_processes > 1:  # every process logs (and stops on) the same number
            total = self.accelerator.reduce(torch.tensor(total, device=self.accelerator.device), "mean").item()
        tokens = input_ids.numel() * self.batch_copies
        return StepReport(total, forward_passes=1, tokens=tokens, metrics={"lr": self.lr})

    def state_dict(self) -> dict:
        return tagged(self.kind, optimizer=self.optimizer.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(parts_of(state, self.kind)["optimizer"])


def build_bptt(inputs: EstimatorInputs) -> BuiltEstimator:
    train, accelerator = inputs.args.train, inputs.accelerator
    model = inputs.model.train()
    if train.bptt_optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=train.bptt_lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.bptt_lr, betas=(0.99, 0.999))  # the paper's
    model, optimizer = accelerator.prepare(model, optimizer)
    truncation = train.bptt_truncation or accelerator.unwrap_model(model).config.chunk_size
    estimator = BPTTEstimator(
        model, optimizer, accelerator, truncation=truncation, lr=train.bptt_lr, batch_copies=inputs.batch_copies
    )
    return BuiltEstimator(estimator, model, {})


def check_bptt(args: RunArguments) -> None:
    train = args.train
    if train.bptt_optimizer not in BPTT_OPTIMIZERS:
        raise ConfigFileError(f"bptt_optimizer must be one of {BPTT_OPTIMIZERS}, got {train.bptt_optimizer!r}")
    if train.bptt_lr <= 0 or (train.bptt_truncation is not None and train.bptt_truncation < 1):
        raise ConfigFileError(
            f"bptt_lr must be positive and bptt_truncation at least 1, got {train.bptt_lr} and {train.bptt_truncation}"
        )


BPTT = EstimatorSpec(
    name="bptt",
    build=build_bptt,
    describe=lambda args: f"**truncated backpropagation through time** ({args.train.bptt_optimizer}), the baseline",
    check=check_bptt,
    arguments=(BPTTArguments,),
    card_rows=lambda args: [
        (
            "BPTT",
            f"{args.train.bptt_optimizer}, lr {args.train.bptt_lr}, truncation "
            f"{args.train.bptt_truncation or 'the model chunk size'}",
        )
    ],
)
