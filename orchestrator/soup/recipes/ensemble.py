"""Output ensemble: the mean of every ingredient's logits (N forward passes per input,
the "more compute" reference point for the soups).

The members' forward passes are the candidates: consecutive members in at most `GROUPS`
groups, each group one evaluation that returns the sum of its members' logits, so no more
than `GROUPS` sets of logits are ever held at once, however many members there are."""

import math
from typing import Iterable

import torch

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Plan, Recipe, register
from orchestrator.soup.train import load_into

GROUPS = 8


def sum_logits(logits: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per eval set, the sum of every member's logits, added in order (serve divides by the
    number of members)."""
    total = None
    for member in logits:
        total = {k: v.clone() for k, v in member.items()} if total is None else {k: total[k] + v for k, v in member.items()}
    if total is None:
        raise ValueError("ensemble of no members")
    return total


@register
class Ensemble(Recipe):
    name, label, position = "ensemble", "ensemble", 50
    marker = Marker("P", "tab:purple", 120)

    @staticmethod
    def plan(k, params, cooked):
        rows = k.loadable()
        size = math.ceil(len(rows) / GROUPS)
        return Plan([rows[i:i + size] for i in range(0, len(rows), size)])

    @staticmethod
    def evaluate(k, shared, members):
        def member_logits(row):
            load_into(k.model, k.load(row))
            return {n: k.logits(n) for n in k.data.evals}

        return sum_logits(member_logits(row) for row in members)

    @staticmethod
    def serve(k, params, cooked, plan, results):
        rows = [row for group in plan.candidates for row in group]
        total = sum_logits(results)
        verdict = k.verdict({n: logits / len(rows) for n, logits in total.items()})
        return [Dish("ensemble", f"{Ensemble.label} ({len(rows)} models)", verdict.metrics,
                     [r["id"] for r in rows], params={"n_ingredients": len(rows)}, correct=verdict.correct)]
