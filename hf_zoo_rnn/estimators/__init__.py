"""Estimators: how a training step turns a batch into an update. Every one implements `Estimator` (protocol.py);
the run's `--estimator` names one in the registry (registry.py)."""

from .protocol import BuiltEstimator, Estimator, EstimatorInputs, EstimatorSpec, RunArguments, StepReport
from .registry import ARGUMENT_GROUPS, ESTIMATORS, build_estimator

__all__ = [
    "ARGUMENT_GROUPS",
    "ESTIMATORS",
    "BuiltEstimator",
    "Estimator",
    "EstimatorInputs",
    "EstimatorSpec",
    "RunArguments",
    "StepReport",
    "build_estimator",
]
