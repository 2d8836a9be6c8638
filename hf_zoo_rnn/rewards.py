"""Rewards computed from generated text, with TRL's reward-function signature, so TRL users can bring theirs:

    reward(prompts: list[str], completions: list[str], **columns) -> list[float]   (one float per completion)

Built in: exact match for the paper's `add` (checked by computing the sum) and `reverse` tasks, the distinct-4-gram
ratio of a continuation, and the fluency of a continuation under a frozen model (its mean token log-probability).
`pass_at_k` scores k samples per prompt by the best of them. A user's function is named `module:function`.
"""

import hashlib
import importlib
import math
import re
from collections.abc import Callable, Sequence

import torch

RewardFunction = Callable[..., list[float]]


class RewardError(ValueError):
    """A reward function that cannot be loaded, raises, or returns something other than one number per completion."""


def answer_of(completion: str) -> str:
    """The answer a task completion gives: its text up to the first space (the tasks' end marker)."""
    return completion.lstrip(" ").split(" ", 1)[0].strip()


def add_exact(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 where the completion of `a+b` (the `add` task's prompt, with its trailing space) is the sum, else 0.0."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        match = re.fullmatch(r"\s*(\d+)\+(\d+)\s*", prompt)
        rewards.append(float(match is not None and answer_of(completion) == str(int(match[1]) + int(match[2]))))
    return rewards


def reverse_exact(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 where the completion is the prompt's letters reversed (the `reverse` task), else 0.0."""
    return [float(answer_of(c) == p.strip()[::-1]) for p, c in zip(prompts, completions, strict=True)]


def distinct_4(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The share of a completion's word 4-grams that are distinct: 1.0 for text that never repeats itself, low for
    "the LORD, and the LORD, and the LORD". Fewer than 4 words score 0."""
    rewards = []
    for completion in completions:
        words = completion.split()
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        rewards.append(len(set(grams)) / len(grams) if grams else 0.0)
    return rewards


class Fluency:
    """The mean log-probability per token of each completion given its prompt under a frozen model (the starting
    model): a reward that keeps text fluent while another term changes it."""

    __name__ = "fluency"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        rewards = []
        for prompt, completion in zip(prompts, completions, strict=True):
            context = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
            answer = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            if not answer:
                rewards.append(0.0)
                continue
            ids = torch.tensor([context + answer], device=self.model.device)
            labels = torch.tensor([[-100] * len(context) + answer], device=self.model.device)
            rewards.append(-self.model(ids, labels=labels).loss.item())
        return rewards


BUILT_IN = {"add_exact": add_exact, "reverse_exact": reverse_exact, "distinct_4": distinct_4}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in name or `module:function`; anything else is one RewardError naming it."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise RewardError(f"reward {spec!r} is neither built in ({', '.join(BUILT_IN)}, fluency) nor module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise RewardError(f"reward {spec!r} cannot be loaded: {error}") from None
    if not callable(function):
        raise RewardError(f"reward {spec!r} is not callable")
    return function


def reward_values(
    function: RewardFunction, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> list[float]:
    """`function`'s rewards, checked: a raise, a wrong length or a non-number is a RewardError naming the function
    and the row; a non-finite value is kept as NaN (dropped and counted by the caller)."""
    name = getattr(function, "__name__", repr(function))
    try:
        values = function(prompts=prompts, completions=completions, **columns)
    except Exception as error:
        raise RewardError(f"reward function {name} raised {type(error).__name__}: {error}") from error
    if not isinstance(values, Sequence) or len(values) != len(completions):
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise RewardError(f"reward function {name} returned {got} values for {len(completions)} completions")
    checked = []
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RewardError(f"reward function {name}, row {row} ({prompts[row]!r}): {value!r} is not a number")
        checked.append(float(value) if math.isfinite(value) else math.nan)
    return checked


def combined_rewards(
    functions: list[RewardFunction], weights: list[float], prompts: list[str], completions: list[str], columns: dict
) -> tuple[list[float], int]:
    """The weighted sum of every function's reward per completion, and how many completions got a non-finite one
    (those are NaN: the caller drops them)."""
    totals = [0.0] * len(completions)
    for function, weight in zip(functions, weights, strict=True):
        for row, value in enumerate(reward_values(function, prompts, completions, columns)):
            totals[row] += weight * value
    return totals, sum(1 for value in totals if math.isnan(value))


def pass_at_k(rewards: list[float], k: int) -> list[float]:
    """Per prompt, the best of its k consecutive samples' rewards (pass@k for 0/1 rewards); NaNs are ignored."""
    groups = [rewards[i : i + k] for i in range(0, len(rewards), k)]
    return [max((v for v in group if not math.isnan(v)), default=math.nan) for group in groups]


class RewardObjective:
    """A model's loss on a batch of prompts: minus the mean reward of its completions. Completions are greedy unless
    `do_sample`; then `samples` per prompt, scored per prompt by their mean or their best (pass@k), from a seed the
    caller fixes per member, so a member's completions do not depend on which process generates them."""

    def __init__(self, tokenizer, functions: list[RewardFunction], weights: list[float], max_new_tokens: int,
                 do_sample: bool = False, temperature: float = 1.0, samples: int = 1, aggregation: str = "mean"):  # fmt: skip
        self.tokenizer, self.functions, self.weights = tokenizer, functions, weights
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature
        self.samples, self.aggregation = samples, aggregation
        self.nonfinite = 0  # completions whose reward was not a finite number, so far

    @torch.inference_mode()
    def completions(self, model, prompts: list[str], seed: int | None = None) -> list[str]:
        """`samples` completions per prompt, prompt by prompt in order (the prompts left-padded into one batch)."""
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        options = {"do_sample": self.do_sample, "num_return_sequences": self.samples}
        if self.do_sample:
            options.update(temperature=self.temperature, top_k=0)
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(
                encoded.input_ids.to(model.device), attention_mask=encoded.attention_mask.to(model.device),
                max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **options,
            )  # fmt: skip
        return self.tokenizer.batch_decode(output[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)

    def prompt_rewards(self, model, prompts: list[str], columns: dict, seed: int | None = None) -> list[float]:
        """One reward per prompt (NaN where every sample's reward was non-finite)."""
        texts = self.completions(model, prompts, seed)
        repeat = self.samples
        expanded, expanded_columns = per_sample(prompts, columns, repeat)
        rewards = self.scored(expanded, texts, expanded_columns)
        if self.aggregation == "best":
            return pass_at_k(rewards, repeat)
        groups = [[v for v in rewards[i : i + repeat] if not math.isnan(v)] for i in range(0, len(rewards), repeat)]
        return [sum(group) / len(group) if group else math.nan for group in groups]

    def scored(self, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
        """The weighted reward of each completion (NaN where it is not finite, and counted)."""
        rewards, nonfinite = combined_rewards(self.functions, self.weights, prompts, completions, columns)
        self.nonfinite += nonfinite
        return rewards

    def loss(self, model, prompts: list[str], columns: dict, seed: int | None = None) -> torch.Tensor:
        """Minus the mean reward over the prompts with a finite one (NaN if none has: the member is dropped)."""
        finite = [v for v in self.prompt_rewards(model, prompts, columns, seed) if not math.isnan(v)]
        return torch.tensor(-sum(finite) / len(finite) if finite else math.nan, dtype=torch.float64)


def per_sample(prompts: list[str], columns: dict[str, list], samples: int) -> tuple[list[str], dict[str, list]]:
    """The prompts and their columns repeated once per sample, in the order `completions` returns the samples."""
    repeated = {key: [v for v in values for _ in range(samples)] for key, values in columns.items()}
    return [p for p in prompts for _ in range(samples)], repeated


def member_seed(run_seed: int, step: int, probe: int, column: int) -> int:
    """The sampling seed of one ES member (probe, sign) at one step: a hash of all four, in a space of its own (the
    perturbation's z come from a different scheme, so no seed is shared between them)."""
    digest = hashlib.sha256(f"hf_zoo_rnn/sampling/{run_seed}/{step}/{probe}/{column}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
