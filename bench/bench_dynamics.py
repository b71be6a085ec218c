"""Benchmark: what recording training dynamics costs a fine-tuning trial.

The default glyph task (its cached pretrained weights, its real training set of 899 digits) is
fine-tuned with the FineTune loop a trial runs, once with `record_dynamics` on and once off, the
same hyperparameters and seed, one torch thread (one trial per CPU, as a sweep runs them). The
two are timed side by side, alternating which goes first, --repeats times; the table shows the
median seconds per epoch and the ratio on / off.

  mixup 0     recording reads the training forward pass's own logits: a softmax and a gather
              per batch (target: <= 1.03x)
  mixup > 0   the training forward pass sees mixed inputs, so recording costs one more forward
              pass of the unmixed batch (no gradient): expect more, and say how much

Also timed: writing one trial's dynamics table into a pool (what a trial does once, at its end).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`

from bench import common  # noqa: E402

TARGET = 1.03


def parse_args(argv=None):
    p = common.parser("python bench/bench_dynamics.py", __doc__)
    common.add_tiny_flag(p, "the tiny task, 1 epoch, 1 repeat")
    common.add_cache_flag(p)
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed run (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed pairs per setting (default 5)")
    p.add_argument("--mixup", type=float, nargs="+", default=[0.0, 0.2], help="mixup alphas to time (default 0 0.2)")
    common.add_overrides(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs, args.repeats = 1, 1
    return args


def timed_epochs(task, data, init, hp, record: bool, epochs: int) -> tuple[float, object]:
    from orchestrator.soup.train import FineTune

    run = FineTune(task, data, init, {**hp, "epochs": epochs}, record_dynamics=record)
    t0 = time.perf_counter()
    while not run.done:
        run.run_epoch()
    return (time.perf_counter() - t0) / epochs, run


def main(argv=None) -> int:
    args = parse_args(argv)
    import pyarrow as pa
    import torch

    from orchestrator.common.pool import Pool, Row
    from orchestrator.soup.config import make_task

    torch.set_num_threads(1)
    cfg = common.load_soup_config(common.soup_overrides(args))
    task = make_task(cfg)
    data = task.data()
    _, init = common.cached_pretrained(args.cache_dir, task, data, cfg["sweep"])
    hp = {"lr": 1e-3, "batch_size": 32, "augment": 0.5, "label_smoothing": 0.1, "seed": 0}
    print(f"bench_dynamics: {len(data.train)} training examples, {args.epochs} epoch(s) per run, {args.repeats} "
          f"pair(s) per setting, 1 torch thread; load {common.load():.2f}{' (--tiny task)' if args.tiny else ''}",
          flush=True)
    rows, ratios, run = [], {}, None
    for mixup in args.mixup:
        times = {True: [], False: []}
        for r in range(args.repeats):
            for record in ((True, False) if r % 2 == 0 else (False, True)):  # alternate who goes first
                seconds, made = timed_epochs(task, data, init, {**hp, "mixup": mixup}, record, args.epochs)
                times[record].append(seconds)
                run = made if record else run
        on, off = statistics.median(times[True]), statistics.median(times[False])
        ratios[mixup] = on / off
        rows.append(f"{mixup:>5g}  {off:12.3f}  {on:11.3f}  {on / off:7.3f}x")
    common.print_table("mixup  off s/epoch  on s/epoch  on/off", rows)

    frame = run.dynamics.frame(flipped=torch.zeros(len(data.train), dtype=torch.bool))
    with tempfile.TemporaryDirectory() as tmp:
        pool = Pool(os.path.join(tmp, "pool"), create=True)
        t0 = time.perf_counter()
        pool.add(Row(id="t.dynamics", kind="dynamics", sweep="bench", task=task.name, status="ok"),
                 table=pa.Table.from_pandas(frame, preserve_index=False))
        write = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(tmp, "pool", "tables"))
                   for f in fs)
    print(f"writing one trial's dynamics ({len(frame)} rows) into a pool: {write * 1000:.1f} ms, {size / 1024:.1f} KiB")
    if 0.0 in ratios:
        print(f"recording overhead without mixup: {ratios[0.0]:.3f}x (target <= {TARGET}x): "
              f"{'met' if ratios[0.0] <= TARGET else 'NOT met'}")
    for mixup, ratio in ratios.items():
        if mixup > 0:
            print(f"recording overhead with mixup {mixup:g}: {ratio:.3f}x (one more forward pass per batch)")
    print(f"load at the end {common.load():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
