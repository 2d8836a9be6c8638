"""Data-stream assembly: what a run trains on and validates on, from its data arguments. Streams, not the loop, know
whether batches are packed text, task examples or prompts; `BatchSource` hands the loop its next batch."""

import torch

from ..data import BUILTIN_KJV, DataError, PackedStream, TaskStream, open_text_source
from ..data.prompts import PromptBatch, PromptStream


def text_source(data_args, validation: bool):
    """The training data, or what validation evaluates: --validation_dataset whole, else the held-out part."""
    data = data_args
    if validation and data.validation_dataset:
        source = open_text_source(data.validation_dataset, "validation", data.text_column, data.document_column, 0)
        source.description = f"{source.description} (--validation_dataset)"
        return source
    fraction = 0 if data.validation_dataset else data.validation_fraction
    split = "validation" if validation else "train"
    return open_text_source(data.dataset, split, data.text_column, data.document_column, fraction)


def data_identity(data_args) -> dict:
    """What a checkpoint's data position and tokenizer belong to: resuming on anything else cannot continue."""
    data = data_args
    keys = ("dataset", "task", "prompts", "text_column", "document_column", "tokenizer", "tokenizer_vocab_size")
    identity = {key: getattr(data, key) for key in keys}
    if not data.task and data.dataset != BUILTIN_KJV:  # what is held out decides which rows train
        identity["held_out_fraction"] = 0 if data.validation_dataset else data.validation_fraction
    return identity


def make_stream(
    data_args,
    *,
    objective: str,
    seed: int,
    tokenizer,
    validation: bool,
    rank: int = 0,
    world_size: int = 1,
    prompt_rows: dict | None = None,
):
    """Prompts (objective=reward: named by --prompts, or given as `prompt_rows` {"train": rows, "validation": rows
    or None}, ESTrainer's datasets), a task's examples, or packed text (split by process with per_rank_batches)."""
    data = data_args
    split = "validation" if validation else "train"
    if prompt_rows is not None:
        rows = prompt_rows[split]
        return None if rows is None else PromptStream(data.prompts, split, data.batch_size, seed, rows=rows)
    if objective == "reward":
        return PromptStream(
            data.prompts,
            split,
            data.batch_size,
            seed,
            prompt_column=data.prompt_column,
            max_task_length=data.task_max_length,
            prompt_words=data.prompt_words,
        )
    if data.task:
        return TaskStream(data.task, tokenizer, data.batch_size, data.task_max_length, seed, validation)
    split = data.per_rank_batches and not validation
    return PackedStream(
        text_source(data, validation),
        tokenizer,
        data.context_length,
        data.batch_size,
        rank=rank if split else 0,
        world_size=world_size if split else 1,
    )


def data_descriptions(args, train_stream, prompt_rows: dict | None = None) -> tuple[str, str]:
    """(what trains, what validation evaluates), in words for the logs and the model card."""
    data = args.data
    if args.train.objective == "reward":
        validation = f"held-out prompts from {data.prompts}: their greedy completions' rewards"
        if prompt_rows is not None:  # ESTrainer's datasets: validation is its eval_dataset, if any
            held_out = prompt_rows["validation"]
            validation = (
                f"eval_dataset ({len(held_out)} prompts): their greedy completions' rewards" if held_out else "none"
            )
        return f"prompts from {data.prompts} scored by {args.train.rewards}, from {args.model.init_from}", validation
    if data.task:
        return (
            f"the {data.task} task, lengths 2-{data.task_max_length}",
            f"the {data.task} task: loss at lengths {data.task_max_length + 1}-{data.task_max_length + 50}, "
            "exact match in and out of distribution",
        )
    training, validation = train_stream.source.description, text_source(data, validation=True).description
    if validation == training:  # validation_fraction 0: say so wherever the loss is reported
        validation += " (the training data itself: validation_fraction is 0)"
    return training, validation


class BatchSource:
    """The training batches, on the device: a new epoch starts when the data ends; with fixed_batch the first batch
    every step (a fresh stream's first, so a resumed run reads the same one). Its state is the stream's."""

    def __init__(self, make, data_args, device):
        self.make, self.data_args, self.device = make, data_args, device
        self.stream = make()
        self.iterator = None
        self.first_batch = None

    def next_batch(self):
        if self.data_args.fixed_batch and self.first_batch is not None:
            return self.first_batch
        if self.iterator is None:
            self.iterator = iter(self.stream)
        batch = next(self.iterator, None)
        if batch is None:  # one pass over the data is done: start the next epoch from the beginning
            self.stream = self.make()
            self.iterator = iter(self.stream)
            batch = next(self.iterator, None)
            if batch is None:
                raise DataError(
                    f"the training data {self.data_args.dataset!r} yields no full batch "
                    f"of {self.data_args.batch_size} x {self.data_args.context_length} tokens"
                )
        if isinstance(batch, PromptBatch):
            return batch
        input_ids, labels = batch
        batch = input_ids.to(self.device), labels.to(self.device)
        if self.data_args.fixed_batch:
            self.first_batch = batch
        return batch

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not self.data_args.fixed_batch:
            check_data_state(state, self.stream.state_dict())
            self.stream.load_state_dict(state)


# keys an older version's data state may lack (its stream fills them in)
OPTIONAL_STATE = ("pieces", "unknown_tokens")


def check_data_state(saved, fresh: dict) -> None:
    """A checkpoint's data position must have the shape this run's stream saves (the same keys, each of the same
    kind), so a malformed one is one line, not an error deep inside the stream."""
    if not isinstance(saved, dict):
        raise DataError(f"the checkpoint's data position is {type(saved).__name__}, not an object")
    for key, value in fresh.items():
        if key not in saved:
            if key in OPTIONAL_STATE:
                continue
            raise DataError(f"the checkpoint's data position has no {key!r}: it was saved for other data")
        if not same_kind(saved[key], value):
            raise DataError(f"the checkpoint's data position has {key}={saved[key]!r:.60}, not a {kind(value)}")


def kind(value) -> str:
    return "whole number" if isinstance(value, int) else type(value).__name__


def same_kind(saved, fresh) -> bool:
    """Whether a saved value can stand where the stream holds `fresh` (None stands for "not started")."""
    if saved is None or fresh is None:
        return True
    if isinstance(fresh, bool) or isinstance(saved, bool):
        return type(saved) is type(fresh)
    if isinstance(fresh, int):
        return isinstance(saved, int) and saved >= 0
    if isinstance(fresh, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.dim() == fresh.dim() and saved.dtype == fresh.dtype
    if isinstance(fresh, str | float):
        return isinstance(saved, str | int | float)
    return isinstance(saved, type(fresh))
