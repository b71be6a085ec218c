"""The soup sweep's Ray Tune trial: fine-tune from the pool's pretrained weights,
checkpoint and report every epoch (the driver logs each report to MLflow), and publish the
final weights to the pool (the shared steps are common/trial.py's)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load_file

from orchestrator.common.pool import Pool, Row
from orchestrator.common.trial import Reporter, Trial, TrialContext, maybe_crash
from orchestrator.common.tune import storage_fs
from orchestrator.common.weights import arch_fingerprint, digest
from orchestrator.soup.dynamics.record import dynamics_row_id
from orchestrator.soup.fisher import diagonal_fisher, fisher_row_id
from orchestrator.soup.tasks import TASKS
from orchestrator.soup.tasks.base import TaskData
from orchestrator.soup.train import HPARAMS, FineTune, evaluate


@dataclass
class SweepContext(TrialContext):
    """Everything a soup trial needs besides its hyperparameters."""

    task_name: str = ""
    task_settings: dict[str, Any] = field(default_factory=dict)
    pretrained_id: str = ""  # the start point
    data_key: str = ""  # Task.data_key(): the training data and held-out split
    precision: str = "auto"
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "gpu": 0, "workers": 1})
    storage: str = ""  # Tune storage; data-parallel trials keep their Ray Train runs under it
    reusable: dict[str, str] = field(default_factory=dict)  # trial_definition -> id of an ok trial in the pool
    fisher_examples: int = 0  # > 0: estimate the diagonal Fisher at the end (the fisher recipe's input)
    record_dynamics: bool = True  # per-example training dynamics into the pool (data maps, FTFT)


# Settings that change what a trial logs, not the weights it trains
NOT_DEFINING = ("log_every", "spike_threshold")


def trial_definition(start_point: str, data_key: str, hp: dict[str, Any]) -> str:
    """What defines a trial's result: its start point, its data and held-out split, and every
    hyperparameter that changes the weights (defaults filled in, seed included). Equal definitions
    train equal weights."""
    full = {k: v.item() if hasattr(v, "item") else v for k, v in {**HPARAMS, **hp}.items()  # numpy -> Python
            if k not in NOT_DEFINING}
    if full["optimizer"] == "adamw":  # the one optimizer before it was a setting: older pools' trials match
        del full["optimizer"]
    return digest(start_point, data_key, full)


def run_trial(hp: dict[str, Any], ctx: SweepContext, data: TaskData) -> None:
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial = Trial(ctx, trial_id, Reporter(tune))
    done = trial.published()
    if done:  # nothing to redo: report what it got
        last = done["history"][-1]["epoch"] if len(done["history"]) else 0
        tune.report({"val_acc": 0.0, **done["metrics"], "epoch": last, "ingredient_id": trial_id})
        return
    same = ctx.reusable.get(trial_definition(ctx.pretrained_id, ctx.data_key, hp))
    if same:  # the pool holds this very trial from an earlier run of the sweep: use that one
        tune.report({"val_acc": 0.0, **trial.pool.get(same)["metrics"], "ingredient_id": same, "reused": 1.0})
        return
    if ctx.resources["workers"] > 1:
        run_data_parallel(hp, ctx, data, trial_id)
    else:
        fine_tune(hp, ctx, data, trial)


def run_data_parallel(hp: dict[str, Any], ctx: SweepContext, data: TaskData, trial_id: str) -> None:
    """Several workers (GPUs) for one trial: a Ray Train TorchTrainer started inside the Tune
    trial. Its run is named after the trial, so a retried trial resumes from the run's last
    checkpoint; TuneReportCallback forwards rank 0's metrics to Tune."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

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

    context = ray.train.get_context()
    if torch.cuda.is_available():  # "cuda" then means this worker's own GPU
        torch.cuda.set_device(ray.train.torch.get_device())
    trial = Trial(config["ctx"], config["trial_id"], Reporter(ray.train, context.get_world_rank()))
    fine_tune(config["hp"], config["ctx"], ray.get(config["data"]), trial,
              parallel=(context.get_world_size(), ray.train.torch.prepare_model))


