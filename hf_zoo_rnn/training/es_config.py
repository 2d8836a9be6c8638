"""ESConfig: evolution strategies on rewards, configured the way TRL's GRPOConfig is — a transformers
`TrainingArguments` with TRL's generation and reward fields — so a GRPO script ports by renaming two classes.

TrainingArguments' fields mean what they mean there (output_dir, max_steps, per_device_train_batch_size, learning_rate,
logging_steps, save_steps / save_strategy, eval_steps / eval_strategy, seed, report_to, push_to_hub / hub_model_id,
use_cpu, bf16); the generation and reward fields keep TRL's names (max_completion_length, num_generations,
temperature, reward_weights, log_completions, num_completions_to_print); ES's own have plain names. A GRPO-only
option is one error naming it and, where there is one, its ES counterpart.
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..zo.estimator import SHAPINGS
from ..zo.optimizer import LR_SCHEDULES, UPDATE_RULES

# TRL GRPOConfig options that have no meaning for evolution strategies -> what to use instead (None: nothing)
GRPO_ONLY = {
    "beta": "anchor_decay (a pull toward the starting weights, against drift)",
    "loss_type": None,
    "epsilon": None,
    "epsilon_high": None,
    "num_iterations": None,
    "scale_rewards": "fitness_shaping (zscore, centered_ranks or per_prompt)",
    "importance_sampling_level": None,
    "mask_truncated_completions": None,
    "use_vllm": "nothing: a recurrent model has no KV cache, and the population generates as one batch",
    "vllm_mode": None,
    "vllm_gpu_memory_utilization": None,
    "steps_per_generation": None,
    "generation_batch_size": None,
    "sync_ref_model": "anchor_decay",
    "ref_model_mixup_alpha": None,
    "ref_model_sync_steps": None,
    "top_entropy_quantile": None,
    "use_liger_loss": None,
    "delta": None,
    "top_p": "greedy=False with temperature (members sample from the full distribution)",
    "top_k": "greedy=False with temperature (members sample from the full distribution)",
    "max_prompt_length": None,
}


class ESConfigError(ValueError):
    """An ESConfig setting that cannot work (a GRPO-only option, or a value out of range)."""


@dataclass
class ESConfig(TrainingArguments):
    """Settings of `ESTrainer`. Each step, `population_size` members θ ± σ·z (antithetic pairs; rank-`rank`
    perturbations of every matrix, all members generating as one batch on an hf_zoo_rnn model) complete every prompt
    of the step; their rewards, shaped by `fitness_shaping`, weigh the update (ES-Adam at `learning_rate`)."""

    # TrainingArguments fields whose default differs for ES
    learning_rate: float = field(default=1e-3, metadata={"help": "ES step size (EGGROLL, Qiu et al.: ~1e-3)"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": f"one of {LR_SCHEDULES}"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    report_to: str | list[str] = field(default="none", metadata={"help": "trackers (accelerate's), or none"})
    save_steps: float = field(default=100, metadata={"help": "checkpoint every N steps (save_strategy='steps')"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output_dir that holds a finished run (else an error)"}
    )
    # TRL's generation and reward fields
    max_completion_length: int = field(default=40, metadata={"help": "tokens each completion generates"})
    num_generations: int = field(
        default=1,
        metadata={
            "help": "completions per prompt and member (> 1: sampled at `temperature`; their mean is the reward)"
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (greedy=False)"})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "one weight per reward function"})
    log_completions: bool = field(default=False, metadata={"help": "print sample completions at each log"})
    num_completions_to_print: int | None = field(default=None, metadata={"help": "how many (None: all)"})
    # evolution strategies
    population_size: int = field(default=64, metadata={"help": "members per step, over every process (even)"})
    sigma: float = field(default=0.01, metadata={"help": "perturbation size σ"})
    rank: int | None = field(
        default=1,
        metadata={"help": "rank of each member's perturbation of a matrix (None: full rank, members one at a time)"},
    )
    fitness_shaping: str = field(default="zscore", metadata={"help": f"one of {SHAPINGS}"})
    anchor_decay: float = field(default=0.0, metadata={"help": "each step pulls θ toward the start by lr × this"})
    greedy: bool = field(
        default=True,
        metadata={
            "help": "one completion per prompt, decoded greedily (exploration is in weight space); False samples"
        },
    )
    update_rule: str = field(default="adam", metadata={"help": f"one of {UPDATE_RULES}"})
    reward_timeout: float = field(
        default=300.0, metadata={"help": "seconds one reward function's call may take before an error (0: none)"}
    )

    def __new__(cls, *args, **kwargs):
        refused = sorted(name for name in kwargs if name in GRPO_ONLY)
        if refused:
            hints = "; ".join(
                f"{name}: {'use ' + GRPO_ONLY[name] if GRPO_ONLY[name] else 'no ES counterpart'}" for name in refused
            )
            raise ESConfigError(f"ESConfig does not take GRPO's {', '.join(refused)} ({hints})")
        return super().__new__(cls)

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if self.population_size < 2 or self.population_size % 2:
            problems.append(
                f"population_size must be even and at least 2 (antithetic pairs), got {self.population_size}"
            )
        if self.sigma <= 0:
            problems.append(f"sigma must be positive, got {self.sigma}")
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be at least 1 or None (full rank), got {self.rank}")
        choices = {"fitness_shaping": SHAPINGS, "update_rule": UPDATE_RULES, "lr_scheduler_type": LR_SCHEDULES}
        for name, allowed in choices.items():
            if plain(getattr(self, name)) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_generations < 1 or self.max_completion_length < 1:
            problems.append("num_generations and max_completion_length must be at least 1")
        if plain(self.save_strategy) not in ("steps", "no") or plain(self.eval_strategy) not in ("steps", "no"):
            problems.append("save_strategy and eval_strategy must be 'steps' or 'no' (an ES run has no epochs)")
        if problems:
            raise ESConfigError("ESConfig: " + "; ".join(problems))


def plain(value) -> str:
    """An option's text: TrainingArguments turns some into enums (SchedulerType.CONSTANT -> "constant")."""
    return str(getattr(value, "value", value))
