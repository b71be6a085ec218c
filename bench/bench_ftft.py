"""Benchmark: FTFT on the embedded default task, every arm measured in one run each.

Four soup sweeps on one pool, each the soup sweep's `main` with the arguments a user gives
`python -m orchestrator.soup_sweep` (presets of orchestrator/configs/glyphs_soup.yaml), all
in this process, so Ray starts once (the first arm's wall time includes it):

  reference   --preset ftft_reference: a narrower CNN (width 16), 8 trials; its training
              dynamics are recorded into the pool
  all         the default model on all training data (the default sweep's 16 trials)
  ambiguous   --preset ftft_ambiguous: the default model on the reference's ambiguous third
  random      --preset ftft_random: the default model on a random third (the control)

Every main arm samples the same 16 hyperparameter settings (same search seed), so the arms
differ only in their training data. Cost: example-steps (examples seen in training, summed over
trials) and trial-seconds (every trial's epoch times summed: the compute, whatever the
parallelism); the selected arms are shown with the reference's cost added. Quality: the best
individual (highest held-out accuracy) and the greedy soup, in-distribution and mean OOD, all
read back from the pool. Only best_individual and greedy_soup are cooked, to keep it short.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`

from bench import common  # noqa: E402

ARMS = [("reference", "ftft_reference"), ("all", "default"), ("ambiguous", "ftft_ambiguous"), ("random", "ftft_random")]


def parse_args(argv=None):
    p = common.parser("python bench/bench_ftft.py", __doc__)
    common.add_tiny_flag(p, "the tiny task, 2 trials per arm")
    common.add_keep_flag(p, "its pool, MLflow store and logs")
    p.add_argument("--report", metavar="FOLDER", help="only print the table of a run kept with --keep")
    p.add_argument("--num-samples", type=int, default=None, help="trials per main arm (default: the config's 16)")
    common.add_overrides(p)
    return p.parse_args(argv)


def run_arm(folder: str, preset: str, args) -> float:
    import contextlib

    from orchestrator.soup.sweep import main as sweep

    argv = ["--preset", preset, "--pool", os.path.join(folder, "pool"),
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--storage", os.path.join(folder, "ray_results"),
            "--log-dir", os.path.join(folder, "logs"),
            *common.soup_overrides(args), "soup.recipes=[best_individual, greedy_soup]", "cook.workers=0"]
    if args.tiny:
        argv += ["--num-samples", "2"]
    elif args.num_samples and preset != "ftft_reference":
        argv += ["--num-samples", str(args.num_samples)]
    t0 = time.perf_counter()
    log = os.path.join(folder, f"{preset}.out")
    # in the folder: MLflow puts a sqlite store's artifacts under ./mlruns
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
            contextlib.chdir(folder):
        code = sweep(argv)
    if code != 0:
        sys.stderr.write(open(log).read()[-6000:])
        raise SystemExit(f"bench_ftft: the {preset} sweep failed (exit {code})")
    return time.perf_counter() - t0


def arm_numbers(pool, sweep: str) -> dict:
    df = pool.manifest()
    trials = df[(df["kind"] == "trial") & (df["sweep"] == sweep) & (df["status"] == "ok")]
    dyn = df[(df["kind"] == "dynamics") & (df["sweep"] == sweep)]
    examples = {p[0]: h["examples"] for p, h in zip(dyn["parents"], dyn["hparams"])}  # each trial's training set
    steps = sum(examples[r["id"]] * r["hparams"]["epochs"] for r in trials.to_dict("records"))
    seconds = sum(h.get("epoch_seconds", 0.0) for hist in trials["history"] for h in hist)
    best = trials.sort_values(["val_acc", "id"], ascending=[False, True]).iloc[0]
    greedy = df[(df["kind"] == "soup") & (df["sweep"] == sweep)
                & df["hparams"].map(lambda h: h.get("recipe") == "greedy_soup")].iloc[-1]
    return {"trials": len(trials), "examples": int(max(examples.values())), "steps": int(steps), "seconds": seconds,
            "best": (best["id_acc"], best["ood_acc"]), "greedy": (greedy["id_acc"], greedy["ood_acc"]),
            "kept": len(greedy["parents"])}


def main(argv=None) -> int:
    args = parse_args(argv)
    from orchestrator.common.pool import Pool
    from orchestrator.soup.config import load_config

    os.environ.pop("RAY_ADDRESS", None)  # the sweeps start a Ray of their own, never attach to someone's cluster
    sweeps = {name: load_config(None, [], preset)["sweep"] for name, preset in ARMS}
    print(f"bench_ftft: 4 sweeps on one pool{' (--tiny task)' if args.tiny else ''}; load {common.load():.2f}",
          flush=True)
    if args.report:
        nums = {name: arm_numbers(Pool(os.path.join(args.report, "pool")), sweeps[name]) for name, _ in ARMS}
        return report(nums)
    with common.temp_dir("bench_ftft_", keep=args.keep) as folder:
        for name, preset in ARMS:
            wall = run_arm(folder, preset, args)
            print(f"  {name:9s} ({preset}): {wall:.0f} s wall (pretraining included where it ran first)", flush=True)
        pool = Pool(os.path.join(folder, "pool"))
        nums = {name: arm_numbers(pool, sweeps[name]) for name, _ in ARMS}
    return report(nums)


def report(nums: dict) -> int:
    ref = nums["reference"]
    rows = []
    for name in ("reference", "all", "ambiguous", "random"):
        n = nums[name]
        plus = name in ("ambiguous", "random")
        steps, seconds = n["steps"] + (ref["steps"] if plus else 0), n["seconds"] + (ref["seconds"] if plus else 0)
        rows.append(f"{name + (' + ref' if plus else ''):15s} {n['trials']:6d} {n['examples']:8d} {steps:12,d} "
                    f"{steps / nums['all']['steps']:6.2f}x {seconds:9.1f} {seconds / nums['all']['seconds']:6.2f}x "
                    f"  {n['best'][0]:.4f} {n['best'][1]:.4f}   {n['greedy'][0]:.4f} {n['greedy'][1]:.4f} ({n['kept']})")
    common.print_table(f"{'arm':15s} {'trials':>6s} {'examples':>8s} {'example-steps':>12s} {'vs all':>7s} "
                       f"{'trial-s':>9s} {'vs all':>7s}   best ID  OOD      greedy ID OOD (kept)", rows)
    a, b = nums["ambiguous"], nums["random"]
    print(f"ambiguous - random third: best individual ID {a['best'][0] - b['best'][0]:+.4f}, OOD "
          f"{a['best'][1] - b['best'][1]:+.4f}; greedy soup ID {a['greedy'][0] - b['greedy'][0]:+.4f}, OOD "
          f"{a['greedy'][1] - b['greedy'][1]:+.4f}")
    print(f"ambiguous third + reference vs all data: best individual OOD "
          f"{a['best'][1] - nums['all']['best'][1]:+.4f}, greedy soup OOD {a['greedy'][1] - nums['all']['greedy'][1]:+.4f} "
          f"at {(a['steps'] + ref['steps']) / nums['all']['steps']:.2f}x the example-steps")
    print(f"load at the end {common.load():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
