"""A sweep's data map from the pool: every trial's dynamics, each trial's map and the sweep's
averaged map, the regions, the hardest examples shown as a person reads them, and label-error
triage when the sweep trained on labels flipped on purpose. Read by `python -m
orchestrator.data_map` and by the soup sweep's report step; the FTFT selection reads it too."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from orchestrator.common.errors import UserError
from orchestrator.common.pool import Pool
from orchestrator.soup.dynamics.cartography import average_maps, example_stats, region_ids, triage, with_regions

TRIAGE_FRACTION = 0.1  # label-error triage inspects the lowest-confidence 10%
SHOWN = 32  # hardest examples listed for a person


@dataclass
class DataMap:
    sweep: str
    per_trial: dict[str, pd.DataFrame]  # trial id -> its map (example_stats)
    stats: pd.DataFrame  # the sweep's map: averaged across trials, with regions

    @property
    def noisy(self) -> bool:
        return "flipped" in self.stats and bool(self.stats["flipped"].any())

    def triage(self) -> dict[str, dict[str, float]]:
        """Precision / recall of the flipped labels among the lowest-confidence 10%: of the sweep's
        averaged map, and of each trial's own map (mean, min and max over trials)."""
        one = pd.DataFrame([triage(m, TRIAGE_FRACTION) for m in self.per_trial.values()])
        return {"averaged": triage(self.stats, TRIAGE_FRACTION),
                **{f"one trial {agg}": one[["precision", "recall"]].agg(agg).to_dict() for agg in ("mean", "min", "max")}}


def load(pool: Pool, sweep: str, data_key: str | None = None, start: str | None = None) -> DataMap:
    """The sweep's recorded dynamics (of its finished trials), for this training data when
    `data_key` is given and of trials from the start point `start` when given; a one-line error
    when there are none, or when they come from several start points (models) and `start` does
    not say which (a sweep name reused for another model)."""
    df = pool.manifest()
    if df.empty:
        raise UserError(f"{pool.uri}: the pool is empty")
    rows = df[(df["kind"] == "dynamics") & (df["sweep"] == sweep) & (df["status"] == "ok")]
    if rows.empty:
        known = sorted(df.loc[df["kind"] == "dynamics", "sweep"].unique())
        raise UserError(f"{pool.uri}: no training dynamics of sweep {sweep!r} "
                        + (f"(sweeps with dynamics: {', '.join(known)})" if known else "(no sweep recorded any)"))
    if data_key is not None:
        rows = rows[rows["data_key"] == data_key]
        if rows.empty:
            raise UserError(f"{pool.uri}: sweep {sweep!r} recorded dynamics for other training data (another "
                            "data fingerprint: other files, split, label noise or selection), not this one")
    trials = df[(df["kind"] == "trial") & (df["status"] == "ok")].set_index("id")["parents"]
    rows = rows[[p[0] in trials.index for p in rows["parents"]]]  # a finished trial's dynamics only
    starts = pd.Series([trials[p[0]][0] if len(trials[p[0]]) else "" for p in rows["parents"]], index=rows.index)
    if start is not None:
        rows, starts = rows[starts == start], starts[starts == start]
    if starts.nunique() > 1:
        raise UserError(f"{pool.uri}: sweep {sweep!r} recorded dynamics of trials from {starts.nunique()} start "
                        f"points ({', '.join(sorted(starts.unique()))}): one map per model; use another sweep name")
    if rows.empty:
        raise UserError(f"{pool.uri}: no finished trial of sweep {sweep!r} with dynamics"
                        + (f" started from {start}" if start else ""))
    per_trial = {r["parents"][0]: example_stats(pool.load_table(r).to_pandas()) for r in rows.to_dict("records")}
    return DataMap(sweep, per_trial, with_regions(average_maps(list(per_trial.values()))))


def select(pool: Pool, from_sweep: str, data_key: str, region: str, fraction: float, seed: int) -> np.ndarray:
    """FTFT: the training example ids of a region of another sweep's averaged map, sorted."""
    stats = load(pool, from_sweep, data_key).stats
    if region == "ambiguous" and not (stats["variability"] > 0).any():
        raise UserError(f"data_selection.region: ambiguous needs dynamics over 2 or more epochs; every trial of "
                        f"sweep {from_sweep!r} ran one, so no example varies")
    return np.sort(region_ids(stats, region, fraction, seed).to_numpy())


