"""Tokenizers: a byte-level BPE trained with `tokenizers` on a sample of the stream, or a character vocabulary."""

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .corpus import DataError

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
UNKNOWN = "<|unk|>"


def wrap(tokenizer: Tokenizer, **special_tokens) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=PAD, **special_tokens)


def train_bpe(texts: Iterable[str], vocab_size: int, sample_chars: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the first `sample_chars` characters of `texts` (end-of-text and pad are specials)."""
    sample, seen = [], 0
    for text in texts:
        sample.append(text[: sample_chars - seen])
        seen += len(sample[-1])
        if seen >= sample_chars:
            break
    if seen == 0:
        raise ValueError("cannot train a tokenizer: the training data is empty")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample, trainer=trainer)
    return wrap(tokenizer)


def char_tokenizer(alphabet: str = string.printable) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` (the paper's 100 printable characters) plus end-of-text, pad and
    unknown, each its own id (the paper's code let pad collide with the character '0'). A character outside the
    alphabet becomes the unknown token: never padding, which a model would be told to skip."""
    vocab = {char: index for index, char in enumerate(dict.fromkeys(alphabet))}
    for special in (END_OF_TEXT, PAD, UNKNOWN):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return wrap(tokenizer, unk_token=UNKNOWN)


def unknown_spans(tokenizer, text: str) -> list[str]:
    """The pieces of `text` the tokenizer turns into its unknown token (none for a byte-level BPE)."""
    if tokenizer.unk_token_id is None:
        return []
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    return [text[start:end] for token, (start, end) in pairs if token == tokenizer.unk_token_id]


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, sample_chars: int) -> PreTrainedTokenizerFast:
    """`bpe` (trained here), `char`, or a path / Hub name loaded with AutoTokenizer."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size, sample_chars)
    if kind == "char":
        return char_tokenizer()
    folder = Path(kind).expanduser()
    if (
        folder.is_dir()
        and not (folder / "tokenizer.json").is_file()
        and not (folder / "tokenizer_config.json").is_file()
    ):
        raise DataError(f"--tokenizer {kind}: {folder} has no tokenizer files (tokenizer.json is missing)")
    try:
        return AutoTokenizer.from_pretrained(kind)
    except (OSError, ValueError) as error:  # a missing file, a Hub name that does not exist, a file it cannot read
        raise DataError(f"--tokenizer {kind}: cannot load it ({str(error).strip().splitlines()[0]})") from None
