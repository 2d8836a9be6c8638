"""Hybrid steps: some parameters by their exact local gradient, the rest by probes, both at one theta."""

from functools import partial

from .local import LocalStep
from .step import StepReport, check_state_kind
from .zero_order import ZeroOrderStep, next_token_loss


class HybridStep:
    """The local gradient's forward (which also gives the clean loss the probes difference against, and with
    guided probes their guide), the probes, then both updates; then any further local steps on fresh batches."""

    train_label = LocalStep.train_label

    def __init__(self, local: LocalStep, zero_order: ZeroOrderStep):
        self.local, self.zero_order = local, zero_order
        self.probes = zero_order.probes

    def step(self, batch) -> StepReport:
        input_ids, labels = batch
        clean_loss, report = self.local.gradients(batch)
        probes = self.zero_order.update(
            partial(next_token_loss, self.zero_order.model, input_ids, labels),
            self.zero_order.population(input_ids, labels),
            clean_loss,
            self.local.gradient.surrogates(),
        )
        probes.metrics["perturbed_loss"] = probes.metrics["train_loss"]
        report.add(probes).metrics = probes.metrics
        return self.local.finish(clean_loss, report, probes_skipped=bool(probes.metrics["skipped_step"]))

    def state_dict(self) -> dict:
        return {**self.zero_order.state_dict(), **self.local.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, local=True, probes=True)
        self.zero_order.zo.load_state_dict(state)
        self.local.gradient.load_state_dict(state["local"])
