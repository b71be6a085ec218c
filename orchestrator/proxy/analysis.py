"""The analysis of an LR-sensitivity study: pure functions over numbers and DataFrames.

- lr_sensitivity: Wortsman et al. (2023): mean over the LR grid of
  min(loss(eta), loss_0) - loss_star; a diverged run (NaN/inf) counts as loss_0.
- optimal_lr / refined_optimal_lr: the grid's best LR, and the vertex of a parabola
  through it and its two neighbours in log LR (the grid is a factor ~3 apart, too
  coarse on its own for a transfer fit).
- transfer_fit: log optimal LR against log width, predicted at a target width.
- logit_forecast: log max attention logit against log parameter count, quadratic as in
  the paper, extrapolated to a target size.
- study_tables: all of the above from the per-run DataFrame built by runs_from_manifest.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from orchestrator.common.stats import mean_interval
from orchestrator.proxy.config import run_key
from orchestrator.proxy.model import count_params
from orchestrator.proxy.run import model_config


def _clipped(losses: Iterable[float], loss_0: float) -> np.ndarray:
    """min(loss, loss_0), with NaN/inf (a diverged run) counted as loss_0."""
    arr = np.asarray(list(losses), dtype=float)
    return np.where(np.isfinite(arr), np.minimum(arr, loss_0), loss_0)


def lr_sensitivity(losses: Iterable[float], loss_0: float) -> float:
    """Mean over the grid of min(loss, loss_0) - loss_star; NaN if the grid is empty.

    loss_star is the best final loss on the grid (loss_0 when every run diverged, so a
    grid where nothing trains has sensitivity 0: read it with the diverged count)."""
    clipped = _clipped(losses, loss_0)
    if clipped.size == 0:
        return float("nan")
    return float(np.mean(clipped - clipped.min()))


def optimal_lr(lrs: Iterable[float], losses: Iterable[float]) -> tuple[float, float]:
    """(best LR, its loss); ties go to the smaller LR, the safer choice. NaN if all diverged."""
    pairs = sorted((lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss))
    if not pairs:
        return float("nan"), float("nan")
    best = min(pairs, key=lambda p: p[1])  # min keeps the first (smallest LR) of equal losses
    return best


def refined_optimal_lr(lrs: Iterable[float], losses: Iterable[float]) -> float:
    """Vertex of the parabola through the grid optimum and its neighbours, in log LR.

    Falls back to the grid optimum at an edge of the grid, next to a diverged run, or
    when the three points do not curve upwards."""
    pairs = sorted(zip(lrs, losses))
    best_lr, _ = optimal_lr([p[0] for p in pairs], [p[1] for p in pairs])
    if not math.isfinite(best_lr):
        return best_lr
    i = [p[0] for p in pairs].index(best_lr)
    if i == 0 or i == len(pairs) - 1:
        return best_lr
    x = np.log([pairs[i - 1][0], pairs[i][0], pairs[i + 1][0]])
    y = np.array([pairs[i - 1][1], pairs[i][1], pairs[i + 1][1]], dtype=float)
    if not np.all(np.isfinite(y)):
        return best_lr
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return best_lr
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))


def transfer_fit(widths: Iterable[float], best_lrs: Iterable[float], target_width: float) -> dict[str, float]:
    """Least squares log(lr*) = a + b log(width); slope b ~ 0 means the optimum transfers.

    Also the spread of the optimum across widths: std of log10(lr*) (0 = the same LR)."""
    pts = [(w, lr) for w, lr in zip(widths, best_lrs) if math.isfinite(lr) and lr > 0]
    out = {"widths_fitted": float(len(pts)), "slope": float("nan"), "intercept": float("nan"),
           "predicted_lr": float("nan"), "log10_lr_std": float("nan")}
    if not pts:
        return out
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    out["log10_lr_std"] = float(np.std(y / np.log(10)))
    if len(pts) == 1:
        out["predicted_lr"] = float(np.exp(y[0]))
        return out
    b, a = np.polyfit(x, y, 1)
    out.update(slope=float(b), intercept=float(a), predicted_lr=float(np.exp(a + b * math.log(target_width))))
    return out


def logit_forecast(params: Iterable[float], max_logits: Iterable[float], target_params: float) -> dict[str, float]:
    """Fit log10(max logit) as a polynomial in log10(params) and extrapolate.

    Quadratic with 4+ sizes, as in the paper; linear with 2-3 (a quadratic through 3
    points is an exact interpolation that extrapolates wildly); none with fewer."""
    pts = [(n, v) for n, v in zip(params, max_logits) if math.isfinite(v) and v > 0 and n > 0]
    out = {"sizes_fitted": float(len(pts)), "degree": float("nan"), "forecast": float("nan")}
    if len(pts) < 2:
        return out
    x, y = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
    degree = 2 if len(pts) >= 4 else 1
    coef = np.polyfit(x, y, degree)
    out.update(degree=float(degree), forecast=float(10 ** np.polyval(coef, math.log10(target_params))))
    return out


# -- tables ------------------------------------------------------------------------------

RUN_COLUMNS = ["id", "intervention", "width", "lr", "seed", "params", "init_loss", "final_loss", "diverged",
               "attn_logit_probe", "attn_logit_peak", "log_z_final", "status"]


def runs_from_manifest(manifest: pd.DataFrame, study: str, keys: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per proxy run of a study (the newest per grid point), from Pool.manifest().

    keys: intervention -> the settings digest its runs must carry (others are left out,
    so runs made with other settings never mix into the analysis)."""
    df = manifest[(manifest["kind"] == "proxy") & (manifest["sweep"] == study)] if len(manifest) else manifest
    if keys is not None and len(df):
        df = df[df["hparams"].map(lambda h: keys.get(h.get("intervention")) == h.get("study_key"))]
    if not len(df):
        return pd.DataFrame(columns=RUN_COLUMNS)
    hp = pd.DataFrame(list(df["hparams"]), index=df.index)[["intervention", "width", "lr", "seed"]]
    metrics = pd.DataFrame(list(df["metrics"]), index=df.index)
    runs = pd.concat([df[["id", "status", "created"]], hp, metrics], axis=1)
    for col in RUN_COLUMNS:
        if col not in runs:
            runs[col] = np.nan
    runs["diverged"] = runs["status"].eq("diverged")
    runs = runs.sort_values("created").drop_duplicates(["intervention", "width", "lr", "seed"], keep="last")
    return runs[RUN_COLUMNS].sort_values(["intervention", "width", "lr", "seed"], ignore_index=True)


