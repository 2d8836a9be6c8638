"""Checkpoint folders: written atomically, verified, found again, pruned.

A checkpoint is first written to `.tmp-checkpoint-N` by every process, then renamed to `checkpoint-N` by the main
process (with a disk per machine, every machine holds a whole checkpoint and its first process renames it): a crash
mid-save (even SIGKILL) leaves the previous checkpoints untouched and no half-written `checkpoint-N` that `latest`
could pick up. The last file written is `manifest.json`, the size and SHA-256 of every
other file: a checkpoint damaged after it was written (a disk fault, a partial copy) is refused at resume with the
file named, `latest` falls back to the newest checkpoint that verifies, and pruning never removes that one.

Nothing a checkpoint holds is trusted, whoever wrote it (a run folder may be downloaded or shared): its files are
validated before use (`checkpoint_problem`): the manifest must list exactly the regular files in the folder, by
relative paths inside it; a symbolic link is never followed; every JSON file must have the shape this version
writes, every safetensors header must be JSON whose offsets stay inside the file. Anything else is one line naming
the file and what is wrong, and `latest` falls back to the newest checkpoint that passes.

Nothing in a checkpoint can run code when it is loaded: the model is safetensors + JSON (transformers), and every
other state (the estimator's, data position, RNG) is `NAME.safetensors` for its tensors plus `NAME.json` for the rest
(`save_state` / `load_state`). Checkpoints of older versions hold pickles (`NAME.pt`): they are read with
`torch.load(weights_only=True)`, which refuses any object other than tensors and plain containers.
"""

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

# The files of a checkpoint. The model's and the tokenizer's are what save_pretrained writes, checked here before
# transformers reads them; each constant is named as transformers names its own.
MANIFEST = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# The other states are stems: save_state writes NAME.safetensors + NAME.json (older versions: NAME.pt).
# The estimator's state keeps the name "optimizer" that every checkpoint so far has on disk.
ESTIMATOR_STATE_NAME = "optimizer"
PROCESS_STATE_PREFIX = "process_"  # + the process's rank: process_state_name
PROCESS_STATE_FILE = re.compile(rf"^{PROCESS_STATE_PREFIX}\d+\.(json|pt)$")
# the JSON file of each state, which state_file_problem checks (an older version's NAME.pt is left to load_state)
STATE_DATA_FILE = re.compile(rf"^({ESTIMATOR_STATE_NAME}|{PROCESS_STATE_PREFIX}\d+)\.json$")
# every checkpoint holds one of each group (the first name: this version; the others: older versions), and the state
# of at least one process (with a disk per machine, a machine's checkpoint holds only its own processes' states)
REQUIRED_FILES = (
    (TRAINER_STATE_NAME,),
    (CONFIG_NAME,),
    (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME),
    (f"{ESTIMATOR_STATE_NAME}.json", f"{ESTIMATOR_STATE_NAME}.pt"),
    (TOKENIZER_FILE,),
)
# what a checkpoint holds only for resuming: pushed with hub_strategy=all_checkpoints, not to the model repo root
RESUME_ONLY = [f"{ESTIMATOR_STATE_NAME}.*", f"{PROCESS_STATE_PREFIX}*.*", TRAINER_STATE_NAME]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
# bytes per element of each safetensors dtype
DTYPE_BYTES = {
    dtype: size
    for size, dtypes in (
        (1, ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3")),
        (2, ("I16", "U16", "F16", "BF16")),
        (4, ("I32", "U32", "F32")),
        (8, ("I64", "U64", "F64")),
    )
    for dtype in dtypes
}


def process_state_name(rank: int) -> str:
    """The stem of process `rank`'s state (its data position and RNG)."""
    return f"{PROCESS_STATE_PREFIX}{rank}"


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
        except RecursionError:
            raise CheckpointError(f"{data_file} is nested too deep to be a checkpoint state") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
            raise CheckpointError(f"{data_file} or {tensor_file.name} is corrupt or incomplete: {error}") from error
    if legacy.is_file():
        try:
            return torch.load(legacy, weights_only=True, map_location=device)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{legacy} holds objects other than tensors and plain values, and unpickling them could run code: "
                "refused. Resume only checkpoints written by hf_zoo_rnn"
            ) from error
        except (OSError, RuntimeError, EOFError, ValueError) as error:
            raise CheckpointError(f"{legacy} is corrupt or incomplete: {error}") from error
    raise CheckpointError(f"{folder} has no {data_file.name}: it is not a complete checkpoint")


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-N entries of output_dir, oldest first: folders, and symbolic links by that name (never
    followed: checkpoint_problem names them)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and (p.is_symlink() or p.is_dir())
    ]
    return [path for _, path in sorted(found)]


