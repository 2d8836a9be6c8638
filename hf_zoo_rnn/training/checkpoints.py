"""Checkpoint folders: written atomically, verified, found again, pruned.

A checkpoint is first written to `.tmp-checkpoint-N` by every process, then renamed to `checkpoint-N` by the main
process (with a disk per machine, every machine holds a whole checkpoint and its first process renames it): a crash
mid-save (even SIGKILL) leaves the previous checkpoints untouched and no half-written `checkpoint-N` that `latest`
could pick up. The last file written is `manifest.json`, the size and SHA-256 of every
other file: a checkpoint damaged after it was written (a disk fault, a partial copy) is refused at resume with the
file named, `latest` falls back to the newest checkpoint that verifies, and pruning never removes that one.

Nothing in a checkpoint can run code when it is loaded: the model is safetensors + JSON (transformers), and every
other state (optimizer, data position, RNG) is `NAME.safetensors` for its tensors plus `NAME.json` for the rest
(`save_state` / `load_state`). Checkpoints of older versions hold pickles (`NAME.pt`): they are read with
`torch.load(weights_only=True)`, which refuses any object other than tensors and plain containers.
"""

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the requested run."""


# JSON has objects with string keys, lists and plain values; these tags stand for what it lacks.
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def encode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-ready data; every tensor moves into `tensors` and is replaced by a reference to it."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [encode_state(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode_state(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {TENSOR, TUPLE, ITEMS} & value.keys():
            return {k: encode_state(v, tensors) for k, v in value.items()}
        return {ITEMS: [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"a checkpoint stores tensors and plain values only, not {type(value).__name__}: {value!r}")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(decode_state(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value[ITEMS]}
    return {k: decode_state(v, tensors) for k, v in value.items()}


def save_state(state: Any, folder: Path, name: str) -> None:
    """`state` (nested dicts, lists and tuples of tensors and plain values) as NAME.safetensors + NAME.json."""
    tensors: dict[str, torch.Tensor] = {}
    data = encode_state(state, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(data))


def load_state(folder: Path, name: str, device: str = "cpu") -> Any:
    """What `save_state` wrote (or an older version's NAME.pt, unpickled with weights_only=True). Anything that is
    not such a state is a CheckpointError naming the file."""
    data_file, tensor_file, legacy = (folder / f"{name}{suffix}" for suffix in (".json", ".safetensors", ".pt"))
    if data_file.is_file():
        try:
            return decode_state(json.loads(data_file.read_text()), load_file(tensor_file, device=device))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            raise CheckpointError(f"{data_file} or {tensor_file.name} is corrupt or incomplete: {error}") from error
    if legacy.is_file():
        try:
            return torch.load(legacy, weights_only=True, map_location=device)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{legacy} holds objects other than tensors and plain values, and unpickling them could run code: "
                "refused. Resume only checkpoints written by hf_zoo_rnn"
            ) from error
        except (OSError, RuntimeError, EOFError) as error:
            raise CheckpointError(f"{legacy} is corrupt or incomplete: {error}") from error
    raise CheckpointError(f"{folder} has no {data_file.name}: it is not a complete checkpoint")


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


def write_problem(action: Callable[[], None]) -> str | None:
    """Run a write; what went wrong (a full disk, a read-only folder), or None."""
    try:
        action()
    except (OSError, SafetensorError) as error:
        return str(error)
    return None


def write_atomically(target: Path, write: Callable[[Path], None], accelerator, owner: bool) -> None:
    """Every process writes its files into the staging folder, which its `owner` (the main process, or with a disk
    per machine each machine's first process) creates, seals with the manifest and renames. If any process cannot
    write (a full disk), every process raises the same CheckpointError and the staging folder is removed: the
    earlier checkpoints stay as they were."""
    staging = target.parent / f".tmp-{target.name}"
    problem = None
    if owner:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
        problem = write_problem(lambda: staging.mkdir(parents=True))
    accelerator.wait_for_everyone()
    if problem is None and staging.is_dir():
        problem = write_problem(lambda: write(staging))
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
    if owner and not any(problems):
        problems.append(write_problem(lambda: seal(staging, target)))
    if accelerator.num_processes > 1:
        problems = gather_object(problems)
    if any(problems):
        if owner:
            shutil.rmtree(staging, ignore_errors=True)
        found = next(p for p in problems if p)
        raise CheckpointError(f"could not save {target}: {found}; the earlier checkpoints are intact")


def publish_atomically(output_dir: Path, write: Callable[[Path], None]) -> None:
    """Write files into a staging folder, then move each into `output_dir`: a write that fails (a full disk) leaves
    what `output_dir` held before, and no half-written file, and removes the staging folder."""
    staging = output_dir / ".tmp-final"
    shutil.rmtree(staging, ignore_errors=True)
    problem = write_problem(lambda: (staging.mkdir(parents=True), write(staging)))
    if problem is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not save the final model in {output_dir}: {problem}; its checkpoints are intact")
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        destination = output_dir / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    shutil.rmtree(staging)


def seal(staging: Path, target: Path) -> None:
    write_manifest(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


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
