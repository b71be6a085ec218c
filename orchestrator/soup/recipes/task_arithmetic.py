"""Task arithmetic (Ilharco et al., ICLR 2023): theta_0 + lambda * sum_i tau_i, tau_i = theta_i
- theta_0, lambda picked on the held-out split. lambda = 1/N is the uniform soup; smaller
pulls towards theta_0 as WiSE-FT does, larger extrapolates along the fine-tunes' mean.

The lambda grid is shared with TIES and DARE (`scale_plan`, `scale_evaluate`, `pick_scale`):
each lambda is one candidate, evaluated on its own (on Ray, wherever a worker is free). The
combined task vector is made once by the merge engine (Kitchen.merge_delta) and shared; each
candidate is theta_0 (read from the pool tensor by tensor) + lambda * it."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Plan, Param, Recipe, grid_rule, register

LAMBDAS = Param("task_arithmetic_lambdas", list, [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2],
                "lambdas on the sum of task vectors (1/N = the uniform soup of N); the one with the best "
                "held-out accuracy is the dish", grid_rule("lambda", 0))


def scale_plan(delta, lambdas, every_set: bool = False) -> Plan:
    """One candidate per lambda (ascending): theta_0 + lambda * delta, measured on the held-out
    split, or on every eval set (`every_set`: a curve for the plot)."""
    return Plan([{"lambda": lam, "every_set": every_set} for lam in sorted(lambdas)], {"delta": delta})


def scale_evaluate(k, shared, candidate) -> dict[str, float]:
    state = k.apply_delta(shared["delta"], candidate["lambda"])
    if candidate["every_set"]:
        return k.judge(state).metrics
    return {"val_acc": k.val_acc(state)}


def pick_scale(k, plan: Plan, results):
    """The lambda with the best held-out accuracy (the smallest of equals), its weights judged on
    every eval set: (lambda, weights, verdict, every lambda's held-out accuracy)."""
    trace = [{"x": c["lambda"], "val_acc": r["val_acc"]} for c, r in zip(plan.candidates, results)]
    lam = max(trace, key=lambda t: t["val_acc"])["x"]  # max keeps the first of equals
    state = k.apply_delta(plan.shared["delta"], lam)
    return lam, state, k.judge(state), trace


@register
class TaskArithmetic(Recipe):
    name, label, position = "task_arithmetic", "task arithmetic", 70
    params = (LAMBDAS,)
    produces_weights = True
    curve_x = "lambda"

    @staticmethod
    def plan(k, params, cooked):
        # k.full_curves: every lambda on every eval set, the curve on the plot; else the held-out split only
        return scale_plan(k.merge_delta("task_arithmetic", k.loadable()), params["task_arithmetic_lambdas"],
                          every_set=k.full_curves)

    evaluate = staticmethod(scale_evaluate)

    @staticmethod
    def serve(k, params, cooked, plan, results):
        rows = k.loadable()
        lam, state, verdict, _ = pick_scale(k, plan, results)
        curve = [{"lambda": c["lambda"], **r} for c, r in zip(plan.candidates, results)]
        return [Dish("task_arithmetic", f"{TaskArithmetic.label} l={lam:g}", verdict.metrics, [r["id"] for r in rows],
                     state, params={"lambda": lam, "n_ingredients": len(rows)}, curve=curve,
                     correct=verdict.correct)]
