"""A policy gradient on rewards without backpropagation through time: the no-BPTT baseline of training on rewards.

Per step, `group` completions are sampled for each prompt; their rewards, normalised within the group (GRPO's
advantage), weigh each completion's one-step gradient of its log-likelihood (forwards/local.py: each
position's loss through the layers and one recurrent step), and AdamW steps. No KL term, no reference model.
"""

import math

import torch

from ..data.tasks import answer_batch
from ..forwards.local import accumulate_local_gradients
from ..rewards import RewardObjective, per_sample


def group_advantages(rewards: list[float], group: int) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4), 0 for a non-finite reward, per completion."""
    values = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    finite = torch.isfinite(values)
    filled = torch.where(finite, values, torch.zeros_like(values))
    count = finite.sum(1, keepdim=True).clamp(min=1)
    mean = filled.sum(1, keepdim=True) / count
    spread = (((filled - mean) * finite) ** 2).sum(1, keepdim=True).div(count).sqrt()
    return torch.where(finite, (values - mean) / (spread + 1e-4), torch.zeros_like(values)).flatten()


class OneStepPolicyGradient:
    """Sample, score, weigh the one-step gradient by the advantages, step AdamW."""

    def __init__(self, model, objective: RewardObjective, lr: float):
        self.model, self.objective = model, objective
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(self, prompts: list[str], columns: dict, seed: int) -> float:
        """One update; returns the mean reward of the sampled completions."""
        objective, tokenizer = self.objective, self.objective.tokenizer
        self.model.eval()
        completions = objective.completions(self.model, prompts, seed)
        group = objective.samples
        expanded, expanded_columns = per_sample(prompts, columns, group)
        rewards = objective.scored(expanded, completions, expanded_columns)
        advantages = group_advantages(rewards, group)
        pairs = [
            (tokenizer(prompt, add_special_tokens=False)["input_ids"],
             tokenizer(completion, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id])
            for prompt, completion in zip(expanded, completions, strict=True)
        ]  # fmt: skip
        ids, labels = answer_batch(pairs, tokenizer.pad_token_id)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device = self.model.device
        accumulate_local_gradients(self.model, ids.to(device), labels.to(device), "one_step", advantages.to(device))
        self.optimizer.step()
        finite = [r for r in rewards if not math.isnan(r)]
        return sum(finite) / len(finite) if finite else math.nan
