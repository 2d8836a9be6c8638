"""The paper's transduction tasks (copy, reverse, sort, repeat_copy, add) and a delayed-recall memory task.

A sample is `input + " " + output + " "`; the loss covers the output and the closing space (the end marker).
Training lengths are U[2, L]; validation lengths U[L + 1, L + 50], out of distribution.
"""

import random
import string

import torch

from ..modeling_zoo_rnn import IGNORE_INDEX

TASKS = ("copy", "reverse", "sort", "repeat_copy", "add", "recall")


def make_example(task: str, length: int, rng: random.Random) -> tuple[str, str]:
    """(input, output) strings of the task at the given length."""
    if task == "add":
        half = max(1, length // 2)
        a, b = (rng.randrange(10 ** (half - 1), 10**half) for _ in range(2))
        return f"{a}+{b}", str(a + b)
    if task == "recall":
        # one letter, then `length` random digits to hold it across: the answer depends on a single input
        # `length + 1` steps back, which neither a readout nor a short-window gradient can connect
        key = rng.choice(string.ascii_lowercase)
        return key + "".join(rng.choice(string.digits) for _ in range(length)), key
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    if task == "copy":
        return text, text
    if task == "reverse":
        return text, text[::-1]
    if task == "sort":
        return text, "".join(sorted(text))
    if task == "repeat_copy":
        return text, text + text
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def length_range(max_train_length: int, validation: bool) -> tuple[int, int]:
    return (max_train_length + 1, max_train_length + 50) if validation else (2, max_train_length)


def encode_batch(tokenizer, examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [B, T] (labels follow transformers: position t is scored against labels[t + 1])."""
    pairs = [prompt_completion_ids(tokenizer, source + " ", target + " ") for source, target in examples]
    return answer_batch(pairs, tokenizer.pad_token_id)


def prompt_completion_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt, completion) as token ids, each tokenized on its own (as a model generates a completion after its
    prompt) and without special tokens. An empty prompt is the EOS token: the completion's first token then has a
    position that predicts it."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    return prompt_ids, tokenizer(completion, add_special_tokens=False)["input_ids"]


def answer_batch(pairs: list[tuple[list[int], list[int]]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and labels [B, T] of (prompt, answer) token lists: only the answers are scored."""
    rows = [prompt + answer for prompt, answer in pairs]
    label_rows = [[IGNORE_INDEX] * len(prompt) + answer for prompt, answer in pairs]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
    return ids, labels


class TaskStream:
    """Endless batches of one task. Batch n depends only on (seed, n, max_length): resuming is a counter."""

    def __init__(
        self, task: str, tokenizer, batch_size: int, max_train_length: int, seed: int, validation: bool = False
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
        self.task, self.tokenizer, self.batch_size = task, tokenizer, batch_size
        self.max_train_length, self.seed, self.validation = max_train_length, seed, validation
        self.batches_served = 0

    def examples(self, index: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.seed}/{self.task}/{self.validation}/{index}")
        low, high = length_range(self.max_train_length, self.validation)
        return [make_example(self.task, rng.randint(low, high), rng) for _ in range(self.batch_size)]

    def __iter__(self):
        while True:
            batch = encode_batch(self.tokenizer, self.examples(self.batches_served))
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served, "max_train_length": self.max_train_length}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]
        self.max_train_length = state["max_train_length"]


@torch.inference_mode()
def exact_match(model, tokenizer, examples: list[tuple[str, str]]) -> float:
    """Fraction of examples whose greedy continuation of `input + " "` is exactly `output + " "`."""
    hits = 0
    for source, target in examples:
        prompt_ids, answer = prompt_completion_ids(tokenizer, source + " ", target + " ")
        prompt = torch.tensor([prompt_ids], device=model.device)
        out = model.generate(prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += out[0, prompt.shape[1] :].tolist() == answer
    return hits / len(examples)
