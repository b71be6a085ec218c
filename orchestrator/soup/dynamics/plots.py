"""The data map plot and a grid of the hardest examples' images."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def data_map_plot(stats: pd.DataFrame, path: str, title: str) -> str:
    """x variability, y confidence, colour correctness (the dataset cartography map); examples
    whose label was flipped on purpose are circled."""
    fig, ax = plt.subplots(figsize=(7, 6))
    points = ax.scatter(stats["variability"], stats["confidence"], c=stats["correctness"], cmap="coolwarm_r",
                        vmin=0, vmax=1, s=9, alpha=0.8, linewidths=0)
    if "flipped" in stats and stats["flipped"].any():
        flipped = stats[stats["flipped"].astype(bool)]
        ax.scatter(flipped["variability"], flipped["confidence"], s=30, facecolors="none", edgecolors="black",
                   linewidths=0.7, label=f"label flipped on purpose ({len(flipped)})")
        ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(points, ax=ax, label="correctness (fraction of epochs)")
    ax.set_xlabel("variability (std of p(gold) over epochs)")
    ax.set_ylabel("confidence (mean p(gold) over epochs)")
    ax.text(0.98, 0.98, "easy-to-learn", transform=ax.transAxes, ha="right", va="top", fontsize=9, color="gray")
    ax.text(0.98, 0.5, "ambiguous", transform=ax.transAxes, ha="right", va="center", fontsize=9, color="gray")
    ax.text(0.02, 0.02, "hard-to-learn", transform=ax.transAxes, ha="left", va="bottom", fontsize=9, color="gray")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_grid(images: list[np.ndarray], captions: list[str], path: str, title: str, columns: int = 8) -> str:
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
