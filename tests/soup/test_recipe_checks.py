"""Recipes checked against what they promise, on a small pool built by hand (no Ray, no
Ray: ingredients are the tiny glyph CNN fine-tuned for 100 seeded steps, their val
accuracies measured, not made up): the greedy soup's acceptance rule from the config on a
planted tie, the ensemble against mean logits computed here, WiSE-FT's end points and
stored point, a duplicate ingredient, and BatchNorm statistics after their recompute."""

from __future__ import annotations

import logging

import pytest
import torch

from orchestrator.common.pool import Pool, Row
from orchestrator.common.weights import arch_fingerprint
from orchestrator.merging import executor
from orchestrator.merging.sources import StateSource
from orchestrator.soup.config import load_config, make_task
from orchestrator.soup.kitchen import Kitchen
from orchestrator.soup.recipes import cook
from orchestrator.soup.train import load_into, predict_logits, summarize
from tests.helpers import TINY_TASK

SETTINGS = {"precision": "fp32", "bn_batches": 2, "selection": "all"}


def fine_tune(task, data, zero, seed: int):
    """100 Adam steps on random training batches: a few seconds, about 0.7 val accuracy."""
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = task.build_model()
    model.load_state_dict(zero)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x, y = data.train.inputs, data.train.labels
    for _ in range(100):
        idx = torch.randint(len(x), (128,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hand_pool(tmp_path_factory):
    """The pretrained weights and three ingredients: two fine-tunes ("a" the better), and "near-a",
    a copy of the best one moved by 1e-7 (so adding it to a soup changes no prediction: a
    planted tie). Each row's val_acc is what the kitchen measures for its weights."""
    root = tmp_path_factory.mktemp("hand")
    cfg = load_config(None, TINY_TASK)
    task = make_task(cfg)
    data = task.data()
    pool = Pool(str(root / "pool"), create=True)
    zero = task.pretrain(data)
    pool.add(Row(id=task.pretrained_id(), kind="pretrained", sweep="", task=task.name, status="ok",
                 arch=arch_fingerprint(zero)), zero)
    measure = Kitchen(pool, task, data, "hand", SETTINGS)
    tunes = sorted((fine_tune(task, data, zero, seed) for seed in (1, 2)), key=lambda w: -measure.val_acc(dict(w)))
    weights = {"a": tunes[0], "b": tunes[1]}
    weights["near-a"] = {k: v + 1e-7 for k, v in weights["a"].items()}
    for trial_id, state in weights.items():
        pool.add(Row(id=trial_id, kind="trial", sweep="hand", task=task.name, status="ok", arch=arch_fingerprint(state),
                     metrics={"val_acc": measure.val_acc(dict(state))}, parents=[task.pretrained_id()],
                     data_key=task.data_key()), state)
    return pool, task, data, cfg, zero, weights


def kitchen(hand_pool) -> Kitchen:
    pool, task, data, *_ = hand_pool
    return Kitchen(pool, task, data, "hand", SETTINGS)


def test_the_planted_tie_is_a_tie(hand_pool):
    k = kitchen(hand_pool)
    a, near = (next(r for r in k.loadable() if r["id"] == i) for i in ("a", "near-a"))
    assert a["metrics"]["val_acc"] == near["metrics"]["val_acc"]
    assert k.val_acc(k.merge("linear", [a, near]).state) == a["metrics"]["val_acc"]
    assert [r["id"] for r in k.loadable()][:2] == ["a", "near-a"]  # best first, ties by id: the tie comes second


@pytest.mark.parametrize("accept, kept", [(">=", ["a", "near-a"]), (">", ["a"])])
def test_greedy_accept_from_the_config_decides_the_planted_tie(hand_pool, accept, kept):
    cfg = hand_pool[3]
    (greedy,) = cook(kitchen(hand_pool), ["greedy_soup"], {**cfg["soup"], "greedy_accept": accept})
    assert [i for i in greedy.parents if i in ("a", "near-a")] == kept
    trace = {step["id"]: step["accepted"] for step in greedy.details["trace"]}
    assert trace["near-a"] is (accept == ">=") and greedy.params["accept"] == accept


def test_ensemble_metrics_are_the_accuracy_of_the_mean_logits(hand_pool, monkeypatch):
    from orchestrator.soup.recipes import ensemble

    _, task, data, cfg, _, weights = hand_pool
    model = task.build_model()
    logits = []
    for trial_id in ("a", "near-a", "b"):  # the kitchen's order: best first
        load_into(model, weights[trial_id])
        logits.append({n: predict_logits(task, model, data.evals[n], precision="fp32") for n in data.evals})
    mean = {n: sum(member[n] for member in logits) / 3 for n in data.evals}
    want = summarize({n: (mean[n].argmax(1) == data.evals[n].labels).float().mean().item() for n in data.evals}, data)
    for groups in (8, 2):  # one member per evaluation; members summed in groups of 2 and 1
        monkeypatch.setattr(ensemble, "GROUPS", groups)
        dish = cook(kitchen(hand_pool), ["ensemble"], cfg["soup"])[-1]
        assert dish.recipe == "ensemble" and dish.parents == ["a", "near-a", "b"]
        assert dish.metrics == pytest.approx(want, abs=1e-12)


def test_wise_ft_runs_from_the_start_point_to_the_fine_tune_and_stores_the_point_nearest_half(hand_pool):
    _, task, data, cfg, zero, weights = hand_pool
    soup = {**cfg["soup"], "wise_ft_alphas": [1.0, 0.3, 0.0, 0.6]}
    k = kitchen(hand_pool)
    dishes = {d.name: d for d in cook(k, ["zero_shot", "wise_ft"], soup)}
    wise = dishes["wise_ft_best_individual"]
    assert [p["alpha"] for p in wise.curve] == [0.0, 0.3, 0.6, 1.0]
    point = {p["alpha"]: {m: v for m, v in p.items() if m != "alpha"} for p in wise.curve}
    assert point[0.0] == dishes["zero_shot"].metrics  # alpha 0: the pretrained weights
    assert point[1.0] == k.evaluate(dict(weights["a"]), soup=False)  # alpha 1: the best individual's own
    assert wise.params["alpha"] == 0.6 and wise.metrics == point[0.6]  # 0.6 is nearer 0.5 than 0.3
    mixed = executor.merge("linear", [StateSource(zero), StateSource(weights["a"])],
                           params={"weights": [0.4, 0.6], "normalize": False}).state  # 0.4 theta_0 + 0.6 theta_a, in float32
    assert all(torch.equal(wise.weights[n], mixed[n]) for n in zero)
    assert wise.parents == [task.pretrained_id(), "a"]


def test_an_ingredient_with_the_weights_of_another_is_skipped(hand_pool, caplog):
    pool, task, data, _, _, weights = hand_pool
    copy_pool = Pool(str(pool.uri) + "-copy", create=True)
    for row in pool.manifest().to_dict("records"):
        copy_pool.add(Row(**{f: row[f] for f in ("id", "kind", "sweep", "task", "status", "arch", "metrics",
                                                   "parents", "data_key")}), pool.load(row))
    first = copy_pool.get("b")
    copy_pool.add(Row(id="b-again", kind="trial", sweep="hand", task=task.name, status="ok", arch=first["arch"],
                      metrics={"val_acc": first["metrics"]["val_acc"]}, parents=[task.pretrained_id()],
                      data_key=task.data_key()), weights["b"])
    with caplog.at_level(logging.WARNING):
        k = Kitchen(copy_pool, task, data, "hand", SETTINGS)
    assert copy_pool.get("b-again")["sha256"] == first["sha256"]
    assert [r["id"] for r in k.ingredients] == ["a", "near-a", "b"]
    assert any(r.getMessage() == "skipping ingredient b-again: same weights as b" for r in caplog.records)


def test_batchnorm_statistics_after_recompute_are_those_of_the_first_batches():
    """recompute_batchnorm resets the running statistics and averages them over `batches`
    batches of the training set (momentum None): with BatchNorm first, its input is the data
    itself, so the running mean is the mean of those examples and the running variance the
    mean of each batch's unbiased variance."""
    from orchestrator.soup.tasks.base import TensorExamples
    from orchestrator.soup.train import BN_BATCH_SIZE, recompute_batchnorm

    class Task:
        num_workers = 0

        @staticmethod
        def logits(model, x):
            return model(x)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3 * BN_BATCH_SIZE + 5, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 7
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    model[0].running_mean.fill_(100.0)  # stale statistics, as averaged weights bring them
    recompute_batchnorm(Task, model, TensorExamples(x, torch.zeros(len(x), dtype=torch.long)), batches=2, precision="fp32")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # the order it draws batches in
    first = [x[idx] for idx in order.split(BN_BATCH_SIZE)[:2]]
    torch.testing.assert_close(model[0].running_mean, torch.cat(first).mean(0))
    torch.testing.assert_close(model[0].running_var, torch.stack([b.var(0, unbiased=True) for b in first]).mean(0))
    assert int(model[0].num_batches_tracked) == 2 and model[0].momentum == 0.1 and not model.training
