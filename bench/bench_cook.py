"""Benchmark: cooking on Ray workers, and each merge recipe's time and memory vs N.

Ingredients are real: N one-epoch fine-tunes of the cached pretrained glyph CNN (the same
builder as bench_greedy.py: hyperparameters drawn from the default config, seed = index),
each with its diagonal Fisher (soup/fisher.py, soup.fisher_examples examples) as a pool row
beside it, exactly as a sweep's trials leave them.

1. Workers (the default recipes, every one of them, on the pool of N = 16, the default sweep's):
   soup.cooking.cook_on_ray with cook.workers = 1 and = 2 (1 CPU and 1 torch thread each,
   on a local Ray), alternating, --repeats times each; the median wall time of each and
   their ratio (target: 2 workers <= 0.6x of 1 worker). The dishes of both are compared bit
   for bit. Actor start-up is inside the times (a cook pays it).

2. Recipes vs N (4 / 16 / 64): for each N a fresh process builds the Kitchen, cooks the
   greedy soup (unmeasured: Model Stock needs it), then each merge recipe in turn
   (recipes.cook_one): its time, and its peak RSS above the RSS before it (glibc's mmap
   threshold fixed at 64 KiB, so RSS follows live tensors; see bench_greedy.py) minus one
   evaluation's own peak (activations, the same for every N), in state dicts.

3. Reads: how a cooking worker gets the ingredients, straight from the pool (what it does:
   sha256 once while streaming, then memory-mapped loads) or through Ray's object store
   (the driver loads and puts each once); each side in a fresh Ray worker, median of 2.

--pool P --config C: part 1 only, on an existing pool of a sweep of config C (e.g. the MiniLM
example's: `python -m orchestrator.soup_sweep --config minilm_text_example` leaves ./pool), cooking
that config's `soup.recipes`.

--tiny: N = 2 3 on the tiny glyph task, 1 repeat, 16 Fisher examples.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402
from bench.bench_greedy import SWEEP, STRICT_MALLOC, build_ingredients  # noqa: E402

MERGES = ["uniform_soup", "task_arithmetic", "ties", "dare", "model_stock", "fisher"]


def parse_args(argv=None):
    p = common.parser("python bench/bench_cook.py", __doc__)
    p.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                   help="numbers of ingredients (default: 4 16 64; 2 3 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="cooks per worker count, median shown (default: 2)")
    p.add_argument("--workers-n", type=int, default=16,
                   help="ingredients in the pool the worker comparison cooks (default: 16, the default sweep's; "
                        "the largest N if that is not one of --n)")
    p.add_argument("--fisher-examples", type=int, default=None, help="examples per Fisher (default: the config's)")
    p.add_argument("--parts", nargs="+", choices=["workers", "recipes", "reads"], default=["workers", "recipes", "reads"],
                   help="which measurements to run (default: both)")
    p.add_argument("--pool", default=None, help="cook this existing pool (part 1 only) instead of building one")
    p.add_argument("--config", default=None, help="with --pool: the config of the sweep that made it (default: glyphs)")
    common.add_cache_flag(p)
    common.add_keep_flag(p, "the pools")
    common.add_tiny_flag(p, "N = 2 3 on the tiny glyph task, 1 repeat")
    p.add_argument("--child", metavar="POOL", help=argparse.SUPPRESS)  # internal: one recipe, print JSON
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    common.add_overrides(p)
    args = p.parse_args(argv)
    args.n = args.n or ([2, 3] if args.tiny else [4, 16, 64])
    args.repeats = args.repeats or (1 if args.tiny else 2)
    if args.fisher_examples is None and args.tiny:
        args.fisher_examples = 16
    return args


def settings(cfg) -> dict:
    return {"precision": cfg["precision"], "bn_batches": cfg["soup"]["bn_batches"], "selection": "all"}


# -- child: one recipe on one pool in a fresh process ---------------------------------------


def child(args) -> int:
    import torch

    from orchestrator.common.pool import Pool
    from orchestrator.soup.config import make_task
    from orchestrator.soup.kitchen import Kitchen
    from orchestrator.soup.recipes import cook, cook_one

    torch.set_num_threads(1)
    cfg = common.load_soup_config(common.soup_overrides(args))
    task = make_task(cfg)
    kitchen = Kitchen(Pool(args.child), task, task.data(), SWEEP, settings(cfg))
    kitchen.loadable()  # every file verified once, as before any recipe in a sweep
    cooked = {d.recipe: d for d in cook(kitchen, ["greedy_soup"], cfg["soup"])}  # what model_stock needs
    pre = kitchen.load(kitchen.pretrained)
    sd_bytes = sum(v.numel() * v.element_size() for v in pre.values())
    kitchen.judge(pre)  # warm-up: the first evaluation's one-off allocations are no recipe's
    with common.PeakRSS() as judge_mem:  # an evaluation's own working set, the same for every N
        kitchen.judge(pre)
    del pre
    out = {"n": len(kitchen.loadable()), "sd_bytes": sd_bytes, "judge_peak": judge_mem.above}
    for recipe in MERGES:  # one after another; the mmap threshold keeps each one's peak its own
        with common.PeakRSS() as mem:
            t = time.perf_counter()
            dishes = cook_one(kitchen, recipe, cfg["soup"], cooked)
            seconds = time.perf_counter() - t
        out[recipe] = {"seconds": seconds, "peak": mem.above, "id_acc": dishes[0].metrics["id_acc"]}
        del dishes
    common.print_result(out)
    return 0


# -- parent ---------------------------------------------------------------------------------------


def build_pools(args, cfg, task, data, tmp: str) -> dict[int, str]:
    """One pool per N: the cached pretrained weights, the first N fine-tunes and their Fishers."""
    from orchestrator.common.pool import Pool, Row
    from orchestrator.common.weights import arch_fingerprint
    from orchestrator.soup.fisher import diagonal_fisher, fisher_row_id
    from orchestrator.soup.train import FineTune

    pre_row, pre_weights = common.cached_pretrained(args.cache_dir, task, data, cfg["sweep"])
    t = time.perf_counter()
    ingredients = build_ingredients(task, data, pre_weights, cfg["hyperparameters"], max(args.n), 1, pre_row["id"])
    examples = args.fisher_examples or cfg["soup"]["fisher_examples"]
    fishers = []
    for row, weights in ingredients:
        run = FineTune(task, data, weights, row.hparams)  # a model holding the ingredient's weights
        fisher = diagonal_fisher(task, run.model, data.train, examples)
        fishers.append((Row(id=fisher_row_id(row.id), kind="fisher", sweep=SWEEP, task=task.name, status="ok",
                            hparams={"examples": examples, "seed": 0}, parents=[row.id],
                            arch=arch_fingerprint(fisher)), fisher))
    print(f"ingredients: {len(ingredients)} REAL one-epoch fine-tunes with a {examples}-example Fisher each, built "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    pools = {}
    for n in args.n:
        pool = Pool(os.path.join(tmp, f"pool-{n}"), create=True)
        common.add_row(pool, pre_row, pre_weights)
        for (row, weights), (frow, fisher) in zip(ingredients[:n], fishers[:n]):
            pool.add(frow, fisher)
            pool.add(row, weights)
        pools[n] = pool.uri
    return pools


def compare_workers(args, cfg, task, data, pool_uri: str, sweep: str = SWEEP, recipes: list[str] | None = None,
                    data_key: str | None = None) -> None:
    import torch

    from orchestrator.common import tune
    from orchestrator.soup.cooking import KitchenSpec, cook_on_ray
    from orchestrator.soup.recipes import default_recipes

    log_dir = os.path.join(os.path.dirname(pool_uri), "logs")
    common.route_library_output(log_dir, "bench_cook", verbose=False)
    tune.connect(None)
    spec = KitchenSpec(pool_uri, task.name, task.model_settings(), (task.pretrained_id(), data_key or task.data_key()), sweep,
                       settings(cfg), threads=1)
    recipes = recipes or default_recipes()
    times: dict[int, list[float]] = {1: [], 2: []}
    dishes = {}
    for r in range(args.repeats):
        for workers in (1, 2):
            t = time.perf_counter()
            dishes[workers] = cook_on_ray(spec, data, recipes, cfg["soup"], workers, {"cpu": 1, "gpu": 0},
                                          lambda *a: None)
            times[workers].append(time.perf_counter() - t)
            print(f"  cook on {workers} worker(s): {times[workers][-1]:.1f} s (load average {common.load():.2f})",
                  flush=True)
    same = all(a.metrics == b.metrics and (a.weights is None or all(torch.equal(a.weights[k], b.weights[k])
                                                                      for k in a.weights))
               for a, b in zip(dishes[1], dishes[2]))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print()
    common.print_table(f"{'workers':>7} {'cook s (median)':>15} {'ratio':>6}",
                       [f"{1:>7} {one:>15.1f} {1:>6.2f}", f"{2:>7} {two:>15.1f} {two / one:>6.2f}"])
    print(f"{len(dishes[2])} dishes from {len(recipes)} recipes on {len(spec.kitchen(data).ingredients)} "
          f"ingredients; 2 workers vs 1: {two / one:.2f}x (target <= 0.60x); dishes bit for bit equal: {same}")
    common.unroute_library_output(log_dir)


def compare_recipes(args, pools: dict[int, str]) -> None:
    results = {}
    for n in args.n:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", pools[n], *(["--tiny"] if args.tiny else []),
               *args.overrides]
        results[n] = common.run_child(cmd, common.child_env(**STRICT_MALLOC), f"bench_cook: the recipes on N={n}")
        print(f"  N={n} measured (load average {common.load():.2f})", flush=True)
    rows = []
    for recipe in MERGES:
        line = f"{recipe:>16}"
        for n in args.n:
            r, sd = results[n][recipe], results[n]["sd_bytes"]
            line += f" | {r['seconds']:>7.2f} {(r['peak'] - results[n]['judge_peak']) / sd:>6.1f}"
        rows.append(line)
    print()
    sd = results[args.n[0]]["sd_bytes"]
    print(f"one state dict = {sd / 1024:.0f} KiB; an evaluation on every eval set peaks at "
          f"{results[args.n[0]]['judge_peak'] / sd:.1f} state dicts by itself")
    common.print_table(f"{'recipe':>16}" + "".join(f" | {f'N={n}: s':>7} {'x sd':>6}" for n in args.n), rows)
    print("x sd: the recipe's peak RSS above the RSS before it, minus an evaluation's own peak, in state dicts")


def _read_from_pool(pool_uri: str, ids: list[str]) -> float:
    """In a Ray worker: every ingredient as a Kitchen gets it (verified once, memory-mapped), touched."""
    from orchestrator.common.pool import Pool

    pool = Pool(pool_uri)
    t = time.perf_counter()
    for ingredient in ids:
        sum(float(v.float().sum()) for v in pool.load(ingredient).values())
    return time.perf_counter() - t


def _read_from_store(refs: list) -> float:
    """In a Ray worker: every ingredient from Ray's object store (put by the driver), touched."""
    import ray
    import torch  # noqa: F401  (imported before the clock, as the pool side imports it with Pool)

    t = time.perf_counter()
    for ref in refs:
        sum(float(v.float().sum()) for v in ray.get(ref).values())
    return time.perf_counter() - t


