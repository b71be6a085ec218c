"""Small-proxy LR sensitivity: which learning rates can a large run afford, which
interventions make it robust, and where will it blow up?

    python -m orchestrator.lr_sensitivity                  # default preset, ~12 min on 2 cores
    python -m orchestrator.lr_sensitivity --preset quick   # about a minute
    python -m orchestrator.lr_sensitivity --skip-train --target-width 4096   # re-analyse the pool
    python -m orchestrator.lr_sensitivity settings.steps=400 grid.widths='[64, 128]'

Steps: load and validate the config (a preset overlays it, key=value overrides win);
read the corpus; fan the proxy runs out with Ray Tune over widths x LRs x interventions
x seeds (each lands in the pool as kind=proxy and in MLflow as a nested run); read the
pool back and compute LR sensitivity, optimal LRs, the LR-transfer fit and the
attention-logit forecast; print the table, log CSVs and plots on the parent run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any

import pandas as pd
import yaml

from orchestrator import tracking
from orchestrator.cli import add_common_flags, run_main
from orchestrator.config import merge, read_yaml, search_space
from orchestrator.common.errors import ConfigError, UserError
from orchestrator.pool import Pool
from orchestrator.proxy_trial import CHOICES, SETTINGS

log = logging.getLogger("orchestrator")

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "search_spaces", "proxy_lr.yaml")
DEFAULTS: dict[str, Any] = {
    "study": "proxy_lr",  # MLflow experiment and the pool's `sweep` column
    "data": {"source": "stdlib", "column": "text", "val_fraction": 0.1, "max_mb": 0.0},
    "settings": SETTINGS,
    "interventions": {"baseline": {}},  # name -> settings it changes
    "grid": {"widths": [32, 64, 128], "lrs": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
             "interventions": ["baseline"], "seeds": [0]},
    "analysis": {"target_width": 1024, "logit_threshold": 1e4},
    "resources": {"cpu": 1},
    "max_concurrent_trials": 0,
    "max_failures": 1,
    "checkpoint_every": 0,
    "presets": {},
}
FREE_FORM = ("resources", "presets")  # plus `interventions`, checked on its own (grid.interventions is a list)


# -- config ------------------------------------------------------------------------------


def load_config(path: str | None = None, preset: str = "default", overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML file, overlaid with a preset, then with key=value overrides; validated."""
    path = path or DEFAULT_CONFIG
    raw = read_yaml(path, overrides)
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict) or (preset != "default" and preset not in presets):
        known = ", ".join(sorted({"default", *presets})) if isinstance(presets, dict) else "default"
        raise ConfigError(f"{path}: presets: no preset {preset!r} (known: {known})")
    overlay = copy.deepcopy(presets.get(preset) or {})
    for item in overrides:  # the command line wins over the preset
        _drop(overlay, item.partition("=")[0].split("."))
    return validate(_overlay(raw, overlay, f"{path}: presets.{preset}"), path)


def _drop(tree: dict, keys: list[str]) -> None:
    for k in keys[:-1]:
        tree = tree.get(k) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(keys[-1], None)


