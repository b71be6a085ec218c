"""Sparsifying a task vector, the same on every device: TIES's trim to exactly the k largest
magnitudes, and DARE's random drop.

The trim keeps exactly max(1, int(k * n)) entries, as mergekit does; entries whose magnitude
equals the cut are kept lowest index first, so the count never grows with ties (bf16 weights
are full of them) and the choice does not depend on a sort's order. The k-th largest
magnitude comes from `kthvalue` on the CPU and `topk` elsewhere (kthvalue is two orders of
magnitude slower on CUDA).

DARE's drop draws its coin flips from a counter-based hash of (seed, ingredient, tensor name,
entry index) computed with integer tensor ops on the tensor's own device: no generator
lives on another device, nothing is copied, and the same seed drops the same entries on a
CPU, a GPU or the meta device. The hash is 32 bits of two multiply-xorshift rounds (the
constant 0x45d9f3b keeps every product below 2^63, so int64 never overflows).
"""

from __future__ import annotations

import hashlib

import torch

M32 = 0xFFFFFFFF
MIX = 0x45D9F3B
# entries hashed at a time: the hash's int64 temporaries stay bounded, and on a CPU in cache
# (three times faster than 16M-entry chunks); an accelerator takes larger ones (fewer launches)
CHUNK = {"cpu": 1 << 18}
ACCELERATOR_CHUNK = 1 << 24
EPS = 1e-8


def keep_count(n: int, k: float) -> int:
    """How many of n entries the trim keeps."""
    return min(n, max(1, int(k * n)))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor, as a 0-dim tensor on its device."""
    if values.device.type == "cpu":
        return torch.kthvalue(values, values.numel() - k + 1).values
    return torch.topk(values, k, sorted=False).values.min()


def trim_mask(magnitude: torch.Tensor, cut: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Entries above the cut, and the first `room` entries equal to it (flat, in index order)."""
    above, tied = magnitude > cut, magnitude == cut
    if magnitude.device.type == "cpu":  # the host reads room for free here: index the ties (8x faster)
        above[tied.nonzero().flatten()[:int(room)]] = True
        return above
    # elsewhere without a host read: the running count of ties (int32 where it fits: half the traffic)
    count = tied.cumsum(0, dtype=torch.int32 if tied.numel() < 2 ** 31 else torch.int64)
    return above | (tied & (count <= room))


def top_k(tau: torch.Tensor, k: float) -> torch.Tensor:
    """tau with all but its max(1, int(k n)) largest-magnitude entries set to 0."""
    magnitude = tau.abs().reshape(-1)
    keep = keep_count(magnitude.numel(), k)
    if magnitude.numel() == 0 or keep == magnitude.numel():
        return tau
    cut = kth_largest(magnitude, keep)
    room = keep - (magnitude > cut).sum()
    return torch.where(trim_mask(magnitude, cut, room).reshape(tau.shape), tau, 0.0)


def seed_key(seed: int, index: int, name: str) -> int:
    """32 bits that name one tensor of one ingredient under one seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()[:4], "little")


def _mix(x: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(MIX).bitwise_and_(M32)
    return x.bitwise_xor_(x >> 16)


def random_bits(start: int, count: int, key: int, device) -> torch.Tensor:
    """32 hashed bits (as int64 in [0, 2^32)) for entries start .. start+count-1 under `key`."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    bits = _mix((index & M32).bitwise_xor_(key))
    if start + count > M32:  # tensors of over 2^32 entries: fold the high bits in too
        bits = _mix(bits.bitwise_xor_(_mix((index >> 32) & M32)))
    return bits


def random_drop(tau: torch.Tensor, p: float, key: int, rescale: str = "exact") -> torch.Tensor:
    """DARE: each entry dropped with probability p, the survivors times 1 / (1 - p) (`exact`, the
    paper) or scaled so that the tensor keeps its L1 norm (`l1`, as mergekit)."""
    if p == 0:
        return tau
    flat = tau.reshape(-1)
    cut = int(p * (M32 + 1))  # keep an entry when its bits are >= p 2^32: probability 1 - p
    kept = torch.empty_like(flat)
    step = CHUNK.get(flat.device.type, ACCELERATOR_CHUNK)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        kept[start:start + step] = torch.where(random_bits(start, part.numel(), key, flat.device) >= cut, part, 0.0)
    kept = kept.reshape(tau.shape)
    if rescale == "exact":
        return kept / (1 - p)
    # L1 norms summed in float64 (a float32 sum of millions of entries is off by ~1e-4 on a CPU)
    return kept * (tau.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64).clamp(min=EPS))
