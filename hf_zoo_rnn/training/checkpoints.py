"""Checkpoint folders: written atomically, found again, pruned.

A checkpoint is first written to `.tmp-checkpoint-N` by every process, then renamed to `checkpoint-N` by the main
process: a crash mid-save (even SIGKILL) leaves the previous checkpoints untouched and no half-written
`checkpoint-N` that `latest` could pick up.
"""

import re
import shutil
from collections.abc import Callable
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the requested run."""


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def write_atomically(target: Path, write: Callable[[Path], None], accelerator) -> None:
    staging = target.parent / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    accelerator.wait_for_everyone()


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
