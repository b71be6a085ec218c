"""Dataset cartography (Swayamdipta et al., 2020) over recorded training dynamics: pure functions
on pandas frames, no I/O.

A dynamics frame has one row per (id, epoch) of one trial: p_gold (the probability the model gave
the label it trained on, in its training forward pass) and correct (argmax == that label).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

REGIONS = ("ambiguous", "hard_to_learn", "easy", "random")  # random: the control of an FTFT selection
STANDARD_FRACTION = 1 / 3  # the papers' region size


def example_stats(dynamics: pd.DataFrame) -> pd.DataFrame:
    """Per example id, over its epochs: confidence (mean p_gold), variability (population std of
    p_gold), correctness (fraction of epochs correct) and epochs."""
    by = dynamics.groupby("id")
    stats = pd.DataFrame({"confidence": by["p_gold"].mean(), "variability": by["p_gold"].std(ddof=0),
                          "correctness": by["correct"].mean(), "epochs": by.size()})
    if "flipped" in dynamics:
        stats["flipped"] = by["flipped"].first()
    return stats.sort_index()


def average_maps(maps: list[pd.DataFrame]) -> pd.DataFrame:
    """The sweep's map: each statistic averaged across trials (each trial's map weighs the same;
    an example one trial did not see is averaged over those that did). Averaging maps across
    hyperparameters is this tool's extension; the papers map one training run."""
    stacked = pd.concat(maps)
    by = stacked.groupby(level=0)
    out = by[["confidence", "variability", "correctness"]].mean()
    out["trials"] = by.size()
    if "flipped" in stacked:
        out["flipped"] = by["flipped"].first()
    out.index.name = "id"
    return out.sort_index()


def lowest(score: pd.Series, fraction: float) -> pd.Index:
    """The ids of the `fraction` of examples with the lowest score; ties broken by id."""
    n = max(1, round(fraction * len(score)))
    ranked = score.reset_index().sort_values([score.name, score.index.name or "index"], kind="stable")
    return pd.Index(ranked.iloc[:n, 0], name="id")


def region_ids(stats: pd.DataFrame, region: str, fraction: float = STANDARD_FRACTION, seed: int = 0) -> pd.Index:
    """The ids of one region: ambiguous = highest variability, hard_to_learn = lowest confidence,
    easy = highest confidence, random = a seeded uniform sample of the same size."""
    if region == "ambiguous":
        return lowest(-stats["variability"].rename("score"), fraction)
    if region == "hard_to_learn":
        return lowest(stats["confidence"].rename("score"), fraction)
    if region == "easy":
        return lowest(-stats["confidence"].rename("score"), fraction)
    if region == "random":
        n = max(1, round(fraction * len(stats)))
        pick = np.random.default_rng(seed).choice(len(stats), size=n, replace=False)
        return pd.Index(np.sort(stats.index.to_numpy()[pick]), name="id")
    raise ValueError(f"unknown region {region!r} (known: {', '.join(REGIONS)})")


def with_regions(stats: pd.DataFrame, fraction: float = STANDARD_FRACTION) -> pd.DataFrame:
    """`stats` plus a bool column per region (the usual thirds; ambiguous can overlap the others)
    and `region`, one label per example: ambiguous, else hard_to_learn, else easy, else other."""
    out = stats.copy()
    for region in REGIONS[:3]:
        out[region] = out.index.isin(region_ids(stats, region, fraction))
    out["region"] = np.select([out["ambiguous"], out["hard_to_learn"], out["easy"]],
                              ["ambiguous", "hard_to_learn", "easy"], "other")
    return out


def triage(stats: pd.DataFrame, fraction: float = 0.1) -> dict[str, float]:
    """Label-error triage: among the `fraction` lowest-confidence examples, the precision and
    recall of the flipped labels (stats needs a `flipped` column)."""
    picked = stats.loc[lowest(stats["confidence"].rename("score"), fraction)]
    flipped = int(stats["flipped"].sum())
    hits = int(picked["flipped"].sum())
    return {"examples": len(picked), "flipped": flipped, "hits": hits,
            "precision": hits / len(picked), "recall": hits / flipped if flipped else float("nan")}
