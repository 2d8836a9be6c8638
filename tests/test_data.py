"""Data: corpora, tokenizers, packing with exact resume, and the paper's tasks."""

import json
import pickle
import random

import pytest
import torch

from hf_zoo_rnn.data import (
    DataError,
    PackedStream,
    TaskStream,
    char_tokenizer,
    documents,
    open_text_source,
    train_bpe,
    unknown_spans,
)
from hf_zoo_rnn.data.corpus import SEGMENT_CHARS, bounded_pieces
from hf_zoo_rnn.data.tasks import IGNORE_INDEX, encode_batch, length_range, make_example, prompt_completion_ids
from hf_zoo_rnn.training.checkpoints import load_state, save_state


@pytest.fixture(scope="module")
def kjv_tokenizer():
    return train_bpe(documents(open_text_source("kjv", "train")), vocab_size=300, sample_chars=50_000)


def test_builtin_corpus_is_the_bible_grouped_into_books():
    first = next(documents(open_text_source("kjv", "train")))
    assert first.startswith("In the beginning God created the heaven and the earth.")
    validation = list(documents(open_text_source("kjv", "validation")))
    assert len(validation) == 2 and validation[1].startswith("The Revelation of Jesus Christ")


@pytest.mark.parametrize("resume_after", [1, 5])
def test_packed_stream_resumes_exactly(kjv_tokenizer, resume_after):
    stream = PackedStream(open_text_source("kjv", "train"), kjv_tokenizer, context_length=48, batch_size=3)
    iterator = iter(stream)
    for _ in range(resume_after):
        next(iterator)
    state = stream.state_dict()
    expected = [next(iterator) for _ in range(3)]
    resumed = PackedStream(open_text_source("kjv", "train"), kjv_tokenizer, context_length=48, batch_size=3)
    resumed.load_state_dict(state)
    got = [batch for batch, _ in zip(resumed, range(3), strict=False)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got, strict=True))


def test_globs_stream_every_matching_file(tmp_path, kjv_tokenizer):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"document {name}")
    texts = list(documents(open_text_source(str(tmp_path / "*.txt"), "train", validation_fraction=0)))
    assert texts == ["document a", "document b"]


def test_packing_separates_documents_and_handles_million_token_blocks(tmp_path, kjv_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "alpha beta"}\n{"text": "gamma"}\n')
    block, labels = next(
        iter(PackedStream(open_text_source(str(path), "train", validation_fraction=0), kjv_tokenizer, 4, 1))
    )
    assert block[0, 0].item() == kjv_tokenizer.eos_token_id  # every document starts after a separator
    assert torch.equal(labels, block)  # a language model is scored on its own input
    big, _ = next(
        iter(PackedStream(open_text_source("kjv", "train"), kjv_tokenizer, context_length=1 << 20, batch_size=1))
    )
    assert big.shape == (1, 1 << 20)


def test_missing_empty_and_non_utf8_data_fail_clearly(tmp_path, kjv_tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        open_text_source(str(tmp_path / "nope.txt"), "train")
    with pytest.raises(DataError, match=rf"{tmp_path} is a folder, not a data file: name its files"):
        open_text_source(str(tmp_path), "train")
    for pattern in (str(tmp_path / "*.txt"), str(tmp_path / "nothing-*")):  # absolute globs, with and without suffix
        with pytest.raises(DataError, match="no data file matches"):
            open_text_source(pattern, "train")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert next(iter(PackedStream(open_text_source(str(empty), "train"), kjv_tokenizer, 8, 1)), None) is None
    with pytest.raises(ValueError, match="training data is empty"):
        train_bpe(documents(open_text_source(str(empty), "train")), 300, 1000)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="not valid UTF-8"):
        next(iter(PackedStream(open_text_source(str(binary), "train"), kjv_tokenizer, 8, 1)))


def test_missing_text_column_names_the_columns(tmp_path, kjv_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=rf"column 'text' not in {path}, line 1 \(columns: \['body'\]\)"):
        next(iter(PackedStream(open_text_source(str(path), "train"), kjv_tokenizer, 8, 1)))


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "repeat_copy", "add", "recall"])
def test_tasks_produce_correct_examples(task):
    rng = random.Random(0)
    source, target = make_example(task, 8, rng)
    expected = {
        "copy": lambda: source,
        "reverse": lambda: source[::-1],
        "sort": lambda: "".join(sorted(source)),
        "repeat_copy": lambda: source * 2,
        "add": lambda: str(sum(int(x) for x in source.split("+"))),
        "recall": lambda: source[0],
    }[task]()
    assert target == expected
    if task == "recall":  # the letter to recall, then `length` digits to hold it across
        assert source[0].islower() and source[1:].isdigit() and len(source) == 9


