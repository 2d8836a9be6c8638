"""ZooTrainer: the training loop behind `accelerate launch scripts/train.py`.

Zero-order (default): every process holds the full model, evaluates its share of the K probes on the same batch
(or its own with per_rank_batches), all-gathers only the 2K loss scalars, and applies the identical update.
No parameter crosses the wire; a parameter checksum compared every `checksum_steps` proves the replicas agree.
With a local gradient (local_gradients.py) the same step also trains some parameters by their exact local
gradient (no backpropagation through time); only with per_rank_batches is that gradient averaged over processes.
BPTT baselines (bptt_sgd / bptt_adamw) train the same model on the same data with truncated backprop.
"""

import dataclasses
import hashlib
import json
import logging
import math
import resource
import signal
import time
import uuid
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from huggingface_hub import HfApi
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config_files import ConfigFileError, load_model_config, model_config_from_dict
from ..configuration_zoo_rnn import ZooRnnConfig
from ..data import BUILTIN_KJV, DataError, PackedStream, TaskStream, build_tokenizer, open_text_source, text_pieces
from ..data.prompts import PromptBatch, PromptStream
from ..hub import RESUME_ONLY, HubPusher, PushFailedError, resolve_hub_checkpoint
from ..modeling_zoo_rnn import IGNORE_INDEX, ZooRnnForCausalLM
from ..rewards import Fluency, RewardError, RewardObjective, load_reward_function, member_seed
from ..zo import StackedLoss, ZOConfig, ZOOptimizer
from .arguments import DataArguments, ModelArguments, TrainArguments
from .checkpoints import (
    CheckpointError,
    checkpoint_problem,
    checkpoints,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    publish_atomically,
    save_state,
    verified_steps,
    write_atomically,
)
from .evaluation import language_model_metrics, task_metrics
from .local_gradients import LocalGradientStep, partition_parameters
from .preemption import Preempted, StopRequests
from .reporting import plot_loss_curve, write_model_card
from .run_folder import OutputDirError, check_fresh_start, claim_output_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = {"cell": "lstm", "embedding_size": 128, "num_heads": 4, "head_dim": 64, "num_hidden_layers": 1}


class ReplicaMismatchError(RuntimeError):
    """Processes hold different weights: the run cannot continue."""


class TrainingStalledError(RuntimeError):
    """Every step for max_skipped_steps in a row was skipped: training makes no progress."""


