"""The summary table: intervals per dish, paired differences to the reference dish, and
natural shifts kept apart from synthetic corruptions."""

import numpy as np
import pytest

from orchestrator.soup.kitchen import Dish
from orchestrator.soup.summary import columns, differences, interval_metrics, intervals, summary_table
from orchestrator.soup.tasks.base import TaskData
from orchestrator.soup.train import metric_sets, summarize

GROUPS = {"val_acc": ["val"], "id_acc": ["id_test"], "ood_acc": ["fonts", "noise"], "natural_acc": ["fonts"],
          "corrupt_acc": ["noise"]}


def dish(recipe, correct, label=None):
    acc = {n: float(np.mean(c)) for n, c in correct.items()}
    metrics = {"val_acc": acc["val"], "id_acc": acc["id_test"], "natural_acc": acc["fonts"],
               "corrupt_acc": acc["noise"], "ood_acc": (acc["fonts"] + acc["noise"]) / 2}
    return Dish(recipe, label or recipe, metrics, [], correct={n: np.asarray(c, bool) for n, c in correct.items()})


def test_metric_sets_split_natural_shifts_from_corruptions():
    data = TaskData(train=([0], [0]), evals={}, ood=["fonts", "noise"], corruptions=["noise"])
    assert metric_sets(data) == GROUPS
    m = summarize({"val": 0.5, "id_test": 0.9, "fonts": 0.6, "noise": 0.8}, data)
    assert (m["natural_acc"], m["corrupt_acc"], m["ood_acc"]) == (0.6, 0.8, pytest.approx(0.7))
    user = TaskData(train=([0], [0]), evals={}, ood=["forum"])  # no corruptions: one OOD column
    assert "corrupt_acc" not in metric_sets(user)
    assert columns(metric_sets(user)) == ["val_acc", "id_acc", "ood_acc"]
    assert columns(GROUPS) == ["val_acc", "id_acc", "natural_acc", "corrupt_acc", "ood_acc"]


def test_intervals_and_paired_differences_per_dish():
    n = 200
    best = dish("best_individual", {"val": [1] * 150 + [0] * 50, "id_test": [1] * 180 + [0] * 20,
                                     "fonts": [1] * 100 + [0] * 100, "noise": [1] * 160 + [0] * 40})
    # the soup gets 20 more font digits right and nothing else changes
    soup = dish("uniform_soup", {**{k: v.copy() for k, v in best.correct.items()},
                                  "fonts": [1] * 120 + [0] * 80})
    ivs = intervals(soup, GROUPS)
    assert ivs["natural_acc"].estimate == 0.6 and ivs["natural_acc"].low < 0.6 < ivs["natural_acc"].high
    diff = differences(soup, best, GROUPS)
    assert diff["id_acc"].estimate == 0 and (diff["id_acc"].low, diff["id_acc"].high) == (0, 0)
    # 20 of 200 examples flip one way: the difference is 0.1 and its paired interval excludes 0
    assert diff["natural_acc"].estimate == pytest.approx(0.1) and diff["natural_acc"].low > 0.05
    assert diff["ood_acc"].estimate == pytest.approx(0.05)
    assert len(best.correct["val"]) == n

    table = summary_table([best, soup], GROUPS)
    assert "natural shift" in table and "corruptions" in table and "OOD mean" in table
    assert "difference to the best_individual" in table
    soup_line = [ln for ln in table.splitlines() if ln.startswith("uniform_soup")]
    assert len(soup_line) == 2 and "+0.1000 [+0.0" in soup_line[1]
    metrics = interval_metrics([best, soup], GROUPS)
    assert metrics["uniform_soup_natural_acc_diff"] == pytest.approx(0.1)
    assert metrics["best_individual_id_acc_low"] < 0.9 < metrics["best_individual_id_acc_high"]


def test_a_dish_without_per_example_results_is_shown_without_intervals():
    plain = Dish("uniform_soup", "plain soup", {"val_acc": 0.5, "id_acc": 0.6, "ood_acc": 0.4}, [])
    table = summary_table([plain], {"val_acc": ["val"], "id_acc": ["id_test"], "ood_acc": ["o"]})
    assert "0.5000" in table and "[" not in table.splitlines()[-1] and "difference" not in table
