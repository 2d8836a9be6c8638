"""ESTrainer: reward training by evolution strategies from Python, the way TRL's GRPOTrainer is written:

    trainer = ESTrainer(model=model, reward_funcs=[f, g], args=ESConfig(output_dir=..., max_steps=...,
                        reward_weights=[1.0, 0.1]), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

It drives the same engine as `scripts/train.py --estimator es` (ZooTrainer, EvolutionStrategies): the
command line names its model, prompts and rewards, ESTrainer hands over the objects, and nothing else differs, so the
two runs are bitwise equal for equal settings (tested). An hf_zoo_rnn model takes the batched population path; any
other transformers causal LM trains member by member through its own `generate`.
"""

import copy
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from ..config_files import ConfigFileError
from ..estimators import RunArguments
from ..zo import ZOConfig
from .arguments import DataArguments, ModelArguments, TrainArguments, check_choices
from .es_config import ESConfig, ESConfigError, plain
from .events import TrainingEvents
from .trainer import ZooTrainer

logger = logging.getLogger(__name__)


class CallbackEvents(TrainingEvents):
    """The loop's events as transformers' TrainerCallback calls (on_step_end, on_log, on_save, on_train_end), with a
    TrainerState that tracks the run; a callback's control.should_training_stop stops it."""

    def __init__(self, trainer: "ESTrainer"):
        self.trainer = trainer
        self.state = TrainerState()  # the run's own, from train_begin on
        self.control = TrainerControl()
        self.handler = CallbackHandler(trainer.callbacks, trainer.model, trainer.processing_class, None, None)

    def train_begin(self, engine: ZooTrainer) -> None:
        self.state = self.trainer.state = engine.trainer_state  # what reward functions get too
        self.control = self.handler.on_train_begin(self.trainer.args, self.state, self.control)

    def step_end(self, step: int, metrics: dict) -> bool:
        self.control = self.handler.on_step_end(self.trainer.args, self.state, self.control)
        return self.control.should_training_stop

    def logged(self, record: dict) -> bool:
        logs = {key: value for key, value in record.items() if key != "step"}
        self.state.log_history.append({**logs, "step": record["step"]})
        self.control = self.handler.on_log(self.trainer.args, self.state, self.control, logs=logs)
        if self.trainer.args.log_completions:
            self.trainer.print_completions()
        return self.control.should_training_stop

    def saved(self, folder: Path) -> None:
        self.control = self.handler.on_save(self.trainer.args, self.state, self.control)

    def train_end(self, final: dict) -> None:
        self.control = self.handler.on_train_end(self.trainer.args, self.state, self.control)