def remove(path: Path) -> None:
    """Remove a file or folder the trainer wrote; a symbolic link in its place is removed, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


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


def read_json(path: Path) -> Any:
    """The JSON value in `path`; a file that is unreadable, not UTF-8, not JSON or nested too deep is a
    CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deep to be a checkpoint file") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text ({error.reason})") from None
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror})") from None


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", type(None): "null"}.get(type(value), type(value).__name__)


def is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_object(path: Path) -> dict:
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds {type_name(value)}, not a JSON object")
    return value


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header (its JSON, dtypes, shapes and offsets), or None. Only the
    header is read: a file that passes can be loaded without reading past its end."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            return f"{path} is not a safetensors file (its header length {length} is past the end of its {size} bytes)"
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (ValueError, RecursionError):
            return f"{path} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path}: its safetensors header holds {type_name(header)}, not an object"
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return f"{path}: its safetensors __metadata__ is not an object of text values"
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            return f"{path}: tensor {name!r} has no known dtype in its safetensors header"
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(is_count(n) for n in shape)):
            return f"{path}: tensor {name!r} has the shape {shape!r}, not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(n) for n in offsets)):
            return f"{path}: tensor {name!r} has the data_offsets {offsets!r}, not [begin, end]"
        begin, end = offsets
        if not begin <= end <= data_bytes:
            return f"{path}: tensor {name!r} lies at bytes {begin}-{end}, past the end of the file's {data_bytes}"
        if end - begin != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
            return f"{path}: tensor {name!r} takes {end - begin} bytes, not what its shape {shape} and dtype need"
    return None


def tensor_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors header that safetensors_problem accepted."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def inside(folder: Path, name: str) -> bool:
    """Whether `name` (a manifest entry, an index entry) is a relative path that stays inside its folder."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and name != "."


def model_folder_problem(folder: Path) -> str | None:
    """What stops a folder from loading as a trained model and its tokenizer, naming the file; None when it would
    load. Checks what transformers would read: config.json, every safetensors header, a sharded model's index, the
    tokenizer's files."""
    try:
        read_object(folder / CONFIG_NAME)
        index = folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            weight_map = read_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                return f"{index} has no weight_map object"
            for shard in sorted(set(map(str, weight_map.values()))):
                if not inside(folder, shard) or "/" in shard:
                    return f"{index} names {shard!r}, a file outside {folder}"
                if not (folder / shard).is_file():
                    return f"{folder / shard} is missing (named by {index.name})"
        elif not (folder / SAFE_WEIGHTS_NAME).is_file():
            return f"{folder} holds no weights (no {SAFE_WEIGHTS_NAME})"
        for path in sorted(folder.glob("*.safetensors")):
            if (problem := safetensors_problem(path)) is not None:
                return problem
        return tokenizer_problem(folder)
    except CheckpointError as error:
        return str(error)


