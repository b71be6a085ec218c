"""Fine-tune one pretrained model many times with Ray Tune, then cook model soups.

    python -m orchestrator.soup_sweep                     # the embedded default, local Ray
    python -m orchestrator.soup_sweep --num-samples 32 soup.greedy_accept='>'
    python -m orchestrator.soup_sweep --skip-train        # re-cook soups from the pool
    python -m orchestrator.soup_sweep --resume            # continue after the driver was killed
    python -m orchestrator.soup_sweep --config minilm_text_example   # a real model (a shipped config)
    python -m orchestrator.soup_sweep soup.recipes='[uniform_soup, greedy_soup]'   # only some recipes

Steps: check every input (config, data, MLflow, Ray address, storage, pool); set up
(the pretrained weights, cached in the pool; the MLflow parent run); train (fan the trials
out with Ray Tune: each lands in the pool and in MLflow); cook the recipes from the pool;
publish the dishes to the pool and MLflow; report (plot and summary).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from orchestrator.common import tracking, tune
from orchestrator.common.cli import add_common_flags, route_library_output, run_main
from orchestrator.common.config import search_space, shipped_configs
from orchestrator.common.errors import Interrupted, PoolError, Terminated, UserError
from orchestrator.common.pool import Pool, Row
from orchestrator.common.weights import digest
from orchestrator.soup.config import DEFAULT_CONFIG, load_config, make_task
from orchestrator.soup.cooking import KitchenSpec, Progress, cook_on_ray, room, watch
from orchestrator.soup.kitchen import Kitchen, check_cookable
from orchestrator.soup.pretrained import ensure_pretrained
from orchestrator.soup import cooked
from orchestrator.soup.publish import Publisher, ingredient_id, parent_metrics
from orchestrator.soup.recipes import RECIPES, cook, default_recipes, ordered, unavailable
from orchestrator.soup.tasks.base import View, original
from orchestrator.soup.summary import interval_metrics, summary_markdown, summary_table
from orchestrator.soup.train import HPARAMS, metric_sets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m orchestrator.soup_sweep", description=__doc__, epilog=_recipes_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"search-space YAML: a path, or a shipped config's name ({', '.join(shipped_configs('sweep'))}); "
                        f"default: {DEFAULT_CONFIG[:-5]}")
    p.add_argument("--num-samples", type=int, default=None, help="number of fine-tuning trials (overrides num_samples)")
    p.add_argument("--preset", default="default", help="a preset of the YAML's `presets:` (default: the file as it is)")
    add_common_flags(p, default_pool="pool")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--skip-train", action="store_true", help="cook and evaluate soups from the existing pool only")
    p.add_argument("--retrain", action="store_true",
                   help="train every trial, even those the pool already holds from an earlier run of this sweep "
                        "(same start point, data and hyperparameters, seed included), which are reused by default")
    mode.add_argument("--resume", action="store_true",
                      help="continue this sweep's newest interrupted Tune run under --storage (Tuner.restore): "
                           "finished trials are kept, unfinished ones resume from their last epoch checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys and YAML values, e.g. task.width=48 soup.greedy_accept='>'")
    return p.parse_intermixed_args(argv)  # key=value overrides may come before or after flags


def _recipes_help() -> str:
    lines = ["recipes (soup.recipes; each one's settings are keys under soup:):"]
    for name in default_recipes():
        r = RECIPES[name]
        params = ", ".join(f"soup.{p.name} ({p.type.__name__}, default {p.default!r})" for p in r.params)
        needs = f"; needs {', '.join(r.needs)}" if r.needs else ""
        lines.append(f"  {name:16s} {r.label}{needs}{'; ' + params if params else ''}")
    return "\n".join(lines)


class SoupSweep:
    """One invocation of the sweep: each step hands its results to the next through the object."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.time()
        self.resume_path: str | None = None
        self.kitchen: Kitchen | None = None
        self.dishes = []
        self.reused: dict[str, list] = {}  # recipe -> its dishes kept by an earlier cook: (dish, run id, weights id)
        self.keys: dict[str, str] = {}  # recipe -> its cook key (soup/cooked.py)
        self.data_map = None
        self.seconds: dict[str, float] = {}  # phase -> wall seconds
        self.shortfall = ""  # why fewer trials finished than asked for (not the scheduler), if they did
        self.where = {"setup": "driver: pretrained weights (cached in the pool), MLflow parent run",
                      "publish": "driver: soups into the pool, their MLflow runs and models",
                      "report": "driver: tables, plots and the data map on the parent run"}

    def check_inputs(self) -> None:
        """Every input is read and checked before anything is written."""
        args = self.args
        overrides = list(args.overrides) + ([f"num_samples={args.num_samples}"] if args.num_samples is not None else [])
        self.cfg = load_config(args.config, overrides, args.preset)
        self.task = make_task(self.cfg)
        self.data = self.task.training_data()  # the user's files are read and checked here
        self.uri = tracking.resolve_uri(args.tracking_uri)
        tracking.check_reachable(self.uri)
        if not args.skip_train or self.cfg["cook"]["workers"]:
            tune.check_address(args.address)
            tune.storage_fs(args.storage)  # a malformed storage URI is an input error too
        if args.resume:
            self.resume_path = tune.latest_run(args.storage, self.cfg["sweep"])
            if self.resume_path is None:
                raise UserError(f"--resume: no run of sweep {self.cfg['sweep']!r} to restore under {args.storage}")
        # a data_selection reads the pool: it must be there already
        self.pool = Pool(args.pool, create=not args.skip_train and not self.cfg["data_selection"]["from_sweep"])
        if args.skip_train and not self.pool.has(self.task.pretrained_id()):
            raise PoolError(f"{self.pool.uri}: no pretrained weights for task {self.task.name} "
                            f"({self.task.pretrained_id()}), so nothing to cook from; "
                            "run a sweep without --skip-train first")
        self.all_train, self.data_key, self.selection = select_training(self.cfg, self.task, self.data, self.pool)
        self.recipes = ordered(self.cfg["soup"]["recipes"])
        if args.skip_train:  # a pool with nothing to cook is an error before MLflow is touched
            check_cookable(self.make_kitchen())
            self.check_recipes(self.kitchen)

    def check_recipes(self, kitchen: Kitchen) -> None:
        """Recipes that cannot cook from this pool (e.g. fisher without Fisher estimates): an error
        when soup.recipes names them, left out with one line when they came with the default list."""
        asked = self.cfg["soup"]["recipes"]
        for name, why in unavailable(kitchen, self.recipes).items():
            if asked != default_recipes():
                raise UserError(f"soup.recipes: {name} cannot cook from {self.pool.uri}: {why}")
            print(f"not cooking {name}: {why}")
            self.recipes.remove(name)

    def setup(self) -> None:
        """The shared starting weights, and the sweep's MLflow parent run."""
        cfg, args = self.cfg, self.args
        made = not self.pool.has(self.task.pretrained_id())
        self.where["setup"] = (f"driver: pretrained weights ({'made now, ' if made else ''}cached in the pool), "
                               "MLflow parent run")
        self.pretrained = (self.pool.get(self.task.pretrained_id()) if args.skip_train
                           # the start point never sees label noise or a selection: its key does not know them
                           else ensure_pretrained(self.pool, self.task, replace(self.data, train=original(self.data.train)),
                                                  cfg["sweep"]))
        self.experiment = tracking.experiment_id(self.uri, cfg["sweep"])
        self.run_name = tune.run_name(cfg["sweep"])
        self.parent = tracking.start_run(
            self.uri, self.experiment, self.run_name,
            tracking.run_tags("sweep", more={tracking.SWEEP: cfg["sweep"], tracking.POOL: self.pool.uri}),
            params={"pool": self.pool.uri, "skip_train": args.skip_train, "resumed": self.resume_path or "",
                    "task": self.task.name, "num_samples": cfg["num_samples"], "pretrained_id": self.pretrained["id"]})
        tracking.log_dict(self.uri, self.parent, self.cfg, "config.yaml")  # reusable as --config
        tracking.log_datasets(self.uri, self.parent, self.datasets())
        if self.selection:  # the chosen example ids, with the sweep in the pool and in MLflow
            self.pool.add(Row(id=f"selection-{cfg['sweep']}-{self.data_key[:16]}", kind="selection",
                              sweep=cfg["sweep"], task=self.task.name, status="ok", hparams=self.selection,
                              data_key=self.data_key))
            tracking.log_dict(self.uri, self.parent, self.selection, "data_selection.json")
            tracking.log_params(self.uri, self.parent, {f"data_selection.{k}": v for k, v in self.selection.items()
                                                        if k != "ids"})

    def datasets(self) -> list[dict]:
        """The training data and every eval set, as MLflow dataset inputs, fingerprinted by the
        data key (the training examples, their labels and the held-out split)."""
        task, data, key = self.task.name, self.data, self.data_key
        train = {"name": f"{task}/train", "digest": key, "context": "training",
                 "source": {"task": task, "settings": self.cfg["task"]}, "profile": {"examples": len(data.train)}}
        evals = [{"name": f"{task}/{name}", "digest": digest(key, name), "context": "evaluation",
                  "source": {"task": task, "eval_set": name}, "profile": {"examples": len(examples)}}
                 for name, examples in data.evals.items()]
        return [train, *evals]

    def train(self) -> None:
        """Fan the trials out with Ray Tune; each one publishes itself to the pool, and the
        driver logs what it reports to MLflow as it goes."""
        from ray import tune as ray_tune
        from orchestrator.common.trial_runs import TrialRuns
        from orchestrator.soup.trial import SweepContext, publish_stopped, run_trial, stopped_early

        cfg, args = self.cfg, self.args
        size = tune.connect(args.address, args.verbose)
        tracking.log_params(self.uri, self.parent, size)
        res = cfg["resources"]
        self.where["train"] = (f"Ray Tune: {cfg['num_samples']} trials on {size['ray_nodes']} node(s) "
                               f"({size['ray_cpus']:g} CPUs, {size['ray_gpus']:g} GPUs), {res['workers']} worker(s) of "
                               f"{res['cpu']:g} CPU, {res['gpu']:g} GPU per trial")
        print(f"Ray: {size['ray_nodes']} node(s), {size['ray_cpus']:g} CPUs, {size['ray_gpus']:g} GPUs; "
              + (f"resuming {self.resume_path}" if self.resume_path else f"running {cfg['num_samples']} trials"),
              flush=True)
        ctx = SweepContext(sweep=cfg["sweep"], pool_uri=self.pool.uri, cpus_per_trial=int(max(1, res["cpu"])),
                           task_name=self.task.name,
                           task_settings=self.task.model_settings(), pretrained_id=self.pretrained["id"],
                           data_key=self.data_key, reusable={} if args.retrain else self.reusable_trials(),
                           precision=cfg["precision"], resources=dict(res), storage=args.storage,
                           fisher_examples=cfg["soup"]["fisher_examples"] if "fisher" in self.recipes else 0,
                           record_dynamics=cfg["record_dynamics"])
        run = tune.TuneRun(
            name=self.run_name, storage=args.storage,
            trainable=ray_tune.with_parameters(run_trial, ctx=ctx, data=self.data),
            # a data-parallel trial only waits on its Ray Train workers, which ask for the resources
            resources={"cpu": res["cpu"], "gpu": res["gpu"]} if res["workers"] == 1 else {"cpu": 0.01},
            max_failures=cfg["max_failures"], total=cfg["num_samples"], describe=describe_trial,
            trial_runs=TrialRuns(tracking.Destination(self.uri, self.experiment, self.parent),
                                 name=lambda trial_id, config: f"trial-{trial_id}",
                                 params=lambda config: {**HPARAMS, **config}, datasets=self.datasets()[:1]),
            tune_loggers=args.tune_loggers)
        if self.resume_path:
            self.results = run.restore(self.resume_path)
        else:
            search = cfg["search"]
            self.results = run.fit(search_space(cfg["hyperparameters"]), tune.tune_options(
                metric="val_acc", mode="max", num_samples=cfg["num_samples"],
                search_alg=tune.search_algorithm(search["algorithm"], cfg["search_seed"],
                                                 cfg["max_concurrent_trials"]),
                scheduler=tune.scheduler(search, "epoch", most_epochs(cfg["hyperparameters"]))))
        if run.interrupted:  # Ctrl-C or SIGTERM: keep what finished, cook and register nothing
            raise tune.interruption(run, self.results, cfg["num_samples"], self.pool.uri, "orchestrator.soup_sweep",
                                    args.argv)
        stopped = [r for r in self.results if stopped_early(r)]
        for result in stopped:  # the scheduler stopped them mid-loop, before they wrote their row
            publish_stopped(result, ctx)
        if stopped:
            print(f"{cfg['search']['scheduler'].upper()} stopped {len(stopped)} of {len(self.results)} trials early "
                  f"(in the pool with status stopped; soup ingredients only with soup.stopped_ingredients: true)")
        reused = sum(1 for r in self.results if (r.metrics or {}).get("reused"))
        if reused:
            print(f"reused {reused} of {len(self.results)} trials from the pool (an earlier run of this sweep "
                  "trained them: same start point, data and hyperparameters); --retrain trains them again")
        for failed in tune.failed_trials(self.results):
            print(f"trial {failed.trial_id} failed after {cfg['max_failures']} retries: {failed.error}",
                  file=sys.stderr)
            self.pool.add(Row(id=failed.trial_id, kind="trial", sweep=cfg["sweep"], task=self.task.name,
                              status="failed", parents=[self.pretrained["id"]], data_key=self.data_key))
        finished = sum(1 for r in self.results if (r.metrics or {}).get("ingredient_id"))
        failed = len(tune.failed_trials(self.results))
        if finished + len(stopped) < cfg["num_samples"]:
            self.shortfall = (f"{finished + len(stopped)} of {cfg['num_samples']} trials finished"
                              + (f" ({failed} failed after {cfg['max_failures']} retries)" if failed else ""))
        added, _ = tracking.replay_pool(self.pool, self.uri, sweep=cfg["sweep"], parent=self.parent)
        if added:  # e.g. the tracking server was away for a while: the pool has every trial
            print(f"MLflow: logged {added} trial(s) from the pool that MLflow missed while they ran")

    def reusable_trials(self) -> dict[str, str]:
        """This sweep's finished trials in the pool, by definition (start point, data, hyperparameters)."""
        from orchestrator.soup.trial import trial_definition

        return {trial_definition(self.pretrained["id"], self.data_key, r["hparams"]): r["id"]
                for r in self.trial_rows(("ok",))}

    def trial_rows(self, statuses: tuple[str, ...]) -> list[dict]:
        """This sweep's trials in the pool, from this start point on this training data."""
        df = self.pool.manifest()
        if df.empty:
            return []
        start, key = self.pretrained["id"], self.data_key
        mine = df[(df["kind"] == "trial") & df["status"].isin(statuses) & (df["sweep"] == self.cfg["sweep"])]
        return [r for r in mine.to_dict("records")
                if len(r["parents"]) and r["parents"][0] == start and r.get("data_key") == key]

    def make_kitchen(self) -> Kitchen:
        self.kitchen = Kitchen(self.pool, self.task, self.data, sweep=self.cfg["sweep"], settings=self.kitchen_settings(),
                               keys=(self.task.pretrained_id(), self.data_key))
        return self.kitchen

    def cook(self) -> None:
        asked = self.cfg["soup"]["recipes"]
        if not self.kitchen:  # made after training: it reads the pool's trials
            self.check_recipes(self.make_kitchen())
        kitchen, names = self.kitchen, self.recipes
        check_cookable(kitchen)  # nothing usable (every trial diverged, say): an error, before any worker starts
        pulled = [n for n in names if n not in asked]
        if pulled:
            print(f"soup.recipes: also cooking {', '.join(pulled)} (needed by "
                  f"{', '.join(n for n in asked if set(RECIPES[n].needs) & set(pulled))})")
        self.keys = cooked.cook_keys(kitchen, names, self.cfg["soup"], self.kitchen_settings())
        self.reused = {n: found for n in names if (found := cooked.load(self.pool, self.cfg["sweep"], n, self.keys[n]))}
        fresh = [n for n in names if n not in self.reused]
        if self.reused:
            print(f"reused the dishes of {len(self.reused)} of {len(names)} recipes from the pool (cooked before from "
                  f"the same ingredients, settings and code): {', '.join(self.reused)}", flush=True)
        ready = {n: [dish for dish, _, _ in found] for n, found in self.reused.items()}
        for name in {need for n in fresh for need in RECIPES[n].needs if need in self.reused}:
            for dish, _, weights in self.reused[name]:  # what a recipe to cook reads of the one it needs
                dish.weights = self.pool.load(weights) if weights else None
        if not fresh:
            self.where["cook"] = "nothing cooked: every recipe's dishes reused from the pool"
        made = self.cook_fresh(fresh, ready) if fresh else []
        self.dishes = [d for n in ordered(names) for d in (ready[n] if n in ready else made) if d.recipe == n]

    def cook_fresh(self, names: list[str], ready: dict[str, list]) -> list:
        """Cook the recipes no earlier cook left in the pool, the reused ones given as ready."""
        kitchen = self.kitchen
        where = self.where["cook"] = self.cook_where()
        print(f"cooking {len(names)} recipes from the pool {where} ...", flush=True)
        t_cook, count = time.time(), iter(range(1, len(names) + 1))
        progress = Progress(len(names))

        def done(name: str, dishes: list, seconds: float, actors: int = 1) -> None:
            spread = f" of work on {actors} workers" if actors > 1 else ""  # a recipe's evaluations, spread out
            progress.recipe(f"  [{next(count)}/{len(names)} {time.time() - t_cook:4.0f}s] {name}: "
                            f"{len(dishes)} dish{'es' if len(dishes) != 1 else ''} in {seconds:.1f} s{spread}")

        spec = self.cfg["cook"]
        if spec["workers"] == 0:
            torch.set_num_threads(self.cook_threads())  # as in a worker: the same arithmetic
            stop = watch(kitchen, progress)
            try:
                made = cook(kitchen, names, self.cfg["soup"], done, ready={n: d[0] for n, d in ready.items()})
            finally:
                stop()
        else:
            try:
                made = cook_on_ray(self.kitchen_spec(), self.data, names, self.cfg["soup"], spec["workers"],
                                   spec["resources"], done, progress.update, ready=ready)
            finally:
                progress.close()
        print(f"cooked {len(made)} dishes in {time.time() - t_cook:.1f} s", flush=True)
        return made

    def cook_where(self) -> str:
        spec = self.cfg["cook"]
        if spec["workers"] == 0:
            return f"in the driver ({self.kitchen.device.type})"
        size = tune.connect(self.args.address, self.args.verbose)  # with --skip-train, Ray starts here
        workers = min(spec["workers"], room(spec["resources"]))
        gpus = f", {spec['resources']['gpu']:g} GPU" if spec["resources"]["gpu"] else ""
        fewer = f" (cook.workers {spec['workers']}: the cluster has room for {workers} now)" \
            if workers < spec["workers"] else ""
        return (f"on {workers} Ray worker(s) of {spec['resources']['cpu']:g} CPU{gpus} each "
                f"({size['ray_nodes']} node(s)){fewer}")

    def cook_threads(self) -> int:
        """torch threads of whatever cooks: a worker's CPUs, in the driver too."""
        return int(max(1, self.cfg["cook"]["resources"]["cpu"]))

    def kitchen_spec(self) -> KitchenSpec:
        return KitchenSpec(self.pool.uri, self.task.name, self.task.model_settings(),
                           (self.kitchen.pretrained_id, self.kitchen.data_key), self.cfg["sweep"],
                           self.kitchen_settings(), threads=self.cook_threads())

    def kitchen_settings(self) -> dict:
        return {"precision": self.cfg["precision"], "bn_batches": self.cfg["soup"]["bn_batches"],
                "selection": self.cfg["cook"]["selection"], "stopped": self.cfg["soup"]["stopped_ingredients"]}

    def publish(self) -> None:
        spec = self.cfg["publish"]
        register = {"name": spec["registered_model"], "alias": spec["alias"]} if spec["register"] else None
        if register and self.shortfall and not spec["partial"]:
            print(f"registered nothing: a partial sweep ({self.shortfall}); publish.partial: true registers "
                  "its best dish anyway")
            register = None
        logged = {id(dish): run_id for found in self.reused.values() for dish, run_id, _ in found}
        publisher = Publisher(self.pool, self.uri, self.experiment, self.parent)
        run_ids = publisher.serve(self.dishes, self.cfg["sweep"], self.task, register=register, logged=logged).run_ids
        for name in dict.fromkeys(d.recipe for d in self.dishes):  # each newly cooked recipe, kept for the next cook
            if name not in self.reused:
                mine = [(d, r) for d, r in zip(self.dishes, run_ids) if d.recipe == name]
                cooked.save(self.pool, self.cfg["sweep"], self.task.name, name, self.keys[name], [d for d, _ in mine],
                            [r for _, r in mine], [ingredient_id(d, self.cfg["sweep"]) if d.weights is not None else ""
                                                   for d, _ in mine])

    def report(self) -> None:
        from orchestrator.soup.plots import soup_scatter

        uri, parent, kitchen = self.uri, self.parent, self.kitchen
        groups = metric_sets(self.data)  # the summary's columns: which eval sets each metric averages
        with tempfile.TemporaryDirectory() as tmp:
            plot = soup_scatter(kitchen.ingredients, self.dishes, os.path.join(tmp, "soups_id_vs_ood.png"),
                                f"{self.cfg['sweep']}: {len(kitchen.ingredients)} fine-tuned models and their soups "
                                "(bars: 95% intervals)", groups)
            tracking.log_file(uri, parent, plot)
            manifest = os.path.join(tmp, "manifest.parquet")
            self.pool.manifest()[lambda df: df.columns[:14]].to_parquet(manifest)
            tracking.log_file(uri, parent, manifest)
            self.report_data_map(tmp)
        table = summary_table(self.dishes, groups)
        tracking.log_metrics(uri, parent, {**parent_metrics(self.dishes, groups), **interval_metrics(self.dishes, groups)})
        tracking.log_text(uri, parent, table, "summary.txt")
        # the same numbers as an MLflow table (the artifact view shows it as one; mlflow.load_table reads it)
        tracking.client(uri).log_table(parent, pd.DataFrame([{"dish": d.label, **d.metrics} for d in self.dishes]),
                                       "summary_table.json")
        # the run page's description: Markdown tables MLflow renders (a code block is clipped on the right)
        description = summary_markdown(self.dishes, groups) + (f"\n\n```\n{self.map_summary}\n```" if self.data_map else "")
        tracking.set_tags(uri, parent, {tracking.NOTE: description[:8000]})  # MLflow's limit
        print()
        print(table)
        if self.data_map:
            print("\n" + self.map_summary)
        print(f"\n{spike_summary(self.trial_rows(('ok', 'diverged')))}")
        if self.shortfall:
            print(f"partial sweep: {self.shortfall}; the dishes above are cooked from those only"
                  + ("" if self.cfg["publish"]["partial"] else ", and the registry alias did not move"))
        print(f"{len(kitchen.ingredients)} usable ingredients; finished in {time.time() - self.t0:.0f} s")
        print(f"pool:   {self.pool.uri}  (python -m orchestrator.pool show --pool {self.pool.uri})")
        print(f"MLflow: {uri}, experiment {self.cfg['sweep']!r}, parent run {parent}")
        print(f"        browse with: mlflow ui --backend-store-uri {uri}")
        print(f"        then open http://127.0.0.1:5000/#/experiments/{self.experiment}/runs/{parent}"
              "?workflowType=machine_learning")
        print("        (MLflow 3.17's UI starts in its GenAI view, which lists no training runs; "
              "workflowType switches it to Model training)")
        print("plot:   artifact soups_id_vs_ood.png on the parent run"
              + ("; the data map under data_map/" if self.data_map else ""))
        print(f"log:    {self.args.log_file}  (Ray's, Tune's and MLflow's own messages)")

    def timed(self, phase: str, step) -> None:
        t0 = time.time()
        step()
        self.seconds[phase] = time.time() - t0

    def report_phases(self) -> None:
        """Where each phase ran and how long it took: printed, and phase_<name>_seconds on the run."""
        print("\nphases:")
        for phase, seconds in self.seconds.items():
            print(f"  {phase:8s} {seconds:7.1f} s  {self.where[phase]}")
        tracking.log_metrics(self.uri, self.parent, {f"phase_{p}_seconds": v for p, v in self.seconds.items()})

    def report_data_map(self, tmp: str) -> None:
        """The sweep's data map (when its trials recorded dynamics), logged under data_map/."""
        from orchestrator.soup.dynamics import report

        self.data_map = None
        if not self.cfg["record_dynamics"]:
            return
        try:
            self.data_map = report.load(self.pool, self.cfg["sweep"], self.data_key, self.pretrained["id"])
        except UserError:
            return  # e.g. --skip-train on a pool whose trials predate recording
        for path in report.write(self.data_map, self.task, self.all_train, os.path.join(tmp, "data_map")):
            tracking.log_file(self.uri, self.parent, path, "data_map")
        tracking.log_metrics(self.uri, self.parent, report.metrics(self.data_map))
        self.map_summary = report.summary(self.data_map)

    def run(self) -> int:
        self.check_inputs()
        self.timed("setup", self.setup)
        status, lost = "FAILED", None
        try:
            if not self.args.skip_train:
                self.timed("train", self.train)
            self.timed("cook", self.cook)
            self.timed("publish", self.publish)
            self.timed("report", self.report)
            self.report_phases()
            status = "FINISHED"
        except (Interrupted, KeyboardInterrupt, Terminated):
            status = "KILLED"  # what MLflow calls a run stopped from outside
            raise
        except Exception:
            lost = tracking.unreachable(self.uri)
            if lost:  # MLflow went away mid-sweep: the pool has every finished trial
                raise UserError(f"tracking URI {self.uri}: {lost} during the sweep; finished trials are in the pool: "
                                f"replay them with `python -m orchestrator.pool sync-mlflow --pool {self.pool.uri} "
                                f"--tracking-uri {self.uri}`, then cook with --skip-train") from None
            raise
        finally:
            if not lost:
                tracking.end_run(self.uri, self.parent, status)
        return 0


