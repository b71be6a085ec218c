"""Plots people would rather look at than read; how each recipe is drawn is its own declaration."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.soup.kitchen import Dish  # noqa: E402
from orchestrator.soup.recipes import RECIPES, Marker  # noqa: E402
from orchestrator.soup.summary import HEADINGS, columns, intervals  # noqa: E402

OTHER = Marker("o", "black", 60)  # a recipe that declares no marker


def soup_scatter(trials: list[dict[str, Any]], dishes: list[Dish], path: str, title: str,
                 groups: dict[str, list[str]] | None = None) -> str:
    """ID accuracy (x) against OOD accuracy (y), as in the model soups paper, with each
    dish's 95% intervals as error bars. A task with natural shifts and synthetic corruptions
    gets one panel for each (fine-tuning fixes corruptions and hurts natural shifts: a mean
    of both hides that); otherwise one panel of the OOD mean."""
    groups = groups or {}
    ys = [m for m in ("natural_acc", "corrupt_acc") if m in columns(groups)] or ["ood_acc"]
    fig, axes = plt.subplots(1, len(ys), figsize=(7.5 * len(ys), 5.5), squeeze=False)
    for ax, y in zip(axes[0], ys):
        _panel(ax, trials, dishes, y, groups)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _panel(ax, trials: list[dict[str, Any]], dishes: list[Dish], y: str, groups: dict[str, list[str]]) -> None:
    ok = [t for t in trials if "id_acc" in t["metrics"] and y in t["metrics"]]
    ax.scatter([t["metrics"]["id_acc"] for t in ok], [t["metrics"][y] for t in ok],
               s=28, c="tab:green", alpha=0.55, label=f"fine-tuned models ({len(ok)})")
    for dish in dishes:
        recipe = RECIPES[dish.recipe]
        if y not in dish.metrics:
            continue
        if recipe.curve_x and dish.curve and all("id_acc" in c and y in c for c in dish.curve):
            x = [c[recipe.curve_x] for c in dish.curve]
            ax.plot([c["id_acc"] for c in dish.curve], [c[y] for c in dish.curve], "--o", ms=3, lw=1,
                    label=f"{dish.label}; curve: {recipe.curve_x} {min(x):g}..{max(x):g}")
            continue
        m = recipe.marker or OTHER
        ivs = intervals(dish, groups)
        px, py = dish.metrics["id_acc"], dish.metrics[y]
        if "id_acc" in ivs and y in ivs:
            ax.errorbar([px], [py], xerr=[[px - ivs["id_acc"].low], [ivs["id_acc"].high - px]],
                        yerr=[[py - ivs[y].low], [ivs[y].high - py]], fmt="none", ecolor=m.colour, elinewidth=1,
                        capsize=3, alpha=0.7, zorder=4)
        ax.scatter([px], [py], marker=m.shape, c=m.colour, s=m.size, edgecolors="black", linewidths=0.6, zorder=5,
                   label=dish.label)
    ax.set_xlabel("in-distribution accuracy (id_test)")
    ax.set_ylabel(f"{HEADINGS[y]} accuracy" + (f" ({', '.join(groups[y])})" if y in groups else ""))
    ax.grid(alpha=0.3)


def per_tensor_histogram(values: dict[str, float], path: str, title: str, xlabel: str) -> str:
    """A histogram of one number per tensor (e.g. Model Stock's t)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.hist(list(values.values()), bins=20, range=(0, 1), color="tab:brown", edgecolor="black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tensors")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
