"""One builder from the run's arguments to its training step: the estimator is chosen here and nowhere else.

optimizer=bptt_sgd / bptt_adamw                     BPTTStep
objective=reward                                    EvolutionStrategiesStep (probes are the ES members)
local_gradient=none                                 ZeroOrderStep (pure probes: the paper's CD-RGE)
local_gradient=readout / one_step, zo_num_probes=0  LocalStep (the default: one_step)
local_gradient and zo_num_probes > 0                HybridStep
"""

from dataclasses import dataclass
from functools import partial

import torch
from transformers import AutoModelForCausalLM

from ..config_files import ConfigFileError
from ..rewards import Fluency, RewardError, RewardObjective, load_reward_function
from ..zo import ZOOptimizer
from .bptt import BPTTStep
from .hybrid import HybridStep
from .local import LocalGradientStep, LocalStep, partition_parameters
from .step import TrainingStep
from .zero_order import EvolutionStrategiesStep, ZeroOrderStep


@dataclass
class BuiltStep:
    step: TrainingStep
    model: torch.nn.Module  # the model the step trains (BPTT: as accelerate prepared it)
    parameter_roles: dict[str, str]  # parameter name -> how it is trained (the model card's table; BPTT: none)
    objective: RewardObjective | None = None  # objective=reward: what evaluation scores too


def build_step(model, model_args, data_args, train_args, zo_config, accelerator, next_batch, tokenizer, *,
               reward_functions: list | None = None, start_model=None) -> BuiltStep:  # fmt: skip
    """The run's step. objective=reward takes its reward functions from `train_args.rewards`, or as callables
    (`reward_functions`, ESTrainer's), and its frozen starting model from `model_args.init_from` or `start_model`."""
    world_size = accelerator.num_processes
    batch_copies = world_size if data_args.per_rank_batches else 1
    if train_args.optimizer != "zo":
        model.train()
        optimizer_class = torch.optim.SGD if train_args.optimizer == "bptt_sgd" else torch.optim.AdamW
        options = {"betas": (0.99, 0.999)} if optimizer_class is torch.optim.AdamW else {}  # the paper's betas
        optimizer = optimizer_class(model.parameters(), lr=train_args.bptt_lr, **options)
        model, optimizer = accelerator.prepare(model, optimizer)
        truncation = train_args.bptt_truncation or accelerator.unwrap_model(model).config.chunk_size
        step = BPTTStep(model, optimizer, accelerator, truncation, train_args.bptt_lr, batch_copies)
        return BuiltStep(step, model, {})

    model.eval().requires_grad_(False)
    if zo_config.total_steps is None:  # schedules span the run, as in transformers' Trainer
        zo_config.total_steps = train_args.max_steps
    try:
        zo_names, local_names = partition_parameters(model, train_args.local_gradient, train_args.zo_parameters)
    except ValueError as error:
        raise ConfigFileError(str(error)) from error
    if zo_config.num_probes % world_size:
        raise ConfigFileError(
            f"zo_num_probes={zo_config.num_probes} is not divisible by the {world_size} processes: each "
            "process evaluates an equal share of the probes"
        )
    if zo_config.num_probes and not zo_names:
        raise ConfigFileError(
            f"local_gradient='one_step' (the default) trains every parameter and leaves none to the "
            f"{zo_config.num_probes} probes: pass --local_gradient none for pure zero-order training, "
            "--zo_parameters GLOBS for a hybrid, or --zo_num_probes 0"
        )
    roles = {name: "zero-order" for name in zo_names if zo_config.num_probes}
    roles.update({name: f"{train_args.local_gradient} gradient" for name in local_names})
    zero_order = None
    if zo_config.num_probes:
        zero_order = ZeroOrderStep(model, ZOOptimizer(model, zo_config, zo_names), accelerator, batch_copies)
    if train_args.objective == "reward":
        start = start_model  # the starting weights, frozen: what fluency scores by and the anchor decays toward
        needs_start = reward_functions is None and "fluency" in (n.strip() for n in train_args.rewards.split(","))
        if start is None and (train_args.anchor_decay or needs_start):
            start = AutoModelForCausalLM.from_pretrained(model_args.init_from).to(accelerator.device)
        if start is not None:
            start.eval().requires_grad_(False)
        objective = reward_objective(train_args, start, tokenizer, reward_functions)
        zo = zero_order.zo
        if train_args.anchor_decay:
            zo.set_anchor([dict(start.named_parameters())[name] for name in zo_names], train_args.anchor_decay)
        step = EvolutionStrategiesStep(accelerator.unwrap_model(model), zo, objective, accelerator, train_args.seed)
        return BuiltStep(step, model, roles, objective)
    if zo_config.loss_shaping == "per_prompt":
        raise ConfigFileError("zo_loss_shaping=per_prompt shapes rewards per prompt: it needs objective=reward")
    if train_args.local_gradient == "none":
        return BuiltStep(zero_order, model, roles)
    reduce = partial(accelerator.reduce, reduction="mean") if batch_copies > 1 else None
    surrogate = zo_names if zo_config.guided_by_local_gradient else []
    local = LocalGradientStep(
        model, train_args.local_gradient, local_names, surrogate, train_args, train_args.max_steps, reduce
    )
    local_step = LocalStep(local, next_batch, train_args.local_steps, accelerator, batch_copies)
    return BuiltStep(local_step if zero_order is None else HybridStep(local_step, zero_order), model, roles)


def reward_objective(train_args, start, tokenizer, functions: list | None = None) -> RewardObjective:
    """The reward functions (given, or named by train_args.rewards: fluency scored by `start`, the frozen starting
    model), their weights, and how completions are drawn and scored."""
    named = functions is None
    functions = [] if named else list(functions)
    for spec in (name.strip() for name in train_args.rewards.split(",") if named):
        if spec == "fluency":
            functions.append(Fluency(start, tokenizer))
        else:
            try:
                functions.append(load_reward_function(spec))
            except RewardError as error:
                raise ConfigFileError(str(error)) from None
    weights = [float(w) for w in train_args.reward_weights.split(",") if w.strip()] or [1.0] * len(functions)
    objective = RewardObjective(
        tokenizer, functions, weights, train_args.max_new_tokens, train_args.do_sample, train_args.temperature,
        train_args.reward_samples, train_args.reward_aggregation,
    )  # fmt: skip
    objective.timeout = train_args.reward_timeout
    return objective