def select_training(cfg: dict, task, data, pool: Pool) -> tuple:
    """With `data_selection` (FTFT), narrow `data.train` (the task's training_data()) to the region of
    another sweep's data map it names. Returns (the full training set, which example ids index;
    the data key, of which the chosen ids are part; the selection, or None)."""
    from orchestrator.soup.dynamics import report

    all_train, key, sel = data.train, task.data_key(), cfg["data_selection"]
    if not sel["from_sweep"]:
        return all_train, key, None
    made = {**sel, "of_data_key": key}  # what defines a selection
    df = pool.manifest()
    mine = df[(df["kind"] == "selection") & (df["sweep"] == cfg["sweep"])]
    earlier = [h for h in mine["hparams"] if {k: h.get(k) for k in made} == made]
    if earlier:  # this sweep trained on it before (--resume, --skip-train, more trials): the same examples
        ids = np.asarray(earlier[-1]["ids"])
        again = " (the selection this sweep made before: a selection row in the pool)"
    else:
        ids = report.select(pool, sel["from_sweep"], key, sel["region"], sel["fraction"], sel["seed"])
        again = ""
    data.train = View(data.train, torch.as_tensor(ids))
    print(f"data_selection: training on {len(ids)} of {len(all_train)} examples, the "
          f"{sel['region'].replace('_', '-')} {sel['fraction']:.0%} of sweep {sel['from_sweep']}'s data map{again}",
          flush=True)
    return all_train, digest(key, {"train_ids": ids.tolist()}), {**made, "examples": len(ids), "ids": ids.tolist()}


