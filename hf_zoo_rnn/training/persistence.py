"""Persistence: where a run's files live, what it resumes from, its checkpoints, its final model and its pushes.

A checkpoint holds the model and tokenizer (save_pretrained), the estimator's state (`optimizer` in safetensors +
JSON), each process's data position and RNG (`process_N`), and trainer_state.json (counters, history, and the identity
of the run and its data, which a resume must match). Everything is written atomically, under the file names that
checkpoints.py defines."""

import json
import logging
import uuid
from pathlib import Path

from accelerate.utils import broadcast_object_list, gather_object
from huggingface_hub import HfApi

from ..config_files import ConfigFileError
from ..hub import HubPusher, PushFailedError, resolve_hub_checkpoint
from .checkpoints import (
    ESTIMATOR_STATE_NAME,
    RESUME_ONLY,
    TRAINER_STATE_NAME,
    CheckpointError,
    checkpoint_problem,
    checkpoints,
    latest_checkpoint,
    load_state,
    process_state_name,
    prune_checkpoints,
    publish_atomically,
    read_object,
    remove,
    save_state,
    verified_steps,
    write_atomically,
)
from .run_folder import LOG_FILE, OutputDirError, check_fresh_start, claim_output_dir

logger = logging.getLogger(__name__)


class RunStorage:
    """The output folder of one run, shared by its processes or one per machine (checkpoint_storage)."""

    def __init__(self, accelerator, train_args):
        self.accelerator, self.train_args = accelerator, train_args
        self.output_dir = Path(train_args.output_dir)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.per_machine = self.storage_mode() == "per_machine"
        # who writes the files every process shares (model, tokenizer, estimator state, trainer state)
        self.writes_shared = accelerator.is_local_main_process if self.per_machine else accelerator.is_main_process
        self.pusher = self.make_pusher() if train_args.push_to_hub and accelerator.is_main_process else None
        self.output_lock = None

    def storage_mode(self) -> str:
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

    def claim(self) -> None:
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

    def release(self) -> None:
        """Unlock output_dir: the run has ended, however it ended."""
        if self.output_lock is not None:
            self.output_lock.close()
            self.output_lock = None

    def agreed_checkpoint(self) -> Path | None:
        """With a disk per machine: the newest checkpoint that verifies on every machine."""
        steps = [set(found) for found in gather_object([verified_steps(self.output_dir)])]
        common = set.intersection(*steps)
        return self.output_dir / f"checkpoint-{max(common)}" if common else None

    def resume_folder(self, identities: dict[str, dict]) -> Path | None:
        """The checkpoint resume_from_checkpoint names (latest, a folder, hf://...), verified and of this run."""
        choice = self.train_args.resume_from_checkpoint
        if choice is None:
            return None
        hub_cache = False  # a Hub checkpoint's files are links into the Hugging Face cache
        if choice == "latest":
            path = self.agreed_checkpoint() if self.per_machine else latest_checkpoint(self.output_dir)
        else:
            with self.accelerator.main_process_first():  # one download; the others find it in the cache
                path = resolve_hub_checkpoint(choice)
            hub_cache, path = path is not None, path or Path(choice)
        if path is None:
            damaged = checkpoints(self.output_dir)
            raise CheckpointError(
                f"resume_from_checkpoint='latest' but {self.output_dir} holds no checkpoint"
                + (f" that verifies ({len(damaged)} damaged: {newest_problem(damaged[-1])})" if damaged else "")
            )
        if not (path / TRAINER_STATE_NAME).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINER_STATE_NAME})")
        if choice == "latest":  # latest_checkpoint verified it
            if path != checkpoints(self.output_dir)[-1]:
                logger.warning("resuming from %s, the newest checkpoint that verifies", path)
        elif (problem := checkpoint_problem(path, follow_links=hub_cache)) is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        check_same_run(path, identities)
        self.check_steps_left(path)
        return path

    def check_steps_left(self, folder: Path) -> None:
        """A checkpoint past max_steps cannot train: one line, not a run that silently does nothing."""
        step, max_steps = read_object(folder / TRAINER_STATE_NAME)["counters"]["step"], self.train_args.max_steps
        if step > max_steps:
            raise CheckpointError(
                f"{folder} is at step {step}, past --max_steps {max_steps}: there is nothing to train. Raise "
                f"--max_steps above {step} to train it further"
            )
        if step == max_steps:
            logger.warning(
                "%s is at --max_steps %d already: it is evaluated and saved again, not trained", folder, step
            )

    def save_checkpoint(
        self, step: int, model, tokenizer, process_state: dict, step_state: dict, trainer_state: dict, write_report
    ) -> Path:
        """checkpoint-{step}: per process its data position and RNG; from the writer the model, tokenizer, the
        step's state and the trainer state; then prune and push."""
        target = self.output_dir / f"checkpoint-{step}"

        def write(folder: Path) -> None:
            save_state(process_state, folder, process_state_name(self.rank))
            if self.writes_shared:
                model.save_pretrained(folder, max_shard_size=self.train_args.max_shard_size)
                tokenizer.save_pretrained(folder)
                save_state(step_state, folder, ESTIMATOR_STATE_NAME)
                (folder / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=1))
                write_report(folder)

        write_atomically(target, write, self.accelerator, owner=self.writes_shared)
        if self.writes_shared:
            prune_checkpoints(self.output_dir, self.train_args.save_total_limit, known_good=target)
            if self.pusher is not None:
                self.push_checkpoint(target, step)
        self.accelerator.wait_for_everyone()
        return target

    def load_checkpoint(self, folder: Path, per_rank_batches: bool) -> tuple[dict, dict, dict]:
        """(trainer state, this process's state, the step's state) of a checkpoint written by this run."""
        state = read_object(folder / TRAINER_STATE_NAME)  # its shape was checked with the checkpoint
        if state["world_size"] != self.world_size and per_rank_batches:
            raise CheckpointError(
                f"{folder} was written by {state['world_size']} processes with per_rank_batches; resume with the same number"
            )
        if self.accelerator.is_main_process:  # a killed run logged past its checkpoint: this run logs those steps again
            self.rewrite_log(state["history"])
        name = process_state_name(self.rank if state["world_size"] == self.world_size else 0)
        process_state = load_state(folder, name)
        if not isinstance(process_state, dict) or not isinstance(process_state.get("data"), dict):
            raise CheckpointError(f"{folder / name}.json holds no data position (an object under data)")
        device = self.accelerator.device  # a CPU process of a multi-machine run gets "cpu:0": load it to "cpu"
        step_state = load_state(folder, ESTIMATOR_STATE_NAME, device=str(device) if device.type != "cpu" else "cpu")
        if not isinstance(step_state, dict):
            raise CheckpointError(
                f"{folder / ESTIMATOR_STATE_NAME}.json holds {type(step_state).__name__}, not a step's state"
            )
        return state, process_state, step_state

    def rewrite_log(self, history: list[dict]) -> None:
        """metrics.jsonl as of the checkpoint, written anew: a link in its place is replaced, never written through."""
        path = self.output_dir / LOG_FILE
        staging = self.output_dir / f".tmp-{LOG_FILE}"
        try:
            remove(staging)
            staging.write_text("".join(json.dumps(r) + "\n" for r in history))
            staging.replace(path)
        except OSError as error:
            raise CheckpointError(f"cannot write {error.filename or path}: {error.strerror}") from None

    def publish_final(self, model, tokenizer, write_report, step: int) -> None:
        """The final model at the top of output_dir (atomically), then the last push, waited for."""
        if not self.writes_shared:
            return

        def write(folder: Path) -> None:
            model.save_pretrained(folder, max_shard_size=self.train_args.max_shard_size)
            tokenizer.save_pretrained(folder)
            write_report(folder)

        publish_atomically(self.output_dir, write)
        if self.pusher is None:
            return
        ignore = ["checkpoint-*/*", ".tmp-*/*", "tokenizer/*", "hf_zoo_rnn/*"]
        final_push = self.pusher.push(self.output_dir, f"End of training, step {step}", ignore_patterns=ignore)
        self.pusher.wait(self.train_args.hub_timeout)  # the run ends when the pushes have ended or timed out
        if self.pusher.failed:
            logger.error(
                "%d push(es) to %s failed; the local output in %s is complete",
                len(self.pusher.failed),
                self.pusher.repo_id,
                self.output_dir,
            )
        if not (final_push.done() and final_push.result()):
            raise PushFailedError(
                f"training finished and {self.output_dir} holds the model, but pushing it to {self.pusher.repo_id} "
                f"failed ({self.pusher.failed[-1]}); push it later with hf-zoo-rnn-push --folder {self.output_dir} "
                f"--repo_id {self.pusher.repo_id}"
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
            repo_id,
            self.output_dir,
            private=args.hub_private,
            token=args.hub_token,
            retries=args.hub_retries,
            retry_seconds=args.hub_retry_seconds,
        )

    def push_checkpoint(self, folder: Path, step: int) -> None:
        strategy = self.train_args.hub_strategy
        if strategy == "every_save":
            self.pusher.push(folder, f"Training in progress, step {step}", ignore_patterns=RESUME_ONLY)
        elif strategy == "all_checkpoints":
            self.pusher.push(folder, f"Checkpoint {step} with resume state", path_in_repo=folder.name)


def newest_problem(folder: Path) -> str:
    """Why `folder` cannot resume: its own damage, or (a disk per machine) another machine's copy of it."""
    return checkpoint_problem(folder) or f"{folder.name} is damaged or missing on another machine"


def check_same_run(folder: Path, identities: dict[str, dict]) -> None:
    """A checkpoint carries over only to the run that wrote it: the same data and run identity (what it records)."""
    state = read_object(folder / TRAINER_STATE_NAME)
    for kind, identity in identities.items():
        saved = state.get(kind)
        if saved is None:  # written before checkpoints recorded it
            continue
        differing = [  # a key the checkpoint lacks was not recorded yet (its state's layout is checked on loading)
            f"{key}: checkpoint {saved[key]!r}, this run {value!r}"
            for key, value in identity.items()
            if key in saved and saved[key] != value
        ]
        if differing:
            what = "on other data" if kind == "data" else "by another run"
            raise CheckpointError(
                f"{folder} was trained {what} than this run asks for ({'; '.join(differing)}): it cannot carry "
                f"over. Resume with the same settings, or start a new run from its weights with --init_from {folder}"
            )
