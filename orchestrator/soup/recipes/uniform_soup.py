"""Uniform soup (Wortsman et al. 2022): the plain mean of every ingredient's weights (the
engine's `linear`: a float32 sum in rank order, divided once)."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Recipe, register


@register
class UniformSoup(Recipe):
    name, label, position = "uniform_soup", "uniform soup", 30
    produces_weights = True
    marker = Marker("s", "tab:orange", 110)

    @staticmethod
    def cook(k, params, cooked):
        rows = k.loadable()
        state = k.merge("linear", rows).state
        verdict = k.judge(state)
        return [Dish("uniform_soup", UniformSoup.label, verdict.metrics, [r["id"] for r in rows], state,
                     params={"n_ingredients": len(rows)}, correct=verdict.correct)]
