"""Zero-order optimisation (CD-RGE) for any nn.Module: seeds -> z, exact perturbation, estimator, optimisers."""

from .estimator import finite_probes, probe_coefficients, projected_gradients, reported_loss
from .noise import noise, stream_seed
from .optimizer import PopulationLoss, ZOConfig, ZOOptimizer, ZOStepStats
from .perturb import Perturber, zo_parameters

__all__ = [
    "Perturber",
    "PopulationLoss",
    "ZOConfig",
    "ZOOptimizer",
    "ZOStepStats",
    "finite_probes",
    "noise",
    "probe_coefficients",
    "projected_gradients",
    "reported_loss",
    "stream_seed",
    "zo_parameters",
]
