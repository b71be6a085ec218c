"""The math of merges on task vectors, tau_i = theta_i - theta_0: task arithmetic, TIES,
DARE and Model Stock. Pure functions on state dicts, no I/O.

Like merge.py, ingredients arrive through a `load` callback, so memory stays flat in the
number of ingredients: every merge here is a running sum over ingredients, and TIES makes
two passes (elect signs, then average) instead of stacking all task vectors. Only floating
tensors are merged, in float32 (float64 kept), and cast back to theta_0's dtype; other
tensors (e.g. BatchNorm's batch counter) are theta_0's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from orchestrator.common.weights import StateDict
from orchestrator.soup.merge import check_compatible

T = TypeVar("T")
# (ingredient index, task vector) -> a sparser task vector; the index seeds DARE's drop
Sparsify = Callable[[int, StateDict], StateDict]
EPS = 1e-8


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def task_vector(zero: StateDict, theta: StateDict) -> StateDict:
    """theta - theta_0 for every floating tensor, in at least float32."""
    check_compatible(zero, theta)
    return {k: _acc(v) - _acc(zero[k]) for k, v in theta.items() if v.is_floating_point()}


def apply(zero: StateDict, delta: StateDict, scale: float) -> StateDict:
    """theta_0 + scale * delta, in theta_0's dtypes."""
    return {k: (_acc(v) + scale * delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in zero.items()}


def sum_task_vectors(zero: StateDict, items: Sequence[T], load: Callable[[T], StateDict],
                     sparsify: Sparsify | None = None) -> StateDict:
    """sum_i tau_i (each sparsified first, if asked): task arithmetic's delta."""
    total: StateDict | None = None
    for i, item in enumerate(items):
        tau = task_vector(zero, load(item))
        if sparsify is not None:
            tau = sparsify(i, tau)
        total = tau if total is None else {k: total[k] + v for k, v in tau.items()}
    if total is None:
        raise ValueError("task arithmetic of no ingredients")
    return total


def ties_delta(zero: StateDict, items: Sequence[T], load: Callable[[T], StateDict], sparsify: Sparsify) -> StateDict:
    """TIES (Yadav et al., NeurIPS 2023) steps 2-3 after `sparsify` (step 1, trim or DARE's drop):
    elect a sign per entry, sign(sum_i tau_i), an exact 0 taking +1 as in mergekit (the
    original takes the majority sign of the whole model); then the disjoint mean: the mean
    of the nonzero entries that agree with the elected sign (0 where none does).

    Two passes over the ingredients, so one task vector is in memory at a time; `sparsify`
    must give the same result for the same ingredient both times (DARE's drop is seeded
    by the ingredient's index)."""
    if not items:
        raise ValueError("TIES of no ingredients")
    elected = {k: torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
               for k, v in sum_task_vectors(zero, items, load, sparsify).items()}
    total = {k: torch.zeros_like(v) for k, v in elected.items()}
    count = {k: torch.zeros_like(v) for k, v in elected.items()}
    for i, item in enumerate(items):
        for k, v in sparsify(i, task_vector(zero, load(item))).items():
            agrees = (torch.sign(v) == elected[k])  # a zero entry (trimmed or dropped) never agrees
            total[k] += torch.where(agrees, v, 0.0)
            count[k] += agrees
    return {k: total[k] / count[k].clamp(min=1) for k in total}


def magnitude_trim(k: float, scope: str = "tensor") -> Sparsify:
    """TIES step 1: keep the top `k` fraction of |tau| entries, per tensor (mergekit, PEFT) or
    over all of one model's entries (`global`, the original); entries tied with the last kept
    magnitude are kept too."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if scope not in ("tensor", "global"):
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")

    def threshold(values: torch.Tensor) -> torch.Tensor:
        n = values.numel()
        keep = min(n, math.ceil(k * n))
        return torch.kthvalue(values.flatten(), n - keep + 1).values if n else values.new_zeros(())

    def trim(index: int, tau: StateDict) -> StateDict:
        if scope == "global":
            cut = threshold(torch.cat([v.abs().flatten() for v in tau.values()]))
            return {name: torch.where(v.abs() >= cut, v, 0.0) for name, v in tau.items()}
        return {name: torch.where(v.abs() >= threshold(v.abs()), v, 0.0) for name, v in tau.items()}

    return trim


def random_drop(p: float, seed: int, rescale: str = "exact") -> Sparsify:
    """DARE (Yu et al., ICML 2024): drop each entry with probability p, then rescale the
    survivors by 1 / (1 - p) (`exact`, the paper) or so that each tensor keeps its L1 norm
    (`l1`, as mergekit does). Seeded per (seed, ingredient index), tensors in sorted order,
    so the same ingredient drops the same entries on every pass and every run."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if rescale not in ("exact", "l1"):
        raise ValueError(f"rescale must be 'exact' or 'l1', got {rescale!r}")

    def drop(index: int, tau: StateDict) -> StateDict:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        out = {}
        for name in sorted(tau):
            v = tau[name]
            kept = v * (torch.rand(v.shape, generator=g) >= p).to(v.dtype)
            if rescale == "exact":
                out[name] = kept / (1 - p)
            else:
                out[name] = kept * (v.abs().sum() / kept.abs().sum().clamp(min=EPS))
        return out

    return drop


@dataclass
class ModelStock:
    state: StateDict
    t: dict[str, float]  # per tensor: the weight of the fine-tunes' mean


def model_stock(zero: StateDict, items: Sequence[T], load: Callable[[T], StateDict]) -> ModelStock:
    """Model Stock (Jang et al., ECCV 2024), per tensor: cos = the mean pairwise cosine of the
    task vectors, t = N cos / (1 + (N - 1) cos) clamped to [0, 1] (cos <= 0 would push away
    from the fine-tunes), theta = t * mean_i theta_i + (1 - t) * theta_0.

    The mean over pairs comes from running sums, not N^2 dot products: with u_i = tau_i /
    (|tau_i| + eps), sum over pairs i != j of u_i.u_j = |sum_i u_i|^2 - sum_i |u_i|^2."""
    if len(items) < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {len(items)}")
    tau_sum: StateDict = {}
    unit_sum: StateDict = {}
    unit_sq: dict[str, torch.Tensor] = {}
    for item in items:
        for k, v in task_vector(zero, load(item)).items():
            u = v / (v.norm() + EPS)
            tau_sum[k] = tau_sum[k] + v if k in tau_sum else v
            unit_sum[k] = unit_sum[k] + u if k in unit_sum else u
            unit_sq[k] = unit_sq.get(k, 0.0) + u.pow(2).sum()
    n = len(items)
    t = {}
    for k in tau_sum:
        cos = float((unit_sum[k].pow(2).sum() - unit_sq[k]) / (n * (n - 1)))
        t[k] = min(1.0, max(0.0, n * cos / (1 + (n - 1) * cos))) if cos > 0 else 0.0
    # t * mean(theta_i) + (1 - t) * theta_0 = theta_0 + t * mean(tau_i)
    state = {k: (_acc(v) + t[k] * tau_sum[k] / n).to(v.dtype) if k in t else v.clone() for k, v in zero.items()}
    return ModelStock(state, t)
