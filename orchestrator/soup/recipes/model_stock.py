"""Model Stock (Jang et al., ECCV 2024): per tensor, move from theta_0 towards the fine-tunes'
mean by t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of their task vectors.
No held-out evaluation chooses anything; cooked over all ingredients and over the greedy
soup's (the paper: a few fine-tunes rival a greedy soup of many), each its own candidate."""

import logging

import torch

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import Marker, Plan, Recipe, register

log = logging.getLogger(__name__)


@register
class ModelStock(Recipe):
    name, label, position = "model_stock", "Model Stock", 100
    needs = ("greedy_soup",)
    produces_weights = True
    marker = Marker("^", "tab:brown", 120)
    histogram = "t_per_tensor"

    @staticmethod
    def plan(k, params, cooked):
        rows = k.loadable()
        kept = set(cooked["greedy_soup"].parents)
        candidates = []
        for name, which, chosen in (("model_stock", "all", rows),
                                    ("model_stock_greedy", "greedy soup's", [r for r in rows if r["id"] in kept])):
            if len(chosen) < 2:
                log.warning("%s: the %s ingredients are %d model(s); Model Stock needs 2 or more", name, which,
                            len(chosen))
            else:
                candidates.append({"name": name, "from": which, "rows": chosen})
        return Plan(candidates)

    @staticmethod
    def evaluate(k, shared, c):
        stock = k.merge("model_stock", c["rows"])
        verdict = k.judge(stock.state)
        return {"state": stock.state, "t": stock.notes, "metrics": verdict.metrics, "correct": verdict.correct}

    @staticmethod
    def serve(k, params, cooked, plan, results):
        dishes = []
        for c, made in zip(plan.candidates, results):
            t = dict(zip(made["t"], torch.stack(list(made["t"].values())).tolist()))  # every tensor's t, read at once
            ts = sorted(t.values())
            dishes.append(Dish("model_stock", f"{ModelStock.label} ({c['from']} {len(c['rows'])})", made["metrics"],
                               [r["id"] for r in c["rows"]], made["state"],
                               params={"from": c["from"], "n_ingredients": len(c["rows"]), "t_median": ts[len(ts) // 2]},
                               details={"t_per_tensor": t}, name=c["name"], correct=made["correct"]))
        return dishes