def per_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (intervention, width, lr); a diverged seed counts as loss_0."""
    r = runs.copy()
    r["loss"] = np.where(r["diverged"] | ~np.isfinite(r["final_loss"].astype(float)), r["init_loss"], r["final_loss"])
    g = r.groupby(["intervention", "width", "lr"], sort=True)
    out = g.agg(loss=("loss", "mean"), init_loss=("init_loss", "mean"), params=("params", "first"),
                diverged=("diverged", "sum"), seeds=("seed", "count"),
                attn_logit_probe=("attn_logit_probe", "max"), attn_logit_peak=("attn_logit_peak", "max")).reset_index()
    # a point where every seed diverged is a diverged point (NaN), not a loss equal to loss_0
    out.loc[out["diverged"] == out["seeds"], "loss"] = np.nan
    return out


def per_seed_sensitivity(runs: pd.DataFrame) -> pd.DataFrame:
    """LR sensitivity of each seed's own grid per (intervention, width, seed): the spread
    behind the table's interval over seeds."""
    r = runs.copy()
    r["loss"] = np.where(r["diverged"], np.nan, r["final_loss"].astype(float))
    rows = [{"intervention": i, "width": w, "seed": s,
             "lr_sensitivity": lr_sensitivity(g["loss"], g["init_loss"].mean())}
            for (i, w, s), g in r.groupby(["intervention", "width", "seed"], sort=True)]
    return pd.DataFrame(rows, columns=["intervention", "width", "seed", "lr_sensitivity"])