def test_task_lengths_and_loss_mask():
    assert length_range(10, validation=False) == (2, 10) and length_range(10, validation=True) == (11, 60)
    tokenizer = char_tokenizer()
    ids, labels = encode_batch(tokenizer, [("abc", "cba"), ("ab", "ba")])
    assert tokenizer.decode(ids[0]) == "abc cba "
    scored = labels[0][labels[0] != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "cba "  # the output and its closing space, nothing of the input
    assert (labels[1, 6:] == IGNORE_INDEX).all() and (ids[1, 6:] == tokenizer.pad_token_id).all()


def test_prompt_and_completion_are_tokenized_apart_and_an_empty_prompt_is_eos():
    tokenizer = char_tokenizer()
    prompt, completion = prompt_completion_ids(tokenizer, "ab ", "ba")
    assert tokenizer.decode(prompt) == "ab " and tokenizer.decode(completion) == "ba"
    assert prompt_completion_ids(tokenizer, "", "") == ([tokenizer.eos_token_id], [])


def test_task_stream_is_deterministic_and_resumable():
    tokenizer = char_tokenizer()
    stream = TaskStream("sort", tokenizer, batch_size=4, max_train_length=10, seed=3)
    iterator = iter(stream)
    next(iterator)
    state = stream.state_dict()
    expected = next(iterator)
    resumed = TaskStream("sort", tokenizer, batch_size=4, max_train_length=10, seed=3)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_pieces_are_bounded_keep_order_and_cut_after_newlines():
    rng = random.Random(0)
    text = "".join(rng.choice("ab \n") if rng.random() < 0.9 else "x" * rng.randrange(30) for _ in range(2000))
    pieces = list(bounded_pieces(text, 25))
    assert "".join(pieces) == text and all(len(piece) <= 25 for piece in pieces)
    assert all(piece.endswith("\n") or "\n" not in piece for piece in pieces[:-1])  # a cut falls after a newline
    assert list(bounded_pieces("", 4)) == [] and list(bounded_pieces("abcdefghij", 4)) == ["abcd", "efgh", "ij"]


def test_a_big_text_file_streams_in_bounded_segments_and_small_resume_state(tmp_path, kjv_tokenizer):
    text = "".join(f"line {i} of a long file, with some words.\n" for i in range(120_000))  # ~5 MB
    path = tmp_path / "big.txt"
    path.write_text(text)
    source = open_text_source(str(path), "train", validation_fraction=0)
    rows = list(source.dataset)
    assert "".join(row["text"] for row in rows) == text  # every character, in order, as one document
    assert len({row["document"] for row in rows}) == 1 and max(len(row["text"]) for row in rows) <= SEGMENT_CHARS
    tokenizer = char_tokenizer()
    stream = PackedStream(open_text_source(str(path), "train", validation_fraction=0), tokenizer, 64, 2)
    iterator = iter(stream)
    for _ in range(700):
        next(iterator)
    state = stream.state_dict()
    assert len(pickle.dumps(state)) < 2 * SEGMENT_CHARS * 8  # a segment's tokens at most, never the file's
    expected = [next(iterator)[0] for _ in range(3)]
    resumed = PackedStream(open_text_source(str(path), "train", validation_fraction=0), tokenizer, 64, 2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b[0]) for a, b in zip(expected, resumed, strict=False))


def test_validation_holds_out_a_fixed_share_of_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i}: " + "word " * (i % 7), "id": i // 2} for i in range(400)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train = [row["text"] for row in open_text_source(str(path), "train").dataset]
    validation = [row["text"] for row in open_text_source(str(path), "validation").dataset]
    assert sorted(train + validation) == sorted(row["text"] for row in rows) and not set(train) & set(validation)
    assert 0.02 < len(validation) / len(rows) < 0.1  # about VALIDATION_FRACTION
    assert validation == [row["text"] for row in open_text_source(str(path), "validation").dataset]  # fixed
    grouped = open_text_source(str(path), "validation", document_column="id", validation_fraction=0.2).dataset
    held_ids = [row["id"] for row in grouped]
    assert held_ids and all(held_ids.count(i) == 2 for i in held_ids)  # a document's rows stay together
    described = open_text_source(str(path), "validation").description
    assert described == f"{path}: the 5% of its documents held out by a hash of their text"
    text = tmp_path / "book.txt"
    text.write_text("".join(f"paragraph {i}\n" for i in range(30_000)))
    parts = [open_text_source(str(text), split, validation_fraction=0.3).dataset for split in ("train", "validation")]
    train_rows, validation_rows = (list(part) for part in parts)
    assert validation_rows and len({row["document"] for row in train_rows}) > 1  # a held-out segment ends a document


