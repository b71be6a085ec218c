"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022): per parameter entry, the mean of
the ingredients weighted by each one's diagonal Fisher, which every trial estimates at its
end and stores in the pool beside its weights (soup/fisher.py). Trials without one (an
older pool, or soup.fisher_examples: 0) are left out of this recipe with one line."""

import logging

from orchestrator.soup.fisher import FLOOR
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Param, Recipe, register

log = logging.getLogger(__name__)


@register
class Fisher(Recipe):
    name, label, position = "fisher", "Fisher merge", 110
    params = (
        Param("fisher_examples", int, 256, "training examples each trial estimates its diagonal Fisher on, at its "
              "end (0: no estimate, and nothing for this recipe)",
              lambda v: None if v >= 0 else f"must be >= 0, got {v}"),
        Param("fisher_normalize", bool, False, "divide each model's Fisher by its L2 norm before weighting"),
    )
    produces_weights = True
    marker = Marker("p", "tab:pink", 140)

    @staticmethod
    def check(k):
        if not any(r["id"] in k.fishers for r in k.loadable()):
            return ("no ingredient has a Fisher in the pool (trials estimate one when soup.fisher_examples > 0; "
                    "pools from before this recipe have none)")
        return None

    @staticmethod
    def cook(k, params, cooked):
        rows = k.loadable()
        with_fisher = [r for r in rows if r["id"] in k.fishers]
        if len(with_fisher) < len(rows):
            log.warning("fisher: left out %d of %d ingredients with no Fisher in the pool: %s", len(rows) - len(with_fisher),
                        len(rows), ", ".join(r["id"] for r in rows if r["id"] not in k.fishers))
        state = k.merge("fisher", with_fisher, {"floor": FLOOR, "normalize": params["fisher_normalize"]},
                        side={"fisher": [k.fisher_source(r) for r in with_fisher]}).state
        verdict = k.judge(state)
        examples = sorted({k.fishers[r["id"]]["hparams"].get("examples") for r in with_fisher})
        return [Dish("fisher", f"{Fisher.label} ({len(with_fisher)} models)", verdict.metrics,
                     [r["id"] for r in with_fisher], state,
                     params={"n_ingredients": len(with_fisher), "normalize": params["fisher_normalize"],
                             "floor": FLOOR, "fisher_examples": examples},
                     correct=verdict.correct)]
