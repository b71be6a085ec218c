"""Output ensemble: the mean of every ingredient's logits (N forward passes per input,
the "more compute" reference point for the soups)."""

from orchestrator.soup import merge
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Recipe, register
from orchestrator.soup.train import load_into


@register
class Ensemble(Recipe):
    name, label, position = "ensemble", "ensemble", 50
    marker = Marker("P", "tab:purple", 120)

    @staticmethod
    def cook(k, params, cooked):
        rows = k.loadable()

        def member_logits(row):
            load_into(k.model, k.load(row))
            return {n: k.logits(n) for n in k.data.evals}

        verdict = k.verdict(merge.mean_logits(member_logits(r) for r in rows))
        return [Dish("ensemble", f"{Ensemble.label} ({len(rows)} models)", verdict.metrics,
                     [r["id"] for r in rows], params={"n_ingredients": len(rows)}, correct=verdict.correct)]
