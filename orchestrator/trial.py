"""One Ray Tune trial: fine-tune from the pool's pretrained weights, checkpoint every
epoch, track in MLflow, and add the final weights to the pool.

Exactly-once in the pool: the ingredient id is the Tune trial id, and the pool
ignores a second add of an existing id, so a trial retried after it wrote its row
(or resumed by Tuner.restore) cannot add a duplicate.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from orchestrator import tracking
from orchestrator.pool import Pool
from orchestrator.tasks.base import Task, TaskData, arch_fingerprint
from orchestrator.train import FineTune, evaluate


@dataclass
class SweepContext:
    """Everything a trial needs besides its hyperparameters (shipped once via the object store)."""

    sweep: str
    task_name: str
    task_settings: dict[str, Any]
    pool_uri: str
    pretrained_id: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus_per_trial: int


def run_trial(hp: dict[str, Any], ctx: SweepContext, data: TaskData) -> None:
    from ray import tune

    from orchestrator.tasks import TASKS

    torch.set_num_threads(max(1, ctx.cpus_per_trial))
    for key, value in tracking.QUICK_FAIL_HTTP.items():  # a dead MLflow server must not stall training
        os.environ.setdefault(key, value)
    trial_id = tune.get_context().get_trial_id()
    task: Task = TASKS[ctx.task_name](ctx.task_settings)
    pool = Pool(ctx.pool_uri)
    done = pool.get(trial_id) if pool.has(trial_id) else None
    if done and done["status"] != "failed":
        # it finished, but its driver died before Tune recorded that (Tuner.restore): nothing to redo
        tune.report({"val_acc": 0.0, **done["metrics"], "ingredient_id": trial_id})
        return
    pretrained = pool.load(ctx.pretrained_id)
    run = FineTune(task, data, pretrained, hp)
    mlflow = tracking.TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id,
                                   trial_id, f"trial-{trial_id}", run.hp)

    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a retried trial resumes from its last finished epoch
        with checkpoint.as_directory() as d:
            run.restore(load_file(os.path.join(d, "model.safetensors")),
                        torch.load(os.path.join(d, "train_state.pt"), weights_only=True))
        print(f"trial {trial_id}: resuming after epoch {run.epoch} from its checkpoint")

    row = {"id": trial_id, "kind": "trial", "sweep": ctx.sweep, "task": task.name, "hparams": run.hp,
           "parents": [ctx.pretrained_id], "mlflow_run_id": mlflow.run_id or ""}
    while not run.done:
        loss = run.run_epoch()
        if not math.isfinite(loss):
            metrics = {"train_loss": loss, "diverged": 1.0}
            pool.add({**row, "status": "diverged", "arch": arch_fingerprint(pretrained), "metrics": metrics})
            mlflow.tags({tracking.INGREDIENT: trial_id, "orchestrator.status": "diverged"})
            mlflow.end("FAILED")
            tune.report({**metrics, "epoch": run.epoch + 1, "val_acc": 0.0, "ingredient_id": trial_id})
            return
        metrics = {"train_loss": loss, **evaluate(task, run.model, data)}
        run.history.append({"epoch": run.epoch, **metrics})
        mlflow.metrics(metrics, step=run.epoch)
        report = {**metrics, "epoch": run.epoch, "diverged": 0.0}
        weights = run.weights()
        if run.done:  # final epoch: publish to the pool before the last report
            pool.add({**row, "status": "ok", "arch": arch_fingerprint(weights), "metrics": metrics,
                      "history": run.history}, weights)
            mlflow.tags({tracking.INGREDIENT: trial_id, "orchestrator.status": "ok"})
            mlflow.end()
            report["ingredient_id"] = trial_id
        with tempfile.TemporaryDirectory() as d:
            save_file(weights, os.path.join(d, "model.safetensors"))
            torch.save(run.state(), os.path.join(d, "train_state.pt"))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        _test_crash(trial_id, run.epoch)


def _test_crash(trial_id: str, epoch: int) -> None:
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
