"""Recipes cooked from the pool: one file per recipe in this folder, each a `Recipe`
subclass registered with `@register`, found and imported automatically.

A recipe declares what the rest of the product needs to know about it, and everything
else is driven by those declarations, never by recipe names: config validation (its
`params` become keys under `soup:`), which recipes must be cooked before it (`needs`),
whether its weights are new and go to the pool and MLflow (`produces_weights`), where the
summary table lists it (`position`), whether the summary measures the others against it
(`reference`) and how the plot draws it (`marker`, or a curve over
`curve_x`). `cook` does the math through the Kitchen and does no I/O of its own.

A recipe whose evaluations do not depend on one another (a lambda grid, WiSE-FT's alphas,
the ensemble's members) writes `plan`, `evaluate` and `serve` instead of `cook`: cooking in
one process runs them in a row, cooking on Ray (soup/cooking.py) runs every candidate's
evaluation as its own unit of work, on whichever worker is free. Both run the same three
functions, so the dishes are the same either way.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from orchestrator.merging import methods

if TYPE_CHECKING:
    from orchestrator.soup.kitchen import Dish, Kitchen


# A recipe setting (the config key `soup.<name>`: its type, default and rule) is declared like a
# merge method's setting.
Param = methods.Param


def grid_rule(what: str, low: float, high: float | None = None) -> Callable[[Any], str | None]:
    """A Param check for a non-empty list of numbers in [low, high] (a grid searched on held-out)."""
    from orchestrator.common.config import is_number

    span = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"

    def rule(values) -> str | None:
        if not values:
            return f"must list at least one {what}"
        bad = next((v for v in values if not is_number(v) or v < low or (high is not None and v > high)), None)
        return None if bad is None else f"each {what} must be a number {'in ' if high is not None else ''}{span}, got {bad!r}"

    return rule


@dataclass
class Plan:
    """What `Recipe.plan` hands on: the candidates, each evaluated on its own (small values:
    a lambda, an alpha, an ingredient's pool row), and what every evaluation reads (`shared`:
    e.g. theta_0 and the merged task vector), made once."""

    candidates: list[Any]
    shared: Any = None


@dataclass(frozen=True)
class Marker:
    """How the ID-vs-OOD plot draws a recipe's point."""

    shape: str
    colour: str
    size: int


