"""ZOOptimizer: one CD-RGE step = evaluate K probes (possibly split over processes), gather 2K scalars, and
apply the same update on every process by regenerating each z from its seed.

Memory (d = number of parameters, b = bytes per weight):
  sgd       d*b    backup of theta (exact restore)
  momentum  + 4d   fp32 velocity
  adam      + 8d   fp32 first and second moments
  (buffers and update arithmetic are fp32, or fp64 for fp64 weights)
  update_mode="buffer" adds 8d (the current probe's fp32 z and this process's fp32 sum of g_i z_i) and in
  exchange generates each z once per step instead of three times.
  probes_per_forward=P > 1 evaluates P probes (2P perturbed models) in one stacked forward instead of moving
  theta: 2P*d*b for the stacked weights, plus P-fold activations (bounded by stacked_memory_mb when P is auto).
  guide != "none" adds 4kd for the guided basis (k surrogate directions), and guide_history * 4d more when the
  recent updates are among the surrogates.

One step is four small units: directions (directions.py: isotropic or guided), loss evaluation (one perturbed
model at a time, or stacked), the estimator's arithmetic (estimator.py) and the update (replayed from seeds).
"""

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import get_scheduler

from .directions import GuidedDirections, IsotropicDirections, LowRankDirections
from .estimator import (
    DIFFERENCES,
    SHAPINGS,
    finite_probes,
    probe_coefficients,
    projected_gradients,
    prompt_means,
    reported_loss,
    shaped_losses,
)
from .noise import DISTRIBUTIONS
from .perturb import Perturber, compute_dtype, zo_parameters

UPDATE_RULES = ("sgd", "momentum", "adam")
UPDATE_MODES = ("replay", "buffer")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
EPS_SCHEDULES = ("constant", "linear", "cosine")  # no warm-up: eps = 0 would divide the difference by zero
GUIDES = ("none", "updates", "local", "local+updates")
PERTURBATIONS = ("full", "lowrank")


