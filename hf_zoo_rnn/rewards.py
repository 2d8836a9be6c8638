"""Rewards computed from generated text, with TRL's reward-function signature, so TRL users can bring theirs:

    reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]   (one per completion)

Every function is called with TRL's keywords: prompts, completions, completion_ids, trainer_state and every other
column of the prompts' dataset. A value may be a NumPy number; None means "not applicable" (left out of the sum).

Built in: exact match for the paper's `add` (checked by computing the sum) and `reverse` tasks, the distinct-3- and
distinct-4-gram ratios of a whole continuation, and the fluency of a continuation under a frozen model (its mean
token log-probability).
`pass_at_k` scores k samples per prompt by the best of them. A user's function is named `module:function`.
"""

import contextlib
import hashlib
import importlib
import math
import numbers
import re
import signal
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .data.tasks import answer_batch, prompt_completion_ids
from .forwards.population import members_generate
from .modeling_zoo_rnn import IGNORE_INDEX

RewardFunction = Callable[..., list[float]]


class RewardError(ValueError):
    """A reward function that cannot be loaded, raises, hangs, or returns something other than one number (or None)
    per completion."""


class RewardInterrupted(BaseException):
    """A stop request (SIGTERM, SIGINT) arrived while a reward function ran: the step is abandoned, so that the run
    saves within seconds instead of waiting for a slow reward (a BaseException: a reward's `except Exception` does not
    swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} during a reward function")
        self.signum = signum


class RewardTimeout(BaseException):
    """A reward function's call outlived its deadline (raised inside it by SIGALRM)."""


class RewardCall:
    """Whether a reward function is running now, and whether a stop request may interrupt it (`interruptible`: the
    trainer allows it only inside a training step); and a call's deadline."""

    active = False
    interruptible = False

    @classmethod
    @contextlib.contextmanager
    def guarded(cls, name: str, timeout: float):
        """Run a reward call under `timeout` seconds (0: none; the main thread only: signals reach no other)."""
        timeout = timeout if threading.current_thread() is threading.main_thread() else 0
        previous, outer = None, (0.0, 0.0)
        if timeout:

            def expired(signum, frame):
                raise RewardTimeout

            previous = signal.signal(signal.SIGALRM, expired)
            outer = signal.setitimer(signal.ITIMER_REAL, timeout)
        cls.active = True
        try:
            try:
                yield
            finally:
                if timeout:  # disarm first: nothing may fire once the call is over
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
                    if outer[0]:  # a timer the host had set (a test runner's, say) runs on
                        signal.setitimer(signal.ITIMER_REAL, *outer)
                cls.active = False
        except RewardTimeout:
            raise RewardError(
                f"reward function {name} did not return within {timeout:g} s (--reward_timeout; one call scores "
                "every member's completions of a step)"
            ) from None


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


def distinct_ngrams(completions: list[str], n: int) -> list[float]:
    """The share of each completion's word n-grams that are distinct, over the whole completion (linear in its
    length): 1.0 for text that never repeats itself, low for a loop however long. Fewer than n words score 0."""
    rewards = []
    for completion in completions:
        words = completion.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        rewards.append(len(set(grams)) / len(grams) if grams else 0.0)
    return rewards


