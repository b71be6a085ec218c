"""Benchmark: how many times cooking reads each ingredient, and a load's peak memory,
before and after the pool reads each weights file once (issue 10).

  before  the pool's reading as it was (Pool.load at commit 30ac6aa, kept below as
          ReadEveryTime): every load reads the whole file into memory, checks its sha256
          and parses it into a second copy (safetensors.torch.load); the kitchen's check
          of every ingredient before cooking is such a load too.
  after   Pool.load today: the sha256 is computed while the file streams by in 8 MiB
          chunks, once per Pool (the check), remembered; every load then maps the file
          with safetensors' memory-mapped load_file.

Reads per cook: a local pool of N ingredients (default 8; 3 with --tiny) of the default
glyph model: the cached pretrained weights plus seeded noise, with made-up val_acc (this
counts reads; what the soups score does not matter here). Each loader cooks the six
recipes of issue 10's measurement (soups, ensemble, WiSE-FT; the later merge recipes would
change the "before" count), in one process, as the sweep does (Kitchen, then soup.recipes.cook). Counted:
  storage reads  bytes the pool read through its filesystem for weights (whole-file
                 reads before; hash reads after), per ingredient file, in file sizes
  rchar          the process's read() bytes over the whole cook (/proc/self/io: Parquet
                 rows and everything else included), per ingredient file, in file sizes
  loads          Kitchen.load calls per ingredient (the same for both; the merges read their
                 tensors from the verified file instead, through Kitchen.source)
The memory-mapped loads read the file's pages from the OS page cache (or the disk, if it
dropped them); they are neither storage reads nor rchar. On an object store `after`
downloads each file once per cook into a local cache and maps that
(tests/cluster/test_s3.py checks the count).

Peak memory per load: one weights file of --load-mb (default 256; 8 with --tiny) in a
pool; for each loader a fresh process loads it and touches every tensor (sums it), as a
recipe does; peak RSS (VmHWM) above the RSS before, as a multiple of the file's size.

The pretrained weights are cached under --cache-dir, shared with the other benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402

SWEEP = "bench_pool_reads"
LOADERS = ("before", "after")


def parse_args(argv=None):
    p = common.parser("python bench/bench_pool_reads.py", __doc__)
    p.add_argument("--n", type=int, default=None, help="ingredients in the cooked pool (default: 8; 3 with --tiny)")
    p.add_argument("--load-mb", type=int, default=None,
                   help="size of the weights file whose load is measured, in MiB (default: 256; 8 with --tiny)")
    common.add_cache_flag(p)
    common.add_keep_flag(p, "the pools")
    common.add_tiny_flag(p, "N = 3 on the tiny glyph task, an 8 MiB file for the memory")
    p.add_argument("--child", nargs=2, metavar=("LOADER", "POOL"), help=argparse.SUPPRESS)  # internal: one load
    common.add_overrides(p)
    args = p.parse_args(argv)
    args.n = args.n or (3 if args.tiny else 8)
    args.load_mb = args.load_mb or (8 if args.tiny else 256)
    if args.n < 1 or args.load_mb < 1:
        p.error("--n and --load-mb must be >= 1")
    return args


def pool_class(loader: str):
    """The Pool class that reads as `loader` did."""
    from safetensors.torch import load as st_load

    from orchestrator.common.errors import PoolError
    from orchestrator.common.pool import Pool

    if loader == "after":
        return Pool

    class ReadEveryTime(Pool):
        """Pool.load as it was: the whole file read into memory and hashed at every load."""

        def load(self, ingredient):
            row = self.get(ingredient) if isinstance(ingredient, str) else ingredient
            with self.fs.open_input_stream(f"{self.root}/{row['weights']}") as f:
                blob = f.read()
            self.bytes_read += len(blob)
            if hashlib.sha256(blob).hexdigest() != row["sha256"]:
                raise PoolError(f"{self.uri}: weights of {row['id']} are corrupt")
            return st_load(blob)

        def local_weights(self, ingredient):  # every check was a full read and hash
            self.load(ingredient)
            row = self.get(ingredient) if isinstance(ingredient, str) else ingredient
            return f"{self.root}/{row['weights']}"  # the merge engine reads its tensors from the file

    return ReadEveryTime


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# -- reads per cook -------------------------------------------------------------------------


def build_pool(path: str, args, cfg, task, data):
    """The pretrained weights and N noisy copies of them, as trial rows of one sweep."""
    import torch

    from orchestrator.common.pool import Pool, Row
    from orchestrator.common.weights import arch_fingerprint

    pre_row, pre = common.cached_pretrained(args.cache_dir, task, data, cfg["sweep"])
    pool = Pool(path, create=True)
    common.add_row(pool, pre_row, pre)
    g = torch.Generator().manual_seed(0)
    for i in range(args.n):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in pre.items()}
        pool.add(Row(id=f"{SWEEP}-{i:02d}", kind="trial", sweep=SWEEP, task=task.name, status="ok",
                     metrics={"val_acc": 0.9 - 0.01 * i}, parents=[pre_row["id"]], data_key=task.data_key(),
                     arch=arch_fingerprint(state)), state)
    return pool, sum(v.numel() * v.element_size() for v in pre.values())


# what a default cook was when this was measured (issue 10): the soups, the ensemble and WiSE-FT
RECIPES = ["zero_shot", "best_individual", "uniform_soup", "greedy_soup", "ensemble", "wise_ft"]


def cook_with(loader: str, pool_path: str, cfg, task, data) -> dict:
    from orchestrator.soup.kitchen import Kitchen
    from orchestrator.soup.recipes import cook

    pool = pool_class(loader)(pool_path)
    loads = 0
    t, chars = time.perf_counter(), rchar()
    kitchen = Kitchen(pool, task, data, sweep=SWEEP,
                      settings={"precision": cfg["precision"], "bn_batches": cfg["soup"]["bn_batches"]})
    load = kitchen.load

    def counted(row):
        nonlocal loads
        loads += 1
        return load(row)

    kitchen.load = counted
    dishes = cook(kitchen, RECIPES, cfg["soup"])
    seconds, chars = time.perf_counter() - t, rchar() - chars
    files = len(kitchen.ingredients) + 1  # and the pretrained weights
    size = os.path.getsize(f"{pool.root}/{kitchen.pretrained['weights']}")
    return {"loader": loader, "files": files, "file_bytes": size, "reads": pool.bytes_read / files / size,
            "rchar": chars / files / size, "loads": loads / files, "seconds": seconds, "dishes": len(dishes)}


# -- peak memory per load, one fresh process per loader --------------------------------------


def big_pool(path: str, mib: int):
    """One ingredient of `mib` MiB of float32 tensors of 4 MiB each (a model's many matrices)."""
    import torch

    from orchestrator.common.pool import Pool, Row

    pool = Pool(path, create=True)
    g = torch.Generator().manual_seed(0)
    chunk = 1 << 20  # floats: 4 MiB
    state = {f"layer{i:03d}.weight": torch.randn(chunk, generator=g) for i in range(max(1, mib // 4))}
    pool.add(Row(id="big", kind="trial", sweep=SWEEP, task="none", status="ok"), state)
    return pool


def child(args) -> int:
    import torch

    loader, path = args.child
    pool = pool_class(loader)(path)
    row = pool.get("big")
    size = os.path.getsize(f"{pool.root}/{row['weights']}")
    with common.PeakRSS() as mem:
        state = pool.load(row)
        total = sum(float(v.sum()) for v in state.values())  # a recipe touches every tensor
    del state
    common.print_result({"loader": loader, "peak": mem.above, "file_bytes": size, "method": mem.method,
                         "finite": bool(torch.isfinite(torch.tensor(total)))})
    return 0


def measure_load(loader: str, path: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", loader, path]
    return common.run_child(cmd, common.child_env(), f"bench_pool_reads: the {loader} load process")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    t_start = time.perf_counter()
    from orchestrator.soup.config import make_task

    cfg = common.load_soup_config(common.soup_overrides(args))
    task = make_task(cfg)
    data = task.data()
    print(f"bench_pool_reads: {args.n} ingredients{' (--tiny task)' if args.tiny else ''}, the six recipes of issue 10 (soups, ensemble, WiSE-FT); "
          f"a {args.load_mb} MiB file for the peak memory of one load; load average {common.load():.2f}", flush=True)
    with common.temp_dir("bench_pool_reads-", args.keep) as tmp:
        pool, sd_bytes = build_pool(os.path.join(tmp, "pool"), args, cfg, task, data)
        cooks = [cook_with(loader, pool.uri, cfg, task, data) for loader in LOADERS]
        big = big_pool(os.path.join(tmp, "big"), args.load_mb)
        loads = [measure_load(loader, big.uri) for loader in LOADERS]
    mib = 1 << 20
    print()
    print(f"reads per cook: {cooks[0]['files']} weights files of {cooks[0]['file_bytes'] / 1024:.0f} KiB "
          f"(state dict {sd_bytes / 1024:.0f} KiB), {cooks[0]['dishes']} dishes; per ingredient file, in file sizes:")
    common.print_table(f"{'loader':<7} {'storage reads':>13} {'rchar':>6} {'loads':>5} {'cook s':>7}",
                       [f"{c['loader']:<7} {c['reads']:>13.2f} {c['rchar']:>6.2f} {c['loads']:>5.2f} {c['seconds']:>7.2f}"
                        for c in cooks])
    print()
    print(f"peak memory per load: a {loads[0]['file_bytes'] / mib:.0f} MiB weights file, loaded and every tensor "
          f"touched, fresh process each; peak RSS above the start ({loads[0]['method']}):")
    common.print_table(f"{'loader':<7} {'peak MiB':>8} {'x file':>6}",
                       [f"{m['loader']:<7} {m['peak'] / mib:>8.1f} {m['peak'] / m['file_bytes']:>6.2f}" for m in loads])
    print()
    print(f"bench_pool_reads finished in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
