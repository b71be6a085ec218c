"""Plots of an LR-sensitivity study: loss vs LR, sensitivity vs width, attention logits."""

from __future__ import annotations

import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _panels(n: int, title: str):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.7 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _width_panels(per_lr: pd.DataFrame, title: str):
    """One panel per intervention and one colour per width: the layout of the per-LR plots."""
    interventions = sorted(per_lr["intervention"].unique())
    fig, axes = _panels(len(interventions), title)
    widths = sorted(per_lr["width"].unique())
    return fig, axes, interventions, dict(zip(widths, plt.cm.viridis(np.linspace(0, 0.9, len(widths)))))


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_vs_lr(per_lr: pd.DataFrame, path: str, title: str) -> str:
    """Final validation loss against peak LR, one line per width; x marks a diverged run (at loss_0)."""
    fig, axes, interventions, colours = _width_panels(per_lr, title)
    for ax, name in zip(axes, interventions):
        for w, g in per_lr[per_lr["intervention"] == name].groupby("width"):
            ok = g[g["loss"].notna()]
            ax.plot(ok["lr"], ok["loss"], "-o", ms=4, color=colours[w], label=f"width {w}")
            bad = g[g["loss"].isna()]
            ax.scatter(bad["lr"], bad["init_loss"], marker="x", s=50, color=colours[w])
        ax.axhline(per_lr["init_loss"].mean(), color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
    if per_lr["loss"].notna().all():  # nothing diverged: zoom on the curves rather than up to loss_0
        lo, hi = per_lr["loss"].min(), per_lr["loss"].max()
        axes[0].set_ylim(lo - 0.05 * (hi - lo) - 0.01, hi + 0.1 * (hi - lo) + 0.01)
    axes[0].set_ylabel("final val. loss (x: diverged, at loss_0)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def sensitivity_vs_width(table: pd.DataFrame, path: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, g in table.groupby("intervention"):
        line, = ax.plot(g["width"], g["lr_sensitivity"], "-o", label=name)
        if "lr_sensitivity_low" in g and g["lr_sensitivity_low"].notna().any():  # several seeds: their interval
            ax.fill_between(g["width"], g["lr_sensitivity_low"], g["lr_sensitivity_high"], color=line.get_color(),
                            alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("LR sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _log_log_panel(ax, title: str, xlabel: str, threshold: float) -> None:
    """Log-log axes with the divergence threshold (max attention logit 1e4) drawn in."""
    ax.axhline(threshold, color="tab:red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def attn_logit_vs_lr(per_lr: pd.DataFrame, path: str, title: str, threshold: float) -> str:
    """Peak max attention logit over training against LR, one line per width."""
    fig, axes, interventions, colours = _width_panels(per_lr, title)
    for ax, name in zip(axes, interventions):
        for w, g in per_lr[per_lr["intervention"] == name].groupby("width"):
            ax.plot(g["lr"], g["attn_logit_peak"], "-o", ms=4, color=colours[w], label=f"width {w}")
        _log_log_panel(ax, name, "peak learning rate", threshold)
    axes[0].set_ylabel("max attention logit (peak over training)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def attn_logit_forecast(results: dict[str, Any], path: str, title: str, threshold: float) -> str:
    """Max attention logit at the probe step against parameter count, per LR, with the
    fit from analysis.logit_forecast extended to the target size (`results`: study_tables)."""
    per_lr, forecast, target_params = results["per_lr"], results["forecast"], results["target_params"]
    interventions = sorted(per_lr["intervention"].unique())
    fig, axes = _panels(len(interventions), title)
    lrs = sorted(per_lr["lr"].unique())
    colours = dict(zip(lrs, plt.cm.plasma(np.linspace(0, 0.85, len(lrs)))))
    for ax, name in zip(axes, interventions):
        for lr, g in per_lr[per_lr["intervention"] == name].groupby("lr"):
            g = g[g["attn_logit_probe"] > 0]
            ax.plot(g["params"], g["attn_logit_probe"], "o", ms=4, color=colours[lr], label=f"lr {lr:g}")
            row = forecast[(forecast["intervention"] == name) & (forecast["lr"] == lr)]
            if len(g) >= 2 and len(row) and np.isfinite(row["forecast"].iloc[0]):
                x, y = np.log10(g["params"].astype(float)), np.log10(g["attn_logit_probe"].astype(float))
                coef = np.polyfit(x, y, int(row["degree"].iloc[0]))
                xs = np.linspace(x.min(), math.log10(target_params), 50)
                ax.plot(10 ** xs, 10 ** np.polyval(coef, xs), "-", lw=1, color=colours[lr])
        ax.axvline(target_params, color="gray", ls=":", lw=1)
        _log_log_panel(ax, name, "parameters (dotted: target size)", threshold)
    axes[0].set_ylabel("max attention logit at the probe step")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def all_plots(results: dict[str, Any], threshold: float, folder: str, study: str) -> list[str]:
    per_lr, table = results["per_lr"], results["table"]
    return [
        loss_vs_lr(per_lr, os.path.join(folder, "loss_vs_lr.png"), f"{study}: final loss vs LR"),
        sensitivity_vs_width(table, os.path.join(folder, "lr_sensitivity_vs_width.png"), f"{study}: LR sensitivity"),
        attn_logit_vs_lr(per_lr, os.path.join(folder, "attn_logit_vs_lr.png"),
                         f"{study}: max attention logit vs LR", threshold),
        attn_logit_forecast(results, os.path.join(folder, "attn_logit_forecast.png"),
                            f"{study}: attention logit forecast", threshold),
    ]
