"""The CD-RGE arithmetic on per-probe scalars: small pure functions, each tested directly.

For probe i with direction z_i:  g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)   (central)
                                 g_i = (L(theta + eps z_i) - L(theta)) / eps                 (forward)
The gradient estimate is  g_hat = (1 / n) * sum_i g_i z_i  over the n probes with finite losses.
"""

import torch

DIFFERENCES = ("central", "forward")
SHAPINGS = ("none", "zscore", "centered_ranks", "per_prompt")


def projected_gradients(first: torch.Tensor, second: torch.Tensor, eps: float, difference: str) -> torch.Tensor:
    """g_i per probe. Central: first = L+, second = L-. Forward: first = L+, second = L(theta)."""
    if difference == "central":
        return (first - second) / (2 * eps)
    if difference == "forward":
        return (first - second) / eps
    raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")


def prompt_means(losses: torch.Tensor) -> torch.Tensor:
    """[K, 2, P] per-prompt losses -> [K, 2]: each member's mean over its finite ones (NaN where it has none)."""
    finite = torch.isfinite(losses)
    total = torch.where(finite, losses, torch.zeros_like(losses)).sum(-1)
    count = finite.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def zscores(values: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std; all zeros when they do not vary (nothing to learn from them)."""
    spread = values.std() if values.numel() > 1 else values.new_zeros(())
    return (values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)


def shaped_losses(losses: torch.Tensor, shaping: str) -> torch.Tensor:
    """Evolution strategies' fitness shaping, over the whole population's losses [K, 2] before differencing: "zscore"
    (minus the mean, over the std: Qiu et al. 2025) or "centered_ranks" (each loss's rank, scaled to [-0.5, 0.5]:
    Salimans et al. 2017), computed over the finite losses; a non-finite loss stays as it is (its probe is dropped).
    Both make the step independent of the reward's scale; ranks also of its outliers.

    Losses per prompt [K, 2, P] (rewards) are averaged over the prompts first, except for "per_prompt": each
    prompt's losses are z-scored across the members, then averaged per member — the ES analogue of GRPO's groups
    (EGGROLL): every prompt weighs the same whatever its reward's spread, and a prompt every member scores alike
    adds nothing."""
    if shaping not in SHAPINGS:
        raise ValueError(f"loss_shaping must be one of {SHAPINGS}, got {shaping!r}")
    if losses.dim() == 3:
        if shaping == "per_prompt":
            shaped = torch.full_like(losses, float("nan"))
            for prompt in range(losses.shape[2]):
                column = losses[:, :, prompt]
                finite = torch.isfinite(column)
                shaped[:, :, prompt][finite] = zscores(column[finite])
            return prompt_means(shaped)
        losses = prompt_means(losses)
    elif shaping == "per_prompt":
        raise ValueError("loss_shaping='per_prompt' needs one loss per prompt and member (the reward objective)")
    if shaping == "none":
        return losses
    finite = torch.isfinite(losses)
    values = losses[finite]
    if shaping == "zscore":
        shaped = zscores(values)
    else:
        ranks = values.argsort().argsort().to(losses.dtype)  # ties broken by position: deterministic everywhere
        shaped = ranks / max(values.numel() - 1, 1) - 0.5
    out = losses.clone()
    out[finite] = shaped
    return out


def finite_probes(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Mask of probes whose two losses are both finite; a NaN/Inf probe is dropped whole (both signs)."""
    return torch.isfinite(first) & torch.isfinite(second)


def clip_projected(g: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp each projected gradient to [-clip, clip] (None: unchanged)."""
    return g if clip is None else g.clamp(-clip, clip)


def probe_coefficients(
    first: torch.Tensor, second: torch.Tensor, eps: float, difference: str, clip: float | None
) -> tuple[torch.Tensor, int]:
    """Weights c_i with g_hat = sum_i c_i z_i / n_kept, and n_kept. Dropped probes get c_i = 0."""
    keep = finite_probes(first, second)
    g = clip_projected(projected_gradients(first, second, eps, difference), clip)
    return torch.where(keep, g, torch.zeros_like(g)), int(keep.sum())


def reported_loss(first: torch.Tensor, second: torch.Tensor, difference: str) -> float:
    """The paper's train loss: the mean perturbed loss over finite probes ((L+ + L-) / 2 for central)."""
    keep = finite_probes(first, second)
    if not keep.any():
        return float("nan")
    perturbed = (first[keep] + second[keep]) / 2 if difference == "central" else first[keep]
    return perturbed.mean().item()
