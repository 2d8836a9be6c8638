"""Training arguments: dataclasses parsed by transformers' HfArgumentParser from a YAML file plus CLI overrides.

Their field defaults are the embedded default run, and the only defaults a run has: each is set where its value is
owned (an estimator's options in its module under hf_zoo_rnn/estimators, the zero-order ones by ZOConfig). `--estimator`
chooses how a step trains; zero-order options carry a `zo_` prefix (`--zo_num_probes`, `--zo_lr`, ...:
ZeroOrderArguments, made from hf_zoo_rnn.zo.ZOConfig). A retired or unprefixed name is an error naming the new one.

`scripts/train.py --config configs/train/x.yaml --max_steps 10` (or `--config x`, a built-in one by name): the YAML
sets defaults, the command line wins.
A key that no dataclass declares is an error naming the file and the key.
"""

import logging
import sys
import types
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from transformers import HfArgumentParser

from ..config_files import ConfigFileError, check_known_keys, config_path, read_yaml
from ..data.corpus import VALIDATION_FRACTION
from ..estimators import ARGUMENT_GROUPS, ESTIMATORS, RunArguments
from ..estimators.probes import ProbeArguments
from ..zo import ZOConfig

HUB_STRATEGIES = ("end", "every_save", "all_checkpoints")
logger = logging.getLogger(__name__)
CHECKPOINT_STORAGES = ("auto", "shared", "per_machine")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class ModelArguments:
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "a model YAML, or a built-in one by name (tiny, small, ...; configs/model); default: a 1-layer LSTM, 4 heads x 64, embedding 128"
        },
    )
    init_from: str | None = field(default=None, metadata={"help": "start from a trained folder or Hub repo"})
    dtype: str = field(
        default="auto", metadata={"help": "weights: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16"}
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default="kjv", metadata={"help": "kjv (built in), a local .txt/.jsonl/.parquet file or glob, or a Hub dataset"}
    )
    task: str | None = field(
        default=None, metadata={"help": "a paper task instead of text: copy, reverse, sort, repeat_copy, add"}
    )
    validation_dataset: str | None = field(
        default=None, metadata={"help": "data to validate on, named like dataset (default: a held-out part of it)"}
    )
    validation_fraction: float = field(
        default=VALIDATION_FRACTION,
        metadata={
            "help": "documents held out for validation from a local dataset or a Hub dataset without a validation "
            "split, chosen by a hash of their text (0: validate on the training data)"
        },
    )
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    document_column: str | None = field(
        default=None, metadata={"help": "rows sharing this column's value form one document"}
    )
    tokenizer: str = field(
        default="bpe", metadata={"help": "bpe (trained on the data), char, or a tokenizer path/Hub name"}
    )
    tokenizer_vocab_size: int = field(default=512, metadata={"help": "vocabulary of a trained BPE"})
    tokenizer_sample_chars: int = field(
        default=1_000_000, metadata={"help": "characters of the stream the BPE is trained on"}
    )
    context_length: int = field(default=128, metadata={"help": "tokens per packed block (text data)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per batch (per process with per_rank_batches)"})
    per_rank_batches: bool = field(
        default=False, metadata={"help": "each process its own batch (default: all share one, as the paper)"}
    )
    task_max_length: int = field(default=10, metadata={"help": "L: training lengths U[2, L], validation U[L+1, L+50]"})
    curriculum_threshold: float | None = field(
        default=None, metadata={"help": "grow L by 1 when the train loss stays below this"}
    )
    curriculum_max_length: int = field(default=64, metadata={"help": "upper bound of the curriculum's L"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches per evaluation"})
    task_eval_examples: int = field(
        default=16, metadata={"help": "examples per exact-match evaluation of a task (in and out of distribution)"}
    )
    fixed_batch: bool = field(
        default=False, metadata={"help": "train on the first batch every step (the paper's overfitting setting)"}
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": "objective=reward: add or reverse (a task's inputs), kjv (verse openings), or a dataset"},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "a prompt dataset's prompt column"})
    prompt_words: int = field(default=4, metadata={"help": "words of a KJV verse that make its prompt"})


@dataclass
class TrainArguments(*reversed(ARGUMENT_GROUPS)):
    """The run's options, and every estimator's own group (its dataclass lives beside it in hf_zoo_rnn/estimators,
    named by its EstimatorSpec)."""

    output_dir: str = field(default="outputs/default", metadata={"help": "checkpoints, logs and the final model"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start a new run in an output_dir that holds another run: its checkpoints and log go first"},
    )
    estimator: str = field(
        default="one_step",
        metadata={
            "help": f"how a step turns a batch into an update: {', '.join(ESTIMATORS)} (the default: every parameter's "
            "exact gradient through one recurrent step, no backpropagation through time). Each reads its own "
            "options (local_*, zo_*, bptt_*, the reward options): README.md, 'Estimator'"
        },
    )
    max_steps: int = field(default=3000, metadata={"help": "optimisation steps"})
    seed: int = field(
        default=0,
        metadata={"help": "run seed: the initial weights, the data order, every probe's z and every sampling seed"},
    )
    stop_at_train_loss: float | None = field(
        default=None, metadata={"help": "end training early once the train loss is below this (overfitting runs)"}
    )
    max_train_seconds: float | None = field(
        default=None,
        metadata={"help": "also stop once the training steps took this long (evaluation excluded): equal-time runs"},
    )
    logging_steps: int = field(default=10, metadata={"help": "log metrics every N steps"})
    eval_steps: int = field(default=100, metadata={"help": "evaluate every N steps (0: only at the end)"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    checkpoint_storage: str = field(
        default="auto",
        metadata={
            "help": "shared (one filesystem: the main process writes the shared files), per_machine (each machine's "
            "first process writes a whole checkpoint to its own disk, as HF Trainer's save_on_each_node), or auto: "
            "per_machine when some process cannot see the main process's output_dir"
        },
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "safetensors shard size of saved models (big models shard)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint folder, or 'latest' in output_dir"}
    )
    max_skipped_steps: int = field(
        default=10,
        metadata={"help": "stop with an error after this many skipped steps in a row (NaN losses; 0: never)"},
    )
    checksum_steps: int = field(
        default=50, metadata={"help": "compare parameter checksums across processes every N steps"}
    )
    log_with: str = field(default="tensorboard", metadata={"help": "accelerate tracker(s), comma separated, or 'none'"})
    push_to_hub: bool = field(
        default=False, metadata={"help": "push the model (and checkpoints, per hub_strategy) to the Hub"}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "owner/name of the repo (default: your user / output_dir's name)"}
    )
    hub_private: bool = field(default=False, metadata={"help": "create the repo private"})
    hub_strategy: str = field(
        default="every_save",
        metadata={"help": "end, every_save (model at each save) or all_checkpoints (with resume state)"},
    )
    hub_token: str | None = field(default=None, metadata={"help": "token (default: HF_TOKEN or the saved login)"})
    hub_retries: int = field(default=5, metadata={"help": "retries of a failed push (exponential back-off)"})
    hub_retry_seconds: float = field(default=2.0, metadata={"help": "first back-off wait"})
    hub_timeout: float = field(
        default=600.0,
        metadata={"help": "seconds the run's end waits for its pushes; a final push unfinished by then has failed"},
    )

    @property
    def objective(self) -> str:
        """What the estimator trains on: lm (the data's next-token loss) or reward (rewards of prompts' completions)."""
        return ESTIMATORS[self.estimator].objective


ZERO_ORDER_OPTIONS = [f.name for f in fields(ZOConfig) if f.name != "seed"]  # the seed is the run's


def zero_order_field(option):
    return f"zo_{option.name}", option.type, field(default=option.default, metadata=option.metadata)


ZeroOrderArguments = make_dataclass(
    "ZeroOrderArguments", [zero_order_field(f) for f in fields(ZOConfig) if f.name in ZERO_ORDER_OPTIONS]
)
ZeroOrderArguments.__doc__ = "Every ZOConfig setting but the seed, as a zo_-prefixed argument with ZOConfig's default."
ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments, ZeroOrderArguments)


def zero_order_config(zo_args, seed: int) -> ZOConfig:
    """The ZOConfig of the run; an invalid combination is one ConfigFileError naming the zo_ options."""
    try:
        return ZOConfig(**{name: getattr(zo_args, f"zo_{name}") for name in ZERO_ORDER_OPTIONS}, seed=seed)
    except ValueError as error:
        message = str(error)
        for name in ZERO_ORDER_OPTIONS:
            message = message.replace(f"ZOConfig.{name}", f"zo_{name}")
        raise ConfigFileError(message.replace("ZOConfig: ", "")) from None


def check_renamed(names, where: str) -> None:
    """An unprefixed zero-order option (num_probes, lr, ...) is one error naming its new name."""
    renamed = sorted(name for name in names if name in ZERO_ORDER_OPTIONS)
    if renamed:
        new = ", ".join(f"{name} -> zo_{name}" for name in renamed)
        raise ConfigFileError(f"{where}: zero-order options carry a zo_ prefix now ({new})")


RETIRED = ("optimizer", "local_gradient", "objective")  # one --estimator choice replaced these


def estimator_meant(values: dict) -> str:
    """The --estimator (and its options) that a combination of the retired optimizer / local_gradient / objective
    options (and zo_num_probes) meant."""
    optimizer = str(values.get("optimizer", "zo"))
    if optimizer.startswith("bptt_"):
        return f"--estimator bptt --bptt_optimizer {optimizer.removeprefix('bptt_')}"
    if values.get("objective") == "reward":
        return "--estimator es"
    local = str(values.get("local_gradient", "one_step"))
    if local == "none":
        return "--estimator probes"
    if int(values.get("zo_num_probes", 0) or 0) > 0:  # probes beside a local gradient: the hybrid
        return f"--estimator hybrid --local_scope {local}"
    return f"--estimator {local}"


def check_retired(values: dict, where: str) -> None:
    """optimizer / local_gradient / objective are one error naming the --estimator they mean."""
    retired = [name for name in RETIRED if name in values]
    if retired:
        raise ConfigFileError(
            f"{where}: {', '.join(retired)} {'is' if len(retired) == 1 else 'are'} replaced by one --estimator choice: "
            f"use {estimator_meant(values)} (scripts/train.py --help)"
        )


def command_line_values(argv: list[str]) -> dict:
    """`--name value` and `--name=value` pairs of a command line, as given (a flag without a value maps to True)."""
    values = {}
    for index, arg in enumerate(argv):
        if arg.startswith("--"):
            name, equals, value = arg[2:].partition("=")
            following = argv[index + 1] if index + 1 < len(argv) else None
            values[name] = value if equals else (following if following and not following.startswith("--") else True)
    return values


def parse_arguments(argv: list[str] | None = None) -> RunArguments:
    """The run's arguments (model, data, train, ZOConfig) from `--config FILE` and the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = command_line_values(argv)
    values = {}
    check_renamed(given, "the command line")
    check_retired(given, "the command line")
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ConfigFileError("--config needs a file path")
        path = str(config_path(argv[index + 1], "train"))
        del argv[index : index + 2]
        values = read_yaml(path)
        check_renamed(values, path)
        check_retired(values, path)
        hints = {name: hint for cls in ARGUMENT_CLASSES for name, hint in typing.get_type_hints(cls).items()}
        check_known_keys(values, set(hints), path, "scripts/train.py (see --help)")
        parser.set_defaults(**{key: typed_value(key, value, hints[key], path) for key, value in values.items()})
    model_args, data_args, train_args, zo_args = parser.parse_args_into_dataclasses(args=argv)
    args = RunArguments(model_args, data_args, train_args, zero_order_config(zo_args, train_args.seed))
    check_choices(args)
    ignored = ignored_options([*values, *given], train_args.estimator)
    if ignored:
        groups: dict[str, list[str]] = {}  # the estimators that read them -> the options
        for option, readers in ignored.items():
            groups.setdefault(", ".join(readers), []).append(option)
        listed = "; ".join(f"{', '.join(options)} (read by {readers})" for readers, options in groups.items())
        logger.warning("--estimator %s does not read %s: ignored", train_args.estimator, listed)
    return args


def ignored_options(given, estimator: str) -> dict[str, list[str]]:
    """The options among `given` that belong to other estimators' groups -> the estimators that read them (the
    zo_ options go with the probes' group)."""
    readers: dict[str, list[str]] = {}
    for name, spec in ESTIMATORS.items():
        for group in spec.arguments:
            options = [f.name for f in fields(group)]
            options += [f.name for f in fields(ZeroOrderArguments)] if group is ProbeArguments else []
            for option in options:
                readers.setdefault(option, []).append(name)
    return {
        option: readers[option] for option in dict.fromkeys(given) if estimator not in readers.get(option, [estimator])
    }


def typed_value(key: str, value, hint, path: str):
    """A YAML value checked against its field's type `hint`, so a wrong one is an error naming the file and key
    (argparse would report it as a command-line error, or not at all). A number in a string converts, as on the
    command line: YAML reads 1e-3 as text."""
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    kind = next(t for t in hint.__args__ if t is not type(None)) if optional else hint
    if value is None and optional:
        return None
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind in (int, float) and not isinstance(value, bool):
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            converted = None
        if converted is not None and (kind is float or converted == float(value)):
            return converted
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, kind)
    raise ConfigFileError(f"{path}: {key} must be {expected}{' or null' if optional else ''}, got {value!r}")


def check_choices(args: RunArguments) -> None:
    """Every option's value, and the chosen estimator's own checks; each problem one ConfigFileError."""
    model_args, data_args, train_args = args.model, args.data, args.train
    if train_args.estimator not in ESTIMATORS:
        raise ConfigFileError(f"estimator must be one of {tuple(ESTIMATORS)}, got {train_args.estimator!r}")
    if train_args.hub_strategy not in HUB_STRATEGIES:
        raise ConfigFileError(f"hub_strategy must be one of {HUB_STRATEGIES}, got {train_args.hub_strategy!r}")
    if train_args.checkpoint_storage not in CHECKPOINT_STORAGES:
        raise ConfigFileError(
            f"checkpoint_storage must be one of {CHECKPOINT_STORAGES}, got {train_args.checkpoint_storage!r}"
        )
    if train_args.max_train_seconds is not None and train_args.max_train_seconds <= 0:
        raise ConfigFileError(f"max_train_seconds must be positive, got {train_args.max_train_seconds}")
    if model_args.dtype not in DTYPES:
        raise ConfigFileError(f"dtype must be one of {DTYPES}, got {model_args.dtype!r}")
    for name in ("eval_batches", "task_eval_examples", "batch_size", "context_length"):
        if getattr(data_args, name) < 1:
            raise ConfigFileError(f"{name} must be at least 1, got {getattr(data_args, name)}")
    if not 0 <= data_args.validation_fraction < 1:
        raise ConfigFileError(f"validation_fraction must be in [0, 1), got {data_args.validation_fraction}")
    check_run_options(model_args, data_args, train_args)
    ESTIMATORS[train_args.estimator].check(args)


def check_run_options(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """Options that cannot train, or would train nothing, each one line naming the option."""
    if not train_args.output_dir:
        raise ConfigFileError("output_dir is empty: name the folder the run writes")
    if train_args.max_steps < 1 or train_args.logging_steps < 1:
        raise ConfigFileError(
            f"max_steps and logging_steps must be at least 1, got {train_args.max_steps} and {train_args.logging_steps}"
        )
    for name in ("save_steps", "eval_steps", "checksum_steps", "save_total_limit", "max_skipped_steps", "hub_retries"):
        if getattr(train_args, name) < 0:
            raise ConfigFileError(f"{name} must be 0 or more, got {getattr(train_args, name)}")
    text = train_args.objective == "lm" and not data_args.task
    if text and data_args.context_length < 2:
        raise ConfigFileError(
            f"context_length must be at least 2 for text: a block of {data_args.context_length} token has no next "
            "token to predict, so nothing would train"
        )
    if model_args.init_from and Path(model_args.init_from).expanduser().exists():
        from .checkpoints import model_folder_problem  # the Hub's repos are checked when they are downloaded

        folder = Path(model_args.init_from).expanduser()
        problem = model_folder_problem(folder) if folder.is_dir() else f"{folder} is not a folder"
        if problem is not None:
            raise ConfigFileError(f"init_from: {problem}")
