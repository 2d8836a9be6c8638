"""Checkpoint folders: written atomically, verified, found again, pruned.

A checkpoint is first written to `.tmp-checkpoint-N` by every process, then renamed to `checkpoint-N` by the main
process (with a disk per machine, every machine holds a whole checkpoint and its first process renames it): a crash
mid-save (even SIGKILL) leaves the previous checkpoints untouched and no half-written `checkpoint-N` that `latest`
could pick up. The last file written is `manifest.json`, the size and SHA-256 of every
other file: a checkpoint damaged after it was written (a disk fault, a partial copy) is refused at resume with the
file named, `latest` falls back to the newest checkpoint that verifies, and pruning never removes that one.
"""

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"

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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in the folder (call once every file is written)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint cannot be trusted, naming the file; None when every file matches its manifest entry.
    A checkpoint written before manifests existed cannot be verified: it is accepted with a warning."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        logger.warning("%s has no %s (written by an older version): its files cannot be verified", folder, MANIFEST)
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        return f"{manifest} is unreadable ({error})"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            return f"{path} does not match the checksum recorded when it was saved (the file was damaged since)"
    return None


def latest_checkpoint(output_dir: Path, known_good: Path | None = None) -> Path | None:
    """The newest checkpoint that verifies; newer ones that do not are named in a warning and skipped.
    `known_good` is one the caller has just written (its manifest was computed from it): it is not hashed again."""
    for folder in reversed(checkpoints(output_dir)):
        if folder == known_good:
            return folder
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("%s does not verify: %s", folder.name, problem)
    return None


def write_atomically(target: Path, write: Callable[[Path], None], accelerator, owner: bool) -> None:
    """Every process writes its files into the staging folder, which its `owner` (the main process, or with a disk
    per machine each machine's first process) creates, seals with the manifest and renames."""
    staging = target.parent / f".tmp-{target.name}"
    if owner:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(staging)
    accelerator.wait_for_everyone()
    if owner:
        write_manifest(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    accelerator.wait_for_everyone()


def verified_steps(output_dir: Path) -> list[int]:
    """The steps of the checkpoints here that verify, oldest first."""
    return [
        int(CHECKPOINT_PATTERN.match(p.name).group(1)) for p in checkpoints(output_dir) if checkpoint_problem(p) is None
    ]


def prune_checkpoints(output_dir: Path, keep: int, known_good: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints, and always the newest one that verifies (see latest_checkpoint)."""
    old = checkpoints(output_dir)[:-keep] if keep > 0 else []
    if not old:
        return
    keep_also = latest_checkpoint(output_dir, known_good)
    for folder in old:
        if folder != keep_also:
            shutil.rmtree(folder)
