"""Data-stream assembly: what a run trains on and validates on, from its data arguments. Streams, not the loop, know
whether batches are packed text, task examples or prompts; `BatchSource` hands the loop its next batch."""

from ..data import DataError, PackedStream, TaskStream, open_text_source
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


def make_stream(data_args, objective: str, seed: int, tokenizer, validation: bool, rank: int = 0, world_size: int = 1):
    """Prompts (objective=reward), a task's examples, or packed text (split by process with per_rank_batches)."""
    data = data_args
    if objective == "reward":
        return PromptStream(
            data.prompts, "validation" if validation else "train", data.batch_size, seed,
            data.prompt_column, data.task_max_length, data.prompt_words,
        )  # fmt: skip
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


def data_descriptions(data_args, objective: str, rewards: str, init_from, train_stream) -> tuple[str, str]:
    """(what trains, what validation evaluates), in words for the logs and the model card."""
    data = data_args
    if objective == "reward":
        return (
            f"prompts from {data.prompts} scored by {rewards}, from {init_from}",
            f"held-out prompts from {data.prompts}: their greedy completions' rewards",
        )
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
            self.stream.load_state_dict(state)
