"""Estimators: how a step turns a batch into an update. Every one implements `TrainingStep` (step.py);
`build_step` chooses one from the run's arguments."""

from .build import BuiltStep, build_step, reward_objective
from .step import StepReport, TrainingStep

__all__ = ["BuiltStep", "StepReport", "TrainingStep", "build_step", "reward_objective"]
