"""Plots people would rather look at than read."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.recipes import Dish  # noqa: E402

STYLE = {  # recipe -> (marker, colour, size)
    "zero_shot": ("*", "tab:gray", 220),
    "best_individual": ("D", "tab:blue", 90),
    "uniform_soup": ("s", "tab:orange", 110),
    "greedy_soup": ("*", "tab:red", 260),
    "ensemble": ("P", "tab:purple", 120),
}


def soup_scatter(trials: list[dict[str, Any]], dishes: list[Dish], path: str, title: str) -> str:
    """ID accuracy (x) against mean OOD accuracy (y), as in the model soups paper."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ok = [t for t in trials if "id_acc" in t["metrics"]]
    ax.scatter([t["metrics"]["id_acc"] for t in ok], [t["metrics"]["ood_acc"] for t in ok],
               s=28, c="tab:green", alpha=0.55, label=f"fine-tuned models ({len(ok)})")
    for dish in dishes:
        if dish.recipe == "wise_ft":
            xs = [c["id_acc"] for c in dish.curve]
            ys = [c["ood_acc"] for c in dish.curve]
            ax.plot(xs, ys, "--o", ms=3, lw=1, label=f"WiSE-FT {dish.params['base'].replace('_', ' ')} (alpha 0..1)")
            continue
        marker, colour, size = STYLE.get(dish.recipe, ("o", "black", 60))
        ax.scatter([dish.metrics["id_acc"]], [dish.metrics["ood_acc"]], marker=marker, c=colour, s=size,
                   edgecolors="black", linewidths=0.6, zorder=5, label=dish.label)
    ax.set_xlabel("in-distribution accuracy (id_test)")
    ax.set_ylabel("mean OOD accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
