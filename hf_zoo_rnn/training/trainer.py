"""ZooTrainer: the training loop behind `accelerate launch scripts/train.py`.

The run's estimator (hf_zoo_rnn/estimators: one_step, readout, probes, hybrid, es or bptt, chosen by `--estimator`)
is held as `self.estimator`; the loop calls `train_step(batch)` and never asks which it holds. Every process holds the
full model; zero-order estimators exchange only loss scalars, and a parameter checksum compared every
`checksum_steps` proves the replicas agree. What trains is assembled by assembly.py (tokenizer, model) and streams.py
(data); files, resume, checkpoints and pushes are persistence.py's; evaluation is the objective's (evaluation.py).
"""

import logging
import math
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import TrainerState

from ..data import BUILTIN_KJV
from ..estimators import ESTIMATORS, EstimatorInputs, RunArguments, StepReport, build_estimator
from ..rewards import RewardCall, RewardInterrupted
from ..zo import ZOConfig
from .arguments import DataArguments, ModelArguments, TrainArguments
from .assembly import load_model, load_tokenizer
from .checkpoints import CheckpointError, latest_checkpoint
from .evaluation import run_evaluation
from .events import TrainingEvents
from .persistence import RunStorage
from .preemption import Preempted, StopRequests
from .replicas import check_replicas
from .reporting import (
    RunSummary,
    append_record,
    flat_config,
    hardware,
    peak_memory_mb,
    plot_loss_curve,
    write_model_card,
)
from .streams import BatchSource, data_descriptions, data_identity, make_stream

logger = logging.getLogger(__name__)


