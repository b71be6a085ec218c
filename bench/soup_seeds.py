"""The default soup sweep over several search seeds: each recipe's accuracy as a range.

One sweep's table is one draw of 16 hyperparameter settings; a library upgrade or another
machine changes the numerics slightly and so every row of it. A range over search seeds
(other draws of the same search space) says which differences between recipes are larger
than that. Each seed runs the soup sweep with `search_seed=S` as a separate sweep (its own sweep
name, so no seed's soups mix with another's; all in this process, sharing one local Ray)
into one pool and one MLflow store, then this script reads every sweep's parent-run metrics (`<dish>_<metric>`)
back from MLflow and prints min / median / max per row, plus how often the greedy soup beat
the best individual.

    python bench/soup_seeds.py                  # seeds 0 1 2, the default sweep (~4 min here)
    python bench/soup_seeds.py --seeds 0 1 2 3 4
    python bench/soup_seeds.py --tiny           # seconds: the tiny task, 2 trials, 2 seeds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402

# tiny: the dishes the test reads, cooked in the driver (no actors to start)
TINY = ["--num-samples", "2", *common.TINY_TASK, "soup.recipes=[zero_shot, greedy_soup, wise_ft]", "cook.workers=0"]
METRICS = ("val_acc", "id_acc", "ood_acc", "natural_acc")  # natural_acc: the held-out fonts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python bench/soup_seeds.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="search seeds (default: 0 1 2; tiny: 0 1)")
    p.add_argument("--tiny", action="store_true", help="the tiny task with 2 trials: a check that it runs")
    p.add_argument("--workdir", default=None, help="keep the pool and MLflow store here (default: a temp dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more soup_sweep config overrides")
    return p.parse_args(argv)


def run_sweeps(seeds: list[int], workdir: str, extra: list[str]) -> None:
    """One sweep per seed, in this process: Ray starts once and is shared by all of them."""
    from orchestrator.soup.sweep import main as sweep

    for seed in seeds:
        t0 = time.time()
        log = os.path.join(workdir, f"sweep-{seed}.out")
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = sweep(["--pool", os.path.join(workdir, "pool"), "--tracking-uri", f"sqlite:///{workdir}/mlflow.db",
                          "--storage", os.path.join(workdir, "ray_results"), "--log-dir", os.path.join(workdir, "logs"),
                          f"sweep=seeds-{seed}", f"search_seed={seed}", *extra])
        if code != 0:
            sys.exit(f"seed {seed}: soup_sweep failed ({code}):\n{open(log).read()[-3000:]}")
        print(f"seed {seed}: swept in {time.time() - t0:.0f} s", flush=True)


def collect(seeds: list[int], workdir: str) -> dict[str, dict[str, list[float]]]:
    """{dish: {metric: [value per seed]}} from every sweep's parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    table: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        exp = client.get_experiment_by_name(f"seeds-{seed}")
        (parent,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
        for key, value in parent.data.metrics.items():
            for metric in METRICS:
                if key.endswith("_" + metric):
                    table.setdefault(key[:-len(metric) - 1], {}).setdefault(metric, []).append(value)
    return table


def report(table: dict[str, dict[str, list[float]]], seeds: list[int]) -> None:
    print(f"\nover {len(seeds)} search seeds ({', '.join(map(str, seeds))}): min / median / max")
    print(f"{'':26s}" + "".join(f"{m:>22s}" for m in METRICS))
    for dish, metrics in table.items():
        cells = []
        for m in METRICS:
            v = metrics.get(m, [])
            cells.append(f"{min(v):.3f} {statistics.median(v):.3f} {max(v):.3f}" if v else "-")
        print(f"{dish:26s}" + "".join(f"{c:>22s}" for c in cells))
    best, greedy = table.get("best_individual", {}), table.get("greedy_soup", {})
    for m in ("id_acc", "ood_acc"):
        if m in best and m in greedy:
            diffs = [g - b for g, b in zip(greedy[m], best[m])]
            wins = sum(d > 0 for d in diffs)
            print(f"greedy soup - best individual, {m}: {', '.join(f'{d:+.3f}' for d in diffs)} "
                  f"(greedy higher in {wins} of {len(diffs)})")


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = args.seeds or ([0, 1] if args.tiny else [0, 1, 2])
    extra = (TINY if args.tiny else []) + list(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.abspath(args.workdir or tmp)
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)  # MLflow puts artifacts under ./mlruns
        run_sweeps(seeds, workdir, extra)
        report(collect(seeds, workdir), seeds)
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