def most_epochs(hyperparameters: dict) -> int:
    """The most epochs a trial of this search space trains: ASHA's last rung."""
    spec = hyperparameters.get("epochs", HPARAMS["epochs"])
    if not isinstance(spec, dict):
        return int(spec)
    return int(max(next(iter(spec.values()))))


def describe_trial(config: dict, result: dict) -> str:
    """The progress line of a finished trial."""
    if result.get("reused"):
        return f"lr {config.get('lr', float('nan')):.2e} epochs {config.get('epochs', '?')}: reused {result['ingredient_id']}"
    if result.get("diverged"):
        outcome = "DIVERGED"
    elif "val_acc" in result:
        outcome = f"val {result['val_acc']:.4f}  ID {result.get('id_acc', float('nan')):.4f}"
        if "ingredient_id" not in result:
            outcome += f", stopped early after epoch {result.get('epoch', '?')}"
    else:
        outcome = "no result"
    spikes = int(result.get("update_spikes", 0))
    return (f"lr {config.get('lr', float('nan')):.2e} epochs {config.get('epochs', '?')} "
            f"{result.get('examples_per_second', 0):.0f} ex/s: {outcome}"
            + (f"  {spikes} update spike{'s' if spikes != 1 else ''}" if spikes else ""))


def spike_summary(trials: list[dict]) -> str:
    """One line on the trials' update spikes (first-layer RMS_t jumps: README "Instability signals")."""
    counts = {r["id"]: int(r["metrics"]["update_spikes"]) for r in trials if "update_spikes" in r["metrics"]}
    if not counts:
        return "update spikes: not recorded (trials of an older version)"
    hit = {i: n for i, n in counts.items() if n}
    worst = max(hit, key=hit.get) if hit else None
    return (f"update spikes: {sum(counts.values())} in {len(hit)} of {len(counts)} trials"
            + (f" (most: {hit[worst]}, trial {worst})" if hit else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that continues an interrupted run
    args.log_file = route_library_output(args.log_dir, "soup_sweep", args.verbose)
    return run_main(lambda: SoupSweep(args).run(), args.debug)


if __name__ == "__main__":
    sys.exit(main())
