"""Benchmark: the same K fine-tunes through the orchestrator versus a plain Python loop.

What is measured, on the same machine and in the same run:

  loop          one process, torch.set_num_threads(2) (all cores), for each config:
                FineTune(...) every epoch + evaluate() on every eval set after each epoch
                (the trial evaluates every epoch too). No Ray, no MLflow, no pool: what a
                user would write without the tool. Run before AND after the orchestrator
                (--loop-runs 2, the default) so drift from other users' load shows up;
                the comparison uses the faster loop run (other users' load only ever
                slows a run down, so this is conservative for the orchestrator).
  orchestrator  the same K configs through orchestrator.fanout.run exactly as
                `python -m orchestrator.soup_sweep` wires it: the default config
                (search_spaces/glyphs_soup.yaml) with num_samples=K, a real Pool and a
                real sqlite MLflow store in a temp dir, resources 1 CPU per trial (so on
                2 cores 2 trials run at once), reuse_actors, a checkpoint every epoch.
                Timed separately: MLflow store set-up + parent run, ray.init (fanout.connect),
                the Tune fit (fanout.run), ray.shutdown.
  reference     the loop once more at the end with 1 torch thread (--ref-threads): on a
                2-core machine that other users load too, 2 intra-op threads can be many
                times slower than 1 (threads wait for each other at every op), so this
                shows how much of a gap is the loop's threading rather than the tool.

The K configs are the ones the sweep itself would sample: Tune's BasicVariantGenerator
with the config's search_seed, pre-sampled here with Tune's own variant generator, and
checked afterwards against the configs Tune actually ran.

Printed: wall time of each side, the ratio orchestrator/loop with and without Ray
start-up, and the per-trial overhead

    overhead per trial = (orchestrator_fit_wall - loop_wall) * slots / K      [core-seconds]

where slots = the number of trials Ray runs at once (= cores here). Both sides own the
same cores for their whole wall time (the loop through 2 intra-op threads, the
orchestrator through 2 one-thread trials), so the wall difference times the cores is the
extra machine time the orchestrator spent, spread over K trials (negative = it spent less).

Target: orchestrator not slower than the loop on 2 cores (fit ratio <= 1.0).

The pretrained glyph weights (~35-80 s to make) are cached in a pool under
--cache-dir (default: $TMPDIR/orchestrator-bench-cache), shared with bench_greedy.py.
Everything else lives in a temp dir that is removed at the end (--keep to keep it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "orchestrator-bench-cache")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_fanout.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=8, help="number of fine-tuning configs (trials) (default: 8)")
    p.add_argument("--search-seed", type=int, default=None,
                   help="seed of the config sampling (default: the config's search_seed)")
    p.add_argument("--loop-threads", type=int, default=2, help="torch threads of the plain loop (default: 2)")
    p.add_argument("--loop-runs", type=int, default=2, choices=(1, 2),
                   help="1: loop then orchestrator; 2: loop, orchestrator, loop again (default: 2)")
    p.add_argument("--ref-threads", type=int, default=1,
                   help="also run the loop once more at the end with this many threads, as a reference "
                        "(default: 1; 0 = skip)")
    p.add_argument("--address", default="local",
                   help="Ray address for fanout.connect (default: local = always a fresh private local Ray; "
                        "with no address Ray would attach to a cluster someone started with `ray start`)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help=f"where the pretrained weights are cached (default: {DEFAULT_CACHE})")
    p.add_argument("--show-ray-output", action="store_true",
                   help="let Ray/Tune/MLflow print to the terminal (default: captured in a log, tail shown on error)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (pool, mlflow.db, ray_results, log)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides as for soup_sweep, e.g. hyperparameters.epochs=2")
    return p.parse_args(argv)


@contextlib.contextmanager
def captured(path: str | None):
    """Send this process's stdout/stderr (file descriptors, so Ray's log forwarding too) to a file."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def presample(cfg) -> list[dict]:
    """The K configs fanout.run will run: Tune's variant generator, same space, same seed, same order."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.config import search_space

    space = search_space(cfg["hyperparameters"])
    rng = _BackwardsCompatibleNumpyRng(cfg["search_seed"])
    out = []
    for _ in range(cfg["num_samples"]):  # as BasicVariantGenerator: one generate_variants pass per sample
        for _resolved, spec in generate_variants({"config": space}, random_state=rng):
            out.append(dict(spec["config"]))
    return out


def config_key(hp: dict) -> tuple:
    """A hashable key for a trial's full hyperparameters (defaults filled in, as FineTune does)."""
    from orchestrator.train import HPARAMS

    return tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in {**HPARAMS, **hp}.items()))