def _overlay(base: dict, top: dict, where: str) -> dict:
    if not isinstance(top, dict):
        raise ConfigError(f"{where}: expected a mapping, got {top!r}")
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v, f"{where}.{k}") if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check(ok: bool, source: str, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {where}: {message}")


def check_settings(s: dict[str, Any], source: str, prefix: str) -> None:
    for key, choices in CHOICES.items():
        _check(s[key] in choices, source, prefix + key, f"must be one of {', '.join(choices)}, got {s[key]!r}")
    for key in ("depth", "head_dim", "batch_size", "steps", "log_every", "eval_batches", "base_width"):
        _check(s[key] >= 1, source, prefix + key, f"must be >= 1, got {s[key]}")
    _check(s["seq_len"] >= 2, source, prefix + "seq_len", f"must be >= 2, got {s['seq_len']}")
    for key in ("warmup_steps", "grad_clip", "weight_decay", "z_loss"):
        _check(s[key] >= 0, source, prefix + key, f"must be >= 0, got {s[key]}")
    _check(0 <= s["probe_step"] < s["steps"], source, prefix + "probe_step",
           f"must be in [0, steps={s['steps']}), got {s['probe_step']}")
    _check(0 <= s["lr_floor"] <= 1, source, prefix + "lr_floor", f"must be in [0, 1], got {s['lr_floor']}")
    for key in ("beta1", "beta2"):
        _check(0 <= s[key] < 1, source, prefix + key, f"must be in [0, 1), got {s[key]}")
    _check(s["eps"] > 0, source, prefix + "eps", f"must be > 0, got {s['eps']}")
    _check(s["diverge_factor"] > 1, source, prefix + "diverge_factor", f"must be > 1, got {s['diverge_factor']}")


def validate(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    raw = dict(raw)
    interventions = raw.pop("interventions", DEFAULTS["interventions"])
    cfg = merge(DEFAULTS, raw, source, free_form=FREE_FORM)
    check_settings(cfg["settings"], source, "settings.")
    _check(isinstance(interventions, dict) and interventions, source, "interventions",
           "expected a mapping of intervention name -> settings it changes")
    cfg["interventions"] = {}
    for name, change in interventions.items():
        merged = merge(cfg["settings"], change or {}, source, f"interventions.{name}.")
        check_settings(merged, source, f"interventions.{name}.")
        cfg["interventions"][str(name)] = change or {}
    grid = cfg["grid"]
    for key in ("widths", "lrs", "interventions", "seeds"):
        _check(len(grid[key]) > 0, source, f"grid.{key}", "must list at least one value")
    for w in grid["widths"]:
        _check(isinstance(w, int) and not isinstance(w, bool) and w > 0, source, "grid.widths",
               f"each width must be a positive integer, got {w!r}")
    for lr in grid["lrs"]:
        _check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, source, "grid.lrs",
               f"each LR must be a number > 0, got {lr!r}")
    grid["lrs"] = [float(lr) for lr in grid["lrs"]]
    for seed in grid["seeds"]:
        _check(isinstance(seed, int) and not isinstance(seed, bool), source, "grid.seeds",
               f"each seed must be an integer, got {seed!r}")
    for name in grid["interventions"]:
        _check(name in cfg["interventions"], source, "grid.interventions",
               f"unknown intervention {name!r} (defined: {', '.join(cfg['interventions'])})")
        head_dim = {**cfg["settings"], **cfg["interventions"][name]}["head_dim"]
        for w in grid["widths"]:
            _check(w % head_dim == 0, source, "grid.widths",
                   f"width {w} is not a multiple of head_dim {head_dim} ({name})")
    target, head_dim = cfg["analysis"]["target_width"], cfg["settings"]["head_dim"]
    _check(target >= 1 and target % head_dim == 0, source, "analysis.target_width",
           f"must be a positive multiple of settings.head_dim={head_dim}, got {target}")
    _check(0 < cfg["data"]["val_fraction"] < 1, source, "data.val_fraction", "must be in (0, 1)")
    _check(cfg["max_failures"] >= 0, source, "max_failures", "must be >= 0")
    _check(cfg["checkpoint_every"] >= 0, source, "checkpoint_every", "must be >= 0")
    for key, value in cfg["resources"].items():
        _check(isinstance(value, (int, float)) and value >= 0, source, f"resources.{key}",
               f"must be >= 0, got {value!r}")
    cfg.pop("presets")
    return cfg


def run_settings(cfg: dict[str, Any], intervention: str) -> dict[str, Any]:
    return {**cfg["settings"], **cfg["interventions"][intervention]}


def run_key(cfg: dict[str, Any], intervention: str) -> str:
    """What a run's result depends on besides its grid point: the analysis mixes only equal keys."""
    return Pool.digest(run_settings(cfg, intervention), cfg["data"])


# -- command -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.lr_sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="study YAML (default: search_spaces/proxy_lr.yaml)")
    p.add_argument("--preset", default="default", help="a preset of the YAML: default or quick (default: default)")
    add_common_flags(p, default_pool="pool")
    p.add_argument("--target-width", type=int, default=None,
                   help="width to extrapolate the optimal LR and the attention-logit forecast to "
                        "(analysis.target_width)")
    p.add_argument("--skip-train", action="store_true", help="analyse the proxy runs already in the pool")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys and YAML values, "
                        "e.g. settings.steps=400 grid.seeds='[0, 1]'")
    return p.parse_args(argv)


