"""How probe directions are drawn: z_i for probe i of a step, generated piece by piece from seeds.

Both families are functions of (run seed, step, probe, tensor, element) and of state every process holds
identically, so every process, every resume and every chunking regenerates the same z; nothing is stored per probe.

* isotropic: z ~ Rademacher or Gaussian, E[z z^T] = I (the paper's CD-RGE).
* guided (Guided ES, Maheswaranathan et al. 2019): z = sqrt(alpha) z_iso + sqrt((1 - alpha) n / k) U^T zeta with U
  the k orthonormal rows spanning the surrogate directions over the n ZO parameters and zeta ~ N(0, I_k) from
  the probe's own seed. E[z z^T] = alpha I + (1 - alpha) (n / k) U^T U has the isotropic trace n and is positive
  definite, so the estimate g_hat = mean_i g_i z_i has expectation E[z z^T] grad: still a descent direction,
  tilted towards the surrogates. Memory: the basis, k fp32 values per ZO parameter.
"""

import math
from collections.abc import Sequence

import torch

from .noise import noise, stream_seed


class IsotropicDirections:
    """z from the seed scheme of noise.py; `step` names the current optimisation step."""

    def __init__(self, params: Sequence[torch.Tensor], seed: int, distribution: str):
        self.params, self.seed, self.distribution = params, seed, distribution
        self.step = 0

    def z(self, probe: int, index: int, start: int, length: int) -> torch.Tensor:
        """fp32 elements [start, start + length) of tensor `index`'s z for `probe` of the current step."""
        stream = stream_seed(self.seed, self.step, probe, index)
        return noise(stream, start, length, self.distribution, self.params[index].device)


class GuidedDirections(IsotropicDirections):
    """Isotropic z mixed with a k-dimensional subspace of surrogate directions (set anew each step)."""

    def __init__(self, params: Sequence[torch.Tensor], seed: int, distribution: str, alpha: float):
        if not 0 < alpha <= 1:
            raise ValueError(f"guide_alpha must be in (0, 1], got {alpha}")
        super().__init__(params, seed, distribution)
        self.alpha = alpha
        self.total = sum(p.numel() for p in params)  # n
        self.basis: list[torch.Tensor] = []  # per tensor: [k, numel] rows of U
        # zeta's stream uses the tensor index one past the last parameter, so it never collides with a tensor's z
        self.zeta_index = len(params)

    @torch.no_grad()
    def set_subspace(self, surrogates: Sequence[Sequence[torch.Tensor]]) -> None:
        """Orthonormalise the surrogate directions (each one tensor per parameter) into U; directions that add
        nothing new (zero, or in the span of earlier ones) are dropped. With none left, z is isotropic."""
        rows = [torch.cat([t.reshape(-1).to(torch.float64) for t in direction]) for direction in surrogates]
        tolerance = 1e-12 * max([1.0] + [row.norm().item() for row in rows])
        kept: list[torch.Tensor] = []
        for row in rows:  # Gram-Schmidt twice: deterministic, and orthogonal to fp64 precision
            for _ in range(2):
                for other in kept:
                    row = row - (row @ other) * other
            norm = row.norm()
            if norm > tolerance:
                kept.append(row / norm)
        sizes = [p.numel() for p in self.params]
        if not kept:
            self.basis = []
            return
        stacked = torch.stack(kept).to(torch.float32)
        self.basis = [piece.contiguous() for piece in stacked.split(sizes, dim=1)]

    def z(self, probe: int, index: int, start: int, length: int) -> torch.Tensor:
        isotropic = super().z(probe, index, start, length)
        if not self.basis:
            return isotropic
        k = self.basis[0].shape[0]
        zeta = noise(stream_seed(self.seed, self.step, probe, self.zeta_index), 0, k, "gaussian", isotropic.device)
        guided = zeta @ self.basis[index][:, start : start + length]
        return isotropic.mul_(math.sqrt(self.alpha)).add_(guided, alpha=math.sqrt((1 - self.alpha) * self.total / k))
