"""Perturb a model's parameters to theta + s * eps * z in place, and restore them bit for bit.

Why a backup: rounding makes theta -> fl(theta + eps * z) many-to-one (bits of theta are lost whenever the sum
changes exponent, and most of them when |theta| < eps), so no in-place +eps / -2eps / +eps chain can return to
theta exactly; the paper's code drifts every probe in bf16. Here each perturbed point is computed afresh from a
copy of theta taken once per step, and restoring is a copy back: exact in every dtype, for one extra copy of the
weights in their own dtype (bf16 weights: half the bytes of an fp32 copy).

Tensors are visited in chunks of at most `max_chunk_elements`, so the temporary z of a 1B-element tensor stays
bounded; z itself does not depend on the chunking (see noise.py).
"""

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .directions import IsotropicDirections


def zo_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors ZO perturbs: every parameter once (tied weights are one tensor, so they move once),
    in the model's registration order, which fixes each tensor's index in the seed scheme."""
    return [(name, param) for name, param in model.named_parameters(remove_duplicate=True)]


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """Perturbations and updates are computed in at least fp32 (fp64 weights stay fp64)."""
    return torch.promote_types(param.dtype, torch.float32)


def chunk_ranges(numel: int, max_chunk_elements: int) -> Iterator[tuple[int, int]]:
    """(start, length) pieces covering [0, numel)."""
    for start in range(0, numel, max_chunk_elements):
        yield start, min(max_chunk_elements, numel - start)


class Perturber:
    """Owns the backup of theta and moves the parameters to theta + scale * z_probe and back; `directions` says
    what z is (directions.py)."""

    def __init__(self, params: list[torch.Tensor], directions: IsotropicDirections, max_chunk_elements: int):
        for param in params:
            if not param.is_contiguous():
                raise ValueError("ZO perturbation needs contiguous parameters")
        self.params = params
        self.directions = directions
        self.max_chunk_elements = max_chunk_elements
        self.backups: list[torch.Tensor] | None = None

    def chunks(self, tensor_index: int) -> Iterator[tuple[int, int]]:
        return chunk_ranges(self.params[tensor_index].numel(), self.max_chunk_elements)

    def z(self, probe: int, tensor_index: int, start: int, length: int) -> torch.Tensor:
        return self.directions.z(probe, tensor_index, start, length)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember theta (call once per step, before the first probe)."""
        self.backups = [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def perturb(self, probe: int, scale: float, z_cache: list[torch.Tensor] | None = None) -> None:
        """theta <- backup + scale * z_probe (or + scale * `z_cache`, the same z generated once, when given)."""
        for index, (param, backup) in enumerate(zip(self.params, self.backups, strict=True)):
            flat, source = param.view(-1), backup.view(-1)
            for start, length in self.chunks(index):
                if z_cache is not None:
                    z = z_cache[index][start : start + length]
                else:
                    z = self.z(probe, index, start, length)
                # out-of-place: .to() of a tensor already in that dtype is the tensor itself, and the backup must not move
                piece = torch.add(source[start : start + length].to(compute_dtype(param)), z, alpha=scale)
                flat[start : start + length] = piece.to(param.dtype)

    @torch.no_grad()
    def stacked(
        self, probes: Sequence[int], scales: Sequence[float], keep_z: bool = False
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]] | None]:
        """theta + scale * z_j for every probe j and every scale, as one [J * S, *shape] stack
        per tensor, probe-major; theta itself is not touched. Each point is computed exactly as `perturb` computes
        it, so stacked and sequential evaluation see bit-identical weights. With `keep_z`, also each probe's flat
        fp32 z per tensor (for the buffered update)."""
        rows = len(probes) * len(scales)
        stacks, kept = [], [[] for _ in probes]
        for index, param in enumerate(self.params):
            stack = torch.empty((rows, param.numel()), dtype=param.dtype, device=param.device)
            source = param.detach().view(-1)
            for j, probe in enumerate(probes):
                pieces = []
                for start, length in self.chunks(index):
                    z = self.z(probe, index, start, length)
                    base = source[start : start + length].to(compute_dtype(param))
                    for k, scale in enumerate(scales):
                        stack[j * len(scales) + k, start : start + length] = torch.add(base, z, alpha=scale)
                    if keep_z:
                        pieces.append(z)
                if keep_z:
                    kept[j].append(torch.cat(pieces))
            stacks.append(stack.view(rows, *param.shape))
        return stacks, (kept if keep_z else None)

    @torch.no_grad()
    def members(self, probes: Sequence[int], scales: Sequence[float]) -> list[tuple]:
        """The change scale * z_j of every (probe j, scale) member, probe-major, per tensor, for a model's
        `members_loss` (hf_zoo_rnn/forwards/population.py): ("lowrank", A [M, *, m, r] with scale / sqrt(r) folded in, B [M, *, n, r]) for the tensors
        the directions perturb by low-rank products, ("dense", [M, *shape]) for the others. theta is not touched."""
        changes = []
        for index, param in enumerate(self.params):
            dtype = compute_dtype(param)
            if self.directions.is_low_rank(index):
                *leading, _, _ = param.shape
                a_rows, b_rows = [], []
                for probe in probes:
                    a, b = self.directions.all_factors(probe, index)
                    a, b = a.view(*leading, *a.shape[1:]).to(dtype), b.view(*leading, *b.shape[1:]).to(dtype)
                    for scale in scales:
                        a_rows.append(a * (scale / math.sqrt(self.directions.rank)))
                        b_rows.append(b)
                changes.append(("lowrank", torch.stack(a_rows), torch.stack(b_rows)))
            else:
                stack = torch.empty((len(probes) * len(scales), param.numel()), dtype=dtype, device=param.device)
                for j, probe in enumerate(probes):
                    z = torch.cat([self.z(probe, index, start, length) for start, length in self.chunks(index)])
                    for k, scale in enumerate(scales):
                        stack[j * len(scales) + k] = z.to(dtype) * scale
                changes.append(("dense", stack.view(-1, *param.shape)))
        return changes

    @torch.no_grad()
    def restore(self) -> None:
        """theta <- backup, bit for bit."""
        for param, backup in zip(self.params, self.backups, strict=True):
            param.copy_(backup)

    def release(self) -> None:
        self.backups = None
