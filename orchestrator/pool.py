"""The checkpoint pool from the command line.

    python -m orchestrator.pool show   --pool URI
    python -m orchestrator.pool verify --pool URI   # re-hash every file, exit 1 on problems
    python -m orchestrator.pool sync-mlflow --pool URI --tracking-uri URI  # replay into MLflow
    python -m orchestrator.pool gc --pool URI [--dry-run]   # remove temp files, unreadable rows, orphan weights

The pool itself (layout, rows, atomic writes) is orchestrator/common/pool.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

import pandas as pd

from orchestrator.common import tracking
from orchestrator.common.cli import run_main, show_our_warnings
from orchestrator.common.pool import KINDS, Pool, Row

__all__ = ["Pool", "Row", "main"]


def show(pool: Pool, kind: str | None = None, sweep: str | None = None, start_point: str | None = None) -> None:
    """The manifest as tables (proxy runs with their own columns), optionally only one kind,
    one sweep, and one start point (its pretrained row and the trials that started from it)."""
    df = pool.manifest()
    if len(df):
        keep = (df["kind"] == kind) if kind else True
        keep = keep & ((df["sweep"] == sweep) if sweep else True)
        if start_point:
            keep = keep & ((df["id"] == start_point) | df["parents"].map(lambda p: len(p) > 0 and p[0] == start_point))
        df = df[keep] if keep is not True else df
    if df.empty:
        print(f"{pool.uri}: no rows" + (" match" if kind or sweep or start_point else ""))
        return
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        for table in (_soup_view(df[df["kind"] != "proxy"]), _proxy_view(df[df["kind"] == "proxy"])):
            if len(table):
                print(table.to_string(index=False) + "\n")
    print(f"{len(df)} ingredients: " + ", ".join(f"{n} {k}" for k, n in df["kind"].value_counts().items()))


def _soup_view(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    view = df[["id", "kind", "status", "sweep"] + [c for c in ("val_acc", "id_acc", "ood_acc") if c in df]].copy()
    view["parents"] = df["parents"].map(len)
    view["start point"] = [p[0] if k == "trial" and len(p) else "" for k, p in zip(df["kind"], df["parents"])]
    return view


def _proxy_view(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    hp = pd.DataFrame([{k: h.get(k) for k in ("intervention", "width", "lr", "seed")} for h in df["hparams"]],
                      index=df.index)
    hp["lr"] = hp["lr"].map(lambda v: f"{v:g}" if isinstance(v, (int, float)) else "")
    view = pd.concat([df[["id", "status", "sweep"]], hp], axis=1)
    for col in ("final_loss", "attn_logit_peak"):
        view[col] = df[col] if col in df else float("nan")
    return view


def verify(pool: Pool) -> int:
    problems = pool.verify()
    for p in problems:
        print(p, file=sys.stderr)
    table = pool.table()
    n = sum(1 for r in table.column("weights").to_pylist() if r)
    bad_weights = len(problems) - len(pool.unreadable)
    print(f"{pool.uri}: {n - bad_weights}/{n} weights files verified; "
          f"{len(pool.unreadable)} unreadable row file(s) of {table.num_rows + len(pool.unreadable)}")
    return 1 if problems else 0


def gc(pool: Pool, dry_run: bool, min_age_s: float) -> int:
    garbage = pool.garbage(min_age_s)
    for path in garbage:
        print(f"{'would remove' if dry_run else 'removing'} {path}")
    if not dry_run:
        pool.remove(garbage)
    print(f"{pool.uri}: {len(garbage)} file(s) {'to remove' if dry_run else 'removed'} "
          f"(temp files of crashed writers, unreadable rows, weights no readable row references; "
          f"older than {min_age_s:g} s)")
    return 0


def sync_mlflow(pool: Pool, tracking_uri: str | None) -> int:
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    added, present = tracking.replay_pool(pool, uri)
    print(f"{uri}: replayed {added} ingredients from {pool.uri}; {present} were already there")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["show", "verify", "sync-mlflow", "gc"],
                        help="show the manifest; re-hash every weights file and read every row (exit 1 on "
                             "problems); replay the trials and soups MLflow lacks (after the server was "
                             "unreachable during a sweep); or remove leftover temp files and weights no row "
                             "references")
    parser.add_argument("--pool", default="pool", help="pool folder or URI (default: ./pool)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="sync-mlflow: the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    parser.add_argument("--kind", choices=KINDS, help="show: only rows of this kind")
    parser.add_argument("--sweep", help="show: only this sweep's (or study's) rows")
    parser.add_argument("--start-point", metavar="ID",
                        help="show: only this pretrained ingredient and the trials that started from it")
    parser.add_argument("--dry-run", action="store_true", help="gc: list what would be removed, remove nothing")
    parser.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                        help="gc: only files older than this (default: 3600; a running sweep's newest files are "
                             "in use)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    show_our_warnings()  # an unreadable row is named on stderr

    def run() -> int:
        pool = Pool(args.pool)
        if args.command == "show":
            show(pool, args.kind, args.sweep, args.start_point)
            return 0
        if args.command == "sync-mlflow":
            return sync_mlflow(pool, args.tracking_uri)
        if args.command == "gc":
            return gc(pool, args.dry_run, args.min_age)
        return verify(pool)

    return run_main(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
