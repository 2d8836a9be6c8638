"""How probe directions are drawn: z_i for probe i of a step, generated piece by piece from seeds.

Both families are functions of (run seed, step, probe, tensor, element) and of state every process holds
identically, so every process, every resume and every chunking regenerates the same z; nothing is stored per probe.

* isotropic: z ~ Rademacher or Gaussian, E[z z^T] = I (the paper's CD-RGE).
* low-rank (EGGROLL): a matrix's z is A B^T / sqrt(r) from the probe's seed; vectors isotropic (LowRankDirections).
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

    def add_combination(
        self,
        out: torch.Tensor,
        probes: Sequence[int],
        coefficients: Sequence[float],
        index: int,
        start: int,
        length: int,
    ) -> None:
        """out += sum_i c_i z_i over elements [start, start + length) of tensor `index`, in probe order (the
        update replays the probes' z from their seeds)."""
        for probe, c in zip(probes, coefficients, strict=True):
            if c != 0:
                out.add_(self.z(probe, index, start, length), alpha=c)


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


class LowRankDirections(IsotropicDirections):
    """EGGROLL's low-rank directions (Sarkar et al. 2025): a matrix's z is A B^T / sqrt(r), with A [m, r] and B [n, r]
    drawn from the probe's seed; a tensor of more dimensions is a batch of matrices over its last two (the
    recurrent kernel [G, N, D, D]: one D x D block per gate and head, so the block-diagonal structure stays).
    `matrices` says which tensors are; the others (biases, norms) keep isotropic z. Each element of A B^T / sqrt(r)
    has unit variance and E[z z^T] = I, as for isotropic z, so the estimate keeps its expectation; a probe is
    r (m + n) random numbers per matrix, and sum_i c_i z_i is one matmul of the stacked factors, never a dense z
    per probe."""

    def __init__(
        self, params: Sequence[torch.Tensor], seed: int, distribution: str, rank: int, matrices: Sequence[bool]
    ):
        if rank < 1:
            raise ValueError(f"perturbation_rank must be at least 1, got {rank}")
        if any(is_matrix and p.ndim < 2 for p, is_matrix in zip(params, matrices, strict=True)):
            raise ValueError("a low-rank tensor needs at least two dimensions")
        super().__init__(params, seed, distribution)
        self.rank, self.matrices = rank, list(matrices)

    def is_low_rank(self, index: int) -> bool:
        return self.matrices[index]

    def factors(self, probe: int, index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [m, r], B [n, r]) of matrix `batch` of tensor `index` for `probe`: A's elements come first in the
        tensor's stream, then B's, each matrix's in order."""
        *leading, m, n = self.params[index].shape
        matrices, r = math.prod(leading), self.rank
        stream = stream_seed(self.seed, self.step, probe, index)
        device = self.params[index].device
        a = noise(stream, batch * m * r, m * r, self.distribution, device).view(m, r)
        b = noise(stream, matrices * m * r + batch * n * r, n * r, self.distribution, device).view(n, r)
        return a, b

    def all_factors(self, probe: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every matrix's factors of tensor `index` for `probe` at once: (A [matrices, m, r], B [matrices, n, r]),
        equal to `factors` of each matrix (the same stream pieces, drawn in two calls instead of two per matrix)."""
        *leading, m, n = self.params[index].shape
        matrices, r = math.prod(leading), self.rank
        stream = stream_seed(self.seed, self.step, probe, index)
        device = self.params[index].device
        a = noise(stream, 0, matrices * m * r, self.distribution, device).view(matrices, m, r)
        b = noise(stream, matrices * m * r, matrices * n * r, self.distribution, device).view(matrices, n, r)
        return a, b

    def z(self, probe: int, index: int, start: int, length: int) -> torch.Tensor:
        if not self.is_low_rank(index):
            return super().z(probe, index, start, length)
        return self.products([probe], [1.0], index, start, length)

    def add_combination(self, out, probes, coefficients, index, start, length) -> None:
        if not self.is_low_rank(index):
            super().add_combination(out, probes, coefficients, index, start, length)
        else:
            out.add_(self.products(probes, coefficients, index, start, length))

    def products(self, probes: Sequence[int], coefficients: Sequence[float], index: int, start: int, length: int):
        """sum_i c_i A_i B_i^T / sqrt(r) over elements [start, start + length): per matrix one matmul,
        (c_1 A_1 | ... | c_K A_K) (B_1 | ... | B_K)^T, of the rows the piece covers only."""
        m, n = self.params[index].shape[-2:]
        first_row, last_row = start // n, (start + length - 1) // n
        factors = [(self.all_factors(probe, index), c) for probe, c in zip(probes, coefficients, strict=True)]
        pieces = []
        for batch in range(first_row // m, last_row // m + 1):
            low, high = max(first_row, batch * m) - batch * m, min(last_row + 1, (batch + 1) * m) - batch * m
            a_rows = torch.cat([a[batch, low:high] * c for (a, _), c in factors], dim=1)
            b_all = torch.cat([b[batch] for (_, b), _ in factors], dim=1)
            pieces.append((a_rows @ b_all.T).reshape(-1))
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        offset = start - first_row * n
        return flat[offset : offset + length].div_(math.sqrt(self.rank))
