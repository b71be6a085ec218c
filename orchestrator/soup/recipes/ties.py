"""TIES merging (Yadav et al., NeurIPS 2023): trim each task vector to its largest entries
(exactly max(1, int(k n)) per tensor, equal magnitudes at the cut kept lowest index first),
elect a sign per entry, average only the entries that agree, scale by lambda (picked on
the held-out split) and add to theta_0. The math is the merge engine's `ties`."""

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Param, Recipe, grid_rule, register
from orchestrator.soup.recipes.task_arithmetic import pick_scale, scale_evaluate, scale_plan

LAMBDAS = Param("ties_lambdas", list, [0.5, 0.75, 1.0, 1.5, 2.0],
                "lambdas on the merged task vector (a mean, so 1 is the natural scale; the paper searches "
                "0.8..2.5); picked on held-out", grid_rule("lambda", 0))


KEEP_RULE = "exactly max(1, int(k n)) per trim scope, equal magnitudes at the cut lowest index first"


@register
class Ties(Recipe):
    name, label, position = "ties", "TIES", 80
    params = (
        Param("ties_k", float, 0.2, "fraction of each task vector's entries kept by magnitude",
              lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}"),
        Param("ties_trim", str, "tensor", "trim the top k per tensor ('tensor', as mergekit) or over the "
              "whole model ('global', the original)",
              lambda v: None if v in ("tensor", "global") else f"must be 'tensor' or 'global', got {v!r}"),
        LAMBDAS,
    )
    produces_weights = True
    marker = Marker("X", "tab:cyan", 140)

    @staticmethod
    def plan(k, params, cooked):
        delta = k.merge_delta("ties", k.loadable(), {"k": params["ties_k"], "scope": params["ties_trim"]})
        return scale_plan(delta, params["ties_lambdas"])

    evaluate = staticmethod(scale_evaluate)  # each lambda on the held-out split

    @staticmethod
    def serve(k, params, cooked, plan, results):
        rows = k.loadable()
        lam, state, verdict, trace = pick_scale(k, plan, results)
        return [Dish("ties", f"{Ties.label} k={params['ties_k']:g} l={lam:g}", verdict.metrics,
                     [r["id"] for r in rows], state,
                     params={"k": params["ties_k"], "trim": params["ties_trim"], "keep": KEEP_RULE, "sign_tie": "+1", "lambda": lam,
                             "n_ingredients": len(rows)},
                     details={"lambda_trace": trace}, correct=verdict.correct)]
