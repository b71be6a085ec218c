"""A sweep's data map from the pool, as files (and on the sweep's MLflow run).

    python -m orchestrator.data_map                                  # the default sweep, ./pool
    python -m orchestrator.data_map task.label_noise=0.1             # the same sweep on noisy labels
    python -m orchestrator.data_map --config minilm_text_example --out maps/minilm

Give the sweep's config (and overrides) as you gave them to the soup sweep: they say which task
and training data the example ids refer to, so the hardest examples can be shown. The soup sweep
draws the same map at its end (MLflow artifacts under data_map/ on its parent run); this command
redraws it from the pool at any time, e.g. for another sweep or after more trials.

Files under --out: data_map.png (x variability, y confidence, colour correctness: the dataset
cartography map, averaged over the sweep's trials), data_map.parquet (per example: confidence,
variability, correctness, region, label, flipped), per_trial.parquet (each trial's own map),
hard_to_learn.txt (and hard_to_learn.png for images: the lowest-confidence examples, for a
person to inspect), summary.txt (regions and, with label noise, label-error triage).
"""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.common import tracking
from orchestrator.common.cli import route_library_output, run_main
from orchestrator.common.config import shipped_configs
from orchestrator.common.pool import Pool
from orchestrator.soup.dynamics import report
from orchestrator.soup.config import DEFAULT_CONFIG, load_config, make_task


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m orchestrator.data_map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"the sweep's config: a path or a shipped config's name ({', '.join(shipped_configs('sweep'))}); "
                        f"default: {DEFAULT_CONFIG[:-5]}")
    p.add_argument("--preset", default="default", help="a preset of the config's `presets:`")
    p.add_argument("--sweep", default=None, help="the sweep to map (default: the config's `sweep`)")
    p.add_argument("--pool", default="pool", help="checkpoint pool: a folder or a URI such as s3://bucket/pool")
    p.add_argument("--out", default=None, help="folder for the files (default: ./data_map/<sweep>)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="also log the files to the sweep's newest MLflow run in this store "
                        "(default: $MLFLOW_TRACKING_URI; none: files only)")
    p.add_argument("--log-dir", default="logs", help="folder of the log file for libraries' own messages")
    p.add_argument("--verbose", action="store_true", help="libraries' messages on the terminal too")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for the soup sweep")
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> int:
    from orchestrator.soup.sweep import select_training

    cfg = load_config(args.config, args.overrides, args.preset)
    sweep = args.sweep or cfg["sweep"]
    task = make_task(cfg)
    data = task.training_data()
    pool = Pool(args.pool)
    all_train, data_key, _ = select_training(cfg, task, data, pool)
    data_map = report.load(pool, sweep, data_key, task.pretrained_id())
    out = args.out or os.path.join("data_map", sweep)
    files = report.write(data_map, task, all_train, out)
    print(report.summary(data_map))
    print(f"files: {', '.join(os.path.join(out, os.path.basename(f)) for f in files)}")
    if args.tracking_uri:
        run_id = sweep_run(tracking.resolve_uri(args.tracking_uri), sweep)
        if run_id:
            for path in files:
                tracking.log_file(tracking.resolve_uri(args.tracking_uri), run_id, path, "data_map")
            tracking.log_metrics(tracking.resolve_uri(args.tracking_uri), run_id, report.metrics(data_map))
            print(f"MLflow: logged under data_map/ on run {run_id} (sweep {sweep})")
        else:
            print(f"MLflow: no run of sweep {sweep} in {args.tracking_uri}; files only")
    return 0


def sweep_run(uri: str, sweep: str) -> str | None:
    """The newest parent run of the sweep, or None."""
    tracking.check_reachable(uri)
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.ROLE}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def main(argv=None) -> int:
    args = parse_args(argv)
    route_library_output(args.log_dir, "data_map", args.verbose)
    return run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
