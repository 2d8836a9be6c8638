"""Prompts for training on rewards: a built-in task's inputs, the openings of KJV verses, or a dataset's prompt column
(with every other column passed on to the reward functions, as TRL does).

A stream's batch n depends only on (source, split, seed, n), so its resume state is a counter, the same on every
process: with several processes every one sees the same prompts, and only the members' rewards travel.
"""

import json
import random
from dataclasses import dataclass, field

from .corpus import BUILTIN_KJV, KJV_VALIDATION_BOOKS, DataError, kjv_path, open_text_source
from .tasks import length_range, make_example

PROMPT_TASKS = ("add", "reverse")


@dataclass
class PromptBatch:
    prompts: list[str]
    columns: dict[str, list] = field(default_factory=dict)  # extra columns, one value per prompt


def kjv_openings(split: str, words: int) -> list[dict]:
    """The first `words` words of every verse of the training books (or the held-out ones), in order."""
    rows = []
    with open(kjv_path(), encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            if (verse["book"] in KJV_VALIDATION_BOOKS) == (split == "validation") and len(
                verse["text"].split()
            ) > words:
                rows.append({"prompt": " ".join(verse["text"].split()[:words]), "citation": verse["citation"]})
    return rows


def dataset_rows(name: str, split: str, prompt_column: str) -> list[dict]:
    """Every row of a prompt dataset's split (a local file or glob held out by hash, or a Hub dataset)."""
    source = open_text_source(name, split, text_column=prompt_column)
    rows = []
    for row in source.dataset:
        if not isinstance(row.get(prompt_column), str):
            raise DataError(f"{name}: column {prompt_column!r} must hold the prompt text (columns: {sorted(row)})")
        rows.append({"prompt": row[prompt_column], **{k: v for k, v in row.items() if k != prompt_column}})
    return rows


class PromptStream:
    """Endless batches of prompts: tasks are drawn afresh per batch; fixed prompt sets are shuffled per epoch."""

    def __init__(
        self,
        source: str,
        split: str,
        batch_size: int,
        seed: int,
        *,
        prompt_column: str = "prompt",
        max_task_length: int = 10,
        prompt_words: int = 4,
        rows: list[dict] | None = None,
    ):
        """`rows` ({"prompt": ..., other columns}) are the prompts themselves (ESTrainer's dataset); `source` then
        only names them."""
        self.source, self.split, self.batch_size, self.seed = source, split, batch_size, seed
        self.max_task_length = max_task_length
        self.batches_served = 0
        self.rows, self.epoch_order = rows, (None, [])
        if rows is not None and not rows:
            raise DataError(f"{source} has no prompts")
        if rows is None and source not in PROMPT_TASKS:
            self.rows = (
                kjv_openings(split, prompt_words)
                if source == BUILTIN_KJV
                else dataset_rows(source, split, prompt_column)
            )
            if not self.rows:
                raise DataError(f"{source} has no prompts in its {split} split")

    def batch(self, index: int) -> PromptBatch:
        if self.rows is None:  # a task: (input, output) examples, prompted as the tasks are trained: input + " "
            rng = random.Random(f"{self.seed}/{self.source}/{self.split}/{index}")
            low, high = length_range(self.max_task_length, self.split == "validation")
            examples = [make_example(self.source, rng.randint(low, high), rng) for _ in range(self.batch_size)]
            return PromptBatch([source + " " for source, _ in examples], {"answer": [t for _, t in examples]})
        rows = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(position, len(self.rows))
            rows.append(self.rows[self.order(epoch)[offset]])
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
        return PromptBatch([row["prompt"] for row in rows], columns)

    def order(self, epoch: int) -> list[int]:
        if self.epoch_order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self.epoch_order = (epoch, order)
        return self.epoch_order[1]

    def __iter__(self):
        while True:
            batch = self.batch(self.batches_served)
            self.batches_served += 1  # before the yield: a checkpoint taken now resumes after this batch
            yield batch

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]
