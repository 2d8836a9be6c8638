"""Perturbation directions z from seeds: a counter-based generator, so z is never stored, only recomputed.

Scheme (documented because every rank, every resume and every chunking must reproduce it bit for bit):

1. A stream seed names one tensor of one probe of one step:
       packed = step << 32 | probe << 12 | tensor_index            (a bijection of the three counters)
       stream = splitmix64(packed XOR splitmix64(run_seed))
   splitmix64's finaliser is a bijection of 64-bit integers, so for a given run seed two different
   (step, probe, tensor) triples never share a stream seed. (torch.Generator is not used: its CPU generator
   ignores the high 32 bits of a seed, so derived seeds could silently collide.)
2. Element j of that tensor's z is a function of (stream, j) alone:
       bits = splitmix64(stream + (j + 1) * 0x9E3779B97F4A7C15)   (SplitMix64's own stream construction)
   Rademacher takes the sign bit; Gaussian takes two 24-bit uniforms through Box-Muller.
   z therefore does not depend on the device, on the number of processes, or on how a tensor is cut into
   chunks for generation.
"""

import math

import torch

DISTRIBUTIONS = ("rademacher", "gaussian")
STEP_BITS, PROBE_BITS, TENSOR_BITS = 32, 20, 12
MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
BLOCK = 1 << 18  # elements hashed per batch of tensor ops: large enough to amortise op overhead, small for cache


def _signed(value: int) -> int:
    """Python int in [0, 2**64) -> the int64 with the same bits (torch integer tensors are signed)."""
    return value - (1 << 64) if value >= 1 << 63 else value


SPLITMIX_C1 = _signed(0xBF58476D1CE4E5B9)
SPLITMIX_C2 = _signed(0x94D049BB133111EB)
GAMMA = _signed(GOLDEN_GAMMA)


def splitmix64(value: int) -> int:
    """SplitMix64's finaliser on a Python int (a bijection of [0, 2**64))."""
    value &= MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def stream_seed(run_seed: int, step: int, probe: int, tensor_index: int) -> int:
    """The 64-bit seed of one tensor's z for one probe of one step; distinct triples give distinct seeds."""
    for name, value, bits in (
        ("step", step, STEP_BITS),
        ("probe", probe, PROBE_BITS),
        ("tensor", tensor_index, TENSOR_BITS),
    ):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name} index {value} is outside [0, 2**{bits}) supported by the seed scheme")
    packed = step << (PROBE_BITS + TENSOR_BITS) | probe << TENSOR_BITS | tensor_index
    return splitmix64(packed ^ splitmix64(run_seed))


def _mix_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """In-place splitmix64 finaliser on int64 tensors (wrapping multiply; logical shifts via masks)."""
    for shift, multiplier in ((30, SPLITMIX_C1), (27, SPLITMIX_C2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=scratch)
        scratch &= (1 << (64 - shift)) - 1
        x ^= scratch
        if multiplier is not None:
            x *= multiplier
    return x


def random_bits(stream: int, start: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 hash of elements [start, start + length) of a stream."""
    x = torch.arange(start + 1, start + length + 1, dtype=torch.int64, device=device)
    x *= GAMMA
    x += _signed(stream)
    return _mix_(x, torch.empty_like(x))


def noise(
    stream: int, start: int, length: int, distribution: str = "rademacher", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """float32 z for elements [start, start + length) of a stream."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    out = torch.empty(length, dtype=torch.float32, device=device)
    for offset in range(0, length, BLOCK):
        size = min(BLOCK, length - offset)
        bits = random_bits(stream, start + offset, size, device)
        if distribution == "rademacher":
            # sign bit: arithmetic shift gives -1 or 0, so 2 * that + 1 is -1 or +1
            out[offset : offset + size] = (bits >> 63) * 2 + 1
        else:
            scale = 2.0**-24
            u1 = ((bits >> 40) & 0xFFFFFF).to(torch.float32).add_(1.0).mul_(scale)  # (0, 1]
            u2 = ((bits >> 16) & 0xFFFFFF).to(torch.float32).mul_(scale)  # [0, 1)
            out[offset : offset + size] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return out
