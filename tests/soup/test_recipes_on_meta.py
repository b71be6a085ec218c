"""Every default recipe that makes new weights cooks its merge math on the `meta` device: a
tensor made on the CPU and mixed in (a generator, a constant, an ingredient not moved), or a
host read in the middle of the math, raises there as it would on a GPU. Evaluations are
stubbed (a model on meta has no outputs to score); everything else is the recipes' own code
reading a real pool: the tiny glyph CNN's random init as theta_0, perturbed trials, Fishers."""

from __future__ import annotations

import pytest
import torch

from orchestrator.common.pool import Pool, Row
from orchestrator.common.weights import arch_fingerprint
from orchestrator.soup import kitchen as kitchen_module
from orchestrator.soup.config import load_config, make_task
from orchestrator.soup.kitchen import Kitchen, Verdict
from orchestrator.soup.recipes import RECIPES, default_recipes, ordered, recipe_params
from tests.helpers import TINY_TASK

SETTINGS = {"precision": "fp32", "bn_batches": 2, "selection": "all"}


@pytest.fixture(scope="module")
def meta_kitchen(tmp_path_factory):
    cfg = load_config(None, TINY_TASK)
    task = make_task(cfg)
    data = task.data()
    pool = Pool(str(tmp_path_factory.mktemp("meta") / "pool"), create=True)
    zero = task.build_model().state_dict()
    pool.add(Row(id=task.pretrained_id(), kind="pretrained", sweep="", task=task.name, status="ok",
                 arch=arch_fingerprint(zero)), zero)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in zero.items()}
        pool.add(Row(id=f"t{i}", kind="trial", sweep="meta", task=task.name, status="ok", arch=arch_fingerprint(state),
                     metrics={"val_acc": 0.5 + i / 10}, parents=[task.pretrained_id()], data_key=task.data_key()), state)
        fisher = {k: torch.rand(v.shape, generator=g) for k, v in task.build_model().named_parameters()}
        pool.add(Row(id=f"t{i}.fisher", kind="fisher", sweep="meta", task=task.name, status="ok",
                     hparams={"examples": 8}, parents=[f"t{i}"], arch=arch_fingerprint(fisher)), fisher)
    mp = pytest.MonkeyPatch()
    mp.setattr(kitchen_module, "device", lambda: torch.device("meta"))
    k = Kitchen(pool, task, data, "meta", SETTINGS)
    mp.undo()
    names = list(data.evals)
    verdict = Verdict({f"acc_{n}": 0.5 for n in names} | {"val_acc": 0.5, "id_acc": 0.5, "ood_acc": 0.5}, {})
    k.judge = lambda state, soup=True: verdict
    k.evaluate = lambda state, sets=None, soup=True: verdict.metrics
    k.val_acc = lambda state: 1.0  # every greedy candidate is kept: its running sum is updated too
    return k, cfg


def weight_recipes() -> list[str]:
    return [n for n in default_recipes() if RECIPES[n].produces_weights]


def test_the_recipes_that_make_weights_are_the_merges():
    assert weight_recipes() == ["uniform_soup", "greedy_soup", "wise_ft", "task_arithmetic", "ties", "dare",
                                "model_stock", "fisher"]


def test_every_merge_recipe_cooks_on_the_meta_device(meta_kitchen):
    k, cfg = meta_kitchen
    assert k.device.type == "meta" and next(k.model.parameters()).device.type == "meta"
    cooked, made = {}, {}
    for name in ordered(weight_recipes()):
        recipe, params = RECIPES[name], recipe_params(name, cfg["soup"])
        needed = {need: cooked[need] for need in recipe.needs}
        if recipe.fans_out():  # the plan and every candidate's evaluation: where the merge math runs
            plan = recipe.plan(k, params, needed)
            results = [recipe.evaluate(k, plan.shared, c) for c in plan.candidates]
            # a lambda grid's evaluations each made theta_0 + lambda * delta; the others return their weights
            made[name] = [plan.shared["delta"]] if "delta" in (plan.shared or {}) else \
                [r["state"] for r in results if r.get("state") is not None]
        else:
            dishes = recipe.cook(k, params, needed)
            cooked[name] = dishes[0]
            made[name] = [d.weights for d in dishes]
    assert set(weight_recipes()) <= set(made)
    assert cooked["greedy_soup"].params["n_ingredients"] == 3
    for name, states in made.items():
        assert states, name
        for state in states:
            assert {v.device.type for v in state.values()} == {"meta"}, name