def cached_pretrained(cache_dir: str, task, sweep: str):
    from orchestrator.pool import Pool
    from orchestrator.soup_sweep import ensure_pretrained

    pool = Pool(os.path.join(cache_dir, "pool"), create=True)
    row = ensure_pretrained(pool, task, sweep)
    return row, pool.load(row)


def plain_loop(task, data, init, configs, threads: int) -> dict:
    """What a user would write: fine-tune each config in turn, evaluating after every epoch."""
    import torch

    from orchestrator.train import FineTune, evaluate

    torch.set_num_threads(threads)
    per_trial, finals = [], {}
    t0 = time.perf_counter()
    for hp in configs:
        t = time.perf_counter()
        run = FineTune(task, data, init, hp)
        metrics = {}
        while not run.done:
            loss = run.run_epoch()
            if not math.isfinite(loss):
                metrics = {"val_acc": 0.0, "diverged": 1.0}
                break
            metrics = {"train_loss": loss, **evaluate(task, run.model, data)}
            run.history.append({"epoch": run.epoch, **metrics})
        per_trial.append(time.perf_counter() - t)
        finals[config_key(hp)] = metrics.get("val_acc", 0.0)
    return {"wall": time.perf_counter() - t0, "per_trial": per_trial, "val_acc": finals}