class ESTrainer:
    """Evolution strategies on rewards, with GRPOTrainer's constructor:

    model: a Hub id, a local folder or a `PreTrainedModel` (an hf_zoo_rnn model generates its population as one
        batch; any other causal LM member by member).
    reward_funcs: a callable or a list, called as TRL calls them: (prompts, completions, completion_ids,
        trainer_state, **other dataset columns) -> one float (or None: not applicable) per completion.
    args: an ESConfig.
    train_dataset / eval_dataset: a `datasets.Dataset` or `IterableDataset` with a "prompt" column (text, or a
        conversation: a list of {"role", "content"} messages, rendered by the tokenizer's chat template); every
        other column reaches the reward functions. The evaluation reports the greedy model's mean reward on it.
    processing_class: the tokenizer (default: the model's own).
    callbacks: transformers `TrainerCallback`s (on_train_begin, on_step_end, on_log, on_save, on_train_end).
    """

    def __init__(
        self,
        model,
        reward_funcs,
        args: ESConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
    ):
        self.args = args if args is not None else ESConfig(output_dir="es_output")
        if not isinstance(self.args, ESConfig):
            raise ESConfigError(f"ESTrainer takes an ESConfig as args, got {type(self.args).__name__}")
        self.model_name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "a model object"
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model)
        if self.args.bf16:  # no gradients to keep in fp32: the members run, and the update writes, bf16 weights
            model = model.to(torch.bfloat16)
        if not isinstance(model, PreTrainedModel):
            raise ESConfigError(f"ESTrainer's model must be a Hub id, a folder or a PreTrainedModel, got {model!r}")
        self.model = model
        self.processing_class = processing_class or AutoTokenizer.from_pretrained(model.name_or_path)
        if self.processing_class.pad_token_id is None:  # generation pads rows: the end token serves, as in TRL
            self.processing_class.pad_token = self.processing_class.eos_token
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        if not self.reward_funcs or not all(callable(f) for f in self.reward_funcs):
            raise ESConfigError("reward_funcs must be a callable or a non-empty list of callables")
        weights = self.args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ESConfigError(
                f"reward_weights has {len(weights)} weights for {len(self.reward_funcs)} reward functions"
            )
        if train_dataset is None:
            raise ESConfigError("ESTrainer needs a train_dataset with a 'prompt' column")
        held_out = None if eval_dataset is None else self.prompt_rows(eval_dataset, "eval_dataset")
        self.rows = {"train": self.prompt_rows(train_dataset, "train_dataset"), "validation": held_out}
        self.callbacks = [DefaultFlowCallback, *(callbacks or [])]
        self.engine: ZooTrainer | None = None

    # -- prompts ------------------------------------------------------------------------------------------------------

    def prompt_rows(self, dataset, name: str) -> list[dict]:
        """The dataset's rows with the prompt as the text the model continues (a conversation through the chat
        template; its messages stay in `prompt_messages` for the reward functions)."""
        rows = []
        for index, row in enumerate(dataset):
            if "prompt" not in row:
                raise ESConfigError(f"{name} row {index} has no 'prompt' column (columns: {sorted(row)})")
            prompt = row["prompt"]
            if isinstance(prompt, list):
                if getattr(self.processing_class, "chat_template", None) is None:
                    raise ESConfigError(
                        f"{name} holds conversations (row {index}) but the tokenizer has no chat template: "
                        "set processing_class.chat_template or give plain-text prompts"
                    )
                text = self.processing_class.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                row = {**row, "prompt": text, "prompt_messages": prompt}
            elif not isinstance(prompt, str):
                raise ESConfigError(f"{name} row {index}: 'prompt' must be text or a list of messages, got {prompt!r}")
            rows.append(row)
        if not rows:
            raise ESConfigError(f"{name} has no rows")
        return rows

    def rewards(self) -> list:
        """The reward functions, conversational ones given TRL's message lists back."""
        if not any("prompt_messages" in row for row in self.rows["train"]):
            return self.reward_funcs
        return [conversational(f) for f in self.reward_funcs]

    # -- the run --------------------------------------------------------------------------------------------------------

    def arguments(self, resume_from_checkpoint) -> RunArguments:
        """The engine's arguments for this config: what `scripts/train.py --estimator es` would be given."""
        config = self.args
        model_args = ModelArguments(init_from=self.model_name, dtype="bfloat16" if config.bf16 else "float32")
        fingerprint = hashlib.sha256(json.dumps([r["prompt"] for r in self.rows["train"]]).encode()).hexdigest()[:12]
        prompts = f"train_dataset ({len(self.rows['train'])} prompts, {fingerprint})"
        data_args = DataArguments(prompts=prompts, batch_size=config.per_device_train_batch_size)
        trackers = [config.report_to] if isinstance(config.report_to, str) else config.report_to
        trackers = [name for name in trackers if name not in ("none", "all")]
        evaluates, saves = plain(config.eval_strategy) == "steps", plain(config.save_strategy) == "steps"
        train_args = TrainArguments(
            estimator="es",
            output_dir=config.output_dir,
            overwrite_output_dir=config.overwrite_output_dir,
            resume_from_checkpoint=resume_from_checkpoint,
            seed=config.seed,
            max_steps=self.max_steps(),
            logging_steps=self.steps(config.logging_steps),
            eval_steps=self.steps(config.eval_steps or config.logging_steps) if evaluates else 0,
            save_steps=self.steps(config.save_steps) if saves else 0,
            save_total_limit=config.save_total_limit or 2,
            log_with=",".join(trackers) or "none",
            rewards=",".join(getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs),
            reward_weights=",".join(str(w) for w in config.reward_weights or []),
            reward_timeout=config.reward_timeout,
            reward_samples=config.num_generations,
            max_new_tokens=config.max_completion_length,
            do_sample=not config.greedy or config.num_generations > 1,
            temperature=config.temperature,
            anchor_decay=config.anchor_decay,
            push_to_hub=config.push_to_hub,
            hub_model_id=config.hub_model_id,
            hub_token=config.hub_token,
            hub_private=bool(config.hub_private_repo),
        )
        zo_config = ZOConfig(
            num_probes=config.population_size // 2,
            eps=config.sigma,
            lr=config.learning_rate,
            update_rule=config.update_rule,
            loss_shaping=config.fitness_shaping,
            lr_schedule=plain(config.lr_scheduler_type),
            warmup_steps=self.steps(config.warmup_steps, floor=0),
            total_steps=self.max_steps(),
            perturbation="full" if config.rank is None else "lowrank",
            perturbation_rank=config.rank or 1,
            seed=config.seed,
        )
        args = RunArguments(model_args, data_args, train_args, zo_config)
        try:
            check_choices(args)
        except ConfigFileError as error:
            raise ESConfigError(str(error)) from None
        return args

    def steps(self, value: float, floor: int = 1) -> int:
        """A step count as TrainingArguments reads one: below 1, a ratio of max_steps."""
        count = math.ceil(value * self.max_steps()) if 0 < value < 1 else int(value)
        return max(floor, count)

    def max_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = math.ceil(len(self.rows["train"]) / self.args.per_device_train_batch_size)
        return max(1, math.ceil(self.args.num_train_epochs * per_epoch))

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Train; `resume_from_checkpoint` a checkpoint folder, or True for the newest in output_dir. Returns the
        final evaluation."""
        resume = "latest" if resume_from_checkpoint is True else resume_from_checkpoint or None
        events = CallbackEvents(self)
        # the starting weights, frozen (what the anchor decays toward), taken before a resume loads the checkpoint
        start = copy.deepcopy(self.model) if self.args.anchor_decay else None
        self.engine = ZooTrainer(
            *self.arguments(resume),
            model=self.model,
            tokenizer=self.processing_class,
            reward_functions=self.rewards(),
            start_model=start,
            prompt_rows=self.rows,
            events=events,
            use_cpu=self.args.use_cpu,
        )
        final = self.engine.train()
        self.model = self.engine.accelerator.unwrap_model(self.engine.model)
        return final

    def print_completions(self) -> None:
        """A few of the newest step's completions (the first member's), as TRL's log_completions prints them."""
        estimator = self.engine.estimator if self.engine is not None else None
        samples = getattr(estimator, "samples", [])[: self.args.num_completions_to_print or None]
        for prompt, completion in samples:
            logger.warning("%r -> %r", prompt, completion)

    def save_model(self, output_dir: str | None = None) -> None:
        """A `from_pretrained` folder: the model, its tokenizer and model card (the run's output_dir already holds
        them after `train`)."""
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.processing_class.save_pretrained(folder)
        if self.engine is not None:
            self.engine.write_report(folder, self.engine.latest_eval())

    def push_to_hub(self, commit_message: str = "End of training", **_) -> str:
        """Upload output_dir (the trained model, tokenizer and card) to args.hub_model_id; returns the commit URL."""
        from huggingface_hub import HfApi

        from ..hub import push_folder

        if not self.args.hub_model_id:
            raise ESConfigError("push_to_hub needs ESConfig(hub_model_id='owner/name')")
        self.save_model()
        api = HfApi(token=self.args.hub_token)
        folder, private = Path(self.args.output_dir), bool(self.args.hub_private_repo)
        ignored = ["checkpoint-*", "*.lock", ".run.lock"]
        return push_folder(api, folder, self.args.hub_model_id, private, commit_message, ignore_patterns=ignored)


def conversational(function):
    """A reward function for conversations: it receives TRL's message lists (the prompt's messages, and each
    completion as [{"role": "assistant", "content": text}]) instead of text."""

    def reward(prompts, completions, prompt_messages, **columns):
        messages = [[{"role": "assistant", "content": text}] for text in completions]
        return function(prompts=prompt_messages, completions=messages, **columns)

    reward.__name__ = getattr(function, "__name__", type(function).__name__)
    return reward
