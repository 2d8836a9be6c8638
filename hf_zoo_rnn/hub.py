"""Pushing to the Hub, and resuming from it.

`HubPusher` uploads folders in a background thread, in order, retrying with exponential back-off; a push that
still fails is logged and counted, never raised into training, and the local files are never touched (each push
works on a hard-linked snapshot, so pruning old checkpoints cannot pull a folder from under an upload). The run's
end waits at most `hub_timeout` seconds for the final push; a final push that did not succeed makes the run exit
non-zero (PushFailedError) with its local output complete.
"""

import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

logger = logging.getLogger(__name__)

HUB_CHECKPOINT = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?/(?P<path>checkpoint-\d+)$")
SNAPSHOT_PREFIX = ".hub-push-"


def push_folder(
    api: HfApi,
    folder: Path,
    repo_id: str,
    private: bool,
    message: str,
    *,
    path_in_repo: str | None = None,
    ignore_patterns: list[str] | None = None,
    retries: int = 5,
    retry_seconds: float = 2.0,
) -> str:
    """Create the repo if needed and upload `folder`, retrying with back-off. Returns the commit URL."""

    def attempt() -> str:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            commit_message=message,
            ignore_patterns=ignore_patterns,
        )
        return info.commit_url

    for retry in range(retries):
        try:
            return attempt()
        except Exception as error:  # network, HTTP and server errors alike: retry, then give up loudly
            wait = retry_seconds * 2**retry
            logger.warning("push of %s to %s failed (%s); retrying in %.1f s", folder, repo_id, error, wait)
            time.sleep(wait)
    return attempt()  # the last try: its error reaches the caller