class Recipe:
    name: ClassVar[str]  # registry name: `soup.recipes` entries, the MLflow tag orchestrator.recipe
    label: ClassVar[str]  # how tables and plots name it
    position: ClassVar[int]  # where the summary table and the default `soup.recipes` list put it
    params: ClassVar[tuple[Param, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()  # recipes whose dishes `cook` reads from `cooked`
    produces_weights: ClassVar[bool] = False  # new weights: stored in the pool and as an MLflow model
    marker: ClassVar[Marker | None] = None  # a point on the plot ...
    curve_x: ClassVar[str | None] = None  # ... or a curve over this parameter (Dish.curve)
    histogram: ClassVar[str | None] = None  # a Dish.details key of per-tensor values, drawn for the dish's run
    reference: ClassVar[bool] = False  # the dish the summary's paired differences are measured against
    # cook() makes one dish per need from whichever needs `cooked` holds, so cooking on Ray may
    # run one part per need, each as soon as its need is done
    per_need: ClassVar[bool] = False

    @staticmethod
    def check(k: Kitchen) -> str | None:
        """Why this recipe cannot cook from this kitchen's pool (e.g. it lacks what the recipe
        reads), or None; asked before anything is cooked."""
        return None

    @classmethod
    def cook(cls, k: Kitchen, params: dict[str, Any], cooked: dict[str, Dish]) -> list[Dish]:
        """The recipe's dishes, from the first dish of each recipe it `needs`. A recipe either
        overrides this or writes the three steps below, which this runs in a row."""
        plan = cls.plan(k, params, cooked)
        return cls.serve(k, params, cooked, plan, [cls.evaluate(k, plan.shared, c) for c in plan.candidates])

    @staticmethod
    def plan(k: Kitchen, params: dict[str, Any], cooked: dict[str, Dish]) -> Plan:
        """The candidates to evaluate, and what their evaluations share."""
        raise NotImplementedError

    @staticmethod
    def evaluate(k: Kitchen, shared: Any, candidate: Any) -> Any:
        """One candidate's evaluation, wherever it runs; returns what `serve` needs of it."""
        raise NotImplementedError

    @staticmethod
    def serve(k: Kitchen, params: dict[str, Any], cooked: dict[str, Dish], plan: Plan,
              results: list[Any]) -> list[Dish]:
        """The dishes, from every candidate's result (in the plan's order)."""
        raise NotImplementedError

    @classmethod
    def fans_out(cls) -> bool:
        """Whether the recipe is cooked as plan, evaluations and serve (else one `cook`)."""
        return cls.plan is not Recipe.plan


RECIPES: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    RECIPES[cls.name] = cls
    return cls


def ordered(names) -> list[str]:
    """The named recipes and everything they need: by position, each after its needs.
    Unknown names raise KeyError."""
    wanted: set[str] = set()

    def close(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in RECIPES[name].needs:
                close(need)

    for name in names:
        close(name)
    out, pending = [], sorted(wanted, key=lambda n: RECIPES[n].position)
    while pending:
        ready = next(n for n in pending if set(RECIPES[n].needs) <= set(out))
        out.append(ready)
        pending.remove(ready)
    return out


def unavailable(kitchen: Kitchen, names: list[str]) -> dict[str, str]:
    """The named recipes that cannot cook from this kitchen, and why (Recipe.check)."""
    return {name: why for name in names if (why := RECIPES[name].check(kitchen))}


def default_recipes() -> list[str]:
    return sorted(RECIPES, key=lambda n: RECIPES[n].position)


def all_params() -> dict[str, Param]:
    """Every recipe's settings by config key (the `soup:` section of the schema)."""
    return {p.name: p for recipe in RECIPES.values() for p in recipe.params}


def cook(kitchen: Kitchen, names: list[str], settings: dict[str, Any],
         done: Callable[[str, list[Dish], float], None] = lambda name, dishes, seconds: None,
         ready: dict[str, Dish] | None = None) -> list[Dish]:
    """Cook the named recipes and what they need, one after another in this process, each
    with its params from `settings` (the config's `soup:` section); returns every dish,
    weights on the CPU; `done(name, dishes, seconds)` as each recipe finishes. `ready`: the
    first dish of recipes cooked before (reused from the pool), which are not cooked again.
    soup/cooking.py spreads the same cook_one calls over Ray workers."""
    import time

    from orchestrator.soup.kitchen import check_cookable

    check_cookable(kitchen)
    cooked: dict[str, Dish] = dict(ready or {})
    dishes: list[Dish] = []
    for name in (n for n in ordered(names) if n not in cooked):
        t0 = time.time()
        made = cook_one(kitchen, name, settings, {need: cooked[need] for need in RECIPES[name].needs})
        done(name, made, time.time() - t0)
        if made:
            cooked[name] = made[0]
        dishes += made
    return dishes


def cook_one(kitchen: Kitchen, name: str, settings: dict[str, Any], cooked: dict[str, Dish]) -> list[Dish]:
    """One recipe's dishes, given the first dish of each recipe it needs; weights on the CPU
    (the pool and MLflow store CPU tensors, and Ray ships them)."""
    recipe = RECIPES[name]
    return on_cpu(recipe.cook(kitchen, recipe_params(name, settings), cooked))


def recipe_params(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe's own settings out of the config's `soup:` section."""
    return {p.name: settings[p.name] for p in RECIPES[name].params}


def on_cpu(dishes: list[Dish]) -> list[Dish]:
    for dish in dishes:
        if dish.weights is not None:
            dish.weights = {k: v.detach().cpu().contiguous() for k, v in dish.weights.items()}
    return dishes


def tensors_to(value: Any, device) -> Any:
    """`value` with every tensor in it (in dicts, lists and tuples) on `device`: what a plan
    shares and an evaluation returns travel between Ray workers on the CPU."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: tensors_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tensors_to(v, device) for v in value)
    return value


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
