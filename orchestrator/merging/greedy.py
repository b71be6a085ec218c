"""Greedy soup (Wortsman et al. 2022, recipe 1) on the engine: the soup is a float32 running
sum of the kept ingredients, so every candidate is the float32 mean of its ingredients cast
once (a soup that keeps everything is the uniform soup, bit for bit), and memory is the sum,
one candidate and one ingredient's tensor at a time, whatever N is.

The loop is the paper's: `ranked` sorted by held-out score, best first; the soup starts as
the best ingredient; each next one is tried exactly once as the mean of the kept ones and it,
and kept if the held-out score does not drop (`>=`, the paper) or rises (`>`, the reference
code). Scoring is the caller's (a callback): nothing here knows about tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import torch

from orchestrator.common.errors import MergeError
from orchestrator.common.weights import StateDict
from orchestrator.merging.executor import accumulator
from orchestrator.merging.sources import Source, check_compatible, specs

T = TypeVar("T")


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


class RunningSum:
    """The float32 (float64 kept) sum of some ingredients' floating tensors, on `device`;
    integer tensors are the first ingredient's."""

    def __init__(self, first: Source, device: torch.device | str):
        self.device, self.order = torch.device(device), specs(first)
        self.first, self.count = first, 1
        self.total = {name: first.get(name, self.device).to(accumulator(dtype)) if dtype.is_floating_point
                      else first.get(name, self.device).clone() for name, dtype, _ in self.order}

    def mean(self, extra: Source | None = None) -> StateDict:
        """The mean of the summed ingredients (and `extra`, if given), in their dtypes."""
        n = self.count + (extra is not None)
        out = {}
        for name, dtype, _ in self.order:
            if not dtype.is_floating_point:
                out[name] = self.total[name].clone()
                continue
            total = self.total[name] if extra is None else self.total[name] + extra.get(name, self.device)
            out[name] = (total / n).to(dtype)
        return out

    def add(self, source: Source) -> None:
        for name, dtype, _ in self.order:
            if dtype.is_floating_point:
                self.total[name].add_(source.get(name, self.device))
        self.count += 1


def greedy_soup(ranked: Sequence[T], source: Callable[[T], Source], score: Callable[[StateDict], float],
                accept: str = ">=", first_score: float | None = None,
                device: torch.device | str = "cpu") -> GreedySoup[T]:
    """`source(ingredient)` opens its weights; `score(state)` is its held-out score;
    `first_score`, if known, saves one evaluation."""
    if not ranked:
        raise MergeError("greedy soup of no ingredients")
    if accept not in (">=", ">"):
        raise MergeError(f"accept must be '>=' or '>', got {accept!r}")
    better = (lambda s, b: s >= b) if accept == ">=" else (lambda s, b: s > b)
    first = source(ranked[0])
    soup = RunningSum(first, device)
    best = score(soup.mean()) if first_score is None else first_score
    kept, steps = [ranked[0]], [GreedyStep(ranked[0], best, True)]
    for ingredient in ranked[1:]:
        new = source(ingredient)
        check_compatible(first, [new], "the first ingredient")
        s = score(soup.mean(new))
        ok = better(s, best)
        steps.append(GreedyStep(ingredient, s, ok))
        if ok:
            soup.add(new)
            best = s
            kept.append(ingredient)
    return GreedySoup(soup.mean(), best, kept, steps)
