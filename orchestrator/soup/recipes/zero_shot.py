"""Zero-shot: the shared starting weights themselves, before any fine-tuning."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Recipe, register


@register
class ZeroShot(Recipe):
    name, label, position = "zero_shot", "zero-shot", 10
    marker = Marker("*", "tab:gray", 220)

    @staticmethod
    def cook(k, params, cooked):
        state = k.load(k.pretrained)
        verdict = k.judge(state, soup=False)
        return [Dish("zero_shot", ZeroShot.label, verdict.metrics, [k.pretrained["id"]], correct=verdict.correct)]