def tokenizer_problem(folder: Path) -> str | None:
    """The tokenizer files of a trained folder: tokenizer.json (what every tokenizer hf_zoo_rnn trains saves, and
    every fast tokenizer), and the JSON files beside it."""
    from tokenizers import Tokenizer

    main = folder / TOKENIZER_FILE
    if not main.is_file():
        return f"{folder} has no tokenizer: {main.name} is missing (copy the tokenizer files the run saved with it)"
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (folder / name).is_file():
            read_object(folder / name)
    try:
        Tokenizer.from_str(json.dumps(read_object(main)))
    except CheckpointError:
        raise
    except Exception as error:  # tokenizers raises a plain Exception for a file it cannot read
        return f"{main} is not a tokenizer file ({str(error).splitlines()[0]})"
    return None


def trainer_state_problem(folder: Path) -> str | None:
    """trainer_state.json must hold what this version writes: counters, history, world_size (and data and run)."""
    path = folder / TRAINER_STATE_NAME
    state = read_object(path)
    counters = state.get("counters")
    if not isinstance(counters, dict) or not all(is_count(counters.get(k)) for k in ("step", "tokens")):
        return f"{path}: counters must be an object of counts (step, tokens, ...), found {counters!r:.80}"
    if not all(is_count(v) for v in counters.values()):
        return f"{path}: every counter must be a whole number >= 0"
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        return f"{path}: history must be a list of objects, found {type_name(history)}"
    if not is_count(state.get("world_size"), least=1):
        return f"{path}: world_size must be a whole number >= 1, found {state.get('world_size')!r:.40}"
    for key in ("data", "run"):
        if not isinstance(state.get(key, {}), dict):
            return f"{path}: {key} must be an object, found {type_name(state[key])}"
    match = CHECKPOINT_PATTERN.match(folder.name)
    if match and int(match.group(1)) != counters["step"]:
        return f"{path} is of step {counters['step']}, not of {folder.name}"
    return None


def state_file_problem(folder: Path, name: str) -> str | None:
    """NAME.json + NAME.safetensors as save_state writes them; process files hold {"data": ..., "rng": ...}."""
    data_file, tensor_file = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not data_file.is_file():
        return None  # an older version's NAME.pt: load_state reads it with weights_only
    if not tensor_file.is_file():
        return f"{tensor_file} is missing"
    value = read_json(data_file)
    if (problem := safetensors_problem(tensor_file)) is not None:
        return problem
    if not name.startswith(PROCESS_STATE_PREFIX):
        return None if isinstance(value, dict) else f"{data_file} holds {type_name(value)}, not a JSON object"
    if not isinstance(value, dict) or not isinstance(value.get("data"), dict) or "rng" not in value:
        return f"{data_file} must be an object with data (an object) and rng, found {json.dumps(value)[:80]}"
    rng = value["rng"]
    shapes = tensor_shapes(tensor_file)
    expected = ("U8", list(torch.get_rng_state().shape))
    if not (isinstance(rng, dict) and shapes.get(rng.get(TENSOR)) == expected):
        return f"{data_file}: rng must name a uint8 tensor of {expected[1][0]} bytes in {tensor_file.name}"
    return None


def listed_files(folder: Path) -> tuple[set[str], list[str]]:
    """(the regular files under `folder` as relative paths, the symbolic links there), never following a link."""
    files, links = set(), []
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            if path.is_symlink():
                links.append(str(path))
            elif name in names:
                files.add(path.relative_to(folder).as_posix())
    return files, sorted(links)


