"""Plots people would rather look at than read; how each recipe is drawn is its own declaration."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.soup.kitchen import Dish  # noqa: E402
from orchestrator.soup.recipes import RECIPES, Marker  # noqa: E402

OTHER = Marker("o", "black", 60)  # a recipe that declares no marker


def soup_scatter(trials: list[dict[str, Any]], dishes: list[Dish], path: str, title: str) -> str:
    """ID accuracy (x) against mean OOD accuracy (y), as in the model soups paper."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ok = [t for t in trials if "id_acc" in t["metrics"]]
    ax.scatter([t["metrics"]["id_acc"] for t in ok], [t["metrics"]["ood_acc"] for t in ok],
               s=28, c="tab:green", alpha=0.55, label=f"fine-tuned models ({len(ok)})")
    for dish in dishes:
        recipe = RECIPES[dish.recipe]
        if recipe.curve_x and dish.curve:
            x = [c[recipe.curve_x] for c in dish.curve]
            ax.plot([c["id_acc"] for c in dish.curve], [c["ood_acc"] for c in dish.curve], "--o", ms=3, lw=1,
                    label=f"{dish.label}; curve: {recipe.curve_x} {min(x):g}..{max(x):g}")
            continue
        m = recipe.marker or OTHER
        ax.scatter([dish.metrics["id_acc"]], [dish.metrics["ood_acc"]], marker=m.shape, c=m.colour, s=m.size,
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
