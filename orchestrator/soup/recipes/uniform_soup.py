"""Uniform soup (Wortsman et al. 2022): the plain mean of every ingredient's weights."""

from orchestrator.soup import merge
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
        state = merge.uniform_soup(k.load(r) for r in rows)
        verdict = k.judge(state)
        return [Dish("uniform_soup", UniformSoup.label, verdict.metrics, [r["id"] for r in rows], state,
                     params={"n_ingredients": len(rows)}, correct=verdict.correct)]
