"""Every trial's MLflow run, logged from the driver: Ray Tune's MLflowLoggerCallback with our
conventions (tracking.py) instead of its own.

Trials never talk to MLflow themselves: on a cluster the tracking server may listen on the
head's 127.0.0.1, out of the workers' reach, yet each trial's metrics show in MLflow as
soon as the trial reports them. What the base callback does differently, and why:
- the run nests under the sweep's (or study's) parent run and carries our tags and the
  source, user and git commit tags MLflow's fluent API would add;
- a trial continues its own run: after a crash in this process (Tune retries it), and after
  `Tuner.restore` in a new driver, found by its trial-id tag, so no trial gets two runs; a
  result at a step the run already has (reported again after the driver was killed) is skipped;
- params are the trial's full hyperparameters (defaults filled in), not just the sampled ones;
- each result's metrics go in one batch at the trial's own step (epoch, or optimizer step),
  plus any per-step points the trial batched into the result (`steps`);
- a crashed trial ends FAILED, tagged with its pool id and status, so `pool sync-mlflow` does
  not replay it a second time;
- a trial that reuses the pool's earlier result for the same settings (it trains nothing)
  leaves no run: its run is deleted at that first report;
- MLflow trouble never stops the sweep: one warning, then trials go unlogged (the pool has
  them all, and the sweep replays what MLflow lacks).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TRAINING_ITERATION

from orchestrator.common import tracking

log = logging.getLogger(__name__)

STEP_KEYS = ("epoch", "step")  # the first a result has is its MLflow step
NOT_METRICS = {*AUTO_RESULT_KEYS, *STEP_KEYS, "done", "steps", "trial_id", "experiment_tag", "should_checkpoint"}
PER_STEP = "steps"  # a result's list of per-step points, each {"step": s, metric: value, ...}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a result (MLflow takes no NaN, strings or lists as metrics)."""
    return {k: float(v) for k, v in values.items() if k not in NOT_METRICS and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def trial_status(result: dict[str, Any], failed: bool) -> str:
    """The pool status of a trial that ended with this last result."""
    if failed:
        return "failed"
    if result.get("diverged"):
        return "diverged"
    return "ok" if "ingredient_id" in result else "stopped"  # stopped: by the scheduler, before its last epoch


class TrialRuns(MLflowLoggerCallback):
    """One nested MLflow run per Tune trial (see the module's docstring)."""

    def __init__(self, where: tracking.Destination, name: Callable[[str, dict], str],
                 params: Callable[[dict], dict[str, Any]], diverged_fails: bool = True,
                 datasets: list[dict[str, Any]] = ()):
        """`name` and `params`: a trial's run name (from its id and config) and params (from its
        config); `diverged_fails`: a diverged trial's run ends FAILED (a fine-tune) or FINISHED
        (an LR probe, for which diverging is a measurement); `datasets`: what every trial trains and
        is evaluated on, logged as its run's inputs (tracking.log_datasets)."""
        super().__init__(tracking_uri=where.uri, tags=tracking.run_tags("trial", where.parent_run_id))
        self.where, self.name_of, self.params_of = where, name, params
        self.failing = ("failed", "diverged") if diverged_fails else ("failed",)
        self.datasets = list(datasets)
        self.broken = False

    def setup(self, *args, **kwargs) -> None:
        # not the base class's: it points the driver's fluent MLflow API at this store, process-wide
        self._trial_runs = {}  # trial -> its run id
        self._logged = {}  # run id -> the last step logged, for a run continued after Tuner.restore

    def _guard(self, fn, *args) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types for an unreachable store
            self.broken = True
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("MLflow: stopped logging trials (%s); the pool has every finished trial", first)

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:  # a retried trial starts again: it keeps its run
            self._guard(self._start, trial)

    def _start(self, trial) -> None:
        uri, exp = self.where.uri, self.where.experiment_id
        run = tracking.find_run(uri, exp, tracking.TRIAL_ID, trial.trial_id, full=True)  # after Tuner.restore
        if run is None:
            run_id = tracking.start_run(uri, exp, self.name_of(trial.trial_id, trial.config),
                                        {**self.tags, tracking.TRIAL_ID: trial.trial_id},
                                        self.params_of(trial.config))
            if self.datasets:
                tracking.log_datasets(uri, run_id, self.datasets)
        else:  # a restored trial reports again what the killed driver may already have logged
            run_id = run.info.run_id
            self._logged[run_id] = int(run.data.tags.get(tracking.LAST_STEP, -1))
        self._trial_runs[trial] = run_id

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial in self._trial_runs:
            self._guard(self._result, trial, result)

    def _result(self, trial, result: dict) -> None:
        if result.get("reused"):  # the pool's earlier trial with these very settings stands in: no new run
            tracking.client(self.where.uri).delete_run(self._trial_runs.pop(trial))
            return
        run_id = self._trial_runs[trial]
        step = int(next((result[k] for k in STEP_KEYS if k in result), result.get(TRAINING_ITERATION, 0)))
        if step <= self._logged.get(run_id, -1):  # logged before the driver was killed
            return
        points = [(numeric(result), step)] + [(numeric(p), int(p["step"])) for p in result.get(PER_STEP) or []]
        tracking.log_points(self.where.uri, run_id, points, {tracking.LAST_STEP: str(step)})  # one request

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial in self._trial_runs:
            self._guard(self._end, trial, failed)

    def _end(self, trial, failed: bool) -> None:
        run_id, last = self._trial_runs.pop(trial), trial.last_result or {}
        status = trial_status(last, failed)
        # failed and stopped trials get their pool row from the driver, under the trial id too
        tracking.set_tags(self.where.uri, run_id, {tracking.STATUS: status, tracking.INGREDIENT: trial.trial_id})
        tracking.end_run(self.where.uri, run_id, "FAILED" if status in self.failing else "FINISHED")