def study(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.target_width is not None:
        overrides.append(f"analysis.target_width={args.target_width}")
    cfg = load_config(args.config, args.preset, overrides)
    data = None if args.skip_train else read_corpus(cfg)  # a bad corpus fails before anything is created
    pool = Pool(args.pool, create=not args.skip_train)
    uri = tracking.resolve_uri(args.tracking_uri)
    exp = tracking.experiment_id(uri, cfg["study"])  # fails fast on an unreachable store
    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    t0 = time.time()
    grid = cfg["grid"]
    n_runs = len(grid["widths"]) * len(grid["lrs"]) * len(grid["interventions"]) * len(grid["seeds"])

    parent = tracking.start_run(uri, exp, f"{cfg['study']}-{started}", "study",
                                tags={tracking.SWEEP: cfg["study"], "orchestrator.pool": pool.uri},
                                params={"pool": pool.uri, "skip_train": args.skip_train, "preset": args.preset,
                                        "runs": n_runs, **{f"grid.{k}": v for k, v in grid.items()},
                                        "target_width": cfg["analysis"]["target_width"]})
    tracking.log_dict(uri, parent, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    status = "FAILED"
    try:
        if not args.skip_train:
            train(args, cfg, data, pool, uri, exp, parent, started, n_runs)
        train_s = time.time() - t0
        results = analyse(cfg, pool)
        report(cfg, results, pool, uri, parent, train_s, time.time() - t0, args.skip_train)
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status)
    return 0


def read_corpus(cfg: dict[str, Any]):
    from orchestrator.proxy_data import load_corpus

    data = load_corpus(**cfg["data"], min_bytes=cfg["settings"]["seq_len"] * 4)
    print(f"corpus: {data.source}, {data.documents} documents, {len(data.train) / 1e6:.1f} MB train, "
          f"{len(data.val) / 1e6:.1f} MB validation", flush=True)
    return data


def train(args, cfg, data, pool: Pool, uri: str, exp: str, parent: str, started: str, n_runs: int) -> None:
    from ray import tune

    from orchestrator import fanout
    from orchestrator.proxy_trial import ProxyContext, run_proxy_trial

    size = fanout.connect(args.address)
    tracking.log_params(uri, parent, size)
    print(f"Ray: {size['ray_nodes']} node(s), {size['ray_cpus']:g} CPUs; running {n_runs} proxy runs", flush=True)
    grid = cfg["grid"]
    ctx = ProxyContext(study=cfg["study"], study_keys={name: run_key(cfg, name) for name in cfg["interventions"]},
                       settings=cfg["settings"], interventions=cfg["interventions"],
                       pool_uri=pool.uri,  # absolute (Pool resolves local paths): each trial runs in its own folder
                       tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                       cpus_per_trial=int(max(1, cfg["resources"].get("cpu", 1))),
                       checkpoint_every=cfg["checkpoint_every"])
    # one checkpoint per finished run is the design here, not a bottleneck worth a warning per trial
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage_fs, storage_root = fanout.storage_fs(args.storage)
    space = search_space({"intervention": {"grid": grid["interventions"]}, "width": {"grid": grid["widths"]},
                          "lr": {"grid": grid["lrs"]}, "seed": {"grid": grid["seeds"]}})
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_proxy_trial, ctx=ctx, data=data), dict(cfg["resources"])),
        param_space=space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=cfg["max_concurrent_trials"] or None,
            reuse_actors=True,  # ~0.5 s instead of ~2 s to start each trial
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=f"{cfg['study']}-{started}",
            storage_path=storage_root,
            storage_filesystem=storage_fs,  # a folder or any pyarrow URI, as in soup_sweep
            failure_config=tune.FailureConfig(max_failures=cfg["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[progress_callback(n_runs)],
            verbose=0,
        ),
    )
    results = tuner.fit()
    for r in results:
        if r.error is not None:
            trial_id = os.path.basename(r.path.rstrip("/"))
            print(f"trial {trial_id} failed after {cfg['max_failures']} retries: "
                  f"{str(r.error).strip().splitlines()[-1][:300]}", file=sys.stderr)
            pool.add({"id": trial_id, "kind": "proxy", "sweep": cfg["study"], "task": "proxy_lm", "status": "failed",
                      "hparams": {**r.config, "study_key": ctx.study_keys[r.config["intervention"]]}, "metrics": {}})


