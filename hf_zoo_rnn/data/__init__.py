"""Data: corpora as streaming datasets, the paper's synthetic tasks, tokenizers, and packing."""

from .corpus import BUILTIN_KJV, DataError, TextSource, documents, open_text_source
from .packing import PackedStream
from .tasks import TASKS, TaskStream, exact_match
from .tokenization import build_tokenizer, char_tokenizer, train_bpe

__all__ = [
    "BUILTIN_KJV",
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
    "train_bpe",
]