def fine_tune(hp: dict[str, Any], ctx: SweepContext, data: TaskData, trial: Trial, parallel=(1, None)) -> None:
    """Fine-tune from the pool's pretrained weights; checkpoint and report every epoch; the
    final weights go to the pool before the last report. `parallel`: (world size, model wrapper)."""
    task = TASKS[ctx.task_name](ctx.task_settings)
    pretrained = trial.pool.load(ctx.pretrained_id)
    world, wrap = parallel
    run = FineTune(task, data, pretrained, hp, precision=ctx.precision, rank=trial.reporter.rank, world=world,
                   wrap=wrap, record_dynamics=ctx.record_dynamics)
    if trial.resume(run):  # a retried trial resumes from its last finished epoch
        print(f"trial {trial.id}: resuming after epoch {run.epoch} from its checkpoint")

    def row(status: str, metrics: dict[str, float], arch: str) -> Row:
        return Row(id=trial.id, kind="trial", sweep=ctx.sweep, task=task.name, status=status, hparams=run.hp,
                   metrics=metrics, history=run.history, parents=[ctx.pretrained_id], data_key=ctx.data_key,
                   arch=arch)

    while not run.done:
        t0 = time.time()
        loss = run.run_epoch()
        seconds = time.time() - t0
        if not math.isfinite(loss):
            metrics = {"train_loss": loss, "diverged": 1.0, "update_spikes": float(run.spikes)}
            trial.publish(row("diverged", metrics, arch_fingerprint(pretrained)))
            trial.report({**metrics, "epoch": run.epoch + 1, "val_acc": 0.0, "ingredient_id": trial.id,
                          "steps": run.signals})
            return
        metrics = {"train_loss": loss, "epoch_seconds": seconds,
                   "examples_per_second": len(data.train) / seconds, "update_spikes": float(run.spikes)}
        if not trial.lead:
            trial.report({**metrics, "epoch": run.epoch})
            maybe_crash(trial.id, run.epoch, trial.reporter.rank)
            continue
        metrics.update(evaluate(task, run.model, data, precision=ctx.precision))
        run.history.append({"epoch": run.epoch, **metrics})
        # the epoch's instability signals ride along, one MLflow point per recorded optimizer step
        report = {**metrics, "epoch": run.epoch, "diverged": 0.0, "steps": run.signals}
        if run.done:  # final epoch: publish to the pool before the last report
            # before the trial's row: a finished trial has its Fisher and its dynamics
            if ctx.fisher_examples:
                metrics["fisher_seconds"] = store_fisher(task, run, data, ctx, trial)
            if run.dynamics:
                store_dynamics(task, run, data, ctx, trial)
            weights = run.weights()
            trial.publish(row("ok", metrics, arch_fingerprint(weights)), weights)
            report["ingredient_id"] = trial.id
        trial.report(report, run)
        maybe_crash(trial.id, run.epoch)


def store_fisher(task, run: FineTune, data: TaskData, ctx: SweepContext, trial: Trial) -> float:
    """The trained model's diagonal Fisher into the pool, as a row whose parent is the trial;
    returns the seconds it took."""
    t0 = time.time()
    fisher = diagonal_fisher(task, run.model, data.train, ctx.fisher_examples, precision=ctx.precision)
    seconds = time.time() - t0
    trial.pool.add(Row(id=fisher_row_id(trial.id), kind="fisher", sweep=ctx.sweep, task=task.name, status="ok",
                       hparams={"examples": min(ctx.fisher_examples, len(data.train)), "seed": 0},
                       metrics={"seconds": seconds}, parents=[trial.id], arch=arch_fingerprint(fisher)), fisher)
    return seconds


def store_dynamics(task, run: FineTune, data: TaskData, ctx: SweepContext, trial: Trial) -> None:
    """The trial's per-example training dynamics into the pool: a Parquet table (id, epoch, p_gold,
    correct, flipped) in a row whose parent is the trial."""
    frame = run.dynamics.frame(flipped=data.flipped)
    if data.flipped is None:  # the labels as the data has them
        frame["flipped"] = False
    trial.pool.add(Row(id=dynamics_row_id(trial.id), kind="dynamics", sweep=ctx.sweep, task=task.name, status="ok",
                       hparams={"examples": len(data.train), "epochs": run.epoch, "mixup": run.hp["mixup"]},
                       metrics={"mean_p_gold": float(frame["p_gold"].mean())}, parents=[trial.id],
                       data_key=ctx.data_key), table=pa.Table.from_pandas(frame, preserve_index=False))


def stopped_early(result) -> bool:
    """A trial the scheduler (ASHA) stopped before its last epoch: no error, a checkpoint, and it
    never reported the ingredient id a finished trial reports with its last epoch."""
    metrics = result.metrics or {}
    return (result.error is None and "ingredient_id" not in metrics
            and (result.checkpoint is not None or "checkpoint_path" in metrics))


def last_checkpoint(result, storage: str):
    """A Tune result's last checkpoint: Tune's own, or for a data-parallel trial the Ray Train
    checkpoint whose path TuneReportCallback put in the metrics (`checkpoint_path`)."""
    if result.checkpoint is not None:
        return result.checkpoint
    from ray.train import Checkpoint

    return Checkpoint(result.metrics["checkpoint_path"], filesystem=storage_fs(storage)[0])


def publish_stopped(result, ctx: SweepContext) -> None:
    """A stopped trial into the pool from its last epoch checkpoint (the trial itself was stopped
    mid-loop and wrote nothing): status `stopped`, the metrics it reported at the stop."""
    from orchestrator.common.trial_runs import numeric  # (imports Ray Tune)

    with last_checkpoint(result, ctx.storage).as_directory() as d:
        weights = load_file(os.path.join(d, "model.safetensors"))
        state = torch.load(os.path.join(d, "train_state.pt"), weights_only=True)
    trial_id = os.path.basename(result.path.rstrip("/"))
    metrics = {k: v for k, v in numeric(result.metrics).items() if k != "diverged"}
    Pool(ctx.pool_uri).add(Row(id=trial_id, kind="trial", sweep=ctx.sweep, task=ctx.task_name, status="stopped",
                               hparams={**HPARAMS, **result.config}, metrics=metrics, history=state["history"],
                               parents=[ctx.pretrained_id], data_key=ctx.data_key, arch=arch_fingerprint(weights)),
                           weights)