def orchestrated(cfg, task, data, pre_row, pre_weights, tmp: str, log: str | None, address: str) -> dict:
    """The sweep's train() step on these K configs, with each phase timed."""
    import ray

    from orchestrator import fanout, tracking
    from orchestrator.config import task_settings
    from orchestrator.pool import Pool
    from orchestrator.trial import SweepContext

    pool = Pool(os.path.join(tmp, "pool"), create=True)
    pool.add(pre_row, pre_weights)  # the pretrained row, as ensure_pretrained leaves it in a sweep's pool
    uri = f"sqlite:///{os.path.join(tmp, 'mlflow.db')}"
    out: dict = {"pool": pool}
    with captured(log):
        t = time.perf_counter()
        exp = tracking.experiment_id(uri, cfg["sweep"])
        parent = tracking.start_run(uri, exp, f"{cfg['sweep']}-bench", "sweep", tags={tracking.SWEEP: cfg["sweep"]},
                                    params={"num_samples": cfg["num_samples"], "pretrained_id": pre_row["id"]})
        out["mlflow_setup"] = time.perf_counter() - t

        t = time.perf_counter()
        size = fanout.connect(address)
        out["ray_init"] = time.perf_counter() - t
        out["size"] = size
        try:
            ctx = SweepContext(sweep=cfg["sweep"], task_name=task.name, task_settings=task_settings(cfg),
                               pool_uri=pool.uri, pretrained_id=pre_row["id"], tracking_uri=uri, experiment_id=exp,
                               parent_run_id=parent, cpus_per_trial=int(max(1, cfg["resources"]["cpu"])))
            t = time.perf_counter()
            results = fanout.run(cfg, ctx, data, os.path.join(tmp, "ray_results"), name=f"{cfg['sweep']}-bench")
            out["fit"] = time.perf_counter() - t
            out["errors"] = fanout.errored_trial_ids(results)
            out["configs"] = [r.config for r in results]
            out["time_total_s"] = [r.metrics.get("time_total_s", float("nan")) for r in results]
            out["iters"] = []  # per trial: seconds per epoch as Tune saw them (training, evaluation, report)
            for r in results:
                df = r.metrics_dataframe
                if df is not None and "time_this_iter_s" in df:
                    out["iters"].append([float(x) for x in df["time_this_iter_s"]])
            tracking.end_run(uri, parent)
        finally:
            t = time.perf_counter()
            ray.shutdown()
            out["ray_shutdown"] = time.perf_counter() - t
    from mlflow import MlflowClient

    runs = MlflowClient(uri).search_runs([exp], filter_string=f"tags.`{tracking.ROLE}` = 'trial'", max_results=1000)
    out["mlflow_trial_runs"] = len(runs)
    df = pool.manifest()
    trials = df[df["kind"] == "trial"]
    out["pool_ok"] = int((trials["status"] == "ok").sum())
    out["val_acc"] = {config_key(h): m.get("val_acc", 0.0) for h, m in zip(trials["hparams"], trials["metrics"])}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()

    t = time.perf_counter()
    import torch  # noqa: F401

    from orchestrator.config import load_config, make_task
    t_imp_torch = time.perf_counter() - t
    t = time.perf_counter()
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    from ray import tune  # noqa: F401
    t_imp_ray = time.perf_counter() - t

    overrides = [f"num_samples={args.k}"] + ([f"search_seed={args.search_seed}"] if args.search_seed is not None else [])
    cfg = load_config(None, list(args.overrides) + overrides)
    task = make_task(cfg)
    pre_row, pre_weights = cached_pretrained(args.cache_dir, task, cfg["sweep"])
    data = task.data()
    configs = presample(cfg)
    epochs = [c.get("epochs", 4) for c in configs]
    print(f"bench_fanout: K={args.k} configs from the default search space (search_seed={cfg['search_seed']}), "
          f"{sum(epochs)} epochs in all (per trial: {epochs}); {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"imports (not in any timing below): torch+orchestrator {t_imp_torch:.1f} s, ray+tune+mlflow {t_imp_ray:.1f} s")

    tmp = tempfile.mkdtemp(prefix="bench_fanout-")
    log = None if args.show_ray_output else os.path.join(tmp, "ray_mlflow_output.log")
    loops, ref, orch = [], None, None
    step = iter(range(1, 10))

    def loop_phase(threads: int, label: str) -> dict:
        print(f"[{next(step)}] {label} ({threads} torch thread{'s' if threads > 1 else ''}) ...", flush=True)
        r = plain_loop(task, data, pre_weights, configs, threads)
        r["load"] = os.getloadavg()[0]
        print(f"    {r['wall']:.1f} s (load average {r['load']:.2f})", flush=True)
        return r

    try:
        loops.append(loop_phase(args.loop_threads, "plain loop"))
        print(f"[{next(step)}] orchestrator (fanout.run, {cfg['resources']['cpu']:g} CPU per trial, "
              f"real pool + sqlite MLflow) ...", flush=True)
        try:
            orch = orchestrated(cfg, task, data, pre_row, pre_weights, tmp, log, args.address)
        except BaseException:
            if log:
                print(f"--- last lines of the Ray/MLflow output ({log}) ---\n{tail(log)}", file=sys.stderr)
            raise
        orch["load"] = os.getloadavg()[0]
        print(f"    fit {orch['fit']:.1f} s (+ ray.init {orch['ray_init']:.1f} s) "
              f"(load average {orch['load']:.2f})", flush=True)
        if args.loop_runs == 2:
            loops.append(loop_phase(args.loop_threads, "plain loop again"))
        if args.ref_threads and args.ref_threads != args.loop_threads:
            ref = loop_phase(args.ref_threads, "reference: plain loop")
        report(args, cfg, configs, loops, ref, orch, log)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench_fanout finished in {time.perf_counter() - t_start:.0f} s "
          f"(load average now {os.getloadavg()[0]:.2f})")
    return 0