def distinct_4(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The share of a completion's word 4-grams that are distinct: 1.0 for text that never repeats itself, low for
    "the LORD, and the LORD, and the LORD". Fewer than 4 words score 0."""
    return distinct_ngrams(completions, 4)


def distinct_3(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The share of a completion's word trigrams that are distinct, over the whole completion: with completions as
    long as people read (hundreds of tokens) it sees a loop that a short window misses. Fewer than 3 words score 0."""
    return distinct_ngrams(completions, 3)


class Fluency:
    """The mean log-probability per token of each completion given its prompt under a frozen model (the starting
    model): a reward that keeps text fluent while another term changes it. Every completion of a call is scored
    in batched forwards of `batch_size` rows (right-padded, the padding masked: each row as alone)."""

    __name__ = "fluency"

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        tokenizer, device = self.tokenizer, self.model.device
        pairs = [prompt_completion_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        rewards = [0.0] * len(pairs)  # an empty completion scores 0
        scored = [row for row, (_, answer) in enumerate(pairs) if answer]
        for first in range(0, len(scored), self.batch_size):
            rows = scored[first : first + self.batch_size]
            ids, labels = answer_batch([pairs[row] for row in rows], tokenizer.pad_token_id)
            lengths = torch.tensor([len(pairs[row][0]) + len(pairs[row][1]) for row in rows])
            mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
            logits = self.model(ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            targets = labels[:, 1:].to(device)
            losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            means = losses.sum(1) / (targets != IGNORE_INDEX).sum(1)
            for row, value in zip(rows, means.tolist(), strict=True):
                rewards[row] = -value
        return rewards


BUILT_IN = {"add_exact": add_exact, "reverse_exact": reverse_exact, "distinct_3": distinct_3, "distinct_4": distinct_4}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in name or `module:function`; anything else is one RewardError naming it."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise RewardError(f"reward {spec!r} is neither built in ({', '.join(BUILT_IN)}, fluency) nor module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except Exception as error:  # not found, or the module itself fails (a syntax error, an import-time raise)
        raise RewardError(f"reward {spec!r} cannot be loaded: {type(error).__name__}: {error}") from None
    if not callable(function):
        raise RewardError(f"reward {spec!r} is not callable")
    return function


def reward_number(value) -> float | None:
    """One reward as TRL takes it: a number (NumPy and 0-d tensors too), or None for "not applicable"; a non-finite
    number becomes NaN. Anything else raises TypeError."""
    if value is None:
        return None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # NumPy scalars and arrays, torch tensors
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{value!r} is not a number")
    value = float(value)
    return value if math.isfinite(value) else math.nan


def reward_values(
    function: RewardFunction,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    *,
    timeout: float = 0.0,
) -> list[float | None]:
    """`function`'s rewards, checked: a raise, a call longer than `timeout` seconds, a wrong length or a non-number
    is a RewardError naming the function and the row (and the cause); None means "not applicable to this
    completion"; a non-finite value is kept as NaN (dropped and counted by the caller). A list, tuple, 1-d NumPy
    array or tensor is accepted, as TRL does."""
    name = getattr(function, "__name__", repr(function))
    try:
        with RewardCall.guarded(name, timeout):
            values = function(prompts=prompts, completions=completions, **columns)
    except Exception as error:
        if isinstance(error, RewardError):
            raise
        raise RewardError(f"reward function {name} raised {type(error).__name__}: {error}") from error
    if getattr(values, "ndim", None) == 1 and hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(completions):
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise RewardError(f"reward function {name} returned {got} values for {len(completions)} completions")
    checked = []
    for row, value in enumerate(values):
        try:
            checked.append(reward_number(value))
        except TypeError as error:
            raise RewardError(f"reward function {name}, row {row} ({prompts[row]!r}): {error}") from None
    return checked


def combined_rewards(
    functions: list[RewardFunction],
    weights: list[float],
    prompts: list[str],
    completions: list[str],
    columns: dict,
    *,
    timeout: float = 0.0,
) -> tuple[list[float], int, dict[str, list[float]]]:
    """The weighted sum of every function's reward per completion (a function's None leaves it out of the sum, as in
    TRL; a completion no function applies to is NaN), how many completions got a non-finite total (NaN: the caller
    drops them), and each function's values by name (NaN where it returned None)."""
    totals: list[float | None] = [None] * len(completions)
    per_function = {}
    for function, weight in zip(functions, weights, strict=True):
        values = reward_values(function, prompts, completions, columns, timeout=timeout)
        per_function[getattr(function, "__name__", repr(function))] = [math.nan if v is None else v for v in values]
        for row, value in enumerate(values):
            if value is not None:
                totals[row] = (totals[row] or 0.0) + weight * value
    totals = [math.nan if total is None else total for total in totals]
    return totals, sum(1 for value in totals if math.isnan(value)), per_function


def pass_at_k(rewards: list[float], k: int) -> list[float]:
    """Per prompt, the best of its k consecutive samples' rewards (pass@k for 0/1 rewards); NaNs are ignored."""
    groups = [rewards[i : i + k] for i in range(0, len(rewards), k)]
    return [max((v for v in group if not math.isnan(v)), default=math.nan) for group in groups]


class RewardObjective:
    """A model's reward on a batch of prompts: the mean reward of its completions. Completions are greedy unless
    `do_sample`; then `samples` per prompt, scored per prompt by their mean or their best (pass@k), from a seed the
    caller fixes per member, so a member's completions do not depend on which process generates them, nor on
    whether it generates alone (`completions`) or in one batch with the rest of the population
    (`population_completions`)."""

    def __init__(
        self,
        tokenizer,
        functions: list[RewardFunction],
        weights: list[float],
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        samples: int = 1,
        aggregation: str = "mean",
    ):
        self.tokenizer, self.functions, self.weights = tokenizer, functions, weights
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature
        self.samples, self.aggregation = samples, aggregation
        self.nonfinite = 0  # completions whose reward was not a finite number, so far
        self.trainer_state = None  # passed to every reward function, as TRL does (the trainer sets it)
        self.timeout = 0.0  # seconds one reward function's call may take (0: no deadline; the trainer sets it)
        self.function_values: dict[str, list[float]] = {}  # the last call's values per function
        self.completion_lengths: list[int] = []  # the last call's completions, in tokens

    def encoded(self, prompts: list[str]):
        """The prompts left-padded into one batch (the tokenizer's own padding side is left as it is)."""
        return self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)

    @torch.inference_mode()
    def completions(self, model, prompts: list[str], seed: int | None = None) -> list[str]:
        """`samples` completions per prompt, prompt by prompt in order, from the model's own `generate`: any causal
        LM, its weights as they are."""
        encoded = self.encoded(prompts)
        # a configuration of its own: the model's generation_config may hold processors (a repetition penalty, top_p)
        # that the batched population does not apply; both decode exactly greedy or softmax(logits / T) samples
        sampling = {"temperature": self.temperature, "top_k": 0, "top_p": 1.0} if self.do_sample else {}
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_return_sequences=self.samples,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=model.generation_config.eos_token_id,
            **sampling,
        )
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(
                encoded.input_ids.to(model.device),
                attention_mask=encoded.attention_mask.to(model.device),
                generation_config=config,
            )
        return self.tokenizer.batch_decode(output[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)

    def population_completions(self, model, changes: dict, prompts: list[str], seeds: list[int]) -> list[list[str]]:
        """Every member's `completions` (member m with the low-rank `changes` of a ZooRnn model and sampling seed
        `seeds[m]`) from one batched forward per token: rows are (member, prompt, sample)."""
        encoded = self.encoded(prompts)
        device = model.device
        ids = encoded.input_ids.repeat_interleave(self.samples, 0).to(device)  # as generate's num_return_sequences
        mask = encoded.attention_mask.repeat_interleave(self.samples, 0).to(device)
        sampling = {}
        if self.do_sample:
            generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
            sampling = {"temperature": self.temperature, "generators": generators}
        tokens = members_generate(
            model,
            changes,
            ids,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=model.generation_config.eos_token_id,
            **sampling,
        )
        return [self.tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in tokens]

    def member_rewards(self, prompts: list[str], completions: list[list[str]], columns: dict) -> torch.Tensor:
        """[M, P] float64: each member's reward per prompt (the mean or best of its samples; NaN where every
        sample's reward was non-finite), from `completions` [M][P * samples]. Each reward function is called once
        with every member's completions."""
        members, repeat = len(completions), self.samples
        expanded, expanded_columns = per_sample(prompts, columns, repeat)
        everyone = {key: values * members for key, values in expanded_columns.items()}
        rewards = self.scored(expanded * members, [text for texts in completions for text in texts], everyone)
        if self.aggregation == "best":
            per_prompt = pass_at_k(rewards, repeat)
        else:
            groups = [[v for v in rewards[i : i + repeat] if not math.isnan(v)] for i in range(0, len(rewards), repeat)]
            per_prompt = [sum(group) / len(group) if group else math.nan for group in groups]
        return torch.tensor(per_prompt, dtype=torch.float64).view(members, len(prompts))

    def prompt_rewards(self, model, prompts: list[str], columns: dict, seed: int | None = None) -> list[float]:
        """The model's reward per prompt, as it is (NaN where every sample's reward was non-finite)."""
        return self.member_rewards(prompts, [self.completions(model, prompts, seed)], columns)[0].tolist()

    def scored(self, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
        """The weighted reward of each completion (NaN where it is not finite, and counted). Every function also gets
        TRL's `completion_ids` and `trainer_state` (`self.trainer_state`, set by ESTrainer; None otherwise); each
        function's values are kept in `self.function_values` for the step's statistics."""
        ids = self.tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
        columns = {**columns, "completion_ids": ids, "trainer_state": self.trainer_state}
        rewards, nonfinite, self.function_values = combined_rewards(
            self.functions, self.weights, prompts, completions, columns, timeout=self.timeout
        )
        self.completion_lengths = [len(row) for row in ids]
        self.nonfinite += nonfinite
        return rewards


def per_sample(prompts: list[str], columns: dict[str, list], samples: int) -> tuple[list[str], dict[str, list]]:
    """The prompts and their columns repeated once per sample, in the order `completions` returns the samples."""
    repeated = {key: [v for v in values for _ in range(samples)] for key, values in columns.items()}
    return [p for p in prompts for _ in range(samples)], repeated


def member_seed(run_seed: int, step: int, probe: int, column: int) -> int:
    """The sampling seed of one ES member (probe, sign) at one step: a hash of all four, in a space of its own (the
    perturbation's z come from a different scheme, so no seed is shared between them)."""
    digest = hashlib.sha256(f"hf_zoo_rnn/sampling/{run_seed}/{step}/{probe}/{column}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
