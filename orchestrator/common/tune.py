"""The one Ray Tune layer both commands use: connect to Ray, run (or restore) the
trials, show their progress one line each, and collect the trials that failed."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from orchestrator.common.cli import quiet_ray_loggers
from orchestrator.common.errors import UserError
from orchestrator.common.storage import filesystem


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a Ray address nobody answers at (ray.init itself would wait for minutes)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"Ray address {address!r}: nothing answers at {host}:{port} ({e.strerror or e})") from None


def connect(address: str | None, verbose: bool = False) -> dict[str, Any]:
    """Start a local Ray, or attach to a cluster; returns its size. Trials' own output
    reaches the terminal only with `verbose` (it is in Ray's session logs either way)."""
    import ray

    if not verbose:  # importing ray installed its stderr handlers
        quiet_ray_loggers()
    if not ray.is_initialized():
        try:
            # "local": a fresh Ray on this machine, as documented, never a stale `ray start` cluster
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=verbose,
                     configure_logging=verbose, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"Ray address {address!r}: cannot connect ({first[:200]})") from None
    res = ray.cluster_resources()
    return {"ray_nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "ray_cpus": res.get("CPU", 0), "ray_gpus": res.get("GPU", 0)}


def storage_fs(storage: str) -> tuple[pafs.FileSystem, str]:
    """Tune storage as (filesystem, path): a folder, or any pyarrow URI."""
    return filesystem(storage, "storage")


def run_name(name: str) -> str:
    """A new run's name, `<name>-<YYYYmmdd-HHMMSS>-<6 hex>`: unique even for two launches
    in the same second (the Tune run folder under --storage, the MLflow parent run)."""
    return f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def latest_run(storage: str, name: str) -> str | None:
    """Path (within the storage filesystem) of the newest restorable Tune run of `name`
    (named by run_name; runs named without the random suffix, before it existed, too)."""
    from ray import tune

    fs, root = storage_fs(storage)
    pattern = re.compile(re.escape(f"{name}-") + r"\d{8}-\d{6}(-[0-9a-f]{6})?")
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise UserError(f"storage {storage}: cannot list: {e}") from None
    names = sorted(i.base_name for i in found if i.type == pafs.FileType.Directory and pattern.fullmatch(i.base_name))
    for run in reversed(names):  # timestamps sort by time
        if tune.Tuner.can_restore(f"{root}/{run}", storage_filesystem=fs):
            return f"{root}/{run}"
    return None


@dataclass
class FailedTrial:
    trial_id: str
    config: dict[str, Any]
    error: str  # the last line of the trial's error


@dataclass
class TuneRun:
    """One invocation's trials on Ray Tune: `fit` a fresh run, or `restore` an interrupted
    one (finished trials stay finished; the others resume from their last checkpoint)."""

    name: str  # the Tune run's name (run_name)
    storage: str  # a folder or a pyarrow URI
    trainable: Any  # tune.with_parameters(...) already applied
    resources: dict[str, float]  # per trial
    max_failures: int  # retries per crashed trial
    total: int  # trials expected, for the progress lines
    describe: Callable[[dict[str, Any], dict[str, Any]], str]  # (config, last result) -> a progress line
    trial_runs: Any = None  # trial_runs.TrialRuns: every trial's MLflow run, logged from the driver
    tune_loggers: bool = False  # Tune's own CSV/JSON/TensorBoard files for every trial under storage
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the last fit or restore

    def fit(self, param_space: dict[str, Any], tune_config) -> Any:
        from ray import tune

        fs, root = storage_fs(self.storage)
        tuner = tune.Tuner(
            self._trainable(),
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=self.name,
                storage_path=root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=self._callbacks(),
                verbose=0,  # our one line per trial instead of Tune's tables
            ),
        )
        return self._run(tuner)

    def restore(self, path: str) -> Any:
        from ray import tune

        fs, _ = storage_fs(self.storage)
        tuner = tune.Tuner.restore(path, self._trainable(), resume_errored=True, storage_filesystem=fs)
        # Tune restores the callbacks pickled by the first driver, whose MLflow parent run was
        # another; this driver's own go in their place (no public API for that in Ray 2.60)
        tuner._local_tuner.get_run_config().callbacks = self._callbacks()
        return self._run(tuner)

    def _callbacks(self) -> list:
        return [Progress(self.describe, self.total)] + ([self.trial_runs] if self.trial_runs else [])

    def _run(self, tuner) -> Any:
        from orchestrator.common import tracking

        # Tune's automatic per-trial loggers write files nobody reads here (MLflow has it all)
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0" if self.tune_loggers else "1"
        # a dead tracking server costs seconds, not minutes per result
        with tracking.quick_fail(), graceful_stop() as stop:
            results = tuner.fit()
        self.interrupted = stop.signum
        return results

    def _trainable(self):
        from ray import tune

        # the experiment state is snapshotted after every trial result; with short trials Tune
        # warns about that every few seconds, a warning about its own design choice
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        return tune.with_resources(self.trainable, self.resources)


