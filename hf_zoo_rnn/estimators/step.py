"""The one interface every estimator trains through: `step(batch) -> StepReport`, with `state_dict()` /
`load_state_dict()` for checkpoints. The trainer's loop calls it without knowing which estimator it holds, and adds
each report's counts to the run's counters in one place."""

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class StepReport:
    """What one training step did: its metrics (train_loss always) and what it cost."""

    metrics: dict = field(default_factory=dict)
    forward_passes: int = 0
    tokens: int = 0  # trained on (next-token objectives) or generated (rewards), over every process
    comm_bytes: int = 0  # sent by this process

    def add(self, other: "StepReport") -> "StepReport":
        """This report with another's counts added (its metrics are left to the caller)."""
        self.forward_passes += other.forward_passes
        self.tokens += other.tokens
        self.comm_bytes += other.comm_bytes
        return self


class TrainingStep(Protocol):
    train_label: str  # what its train_loss is, for the loss curve
    probes: int  # zero-order probes per step (0: none)

    def step(self, batch) -> StepReport: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def check_state_kind(state: dict, local: bool, probes: bool) -> None:
    """A checkpoint's step state fits only an estimator with the same parts (a local gradient, probes)."""
    has_local, has_probes = "local" in state, "step" in state
    if has_local != local or has_probes != probes:
        raise ValueError(
            f"it was trained with{'' if has_local else 'out'} a local gradient and with"
            f"{'' if has_probes else 'out'} probes; resume with the same local_gradient and zo_num_probes > 0 setting"
        )
