"""Data: corpora as streaming datasets, the paper's synthetic tasks, tokenizers, and packing."""

from .corpus import BUILTIN_KJV, VALIDATION_FRACTION, DataError, TextSource, documents, open_text_source, text_pieces
from .packing import PackedStream
from .tasks import TASKS, TaskStream, exact_match
from .tokenization import build_tokenizer, char_tokenizer, train_bpe, unknown_spans

__all__ = [
    "BUILTIN_KJV",
    "VALIDATION_FRACTION",
    "DataError",
    "PackedStream",
    "TASKS",
    "TaskStream",
    "TextSource",
    "build_tokenizer",
    "char_tokenizer",
    "documents",
    "exact_match",
    "open_text_source",
    "text_pieces",
    "train_bpe",
    "unknown_spans",
]