class ZooTrainer:
    def __init__(
        self, model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments, zo_config: ZOConfig
    ):
        self.model_args, self.data_args, self.train_args, self.zo_config = model_args, data_args, train_args, zo_config
        self.output_dir = Path(train_args.output_dir)
        self.trackers = [] if train_args.log_with == "none" else train_args.log_with.split(",")
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), log_with=self.trackers or None, project_dir=str(self.output_dir)
        )
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_zo = train_args.optimizer == "zo"
        self.history: list[dict] = []
        self.counters = {"step": 0, "forward_passes": 0, "tokens": 0, "comm_bytes": 0}
        self.pusher = self.make_pusher() if train_args.push_to_hub and self.accelerator.is_main_process else None
        self.first_batch = None  # fixed_batch: a fresh stream's first batch, so a resumed run reads the same one
        self.zo: ZOOptimizer | None = None
        self.local: LocalGradientStep | None = None
        self.reward: RewardObjective | None = None  # objective=reward: what a member's loss is
        self.anchor: list[torch.Tensor] = []  # objective=reward with anchor_decay: the starting weights
        self.parameter_roles: dict[str, str] = {}  # parameter name -> how it is trained (for the model card)
        self.skipped_in_a_row = 0
        self.warned_no_validation = False

    # -- set-up ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        set_seed(self.zo_config.seed)
        self.per_machine = self.checkpoint_storage() == "per_machine"
        # who writes the files every process shares (model, tokenizer, optimizer, trainer state)
        self.writes_shared = (
            self.accelerator.is_local_main_process if self.per_machine else self.accelerator.is_main_process
        )
        self.claim_output_dir()
        self.resume_dir = self.resolve_resume()
        self.tokenizer = self.load_tokenizer()
        self.model = self.load_model()
        self.train_stream = self.make_stream(validation=False)
        if self.is_zo:
            self.setup_zero_order()
            if self.train_args.objective == "reward":
                self.setup_reward()
        else:
            self.model.train()
            optimizer_class = torch.optim.SGD if self.train_args.optimizer == "bptt_sgd" else torch.optim.AdamW
            options = {"betas": (0.99, 0.999)} if optimizer_class is torch.optim.AdamW else {}  # the paper's betas
            self.optimizer = optimizer_class(self.model.parameters(), lr=self.train_args.bptt_lr, **options)
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.resume_dir is not None:
            self.load_training_state(self.resume_dir)
        self.train_iterator = iter(self.train_stream)
        self.training_data, self.validation_data = self.data_descriptions()
        if self.accelerator.is_main_process:
            logger.warning("training on %s; validating on %s", self.training_data, self.validation_data)

    def setup_zero_order(self) -> None:
        """The ZO optimiser over its share of the parameters and, with a local gradient, its AdamW half."""
        args, zo_config = self.train_args, self.zo_config
        self.model.eval().requires_grad_(False)
        if zo_config.total_steps is None:  # schedules span the run, as in transformers' Trainer
            zo_config.total_steps = args.max_steps
        try:
            zo_names, local_names = partition_parameters(self.model, args.local_gradient, args.zo_parameters)
        except ValueError as error:
            raise ConfigFileError(str(error)) from error
        if zo_config.num_probes % self.world_size:
            raise ConfigFileError(
                f"num_probes={zo_config.num_probes} is not divisible by the {self.world_size} processes: each "
                "process evaluates an equal share of the probes"
            )
        if zo_config.num_probes and not zo_names:
            raise ConfigFileError(
                f"local_gradient='one_step' (the default) trains every parameter and leaves none to the "
                f"{zo_config.num_probes} probes: pass --local_gradient none for pure zero-order training, "
                "--zo_parameters GLOBS for a hybrid, or --num_probes 0"
            )
        self.parameter_roles = {name: "zero-order" for name in zo_names if zo_config.num_probes}
        self.parameter_roles.update({name: f"{args.local_gradient} gradient" for name in local_names})
        self.zo = ZOOptimizer(self.model, zo_config, zo_names) if zo_config.num_probes else None
        if args.local_gradient != "none":
            reduce = None
            if self.data_args.per_rank_batches and self.world_size > 1:
                reduce = partial(self.accelerator.reduce, reduction="mean")
            surrogate = zo_names if zo_config.guided_by_local_gradient else []
            self.local = LocalGradientStep(
                self.model, args.local_gradient, local_names, surrogate, args, args.max_steps, reduce
            )

    def setup_reward(self) -> None:
        """Training on rewards: the reward functions (fluency scored by a frozen copy of the starting model) and,
        with anchor_decay, the starting weights the update decays toward."""
        args = self.train_args
        functions = []
        for spec in (name.strip() for name in args.rewards.split(",")):
            if spec == "fluency":
                start = AutoModelForCausalLM.from_pretrained(self.model_args.init_from).to(self.accelerator.device)
                functions.append(Fluency(start.eval().requires_grad_(False), self.tokenizer))
            else:
                try:
                    functions.append(load_reward_function(spec))
                except RewardError as error:
                    raise ConfigFileError(str(error)) from None
        weights = [float(w) for w in args.reward_weights.split(",") if w.strip()] or [1.0] * len(functions)
        self.reward = RewardObjective(
            self.tokenizer, functions, weights, args.max_new_tokens, args.do_sample, args.temperature,
            args.reward_samples, args.reward_aggregation,
        )  # fmt: skip
        if args.anchor_decay:
            start = AutoModelForCausalLM.from_pretrained(self.model_args.init_from).to(self.accelerator.device)
            self.anchor = [dict(start.named_parameters())[name].detach() for name in self.zo.names]

    def checkpoint_storage(self) -> str:
        """shared or per_machine; auto asks whether every process sees a file the main process writes into
        output_dir (machines without a shared filesystem do not)."""
        setting = self.train_args.checkpoint_storage
        if setting != "auto" or self.world_size == 1:
            return "shared" if setting == "auto" else setting
        marker = self.output_dir / f".storage-check-{broadcast_object_list([uuid.uuid4().hex])[0]}"
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            marker.touch()
        self.accelerator.wait_for_everyone()
        everyone_sees_it = all(gather_object([marker.exists()]))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            marker.unlink()
        if not everyone_sees_it and self.accelerator.is_main_process:
            logger.warning("%s is not shared by every machine: each machine keeps whole checkpoints", self.output_dir)
        return "shared" if everyone_sees_it else "per_machine"

    def claim_output_dir(self) -> None:
        """The processes that write output_dir lock it for the run; a new run refuses a folder holding another run
        (see run_folder.py). Every process raises the same error, so none waits for the others in vain."""
        problem = None
        if self.writes_shared:
            try:
                self.output_lock = claim_output_dir(self.output_dir)
                if self.train_args.resume_from_checkpoint is None:
                    check_fresh_start(self.output_dir, self.train_args.overwrite_output_dir)
            except OutputDirError as error:
                problem = str(error)
        problems = gather_object([problem]) if self.world_size > 1 else [problem]
        if any(problems):
            raise OutputDirError(next(p for p in problems if p))

    def agreed_checkpoint(self) -> Path | None:
        """With a disk per machine: the newest checkpoint that verifies on every machine."""
        steps = [set(found) for found in gather_object([verified_steps(self.output_dir)])]
        common = set.intersection(*steps)
        return self.output_dir / f"checkpoint-{max(common)}" if common else None

    def resolve_resume(self) -> Path | None:
        choice = self.train_args.resume_from_checkpoint
        if choice is None:
            return None
        if choice == "latest":
            path = self.agreed_checkpoint() if self.per_machine else latest_checkpoint(self.output_dir)
        else:
            with self.accelerator.main_process_first():  # one download; the others find it in the cache
                path = resolve_hub_checkpoint(choice) or Path(choice)
        if path is None:
            damaged = checkpoints(self.output_dir)
            raise CheckpointError(
                f"resume_from_checkpoint='latest' but {self.output_dir} holds no checkpoint"
                + (f" that verifies ({len(damaged)} damaged: {checkpoint_problem(damaged[-1])})" if damaged else "")
            )
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no trainer_state.json)")
        if choice == "latest":  # latest_checkpoint verified it
            if path != checkpoints(self.output_dir)[-1]:
                logger.warning("resuming from %s, the newest checkpoint that verifies", path)
        elif (problem := checkpoint_problem(path)) is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        self.check_same_run(path)
        return path

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
        return {"seed": self.zo_config.seed, "optimizer": self.train_args.optimizer}

    def check_same_run(self, folder: Path) -> None:
        state = json.loads((folder / "trainer_state.json").read_text())
        for kind, identity in (("data", self.data_identity()), ("run", self.run_identity())):
            saved = state.get(kind)
            if saved is None:  # written before checkpoints recorded it
                continue
            differing = [
                f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
                for key, value in identity.items()
                if saved.get(key) != value
            ]
            if differing:
                what = "on other data" if kind == "data" else "by another run"
                raise CheckpointError(
                    f"{folder} was trained {what} than this run asks for ({'; '.join(differing)}): it cannot carry "
                    f"over. Resume with the same settings, or start a new run from its weights with --init_from {folder}"
                )

    def load_tokenizer(self):
        source = self.resume_dir or self.model_args.init_from
        if source is not None:
            return AutoTokenizer.from_pretrained(source)
        data = self.data_args
        kind = "char" if data.task and data.tokenizer == "bpe" else data.tokenizer  # tasks are character level
        tokenizer_dir = self.output_dir / "tokenizer"
        files = None
        if self.accelerator.is_main_process:  # trains it once; the others load what it saved
            texts = () if kind != "bpe" else text_pieces(self.text_source(validation=False))
            tokenizer = build_tokenizer(kind, texts, data.tokenizer_vocab_size, data.tokenizer_sample_chars)
            files = {path.name: path.read_bytes() for path in map(Path, tokenizer.save_pretrained(tokenizer_dir))}
        if self.per_machine:  # the other machines cannot read the main process's disk: send them the files
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

    def text_source(self, validation: bool):
        """The training data, or what validation evaluates: --validation_dataset whole, else the held-out part."""
        data = self.data_args
        if validation and data.validation_dataset:
            source = open_text_source(data.validation_dataset, "validation", data.text_column, data.document_column, 0)
            source.description = f"{source.description} (--validation_dataset)"
            return source
        fraction = 0 if data.validation_dataset else data.validation_fraction
        split = "validation" if validation else "train"
        return open_text_source(data.dataset, split, data.text_column, data.document_column, fraction)

    def data_descriptions(self) -> tuple[str, str]:
        """(what trains, what validation evaluates), in words for the logs and the model card."""
        data = self.data_args
        if self.train_args.objective == "reward":
            return (
                f"prompts from {data.prompts} scored by {self.train_args.rewards}, from {self.model_args.init_from}",
                f"held-out prompts from {data.prompts}: their greedy completions' rewards",
            )
        if data.task:
            return (
                f"the {data.task} task, lengths 2-{data.task_max_length}",
                f"the {data.task} task: loss at lengths {data.task_max_length + 1}-{data.task_max_length + 50}, "
                "exact match in and out of distribution",
            )
        training, validation = self.train_stream.source.description, self.text_source(validation=True).description
        if validation == training:  # validation_fraction 0: say so wherever the loss is reported
            validation += " (the training data itself: validation_fraction is 0)"
        return training, validation

    def make_stream(self, validation: bool):
        data = self.data_args
        if self.train_args.objective == "reward":
            return PromptStream(
                data.prompts, "validation" if validation else "train", data.batch_size, self.zo_config.seed,
                data.prompt_column, data.task_max_length, data.prompt_words,
            )  # fmt: skip
        if data.task:
            return TaskStream(
                data.task, self.tokenizer, data.batch_size, data.task_max_length, self.zo_config.seed, validation
            )
        split = data.per_rank_batches and not validation
        return PackedStream(
            self.text_source(validation),
            self.tokenizer,
            data.context_length,
            data.batch_size,
            rank=self.rank if split else 0,
            world_size=self.world_size if split else 1,
        )

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Set up, train, evaluate and save; a SIGTERM or SIGINT saves a checkpoint and raises Preempted."""
        stop_requests = StopRequests()
        stop_requests.install()
        try:
            return self.run_training(stop_requests)
        finally:
            stop_requests.uninstall()

    def run_training(self, stop_requests: StopRequests) -> dict:
        self.setup()
        args = self.train_args
        if self.accelerator.is_main_process or self.writes_shared:
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
            batch = self.next_batch()
            step_started = time.perf_counter()
            if self.reward is not None:
                metrics, step_tokens = self.reward_step(batch), 0  # reward_step counts what it generates
            else:
                input_ids, labels = batch
                metrics = self.zo_step(input_ids, labels) if self.is_zo else self.bptt_step(input_ids, labels)
                step_tokens = input_ids.numel() * (self.world_size if self.data_args.per_rank_batches else 1)
            training_seconds += time.perf_counter() - step_started
            self.counters["step"] += 1
            self.counters["tokens"] += step_tokens
            step = self.counters["step"]
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
                self.log(metrics)
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
            rates = {"tok_s": f"{(step_tokens or metrics.get('generated_tokens', 0)) / metrics['step_seconds']:.0f}"}
            if self.zo is not None:
                rates["probes_s"] = f"{self.zo_config.num_probes / metrics['step_seconds']:.1f}"
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
        return final  # the script calls accelerator.end_training(): it also tears down the process group

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data_args.fixed_batch and self.first_batch is not None:
            return self.first_batch
        batch = next(self.train_iterator, None)
        if batch is None:  # one pass over the data is done: start the next epoch from the beginning
            self.train_stream = self.make_stream(validation=False)
            self.train_iterator = iter(self.train_stream)
            batch = next(self.train_iterator, None)
            if batch is None:
                raise DataError(
                    f"the training data {self.data_args.dataset!r} yields no full batch "
                    f"of {self.data_args.batch_size} x {self.data_args.context_length} tokens"
                )
        if isinstance(batch, PromptBatch):
            return batch
        input_ids, labels = batch
        batch = input_ids.to(self.accelerator.device), labels.to(self.accelerator.device)
        if self.data_args.fixed_batch:
            self.first_batch = batch
        return batch

    def zo_step(self, input_ids, labels) -> dict:
        """One hybrid step at one theta: the local gradient's forward (which also gives the clean loss), the
        probes, then both updates; then any further local steps on fresh batches."""
        metrics, clean_loss, surrogates = {}, None, []
        if self.local is not None:
            clean_loss, sent = self.local.gradients(input_ids, labels)
            surrogates = self.local.surrogates()
            self.counters["forward_passes"] += 1
            self.counters["comm_bytes"] += sent
        if self.zo is not None:
            model = self.model

            def loss_fn():
                return model(input_ids, labels=labels, logits_to_keep=1).loss

            stacked = None
            if (
                self.zo_config.probes_per_forward != 1
            ):  # several probes per forward: low-rank as one batch, else stacked
                perturbation = self.zo_config.perturbation
                build = StackedLoss.members_of_model if perturbation == "lowrank" else StackedLoss.of_model
                stacked = build(self.accelerator.unwrap_model(model), self.zo.names, input_ids, labels)
            metrics = self.zero_order_update(loss_fn, stacked, clean_loss, surrogates)
            metrics["perturbed_loss"] = metrics["train_loss"]
        if self.local is not None:
            self.local_update(clean_loss, metrics)
        return metrics

    def local_update(self, clean_loss: float, metrics: dict) -> None:
        """The AdamW half: this step's local gradient, then local_steps - 1 more on fresh batches (a non-finite
        gradient is dropped by LocalGradientStep.step, and then the step counts as skipped)."""
        local_lr = self.local.step()
        if local_lr is None:
            metrics["skipped_step"] = int(self.zo is None or bool(metrics.get("skipped_step")))
        else:
            metrics["local_lr"] = local_lr
        for _ in range(self.train_args.local_steps - 1):
            extra_ids, extra_labels = self.next_batch()
            _, sent = self.local.gradients(extra_ids, extra_labels)
            self.local.step()
            self.counters["forward_passes"] += 1
            self.counters["comm_bytes"] += sent
            self.counters["tokens"] += extra_ids.numel() * (self.world_size if self.data_args.per_rank_batches else 1)
        if self.world_size > 1 and self.data_args.per_rank_batches:  # log the mean over processes, as BPTT does
            clean_loss = self.accelerator.reduce(torch.tensor(clean_loss, device=self.accelerator.device), "mean")
            clean_loss = clean_loss.item()
        metrics["train_loss"] = clean_loss  # the clean loss of this step's batch, before its updates

    def reward_step(self, batch: PromptBatch) -> dict:
        """Evolution strategies on the reward: each antithetic member theta +- eps z generates completions for the
        batch's prompts, its loss is minus their mean reward, the population's losses are shaped (loss_shaping) and
        the update is the ZO optimiser's; only the members' rewards cross processes. anchor_decay then pulls the
        weights toward the start (arXiv 2605.30148: it stops drift in directions the reward does not constrain)."""
        model = self.accelerator.unwrap_model(self.model)

        def loss_fn():
            probe, column = self.zo.member  # a member's sampling seed: the same whichever process generates it
            seed = member_seed(self.zo_config.seed, self.zo.step_count, probe, column)
            return self.reward.loss(model, batch.prompts, batch.columns, seed)

        nonfinite = self.reward.nonfinite
        metrics = self.zero_order_update(loss_fn)
        if self.anchor and metrics["lr"]:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, start in zip(self.zo.names, self.anchor, strict=True):
                    params[name].sub_(metrics["lr"] * self.train_args.anchor_decay * (params[name] - start))
        members = 2 * self.zo_config.num_probes
        generated = members * len(batch.prompts) * self.train_args.reward_samples * self.train_args.max_new_tokens
        self.counters["tokens"] += generated
        metrics.update(mean_reward=-metrics["train_loss"], generated_tokens=generated,
                       nonfinite_rewards=self.reward.nonfinite - nonfinite)  # fmt: skip
        return metrics

    def zero_order_update(self, loss_fn, stacked=None, clean_loss=None, surrogates=()) -> dict:
        # with per-process batches the clean losses differ by process; the probes' base must be each one's own
        stats = self.zo.step(
            loss_fn,
            rank=self.rank,
            world_size=self.world_size,
            gather=self.accelerator.gather,
            stacked_loss=stacked,
            clean_loss=clean_loss,
            surrogates=surrogates,
        )
        self.counters["forward_passes"] += stats.forward_passes
        # per step each process sends its k = K / world_size pairs of float64 losses and receives all 2K
        self.counters["comm_bytes"] += 0 if self.world_size == 1 else 2 * 8 * self.zo_config.num_probes
        return {
            "train_loss": stats.loss,
            "lr": stats.lr,
            "eps": stats.eps,
            "projected_grad_mean": stats.projected_grad_mean,
            "projected_grad_std": stats.projected_grad_std,
            "snr": stats.snr,
            "update_norm": stats.update_norm,
            "dropped_probes": stats.dropped_probes,
            "skipped_step": int(stats.skipped),
            "seconds_forward": stats.seconds_forward,
            "seconds_update": stats.seconds_update,
        }

    def bptt_step(self, input_ids, labels) -> dict:
        """Truncated BPTT: backward per segment with the state detached between segments, one optimizer step."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        count = int((targets != IGNORE_INDEX).sum())
        segment = self.train_args.bptt_truncation or self.accelerator.unwrap_model(self.model).config.chunk_size
        self.optimizer.zero_grad()
        state, total = None, 0.0
        for start in range(0, input_ids.shape[1], segment):
            out = self.model(input_ids[:, start : start + segment], state=state, use_cache=True)
            state = tuple(s.detach() for s in out.state)
            loss = F.cross_entropy(
                out.logits.float().flatten(0, 1),
                targets[:, start : start + segment].flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ) / max(count, 1)
            self.accelerator.backward(loss)
            total += loss.item()
        self.optimizer.step()
        self.counters["forward_passes"] += 1
        if self.world_size > 1:  # every process logs (and stops on) the same number
            total = self.accelerator.reduce(torch.tensor(total, device=self.accelerator.device), "mean").item()
        return {"train_loss": total, "lr": self.train_args.bptt_lr}

    def check_progress(self, metrics: dict) -> None:
        """Stop a run whose steps have all been skipped (non-finite losses) for max_skipped_steps in a row, before
        it saves a broken model or prunes a good checkpoint."""
        skipped = bool(metrics.get("skipped_step")) or not math.isfinite(metrics["train_loss"])
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = self.train_args.max_skipped_steps
        if limit and self.skipped_in_a_row >= limit:
            if metrics.get("skipped_step") and self.zo is not None:
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
                    self.zo_config.seed + 1,
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
        streams = {"eval_reward": self.make_stream(validation=True)}
        if data.prompts in ("add", "reverse"):
            streams["eval_reward_in_distribution"] = PromptStream(data.prompts, "train", data.batch_size,
                                                                  self.zo_config.seed + 1, max_task_length=data.task_max_length)  # fmt: skip
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

    def log(self, metrics: dict) -> None:
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

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        step = self.counters["step"]
        target = self.output_dir / f"checkpoint-{step}"
        model = self.accelerator.unwrap_model(self.model)
        optimizer_state = self.optimizer_state()

        def write(folder: Path) -> None:
            # per process: its data position and RNG; main process: the model, tokenizer and shared state
            save_state(
                {"data": self.train_stream.state_dict(), "rng": torch.get_rng_state()}, folder, f"process_{self.rank}"
            )
            if self.writes_shared:
                model.save_pretrained(folder, max_shard_size=self.train_args.max_shard_size)
                self.tokenizer.save_pretrained(folder)
                save_state(optimizer_state, folder, "optimizer")
                state = {
                    "counters": self.counters,
                    "history": self.history,
                    "world_size": self.world_size,
                    "data": self.data_identity(),
                    "run": self.run_identity(),
                }
                (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
                self.write_report(folder, self.latest_eval())

        write_atomically(target, write, self.accelerator, owner=self.writes_shared)
        if self.writes_shared:
            prune_checkpoints(self.output_dir, self.train_args.save_total_limit, known_good=target)
            if self.pusher is not None:
                self.push_checkpoint(target, step)
        self.accelerator.wait_for_everyone()
        return target

    def load_training_state(self, folder: Path) -> None:
        state = json.loads((folder / "trainer_state.json").read_text())
        if state["world_size"] != self.world_size and self.data_args.per_rank_batches:
            raise CheckpointError(
                f"{folder} was written by {state['world_size']} processes with per_rank_batches; resume with the same number"
            )
        self.counters, self.history = state["counters"], state["history"]
        if self.accelerator.is_main_process:  # a killed run logged past its checkpoint: this run logs those steps again
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        process_state = load_state(folder, f"process_{self.rank if state['world_size'] == self.world_size else 0}")
        device = self.accelerator.device  # a CPU process of a multi-machine run gets "cpu:0": load it to "cpu"
        optimizer_state = load_state(folder, "optimizer", device=str(device) if device.type != "cpu" else "cpu")
        if not self.data_args.fixed_batch:
            self.train_stream.load_state_dict(process_state["data"])
        torch.set_rng_state(process_state["rng"])
        self.load_optimizer_state(optimizer_state, folder)

    def optimizer_state(self) -> dict:
        if not self.is_zo:
            return self.optimizer.state_dict()
        state = self.zo.state_dict() if self.zo is not None else {}
        if self.local is not None:
            state = {**state, "local": self.local.state_dict()}
        return state

    def load_optimizer_state(self, state: dict, folder: Path) -> None:
        if not self.is_zo:
            self.optimizer.load_state_dict(state)
            return
        has_local, has_zo = "local" in state, "step" in state
        if has_local != (self.local is not None) or has_zo != (self.zo is not None):
            raise CheckpointError(
                f"{folder} was trained with{'' if has_local else 'out'} a local gradient and with"
                f"{'' if has_zo else 'out'} probes; resume with the same local_gradient and num_probes > 0 setting"
            )
        try:
            if self.zo is not None:
                self.zo.load_state_dict(state)
            if self.local is not None:
                self.local.load_state_dict(state["local"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{folder}: the optimizer state does not fit this run: {error}") from error

    def save_final_model(self, final_metrics: dict) -> None:
        if not self.writes_shared:
            return
        model = self.accelerator.unwrap_model(self.model)

        def write(folder: Path) -> None:
            model.save_pretrained(folder, max_shard_size=self.train_args.max_shard_size)
            self.tokenizer.save_pretrained(folder)
            self.write_report(folder, final_metrics)

        publish_atomically(self.output_dir, write)
        if self.pusher is not None:
            ignore = ["checkpoint-*/*", ".tmp-*/*", "tokenizer/*", "hf_zoo_rnn/*"]
            final_push = self.pusher.push(self.output_dir, f"End of training, step {self.counters['step']}",
                                          ignore_patterns=ignore)  # fmt: skip
            self.pusher.wait(self.train_args.hub_timeout)  # the run ends when the pushes have ended or timed out
            if self.pusher.failed:
                logger.error("%d push(es) to %s failed; the local output in %s is complete", len(self.pusher.failed),
                             self.pusher.repo_id, self.output_dir)  # fmt: skip
            if not (final_push.done() and final_push.result()):
                raise PushFailedError(
                    f"training finished and {self.output_dir} holds the model, but pushing it to {self.pusher.repo_id} "
                    f"failed ({self.pusher.failed[-1]}); push it later with hf-zoo-rnn-push --folder {self.output_dir} "
                    f"--repo_id {self.pusher.repo_id}"
                )

    def write_report(self, folder: Path, metrics: dict) -> None:
        """Loss curve and model card: every checkpoint folder carries its own."""
        if self.is_zo and self.local is None:
            label = "train (mean perturbed loss)"
        else:
            label = "train (clean loss of each step's batch)"
        plot_loss_curve(self.history, folder / "loss_curve.png", label)
        write_model_card(folder, self.accelerator.unwrap_model(self.model), self, metrics)

    def latest_eval(self) -> dict:
        return next(
            ({k: v for k, v in r.items() if k.startswith("eval_")} for r in reversed(self.history) if "eval_loss" in r),
            {},
        )

    def make_pusher(self) -> HubPusher:
        args = self.train_args
        repo_id = args.hub_model_id
        if repo_id is None:
            try:
                user = HfApi(token=args.hub_token).whoami()["name"]
            except Exception as error:  # offline, a bad token, a Hub error: each library raises its own kind
                raise ConfigFileError(
                    f"--push_to_hub without --hub_model_id needs the Hub to say who you are, and it could not "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no answer'}); pass "
                    "--hub_model_id owner/name"
                ) from None
            repo_id = f"{user}/{self.output_dir.name}"
        return HubPusher(
            repo_id, self.output_dir, args.hub_private, args.hub_token, args.hub_retries, args.hub_retry_seconds
        )

    def push_checkpoint(self, folder: Path, step: int) -> None:
        strategy = self.train_args.hub_strategy
        if strategy == "every_save":
            self.pusher.push(folder, f"Training in progress, step {step}", ignore_patterns=RESUME_ONLY)
        elif strategy == "all_checkpoints":
            self.pusher.push(folder, f"Checkpoint {step} with resume state", path_in_repo=folder.name)


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
    values = {}
    for args in (trainer.model_args, trainer.data_args, trainer.train_args, trainer.zo_config):
        for key, value in dataclasses.asdict(args).items():
            values[key] = value if isinstance(value, int | float | str | bool) else str(value)
    values["world_size"] = trainer.world_size
    return values
