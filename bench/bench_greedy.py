"""Benchmark: greedy soup over N = 4, 16, 64 ingredients, time and peak memory.

Ingredients are real: N fine-tunes of the cached pretrained glyph CNN, one epoch each
(FineTune with hyperparameters drawn from the default config's distributions, a
different seed per ingredient), evaluated on every eval set like a trial, and stored
with their metrics in a real Pool (one pool per N in a temp dir, holding the
pretrained weights and the first N ingredients).

For each N, a FRESH Python process (so peak memory is that N's alone) does what
soup_sweep does before cooking: task.data(), Kitchen(pool, task, data, sweep, settings),
and then:

  verify       Kitchen.loadable(): reads and sha256-checks every ingredient once
               (reported separately, it is not part of the greedy soup)
  warm-up      the pretrained weights evaluated on every set (as the zero_shot recipe
               does before greedy_soup in a sweep), then one held-out evaluation with
               its peak memory measured (highest of 5): the evaluation's own working set
  greedy       the registered recipe through soup.recipes.cook(kitchen, ["greedy_soup"],
               soup settings), as the sweep cooks it: merging.greedy.greedy_soup with the
               Kitchen's source and val_acc, then one full evaluation of the soup.
               Timed: the greedy_soup call, the time inside the held-out evaluations
               (the val_acc score callback, wrapped), inside Kitchen.source (opening an
               ingredient's file: its header), and the recipe as a whole.

Peak memory: the process's peak RSS during greedy_soup (VmHWM, reset just before
via /proc/self/clear_refs; a 1 ms RSS sampler if that is not allowed) minus the RSS just
before it; torch allocations are in RSS, unlike tracemalloc. glibc keeps freed memory
resident and reuses it, which hides new allocations from RSS, so memory comes from one
extra fresh process per N with MALLOC_MMAP_THRESHOLD_=65536 (every tensor of 64 KiB or
more gets its own mapping, unmapped on free, so RSS follows the live tensors); the
default-allocator numbers of the timing runs are printed too. Shown in MB and as a
multiple of one model's state-dict size, and also with a held-out evaluation's own
working set subtracted (the val set's activations, the same for every N): that rest is
what ingredients and soups add.

Each N is measured --repeats times (default 3), round-robin over N so that load from
other users hits every N alike; the table shows the median.

Targets: time outside the held-out evaluations < 10% of the greedy soup's time;
peak memory flat in N and under 4x one state dict.

--tiny: N = 2 and 3 on the tiny glyph task (bench/common.py TINY_TASK), 1 repeat.

The pretrained weights are cached in a pool under --cache-dir (default:
$TMPDIR/orchestrator-bench-cache), shared with bench_fanout.py; everything else is in
a temp dir removed at the end (--keep to keep it).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402

SWEEP = "bench_greedy"


def parse_args(argv=None):
    p = common.parser("python bench/bench_greedy.py", __doc__)
    p.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                   help="numbers of ingredients to soup, e.g. --n 4 16 64 (default: 4 16 64; 2 3 with --tiny)")
    p.add_argument("--repeats", type=int, default=None,
                   help="fresh processes per N, median shown (default: 3; 1 with --tiny)")
    p.add_argument("--accept", choices=[">=", ">"], default=None,
                   help="greedy acceptance rule (default: the config's soup.greedy_accept)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for building ingredients and in the soup process (default: 1, steady "
                        "when other users load the machine; 0 = torch's default, as the sweep's driver uses)")
    common.add_cache_flag(p)
    common.add_keep_flag(p, "the pools")
    common.add_tiny_flag(p, "N = 2 3 on the tiny glyph task, 1 repeat")
    p.add_argument("--child", metavar="POOL", help=argparse.SUPPRESS)  # internal: measure one pool, print JSON
    common.add_overrides(p)
    args = p.parse_args(argv)
    if args.n is None:
        args.n = [2, 3] if args.tiny else [4, 16, 64]
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    if any(n < 1 for n in args.n) or args.repeats < 1:
        p.error("--n values and --repeats must be >= 1")
    return args


# -- child: one N in a fresh process ------------------------------------------------------


def child(args) -> int:
    t = time.perf_counter()
    import torch

    from orchestrator.common.pool import Pool
    from orchestrator.merging import greedy
    from orchestrator.soup.config import make_task
    from orchestrator.soup.kitchen import Kitchen
    from orchestrator.soup.recipes import cook
    t_import = time.perf_counter() - t

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = common.load_soup_config(common.soup_overrides(args))
    task = make_task(cfg)
    data = task.data()
    pool = Pool(args.child)
    settings = {**cfg["soup"], **({"greedy_accept": args.accept} if args.accept else {})}

    t = time.perf_counter()
    kitchen = Kitchen(pool, task, data, sweep=SWEEP,
                      settings={"precision": cfg["precision"], "bn_batches": cfg["soup"]["bn_batches"]})
    t_kitchen = time.perf_counter() - t
    t = time.perf_counter()
    rows = kitchen.loadable()
    t_verify = time.perf_counter() - t

    pre = kitchen.load(kitchen.pretrained)
    sd_bytes = sum(v.numel() * v.element_size() for v in pre.values())
    kitchen.evaluate(pre)  # warm-up, as zero_shot runs before greedy_soup in a sweep
    kitchen.val_acc(pre)
    with common.PeakRSS() as eval_mem:  # the highest of a few, as the greedy loop's peak is over N-1 of them
        for _ in range(5):
            kitchen.val_acc(pre)
    del pre

    timing = {"heldout": 0.0, "heldout_calls": 0, "load": 0.0, "load_calls": 0, "greedy": 0.0, "final_eval": 0.0}

    def timed(fn, key, calls=None):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timing[key] += time.perf_counter() - t0
                if calls:
                    timing[calls] += 1
        return wrapper

    kitchen.val_acc = timed(kitchen.val_acc, "heldout", "heldout_calls")  # the score callback
    kitchen.source = timed(kitchen.source, "load", "load_calls")
    evaluate = kitchen.evaluate

    def full_evaluate(state, sets=None, **kw):  # val_acc goes through here too, with sets=[val]: not counted twice
        return timed(evaluate, "final_eval")(state, sets, **kw) if sets is None else evaluate(state, sets, **kw)

    kitchen.evaluate = full_evaluate
    split = {}
    greedy_soup = greedy.greedy_soup

    def greedy_then_split(*a, **kw):
        try:
            return timed(greedy_soup, "greedy")(*a, **kw)
        finally:
            split["greedy"] = mem.split()  # the recipe's final full evaluation is measured on its own

    greedy.greedy_soup = greedy_then_split  # the greedy_soup recipe calls greedy.greedy_soup
    try:
        with common.PeakRSS() as mem:
            t = time.perf_counter()
            (dish,) = cook(kitchen, ["greedy_soup"], settings)
            t_recipe = time.perf_counter() - t
    finally:
        greedy.greedy_soup = greedy_soup

    out = {"n": len(kitchen.ingredients), "loadable": len(rows), "kept": dish.params["n_ingredients"],
           "best_val": rows[0]["metrics"]["val_acc"], "soup_val": dish.metrics["val_acc"],
           "import_s": t_import, "kitchen_s": t_kitchen, "verify_s": t_verify, "recipe_s": t_recipe,
           "greedy_s": timing["greedy"], "heldout_s": timing["heldout"], "heldout_calls": timing["heldout_calls"],
           "load_s": timing["load"], "load_calls": timing["load_calls"], "final_eval_s": timing["final_eval"],
           "sd_bytes": sd_bytes, "base_rss": mem.base, "greedy_peak": split["greedy"], "final_eval_peak": mem.above,
           "eval_peak": eval_mem.above, "mem_method": mem.method, "threads": torch.get_num_threads(),
           "malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default")}
    common.print_result(out)
    return 0


# -- parent -------------------------------------------------------------------------------


def sample_hparams(space: dict, rng) -> dict:
    """One draw from the config's hyperparameter distributions (as Tune would, not the same stream)."""
    hp = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            hp[name] = spec
            continue
        (kind, a), = spec.items()
        if kind == "loguniform":
            hp[name] = float(math.exp(rng.uniform(math.log(a[0]), math.log(a[1]))))
        elif kind == "uniform":
            hp[name] = float(rng.uniform(a[0], a[1]))
        elif kind == "randint":
            hp[name] = int(rng.integers(a[0], a[1] + 1))
        else:  # choice, grid
            hp[name] = a[int(rng.integers(len(a)))]
    return hp


