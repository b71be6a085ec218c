"""Recipes cooked from the pool, each a small function behind one registry.

A recipe takes the Kitchen (the pool's usable ingredients, the task, an evaluator)
and the dishes cooked before it, and returns Dishes: weights (or none, for the
ensemble), metrics on every eval set, and the ingredient ids it used. Storing the
dishes in the pool and in MLflow happens elsewhere (soup_sweep.serve).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from orchestrator import soups
from orchestrator.errors import PoolError
from orchestrator.pool import Pool
from orchestrator.tasks.base import StateDict, Task, TaskData, arch_fingerprint
from orchestrator.train import (accuracy, batchnorm_buffers, device, load_into, predict_logits, recompute_batchnorm,
                                summarize)

log = logging.getLogger(__name__)


@dataclass
class Dish:
    recipe: str  # registry name: zero_shot, best_individual, uniform_soup, greedy_soup, ensemble, wise_ft
    label: str  # how tables and plots name it
    metrics: dict[str, float]
    parents: list[str]
    weights: StateDict | None = None
    params: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # WiSE-FT: metrics per alpha


class Kitchen:
    """What recipes share: usable ingredients (best first), weight loading and evaluation."""

    def __init__(self, pool: Pool, task: Task, data: TaskData, sweep: str | None, settings: dict[str, Any],
                 precision: str = "auto"):
        self.pool, self.task, self.data, self.settings, self.precision = pool, task, data, settings, precision
        self.device = device()  # soups are mixed and evaluated on the GPU when there is one
        self.model = task.build_model().to(self.device)
        self.bn_buffers = batchnorm_buffers(self.model)
        df = pool.manifest()
        pre = df[(df["kind"] == "pretrained") & (df["id"] == task.pretrained_id())]
        if pre.empty:
            raise PoolError(f"{pool.uri}: no pretrained weights for task {task.name} ({task.pretrained_id()})")
        self.pretrained = pre.iloc[0].to_dict()
        self.arch = self.pretrained["arch"]
        trials = df[(df["kind"] == "trial") & (df["task"] == task.name)]
        if sweep is not None:
            trials = trials[trials["sweep"] == sweep]
        usable, seen = [], {}
        for row in trials.to_dict("records"):
            if row["sha256"] and row["sha256"] in seen:  # e.g. the same sweep run twice: same seeds, same weights
                log.warning("skipping ingredient %s: same weights as %s", row["id"], seen[row["sha256"]])
                continue
            seen.setdefault(row["sha256"], row["id"])
            if row["status"] != "ok":
                log.warning("skipping ingredient %s: status %s", row["id"], row["status"])
            elif row["arch"] != self.arch:
                log.warning("skipping ingredient %s: architecture %s differs from the pretrained %s",
                            row["id"], row["arch"], self.arch)
            else:
                usable.append(row)
        self.ingredients = sorted(usable, key=lambda r: (-r["metrics"]["val_acc"], r["id"]))
        self._loadable = None

    def loadable(self) -> list[dict[str, Any]]:
        """Ingredients whose weights verify; a missing or corrupt file is skipped with a warning."""
        if self._loadable is None:
            self._loadable = []
            for row in self.ingredients:
                try:
                    self.pool.load(row)
                    self._loadable.append(row)
                except Exception as e:  # noqa: BLE001 - PoolError or a truncated safetensors file
                    log.warning("skipping ingredient %s: %s", row["id"], e)
        return self._loadable

    def load(self, row: dict[str, Any]) -> StateDict:
        state = self.pool.load(row)
        if arch_fingerprint(state) != self.arch:
            raise ValueError(f"ingredient {row['id']}: weights do not match its architecture fingerprint")
        return {k: v.to(self.device) for k, v in state.items()}

    def evaluate(self, state: StateDict, sets: list[str] | None = None, soup: bool = True) -> dict[str, float]:
        """Accuracy on the named eval sets (default all). Averaged weights (`soup`) of a model
        with BatchNorm get fresh running statistics from a few training batches first."""
        load_into(self.model, state)
        if soup and self.bn_buffers:
            recompute_batchnorm(self.task, self.model, self.data.train, self.settings["bn_batches"],
                                precision=self.precision)
            fresh = self.model.state_dict()
            state.update({k: fresh[k].detach().clone() for k in self.bn_buffers})  # the soup keeps its statistics
        names = sets or list(self.data.evals)
        acc = {n: accuracy(self.logits(n), self.data.evals[n].labels) for n in names}
        return summarize(acc, self.data)

    def logits(self, eval_set: str):
        return predict_logits(self.task, self.model, self.data.evals[eval_set], precision=self.precision)

    def val_acc(self, state: StateDict) -> float:
        return self.evaluate(state, [self.data.val])["val_acc"]


Recipe = Callable[[Kitchen, dict[str, Dish]], list[Dish]]
RECIPES: dict[str, Recipe] = {}


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    def register(fn: Recipe) -> Recipe:
        RECIPES[name] = fn
        return fn
    return register


@recipe("zero_shot")
def zero_shot(k: Kitchen, cooked: dict[str, Dish]) -> list[Dish]:
    state = k.load(k.pretrained)
    return [Dish("zero_shot", "zero-shot", k.evaluate(state, soup=False), [k.pretrained["id"]], weights=None)]


@recipe("best_individual")
def best_individual(k: Kitchen, cooked: dict[str, Dish]) -> list[Dish]:
    best = k.loadable()[0]
    return [Dish("best_individual", "best individual", dict(best["metrics"]), [best["id"]],
                 weights=k.load(best), params={"hparams": best["hparams"]})]


@recipe("uniform_soup")
def uniform_soup(k: Kitchen, cooked: dict[str, Dish]) -> list[Dish]:
    rows = k.loadable()
    state = soups.uniform_soup(k.load(r) for r in rows)
    return [Dish("uniform_soup", "uniform soup", k.evaluate(state), [r["id"] for r in rows], state,
                 params={"n_ingredients": len(rows)})]


@recipe("greedy_soup")
def greedy_soup(k: Kitchen, cooked: dict[str, Dish]) -> list[Dish]:
    rows = k.loadable()
    accept = k.settings["greedy_accept"]
    result = soups.greedy_soup(rows, k.load, k.val_acc, accept=accept, first_score=rows[0]["metrics"]["val_acc"])
    trace = [{"id": s.ingredient["id"], "val_acc": s.score, "accepted": s.accepted} for s in result.steps]
    # a soup of one is the best individual itself, BatchNorm statistics included
    return [Dish("greedy_soup", f"greedy soup ({len(result.kept)} kept)",
                 k.evaluate(result.state, soup=len(result.kept) > 1),
                 [r["id"] for r in result.kept], result.state,
                 params={"n_ingredients": len(result.kept), "n_candidates": len(rows), "accept": accept,
                         "trace": trace})]


@recipe("ensemble")
def ensemble(k: Kitchen, cooked: dict[str, Dish]) -> list[Dish]:
    rows = k.loadable()

    def member_logits(row):
        load_into(k.model, k.load(row))
        return {n: k.logits(n) for n in k.data.evals}

    mean = soups.mean_logits(member_logits(r) for r in rows)
    acc = {n: accuracy(mean[n], k.data.evals[n].labels) for n in mean}
    return [Dish("ensemble", f"ensemble ({len(rows)} models)", summarize(acc, k.data), [r["id"] for r in rows],
                 params={"n_ingredients": len(rows)})]


@recipe("wise_ft")
def wise_ft(k: Kitchen, cooked: dict[str, Dish]) -> list[Dish]:
    """Interpolate the pretrained weights towards the best individual and the greedy soup."""
    zero = k.load(k.pretrained)
    alphas = sorted(k.settings["wise_ft_alphas"])
    mid = min(alphas, key=lambda a: abs(a - 0.5))  # the recommended alpha, or the nearest on the grid
    dishes = []
    for base_name in ("best_individual", "greedy_soup"):
        base = cooked[base_name]
        curve, mid_state = [], None
        for alpha in alphas:
            state = soups.interpolate(zero, base.weights, alpha)
            mixed = 0 < alpha < 1 or (alpha == 1 and len(base.parents) > 1)  # else one model's own weights
            curve.append({"alpha": alpha, **k.evaluate(state, soup=mixed)})
            if alpha == mid:
                mid_state = state
        point = next(c for c in curve if c["alpha"] == mid)
        dishes.append(Dish("wise_ft", f"WiSE-FT {base.label.split(' (')[0]} a={mid:g}",
                           {m: v for m, v in point.items() if m != "alpha"},
                           [k.pretrained["id"], *base.parents], mid_state,
                           params={"alpha": mid, "base": base_name}, curve=curve))
    return dishes


def check_cookable(kitchen: Kitchen) -> None:
    """At least one ingredient survives the checks (status, architecture, sha256)."""
    if not kitchen.loadable():
        raise PoolError(f"{kitchen.pool.uri}: no usable trial ingredients to cook from")


def cook(kitchen: Kitchen, names: list[str] | None = None) -> list[Dish]:
    """Cook the named recipes (default: all, in registry order)."""
    check_cookable(kitchen)
    cooked: dict[str, Dish] = {}
    dishes: list[Dish] = []
    for name in names or list(RECIPES):
        for dish in RECIPES[name](kitchen, cooked):
            cooked.setdefault(name, dish)
            dishes.append(dish)
    for dish in dishes:  # the pool and MLflow store CPU tensors
        if dish.weights is not None:
            dish.weights = {k: v.detach().cpu().contiguous() for k, v in dish.weights.items()}
    return dishes

