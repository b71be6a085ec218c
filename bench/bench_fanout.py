"""Benchmark: the same K fine-tunes through the orchestrator versus a plain Python loop.

What is measured, on the same machine and in the same run:

  loop          one process, torch.set_num_threads(2) (all cores), for each config:
                FineTune(...) every epoch + evaluate() on every eval set after each epoch
                (the trial evaluates every epoch too). No Ray, no MLflow, no pool: what a
                user would write without the tool. Run before AND after the orchestrator
                (--loop-runs 2, the default) so drift from other users' load shows up;
                the comparison uses the faster loop run (other users' load only ever
                slows a run down, so this is conservative for the orchestrator).
  orchestrator  the same K configs through the soup sweep's own steps, as
                `python -m orchestrator.soup_sweep --num-samples K` runs them:
                orchestrator.soup.sweep.SoupSweep with the default config
                (orchestrator/configs/glyphs_soup.yaml), a real Pool and a real sqlite
                MLflow store in a temp dir, resources 1 CPU per trial (so on 2 cores 2
                trials run at once), reused actors, a checkpoint every epoch; without
                training dynamics or a Fisher estimate, which the loop does not compute
                either (their cost is bench_dynamics.py's and the fisher recipe's). Timed
                separately: check_inputs() (config, task data, MLflow, pool) + setup()
                (pretrained weights from the pool, MLflow parent run); ray.init
                (common.tune.connect, called just before train(), which then finds Ray
                running); train() (the Tune fit, then failed trials and the MLflow replay
                check); ray.shutdown. The sweep's pool starts with the cached pretrained row,
                as a second sweep on the same pool would.
  reference     the loop once more at the end with 1 torch thread (--ref-threads): on a
                2-core machine that other users load too, 2 intra-op threads can be many
                times slower than 1 (threads wait for each other at every op), so this
                shows how much of a gap is the loop's threading rather than the tool.

The K configs are the ones the sweep itself samples: Tune's BasicVariantGenerator with the
config's search_seed, pre-sampled here with Tune's own variant generator, and checked
afterwards against the configs Tune actually ran.

Printed: wall time of each side, the ratio orchestrator/loop with and without Ray
start-up, and the per-trial overhead

    overhead per trial = (orchestrator_train_wall - loop_wall) * slots / K      [core-seconds]

where slots = the number of trials Ray runs at once (= cores here). Both sides own the
same cores for their whole wall time (the loop through 2 intra-op threads, the
orchestrator through 2 one-thread trials), so the wall difference times the cores is the
extra machine time the orchestrator spent, spread over K trials (negative = it spent less).
Per-epoch training seconds come from the pool rows' history (epoch_seconds: run_epoch
only), the time inside each trial function from Tune's time_total_s.

Target: orchestrator not slower than the loop on 2 cores (train ratio <= 1.0).

--tiny: K=2 on the tiny glyph task (bench/common.py TINY_TASK), 1-2 epochs per trial.

The pretrained glyph weights (~35-80 s to make) are cached in a pool under
--cache-dir (default: $TMPDIR/orchestrator-bench-cache), shared with bench_greedy.py.
Everything else lives in a temp dir that is removed at the end (--keep to keep it).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402


def parse_args(argv=None):
    p = common.parser("python bench/bench_fanout.py", __doc__)
    p.add_argument("--k", type=int, default=None,
                   help="number of fine-tuning configs (trials) (default: 8; 2 with --tiny)")
    p.add_argument("--search-seed", type=int, default=None,
                   help="seed of the config sampling (default: the config's search_seed)")
    p.add_argument("--loop-threads", type=int, default=2, help="torch threads of the plain loop (default: 2)")
    p.add_argument("--loop-runs", type=int, default=2, choices=(1, 2),
                   help="1: loop then orchestrator; 2: loop, orchestrator, loop again (default: 2)")
    p.add_argument("--ref-threads", type=int, default=1,
                   help="also run the loop once more at the end with this many threads, as a reference "
                        "(default: 1; 0 = skip)")
    p.add_argument("--address", default="local",
                   help="Ray address for tune.connect (default: local = always a fresh private local Ray; "
                        "with no address Ray would attach to a cluster someone started with `ray start`)")
    common.add_cache_flag(p)
    p.add_argument("--show-ray-output", action="store_true",
                   help="let Ray/Tune/MLflow print to the terminal (default: captured in a log, tail shown on error)")
    common.add_keep_flag(p, "pool, mlflow.db, ray_results, logs")
    common.add_tiny_flag(p, "K=2 trials of the tiny glyph task")
    common.add_overrides(p)
    args = p.parse_args(argv)
    if args.k is None:
        args.k = 2 if args.tiny else 8
    if args.k < 1:
        p.error("--k must be >= 1")
    return args


def presample(cfg) -> list[dict]:
    """The K configs the sweep will run: Tune's variant generator, same space, same seed, same order."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.common.config import search_space

    space = search_space(cfg["hyperparameters"])
    rng = _BackwardsCompatibleNumpyRng(cfg["search_seed"])
    out = []
    for _ in range(cfg["num_samples"]):  # as BasicVariantGenerator: one generate_variants pass per sample
        for _resolved, spec in generate_variants({"config": space}, random_state=rng):
            out.append(dict(spec["config"]))
    return out


