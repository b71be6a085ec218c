"""DARE (Yu et al., ICML 2024): drop each task-vector entry with probability p and rescale
the survivors, then merge by TIES (sign election and disjoint mean, DARE's drop in place of
TIES's trim, as mergekit's dare_ties) or by task arithmetic, with those recipes' lambda
grids. Seeded by (seed, ingredient, tensor) through a hash computed on the cooking device, so
a cooked merge reproduces and is the same on a CPU or a GPU (merging/sparsify.py)."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Param, Recipe, register
from orchestrator.soup.recipes import task_arithmetic, ties


@register
class Dare(Recipe):
    name, label, position = "dare", "DARE", 90
    params = (
        Param("dare_p", float, 0.5, "drop probability of each task-vector entry",
              lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v}"),
        Param("dare_merge", str, "ties", "merge the dropped task vectors by 'ties' or 'task_arithmetic'",
              lambda v: None if v in ("ties", "task_arithmetic") else f"must be 'ties' or 'task_arithmetic', got {v!r}"),
        Param("dare_rescale", str, "exact", "survivors x 1/(1-p) ('exact', the paper) or scaled to keep each "
              "tensor's L1 norm ('l1', as mergekit)",
              lambda v: None if v in ("exact", "l1") else f"must be 'exact' or 'l1', got {v!r}"),
        Param("dare_seed", int, 0, "seed of the drop (per ingredient)"),
        task_arithmetic.LAMBDAS,  # shared keys: the grid of the merge it ends with
        ties.LAMBDAS,
    )
    produces_weights = True
    marker = Marker("h", "tab:olive", 140)

    @staticmethod
    def plan(k, params, cooked):
        drop = {"p": params["dare_p"], "seed": params["dare_seed"], "rescale": params["dare_rescale"]}
        ties_merge = params["dare_merge"] == "ties"
        delta = k.merge_delta("dare_ties" if ties_merge else "dare_linear", k.loadable(), drop)
        return task_arithmetic.scale_plan(delta, params["ties_lambdas" if ties_merge else "task_arithmetic_lambdas"])

    evaluate = staticmethod(task_arithmetic.scale_evaluate)  # each lambda on the held-out split

    @staticmethod
    def serve(k, params, cooked, plan, results):
        rows = k.loadable()
        lam, state, verdict, trace = task_arithmetic.pick_scale(k, plan, results)
        merge_label = "TIES" if params["dare_merge"] == "ties" else "TA"
        return [Dish("dare", f"{Dare.label}-{merge_label} p={params['dare_p']:g} l={lam:g}", verdict.metrics,
                     [r["id"] for r in rows], state,
                     params={"p": params["dare_p"], "merge": params["dare_merge"], "rescale": params["dare_rescale"],
                             "seed": params["dare_seed"], "lambda": lam, "n_ingredients": len(rows)},
                     details={"lambda_trace": trace}, correct=verdict.correct)]