def compare_reads(args, pool_uri: str) -> None:
    """How a cooking worker should get the ingredients: straight from the pool, or through the
    object store (the driver loads and puts each once). Each side in a fresh Ray worker."""
    import ray

    from orchestrator.common import tune
    from orchestrator.common.pool import Pool

    log_dir = os.path.join(os.path.dirname(pool_uri), "logs")
    common.route_library_output(log_dir, "bench_cook", verbose=False)
    tune.connect(None)
    pool = Pool(pool_uri)
    ids = [r["id"] for r in pool.manifest().to_dict("records") if r["kind"] == "trial"]
    t = time.perf_counter()
    refs = [ray.put(pool.load(i)) for i in ids]
    put_s = time.perf_counter() - t
    fresh = {"num_cpus": 1, "max_calls": 1}  # a new worker process per call: no warm caches
    times = {"pool": [], "store": []}
    for _ in range(max(2, args.repeats)):
        times["pool"].append(ray.get(ray.remote(**fresh)(_read_from_pool).remote(pool.uri, ids)))
        times["store"].append(ray.get(ray.remote(**fresh)(_read_from_store).remote(refs)))
    pool_s, store_s = statistics.median(times["pool"]), statistics.median(times["store"])
    print()
    print(f"reading {len(ids)} ingredients in a worker: from the pool {pool_s:.3f} s (sha256 once, then mmap), "
          f"from the object store {store_s:.3f} s (+{put_s:.3f} s for the driver to load and put them once); "
          f"object store / pool = {store_s / pool_s:.2f}x")
    common.unroute_library_output(log_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    t0 = time.perf_counter()
    import torch

    from orchestrator.soup.config import make_task

    torch.set_num_threads(1)
    if args.pool:  # an existing pool: the worker comparison only
        from orchestrator.soup.config import load_config

        cfg = load_config(args.config, args.overrides)
        task = make_task(cfg)
        print(f"bench_cook: the pool {args.pool} of sweep {cfg['sweep']} ({task.name}); load average "
              f"{common.load():.2f}", flush=True)
        from orchestrator.common.pool import Pool
        from orchestrator.soup.sweep import select_training

        data = task.training_data()  # as the sweep trained: label noise and a data_selection included
        _, data_key, _ = select_training(cfg, task, data, Pool(args.pool))
        compare_workers(args, cfg, task, data, os.path.abspath(args.pool), cfg["sweep"], cfg["soup"]["recipes"],
                        data_key)
        print(f"bench_cook finished in {time.perf_counter() - t0:.0f} s")
        return 0
    cfg = common.load_soup_config(common.soup_overrides(args))
    task = make_task(cfg)
    data = task.data()
    print(f"bench_cook: N = {', '.join(map(str, args.n))}{' (--tiny task)' if args.tiny else ''}; {os.cpu_count()} "
          f"CPUs visible, load average {common.load():.2f}", flush=True)
    with common.temp_dir("bench_cook-", args.keep) as tmp:
        pools = build_pools(args, cfg, task, data, tmp)
        if "workers" in args.parts:
            compare_workers(args, cfg, task, data, pools.get(args.workers_n, pools[max(args.n)]))
        if "recipes" in args.parts:
            compare_recipes(args, pools)
        if "reads" in args.parts:
            compare_reads(args, pools.get(args.workers_n, pools[max(args.n)]))
    print(f"bench_cook finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
