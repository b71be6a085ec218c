"""Benchmark: the cost of the proxy run's diagnostics, and the study's wall time.

What is measured:

  bare         the same ProxyLM and batches in a plain PyTorch loop: forward, cross-entropy,
               backward, clip, AdamW (one parameter group), LR schedule. What a user would write.
  diag off     ProxyRun(diagnostics=False): the study's loop with only the training loss
               and the divergence check (records every log_every steps, no probe).
  diag on      ProxyRun(diagnostics=True), as in every study trial: every log_every steps
               a probe forward with explicit attention (max logit per layer, log Z), the
               global gradient norm, and grad/update RMS and StableAdamW RMS_t of two layers.

Each mode trains one proxy (default: width 64 and the default preset's settings) for
--steps steps with torch.set_num_threads(1), as one trial does; the modes are run
interleaved --repeats times (bare, off, on, bare, off, on, ...) so drift from other load
on the machine hits all three. Each loop is timed in process CPU time, not wall time:
with one thread that is the loop's own compute, which other users' processes on a shared
machine barely move (wall time under load swings by +-20%). Reported: tokens per CPU
second of the fastest repeat (the comparisons use it) and of the median repeat. Model
set-up and the initial validation loss are outside the timed loop. Target: diagnostics
cost under 5%.

Then the study's wall time: `python -m orchestrator.lr_sensitivity --preset quick` in a temp
dir on a fresh local Ray, timed from the outside (Ray start-up included); --default also
times the default preset.

--tiny: 20 steps, 1 repeat, and a 2-run study (the quick preset at 20 steps, 1 LR, baseline only).

    python bench/bench_proxy.py [--width 64] [--steps 150] [--repeats 5] [--default] [--skip-study] [--tiny]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402

TINY_STEPS = 20
TINY_STUDY = ["settings.steps=20", "settings.warmup_steps=2", "settings.probe_step=10",
              "grid.lrs=[1.0e-2]", "grid.interventions=[baseline]"]  # over the quick preset: 2 runs, one per width


def parse_args(argv=None):
    p = common.parser("python bench/bench_proxy.py", __doc__)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=None,
                   help=f"default: the default preset's settings.steps ({TINY_STEPS} with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="default: 5 (1 with --tiny)")
    p.add_argument("--default", action="store_true", help="also time the default preset (about 12 minutes)")
    p.add_argument("--skip-study", action="store_true", help="only the tokens/s comparison")
    p.add_argument("--address", default="local",
                   help="Ray address the study runs on (default: local = a fresh private local Ray)")
    common.add_tiny_flag(p, f"{TINY_STEPS} steps, 1 repeat, a 2-run study")
    args = p.parse_args(argv)
    if args.steps is None and args.tiny:
        args.steps = TINY_STEPS
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 5
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        p.error("--repeats and --steps must be >= 1")
    return args


def run_study_loop(settings, width, lr, data, diagnostics: bool) -> float:
    from orchestrator.proxy.run import ProxyRun

    run = ProxyRun(settings, width, lr, 0, data, diagnostics=diagnostics)
    t0 = time.process_time()
    while not run.done:
        record = run.train_step()
        if record is not None:
            run.history.append(record)
    return time.process_time() - t0


def run_bare_loop(settings, width, lr, data) -> float:
    import torch

    from orchestrator.proxy.model import lm_loss, lr_schedule
    from orchestrator.proxy.run import ProxyRun

    run = ProxyRun(settings, width, lr, 0, data, diagnostics=False)  # same model, init and batches
    model, gen, s = run.model, run.gen, settings
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(s["beta1"], s["beta2"]), eps=s["eps"],
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_schedule(t, s["warmup_steps"], s["steps"], s["lr_floor"]))
    t0 = time.process_time()
    for _ in range(s["steps"]):
        x, y = data.batch("train", s["batch_size"], s["seq_len"], gen)
        loss = lm_loss(model(x), y, s["z_loss"])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        opt.step()
        sched.step()
    return time.process_time() - t0


def time_study(preset: str, overrides: list[str], address: str) -> float:
    """`python -m orchestrator.lr_sensitivity` in a temp dir (pool, MLflow, Ray results and logs
    land there and are removed), timed from the outside."""
    with common.temp_dir(f"bench_proxy-{preset}-") as tmp:
        cmd = [sys.executable, "-m", "orchestrator.lr_sensitivity", "--preset", preset, "--address", address,
               *overrides]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=common.child_env())
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"the {preset} study failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        print("\n".join(line for line in proc.stdout.splitlines() if "runs analysed" in line))
    return wall


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from orchestrator.proxy.config import load_config
    from orchestrator.proxy.data import load_corpus

    cfg = load_config()
    settings = dict(cfg["settings"], **({"steps": args.steps} if args.steps else {}))
    torch.set_num_threads(1)
    data = load_corpus(**cfg["data"])
    tokens = settings["steps"] * settings["batch_size"] * settings["seq_len"]
    modes = {"bare": lambda: run_bare_loop(settings, args.width, args.lr, data),
             "diag off": lambda: run_study_loop(settings, args.width, args.lr, data, False),
             "diag on": lambda: run_study_loop(settings, args.width, args.lr, data, True)}
    print(f"one proxy: width {args.width}, depth {settings['depth']}, {settings['steps']} steps x "
          f"{settings['batch_size']} x {settings['seq_len']} tokens, 1 thread, {args.repeats} interleaved repeats, "
          f"load average {common.load():.1f}")
    modes["bare"]()  # warm-up: first-call costs of the kernels
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m, fn in modes.items():
            times[m].append(fn())
    bare = min(times["bare"])
    print(f"{'mode':10s} {'tokens/CPU-s (best)':>20s} {'(median)':>9s} {'vs bare (best)':>15s}")
    for m, ts in times.items():
        print(f"{m:10s} {tokens / min(ts):20.0f} {tokens / statistics.median(ts):9.0f} "
              f"{100 * (min(ts) / bare - 1):+14.1f}%")
    on, off = min(times["diag on"]), min(times["diag off"])
    print(f"diagnostics cost (on vs off, best of {args.repeats}): {100 * (on / off - 1):+.1f}%  (target < 5%); "
          f"medians: {100 * (statistics.median(times['diag on']) / statistics.median(times['diag off']) - 1):+.1f}%")

    if not args.skip_study:
        for preset in ["quick"] + (["default"] if args.default else []):
            overrides = TINY_STUDY if args.tiny and preset == "quick" else []
            label = f"{preset} preset study{' (--tiny: ' + ' '.join(overrides) + ')' if overrides else ''}"
            print(f"{label} wall time: {time_study(preset, overrides, args.address):.0f} s "
                  f"(load average {common.load():.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