def config_key(hp: dict) -> tuple:
    """A hashable key for a trial's full hyperparameters (defaults filled in, as FineTune does)."""
    from orchestrator.soup.train import HPARAMS

    return tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in {**HPARAMS, **hp}.items()))


def plain_loop(task, data, init, configs, threads: int) -> dict:
    """What a user would write: fine-tune each config in turn, evaluating after every epoch."""
    import torch

    from orchestrator.soup.train import FineTune, evaluate

    torch.set_num_threads(threads)
    per_trial, epoch_s, finals = [], [], {}
    t0 = time.perf_counter()
    for hp in configs:
        t = time.perf_counter()
        run = FineTune(task, data, init, hp)
        metrics = {}
        while not run.done:
            te = time.perf_counter()
            loss = run.run_epoch()
            epoch_s.append(time.perf_counter() - te)
            if not math.isfinite(loss):
                metrics = {"val_acc": 0.0, "diverged": 1.0}
                break
            metrics = {"train_loss": loss, **evaluate(task, run.model, data)}
            run.history.append({"epoch": run.epoch, **metrics})
        per_trial.append(time.perf_counter() - t)
        finals[config_key(hp)] = metrics.get("val_acc", 0.0)
    return {"wall": time.perf_counter() - t0, "per_trial": per_trial, "epoch_s": epoch_s, "val_acc": finals}


