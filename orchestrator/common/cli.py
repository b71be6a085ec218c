"""What every command shares: one-line errors, the flags for pool, tracking and Ray, and
terminal output that shows our progress while library chatter goes to a log file."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable

from orchestrator.common.errors import Interrupted, Terminated, UserError

# Library defaults that only add noise to a command's terminal output.
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no "Downloading artifacts" bars
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # no "Creating initial MLflow database tables"
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's legacy reporter, silent at verbose=0 (the new one prints a box anyway)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no "Loading weights" bars from transformers (it reads this too)
}


def run_main(fn: Callable[[], int], debug: bool) -> int:
    """Run a command; bad input becomes `error: ...` on stderr and exit 2 (1 for bugs); Ctrl-C
    exits 130 and SIGTERM 143, each with one line, no traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn()
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `... | head` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - a last line of defence, not control flow
        if debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _raise_terminated(signum, frame):
    raise Terminated()


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
    parser.add_argument("--tune-loggers", action="store_true",
                        help="also let Ray Tune write its CSV/JSON/TensorBoard files for every trial under --storage "
                             "(off by default: every trial's metrics are in MLflow)")
    parser.add_argument("--log-dir", default="logs",
                        help="folder of the log file that takes Ray's, Tune's and MLflow's own messages "
                             "(default: ./logs; its path is printed)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Tune's and MLflow's messages on the terminal too")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def route_library_output(log_dir: str, name: str, verbose: bool) -> str:
    """Send library logging and warnings to <log_dir>/<name>-<time>.log (and, with
    `verbose`, to the terminal as well); returns the log file's path. Our own progress
    lines are plain prints and stay on the terminal."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    path = os.path.abspath(os.path.join(log_dir, f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}.log"))
    to_file = _LazyFileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    _replace_ours(root, [to_file, *([logging.StreamHandler(sys.stderr)] if verbose else [])])
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # e.g. MLflow's type-hint hint on every logged model
    for lib in ("ray", "mlflow", "alembic"):  # they install handlers of their own: send those here too
        logging.getLogger(lib).handlers = []
        logging.getLogger(lib).propagate = True
    if verbose:  # the root's terminal handler shows them
        _replace_ours(logging.getLogger("orchestrator"), [])
    else:
        show_our_warnings()
    return path


def show_our_warnings() -> None:
    """Our own warnings (a skipped ingredient, an unreadable pool row) on stderr, as `warning: ...`."""
    _replace_ours(logging.getLogger("orchestrator"), [_terminal_handler()])


def _replace_ours(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    """Swap the handlers an earlier call added (a test runs many commands in one process) for these."""
    logger.handlers = [h for h in logger.handlers if not getattr(h, "orchestrator", False)]
    for h in handlers:
        h.orchestrator = True
        logger.addHandler(h)


class _LazyFileHandler(logging.FileHandler):
    """Creates its folder and file on the first message only: bad input writes nothing."""

    def __init__(self, path: str):
        super().__init__(path, delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def _terminal_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    return handler


def quiet_ray_loggers() -> None:
    """`import ray` installs stderr handlers of its own: call after it, before ray.init."""
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        lib = logging.getLogger(name)
        lib.handlers, lib.propagate = [], True
