"""What a run trains, assembled before its first step: the tokenizer (given, loaded, or trained once on the data and
shared with every process) and the model (given, loaded from a checkpoint or --init_from, or built from a model
config), checked to fit each other."""

from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config_files import load_model_config, model_config_from_dict
from ..configuration_zoo_rnn import ZooRnnConfig
from ..data import build_tokenizer, text_pieces
from ..modeling_zoo_rnn import ZooRnnForCausalLM
from .checkpoints import CheckpointError
from .streams import text_source

DEFAULT_MODEL = {"cell": "lstm", "embedding_size": 128, "num_heads": 4, "head_dim": 64, "num_hidden_layers": 1}
ARCHITECTURE = ("cell", "vocab_size", "embedding_size", "num_heads", "head_dim", "num_hidden_layers")
ARCHITECTURE += ("layer_norm", "residual")


def load_tokenizer(args, accelerator, output_dir: Path, *, resume_dir: Path | None, per_machine: bool, given=None):
    """The run's tokenizer: `given` (ESTrainer's) on a fresh run, a checkpoint's or --init_from's, else trained once
    by the main process on the data (tasks are character level) and saved in output_dir/tokenizer, which the other
    processes load (on other machines, after it is sent to them)."""
    if given is not None and resume_dir is None:
        return given
    source = resume_dir or args.model.init_from
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    data = args.data
    kind = "char" if data.task and data.tokenizer == "bpe" else data.tokenizer
    tokenizer_dir = output_dir / "tokenizer"
    files = None
    if accelerator.is_main_process:
        texts = () if kind != "bpe" else text_pieces(text_source(data, validation=False))
        tokenizer = build_tokenizer(kind, texts, data.tokenizer_vocab_size, data.tokenizer_sample_chars)
        files = {path.name: path.read_bytes() for path in map(Path, tokenizer.save_pretrained(tokenizer_dir))}
    if per_machine:  # the other machines cannot read the main process's disk: send them the files
        files = broadcast_object_list([files])[0]
        if accelerator.is_local_main_process and not accelerator.is_main_process:
            tokenizer_dir.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                (tokenizer_dir / name).write_bytes(content)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def model_config(model_args, tokenizer) -> ZooRnnConfig:
    """--model_config's architecture (default: DEFAULT_MODEL), sized to the tokenizer."""
    values, source = dict(DEFAULT_MODEL), "the default model"
    if model_args.model_config:
        config = load_model_config(model_args.model_config)
        values, source = config.to_diff_dict(), model_args.model_config
        values.pop("model_type", None)
        values.pop("transformers_version", None)
    values.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return model_config_from_dict(values, source)


def load_model(model_args, tokenizer, device: torch.device, *, resume_dir: Path | None, given=None):
    """The model to train, on `device`: `given` (ESTrainer's object, a resume loads its checkpoint into it), a
    checkpoint's or --init_from's (of --model_config's architecture when both are given), else a new one built from
    --model_config (every process builds it from the same seed)."""
    if given is not None:
        if resume_dir is not None:
            given.load_state_dict(AutoModelForCausalLM.from_pretrained(resume_dir).state_dict())
        return given.to(device)
    name = model_args.dtype
    if name == "auto":  # bf16 halves GPU memory; on CPU bf16 matmuls are ~2x slower than fp32
        name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, name)
    init_only = model_args.init_from is not None and not model_args.model_config
    expected = None if init_only else model_config(model_args, tokenizer)
    source = resume_dir or model_args.init_from
    if source is None:
        return ZooRnnForCausalLM(expected).to(dtype).to(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot load the model from {source}: {error}") from error
    if len(tokenizer) != model.config.vocab_size:
        raise CheckpointError(
            f"{source}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    if expected is not None:
        check_same_architecture(expected, model.config, source)
    return model.to(device)


def check_same_architecture(expected: ZooRnnConfig, found: ZooRnnConfig, source) -> None:
    differing = [
        f"{name}: requested {getattr(expected, name)}, checkpoint {getattr(found, name)}"
        for name in ARCHITECTURE
        if getattr(expected, name) != getattr(found, name)
    ]
    if differing:
        raise CheckpointError(f"{source} holds a different model than requested ({'; '.join(differing)})")