def summary(dm: DataMap) -> str:
    s = dm.stats
    counts = ", ".join(f"{r.replace('_', '-')} {int(s[r].sum())}" for r in ("easy", "ambiguous", "hard_to_learn"))
    lines = [f"data map of sweep {dm.sweep}: {len(s)} training examples, {len(dm.per_trial)} trials averaged; "
             f"regions (thirds): {counts}",
             f"  mean confidence {s['confidence'].mean():.3f}, mean variability {s['variability'].mean():.3f}, "
             f"examples never correct in any trial's epochs: {int((s['correctness'] == 0).sum())}"]
    if not (s["variability"] > 0).any():
        lines.append("  every trial ran one epoch: variability is 0 everywhere, so the ambiguous region is arbitrary "
                     "(train 2 or more epochs for a map)")
    if dm.noisy:
        t = dm.triage()
        a = t["averaged"]
        lines.append(f"  label-error triage ({a['flipped']} labels flipped on purpose; the lowest-confidence "
                     f"{TRIAGE_FRACTION:.0%} = {a['examples']} examples):")
        lines.append(f"    averaged over {len(dm.per_trial)} trials: precision {a['precision']:.3f}, "
                     f"recall {a['recall']:.3f}")
        lines.append(f"    one trial's own map:      precision {t['one trial mean']['precision']:.3f} "
                     f"[{t['one trial min']['precision']:.3f}, {t['one trial max']['precision']:.3f}], recall "
                     f"{t['one trial mean']['recall']:.3f} [{t['one trial min']['recall']:.3f}, "
                     f"{t['one trial max']['recall']:.3f}]  (mean [min, max] over trials)")
    return "\n".join(lines)


def write(dm: DataMap, task, examples, out: str) -> list[str]:
    """The map's files under `out`: data_map.png, data_map.parquet (per example: the averaged
    statistics and regions), per_trial.parquet, summary.txt, and the hardest examples for a person
    to inspect (hard_to_learn.png for images, hard_to_learn.txt always). `examples`: the training
    examples the ids index (the task's full training set, labels as trained)."""
    from orchestrator.soup.dynamics.plots import data_map_plot, image_grid

    os.makedirs(out, exist_ok=True)
    files = [data_map_plot(dm.stats, os.path.join(out, "data_map.png"),
                           f"{dm.sweep}: data map of {len(dm.stats)} training examples, averaged over "
                           f"{len(dm.per_trial)} trials")]
    table = dm.stats.copy()
    table["label"] = examples.labels[torch.from_numpy(table.index.to_numpy(copy=True))].numpy()  # a writable copy
    table.reset_index().to_parquet(os.path.join(out, "data_map.parquet"))
    pd.concat(dm.per_trial, names=["trial", "id"]).reset_index().to_parquet(os.path.join(out, "per_trial.parquet"))
    files += [os.path.join(out, "data_map.parquet"), os.path.join(out, "per_trial.parquet")]
    hardest = table.sort_values(["confidence", "variability"]).head(SHOWN)
    views = {i: task.example_view(examples, int(i)) for i in hardest.index}
    names = task.classes() if hasattr(task, "classes") else None  # a file task's label names
    hardest = hardest.assign(label=[names[int(y)] if names else int(y) for y in hardest["label"]])
    lines = [f"the {len(hardest)} lowest-confidence training examples of sweep {dm.sweep} (of the hard-to-learn "
             f"third, {int(table['hard_to_learn'].sum())} examples); label = the label trained on",
             f"{'id':>6} {'label':>10} {'conf':>6} {'var':>6} {'correct':>7} {'flipped':>7}  input"]
    for i, r in hardest.iterrows():
        view = views[i] if isinstance(views[i], str) else f"image {tuple(views[i].shape)}"
        lines.append(f"{i:>6} {str(r['label']):>10} {r['confidence']:6.3f} {r['variability']:6.3f} "
                     f"{r['correctness']:7.2f} {str(bool(r.get('flipped', False))):>7}  {view[:160]!r}")
    with open(os.path.join(out, "hard_to_learn.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    files.append(os.path.join(out, "hard_to_learn.txt"))
    if not any(isinstance(v, str) for v in views.values()):
        captions = [f"#{i} label {r['label']}\nconf {r['confidence']:.2f}" + (" FLIP" if r.get("flipped") else "")
                    for i, r in hardest.iterrows()]
        files.append(image_grid([views[i].numpy() for i in hardest.index], captions,
                                os.path.join(out, "hard_to_learn.png"),
                                f"{dm.sweep}: the {len(hardest)} lowest-confidence training examples"))
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary(dm) + "\n")
    files.append(os.path.join(out, "summary.txt"))
    return files


def metrics(dm: DataMap) -> dict[str, float]:
    """What the sweep's MLflow run records of the map."""
    s = dm.stats
    out = {"data_map_examples": float(len(s)), "data_map_trials": float(len(dm.per_trial)),
           "data_map_mean_confidence": float(s["confidence"].mean()),
           "data_map_mean_variability": float(s["variability"].mean())}
    if dm.noisy:
        t = dm.triage()
        out.update({"triage_precision_averaged": t["averaged"]["precision"],
                    "triage_recall_averaged": t["averaged"]["recall"],
                    "triage_precision_one_trial_mean": t["one trial mean"]["precision"],
                    "triage_recall_one_trial_mean": t["one trial mean"]["recall"]})
    return out
