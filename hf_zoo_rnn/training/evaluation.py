"""Evaluation shared by the trainer and hf_zoo_rnn/evaluate.py: clean loss / perplexity, task exact match, and
the rewards of greedy completions; `run_evaluation` picks what a run's objective is judged by."""

import logging
import math
from collections.abc import Callable, Iterable

import torch

from ..data import BUILTIN_KJV, PackedStream, TaskStream, exact_match, open_text_source
from ..data.prompts import PromptStream
from ..data.tasks import prompt_completion_ids
from ..rewards import RewardObjective

logger = logging.getLogger(__name__)


@torch.inference_mode()
def language_model_metrics(model, batches: Iterable, max_batches: int) -> dict:
    """Mean clean loss over up to `max_batches` (input_ids, labels) batches, and its perplexity."""
    loss_sum, count = 0.0, 0
    for input_ids, labels in batches:
        if count == max_batches:
            break
        loss_sum += model(input_ids.to(model.device), labels=labels.to(model.device), logits_to_keep=1).loss.item()
        count += 1
    if not count:
        return {}
    loss = loss_sum / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


def task_metrics(model, tokenizer, task: str, max_train_length: int, seed: int, examples: int = 16) -> dict:
    """Exact match at training lengths and at the longer, out-of-distribution validation lengths."""
    results = {}
    for name, validation in (("in_distribution", False), ("out_of_distribution", True)):
        stream = TaskStream(task, tokenizer, examples, max_train_length, seed, validation)
        results[f"exact_match_{name}"] = exact_match(model, tokenizer, stream.examples(0))
    return results


@torch.inference_mode()
def kl_to_reference(model, reference, tokenizer, prompts: list[str], completions: list[str]) -> float:
    """Mean per-token KL(model || reference) of the next-token distributions along each prompt's completion: how far
    training on a reward moved the model from where it started, where it now generates."""
    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions, strict=True):
        context, answer = prompt_completion_ids(tokenizer, prompt, completion)
        if not answer:
            continue
        ids = torch.tensor([context + answer], device=model.device)
        steps = slice(len(context) - 1, len(context) + len(answer) - 1)  # the positions that predict the answer
        log_p = model(ids).logits[0, steps].float().log_softmax(-1)
        log_q = reference(ids.to(reference.device)).logits[0, steps].float().log_softmax(-1).to(log_p.device)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += len(answer)
    return total / count if count else math.nan


def run_evaluation(
    args, tokenizer, objective: RewardObjective | None, validation_stream: Callable, validation_data: str
):
    """What the run is judged by: its rewards (`objective`, the estimator's), else its next-token loss."""
    if objective is not None:
        return RewardEvaluation(args, tokenizer, objective, validation_stream)
    return LanguageModelEvaluation(args, tokenizer, validation_stream, validation_data)


class LanguageModelEvaluation:
    """The next-token objective's evaluation: validation loss (and a task's exact match). A validation set smaller
    than one batch is said once, not at every evaluation."""

    def __init__(self, args, tokenizer, validation_stream: Callable, validation_data: str):
        self.args, self.tokenizer, self.validation_stream = args, tokenizer, validation_stream
        self.validation_data, self.warned = validation_data, False

    def __call__(self, model) -> dict:
        data = self.args.data
        was_training = model.training
        model.eval()
        results = language_model_metrics(model, self.validation_stream(), data.eval_batches)
        if not results and not self.warned:
            self.warned = True
            logger.warning(
                "no validation loss: %s holds less than one batch of %d x %d tokens (pass --validation_dataset, "
                "or raise --validation_fraction)",
                self.validation_data,
                data.batch_size,
                data.context_length,
            )
        if data.task:
            seed = self.args.train.seed + 1
            results.update(
                task_metrics(
                    model, self.tokenizer, data.task, data.task_max_length, seed, examples=data.task_eval_examples
                )
            )
        model.train(was_training)
        return results


class RewardEvaluation:
    """The reward objective's evaluation: the mean reward of greedy completions of held-out prompts (for a task: out
    of distribution, and in distribution on fresh prompts of the training lengths), and for KJV prompts the
    validation loss (how far the language model moved)."""

    def __init__(self, args, tokenizer, objective: RewardObjective, validation_stream: Callable):
        self.args, self.tokenizer, self.validation_stream = args, tokenizer, validation_stream
        self.greedy = RewardObjective(tokenizer, objective.functions, objective.weights, args.train.max_new_tokens)
        self.greedy.timeout, self.greedy.trainer_state = objective.timeout, objective.trainer_state

    def __call__(self, model) -> dict:
        data = self.args.data
        streams = {"eval_reward": self.validation_stream()}
        if streams["eval_reward"] is None:  # ESTrainer without an eval_dataset
            return {}
        if data.prompts in ("add", "reverse"):
            streams["eval_reward_in_distribution"] = PromptStream(
                data.prompts, "train", data.batch_size, self.args.train.seed + 1, max_task_length=data.task_max_length
            )
        results = {}
        for name, stream in streams.items():
            rewards = []
            for index in range(data.eval_batches):
                batch = stream.batch(index)
                rewards += self.greedy.prompt_rewards(model, batch.prompts, batch.columns)
            finite = [r for r in rewards if not math.isnan(r)]
            results[name] = sum(finite) / len(finite) if finite else math.nan
        if data.prompts == BUILTIN_KJV:
            text = PackedStream(
                open_text_source(BUILTIN_KJV, "validation"), self.tokenizer, data.context_length, data.batch_size
            )
            results.update(language_model_metrics(model, text, data.eval_batches))
        return results
