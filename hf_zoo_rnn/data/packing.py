"""Pack a streamed corpus into [batch, context_length] token blocks, resumable exactly.

Documents are separated by the end-of-text token. The stream's state is the upstream dataset's own
`state_dict()` (rows consumed) plus the tokens already read but not yet emitted, so a resumed stream yields
exactly the blocks the uninterrupted one would have. Rows are tokenised in bounded pieces, so the buffer (and
with it the state saved in every checkpoint) stays below one block plus one piece however long a document is.
"""

import logging
from collections.abc import Iterator

import torch
from datasets.distributed import split_dataset_by_node

from .corpus import SEGMENT_CHARS, DataError, TextSource, bounded_pieces, row_text
from .tokenization import unknown_spans

logger = logging.getLogger(__name__)
SHOWN_UNKNOWN = 20  # distinct unknown characters named in the warning


class PackedStream:
    def __init__(
        self, source: TextSource, tokenizer, context_length: int, batch_size: int, rank: int = 0, world_size: int = 1
    ):
        if context_length < 1 or batch_size < 1:
            raise DataError(f"context_length and batch_size must be at least 1, not {context_length} and {batch_size}")
        self.source = source
        if world_size > 1:  # each process reads its own part of the stream
            source.dataset = split_dataset_by_node(source.dataset, rank=rank, world_size=world_size)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.batch_size = batch_size
        self.buffer: list[int] = []  # tokens read; those before `position` are already emitted
        self.position = 0
        self.last_document = None
        self.rows_state = None
        self.exhausted = False
        self.unknown_tokens = 0  # tokens the tokenizer could only call unknown, so far
        self.unknown_seen: set[str] = set()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.rows_state is not None:
            self.source.dataset.load_state_dict(self.rows_state)
        needed = self.batch_size * self.context_length
        rows = iter(self.source.dataset)
        rows_read = False  # until a row is read, the dataset reports its initial position even after a resume
        while True:
            while len(self.buffer) - self.position >= needed:
                block = self.buffer[self.position : self.position + needed]
                self.position += needed  # the consumed prefix is dropped once per row, not copied per block
                if rows_read:
                    self.rows_state = self.source.dataset.state_dict()
                ids = torch.tensor(block, dtype=torch.long).view(self.batch_size, self.context_length)
                yield ids, ids  # (input_ids, labels), like every stream: a language model predicts its input
            del self.buffer[: self.position]
            self.position = 0
            try:
                row = next(rows)
            except StopIteration:
                self.exhausted = True
                return
            except UnicodeDecodeError as error:
                raise DataError(f"{self.source.description or 'the data'} is not valid UTF-8 text: {error}") from error
            rows_read = True
            self.buffer.extend(self.tokens_of(row))

    def tokens_of(self, row: dict) -> list[int]:
        text, key_column = row_text(row, self.source.text_column), self.source.document_column
        key = row[key_column] if key_column else None
        starts_document = key_column is None or key != self.last_document
        self.last_document = key
        if not starts_document:  # a further row of the same document
            text = self.source.row_separator + text
        ids = [self.tokenizer.eos_token_id] if starts_document else []
        for piece in bounded_pieces(text, SEGMENT_CHARS):
            ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            self.count_unknown(ids, text)
        return ids

    def count_unknown(self, ids: list[int], text: str) -> None:
        self.unknown_tokens += ids.count(self.tokenizer.unk_token_id)
        if len(self.unknown_seen) >= SHOWN_UNKNOWN:
            return
        new = set(unknown_spans(self.tokenizer, text[:SEGMENT_CHARS])) - self.unknown_seen
        if new:
            self.unknown_seen |= new
            logger.warning(
                "%s has text outside the tokenizer's vocabulary, which it turns into %s: %s (%d such tokens so "
                "far; the unknown_tokens metric counts them). A tokenizer trained on this data (--tokenizer bpe) "
                "covers every character",
                self.source.description or "the data",
                self.tokenizer.unk_token,
                ", ".join(repr(piece) for piece in sorted(self.unknown_seen)),
                self.unknown_tokens,
            )

    def state_dict(self) -> dict:
        return {
            "rows": self.rows_state,
            "buffer": torch.tensor(self.buffer[self.position :], dtype=torch.long),
            "last_document": self.last_document,
            "unknown_tokens": self.unknown_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rows_state = state["rows"]
        self.buffer = torch.as_tensor(state["buffer"], dtype=torch.long).tolist()
        self.position = 0
        self.last_document = state["last_document"]
        self.unknown_tokens = state.get("unknown_tokens", 0)
