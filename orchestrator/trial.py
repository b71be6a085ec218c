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
import time
from dataclasses import dataclass, field
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
    precision: str = "auto"
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "gpu": 0, "workers": 1})
    storage: str = ""  # Tune storage; data-parallel trials keep their Ray Train runs under it


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


def run_trial(hp: dict[str, Any], ctx: SweepContext, data: TaskData) -> None:
    from ray import tune

    for key, value in tracking.QUICK_FAIL_HTTP.items():  # a dead MLflow server must not stall training
        os.environ.setdefault(key, value)
    trial_id = tune.get_context().get_trial_id()
    pool = Pool(ctx.pool_uri)
    done = pool.get(trial_id) if pool.has(trial_id) else None
    if done and done["status"] != "failed":
        # it finished, but its driver died before Tune recorded that (Tuner.restore): nothing to redo
        tune.report({"val_acc": 0.0, **done["metrics"], "ingredient_id": trial_id})
        return
    if ctx.resources["workers"] > 1:
        run_data_parallel(hp, ctx, data, trial_id)
    else:
        fine_tune(hp, ctx, data, trial_id, Reporter(tune))


def run_data_parallel(hp: dict[str, Any], ctx: SweepContext, data: TaskData, trial_id: str) -> None:
    """Several workers (GPUs) for one trial: a Ray Train TorchTrainer started inside the Tune
    trial. Its run is named after the trial, so a retried trial resumes from the run's last
    checkpoint; TuneReportCallback forwards rank 0's metrics to Tune."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.fanout import storage_fs

    res = ctx.resources
    fs, root = storage_fs(ctx.storage)
    trainer = TorchTrainer(
        _data_parallel_worker,
        train_loop_config={"hp": hp, "ctx": ctx, "data": ray.put(data), "trial_id": trial_id},
        scaling_config=ScalingConfig(
            num_workers=res["workers"], use_gpu=res["gpu"] > 0,
            resources_per_worker={"CPU": res["cpu"], **({"GPU": res["gpu"]} if res["gpu"] else {})}),
        run_config=RunConfig(name=f"{ctx.sweep}-data-parallel-{trial_id}", storage_path=f"{root}/data-parallel",
                             storage_filesystem=fs, callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


def _data_parallel_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    if torch.cuda.is_available():  # "cuda" then means this worker's own GPU
        torch.cuda.set_device(ray.train.torch.get_device())
    fine_tune(config["hp"], config["ctx"], ray.get(config["data"]), config["trial_id"], Reporter(ray.train, rank),
              world=ray.train.get_context().get_world_size(), wrap=ray.train.torch.prepare_model)


def fine_tune(hp: dict[str, Any], ctx: SweepContext, data: TaskData, trial_id: str, reporter: Reporter,
              world: int = 1, wrap=None) -> None:
    """Fine-tune from the pool's pretrained weights; checkpoint and report every epoch; the
    final weights go to the pool before the last report."""
    from orchestrator.tasks import TASKS

    torch.set_num_threads(max(1, ctx.cpus_per_trial))
    task: Task = TASKS[ctx.task_name](ctx.task_settings)
    pool = Pool(ctx.pool_uri)
    lead = reporter.rank == 0  # the one process that writes (pool, MLflow, checkpoints)
    pretrained = pool.load(ctx.pretrained_id)
    run = FineTune(task, data, pretrained, hp, precision=ctx.precision, rank=reporter.rank, world=world, wrap=wrap)
    mlflow = tracking.TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id,
                                   trial_id, f"trial-{trial_id}", run.hp) if lead else tracking.TrialTracker.off()

    checkpoint = reporter.get_checkpoint()
    if checkpoint:  # a retried trial resumes from its last finished epoch
        with checkpoint.as_directory() as d:
            run.restore(load_file(os.path.join(d, "model.safetensors")),
                        torch.load(os.path.join(d, "train_state.pt"), weights_only=True))
        print(f"trial {trial_id}: resuming after epoch {run.epoch} from its checkpoint")

    row = {"id": trial_id, "kind": "trial", "sweep": ctx.sweep, "task": task.name, "hparams": run.hp,
           "parents": [ctx.pretrained_id], "mlflow_run_id": mlflow.run_id or ""}
    while not run.done:
        t0 = time.time()
        loss = run.run_epoch()
        seconds = time.time() - t0
        if not math.isfinite(loss):
            metrics = {"train_loss": loss, "diverged": 1.0}
            if lead:
                pool.add({**row, "status": "diverged", "arch": arch_fingerprint(pretrained), "metrics": metrics})
                mlflow.tags({tracking.INGREDIENT: trial_id, "orchestrator.status": "diverged"})
                mlflow.end("FAILED")
            reporter.report({**metrics, "epoch": run.epoch + 1, "val_acc": 0.0, "ingredient_id": trial_id})
            return
        metrics = {"train_loss": loss, "epoch_seconds": seconds,
                   "examples_per_second": len(data.train) / seconds}
        if not lead:
            reporter.report({**metrics, "epoch": run.epoch})
            continue
        metrics.update(evaluate(task, run.model, data, precision=ctx.precision))
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
            reporter.report(report, checkpoint_dir=d)
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
