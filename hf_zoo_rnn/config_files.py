"""YAML config files: read them strictly, so a typo is an error naming the file and key, never a silent default."""

import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.errors import StrictDataclassError

from .configuration_zoo_rnn import ZooRnnConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package: configs/ in a checkout


class ConfigFileError(ValueError):
    """A config file is missing, unreadable, or holds a key or value that does not fit."""


def command_name() -> str:
    """The running command, for one-line errors: generate.py, hf-zoo-rnn-generate, train.py under accelerate ..."""
    return Path(sys.argv[0]).name


def config_path(name_or_path: str | Path, kind: str) -> Path:
    """A YAML file by path, or a built-in one of `kind` ("model", "train", "accelerate") by name (`tiny`) or by
    its path in a checkout (`configs/model/tiny.yaml`), so both work from an installed package anywhere."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / kind / f"{path.name}.yaml", CONFIG_DIR / kind / path.name):
        if path.parent in (Path("."), Path("configs") / kind) and candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml")))
    raise ConfigFileError(f"config file not found: {name_or_path} (built-in {kind} configs: {names})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping stored in a YAML file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def check_known_keys(values: dict[str, Any], known: set[str], source: str, target: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigFileError(f"{source}: unknown key(s) {unknown} for {target}; known keys: {sorted(known)}")


def model_config_fields() -> set[str]:
    return {field.name for field in dataclasses.fields(ZooRnnConfig) if not field.name.startswith("_")}


def model_config_from_dict(values: dict[str, Any], source: str = "model config") -> ZooRnnConfig:
    """Build a ZooRnnConfig; unknown keys and invalid values raise ConfigFileError naming `source`."""
    check_known_keys(values, model_config_fields(), source, "ZooRnnConfig")
    try:
        return ZooRnnConfig(**values)
    except (StrictDataclassError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())  # strict-dataclass messages span lines
        raise ConfigFileError(f"{source}: {reason}") from error


def load_model_config(name_or_path: str | Path) -> ZooRnnConfig:
    """A ZooRnnConfig from a YAML file such as configs/model/tiny.yaml, or a built-in one by name (tiny)."""
    path = config_path(name_or_path, "model")
    return model_config_from_dict(read_yaml(path), source=str(path))
