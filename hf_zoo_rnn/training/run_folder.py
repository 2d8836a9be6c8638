"""Who owns an output folder: one run at a time, and never a previous run's files by accident.

The process that writes a folder's shared files holds an exclusive `flock` on `output_dir/.run.lock` for the whole
run. The kernel releases it when the process ends, however it ends (SIGKILL included), so a lock is never stale and a
second run into the same folder — by hand, or a scheduler restarting a preempted job beside one still running — is
refused at once. A folder that holds another run's checkpoints or log is refused too, unless the run resumes it
(`--resume_from_checkpoint`) or starts over (`--overwrite_output_dir`, which removes that run's checkpoints and log
first, so they can be neither pruned as "older" nor resumed by mistake).

Nothing the trainer writes, reads or deletes leaves the folder, whoever made it (a run folder may be downloaded or
shared): a symbolic link, or anything but a file, where the trainer writes a file of its own (the lock, the log, the
tokenizer, the trackers' logs) is refused in one line naming it, before anything is written; checkpoint-N links are
never followed (checkpoints.py). Only the trainer's own names (`RUN_FILES`, exactly) are ever removed: a user's
`checkpoint-best/` or notes stay, and are never called a previous run.
"""

import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import IO

from .checkpoints import TRAINER_STATE_NAME, remove

LOCK_FILE = ".run.lock"
LOG_FILE = "metrics.jsonl"
# what a run leaves that a later run would otherwise mistake for its own, by exact name
RUN_FILES = re.compile(
    rf"^(checkpoint-\d+|\.tmp-(checkpoint-\d+|final|{re.escape(LOG_FILE)})|\.hub-push-[A-Za-z0-9_]+|"
    rf"\.storage-check-[0-9a-f]+|{re.escape(LOG_FILE)}|{re.escape(TRAINER_STATE_NAME)})$"
)
# files the trainer opens for writing in place (the rest it renames into place, which replaces a link, never
# follows it), and folders it writes into (the tokenizer it trains, the trackers' logs under the project name)
WRITTEN_FILES = (LOCK_FILE, LOG_FILE)
WRITTEN_FOLDERS = ("tokenizer", "hf_zoo_rnn")


class OutputDirError(ValueError):
    """The output folder is in use by another run, or holds a run this one would silently mix with."""


def check_output_dir(output_dir: Path) -> None:
    """The output folder, created if missing: a folder, not a symbolic link, that this process can write in."""
    if not str(output_dir):
        raise OutputDirError("--output_dir is empty: name the folder the run writes")
    if output_dir.is_symlink():
        raise OutputDirError(
            f"{output_dir} is a symbolic link (to {os.readlink(output_dir)}): the trainer never writes through one; "
            f"pass the folder itself, --output_dir {output_dir.resolve()}"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"{output_dir} is a file, not a folder: choose another --output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"cannot create {error.filename or output_dir}: {error.strerror}") from None


def check_written_paths(output_dir: Path) -> None:
    """Every place the trainer writes a file of its own is absent, a regular file, or a real folder without links."""
    for name in WRITTEN_FILES:
        path = output_dir / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise OutputDirError(
                f"{path} is {kind_of(path)}, not a file: the trainer writes only its own files; remove it"
            )
    for name in WRITTEN_FOLDERS:
        folder = output_dir / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise OutputDirError(f"{folder} is {kind_of(folder)}, not a folder: the trainer writes in it; remove it")
        for root, dirs, files in os.walk(folder):
            for entry in dirs + files:
                path = Path(root) / entry
                if path.is_symlink():
                    raise OutputDirError(f"{path} is {kind_of(path)}: the trainer never writes through one; remove it")


def kind_of(path: Path) -> str:
    if path.is_symlink():
        return f"a symbolic link (to {os.readlink(path)})"
    return "a folder" if path.is_dir() else "not a regular file"


def claim_output_dir(output_dir: Path) -> IO:
    """Lock `output_dir` for this process; the returned handle holds the lock until it is closed or the process ends."""
    check_output_dir(output_dir)
    check_written_paths(output_dir)
    path = output_dir / LOCK_FILE
    try:  # O_NOFOLLOW: a link put there since is refused, never written through; O_NONBLOCK: a FIFO cannot hang us
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        cause = "a symbolic link, never written through" if error.errno == errno.ELOOP else error.strerror
        raise OutputDirError(f"cannot create {path}: {cause}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputDirError(f"{path} is not a regular file: remove it")
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputDirError(
            f"{output_dir} is in use by another run ({holder}); wait for it to end or choose another --output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    try:
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        handle.flush()
    except OSError as error:
        handle.close()
        raise OutputDirError(f"cannot write {path}: {error.strerror}") from None
    return handle


def previous_run_files(output_dir: Path) -> list[Path]:
    return sorted(path for path in output_dir.iterdir() if RUN_FILES.match(path.name))


def check_fresh_start(output_dir: Path, overwrite: bool) -> None:
    """A new run (not a resume) into a folder that holds another run's files: refused, or with `overwrite` those
    files (and only those, by their exact names) are removed first."""
    found = previous_run_files(output_dir)
    if not found:
        return
    if not overwrite:
        names = ", ".join(path.name for path in found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputDirError(
            f"{output_dir} holds a previous run ({names}): continue it with --resume_from_checkpoint latest, start "
            "over with --overwrite_output_dir (which removes only these), or choose another --output_dir"
        )
    for path in found:
        try:
            remove(path)
        except OSError as error:
            raise OutputDirError(f"cannot remove {error.filename or path}: {error.strerror}") from None