@dataclass
class Stop:
    signum: int | None = None


@contextlib.contextmanager
def graceful_stop() -> Iterator[Stop]:
    """While Tune runs: the first Ctrl-C (SIGINT) or SIGTERM (what a preempted cluster job gets)
    asks Tune to stop, through its own SIGUSR1 handler: running trials stop, their last epoch
    checkpoints and Tune's experiment state are saved, and `fit` returns (`Stop.signum` says
    which signal); a second one ends the process at once. Tune's SIGINT handler is off: it
    would stop just as well, but say nothing to the caller."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.signum is not None:
            print(f"\n{name} again: quitting now (finished trials are in the pool)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stop.signum = signum
        print(f"\n{name}: stopping the trials; Tune saves its state ({name} again quits at once)",
              file=sys.stderr, flush=True)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)  # Tune's graceful stop (it installs it in fit)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interruption(run: TuneRun, results, total: int, pool_uri: str, command: str, argv: list[str],
                 what: str = "trials"):
    """The Interrupted error of a run a signal stopped: what was kept, and the exact command
    that continues (the same arguments and --resume)."""
    from orchestrator.common.errors import Interrupted

    name = signal.Signals(run.interrupted).name
    done = sum(1 for r in results if r.error is None and (r.metrics or {}).get("ingredient_id"))
    again = shlex.join(["python", "-m", command, *[a for a in argv if a != "--resume"], "--resume"])
    return Interrupted(run.interrupted, f"interrupted ({name}): {done} of {total} {what} finished and are in the pool "
                                        f"{pool_uri}; the others' last checkpoints and Tune's state are under "
                                        f"{run.storage}; nothing was cooked or registered. Continue with: {again}")


def tune_options(**options: Any):
    """A TuneConfig with the options every command wants: reused actors (about 0.5 s
    instead of 2 s to start a trial) and trial folders named by trial id."""
    from ray import tune

    return tune.TuneConfig(reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id, **options)


def search_algorithm(name: str, seed: int, max_concurrent: int):
    """Tune's searcher for `search.algorithm`: random and grid sampling (BasicVariantGenerator,
    seeded), or Optuna's TPE / HyperOpt, seeded and capped at `max_concurrent` (0: no cap)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if name in ("random", "grid"):
        # the cap goes on the generator: Tune ignores max_concurrent_trials with an explicit one
        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    if name == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.disable_default_handler()  # its per-study lines go where the other libraries' go
        optuna.logging.enable_propagation()

        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=seed)
    return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher


def scheduler(spec: dict[str, Any], time_attr: str, max_t: int):
    """Tune's trial scheduler for `search.scheduler`: None (FIFO: every trial runs to its end) or
    ASHA, which stops a trial at a rung (grace_period x reduction_factor^k of `time_attr`) unless
    it is in the top 1/reduction_factor of the trials that reached that rung."""
    if spec["scheduler"] == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=spec["grace_period"],
                         reduction_factor=spec["reduction_factor"])


def failed_trials(results) -> list[FailedTrial]:
    """Every trial that failed after its retries."""
    return [FailedTrial(os.path.basename(r.path.rstrip("/")), dict(r.config or {}),
                        str(r.error).strip().splitlines()[-1][:300])
            for r in results if r.error is not None]


def _progress_callback():
    from ray.tune import Callback

    class _Progress(Callback):
        """One line per finished, failed or retried trial: a compact live view of the run."""

        def __init__(self, describe, total: int):
            self.describe, self.total, self.done, self.t0 = describe, total, 0, time.time()

        def _line(self, trial, outcome: str) -> None:
            text = self.describe(trial.config, trial.last_result or {})
            print(f"[{self.done}/{self.total} {time.time() - self.t0:4.0f}s] {trial.trial_id} {text}{outcome}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            self._line(trial, "")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, " FAILED (see the log)")

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} crashed; retrying from its last checkpoint", file=sys.stderr, flush=True)

    return _Progress


def Progress(describe, total: int):  # noqa: N802 - the class is made on first use: ray.tune imports slowly
    return _progress_callback()(describe, total)