class HubPusher:
    """Background, ordered, retried pushes of folders to one repo.

    The worker is a daemon thread: a Hub that accepts connections and never answers (the client sets no timeout of
    its own) can hold a push, never the run. At most `max_waiting` pushes wait behind the one in flight; an older
    waiting one is superseded by a newer one (its snapshot removed), so a stalled Hub cannot pile snapshots up on disk.
    `wait(timeout)` gives up on whatever has not finished by then, and counts it as failed.
    """

    def __init__(
        self,
        repo_id: str,
        snapshot_dir: Path,
        *,
        private: bool = False,
        token: str | None = None,
        retries: int = 5,
        retry_seconds: float = 2.0,
        max_waiting: int = 1,
    ):
        self.api = HfApi(token=token)
        self.snapshot_dir = Path(snapshot_dir)
        self.repo_id, self.private = repo_id, private
        self.retries, self.retry_seconds, self.max_waiting = retries, retry_seconds, max_waiting
        self.queue: queue.Queue = queue.Queue()
        self.waiting: list[tuple[Future, Path, str]] = []  # queued, not started
        self.pending: list[Future] = []
        self.pushed: list[str] = []
        self.failed: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.work, name="hub-push", daemon=True).start()

    def push(
        self, folder: Path, message: str, path_in_repo: str | None = None, ignore_patterns: list[str] | None = None
    ) -> Future:
        # hard links need the same filesystem, and a push must never write outside the run's own folder (its
        # parent may be read-only): snapshots sit in snapshot_dir, the output directory, outside any checkpoint
        snapshot = Path(tempfile.mkdtemp(prefix=SNAPSHOT_PREFIX, dir=self.snapshot_dir))
        shutil.copytree(folder, snapshot / "folder", copy_function=os.link, ignore=not_pushed)
        future: Future = Future()
        with self.lock:
            while len(self.waiting) >= self.max_waiting:
                old, old_snapshot, old_message = self.waiting.pop(0)
                if old.set_running_or_notify_cancel():  # not started: drop it for the newer one
                    shutil.rmtree(old_snapshot, ignore_errors=True)
                    logger.warning(
                        "push %r to %s superseded by %r before it started", old_message, self.repo_id, message
                    )
                    old.set_result(False)
            self.waiting.append((future, snapshot, message))
            self.pending.append(future)
        self.queue.put((future, snapshot, message, path_in_repo, ignore_patterns))
        return future

    def work(self) -> None:
        while True:
            future, snapshot, message, path_in_repo, ignore_patterns = self.queue.get()
            with self.lock:
                self.waiting = [entry for entry in self.waiting if entry[0] is not future]
                if future.done():  # superseded
                    continue
                future.set_running_or_notify_cancel()
            pushed = False
            try:
                folder = snapshot / "folder"
                url = push_folder(
                    self.api,
                    folder,
                    self.repo_id,
                    self.private,
                    message,
                    path_in_repo=path_in_repo,
                    ignore_patterns=ignore_patterns,
                    retries=self.retries,
                    retry_seconds=self.retry_seconds,
                )
                self.pushed.append(url)
                pushed = True
            except Exception as error:
                cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                self.failed.append(f"{message}: {cause}")
                logger.error(
                    "giving up pushing %r to %s after %d retries: %s (local files are intact)",
                    message,
                    self.repo_id,
                    self.retries,
                    error,
                )
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                future.set_result(pushed)

    def wait(self, timeout: float | None = None) -> None:
        """Until every push has finished, or `timeout` seconds: a push still running then is counted as failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in self.pending:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                future.result(timeout=remaining)
            except FutureTimeout:
                self.failed.append(f"a push still unfinished after {timeout:g} s (the Hub does not answer)")
                break
        self.pending.clear()


def resolve_hub_checkpoint(reference: str) -> Path | None:
    """`hf://owner/repo[@revision]/checkpoint-N` -> a local folder with that checkpoint; None if not a Hub reference."""
    match = HUB_CHECKPOINT.match(reference)
    if match is None:
        return None
    local = snapshot_download(match["repo"], revision=match["revision"], allow_patterns=[f"{match['path']}/*"])
    folder = Path(local) / match["path"]
    if not folder.is_dir():
        raise FileNotFoundError(f"{reference}: no {match['path']} in {match['repo']}")
    return folder


def not_pushed(folder: str, names: list[str]) -> set[str]:
    """What a push leaves out: staging folders, snapshots, the lock, and every symbolic link (a link in a run folder
    is never followed: its target, anywhere on the machine, must not reach the Hub)."""
    skipped = set(shutil.ignore_patterns(".tmp-*", f"{SNAPSHOT_PREFIX}*", ".run.lock")(folder, names))
    links = {name for name in names if os.path.islink(os.path.join(folder, name))}
    for name in sorted(links - skipped):
        logger.warning("not pushing %s: a symbolic link is never followed", os.path.join(folder, name))
    return skipped | links


class PushFailedError(RuntimeError):
    """Training finished and its output is saved locally, but the final push did not reach the Hub."""


class ModelReferenceError(ValueError):
    """A --model argument that names no loadable model."""


def is_local_reference(reference: str) -> bool:
    """A path, not a Hub repo id (owner/name): it exists, or it could not be a repo id, or its folder exists here
    (so a typo in outputs/defualt is reported as a missing folder, not tried against the Hub for a minute)."""
    path = Path(reference).expanduser()
    return path.exists() or reference.startswith(("/", ".", "~")) or reference.count("/") != 1 or path.parent.is_dir()


def load_trained(reference: str):
    """(model in eval mode, tokenizer) from a trained folder or a Hub repo id; a local folder that is missing or
    holds no model is one error naming it. The model is built by the installed hf_zoo_rnn classes: the Python
    files a folder or repo carries are never run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_local_reference(reference):
        from .training.checkpoints import CONFIG_NAME, model_folder_problem  # here: the training package imports hub

        path = Path(reference).expanduser()
        if not path.is_dir():
            raise ModelReferenceError(f"{reference}: no such folder (a Hub model is named owner/name)")
        if not (path / CONFIG_NAME).is_file():
            raise ModelReferenceError(
                f"{path} holds no trained model (no {CONFIG_NAME}): pass a finished run's output_dir or one of its "
                "checkpoint-N folders"
            )
        if (problem := model_folder_problem(path)) is not None:
            raise ModelReferenceError(f"cannot load the model in {path}: {problem}")
        try:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            return model, AutoTokenizer.from_pretrained(path)
        except Exception as error:  # safetensors, tokenizers and transformers each raise their own kinds
            raise ModelReferenceError(f"cannot load the model in {path}: {error}") from error
    model = AutoModelForCausalLM.from_pretrained(reference).eval()
    return model, AutoTokenizer.from_pretrained(reference)
