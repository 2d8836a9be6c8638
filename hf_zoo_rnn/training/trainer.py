"""ZooTrainer: the training loop behind `accelerate launch scripts/train.py`.

The run's estimator (hf_zoo_rnn/estimators: probes, exact local gradients, their hybrid, BPTT, or evolution
strategies on rewards) is one `TrainingStep`; the loop calls `step(batch)` and never asks which it holds. Every
process holds the full model; zero-order estimators exchange only loss scalars, and a parameter checksum compared
every `checksum_steps` proves the replicas agree. Files, resume, checkpoints and pushes are persistence.py's; what
trains and validates is streams.py's.
"""

import copy
import dataclasses
import hashlib
import json
import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState

from ..config_files import load_model_config, model_config_from_dict
from ..configuration_zoo_rnn import ZooRnnConfig
from ..data import BUILTIN_KJV, PackedStream, build_tokenizer, open_text_source, text_pieces
from ..data.prompts import PromptStream
from ..estimators import StepReport, build_step
from ..modeling_zoo_rnn import ZooRnnForCausalLM
from ..rewards import RewardCall, RewardInterrupted, RewardObjective
from ..zo import ZOConfig
from .arguments import DataArguments, ModelArguments, TrainArguments
from .checkpoints import CheckpointError, latest_checkpoint
from .evaluation import language_model_metrics, task_metrics
from .persistence import RunStorage
from .preemption import Preempted, StopRequests
from .reporting import plot_loss_curve, write_model_card
from .run_folder import OutputDirError
from .streams import BatchSource, data_descriptions, make_stream, text_source

logger = logging.getLogger(__name__)

DEFAULT_MODEL = {"cell": "lstm", "embedding_size": 128, "num_heads": 4, "head_dim": 64, "num_hidden_layers": 1}


class ReplicaMismatchError(RuntimeError):
    """Processes hold different weights: the run cannot continue."""


class TrainingStalledError(RuntimeError):
    """Every step for max_skipped_steps in a row was skipped: training makes no progress."""


class TrainingEvents:
    """What the loop tells whoever listens (ESTrainer bridges these to transformers' TrainerCallbacks). A hook that
    returns True asks the loop to stop after this step, as a callback's `control.should_training_stop` does."""

    def train_begin(self, trainer: "ZooTrainer") -> None:
        """The run is set up (model, step and any resumed state in place); training starts."""

    def step_end(self, step: int, metrics: dict) -> bool:
        return False

    def logged(self, record: dict) -> bool:
        return False

    def saved(self, folder: Path) -> None:
        pass

    def train_end(self, final: dict) -> None:
        pass


