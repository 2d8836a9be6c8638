"""Evaluate a trained model (folder or Hub repo): perplexity on a text dataset, or exact match on a paper task.

    hf-zoo-rnn-evaluate --model outputs/default [--dataset kjv --split validation --batches 8]
    hf-zoo-rnn-evaluate --model outputs/copy --task copy [--task_max_length 10]
Prints one JSON line of metrics.
"""

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_zoo_rnn.config_files import command_name
from hf_zoo_rnn.data import VALIDATION_FRACTION, DataError, PackedStream, open_text_source
from hf_zoo_rnn.hub import ModelReferenceError, load_trained
from hf_zoo_rnn.training.evaluation import language_model_metrics, task_metrics


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "trained folder or Hub repo id"})
    dataset: str = field(default="kjv", metadata={"help": "kjv, a local file, or a Hub dataset"})
    split: str = field(default="validation", metadata={"help": "train or validation"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    validation_fraction: float = field(
        default=VALIDATION_FRACTION,
        metadata={"help": "share of a local dataset's documents held out as its validation split (as in training)"},
    )
    context_length: int = field(default=128, metadata={"help": "tokens per block"})
    batch_size: int = field(default=8, metadata={"help": "blocks per batch"})
    batches: int = field(default=8, metadata={"help": "batches to average"})
    task: str | None = field(default=None, metadata={"help": "evaluate exact match on this paper task instead"})
    task_max_length: int = field(default=10, metadata={"help": "the L the model was trained with"})
    examples: int = field(default=64, metadata={"help": "task examples per length regime"})


def main() -> None:
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses()
    if (problem := argument_problem(args)) is not None:
        raise SystemExit(f"{command_name()}: {problem}")
    try:
        model, tokenizer = load_trained(args.model)
        metrics = evaluate(model, tokenizer, args)
    except (ModelReferenceError, DataError) as error:
        raise SystemExit(f"{command_name()}: {error}") from None
    print(json.dumps({"model": args.model, **metrics}))


def argument_problem(args: EvaluateArguments) -> str | None:
    """An option that cannot evaluate anything, named (before a model or data is loaded)."""
    for name in ("batches", "batch_size", "examples"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if args.context_length < 2:
        return f"--context_length must be at least 2 (a block of one token has no next token to predict), got {args.context_length}"
    if args.split not in ("train", "validation"):
        return f"--split must be train or validation, got {args.split!r}"
    if not 0 <= args.validation_fraction < 1:
        return f"--validation_fraction must be in [0, 1), got {args.validation_fraction}"
    return None


def evaluate(model, tokenizer, args: EvaluateArguments) -> dict:
    if args.task:
        metrics = task_metrics(model, tokenizer, args.task, args.task_max_length, seed=12345, examples=args.examples)
    else:
        stream = PackedStream(
            open_text_source(args.dataset, args.split, args.text_column, None, args.validation_fraction),
            tokenizer,
            args.context_length,
            args.batch_size,
        )
        metrics = language_model_metrics(model, stream, args.batches)
        if not metrics:
            raise DataError(
                f"{args.dataset} ({args.split}) yields no full batch of {args.batch_size} x {args.context_length} "
                "tokens: lower --batch_size or --context_length"
            )
    return metrics


if __name__ == "__main__":
    main()
