"""Best individual: the fine-tuned model with the highest held-out accuracy."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Recipe, register


@register
class BestIndividual(Recipe):
    name, label, position = "best_individual", "best individual", 20
    marker = Marker("D", "tab:blue", 90)
    reference = True  # the summary shows every dish's paired difference to this one
    # its weights are an ingredient's own, already in the pool: produces_weights stays False

    @staticmethod
    def cook(k, params, cooked):
        best = k.loadable()[0]
        weights = k.load(best)
        verdict = k.judge(weights, soup=False)  # its per-example results, for the intervals
        metrics = {**verdict.metrics, **best["metrics"]}  # as the trial measured it (and its training metrics)
        return [Dish("best_individual", BestIndividual.label, metrics, [best["id"]],
                     weights=weights, params={"hparams": best["hparams"]}, correct=verdict.correct)]