def build_ingredients(task, data, init, space, n: int, threads: int, pretrained_id: str):
    """n real fine-tunes: one epoch each, hyperparameters from the config, evaluated like a trial."""
    import numpy as np
    import torch

    from orchestrator.common.pool import Row
    from orchestrator.common.weights import arch_fingerprint
    from orchestrator.soup.train import FineTune, evaluate

    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        hp = {**sample_hparams(space, rng), "epochs": 1, "seed": i}
        run = FineTune(task, data, init, hp)
        t = time.perf_counter()
        loss = run.run_epoch()
        seconds = time.perf_counter() - t
        metrics = {"train_loss": loss, "epoch_seconds": seconds, **evaluate(task, run.model, data)}
        weights = run.weights()
        out.append((Row(id=f"{SWEEP}-{i:03d}", kind="trial", sweep=SWEEP, task=task.name, status="ok",
                        hparams=run.hp, metrics=metrics, history=[{"epoch": 1, **metrics}],
                        parents=[pretrained_id], data_key=task.data_key(), arch=arch_fingerprint(weights)), weights))
    return out


# glibc keeps freed memory below a threshold that grows up to 32 MB, so a later allocation
# can land in already-resident pages and never show in RSS. A fixed 64 KiB mmap threshold
# gives every tensor of 64 KiB or more its own mapping, returned to the kernel on free:
# RSS then follows the live tensors. Used for the memory run only (it costs some time).
STRICT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(pool_dir: str, args, strict_malloc: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", pool_dir, "--threads", str(args.threads)]
    if args.accept:
        cmd += ["--accept", args.accept]
    if args.tiny:
        cmd += ["--tiny"]
    cmd += list(args.overrides)
    env = common.child_env()
    for key in STRICT_MALLOC:
        env.pop(key, None)
    if strict_malloc:
        env.update(STRICT_MALLOC)
    return common.run_child(cmd, env, f"bench_greedy: the measuring process for {pool_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    t_start = time.perf_counter()

    from orchestrator.common.pool import Pool
    from orchestrator.soup.config import make_task

    cfg = common.load_soup_config(common.soup_overrides(args))
    task = make_task(cfg)
    data = task.data()
    pre_row, pre_weights = common.cached_pretrained(args.cache_dir, task, data, cfg["sweep"])
    ns = sorted(set(args.n))
    print(f"bench_greedy: N = {', '.join(map(str, ns))}{' (--tiny task)' if args.tiny else ''}; {args.repeats} fresh "
          f"process(es) per N; accept {args.accept or cfg['soup']['greedy_accept']!r}; {os.cpu_count()} CPUs visible, "
          f"load average {common.load():.2f}")

    t = time.perf_counter()
    ingredients = build_ingredients(task, data, pre_weights, cfg["hyperparameters"], max(ns), args.threads,
                                    pre_row["id"])
    t_build = time.perf_counter() - t
    vals = [row.metrics["val_acc"] for row, _ in ingredients]
    epoch_s = [row.metrics["epoch_seconds"] for row, _ in ingredients]
    print(f"ingredients: {len(ingredients)} REAL fine-tunes (1 epoch each of FineTune from the cached pretrained "
          f"weights, hyperparameters drawn from the default config, seed = index), built in {t_build:.0f} s "
          f"(training epoch median {statistics.median(epoch_s):.2f} s); val_acc {min(vals):.3f}..{max(vals):.3f}")

    with common.temp_dir("bench_greedy-", args.keep) as tmp:
        pools = {}
        for n in ns:
            pool = Pool(os.path.join(tmp, f"pool-{n}"), create=True)
            common.add_row(pool, pre_row, pre_weights)
            for row, weights in ingredients[:n]:
                pool.add(row, weights)
            pools[n] = pool.uri
        results: dict[int, list[dict]] = {n: [] for n in ns}
        memory: dict[int, dict] = {}
        for r in range(args.repeats + 1):
            strict = r == args.repeats  # the last round measures memory, with the strict allocator
            for n in ns:  # round-robin: other users' load hits every N alike
                res = run_child(pools[n], args, strict)
                (memory.__setitem__(n, res) if strict else results[n].append(res))
            what = "memory round (strict malloc)" if strict else f"timing round {r + 1}/{args.repeats}"
            print(f"  {what} done (load average {common.load():.2f})", flush=True)
        report(ns, results, memory)
    print(f"bench_greedy finished in {time.perf_counter() - t_start:.0f} s "
          f"(load average now {common.load():.2f})")
    return 0


def report(ns, results, memory) -> None:
    med = {n: {k: statistics.median(r[k] for r in results[n]) for k, v in results[n][0].items()
               if isinstance(v, (int, float))} for n in ns}
    sd = memory[ns[0]]["sd_bytes"]
    mb = 1024 * 1024
    print()
    print(f"one state dict = {sd / 1024:.0f} KiB ({int(sd)} bytes); torch threads in the soup process: "
          f"{results[ns[0]][0]['threads']}; times: median of {len(results[ns[0]])} fresh process(es) per N")
    print("  greedy s   the greedy_soup call: N-1 candidates, each read tensor by tensor from its verified file, "
          "summed in float32, scored on val")
    print("  held-out s inside the score callback (Kitchen.val_acc), N-1 calls;  open s: inside Kitchen.source")
    print("  outside %  (greedy s - held-out s) / greedy s;  recipe s: greedy s + the soup's final evaluation on "
          "every set")
    print("  verify s   Kitchen.loadable(): every ingredient sha256-checked once (streamed), before any recipe")
    print(f"memory: one more fresh process per N, glibc mmap threshold fixed at 64 KiB; peak RSS by "
          f"{memory[ns[0]]['mem_method']} minus RSS before the recipe")
    print("  greedy MB  peak during greedy_soup;  -eval: minus a held-out evaluation's own peak "
          "(activations, same for every N; highest of 5)")
    print("  final MB   peak during the recipe's final evaluation of the soup on every eval set")
    head = (f"{'N':>4} {'verify s':>8} {'greedy s':>8} {'s/ingr':>7} {'held-out s':>10} {'open s':>6} "
            f"{'outside %':>9} {'recipe s':>8} | {'greedy MB':>9} {'x sd':>5} {'-eval x sd':>10} {'final MB':>8} "
            f"{'kept':>4}")
    print(head)
    print("-" * len(head))
    for n in ns:
        m, mm = med[n], memory[n]
        outside = 100 * (m["greedy_s"] - m["heldout_s"]) / m["greedy_s"] if m["greedy_s"] > 0 else float("nan")
        print(f"{n:>4} {m['verify_s']:>8.3f} {m['greedy_s']:>8.3f} {m['greedy_s'] / n:>7.4f} {m['heldout_s']:>10.3f} "
              f"{m['load_s']:>6.3f} {outside:>9.1f} {m['recipe_s']:>8.3f} | {mm['greedy_peak'] / mb:>9.2f} "
              f"{mm['greedy_peak'] / sd:>5.1f} {(mm['greedy_peak'] - mm['eval_peak']) / sd:>10.1f} "
              f"{mm['final_eval_peak'] / mb:>8.2f} {int(m['kept']):>4}")
    print()
    for n in ns:
        runs = results[n]
        greedy = ", ".join(f"{r['greedy_s']:.3f}" for r in runs)
        peak = ", ".join(f"{r['greedy_peak'] / mb:.2f}" for r in runs)
        print(f"N={n:<3} timing runs: greedy s {greedy}; greedy MB with the default allocator {peak}; "
              f"verify s/ingredient {med[n]['verify_s'] / n:.4f}; Kitchen() {med[n]['kitchen_s']:.3f} s; "
              f"held-out eval peak {memory[n]['eval_peak'] / mb:.2f} MB; "
              f"val: best single {runs[0]['best_val']:.4f} -> greedy soup {runs[0]['soup_val']:.4f}")
    print()
    worst_outside = max(100 * (med[n]["greedy_s"] - med[n]["heldout_s"]) / med[n]["greedy_s"] for n in ns)
    print(f"target: time outside held-out evaluations < 10% of greedy soup time: "
          f"{'MET' if worst_outside < 10 else 'NOT MET'} (worst {worst_outside:.1f}%)")
    for label, vals in (("greedy peak", [memory[n]["greedy_peak"] / sd for n in ns]),
                        ("greedy peak - held-out eval", [(memory[n]["greedy_peak"] - memory[n]["eval_peak"]) / sd
                                                         for n in ns])):
        flat = max(vals) - min(vals) <= 1.0  # within one state dict from the smallest to the largest N
        print(f"target: {label} flat in N and < 4x a state dict: {'MET' if flat and max(vals) < 4 else 'NOT MET'} "
              f"({' / '.join(f'{v:.1f}x' for v in vals)} for N = {' / '.join(map(str, ns))}; "
              f"flat = spread <= 1 state dict: {'yes' if flat else 'no'})")


if __name__ == "__main__":
    sys.exit(main())
