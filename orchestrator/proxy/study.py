"""Small-proxy LR sensitivity: which learning rates can a large run afford, which
interventions make it robust, and where will it blow up?

    python -m orchestrator.lr_sensitivity                  # default preset, ~14 min on 2 cores
    python -m orchestrator.lr_sensitivity --preset quick   # about a minute
    python -m orchestrator.lr_sensitivity --preset legacy  # the old default: 150 steps, 5 interventions
    python -m orchestrator.lr_sensitivity --skip-train --target-width 4096   # re-analyse the pool
    python -m orchestrator.lr_sensitivity settings.steps=400 grid.widths='[64, 128]'

Steps: check every input (config, a preset overlays it, key=value overrides win; the
corpus; the pool; MLflow); set up the MLflow parent run; train (fan the proxy runs out
with Ray Tune over widths x LRs x interventions x seeds: each lands in the pool as
kind=proxy and in MLflow as a nested run); analyse (read the pool back: LR sensitivity,
optimal LRs, the LR-transfer fit and the attention-logit forecast); report (print the
tables, log CSVs and plots on the parent run).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from typing import Any

import pandas as pd

from orchestrator.common import tracking, tune
from orchestrator.common.cli import add_common_flags, route_library_output, run_main
from orchestrator.common.config import search_space, shipped_configs
from orchestrator.common.errors import Interrupted, Terminated, UserError
from orchestrator.common.pool import Pool, Row
from orchestrator.proxy.analysis import study_tables
from orchestrator.proxy.config import DEFAULT_CONFIG, load_config, run_key

CSVS = {"lr_sensitivity.csv": "table", "lr_transfer.csv": "transfer", "logit_forecast.csv": "forecast",
        "runs.csv": "runs", "loss_vs_lr.csv": "per_lr"}  # artifact -> table of study_tables
FORMATS = {"lr_sensitivity": "{:.3f}", "lr_sensitivity_low": "{:.3f}", "lr_sensitivity_high": "{:.3f}",
           "optimal_lr": "{:.0e}", "optimal_lr_refined": "{:.1e}", "best_loss": "{:.3f}",
           "init_loss": "{:.3f}", "max_attn_logit": "{:.3g}", "slope": "{:+.2f}", "intercept": "{:.2f}",
           "predicted_lr": "{:.1e}", "log10_lr_std": "{:.2f}", "largest_measured": "{:.3g}", "forecast": "{:.3g}",
           "lr": "{:g}"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m orchestrator.lr_sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"study YAML: a path, or a shipped config's name ({', '.join(shipped_configs('study'))}); "
                        f"default: {DEFAULT_CONFIG[:-5]}")
    p.add_argument("--preset", default="default",
                   help="a preset of the YAML: default, quick or legacy (the default before issue 14; "
                        "default: default)")
    add_common_flags(p, default_pool="pool")
    p.add_argument("--target-width", type=int, default=None,
                   help="width to extrapolate the optimal LR and the attention-logit forecast to "
                        "(analysis.target_width)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--skip-train", action="store_true", help="analyse the proxy runs already in the pool")
    mode.add_argument("--resume", action="store_true",
                      help="continue this study's newest interrupted Tune run under --storage (Tuner.restore); "
                           "without it, grid points the pool already holds are not run again either")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys and YAML values, "
                        "e.g. settings.steps=400 grid.seeds='[0, 1]'")
    return p.parse_intermixed_args(argv)  # key=value overrides may come before or after flags


class LRStudy:
    """One invocation of the study: each step hands its results to the next through the object."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.time()
        self.train_s = 0.0
        self.resume_path: str | None = None

    def check_inputs(self) -> None:
        """Every input is read and checked before anything is written."""
        args = self.args
        overrides = list(args.overrides)
        if args.target_width is not None:
            overrides.append(f"analysis.target_width={args.target_width}")
        self.cfg = load_config(args.config, args.preset, overrides)
        grid = self.cfg["grid"]
        self.n_runs = len(grid["widths"]) * len(grid["lrs"]) * len(grid["interventions"]) * len(grid["seeds"])
        self.data = None if args.skip_train else self.read_corpus()  # a bad corpus fails here
        if not args.skip_train:
            tune.check_address(args.address)
            tune.storage_fs(args.storage)
        if args.resume:
            self.resume_path = tune.latest_run(args.storage, self.cfg["study"])
            if self.resume_path is None:
                raise UserError(f"--resume: no run of study {self.cfg['study']!r} to restore under {args.storage}")
        self.uri = tracking.resolve_uri(args.tracking_uri)
        tracking.check_reachable(self.uri)
        self.pool = Pool(args.pool, create=not args.skip_train)
        self.experiment = tracking.experiment_id(self.uri, self.cfg["study"])  # fails fast if unreachable

    def read_corpus(self):
        from orchestrator.proxy.data import load_corpus

        data = load_corpus(**self.cfg["data"], min_bytes=self.cfg["settings"]["seq_len"] * 4)
        print(f"corpus: {data.source}, {data.documents} documents, {len(data.train) / 1e6:.1f} MB train, "
              f"{len(data.val) / 1e6:.1f} MB validation", flush=True)
        return data

    def setup(self) -> None:
        cfg, grid = self.cfg, self.cfg["grid"]
        self.run_name = tune.run_name(cfg["study"])
        self.parent = tracking.start_run(
            self.uri, self.experiment, self.run_name,
            tracking.run_tags("study", more={tracking.SWEEP: cfg["study"], tracking.POOL: self.pool.uri}),
            params={"pool": self.pool.uri, "skip_train": self.args.skip_train, "preset": self.args.preset,
                    "runs": self.n_runs, **{f"grid.{k}": v for k, v in grid.items()},
                    "target_width": cfg["analysis"]["target_width"]})
        tracking.log_dict(self.uri, self.parent, cfg, "config.yaml")  # reusable as --config

    def train(self) -> None:
        from ray import tune as ray_tune

        from orchestrator.common.trial_runs import TrialRuns
        from orchestrator.proxy.trial import ProxyContext, proxy_hparams, run_proxy_trial, trial_run_name

        cfg, grid = self.cfg, self.cfg["grid"]
        size = tune.connect(self.args.address, self.args.verbose)
        tracking.log_params(self.uri, self.parent, size)
        print(f"Ray: {size['ray_nodes']} node(s), {size['ray_cpus']:g} CPUs; running {self.n_runs} proxy runs",
              flush=True)
        ctx = ProxyContext(sweep=cfg["study"], pool_uri=self.pool.uri, cpus_per_trial=int(max(1, cfg["resources"].get("cpu", 1))),
                           study_keys={name: run_key(cfg, name) for name in cfg["interventions"]},
                           settings=cfg["settings"], interventions=cfg["interventions"],
                           checkpoint_every=cfg["checkpoint_every"], done=self.finished_runs())
        run = tune.TuneRun(name=self.run_name, storage=self.args.storage,
                           trainable=ray_tune.with_parameters(run_proxy_trial, ctx=ctx, data=self.data),
                           resources=dict(cfg["resources"]), max_failures=cfg["max_failures"], total=self.n_runs,
                           describe=describe_run, tune_loggers=self.args.tune_loggers,
                           # a diverged probe is a measurement, not a failure: its run ends FINISHED
                           trial_runs=TrialRuns(tracking.Destination(self.uri, self.experiment, self.parent),
                                                name=trial_run_name, params=lambda hp: proxy_hparams(ctx, hp),
                                                diverged_fails=False))
        space = search_space({"intervention": {"grid": grid["interventions"]}, "width": {"grid": grid["widths"]},
                              "lr": {"grid": grid["lrs"]}, "seed": {"grid": grid["seeds"]}})
        if self.resume_path:
            results = run.restore(self.resume_path)
        else:
            results = run.fit(space, tune.tune_options(max_concurrent_trials=cfg["max_concurrent_trials"] or None))
        if run.interrupted:  # Ctrl-C or SIGTERM: keep the finished runs, analyse nothing
            raise tune.interruption(run, results, self.n_runs, self.pool.uri, "orchestrator.lr_sensitivity",
                                    self.args.argv, "proxy runs")
        reused = sum(1 for r in results if (r.metrics or {}).get("reused"))
        if reused:
            print(f"reused {reused} of {len(results)} proxy runs from the pool (an earlier launch ran them with "
                  "the same settings)")
        for failed in tune.failed_trials(results):
            print(f"trial {failed.trial_id} failed after {cfg['max_failures']} retries: {failed.error}",
                  file=sys.stderr)
            self.pool.add(Row(id=failed.trial_id, kind="proxy", sweep=cfg["study"], task="proxy_lm", status="failed",
                              hparams={**failed.config, "study_key": ctx.study_keys[failed.config["intervention"]]}))
        self.train_s = time.time() - self.t0

    def finished_runs(self) -> dict[str, str]:
        """The grid points the pool already holds a finished (ok or diverged) run of, with these settings."""
        from orchestrator.proxy.trial import grid_point

        df = self.pool.manifest()
        if df.empty:
            return {}
        runs = df[(df["kind"] == "proxy") & (df["sweep"] == self.cfg["study"]) & (df["status"] != "failed")]
        return {grid_point(h["study_key"], h): i for i, h in zip(runs["id"], runs["hparams"]) if "study_key" in h}

    def analyse(self) -> None:
        self.results = study_tables(self.cfg, self.pool.manifest())
        if self.results is None:
            raise UserError(f"pool {self.pool.uri}: no proxy runs of study {self.cfg['study']!r} with these "
                            f"settings (run without --skip-train first)")

    def publish(self) -> None:
        """CSVs, plots and headline metrics on the parent run."""
        from orchestrator.proxy import plots

        results, uri, parent = self.results, self.uri, self.parent
        with tempfile.TemporaryDirectory() as tmp:
            for name, key in CSVS.items():
                results[key].to_csv(os.path.join(tmp, name), index=False)
                tracking.log_file(uri, parent, os.path.join(tmp, name))
            for plot in plots.all_plots(results, self.cfg["analysis"]["logit_threshold"], tmp, self.cfg["study"]):
                tracking.log_file(uri, parent, plot, "plots")
        metrics = {"runs": len(results["runs"]), "diverged_runs": int(results["runs"]["diverged"].sum()),
                   "wall_time_s": time.time() - self.t0}
        for r in results["table"].itertuples():
            metrics[_metric_name(f"lr_sensitivity/{r.intervention}/w{r.width}")] = r.lr_sensitivity
        tracking.log_metrics(uri, parent, {k: v for k, v in metrics.items() if pd.notna(v)})

    def report(self) -> None:
        cfg, results = self.cfg, self.results
        table, transfer, forecast = results["table"], results["transfer"], results["forecast"]
        threshold = cfg["analysis"]["logit_threshold"]
        one_seed = table["seeds"].max() < 2  # no interval over seeds to show
        shown = table.drop(columns=["seeds", "lr_sensitivity_low", "lr_sensitivity_high"] if one_seed else [])
        print(f"\nLR sensitivity (final validation loss; a diverged run counts as loss_0"
              f"{'' if one_seed else '; low/high: 95% t-interval over seeds'}):\n{_show(shown)}")
        for line in sensitivity_ratios(table):
            print(line)
        print(f"\nLR transfer: log optimal LR vs log width, predicted at width {results['target_width']}:\n"
              f"{_show(transfer.drop(columns=['target_width']))}")
        flagged = forecast[forecast["flag"]]
        print(f"\nMax attention logit at step {cfg['settings']['probe_step']} vs parameter count, forecast at "
              f"{results['target_params']:,} parameters (width {results['target_width']}); "
              f"{len(flagged)} (intervention, LR) pairs above {threshold:g}:\n"
              f"{_show(forecast.drop(columns=['target_params']))}")
        n, expected = len(results["runs"]), results["expected_runs"]
        print(f"\n{n}/{expected} runs analysed, {int(results['runs']['diverged'].sum())} diverged; "
              f"{'analysis only' if self.args.skip_train else f'trained in {self.train_s:.0f} s'}, "
              f"finished in {time.time() - self.t0:.0f} s")
        print(f"pool:   {self.pool.uri}  (python -m orchestrator.pool show --pool {self.pool.uri})")
        print(f"MLflow: {self.uri}, experiment {cfg['study']!r}, parent run {self.parent}")
        print(f"        artifacts: {', '.join(CSVS)}, plots/*.png")
        print(f"        browse with: mlflow ui --backend-store-uri {self.uri}")
        print(f"log:    {self.args.log_file}  (Ray's, Tune's and MLflow's own messages)")

    def run(self) -> int:
        self.check_inputs()
        self.setup()
        status = "FAILED"
        try:
            if not self.args.skip_train:
                self.train()
            self.analyse()
            self.publish()
            self.report()
            status = "FINISHED"
        except (Interrupted, KeyboardInterrupt, Terminated):
            status = "KILLED"
            raise
        finally:
            tracking.end_run(self.uri, self.parent, status)
        return 0


