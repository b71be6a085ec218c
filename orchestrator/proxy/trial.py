"""The LR study's Ray Tune trial: one proxy run (proxy/run.py) at one grid point, reported
every `log_every` steps (the driver logs the reports to MLflow) and published to the pool
(kind=proxy) through the shared trial skeleton."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from orchestrator.common.pool import Row
from orchestrator.common.trial import Reporter, Trial, TrialContext
from orchestrator.common.weights import arch_fingerprint
from orchestrator.proxy.data import ByteCorpus
from orchestrator.proxy.run import ProxyRun


@dataclass
class ProxyContext(TrialContext):
    """What every proxy trial shares besides its grid point."""

    study_keys: dict[str, str] = field(default_factory=dict)  # intervention -> proxy.config.run_key
    settings: dict[str, Any] = field(default_factory=dict)
    interventions: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    done: dict[str, str] = field(default_factory=dict)  # grid_point -> id of a finished run in the pool


def grid_point(study_key: str, hp: dict[str, Any]) -> str:
    """A run of the study: its settings (study key) and its place on the grid."""
    return f"{study_key}/{hp['intervention']}/w{hp['width']}/lr{float(hp['lr']):g}/s{hp['seed']}"


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow and JSON take no NaN/inf: drop them (the pool keeps `diverged`)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def run_proxy_trial(hp: dict[str, Any], ctx: ProxyContext, data: ByteCorpus) -> None:
    from ray import tune

    # Ray logs a line per saved checkpoint: noise across ~100 short trials
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial = Trial(ctx, tune.get_context().get_trial_id(), Reporter(tune))
    done = trial.published()
    if done:  # nothing to redo: report what it got
        tune.report({**done["metrics"], "step": int(done["metrics"].get("steps_done", 0)), "ingredient_id": trial.id})
        return
    earlier = ctx.done.get(grid_point(ctx.study_keys[hp["intervention"]], hp))
    if earlier:  # an earlier launch of the study ran this grid point: keep its result
        tune.report({**trial.pool.get(earlier)["metrics"], "ingredient_id": earlier, "reused": 1.0})
        return
    settings = proxy_settings(ctx, hp)
    run = ProxyRun(settings, hp["width"], hp["lr"], hp["seed"], data)
    hparams = proxy_hparams(ctx, hp)
    if not trial.resume(run):  # a retried trial resumes where its last checkpoint left it
        trial.report({"val_loss": run.loss_0, "step": 0})

    while not run.done:
        record = run.train_step()
        if record is None:
            continue
        run.history.append(record)
        checkpoint = not run.done and ctx.checkpoint_every and run.step % ctx.checkpoint_every < settings["log_every"]
        trial.report({**finite(record), "diverged": 0.0}, run if checkpoint else None)

    summary = run.summary()
    status = "diverged" if run.diverged else "ok"
    trial.publish(Row(id=trial.id, kind="proxy", sweep=ctx.sweep, task="proxy_lm", status=status, hparams=hparams,
                      metrics=finite(summary), history=[finite(h) for h in run.history],
                      arch=arch_fingerprint(run.weights())), None if run.diverged else run.weights())
    trial.report({**finite(summary), "val_loss": summary["final_loss"], "step": run.step, "ingredient_id": trial.id},
                 run)


def proxy_settings(ctx: ProxyContext, hp: dict[str, Any]) -> dict[str, Any]:
    """The study's settings with the trial's intervention applied."""
    return {**ctx.settings, **ctx.interventions[hp["intervention"]]}


def proxy_hparams(ctx: ProxyContext, hp: dict[str, Any]) -> dict[str, Any]:
    """Everything that defines a proxy run: its grid point, its settings and the study key."""
    return {**hp, **proxy_settings(ctx, hp), "study_key": ctx.study_keys[hp["intervention"]]}


def trial_run_name(trial_id: str, hp: dict[str, Any]) -> str:
    return f"{hp['intervention']}-w{hp['width']}-lr{hp['lr']:g}-s{hp['seed']}"