def sensitivity_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (intervention, width): the issue's lr_sensitivity.csv. With several
    seeds, `lr_sensitivity_low` / `_high` are a 95% Student-t interval over the seeds' own
    sensitivities (NaN with one seed)."""
    rows = []
    seeds = per_seed_sensitivity(runs)
    for (intervention, width), g in per_lr(runs).groupby(["intervention", "width"], sort=True):
        loss_0 = float(g["init_loss"].mean())
        best_lr, best_loss = optimal_lr(g["lr"], g["loss"])
        spread = mean_interval(seeds[(seeds["intervention"] == intervention) & (seeds["width"] == width)]
                               ["lr_sensitivity"])
        rows.append({"intervention": intervention, "width": int(width), "params": int(g["params"].iloc[0]),
                     "lr_sensitivity": lr_sensitivity(g["loss"], loss_0), "seeds": int(g["seeds"].max()),
                     "lr_sensitivity_low": spread.low, "lr_sensitivity_high": spread.high, "optimal_lr": best_lr,
                     "optimal_lr_refined": refined_optimal_lr(g["lr"], g["loss"]), "best_loss": best_loss,
                     "init_loss": loss_0, "diverged_runs": int(g["diverged"].sum()), "runs": int(g["seeds"].sum()),
                     "max_attn_logit": float(g["attn_logit_peak"].max())})
    return pd.DataFrame(rows)


def transfer_table(table: pd.DataFrame, target_width: int) -> pd.DataFrame:
    rows = []
    for intervention, g in table.groupby("intervention", sort=True):
        fit = transfer_fit(g["width"], g["optimal_lr_refined"], target_width)
        rows.append({"intervention": intervention, "target_width": target_width, **fit})
    return pd.DataFrame(rows)


def forecast_table(runs: pd.DataFrame, target_params: float, threshold: float = 1e4) -> pd.DataFrame:
    """Per (intervention, lr): max attention logit at the probe step, fitted against
    parameter count and forecast at the target size; flagged above `threshold`."""
    rows = []
    for (intervention, lr), g in per_lr(runs).groupby(["intervention", "lr"], sort=True):
        fit = logit_forecast(g["params"], g["attn_logit_probe"], target_params)
        rows.append({"intervention": intervention, "lr": lr, "target_params": int(target_params),
                     "largest_measured": float(g["attn_logit_probe"].max()), **fit,
                     "flag": bool(fit["forecast"] > threshold)})
    return pd.DataFrame(rows)


def study_tables(cfg: dict[str, Any], manifest: pd.DataFrame) -> dict[str, Any] | None:
    """Every table of a study, from the pool's manifest alone; None if the pool has no runs
    of this study on this grid with these settings."""
    grid = cfg["grid"]
    keys = {name: run_key(cfg, name) for name in grid["interventions"]}
    runs = runs_from_manifest(manifest[manifest["status"] != "failed"] if len(manifest) else manifest,
                              cfg["study"], keys)
    runs = runs[runs["width"].isin(grid["widths"]) & runs["lr"].isin(grid["lrs"]) & runs["seed"].isin(grid["seeds"])]
    if runs.empty:
        return None
    target_width = cfg["analysis"]["target_width"]
    target_params = count_params(model_config(cfg["settings"], target_width))
    table = sensitivity_table(runs)
    return {"runs": runs, "per_lr": per_lr(runs), "table": table,
            "transfer": transfer_table(table, target_width),
            "forecast": forecast_table(runs, target_params, cfg["analysis"]["logit_threshold"]),
            "target_width": target_width, "target_params": target_params,
            "expected_runs": len(grid["widths"]) * len(grid["lrs"]) * len(grid["interventions"]) * len(grid["seeds"])}
