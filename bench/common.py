"""What the benchmarks share: the pretrained-weights cache, capturing Ray's and MLflow's
console output to a log file, temp folders, a few argument helpers and the tiny mode.

The benchmarks are scripts (`python bench/bench_fanout.py`); each puts the repository root
on sys.path before `from bench import common`, so they also run as `python -m bench.bench_fanout`
and from any working directory. This module imports nothing heavy at import time: the
benchmarks time their own imports.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import threading
from typing import Any, Iterator

DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "orchestrator-bench-cache")

# --tiny: the glyph task the tests use (seconds to pretrain), same code paths as the default.
TINY_TASK = [
    "task.width=8", "task.pretrain_per_glyph=2", "task.pretrain_epochs=1", "task.ood_font_per_digit=3",
    "hyperparameters.epochs={randint: [1, 2]}",
]


# -- arguments ----------------------------------------------------------------------------


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(allow_abbrev=False, prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_tiny_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tiny", action="store_true",
                   help=f"seconds instead of minutes, same code paths and the same report: {what} "
                        "(for the tests; the numbers mean little)")


def add_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, type=os.path.abspath,  # absolute: benchmarks may cd
                   help=f"where the pretrained weights are cached, shared by the benchmarks (default: {DEFAULT_CACHE})")


def add_keep_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--keep", action="store_true", help=f"keep the temp dir ({what})")


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="soup-sweep config overrides, e.g. hyperparameters.epochs=2 (after the --tiny ones)")


def soup_overrides(args: argparse.Namespace, *more: str) -> list[str]:
    """The config overrides a soup benchmark runs with: --tiny's, the user's, then its own."""
    return [*(TINY_TASK if args.tiny else []), *args.overrides, *more]


def load_soup_config(overrides: list[str]) -> dict[str, Any]:
    """The soup sweep's default config (orchestrator/configs/glyphs_soup.yaml) with overrides."""
    from orchestrator.soup.config import load_config

    return load_config(None, overrides)


# -- the pretrained weights, made once -----------------------------------------------------


def cached_pretrained(cache_dir: str, task, data, sweep: str):
    """The task's pretrained row and weights from a pool under cache_dir, made there on first
    use exactly as a sweep makes them (soup.pretrained.ensure_pretrained). The pool keys them
    by the pretraining settings: the tiny and the default task each have their own entry."""
    from orchestrator.common.pool import Pool
    from orchestrator.soup.pretrained import ensure_pretrained

    pool = Pool(os.path.join(cache_dir, "pool"), create=True)
    row = ensure_pretrained(pool, task, data, sweep)
    return row, pool.load(row)


def add_row(pool, row: dict[str, Any], weights=None) -> dict[str, Any]:
    """Copy a row read from one pool (a dict) into another, with its weights."""
    from dataclasses import fields

    from orchestrator.common.pool import Row

    return pool.add(Row(**{f.name: row[f.name] for f in fields(Row) if f.name in row}), weights)


# -- peak memory -------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    return _status_kb("VmRSS") * 1024


class PeakRSS:
    """Peak RSS over a block: the kernel's high-water mark, reset at the start; or, if the
    kernel does not let us reset it, a background thread sampling RSS every millisecond.
    `split()` ends one sub-phase (returns its peak above the base) and starts the next."""

    def __init__(self):
        self.method, self.peak, self._stop, self._thread = "", 0, None, None

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            self.peak = rss()
            return False

    def _peak(self) -> int:
        return max(self.peak, rss()) if self._thread else _status_kb("VmHWM") * 1024

    def __enter__(self):
        gc.collect()
        self.base = rss()
        if self._reset():
            self.method = "VmHWM"
        else:
            self.method = "sampled RSS (1 ms)"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss())

    def split(self) -> int:
        above = self._peak() - self.base
        self._reset()
        return above

    def __exit__(self, *exc):
        self.above = self._peak() - self.base
        if self._thread:
            self._stop.set()
            self._thread.join()
        return False


# -- output and temp folders ---------------------------------------------------------------


@contextlib.contextmanager
def captured(path: str | None) -> Iterator[None]:
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


def count_lines(path: str) -> int:
    try:
        with open(path, errors="replace") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


@contextlib.contextmanager
def temp_dir(prefix: str, keep: bool = False, cd: bool = False) -> Iterator[str]:
    """A fresh temp folder, removed at the end unless `keep` (then its path is printed).
    `cd`: work in it meanwhile, so what the product writes to its working directory (MLflow's
    ./mlruns artifacts next to a sqlite store, say) lands there too."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    cwd = os.getcwd()
    try:
        if cd:
            os.chdir(tmp)
        yield tmp
    finally:
        os.chdir(cwd)
        if keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def route_library_output(log_dir: str, name: str, verbose: bool) -> str:
    """What a command's main() does first (common.cli.route_library_output): its quiet
    environment (no per-trial result files in Tune, ...) and library logging to a file.
    Call before `import ray`: Ray's workers inherit the environment at ray.init."""
    from orchestrator.common.cli import route_library_output as route

    return route(log_dir, name, verbose)


def unroute_library_output(log_dir: str) -> None:
    """Close the log handlers writing under log_dir (before it is removed: a handler opens
    its file lazily and would create the folder again on a late message)."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if os.path.abspath(getattr(handler, "baseFilename", "/")).startswith(os.path.abspath(log_dir) + os.sep):
            root.removeHandler(handler)
            handler.close()


def child_env(**more: str) -> dict[str, str]:
    """The environment for a process a benchmark starts: never attached to someone's Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(more)
    return env


RESULT = "RESULT "  # how a measuring child process prefixes its JSON line


def print_result(result: dict[str, Any]) -> None:
    """What a measuring child prints last: one line its parent finds (run_child)."""
    import json

    print(RESULT + json.dumps(result), flush=True)


def run_child(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """Run a measuring child process (a fresh process: its peak memory is its own) and
    return the result it printed; its output and a one-line exit if it failed."""
    import json
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):])


def print_table(head: str, rows: list[str]) -> None:
    print(head)
    print("-" * len(head))
    for row in rows:
        print(row)


def load() -> float:
    """The 1-minute load average (other users' jobs move every timing on a shared machine)."""
    return os.getloadavg()[0]
