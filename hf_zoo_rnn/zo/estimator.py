"""The CD-RGE arithmetic on per-probe scalars: small pure functions, each tested directly.

For probe i with direction z_i:  g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)   (central)
                                 g_i = (L(theta + eps z_i) - L(theta)) / eps                 (forward)
The gradient estimate is  g_hat = (1 / n) * sum_i g_i z_i  over the n probes with finite losses.
"""

import torch

DIFFERENCES = ("central", "forward")


def projected_gradients(first: torch.Tensor, second: torch.Tensor, eps: float, difference: str) -> torch.Tensor:
    """g_i per probe. Central: first = L+, second = L-. Forward: first = L+, second = L(theta)."""
    if difference == "central":
        return (first - second) / (2 * eps)
    if difference == "forward":
        return (first - second) / eps
    raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")


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
