"""The next-token loss of one time chunk, shared by every training view (population forwards, local gradients,
BPTT), so all of them score exactly what the model's own forward scores. (The shipped model file keeps its own copy
inside `forward`: it must stand alone as Hub remote code.)"""

import torch
import torch.nn.functional as F

from ..modeling_zoo_rnn import IGNORE_INDEX, shifted_targets


def next_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, start: int, end: int, reduction: str = "sum"
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the logits [*models, B, t, V] of positions [start, end) against their next tokens in
    `labels` [B, T] (transformers' convention: position t is scored against labels[t + 1]; -100 is ignored), in at
    least float32; and the number of scored positions (per model). reduction="none" keeps [*models * B * t] terms."""
    targets = shifted_targets(labels, start, end)
    models = logits.shape[:-3]
    losses = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, -2),
        targets.expand(*models, -1, -1).flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return losses, int((targets != IGNORE_INDEX).sum())


def per_model_loss_sums(logits: torch.Tensor, labels: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, int]:
    """The summed next-token loss of each of M models' logits [M, B, t, V] over one chunk, and the scored count."""
    losses, count = next_token_losses(logits, labels, start, end, reduction="none")
    return losses.view(logits.shape[0], -1).sum(1), count
