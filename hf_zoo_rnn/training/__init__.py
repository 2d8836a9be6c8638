"""Training: arguments, the ZO / BPTT trainer, checkpoints and reports."""

from .arguments import DataArguments, ModelArguments, TrainArguments, parse_arguments
from .checkpoints import CheckpointError, latest_checkpoint
from .trainer import ReplicaMismatchError, ZooTrainer

__all__ = [
    "CheckpointError",
    "DataArguments",
    "ModelArguments",
    "ReplicaMismatchError",
    "TrainArguments",
    "ZooTrainer",
    "latest_checkpoint",
    "parse_arguments",
]
