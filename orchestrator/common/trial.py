"""The skeleton every Tune trial shares, whatever it trains: resume from its last
checkpoint, report with a checkpoint, and publish its result to the pool and MLflow.

A training run plugs in through three methods: `weights()` (a state dict), `state()`
(optimizer and progress, loadable with weights_only=True) and `restore(weights, state)`.

Exactly-once in the pool: the ingredient id is the Tune trial id and the pool ignores a
second add of an existing id, so a trial retried after it wrote its row (or resumed by
Tuner.restore) cannot add a duplicate.
"""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from orchestrator.common import tracking
from orchestrator.common.pool import Pool, Row
from orchestrator.common.weights import StateDict


class Resumable(Protocol):
    def weights(self) -> StateDict: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, weights: StateDict, state: dict[str, Any]) -> None: ...


@dataclass
class TrialContext:
    """Where every trial of one invocation publishes (shipped once through the object store)."""

    sweep: str  # the sweep or study name: the pool's `sweep` column
    pool_uri: str  # absolute: each trial runs in a folder of its own
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus_per_trial: int


class Reporter:
    """Where a training process reports: `ray.tune` in a plain trial, `ray.train` in each worker
    of a data-parallel trial (every worker reports; only rank 0 writes checkpoints, the pool and MLflow)."""

    def __init__(self, session, rank: int = 0):
        self.session, self.rank = session, rank

    def get_checkpoint(self):
        return self.session.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        ckpt = self.session.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self.session.report(metrics, checkpoint=ckpt)


class Trial:
    """One trial's bookkeeping around its training loop; `lead` is the process that writes
    (the pool, MLflow, checkpoints): the only one, or rank 0 of a data-parallel trial."""

    def __init__(self, ctx: TrialContext, trial_id: str, reporter: Reporter):
        for key, value in tracking.QUICK_FAIL_HTTP.items():  # a dead MLflow server must not stall training
            os.environ.setdefault(key, value)
        torch.set_num_threads(max(1, ctx.cpus_per_trial))
        self.ctx, self.id, self.reporter = ctx, trial_id, reporter
        self.lead = reporter.rank == 0
        self.pool = Pool(ctx.pool_uri)
        self.mlflow = tracking.TrialTracker.off()

    def published(self) -> dict[str, Any] | None:
        """This trial's pool row if it already finished (its driver died before Tune recorded
        that, and Tuner.restore started it again): there is nothing to redo."""
        row = self.pool.get(self.id) if self.pool.has(self.id) else None
        return row if row and row["status"] != "failed" else None

    def track(self, name: str, params: dict[str, Any]) -> tracking.TrialTracker:
        """The trial's nested MLflow run (a retried trial continues its own)."""
        if self.lead:
            where = tracking.Destination(self.ctx.tracking_uri, self.ctx.experiment_id, self.ctx.parent_run_id)
            self.mlflow = tracking.TrialTracker(where, self.id, name, params)
        return self.mlflow

    def resume(self, run: Resumable) -> bool:
        """Restore `run` from the trial's last checkpoint, if Tune handed it one."""
        checkpoint = self.reporter.get_checkpoint()
        if not checkpoint:
            return False
        with checkpoint.as_directory() as d:
            run.restore(load_file(os.path.join(d, "model.safetensors")),
                        torch.load(os.path.join(d, "train_state.pt"), weights_only=True))
        return True

    def report(self, metrics: dict[str, Any], run: Resumable | None = None) -> None:
        """Report to Tune; with `run` (on the lead process), with a checkpoint to resume from."""
        if run is None or not self.lead:
            self.reporter.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_file(run.weights(), os.path.join(d, "model.safetensors"))
            torch.save(run.state(), os.path.join(d, "train_state.pt"))
            self.reporter.report(metrics, checkpoint_dir=d)

    def publish(self, row: Row, weights: StateDict | None = None, mlflow_status: str = "FINISHED") -> None:
        """The trial's result into the pool, then its MLflow run tagged and closed."""
        if not self.lead:
            return
        row.mlflow_run_id = self.mlflow.run_id or ""
        self.pool.add(row, weights)
        self.mlflow.tags({tracking.INGREDIENT: self.id, tracking.STATUS: row.status})
        self.mlflow.end(mlflow_status)


def maybe_crash(trial_id: str, epoch: int) -> None:
    """Fault injection for the tests, off unless ORCHESTRATOR_TEST_CRASH=<epoch>:<raise|kill>:<folder>:
    each trial then crashes once, right after that epoch's checkpoint (a marker file in
    <folder> makes its retry carry on)."""
    spec = os.environ.get("ORCHESTRATOR_TEST_CRASH")
    if not spec:
        return
    at, how, folder = spec.split(":", 2)
    marker = os.path.join(folder, trial_id)
    if epoch != int(at) or os.path.exists(marker):
        return
    open(marker, "w").close()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"test crash after epoch {epoch}")
