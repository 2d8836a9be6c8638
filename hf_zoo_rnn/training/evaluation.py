"""Evaluation shared by the trainer and hf_zoo_rnn/evaluate.py: clean loss / perplexity, and task exact match."""

import math
from collections.abc import Iterable

import torch

from ..data import TaskStream, exact_match


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
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not answer:
            continue
        ids = torch.tensor([context + answer], device=model.device)
        steps = slice(len(context) - 1, len(context) + len(answer) - 1)  # the positions that predict the answer
        log_p = model(ids).logits[0, steps].float().log_softmax(-1)
        log_q = reference(ids.to(reference.device)).logits[0, steps].float().log_softmax(-1).to(log_p.device)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += len(answer)
    return total / count if count else math.nan