@dataclass
class ZOConfig:
    """Settings of the zero-order optimiser (the `zo_` arguments of the trainer map onto these)."""

    num_probes: int = field(
        default=16, metadata={"help": "probes K per step, split evenly over processes (0: no zero-order part)"}
    )
    eps: float = field(default=1e-2, metadata={"help": "perturbation size epsilon"})
    lr: float | None = field(default=None, metadata={"help": "learning rate; must be unset when tied=True"})
    tied: bool = field(default=False, metadata={"help": "the paper's update: step = eps * g_hat (lr = eps)"})
    difference: str = field(default="central", metadata={"help": "central (2K forwards) or forward (K + 1)"})
    distribution: str = field(default="rademacher", metadata={"help": "rademacher or gaussian"})
    update_rule: str = field(default="sgd", metadata={"help": "sgd, momentum or adam"})
    momentum: float = field(default=0.9, metadata={"help": "momentum coefficient (update_rule=momentum)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (update_rule=adam)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (update_rule=adam)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam denominator epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled decay on matrices (ndim >= 2)"})
    clip_projected_gradient: float | None = field(default=None, metadata={"help": "clamp each g_i to +-value"})
    loss_shaping: str = field(
        default="none",
        metadata={
            "help": "ES fitness shaping of the population's losses: none, zscore, centered_ranks, or per_prompt "
            "(rewards: z-scored per prompt across the members, then averaged)"
        },
    )
    lr_schedule: str = field(default="constant", metadata={"help": "constant, constant_with_warmup, linear, cosine"})
    eps_schedule: str = field(default="constant", metadata={"help": "schedule of eps: constant, linear, cosine"})
    warmup_steps: int = field(default=0, metadata={"help": "warm-up steps of the lr schedule"})
    total_steps: int | None = field(
        default=None, metadata={"help": "horizon of linear/cosine schedules (the trainer uses max_steps)"}
    )
    update_mode: str = field(default="replay", metadata={"help": "replay (no extra memory) or buffer (faster)"})
    max_chunk_elements: int = field(default=1 << 24, metadata={"help": "bound on temporary z per tensor piece"})
    probes_per_forward: int = field(
        default=1,
        metadata={
            "help": "probes evaluated together, their perturbed models stacked as one wider model (1: one model at "
            "a time, theta perturbed in place; 0: as many as fit in stacked_memory_mb)"
        },
    )
    stacked_memory_mb: float = field(
        default=1024.0, metadata={"help": "memory budget of the stacked models when probes_per_forward is 0"}
    )
    perturbation: str = field(
        default="full",
        metadata={
            "help": "full (every element its own random number) or lowrank (EGGROLL: each matrix perturbed by "
            "A B^T / sqrt(r), vectors in full)"
        },
    )
    perturbation_rank: int = field(default=1, metadata={"help": "r of lowrank perturbations"})
    guide: str = field(
        default="none",
        metadata={
            "help": "Guided ES surrogates: none (isotropic probes), updates (the last guide_history update "
            "directions), local (the local gradient of the ZO parameters), local+updates"
        },
    )
    guide_alpha: float = field(default=0.5, metadata={"help": "isotropic share alpha of a guided probe, in (0, 1]"})
    guide_history: int = field(default=4, metadata={"help": "recent update directions kept as surrogates"})
    seed: int = field(default=0, metadata={"help": "run seed: with step and probe index it fixes every z"})

    def __post_init__(self):
        choices = {
            "difference": DIFFERENCES,
            "distribution": DISTRIBUTIONS,
            "update_rule": UPDATE_RULES,
            "update_mode": UPDATE_MODES,
            "lr_schedule": LR_SCHEDULES,
            "eps_schedule": EPS_SCHEDULES,
            "guide": GUIDES,
            "perturbation": PERTURBATIONS,
            "loss_shaping": SHAPINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ZOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.tied and self.lr is not None:
            raise ValueError("ZOConfig.lr must be unset when tied=True (the paper's update uses lr = eps)")
        if self.loss_shaping != "none" and self.difference != "central":
            raise ValueError("ZOConfig.loss_shaping ranks the population's L+ and L-: it needs difference='central'")
        if self.num_probes < 0 or self.max_chunk_elements < 1:
            raise ValueError(
                f"ZOConfig.num_probes must be >= 0 (0: no zero-order part) and max_chunk_elements positive, got "
                f"{self.num_probes} and {self.max_chunk_elements}"
            )
        if self.probes_per_forward < 0 or self.stacked_memory_mb <= 0:
            raise ValueError(
                f"ZOConfig.probes_per_forward must be >= 0 (0: automatic) and stacked_memory_mb positive, got "
                f"{self.probes_per_forward} and {self.stacked_memory_mb}"
            )
        if self.eps <= 0:
            raise ValueError(f"ZOConfig.eps must be positive, got {self.eps}")
        if self.perturbation == "lowrank" and (self.guide != "none" or self.perturbation_rank < 1):
            raise ValueError(
                f"ZOConfig: lowrank perturbations need perturbation_rank >= 1 (got {self.perturbation_rank}) and "
                f"isotropic probes (guide='none', got {self.guide!r})"
            )
        if not 0 < self.guide_alpha <= 1 or self.guide_history < 1:
            raise ValueError(
                f"ZOConfig.guide_alpha must be in (0, 1] and guide_history >= 1, got {self.guide_alpha} and "
                f"{self.guide_history}"
            )

    @property
    def guided_by_updates(self) -> bool:
        return self.guide in ("updates", "local+updates")

    @property
    def guided_by_local_gradient(self) -> bool:
        return self.guide in ("local", "local+updates")


def schedule(name: str, warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of step t, from transformers' own schedule functions."""
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(name, holder, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return scheduler.lr_lambdas[0]


@dataclass
class PopulationLoss:
    """How to evaluate several perturbed models in one forward: the protocol between the optimiser and a model's
    population view (hf_zoo_rnn.forwards.population builds one for ZooRnn; any model can supply its own)."""

    fn: Callable[[list], torch.Tensor]  # per ZO tensor, the M models' values (or changes) -> their M losses
    bytes_per_model: int  # what one more model costs in memory
    members: bool = False  # fn takes low-rank changes (Perturber.members), not stacked weights (Perturber.stacked)


def probes_per_forward(requested: int, *, probes: int, models_per_probe: int, bytes_per_model: int, budget_mb: float):
    """How many probes one stacked forward evaluates: `requested`, or with 0 as many as fit in the budget."""
    if requested == 0:
        requested = int(budget_mb * 2**20 // (models_per_probe * bytes_per_model))
    return max(1, min(requested, probes))


@dataclass
class ZOStepStats:
    """What one step did. Losses are the mean perturbed loss (the paper's reported train loss)."""

    step: int
    loss: float
    lr: float
    eps: float
    projected_grad_mean: float
    projected_grad_std: float
    snr: float
    update_norm: float
    forward_passes: int
    dropped_probes: int
    skipped: bool
    seconds_forward: float  # this process's loss evaluations
    seconds_update: float  # regenerating z and applying the update
    seconds_total: float  # the rest is snapshot, perturbation and restore (and the gather)


@dataclass
class Population:
    """One step's perturbed models, as `ZOOptimizer.ask` hands them out: this process's probes, each at every scale
    (central differences: +eps and -eps, an antithetic pair). Member order is probe-major, scale-minor."""

    step: int
    eps: float
    lr: float
    probes: range  # this process's share of the step's probes
    scales: tuple[float, ...]
    started: float = field(default_factory=time.perf_counter)

    def members(self) -> list[tuple[int, int, float]]:
        """(probe, scale column, scale) of every member this process evaluates."""
        return [(probe, column, scale) for probe in self.probes for column, scale in enumerate(self.scales)]


class ZOOptimizer:
    """Zero-order CD-RGE optimiser over the parameters of `model` (all of them, or those in `names`).

    `step(loss_fn)` calls `loss_fn()` (which must return the scalar loss of the current parameters) once per
    perturbed point, under `torch.inference_mode()`. With several processes pass `rank`, `world_size` and a
    `gather` that concatenates each process's [k, 2] loss tensor in rank order (accelerate's `gather`).

    A caller that evaluates the members itself (evolution strategies on rewards) uses the two halves of `step`:
    `ask()` hands out the step's `Population`, `tell(population, losses)` takes every member's losses and updates.
    """

    def __init__(self, model: nn.Module, config: ZOConfig, names: Sequence[str] | None = None):
        if not config.tied and config.lr is None:
            raise ValueError("ZOConfig.lr is required unless tied=True")
        needs_horizon = {config.lr_schedule, config.eps_schedule} & {"linear", "cosine"}
        if needs_horizon and config.total_steps is None:
            raise ValueError(f"ZOConfig.total_steps is required by the {sorted(needs_horizon)} schedule")
        self.config = config
        named = zo_parameters(model)
        if names is not None:
            wanted = set(names)
            unknown = wanted - {name for name, _ in named}
            if unknown:
                raise ValueError(f"ZO parameters {sorted(unknown)} are not parameters of the model")
            named = [(name, param) for name, param in named if name in wanted]
        if not named or config.num_probes < 1:
            raise ValueError("ZOOptimizer needs at least one parameter and one probe")
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        if config.perturbation == "lowrank":  # matrices: every tensor of two or more dimensions but a bias
            matrices = [param.ndim >= 2 and not name.endswith("bias") for name, param in named]
            self.directions = LowRankDirections(
                self.params, config.seed, config.distribution, config.perturbation_rank, matrices
            )
        elif config.guide == "none":
            self.directions = IsotropicDirections(self.params, config.seed, config.distribution)
        else:
            self.directions = GuidedDirections(self.params, config.seed, config.distribution, config.guide_alpha)
        self.perturber = Perturber(self.params, self.directions, config.max_chunk_elements)
        self.lr_multiplier = schedule(config.lr_schedule, config.warmup_steps, config.total_steps)
        self.eps_multiplier = schedule(config.eps_schedule, 0, config.total_steps)
        self.step_count = 0
        self.anchor: list[torch.Tensor] | None = None  # weights the update decays toward (set_anchor)
        self.anchor_decay = 0.0
        self.buffers: dict[str, list[torch.Tensor]] = {}
        moments = {"sgd": (), "momentum": ("velocity",), "adam": ("exp_avg", "exp_avg_sq")}[config.update_rule]
        for name in moments:
            self.buffers[name] = [torch.zeros(p.shape, dtype=compute_dtype(p), device=p.device) for p in self.params]
        if config.guided_by_updates:  # a ring of the last guide_history steps taken, per tensor [k, numel]
            self.buffers["update_history"] = [
                torch.zeros(config.guide_history, p.numel(), dtype=torch.float32, device=p.device) for p in self.params
            ]

    # -- schedules ------------------------------------------------------------------------------------------------

    def current_eps(self) -> float:
        return self.config.eps * self.eps_multiplier(self.step_count)

    def current_lr(self) -> float:
        if self.config.tied:
            return self.current_eps()
        return self.config.lr * self.lr_multiplier(self.step_count)

    # -- the step -------------------------------------------------------------------------------------------------

    def set_anchor(self, weights: Sequence[torch.Tensor], decay: float) -> None:
        """Make every update also pull the parameters toward `weights` (one per ZO tensor, e.g. the starting model)
        by lr * decay * (theta - anchor): part of the step, in its norm, like decoupled weight decay toward them."""
        self.anchor, self.anchor_decay = list(weights), decay

    def step(
        self,
        loss_fn: Callable[[], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        population_loss: PopulationLoss | None = None,
        clean_loss: float | None = None,
        surrogates: Sequence[Sequence[torch.Tensor]] = (),
    ) -> ZOStepStats:
        """One step: ask, evaluate this process's probes, gather, tell. `clean_loss`, when the caller already has
        L(theta) of this batch (e.g. from the forward of a local gradient), saves forward differences their base
        forward. `surrogates` are guide directions (one tensor per ZO parameter each), identical on every process,
        for guide="local" / "local+updates"."""
        config = self.config
        if config.probes_per_forward != 1 and population_loss is None:
            raise ValueError(f"ZOConfig.probes_per_forward={config.probes_per_forward} needs a population_loss")
        if population_loss is not None and population_loss.members != (config.perturbation == "lowrank"):
            raise ValueError("low-rank probes are evaluated as members of one batch, full-rank ones as stacked models")
        population = self.ask(rank, world_size, surrogates)
        local, partial, forward_seconds, base_forwards = self.evaluate_probes(
            loss_fn, population_loss, population, clean_loss
        )
        losses = gather(local) if gather is not None else local
        return self.tell(population, losses, partial, rank, base_forwards * world_size, forward_seconds)

    def ask(self, rank: int = 0, world_size: int = 1, surrogates: Sequence[Sequence[torch.Tensor]] = ()) -> Population:
        """This step's population: its directions drawn, and this process's share of the probes."""
        config = self.config
        if config.num_probes % world_size:
            raise ValueError(f"num_probes={config.num_probes} is not divisible by the {world_size} processes")
        if config.guided_by_local_gradient != bool(surrogates):
            raise ValueError(f"ZOConfig.guide={config.guide!r} and the surrogates passed to step() disagree")
        started = time.perf_counter()
        self.draw_directions(surrogates)
        per_rank = config.num_probes // world_size
        eps = self.current_eps()
        scales = (eps, -eps) if config.difference == "central" else (eps,)
        return Population(
            self.step_count, eps, self.current_lr(), range(rank * per_rank, (rank + 1) * per_rank), scales, started
        )

    def tell(
        self,
        population: Population,
        losses: torch.Tensor,
        partial: list[torch.Tensor] | None = None,
        rank: int = 0,
        base_forwards: int = 0,
        seconds_forward: float = 0.0,
    ) -> ZOStepStats:
        """Update from every process's member losses, in probe order: [K, 2] (L+, L-; forward differences: L+,
        L(theta)), or [K, 2, P] one loss per prompt (shaped per prompt when loss_shaping="per_prompt", else
        averaged over the prompts first). `partial` is this process's buffered sum (update_mode="buffer")."""
        config = self.config
        if population.step != self.step_count:
            raise ValueError(f"tell() got the population of step {population.step}; this is step {self.step_count}")
        reported = prompt_means(losses) if losses.dim() == 3 else losses  # the raw losses stay what is reported
        first, second = reported[:, 0], reported[:, 1]
        scored = shaped_losses(losses, config.loss_shaping)
        eps, lr = population.eps, population.lr
        coefficients, kept = probe_coefficients(
            scored[:, 0], scored[:, 1], eps, config.difference, config.clip_projected_gradient
        )
        update_norm, update_started = 0.0, time.perf_counter()
        if kept and (lr != 0 or config.weight_decay != 0):
            update_norm = self.apply_update(coefficients, kept, lr, rank, len(population.probes), partial)
        finished = time.perf_counter()
        forward_passes = config.num_probes * (2 if config.difference == "central" else 1) + base_forwards
        stats = self.statistics(
            first,
            second,
            kept=kept,
            eps=eps,
            lr=lr,
            update_norm=update_norm,
            forward_passes=forward_passes,
            seconds_forward=seconds_forward,
            seconds_update=finished - update_started,
            seconds_total=finished - population.started,
        )
        self.step_count += 1
        return stats

    def draw_directions(self, surrogates: Sequence[Sequence[torch.Tensor]]) -> None:
        """Fix this step's direction family: the step counter, and for guided probes the surrogate subspace."""
        self.directions.step = self.step_count
        if isinstance(self.directions, GuidedDirections):
            directions = list(surrogates)
            if self.config.guided_by_updates:
                history = self.buffers["update_history"]
                directions += [[h[row] for h in history] for row in range(self.config.guide_history)]
            self.directions.set_subspace(directions)

    def evaluate_probes(self, loss_fn, population_loss, population: Population, clean_loss: float | None):
        """This process's [k, 2] losses (L+, L-; or L+, L(theta) for forward differences), the buffered partial
        update sum (update_mode="buffer"), the seconds spent in forwards, and how many base forwards it ran."""
        config = self.config
        use_buffer = config.update_mode == "buffer"
        owned, scales, eps = population.probes, population.scales, population.eps
        forward_seconds = 0.0

        def timed_losses(fn, *args) -> torch.Tensor:
            nonlocal forward_seconds
            start = time.perf_counter()
            with torch.inference_mode():
                values = fn(*args).detach().to("cpu", torch.float64).reshape(-1)
            forward_seconds += time.perf_counter() - start
            return values

        base_forwards = int(config.difference == "forward" and clean_loss is None)
        base = timed_losses(loss_fn) if base_forwards else clean_loss
        local = torch.empty(len(owned), 2, dtype=torch.float64)
        partial = (
            [torch.zeros(p.numel(), dtype=compute_dtype(p), device=p.device) for p in self.params]
            if use_buffer
            else None
        )
        group = 1
        if population_loss is not None:
            group = probes_per_forward(
                config.probes_per_forward,
                probes=len(owned),
                models_per_probe=len(scales),
                bytes_per_model=population_loss.bytes_per_model,
                budget_mb=config.stacked_memory_mb,
            )
        if group == 1:
            self.perturber.snapshot()
            for row, probe in enumerate(owned):
                z_cache = self.probe_z(probe) if use_buffer else None
                for column, scale in enumerate(scales):
                    self.perturber.perturb(probe, scale, z_cache)
                    local[row, column] = timed_losses(loss_fn)
                self.perturber.restore()
                if base is not None:
                    local[row, 1] = base
                if use_buffer:
                    self.accumulate(partial, z_cache, local[row], eps)
            self.perturber.release()
        else:
            for first in range(0, len(owned), group):
                rows = range(first, min(first + group, len(owned)))
                probes = [owned[r] for r in rows]
                if population_loss.members:
                    points = self.perturber.members(probes, scales)
                    z_cache = [self.probe_z(probe) for probe in probes] if use_buffer else None
                else:
                    points, z_cache = self.perturber.stacked(probes, scales, use_buffer)
                local[first : rows.stop, : len(scales)] = timed_losses(population_loss.fn, points).view(-1, len(scales))
                del points
                if base is not None:
                    local[first : rows.stop, 1] = base
                if use_buffer:
                    for row, z in zip(rows, z_cache, strict=True):
                        self.accumulate(partial, z, local[row], eps)
        return local, partial, forward_seconds, base_forwards

    def probe_z(self, probe: int) -> list[torch.Tensor]:
        """One probe's whole z, flat, per tensor (buffer mode keeps it for the update)."""
        return [self.perturber.z(probe, i, 0, p.numel()) for i, p in enumerate(self.params)]

    def statistics(self, first, second, *, kept, eps, lr, update_norm, forward_passes, **seconds) -> ZOStepStats:
        """What the step did, from the gathered losses; `seconds` are the step's three timings."""
        config = self.config
        g = projected_gradient_values(first, second, eps, config.difference, kept)
        return ZOStepStats(
            step=self.step_count,
            loss=reported_loss(first, second, config.difference),
            lr=lr,
            eps=eps,
            projected_grad_mean=g.mean().item() if kept else float("nan"),
            projected_grad_std=g.std().item() if kept > 1 else float("nan"),
            snr=(g.mean().abs() / g.std()).item() if kept > 1 and g.std() > 0 else float("nan"),
            update_norm=update_norm,
            forward_passes=forward_passes,
            dropped_probes=config.num_probes - kept,
            skipped=kept == 0,
            **seconds,
        )

    def accumulate(self, partial: list[torch.Tensor], z: list[torch.Tensor], losses: torch.Tensor, eps: float) -> None:
        """Buffer mode: add this probe's c_i z_i to this process's partial sum (the z it was evaluated with)."""
        config = self.config
        coefficient, kept = probe_coefficients(
            losses[:1], losses[1:], eps, config.difference, config.clip_projected_gradient
        )
        if kept:
            for acc, z_tensor in zip(partial, z, strict=True):
                acc.add_(z_tensor, alpha=coefficient.item())

    @torch.no_grad()
    def apply_update(self, coefficients, kept, lr, rank, per_rank, partial) -> float:
        """theta <- theta - lr * direction(g_hat) (+ decoupled decay), piece by piece, identically on every rank.

        g_hat = sum_i c_i z_i / kept is summed in a fixed order that does not depend on which rank evaluated
        which probe: in replay mode probe by probe in global order; in buffer mode rank-partial by rank-partial
        (each partial in probe order), using this rank's own buffer for its partial and replaying the others.
        """
        config = self.config
        num_ranks = len(coefficients) // per_rank
        squared_norm = 0.0
        t = self.step_count + 1  # Adam's bias-correction step
        for index, param in enumerate(self.params):
            flat = param.view(-1)
            for start, length in self.perturber.chunks(index):
                g_hat = torch.zeros(length, dtype=compute_dtype(param), device=param.device)
                if partial is None:
                    self.replay_into(g_hat, range(len(coefficients)), coefficients, index, start, length)
                else:
                    for owner in range(num_ranks):
                        if owner == rank:
                            g_hat += partial[index][start : start + length]
                        else:
                            piece = torch.zeros_like(g_hat)
                            probes = range(owner * per_rank, (owner + 1) * per_rank)
                            self.replay_into(piece, probes, coefficients, index, start, length)
                            g_hat += piece
                g_hat /= kept
                direction = self.direction(index, start, length, g_hat, t)
                current = flat[start : start + length].to(g_hat.dtype)
                step = direction.mul_(lr)
                if config.weight_decay and param.ndim >= 2:
                    step.add_(current, alpha=lr * config.weight_decay)
                if self.anchor is not None:
                    anchor = self.anchor[index].view(-1)[start : start + length].to(g_hat.dtype)
                    step.add_(current - anchor, alpha=lr * self.anchor_decay)
                squared_norm += float(step.double().pow(2).sum())
                flat[start : start + length] = (current - step).to(param.dtype)
                if config.guided_by_updates:
                    slot = self.step_count % config.guide_history
                    self.buffers["update_history"][index][slot, start : start + length] = step
        return math.sqrt(squared_norm)

    def replay_into(self, out, probes: Sequence[int], coefficients, index, start, length) -> None:
        chosen = [coefficients[probe].item() for probe in probes]
        self.directions.add_combination(out, probes, chosen, index, start, length)

    def direction(self, index: int, start: int, length: int, g_hat: torch.Tensor, t: int) -> torch.Tensor:
        """The optimiser's step direction for one piece (before multiplying by lr)."""
        config = self.config
        if config.update_rule == "sgd":
            return g_hat
        if config.update_rule == "momentum":
            velocity = self.buffers["velocity"][index].view(-1)[start : start + length]
            velocity.mul_(config.momentum).add_(g_hat)
            return velocity.clone()
        exp_avg = self.buffers["exp_avg"][index].view(-1)[start : start + length]
        exp_avg_sq = self.buffers["exp_avg_sq"][index].view(-1)[start : start + length]
        exp_avg.mul_(config.adam_beta1).add_(g_hat, alpha=1 - config.adam_beta1)
        exp_avg_sq.mul_(config.adam_beta2).addcmul_(g_hat, g_hat, value=1 - config.adam_beta2)
        corrected = exp_avg / (1 - config.adam_beta1**t)
        denominator = (exp_avg_sq / (1 - config.adam_beta2**t)).sqrt_().add_(config.adam_epsilon)
        return corrected.div_(denominator)

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "config": dataclasses.asdict(self.config),
            "parameter_names": list(self.names),
            "buffers": {name: [b.clone() for b in tensors] for name, tensors in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["parameter_names"] != self.names:
            raise ValueError("ZO optimizer state was saved for a model with different parameters")
        saved_rule = state["config"]["update_rule"]
        if saved_rule != self.config.update_rule:
            raise ValueError(f"ZO optimizer state is for update_rule={saved_rule!r}, not {self.config.update_rule!r}")
        if set(state["buffers"]) != set(self.buffers):
            raise ValueError(
                f"ZO optimizer state holds buffers {sorted(state['buffers'])}, this configuration needs "
                f"{sorted(self.buffers)} (update_rule or guide changed)"
            )
        self.step_count = int(state["step"])
        for name, tensors in state["buffers"].items():
            for target, source in zip(self.buffers[name], tensors, strict=True):
                target.copy_(source)


def projected_gradient_values(first, second, eps, difference, kept) -> torch.Tensor:
    """The finite g_i (before clipping), for diagnostics."""
    keep = finite_probes(first, second)
    return projected_gradients(first[keep], second[keep], eps, difference) if kept else first.new_zeros(0)