def orchestrated(args, overrides, pre_row, pre_weights, tmp: str, log: str | None) -> dict:
    """The soup sweep's check_inputs, setup and train steps on these K configs, each timed."""
    import ray
    from mlflow import MlflowClient

    from orchestrator.common import tracking, tune
    from orchestrator.common.pool import Pool
    from orchestrator.soup.sweep import SoupSweep
    from orchestrator.soup.sweep import parse_args as sweep_args

    pool_dir = os.path.join(tmp, "pool")
    common.add_row(Pool(pool_dir, create=True), pre_row, pre_weights)  # as ensure_pretrained left it
    argv = ["--pool", pool_dir, "--tracking-uri", f"sqlite:///{os.path.join(tmp, 'mlflow.db')}",
            "--storage", os.path.join(tmp, "ray_results"), "--log-dir", os.path.join(tmp, "logs"),
            "--address", args.address, "--num-samples", str(args.k), *(["--verbose"] if args.show_ray_output else []),
            *overrides]
    sweep_ns = sweep_args(argv)
    sweep_ns.log_file = args.library_log
    sweep = SoupSweep(sweep_ns)
    out: dict = {}
    with common.captured(log):
        t = time.perf_counter()
        sweep.check_inputs()
        out["check_inputs"] = time.perf_counter() - t
        t = time.perf_counter()
        sweep.setup()
        out["setup"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            out["size"] = tune.connect(sweep_ns.address, sweep_ns.verbose)
            out["ray_init"] = time.perf_counter() - t
            t = time.perf_counter()
            sweep.train()
            out["train"] = time.perf_counter() - t
            tracking.end_run(sweep.uri, sweep.parent)
        finally:
            t = time.perf_counter()
            ray.shutdown()
            out["ray_shutdown"] = time.perf_counter() - t
    results = sweep.results
    out["errors"] = [(f.trial_id, f.error) for f in tune.failed_trials(results)]
    out["configs"] = [dict(r.config) for r in results]
    out["time_total_s"] = [float((r.metrics or {}).get("time_total_s", float("nan"))) for r in results]
    runs = MlflowClient(sweep.uri).search_runs([sweep.experiment], filter_string=f"tags.`{tracking.ROLE}` = 'trial'",
                                               max_results=1000)
    out["mlflow_trial_runs"] = len(runs)
    df = sweep.pool.manifest()
    trials = df[df["kind"] == "trial"]
    out["pool_ok"] = int((trials["status"] == "ok").sum())
    out["val_acc"] = {config_key(h): m.get("val_acc", 0.0) for h, m in zip(trials["hparams"], trials["metrics"])}
    # per trial: the training seconds of each epoch (run_epoch only), from the pool rows' history
    out["epoch_s"] = [[float(e["epoch_seconds"]) for e in h if "epoch_seconds" in e] for h in trials["history"]]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    with common.temp_dir("bench_fanout-", args.keep, cd=True) as tmp:  # as if the sweep ran there
        # first, as soup_sweep's main() does: the quiet environment Ray's workers inherit, library logs to a file
        args.library_log = common.route_library_output(os.path.join(tmp, "logs"), "soup_sweep", args.show_ray_output)
        try:
            return run(args, tmp, t_start)
        finally:
            common.unroute_library_output(os.path.join(tmp, "logs"))


def run(args, tmp: str, t_start: float) -> int:
    t = time.perf_counter()
    import torch  # noqa: F401

    from orchestrator.soup.train import FineTune  # noqa: F401
    t_imp_torch = time.perf_counter() - t
    t = time.perf_counter()
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    from ray import tune  # noqa: F401
    t_imp_ray = time.perf_counter() - t

    overrides = common.soup_overrides(
        args, f"num_samples={args.k}", *([f"search_seed={args.search_seed}"] if args.search_seed is not None else []),
        # the same work on both sides: the loop records no training dynamics (with mixup, an extra
        # forward pass: bench_dynamics.py measures it) and estimates no Fisher (the fisher recipe's input)
        "record_dynamics=false", "soup.recipes=[uniform_soup, greedy_soup]")
    cfg = common.load_soup_config(overrides)
    from orchestrator.soup.config import make_task

    task = make_task(cfg)
    data = task.data()
    pre_row, pre_weights = common.cached_pretrained(args.cache_dir, task, data, cfg["sweep"])
    configs = presample(cfg)
    epochs = [c.get("epochs", 4) for c in configs]
    print(f"bench_fanout: K={args.k} configs from the default search space{' (--tiny task)' if args.tiny else ''} "
          f"(search_seed={cfg['search_seed']}), {sum(epochs)} epochs in all (per trial: {epochs}); "
          f"{os.cpu_count()} CPUs visible, load average {common.load():.2f}")
    print(f"imports (not in any timing below): torch+orchestrator {t_imp_torch:.1f} s, ray+tune+mlflow {t_imp_ray:.1f} s")

    log = None if args.show_ray_output else os.path.join(tmp, "ray_mlflow_output.log")
    loops, ref = [], None
    step = iter(range(1, 10))

    def loop_phase(threads: int, label: str) -> dict:
        print(f"[{next(step)}] {label} ({threads} torch thread{'s' if threads > 1 else ''}) ...", flush=True)
        r = plain_loop(task, data, pre_weights, configs, threads)
        r["load"] = common.load()
        print(f"    {r['wall']:.1f} s (load average {r['load']:.2f})", flush=True)
        return r

    loops.append(loop_phase(args.loop_threads, "plain loop"))
    print(f"[{next(step)}] orchestrator (SoupSweep check_inputs, setup, train: {cfg['resources']['cpu']:g} CPU per "
          f"trial, real pool + sqlite MLflow) ...", flush=True)
    try:
        orch = orchestrated(args, overrides, pre_row, pre_weights, tmp, log)
    except BaseException:
        for path in filter(None, (log, args.library_log)):
            print(f"--- last lines of {path} ---\n{common.tail(path)}", file=sys.stderr)
        raise
    orch["load"] = common.load()
    print(f"    train {orch['train']:.1f} s (+ ray.init {orch['ray_init']:.1f} s) "
          f"(load average {orch['load']:.2f})", flush=True)
    if args.loop_runs == 2:
        loops.append(loop_phase(args.loop_threads, "plain loop again"))
    if args.ref_threads and args.ref_threads != args.loop_threads:
        ref = loop_phase(args.ref_threads, "reference: plain loop")
    report(args, cfg, configs, loops, ref, orch, log)
    print(f"bench_fanout finished in {time.perf_counter() - t_start:.0f} s (load average now {common.load():.2f})")
    return 0


def report(args, cfg, configs, loops, ref, orch, log) -> None:
    k = len(configs)
    slots = int(max(1, orch["size"]["ray_cpus"] // max(1, cfg["resources"]["cpu"])))
    if cfg["max_concurrent_trials"]:
        slots = min(slots, cfg["max_concurrent_trials"])
    slots = min(slots, k)
    loop_wall = min(lp["wall"] for lp in loops)  # contention only slows a run: the faster is the truer cost
    train = orch["train"]
    with_init = orch["ray_init"] + train
    set_up = orch["check_inputs"] + orch["setup"]
    end_to_end = set_up + orch["ray_init"] + train + orch["ray_shutdown"]
    overhead = (train - loop_wall) * slots / k

    print()
    print("== checks ==")
    same = sorted(map(config_key, orch["configs"])) == sorted(map(config_key, configs))
    print(f"configs Tune ran == configs the loop ran: {'yes' if same else 'NO'}")
    print(f"trials errored: {len(orch['errors'])}; pool rows with status ok: {orch['pool_ok']}/{k}; "
          f"MLflow trial runs: {orch['mlflow_trial_runs']}/{k}")
    loop_acc = loops[0]["val_acc"]
    both = [key for key in loop_acc if key in orch["val_acc"]]
    agree = sum(abs(loop_acc[key] - orch["val_acc"][key]) < 1e-9 for key in both)
    diffs = [abs(loop_acc[key] - orch["val_acc"][key]) for key in both]
    print(f"final val_acc identical loop vs trial: {agree}/{len(both)} "
          f"(max |diff| {max(diffs, default=0.0):.4f}; 2-thread vs 1-thread float sums can differ)")
    for tid, err in orch["errors"]:
        print(f"  trial {tid}: {err}")
    if log:
        print(f"Ray/Tune/MLflow console output: {common.count_lines(log)} lines captured, library log "
              f"{common.count_lines(args.library_log)} lines (--show-ray-output to see them)")

    print()
    print(f"== wall time, K={k} trials, {slots} trials at a time in Ray ==")
    for i, lp in enumerate(loops):
        when = "before" if i == 0 else "after"
        print(f"plain loop, {args.loop_threads} threads, {when} the orchestrator {lp['wall']:7.1f} s   "
              f"per trial {' '.join(f'{x:.1f}' for x in lp['per_trial'])}")
    if len(loops) > 1:
        print(f"plain loop, {args.loop_threads} threads, faster run (used below) {loop_wall:5.1f} s")
    if ref:
        print(f"reference: plain loop, {args.ref_threads} thread(s), last   {ref['wall']:7.1f} s   "
              f"per trial {' '.join(f'{x:.1f}' for x in ref['per_trial'])}")
    print(f"orchestrator: check_inputs + setup       {set_up:7.1f} s   (check_inputs {orch['check_inputs']:.1f} s: "
          f"config, task data, MLflow, pool; setup {orch['setup']:.1f} s: pretrained from the pool, MLflow parent run)")
    print(f"orchestrator: ray.init (tune.connect)    {orch['ray_init']:7.1f} s")
    print(f"orchestrator: train (SoupSweep.train)    {train:7.1f} s")
    print(f"orchestrator: ray.shutdown               {orch['ray_shutdown']:7.1f} s")
    inside = [x for x in orch["time_total_s"] if math.isfinite(x)]
    if inside:
        share = sum(inside) / (train * slots)
        print(f"inside the trial functions (Tune time_total_s, summed) {sum(inside):.1f} slot-s of "
              f"{train * slots:.1f} slot-s = train wall x {slots} slots ({share:.0%}); the rest is trial start-up, "
              f"scheduling and slots left idle")
        if ref and args.ref_threads == int(cfg["resources"]["cpu"]):
            print(f"inside run_trial beyond the same training + evaluation in the {args.ref_threads}-thread loop: "
                  f"({sum(inside):.1f} - {ref['wall']:.1f}) / {k} = {(sum(inside) - ref['wall']) / k:.2f} s per trial "
                  f"(MLflow, checkpoints, pool, tune.report round trips, worker start-up, and the CPU two concurrent "
                  f"trials lose to each other, to Ray's own processes and to other users)")
    epochs = orch.get("epoch_s") or []
    trial_epochs = [x for per_trial in epochs for x in per_trial]
    if trial_epochs:
        first = [per_trial[0] for per_trial in epochs if per_trial]
        later = [x for per_trial in epochs for x in per_trial[1:]]
        train_in_trials = sum(trial_epochs)
        print(f"training seconds per epoch in the trials (pool history epoch_seconds, run_epoch only, "
              f"{slots} at a time, 1 thread each): median {statistics.median(trial_epochs):.2f}; first epoch of each "
              f"trial {' '.join(f'{x:.2f}' for x in first)}; later epochs median "
              f"{f'{statistics.median(later):.2f}' if later else 'n/a'}")
        loop_best = min(loops, key=lambda lp: lp["wall"])
        print(f"training seconds per epoch in the loop (run_epoch only): median "
              f"{statistics.median(loop_best['epoch_s']):.2f} ({args.loop_threads} threads, faster run)"
              + (f", {statistics.median(ref['epoch_s']):.2f} ({args.ref_threads} thread(s))" if ref else ""))
        if inside:
            print(f"inside the trial functions but outside run_epoch: ({sum(inside):.1f} - {train_in_trials:.1f}) / "
                  f"{k} = {(sum(inside) - train_in_trials) / k:.2f} s per trial (evaluation every epoch, MLflow, "
                  f"checkpoints, pool, reports)")
    print()
    print("== comparison ==")
    print(f"ratio orchestrator/loop, train only                       {train / loop_wall:5.2f}x")
    print(f"ratio orchestrator/loop, ray.init + train                 {with_init / loop_wall:5.2f}x")
    print(f"ratio orchestrator/loop, set-up+init+train+shutdown       {end_to_end / loop_wall:5.2f}x   "
          f"(set-up includes reading the task data, which the loop was handed)")
    print(f"per-trial overhead = (orchestrator_train_wall - loop_wall) * slots / K "
          f"= ({train:.1f} - {loop_wall:.1f}) * {slots} / {k} = {overhead:+.2f} core-s per trial")
    print(f"   (both sides own the same {slots} cores for their whole wall time; "
          f"negative = the orchestrator used less machine time)")
    print(f"   with ray.init charged to the trials too: "
          f"({with_init:.1f} - {loop_wall:.1f}) * {slots} / {k} = {(with_init - loop_wall) * slots / k:+.2f} core-s per trial")
    phases = [loops[0], orch, *loops[1:], *([ref] if ref else [])]
    loads = ", ".join(f"{p['load']:.1f}" for p in phases)
    if ref:
        print(f"reference: ratio orchestrator train / {args.ref_threads}-thread loop  {train / ref['wall']:5.2f}x")
    print(f"1-min load average at the end of each phase, in run order (own load ~2 included): {loads}")
    met = train <= loop_wall
    print(f"target: orchestrator not slower than the loop on 2 cores (train only): "
          f"{'MET' if met else 'NOT MET'} ({train:.1f} s vs {loop_wall:.1f} s); "
          f"with Ray start-up: {'MET' if with_init <= loop_wall else 'NOT MET'} ({with_init:.1f} s)")
    best = min([loop_wall] + ([ref["wall"]] if ref else []))
    if best < loop_wall:
        print(f"target against the fastest plain loop of any thread count ({args.ref_threads}-thread reference, "
              f"{best:.1f} s): {'MET' if train <= best else 'NOT MET'} "
              f"(train {train / best:.2f}x, ray.init + train {with_init / best:.2f}x)")
    walls = [lp["wall"] for lp in loops]
    if max(walls) > 1.5 * min(walls):
        print(f"CAUTION: the {args.loop_threads}-thread loop runs range {min(walls):.1f}..{max(walls):.1f} s: "
              f"other users' load moved them, not the code; "
              + ("quote the fastest-loop line" if best < loop_wall else "rerun on a quieter machine"))


if __name__ == "__main__":
    sys.exit(main())