def manifest_problem(folder: Path, files: set[str]) -> str | None:
    """The manifest must list exactly the files present, by relative paths inside the folder, each with its size
    and hash: an empty or partial manifest is a damaged checkpoint."""
    manifest = folder / MANIFEST
    entries = read_object(manifest).get("files")
    if not isinstance(entries, dict):
        return f"{manifest} has no files object"
    if not entries:
        return f"{manifest} lists no files"
    for name, entry in entries.items():
        if not inside(folder, name):
            return f"{manifest} names {name!r}, a path outside {folder}: refused"
        if not (isinstance(entry, dict) and is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
            return f"{manifest}: the entry of {name!r} is not {{bytes, sha256}}"
    missing = sorted(set(entries) - files)
    if missing:
        return f"{folder / missing[0]} is missing"
    unlisted = sorted(files - set(entries) - {MANIFEST})
    if unlisted:
        return f"{folder / unlisted[0]} is not in {MANIFEST} (a partial manifest: the checkpoint is damaged)"
    for name, entry in sorted(entries.items()):
        path = folder / name
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            return f"{path} does not match the checksum recorded when it was saved (the file was damaged since)"
    return None


def checkpoint_problem(folder: Path, follow_links: bool = False) -> str | None:
    """Why the checkpoint cannot be trusted, in one line naming the file; None when every file matches its manifest
    entry and has the shape this version writes. A symbolic link (the folder, or in it) is refused unless
    `follow_links` (a Hub checkpoint in the Hugging Face cache, whose files are links to its blobs). A checkpoint
    written before manifests existed cannot be verified: it is accepted with a warning if its files are sound."""
    if folder.is_symlink() and not follow_links:
        return f"{folder} is a symbolic link (to {os.readlink(folder)}): a checkpoint is a folder, never followed"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    files, links = listed_files(folder)
    if follow_links:
        files |= {Path(link).relative_to(folder).as_posix() for link in links if Path(link).is_file()}
    elif links:
        return f"{links[0]} is a symbolic link: a checkpoint holds only its own files, never followed"
    for group in REQUIRED_FILES:
        if not files & set(group):
            return f"{folder / group[0]} is missing: {folder.name} is not a complete checkpoint"
    if not any(PROCESS_STATE_FILE.match(name) for name in files):
        expected = f"{PROCESS_STATE_PREFIX}N.json"
        return f"{folder} holds no process state ({expected}): {folder.name} is not a complete checkpoint"
    try:
        if (folder / MANIFEST).is_file():
            if (problem := manifest_problem(folder, files)) is not None:
                return problem
        else:
            logger.warning("%s has no %s (written by an older version): its files cannot be verified", folder, MANIFEST)
        names = sorted({name.split(".")[0] for name in files if STATE_DATA_FILE.match(name)})
        problems = (
            trainer_state_problem(folder),
            model_folder_problem(folder),
            *(state_file_problem(folder, name) for name in names),
        )
    except CheckpointError as error:
        return str(error)
    return next((p for p in problems if p is not None), None)


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
        problem = write_problem(lambda: (remove(staging), staging.mkdir()))  # left by a crash during an earlier save
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
            write_problem(lambda: remove(staging))
        found = next(p for p in problems if p)
        raise CheckpointError(f"could not save {target}: {found}; the earlier checkpoints are intact")


def publish_atomically(output_dir: Path, write: Callable[[Path], None]) -> None:
    """Write files into a staging folder, then move each into `output_dir`: a write that fails (a full disk) leaves
    what `output_dir` held before, and no half-written file, and removes the staging folder."""
    staging = output_dir / ".tmp-final"
    problem = write_problem(lambda: (remove(staging), staging.mkdir(), write(staging)))
    if problem is None:  # a rename replaces a symbolic link in the way, never writes through it
        problem = write_problem(lambda: move_files(staging, output_dir))
    write_problem(lambda: remove(staging))
    if problem is not None:
        raise CheckpointError(f"could not save the final model in {output_dir}: {problem}; its checkpoints are intact")


def move_files(staging: Path, output_dir: Path) -> None:
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        destination = output_dir / path.relative_to(staging)
        for parent in reversed(destination.relative_to(output_dir).parents[:-1]):
            if (output_dir / parent).is_symlink():
                raise OSError(f"{output_dir / parent} is a symbolic link: the trainer writes only inside {output_dir}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)


def seal(staging: Path, target: Path) -> None:
    write_manifest(staging)
    if target.is_symlink() or target.exists():
        remove(target)
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
            remove(folder)  # a checkpoint-N symbolic link goes as a link: what it points to stays
