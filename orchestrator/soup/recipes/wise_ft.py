"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate from the zero-shot weights towards
the best individual and towards the greedy soup, (1 - alpha) * zero-shot + alpha * fine-tuned.
Each (base, alpha) point of the curves is one candidate, evaluated on its own; its weights are
the merge engine's `linear` with weights (1 - alpha, alpha), theta_0 read from the pool."""

from orchestrator.merging.sources import StateSource
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Param, Plan, Recipe, grid_rule, register, tensors_to


def middle(alphas) -> float:
    """The recommended alpha, 0.5, or the nearest on the grid: the point the dish stores."""
    return min(sorted(alphas), key=lambda a: abs(a - 0.5))


def interpolate(k, fine, alpha: float):
    """(1 - alpha) * theta_0 + alpha * fine, in float32, cast once."""
    return k.merge("linear", [k.source(k.pretrained), StateSource(fine, "fine-tuned")],
                   {"weights": [1 - alpha, alpha], "normalize": False}).state


@register
class WiseFT(Recipe):
    name, label, position = "wise_ft", "WiSE-FT", 60
    params = (Param("wise_ft_alphas", list, [round(0.1 * i, 1) for i in range(11)],
                    "alphas of the curve; the table shows the one nearest 0.5", grid_rule("alpha", 0, 1)),)
    needs = ("best_individual", "greedy_soup")
    produces_weights = True
    curve_x = "alpha"
    per_need = True

    @staticmethod
    def plan(k, params, cooked):
        bases = [n for n in WiseFT.needs if n in cooked]  # per_need: a part may get one base
        mid = middle(params["wise_ft_alphas"])
        candidates = [{"base": base, "alpha": alpha, "mid": alpha == mid,
                       # a model's own weights (an end point of one ingredient) keep its BatchNorm statistics
                       "mixed": 0 < alpha < 1 or (alpha == 1 and len(cooked[base].parents) > 1),
                       # the curve on the held-out split only, unless k.full_curves; the stored point on all
                       "every_set": k.full_curves or alpha == mid}
                      for base in bases for alpha in sorted(params["wise_ft_alphas"])]
        # the bases' weights come on the CPU (a cooked dish's, see cook_one)
        return Plan(candidates, {base: tensors_to(cooked[base].weights, k.device) for base in bases})

    @staticmethod
    def evaluate(k, shared, c):
        state = interpolate(k, shared[c["base"]], c["alpha"])
        if not c["every_set"]:
            return {"metrics": k.evaluate(state, [k.data.val], soup=c["mixed"])}
        verdict = k.judge(state, soup=c["mixed"])
        return {"metrics": verdict.metrics, "correct": verdict.correct, "state": state if c["mid"] else None}

    @staticmethod
    def serve(k, params, cooked, plan, results):
        dishes = []
        for base_name in dict.fromkeys(c["base"] for c in plan.candidates):
            base = cooked[base_name]
            mine = [(c, r) for c, r in zip(plan.candidates, results) if c["base"] == base_name]
            c, point = next((c, r) for c, r in mine if c["mid"])
            dishes.append(Dish("wise_ft", f"{WiseFT.label} {base.label.split(' (')[0]} a={c['alpha']:g}",
                               point["metrics"], [k.pretrained["id"], *base.parents], point["state"],
                               params={"alpha": c["alpha"], "base": base_name},
                               curve=[{"alpha": c["alpha"], **r["metrics"]} for c, r in mine],
                               name=f"wise_ft_{base_name}", correct=point["correct"]))
        return dishes
