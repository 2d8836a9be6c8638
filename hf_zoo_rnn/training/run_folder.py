"""Who owns an output folder: one run at a time, and never a previous run's files by accident.

The process that writes a folder's shared files holds an exclusive `flock` on `output_dir/.run.lock` for the whole
run. The kernel releases it when the process ends, however it ends (SIGKILL included), so a lock is never stale and a
second run into the same folder — by hand, or a scheduler restarting a preempted job beside one still running — is
refused at once. A folder that holds another run's checkpoints or log is refused too, unless the run resumes it
(`--resume_from_checkpoint`) or starts over (`--overwrite_output_dir`, which removes that run's checkpoints and log
first, so they can be neither pruned as "older" nor resumed by mistake).
"""

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".run.lock"
# what a run leaves that a later run would otherwise mistake for its own
RUN_FILES = ("checkpoint-*", ".tmp-*", ".hub-push-*", "metrics.jsonl", "trainer_state.json")


class OutputDirError(ValueError):
    """The output folder is in use by another run, or holds a run this one would silently mix with."""


def claim_output_dir(output_dir: Path) -> IO:
    """Lock `output_dir` for this process; the returned handle holds the lock until it is closed or the process ends."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputDirError(
            f"{output_dir} is in use by another run ({holder}); wait for it to end or choose another --output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
    handle.flush()
    return handle


def previous_run_files(output_dir: Path) -> list[Path]:
    return sorted(path for pattern in RUN_FILES for path in output_dir.glob(pattern))


def check_fresh_start(output_dir: Path, overwrite: bool) -> None:
    """A new run (not a resume) into a folder that holds another run's files: refused, or with `overwrite` those
    files are removed first."""
    found = previous_run_files(output_dir)
    if not found:
        return
    if not overwrite:
        names = ", ".join(path.name for path in found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputDirError(
            f"{output_dir} holds a previous run ({names}): continue it with --resume_from_checkpoint latest, start "
            "over with --overwrite_output_dir, or choose another --output_dir"
        )
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
