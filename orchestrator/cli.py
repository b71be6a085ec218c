"""What every command shares: one-line errors, and the flags for pool, tracking and Ray."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from orchestrator.errors import UserError


def run_main(fn: Callable[[], int], debug: bool) -> int:
    """Run a command; bad input becomes `error: ...` on stderr and exit 2 (1 for bugs)."""
    try:
        return fn()
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a last line of defence, not control flow
        if debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def add_common_flags(parser: argparse.ArgumentParser, default_pool: str) -> None:
    parser.add_argument("--pool", default=default_pool,
                        help=f"checkpoint pool: a folder or a pyarrow URI such as s3://bucket/pool (default: ./{default_pool})")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to attach to, e.g. auto or ray://host:10001 "
                             "(default: $RAY_ADDRESS, else a local Ray on this machine)")
    parser.add_argument("--storage", default="ray_results",
                        help="where Ray Tune keeps trial checkpoints: a folder or URI (default: ./ray_results)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
