"""Every `--estimator` choice, by name. Adding an estimator is one module (its argument dataclass, class, builder,
checks and card text, bundled as an `EstimatorSpec`) and its name in the tuple below: its options then parse as
part of TrainArguments."""

from .bptt import BPTT
from .evolution import ES
from .hybrid import HYBRID
from .local import ONE_STEP, READOUT
from .probes import PROBES
from .protocol import BuiltEstimator, EstimatorInputs, EstimatorSpec

ESTIMATORS: dict[str, EstimatorSpec] = {spec.name: spec for spec in (ONE_STEP, READOUT, PROBES, HYBRID, ES, BPTT)}
# every estimator's argument dataclasses, each once, in the order the estimators are listed
ARGUMENT_GROUPS: tuple[type, ...] = tuple(
    dict.fromkeys(group for spec in ESTIMATORS.values() for group in spec.arguments)
)


def build_estimator(inputs: EstimatorInputs) -> BuiltEstimator:
    """The run's estimator, built by its registered builder."""
    return ESTIMATORS[inputs.args.train.estimator].build(inputs)
