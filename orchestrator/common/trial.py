"""The skeleton every Tune trial shares, whatever it trains: resume from its last
checkpoint, report with a checkpoint, and publish its result to the pool. (MLflow hears of
a trial from the driver, through what it reports: common/trial_runs.py.)

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
    (the pool, checkpoints): the only one, or rank 0 of a data-parallel trial."""

    def __init__(self, ctx: TrialContext, trial_id: str, reporter: Reporter):
        torch.set_num_threads(max(1, ctx.cpus_per_trial))
        self.ctx, self.id, self.reporter = ctx, trial_id, reporter
        self.lead = reporter.rank == 0
        self.pool = Pool(ctx.pool_uri)

    def published(self) -> dict[str, Any] | None:
        """This trial's pool row if it already finished (its driver died before Tune recorded
        that, and Tuner.restore started it again): there is nothing to redo."""
        row = self.pool.get(self.id) if self.pool.has(self.id) else None
        return row if row and row["status"] != "failed" else None

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

    def publish(self, row: Row, weights: StateDict | None = None) -> None:
        """The trial's result into the pool (its MLflow run is tagged with the row's id by the driver)."""
        if self.lead:
            self.pool.add(row, weights)


def maybe_crash(trial_id: str, epoch: int, rank: int = 0) -> None:
    """Fault injection for the tests, off unless ORCHESTRATOR_TEST_CRASH=<epoch>:<raise|kill>:<folder>:
    each trial then crashes once, right after that epoch's checkpoint (a marker file in
    <folder> makes its retry carry on); with ORCHESTRATOR_TEST_CRASH_ONE=1 only the first trial
    to get there does. In a data-parallel trial the worker of rank ORCHESTRATOR_TEST_CRASH_RANK
    (default 0) crashes."""
    spec = os.environ.get("ORCHESTRATOR_TEST_CRASH")
    if not spec or rank != int(os.environ.get("ORCHESTRATOR_TEST_CRASH_RANK", "0")):
        return
    at, how, folder = spec.split(":", 2)
    marker = os.path.join(folder, trial_id)
    if epoch != int(at) or os.path.exists(marker):
        return
    if os.environ.get("ORCHESTRATOR_TEST_CRASH_ONE") and os.listdir(folder):
        return
    open(marker, "w").close()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"test crash after epoch {epoch} (rank {rank})")