class ZooTrainer:
    """The run of `accelerate launch scripts/train.py`, from its parsed arguments. ESTrainer drives the same run from
    Python objects: a model, a tokenizer, reward callables and prompt rows replace their names in the arguments."""

    def __init__(
        self,
        model_args: ModelArguments,
        data_args: DataArguments,
        train_args: TrainArguments,
        zo_config: ZOConfig,
        *,
        model=None,
        tokenizer=None,
        reward_functions: list | None = None,
        prompt_rows: dict[str, list[dict] | None] | None = None,
        events: TrainingEvents | None = None,
        use_cpu: bool = False,
    ):
        self.model_args, self.data_args, self.train_args, self.zo_config = model_args, data_args, train_args, zo_config
        self.given_model, self.given_tokenizer, self.reward_functions = model, tokenizer, reward_functions
        self.prompt_rows = prompt_rows  # {"train": rows, "validation": rows or None} instead of --prompts
        self.events = events or TrainingEvents()
        self.output_dir = Path(train_args.output_dir)
        self.trackers = [] if train_args.log_with == "none" else train_args.log_with.split(",")
        self.accelerator = Accelerator(
            cpu=use_cpu or not torch.cuda.is_available(),
            log_with=self.trackers or None,
            project_dir=str(self.output_dir),
        )
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.history: list[dict] = []
        self.counters = {"step": 0, "forward_passes": 0, "tokens": 0, "comm_bytes": 0}
        # transformers' view of the run's progress: what reward functions get as `trainer_state`, as in TRL
        self.trainer_state = TrainerState(max_steps=train_args.max_steps, logging_steps=train_args.logging_steps)
        self.storage: RunStorage | None = None  # set up by setup(): it talks to the other processes
        self.reward: RewardObjective | None = None  # objective=reward: what evaluation scores too
        self.parameter_roles: dict[str, str] = {}  # parameter name -> how it is trained (for the model card)
        self.skipped_in_a_row = 0
        self.warned_no_validation = False

    # -- set-up ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        set_seed(self.train_args.seed)
        self.storage = RunStorage(self.accelerator, self.train_args)
        self.storage.claim()
        self.resume_dir = self.storage.resume_folder({"data": self.data_identity(), "run": self.run_identity()})
        self.tokenizer = self.load_tokenizer()
        start = None  # a given model's starting weights, frozen (what an anchor decays toward), before a resume
        if self.given_model is not None and self.train_args.anchor_decay:
            start = copy.deepcopy(self.given_model).to(self.accelerator.device)
        self.model = self.load_model()
        self.batches = BatchSource(lambda: self.make_stream(validation=False), self.data_args, self.accelerator.device)
        built = build_step(self.model, self.model_args, self.data_args, self.train_args, self.zo_config,
                           self.accelerator, self.batches.next_batch, self.tokenizer,
                           reward_functions=self.reward_functions, start_model=start)  # fmt: skip
        self.step, self.model, self.parameter_roles, self.reward = (
            built.step,
            built.model,
            built.parameter_roles,
            built.objective,
        )
        if self.resume_dir is not None:
            self.load_training_state(self.resume_dir)
        self.trainer_state.global_step = self.counters["step"]
        if self.reward is not None:
            self.reward.trainer_state = self.trainer_state
        self.training_data, self.validation_data = data_descriptions(
            self.data_args, self.train_args.objective, self.train_args.rewards, self.model_args.init_from,
            self.batches.stream,
        )  # fmt: skip
        if self.prompt_rows is not None:  # ESTrainer's datasets: validation is its eval_dataset, if any
            held_out = self.prompt_rows["validation"]
            self.validation_data = (
                f"eval_dataset ({len(held_out)} prompts): their greedy completions' rewards" if held_out else "none"
            )
        if self.accelerator.is_main_process:
            logger.warning("training on %s; validating on %s", self.training_data, self.validation_data)

    @property
    def train_stream(self):
        return self.batches.stream

    def data_identity(self) -> dict:
        """What a checkpoint's data position and tokenizer belong to: resuming on anything else cannot continue."""
        data = self.data_args
        keys = ("dataset", "task", "prompts", "text_column", "document_column", "tokenizer", "tokenizer_vocab_size")
        identity = {key: getattr(data, key) for key in keys}
        if not data.task and data.dataset != BUILTIN_KJV:  # what is held out decides which rows train
            identity["held_out_fraction"] = 0 if data.validation_dataset else data.validation_fraction
        return identity

    def run_identity(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint: otherwise it is another run (the
        architecture is checked against the checkpoint's weights, the data by data_identity)."""
        return {"seed": self.train_args.seed, "optimizer": self.train_args.optimizer}

    def load_tokenizer(self):
        if self.given_tokenizer is not None and self.resume_dir is None:
            return self.given_tokenizer
        source = self.resume_dir or self.model_args.init_from
        if source is not None:
            return AutoTokenizer.from_pretrained(source)
        data = self.data_args
        kind = "char" if data.task and data.tokenizer == "bpe" else data.tokenizer  # tasks are character level
        tokenizer_dir = self.output_dir / "tokenizer"
        files = None
        if self.accelerator.is_main_process:  # trains it once; the others load what it saved
            texts = () if kind != "bpe" else text_pieces(text_source(self.data_args, validation=False))
            tokenizer = build_tokenizer(kind, texts, data.tokenizer_vocab_size, data.tokenizer_sample_chars)
            files = {path.name: path.read_bytes() for path in map(Path, tokenizer.save_pretrained(tokenizer_dir))}
        if self.storage.per_machine:  # the other machines cannot read the main process's disk: send them the files
            files = broadcast_object_list([files])[0]
            if self.accelerator.is_local_main_process and not self.accelerator.is_main_process:
                tokenizer_dir.mkdir(parents=True, exist_ok=True)
                for name, content in files.items():
                    (tokenizer_dir / name).write_bytes(content)
        self.accelerator.wait_for_everyone()
        return AutoTokenizer.from_pretrained(tokenizer_dir)

    def model_config(self) -> ZooRnnConfig:
        values = dict(DEFAULT_MODEL)
        source = "the default model"
        if self.model_args.model_config:
            config = load_model_config(self.model_args.model_config)
            values, source = config.to_diff_dict(), self.model_args.model_config
            values.pop("model_type", None)
            values.pop("transformers_version", None)
        values.update(
            vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.eos_token_id,
        )
        return model_config_from_dict(values, source)

    def load_model(self) -> ZooRnnForCausalLM:
        if self.given_model is not None:  # trained as it is, the user's object; a resume loads its checkpoint into it
            model = self.given_model
            if self.resume_dir is not None:
                model.load_state_dict(AutoModelForCausalLM.from_pretrained(self.resume_dir).state_dict())
            return model.to(self.accelerator.device)
        name = self.model_args.dtype
        if name == "auto":  # bf16 halves GPU memory; on CPU bf16 matmuls are ~2x slower than fp32
            name = "bfloat16" if self.accelerator.device.type == "cuda" else "float32"
        dtype = getattr(torch, name)
        # --model_config beside --init_from is not ignored: the loaded model must be that architecture
        init_only = self.model_args.init_from is not None and not self.model_args.model_config
        expected = None if init_only else self.model_config()
        source = self.resume_dir or self.model_args.init_from
        if source is not None:
            try:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            except (OSError, ValueError, RuntimeError) as error:
                raise CheckpointError(f"cannot load the model from {source}: {error}") from error
            if len(self.tokenizer) != model.config.vocab_size:
                raise CheckpointError(
                    f"{source}: tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
                )
            if expected is not None:
                check_same_architecture(expected, model.config, source)
        else:
            model = ZooRnnForCausalLM(expected).to(dtype)  # every process builds it from the same seed
        return model.to(self.accelerator.device)

    def make_stream(self, validation: bool):
        if self.prompt_rows is not None:  # prompts given as rows (ESTrainer's datasets), not named by --prompts
            rows = self.prompt_rows["validation" if validation else "train"]
            split = "validation" if validation else "train"
            if rows is None:
                return None
            return PromptStream(self.data_args.prompts, split, self.data_args.batch_size, self.train_args.seed,
                                rows=rows)  # fmt: skip
        return make_stream(self.data_args, self.train_args.objective, self.train_args.seed, self.tokenizer, validation,
                           self.rank, self.world_size)  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Set up, train, evaluate and save; a SIGTERM or SIGINT saves a checkpoint and raises Preempted."""
        stop_requests = StopRequests(interrupt_rewards=self.world_size == 1)
        stop_requests.install()
        try:
            return self.run_training(stop_requests)
        finally:
            stop_requests.uninstall()
            if self.storage is not None:  # the output folder's lock goes with the run, not with this object
                self.storage.release()

    def run_training(self, stop_requests: StopRequests) -> dict:
        self.setup()
        self.events.train_begin(self)
        args = self.train_args
        if self.accelerator.is_main_process or self.storage.writes_shared:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.trackers:
            self.accelerator.init_trackers("hf_zoo_rnn", config=flat_config(self))
        progress = tqdm(
            total=args.max_steps, initial=self.counters["step"], disable=not self.accelerator.is_local_main_process
        )
        started, training_seconds = time.perf_counter(), 0.0
        while self.counters["step"] < args.max_steps:
            if args.max_train_seconds is not None and training_seconds >= args.max_train_seconds:
                break
            position = self.batches.state_dict() if self.reward is not None else None
            batch = self.batches.next_batch()
            step_started = time.perf_counter()
            RewardCall.interruptible = True  # only a step can be abandoned (not an evaluation, not a save)
            try:
                report = self.step.step(batch)
            except RewardInterrupted as stop:  # a slow reward: abandon the step, resume reads its prompts again
                self.batches.load_state_dict(position)
                folder = self.save_checkpoint()
                progress.close()
                raise Preempted(
                    stop.signum,
                    f"stopped by {signal.Signals(stop.signum).name} during step {self.counters['step'] + 1}'s rewards: "
                    f"saved {folder}; continue with --resume_from_checkpoint latest",
                ) from None
            finally:
                RewardCall.interruptible = False
            training_seconds += time.perf_counter() - step_started
            step = self.count(report)
            metrics = report.metrics
            metrics.update(
                step_seconds=time.perf_counter() - step_started,
                training_seconds=training_seconds,
                tokens=self.counters["tokens"],
                forward_passes=self.counters["forward_passes"],
                comm_bytes=self.counters["comm_bytes"],
                peak_memory_mb=peak_memory_mb(self.accelerator.device),
            )
            if getattr(self.train_stream, "unknown_tokens", 0):
                metrics["unknown_tokens"] = self.train_stream.unknown_tokens
            self.check_progress(metrics)
            self.maybe_grow_curriculum(metrics["train_loss"])
            if args.checksum_steps and step % args.checksum_steps == 0:
                self.check_replicas()
            evaluated = bool(args.eval_steps) and step % args.eval_steps == 0
            if evaluated:
                metrics.update(self.evaluate())
            reached = args.stop_at_train_loss is not None and metrics["train_loss"] < args.stop_at_train_loss
            if step % args.logging_steps == 0 or step == args.max_steps or evaluated or reached:
                reached = self.log(metrics) or reached
            reached = self.events.step_end(step, metrics) or reached
            saved = args.save_steps and step % args.save_steps == 0 and step < args.max_steps
            if saved:
                self.save_checkpoint()
            if signum := stop_requests.requested(self.accelerator):
                folder = self.output_dir / f"checkpoint-{step}" if saved else self.save_checkpoint()
                progress.close()
                raise Preempted(
                    signum,
                    f"stopped by {signal.Signals(signum).name} after step {step}: saved {folder}; continue with "
                    "--resume_from_checkpoint latest",
                )
            progress.update(1)
            rates = {"tok_s": f"{report.tokens / metrics['step_seconds']:.0f}"}
            if self.step.probes:
                rates["probes_s"] = f"{self.step.probes / metrics['step_seconds']:.1f}"
            progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", **rates)
            if reached:
                break
        progress.close()
        final = self.evaluate()
        final["train_seconds"] = time.perf_counter() - started
        final["training_seconds"] = training_seconds
        self.log({**final, "step": self.counters["step"]})
        self.check_replicas()
        self.save_checkpoint()
        self.save_final_model(final)
        self.events.train_end(final)
        return final  # the script calls accelerator.end_training(): it also tears down the process group

    def count(self, report: StepReport) -> int:
        """The one place the run's counters grow; returns the new step number."""
        self.counters["step"] += 1
        self.trainer_state.global_step = self.counters["step"]
        self.counters["forward_passes"] += report.forward_passes
        self.counters["tokens"] += report.tokens
        self.counters["comm_bytes"] += report.comm_bytes
        return self.counters["step"]

    def check_progress(self, metrics: dict) -> None:
        """Stop a run whose steps have all been skipped (non-finite losses) for max_skipped_steps in a row, before
        it saves a broken model or prunes a good checkpoint."""
        skipped = bool(metrics.get("skipped_step")) or not math.isfinite(metrics["train_loss"])
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = self.train_args.max_skipped_steps
        if limit and self.skipped_in_a_row >= limit:
            if metrics.get("skipped_step") and self.step.probes:
                cause = "every probe's loss was NaN or infinite"
            else:
                cause = "the loss was NaN or infinite"
            raise TrainingStalledError(
                f"step {self.counters['step']}: {self.skipped_in_a_row} steps in a row were skipped ({cause}); "
                f"stopping without saving. The newest checkpoint that verifies is "
                f"{latest_checkpoint(self.output_dir) or 'none'}; lower the learning rate or check the data"
            )

    def maybe_grow_curriculum(self, train_loss: float) -> None:
        data = self.data_args
        if data.task and data.curriculum_threshold is not None and train_loss < data.curriculum_threshold:
            self.train_stream.max_train_length = min(self.train_stream.max_train_length + 1, data.curriculum_max_length)

    # -- evaluation, replicas, logging ------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        model = self.accelerator.unwrap_model(self.model)
        if self.reward is not None:
            return self.evaluate_rewards(model)
        was_training = model.training
        model.eval()
        results = language_model_metrics(model, self.make_stream(validation=True), self.data_args.eval_batches)
        if not results and not self.warned_no_validation:
            self.warned_no_validation = True
            logger.warning(
                "no validation loss: %s holds less than one batch of %d x %d tokens (pass --validation_dataset, "
                "or raise --validation_fraction)",
                self.validation_data,
                self.data_args.batch_size,
                self.data_args.context_length,
            )
        if self.data_args.task:
            results.update(
                task_metrics(
                    model,
                    self.tokenizer,
                    self.data_args.task,
                    self.data_args.task_max_length,
                    self.train_args.seed + 1,
                    self.data_args.task_eval_examples,
                )
            )
        model.train(was_training)
        return results

    def evaluate_rewards(self, model) -> dict:
        """The mean reward of greedy completions of held-out prompts (for a task: out of distribution, and in
        distribution on fresh prompts of the training lengths), and for KJV prompts the validation loss."""
        data, args = self.data_args, self.train_args
        greedy = RewardObjective(self.tokenizer, self.reward.functions, self.reward.weights, args.max_new_tokens)
        greedy.trainer_state, greedy.timeout = self.trainer_state, self.reward.timeout
        streams = {"eval_reward": self.make_stream(validation=True)}
        if streams["eval_reward"] is None:  # ESTrainer without an eval_dataset
            return {}
        if data.prompts in ("add", "reverse"):
            streams["eval_reward_in_distribution"] = PromptStream(data.prompts, "train", data.batch_size,
                                                                  self.train_args.seed + 1, max_task_length=data.task_max_length)  # fmt: skip
        results = {}
        for name, stream in streams.items():
            rewards = []
            for index in range(data.eval_batches):
                batch = stream.batch(index)
                rewards += greedy.prompt_rewards(model, batch.prompts, batch.columns)
            finite = [r for r in rewards if not math.isnan(r)]
            results[name] = sum(finite) / len(finite) if finite else math.nan
        if data.prompts == BUILTIN_KJV:
            text = PackedStream(open_text_source(BUILTIN_KJV, "validation"), self.tokenizer, data.context_length,
                                data.batch_size)  # fmt: skip
            results.update(language_model_metrics(model, text, data.eval_batches))
        return results

    def check_replicas(self) -> None:
        if self.world_size == 1:
            return
        digest = parameter_checksum(self.accelerator.unwrap_model(self.model))
        mine = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64, device=self.accelerator.device)
        everyone = self.accelerator.gather(mine)
        self.counters["comm_bytes"] += 8 * self.world_size
        if not bool((everyone == everyone[0]).all()):
            raise ReplicaMismatchError(
                f"step {self.counters['step']}: processes hold different weights (checksums {everyone.tolist()}); stopping"
            )

    def log(self, metrics: dict) -> bool:
        """Record the metrics (trackers, metrics.jsonl); True when a listener asks the run to stop."""
        record = {"step": self.counters["step"], **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        self.history.append(record)
        self.accelerator.log(record, step=self.counters["step"])
        if self.accelerator.is_main_process:
            path = self.output_dir / "metrics.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as error:  # a full disk: say so, not a traceback
                raise OutputDirError(f"cannot write {path}: {error.strerror}") from error
        return self.events.logged(record)

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        trainer_state = {
            "counters": self.counters,
            "history": self.history,
            "world_size": self.world_size,
            "data": self.data_identity(),
            "run": self.run_identity(),
        }
        process_state = {"data": self.batches.state_dict(), "rng": torch.get_rng_state()}
        folder = self.storage.save_checkpoint(
            self.counters["step"], self.accelerator.unwrap_model(self.model), self.tokenizer, process_state,
            self.step.state_dict(), trainer_state, lambda folder: self.write_report(folder, self.latest_eval()),
        )  # fmt: skip
        self.events.saved(folder)
        return folder

    def load_training_state(self, folder: Path) -> None:
        state, process_state, step_state = self.storage.load_checkpoint(folder, self.data_args.per_rank_batches)
        self.counters, self.history = state["counters"], state["history"]
        self.batches.load_state_dict(process_state["data"])
        try:
            torch.set_rng_state(process_state["rng"])
            self.step.load_state_dict(step_state)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{folder}: the optimizer state does not fit this run: {error}") from error

    def save_final_model(self, final_metrics: dict) -> None:
        self.storage.publish_final(self.accelerator.unwrap_model(self.model), self.tokenizer,
                                   lambda folder: self.write_report(folder, final_metrics), self.counters["step"])  # fmt: skip

    def write_report(self, folder: Path, metrics: dict) -> None:
        """Loss curve and model card: every checkpoint folder carries its own."""
        plot_loss_curve(self.history, folder / "loss_curve.png", self.step.train_label)
        write_model_card(folder, self.accelerator.unwrap_model(self.model), self, metrics)

    def latest_eval(self) -> dict:
        return next(
            ({k: v for k, v in r.items() if k.startswith("eval_")} for r in reversed(self.history) if "eval_loss" in r),
            {},
        )


def check_same_architecture(expected: ZooRnnConfig, found: ZooRnnConfig, source) -> None:
    fields = (
        "cell",
        "vocab_size",
        "embedding_size",
        "num_heads",
        "head_dim",
        "num_hidden_layers",
        "layer_norm",
        "residual",
    )
    differing = [
        f"{name}: requested {getattr(expected, name)}, checkpoint {getattr(found, name)}"
        for name in fields
        if getattr(expected, name) != getattr(found, name)
    ]
    if differing:
        raise CheckpointError(f"{source} holds a different model than requested ({'; '.join(differing)})")


def parameter_checksum(model: torch.nn.Module) -> bytes:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.digest()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def flat_config(trainer: ZooTrainer) -> dict:
    """Every argument of the run, for the trackers (zero-order settings under their zo_ names)."""
    values = {}
    for prefix, args in (("", trainer.model_args), ("", trainer.data_args), ("", trainer.train_args),
                         ("zo_", trainer.zo_config)):  # fmt: skip
        for key, value in dataclasses.asdict(args).items():
            values[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    values["world_size"] = trainer.world_size
    return values
