"""Fine-tune one pretrained model many times with Ray Tune, then cook model soups.

    python -m orchestrator.soup_sweep                     # the embedded default, local Ray
    python -m orchestrator.soup_sweep --num-samples 32 soup.greedy_accept='>'
    python -m orchestrator.soup_sweep --skip-train        # re-cook soups from the pool
    python -m orchestrator.soup_sweep --resume            # continue after the driver was killed
    python -m orchestrator.soup_sweep --config search_spaces/minilm_text_example.yaml   # a real model

Steps: load and validate the config; get the pretrained weights (cached in the pool);
fan out the trials with Ray Tune (each lands in the pool and in MLflow); cook zero-shot,
best individual, uniform soup, greedy soup, ensemble and WiSE-FT from the pool;
store the soups back in the pool and in MLflow; plot and print a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import time
from typing import Any

import yaml

from orchestrator import tracking
from orchestrator.cli import add_common_flags, run_main
from orchestrator.config import load_config, make_task
from orchestrator.errors import PoolError, UserError
from orchestrator.pool import Pool, safe_id
from orchestrator.recipes import Dish, Kitchen, check_cookable, cook
from orchestrator.tasks.base import Task, arch_fingerprint

log = logging.getLogger("orchestrator")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.soup_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="search-space YAML (default: search_spaces/glyphs_soup.yaml; real models: "
                        "search_spaces/minilm_text_example.yaml, search_spaces/clip_vitb32_imagenet.yaml)")
    p.add_argument("--num-samples", type=int, default=None, help="number of fine-tuning trials (overrides num_samples)")
    add_common_flags(p, default_pool="pool")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--skip-train", action="store_true", help="cook and evaluate soups from the existing pool only")
    mode.add_argument("--resume", action="store_true",
                      help="continue this sweep's newest interrupted Tune run under --storage (Tuner.restore): "
                           "finished trials are kept, unfinished ones resume from their last epoch checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys and YAML values, e.g. task.width=48 soup.greedy_accept='>'")
    return p.parse_args(argv)


def ensure_pretrained(pool: Pool, task: Task, data, sweep: str) -> dict[str, Any]:
    """The shared starting weights (pretrained model + fitted head), made once per pretraining
    settings and cached in the pool: every trial of every sweep on them starts from exactly these."""
    pid = task.pretrained_id()
    if pool.has(pid):
        print(f"pretrained weights: cached in the pool ({pid})")
        return pool.get(pid)
    print(f"pretrained weights: not in the pool, preparing {task.name} once (cached as {pid}) ...", flush=True)
    t0 = time.time()
    state = task.pretrain(data)
    print(f"prepared in {time.time() - t0:.0f} s")
    return pool.add({"id": pid, "kind": "pretrained", "sweep": sweep, "task": task.name, "status": "ok",
                     "arch": arch_fingerprint(state), "hparams": {k: task.settings[k] for k in task.pretrain_settings}},
                    state)


def serve(dishes: list[Dish], cfg: dict[str, Any], task: Task, pool: Pool, uri: str, exp: str, parent: str) -> None:
    """Each dish gets a nested MLflow run; each new set of weights a pool row (kind=soup) and an MLflow model."""
    sweep = cfg["sweep"]
    for dish in dishes:
        params = {k: v for k, v in dish.params.items() if k != "trace"}
        run_id = tracking.start_run(uri, exp, dish.label, "recipe", parent,
                                    tags={tracking.RECIPE: dish.recipe, tracking.SWEEP: sweep}, params=params)
        tracking.log_metrics(uri, run_id, dish.metrics)
        for point in dish.curve:
            step = round(point["alpha"] * 100)
            tracking.log_metrics(uri, run_id, {f"curve_{k}": v for k, v in point.items() if k != "alpha"}, step=step)
        tracking.log_dict(uri, run_id, {"ingredients": dish.parents, **dish.params}, "ingredients.json")
        if dish.weights is not None and dish.recipe not in ("best_individual",):
            soup_id = safe_id(f"{sweep}-{dish.recipe}-{Pool.digest(dish.parents, params)}")
            pool.add({"id": soup_id, "kind": "soup", "sweep": sweep, "task": cfg["task"]["name"], "status": "ok",
                      "arch": arch_fingerprint(dish.weights), "hparams": {"recipe": dish.recipe, **params},
                      "metrics": dish.metrics, "parents": dish.parents, "mlflow_run_id": run_id}, dish.weights)
            tracking.set_tags(uri, run_id, {"orchestrator.ingredient_id": soup_id})
            tracking.log_model(uri, run_id, dish.weights, task.name, task.model_settings())
        tracking.end_run(uri, run_id)


def summary_table(dishes: list[Dish]) -> str:
    lines = [f"{'':34s} {'val':>7s} {'ID':>7s} {'OOD mean':>9s}"]
    for d in dishes:
        m = d.metrics
        lines.append(f"{d.label:34s} {m['val_acc']:7.4f} {m['id_acc']:7.4f} {m['ood_acc']:9.4f}")
    return "\n".join(lines)


def sweep(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"num_samples={args.num_samples}"] if args.num_samples is not None else [])
    cfg = load_config(args.config, overrides)
    task = make_task(cfg)
    data = task.data()  # the user's files are read and checked before anything is written
    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.check_reachable(uri)  # every input is checked before anything is written
    resume = None
    if not args.skip_train:
        from orchestrator import fanout
        fanout.check_address(args.address)
        fanout.storage_fs(args.storage)  # a malformed storage URI is an input error too
        if args.resume:
            resume = fanout.latest_run(args.storage, cfg["sweep"])
            if resume is None:
                raise UserError(f"--resume: no run of sweep {cfg['sweep']!r} to restore under {args.storage}")
    pool = Pool(args.pool, create=not args.skip_train)
    pretrained_id = task.pretrained_id()
    if args.skip_train and not pool.has(pretrained_id):
        raise PoolError(f"{pool.uri}: no pretrained weights for task {task.name} ({pretrained_id}), "
                        "so nothing to cook from; run a sweep without --skip-train first")
    t0 = time.time()
    pretrained = pool.get(pretrained_id) if args.skip_train else ensure_pretrained(pool, task, data, cfg["sweep"])
    kitchen = None
    if args.skip_train:  # a pool with nothing to cook is an error before MLflow is touched
        kitchen = Kitchen(pool, task, data, sweep=cfg["sweep"], settings=cfg["soup"], precision=cfg["precision"])
        check_cookable(kitchen)
    exp = tracking.experiment_id(uri, cfg["sweep"])
    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    parent = tracking.start_run(uri, exp, f"{cfg['sweep']}-{started}", "sweep",
                                tags={tracking.SWEEP: cfg["sweep"], "orchestrator.pool": pool.uri},
                                params={"pool": pool.uri, "skip_train": args.skip_train, "resumed": resume or "",
                                        "task": task.name,
                                        "num_samples": cfg["num_samples"], "pretrained_id": pretrained["id"]})
    tracking.log_dict(uri, parent, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    status, lost = "FAILED", None
    try:
        if not args.skip_train:
            train(args, cfg, task, pool, pretrained, data, uri, exp, parent, started, resume)
        print("cooking soups from the pool ...", flush=True)
        kitchen = kitchen or Kitchen(pool, task, data, sweep=cfg["sweep"], settings=cfg["soup"],
                                     precision=cfg["precision"])
        t_cook = time.time()
        dishes = cook(kitchen)
        print(f"cooked {len(dishes)} dishes on {kitchen.device.type} in {time.time() - t_cook:.1f} s", flush=True)
        serve(dishes, cfg, task, pool, uri, exp, parent)
        report(cfg, kitchen, dishes, pool, uri, parent, t0)
        status = "FINISHED"
    except Exception:
        lost = tracking.unreachable(uri)
        if lost:  # MLflow went away mid-sweep: the pool has every finished trial
            raise UserError(f"tracking URI {uri}: {lost} during the sweep; finished trials are in the pool: "
                            f"replay them with `python -m orchestrator.pool sync-mlflow --pool {pool.uri} "
                            f"--tracking-uri {uri}`, then cook with --skip-train") from None
        raise
    finally:
        if not lost:
            tracking.end_run(uri, parent, status)
    return 0


def train(args, cfg, task, pool, pretrained, data, uri, exp, parent, started, resume) -> None:
    from orchestrator import fanout
    from orchestrator.trial import SweepContext

    size = fanout.connect(args.address)
    tracking.log_params(uri, parent, size)
    print(f"Ray: {size['ray_nodes']} node(s), {size['ray_cpus']:g} CPUs, {size['ray_gpus']:g} GPUs; "
          + (f"resuming {resume}" if resume else f"running {cfg['num_samples']} trials"), flush=True)
    ctx = SweepContext(sweep=cfg["sweep"], task_name=task.name, task_settings=task.model_settings(), pool_uri=pool.uri,
                       pretrained_id=pretrained["id"], tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                       cpus_per_trial=int(max(1, cfg["resources"]["cpu"])), precision=cfg["precision"],
                       resources=dict(cfg["resources"]), storage=args.storage)
    results = fanout.run(cfg, ctx, data, args.storage, name=fanout.run_name(cfg["sweep"], started), resume=resume)
    for trial_id, error in fanout.errored_trial_ids(results):
        print(f"trial {trial_id} failed after {cfg['max_failures']} retries: {error}", file=sys.stderr)
        pool.add({"id": trial_id, "kind": "trial", "sweep": cfg["sweep"], "task": task.name, "status": "failed",
                  "metrics": {}, "hparams": {}, "parents": [pretrained["id"]]})
    added, _ = tracking.replay_pool(pool, uri, sweep=cfg["sweep"], parent=parent)
    if added:  # trials that could not reach MLflow (e.g. a server bound to the head's 127.0.0.1)
        print(f"MLflow: logged {added} trial(s) from the pool that could not log themselves")


def report(cfg, kitchen: Kitchen, dishes: list[Dish], pool: Pool, uri: str, parent: str, t0: float) -> None:
    from orchestrator.plots import soup_scatter

    with tempfile.TemporaryDirectory() as tmp:
        plot = soup_scatter(kitchen.ingredients, dishes, os.path.join(tmp, "soups_id_vs_ood.png"),
                            f"{cfg['sweep']}: {len(kitchen.ingredients)} fine-tuned models and their soups")
        tracking.log_file(uri, parent, plot)
        manifest = os.path.join(tmp, "manifest.parquet")
        pool.manifest()[lambda df: df.columns[:14]].to_parquet(manifest)
        tracking.log_file(uri, parent, manifest)
    best = next(d for d in dishes if d.recipe == "best_individual").metrics
    greedy = next(d for d in dishes if d.recipe == "greedy_soup").metrics
    tracking.log_metrics(uri, parent, {**{f"greedy_{k}": v for k, v in greedy.items()},
                                       **{f"best_individual_{k}": v for k, v in best.items()}})
    print()
    print(summary_table(dishes))
    print(f"\n{len(kitchen.ingredients)} usable ingredients; finished in {time.time() - t0:.0f} s")
    print(f"pool:   {pool.uri}  (python -m orchestrator.pool show --pool {pool.uri})")
    print(f"MLflow: {uri}, experiment {cfg['sweep']!r}, parent run {parent}")
    print(f"        browse with: mlflow ui --backend-store-uri {uri}")
    print("plot:   artifact soups_id_vs_ood.png on the parent run")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Creating initial MLflow database tables"
    return run_main(lambda: sweep(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
