"""The BPTT baselines (bptt_sgd / bptt_adamw): truncated backpropagation through time on the same model and data."""

import torch

from ..forwards import next_token_losses
from ..modeling_zoo_rnn import IGNORE_INDEX
from .step import StepReport


class BPTTStep:
    """Backward per segment with the state detached between segments, one optimizer step."""

    train_label = "train (clean loss of each step's batch)"
    probes = 0

    def __init__(self, model, optimizer, accelerator, truncation: int, lr: float, batch_copies: int):
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.truncation, self.lr, self.batch_copies = truncation, lr, batch_copies

    def step(self, batch) -> StepReport:
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
        metrics = {"train_loss": total, "lr": self.lr}
        return StepReport(metrics, forward_passes=1, tokens=input_ids.numel() * self.batch_copies)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
