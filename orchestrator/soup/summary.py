"""The sweep's summary: every dish's accuracies with 95% bootstrap intervals over the eval
examples, and each dish's paired difference to the reference dish (the best individual).

Which columns exist comes from the task's eval sets (train.metric_sets): natural shifts and
synthetic corruptions get columns of their own when the task has both, so WiSE-FT's gain
under a natural shift is not hidden in a mean with corruptions that fine-tuning itself
fixes. Which dish is the reference is the recipes' declaration (Recipe.reference).
"""

from __future__ import annotations

import math

import numpy as np

from orchestrator.common.stats import Interval, bootstrap_interval, paired_difference
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.recipes import RECIPES

HEADINGS = {"val_acc": "val", "id_acc": "ID", "natural_acc": "natural shift", "corrupt_acc": "corruptions",
            "ood_acc": "OOD mean"}


def columns(groups: dict[str, list[str]]) -> list[str]:
    """The table's metrics: natural shift and corruptions only when the task has both."""
    split = "natural_acc" in groups and "corrupt_acc" in groups
    return [m for m in HEADINGS if m in groups and (split or m not in ("natural_acc", "corrupt_acc"))]


def intervals(dish: Dish, groups: dict[str, list[str]]) -> dict[str, Interval]:
    """Each metric whose eval sets the dish has per-example results for, with its interval."""
    return {metric: bootstrap_interval([dish.correct[s] for s in sets])
            for metric, sets in groups.items() if sets and all(s in dish.correct for s in sets)}


def differences(dish: Dish, reference: Dish, groups: dict[str, list[str]]) -> dict[str, Interval]:
    """dish minus reference on each metric, paired over the same examples."""
    return {metric: paired_difference([dish.correct[s] for s in sets], [reference.correct[s] for s in sets])
            for metric, sets in groups.items()
            if sets and all(s in dish.correct and s in reference.correct for s in sets)}


def reference_dish(dishes: list[Dish]) -> Dish | None:
    return next((d for d in dishes if RECIPES[d.recipe].reference and d.correct), None)


def _cell(value: float | None, iv: Interval | None, width: int) -> str:
    if iv is not None:
        return f"{iv.estimate:.4f} [{iv.low:.3f},{iv.high:.3f}]".rjust(width)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:.4f}".rjust(width)


def _diff_cell(iv: Interval | None, width: int) -> str:
    if iv is None:
        return "-".rjust(width)
    return f"{iv.estimate:+.4f} [{iv.low:+.3f},{iv.high:+.3f}]".rjust(width)


def summary_rows(dishes: list[Dish], groups: dict[str, list[str]]) -> tuple[list[str], list[list[str]], Dish | None,
                                                                          list[str], list[list[str]]]:
    """The two tables' cells as text: (headings, rows) of the accuracies with their intervals,
    the reference dish, and (headings, rows) of each other dish minus it, paired (val left out
    there: the soups were selected on it)."""
    cols = columns(groups)
    rows = []
    for d in dishes:
        ivs = intervals(d, groups)
        rows.append([d.label, *(_cell(d.metrics.get(c), ivs.get(c), 0) for c in cols)])
    ref = reference_dish(dishes)
    diff_cols = [c for c in cols if c != "val_acc"]
    diff_rows = [] if ref is None else [
        [d.label, *(_diff_cell(differences(d, ref, groups).get(c), 0) for c in diff_cols)] for d in dishes if d is not ref]
    return [HEADINGS[c] for c in cols], rows, ref, [HEADINGS[c] for c in diff_cols], diff_rows


def summary_table(dishes: list[Dish], groups: dict[str, list[str]]) -> str:
    """Accuracies with intervals; then each dish minus the reference, paired, as fixed-width text."""
    heads, rows, ref, diff_heads, diff_rows = summary_rows(dishes, groups)
    width = 22
    lines = ["95% intervals: bootstrap over eval examples; '-' where a dish has no per-example results",
             f"{'':34s}" + "".join(h.rjust(width) for h in heads)]
    lines += [f"{label:34s}" + "".join(c.rjust(width) for c in cells) for label, *cells in rows]
    if ref is None:
        return "\n".join(lines)
    lines += ["", f"difference to the {ref.label} (paired: the same examples resampled together)",
              f"{'':34s}" + "".join(h.rjust(width + 2) for h in diff_heads)]
    lines += [f"{label:34s}" + "".join(c.rjust(width + 2) for c in cells) for label, *cells in diff_rows]
    return "\n".join(lines)


def summary_markdown(dishes: list[Dish], groups: dict[str, list[str]]) -> str:
    """The same two tables as Markdown (what MLflow renders as a run's description)."""
    heads, rows, ref, diff_heads, diff_rows = summary_rows(dishes, groups)

    def table(headings: list[str], body: list[list[str]]) -> list[str]:
        return ["| dish | " + " | ".join(headings) + " |", "|---" * (len(headings) + 1) + "|",
                *("| " + " | ".join(cells) + " |" for cells in body)]

    lines = ["Accuracy with 95% intervals (bootstrap over the eval examples; '-': no per-example results)", "",
             *table(heads, rows)]
    if ref is not None:
        lines += ["", f"Difference to the {ref.label} (paired: the same examples resampled together)", "",
                  *table(diff_heads, diff_rows)]
    return "\n".join(lines)


def interval_metrics(dishes: list[Dish], groups: dict[str, list[str]]) -> dict[str, float]:
    """The intervals as MLflow metrics on the sweep's run: <dish>_<metric>_low / _high, and
    <dish>_<metric>_diff (+ _low / _high) against the reference."""
    out: dict[str, float] = {}
    ref = reference_dish(dishes)
    for d in dishes:
        for metric, iv in intervals(d, groups).items():
            out[f"{d.name}_{metric}_low"], out[f"{d.name}_{metric}_high"] = iv.low, iv.high
        if ref is not None and d is not ref:
            for metric, iv in differences(d, ref, groups).items():
                out[f"{d.name}_{metric}_diff"] = iv.estimate
                out[f"{d.name}_{metric}_diff_low"], out[f"{d.name}_{metric}_diff_high"] = iv.low, iv.high
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}
