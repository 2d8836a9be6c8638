"""Hybrid (estimator `hybrid`): some parameters by their exact local gradient (local_scope), the rest by probes
(zo_parameters), both at one theta."""

from functools import partial

from ..config_files import ConfigFileError
from .local import LocalArguments, LocalEstimator, check_local, local_gradient, local_rows, partition, roles
from .probes import ProbeArguments, ProbeEstimator, check_next_token_probes, next_token_loss, probe_rows, zo_optimizer
from .protocol import BuiltEstimator, EstimatorInputs, EstimatorSpec, RunArguments, StepReport, parts_of, tagged


class HybridEstimator:
    """The local gradient's forward (which also gives the clean loss the probes difference against, and with
    guided probes their guide), the probes, then both updates; then any further local steps on fresh batches."""

    kind = "hybrid"
    train_label = LocalEstimator.train_label

    def __init__(self, local: LocalEstimator, probes: ProbeEstimator):
        self.local, self.probes = local, probes

    def train_step(self, batch) -> StepReport:
        input_ids, labels = batch
        report = self.local.accumulate(batch)  # its loss: L(theta), what the probes difference against
        probed = self.probes.update(
            partial(next_token_loss, self.probes.model, input_ids, labels),
            self.probes.population(input_ids, labels),
            report.loss,
            self.local.gradient.surrogates(),
        )
        report.add_costs(probed)
        report.probes, report.metrics = probed.probes, {**probed.metrics, "perturbed_loss": probed.loss}
        return self.local.finish(report, probes_skipped=probed.skipped)

    def state_dict(self) -> dict:
        return tagged(self.kind, local=self.local.state_dict(), probes=self.probes.state_dict())

    def load_state_dict(self, state: dict) -> None:
        parts = parts_of(state, self.kind)
        self.probes.load_state_dict(parts["probes"])
        self.local.load_state_dict(parts["local"])


def build_hybrid(inputs: EstimatorInputs) -> BuiltEstimator:
    args = inputs.args
    scope = args.train.local_scope
    model = inputs.model.eval().requires_grad_(False)
    zo_names, local_names = partition(model, scope, args.train.zo_parameters)
    if not zo_names:
        raise ConfigFileError(
            "local_scope=one_step trains every parameter and leaves none to the probes: name the probes' share with "
            "--zo_parameters GLOBS, or use --estimator one_step"
        )
    probes = ProbeEstimator(model, zo_optimizer(inputs, zo_names), inputs.accelerator, inputs.batch_copies)
    surrogate = zo_names if args.zo.guided_by_local_gradient else []
    gradient = local_gradient(inputs, scope, local_names, surrogate)
    local = LocalEstimator(
        scope,
        gradient,
        next_batch=inputs.next_batch,
        local_steps=args.train.local_steps,
        accelerator=inputs.accelerator,
        batch_copies=inputs.batch_copies,
    )
    parameter_roles = {**roles(zo_names, "zero-order"), **roles(local_names, f"{scope} gradient")}
    return BuiltEstimator(HybridEstimator(local, probes), model, parameter_roles)


def check_hybrid(args: RunArguments) -> None:
    check_local(args)
    check_next_token_probes(args)
    if args.zo.guided_by_local_gradient and args.train.local_scope != "one_step":
        raise ConfigFileError(
            f"zo_guide={args.zo.guide!r} uses the one-step gradient of the ZO parameters: set local_scope=one_step"
        )


HYBRID = EstimatorSpec(
    name="hybrid",
    build=build_hybrid,
    describe=lambda args: (
        f"**zero-order probes and an exact local gradient ({args.train.local_scope})**: no "
        "backpropagation through time, memory constant in context length"
    ),
    check=check_hybrid,
    card_rows=lambda args: [*probe_rows(args), *local_rows(args, args.train.local_scope)],
    arguments=(LocalArguments, ProbeArguments),
)
