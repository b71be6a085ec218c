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
dir, timed from the outside (Ray start-up included); --default also times the default preset.

    python bench/bench_proxy.py [--width 64] [--steps 150] [--repeats 5] [--default] [--skip-study]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from orchestrator.lr_sensitivity import load_config
from orchestrator.proxy_data import load_corpus
from orchestrator.proxy_model import lm_loss, lr_schedule
from orchestrator.proxy_trial import ProxyRun


def run_study_loop(settings, width, lr, data, diagnostics: bool) -> float:
    run = ProxyRun(settings, width, lr, 0, data, diagnostics=diagnostics)
    t0 = time.process_time()
    while not run.done:
        record = run.train_step()
        if record is not None:
            run.history.append(record)
    return time.process_time() - t0


def run_bare_loop(settings, width, lr, data) -> float:
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


def time_study(preset: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.lr_sensitivity", "--preset", preset],
                              cwd=tmp, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"the {preset} study failed:\n{proc.stderr[-2000:]}")
        print("\n".join(line for line in proc.stdout.splitlines() if "runs analysed" in line))
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=None, help="default: the default preset's settings.steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--default", action="store_true", help="also time the default preset (about 12 minutes)")
    p.add_argument("--skip-study", action="store_true", help="only the tokens/s comparison")
    args = p.parse_args()

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
          f"load average {os.getloadavg()[0]:.1f}")
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
            print(f"{preset} preset study wall time: {time_study(preset):.0f} s "
                  f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
