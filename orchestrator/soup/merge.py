"""The math of weight averaging: pure functions on state dicts, no I/O.

Ingredients arrive one at a time through an iterator or a `load` callback, so memory
stays flat in the number of ingredients: a uniform soup holds one running mean and
one ingredient; a greedy soup holds the soup, the candidate and one ingredient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Sequence, TypeVar

import torch

from orchestrator.common.weights import StateDict

T = TypeVar("T")


def _mix(a: StateDict, b: StateDict, wa: float, wb: float) -> StateDict:
    """wa * a + wb * b for floating tensors, computed in at least float32; other tensors are taken from a."""
    out = {}
    for k, va in a.items():
        if va.is_floating_point():
            acc = torch.promote_types(va.dtype, torch.float32)  # upcast fp16/bf16, keep float64
            out[k] = (va.to(acc) * wa + b[k].to(acc) * wb).to(va.dtype)
        else:
            out[k] = va.clone()
    return out


def check_compatible(a: StateDict, b: StateDict) -> None:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("state dicts have different architectures")


def uniform_soup(states: Iterable[StateDict]) -> StateDict:
    """The plain mean of every state dict, as a running mean (one ingredient in memory)."""
    soup, n = None, 0
    for state in states:
        if soup is None:
            soup = {k: v.clone() for k, v in state.items()}
        else:
            check_compatible(soup, state)
            soup = _mix(soup, state, n / (n + 1), 1 / (n + 1))
        n += 1
    if soup is None:
        raise ValueError("uniform soup of no ingredients")
    return soup


def interpolate(zero: StateDict, fine: StateDict, alpha: float) -> StateDict:
    """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned."""
    check_compatible(zero, fine)
    return _mix(zero, fine, 1 - alpha, alpha)


@dataclass
class GreedyStep(Generic[T]):
    ingredient: T
    score: float  # held-out score of the candidate soup that includes this ingredient
    accepted: bool


@dataclass
class GreedySoup(Generic[T]):
    state: StateDict
    score: float
    kept: list[T]
    steps: list[GreedyStep[T]] = field(default_factory=list)


def greedy_soup(
    ranked: Sequence[T],
    load: Callable[[T], StateDict],
    score: Callable[[StateDict], float],
    accept: str = ">=",
    first_score: float | None = None,
) -> GreedySoup[T]:
    """Greedy soup (Wortsman et al. 2022, recipe 1).

    `ranked` must be sorted by held-out score, best first. The soup starts as the best
    ingredient; each next one is tried exactly once as the running mean of the kept
    ingredients plus it, and kept if the held-out score does not drop (`>=`, the paper)
    or rises (`>`, the reference code). `first_score`, if known, saves one evaluation.
    """
    if not ranked:
        raise ValueError("greedy soup of no ingredients")
    if accept not in (">=", ">"):
        raise ValueError(f"accept must be '>=' or '>', got {accept!r}")
    better = (lambda s, b: s >= b) if accept == ">=" else (lambda s, b: s > b)
    first = load(ranked[0])
    best = score(first) if first_score is None else first_score
    result = GreedySoup(state=first, score=best, kept=[ranked[0]], steps=[GreedyStep(ranked[0], best, True)])
    del first  # the soup lives in `result` only: at most soup + candidate + one ingredient in memory
    for ingredient in ranked[1:]:
        new = load(ingredient)
        check_compatible(result.state, new)
        n = len(result.kept)
        candidate = _mix(result.state, new, n / (n + 1), 1 / (n + 1))
        del new
        s = score(candidate)
        ok = better(s, result.score)
        result.steps.append(GreedyStep(ingredient, s, ok))
        if ok:
            result.state, result.score = candidate, s
            result.kept.append(ingredient)
    return result


def sum_logits(logits: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Output ensemble: per eval set, the sum of every member's logits, added in order (the
    ensemble recipe divides by the number of members)."""
    total = None
    for member in logits:
        total = {k: v.clone() for k, v in member.items()} if total is None else {k: total[k] + v for k, v in member.items()}
    if total is None:
        raise ValueError("ensemble of no members")
    return total


def fisher_average(items: Sequence[T], load: Callable[[T], StateDict], load_fisher: Callable[[T], StateDict],
                   floor: float = 1e-6, normalize: bool = False) -> StateDict:
    """Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022): per parameter entry,
    sum_i F_i theta_i / sum_i F_i, each F_i floored at `floor` (so an entry no model's Fisher
    covers falls back to the plain mean) and, with `normalize`, first divided by its L2
    norm over the whole model (models with larger Fisher values do not dominate).
    Tensors without a Fisher (BatchNorm statistics) are plainly averaged, integer ones
    taken from the first model. Running sums: one model and its Fisher in memory."""
    num: StateDict = {}
    den: StateDict = {}
    first: StateDict | None = None
    for item in items:
        state, fisher = load(item), load_fisher(item)
        if first is None:
            first = state
        else:
            check_compatible(first, state)
        scale = 1.0
        if normalize:
            scale = 1.0 / max(float(torch.sqrt(sum(f.double().pow(2).sum() for f in fisher.values()))), 1e-30)
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            w = (fisher[k].float() * scale).clamp(min=floor) if k in fisher else torch.ones((), dtype=torch.float32)
            acc = torch.promote_types(v.dtype, torch.float32)
            num[k] = num[k] + w * v.to(acc) if k in num else w * v.to(acc)
            den[k] = den[k] + w if k in den else w
    if first is None:
        raise ValueError("Fisher average of no ingredients")
    return {k: (num[k] / den[k]).to(v.dtype) if k in num else v.clone() for k, v in first.items()}
