"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate from the zero-shot weights towards
the best individual and towards the greedy soup, (1 - alpha) * zero-shot + alpha * fine-tuned."""

from orchestrator.soup import merge
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Param, Recipe, grid_rule, register


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
    def cook(k, params, cooked):
        zero = k.load(k.pretrained)
        alphas = sorted(params["wise_ft_alphas"])
        mid = min(alphas, key=lambda a: abs(a - 0.5))  # the recommended alpha, or the nearest on the grid
        dishes = []
        for base_name in [n for n in WiseFT.needs if n in cooked]:  # per_need: a part may get one base
            base = cooked[base_name]
            curve, mid_state, mid_correct = [], None, {}
            for alpha in alphas:
                state = merge.interpolate(zero, base.weights, alpha)
                mixed = 0 < alpha < 1 or (alpha == 1 and len(base.parents) > 1)  # else one model's own weights
                if not (k.full_curves or alpha == mid):  # the curve on the held-out split only
                    curve.append({"alpha": alpha, "val_acc": k.evaluate(state, [k.data.val], soup=mixed)["val_acc"]})
                    continue
                verdict = k.judge(state, soup=mixed)
                curve.append({"alpha": alpha, **verdict.metrics})
                if alpha == mid:
                    mid_state, mid_correct = state, verdict.correct
            point = next(c for c in curve if c["alpha"] == mid)
            dishes.append(Dish("wise_ft", f"{WiseFT.label} {base.label.split(' (')[0]} a={mid:g}",
                               {m: v for m, v in point.items() if m != "alpha"},
                               [k.pretrained["id"], *base.parents], mid_state,
                               params={"alpha": mid, "base": base_name}, curve=curve,
                               name=f"wise_ft_{base_name}", correct=mid_correct))
        return dishes