def report(args, cfg, configs, loops, ref, orch, log) -> None:
    k = len(configs)
    slots = int(max(1, orch["size"]["ray_cpus"] // max(1, cfg["resources"]["cpu"])))
    if cfg["max_concurrent_trials"]:
        slots = min(slots, cfg["max_concurrent_trials"])
    slots = min(slots, k)
    loop_wall = min(lp["wall"] for lp in loops)  # contention only slows a run: the faster is the truer cost
    fit = orch["fit"]
    with_init = orch["ray_init"] + fit
    end_to_end = orch["mlflow_setup"] + orch["ray_init"] + fit + orch["ray_shutdown"]
    overhead = (fit - loop_wall) * slots / k

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
    if orch["errors"]:
        for tid, err in orch["errors"]:
            print(f"  trial {tid}: {err}")
    if log:
        with open(log, errors="replace") as f:
            n = sum(1 for _ in f)
        print(f"Ray/Tune/MLflow console output: {n} lines captured (--show-ray-output to see it)")

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
    print(f"orchestrator: MLflow store + parent run {orch['mlflow_setup']:7.1f} s")
    print(f"orchestrator: ray.init (fanout.connect) {orch['ray_init']:7.1f} s")
    print(f"orchestrator: Tune fit (fanout.run)     {fit:7.1f} s")
    print(f"orchestrator: ray.shutdown              {orch['ray_shutdown']:7.1f} s")
    inside = [x for x in orch["time_total_s"] if math.isfinite(x)]
    if inside:
        share = sum(inside) / (fit * slots)
        print(f"inside the trial functions (Tune time_total_s, summed) {sum(inside):.1f} slot-s of "
              f"{fit * slots:.1f} slot-s = fit wall x {slots} slots ({share:.0%}); the rest is trial start-up, "
              f"scheduling and slots left idle")
        if ref and args.ref_threads == int(cfg["resources"]["cpu"]):
            print(f"inside run_trial beyond the same training + evaluation in the {args.ref_threads}-thread loop: "
                  f"({sum(inside):.1f} - {ref['wall']:.1f}) / {k} = {(sum(inside) - ref['wall']) / k:.2f} s per trial "
                  f"(MLflow, checkpoints, pool, tune.report round trips, worker start-up, and the CPU two concurrent "
                  f"trials lose to each other, to Ray's own processes and to other users: trials run at nice 15)")
    iters = orch.get("iters") or []
    if iters:
        n_ep = sum(len(it) for it in iters)
        later = [x for it in iters for x in it[1:]]
        print(f"seconds per epoch in the trials (Tune time_this_iter_s: train + evaluate + MLflow + checkpoint + report): "
              f"first epoch of each trial {' '.join(f'{it[0]:.1f}' for it in iters)}; "
              f"later epochs median {f'{statistics.median(later):.2f}' if later else 'n/a'}")
        print(f"seconds per epoch in the loop: {loop_wall / n_ep:.2f} ({args.loop_threads} threads, faster run)"
              + (f", {ref['wall'] / n_ep:.2f} ({args.ref_threads} thread(s))" if ref else "")
              + "; a Ray worker's first trial also pays its process start-up (torch, MLflow store ~2 s, task data)")
    print()
    print("== comparison ==")
    print(f"ratio orchestrator/loop, fit only                 {fit / loop_wall:5.2f}x")
    print(f"ratio orchestrator/loop, ray.init + fit           {with_init / loop_wall:5.2f}x")
    print(f"ratio orchestrator/loop, MLflow+init+fit+shutdown {end_to_end / loop_wall:5.2f}x")
    print(f"per-trial overhead = (orchestrator_fit_wall - loop_wall) * slots / K "
          f"= ({fit:.1f} - {loop_wall:.1f}) * {slots} / {k} = {overhead:+.2f} core-s per trial")
    print(f"   (both sides own the same {slots} cores for their whole wall time; "
          f"negative = the orchestrator used less machine time)")
    print(f"   with ray.init charged to the trials too: "
          f"({with_init:.1f} - {loop_wall:.1f}) * {slots} / {k} = {(with_init - loop_wall) * slots / k:+.2f} core-s per trial")
    phases = [loops[0], orch, *loops[1:], *([ref] if ref else [])]
    loads = ", ".join(f"{p['load']:.1f}" for p in phases)
    if ref:
        print(f"reference: ratio orchestrator fit / {args.ref_threads}-thread loop  {fit / ref['wall']:5.2f}x")
    print(f"1-min load average at the end of each phase, in run order (own load ~2 included): {loads}")
    met = fit <= loop_wall
    print(f"target: orchestrator not slower than the loop on 2 cores (fit only): "
          f"{'MET' if met else 'NOT MET'} ({fit:.1f} s vs {loop_wall:.1f} s); "
          f"with Ray start-up: {'MET' if with_init <= loop_wall else 'NOT MET'} ({with_init:.1f} s)")
    best = min([loop_wall] + ([ref["wall"]] if ref else []))
    if best < loop_wall:
        print(f"target against the fastest plain loop of any thread count ({args.ref_threads}-thread reference, "
              f"{best:.1f} s): {'MET' if fit <= best else 'NOT MET'} "
              f"(fit {fit / best:.2f}x, ray.init + fit {with_init / best:.2f}x)")
    walls = [lp["wall"] for lp in loops]
    if max(walls) > 1.5 * min(walls):
        print(f"CAUTION: the {args.loop_threads}-thread loop runs range {min(walls):.1f}..{max(walls):.1f} s: "
              f"other users' load moved them, not the code; "
              + ("quote the fastest-loop line" if best < loop_wall else "rerun on a quieter machine"))

if __name__ == "__main__":
    sys.exit(main())
