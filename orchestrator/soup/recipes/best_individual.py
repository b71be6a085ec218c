"""Best individual: the fine-tuned model with the highest held-out accuracy."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Recipe, register


@register
class BestIndividual(Recipe):
    name, label, position = "best_individual", "best individual", 20
    marker = Marker("D", "tab:blue", 90)
    # its weights are an ingredient's own, already in the pool: produces_weights stays False

    @staticmethod
    def cook(k, params, cooked):
        best = k.loadable()[0]
        return [Dish("best_individual", BestIndividual.label, dict(best["metrics"]), [best["id"]],
                     weights=k.load(best), params={"hparams": best["hparams"]})]