def describe_run(config: dict[str, Any], result: dict[str, Any]) -> str:
    """The progress line of a finished proxy run."""
    if result.get("diverged"):
        outcome = f"DIVERGED at step {result.get('steps_done', float('nan')):.0f}"
    else:
        outcome = f"val loss {result['final_loss']:.3f}" if "final_loss" in result else "no result"
    logit = f", max attn logit {result['attn_logit_peak']:.3g}" if "attn_logit_peak" in result else ""
    logit += " (reused from the pool)" if result.get("reused") else ""
    return (f"{config['intervention']:>20s} width {config['width']:<4d} lr {config['lr']:<7g} "
            f"seed {config['seed']}: {outcome}{logit}")


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", text)


def sensitivity_ratios(table: pd.DataFrame, reference: str = "baseline") -> list[str]:
    """Each intervention's LR sensitivity as a multiple of the reference's, per width."""
    base = table[table["intervention"] == reference].set_index("width")["lr_sensitivity"]
    lines = []
    for name, g in table[table["intervention"] != reference].groupby("intervention", sort=True):
        cells = [f"w{int(r.width)} {r.lr_sensitivity / base[r.width]:.2f}x" for r in g.itertuples()
                 if r.width in base and base[r.width] > 0]
        if cells:
            lines.append(f"{name} / {reference} LR sensitivity: {', '.join(cells)}")
    return lines


def _show(df: pd.DataFrame) -> str:
    return df.to_string(index=False, formatters={k: v.format for k, v in FORMATS.items() if k in df})


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that continues an interrupted run
    args.log_file = route_library_output(args.log_dir, "lr_sensitivity", args.verbose)
    return run_main(lambda: LRStudy(args).run(), args.debug)


if __name__ == "__main__":
    sys.exit(main())