def test_malformed_rows_name_their_file_and_line(tmp_path, kjv_tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=rf"{tmp_path / 'b.jsonl'}, line 2: not valid JSON"):
        list(open_text_source(str(tmp_path / "*.jsonl"), "train", validation_fraction=0).dataset)
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"b.jsonl, line 2: expected a JSON object per row, found list"):
        list(open_text_source(str(tmp_path / "*.jsonl"), "train", validation_fraction=0).dataset)
    (tmp_path / "c.json").write_text('[{"text": "one"}, {"text": "two"}]')
    assert [
        row["text"] for row in open_text_source(str(tmp_path / "c.json"), "train", validation_fraction=0).dataset
    ] == ["one", "two"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin} is not valid UTF-8 text \(invalid continuation byte: byte 0xe9\)"):
        list(open_text_source(str(latin), "train").dataset)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"{broken} is not a readable Parquet file"):
        list(open_text_source(str(broken), "train").dataset)


def test_characters_outside_a_char_vocabulary_are_unknown_counted_and_reported(tmp_path, caplog):
    tokenizer = char_tokenizer()
    specials = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert len(specials) == 3 and tokenizer.unk_token == "<|unk|>"
    assert unknown_spans(tokenizer, "café 中文 ok") == ["é", "中", "文"]
    assert tokenizer("café", return_tensors="pt").attention_mask.all()  # unknown is not padding
    path = tmp_path / "mixed.txt"
    path.write_text("plain text, then café and 中文 and é again. " * 20)
    stream = PackedStream(open_text_source(str(path), "train", validation_fraction=0), tokenizer, 16, 2)
    with caplog.at_level("WARNING"):
        batches = list(stream)
    assert stream.unknown_tokens == 20 * 4 and sum(int((b == tokenizer.unk_token_id).sum()) for b, _ in batches) <= 80
    assert "'é', '中', '文'" in caplog.text and "--tokenizer bpe" in caplog.text


def write_sources(folder, texts: list[str]) -> dict[str, str]:
    """The same documents as a .txt glob (one file each), JSON Lines and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    pq.write_table(pa.table({"text": texts}), folder / "docs.parquet", row_group_size=2)
    return {
        "txt": str(folder / "doc*.txt"),
        "jsonl": str(folder / "docs.jsonl"),
        "parquet": str(folder / "docs.parquet"),
    }


@pytest.mark.parametrize("kind", ["kjv", "txt", "jsonl", "parquet"])
def test_a_stream_interrupted_many_times_yields_the_uninterrupted_blocks(tmp_path, kjv_tokenizer, kind):
    """30 interruptions at random points, each resumed from the state the previous resume wrote (through the
    checkpoint format), some right after a resume, before any row was read: every block as without them."""
    books = list(documents(open_text_source("kjv", "train")))[:6]
    name = "kjv" if kind == "kjv" else write_sources(tmp_path, [book[:20_000] for book in books])[kind]

    def stream():
        return PackedStream(open_text_source(name, "train", validation_fraction=0), kjv_tokenizer, 64, 2)

    total = 150
    whole = [block[0] for block, _ in zip(stream(), range(total), strict=False)]
    assert len(whole) == total
    rng = random.Random(kind)
    got, state = [], None
    while len(got) < total:
        current = stream()
        if state is not None:
            current.load_state_dict(state)
        take = min(rng.choice([0, 0, 1, 1, 2, 7, 19]), total - len(got))
        iterator = iter(current)
        got += [next(iterator)[0] for _ in range(take)]
        save_state(current.state_dict(), tmp_path, "process_0")
        state = load_state(tmp_path, "process_0")
    assert all(torch.equal(a, b) for a, b in zip(whole, got, strict=True))