class TrainingStalledError(RuntimeError):
    """Every step for max_skipped_steps in a row was skipped: training makes no progress."""


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
        start_model=None,
        prompt_rows: dict[str, list[dict] | None] | None = None,
        events: TrainingEvents | None = None,
        use_cpu: bool = False,
    ):
        self.args = RunArguments(model_args, data_args, train_args, zo_config)
        self.model_args, self.data_args, self.train_args, self.zo_config = self.args
        self.given_model, self.given_tokenizer, self.reward_functions = model, tokenizer, reward_functions
        self.start_model = start_model  # the given model's starting weights, frozen (ESTrainer's anchor)
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
        self.parameter_roles: dict[str, str] = {}  # parameter name -> how it is trained (for the model card)
        self.skipped_in_a_row = 0

    # -- set-up ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        set_seed(self.train_args.seed)
        self.storage = RunStorage(self.accelerator, self.train_args)
        self.storage.claim()
        self.resume_dir = self.storage.resume_folder(
            {"data": data_identity(self.data_args), "run": self.run_identity()}
        )
        self.tokenizer = load_tokenizer(
            self.args,
            self.accelerator,
            self.output_dir,
            resume_dir=self.resume_dir,
            per_machine=self.storage.per_machine,
            given=self.given_tokenizer,
        )
        model = load_model(
            self.model_args, self.tokenizer, self.accelerator.device, resume_dir=self.resume_dir, given=self.given_model
        )
        self.batches = BatchSource(lambda: self.make_stream(validation=False), self.data_args, self.accelerator.device)
        inputs = EstimatorInputs(
            self.args,
            model,
            self.tokenizer,
            self.accelerator,
            self.batches.next_batch,
            reward_functions=self.reward_functions,
            start_model=None if self.start_model is None else self.start_model.to(self.accelerator.device),
            trainer_state=self.trainer_state,
        )
        built = build_estimator(inputs)
        self.estimator, self.model, self.parameter_roles = built.estimator, built.model, built.parameter_roles
        self.scores_rewards = built.objective is not None  # its steps call reward functions, which a signal abandons
        if self.resume_dir is not None:
            self.load_training_state(self.resume_dir)
        self.trainer_state.global_step = self.counters["step"]
        self.training_data, self.validation_data = data_descriptions(self.args, self.train_stream, self.prompt_rows)
        validation_stream = lambda: self.make_stream(validation=True)  # noqa: E731 - a fresh one per evaluation
        self.evaluation = run_evaluation(
            self.args, self.tokenizer, built.objective, validation_stream, self.validation_data
        )
        if self.accelerator.is_main_process:
            logger.warning("training on %s; validating on %s", self.training_data, self.validation_data)

    @property
    def train_stream(self):
        return self.batches.stream

    def run_identity(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint: otherwise it is another run (the
        architecture is checked against the checkpoint's weights, the data by data_identity)."""
        return {"seed": self.train_args.seed, "estimator": self.train_args.estimator}

    def make_stream(self, validation: bool):
        return make_stream(
            self.data_args,
            objective=self.train_args.objective,
            seed=self.train_args.seed,
            tokenizer=self.tokenizer,
            validation=validation,
            rank=self.rank,
            world_size=self.world_size,
            prompt_rows=self.prompt_rows,
        )

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
            self.accelerator.init_trackers("hf_zoo_rnn", config=flat_config(self.args, self.world_size))
        progress = tqdm(
            total=args.max_steps, initial=self.counters["step"], disable=not self.accelerator.is_local_main_process
        )
        started, training_seconds = time.perf_counter(), 0.0
        while self.counters["step"] < args.max_steps:
            if args.max_train_seconds is not None and training_seconds >= args.max_train_seconds:
                break
            # where to read this step's batch again, were it abandoned (only a reward call can be interrupted)
            position = self.batches.state_dict() if self.scores_rewards else None
            batch = self.batches.next_batch()
            step_started = time.perf_counter()
            RewardCall.interruptible = True  # only a step can be abandoned (not an evaluation, not a save)
            try:
                report = self.estimator.train_step(batch)
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
            metrics = report.logged()
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
            self.check_progress(report)
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
            if report.probes:
                rates["probes_s"] = f"{report.probes / metrics['step_seconds']:.1f}"
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

    def check_progress(self, report: StepReport) -> None:
        """Stop a run whose steps have all been skipped (non-finite losses) for max_skipped_steps in a row, before
        it saves a broken model or prunes a good checkpoint."""
        skipped = report.skipped or not math.isfinite(report.loss)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = self.train_args.max_skipped_steps
        if limit and self.skipped_in_a_row >= limit:
            if report.skipped and report.probes:
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
        return self.evaluation(self.accelerator.unwrap_model(self.model))

    def check_replicas(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        self.counters["comm_bytes"] += check_replicas(self.accelerator, model, self.counters["step"])

    def log(self, metrics: dict) -> bool:
        """Record the metrics (trackers, metrics.jsonl); True when a listener asks the run to stop."""
        record = {"step": self.counters["step"], **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        self.history.append(record)
        self.accelerator.log(record, step=self.counters["step"])
        if self.accelerator.is_main_process:
            append_record(self.output_dir / "metrics.jsonl", record)
        return self.events.logged(record)

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        trainer_state = {
            "counters": self.counters,
            "history": self.history,
            "world_size": self.world_size,
            "data": data_identity(self.data_args),
            "run": self.run_identity(),
        }
        process_state = {"data": self.batches.state_dict(), "rng": torch.get_rng_state()}
        folder = self.storage.save_checkpoint(
            self.counters["step"],
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            process_state=process_state,
            step_state=self.estimator.state_dict(),
            trainer_state=trainer_state,
            write_report=lambda folder: self.write_report(folder, self.latest_eval()),
        )
        self.events.saved(folder)
        return folder

    def load_training_state(self, folder: Path) -> None:
        state, process_state, step_state = self.storage.load_checkpoint(folder, self.data_args.per_rank_batches)
        self.counters, self.history = state["counters"], state["history"]
        self.batches.load_state_dict(process_state["data"])
        try:
            torch.set_rng_state(process_state["rng"])
            self.estimator.load_state_dict(step_state)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{folder}: the estimator's state does not fit this run: {error}") from error

    def save_final_model(self, final_metrics: dict) -> None:
        model = self.accelerator.unwrap_model(self.model)
        report = lambda folder: self.write_report(folder, final_metrics)  # noqa: E731
        self.storage.publish_final(model, self.tokenizer, write_report=report, step=self.counters["step"])

    def write_report(self, folder: Path, metrics: dict) -> None:
        """Loss curve and model card: every checkpoint folder carries its own."""
        plot_loss_curve(self.history, folder / "loss_curve.png", self.estimator.train_label)
        write_model_card(folder, self.accelerator.unwrap_model(self.model), self.run_summary(), metrics)

    def run_summary(self) -> RunSummary:
        spec, data = ESTIMATORS[self.train_args.estimator], self.data_args
        return RunSummary(
            method=spec.describe(self.args),
            estimator_rows=spec.card_rows(self.args),
            parameter_roles=self.parameter_roles,
            training_data=self.training_data,
            validation_data=self.validation_data,
            dataset=None if data.task or data.dataset == BUILTIN_KJV else data.dataset,
            counters=self.counters,
            world_size=self.world_size,
            hardware=hardware(self.accelerator.device),
            peak_memory_mb=max((r.get("peak_memory_mb", 0) for r in self.history), default=0),
            unknown_tokens=getattr(self.train_stream, "unknown_tokens", 0),
        )

    def latest_eval(self) -> dict:
        return next(
            ({k: v for k, v in r.items() if k.startswith("eval_")} for r in reversed(self.history) if "eval_loss" in r),
            {},
        )
