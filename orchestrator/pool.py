"""The checkpoint pool from the command line.

    python -m orchestrator.pool show   --pool URI
    python -m orchestrator.pool verify --pool URI   # re-hash every file, exit 1 on problems
    python -m orchestrator.pool sync-mlflow --pool URI --tracking-uri URI  # replay into MLflow
    python -m orchestrator.pool gc --pool URI [--dry-run]   # remove temp files, unreadable rows, orphan weights
    python -m orchestrator.pool import --pool URI --sweep NAME --base BASE FINETUNE ...  # bring your own
    python -m orchestrator.pool merge --pool URI --sweep NAME --method ties k=0.2   # merge them, no task needed

The pool itself (layout, rows, atomic writes) is orchestrator/common/pool.py; importing and
merging checkpoints made elsewhere is orchestrator/merging/checkpoints.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

import pandas as pd

from orchestrator.common import tracking
from orchestrator.common.cli import run_main, show_our_warnings
from orchestrator.common.errors import UserError
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


def import_checkpoints(pool_uri: str, sweep: str, base: str, paths: list[str], max_distance: float) -> int:
    import time

    from orchestrator.merging.checkpoints import check_inputs, import_checkpoints as add

    t0 = time.time()
    check_inputs(base, paths, max_distance)  # every input, before the pool is created or written
    pool = Pool(pool_uri, create=True)
    done = add(pool, sweep, base, paths, max_distance)
    print(f"{pool.uri}: sweep {sweep!r}: {done.new} of {len(done.rows) + 1} checkpoints added "
          f"({len(done.rows) + 1 - done.new} were there already) in {time.time() - t0:.1f} s")
    print(f"  base       {done.base['id']}  <- {base}")
    for row, path in zip(done.rows, paths):
        print(f"  fine-tune  {row['id']}  <- {path}")
    print(f"merge them: python -m orchestrator.pool merge --pool {pool.uri} --sweep {sweep} --method ties")
    return 0


def merge_sweep(pool_uri: str, sweep: str, method: str, settings: list[str], device: str, out: str | None) -> int:
    import shutil
    import time

    import yaml

    from orchestrator.merging import methods as registry
    from orchestrator.merging.checkpoints import merge_sweep as merge

    params = {}
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"merge setting {item!r}: expected key=value, e.g. k=0.2")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"merge setting {item!r}: the value is not YAML") from None
    m = registry.get(method)
    m.settings(params)  # a bad setting is an error before the pool is read
    pool = Pool(pool_uri)
    t0, tty, last = time.time(), sys.stdout.isatty(), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.time()
        if done == total or now - last[0] >= (1 if tty else 15):
            last[0] = now
            line = f"  {done}/{total} tensors, {now - t0:.0f} s"
            print(f"\r{line}" if tty else line, end="" if tty and done < total else "\n", flush=True)

    row, new = merge(pool, sweep, m.name, params, device, progress)
    shown = ", ".join(f"{k}={v}" for k, v in row["hparams"].items() if k != "method")
    if new:
        print(f"merged {len(row['parents']) - 1} fine-tunes of sweep {sweep!r} with {m.name} ({shown or 'defaults'}) "
              f"on {device} in {time.time() - t0:.1f} s")
    else:
        print(f"{row['id']}: this merge of these ingredients is in the pool already")
    print(f"pool row {row['id']}: {pool.uri}/{row['weights']}")
    if out:
        target = os.path.abspath(out)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.partial"
        shutil.copyfile(pool.local_weights(row), tmp)
        os.replace(tmp, target)
        print(f"written to {target}")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    from orchestrator.merging.methods import METHODS

    parser = argparse.ArgumentParser(prog="python -m orchestrator.pool", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, allow_abbrev=False)
        sub.add_argument("--pool", default="pool", help="pool folder or URI (default: ./pool)")
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
        return sub

    show_p = command("show", "show the manifest")
    show_p.add_argument("--kind", choices=KINDS, help="only rows of this kind")
    show_p.add_argument("--sweep", help="only this sweep's (or study's) rows")
    show_p.add_argument("--start-point", metavar="ID",
                        help="only this pretrained ingredient and the trials that started from it")
    command("verify", "re-hash every weights file and read every row (exit 1 on problems)")
    sync_p = command("sync-mlflow", "replay the trials and soups MLflow lacks (after the server was unreachable "
                                    "during a sweep)")
    sync_p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    gc_p = command("gc", "remove leftover temp files, unreadable rows and weights no row references")
    gc_p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    gc_p.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                      help="only files older than this (default: 3600; a running sweep's newest files are in use)")
    import_p = command("import", "add fine-tunes made elsewhere (safetensors files or Hugging Face model folders "
                                 "of one base) to the pool as the ingredients of a sweep; every input is checked "
                                 "first (tensor names, shapes, dtypes, the base), nothing is written on a problem")
    import_p.add_argument("--sweep", required=True, help="the sweep they become ingredients of")
    import_p.add_argument("--base", required=True, help="the base model they were all fine-tuned from")
    import_p.add_argument("checkpoints", nargs="+", metavar="FINETUNE", help="the fine-tuned checkpoints")
    import_p.add_argument("--max-distance", type=float, default=0.5, metavar="FRACTION",
                          help="refuse a checkpoint whose weight matrices are farther than this from the base's, "
                               "relative to their norm, the median over matrices (default: 0.5; a fine-tune is a "
                               "few hundredths away, an unrelated model of the same shape ~1.4)")
    merge_p = command("merge", "merge a sweep's ingredients into a new pool row (kind soup) with a merge method, "
                               "on the streaming engine: no task, no evaluation (the soup sweep cooks recipes that "
                               "evaluate)")
    merge_p.add_argument("--sweep", required=True, help="the sweep whose finished ingredients are merged")
    merge_p.add_argument("--method", required=True, choices=sorted(METHODS), help="the merge method")
    merge_p.add_argument("settings", nargs="*", metavar="key=value",
                         help="the method's settings, e.g. k=0.2 lambda=1.0 (" + "; ".join(
                             f"{name}: {', '.join(p.name for p in m.params) or 'none'}"
                             for name, m in sorted(METHODS.items())) + ")")
    merge_p.add_argument("--device", default="cpu", help="where the math runs: cpu, cuda, cuda:1 (default: cpu)")
    merge_p.add_argument("--out", help="also write the merged weights to this safetensors file")
    args = parser.parse_args(argv)
    show_our_warnings()  # an unreadable row is named on stderr

    def run() -> int:
        if args.command == "import":
            return import_checkpoints(args.pool, args.sweep, args.base, args.checkpoints, args.max_distance)
        if args.command == "merge":
            return merge_sweep(args.pool, args.sweep, args.method, args.settings, args.device, args.out)
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
