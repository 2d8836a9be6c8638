"""Pack a streamed corpus into [batch, context_length] token blocks, resumable exactly.

Documents are separated by the end-of-text token. The stream's state is the upstream dataset's own
`state_dict()` (rows consumed) plus the tokens already read but not yet emitted, so a resumed stream yields
exactly the blocks the uninterrupted one would have.
"""

from collections.abc import Iterator

import torch
from datasets.distributed import split_dataset_by_node

from .corpus import DataError, TextSource, row_text


class PackedStream:
    def __init__(
        self, source: TextSource, tokenizer, context_length: int, batch_size: int, rank: int = 0, world_size: int = 1
    ):
        self.source = source
        if world_size > 1:  # each process reads its own part of the stream
            source.dataset = split_dataset_by_node(source.dataset, rank=rank, world_size=world_size)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.batch_size = batch_size
        self.buffer: list[int] = []
        self.last_document = None
        self.rows_state = None
        self.exhausted = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.rows_state is not None:
            self.source.dataset.load_state_dict(self.rows_state)
        needed = self.batch_size * self.context_length
        rows = iter(self.source.dataset)
        while True:
            while len(self.buffer) >= needed:
                block, self.buffer = self.buffer[:needed], self.buffer[needed:]
                self.rows_state = self.source.dataset.state_dict()
                ids = torch.tensor(block, dtype=torch.long).view(self.batch_size, self.context_length)
                yield ids, ids  # (input_ids, labels), like every stream: a language model predicts its input
            try:
                row = next(rows)
            except StopIteration:
                self.exhausted = True
                return
            except UnicodeDecodeError as error:
                raise DataError(f"the data is not valid UTF-8 text: {error}") from error
            self.buffer.extend(self.tokens_of(row))

    def tokens_of(self, row: dict) -> list[int]:
        text, key_column = row_text(row, self.source.text_column), self.source.document_column
        key = row[key_column] if key_column else None
        starts_document = key_column is None or key != self.last_document
        self.last_document = key
        if not starts_document:  # a further row of the same document
            text = "\n" + text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.tokenizer.eos_token_id] if starts_document else []) + ids

    def state_dict(self) -> dict:
        return {"rows": self.rows_state, "buffer": list(self.buffer), "last_document": self.last_document}

    def load_state_dict(self, state: dict) -> None:
        self.rows_state = state["rows"]
        self.buffer = list(state["buffer"])
        self.last_document = state["last_document"]
