"""Training: arguments, the ZO / BPTT trainer, checkpoints and reports."""

from .arguments import DataArguments, ModelArguments, TrainArguments, parse_arguments
from .checkpoints import CheckpointError, latest_checkpoint
from .replicas import ReplicaMismatchError
from .trainer import TrainingStalledError, ZooTrainer

__all__ = [
    "CheckpointError",
    "DataArguments",
    "ModelArguments",
    "ReplicaMismatchError",
    "TrainingStalledError",
    "TrainArguments",
    "ZooTrainer",
    "latest_checkpoint",
    "parse_arguments",
]
