"""Greedy soup (Wortsman et al. 2022, recipe 1): add ingredients best first, keeping each
one only if held-out accuracy does not drop (`>=`, the paper) or rises (`>`, the reference code).
The loop runs on the merge engine (merging/greedy.py): a float32 running sum of the kept
ingredients, each candidate read tensor by tensor from the pool."""

from orchestrator.merging import greedy
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Param, Recipe, register


@register
class GreedySoup(Recipe):
    name, label, position = "greedy_soup", "greedy soup", 40
    params = (Param("greedy_accept", str, ">=", "keep an ingredient if held-out accuracy does not drop "
                    "('>=', the paper) or only if it rises ('>', the reference code)",
                    lambda v: None if v in (">=", ">") else f"must be '>=' or '>', got {v!r}"),)
    produces_weights = True
    marker = Marker("*", "tab:red", 260)

    @staticmethod
    def cook(k, params, cooked):
        rows = k.loadable()
        accept = params["greedy_accept"]
        result = greedy.greedy_soup(rows, k.source, k.val_acc, accept=accept, first_score=rows[0]["metrics"]["val_acc"],
                                    device=k.device)
        trace = [{"id": s.ingredient["id"], "val_acc": s.score, "accepted": s.accepted} for s in result.steps]
        # a soup of one is the best individual itself, BatchNorm statistics included
        verdict = k.judge(result.state, soup=len(result.kept) > 1)
        return [Dish("greedy_soup", f"{GreedySoup.label} ({len(result.kept)} kept)", verdict.metrics,
                     [r["id"] for r in result.kept], result.state,
                     params={"n_ingredients": len(result.kept), "n_candidates": len(rows), "accept": accept},
                     details={"trace": trace}, correct=verdict.correct)]
