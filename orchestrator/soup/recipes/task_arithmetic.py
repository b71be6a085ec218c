"""Task arithmetic (Ilharco et al., ICLR 2023): theta_0 + lambda * sum_i tau_i, tau_i = theta_i
- theta_0, lambda picked on the held-out split. lambda = 1/N is the uniform soup; smaller
pulls towards theta_0 as WiSE-FT does, larger extrapolates along the fine-tunes' mean."""

from orchestrator.soup import task_vectors
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Param, Recipe, grid_rule, register

LAMBDAS = Param("task_arithmetic_lambdas", list, [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2],
                "lambdas on the sum of task vectors (1/N = the uniform soup of N); the one with the best "
                "held-out accuracy is the dish", grid_rule("lambda", 0))


def pick_scale(k, zero, delta, lambdas):
    """theta_0 + lambda * delta for the lambda with the best held-out accuracy, judged on every
    eval set: (lambda, weights, verdict, every lambda's held-out accuracy)."""
    lam, state, trace = k.pick_on_val((lam, task_vectors.apply(zero, delta, lam)) for lam in sorted(lambdas))
    return lam, state, k.judge(state), trace


@register
class TaskArithmetic(Recipe):
    name, label, position = "task_arithmetic", "task arithmetic", 70
    params = (LAMBDAS,)
    produces_weights = True
    curve_x = "lambda"

    @staticmethod
    def cook(k, params, cooked):
        rows = k.loadable()
        zero = k.load(k.pretrained)
        delta = task_vectors.sum_task_vectors(zero, rows, k.load)
        lambdas = sorted(params["task_arithmetic_lambdas"])
        if k.full_curves:  # every point on every eval set: the curve on the plot
            curve, best = [], None
            for lam in lambdas:
                state = task_vectors.apply(zero, delta, lam)
                verdict = k.judge(state)
                curve.append({"lambda": lam, **verdict.metrics})
                if best is None or verdict.metrics["val_acc"] > best[2].metrics["val_acc"]:
                    best = (lam, state, verdict)
            lam, state, verdict = best
        else:  # on the held-out split only; every eval set for the chosen lambda
            lam, state, verdict, trace = pick_scale(k, zero, delta, lambdas)
            curve = [{"lambda": t["x"], "val_acc": t["val_acc"]} for t in trace]
        return [Dish("task_arithmetic", f"{TaskArithmetic.label} l={lam:g}", verdict.metrics, [r["id"] for r in rows],
                     state, params={"lambda": lam, "n_ingredients": len(rows)}, curve=curve,
                     correct=verdict.correct)]