def progress_callback(total: int):
    """A Tune callback that prints one line per finished proxy run, instead of Tune's tables."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.done, self.t0 = 0, time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            c, r = trial.config, trial.last_result or {}
            if r.get("diverged"):
                outcome = f"DIVERGED at step {r.get('steps_done', float('nan')):.0f}"
            else:
                outcome = f"val loss {r['final_loss']:.3f}" if "final_loss" in r else "no result"
            logit = f", max attn logit {r['attn_logit_peak']:.3g}" if "attn_logit_peak" in r else ""
            print(f"[{self.done}/{total} {time.time() - self.t0:4.0f}s] {c['intervention']:>20s} "
                  f"width {c['width']:<4d} "
                  f"lr {c['lr']:<7g} seed {c['seed']}: {outcome}{logit}", flush=True)

    return Progress()


# -- analysis and report -----------------------------------------------------------------


def analyse(cfg: dict[str, Any], pool: Pool) -> dict[str, Any]:
    """Every table of the study, from the pool alone."""
    from orchestrator import sensitivity as sens
    from orchestrator.proxy_model import count_params
    from orchestrator.proxy_trial import model_config

    grid = cfg["grid"]
    keys = {name: run_key(cfg, name) for name in grid["interventions"]}
    manifest = pool.manifest()
    runs = sens.runs_from_manifest(manifest[manifest["status"] != "failed"] if len(manifest) else manifest,
                                   cfg["study"], keys)
    runs = runs[runs["width"].isin(grid["widths"]) & runs["lr"].isin(grid["lrs"]) & runs["seed"].isin(grid["seeds"])]
    if runs.empty:
        raise UserError(f"pool {pool.uri}: no proxy runs of study {cfg['study']!r} with these settings "
                        f"(run without --skip-train first)")
    target_width = cfg["analysis"]["target_width"]
    target_params = count_params(model_config(cfg["settings"], target_width))
    table = sens.sensitivity_table(runs)
    return {"runs": runs, "per_lr": sens.per_lr(runs), "table": table,
            "transfer": sens.transfer_table(table, target_width),
            "forecast": sens.forecast_table(runs, target_params, cfg["analysis"]["logit_threshold"]),
            "target_width": target_width, "target_params": target_params,
            "expected_runs": len(grid["widths"]) * len(grid["lrs"]) * len(grid["interventions"]) * len(grid["seeds"])}


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", text)


def report(cfg, results: dict[str, Any], pool: Pool, uri: str, parent: str, train_s: float, total_s: float,
           skip_train: bool) -> None:
    from orchestrator import proxy_plots

    table, transfer, forecast = results["table"], results["transfer"], results["forecast"]
    threshold = cfg["analysis"]["logit_threshold"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, df in (("lr_sensitivity.csv", table), ("lr_transfer.csv", transfer),
                         ("logit_forecast.csv", forecast), ("runs.csv", results["runs"]),
                         ("loss_vs_lr.csv", results["per_lr"])):
            df.to_csv(os.path.join(tmp, name), index=False)
            tracking.log_file(uri, parent, os.path.join(tmp, name))
        for plot in proxy_plots.all_plots(results, threshold, tmp, cfg["study"]):
            tracking.log_file(uri, parent, plot, "plots")
    metrics = {"runs": len(results["runs"]), "diverged_runs": int(results["runs"]["diverged"].sum()),
               "wall_time_s": total_s}
    for r in table.itertuples():
        metrics[_metric_name(f"lr_sensitivity/{r.intervention}/w{r.width}")] = r.lr_sensitivity
    tracking.log_metrics(uri, parent, {k: v for k, v in metrics.items() if pd.notna(v)})

    fmt = {"lr_sensitivity": "{:.3f}", "optimal_lr": "{:.0e}", "optimal_lr_refined": "{:.1e}", "best_loss": "{:.3f}",
           "init_loss": "{:.3f}", "max_attn_logit": "{:.3g}", "slope": "{:+.2f}", "intercept": "{:.2f}",
           "predicted_lr": "{:.1e}", "log10_lr_std": "{:.2f}", "largest_measured": "{:.3g}", "forecast": "{:.3g}",
           "lr": "{:g}"}

    def show(df: pd.DataFrame) -> str:
        return df.to_string(index=False, formatters={k: v.format for k, v in fmt.items() if k in df})

    print(f"\nLR sensitivity (final validation loss; a diverged run counts as loss_0):\n{show(table)}")
    print(f"\nLR transfer: log optimal LR vs log width, predicted at width {results['target_width']}:\n"
          f"{show(transfer.drop(columns=['target_width']))}")
    flagged = forecast[forecast["flag"]]
    print(f"\nMax attention logit at step {cfg['settings']['probe_step']} vs parameter count, forecast at "
          f"{results['target_params']:,} parameters (width {results['target_width']}); "
          f"{len(flagged)} (intervention, LR) pairs above {threshold:g}:\n"
          f"{show(forecast.drop(columns=['target_params']))}")
    n, expected = len(results["runs"]), results["expected_runs"]
    print(f"\n{n}/{expected} runs analysed, {int(results['runs']['diverged'].sum())} diverged; "
          f"{'analysis only' if skip_train else f'trained in {train_s:.0f} s'}, finished in {total_s:.0f} s")
    print(f"pool:   {pool.uri}  (python -m orchestrator.pool show --pool {pool.uri})")
    print(f"MLflow: {uri}, experiment {cfg['study']!r}, parent run {parent}")
    print("        artifacts: lr_sensitivity.csv, lr_transfer.csv, logit_forecast.csv, runs.csv, loss_vs_lr.csv, "
          "plots/*.png")
    print(f"        browse with: mlflow ui --backend-store-uri {uri}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    return run_main(lambda: study(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
