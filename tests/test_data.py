"""Data: corpora, tokenizers, packing with exact resume, and the paper's tasks."""

import random

import pytest
import torch

from hf_zoo_rnn.data import DataError, PackedStream, TaskStream, char_tokenizer, documents, open_text_source, train_bpe
from hf_zoo_rnn.data.tasks import IGNORE_INDEX, encode_batch, length_range, make_example


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
    texts = list(documents(open_text_source(str(tmp_path / "*.txt"), "train")))
    assert texts == ["document a", "document b"]


def test_packing_separates_documents_and_handles_million_token_blocks(tmp_path, kjv_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "alpha beta"}\n{"text": "gamma"}\n')
    block, labels = next(
        iter(PackedStream(open_text_source(str(path), "train"), kjv_tokenizer, context_length=4, batch_size=1))
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
    with pytest.raises(DataError, match=r"column 'text' not in the data \(columns: \['body'\]\)"):
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
