"""Pack a streamed corpus into [batch, context_length] token blocks, resumable exactly.

Documents are separated by the end-of-text token. A row is cut into pieces of at most SEGMENT_CHARS characters
(`bounded_pieces`), tokenised one piece at a time as blocks need them. The stream's state is a position, never a
row's text or tokens: the upstream dataset's own `state_dict()` before the row being read, how many of that row's
pieces were tokenised, and the tokens read but not yet emitted (less than one block plus one piece). A resumed
stream reads that row again, skips its tokenised pieces without tokenising them, and yields exactly the blocks the
uninterrupted one would have; the state stays flat however long one row is.
"""

import logging
from collections.abc import Iterator

import torch
from datasets.distributed import split_dataset_by_node

from .corpus import SEGMENT_CHARS, DataError, TextSource, bounded_pieces, row_text
from .tokenization import unknown_spans

logger = logging.getLogger(__name__)
SHOWN_UNKNOWN = 20  # distinct unknown characters named in the warning
DOCUMENT_START = None  # a row's first piece when it starts a document: the end-of-text token


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
        self.rows_state = None  # the dataset's position before the row being read (None: its start)
        self.pieces_read = None  # how many of that row's pieces are in the buffer (None: no row being read)
        self.last_document = None  # the document of the row before the one being read
        self.exhausted = False
        self.unknown_tokens = 0  # tokens the tokenizer could only call unknown, so far
        self.unknown_seen: set[str] = set()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.rows_state is not None:
            self.source.dataset.load_state_dict(self.rows_state)
        needed = self.batch_size * self.context_length
        rows = iter(self.source.dataset)
        rows_read = False  # until a row is read, the dataset reports its initial position even after a resume
        pieces = iter(())
        if self.pieces_read is not None:  # resumed inside a row: read it again, skip what was already tokenised
            row = self.next_row(rows)
            if row is None:
                raise DataError(f"{self.source.description or 'the data'} ended before the checkpoint's position")
            rows_read, pieces = True, self.row_pieces(row)
            for _ in range(self.pieces_read):
                if next(pieces, StopIteration) is StopIteration:
                    raise DataError(f"{self.source.description or 'the data'} changed since the checkpoint was saved")
        while True:
            while len(self.buffer) - self.position >= needed:
                block = self.buffer[self.position : self.position + needed]
                self.position += needed  # the consumed prefix is dropped once per piece, not copied per block
                ids = torch.tensor(block, dtype=torch.long).view(self.batch_size, self.context_length)
                yield ids, ids  # (input_ids, labels), like every stream: a language model predicts its input
            del self.buffer[: self.position]
            self.position = 0
            piece = next(pieces, StopIteration)
            if piece is not StopIteration:
                self.buffer.extend(self.tokens_of(piece))
                self.pieces_read += 1
                continue
            if rows_read:  # the row is done: the position before the next one
                self.rows_state = self.source.dataset.state_dict()
            row = self.next_row(rows)
            if row is None:
                self.exhausted = True
                return
            rows_read, pieces, self.pieces_read = True, self.row_pieces(row), 0

    def next_row(self, rows) -> dict | None:
        try:
            return next(rows)
        except StopIteration:
            return None
        except UnicodeDecodeError as error:
            raise DataError(f"{self.source.description or 'the data'} is not valid UTF-8 text: {error}") from error

    def row_pieces(self, row: dict) -> Iterator[str | None]:
        """The row's text in bounded pieces, after DOCUMENT_START when it starts a document. Cutting a piece costs
        no tokenisation, so a resume skips pieces cheaply."""
        text, key_column = row_text(row, self.source.text_column), self.source.document_column
        key = row[key_column] if key_column else None
        starts_document = key_column is None or key != self.last_document
        if not starts_document:  # a further row of the same document
            text = self.source.row_separator + text
        # the row's document is "the last" only once the row is done: a state saved mid-row re-reads the row
        pieces = bounded_pieces(text, SEGMENT_CHARS)
        if starts_document:
            yield DOCUMENT_START
        yield from pieces
        self.last_document = key

    def tokens_of(self, piece: str | None) -> list[int]:
        if piece is DOCUMENT_START:
            return [self.tokenizer.eos_token_id]
        ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            self.count_unknown(ids, piece)
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
        """A position: where the row being read starts, how many of its pieces were read, and the tokens read but
        not yet emitted (bounded by one block plus one piece, whatever the row's length)."""
        return {
            "rows": self.rows_state,
            "pieces": self.pieces_read,
            "buffer": torch.tensor(self.buffer[self.position :], dtype=torch.long),
            "last_document": self.last_document,
            "unknown_tokens": self.unknown_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """A state of this version, or of an older one (no "pieces": "rows" is after the last row read, whose
        remaining tokens are all in "buffer")."""
        if state["rows"] is not None:
            check_rows_state(state["rows"], self.source.dataset.state_dict(), self.source.description)
        if state.get("pieces") is not None and not isinstance(state["pieces"], int):
            raise DataError(f"the checkpoint's data position has pieces={state['pieces']!r:.40}, not a count")
        self.rows_state = state["rows"]
        self.pieces_read = state.get("pieces")
        self.buffer = torch.as_tensor(state["buffer"], dtype=torch.long).tolist()
        self.position = 0
        self.last_document = state["last_document"]
        self.unknown_tokens = state.get("unknown_tokens", 0)


def check_rows_state(saved, fresh, description: str, where: str = "rows") -> None:
    """The dataset's saved position must have the structure of this dataset's own (`datasets` indexes into it
    without checking): the same keys, counts where it has counts, the same type tags."""
    if isinstance(fresh, dict) and isinstance(saved, dict):
        if saved.keys() != fresh.keys():
            raise DataError(
                f"the checkpoint's data position ({where}) does not fit {description}: it was saved for other data"
            )
        for key in fresh:
            check_rows_state(saved[key], fresh[key], description, f"{where}.{key}")
    elif saved is None or fresh is None or isinstance(fresh, dict) or isinstance(saved, dict):
        if isinstance(saved, list | str | bool | float) or (isinstance(saved, int) and isinstance(fresh, dict)):
            raise DataError(
                f"the checkpoint's data position has {where}={saved!r:.40}, which does not fit {description}"
            )
    elif isinstance(fresh, int) and not isinstance(fresh, bool):
        if not isinstance(saved, int) or isinstance(saved, bool) or saved < 0:
            raise DataError(f"the checkpoint's data position has {where}={saved!r:.40}, not a count")
    elif saved != fresh and isinstance(fresh, str):
        raise DataError(f"the checkpoint's data position has {where}={saved!r:.40}, not {fresh!r} ({description})")
